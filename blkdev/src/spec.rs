//! virtio-blk wire constants (virtio 1.2, section 5.2) that `virtio-bindings`
//! does not name the way we use them, plus re-exports of the ones it does.

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The unit of `sector` fields in requests and of `capacity` in the config
/// space: always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the request header `{type u32, reserved u32, sector u64}`.
pub const REQUEST_HEADER_SIZE: u32 = 16;
/// Size of one discard / write-zeroes segment `{sector u64, num_sectors u32, flags u32}`.
pub const DISCARD_SEGMENT_SIZE: u32 = 16;
/// Write-zeroes segment flag: the device may deallocate the range.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Largest split virtqueue (virtio 1.2, 2.7: Queue Size up to 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;
