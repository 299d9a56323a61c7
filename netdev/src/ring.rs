//! One virtqueue of a net device as the data path uses it: frames taken
//! from TX chains, frames written into RX chains (merged buffers included),
//! and used entries published in batches.
//!
//! `virtio-queue` pops chains and walks descriptors (indirect tables, loop
//! and length checks). Used entries are written here rather than with its
//! `add_used`, which publishes the used index once per entry: a frame spread
//! over several merged buffers must appear to the driver all at once (Linux
//! drops a frame whose later buffers are not yet visible), and one index
//! store per burst is also cheaper. The interrupt decision follows from that
//! (`needs_call`).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError};

use crate::spec::{MAX_FRAME_LEN, NUM_BUFFERS_OFFSET};

/// VRING_AVAIL_F_NO_INTERRUPT (split ring avail flags).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// A ring could not be accessed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
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
    /// The chain is unusable (a device-writable descriptor, a frame larger
    /// than any Ethernet frame, memory outside guest RAM); it is returned
    /// unused and counted as a TX error.
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
        }
    }

    /// Where the ring stands: the next avail index to process.
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Whether the driver posted chains we have not taken yet.
    pub fn has_avail<M: GuestMemory>(&self, mem: &M) -> bool {
        self.queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != self.queue.next_avail())
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
        let next_used = first + Wrapping(self.used.len() as u16);
        if let Some(slice) = mem
            .physical_memory()
            .and_then(|phys| phys.get_slice(ring, ring_len).ok())
        {
            for (i, &(head, len)) in self.used.iter().enumerate() {
                let slot = (first + Wrapping(i as u16)).0 % size;
                slice
                    .write_slice(&element(head, len), 4 + 8 * usize::from(slot))
                    .map_err(GuestMemoryError::from)?;
            }
            slice
                .store(next_used.0.to_le(), 2, Ordering::Release)
                .map_err(GuestMemoryError::from)?;
        } else {
            for (i, &(head, len)) in self.used.iter().enumerate() {
                let slot = (first + Wrapping(i as u16)).0 % size;
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

    /// Take up to `max` TX chains, reading the avail index once: copy each
    /// chain's frame (virtio-net header included) into `buf`, which must
    /// hold [`crate::spec::MAX_FRAME_LEN`] plus the header, hand it to
    /// `each`, and queue the chain's used entry (length 0: the device
    /// wrote nothing). Returns how many chains were taken.
    pub fn tx_burst<M: GuestMemory>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
        max: usize,
        mut each: impl FnMut(TxChain, &[u8]),
    ) -> Result<usize, RingError> {
        let mut taken = 0;
        let mut iter = self.queue.iter(mem)?;
        while taken < max {
            let Some(chain) = iter.next() else { break };
            let head = chain.head_index();
            let outcome = copy_tx_chain(chain, mem, buf);
            each(outcome, buf);
            self.heads.push((head, 0));
            taken += 1;
        }
        for index in 0..self.heads.len() {
            let (head, len) = self.heads[index];
            self.add_used(head, len)?;
        }
        self.heads.clear();
        Ok(taken)
    }

    /// Write `header` (its `num_buffers` is filled in here when `mrg_rxbuf`)
    /// and `frame` into RX chains and queue their used entries; publish with
    /// [`Self::publish`]. Device-readable descriptors in RX chains are
    /// skipped.
    pub fn push_rx<M: GuestMemory>(
        &mut self,
        mem: &M,
        header: &mut [u8],
        frame: &[u8],
        mrg_rxbuf: bool,
    ) -> Result<RxOutcome, RingError> {
        let total = header.len() + frame.len();
        if frame.len() > MAX_FRAME_LEN {
            return Ok(RxOutcome::TooBig);
        }
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
            let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut chain_bytes = 0u32;
            for desc in chain {
                if !desc.is_write_only() || desc.len() == 0 {
                    continue;
                }
                let want = total - capacity;
                let take = (desc.len() as usize).min(want);
                self.segments.push((desc.addr(), take as u32));
                capacity += take;
                // take <= desc.len(): a u32.
                chain_bytes += take as u32;
                if capacity == total {
                    break;
                }
            }
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
        let buffers = self.heads.len() as u16;
        if mrg_rxbuf && header.len() > NUM_BUFFERS_OFFSET + 1 {
            header[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                .copy_from_slice(&buffers.to_le_bytes());
        }
        let mut source = Source {
            parts: [header, frame],
            part: 0,
            offset: 0,
        };
        for index in 0..self.segments.len() {
            let (addr, len) = self.segments[index];
            source.write_to(mem, addr, len as usize)?;
        }
        for index in 0..self.heads.len() {
            let (head, len) = self.heads[index];
            self.add_used(head, len)?;
        }
        Ok(RxOutcome::Delivered { buffers })
    }
}

/// Copy one TX chain's frame into `buf`.
fn copy_tx_chain<M: GuestMemory>(
    chain: virtio_queue::DescriptorChain<&M>,
    mem: &M,
    buf: &mut [u8],
) -> TxChain {
    let head = chain.head_index();
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return TxChain::Bad {
                head,
                reason: "device-writable descriptor in a TX chain",
            };
        }
        let part = desc.len() as usize;
        let Some(dest) = len.checked_add(part).and_then(|end| buf.get_mut(len..end)) else {
            return TxChain::Bad {
                head,
                reason: "TX frame larger than the largest Ethernet frame",
            };
        };
        if read_guest(mem, desc.addr(), dest).is_err() {
            return TxChain::Bad {
                head,
                reason: "TX buffer outside guest memory",
            };
        }
        len += part;
    }
    TxChain::Frame { head, len }
}

/// Header then frame, read sequentially into guest segments.
struct Source<'a> {
    parts: [&'a [u8]; 2],
    part: usize,
    offset: usize,
}

impl Source<'_> {
    /// Copy the next `len` bytes into guest memory at `addr`: one region
    /// lookup for the whole segment (the usual case: header and frame go
    /// into one buffer), byte-wise lookups only across a region boundary.
    fn write_to<M: GuestMemory>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), RingError> {
        if let Some(slice) = mem
            .physical_memory()
            .and_then(|phys| phys.get_slice(addr, len).ok())
        {
            let mut offset = 0;
            while offset < len && self.part < self.parts.len() {
                let chunk = self.next_chunk(len - offset);
                slice
                    .subslice(offset, chunk.len())
                    .map_err(GuestMemoryError::from)?
                    .copy_from(chunk);
                offset += chunk.len();
            }
            return Ok(());
        }
        let mut addr = addr;
        let mut left = len;
        while left > 0 && self.part < self.parts.len() {
            let chunk = self.next_chunk(left);
            mem.write_slice(chunk, addr)?;
            left -= chunk.len();
            addr = addr.unchecked_add(chunk.len() as u64);
        }
        Ok(())
    }

    /// Up to `max` bytes of the current part, advancing past them.
    fn next_chunk(&mut self, max: usize) -> &[u8] {
        let part = self.parts[self.part];
        let chunk = (part.len() - self.offset).min(max);
        let start = self.offset;
        self.offset += chunk;
        if self.offset == part.len() {
            self.part += 1;
            self.offset = 0;
        }
        &part[start..start + chunk]
    }
}

/// Copy guest memory at `addr` into `dest`: one region lookup in the usual
/// case, the general path across region boundaries.
fn read_guest<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    dest: &mut [u8],
) -> Result<(), RingError> {
    match mem
        .physical_memory()
        .and_then(|phys| phys.get_slice(addr, dest.len()).ok())
    {
        Some(slice) => {
            slice.copy_to(dest);
            Ok(())
        }
        None => Ok(mem.read_slice(dest, addr)?),
    }
}
