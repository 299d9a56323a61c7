//! One virtqueue of a net device as the data path uses it: frames taken
//! from TX chains, frames written into RX chains (merged buffers included),
//! and used entries published in batches.
//!
//! `virtio-queue` pops chains and walks descriptors; `ring/chain.rs` walks every
//! chain whole and refuses what no correct driver builds before any of
//! its buffers is touched (the blk parser's rules). Used entries are
//! written here rather than with its
//! `add_used`, which publishes the used index once per entry: a frame spread
//! over several merged buffers must appear to the driver all at once (Linux
//! drops a frame whose later buffers are not yet visible), and one index
//! store per burst is also cheaper. The interrupt decision follows from that
//! (`needs_call`).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError};

use crate::spec::{MAX_FRAME_LEN, NUM_BUFFERS_OFFSET};

mod chain;
#[cfg(test)]
mod tests;

/// VRING_AVAIL_F_NO_INTERRUPT (split ring avail flags).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// A ring could not be accessed, or the driver broke it: the ring stops
/// (the device needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A chain no correct driver builds (see `ring/chain.rs`): a loop, more
    /// descriptors than the ring, nested or broken indirect tables, more
    /// than 4 GiB, an RX buffer outside guest memory.
    #[error("broken chain at head {head}: {reason}")]
    BrokenChain {
        /// Head descriptor index.
        head: u16,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The driver's avail index is more than a ring ahead of the device
    /// (or behind it): the driver never makes more than the queue size
    /// available (virtio 1.2, 2.7.13.3).
    #[error("the avail index {avail} is {ahead} entries ahead of the device's {next_avail} on a ring of {size}")]
    AvailIndex {
        /// avail->idx as the driver wrote it.
        avail: u16,
        /// The next avail index the device would process.
        next_avail: u16,
        /// avail - next_avail (mod 2^16).
        ahead: u16,
        /// Ring size.
        size: u16,
    },
    /// virtio-queue refused (bad ring address, index beyond the ring).
    #[error("virtqueue access failed")]
    Queue(#[from] virtio_queue::Error),
    /// Guest memory outside every region.
    #[error("guest memory access failed")]
    Memory(#[from] GuestMemoryError),
}

/// What became of one TX chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxChain {
    /// A frame of `len` bytes (virtio-net header included) is in the buffer.
    Frame {
        /// Head descriptor, to return through [`NetRing::add_used`].
        head: u16,
        /// Bytes copied, header included.
        len: usize,
    },
    /// The chain is well formed but unusable (a device-writable
    /// descriptor, a frame larger than any Ethernet frame, a buffer outside
    /// guest RAM); it is returned unused and counted as a TX error.
    Bad {
        /// Head descriptor.
        head: u16,
        /// Why, for a rate-limited log line.
        reason: &'static str,
    },
}

/// What became of one received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into `buffers` chains.
    Delivered {
        /// Chains used (1 without merged buffers).
        buffers: u16,
    },
    /// Not enough RX buffers posted; nothing was taken from the ring.
    NoBuffers,
    /// The frame cannot fit any chain the driver posted (without merged
    /// buffers, one chain must hold it all); dropped.
    TooBig,
}

/// A virtqueue in use by the data path.
pub struct NetRing {
    /// The ring position and addresses (virtio-queue).
    pub queue: Queue,
    /// Used entries queued but not yet published.
    used: Vec<(u16, u32)>,
    /// The used index at the last interrupt decision.
    signalled: Wrapping<u16>,
    event_idx: bool,
    /// Guest addresses of the RX segments being filled (reused).
    segments: Vec<(GuestAddress, u32)>,
    /// Chain heads and byte counts of the frame being delivered (reused).
    heads: Vec<(u16, u32)>,
    /// The descriptors of the chain being walked (reused).
    descs: Vec<Descriptor>,
}

impl NetRing {
    /// Wrap a configured `queue` whose next avail and used indices are set.
    pub fn new(queue: Queue) -> NetRing {
        let signalled = Wrapping(queue.next_used());
        NetRing {
            event_idx: queue.event_idx_enabled(),
            queue,
            used: Vec::new(),
            signalled,
            segments: Vec::new(),
            heads: Vec::new(),
            descs: Vec::new(),
        }
    }

    /// Where the ring stands: the next avail index to process.
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Whether the driver posted chains we have not taken yet (or broke
    /// its avail index: the next burst finds out which).
    pub fn has_avail<M: GuestMemory>(&self, mem: &M) -> bool {
        self.queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != self.queue.next_avail())
    }

    /// How many chains the driver made available, checked against the
    /// ring size: virtio-queue would log "invalid available ring index"
    /// and hand out nothing, every time it is asked (issue 18).
    fn available<M: GuestMemory>(&self, mem: &M) -> Result<u16, RingError> {
        let avail = self.queue.avail_idx(mem, Ordering::Acquire)?;
        let next_avail = self.queue.next_avail();
        let ahead = (avail - Wrapping(next_avail)).0;
        let size = self.queue.size();
        if ahead > size {
            return Err(RingError::AvailIndex {
                avail: avail.0,
                next_avail,
                ahead,
                size,
            });
        }
        Ok(ahead)
    }

    /// The next available chain, if any.
    fn next_chain<'a, M: GuestMemory>(
        &mut self,
        mem: &'a M,
    ) -> Result<Option<DescriptorChain<&'a M>>, RingError> {
        if self.available(mem)? == 0 {
            return Ok(None);
        }
        Ok(self.queue.iter(mem)?.next())
    }

    /// Queue a used entry for `head`; it is written and made visible by
    /// [`Self::publish`].
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        if head >= self.queue.size() {
            return Err(virtio_queue::Error::InvalidDescriptorIndex.into());
        }
        if self.used.len() >= usize::from(self.queue.size()) {
            // More entries than the ring holds would overwrite unseen ones.
            return Err(virtio_queue::Error::InvalidDescriptorIndex.into());
        }
        self.used.push((head, len));
        Ok(())
    }

    /// Write every queued used entry, then make them visible with one
    /// release store of the used index: through one slice of the used ring
    /// (one region lookup per burst), or entry by entry if the ring crosses
    /// a region boundary. Returns whether there was anything to publish.
    pub fn publish<M: GuestMemory>(&mut self, mem: &M) -> Result<bool, RingError> {
        if self.used.is_empty() {
            return Ok(false);
        }
        let size = self.queue.size();
        let first = Wrapping(self.queue.next_used());
        let ring = GuestAddress(self.queue.used_ring());
        let ring_len = 4 + 8 * usize::from(size);
        let element = |head: u16, len: u32| {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            bytes[4..].copy_from_slice(&len.to_le_bytes());
            bytes
        };
        // add_used() keeps at most the ring size (<= 32768) queued.
        let queued = u16::try_from(self.used.len())
            .map_err(|_| virtio_queue::Error::InvalidDescriptorIndex)?;
        let next_used = first + Wrapping(queued);
        if let Some(slice) = mem
            .physical_memory()
            .and_then(|phys| phys.get_slice(ring, ring_len).ok())
        {
            let mut slot_index = first;
            for &(head, len) in &self.used {
                let slot = slot_index.0 % size;
                slot_index += Wrapping(1);
                slice
                    .write_slice(&element(head, len), 4 + 8 * usize::from(slot))
                    .map_err(GuestMemoryError::from)?;
            }
            slice
                .store(next_used.0.to_le(), 2, Ordering::Release)
                .map_err(GuestMemoryError::from)?;
        } else {
            let mut slot_index = first;
            for &(head, len) in &self.used {
                let slot = slot_index.0 % size;
                slot_index += Wrapping(1);
                let addr = ring
                    .checked_add(4 + 8 * u64::from(slot))
                    .ok_or(virtio_queue::Error::AddressOverflow)?;
                mem.write_slice(&element(head, len), addr)?;
            }
            let addr = ring
                .checked_add(2)
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            mem.store(next_used.0.to_le(), addr, Ordering::Release)?;
        }
        self.queue.set_next_used(next_used.0);
        self.used.clear();
        Ok(true)
    }

    /// Whether the driver wants an interrupt for what was published since
    /// the last call (used_event with EVENT_IDX, the avail ring's
    /// NO_INTERRUPT flag without).
    pub fn needs_call<M: GuestMemory>(&mut self, mem: &M) -> Result<bool, RingError> {
        let new = Wrapping(self.queue.next_used());
        let old = std::mem::replace(&mut self.signalled, new);
        if new == old {
            return Ok(false);
        }
        // Our used index store must be visible before we read the driver's
        // event index (the driver does the mirror image).
        fence(Ordering::SeqCst);
        let avail = GuestAddress(self.queue.avail_ring());
        if self.event_idx {
            let offset = 4 + 2 * u64::from(self.queue.size());
            let addr = avail
                .checked_add(offset)
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            let used_event = Wrapping(u16::from_le(mem.load::<u16>(addr, Ordering::Acquire)?));
            Ok(new - used_event - Wrapping(1) < new - old)
        } else {
            let flags = u16::from_le(mem.load::<u16>(avail, Ordering::Acquire)?);
            Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Stop kicks from the driver (we are about to poll the ring).
    pub fn disable_kicks<M: GuestMemory>(&mut self, mem: &M) -> Result<(), RingError> {
        Ok(self.queue.disable_notification(mem)?)
    }

    /// Ask for kicks again before sleeping. Returns true if chains arrived
    /// meanwhile (their kick may never come: process them now).
    pub fn enable_kicks<M: GuestMemory>(&mut self, mem: &M) -> Result<bool, RingError> {
        Ok(self.queue.enable_notification(mem)?)
    }

    /// Take up to `max` TX chains: copy each chain's frame (virtio-net
    /// header included) into `buf`, which must hold
    /// [`crate::spec::MAX_FRAME_LEN`] plus the header, hand it to `each`,
    /// and queue the chain's used entry (length 0: the device wrote
    /// nothing). Returns how many chains were taken. A structurally broken
    /// chain ([`RingError::BrokenChain`]) stops the burst and the ring;
    /// the chains before it were handled.
    pub fn tx_burst<M: GuestMemory>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
        max: usize,
        mut each: impl FnMut(TxChain, &[u8]),
    ) -> Result<usize, RingError> {
        let size = self.queue.size();
        let mut taken = 0;
        let mut result = Ok(());
        while taken < max {
            let chain = match self.next_chain(mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let head = chain.head_index();
            if let Err(reason) = chain::walk(chain, size, &mut self.descs) {
                result = Err(chain::broken(head, reason));
                break;
            }
            let outcome = chain::copy_tx(head, &self.descs, mem, buf);
            each(outcome, buf);
            self.heads.push((head, 0));
            taken += 1;
        }
        for index in 0..self.heads.len() {
            let (head, len) = self.heads[index];
            self.add_used(head, len)?;
        }
        self.heads.clear();
        result.map(|()| taken)
    }

    /// Write `header` (its `num_buffers` is filled in here when `mrg_rxbuf`)
    /// and `frame` into RX chains and queue their used entries; publish with
    /// [`Self::publish`]. Only device-writable buffers are written, each
    /// checked to lie in guest memory first; a chain's used length is what
    /// was written into it. A structurally broken chain, or one with a
    /// buffer outside guest memory, is [`RingError::BrokenChain`] (nothing
    /// of the frame was written).
    pub fn push_rx<M: GuestMemory>(
        &mut self,
        mem: &M,
        header: &mut [u8],
        frame: &[u8],
        mrg_rxbuf: bool,
    ) -> Result<RxOutcome, RingError> {
        if frame.len() > MAX_FRAME_LEN {
            return Ok(RxOutcome::TooBig);
        }
        let total = header.len() + frame.len();
        let size = self.queue.size();
        let start = self.queue.next_avail();
        self.segments.clear();
        self.heads.clear();
        let mut capacity = 0usize;
        // Gather chains until the frame fits, remembering each chain's
        // writable segments and how much of the frame it takes.
        while capacity < total {
            if !mrg_rxbuf && !self.heads.is_empty() {
                break;
            }
            let chain = match self.next_chain(mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    self.queue.set_next_avail(start);
                    return Err(e);
                }
            };
            let head = chain.head_index();
            let gathered = chain::walk(chain, size, &mut self.descs)
                .map_err(|reason| chain::broken(head, reason))
                .and_then(|()| {
                    chain::rx_segments(head, &self.descs, mem, total - capacity, &mut self.segments)
                });
            let chain_bytes = match gathered {
                Ok(bytes) => bytes,
                Err(e) => {
                    // Nothing was written: the ring stops where it was.
                    self.queue.set_next_avail(start);
                    return Err(e);
                }
            };
            capacity += usize::try_from(chain_bytes).unwrap_or(usize::MAX);
            self.heads.push((head, chain_bytes));
        }
        if capacity < total {
            let popped = self.heads.len();
            // Give the chains back: none was written or marked used.
            self.queue.set_next_avail(start);
            return Ok(if mrg_rxbuf || popped == 0 {
                RxOutcome::NoBuffers
            } else {
                // Without merged buffers the chain was too small; the
                // frame is dropped, the chain stays for a smaller frame.
                RxOutcome::TooBig
            });
        }
        // At most the ring size (<= 32768) chains.
        let buffers = u16::try_from(self.heads.len()).unwrap_or(u16::MAX);
        if mrg_rxbuf && header.len() > NUM_BUFFERS_OFFSET + 1 {
            header[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                .copy_from_slice(&buffers.to_le_bytes());
        }
        let mut source = chain::Source::new(header, frame);
        for index in 0..self.segments.len() {
            let (addr, len) = self.segments[index];
            let len = usize::try_from(len).map_err(|_| virtio_queue::Error::AddressOverflow)?;
            source.write_to(mem, addr, len)?;
        }
        for index in 0..self.heads.len() {
            let (head, len) = self.heads[index];
            self.add_used(head, len)?;
        }
        Ok(RxOutcome::Delivered { buffers })
    }
}
