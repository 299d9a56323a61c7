//! Checks of the lab kernel's vhost character devices: open one, become
//! its owner (VHOST_SET_OWNER), read what it offers. `lab-probe` prints
//! the results for the lab's smoke test.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::sys;
use crate::uapi;

/// A probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The device node could not be opened.
    #[error("opening {path}")]
    Open {
        /// The node.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{op} on {path}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The node.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// What a vhost device reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhostInfo {
    /// VHOST_GET_FEATURES after VHOST_SET_OWNER.
    pub features: u64,
    /// VHOST_GET_BACKEND_FEATURES.
    pub backend_features: u64,
    /// vhost-vdpa only: VHOST_VDPA_GET_DEVICE_ID.
    pub device_id: Option<u32>,
    /// vhost-vdpa only: VHOST_VDPA_GET_VRING_NUM.
    pub vring_num: Option<u16>,
    /// vhost-vdpa net only: the MAC from VHOST_VDPA_GET_CONFIG.
    pub mac: Option<[u8; 6]>,
}

struct Node<'a> {
    file: File,
    path: &'a Path,
}

impl Node<'_> {
    fn buf(
        &self,
        op: &'static str,
        request: u64,
        buf: &mut [u8],
        extra: usize,
    ) -> Result<(), ProbeError> {
        sys::ioctl_buf(&self.file, request, buf, extra)
            .map(|_| ())
            .map_err(|source| ProbeError::Ioctl {
                op,
                path: self.path.to_path_buf(),
                source,
            })
    }

    fn u64(&self, op: &'static str, request: u64) -> Result<u64, ProbeError> {
        let mut b = [0u8; 8];
        self.buf(op, request, &mut b, 0)?;
        Ok(u64::from_ne_bytes(b))
    }
}

fn open(path: &Path) -> Result<Node<'_>, ProbeError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| ProbeError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Node { file, path })
}

/// Open a vhost device (`/dev/vhost-net`, `/dev/vhost-vdpa-N`), take
/// ownership and read its features; for vhost-vdpa (`vdpa`) also its
/// device id, ring size and, for a net device, its MAC.
pub fn probe(path: &Path, vdpa: bool) -> Result<VhostInfo, ProbeError> {
    let node = open(path)?;
    sys::ioctl_none(&node.file, uapi::VHOST_SET_OWNER).map_err(|source| ProbeError::Ioctl {
        op: "VHOST_SET_OWNER",
        path: path.to_path_buf(),
        source,
    })?;
    let mut info = VhostInfo {
        features: node.u64("VHOST_GET_FEATURES", uapi::VHOST_GET_FEATURES)?,
        backend_features: node.u64(
            "VHOST_GET_BACKEND_FEATURES",
            uapi::VHOST_GET_BACKEND_FEATURES,
        )?,
        ..VhostInfo::default()
    };
    if vdpa {
        let mut id = [0u8; 4];
        node.buf(
            "VHOST_VDPA_GET_DEVICE_ID",
            uapi::VHOST_VDPA_GET_DEVICE_ID,
            &mut id,
            0,
        )?;
        info.device_id = Some(u32::from_ne_bytes(id));
        let mut num = [0u8; 2];
        node.buf(
            "VHOST_VDPA_GET_VRING_NUM",
            uapi::VHOST_VDPA_GET_VRING_NUM,
            &mut num,
            0,
        )?;
        info.vring_num = Some(u16::from_ne_bytes(num));
        if info.device_id == Some(1) {
            let mut config = uapi::encode_vdpa_config_request(0, 6);
            node.buf(
                "VHOST_VDPA_GET_CONFIG",
                uapi::VHOST_VDPA_GET_CONFIG,
                &mut config,
                6,
            )?;
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&config[8..14]);
            info.mac = Some(mac);
        }
    }
    Ok(info)
}
