//! From an early and a final configuration to the ops that turn a device
//! holding the first into a device holding the second.
//!
//! The plan touches only what differs, compared by meaning: memory by
//! mapping ([`crate::RegionKey`]), rings by values, ring addresses by the
//! guest addresses they translate to. It is ordered so that every op's
//! precondition in [`crate::model::ModelDevice`] holds:
//!
//! 1. acked protocol and virtio features, then offloads (net);
//! 2. MTU and MAC (net; QEMU sends NET_SET_MTU first too) or the cache mode
//!    (blk);
//! 3. rings the final configuration no longer has are forgotten;
//! 4. memory: unmap what went away before mapping what is new (a new region
//!    may take the guest addresses of an old one), then move the front-end
//!    addresses of kept mappings;
//! 5. queues. Net: create new pairs, program RSS (it may name them), then
//!    destroy pairs nothing names any more. Blk: destroy I/O rings that go
//!    (all of them if the storage is reopened or the depth changes), open
//!    the storage, create I/O rings;
//! 6. rings, ascending: size, addresses, base, kick, call, enable, each
//!    only if it differs, except kick and call, which are always taken
//!    from the final configuration: an eventfd is a handle of the process
//!    that sent it, and the early configuration's (none during in-band
//!    presetup, the source's own over the control API) are never the
//!    final ones.
//!
//! An early configuration that is malformed or for another kind of device
//! cannot be trusted to describe what the device holds, so [`plan`] then
//! returns a fallback: [`ConfigOp::Reset`] followed by the full plan, with
//! the [`FallbackReason`] for the caller to log and count.

use std::collections::{BTreeMap, HashMap};

use crate::config::{DeviceConfig, DeviceKind, DeviceType, FrontendAddr, RegionKey, RingConfig};
use crate::error::ConfigError;
use crate::op::{ConfigOp, OpClass, NET_DATAPLANE_FEATURES};
use crate::validate::ValidConfig;

/// Ops counted by class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounts {
    /// Heavy ops.
    pub heavy: usize,
    /// Light ops.
    pub light: usize,
}

impl ClassCounts {
    fn add(&mut self, class: OpClass) {
        match class {
            OpClass::Heavy => self.heavy += 1,
            OpClass::Light => self.light += 1,
        }
    }

    /// The count for one class.
    pub fn get(&self, class: OpClass) -> usize {
        match class {
            OpClass::Heavy => self.heavy,
            OpClass::Light => self.light,
        }
    }
}

/// Why an early configuration was not used. The device is still built
/// right (from scratch); the reason is for one `warn` line and a metric.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FallbackReason {
    /// The early configuration failed validation.
    #[error("early configuration is malformed")]
    Malformed(#[source] ConfigError),
    /// The early configuration is for another kind of device.
    #[error("early configuration is for a {early} device, the device is {device}")]
    DeviceKindMismatch {
        /// The early configuration's kind.
        early: DeviceType,
        /// The device's (and final configuration's) kind.
        device: DeviceType,
    },
}

impl FallbackReason {
    /// A short stable name for a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            FallbackReason::Malformed(_) => "malformed",
            FallbackReason::DeviceKindMismatch { .. } => "device_kind",
        }
    }
}

/// The ops to apply, in order, with their counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The ops, in the order they must be applied.
    pub ops: Vec<ConfigOp>,
    /// The ops in `ops`, by class.
    pub applied: ClassCounts,
    /// Ops a full configuration would have applied that this plan does
    /// not, by class: the work presetup saved.
    pub skipped: ClassCounts,
    /// Those ops, in the full plan's order.
    pub skipped_ops: Vec<ConfigOp>,
    /// Set when the early configuration was not used.
    pub fallback: Option<FallbackReason>,
}

impl Plan {
    fn new(
        ops: Vec<ConfigOp>,
        full: Option<&[ConfigOp]>,
        fallback: Option<FallbackReason>,
    ) -> Plan {
        let mut applied = ClassCounts::default();
        for op in &ops {
            applied.add(op.class());
        }
        let mut skipped = ClassCounts::default();
        let mut skipped_ops = Vec::new();
        if let Some(full) = full {
            // Multiset difference: each op of the full plan is matched by
            // at most one equal op of this plan.
            let mut present: HashMap<&ConfigOp, usize> = HashMap::new();
            for op in &ops {
                *present.entry(op).or_default() += 1;
            }
            for op in full {
                match present.get_mut(op) {
                    Some(count) if *count > 0 => *count -= 1,
                    _ => {
                        skipped.add(op.class());
                        skipped_ops.push(op.clone());
                    }
                }
            }
        }
        Plan {
            ops,
            applied,
            skipped,
            skipped_ops,
            fallback,
        }
    }

    /// The ops of one class, in order.
    pub fn ops_of(&self, class: OpClass) -> impl Iterator<Item = &ConfigOp> {
        self.ops.iter().filter(move |op| op.class() == class)
    }
}

/// The plan that configures a device that was never configured (fresh
/// after start or a reset) as `final_` says.
pub fn plan_full(final_: &ValidConfig) -> Plan {
    Plan::new(diff(None, final_), None, None)
}

/// The plan that turns a device configured as `early` (by
/// `plan_full(early)`) into one configured as `final_`. `early` must
/// describe what the device really applied: an early configuration
/// received without fds (control API) cannot have had its memory mapped,
/// so the caller passes what it actually holds. A malformed `early`, or one
/// for another kind of device, gives a fallback plan instead.
pub fn plan(early: &DeviceConfig, final_: &ValidConfig) -> Plan {
    let reason = match early.validate() {
        Err(e) => Some(FallbackReason::Malformed(e)),
        Ok(()) if early.device_type() != final_.device_type() => {
            Some(FallbackReason::DeviceKindMismatch {
                early: early.device_type(),
                device: final_.device_type(),
            })
        }
        Ok(()) => None,
    };
    let full = diff(None, final_);
    match reason {
        Some(reason) => {
            let mut ops = Vec::with_capacity(full.len() + 1);
            ops.push(ConfigOp::Reset);
            ops.extend(full);
            Plan::new(ops, None, Some(reason))
        }
        None => Plan::new(diff(Some(early), final_), Some(&full), None),
    }
}

/// The ops of [`plan`] from `early` to `final_`, without the accounting:
/// no full plan to compare with, no skipped ops, no fallback. For a caller
/// that plans again and again from what it knows the device holds (a
/// device's session between messages of one start), where `plan`'s
/// comparison with a full configuration would be repeated work. `early`
/// must be a configuration that validated (the caller's own earlier
/// target); the result is then exactly `plan(early, final_).ops`.
pub fn plan_delta(early: &DeviceConfig, final_: &ValidConfig) -> Vec<ConfigOp> {
    diff(Some(early), final_)
}

fn memory_map(config: &DeviceConfig) -> BTreeMap<RegionKey, FrontendAddr> {
    config
        .memory
        .iter()
        .map(|region| (region.key(), region.user_addr))
        .collect()
}

fn sorted_rings(config: &DeviceConfig) -> Vec<&RingConfig> {
    let mut rings: Vec<&RingConfig> = config.rings.iter().collect();
    rings.sort_by_key(|ring| ring.index);
    rings
}

/// The ops from `early` (`None`: a fresh device) to `final_`. Both valid
/// and of the same kind.
fn diff(early: Option<&DeviceConfig>, final_: &DeviceConfig) -> Vec<ConfigOp> {
    let mut ops = Vec::new();
    // 1. Features.
    if early.map(|e| e.protocol_features) != Some(final_.protocol_features) {
        ops.push(ConfigOp::SetProtocolFeatures {
            features: final_.protocol_features,
        });
    }
    if early.map(|e| e.acked_features) != Some(final_.acked_features) {
        ops.push(ConfigOp::SetFeatures {
            features: final_.acked_features,
        });
    }
    if let DeviceKind::Net(_) = final_.device {
        let offloads = final_.acked_features & NET_DATAPLANE_FEATURES;
        if early.map(|e| e.acked_features & NET_DATAPLANE_FEATURES) != Some(offloads) {
            ops.push(ConfigOp::ConfigureOffloads { features: offloads });
        }
    }
    // 2. Device values.
    match (&final_.device, early.map(|e| &e.device)) {
        (DeviceKind::Net(net), early_device) => {
            let early_net = match early_device {
                Some(DeviceKind::Net(early_net)) => Some(early_net),
                _ => None,
            };
            if early_net.map(|e| e.mtu) != Some(net.mtu) {
                ops.push(ConfigOp::SetMtu { mtu: net.mtu });
            }
            if early_net.map(|e| e.mac) != Some(net.mac) {
                ops.push(ConfigOp::SetMac { mac: net.mac });
            }
        }
        (DeviceKind::Blk(blk), early_device) => {
            let early_writeback = match early_device {
                Some(DeviceKind::Blk(early_blk)) => Some(early_blk.writeback),
                _ => None,
            };
            if early_writeback != Some(blk.writeback) {
                ops.push(ConfigOp::SetWriteback {
                    writeback: blk.writeback,
                });
            }
        }
    }
    // 3. Rings that go.
    if let Some(early) = early {
        for ring in sorted_rings(early) {
            if final_.ring(ring.index).is_none() {
                ops.push(ConfigOp::ResetRing { ring: ring.index });
            }
        }
    }
    // 4. Memory.
    let early_memory = early.map(memory_map).unwrap_or_default();
    let final_memory = memory_map(final_);
    for key in early_memory.keys() {
        if !final_memory.contains_key(key) {
            ops.push(ConfigOp::UnmapRegion { region: *key });
        }
    }
    let mut sorted_final = final_.memory.clone();
    sorted_final.sort();
    for region in &sorted_final {
        match early_memory.get(&region.key()) {
            None => ops.push(ConfigOp::MapRegion { region: *region }),
            Some(user_addr) if *user_addr != region.user_addr => {
                ops.push(ConfigOp::SetRegionUserAddr {
                    region: region.key(),
                    user_addr: region.user_addr,
                })
            }
            Some(_) => {}
        }
    }
    // 5. Queues.
    match &final_.device {
        DeviceKind::Net(net) => {
            let (early_pairs, early_rss) = match early.map(|e| &e.device) {
                Some(DeviceKind::Net(early_net)) => (early_net.queue_pairs, early_net.rss.as_ref()),
                _ => (0, None),
            };
            for pair in early_pairs..net.queue_pairs {
                ops.push(ConfigOp::CreateQueue { pair });
            }
            if early_rss != net.rss.as_ref() {
                ops.push(ConfigOp::ProgramRss {
                    rss: net.rss.clone(),
                });
            }
            for pair in net.queue_pairs..early_pairs {
                ops.push(ConfigOp::DestroyQueue { pair });
            }
        }
        DeviceKind::Blk(blk) => {
            let early_blk = match early.map(|e| &e.device) {
                Some(DeviceKind::Blk(early_blk)) => Some(early_blk),
                _ => None,
            };
            let early_queues = early_blk.map_or(0, |e| e.num_queues);
            let storage_changed =
                early_blk.map(|e| (e.readonly, e.direct)) != Some((blk.readonly, blk.direct));
            let depth_changed = early_blk.map(|e| e.queue_size) != Some(blk.queue_size);
            // I/O rings that survive: none if they must be rebuilt.
            let kept = if storage_changed || depth_changed {
                0
            } else {
                early_queues.min(blk.num_queues)
            };
            for queue in kept..early_queues {
                ops.push(ConfigOp::DestroyIoRing { queue });
            }
            if storage_changed {
                ops.push(ConfigOp::OpenStorage {
                    readonly: blk.readonly,
                    direct: blk.direct,
                });
            }
            for queue in kept..blk.num_queues {
                ops.push(ConfigOp::CreateIoRing {
                    queue,
                    depth: blk.queue_size,
                });
            }
        }
    }
    // 6. Rings.
    for ring in sorted_rings(final_) {
        ring_ops(&mut ops, early, final_, ring);
    }
    ops
}

fn ring_ops(
    ops: &mut Vec<ConfigOp>,
    early: Option<&DeviceConfig>,
    final_: &DeviceConfig,
    ring: &RingConfig,
) {
    let index = ring.index;
    let before = early.and_then(|e| e.ring(index).map(|r| (e, r)));
    if before.map(|(_, r)| r.size) != Some(ring.size) {
        ops.push(ConfigOp::SetRingSize {
            ring: index,
            size: ring.size,
        });
    }
    // The device uses guest addresses: the same front-end addresses under a
    // moved memory table (a region with a new front-end address, or one
    // remapped elsewhere) need translating again.
    let translated_same = before.is_some_and(|(early, early_ring)| {
        early_ring.addresses == ring.addresses
            && ring.addresses.parts().iter().all(|&(_, addr)| {
                early.translate(addr).is_some() && early.translate(addr) == final_.translate(addr)
            })
    });
    if !translated_same {
        ops.push(ConfigOp::SetRingAddresses {
            ring: index,
            addresses: ring.addresses,
        });
    }
    if before.map(|(_, r)| r.next_avail) != Some(ring.next_avail) {
        ops.push(ConfigOp::SetRingBase {
            ring: index,
            next_avail: ring.next_avail,
        });
    }
    ops.push(ConfigOp::SetRingKick {
        ring: index,
        fd_present: ring.kick_fd,
    });
    ops.push(ConfigOp::SetRingCall {
        ring: index,
        fd_present: ring.call_fd,
    });
    if before.map(|(_, r)| r.enabled) != Some(ring.enabled) {
        ops.push(ConfigOp::SetRingEnabled {
            ring: index,
            enabled: ring.enabled,
        });
    }
}
