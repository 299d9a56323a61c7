//! Moving frames: TX chains out of the guest's rings onto the wire (or,
//! reflected, into an RX ring), frames from the wire into RX rings, used
//! entries published once per step with one interrupt decision per ring.

use std::sync::atomic::{AtomicBool, Ordering};

use netdev::ring::{RxOutcome, TxChain};
use netdev::spec;
use netdev::stats::PairCounts;
use vm_memory::GuestAddressSpace;

use super::thread::{rx_index, tx_index, DataPath, Pending, Slot, BURST};
use crate::vhost_user::memory::GuestRam;
use crate::vhost_user::vring::notify;

impl DataPath {
    /// One pass over every pair: TX chains out, dataplane frames in, used
    /// entries published, guests signalled. Returns whether anything moved.
    pub(super) fn step(&mut self) -> bool {
        let memory = self.memory.memory();
        let mem: &GuestRam = &memory;
        let mut moved = false;
        for pair in 0..self.pairs() {
            moved |= self.transmit(mem, pair);
            if !self.dataplane.reflects() {
                moved |= self.receive(mem, pair);
            }
        }
        self.finish_step(mem);
        // After the work: the access that faulted may have been this
        // step's, and nothing may wake us again.
        if self.faults.faulted(mem) {
            self.memory_faulted();
        }
        moved
    }

    /// Publish used entries, signal guests, fold counts into the stats.
    fn finish_step(&mut self, mem: &GuestRam) {
        // Counters first: whoever sees a used entry sees it counted.
        for (pair, counts) in self.counts.iter_mut().enumerate() {
            if !counts.is_empty() {
                self.stats[pair].add(counts);
                *counts = PairCounts::default();
            }
        }
        for index in 0..self.rings.len() {
            let Some(slot) = self.rings[index].as_mut() else {
                continue;
            };
            let signal = match slot
                .ring
                .publish(mem)
                .and_then(|published| Ok(published && slot.ring.needs_call(mem)?))
            {
                Ok(signal) => signal,
                Err(e) => {
                    slot.broken = true;
                    self.needs_reset.store(true, Ordering::SeqCst);
                    log::error!(
                        "{}: queue {index}: {}; the device needs a reset",
                        self.name,
                        crate::error_chain(&e)
                    );
                    true
                }
            };
            if signal {
                if let Some(call) = &slot.call {
                    notify(call);
                }
            }
        }
    }

    /// Take up to a burst of TX chains of `pair` and send their frames.
    fn transmit(&mut self, mem: &GuestRam, pair: u16) -> bool {
        let tx = tx_index(pair);
        // The TX ring and the scratch buffer leave `self` for the burst, so
        // the frames can go into other rings meanwhile.
        let Some(mut slot) = self.rings[tx].take() else {
            return false;
        };
        if !slot.usable() {
            self.rings[tx] = Some(slot);
            return false;
        }
        let mut buf = std::mem::take(&mut self.tx_buf);
        let result = slot.ring.tx_burst(mem, &mut buf, BURST, |chain, frame| match chain {
            TxChain::Bad { head, reason } => {
                self.counts[usize::from(pair)].tx_errors += 1;
                self.warn(format_args!("TX queue {tx}: chain {head} dropped: {reason}"));
            }
            TxChain::Frame { head, len } if len < self.hdr_len => {
                self.counts[usize::from(pair)].tx_errors += 1;
                self.warn(format_args!(
                    "TX queue {tx}: chain {head} of {len} bytes is shorter than the virtio-net header"
                ));
            }
            TxChain::Frame { len, .. } => self.forward(mem, pair, &frame[..len]),
        });
        self.tx_buf = buf;
        let moved = match result {
            Ok(taken) => taken > 0,
            Err(e) => {
                slot.broken = true;
                self.needs_reset.store(true, Ordering::SeqCst);
                log::error!("{}: TX queue {tx}: {}", self.name, crate::error_chain(&e));
                true
            }
        };
        self.rings[tx] = Some(slot);
        moved
    }

    /// Send `frame` (virtio-net header included), taken from the TX ring
    /// of `pair`.
    fn forward(&mut self, mem: &GuestRam, pair: u16, frame: &[u8]) {
        let counts = &mut self.counts[usize::from(pair)];
        counts.tx_packets += 1;
        counts.tx_bytes += (frame.len() - self.hdr_len) as u64;
        if self.dataplane.reflects() {
            let payload = &frame[self.hdr_len..];
            let target = self.steer(payload, pair);
            // The guest's header carries no offload work (none is offered
            // for reflecting dataplanes): the RX header starts zeroed.
            let mut header = [0u8; spec::HDR_LEN_MRG];
            let header = &mut header[..self.hdr_len];
            let outcome = self.deliver_frame(mem, target, header, payload);
            if outcome == Some(RxOutcome::NoBuffers) {
                self.counts[usize::from(target)].rx_dropped += 1;
            }
            return;
        }
        match self.dataplane.send(pair, frame) {
            Ok(true) => {}
            Ok(false) => self.counts[usize::from(pair)].tx_dropped += 1,
            Err(e) => {
                self.counts[usize::from(pair)].tx_dropped += 1;
                self.warn(format_args!(
                    "pair {pair}: dataplane send failed: {}",
                    crate::error_chain(&e)
                ));
            }
        }
    }

    /// The RX pair for a frame: the one RSS picks (if configured), else the
    /// pair the frame came in on; if that RX ring is not running, the first
    /// that is (the guest may use fewer pairs than the device has).
    fn steer(&self, frame: &[u8], pair: u16) -> u16 {
        let usable =
            |p: u16| matches!(self.rings.get(rx_index(p)), Some(Some(slot)) if slot.usable());
        let wanted = self
            .rss
            .as_ref()
            .map_or(pair, |rss| rss.select_queue(frame));
        if usable(wanted) {
            return wanted;
        }
        if usable(pair) {
            return pair;
        }
        (0..self.pairs()).find(|&p| usable(p)).unwrap_or(pair)
    }

    /// Write one frame into the RX ring of `target`. Returns the outcome, or
    /// `None` if the ring is not running (the frame is dropped).
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        rings: &mut [Option<Slot>],
        counts: &mut [PairCounts],
        needs_reset: &AtomicBool,
        name: &str,
        mem: &GuestRam,
        target: u16,
        header: &mut [u8],
        frame: &[u8],
        mrg_rxbuf: bool,
    ) -> Option<RxOutcome> {
        let counts = &mut counts[usize::from(target)];
        let Some(slot) = rings[rx_index(target)]
            .as_mut()
            .filter(|slot| slot.usable())
        else {
            counts.rx_dropped += 1;
            return None;
        };
        match slot.ring.push_rx(mem, header, frame, mrg_rxbuf) {
            Ok(RxOutcome::Delivered { buffers }) => {
                counts.rx_packets += 1;
                counts.rx_bytes += frame.len() as u64;
                Some(RxOutcome::Delivered { buffers })
            }
            Ok(RxOutcome::TooBig) => {
                counts.rx_dropped += 1;
                Some(RxOutcome::TooBig)
            }
            // The caller decides: a reflected frame is dropped, a dataplane
            // frame waits for buffers.
            Ok(RxOutcome::NoBuffers) => Some(RxOutcome::NoBuffers),
            Err(e) => {
                counts.rx_dropped += 1;
                slot.broken = true;
                needs_reset.store(true, Ordering::SeqCst);
                log::error!(
                    "{name}: RX queue {}: {}; the device needs a reset",
                    rx_index(target),
                    crate::error_chain(&e)
                );
                None
            }
        }
    }

    /// Move frames from the dataplane queue of `pair` into RX rings.
    fn receive(&mut self, mem: &GuestRam, pair: u16) -> bool {
        let p = usize::from(pair);
        let mut moved = false;
        // With no RX ring running the frames stay in the dataplane (the
        // kernel queues them) instead of being read only to be dropped;
        // starting a ring makes us look again.
        let any_rx = (0..self.pairs())
            .any(|q| matches!(self.rings.get(rx_index(q)), Some(Some(slot)) if slot.usable()));
        if !any_rx {
            return false;
        }
        // A frame that waited for buffers goes first, in order.
        if let Some(mut pending) = self.pending[p].take() {
            let hdr_len = self.hdr_len;
            let (header, frame) = pending.frame[..pending.len].split_at_mut(hdr_len);
            let outcome = Self::deliver_frame(self, mem, pending.target, header, frame);
            if outcome == Some(RxOutcome::NoBuffers) {
                self.pending[p] = Some(pending);
                return false;
            }
            moved = true;
        }
        for _ in 0..BURST {
            if !self.rx_ready[p] {
                break;
            }
            let len = match self.dataplane.recv(pair, &mut self.rx_buf) {
                Ok(Some(len)) => len,
                Ok(None) => {
                    self.rx_ready[p] = false;
                    break;
                }
                Err(e) => {
                    self.rx_ready[p] = false;
                    self.warn(format_args!(
                        "pair {pair}: dataplane receive failed: {}",
                        crate::error_chain(&e)
                    ));
                    break;
                }
            };
            moved = true;
            if len < self.hdr_len {
                self.counts[p].rx_dropped += 1;
                continue;
            }
            let target = self.steer(&self.rx_buf[self.hdr_len..len], pair);
            let mut buf = std::mem::take(&mut self.rx_buf);
            let (header, frame) = buf[..len].split_at_mut(self.hdr_len);
            let outcome = Self::deliver_frame(self, mem, target, header, frame);
            if outcome == Some(RxOutcome::NoBuffers) {
                // Keep the frame and stop reading until the guest posts
                // buffers: the kernel queues (and drops) the rest.
                self.pending[p] = Some(Pending {
                    target,
                    len,
                    frame: buf,
                });
                self.rx_buf = vec![0u8; self.hdr_len.max(spec::HDR_LEN_MRG) + spec::MAX_FRAME_LEN];
                break;
            }
            self.rx_buf = buf;
        }
        moved
    }

    /// [`Self::deliver`] with this device's rings, counters and header
    /// layout.
    fn deliver_frame(
        &mut self,
        mem: &GuestRam,
        target: u16,
        header: &mut [u8],
        frame: &[u8],
    ) -> Option<RxOutcome> {
        Self::deliver(
            &mut self.rings,
            &mut self.counts,
            &self.needs_reset,
            &self.name,
            mem,
            target,
            header,
            frame,
            self.mrg_rxbuf,
        )
    }
}
