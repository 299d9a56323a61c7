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
    /// SET_VRING_ADDR as the front-end sent it, for `query-config`: another
    /// agent needs the front-end's addresses, not this one's translation.
    pub frontend_addresses: Option<presetup::RingAddresses>,
}

impl VringConfig {
    /// The ring's addresses, once all three are set.
    pub fn addresses(&self) -> Option<(GuestAddress, GuestAddress, GuestAddress)> {
        Some((self.desc_table?, self.avail_ring?, self.used_ring?))
    }

    /// The ring as presetup describes it, once it has a size and
    /// addresses; `running` says whether a worker holds its kick fd.
    pub fn describe(&self, index: u16, running: bool) -> Option<presetup::RingConfig> {
        describe_ring(
            index,
            self.size,
            self.frontend_addresses,
            RingFds {
                next_avail: self.next_avail,
                enabled: self.enabled,
                kick: self.kick.is_some() || running,
                call: self.call.is_some(),
            },
        )
    }
}

/// A ring's state besides its size and addresses, for [`describe_ring`].
pub struct RingFds {
    /// Next available index.
    pub next_avail: u16,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
    /// A kick eventfd is attached (or taken by the running ring).
    pub kick: bool,
    /// A call eventfd is attached.
    pub call: bool,
}

/// A ring as presetup describes it; `None` until it has a size and
/// addresses (rings the front-end never set up are left out).
pub fn describe_ring(
    index: u16,
    size: u16,
    addresses: Option<presetup::RingAddresses>,
    state: RingFds,
) -> Option<presetup::RingConfig> {
    if size == 0 {
        return None;
    }
    Some(presetup::RingConfig {
        index,
        size,
        addresses: addresses?,
        next_avail: state.next_avail,
        enabled: state.enabled,
        kick_fd: state.kick,
        call_fd: state.call,
    })
}

/// SET_VRING_ADDR's three addresses in presetup's form.
pub fn frontend_addresses(descriptor: u64, used: u64, available: u64) -> presetup::RingAddresses {
    presetup::RingAddresses {
        desc_table: presetup::FrontendAddr(descriptor),
        avail_ring: presetup::FrontendAddr(available),
        used_ring: presetup::FrontendAddr(used),
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
