//! The vhost-user inflight region for split rings ("Inflight I/O tracking"
//! in the vhost-user spec): shared memory where the device records which
//! requests it has taken from the avail ring and not yet answered, so that a
//! restarted back-end, or the back-end on a migration destination, can
//! resubmit exactly those.
//!
//! The layout must be byte-compatible with libvhost-user and DPDK, because
//! QEMU keeps the region across back-end restarts and migrates it as raw
//! bytes. Per queue, at a stride of [`queue_stride`] bytes:
//!
//! | offset | field |
//! |---|---|
//! | 0 | features u64 |
//! | 8 | version u16 (1; 0 = never used) |
//! | 10 | desc_num u16 (queue size) |
//! | 12 | last_batch_head u16 |
//! | 14 | used_idx u16 |
//! | 16 + 16 × i | desc i: inflight u8, padding 5, next u16, counter u64 |

use std::fs::File;
use std::io;
use std::os::unix::io::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

/// Alignment of each queue's part of the region (libvhost-user and DPDK).
pub const QUEUE_ALIGN: u64 = 64;
/// Size of a queue's header.
pub const HEADER_SIZE: u64 = 16;
/// Size of one descriptor's state.
pub const DESC_STATE_SIZE: u64 = 16;
/// Region format version written by a device that has used the region.
pub const REGION_VERSION: u16 = 1;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_NEXT: usize = 6;
const DESC_OFF_COUNTER: usize = 8;

/// Bytes one queue of `queue_size` descriptors takes in the region:
/// ALIGN_UP(16 + 16 × queue_size, 64). Equal to libvhost-user's
/// ALIGN_UP(16 × qs + 2, 64) and DPDK's ALIGN(16 × qs + 16, 64) for every
/// queue size.
pub fn queue_stride(queue_size: u16) -> u64 {
    let bytes = HEADER_SIZE + DESC_STATE_SIZE * u64::from(queue_size);
    bytes.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// The queues of the device an inflight description must fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceQueues {
    /// Queues the device has.
    pub num_queues: u16,
    /// Its largest ring (what SET_VRING_NUM accepts).
    pub max_queue_size: u16,
}

/// GET/SET_INFLIGHT_FD's `num_queues` and `queue_size` against the device:
/// between 1 and the device's queues, and a power of two no larger than
/// the device's largest ring (the sizes SET_VRING_NUM accepts; the region
/// tracks one descriptor state per ring entry).
pub fn check_shape(
    num_queues: u16,
    queue_size: u16,
    device: DeviceQueues,
) -> Result<(), InflightError> {
    let rule = if num_queues == 0 {
        Some("no queues")
    } else if num_queues > device.num_queues {
        Some("more queues than the device has")
    } else if queue_size == 0 {
        Some("zero-sized queues")
    } else if !queue_size.is_power_of_two() {
        Some("a queue size that is not a power of two")
    } else if queue_size > device.max_queue_size {
        Some("queues larger than the device's largest ring")
    } else {
        None
    };
    match rule {
        Some(rule) => Err(InflightError::Shape {
            num_queues,
            queue_size,
            device,
            rule,
        }),
        None => Ok(()),
    }
}

/// Why a region could not be created, mapped or used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The description does not fit the device ([`check_shape`]).
    #[error("inflight region for {num_queues} queue(s) of {queue_size}: {rule} (the device has {} queue(s) of at most {})", device.num_queues, device.max_queue_size)]
    Shape {
        /// Queues described.
        num_queues: u16,
        /// Descriptors per queue described.
        queue_size: u16,
        /// What the device has.
        device: DeviceQueues,
        /// The rule the description breaks.
        rule: &'static str,
    },
    /// The fd, or the range the message claims in it, is refused (not
    /// memory, past the end of the file, not sealed against shrinking).
    #[error("inflight region fd refused")]
    Fd(#[from] shm::ShmError),
    /// The description asks for no queues or zero-sized queues.
    #[error("inflight region for {num_queues} queue(s) of {queue_size} descriptors is empty")]
    Empty {
        /// Queues described.
        num_queues: u16,
        /// Descriptors per queue.
        queue_size: u16,
    },
    /// The mapping is smaller than the queues it must hold.
    #[error("inflight region of {mmap_size} bytes cannot hold {num_queues} queue(s) of {queue_size} descriptors ({needed} bytes)")]
    TooSmall {
        /// Size given by the front-end.
        mmap_size: u64,
        /// Bytes the layout needs.
        needed: u64,
        /// Queues described.
        num_queues: u16,
        /// Descriptors per queue.
        queue_size: u16,
    },
    /// Creating, sizing or sealing the memfd failed.
    #[error("cannot create the inflight memfd")]
    Create(#[source] io::Error),
    /// mmap failed.
    #[error("cannot map the inflight region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The ring is larger than the region's queues.
    #[error("ring of {ring_size} descriptors does not fit the inflight region's {desc_num}")]
    RingTooLarge {
        /// Ring size set with SET_VRING_NUM.
        ring_size: u16,
        /// Descriptors the region holds per queue.
        desc_num: u16,
    },
    /// The region says more requests are in flight than the ring holds, or
    /// its header is not a format we know: it is corrupt.
    #[error("inflight region is corrupt: {0}")]
    Corrupt(String),
}

/// A mapped inflight region shared with the front-end.
#[derive(Clone, Debug)]
pub struct InflightRegion {
    mapping: Arc<MmapRegion<()>>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a fresh, zeroed region in a sealed memfd (it can be
    /// neither grown nor shrunk by anyone who receives it). Returns the
    /// region and the file to hand to the front-end; its size is
    /// [`Self::mmap_size`].
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(InflightRegion, File), InflightError> {
        let size = Self::needed(num_queues, queue_size)?;
        let name = c"vhost-inflight";
        // SAFETY: memfd_create with a NUL-terminated name; the result is
        // checked and a valid fd is owned by exactly one File below.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(InflightError::Create)?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a valid memfd we own, with an int argument.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        let region = Self::map(&file, size, 0, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// SET_INFLIGHT_FD: map a region the front-end gives us (possibly one a
    /// previous back-end, or the migration source's back-end, filled in).
    ///
    /// The fd must be a memfd sealed against shrinking whose size covers
    /// `mmap_offset + mmap_size` ([`shm::check()`]): every front-end that
    /// sends one seals it, and an unsealed or short one would raise SIGBUS
    /// inside this very call (the fresh region's queues are initialised
    /// here). `mmap_size` must hold the layout of `num_queues` queues of
    /// `queue_size`.
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let needed = Self::needed(num_queues, queue_size)?;
        shm::check(file, shm::Purpose::Inflight, mmap_offset, mmap_size)?;
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                mmap_size,
                needed,
                num_queues,
                queue_size,
            });
        }
        let file = file.try_clone().map_err(InflightError::Create)?;
        // The layout only needs `needed` bytes; map just those. They lie
        // in the file (checked above), which cannot shrink (sealed).
        let len = usize::try_from(needed).map_err(|_| {
            InflightError::Fd(shm::ShmError::TooLarge {
                purpose: shm::Purpose::Inflight,
                offset: mmap_offset,
                size: needed,
            })
        })?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, mmap_offset), len)
            .map_err(InflightError::Map)?;
        let region = InflightRegion {
            mapping: Arc::new(mapping),
            num_queues,
            queue_size,
        };
        for index in 0..num_queues {
            // A region written by another back-end keeps its desc_num; a
            // fresh one learns it now (libvhost-user does the same).
            if let Some(queue) = region.queue(index) {
                if queue.version() == 0 {
                    queue.store_u16(OFF_DESC_NUM, queue_size);
                }
            }
        }
        Ok(region)
    }

    fn needed(num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::Empty {
                num_queues,
                queue_size,
            });
        }
        // At most 2^16 queues of 2^16 strides of 1 MiB: fits a u64.
        Ok(queue_stride(queue_size) * u64::from(num_queues))
    }

    /// Bytes the layout occupies.
    pub fn mmap_size(&self) -> u64 {
        queue_stride(self.queue_size) * u64::from(self.num_queues)
    }

    /// Queues in the region.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part of the region that tracks queue `index`.
    pub fn queue(&self, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        // Both lie within the mapping (map() mapped num_queues strides), so
        // they fit a usize.
        let stride = usize::try_from(queue_stride(self.queue_size)).ok()?;
        let offset = stride.checked_mul(usize::from(index))?;
        Some(InflightQueue {
            mapping: self.mapping.clone(),
            offset,
            len: stride,
            queue_size: self.queue_size,
            counter: 0,
        })
    }
}

/// What a region said when a queue started on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, oldest (lowest counter) first.
    pub heads: Vec<u16>,
    /// The region had never been used (nothing to recover).
    pub fresh: bool,
    /// The last batch was published to the used ring but not cleared in
    /// the region (the previous back-end died in between); it was cleared.
    pub fixed_last_batch: bool,
}

/// One queue's part of an inflight region, owned by the queue's worker.
///
/// Stores use release ordering and follow the spec's order, so that the
/// region describes the ring correctly at every instant a back-end can die.
#[derive(Debug)]
pub struct InflightQueue {
    mapping: Arc<MmapRegion<()>>,
    offset: usize,
    len: usize,
    /// Descriptors this part has room for (from the front-end's message;
    /// the region's own desc_num field is shared memory and not trusted).
    queue_size: u16,
    /// Next fetch counter.
    counter: u64,
}

impl InflightQueue {
    fn slice(&self) -> VolatileSlice<'_, ()> {
        self.mapping
            .as_volatile_slice()
            .subslice(self.offset, self.len)
            .expect("queue part lies within the mapping: map() mapped every queue's stride")
    }

    fn store_u16(&self, at: usize, value: u16) {
        self.slice()
            .store(value, at, Ordering::Release)
            .expect("header field within the queue part (a stride is at least 64 bytes)");
    }

    fn load_u16(&self, at: usize) -> u16 {
        self.slice()
            .load(at, Ordering::Acquire)
            .expect("header field within the queue part (a stride is at least 64 bytes)")
    }

    /// Offset of `head`'s state in the queue part, if the part has one.
    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.queue_size)
            .then(|| usize::try_from(HEADER_SIZE + DESC_STATE_SIZE * u64::from(head)).ok())
            .flatten()
    }

    /// Store `value` into field `field` of `head`'s state; heads beyond the
    /// part are ignored (the queue's own checks keep them out).
    fn store_desc<T: vm_memory::AtomicAccess>(&self, head: u16, field: usize, value: T) {
        if let Some(at) = self.desc(head) {
            let _ = self.slice().store(value, at + field, Ordering::Release);
        }
    }

    fn load_desc<T: vm_memory::AtomicAccess>(&self, head: u16, field: usize) -> Option<T> {
        let at = self.desc(head)?;
        self.slice().load(at + field, Ordering::Acquire).ok()
    }

    /// Region format version (0: never used).
    pub fn version(&self) -> u16 {
        self.load_u16(OFF_VERSION)
    }

    /// Descriptors this queue's part tracks.
    pub fn desc_num(&self) -> u16 {
        self.queue_size
    }

    /// The used index the region last recorded.
    pub fn used_idx(&self) -> u16 {
        self.load_u16(OFF_USED_IDX)
    }

    /// Whether `head` is marked in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.load_desc::<u8>(head, DESC_OFF_INFLIGHT)
            .is_some_and(|inflight| inflight != 0)
    }

    /// Start using the region for a ring of `ring_size` whose used index
    /// in guest memory is `used_idx`. A fresh region is initialised; a used
    /// one is repaired per the spec (a published but uncleared last batch
    /// is cleared) and the heads still in flight are returned, oldest
    /// first, for resubmission.
    pub fn begin(&mut self, ring_size: u16, used_idx: u16) -> Result<Recovery, InflightError> {
        let desc_num = self.desc_num();
        if ring_size > desc_num {
            return Err(InflightError::RingTooLarge {
                ring_size,
                desc_num,
            });
        }
        match self.version() {
            0 => {
                self.store_u16(OFF_LAST_BATCH_HEAD, 0);
                self.store_u16(OFF_USED_IDX, used_idx);
                self.store_u16(OFF_VERSION, REGION_VERSION);
                self.counter = 0;
                return Ok(Recovery {
                    fresh: true,
                    ..Recovery::default()
                });
            }
            REGION_VERSION => {}
            other => return Err(InflightError::Corrupt(format!("unknown version {other}"))),
        }
        let recorded = self.load_u16(OFF_DESC_NUM);
        if recorded != desc_num {
            return Err(InflightError::Corrupt(format!(
                "it tracks {recorded} descriptors per queue, the front-end says {desc_num}"
            )));
        }
        let mut recovery = Recovery::default();
        if self.used_idx() != used_idx {
            // Batches are single requests (one used entry at a time), so the
            // last batch is exactly last_batch_head.
            let head = self.load_u16(OFF_LAST_BATCH_HEAD);
            if head < desc_num {
                self.set_inflight(head, false);
            }
            self.store_u16(OFF_USED_IDX, used_idx);
            recovery.fixed_last_batch = true;
        }
        let mut pending: Vec<(u64, u16)> = Vec::new();
        for head in 0..desc_num {
            if !self.is_inflight(head) {
                continue;
            }
            if head >= ring_size {
                return Err(InflightError::Corrupt(format!(
                    "head {head} in flight on a ring of {ring_size}"
                )));
            }
            let counter = self
                .load_desc::<u64>(head, DESC_OFF_COUNTER)
                .ok_or_else(|| InflightError::Corrupt(format!("head {head} unreadable")))?;
            pending.push((counter, head));
        }
        pending.sort_unstable();
        self.counter = match pending.last() {
            None => 0,
            Some(&(counter, _)) => counter.checked_add(1).ok_or_else(|| {
                InflightError::Corrupt("a fetch counter is at its maximum".to_string())
            })?,
        };
        recovery.heads = pending.into_iter().map(|(_, head)| head).collect();
        Ok(recovery)
    }

    fn set_inflight(&self, head: u16, inflight: bool) {
        self.store_desc(head, DESC_OFF_INFLIGHT, u8::from(inflight));
    }

    /// A head was taken from the avail ring: record it, newest counter.
    /// (Heads beyond the region are never passed: the ring is no larger
    /// than the region, [`Self::begin`] checked that.)
    pub fn fetched(&mut self, head: u16) {
        self.store_desc(head, DESC_OFF_COUNTER, self.counter);
        self.counter = self.counter.wrapping_add(1);
        self.set_inflight(head, true);
    }

    /// About to publish `head`'s used entry: it becomes the last batch.
    pub fn before_publish(&mut self, head: u16) {
        if self.desc(head).is_none() {
            return;
        }
        let previous = self.load_u16(OFF_LAST_BATCH_HEAD);
        self.store_desc(head, DESC_OFF_NEXT, previous);
        self.store_u16(OFF_LAST_BATCH_HEAD, head);
    }

    /// `head`'s used entry is published and the used index is now
    /// `used_idx`: it is no longer in flight.
    pub fn after_publish(&mut self, head: u16, used_idx: u16) {
        self.set_inflight(head, false);
        self.store_u16(OFF_USED_IDX, used_idx);
    }

    /// Heads currently marked in flight (for logs and tests).
    pub fn inflight_count(&self) -> usize {
        (0..self.desc_num())
            .filter(|&head| self.is_inflight(head))
            .count()
    }
}

#[cfg(test)]
mod tests;
