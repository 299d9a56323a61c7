//! Which configurations make sense, and [`ValidConfig`], the proof that one
//! was checked. The planner relies on these rules (unique ring indices,
//! non-overlapping memory, ring addresses inside memory, RSS naming only
//! existing queues), so it only takes a final configuration that passed
//! them, and falls back when an early one does not.

use std::ops::Deref;

use serde::{Deserialize, Serialize};

use crate::config::{DeviceConfig, DeviceKind, GuestAddr, NetConfig, RssSpec, FORMAT_VERSION};
use crate::error::{AddressSpace, ConfigError, LoadError};

/// Most memory regions a configuration may have: QEMU's vhost-user limit
/// (`VHOST_USER_MAX_RAM_SLOTS`). The agent's own slot limit may be lower
/// and is enforced where regions are mapped.
pub const MAX_MEMORY_REGIONS: usize = 512;

/// Most virtqueues a device may have: vhost-user addresses a ring in
/// SET_VRING_KICK/CALL with 8 bits.
pub const MAX_RINGS: u32 = 256;

/// Most net queue pairs (`max_virtqueue_pairs` range, netdev's limit).
pub const MAX_QUEUE_PAIRS: u16 = 127;

/// Largest split ring (virtio 1.2 §2.7: 32768 entries).
pub const MAX_RING_SIZE: u16 = 32768;

/// Smallest MTU a virtio-net device may use (virtio 1.2 §5.1.4.1).
pub const MIN_MTU: u16 = 68;

/// Longest Toeplitz key (`rss_max_key_size` of 40 bytes).
pub const MAX_RSS_KEY_LEN: usize = 40;

/// Longest RSS indirection table (QEMU's `rss_max_indirection_table_length`).
pub const MAX_RSS_TABLE_LEN: usize = 128;

/// Every `VIRTIO_NET_RSS_HASH_TYPE_*` bit the spec defines.
pub const RSS_HASH_TYPES: u32 = 0x1ff;

impl DeviceConfig {
    /// Check the configuration against the rules the planner and the
    /// devices rely on. The first problem found is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != FORMAT_VERSION {
            return Err(ConfigError::Version {
                found: self.version,
            });
        }
        validate_memory(self)?;
        match &self.device {
            DeviceKind::Net(net) => validate_net(net)?,
            DeviceKind::Blk(blk) => {
                // Zero queues is a disk whose storage is open and whose
                // queues are not set up yet: what an agent holds before a
                // start, and the base it plans a start from.
                if u32::from(blk.num_queues) > MAX_RINGS {
                    return Err(ConfigError::BlkQueues {
                        num_queues: blk.num_queues,
                    });
                }
                // Without queues the depth means nothing (see normalized()).
                if blk.num_queues > 0 && !valid_ring_size(blk.queue_size, MAX_RING_SIZE) {
                    return Err(ConfigError::BlkQueueSize {
                        queue_size: blk.queue_size,
                    });
                }
            }
        }
        validate_rings(self)
    }
}

fn valid_ring_size(size: u16, max: u16) -> bool {
    size.is_power_of_two() && size <= max
}

fn validate_memory(config: &DeviceConfig) -> Result<(), ConfigError> {
    let regions = &config.memory;
    if regions.len() > MAX_MEMORY_REGIONS {
        return Err(ConfigError::TooManyRegions {
            count: regions.len(),
        });
    }
    // Half-open ranges [start, end) in each address space, with the region's
    // guest address to name it.
    let mut guest = Vec::with_capacity(regions.len());
    let mut frontend = Vec::with_capacity(regions.len());
    for (position, region) in regions.iter().enumerate() {
        let size = region.size_bytes;
        let guest_end = region.guest_phys_addr.0.checked_add(size);
        let user_end = region.user_addr.0.checked_add(size);
        let file_end = region.file_offset.checked_add(size);
        match (size, guest_end, user_end, file_end) {
            (1.., Some(guest_end), Some(user_end), Some(_)) => {
                guest.push((region.guest_phys_addr.0, guest_end, region.guest_phys_addr));
                frontend.push((region.user_addr.0, user_end, region.guest_phys_addr));
            }
            _ => {
                return Err(ConfigError::RegionRange {
                    position,
                    guest_phys_addr: region.guest_phys_addr,
                    size_bytes: size,
                })
            }
        }
    }
    check_disjoint(guest, AddressSpace::Guest)?;
    check_disjoint(frontend, AddressSpace::Frontend)
}

/// Sorted by start, ranges are disjoint when each starts at or after the
/// end of the one before.
fn check_disjoint(
    mut ranges: Vec<(u64, u64, GuestAddr)>,
    space: AddressSpace,
) -> Result<(), ConfigError> {
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if let [(_, end, first), (start, _, second)] = pair {
            if start < end {
                return Err(ConfigError::RegionsOverlap {
                    first: *first,
                    second: *second,
                    space,
                });
            }
        }
    }
    Ok(())
}

fn validate_net(net: &NetConfig) -> Result<(), ConfigError> {
    if net.queue_pairs == 0 || net.queue_pairs > MAX_QUEUE_PAIRS {
        return Err(ConfigError::QueuePairs {
            queue_pairs: net.queue_pairs,
        });
    }
    if net.mtu < MIN_MTU {
        return Err(ConfigError::Mtu { mtu: net.mtu });
    }
    if let Some(rss) = &net.rss {
        validate_rss(rss, net.queue_pairs)?;
    }
    Ok(())
}

fn validate_rss(rss: &RssSpec, queue_pairs: u16) -> Result<(), ConfigError> {
    if rss.hash_types & !RSS_HASH_TYPES != 0 {
        return Err(ConfigError::RssHashTypes {
            bits: rss.hash_types,
        });
    }
    if rss.key.is_empty() || rss.key.len() > MAX_RSS_KEY_LEN {
        return Err(ConfigError::RssKeyLength { len: rss.key.len() });
    }
    let len = rss.indirection_table.len();
    if !len.is_power_of_two() || len > MAX_RSS_TABLE_LEN {
        return Err(ConfigError::RssTableLength { len });
    }
    if let Some((position, &queue)) = rss
        .indirection_table
        .iter()
        .enumerate()
        .find(|(_, &queue)| queue >= queue_pairs)
    {
        return Err(ConfigError::RssTableQueue {
            position,
            queue,
            queue_pairs,
        });
    }
    if rss.default_queue >= queue_pairs {
        return Err(ConfigError::RssDefaultQueue {
            queue: rss.default_queue,
            queue_pairs,
        });
    }
    Ok(())
}

fn validate_rings(config: &DeviceConfig) -> Result<(), ConfigError> {
    let rings = config.device.ring_count();
    let max_size = match &config.device {
        DeviceKind::Net(_) => MAX_RING_SIZE,
        DeviceKind::Blk(blk) => blk.queue_size,
    };
    // MAX_RINGS bits: indices were checked against `rings` <= 2 * 127 or
    // <= 256 before they index it.
    let mut seen = [false; MAX_RINGS as usize];
    for ring in &config.rings {
        if u32::from(ring.index) >= rings {
            return Err(ConfigError::RingIndex {
                ring: ring.index,
                rings,
            });
        }
        match seen.get_mut(usize::from(ring.index)) {
            Some(seen) if !*seen => *seen = true,
            _ => return Err(ConfigError::DuplicateRing { ring: ring.index }),
        }
        if !valid_ring_size(ring.size, max_size) {
            return Err(ConfigError::RingSize {
                ring: ring.index,
                size: ring.size,
                max: max_size,
            });
        }
        for (part, addr) in ring.addresses.parts() {
            if config.translate(addr).is_none() {
                return Err(ConfigError::RingAddress {
                    ring: ring.index,
                    part,
                    addr,
                });
            }
        }
    }
    Ok(())
}

/// A [`DeviceConfig`] that passed [`DeviceConfig::validate`]. The planner
/// takes the final configuration only in this form, so an unchecked one
/// cannot reach a device; it deserialises through validation too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DeviceConfig", into = "DeviceConfig")]
pub struct ValidConfig(DeviceConfig);

impl ValidConfig {
    /// Validate `config`.
    pub fn new(config: DeviceConfig) -> Result<ValidConfig, ConfigError> {
        config.validate()?;
        Ok(ValidConfig(config))
    }

    /// Read and validate a configuration from JSON (the `presetup` and
    /// `query-config` payload).
    pub fn from_json(text: &str) -> Result<ValidConfig, LoadError> {
        let config = DeviceConfig::from_json(text)?;
        Ok(ValidConfig::new(config)?)
    }

    /// The configuration itself.
    pub fn into_inner(self) -> DeviceConfig {
        self.0
    }
}

impl TryFrom<DeviceConfig> for ValidConfig {
    type Error = ConfigError;

    fn try_from(config: DeviceConfig) -> Result<ValidConfig, ConfigError> {
        ValidConfig::new(config)
    }
}

impl From<ValidConfig> for DeviceConfig {
    fn from(valid: ValidConfig) -> DeviceConfig {
        valid.0
    }
}

impl Deref for ValidConfig {
    type Target = DeviceConfig;

    fn deref(&self) -> &DeviceConfig {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        BlkConfig, FileIdentity, FrontendAddr, MemoryRegion, RingAddresses, RingConfig, RingPart,
    };

    fn region(guest: u64, size: u64, user: u64) -> MemoryRegion {
        MemoryRegion {
            file: FileIdentity {
                device: 1,
                inode: 7,
            },
            file_offset: 0,
            size_bytes: size,
            guest_phys_addr: GuestAddr(guest),
            user_addr: FrontendAddr(user),
        }
    }

    fn ring(index: u16, size: u16, base: u64) -> RingConfig {
        RingConfig {
            index,
            size,
            addresses: RingAddresses {
                desc_table: FrontendAddr(base),
                avail_ring: FrontendAddr(base + 0x1000),
                used_ring: FrontendAddr(base + 0x2000),
            },
            next_avail: 0,
            enabled: true,
            kick_fd: true,
            call_fd: true,
        }
    }

    fn net(queue_pairs: u16, rss: Option<RssSpec>) -> DeviceConfig {
        DeviceConfig {
            version: FORMAT_VERSION,
            acked_features: 0,
            protocol_features: 0,
            memory: vec![region(0, 0x100000, 0x7000_0000)],
            rings: vec![ring(0, 256, 0x7000_0000), ring(1, 256, 0x7000_4000)],
            device: DeviceKind::Net(NetConfig {
                mtu: 1500,
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                queue_pairs,
                rss,
            }),
        }
    }

    fn rss(table: Vec<u16>) -> RssSpec {
        RssSpec {
            hash_types: 0x3f,
            key: vec![0x6d; 40],
            indirection_table: table,
            default_queue: 0,
        }
    }

    #[test]
    fn a_plain_net_config_is_valid() {
        assert_eq!(net(2, Some(rss(vec![0, 1, 0, 1]))).validate(), Ok(()));
    }

    #[test]
    fn ring_index_beyond_the_queues_is_refused() {
        let mut config = net(1, None);
        config.rings.push(ring(2, 256, 0x7000_8000));
        assert_eq!(
            config.validate(),
            Err(ConfigError::RingIndex { ring: 2, rings: 2 })
        );
    }

    #[test]
    fn duplicate_ring_is_refused() {
        let mut config = net(1, None);
        config.rings.push(ring(1, 256, 0x7000_8000));
        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateRing { ring: 1 })
        );
    }

    #[test]
    fn ring_sizes_must_be_nonzero_powers_of_two() {
        for size in [0, 3, 384] {
            let mut config = net(1, None);
            config.rings[0].size = size;
            assert_eq!(
                config.validate(),
                Err(ConfigError::RingSize {
                    ring: 0,
                    size,
                    max: MAX_RING_SIZE
                })
            );
        }
    }

    #[test]
    fn blk_rings_may_not_exceed_the_queue_size() {
        let mut config = net(1, None);
        config.device = DeviceKind::Blk(BlkConfig {
            num_queues: 2,
            queue_size: 128,
            readonly: false,
            direct: false,
            writeback: true,
        });
        assert_eq!(
            config.validate(),
            Err(ConfigError::RingSize {
                ring: 0,
                size: 256,
                max: 128
            })
        );
    }

    #[test]
    fn overlapping_regions_are_refused_in_either_address_space() {
        let mut config = net(1, None);
        config.memory.push(region(0x80000, 0x100000, 0x9000_0000));
        assert!(matches!(
            config.validate(),
            Err(ConfigError::RegionsOverlap {
                space: AddressSpace::Guest,
                ..
            })
        ));
        let mut config = net(1, None);
        config.memory.push(region(0x200000, 0x1000, 0x7000_1000));
        assert!(matches!(
            config.validate(),
            Err(ConfigError::RegionsOverlap {
                space: AddressSpace::Frontend,
                ..
            })
        ));
    }

    #[test]
    fn empty_or_wrapping_regions_are_refused() {
        for bad in [
            region(0x200000, 0, 0x9000_0000),
            region(u64::MAX - 10, 0x1000, 0x9000_0000),
        ] {
            let mut config = net(1, None);
            config.memory.push(bad);
            assert!(matches!(
                config.validate(),
                Err(ConfigError::RegionRange { position: 1, .. })
            ));
        }
    }

    #[test]
    fn ring_addresses_must_be_in_memory() {
        let mut config = net(1, None);
        config.rings[1].addresses.used_ring = FrontendAddr(0x1000);
        assert_eq!(
            config.validate(),
            Err(ConfigError::RingAddress {
                ring: 1,
                part: RingPart::UsedRing,
                addr: FrontendAddr(0x1000)
            })
        );
    }

    #[test]
    fn rss_table_must_be_a_power_of_two_naming_existing_queues() {
        assert_eq!(
            net(2, Some(rss(vec![0, 1, 0]))).validate(),
            Err(ConfigError::RssTableLength { len: 3 })
        );
        assert_eq!(
            net(2, Some(rss(vec![]))).validate(),
            Err(ConfigError::RssTableLength { len: 0 })
        );
        assert_eq!(
            net(2, Some(rss(vec![0, 2]))).validate(),
            Err(ConfigError::RssTableQueue {
                position: 1,
                queue: 2,
                queue_pairs: 2
            })
        );
        let mut bad_default = rss(vec![0, 1]);
        bad_default.default_queue = 5;
        assert_eq!(
            net(2, Some(bad_default)).validate(),
            Err(ConfigError::RssDefaultQueue {
                queue: 5,
                queue_pairs: 2
            })
        );
        let mut bad_key = rss(vec![0, 1]);
        bad_key.key.clear();
        assert_eq!(
            net(2, Some(bad_key)).validate(),
            Err(ConfigError::RssKeyLength { len: 0 })
        );
    }

    #[test]
    fn queue_pairs_and_mtu_limits() {
        assert_eq!(
            net(0, None).validate(),
            Err(ConfigError::QueuePairs { queue_pairs: 0 })
        );
        let mut config = net(1, None);
        if let DeviceKind::Net(net) = &mut config.device {
            net.mtu = 67;
        }
        assert_eq!(config.validate(), Err(ConfigError::Mtu { mtu: 67 }));
    }

    #[test]
    fn valid_config_deserialises_only_through_validation() {
        let good = net(1, None);
        let parsed: ValidConfig = serde_json::from_str(&good.to_json()).unwrap();
        assert_eq!(*parsed, good);
        let mut bad = good;
        bad.rings[0].index = 9;
        assert!(serde_json::from_str::<ValidConfig>(&bad.to_json()).is_err());
        assert!(matches!(
            ValidConfig::from_json(&bad.to_json()),
            Err(LoadError::Invalid(ConfigError::RingIndex { ring: 9, .. }))
        ));
    }
}
