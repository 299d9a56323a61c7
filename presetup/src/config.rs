//! The device configuration model: what a front-end has told a device, in
//! terms that mean the same thing in two processes (file identities and
//! addresses, never fd numbers), so that an early configuration can be
//! compared with the final one.
//!
//! The JSON form of [`DeviceConfig`] is what `query-config` returns and
//! `presetup` takes; [`FORMAT_VERSION`] names its layout.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;

/// Version of the JSON layout of [`DeviceConfig`]. A reader refuses other
/// versions rather than guess at them: a misread early configuration would
/// only cost a fallback, but a silently misread one could build a wrong
/// device.
pub const FORMAT_VERSION: u32 = 1;

/// A guest physical address. A distinct type so that a front-end address
/// can never be used where a guest address is meant, the confusion that
/// ring address translation exists to resolve.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct GuestAddr(pub u64);

/// An address in the front-end's (QEMU's) virtual address space, as
/// SET_VRING_ADDR and the memory table's `userspace_addr` carry it. It only
/// means something together with the memory table that maps it to guest
/// addresses, and it differs between two QEMU processes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct FrontendAddr(pub u64);

impl fmt::Display for GuestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Which file backs a memory region, as `fstat` names it. Compared instead
/// of fd numbers, which differ between messages even for the same memory.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    /// `st_dev` of the backing file.
    pub device: u64,
    /// `st_ino` of the backing file.
    pub inode: u64,
}

/// What a mapping of guest memory is, independent of where the front-end
/// happens to have it in its own address space: two regions with the same
/// key are the same mapping, so an existing (pre-faulted) mapping can be
/// kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionKey {
    /// The backing file.
    pub file: FileIdentity,
    /// Where in the file the region starts (`mmap_offset`).
    pub file_offset: u64,
    /// Length of the region.
    pub size_bytes: u64,
    /// Where the guest sees the region.
    pub guest_phys_addr: GuestAddr,
}

/// One region of guest memory (SET_MEM_TABLE entry or ADD_MEM_REG).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegion {
    /// The backing file.
    pub file: FileIdentity,
    /// Where in the file the region starts (`mmap_offset`).
    pub file_offset: u64,
    /// Length of the region.
    pub size_bytes: u64,
    /// Where the guest sees the region.
    pub guest_phys_addr: GuestAddr,
    /// Where the front-end has it mapped (`userspace_addr`): the base for
    /// translating ring addresses.
    pub user_addr: FrontendAddr,
}

impl MemoryRegion {
    /// The part of the region that identifies the mapping.
    pub fn key(&self) -> RegionKey {
        RegionKey {
            file: self.file,
            file_offset: self.file_offset,
            size_bytes: self.size_bytes,
            guest_phys_addr: self.guest_phys_addr,
        }
    }

    /// The guest address of front-end address `addr`, if the region holds it.
    pub fn translate(&self, addr: FrontendAddr) -> Option<GuestAddr> {
        let offset = addr.0.checked_sub(self.user_addr.0)?;
        if offset >= self.size_bytes {
            return None;
        }
        self.guest_phys_addr.0.checked_add(offset).map(GuestAddr)
    }
}

/// The three addresses of a split ring, as SET_VRING_ADDR gives them: in the
/// front-end's address space, so they need the memory table to mean
/// anything.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct RingAddresses {
    /// The descriptor table.
    pub desc_table: FrontendAddr,
    /// The available (driver) ring.
    pub avail_ring: FrontendAddr,
    /// The used (device) ring.
    pub used_ring: FrontendAddr,
}

/// Which part of a ring an address belongs to, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingPart {
    /// The descriptor table.
    DescTable,
    /// The available ring.
    AvailRing,
    /// The used ring.
    UsedRing,
}

impl fmt::Display for RingPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RingPart::DescTable => "descriptor table",
            RingPart::AvailRing => "avail ring",
            RingPart::UsedRing => "used ring",
        })
    }
}

impl RingAddresses {
    /// The addresses with the part each belongs to.
    pub fn parts(&self) -> [(RingPart, FrontendAddr); 3] {
        [
            (RingPart::DescTable, self.desc_table),
            (RingPart::AvailRing, self.avail_ring),
            (RingPart::UsedRing, self.used_ring),
        ]
    }
}

/// One virtqueue as the front-end configured it (SET_VRING_NUM, _ADDR,
/// _BASE, _KICK, _CALL, _ENABLE). A ring appears in a [`DeviceConfig`] only
/// once it has a size and addresses; rings the front-end never set up are
/// absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingConfig {
    /// Virtqueue index (net: 2 × pair for RX, 2 × pair + 1 for TX).
    pub index: u16,
    /// Number of descriptors (SET_VRING_NUM).
    pub size: u16,
    /// Ring addresses (SET_VRING_ADDR).
    pub addresses: RingAddresses,
    /// Next available index the device will read (SET_VRING_BASE, or
    /// where the ring stopped).
    pub next_avail: u16,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
    /// Whether a kick eventfd was attached (false for none or the no-fd
    /// form). Only presence is recorded: fd numbers mean nothing elsewhere.
    pub kick_fd: bool,
    /// Whether a call eventfd was attached; see `kick_fd`.
    pub call_fd: bool,
}

/// RSS steering for a net device, mirroring `netdev::rss::RssConfig`
/// field for field (the agent converts), so that this crate stays
/// independent of the device crates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RssSpec {
    /// `VIRTIO_NET_RSS_HASH_TYPE_*` bits.
    pub hash_types: u32,
    /// The Toeplitz key.
    pub key: Vec<u8>,
    /// RX queue (pair) numbers; the length is a power of two.
    pub indirection_table: Vec<u16>,
    /// The queue for frames with no hash.
    pub default_queue: u16,
}

/// The net-specific part of a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// MTU in force (NET_SET_MTU or the device's own).
    pub mtu: u16,
    /// The device MAC (config space or the last SEND_RARP).
    pub mac: [u8; 6],
    /// Dataplane queue pairs the device runs.
    pub queue_pairs: u16,
    /// RSS steering; `None` steers by queue pair.
    pub rss: Option<RssSpec>,
}

/// The block-specific part of a configuration: the queues and the options
/// that change how storage is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkConfig {
    /// Request queues, each with an I/O ring of its own.
    pub num_queues: u16,
    /// Largest virtqueue size; the depth of each per-queue I/O ring.
    pub queue_size: u16,
    /// Storage opened read-only (VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// Storage opened with O_DIRECT.
    pub direct: bool,
    /// The guest's cache mode (config `writeback`, written by the guest
    /// with CONFIG_WCE); lives only in the back-end, so it must travel.
    pub writeback: bool,
}

/// What kind of device a configuration is for, with its kind-specific part.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-net.
    Net(NetConfig),
    /// virtio-blk.
    Blk(BlkConfig),
}

/// The kind of a device without its configuration, for comparing kinds and
/// naming them in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceType {
    /// virtio-net.
    Net,
    /// virtio-blk.
    Blk,
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceType::Net => "net",
            DeviceType::Blk => "blk",
        })
    }
}

impl DeviceKind {
    /// Which kind this is.
    pub fn device_type(&self) -> DeviceType {
        match self {
            DeviceKind::Net(_) => DeviceType::Net,
            DeviceKind::Blk(_) => DeviceType::Blk,
        }
    }

    /// How many virtqueues the device has: two per net queue pair, one per
    /// blk queue. Ring indices must be below it.
    pub fn ring_count(&self) -> u32 {
        match self {
            DeviceKind::Net(net) => 2 * u32::from(net.queue_pairs),
            DeviceKind::Blk(blk) => u32::from(blk.num_queues),
        }
    }
}

/// Everything a device needs to know to run, as the front-end left it: the
/// unit of presetup. The early configuration (learnt during migration
/// setup) and the final one (at switchover) are both `DeviceConfig`s, and
/// [`crate::plan`] turns the pair into the work to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// [`FORMAT_VERSION`] of the layout.
    pub version: u32,
    /// Virtio features the front-end acked (SET_FEATURES).
    pub acked_features: u64,
    /// vhost-user protocol features acked (SET_PROTOCOL_FEATURES).
    pub protocol_features: u64,
    /// Guest memory, in any order.
    pub memory: Vec<MemoryRegion>,
    /// Configured rings, in any order, each index at most once.
    pub rings: Vec<RingConfig>,
    /// The kind-specific part.
    pub device: DeviceKind,
}

impl DeviceConfig {
    /// Read a configuration from JSON. The version is checked before the
    /// rest, so a newer layout is reported as such rather than as whatever
    /// field it added. The result is not validated; see
    /// [`crate::ValidConfig`].
    pub fn from_json(text: &str) -> Result<DeviceConfig, DecodeError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let probe: VersionOnly =
            serde_json::from_str(text).map_err(|source| DecodeError::Json { source })?;
        if probe.version != FORMAT_VERSION {
            return Err(DecodeError::Version {
                found: probe.version,
            });
        }
        serde_json::from_str(text).map_err(|source| DecodeError::Json { source })
    }

    /// The configuration as JSON.
    pub fn to_json(&self) -> String {
        // Serialising plain structs of integers, booleans and vectors into a
        // String cannot fail (no maps with non-string keys, no I/O).
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Which kind of device this configuration is for.
    pub fn device_type(&self) -> DeviceType {
        self.device.device_type()
    }

    /// The ring with virtqueue index `index`, if configured.
    pub fn ring(&self, index: u16) -> Option<&RingConfig> {
        self.rings.iter().find(|ring| ring.index == index)
    }

    /// The guest address of front-end address `addr` under this memory
    /// table (the first region that holds it; a valid configuration has at
    /// most one).
    pub fn translate(&self, addr: FrontendAddr) -> Option<GuestAddr> {
        self.memory.iter().find_map(|region| region.translate(addr))
    }

    /// The same configuration with regions sorted by guest address, rings
    /// by index, and the depth of a disk without queues zeroed (it means
    /// nothing then), so that two configurations that mean the same can be
    /// compared with `==`.
    pub fn normalized(&self) -> DeviceConfig {
        let mut config = self.clone();
        config.memory.sort();
        config.rings.sort_by_key(|ring| ring.index);
        if let DeviceKind::Blk(blk) = &mut config.device {
            if blk.num_queues == 0 {
                blk.queue_size = 0;
            }
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceConfig {
        DeviceConfig {
            version: FORMAT_VERSION,
            acked_features: 1 << 32,
            protocol_features: 0,
            memory: vec![MemoryRegion {
                file: FileIdentity {
                    device: 24,
                    inode: 9001,
                },
                file_offset: 0,
                size_bytes: 0x10000,
                guest_phys_addr: GuestAddr(0),
                user_addr: FrontendAddr(0x7f00_0000_0000),
            }],
            rings: vec![],
            device: DeviceKind::Blk(BlkConfig {
                num_queues: 1,
                queue_size: 256,
                readonly: false,
                direct: true,
                writeback: true,
            }),
        }
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let config = sample();
        let text = config.to_json();
        assert!(text.contains("\"blk\""), "{text}");
        assert_eq!(DeviceConfig::from_json(&text).unwrap(), config);
    }

    #[test]
    fn newer_format_version_is_named_not_misread() {
        let text = sample()
            .to_json()
            .replace("\"version\":1", "\"version\":2")
            .replace("\"rings\":[]", "\"rings\":[],\"added_in_v2\":true");
        assert!(matches!(
            DeviceConfig::from_json(&text),
            Err(DecodeError::Version { found: 2 })
        ));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = sample()
            .to_json()
            .replace("\"rings\":[]", "\"rings\":[],\"surprise\":0");
        assert!(matches!(
            DeviceConfig::from_json(&text),
            Err(DecodeError::Json { .. })
        ));
    }

    #[test]
    fn translation_is_by_front_end_offset_and_stops_at_the_region_end() {
        let region = sample().memory[0];
        assert_eq!(
            region.translate(FrontendAddr(0x7f00_0000_0010)),
            Some(GuestAddr(0x10))
        );
        assert_eq!(region.translate(FrontendAddr(0x7f00_0001_0000)), None);
        assert_eq!(region.translate(FrontendAddr(0x10)), None);
    }
}
