//! The reference device: the executable specification of what each
//! [`ConfigOp`] means.
//!
//! [`ModelDevice`] holds, in plain values, every resource a real device
//! would hold (dataplane queues, mappings, open storage, I/O rings and
//! programmed RSS, MTU, offloads) next to the
//! values the front-end configured. [`ModelDevice::apply`] changes them the
//! way the real devices must, and refuses an op whose precondition does
//! not hold (creating a queue twice, a ring on a queue that does not exist,
//! RSS naming a missing queue, a ring address outside mapped memory,
//! reopening storage under live I/O rings), leaving the state unchanged.
//!
//! The planner is tested against it: for any early E and final F, a fresh
//! model given `plan_full(E)` and then `plan(E, F)` refuses nothing and
//! ends in a state equal (`==` on [`ModelState`]) to a fresh model given
//! `plan_full(F)`, and that state is exactly F ([`ModelDevice::config`]).
//! A net or blk device whose `apply` behaves like this one can therefore
//! trust the plan.

mod state;

pub use state::{
    ModelBlk, ModelError, ModelIoRing, ModelNet, ModelResources, ModelRing, ModelState,
    ModelStorage,
};

use std::collections::BTreeMap;

use crate::config::{
    BlkConfig, DeviceConfig, DeviceKind, DeviceType, FrontendAddr, GuestAddr, NetConfig, RegionKey,
    RingAddresses, RingConfig, FORMAT_VERSION,
};
use crate::op::{ConfigOp, NET_DATAPLANE_FEATURES};

/// The reference device (module documentation).
#[derive(Clone, Debug)]
pub struct ModelDevice {
    device_type: DeviceType,
    state: ModelState,
}

fn empty_state(device_type: DeviceType) -> ModelState {
    ModelState {
        protocol_features: None,
        features: None,
        memory: BTreeMap::new(),
        rings: BTreeMap::new(),
        resources: match device_type {
            DeviceType::Net => ModelResources::Net(ModelNet::default()),
            DeviceType::Blk => ModelResources::Blk(ModelBlk::default()),
        },
    }
}

/// The guest address of `addr` if exactly one mapping holds it.
fn translate_unique(
    memory: &BTreeMap<RegionKey, FrontendAddr>,
    addr: FrontendAddr,
) -> Option<GuestAddr> {
    let mut found = memory.iter().filter_map(|(key, user_addr)| {
        let offset = addr.0.checked_sub(user_addr.0)?;
        if offset >= key.size_bytes {
            return None;
        }
        key.guest_phys_addr.0.checked_add(offset).map(GuestAddr)
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

fn translate_ring(
    memory: &BTreeMap<RegionKey, FrontendAddr>,
    ring: u16,
    addresses: &RingAddresses,
) -> Result<[GuestAddr; 3], ModelError> {
    let mut out = [GuestAddr(0); 3];
    for (slot, (part, addr)) in out.iter_mut().zip(addresses.parts()) {
        *slot = translate_unique(memory, addr).ok_or(ModelError::Untranslatable {
            ring,
            part,
            addr,
        })?;
    }
    Ok(out)
}

impl ModelDevice {
    /// A device of this kind that was never configured.
    pub fn new(device_type: DeviceType) -> ModelDevice {
        ModelDevice {
            device_type,
            state: empty_state(device_type),
        }
    }

    /// The device's kind.
    pub fn device_type(&self) -> DeviceType {
        self.device_type
    }

    /// Everything the device holds, for comparison.
    pub fn state(&self) -> &ModelState {
        &self.state
    }

    /// Apply every op in order; stops at the first refusal and says which.
    pub fn apply_all<'a>(
        &mut self,
        ops: impl IntoIterator<Item = &'a ConfigOp>,
    ) -> Result<(), (usize, ModelError)> {
        for (position, op) in ops.into_iter().enumerate() {
            self.apply(op).map_err(|e| (position, e))?;
        }
        Ok(())
    }

    /// Apply one op. On refusal the state is unchanged.
    pub fn apply(&mut self, op: &ConfigOp) -> Result<(), ModelError> {
        let wrong_kind = ModelError::WrongKind {
            op: op.name(),
            device: self.device_type,
        };
        let state = &mut self.state;
        match op {
            ConfigOp::Reset => *state = empty_state(self.device_type),
            ConfigOp::SetProtocolFeatures { features } => state.protocol_features = Some(*features),
            ConfigOp::SetFeatures { features } => state.features = Some(*features),
            ConfigOp::UnmapRegion { region } => {
                state
                    .memory
                    .remove(region)
                    .ok_or(ModelError::NoSuchRegion {
                        guest_phys_addr: region.guest_phys_addr,
                    })?;
            }
            ConfigOp::MapRegion { region } => {
                let key = region.key();
                let start = key.guest_phys_addr.0;
                let conflict = ModelError::RegionConflict {
                    guest_phys_addr: key.guest_phys_addr,
                };
                let end = start
                    .checked_add(key.size_bytes)
                    .filter(|_| key.size_bytes > 0)
                    .ok_or(conflict.clone())?;
                let overlaps = state.memory.keys().any(|mapped| {
                    let mapped_start = mapped.guest_phys_addr.0;
                    let mapped_end = mapped_start.saturating_add(mapped.size_bytes);
                    start < mapped_end && mapped_start < end
                });
                if overlaps {
                    return Err(conflict);
                }
                state.memory.insert(key, region.user_addr);
            }
            ConfigOp::SetRegionUserAddr { region, user_addr } => {
                let slot = state
                    .memory
                    .get_mut(region)
                    .ok_or(ModelError::NoSuchRegion {
                        guest_phys_addr: region.guest_phys_addr,
                    })?;
                *slot = *user_addr;
            }
            ConfigOp::ResetRing { ring } => {
                state
                    .rings
                    .remove(ring)
                    .ok_or(ModelError::NoSuchRing { ring: *ring })?;
            }
            ConfigOp::SetRingSize { ring, size } => {
                if !has_queue_for(&state.resources, *ring) {
                    return Err(ModelError::RingWithoutQueue { ring: *ring });
                }
                state
                    .rings
                    .entry(*ring)
                    .or_insert(ModelRing {
                        size: *size,
                        addresses: None,
                        guest_addresses: None,
                        next_avail: 0,
                        enabled: false,
                        kick_fd: false,
                        call_fd: false,
                    })
                    .size = *size;
            }
            ConfigOp::SetRingAddresses { ring, addresses } => {
                let guest = translate_ring(&state.memory, *ring, addresses)?;
                let entry = ring_mut(state, *ring)?;
                entry.addresses = Some(*addresses);
                entry.guest_addresses = Some(guest);
            }
            ConfigOp::SetRingBase { ring, next_avail } => {
                ring_mut(state, *ring)?.next_avail = *next_avail
            }
            ConfigOp::SetRingKick { ring, fd_present } => {
                ring_mut(state, *ring)?.kick_fd = *fd_present
            }
            ConfigOp::SetRingCall { ring, fd_present } => {
                ring_mut(state, *ring)?.call_fd = *fd_present
            }
            ConfigOp::SetRingEnabled { ring, enabled } => {
                ring_mut(state, *ring)?.enabled = *enabled
            }
            net_op @ (ConfigOp::ConfigureOffloads { .. }
            | ConfigOp::CreateQueue { .. }
            | ConfigOp::ProgramRss { .. }
            | ConfigOp::DestroyQueue { .. }
            | ConfigOp::SetMtu { .. }
            | ConfigOp::SetMac { .. }) => match &mut state.resources {
                ModelResources::Net(net) => apply_net(net, net_op)?,
                ModelResources::Blk(_) => return Err(wrong_kind),
            },
            blk_op @ (ConfigOp::OpenStorage { .. }
            | ConfigOp::DestroyIoRing { .. }
            | ConfigOp::CreateIoRing { .. }
            | ConfigOp::SetWriteback { .. }) => match &mut state.resources {
                ModelResources::Blk(blk) => apply_blk(blk, blk_op)?,
                ModelResources::Net(_) => return Err(wrong_kind),
            },
        }
        Ok(())
    }

    /// The configuration this device realises, if it is a complete,
    /// consistent device: every value set, the resources matching the
    /// values (offloads match the features, queues are 0..n, every I/O
    /// ring has the device's depth,
    /// every ring has a queue behind it and guest addresses that are the
    /// translation of its front-end addresses through the current memory).
    /// `None` for anything half-built or stale.
    pub fn config(&self) -> Option<DeviceConfig> {
        let state = &self.state;
        let features = state.features?;
        let device = match &state.resources {
            ModelResources::Net(net) => {
                let queue_pairs =
                    contiguous_count(net.queues.iter().copied()).filter(|&pairs| pairs > 0)?;
                if net.offloads? != features & NET_DATAPLANE_FEATURES {
                    return None;
                }
                DeviceKind::Net(NetConfig {
                    mtu: net.mtu?,
                    mac: net.mac?,
                    queue_pairs,
                    rss: net.rss.clone(),
                })
            }
            ModelResources::Blk(blk) => {
                let storage = blk.storage?;
                let num_queues = contiguous_count(blk.io_rings.keys().copied())?;
                // No I/O rings: the depth means nothing (0, as normalized).
                let queue_size = blk.io_rings.values().next().map_or(0, |r| r.depth);
                let consistent = blk
                    .io_rings
                    .values()
                    .all(|io_ring| io_ring.depth == queue_size);
                if !consistent {
                    return None;
                }
                DeviceKind::Blk(BlkConfig {
                    num_queues,
                    queue_size,
                    readonly: storage.readonly,
                    direct: storage.direct,
                    writeback: blk.writeback?,
                })
            }
        };
        let mut rings = Vec::with_capacity(state.rings.len());
        for (&index, ring) in &state.rings {
            let addresses = ring.addresses?;
            let current = translate_ring(&state.memory, index, &addresses).ok()?;
            if ring.guest_addresses != Some(current) || !has_queue_for(&state.resources, index) {
                return None;
            }
            rings.push(RingConfig {
                index,
                size: ring.size,
                addresses,
                next_avail: ring.next_avail,
                enabled: ring.enabled,
                kick_fd: ring.kick_fd,
                call_fd: ring.call_fd,
            });
        }
        let memory = state
            .memory
            .iter()
            .map(|(key, &user_addr)| crate::config::MemoryRegion {
                file: key.file,
                file_offset: key.file_offset,
                size_bytes: key.size_bytes,
                guest_phys_addr: key.guest_phys_addr,
                user_addr,
            })
            .collect();
        Some(
            DeviceConfig {
                version: FORMAT_VERSION,
                acked_features: features,
                protocol_features: state.protocol_features?,
                memory,
                rings,
                device,
            }
            .normalized(),
        )
    }
}

/// n if `ids` (ascending) is exactly 0..n (n may be 0).
fn contiguous_count(ids: impl Iterator<Item = u16>) -> Option<u16> {
    let mut count: u16 = 0;
    for id in ids {
        if id != count {
            return None;
        }
        count = count.checked_add(1)?;
    }
    Some(count)
}

/// Whether the queue a ring belongs to exists: the net pair `ring / 2`, or
/// the blk queue `ring` with its I/O ring.
fn has_queue_for(resources: &ModelResources, ring: u16) -> bool {
    match resources {
        ModelResources::Net(net) => net.queues.contains(&(ring / 2)),
        ModelResources::Blk(blk) => blk.io_rings.contains_key(&ring),
    }
}

/// A configured ring with its queue behind it, for ops other than sizing.
fn ring_mut(state: &mut ModelState, ring: u16) -> Result<&mut ModelRing, ModelError> {
    if !has_queue_for(&state.resources, ring) {
        return Err(ModelError::RingWithoutQueue { ring });
    }
    state
        .rings
        .get_mut(&ring)
        .ok_or(ModelError::NoSuchRing { ring })
}

fn apply_net(net: &mut ModelNet, op: &ConfigOp) -> Result<(), ModelError> {
    match op {
        ConfigOp::ConfigureOffloads { features } => net.offloads = Some(*features),
        ConfigOp::CreateQueue { pair } => {
            let created = net.queues.insert(*pair);
            if !created {
                return Err(ModelError::QueueExists { pair: *pair });
            }
        }
        ConfigOp::ProgramRss { rss } => {
            if let Some(spec) = rss {
                let named = spec
                    .indirection_table
                    .iter()
                    .chain(std::iter::once(&spec.default_queue));
                for queue in named {
                    if !net.queues.contains(queue) {
                        return Err(ModelError::RssQueueMissing { queue: *queue });
                    }
                }
            }
            net.rss = rss.clone();
        }
        ConfigOp::DestroyQueue { pair } => {
            if let Some(spec) = &net.rss {
                if spec.default_queue == *pair || spec.indirection_table.contains(pair) {
                    return Err(ModelError::QueueInUse { pair: *pair });
                }
            }
            if !net.queues.remove(pair) {
                return Err(ModelError::NoSuchQueue { pair: *pair });
            }
        }
        ConfigOp::SetMtu { mtu } => net.mtu = Some(*mtu),
        ConfigOp::SetMac { mac } => net.mac = Some(*mac),
        // The caller dispatches only the net ops here.
        _ => {}
    }
    Ok(())
}

fn apply_blk(blk: &mut ModelBlk, op: &ConfigOp) -> Result<(), ModelError> {
    match op {
        ConfigOp::OpenStorage { readonly, direct } => {
            // I/O rings hold the storage file registered; reopening under
            // them would leave them on the old file.
            if !blk.io_rings.is_empty() {
                return Err(ModelError::StorageBusy {
                    io_rings: blk.io_rings.len(),
                });
            }
            blk.storage = Some(ModelStorage {
                readonly: *readonly,
                direct: *direct,
            });
        }
        ConfigOp::DestroyIoRing { queue } => {
            blk.io_rings
                .remove(queue)
                .ok_or(ModelError::NoSuchIoRing { queue: *queue })?;
        }
        ConfigOp::CreateIoRing { queue, depth } => {
            if blk.storage.is_none() {
                return Err(ModelError::NoStorage { queue: *queue });
            }
            if blk.io_rings.contains_key(queue) {
                return Err(ModelError::IoRingExists { queue: *queue });
            }
            blk.io_rings.insert(*queue, ModelIoRing { depth: *depth });
        }
        ConfigOp::SetWriteback { writeback } => blk.writeback = Some(*writeback),
        // The caller dispatches only the blk ops here.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileIdentity, MemoryRegion, RssSpec};

    fn region(guest: u64, user: u64) -> MemoryRegion {
        MemoryRegion {
            file: FileIdentity {
                device: 1,
                inode: 2,
            },
            file_offset: guest,
            size_bytes: 0x10000,
            guest_phys_addr: GuestAddr(guest),
            user_addr: FrontendAddr(user),
        }
    }

    fn addresses(base: u64) -> RingAddresses {
        RingAddresses {
            desc_table: FrontendAddr(base),
            avail_ring: FrontendAddr(base + 0x1000),
            used_ring: FrontendAddr(base + 0x2000),
        }
    }

    #[test]
    fn ring_ops_need_the_queue_behind_the_ring() {
        let mut device = ModelDevice::new(DeviceType::Net);
        assert_eq!(
            device.apply(&ConfigOp::SetRingSize { ring: 3, size: 256 }),
            Err(ModelError::RingWithoutQueue { ring: 3 })
        );
        device.apply(&ConfigOp::CreateQueue { pair: 1 }).unwrap();
        device
            .apply(&ConfigOp::SetRingSize { ring: 3, size: 256 })
            .unwrap();
        assert_eq!(
            device.apply(&ConfigOp::SetRingBase {
                ring: 2,
                next_avail: 1
            }),
            Err(ModelError::NoSuchRing { ring: 2 })
        );
    }

    #[test]
    fn ring_addresses_translate_through_current_memory() {
        let mut device = ModelDevice::new(DeviceType::Net);
        device.apply(&ConfigOp::CreateQueue { pair: 0 }).unwrap();
        device
            .apply(&ConfigOp::SetRingSize { ring: 0, size: 64 })
            .unwrap();
        let set = ConfigOp::SetRingAddresses {
            ring: 0,
            addresses: addresses(0x7000_0000),
        };
        assert!(matches!(
            device.apply(&set),
            Err(ModelError::Untranslatable { ring: 0, .. })
        ));
        device
            .apply(&ConfigOp::MapRegion {
                region: region(0x100000, 0x7000_0000),
            })
            .unwrap();
        device.apply(&set).unwrap();
        assert_eq!(
            device.state().rings[&0].guest_addresses,
            Some([
                GuestAddr(0x100000),
                GuestAddr(0x101000),
                GuestAddr(0x102000)
            ])
        );
    }

    #[test]
    fn overlapping_mapping_is_refused_and_state_kept() {
        let mut device = ModelDevice::new(DeviceType::Blk);
        device
            .apply(&ConfigOp::MapRegion {
                region: region(0, 0x1000_0000),
            })
            .unwrap();
        let before = device.state().clone();
        assert_eq!(
            device.apply(&ConfigOp::MapRegion {
                region: region(0x8000, 0x2000_0000)
            }),
            Err(ModelError::RegionConflict {
                guest_phys_addr: GuestAddr(0x8000)
            })
        );
        assert_eq!(device.state(), &before);
    }

    #[test]
    fn rss_must_name_existing_queues_and_pins_them() {
        let mut device = ModelDevice::new(DeviceType::Net);
        let rss = RssSpec {
            hash_types: 1,
            key: vec![1],
            indirection_table: vec![0, 1],
            default_queue: 0,
        };
        device.apply(&ConfigOp::CreateQueue { pair: 0 }).unwrap();
        assert_eq!(
            device.apply(&ConfigOp::ProgramRss {
                rss: Some(rss.clone())
            }),
            Err(ModelError::RssQueueMissing { queue: 1 })
        );
        device.apply(&ConfigOp::CreateQueue { pair: 1 }).unwrap();
        device
            .apply(&ConfigOp::ProgramRss { rss: Some(rss) })
            .unwrap();
        assert_eq!(
            device.apply(&ConfigOp::DestroyQueue { pair: 1 }),
            Err(ModelError::QueueInUse { pair: 1 })
        );
    }

    #[test]
    fn storage_cannot_be_reopened_under_io_rings() {
        let mut device = ModelDevice::new(DeviceType::Blk);
        assert_eq!(
            device.apply(&ConfigOp::CreateIoRing { queue: 0, depth: 8 }),
            Err(ModelError::NoStorage { queue: 0 })
        );
        let open = ConfigOp::OpenStorage {
            readonly: false,
            direct: true,
        };
        device.apply(&open).unwrap();
        device
            .apply(&ConfigOp::CreateIoRing { queue: 0, depth: 8 })
            .unwrap();
        assert_eq!(
            device.apply(&open),
            Err(ModelError::StorageBusy { io_rings: 1 })
        );
    }

    #[test]
    fn kind_specific_ops_are_refused_on_the_other_kind() {
        let mut blk = ModelDevice::new(DeviceType::Blk);
        assert_eq!(
            blk.apply(&ConfigOp::SetMtu { mtu: 1500 }),
            Err(ModelError::WrongKind {
                op: "set_mtu",
                device: DeviceType::Blk
            })
        );
        let mut net = ModelDevice::new(DeviceType::Net);
        assert!(matches!(
            net.apply(&ConfigOp::CreateIoRing {
                queue: 0,
                depth: 128
            }),
            Err(ModelError::WrongKind { .. })
        ));
    }

    #[test]
    fn a_half_built_device_has_no_config() {
        let mut device = ModelDevice::new(DeviceType::Net);
        assert_eq!(device.config(), None);
        device
            .apply_all(&[
                ConfigOp::SetProtocolFeatures { features: 0 },
                ConfigOp::SetFeatures { features: 1 },
                ConfigOp::CreateQueue { pair: 0 },
                ConfigOp::SetMtu { mtu: 1500 },
                ConfigOp::SetMac { mac: [2; 6] },
            ])
            .unwrap();
        assert_eq!(device.config(), None, "offloads never programmed");
        device
            .apply(&ConfigOp::ConfigureOffloads { features: 1 })
            .unwrap();
        assert!(device.config().is_some());
    }
}
