//! A ring as the session keeps it while the front-end configures it, and
//! the helpers every datapath shares: building the virtio-queue `Queue` of
//! a started ring, and the eventfds.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::memory::GuestRam;

/// A ring's parts as guest physical addresses: what a datapath uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGuestAddresses {
    /// Descriptor table.
    pub desc_table: GuestAddress,
    /// Avail (driver) ring.
    pub avail_ring: GuestAddress,
    /// Used (device) ring.
    pub used_ring: GuestAddress,
}

/// A ring's configuration as SET_VRING_* messages leave it.
#[derive(Debug, Default)]
pub struct RingState {
    /// SET_VRING_NUM (0: not set).
    pub size: u16,
    /// SET_VRING_ADDR as the front-end sent it (front-end virtual
    /// addresses); translated through the memory table when used, so a
    /// table change retranslates them.
    pub addresses: Option<presetup::RingAddresses>,
    /// SET_VRING_BASE, or where the ring stopped.
    pub next_avail: u16,
    /// A kick eventfd not handed to the datapath yet.
    pub kick: Option<File>,
    /// The call eventfd.
    pub call: Option<Arc<File>>,
    /// `call` changed since it was last handed to the datapath.
    pub call_pending: bool,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
    /// The datapath serves the ring (it holds the kick).
    pub running: bool,
}

impl RingState {
    /// The ring as presetup describes it, once it has a size and
    /// addresses (rings the front-end never set up are left out).
    pub fn describe(&self, index: u16) -> Option<presetup::RingConfig> {
        if self.size == 0 {
            return None;
        }
        Some(presetup::RingConfig {
            index,
            size: self.size,
            addresses: self.addresses?,
            next_avail: self.next_avail,
            enabled: self.enabled,
            kick_fd: self.kick.is_some() || self.running,
            call_fd: self.call.is_some(),
        })
    }
}

/// SET_VRING_ADDR's three addresses in presetup's form.
pub fn frontend_addresses(descriptor: u64, used: u64, available: u64) -> presetup::RingAddresses {
    presetup::RingAddresses {
        desc_table: presetup::FrontendAddr(descriptor),
        avail_ring: presetup::FrontendAddr(available),
        used_ring: presetup::FrontendAddr(used),
    }
}

/// Why a ring cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// virtio-queue refused the size or an address.
    #[error("ring setup refused")]
    Setup(#[source] virtio_queue::Error),
    /// The parts do not lie in guest memory or are misaligned.
    #[error("ring addresses are outside guest memory or misaligned")]
    Invalid,
    /// The used index could not be read.
    #[error("cannot read the used index")]
    UsedIndex(#[source] virtio_queue::Error),
}

/// Build the `Queue` for a ring; the used index starts where the guest's
/// used ring says (it survives reconnects and migrations).
pub fn build_queue(
    size: u16,
    addresses: RingGuestAddresses,
    next_avail: u16,
    event_idx: bool,
    mem: &GuestRam,
) -> Result<Queue, RingError> {
    let mut queue = Queue::new(size).map_err(RingError::Setup)?;
    queue
        .try_set_desc_table_address(addresses.desc_table)
        .map_err(RingError::Setup)?;
    queue
        .try_set_avail_ring_address(addresses.avail_ring)
        .map_err(RingError::Setup)?;
    queue
        .try_set_used_ring_address(addresses.used_ring)
        .map_err(RingError::Setup)?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err(RingError::Invalid);
    }
    queue.set_next_avail(next_avail);
    let used = queue
        .used_idx(mem, Ordering::Acquire)
        .map_err(RingError::UsedIndex)?;
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
