//! What all queues of one disk share: the image, its geometry and
//! options, and how many requests each queue holds (for `query-devices`).

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::spec::VIRTIO_BLK_ID_BYTES;

/// Most queues a disk may have (`num-queues`).
pub const MAX_QUEUES: u16 = 64;

/// Disk state shared by all queues of one disk.
#[derive(Debug)]
pub struct DiskShared {
    /// The image.
    pub file: Arc<File>,
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Writes are refused.
    pub readonly: bool,
    /// GET_ID answer (zero-padded or truncated to 20 bytes).
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Writeback cache enabled (config `writeback`); when false, writes
    /// complete only once durable.
    pub writeback: AtomicBool,
    /// Per queue: requests taken from the ring and not answered yet.
    in_flight: [AtomicU64; MAX_QUEUES as usize],
}

impl DiskShared {
    /// Shared state for a disk of `capacity_sectors` backed by `file`.
    pub fn new(file: Arc<File>, capacity_sectors: u64, readonly: bool, serial: &str) -> DiskShared {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let bytes = serial.as_bytes();
        let len = bytes.len().min(id.len());
        id[..len].copy_from_slice(&bytes[..len]);
        DiskShared {
            file,
            capacity_sectors,
            readonly,
            serial: id,
            writeback: AtomicBool::new(true),
            in_flight: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Requests queue `queue` has taken from its ring and not answered
    /// yet (submitted to storage, or held by the write fence), as of its
    /// last step; after a suspend, its abandoned storage operations that
    /// are still running. 0 for a queue that is not running.
    pub fn in_flight(&self, queue: u16) -> u64 {
        self.in_flight
            .get(usize::from(queue))
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }

    /// Queue `queue` now holds `count` requests.
    pub(crate) fn set_in_flight(&self, queue: u16, count: u64) {
        if let Some(gauge) = self.in_flight.get(usize::from(queue)) {
            gauge.store(count, Ordering::Relaxed);
        }
    }
}
