//! The inflight region as a front-end holds it (vhost-user "Inflight I/O
//! tracking", split rings): the memfd from GET_INFLIGHT_FD, what the
//! back-end recorded in it, and the copies QEMU makes of it.
//!
//! Layout per queue: a 16-byte header `{features u64, version u16, desc_num
//! u16, last_batch_head u16, used_idx u16}` and then `queue_size` 16-byte
//! `DescStateSplit {inflight u8, padding [u8; 5], next u16, counter u64}`;
//! queue `i` starts at `i * ALIGN_UP(16 + 16 * queue_size, 64)`. This is
//! libvhost-user's and DPDK's layout, which matters because the region
//! migrates between back-ends as raw bytes.
//!
//! The test front-end never maps the region: it reads it with `pread`, a
//! snapshot the back-end may be changing at the same time, which is fine for
//! polling and for checks made while the back-end is stopped.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};

use vhost::vhost_user::message::VhostUserInflight;

use super::ram::memfd;
use super::sealed_memfd;

/// Each queue's part of the region is aligned to this many bytes.
pub const INFLIGHT_ALIGNMENT: u64 = 64;
/// Size of a queue's header.
pub const QUEUE_HEADER_SIZE: u64 = 16;
/// Size of one `DescStateSplit`.
pub const DESC_STATE_SIZE: u64 = 16;

/// Bytes one queue of `queue_size` entries takes in the region (the stride
/// between queues): `ALIGN_UP(16 + 16 * queue_size, 64)`.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let unaligned = QUEUE_HEADER_SIZE + DESC_STATE_SIZE * u64::from(queue_size);
    unaligned.div_ceil(INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT
}

/// One descriptor's entry (`DescStateSplit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescState {
    /// 1 while the request whose head this is is in flight.
    pub inflight: u8,
    /// Link of the last completed batch.
    pub next: u16,
    /// Fetch order.
    pub counter: u64,
}

/// One queue's part of the region, decoded.
#[derive(Clone, Debug)]
pub struct QueueState {
    /// `features` (0 from a split-ring back-end).
    pub features: u64,
    /// `version`: 0 while fresh, 1 once a back-end has used it.
    pub version: u16,
    /// `desc_num`: the queue size.
    pub desc_num: u16,
    /// `last_batch_head`: start of the last completed batch's list.
    pub last_batch_head: u16,
    /// `used_idx`: the used index after the last completed batch.
    pub used_idx: u16,
    /// One entry per descriptor.
    pub descs: Vec<DescState>,
}

impl QueueState {
    /// Heads marked in flight, in fetch (counter) order: the order a
    /// back-end must resubmit them in.
    pub fn inflight_heads(&self) -> Vec<u16> {
        let mut heads: Vec<(u64, u16)> = self
            .descs
            .iter()
            .enumerate()
            .filter(|(_, desc)| desc.inflight != 0)
            .map(|(head, desc)| (desc.counter, head as u16))
            .collect();
        heads.sort_unstable();
        heads.into_iter().map(|(_, head)| head).collect()
    }

    /// How many heads are marked in flight.
    pub fn inflight_count(&self) -> usize {
        self.descs.iter().filter(|desc| desc.inflight != 0).count()
    }
}

/// An inflight region: a memfd and the description sent with it.
pub struct InflightRegion {
    file: File,
    /// `mmap_size`: bytes of the fd the back-end maps.
    pub mmap_size: u64,
    /// `mmap_offset`: where in the fd the region starts.
    pub mmap_offset: u64,
    /// `num_queues`.
    pub num_queues: u16,
    /// `queue_size`.
    pub queue_size: u16,
}

impl InflightRegion {
    /// The region a back-end handed out with GET_INFLIGHT_FD.
    pub fn from_reply(reply: &VhostUserInflight, file: File) -> InflightRegion {
        InflightRegion {
            file,
            mmap_size: reply.mmap_size,
            mmap_offset: reply.mmap_offset,
            num_queues: reply.num_queues,
            queue_size: reply.queue_size,
        }
    }

    /// A zeroed region of `mmap_size` bytes the front-end made itself, in
    /// a sealed memfd as QEMU makes one, described as `num_queues` queues
    /// of `queue_size` (for SET_INFLIGHT_FD without GET; `mmap_size` may
    /// deliberately not fit the description).
    pub fn zeroed(mmap_size: u64, num_queues: u16, queue_size: u16) -> InflightRegion {
        InflightRegion {
            file: sealed_memfd("vhost-inflight", mmap_size),
            mmap_size,
            mmap_offset: 0,
            num_queues,
            queue_size,
        }
    }

    /// Like [`Self::zeroed`], in a memfd that is NOT sealed: a front-end
    /// that could shrink the region under the back-end's mapping.
    pub fn unsealed(mmap_size: u64, num_queues: u16, queue_size: u16) -> InflightRegion {
        InflightRegion {
            file: memfd("vhost-inflight", mmap_size, false),
            mmap_size,
            mmap_offset: 0,
            num_queues,
            queue_size,
        }
    }

    /// The payload of SET_INFLIGHT_FD for this region.
    pub fn message(&self) -> VhostUserInflight {
        VhostUserInflight::new(
            self.mmap_size,
            self.mmap_offset,
            self.num_queues,
            self.queue_size,
        )
    }

    /// The fd to send with SET_INFLIGHT_FD.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The region's bytes as they are now.
    pub fn bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.mmap_size as usize];
        self.file
            .read_exact_at(&mut bytes, self.mmap_offset)
            .expect("read the inflight region");
        bytes
    }

    /// Queue `queue`'s header and entries as they are now.
    pub fn queue(&self, queue: usize) -> QueueState {
        assert!(
            queue < usize::from(self.num_queues),
            "queue {queue} out of range"
        );
        let stride = queue_region_size(self.queue_size);
        let mut bytes = vec![0u8; stride as usize];
        self.file
            .read_exact_at(&mut bytes, self.mmap_offset + queue as u64 * stride)
            .expect("read a queue of the inflight region");
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let descs = (0..usize::from(self.queue_size))
            .map(|index| {
                let at = QUEUE_HEADER_SIZE as usize + index * DESC_STATE_SIZE as usize;
                DescState {
                    inflight: bytes[at],
                    next: u16_at(at + 6),
                    counter: u64_at(at + 8),
                }
            })
            .collect();
        QueueState {
            features: u64_at(0),
            version: u16_at(8),
            desc_num: u16_at(10),
            last_batch_head: u16_at(12),
            used_idx: u16_at(14),
            descs,
        }
    }

    /// What QEMU does on migration (subsection "vhost-user-blk/inflight"):
    /// the region's bytes, in a fresh memfd at offset 0, sealed against
    /// resizing like QEMU's `qemu_memfd_alloc(F_SEAL_GROW | F_SEAL_SHRINK |
    /// F_SEAL_SEAL)`.
    pub fn migrate(&self) -> InflightRegion {
        let file = sealed_memfd("vhost-inflight", self.mmap_size);
        file.write_all_at(&self.bytes(), 0)
            .expect("copy the inflight region");
        InflightRegion {
            file,
            mmap_size: self.mmap_size,
            mmap_offset: 0,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }

    /// The same memory again (QEMU keeps the memfd across a back-end
    /// restart and sends it with SET_INFLIGHT_FD without a GET).
    pub fn try_clone(&self) -> InflightRegion {
        InflightRegion {
            file: self.file.try_clone().expect("dup the inflight memfd"),
            mmap_size: self.mmap_size,
            mmap_offset: self.mmap_offset,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }
}
