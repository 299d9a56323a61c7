//! The driver side of a vhost-vdpa device (`/dev/vhost-vdpa-N`), as a
//! front-end uses it: ownership, features, status, IOTLB updates (written
//! as `vhost_msg_v2` messages), and per-virtqueue set-up, enable and base.
//! Used by `vdpa-frontend`, the lab's own minimal front-end.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::sys;
use crate::uapi;

/// A vhost-vdpa call failed.
#[derive(Debug, thiserror::Error)]
pub enum VdpaError {
    /// Opening the device node failed.
    #[error("opening {path}")]
    Open {
        /// The node.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing an IOTLB message failed.
    #[error("IOTLB {op} of IOVA {iova:#x} (+{size:#x})")]
    Iotlb {
        /// Update or invalidate.
        op: &'static str,
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// An open vhost-vdpa device whose owner we are.
pub struct VhostVdpa {
    file: File,
}

impl VhostVdpa {
    /// Open `path` and take VHOST_SET_OWNER.
    pub fn open(path: &Path) -> Result<VhostVdpa, VdpaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| VdpaError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let dev = VhostVdpa { file };
        sys::ioctl_none(&dev.file, uapi::VHOST_SET_OWNER).map_err(err("VHOST_SET_OWNER"))?;
        Ok(dev)
    }

    fn buf(
        &self,
        op: &'static str,
        request: u64,
        buf: &mut [u8],
        extra: usize,
    ) -> Result<(), VdpaError> {
        sys::ioctl_buf(&self.file, request, buf, extra)
            .map(|_| ())
            .map_err(err(op))
    }

    fn get_u64(&self, op: &'static str, request: u64) -> Result<u64, VdpaError> {
        let mut b = [0u8; 8];
        self.buf(op, request, &mut b, 0)?;
        Ok(u64::from_ne_bytes(b))
    }

    fn set_u64(&self, op: &'static str, request: u64, value: u64) -> Result<(), VdpaError> {
        let mut b = value.to_ne_bytes();
        self.buf(op, request, &mut b, 0)
    }

    /// VHOST_GET_FEATURES: what the device offers.
    pub fn features(&self) -> Result<u64, VdpaError> {
        self.get_u64("VHOST_GET_FEATURES", uapi::VHOST_GET_FEATURES)
    }

    /// VHOST_SET_FEATURES.
    pub fn set_features(&self, features: u64) -> Result<(), VdpaError> {
        self.set_u64("VHOST_SET_FEATURES", uapi::VHOST_SET_FEATURES, features)
    }

    /// VHOST_GET_BACKEND_FEATURES.
    pub fn backend_features(&self) -> Result<u64, VdpaError> {
        self.get_u64(
            "VHOST_GET_BACKEND_FEATURES",
            uapi::VHOST_GET_BACKEND_FEATURES,
        )
    }

    /// VHOST_SET_BACKEND_FEATURES.
    pub fn set_backend_features(&self, features: u64) -> Result<(), VdpaError> {
        self.set_u64(
            "VHOST_SET_BACKEND_FEATURES",
            uapi::VHOST_SET_BACKEND_FEATURES,
            features,
        )
    }

    /// VHOST_VDPA_GET_VQS_COUNT.
    pub fn vq_count(&self) -> Result<u32, VdpaError> {
        let mut b = [0u8; 4];
        self.buf(
            "VHOST_VDPA_GET_VQS_COUNT",
            uapi::VHOST_VDPA_GET_VQS_COUNT,
            &mut b,
            0,
        )?;
        Ok(u32::from_ne_bytes(b))
    }

    /// VHOST_VDPA_GET_CONFIG: `len` bytes of the config space at `offset`.
    pub fn config(&self, offset: u32, len: u32) -> Result<Vec<u8>, VdpaError> {
        let mut buf = uapi::encode_vdpa_config_request(offset, len);
        self.buf(
            "VHOST_VDPA_GET_CONFIG",
            uapi::VHOST_VDPA_GET_CONFIG,
            &mut buf,
            len as usize,
        )?;
        Ok(buf[8..].to_vec())
    }

    /// VHOST_VDPA_GET_STATUS.
    pub fn status(&self) -> Result<u8, VdpaError> {
        let mut b = [0u8; 1];
        self.buf(
            "VHOST_VDPA_GET_STATUS",
            uapi::VHOST_VDPA_GET_STATUS,
            &mut b,
            0,
        )?;
        Ok(b[0])
    }

    /// VHOST_VDPA_SET_STATUS (0 resets the device).
    pub fn set_status(&self, status: u8) -> Result<(), VdpaError> {
        let mut b = [status];
        self.buf(
            "VHOST_VDPA_SET_STATUS",
            uapi::VHOST_VDPA_SET_STATUS,
            &mut b,
            0,
        )
    }

    /// Map `[iova, iova + size)` to our memory at `uaddr` (read-write).
    pub fn iotlb_update(&mut self, iova: u64, size: u64, uaddr: u64) -> Result<(), VdpaError> {
        let msg =
            uapi::encode_iotlb_msg(uapi::VHOST_IOTLB_UPDATE, iova, size, uaddr, uapi::ACCESS_RW);
        self.file
            .write_all(&msg)
            .map_err(|source| VdpaError::Iotlb {
                op: "update",
                iova,
                size,
                source,
            })
    }

    /// Unmap `[iova, iova + size)`.
    pub fn iotlb_invalidate(&mut self, iova: u64, size: u64) -> Result<(), VdpaError> {
        let msg = uapi::encode_iotlb_msg(uapi::VHOST_IOTLB_INVALIDATE, iova, size, 0, 0);
        self.file
            .write_all(&msg)
            .map_err(|source| VdpaError::Iotlb {
                op: "invalidate",
                iova,
                size,
                source,
            })
    }

    /// SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK and
    /// SET_VRING_CALL for queue `index`.
    pub fn setup_vring(&self, index: u32, ring: &VringSetup) -> Result<(), VdpaError> {
        let mut num = uapi::encode_vring_state(index, ring.size);
        self.buf(
            "VHOST_SET_VRING_NUM",
            uapi::VHOST_SET_VRING_NUM,
            &mut num,
            0,
        )?;
        let mut base = uapi::encode_vring_state(index, u32::from(ring.base));
        self.buf(
            "VHOST_SET_VRING_BASE",
            uapi::VHOST_SET_VRING_BASE,
            &mut base,
            0,
        )?;
        let mut addr = uapi::encode_vring_addr(index, ring.desc, ring.avail, ring.used);
        self.buf(
            "VHOST_SET_VRING_ADDR",
            uapi::VHOST_SET_VRING_ADDR,
            &mut addr,
            0,
        )?;
        let mut kick = fd_state(index, ring.kick_fd);
        self.buf(
            "VHOST_SET_VRING_KICK",
            uapi::VHOST_SET_VRING_KICK,
            &mut kick,
            0,
        )?;
        let mut call = fd_state(index, ring.call_fd);
        self.buf(
            "VHOST_SET_VRING_CALL",
            uapi::VHOST_SET_VRING_CALL,
            &mut call,
            0,
        )
    }

    /// VHOST_VDPA_SET_VRING_ENABLE.
    pub fn enable_vring(&self, index: u32, enable: bool) -> Result<(), VdpaError> {
        let mut state = uapi::encode_vring_state(index, u32::from(enable));
        self.buf(
            "VHOST_VDPA_SET_VRING_ENABLE",
            uapi::VHOST_VDPA_SET_VRING_ENABLE,
            &mut state,
            0,
        )
    }

    /// VHOST_GET_VRING_BASE: where the device is in queue `index`.
    pub fn vring_base(&self, index: u32) -> Result<u16, VdpaError> {
        let mut state = uapi::encode_vring_state(index, 0);
        self.buf(
            "VHOST_GET_VRING_BASE",
            uapi::VHOST_GET_VRING_BASE,
            &mut state,
            0,
        )?;
        // The split ring's index is the low 16 bits.
        Ok((uapi::decode_vring_state_num(&state) & 0xffff) as u16)
    }
}

/// What one virtqueue is set up with.
#[derive(Debug, Clone, Copy)]
pub struct VringSetup {
    /// Ring size.
    pub size: u32,
    /// Where the device starts in the avail ring.
    pub base: u16,
    /// IOVA of the descriptor table.
    pub desc: u64,
    /// IOVA of the avail ring.
    pub avail: u64,
    /// IOVA of the used ring.
    pub used: u64,
    /// The eventfd we kick.
    pub kick_fd: RawFd,
    /// The eventfd the device signals.
    pub call_fd: RawFd,
}

fn fd_state(index: u32, fd: RawFd) -> [u8; 8] {
    let mut buf = uapi::encode_vring_state(index, 0);
    buf[4..8].copy_from_slice(&fd.to_ne_bytes());
    buf
}

fn err(op: &'static str) -> impl FnOnce(io::Error) -> VdpaError {
    move |source| VdpaError::Ioctl { op, source }
}
