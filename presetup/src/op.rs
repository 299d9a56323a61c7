//! The operations a device applies, and which of them are expensive.
//!
//! A plan is a list of [`ConfigOp`]s. Each op is one step a device knows how
//! to take; what it means exactly is defined by [`crate::model::ModelDevice`],
//! the executable specification the devices follow.
//!
//! # Heavy and light
//!
//! An op is [`OpClass::Heavy`] when it creates, destroys or reprograms a
//! resource outside the agent's own bookkeeping: a dataplane queue, a
//! mapping of guest memory (mmap, pre-fault, pin or DMA map), the NIC's
//! steering or frame size, an open storage file, an I/O ring. These cost from microseconds (a tap ioctl) to tens of
//! milliseconds (a vDPA queue, the seed result's 191 ms `dev_conf`); which
//! dataplane charges what is the dataplane's business, the class is the
//! same for all of them so that a plan does not depend on the dataplane.
//!
//! An op is [`OpClass::Light`] when it only changes values the agent holds
//! and reads on the data path: ring size, addresses, base, eventfds,
//! enable, acked feature bits, the front-end's view of a mapping, the MAC
//! and the guest's cache mode. These are what a switchover should consist
//! of.
//!
//! Boundaries, and why:
//! * Acked features are split: [`ConfigOp::SetFeatures`] records the bits
//!   (light), [`ConfigOp::ConfigureOffloads`] reprograms a net dataplane's
//!   offloads and virtio-net header layout (heavy) and is planned only when
//!   the bits that matter to it ([`NET_DATAPLANE_FEATURES`]) change. So
//!   LOG_ALL, EVENT_IDX or PROTOCOL_FEATURES differing between early and
//!   final configuration stay light.
//! * A memory region is split the same way: the mapping, named by
//!   [`crate::RegionKey`] (file identity, offset, size, guest address), is
//!   heavy to make and to tear down ([`ConfigOp::MapRegion`],
//!   [`ConfigOp::UnmapRegion`]: munmap of a pre-faulted region and unpinning
//!   cost in proportion to its size); where the front-end has it in its own
//!   address space is a number for translating ring addresses
//!   ([`ConfigOp::SetRegionUserAddr`], light). A second QEMU process maps
//!   the same memory at other addresses.
//! * Ring addresses are light ([`ConfigOp::SetRingAddresses`]): translation
//!   through the memory table, no mapping.
//! * Ring size is light: the dataplane queue and the blk I/O ring are sized
//!   by the device (`queue_size`), not by the virtqueue.
//! * The MTU is heavy ([`ConfigOp::SetMtu`]): on hardware it is a device
//!   command, and the seed profile charges it. The MAC is light
//!   ([`ConfigOp::SetMac`]): a config-space value and the next RARP.
//! * Forgetting a ring ([`ConfigOp::ResetRing`]) is light; the queue behind
//!   it stays until [`ConfigOp::DestroyQueue`] / [`ConfigOp::DestroyIoRing`].
//! * [`ConfigOp::Reset`] (back to an empty device, the start of every
//!   fallback plan) is heavy: it tears down everything.

use serde::{Deserialize, Serialize};

use crate::config::{FrontendAddr, MemoryRegion, RegionKey, RingAddresses, RssSpec};

/// Virtio-net feature bits that change what a net dataplane does with a
/// frame: the header layout (VERSION_1 bit 32, MRG_RXBUF bit 15,
/// HASH_REPORT bit 57) and the offloads (CSUM 0, GUEST_CSUM 1, GUEST_TSO4 7,
/// GUEST_TSO6 8, GUEST_ECN 9, GUEST_UFO 10, HOST_TSO4 11, HOST_TSO6 12,
/// HOST_ECN 13, HOST_UFO 14, GUEST_USO4 54, GUEST_USO6 55, HOST_USO 56;
/// virtio 1.2 §5.1.3 and §5.1.6). A change in these bits is a
/// [`ConfigOp::ConfigureOffloads`]; any other feature change is only
/// recorded.
pub const NET_DATAPLANE_FEATURES: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 7)
    | (1 << 8)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 32)
    | (1 << 54)
    | (1 << 55)
    | (1 << 56)
    | (1 << 57);

/// How expensive an op is (module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpClass {
    /// Creates, destroys or reprograms a resource; kept off the
    /// switchover critical path when presetup works.
    Heavy,
    /// Changes a value the agent holds; what a switchover should be made of.
    Light,
}

/// One configuration step a device applies. What each step does, and what
/// must hold before it, is defined by [`crate::model::ModelDevice::apply`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigOp {
    /// Tear everything down: back to a device that was never configured.
    Reset,
    /// Record the acked protocol features.
    SetProtocolFeatures {
        /// The acked bits.
        features: u64,
    },
    /// Record the acked virtio features.
    SetFeatures {
        /// The acked bits.
        features: u64,
    },
    /// Net: program the dataplane's offloads and header layout.
    ConfigureOffloads {
        /// The acked features masked with [`NET_DATAPLANE_FEATURES`].
        features: u64,
    },
    /// Tear down a mapping of guest memory.
    UnmapRegion {
        /// Which mapping.
        region: RegionKey,
    },
    /// Map (and pre-fault) a region of guest memory.
    MapRegion {
        /// The region, with the front-end address it is known by.
        region: MemoryRegion,
    },
    /// Change the front-end address of a kept mapping (translation only).
    SetRegionUserAddr {
        /// Which mapping.
        region: RegionKey,
        /// Its new front-end address.
        user_addr: FrontendAddr,
    },
    /// Blk: open the storage with these options (no I/O ring may exist).
    OpenStorage {
        /// Open read-only.
        readonly: bool,
        /// Open with O_DIRECT.
        direct: bool,
    },
    /// Blk: tear down a queue's I/O ring.
    DestroyIoRing {
        /// The queue.
        queue: u16,
    },
    /// Blk: create a queue's I/O ring on the open storage.
    CreateIoRing {
        /// The queue.
        queue: u16,
        /// Its depth (the device's `queue_size`).
        depth: u16,
    },
    /// Net: create a dataplane queue (one per queue pair).
    CreateQueue {
        /// The queue pair.
        pair: u16,
    },
    /// Net: steer received frames with this RSS configuration, or by queue
    /// pair with `None`.
    ProgramRss {
        /// The steering.
        rss: Option<RssSpec>,
    },
    /// Net: destroy a dataplane queue (RSS must no longer name it).
    DestroyQueue {
        /// The queue pair.
        pair: u16,
    },
    /// Net: set the MTU on the dataplane.
    SetMtu {
        /// The MTU.
        mtu: u16,
    },
    /// Net: set the device MAC.
    SetMac {
        /// The MAC.
        mac: [u8; 6],
    },
    /// Blk: set the guest's cache mode.
    SetWriteback {
        /// Writeback (true) or writethrough.
        writeback: bool,
    },
    /// Forget a ring's configuration.
    ResetRing {
        /// Virtqueue index.
        ring: u16,
    },
    /// Set a ring's size; the first op for a ring not yet configured.
    SetRingSize {
        /// Virtqueue index.
        ring: u16,
        /// Descriptors.
        size: u16,
    },
    /// Set a ring's addresses, translated through the memory mapped now.
    SetRingAddresses {
        /// Virtqueue index.
        ring: u16,
        /// Front-end addresses.
        addresses: RingAddresses,
    },
    /// Set where a ring resumes.
    SetRingBase {
        /// Virtqueue index.
        ring: u16,
        /// Next available index.
        next_avail: u16,
    },
    /// Take the kick eventfd the final configuration came with.
    SetRingKick {
        /// Virtqueue index.
        ring: u16,
        /// Whether there is one.
        fd_present: bool,
    },
    /// Take the call eventfd the final configuration came with.
    SetRingCall {
        /// Virtqueue index.
        ring: u16,
        /// Whether there is one.
        fd_present: bool,
    },
    /// Enable or disable a ring.
    SetRingEnabled {
        /// Virtqueue index.
        ring: u16,
        /// Enabled.
        enabled: bool,
    },
}

impl ConfigOp {
    /// How expensive the op is (module documentation for the boundaries).
    pub fn class(&self) -> OpClass {
        match self {
            ConfigOp::Reset
            | ConfigOp::ConfigureOffloads { .. }
            | ConfigOp::UnmapRegion { .. }
            | ConfigOp::MapRegion { .. }
            | ConfigOp::OpenStorage { .. }
            | ConfigOp::DestroyIoRing { .. }
            | ConfigOp::CreateIoRing { .. }
            | ConfigOp::CreateQueue { .. }
            | ConfigOp::ProgramRss { .. }
            | ConfigOp::DestroyQueue { .. }
            | ConfigOp::SetMtu { .. } => OpClass::Heavy,
            ConfigOp::SetProtocolFeatures { .. }
            | ConfigOp::SetFeatures { .. }
            | ConfigOp::SetRegionUserAddr { .. }
            | ConfigOp::SetMac { .. }
            | ConfigOp::SetWriteback { .. }
            | ConfigOp::ResetRing { .. }
            | ConfigOp::SetRingSize { .. }
            | ConfigOp::SetRingAddresses { .. }
            | ConfigOp::SetRingBase { .. }
            | ConfigOp::SetRingKick { .. }
            | ConfigOp::SetRingCall { .. }
            | ConfigOp::SetRingEnabled { .. } => OpClass::Light,
        }
    }

    /// A short stable name (snake case, as in JSON), for logs and metric
    /// labels.
    pub fn name(&self) -> &'static str {
        match self {
            ConfigOp::Reset => "reset",
            ConfigOp::SetProtocolFeatures { .. } => "set_protocol_features",
            ConfigOp::SetFeatures { .. } => "set_features",
            ConfigOp::ConfigureOffloads { .. } => "configure_offloads",
            ConfigOp::UnmapRegion { .. } => "unmap_region",
            ConfigOp::MapRegion { .. } => "map_region",
            ConfigOp::SetRegionUserAddr { .. } => "set_region_user_addr",
            ConfigOp::OpenStorage { .. } => "open_storage",
            ConfigOp::DestroyIoRing { .. } => "destroy_io_ring",
            ConfigOp::CreateIoRing { .. } => "create_io_ring",
            ConfigOp::CreateQueue { .. } => "create_queue",
            ConfigOp::ProgramRss { .. } => "program_rss",
            ConfigOp::DestroyQueue { .. } => "destroy_queue",
            ConfigOp::SetMtu { .. } => "set_mtu",
            ConfigOp::SetMac { .. } => "set_mac",
            ConfigOp::SetWriteback { .. } => "set_writeback",
            ConfigOp::ResetRing { .. } => "reset_ring",
            ConfigOp::SetRingSize { .. } => "set_ring_size",
            ConfigOp::SetRingAddresses { .. } => "set_ring_addresses",
            ConfigOp::SetRingBase { .. } => "set_ring_base",
            ConfigOp::SetRingKick { .. } => "set_ring_kick",
            ConfigOp::SetRingCall { .. } => "set_ring_call",
            ConfigOp::SetRingEnabled { .. } => "set_ring_enabled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switchover_ops_are_light_and_resource_ops_heavy() {
        let light = [
            ConfigOp::SetRingBase {
                ring: 0,
                next_avail: 7,
            },
            ConfigOp::SetRingKick {
                ring: 0,
                fd_present: true,
            },
            ConfigOp::SetRingCall {
                ring: 0,
                fd_present: true,
            },
            ConfigOp::SetRingEnabled {
                ring: 0,
                enabled: true,
            },
            ConfigOp::SetFeatures { features: 1 << 26 },
        ];
        let heavy = [
            ConfigOp::CreateQueue { pair: 1 },
            ConfigOp::ProgramRss { rss: None },
            ConfigOp::SetMtu { mtu: 9000 },
            ConfigOp::CreateIoRing {
                queue: 0,
                depth: 128,
            },
            ConfigOp::Reset,
        ];
        assert!(light.iter().all(|op| op.class() == OpClass::Light));
        assert!(heavy.iter().all(|op| op.class() == OpClass::Heavy));
    }

    #[test]
    fn names_match_the_json_tags() {
        let op = ConfigOp::SetRingBase {
            ring: 3,
            next_avail: 9,
        };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(json, r#"{"set_ring_base":{"ring":3,"next_avail":9}}"#);
        assert!(json.contains(op.name()));
        let unit = serde_json::to_string(&ConfigOp::Reset).unwrap();
        assert_eq!(unit, format!("\"{}\"", ConfigOp::Reset.name()));
    }

    #[test]
    fn log_all_and_event_idx_are_not_dataplane_features() {
        assert_eq!(NET_DATAPLANE_FEATURES & (1 << 26), 0, "VHOST_F_LOG_ALL");
        assert_eq!(NET_DATAPLANE_FEATURES & (1 << 29), 0, "EVENT_IDX");
        assert_eq!(NET_DATAPLANE_FEATURES & (1 << 30), 0, "PROTOCOL_FEATURES");
    }
}
