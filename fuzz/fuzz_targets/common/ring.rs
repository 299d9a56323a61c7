//! A split ring in a small guest memory, everything taken from the fuzz
//! input: the first bytes choose the ring's parameters, the rest is the
//! memory image (descriptor table, avail ring, buffers, indirect tables),
//! so the fuzzer controls every byte the device reads.
//!
//! Layout (guest physical): descriptor table at 0, avail ring at
//! `AVAIL`, used ring at `USED`, buffers above `BUFFERS`; a descriptor may
//! point anywhere, outside memory included.

// Each target uses part of this module.
#![allow(dead_code)]

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size.
pub const MEM: usize = 0x1_0000;
/// Avail ring (4 + 2 * 16 + 2 bytes for the largest ring used here).
pub const AVAIL: u64 = 0x1000;
/// Used ring.
pub const USED: u64 = 0x1800;
/// Where buffers usually go (nothing enforces it).
pub const BUFFERS: u64 = 0x2000;
/// Bytes of parameters before the memory image.
pub const PARAMS: usize = 4;

/// The ring parameters the input's first bytes pick.
pub struct Params {
    /// Ring size: 1, 2, 4, 8 or 16.
    pub size: u16,
    /// VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Where the device stands (SET_VRING_BASE).
    pub next_avail: u16,
    /// One more byte for the target (mode, frame length, ...).
    pub extra: u8,
}

/// Split `data` into parameters and the memory image.
pub fn params(data: &[u8]) -> Option<(Params, &[u8])> {
    let (head, image) = data.split_at_checked(PARAMS)?;
    Some((
        Params {
            size: 1 << ((head[0] & 0x7f) % 5),
            event_idx: head[0] & 0x80 != 0,
            next_avail: u16::from_le_bytes([head[1], head[2]]),
            extra: head[3],
        },
        image,
    ))
}

thread_local! {
    /// One guest memory for the whole run (mapping it anew per input costs
    /// more than most inputs do); every input rewrites all of it.
    static MEMORY: Arc<GuestMemoryMmap> = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)])
            .expect("64 KiB of anonymous memory"),
    );
}

/// Guest memory holding `image` from address 0, the rest zero.
pub fn memory(image: &[u8]) -> Arc<GuestMemoryMmap> {
    let mem = MEMORY.with(Arc::clone);
    let len = image.len().min(MEM);
    let mut bytes = vec![0u8; MEM];
    bytes[..len].copy_from_slice(&image[..len]);
    mem.write_slice(&bytes, GuestAddress(0))
        .expect("the image fits the memory");
    mem
}

/// The device's queue over `mem`, as a front-end would configure it.
pub fn queue(mem: &GuestMemoryMmap, params: &Params) -> Option<Queue> {
    let mut queue = Queue::new(16).ok()?;
    queue.set_size(params.size);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(params.event_idx);
    queue.set_next_avail(params.next_avail);
    queue.set_ready(true);
    queue.is_valid(mem).then_some(queue)
}

/// The used index the device published.
pub fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0)
}

/// The length field of used entry `slot` of a ring of `size`.
pub fn used_len(mem: &GuestMemoryMmap, size: u16, slot: u16) -> u32 {
    let at = USED + 4 + 8 * u64::from(slot % size) + 4;
    mem.read_obj(GuestAddress(at)).unwrap_or(0)
}

/// The id field of used entry `slot` of a ring of `size`.
pub fn used_id(mem: &GuestMemoryMmap, size: u16, slot: u16) -> u32 {
    let at = USED + 4 + 8 * u64::from(slot % size);
    mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX)
}

/// The heads the driver made available from `next_avail` on (at most a
/// ring's worth), read from the avail ring.
pub fn avail_heads(mem: &GuestMemoryMmap, size: u16, next_avail: u16) -> Vec<u16> {
    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap_or(0);
    let count = idx.wrapping_sub(next_avail).min(size);
    (0..count)
        .filter_map(|i| {
            let slot = u64::from(next_avail.wrapping_add(i) % size);
            mem.read_obj(GuestAddress(AVAIL + 4 + 2 * slot)).ok()
        })
        .collect()
}

/// The device-writable bytes the chain at `head` offers, found by a walk of
/// this harness's own (not the device's): None when the chain is one the
/// device must refuse (a loop, a next or table out of range, a nested
/// indirect table), so a device that used it is wrong.
pub fn writable_capacity(mem: &GuestMemoryMmap, size: u16, head: u16) -> Option<u64> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let mut table = 0u64;
    let mut entries = u64::from(size);
    let mut index = u64::from(head);
    let mut indirect = false;
    let mut visited = std::collections::HashSet::new();
    let mut total = 0u64;
    loop {
        if index >= entries {
            return None;
        }
        let at = GuestAddress(table.checked_add(16 * index)?);
        let addr: u64 = mem.read_obj(at).ok()?;
        let len: u32 = mem.read_obj(GuestAddress(at.0 + 8)).ok()?;
        let flags: u16 = mem.read_obj(GuestAddress(at.0 + 12)).ok()?;
        let next: u16 = mem.read_obj(GuestAddress(at.0 + 14)).ok()?;
        if flags & INDIRECT != 0 {
            if indirect || len % 16 != 0 || len == 0 {
                return None;
            }
            table = addr;
            entries = u64::from(len / 16);
            index = 0;
            indirect = true;
            visited.clear();
            continue;
        }
        if !visited.insert(index) {
            return None;
        }
        if flags & WRITE != 0 {
            total += u64::from(len);
        }
        if flags & NEXT == 0 {
            return Some(total);
        }
        index = u64::from(next);
    }
}
