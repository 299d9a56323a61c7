//! What a disk offers: virtio feature bits and the config space.

use crate::spec::*;

/// User-chosen options of one disk, from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// Number of request queues (virtio-blk MQ).
    pub num_queues: u16,
    /// Maximum ring size a front-end may configure.
    pub queue_size: u16,
    /// Refuse writes (VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// Serial returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
    /// Logical block size advertised to the guest.
    pub logical_block_size: u32,
    /// Busy-poll a queue for this long after work before sleeping on its
    /// kick eventfd (0 disables polling).
    pub poll_us: u32,
    /// Added latency in front of every storage operation, in milliseconds.
    /// An experiment and test knob (e.g. slow storage for handoff tests),
    /// never for production.
    pub latency_ms: u32,
    /// How a migration destination holds resubmitted writes.
    pub fence: FenceMode,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            num_queues: 1,
            queue_size: 256,
            readonly: false,
            direct: false,
            serial: String::new(),
            logical_block_size: 512,
            poll_us: 32,
            latency_ms: 0,
            fence: FenceMode::Lock,
        }
    }
}

/// How a migration destination learns that the source's abandoned storage
/// operations have finished, before it lets resubmitted writes go (see
/// `blkdev::fence`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FenceMode {
    /// The source holds a lock on `<image>.fence` (next to the image, on
    /// the same shared storage) until its abandoned operations finish.
    #[default]
    Lock,
    /// Held until the control API call `fence-release`.
    Api,
    /// Nothing is held. Unsafe: a stale write may land late; experiments only.
    None,
}

impl FenceMode {
    /// Name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FenceMode::Lock => "lock",
            FenceMode::Api => "api",
            FenceMode::None => "none",
        }
    }
}

impl std::str::FromStr for FenceMode {
    type Err = String;

    fn from_str(value: &str) -> Result<FenceMode, String> {
        match value {
            "lock" => Ok(FenceMode::Lock),
            "api" => Ok(FenceMode::Api),
            "none" => Ok(FenceMode::None),
            other => Err(format!("fence={other}: expected lock, api or none")),
        }
    }
}

/// Most data segments one request may carry (config `seg_max`). A chain
/// also holds the header and status descriptors, so the ring must hold two
/// more; [`BlkConfig::seg_max`] is derived from the queue size.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;

/// The device-side view of one disk: offered features and config space.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    options: DiskOptions,
    capacity_sectors: u64,
    /// Writeback cache on (config `writeback` = 1) or writethrough (0).
    writeback: bool,
}

impl BlkConfig {
    /// Config for a disk of `size_bytes` (rounded down to whole sectors).
    pub fn new(options: DiskOptions, size_bytes: u64) -> Self {
        BlkConfig {
            options,
            capacity_sectors: size_bytes >> SECTOR_SHIFT,
            writeback: true,
        }
    }

    /// The options this disk was created with.
    pub fn options(&self) -> &DiskOptions {
        &self.options
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether the guest wants a writeback cache (else every write is durable
    /// before it completes).
    pub fn writeback(&self) -> bool {
        self.writeback
    }

    /// Largest number of data segments per request we advertise. The Linux
    /// driver sizes requests by this, so it must leave room for the header
    /// and status descriptors in a ring of `queue_size` (indirect tables are
    /// bounded by the queue size too).
    pub fn seg_max(&self) -> u32 {
        u32::from(self.options.queue_size).saturating_sub(2).max(1)
    }

    /// virtio feature bits this disk offers (transport bits included).
    pub fn features(&self) -> u64 {
        let mut bits = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
        if self.options.readonly {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits
    }

    /// The config space (`struct virtio_blk_config`, little endian), 60 bytes
    /// up to and including `write_zeroes_may_unmap` and its padding.
    pub fn config_space(&self) -> Vec<u8> {
        let block_size = self.options.logical_block_size;
        let sectors_per_block = (block_size >> SECTOR_SHIFT).max(1);
        let mut space = Vec::with_capacity(CONFIG_SPACE_SIZE);
        space.extend_from_slice(&self.capacity_sectors.to_le_bytes()); // capacity @0
        space.extend_from_slice(&0u32.to_le_bytes()); // size_max @8 (not offered)
        space.extend_from_slice(&self.seg_max().to_le_bytes()); // seg_max @12
        space.extend_from_slice(&[0u8; 4]); // geometry @16 (not offered)
        space.extend_from_slice(&block_size.to_le_bytes()); // blk_size @20
        space.push(0); // physical_block_exp @24
        space.push(0); // alignment_offset @25
        space.extend_from_slice(&1u16.to_le_bytes()); // min_io_size @26 (in blocks)
        space.extend_from_slice(&0u32.to_le_bytes()); // opt_io_size @28
        space.push(u8::from(self.writeback)); // writeback @32
        space.push(0); // unused0 @33
        space.extend_from_slice(&self.options.num_queues.to_le_bytes()); // num_queues @34
        space.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors @36
        space.extend_from_slice(&1u32.to_le_bytes()); // max_discard_seg @40
        space.extend_from_slice(&sectors_per_block.to_le_bytes()); // discard_sector_alignment @44
        space.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors @48
        space.extend_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg @52
        space.push(1); // write_zeroes_may_unmap @56
        space.extend_from_slice(&[0u8; 3]); // unused1 @57
        debug_assert_eq!(space.len(), CONFIG_SPACE_SIZE);
        space
    }

    /// Apply a front-end write to the config space. Only `writeback` (offset
    /// 32, with CONFIG_WCE) is writable; anything else is refused.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError> {
        match (offset, data) {
            (WRITEBACK_OFFSET, [value]) => {
                self.writeback = *value != 0;
                Ok(())
            }
            _ => Err(ConfigWriteError {
                offset,
                len: data.len(),
            }),
        }
    }
}

/// Size of the config space we expose.
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Offset of the `writeback` byte in the config space.
pub const WRITEBACK_OFFSET: u32 = 32;

/// A front-end tried to write a read-only part of the config space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "config space write of {len} bytes at offset {offset} refused: only `writeback` is writable"
)]
pub struct ConfigWriteError {
    /// Offset the front-end wrote at.
    pub offset: u32,
    /// Number of bytes it wrote.
    pub len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout_matches_virtio_blk_config() {
        let options = DiskOptions {
            num_queues: 4,
            queue_size: 128,
            ..Default::default()
        };
        let config = BlkConfig::new(options, 1 << 30);
        let space = config.config_space();
        assert_eq!(space.len(), CONFIG_SPACE_SIZE);
        assert_eq!(
            u64::from_le_bytes(space[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(space[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(space[20..24].try_into().unwrap()), 512);
        assert_eq!(space[32], 1);
        assert_eq!(u16::from_le_bytes(space[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(space[40..44].try_into().unwrap()), 1);
    }

    #[test]
    fn readonly_disk_offers_ro_and_no_discard() {
        let config = BlkConfig::new(
            DiskOptions {
                readonly: true,
                ..Default::default()
            },
            4096,
        );
        assert_ne!(config.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(config.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(config.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn fence_modes_parse_from_their_names() {
        for mode in [FenceMode::Lock, FenceMode::Api, FenceMode::None] {
            assert_eq!(mode.name().parse::<FenceMode>(), Ok(mode));
        }
        assert!("Lock".parse::<FenceMode>().is_err());
        assert!("".parse::<FenceMode>().is_err());
        let defaults = DiskOptions::default();
        assert_eq!((defaults.fence, defaults.latency_ms), (FenceMode::Lock, 0));
    }

    #[test]
    fn only_writeback_is_writable() {
        let mut config = BlkConfig::new(DiskOptions::default(), 4096);
        config.write_config(WRITEBACK_OFFSET, &[0]).unwrap();
        assert!(!config.writeback());
        assert_eq!(config.config_space()[32], 0);
        assert!(config.write_config(0, &[1; 8]).is_err());
        assert!(config.write_config(WRITEBACK_OFFSET, &[1, 1]).is_err());
    }
}
