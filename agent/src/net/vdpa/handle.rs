//! One open `/dev/vhost-vdpa-N`: what the device offers ([`Caps`]), and
//! the requests the engine makes of it ([`Ops`]), as ioctls and IOTLB
//! messages. The engine only sees [`Ops`], so its state machine is
//! tested against a recording device (`engine_tests.rs`).

use std::fs::File;

use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::vhost_kern::VhostKernFeatures;
use vhost::{VhostBackend, VhostIotlbBackend, VhostIotlbMsg, VhostIotlbType, VringConfigData};
use vm_memory::GuestMemoryAtomic;

use super::error::VdpaError;
use crate::net::kernel::io_error;
use crate::net::kernel::uapi::{self, backend, RingFd};
use crate::vhost_user::memory::GuestRam;
use crate::vhost_user::vring::RingGuestAddresses;

/// VIRTIO_ID_NET.
const VIRTIO_ID_NET: u32 = 1;

/// What a vhost-vdpa device offers, read once at open.
#[derive(Clone, Debug)]
pub struct Caps {
    /// VHOST_GET_FEATURES: the device's virtio features.
    pub device_features: u64,
    /// The backend features the agent acked (of those the device offers).
    pub backend: u64,
    /// Virtqueues the device has.
    pub num_vqs: u32,
    /// The largest ring size it takes.
    pub max_ring: u16,
    /// Its virtio-net config space: MAC (0..6), status (6..8),
    /// max_virtqueue_pairs (8..10), MTU (10..12).
    pub config: [u8; 12],
}

impl Caps {
    /// Whether backend feature `bit` (uapi::backend) was acked.
    pub fn has(&self, bit: u64) -> bool {
        self.backend & bit != 0
    }

    /// The device's MAC.
    pub fn mac(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.config[..6]);
        mac
    }

    /// max_virtqueue_pairs (1 without MQ).
    pub fn max_pairs(&self) -> u16 {
        if self.device_features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ) == 0 {
            return 1;
        }
        u16::from_le_bytes([self.config[8], self.config[9]]).max(1)
    }

    /// The MTU, if the device offers VIRTIO_NET_F_MTU.
    pub fn mtu(&self) -> Option<u16> {
        (self.device_features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MTU) != 0)
            .then(|| u16::from_le_bytes([self.config[10], self.config[11]]))
    }
}

/// What the engine asks of a device (module documentation). Ring indices
/// are the device's virtqueue indices; addresses are IOVAs (here guest
/// physical addresses).
pub trait Ops: Send {
    /// VHOST_VDPA_SET_STATUS.
    fn set_status(&mut self, status: u8) -> Result<(), VdpaError>;
    /// VHOST_VDPA_GET_STATUS.
    fn status(&mut self) -> Result<u8, VdpaError>;
    /// VHOST_SET_FEATURES.
    fn set_features(&mut self, features: u64) -> Result<(), VdpaError>;
    /// VHOST_SET_VRING_NUM.
    fn set_num(&mut self, ring: u16, size: u16) -> Result<(), VdpaError>;
    /// VHOST_SET_VRING_ADDR at guest physical addresses.
    fn set_addr(
        &mut self,
        ring: u16,
        size: u16,
        guest: &RingGuestAddresses,
    ) -> Result<(), VdpaError>;
    /// VHOST_SET_VRING_BASE.
    fn set_base(&mut self, ring: u16, base: u16) -> Result<(), VdpaError>;
    /// VHOST_GET_VRING_BASE.
    fn get_base(&mut self, ring: u16) -> Result<u16, VdpaError>;
    /// VHOST_SET_VRING_KICK (`None`: unbound).
    fn set_kick(&mut self, ring: u16, kick: Option<&File>) -> Result<(), VdpaError>;
    /// VHOST_SET_VRING_CALL (`None`: unbound).
    fn set_call(&mut self, ring: u16, call: Option<&File>) -> Result<(), VdpaError>;
    /// VHOST_VDPA_SET_VRING_ENABLE.
    fn set_ready(&mut self, ring: u16, ready: bool) -> Result<(), VdpaError>;
    /// VHOST_VDPA_SUSPEND.
    fn suspend(&mut self) -> Result<(), VdpaError>;
    /// VHOST_VDPA_RESUME.
    fn resume(&mut self) -> Result<(), VdpaError>;
    /// VHOST_IOTLB_UPDATE: `[iova, iova + size)` is the agent's memory at
    /// `host` (read and write).
    fn map(&mut self, iova: u64, size: u64, host: u64) -> Result<(), VdpaError>;
    /// VHOST_IOTLB_INVALIDATE of `[iova, iova + size)`.
    fn unmap(&mut self, iova: u64, size: u64) -> Result<(), VdpaError>;
    /// VHOST_IOTLB_BATCH_BEGIN (`true`) or BATCH_END.
    fn batch(&mut self, begin: bool) -> Result<(), VdpaError>;
}

/// The crate's handle; its guest memory parameter is unused (the agent
/// passes IOVAs itself).
type Kern = VhostKernVdpa<GuestMemoryAtomic<GuestRam>>;

/// An open vhost-vdpa device (module documentation).
pub struct Handle {
    vdpa: Kern,
    max_ring: u16,
}

/// Backend features the agent uses when offered.
const WANTED_BACKEND: u64 = backend::IOTLB_MSG_V2
    | backend::IOTLB_BATCH
    | backend::SUSPEND
    | backend::RESUME
    | backend::ENABLE_AFTER_DRIVER_OK
    | backend::IOTLB_PERSIST;

impl Handle {
    /// Open `path`, take VHOST_SET_OWNER, ack the backend features the
    /// agent uses, read what the device offers, and reset it.
    pub fn open(
        path: &str,
        memory: GuestMemoryAtomic<GuestRam>,
    ) -> Result<(Handle, Caps), VdpaError> {
        let unavailable = |e: vhost::Error| VdpaError::unavailable(path, io_error(e));
        let mut vdpa = Kern::new(path, memory).map_err(unavailable)?;
        vdpa.set_owner().map_err(unavailable)?;
        let device_id = vdpa
            .get_device_id()
            .map_err(|e| VdpaError::ioctl("VHOST_VDPA_GET_DEVICE_ID", e))?;
        if device_id != VIRTIO_ID_NET {
            return Err(VdpaError::NotNet {
                path: path.to_string(),
                device_id,
            });
        }
        let offered = vdpa
            .get_backend_features()
            .map_err(|e| VdpaError::ioctl("VHOST_GET_BACKEND_FEATURES", e))?;
        let backend = offered & WANTED_BACKEND;
        vdpa.set_backend_features(backend)
            .map_err(|e| VdpaError::ioctl("VHOST_SET_BACKEND_FEATURES", e))?;
        let device_features = vdpa
            .get_features()
            .map_err(|e| VdpaError::ioctl("VHOST_GET_FEATURES", e))?;
        let num_vqs = vdpa
            .get_vqs_count()
            .map_err(|e| VdpaError::ioctl("VHOST_VDPA_GET_VQS_COUNT", e))?;
        let max_ring = vdpa
            .get_vring_num()
            .map_err(|e| VdpaError::ioctl("VHOST_VDPA_GET_VRING_NUM", e))?;
        let mut config = [0u8; 12];
        let size = vdpa
            .get_config_size()
            .map_err(|e| VdpaError::ioctl("VHOST_VDPA_GET_CONFIG_SIZE", e))?;
        let len = usize::try_from(size).unwrap_or(0).min(config.len());
        if len > 0 {
            vdpa.get_config(0, &mut config[..len])
                .map_err(|e| VdpaError::ioctl("VHOST_VDPA_GET_CONFIG", e))?;
        }
        // Every virtqueue group in address space 0, the one IOTLB the agent
        // maps (the default; set explicitly on a device with several).
        let groups = vdpa.get_group_num().unwrap_or(1);
        if groups > 1 {
            for group in 0..groups {
                uapi::vdpa_set_group_asid(&vdpa, group, 0)
                    .map_err(|e| VdpaError::io("VHOST_VDPA_SET_GROUP_ASID", e))?;
            }
        }
        let mut handle = Handle { vdpa, max_ring };
        handle.set_status(0)?;
        Ok((
            handle,
            Caps {
                device_features,
                backend,
                num_vqs,
                max_ring,
                config,
            },
        ))
    }

    fn iotlb(&self, msg: VhostIotlbMsg, what: &'static str) -> Result<(), VdpaError> {
        self.vdpa
            .send_iotlb_msg(&msg)
            .map_err(|e| VdpaError::ioctl(what, e))
    }
}

impl Ops for Handle {
    fn set_status(&mut self, status: u8) -> Result<(), VdpaError> {
        self.vdpa
            .set_status(status)
            .map_err(|e| VdpaError::ioctl("VHOST_VDPA_SET_STATUS", e))
    }

    fn status(&mut self) -> Result<u8, VdpaError> {
        self.vdpa
            .get_status()
            .map_err(|e| VdpaError::ioctl("VHOST_VDPA_GET_STATUS", e))
    }

    fn set_features(&mut self, features: u64) -> Result<(), VdpaError> {
        self.vdpa
            .set_features(features)
            .map_err(|e| VdpaError::ioctl("VHOST_SET_FEATURES", e))
    }

    fn set_num(&mut self, ring: u16, size: u16) -> Result<(), VdpaError> {
        self.vdpa
            .set_vring_num(usize::from(ring), size)
            .map_err(|e| VdpaError::ioctl("VHOST_SET_VRING_NUM", e))
    }

    fn set_addr(
        &mut self,
        ring: u16,
        size: u16,
        guest: &RingGuestAddresses,
    ) -> Result<(), VdpaError> {
        let config = VringConfigData {
            queue_max_size: self.max_ring,
            queue_size: size,
            flags: 0,
            desc_table_addr: guest.desc_table.0,
            used_ring_addr: guest.used_ring.0,
            avail_ring_addr: guest.avail_ring.0,
            log_addr: None,
        };
        self.vdpa
            .set_vring_addr(usize::from(ring), &config)
            .map_err(|e| VdpaError::ioctl("VHOST_SET_VRING_ADDR", e))
    }

    fn set_base(&mut self, ring: u16, base: u16) -> Result<(), VdpaError> {
        self.vdpa
            .set_vring_base(usize::from(ring), base)
            .map_err(|e| VdpaError::ioctl("VHOST_SET_VRING_BASE", e))
    }

    fn get_base(&mut self, ring: u16) -> Result<u16, VdpaError> {
        let base = self
            .vdpa
            .get_vring_base(usize::from(ring))
            .map_err(|e| VdpaError::ioctl("VHOST_GET_VRING_BASE", e))?;
        u16::try_from(base).map_err(|_| {
            VdpaError::io(
                "VHOST_GET_VRING_BASE",
                std::io::Error::other(format!("base {base:#x} is no split-ring index")),
            )
        })
    }

    fn set_kick(&mut self, ring: u16, kick: Option<&File>) -> Result<(), VdpaError> {
        uapi::set_ring_fd(&self.vdpa, RingFd::Kick, u32::from(ring), kick)
            .map_err(|e| VdpaError::io("VHOST_SET_VRING_KICK", e))
    }

    fn set_call(&mut self, ring: u16, call: Option<&File>) -> Result<(), VdpaError> {
        uapi::set_ring_fd(&self.vdpa, RingFd::Call, u32::from(ring), call)
            .map_err(|e| VdpaError::io("VHOST_SET_VRING_CALL", e))
    }

    fn set_ready(&mut self, ring: u16, ready: bool) -> Result<(), VdpaError> {
        self.vdpa
            .set_vring_enable(usize::from(ring), ready)
            .map_err(|e| VdpaError::ioctl("VHOST_VDPA_SET_VRING_ENABLE", e))
    }

    fn suspend(&mut self) -> Result<(), VdpaError> {
        self.vdpa
            .suspend()
            .map_err(|e| VdpaError::ioctl("VHOST_VDPA_SUSPEND", e))
    }

    fn resume(&mut self) -> Result<(), VdpaError> {
        uapi::vdpa_resume(&self.vdpa).map_err(|e| VdpaError::io("VHOST_VDPA_RESUME", e))
    }

    fn map(&mut self, iova: u64, size: u64, host: u64) -> Result<(), VdpaError> {
        self.iotlb(
            VhostIotlbMsg {
                iova,
                size,
                userspace_addr: host,
                perm: vhost::VhostAccess::ReadWrite,
                msg_type: VhostIotlbType::Update,
            },
            "VHOST_IOTLB_UPDATE",
        )
    }

    fn unmap(&mut self, iova: u64, size: u64) -> Result<(), VdpaError> {
        self.iotlb(
            VhostIotlbMsg {
                iova,
                size,
                msg_type: VhostIotlbType::Invalidate,
                ..Default::default()
            },
            "VHOST_IOTLB_INVALIDATE",
        )
    }

    fn batch(&mut self, begin: bool) -> Result<(), VdpaError> {
        let (msg_type, what) = if begin {
            (VhostIotlbType::BatchBegin, "VHOST_IOTLB_BATCH_BEGIN")
        } else {
            (VhostIotlbType::BatchEnd, "VHOST_IOTLB_BATCH_END")
        };
        self.iotlb(
            VhostIotlbMsg {
                msg_type,
                ..Default::default()
            },
            what,
        )
    }
}
