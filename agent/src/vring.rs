//! What both device back-ends keep per ring while the front-end configures
//! it, and the step that turns it into a running virtio-queue `Queue`.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use crate::memory::GuestRam;

/// A ring's configuration as SET_VRING_* messages leave it.
#[derive(Default)]
pub struct VringConfig {
    /// SET_VRING_NUM.
    pub size: u16,
    /// SET_VRING_ADDR, translated to guest physical addresses.
    pub desc_table: Option<GuestAddress>,
    /// See `desc_table`.
    pub avail_ring: Option<GuestAddress>,
    /// See `desc_table`.
    pub used_ring: Option<GuestAddress>,
    /// SET_VRING_BASE, or where the ring stopped.
    pub next_avail: u16,
    /// SET_VRING_KICK (taken when the ring starts).
    pub kick: Option<File>,
    /// SET_VRING_CALL.
    pub call: Option<Arc<File>>,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
}

impl VringConfig {
    /// The ring's addresses, once all three are set.
    pub fn addresses(&self) -> Option<(GuestAddress, GuestAddress, GuestAddress)> {
        Some((self.desc_table?, self.avail_ring?, self.used_ring?))
    }
}

/// Build the `Queue` for a configured ring; the used index starts where the
/// guest's used ring says (it survives reconnects and migrations).
pub fn build_queue(
    size: u16,
    (desc_table, avail_ring, used_ring): (GuestAddress, GuestAddress, GuestAddress),
    next_avail: u16,
    event_idx: bool,
    mem: &GuestRam,
) -> Result<Queue, String> {
    let mut queue = Queue::new(size).map_err(|e| format!("bad ring size {size}: {e}"))?;
    queue
        .try_set_desc_table_address(desc_table)
        .map_err(|e| e.to_string())?;
    queue
        .try_set_avail_ring_address(avail_ring)
        .map_err(|e| e.to_string())?;
    queue
        .try_set_used_ring_address(used_ring)
        .map_err(|e| e.to_string())?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err("ring addresses are outside guest memory or misaligned".to_string());
    }
    queue.set_next_avail(next_avail);
    let used = queue
        .used_idx(mem, Ordering::Acquire)
        .map_err(|e| format!("cannot read used index: {e}"))?;
    queue.set_next_used(used.0);
    Ok(queue)
}

/// Empty an eventfd that was reported readable.
pub fn drain_eventfd(mut file: &File) {
    let mut counter = [0u8; 8];
    // The fd was reported readable, so this returns at once; an error only
    // means another reader got there first.
    let _ = file.read(&mut counter);
}

/// Interrupt the guest through a call eventfd.
pub fn notify(mut file: &File) {
    if let Err(e) = file.write_all(&1u64.to_ne_bytes()) {
        log::warn!("cannot signal guest: {e}");
    }
}
