//! The device side of one split virtqueue over [`Memory`]: `virtio-queue`
//! pops chains and walks descriptors (indirect tables, loops, lengths);
//! used entries are written here, all of a burst before one release store
//! of the used index, so a frame spread over merged RX buffers becomes
//! visible to the driver at once.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::memory::Memory;

/// VRING_AVAIL_F_NO_INTERRUPT.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
use crate::uapi::VqInfo;

/// A ring could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// virtio-queue refused an address, size or index.
    #[error("virtqueue {index}")]
    Queue {
        /// Virtqueue index.
        index: u32,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// The ring lies outside the mapped IOVA space or is misaligned.
    #[error("virtqueue {index}: ring at desc {desc:#x} avail {avail:#x} used {used:#x} (size {size}) is not in mapped memory")]
    Invalid {
        /// Virtqueue index.
        index: u32,
        /// Descriptor table IOVA.
        desc: u64,
        /// Avail ring IOVA.
        avail: u64,
        /// Used ring IOVA.
        used: u64,
        /// Ring size.
        size: u32,
    },
    /// The driver's avail index is more than a ring ahead of the device
    /// (a broken or hostile driver): the queue stops.
    #[error("virtqueue {index}: avail index {avail} is more than {size} ahead of {next}")]
    AvailIndex {
        /// Virtqueue index.
        index: u32,
        /// The driver's avail index.
        avail: u16,
        /// Where the device is.
        next: u16,
        /// Ring size.
        size: u16,
    },
    /// A ring access failed (the driver's memory went away).
    #[error("virtqueue {index}: ring memory access failed")]
    Memory {
        /// Virtqueue index.
        index: u32,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A started virtqueue.
pub struct Ring {
    /// Virtqueue index.
    pub index: u32,
    queue: Queue,
    /// Used entries of the current burst, not yet visible.
    pending: Vec<(u16, u32)>,
    /// The used index at the last interrupt decision.
    signalled: Wrapping<u16>,
}

/// What one TX chain held.
pub enum TxFrame {
    /// `len` bytes (virtio-net header included) were copied.
    Frame {
        /// The chain's head, to return.
        head: u16,
        /// Bytes copied into the caller's buffer.
        len: usize,
    },
    /// The chain was unusable (larger than the buffer, unreadable memory).
    Bad {
        /// The chain's head, returned unused.
        head: u16,
    },
}

/// What became of one RX frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into this many chains.
    Delivered(u16),
    /// Not enough buffers posted; nothing was taken.
    NoBuffers,
    /// Without merged buffers the next chain is too small; frame dropped,
    /// the chain stays.
    TooBig,
}

impl Ring {
    /// Start queue `info` on `memory` with `event_idx`; the used index
    /// resumes from what the ring holds (after a restart the driver's
    /// SET_VRING_BASE gave `info.avail_index`, and every chain before it
    /// was used: this device completes in order).
    pub fn start(
        info: &VqInfo,
        memory: &Memory,
        max_size: u16,
        event_idx: bool,
    ) -> Result<Ring, RingError> {
        let index = info.index;
        let qerr = |source| RingError::Queue { index, source };
        let size = u16::try_from(info.num).map_err(|_| qerr(virtio_queue::Error::InvalidSize))?;
        let mut queue = Queue::new(max_size).map_err(qerr)?;
        queue.try_set_size(size).map_err(qerr)?;
        queue
            .try_set_desc_table_address(GuestAddress(info.desc_addr))
            .map_err(qerr)?;
        queue
            .try_set_avail_ring_address(GuestAddress(info.driver_addr))
            .map_err(qerr)?;
        queue
            .try_set_used_ring_address(GuestAddress(info.device_addr))
            .map_err(qerr)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(memory) {
            return Err(RingError::Invalid {
                index,
                desc: info.desc_addr,
                avail: info.driver_addr,
                used: info.device_addr,
                size: info.num,
            });
        }
        let used = queue.used_idx(memory, Ordering::Acquire).map_err(qerr)?;
        queue.set_next_avail(info.avail_index);
        queue.set_next_used(used.0);
        Ok(Ring {
            index,
            queue,
            pending: Vec::new(),
            signalled: used,
        })
    }

    /// The next avail index the device will take (GET_VQ_STATE).
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Whether the driver posted chains not taken yet.
    pub fn has_avail(&self, memory: &Memory) -> Result<bool, RingError> {
        let idx = self
            .queue
            .avail_idx(memory, Ordering::Acquire)
            .map_err(|source| RingError::Queue {
                index: self.index,
                source,
            })?;
        let next = self.queue.next_avail();
        if idx.0.wrapping_sub(next) > self.queue.size() {
            return Err(RingError::AvailIndex {
                index: self.index,
                avail: idx.0,
                next,
                size: self.queue.size(),
            });
        }
        Ok(idx.0 != next)
    }

    /// Ask for kicks before sleeping; true if chains arrived meanwhile.
    pub fn enable_kicks(&mut self, memory: &Memory) -> Result<bool, RingError> {
        self.queue
            .enable_notification(memory)
            .map_err(|source| RingError::Queue {
                index: self.index,
                source,
            })
    }

    /// Take one TX chain and copy its bytes into `buf`; the chain's used
    /// entry (length 0) is queued. None if no chain is posted.
    pub fn pop_tx(&mut self, memory: &Memory, buf: &mut [u8]) -> Option<TxFrame> {
        let chain = self.queue.pop_descriptor_chain(memory)?;
        let head = chain.head_index();
        self.pending.push((head, 0));
        let Ok(mut reader) = Reader::new(memory, chain) else {
            return Some(TxFrame::Bad { head });
        };
        let len = reader.available_bytes();
        let Some(dest) = buf.get_mut(..len) else {
            return Some(TxFrame::Bad { head });
        };
        if std::io::Read::read_exact(&mut reader, dest).is_err() {
            return Some(TxFrame::Bad { head });
        }
        Some(TxFrame::Frame { head, len })
    }

    /// Give back the TX chain taken last (its frame could not be delivered
    /// yet): it is taken again later.
    pub fn unpop_tx(&mut self) {
        self.pending.pop();
        self.queue.go_to_previous_position();
    }

    /// Write `header` then `frame` into RX chains (several with
    /// `mrg_rxbuf`, the header's `num_buffers` at `num_buffers_offset` set
    /// to their count) and queue their used entries.
    pub fn push_rx(
        &mut self,
        memory: &Memory,
        header: &mut [u8],
        frame: &[u8],
        mrg_rxbuf: bool,
        num_buffers_offset: usize,
    ) -> RxOutcome {
        let total = header.len() + frame.len();
        let start = self.queue.next_avail();
        let pending_before = self.pending.len();
        let mut writers = Vec::new();
        let mut capacity = 0usize;
        while capacity < total {
            if !mrg_rxbuf && !writers.is_empty() {
                break;
            }
            let Some(chain) = self.queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            match Writer::new(memory, chain) {
                Ok(writer) => {
                    capacity += writer.available_bytes();
                    writers.push((head, writer));
                }
                // An unusable chain is returned empty.
                Err(_) => self.pending.push((head, 0)),
            }
        }
        if capacity < total {
            let popped = writers.len();
            // Give every chain back, unusable ones included: they are all
            // taken again later, so none may have a used entry yet.
            self.queue.set_next_avail(start);
            self.pending.truncate(pending_before);
            return if mrg_rxbuf || popped == 0 {
                RxOutcome::NoBuffers
            } else {
                RxOutcome::TooBig
            };
        }
        let count = writers.len() as u16;
        if let Some(field) = header.get_mut(num_buffers_offset..num_buffers_offset + 2) {
            field.copy_from_slice(&count.to_le_bytes());
        }
        let mut parts: [&[u8]; 2] = [header, frame];
        for (head, mut writer) in writers {
            let mut room = writer.available_bytes();
            for part in parts.iter_mut() {
                let take = room.min(part.len());
                if take == 0 {
                    continue;
                }
                if std::io::Write::write_all(&mut writer, &part[..take]).is_err() {
                    break;
                }
                *part = &part[take..];
                room -= take;
            }
            let written = u32::try_from(writer.bytes_written()).unwrap_or(u32::MAX);
            self.pending.push((head, written));
        }
        RxOutcome::Delivered(count)
    }

    /// Make the burst's used entries visible: write them, then the used
    /// index with release ordering. Returns whether there were any.
    pub fn publish(&mut self, memory: &Memory) -> Result<bool, RingError> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        let merr = |index| move |source| RingError::Memory { index, source };
        let size = self.queue.size();
        let ring = GuestAddress(self.queue.used_ring());
        let first = Wrapping(self.queue.next_used());
        for (i, &(head, len)) in self.pending.iter().enumerate() {
            let slot = (first + Wrapping(i as u16)).0 % size;
            let mut element = [0u8; 8];
            element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            element[4..].copy_from_slice(&len.to_le_bytes());
            let addr = ring
                .checked_add(4 + 8 * u64::from(slot))
                .ok_or(RingError::Queue {
                    index: self.index,
                    source: virtio_queue::Error::AddressOverflow,
                })?;
            memory
                .write_slice(&element, addr)
                .map_err(merr(self.index))?;
        }
        let next = first + Wrapping(self.pending.len() as u16);
        let idx_addr = ring.checked_add(2).ok_or(RingError::Queue {
            index: self.index,
            source: virtio_queue::Error::AddressOverflow,
        })?;
        fence(Ordering::Release);
        memory
            .store(next.0.to_le(), idx_addr, Ordering::Release)
            .map_err(merr(self.index))?;
        self.queue.set_next_used(next.0);
        self.pending.clear();
        Ok(true)
    }

    /// Whether the driver wants an interrupt for what was published since
    /// the last decision: with EVENT_IDX if the new entries pass its
    /// used_event, without unless it set VRING_AVAIL_F_NO_INTERRUPT.
    /// (virtio-queue's own decision counts only entries added through its
    /// `add_used`, which a burst published at once does not use, and
    /// ignores NO_INTERRUPT.)
    pub fn needs_interrupt(&mut self, memory: &Memory) -> Result<bool, RingError> {
        let new = Wrapping(self.queue.next_used());
        let old = std::mem::replace(&mut self.signalled, new);
        if new == old {
            return Ok(false);
        }
        // Our used index store must be visible before we read the
        // driver's suppression (the driver does the mirror image).
        fence(Ordering::SeqCst);
        let merr = |source| RingError::Memory {
            index: self.index,
            source,
        };
        let avail = GuestAddress(self.queue.avail_ring());
        if self.queue.event_idx_enabled() {
            let at = avail
                .checked_add(4 + 2 * u64::from(self.queue.size()))
                .ok_or(RingError::Queue {
                    index: self.index,
                    source: virtio_queue::Error::AddressOverflow,
                })?;
            let used_event = Wrapping(u16::from_le(
                memory.load::<u16>(at, Ordering::Acquire).map_err(merr)?,
            ));
            Ok(new - used_event - Wrapping(1) < new - old)
        } else {
            let flags = u16::from_le(memory.load::<u16>(avail, Ordering::Acquire).map_err(merr)?);
            Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}
