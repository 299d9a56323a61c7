//! One queue pair on the kernel's vhost-net: a `/dev/vhost-net` instance
//! (the kernel's device is one RX/TX pair: virtqueue 0 receives, 1
//! transmits) with its tap queue as backend, and what the agent set on
//! each of its two virtqueues.

use std::fs::File;
use std::sync::Arc;

use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net;
use vhost::VhostBackend;
use vm_memory::GuestMemoryAtomic;

use super::error::{io_error, VhostNetError};
use crate::net::kernel::table::{KernelRegion, RingHost};
use crate::net::kernel::uapi::{self, RingFd};
use crate::vhost_user::memory::GuestRam;
use crate::vhost_user::vring::RingGuestAddresses;

/// The crate's handle. Its guest memory parameter is the agent's own
/// (`GuestMemoryAtomic<GuestRam>`, the mappings the session published), but
/// nothing here translates through it: ring addresses are translated and
/// checked against the table the kernel holds ([`super::table`]).
type Handle = Net<GuestMemoryAtomic<GuestRam>>;

/// Virtqueue 0 of a vhost-net device: the pair's RX ring.
pub const RX: usize = 0;

/// What the kernel holds for one virtqueue, as the agent set it.
#[derive(Debug, Default)]
pub struct KernelRing {
    /// VHOST_SET_VRING_NUM.
    pub size: Option<u16>,
    /// The guest addresses VHOST_SET_VRING_ADDR was given for.
    pub guest: Option<RingGuestAddresses>,
    /// What VHOST_SET_VRING_ADDR was given.
    pub host: Option<RingHost>,
    /// VHOST_VRING_F_LOG was set.
    pub log_used: bool,
    /// VHOST_SET_VRING_BASE, or where the ring stopped.
    pub base: Option<u16>,
    /// The kick eventfd the kernel polls: the ring runs.
    pub kick: Option<File>,
    /// The call eventfd the kernel signals.
    pub call: Option<Arc<File>>,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
    /// The tap queue is the virtqueue's backend (the kernel moves frames).
    pub backend: bool,
}

/// One `/dev/vhost-net` instance (module documentation).
pub struct Pair {
    index: u16,
    handle: Handle,
    /// A descriptor of the pair's tap queue, the backend.
    tap_queue: File,
    /// The last VHOST_SET_FEATURES.
    pub features: Option<u64>,
    /// The last VHOST_SET_LOG_BASE.
    pub log_base: Option<u64>,
    /// RX, TX.
    pub rings: [KernelRing; 2],
}

impl Pair {
    /// Open `/dev/vhost-net` and take VHOST_SET_OWNER: the kernel gives
    /// the instance its worker and binds it to the agent's memory.
    pub fn open(
        index: u16,
        memory: GuestMemoryAtomic<GuestRam>,
        tap_queue: File,
    ) -> Result<Pair, VhostNetError> {
        let handle = Net::new(memory).map_err(|e| VhostNetError::Ioctl {
            pair: index,
            ioctl: "open /dev/vhost-net",
            source: io_error(e),
        })?;
        let pair = Pair {
            index,
            handle,
            tap_queue,
            features: None,
            log_base: None,
            rings: [KernelRing::default(), KernelRing::default()],
        };
        pair.handle
            .set_owner()
            .map_err(|e| pair.err("VHOST_SET_OWNER", io_error(e)))?;
        Ok(pair)
    }

    fn err(&self, ioctl: &'static str, source: std::io::Error) -> VhostNetError {
        VhostNetError::Ioctl {
            pair: self.index,
            ioctl,
            source,
        }
    }

    /// VHOST_SET_FEATURES, unless the kernel has exactly these.
    pub fn set_features(&mut self, features: u64) -> Result<bool, VhostNetError> {
        if self.features == Some(features) {
            return Ok(false);
        }
        self.handle
            .set_features(features)
            .map_err(|e| self.err("VHOST_SET_FEATURES", io_error(e)))?;
        self.features = Some(features);
        Ok(true)
    }

    /// VHOST_SET_MEM_TABLE with `regions` (the whole table, replacing the
    /// one the kernel had).
    pub fn set_mem_table(&self, regions: &[KernelRegion]) -> Result<(), VhostNetError> {
        if regions.is_empty() {
            return uapi::set_empty_mem_table(&self.handle)
                .map_err(|e| self.err("VHOST_SET_MEM_TABLE (empty)", e));
        }
        let infos: Vec<vhost::VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|r| vhost::VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_phys_addr,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                // Only vhost-user uses the file behind a region.
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        self.handle
            .set_mem_table(&infos)
            .map(|_| ())
            .map_err(|e| self.err("VHOST_SET_MEM_TABLE", io_error(e)))
    }

    /// VHOST_SET_LOG_BASE: the kernel sets bits at `base` (an address in
    /// the agent: its mapping of the front-end's log).
    pub fn set_log_base(&mut self, base: u64) -> Result<(), VhostNetError> {
        if self.log_base == Some(base) {
            return Ok(());
        }
        self.handle
            .set_log_base(base, None)
            .map_err(|e| self.err("VHOST_SET_LOG_BASE", io_error(e)))?;
        self.log_base = Some(base);
        Ok(())
    }

    /// VHOST_SET_VRING_NUM.
    pub fn set_num(&mut self, vq: usize, size: u16) -> Result<(), VhostNetError> {
        self.handle
            .set_vring_num(vq, size)
            .map_err(|e| self.err("VHOST_SET_VRING_NUM", io_error(e)))?;
        self.rings[vq].size = Some(size);
        Ok(())
    }

    /// VHOST_SET_VRING_ADDR at `host` (checked by the caller), for guest
    /// addresses `guest`; the used ring's writes are logged when `log_used`.
    pub fn set_addr(
        &mut self,
        vq: usize,
        guest: RingGuestAddresses,
        host: RingHost,
        log_used: bool,
    ) -> Result<(), VhostNetError> {
        uapi::set_ring_addr(&self.handle, vq_index(vq), &host, log_used)
            .map_err(|e| self.err("VHOST_SET_VRING_ADDR", e))?;
        let ring = &mut self.rings[vq];
        ring.guest = Some(guest);
        ring.host = Some(host);
        ring.log_used = log_used;
        Ok(())
    }

    /// VHOST_SET_VRING_BASE.
    pub fn set_base(&mut self, vq: usize, base: u16) -> Result<(), VhostNetError> {
        self.handle
            .set_vring_base(vq, base)
            .map_err(|e| self.err("VHOST_SET_VRING_BASE", io_error(e)))?;
        self.rings[vq].base = Some(base);
        Ok(())
    }

    /// VHOST_GET_VRING_BASE: the next avail index the kernel would take.
    pub fn get_base(&mut self, vq: usize) -> Result<u16, VhostNetError> {
        let base = self
            .handle
            .get_vring_base(vq)
            .map_err(|e| self.err("VHOST_GET_VRING_BASE", io_error(e)))?;
        let base = u16::try_from(base).map_err(|_| {
            self.err(
                "VHOST_GET_VRING_BASE",
                std::io::Error::other(format!("base {base:#x} is no split-ring index")),
            )
        })?;
        self.rings[vq].base = Some(base);
        Ok(base)
    }

    /// VHOST_SET_VRING_KICK with `kick` (or unbound); the ring runs while
    /// the kernel polls a kick.
    pub fn set_kick(
        &mut self,
        vq: usize,
        kick: Option<File>,
    ) -> Result<Option<File>, VhostNetError> {
        uapi::set_ring_fd(&self.handle, RingFd::Kick, vq_index(vq), kick.as_ref())
            .map_err(|e| self.err("VHOST_SET_VRING_KICK", e))?;
        Ok(std::mem::replace(&mut self.rings[vq].kick, kick))
    }

    /// VHOST_SET_VRING_CALL with `call` (or unbound: interrupts masked),
    /// unless the kernel has that eventfd already.
    pub fn set_call(&mut self, vq: usize, call: Option<Arc<File>>) -> Result<bool, VhostNetError> {
        let same = match (&self.rings[vq].call, &call) {
            (Some(old), Some(new)) => Arc::ptr_eq(old, new),
            (None, None) => true,
            _ => false,
        };
        if same {
            return Ok(false);
        }
        uapi::set_ring_fd(&self.handle, RingFd::Call, vq_index(vq), call.as_deref())
            .map_err(|e| self.err("VHOST_SET_VRING_CALL", e))?;
        self.rings[vq].call = call;
        Ok(true)
    }

    /// VHOST_NET_SET_BACKEND: the tap queue (`attach`) or none. Without a
    /// backend the kernel leaves the ring alone; taking it away waits for
    /// the kernel's worker to finish what it is doing on the ring.
    pub fn set_backend(&mut self, vq: usize, attach: bool) -> Result<(), VhostNetError> {
        if self.rings[vq].backend == attach {
            return Ok(());
        }
        let file = attach.then_some(&self.tap_queue);
        self.handle
            .set_backend(vq, file)
            .map_err(|e| self.err("VHOST_NET_SET_BACKEND", io_error(e)))?;
        self.rings[vq].backend = attach;
        Ok(())
    }

    /// Forget virtqueue `vq`: no backend, no eventfds, nothing recorded.
    /// Returns whether it held anything.
    pub fn reset_ring(&mut self, vq: usize) -> Result<bool, VhostNetError> {
        self.set_backend(vq, false)?;
        let had_kick = self.set_kick(vq, None)?.is_some();
        self.set_call(vq, None)?;
        let ring = std::mem::take(&mut self.rings[vq]);
        Ok(had_kick || ring.size.is_some() || ring.guest.is_some() || ring.base.is_some())
    }
}

/// The uAPI's index of virtqueue `vq` (0 or 1).
fn vq_index(vq: usize) -> u32 {
    // `vq` is RX or TX.
    u32::from(vq != RX)
}
