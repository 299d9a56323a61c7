//! The device side of a vDPA net device: what the front-end wants (per
//! ring, memory, features) and what the device holds, brought together by
//! [`Engine::sync`] after every batch of plan steps.
//!
//! A vDPA device is one virtio device: features are negotiated once
//! (FEATURES_OK), rings are programmed before DRIVER_OK, and after
//! DRIVER_OK vhost-vdpa takes VHOST_SET_VRING_ADDR / BASE only while the
//! device is suspended. So the engine
//!
//! * negotiates features as soon as the front-end acked them (presetup
//!   does this early);
//! * maps guest memory with IOTLB updates as soon as it is mapped in the
//!   agent, only the regions that differ, batched where the device offers
//!   VHOST_BACKEND_F_IOTLB_BATCH;
//! * sets DRIVER_OK once the rings the front-end configured have started:
//!   every ring of the device, or (a front-end with fewer pairs) every
//!   configured ring once one of them is enabled;
//! * stops with VHOST_VDPA_SUSPEND where offered (the base is the
//!   device's, exact, and the device does no more DMA); without it, with a
//!   device reset, after which the base is the used index in guest memory
//!   (what the device took but never returned is offered again);
//! * restarts a suspended device with what changed and VHOST_VDPA_RESUME
//!   where offered, otherwise by reset and a full reprogram; each logged.
//!
//! Kick and call eventfds and ring enables go to the device directly, at
//! any time.

use std::fs::File;
use std::sync::Arc;

use presetup::RegionKey;
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryAtomic};

use super::dirty::UsedScanner;
use super::error::VdpaError;
use super::handle::{Caps, Ops};
use crate::net::kernel::table::{KernelRegion, KernelTable};
use crate::net::kernel::uapi::backend;
use crate::vhost_user::dirty_log::LogRegion;
use crate::vhost_user::memory::{GuestRam, MappedRegion};
use crate::vhost_user::vring::RingGuestAddresses;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u8 = 1;
    /// DRIVER.
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u8 = 8;
}

/// Where the device is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reset (status 0): nothing negotiated.
    Reset,
    /// FEATURES_OK with these features; rings may be programmed.
    FeaturesOk(u64),
    /// DRIVER_OK with these features; `suspended` after VHOST_VDPA_SUSPEND.
    DriverOk {
        /// The negotiated features.
        features: u64,
        /// Suspended.
        suspended: bool,
    },
}

/// What the device holds for one ring, as the engine set it.
#[derive(Debug, Default)]
struct DevRing {
    size: Option<u16>,
    guest: Option<RingGuestAddresses>,
    base: Option<u16>,
    kick: bool,
    call: Option<Arc<File>>,
    call_set: bool,
    ready: Option<bool>,
}

/// One ring: what the front-end wants and what the device holds.
#[derive(Debug, Default)]
pub struct Ring {
    /// SET_VRING_NUM.
    pub size: Option<u16>,
    /// SET_VRING_ADDR, as guest addresses.
    pub guest: Option<RingGuestAddresses>,
    /// SET_VRING_BASE, or where the ring stopped.
    pub base: u16,
    /// The kick: the ring is started.
    pub kick: Option<File>,
    /// The call.
    pub call: Option<Arc<File>>,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
    dev: DevRing,
}

impl Ring {
    fn configured(&self) -> bool {
        self.size.is_some() && self.guest.is_some()
    }

    /// Size, addresses or base differ from what the device holds.
    fn values_changed(&self) -> bool {
        self.size != self.dev.size
            || self.guest != self.dev.guest
            || Some(self.base) != self.dev.base
    }
}

/// The device side of a vDPA net device (module documentation).
pub struct Engine<O: Ops> {
    name: Arc<str>,
    ops: O,
    caps: Caps,
    rings: Vec<Ring>,
    phase: Phase,
    /// The virtio features the front-end acked; `None` before it did.
    acked: Option<u64>,
    /// The features the device gets on top of the acked ones it has.
    required: u64,
    /// What the device has mapped, or will at the next sync.
    table: KernelTable,
    /// The regions the device's IOTLB holds (with the mappings kept alive
    /// while it does).
    mapped: Vec<(KernelRegion, Arc<MappedRegion>)>,
    /// Every mapping is sent again at the next sync (after a reset of a
    /// device whose IOTLB does not survive one).
    remap_all: bool,
    memory: GuestMemoryAtomic<GuestRam>,
    scanner: UsedScanner,
    /// One "restart by reset" line per device, not per restart.
    told_reset: bool,
}

impl<O: Ops> Engine<O> {
    /// An engine for `rings` rings on `ops`, which offered `caps`; `required`
    /// are the feature bits the device must get (VERSION_1,
    /// ACCESS_PLATFORM), `memory` the agent's mappings of guest RAM.
    pub fn new(
        name: Arc<str>,
        ops: O,
        caps: Caps,
        rings: u16,
        required: u64,
        memory: GuestMemoryAtomic<GuestRam>,
    ) -> Engine<O> {
        let scanner = UsedScanner::spawn(name.clone(), memory.clone(), rings);
        Engine {
            name,
            ops,
            caps,
            rings: (0..rings).map(|_| Ring::default()).collect(),
            phase: Phase::Reset,
            acked: None,
            required,
            table: KernelTable::default(),
            mapped: Vec::new(),
            remap_all: false,
            memory,
            scanner,
            told_reset: false,
        }
    }

    /// What the device offered.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Where the device is.
    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The ops (tests look at what was done).
    #[cfg(test)]
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Ring `ring`, or the refusal.
    pub fn ring_mut(&mut self, ring: u16) -> Result<&mut Ring, VdpaError> {
        let rings = self.rings.len() as u16;
        self.rings
            .get_mut(usize::from(ring))
            .ok_or(VdpaError::NoRing { ring, rings })
    }

    /// The front-end acked `features`.
    pub fn set_acked(&mut self, features: u64) {
        self.acked = Some(features);
    }

    /// The memory the device should map (`map_region`).
    pub fn insert_region(&mut self, region: Arc<MappedRegion>) {
        self.table.insert(region);
    }

    /// A region the device should no longer map; whether it had it.
    pub fn remove_region(&mut self, key: &RegionKey) -> bool {
        self.table.remove(key).is_some()
    }

    /// Check ring `ring` of `size` at `guest` lies inside the memory the
    /// device maps.
    pub fn check_ring(
        &self,
        ring: u16,
        size: u16,
        guest: &RingGuestAddresses,
    ) -> Result<(), VdpaError> {
        if size > self.caps.max_ring {
            return Err(crate::net::kernel::RingCheckError::Size { ring, size }.into());
        }
        self.table.ring_host(ring, size, guest)?;
        Ok(())
    }

    /// The features the device gets: the acked ones it offered, and the
    /// required ones.
    fn device_features(&self, acked: u64) -> u64 {
        (acked & self.caps.device_features & super::RELAYED_FEATURES) | self.required
    }

    /// Back to a device that holds nothing: status 0 and no mappings.
    pub fn reset(&mut self) -> Result<(), VdpaError> {
        self.device_reset()?;
        for (region, _) in std::mem::take(&mut self.mapped) {
            self.ops.unmap(region.guest_phys_addr, region.size)?;
        }
        self.remap_all = false;
        self.table.take_all();
        for ring in &mut self.rings {
            *ring = Ring::default();
        }
        self.acked = None;
        self.scanner.set_rings(&[]);
        Ok(())
    }

    /// Status 0: the device forgets features and rings (and, without
    /// VHOST_BACKEND_F_IOTLB_PERSIST, may forget its mappings).
    fn device_reset(&mut self) -> Result<(), VdpaError> {
        if self.phase != Phase::Reset {
            self.ops.set_status(0)?;
        }
        self.phase = Phase::Reset;
        for ring in &mut self.rings {
            ring.dev = DevRing::default();
        }
        if !self.caps.has(backend::IOTLB_PERSIST) && !self.mapped.is_empty() {
            self.remap_all = true;
        }
        Ok(())
    }

    /// Whether the rings are ready for the device to run: one has started,
    /// every configured one has, and either all of the device's rings have
    /// or one of them is enabled (module documentation).
    fn go(&self) -> bool {
        let started = self.rings.iter().filter(|r| r.kick.is_some()).count();
        started > 0
            && self
                .rings
                .iter()
                .all(|r| r.kick.is_some() || !r.configured())
            && (started == self.rings.len()
                || self.rings.iter().any(|r| r.kick.is_some() && r.enabled))
    }

    /// Bring the device to what the front-end wants (module documentation).
    pub fn sync(&mut self) -> Result<(), VdpaError> {
        self.sync_memory()?;
        let Some(acked) = self.acked else {
            return Ok(());
        };
        let features = self.device_features(acked);
        if let Phase::DriverOk {
            features: held,
            suspended,
        } = self.phase
        {
            let changed = self
                .rings
                .iter()
                .any(|r| r.kick.is_some() && r.values_changed());
            let can_resume = self.caps.has(backend::SUSPEND) && self.caps.has(backend::RESUME);
            if held != features {
                log::info!("{}: features change on a running device: reset", self.name);
                self.device_reset()?;
                self.sync_memory()?;
            } else if self.go() && (changed || suspended) {
                if can_resume {
                    if !suspended {
                        self.ops.suspend()?;
                        self.phase = Phase::DriverOk {
                            features,
                            suspended: true,
                        };
                    }
                    self.program_rings(true)?;
                } else {
                    if !self.told_reset {
                        log::info!(
                            "{}: the device has no {}: rings restart by reset and a full reprogram",
                            self.name,
                            if self.caps.has(backend::SUSPEND) {
                                "VHOST_VDPA_RESUME"
                            } else {
                                "VHOST_VDPA_SUSPEND"
                            }
                        );
                        self.told_reset = true;
                    }
                    self.device_reset()?;
                    self.sync_memory()?;
                }
            }
        }
        if let Phase::FeaturesOk(held) = self.phase {
            if held != features {
                self.device_reset()?;
                self.sync_memory()?;
            }
        }
        if self.phase == Phase::Reset {
            self.negotiate(features)?;
        }
        if let Phase::FeaturesOk(_) = self.phase {
            if self.go() {
                self.program_rings(false)?;
                let wanted =
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
                self.ops.set_status(wanted)?;
                self.check_status(wanted)?;
                self.phase = Phase::DriverOk {
                    features,
                    suspended: false,
                };
                log::info!("{}: DRIVER_OK with features {features:#x}", self.name);
            }
        }
        if let Phase::DriverOk { suspended, .. } = self.phase {
            self.sync_fds()?;
            if suspended
                && self.go()
                && !self
                    .rings
                    .iter()
                    .any(|r| r.kick.is_some() && r.values_changed())
            {
                self.ops.resume()?;
                self.phase = Phase::DriverOk {
                    features,
                    suspended: false,
                };
                log::debug!("{}: resumed", self.name);
            }
        }
        self.publish_rings();
        Ok(())
    }

    /// SET_FEATURES and FEATURES_OK.
    fn negotiate(&mut self, features: u64) -> Result<(), VdpaError> {
        self.ops.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
        self.ops.set_features(features)?;
        let wanted = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.ops.set_status(wanted)?;
        self.check_status(wanted)?;
        self.phase = Phase::FeaturesOk(features);
        log::debug!("{}: FEATURES_OK with {features:#x}", self.name);
        Ok(())
    }

    fn check_status(&mut self, wanted: u8) -> Result<(), VdpaError> {
        let got = self.ops.status()?;
        if got & wanted != wanted {
            return Err(VdpaError::Status { wanted, got });
        }
        Ok(())
    }

    /// Program every started ring's size, addresses and base where they
    /// differ, each checked against the memory the device maps; with
    /// `changed_only` false (before DRIVER_OK) also every configured ring
    /// and its call, kick and ready state.
    fn program_rings(&mut self, changed_only: bool) -> Result<(), VdpaError> {
        for index in 0..self.rings.len() {
            // index < the device's ring count, a u16.
            let ring_index = index as u16;
            let ring = &self.rings[index];
            if !ring.configured() || (changed_only && ring.kick.is_none()) {
                continue;
            }
            let (Some(size), Some(guest)) = (ring.size, ring.guest) else {
                continue;
            };
            self.check_ring(ring_index, size, &guest)?;
            let base = ring.base;
            let ring = &mut self.rings[index];
            if ring.dev.size != Some(size) {
                self.ops.set_num(ring_index, size)?;
                ring.dev.size = Some(size);
            }
            if ring.dev.guest != Some(guest) {
                self.ops.set_addr(ring_index, size, &guest)?;
                ring.dev.guest = Some(guest);
            }
            if ring.dev.base != Some(base) {
                self.ops.set_base(ring_index, base)?;
                ring.dev.base = Some(base);
            }
        }
        if !changed_only {
            self.sync_fds()?;
        }
        Ok(())
    }

    /// Kick, call and ready of every ring, where they differ.
    fn sync_fds(&mut self) -> Result<(), VdpaError> {
        for (index, ring) in self.rings.iter_mut().enumerate() {
            // index < the device's ring count, a u16.
            let index = index as u16;
            let same_call = match (&ring.dev.call, &ring.call) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same_call || !ring.dev.call_set {
                if ring.call.is_some() || ring.dev.call_set {
                    self.ops.set_call(index, ring.call.as_deref())?;
                }
                ring.dev.call = ring.call.clone();
                ring.dev.call_set = true;
            }
            if ring.kick.is_some() != ring.dev.kick {
                self.ops.set_kick(index, ring.kick.as_ref())?;
                ring.dev.kick = ring.kick.is_some();
            }
            let ready = ring.kick.is_some() && ring.enabled;
            if ring.dev.ready != Some(ready) && (ready || ring.dev.ready.is_some()) {
                self.ops.set_ready(index, ready)?;
                ring.dev.ready = Some(ready);
            }
        }
        Ok(())
    }

    /// IOTLB updates and invalidations for the regions that differ, in one
    /// batch where the device offers it. Refused if a started ring's memory
    /// would go.
    fn sync_memory(&mut self) -> Result<(), VdpaError> {
        let wanted = self.table.kernel_regions();
        let keep: Vec<bool> = self
            .mapped
            .iter()
            .map(|(region, _)| !self.remap_all && wanted.contains(region))
            .collect();
        let new: Vec<KernelRegion> = wanted
            .iter()
            .filter(|region| self.remap_all || !self.mapped.iter().any(|(held, _)| held == *region))
            .copied()
            .collect();
        if keep.iter().all(|k| *k) && new.is_empty() {
            return Ok(());
        }
        if self.phase != Phase::Reset {
            for (index, ring) in self.rings.iter().enumerate() {
                if let (Some(size), Some(guest), true) =
                    (ring.size, ring.guest, ring.kick.is_some())
                {
                    if self.table.ring_host(index as u16, size, &guest).is_err() {
                        return Err(VdpaError::RegionInUse { ring: index as u16 });
                    }
                }
            }
        }
        let batch = self.caps.has(backend::IOTLB_BATCH);
        if batch {
            self.ops.batch(true)?;
        }
        let result = self.apply_memory(&keep, &new);
        if batch {
            self.ops.batch(false)?;
        }
        result?;
        self.remap_all = false;
        Ok(())
    }

    fn apply_memory(&mut self, keep: &[bool], new: &[KernelRegion]) -> Result<(), VdpaError> {
        let old = std::mem::take(&mut self.mapped);
        for ((region, mapping), keep) in old.into_iter().zip(keep) {
            if *keep {
                self.mapped.push((region, mapping));
            } else {
                self.ops.unmap(region.guest_phys_addr, region.size)?;
            }
        }
        for region in new {
            let Some(mapping) = self.table.mapping(region.guest_phys_addr) else {
                continue;
            };
            self.ops
                .map(region.guest_phys_addr, region.size, region.host_addr)?;
            self.mapped.push((*region, mapping));
        }
        Ok(())
    }

    /// Stop ring `ring` (GET_VRING_BASE): suspend the device (or, without
    /// VHOST_VDPA_SUSPEND, reset it), read where the ring stands, unbind
    /// its kick, and scan its used ring one last time for the dirty log.
    /// Returns the next avail index and the kick, or `None` if the ring
    /// did not run.
    pub fn stop(&mut self, ring: u16) -> Result<Option<(u16, File)>, VdpaError> {
        if self.ring_mut(ring)?.kick.is_none() {
            return Ok(None);
        }
        if let Phase::DriverOk {
            features,
            suspended: false,
        } = self.phase
        {
            if self.caps.has(backend::SUSPEND) {
                self.ops.suspend()?;
                self.phase = Phase::DriverOk {
                    features,
                    suspended: true,
                };
            } else {
                self.stop_by_reset()?;
            }
        }
        let base = match self.phase {
            Phase::DriverOk { .. } => self.ops.get_base(ring)?,
            _ => self.ring_mut(ring)?.base,
        };
        self.scanner.final_scan(ring);
        let r = self.ring_mut(ring)?;
        r.base = base;
        let kick = r.kick.take();
        if r.dev.kick {
            r.dev.kick = false;
            self.ops.set_kick(ring, None)?;
        }
        if let Phase::DriverOk { .. } = self.phase {
            self.rings[usize::from(ring)].dev.base = Some(base);
        }
        self.publish_rings();
        Ok(kick.map(|kick| (base, kick)))
    }

    /// Without SUSPEND: reset the device (it does no more DMA once the
    /// reset returns), then take every started ring's base from its used
    /// index in guest memory.
    fn stop_by_reset(&mut self) -> Result<(), VdpaError> {
        log::info!(
            "{}: the device has no VHOST_VDPA_SUSPEND: reset to stop it; bases come from the used rings",
            self.name
        );
        self.device_reset()?;
        let memory = self.memory.memory();
        for ring in &mut self.rings {
            if let (Some(guest), true) = (ring.guest, ring.kick.is_some()) {
                let idx = guest
                    .used_ring
                    .checked_add(2)
                    .and_then(|at| memory.read_obj::<u16>(at).ok());
                if let Some(idx) = idx {
                    ring.base = u16::from_le(idx);
                }
            }
        }
        Ok(())
    }

    /// Hand the scanner the rings that run on the device.
    fn publish_rings(&mut self) {
        let running = matches!(self.phase, Phase::DriverOk { .. });
        let rings: Vec<Option<(u16, RingGuestAddresses)>> = self
            .rings
            .iter()
            .map(|r| match (running && r.kick.is_some(), r.size, r.guest) {
                (true, Some(size), Some(guest)) => Some((size, guest)),
                _ => None,
            })
            .collect();
        self.scanner.set_rings(&rings);
    }

    /// Log the device's writes into `log` from now on, or stop (`None`).
    pub fn set_log(&mut self, log: Option<Arc<LogRegion>>) -> Result<(), VdpaError> {
        self.scanner.set_log(log);
        Ok(())
    }
}
