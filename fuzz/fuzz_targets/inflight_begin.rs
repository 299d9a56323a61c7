//! The inflight region as a new back-end finds it at start: arbitrary
//! region bytes (a crashed back-end's, a migration source's, or a
//! scribbling front-end's) and ring state (ring size, the guest's used
//! index), through `InflightQueue::begin` and then the bookkeeping a queue
//! does with it. Also `InflightRegion::map` with arbitrary sizes, offsets
//! and shapes against a real memfd. Nothing may panic or raise SIGBUS;
//! the heads to resubmit are distinct, inside the ring, oldest first.

#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use blkdev::inflight::{queue_stride, InflightRegion};
use libfuzzer_sys::fuzz_target;

/// Descriptors per queue of the region under test.
const QUEUE_SIZE: u16 = 16;

/// One region for the whole run (a sealed memfd the agent made): each
/// input overwrites its bytes.
fn region() -> &'static (InflightRegion, File) {
    static REGION: OnceLock<(InflightRegion, File)> = OnceLock::new();
    REGION.get_or_init(|| InflightRegion::create(2, QUEUE_SIZE).expect("an inflight memfd"))
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_at_checked(8) else {
        return;
    };
    let (region, file) = region();
    let stride = queue_stride(QUEUE_SIZE);
    let bytes = usize::try_from(2 * stride).unwrap_or(0);
    let mut image = vec![0u8; bytes];
    let len = rest.len().min(bytes);
    image[..len].copy_from_slice(&rest[..len]);
    file.write_all_at(&image, 0).expect("write the region");

    let ring_size = 1u16 << (head[0] % 6); // 1..=32: larger than the region too
    let used_idx = u16::from_le_bytes([head[1], head[2]]);
    let Some(mut queue) = region.queue(u16::from(head[3] & 1)) else {
        return;
    };
    if let Ok(recovery) = queue.begin(ring_size, used_idx) {
        let mut seen = [false; QUEUE_SIZE as usize];
        for &h in &recovery.heads {
            assert!(
                h < ring_size && h < QUEUE_SIZE,
                "head {h} on a ring of {ring_size}"
            );
            assert!(!seen[usize::from(h)], "head {h} twice");
            seen[usize::from(h)] = true;
        }
        // What a queue does next with the heads and new ones.
        for &h in &recovery.heads {
            queue.before_publish(h);
            queue.after_publish(h, used_idx.wrapping_add(1));
        }
        for &byte in &head[4..] {
            let h = u16::from(byte) % (ring_size + 2);
            queue.fetched(h);
            if byte & 0x80 != 0 {
                queue.before_publish(h);
                queue.after_publish(h, used_idx);
            }
        }
        let _ = queue.begin(ring_size, used_idx);
        let _ = queue.inflight_count();
    }

    // SET_INFLIGHT_FD with whatever description the input makes up.
    let mmap_size = u64::from(u16::from_le_bytes([head[4], head[5]])) * 64;
    let mmap_offset = u64::from(head[6] & 3) * 4096;
    let num_queues = u16::from(head[7] & 3);
    let queue_size = 1u16 << (head[7] >> 4);
    if let Ok(mapped) = InflightRegion::map(file, mmap_size, mmap_offset, num_queues, queue_size) {
        assert!(mapped.mmap_size() <= mmap_size);
        for index in 0..num_queues {
            if let Some(mut queue) = mapped.queue(index) {
                let _ = queue.begin(queue_size, used_idx);
            }
        }
    }
});
