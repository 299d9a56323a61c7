//! The kernel interfaces the lab NIC speaks, as plain data: ioctl numbers
//! and the byte layouts of the VDUSE structures (include/uapi/linux/
//! vduse.h, API version 0 as Linux 6.12 has it) and of the few vhost /
//! vhost-vdpa ones the probes use (include/uapi/linux/vhost.h).
//!
//! Structures are encoded into and decoded from byte buffers field by
//! field (native endianness, the layouts' fixed offsets), so no `unsafe`
//! reinterpretation of kernel memory is needed anywhere.

/// `_IOC` direction bits.
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

/// The argument size an ioctl request number encodes.
pub const fn ioctl_size(request: u64) -> usize {
    ((request >> 16) & 0x3fff) as usize
}

const VDUSE_BASE: u64 = 0x81;
const VHOST_VIRTIO: u64 = 0xaf;

/// Size of `struct vduse_dev_config` without its trailing config bytes.
pub const DEV_CONFIG_SIZE: usize = 336;
/// `VDUSE_NAME_MAX`.
pub const NAME_MAX: usize = 256;
/// Size of `struct vduse_iotlb_entry`.
pub const IOTLB_ENTRY_SIZE: usize = 32;
/// Size of `struct vduse_vq_config`.
pub const VQ_CONFIG_SIZE: usize = 32;
/// Size of `struct vduse_vq_info`.
pub const VQ_INFO_SIZE: usize = 48;
/// Size of `struct vduse_vq_eventfd`.
pub const VQ_EVENTFD_SIZE: usize = 8;
/// Size of `struct vduse_dev_request` (read from the device).
pub const REQUEST_SIZE: usize = 152;
/// Size of `struct vduse_dev_response` (written to the device).
pub const RESPONSE_SIZE: usize = 152;

/// `VDUSE_API_VERSION` (what Linux 6.12 speaks).
pub const VDUSE_API_VERSION: u64 = 0;
/// `VDUSE_GET_API_VERSION`.
pub const VDUSE_GET_API_VERSION: u64 = ioc(IOC_READ, VDUSE_BASE, 0x00, 8);
/// `VDUSE_SET_API_VERSION`.
pub const VDUSE_SET_API_VERSION: u64 = ioc(IOC_WRITE, VDUSE_BASE, 0x01, 8);
/// `VDUSE_CREATE_DEV`.
pub const VDUSE_CREATE_DEV: u64 = ioc(IOC_WRITE, VDUSE_BASE, 0x02, DEV_CONFIG_SIZE);
/// `VDUSE_DESTROY_DEV`.
pub const VDUSE_DESTROY_DEV: u64 = ioc(IOC_WRITE, VDUSE_BASE, 0x03, NAME_MAX);
/// `VDUSE_IOTLB_GET_FD`.
pub const VDUSE_IOTLB_GET_FD: u64 = ioc(IOC_READ | IOC_WRITE, VDUSE_BASE, 0x10, IOTLB_ENTRY_SIZE);
/// `VDUSE_DEV_GET_FEATURES`.
pub const VDUSE_DEV_GET_FEATURES: u64 = ioc(IOC_READ, VDUSE_BASE, 0x11, 8);
/// `VDUSE_VQ_SETUP`.
pub const VDUSE_VQ_SETUP: u64 = ioc(IOC_WRITE, VDUSE_BASE, 0x14, VQ_CONFIG_SIZE);
/// `VDUSE_VQ_GET_INFO`.
pub const VDUSE_VQ_GET_INFO: u64 = ioc(IOC_READ | IOC_WRITE, VDUSE_BASE, 0x15, VQ_INFO_SIZE);
/// `VDUSE_VQ_SETUP_KICKFD`.
pub const VDUSE_VQ_SETUP_KICKFD: u64 = ioc(IOC_WRITE, VDUSE_BASE, 0x16, VQ_EVENTFD_SIZE);
/// `VDUSE_VQ_INJECT_IRQ`.
pub const VDUSE_VQ_INJECT_IRQ: u64 = ioc(IOC_WRITE, VDUSE_BASE, 0x17, 4);

/// `VHOST_GET_FEATURES`.
pub const VHOST_GET_FEATURES: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x00, 8);
/// `VHOST_SET_OWNER`.
pub const VHOST_SET_OWNER: u64 = ioc(IOC_NONE, VHOST_VIRTIO, 0x01, 0);
/// `VHOST_GET_BACKEND_FEATURES`.
pub const VHOST_GET_BACKEND_FEATURES: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x26, 8);
/// `VHOST_VDPA_GET_DEVICE_ID`.
pub const VHOST_VDPA_GET_DEVICE_ID: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x70, 4);
/// `VHOST_VDPA_GET_CONFIG` (`struct vhost_vdpa_config`: off, len, buf[]).
pub const VHOST_VDPA_GET_CONFIG: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x73, 8);
/// `VHOST_VDPA_GET_VRING_NUM`.
pub const VHOST_VDPA_GET_VRING_NUM: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x76, 2);

/// `VHOST_SET_FEATURES`.
pub const VHOST_SET_FEATURES: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x00, 8);
/// `VHOST_SET_BACKEND_FEATURES`.
pub const VHOST_SET_BACKEND_FEATURES: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x25, 8);
/// `VHOST_SET_VRING_NUM` (`struct vhost_vring_state`).
pub const VHOST_SET_VRING_NUM: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x10, 8);
/// `VHOST_SET_VRING_ADDR` (`struct vhost_vring_addr`).
pub const VHOST_SET_VRING_ADDR: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x11, 40);
/// `VHOST_SET_VRING_BASE`.
pub const VHOST_SET_VRING_BASE: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x12, 8);
/// `VHOST_GET_VRING_BASE`.
pub const VHOST_GET_VRING_BASE: u64 = ioc(IOC_READ | IOC_WRITE, VHOST_VIRTIO, 0x12, 8);
/// `VHOST_SET_VRING_KICK` (`struct vhost_vring_file`).
pub const VHOST_SET_VRING_KICK: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x20, 8);
/// `VHOST_SET_VRING_CALL`.
pub const VHOST_SET_VRING_CALL: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x21, 8);
/// `VHOST_VDPA_GET_STATUS`.
pub const VHOST_VDPA_GET_STATUS: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x71, 1);
/// `VHOST_VDPA_SET_STATUS`.
pub const VHOST_VDPA_SET_STATUS: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x72, 1);
/// `VHOST_VDPA_SET_VRING_ENABLE` (`struct vhost_vring_state`).
pub const VHOST_VDPA_SET_VRING_ENABLE: u64 = ioc(IOC_WRITE, VHOST_VIRTIO, 0x75, 8);
/// `VHOST_VDPA_GET_VQS_COUNT`.
pub const VHOST_VDPA_GET_VQS_COUNT: u64 = ioc(IOC_READ, VHOST_VIRTIO, 0x80, 4);

/// `VHOST_BACKEND_F_IOTLB_MSG_V2` (a bit number).
pub const VHOST_BACKEND_F_IOTLB_MSG_V2: u64 = 1;
/// `VHOST_BACKEND_F_SUSPEND`.
pub const VHOST_BACKEND_F_SUSPEND: u64 = 4;
/// `VHOST_IOTLB_MSG_V2`.
pub const VHOST_IOTLB_MSG_V2: u32 = 2;
/// `VHOST_IOTLB_UPDATE`.
pub const VHOST_IOTLB_UPDATE: u8 = 2;
/// `VHOST_IOTLB_INVALIDATE`.
pub const VHOST_IOTLB_INVALIDATE: u8 = 3;
/// Size of `struct vhost_msg_v2`.
pub const VHOST_MSG_V2_SIZE: usize = 72;

/// `struct vhost_vring_state` (also `vhost_vring_file`: index, fd).
pub fn encode_vring_state(index: u32, num: u32) -> [u8; 8] {
    let mut buf = [0u8; 8];
    put_u32(&mut buf, 0, index);
    put_u32(&mut buf, 4, num);
    buf
}

/// The `num` of a `struct vhost_vring_state` the kernel filled in.
pub fn decode_vring_state_num(buf: &[u8; 8]) -> u32 {
    get_u32(buf, 4)
}

/// `struct vhost_vring_addr` (no dirty log): desc, used, avail, in the
/// kernel's field order.
pub fn encode_vring_addr(index: u32, desc: u64, avail: u64, used: u64) -> [u8; 40] {
    let mut buf = [0u8; 40];
    put_u32(&mut buf, 0, index);
    put_u64(&mut buf, 8, desc);
    put_u64(&mut buf, 16, used);
    put_u64(&mut buf, 24, avail);
    buf
}

/// `struct vhost_msg_v2` carrying a `struct vhost_iotlb_msg` of `kind`
/// (`VHOST_IOTLB_UPDATE`, `_INVALIDATE`) for address space 0.
pub fn encode_iotlb_msg(
    kind: u8,
    iova: u64,
    size: u64,
    uaddr: u64,
    perm: u8,
) -> [u8; VHOST_MSG_V2_SIZE] {
    let mut buf = [0u8; VHOST_MSG_V2_SIZE];
    put_u32(&mut buf, 0, VHOST_IOTLB_MSG_V2);
    // asid (4..8) = 0; the union starts at 8.
    put_u64(&mut buf, 8, iova);
    put_u64(&mut buf, 16, size);
    put_u64(&mut buf, 24, uaddr);
    buf[32] = perm;
    buf[33] = kind;
    buf
}

/// `VDUSE_ACCESS_RO` / `_WO` / `_RW`.
pub const ACCESS_RO: u8 = 1;
/// Device may write.
pub const ACCESS_WO: u8 = 2;
/// Device may read and write.
pub const ACCESS_RW: u8 = 3;

/// `VDUSE_REQ_RESULT_OK`.
pub const RESULT_OK: u32 = 0;
/// `VDUSE_REQ_RESULT_FAILED`.
pub const RESULT_FAILED: u32 = 1;

/// `VDUSE_EVENTFD_DEASSIGN`.
pub const EVENTFD_DEASSIGN: i32 = -1;

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}
fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get_u16(buf: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&buf[at..at + 2]);
    u16::from_ne_bytes(b)
}
fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(b)
}
fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// A device name as the kernel takes it: NUL-terminated in 256 bytes.
/// None if it is empty, too long or holds a NUL.
pub fn encode_name(name: &str) -> Option<[u8; NAME_MAX]> {
    if name.is_empty() || name.len() >= NAME_MAX || name.contains('\0') || name.contains('/') {
        return None;
    }
    let mut out = [0u8; NAME_MAX];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Some(out)
}

/// `struct vduse_dev_config` + its config space, for `VDUSE_CREATE_DEV`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevConfig {
    /// Device name (becomes /dev/vduse/NAME and the vDPA device's name).
    pub name: [u8; NAME_MAX],
    /// Virtio vendor id.
    pub vendor_id: u32,
    /// Virtio device id (1: net).
    pub device_id: u32,
    /// Offered virtio features.
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Alignment of a virtqueue's metadata.
    pub vq_align: u32,
    /// The configuration space.
    pub config: Vec<u8>,
}

impl DevConfig {
    /// The ioctl argument: the fixed part, then the config bytes (the
    /// kernel reads `config_size` bytes past the fixed part).
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; DEV_CONFIG_SIZE + self.config.len()];
        buf[..NAME_MAX].copy_from_slice(&self.name);
        put_u32(&mut buf, 256, self.vendor_id);
        put_u32(&mut buf, 260, self.device_id);
        put_u64(&mut buf, 264, self.features);
        put_u32(&mut buf, 272, self.vq_num);
        put_u32(&mut buf, 276, self.vq_align);
        // reserved[13] at 280..332 stays zero.
        // A config space is at most a page: the length fits a u32.
        put_u32(&mut buf, 332, self.config.len() as u32);
        buf[DEV_CONFIG_SIZE..].copy_from_slice(&self.config);
        buf
    }
}

/// `struct vduse_vq_config` for `VDUSE_VQ_SETUP`.
pub fn encode_vq_config(index: u32, max_size: u16) -> [u8; VQ_CONFIG_SIZE] {
    let mut buf = [0u8; VQ_CONFIG_SIZE];
    put_u32(&mut buf, 0, index);
    put_u16(&mut buf, 4, max_size);
    buf
}

/// `struct vduse_vq_eventfd` for `VDUSE_VQ_SETUP_KICKFD`.
pub fn encode_vq_eventfd(index: u32, fd: i32) -> [u8; VQ_EVENTFD_SIZE] {
    let mut buf = [0u8; VQ_EVENTFD_SIZE];
    put_u32(&mut buf, 0, index);
    buf[4..8].copy_from_slice(&fd.to_ne_bytes());
    buf
}

/// `struct vduse_vq_info`, as `VDUSE_VQ_GET_INFO` returns it (split ring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VqInfo {
    /// Virtqueue index.
    pub index: u32,
    /// Ring size the driver set (0: not set).
    pub num: u32,
    /// IOVA of the descriptor table.
    pub desc_addr: u64,
    /// IOVA of the driver (avail) area.
    pub driver_addr: u64,
    /// IOVA of the device (used) area.
    pub device_addr: u64,
    /// Where the device starts in the avail ring (SET_VRING_BASE).
    pub avail_index: u16,
    /// The driver enabled the queue.
    pub ready: bool,
}

impl VqInfo {
    /// The ioctl argument asking for queue `index`.
    pub fn request(index: u32) -> [u8; VQ_INFO_SIZE] {
        let mut buf = [0u8; VQ_INFO_SIZE];
        put_u32(&mut buf, 0, index);
        buf
    }

    /// Decode the kernel's answer.
    pub fn decode(buf: &[u8; VQ_INFO_SIZE]) -> VqInfo {
        VqInfo {
            index: get_u32(buf, 0),
            num: get_u32(buf, 4),
            desc_addr: get_u64(buf, 8),
            driver_addr: get_u64(buf, 16),
            device_addr: get_u64(buf, 24),
            avail_index: get_u16(buf, 32),
            ready: buf[40] != 0,
        }
    }
}

/// `struct vduse_iotlb_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IotlbEntry {
    /// mmap offset in the returned file.
    pub offset: u64,
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// `ACCESS_*`.
    pub perm: u8,
}

impl IotlbEntry {
    /// The ioctl argument asking for the first region overlapping
    /// `[start, last]`.
    pub fn request(start: u64, last: u64) -> [u8; IOTLB_ENTRY_SIZE] {
        let mut buf = [0u8; IOTLB_ENTRY_SIZE];
        put_u64(&mut buf, 8, start);
        put_u64(&mut buf, 16, last);
        buf
    }

    /// Decode the kernel's answer.
    pub fn decode(buf: &[u8; IOTLB_ENTRY_SIZE]) -> IotlbEntry {
        IotlbEntry {
            offset: get_u64(buf, 0),
            start: get_u64(buf, 8),
            last: get_u64(buf, 16),
            perm: buf[24],
        }
    }
}

/// A control request read from /dev/vduse/NAME.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `VDUSE_GET_VQ_STATE`: where is the device in queue `index`?
    GetVqState {
        /// Request id, echoed in the response.
        id: u32,
        /// Virtqueue index.
        index: u32,
    },
    /// `VDUSE_SET_STATUS`.
    SetStatus {
        /// Request id.
        id: u32,
        /// The new device status byte.
        status: u8,
    },
    /// `VDUSE_UPDATE_IOTLB`: mappings in `[start, last]` changed.
    UpdateIotlb {
        /// Request id.
        id: u32,
        /// First IOVA.
        start: u64,
        /// Last IOVA (inclusive).
        last: u64,
    },
    /// A request type this code does not know (answered FAILED).
    Unknown {
        /// Request id.
        id: u32,
        /// The type number.
        kind: u32,
    },
}

impl Request {
    /// Decode a `struct vduse_dev_request`.
    pub fn decode(buf: &[u8; REQUEST_SIZE]) -> Request {
        let kind = get_u32(buf, 0);
        let id = get_u32(buf, 4);
        // The union starts after type, request_id and reserved[4].
        const U: usize = 24;
        match kind {
            0 => Request::GetVqState {
                id,
                index: get_u32(buf, U),
            },
            1 => Request::SetStatus { id, status: buf[U] },
            2 => Request::UpdateIotlb {
                id,
                start: get_u64(buf, U),
                last: get_u64(buf, U + 8),
            },
            kind => Request::Unknown { id, kind },
        }
    }

    /// The request id.
    pub fn id(&self) -> u32 {
        match *self {
            Request::GetVqState { id, .. }
            | Request::SetStatus { id, .. }
            | Request::UpdateIotlb { id, .. }
            | Request::Unknown { id, .. } => id,
        }
    }
}

/// A `struct vduse_dev_response`: `result` for request `id`, and for
/// `GET_VQ_STATE` the split ring's avail index of queue `index`.
pub fn encode_response(id: u32, result: u32, vq_state: Option<(u32, u16)>) -> [u8; RESPONSE_SIZE] {
    let mut buf = [0u8; RESPONSE_SIZE];
    put_u32(&mut buf, 0, id);
    put_u32(&mut buf, 4, result);
    if let Some((index, avail_index)) = vq_state {
        put_u32(&mut buf, 24, index);
        put_u16(&mut buf, 28, avail_index);
    }
    buf
}

/// `struct vhost_vdpa_config` asking for `len` bytes at `offset`, with room
/// for the answer after the 8-byte header.
pub fn encode_vdpa_config_request(offset: u32, len: u32) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + len as usize];
    put_u32(&mut buf, 0, offset);
    put_u32(&mut buf, 4, len);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values the C preprocessor computes from the uAPI headers
        // (checked against linux-libc-dev 6.1; the layouts are the same in 6.12).
        assert_eq!(VDUSE_GET_API_VERSION, 0x8008_8100);
        assert_eq!(VDUSE_SET_API_VERSION, 0x4008_8101);
        assert_eq!(VDUSE_CREATE_DEV, 0x4150_8102);
        assert_eq!(VDUSE_DESTROY_DEV, 0x4100_8103);
        assert_eq!(VDUSE_IOTLB_GET_FD, 0xc020_8110);
        assert_eq!(VDUSE_DEV_GET_FEATURES, 0x8008_8111);
        assert_eq!(VDUSE_VQ_SETUP, 0x4020_8114);
        assert_eq!(VDUSE_VQ_GET_INFO, 0xc030_8115);
        assert_eq!(VDUSE_VQ_SETUP_KICKFD, 0x4008_8116);
        assert_eq!(VDUSE_VQ_INJECT_IRQ, 0x4004_8117);
        assert_eq!(VHOST_SET_OWNER, 0xaf01);
        assert_eq!(VHOST_GET_FEATURES, 0x8008_af00);
        assert_eq!(VHOST_VDPA_GET_DEVICE_ID, 0x8004_af70);
        assert_eq!(ioctl_size(VDUSE_CREATE_DEV), DEV_CONFIG_SIZE);
        assert_eq!(VHOST_SET_VRING_NUM, 0x4008_af10);
        assert_eq!(VHOST_SET_VRING_ADDR, 0x4028_af11);
        assert_eq!(VHOST_GET_VRING_BASE, 0xc008_af12);
        assert_eq!(VHOST_SET_VRING_KICK, 0x4008_af20);
        assert_eq!(VHOST_SET_VRING_CALL, 0x4008_af21);
        assert_eq!(VHOST_VDPA_SET_STATUS, 0x4001_af72);
        assert_eq!(VHOST_VDPA_SET_VRING_ENABLE, 0x4008_af75);
        assert_eq!(VHOST_VDPA_GET_VQS_COUNT, 0x8004_af80);
        assert_eq!(VHOST_SET_BACKEND_FEATURES, 0x4008_af25);
    }

    #[test]
    fn dev_config_puts_each_field_at_its_offset() {
        let config = DevConfig {
            name: encode_name("nic0").unwrap(),
            vendor_id: 7,
            device_id: 1,
            features: 1 << 32 | 1 << 33,
            vq_num: 4,
            vq_align: 4096,
            config: vec![0xaa; 12],
        };
        let buf = config.encode();
        assert_eq!(buf.len(), DEV_CONFIG_SIZE + 12);
        assert_eq!(&buf[..5], b"nic0\0");
        assert_eq!(get_u32(&buf, 260), 1);
        assert_eq!(get_u64(&buf, 264), 3 << 32);
        assert_eq!(get_u32(&buf, 272), 4);
        assert_eq!(get_u32(&buf, 276), 4096);
        assert!(buf[280..332].iter().all(|&b| b == 0), "reserved stays zero");
        assert_eq!(get_u32(&buf, 332), 12);
        assert_eq!(&buf[336..], &[0xaa; 12]);
    }

    #[test]
    fn requests_decode_from_the_union_at_offset_24() {
        let mut buf = [0u8; REQUEST_SIZE];
        put_u32(&mut buf, 0, 2);
        put_u32(&mut buf, 4, 99);
        put_u64(&mut buf, 24, 0x1000);
        put_u64(&mut buf, 32, u64::MAX);
        assert_eq!(
            Request::decode(&buf),
            Request::UpdateIotlb {
                id: 99,
                start: 0x1000,
                last: u64::MAX
            }
        );
        put_u32(&mut buf, 0, 1);
        buf[24] = 0x0f;
        assert_eq!(
            Request::decode(&buf),
            Request::SetStatus {
                id: 99,
                status: 0x0f
            }
        );
        put_u32(&mut buf, 0, 9);
        assert_eq!(Request::decode(&buf), Request::Unknown { id: 99, kind: 9 });
    }

    #[test]
    fn a_vq_state_response_carries_index_and_avail_index() {
        let buf = encode_response(5, RESULT_OK, Some((3, 0x1234)));
        assert_eq!(get_u32(&buf, 0), 5);
        assert_eq!(get_u32(&buf, 4), RESULT_OK);
        assert!(buf[8..24].iter().all(|&b| b == 0), "reserved must be zero");
        assert_eq!(get_u32(&buf, 24), 3);
        assert_eq!(get_u16(&buf, 28), 0x1234);
    }

    #[test]
    fn names_are_checked() {
        assert!(encode_name("").is_none());
        assert!(encode_name("a/b").is_none());
        assert!(encode_name(&"x".repeat(256)).is_none());
        assert!(encode_name(&"x".repeat(255)).is_some());
    }
}
