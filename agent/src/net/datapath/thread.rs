//! The data path thread: its state, its mio loop, busy-polling, and the
//! commands the protocol thread sends it (plan steps, stops, announces).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Poll, Registry, Token};
use netdev::dataplane::Dataplane;
use netdev::ring::NetRing;
use netdev::rss::Rss;
use netdev::stats::{PairCounts, PairStats};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use super::{Command, SimReport};
use crate::ratelimit::PeerLog;
use crate::vhost_user::datapath;
use crate::vhost_user::memory::guest_mapping::FaultWatch;
use crate::vhost_user::memory::GuestRam;
use crate::vhost_user::vring::drain_eventfd;
use crate::wake_channel::{Gone, WakeReceiver};

/// Chains taken from one ring before the loop looks at the others.
pub(super) const BURST: usize = 64;

/// The command channel's token.
pub(super) const CONTROL: Token = Token(usize::MAX);
/// Tokens from here on are dataplane fds, by pair.
pub(super) const DATAPLANE_BASE: usize = 1 << 16;

/// A running ring.
pub(super) struct Slot {
    pub(super) ring: NetRing,
    pub(super) kick: File,
    pub(super) call: Option<Arc<File>>,
    pub(super) enabled: bool,
    pub(super) broken: bool,
    /// Its kick is still watched (a broken ring's is not: a guest that
    /// keeps kicking it must not keep waking the data path).
    pub(super) watched: bool,
}

impl Slot {
    pub(super) fn usable(&self) -> bool {
        self.enabled && !self.broken
    }
}

/// A frame from the dataplane waiting for RX buffers.
pub(super) struct Pending {
    pub(super) target: u16,
    pub(super) len: usize,
    pub(super) frame: Vec<u8>,
}

/// Everything the data path thread owns.
pub(super) struct DataPath {
    pub(super) name: Arc<str>,
    pub(super) dataplane: Dataplane,
    pub(super) memory: GuestMemoryAtomic<GuestRam>,
    pub(super) registry: Registry,
    pub(super) rings: Vec<Option<Slot>>,
    /// Per pair: the dataplane may have frames (edge-triggered readiness).
    pub(super) rx_ready: Vec<bool>,
    /// Per pair: a dataplane frame that found no RX buffer yet.
    pub(super) pending: Vec<Option<Pending>>,
    pub(super) stats: Arc<[PairStats]>,
    /// This step's counts, per pair, added to `stats` at the end of a step.
    pub(super) counts: Vec<PairCounts>,
    pub(super) rss: Option<Rss>,
    pub(super) hdr_len: usize,
    pub(super) mrg_rxbuf: bool,
    pub(super) tx_buf: Vec<u8>,
    pub(super) rx_buf: Vec<u8>,
    pub(super) needs_reset: Arc<AtomicBool>,
    pub(super) poll: Duration,
    /// Warnings about what the guest did wrong, rate-limited per device.
    pub(super) peers: Arc<PeerLog>,
    /// Contained SIGBUS in guest memory (the front-end shrank it).
    pub(super) faults: FaultWatch,
    /// The cost model's accounting, for the control API.
    pub(super) sim_report: Arc<Mutex<Option<SimReport>>>,
    /// Per pair: its dataplane queue was created (`create_queue`).
    pub(super) queues: Vec<bool>,
}

pub(super) fn tx_index(pair: u16) -> usize {
    2 * usize::from(pair) + 1
}

pub(super) fn rx_index(pair: u16) -> usize {
    2 * usize::from(pair)
}

impl DataPath {
    pub(super) fn pairs(&self) -> u16 {
        // rings has 2 * pairs entries, pairs <= MAX_QUEUE_PAIRS.
        (self.rings.len() / 2) as u16
    }

    pub(super) fn warn(&mut self, text: std::fmt::Arguments<'_>) {
        self.peers.warn(text);
    }

    /// Stop watching the kicks of broken rings: they are not looked at
    /// again until they are started anew.
    fn unwatch_broken(&mut self) {
        for slot in self.rings.iter_mut().flatten() {
            if slot.broken && slot.watched {
                slot.watched = false;
                let _ = self
                    .registry
                    .deregister(&mut SourceFd(&slot.kick.as_raw_fd()));
            }
        }
    }

    /// The front-end truncated guest memory under our mapping (a SIGBUS
    /// was contained): every ring stops until the device is reset.
    pub(super) fn memory_faulted(&mut self) {
        let mut stopped = 0;
        for slot in self.rings.iter_mut().flatten() {
            if !slot.broken {
                slot.broken = true;
                stopped += 1;
            }
        }
        self.needs_reset.store(true, Ordering::SeqCst);
        if stopped > 0 {
            log::error!(
                "{}: the front-end truncated guest memory under the agent's mapping (SIGBUS contained); {stopped} ring(s) stopped, the device needs a reset",
                self.name
            );
        }
    }

    pub(super) fn run(mut self, mut poller: Poll, commands: WakeReceiver<Command>) {
        let mut events = Events::with_capacity(64);
        loop {
            let mut did_work = false;
            // Commands first: a stop must not wait behind traffic.
            loop {
                match commands.try_recv() {
                    Ok(Some(Command::Exit)) | Err(Gone) => {
                        self.stop_all();
                        return;
                    }
                    Ok(Some(command)) => {
                        self.command(command);
                        did_work = true;
                    }
                    Ok(None) => break,
                }
            }
            if self.step() {
                continue;
            }
            if did_work {
                continue;
            }
            if !self.poll.is_zero() && self.spin(&commands) {
                continue;
            }
            if self.arm_kicks() {
                continue;
            }
            if commands.pending() {
                continue;
            }
            self.unwatch_broken();
            if let Err(e) = poller.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("{}: net data path poll failed: {e}", self.name);
                self.needs_reset.store(true, Ordering::SeqCst);
                return;
            }
            for event in events.iter() {
                let token = event.token();
                if token == CONTROL {
                    commands.clear();
                } else if token.0 >= DATAPLANE_BASE {
                    if let Some(ready) = self.rx_ready.get_mut(token.0 - DATAPLANE_BASE) {
                        *ready = true;
                    }
                } else if let Some(Some(slot)) = self.rings.get(token.0) {
                    drain_eventfd(&slot.kick);
                }
            }
        }
    }

    /// Busy-poll the rings (and a tap) for up to `poll` with kicks off.
    /// Returns true when there is work.
    fn spin(&mut self, commands: &WakeReceiver<Command>) -> bool {
        let memory = self.memory.memory();
        let mem: &GuestRam = &memory;
        for slot in self.rings.iter_mut().flatten() {
            let _ = slot.ring.disable_kicks(mem);
        }
        let deadline = Instant::now() + self.poll;
        let mut rounds = 0u32;
        while Instant::now() < deadline {
            if commands.pending() {
                return true;
            }
            for pair in 0..self.pairs() {
                if let Some(Some(slot)) = self.rings.get(tx_index(pair)) {
                    if slot.usable() && slot.ring.has_avail(mem) {
                        return true;
                    }
                }
                if let Some(pending) = &self.pending[usize::from(pair)] {
                    if let Some(Some(slot)) = self.rings.get(rx_index(pending.target)) {
                        if slot.usable() && slot.ring.has_avail(mem) {
                            return true;
                        }
                    }
                }
            }
            rounds += 1;
            // A tap can only be asked with a system call: every 64 rounds.
            if !self.dataplane.reflects() && rounds.is_multiple_of(64) {
                self.rx_ready.iter_mut().for_each(|ready| *ready = true);
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Turn kicks on for the rings we wait on before sleeping: TX rings,
    /// and RX rings a pending frame waits for. Returns true if chains arrived
    /// meanwhile.
    fn arm_kicks(&mut self) -> bool {
        let memory = self.memory.memory();
        let mem: &GuestRam = &memory;
        let mut waiting_rx = vec![false; self.rings.len()];
        for pending in self.pending.iter().flatten() {
            waiting_rx[rx_index(pending.target)] = true;
        }
        let mut arrived = false;
        for (index, slot) in self.rings.iter_mut().enumerate() {
            let Some(slot) = slot.as_mut().filter(|slot| slot.usable()) else {
                continue;
            };
            if !index.is_multiple_of(2) || waiting_rx[index] {
                match slot.ring.enable_kicks(mem) {
                    Ok(true) => arrived = true,
                    Ok(false) => {}
                    Err(e) => {
                        slot.broken = true;
                        self.needs_reset.store(true, Ordering::SeqCst);
                        log::error!("{}: queue {index}: {}", self.name, crate::error_chain(&e));
                    }
                }
            }
        }
        // Pending frames whose ring already has buffers: deliver now.
        arrived
            || self.pending.iter().flatten().any(|pending| {
                matches!(self.rings.get(rx_index(pending.target)), Some(Some(slot)) if slot.usable() && slot.ring.has_avail(mem))
            })
    }

    /// Refresh what the control API shows of the cost model's charges.
    fn publish_sim_report(&self) {
        if let Some(hw) = self.dataplane.sim() {
            let report = SimReport::of(hw);
            *self.sim_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        }
    }

    /// Carry out one command. A reply goes out once what the command
    /// charged is visible: whoever waits for it (a control API `presetup`,
    /// a GET_VRING_BASE) may read the cost model's report next.
    fn command(&mut self, command: Command) {
        match command {
            Command::Execute(steps, reply) => {
                let results = datapath::execute_all(self, steps);
                self.publish_sim_report();
                let _ = reply.send(results);
            }
            Command::Stop(ring, reply) => {
                let stopped = self.stop(ring);
                self.publish_sim_report();
                let _ = reply.send(stopped);
            }
            Command::Announce(mac, reply) => {
                let result = self.dataplane.announce(mac, self.hdr_len);
                let _ = reply.send(result);
            }
            Command::Exit => {}
        }
    }

    /// Take ring `index` back: its next avail index and its kick. Every
    /// chain taken from the ring was answered within its step and published
    /// at the step's end, so the index is exact.
    pub(super) fn stop(&mut self, index: u16) -> Option<(u16, File)> {
        let slot = self.rings.get_mut(usize::from(index))?.take()?;
        if slot.watched {
            let _ = self
                .registry
                .deregister(&mut SourceFd(&slot.kick.as_raw_fd()));
        }
        Some((slot.ring.next_avail(), slot.kick))
    }

    fn stop_all(&mut self) {
        for index in 0..self.rings.len() {
            // index < 2 * MAX_QUEUE_PAIRS.
            self.stop(index as u16);
        }
        self.pending.iter_mut().for_each(|pending| *pending = None);
    }
}
