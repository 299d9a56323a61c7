//! Descriptor chains into the blk request path: a `BlkQueue` (with a real
//! thread-pool engine on a small image) processes whatever the input put
//! on a split ring in guest memory, then every request it started is
//! completed. Nothing may panic, hang or touch memory outside the guest's;
//! the device never publishes more used entries than it took chains.

#![no_main]

#[path = "common/ring.rs"]
mod ring;

use std::cell::RefCell;
use std::sync::Arc;

use blkdev::engine::EngineKind;
use blkdev::queue::DiskShared;
use blkdev::{BlkQueue, IoEngine};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

/// Sectors of the scratch image.
const SECTORS: u64 = 64;
/// Slots of the queue processor (the largest ring the input may pick).
const SLOTS: u16 = 16;

thread_local! {
    /// One processor for the whole run: an engine's threads are too costly
    /// to start per input. Every input leaves it with nothing in flight.
    static BLK: RefCell<BlkQueue<GuestMemoryMmap>> = RefCell::new(processor());
}

fn processor() -> BlkQueue<GuestMemoryMmap> {
    let path = std::env::temp_dir().join(format!("blk_chain-{}.img", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create the scratch image");
    let _ = std::fs::remove_file(&path);
    file.set_len(SECTORS * 512).expect("size the scratch image");
    let file = Arc::new(file);
    let disk = Arc::new(DiskShared::new(file.clone(), SECTORS, false, "fuzz"));
    let engine = IoEngine::new(EngineKind::ThreadPool, file, u32::from(SLOTS))
        .expect("a thread-pool engine");
    BlkQueue::new(disk, engine, SLOTS).with_index(0)
}

/// Wait for the engine and publish until nothing is in flight.
fn drain(
    blk: &mut BlkQueue<GuestMemoryMmap>,
    queue: &mut virtio_queue::Queue,
    mem: &Arc<GuestMemoryMmap>,
) {
    while blk.in_flight() > 0 {
        let mut pollfd = libc::pollfd {
            fd: blk.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack for the duration of the call.
        unsafe { libc::poll(&mut pollfd, 1, 1000) };
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into an 8-byte buffer (EAGAIN is fine).
        unsafe { libc::read(pollfd.fd, counter.as_mut_ptr().cast(), 8) };
        let _ = blk.process_completions(queue, mem);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((params, image)) = ring::params(data) else {
        return;
    };
    let mem = ring::memory(image);
    let Some(mut queue) = ring::queue(&mem, &params) else {
        return;
    };
    let used_before = queue.next_used();
    let avail_before = queue.next_avail();
    BLK.with(|blk| {
        let mut blk = blk.borrow_mut();
        let _ = blk.process_avail(&mut queue, &mem);
        drain(&mut blk, &mut queue, &mem);
        let _ = blk.take_faults();
    });
    let taken = queue.next_avail().wrapping_sub(avail_before);
    let published = queue.next_used().wrapping_sub(used_before);
    assert!(
        taken <= params.size,
        "took {taken} chains from a ring of {}",
        params.size
    );
    assert!(
        published <= taken,
        "published {published} used entries for {taken} chains"
    );
});
