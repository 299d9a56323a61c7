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

/// Why a region could not be created, mapped or used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
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
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let needed = Self::needed(num_queues, queue_size)?;
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                mmap_size,
                needed,
                num_queues,
                queue_size,
            });
        }
        let file = file.try_clone().map_err(InflightError::Create)?;
        // The layout only needs `needed` bytes; map just those.
        let mapping = MmapRegion::from_file(FileOffset::new(file, mmap_offset), needed as usize)
            .map_err(InflightError::Map)?;
        let region = InflightRegion {
            mapping: Arc::new(mapping),
            num_queues,
            queue_size,
        };
        for index in 0..num_queues {
            // A region written by another back-end keeps its desc_num; a
            // fresh one learns it now (libvhost-user does the same).
            let queue = region.queue(index).expect("index < num_queues");
            if queue.version() == 0 {
                queue.store_u16(OFF_DESC_NUM, queue_size);
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
        (index < self.num_queues).then(|| InflightQueue {
            mapping: self.mapping.clone(),
            offset: (queue_stride(self.queue_size) * u64::from(index)) as usize,
            len: queue_stride(self.queue_size) as usize,
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
            .expect("queue part lies within the mapping")
    }

    fn store_u16(&self, at: usize, value: u16) {
        self.slice()
            .store(value, at, Ordering::Release)
            .expect("offset within the queue part");
    }

    fn load_u16(&self, at: usize) -> u16 {
        self.slice()
            .load(at, Ordering::Acquire)
            .expect("offset within the queue part")
    }

    fn desc(head: u16) -> usize {
        (HEADER_SIZE + DESC_STATE_SIZE * u64::from(head)) as usize
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
        head < self.queue_size
            && self
                .slice()
                .load::<u8>(Self::desc(head) + DESC_OFF_INFLIGHT, Ordering::Acquire)
                .expect("descriptor within the queue part")
                != 0
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
        let slice = self.slice();
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
            let counter: u64 = slice
                .load(Self::desc(head) + DESC_OFF_COUNTER, Ordering::Acquire)
                .expect("descriptor within the queue part");
            pending.push((counter, head));
        }
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(counter, _)| counter + 1);
        recovery.heads = pending.into_iter().map(|(_, head)| head).collect();
        Ok(recovery)
    }

    fn set_inflight(&self, head: u16, inflight: bool) {
        self.slice()
            .store(
                u8::from(inflight),
                Self::desc(head) + DESC_OFF_INFLIGHT,
                Ordering::Release,
            )
            .expect("descriptor within the queue part");
    }

    /// A head was taken from the avail ring: record it, newest counter.
    pub fn fetched(&mut self, head: u16) {
        let at = Self::desc(head);
        self.slice()
            .store(self.counter, at + DESC_OFF_COUNTER, Ordering::Release)
            .expect("descriptor within the queue part");
        self.counter += 1;
        self.set_inflight(head, true);
    }

    /// About to publish `head`'s used entry: it becomes the last batch.
    pub fn before_publish(&mut self, head: u16) {
        let previous = self.load_u16(OFF_LAST_BATCH_HEAD);
        self.slice()
            .store(
                previous,
                Self::desc(head) + DESC_OFF_NEXT,
                Ordering::Release,
            )
            .expect("descriptor within the queue part");
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
mod tests {
    use super::*;

    #[test]
    fn stride_matches_libvhost_user_and_dpdk() {
        for qs in 1..=32768u32 {
            let ours = queue_stride(qs as u16);
            let libvhost_user = (16 * u64::from(qs) + 2).div_ceil(64) * 64;
            let dpdk = (16 * u64::from(qs) + 16).div_ceil(64) * 64;
            assert_eq!(ours, libvhost_user, "qs {qs}");
            assert_eq!(ours, dpdk, "qs {qs}");
        }
        assert_eq!(queue_stride(128), 2112);
    }

    #[test]
    fn created_region_is_sealed_and_zeroed() {
        let (region, file) = InflightRegion::create(2, 128).unwrap();
        assert_eq!(region.mmap_size(), 2 * 2112);
        assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
        assert!(file.set_len(1).is_err(), "shrinking must be sealed");
        assert!(file.set_len(10 << 20).is_err(), "growing must be sealed");
        let queue = region.queue(1).unwrap();
        assert_eq!(queue.version(), 0);
        assert_eq!(queue.desc_num(), 128);
        assert!(region.queue(2).is_none());
    }

    #[test]
    fn too_small_or_empty_regions_are_refused() {
        let (_, file) = InflightRegion::create(1, 128).unwrap();
        assert!(matches!(
            InflightRegion::map(&file, 2112, 0, 2, 128),
            Err(InflightError::TooSmall { needed: 4224, .. })
        ));
        assert!(matches!(
            InflightRegion::map(&file, 2112, 0, 0, 128),
            Err(InflightError::Empty { .. })
        ));
    }

    /// Raw bytes at the offsets the spec gives, as another back-end sees them.
    fn raw(file: &File, at: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, at).unwrap();
        buf
    }

    #[test]
    fn bookkeeping_follows_the_spec_layout() {
        let (region, file) = InflightRegion::create(2, 8).unwrap();
        let stride = queue_stride(8);
        let mut queue = region.queue(1).unwrap();
        assert!(queue.begin(8, 5).unwrap().fresh);
        queue.fetched(3);
        queue.fetched(6);
        let header = raw(&file, stride, 16);
        assert_eq!(u16::from_le_bytes([header[8], header[9]]), 1, "version");
        assert_eq!(u16::from_le_bytes([header[10], header[11]]), 8, "desc_num");
        assert_eq!(u16::from_le_bytes([header[14], header[15]]), 5, "used_idx");
        let desc6 = raw(&file, stride + 16 + 16 * 6, 16);
        assert_eq!(desc6[0], 1, "inflight");
        assert_eq!(u64::from_le_bytes(desc6[8..16].try_into().unwrap()), 1);
        queue.before_publish(3);
        queue.after_publish(3, 6);
        let header = raw(&file, stride, 16);
        assert_eq!(
            u16::from_le_bytes([header[12], header[13]]),
            3,
            "last batch"
        );
        assert_eq!(u16::from_le_bytes([header[14], header[15]]), 6, "used_idx");
        assert_eq!(raw(&file, stride + 16 + 16 * 3, 1)[0], 0);
        // Queue 0 is untouched.
        assert!(raw(&file, 0, stride as usize)
            .iter()
            .skip(16)
            .all(|&b| b == 0));
    }

    #[test]
    fn recovery_resubmits_in_fetch_order() {
        let (region, file) = InflightRegion::create(1, 16).unwrap();
        let mut queue = region.queue(0).unwrap();
        queue.begin(16, 0).unwrap();
        for head in [9, 2, 14, 5] {
            queue.fetched(head);
        }
        queue.before_publish(2);
        queue.after_publish(2, 1);
        // A new back-end maps the same memfd.
        let again = InflightRegion::map(&file, region.mmap_size(), 0, 1, 16).unwrap();
        let mut queue = again.queue(0).unwrap();
        let recovery = queue.begin(16, 1).unwrap();
        assert_eq!(recovery.heads, vec![9, 14, 5]);
        assert!(!recovery.fresh && !recovery.fixed_last_batch);
        // New fetches continue after the highest counter.
        queue.fetched(7);
        let desc7 = raw(&file, 16 + 16 * 7, 16);
        assert_eq!(u64::from_le_bytes(desc7[8..16].try_into().unwrap()), 4);
    }

    #[test]
    fn published_but_uncleared_last_batch_is_not_resubmitted() {
        let (region, _file) = InflightRegion::create(1, 16).unwrap();
        let mut queue = region.queue(0).unwrap();
        queue.begin(16, 0).unwrap();
        queue.fetched(4);
        queue.fetched(11);
        // Died after the used index went to 1 but before clearing head 11.
        queue.before_publish(11);
        let recovery = queue.begin(16, 1).unwrap();
        assert!(recovery.fixed_last_batch);
        assert_eq!(recovery.heads, vec![4]);
        assert_eq!(queue.used_idx(), 1);
    }

    #[test]
    fn unpublished_last_batch_is_resubmitted() {
        let (region, _file) = InflightRegion::create(1, 16).unwrap();
        let mut queue = region.queue(0).unwrap();
        queue.begin(16, 0).unwrap();
        queue.fetched(4);
        // Died before the used index moved: head 4 was never answered.
        queue.before_publish(4);
        let recovery = queue.begin(16, 0).unwrap();
        assert!(!recovery.fixed_last_batch);
        assert_eq!(recovery.heads, vec![4]);
    }

    #[test]
    fn corrupt_regions_are_refused() {
        let (region, file) = InflightRegion::create(1, 16).unwrap();
        let mut queue = region.queue(0).unwrap();
        assert!(matches!(
            queue.begin(32, 0),
            Err(InflightError::RingTooLarge { .. })
        ));
        queue.begin(8, 0).unwrap();
        queue.fetched(12); // beyond a ring of 8
        assert!(matches!(queue.begin(8, 0), Err(InflightError::Corrupt(_))));
        use std::os::unix::fs::FileExt;
        file.write_all_at(&0u8.to_le_bytes(), 16 + 16 * 12).unwrap();
        file.write_all_at(&9999u16.to_le_bytes(), 10).unwrap();
        assert!(matches!(queue.begin(16, 0), Err(InflightError::Corrupt(_))));
        file.write_all_at(&16u16.to_le_bytes(), 10).unwrap();
        queue.begin(16, 0).unwrap();
        file.write_all_at(&7u16.to_le_bytes(), 8).unwrap();
        assert!(matches!(queue.begin(16, 0), Err(InflightError::Corrupt(_))));
    }
}
