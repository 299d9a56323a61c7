//! A VDUSE device through its two character devices: `/dev/vduse/control`
//! creates and destroys it, `/dev/vduse/NAME` carries its virtqueue set-up,
//! kicks, interrupts, IOTLB look-ups and the control requests the kernel
//! sends (Documentation/userspace-api/vduse.rst).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::sys;
use crate::uapi::{self, DevConfig, IotlbEntry, Request, VqInfo};

/// The control device.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// A VDUSE operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VduseError {
    /// Opening a VDUSE character device failed.
    #[error("opening {path}")]
    Open {
        /// The device node.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The device name is empty, too long, or holds `/` or NUL.
    #[error("invalid VDUSE device name {0:?}")]
    Name(String),
    /// An ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl's name.
        op: &'static str,
        /// Cause (EINVAL from VDUSE_CREATE_DEV: a refused configuration).
        #[source]
        source: io::Error,
    },
    /// Reading a request or writing a response failed.
    #[error("{op} on the VDUSE device failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl VduseError {
    /// The errno of the failed call, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VduseError::Open { source, .. }
            | VduseError::Ioctl { source, .. }
            | VduseError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn ioctl_err(op: &'static str) -> impl FnOnce(io::Error) -> VduseError {
    move |source| VduseError::Ioctl { op, source }
}

/// `/dev/vduse/control`, with API version 0 agreed.
pub struct Control {
    file: File,
}

impl Control {
    /// Open the control device and agree on API version 0.
    pub fn open() -> Result<Control, VduseError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|source| VduseError::Open {
                path: CONTROL_PATH.into(),
                source,
            })?;
        let mut version = [0u8; 8];
        sys::ioctl_buf(&file, uapi::VDUSE_GET_API_VERSION, &mut version, 0)
            .map_err(ioctl_err("VDUSE_GET_API_VERSION"))?;
        log::debug!("kernel VDUSE API version {}", u64::from_ne_bytes(version));
        // Every kernel accepts version 0 (the one Linux 6.12 speaks).
        let mut ours = uapi::VDUSE_API_VERSION.to_ne_bytes();
        sys::ioctl_buf(&file, uapi::VDUSE_SET_API_VERSION, &mut ours, 0)
            .map_err(ioctl_err("VDUSE_SET_API_VERSION"))?;
        Ok(Control { file })
    }

    /// `VDUSE_CREATE_DEV`.
    pub fn create(&self, config: &DevConfig) -> Result<(), VduseError> {
        let mut buf = config.encode();
        // The kernel reads config_size (= config.len()) bytes past the
        // fixed part, which `encode` appended.
        sys::ioctl_buf(
            &self.file,
            uapi::VDUSE_CREATE_DEV,
            &mut buf,
            config.config.len(),
        )
        .map_err(ioctl_err("VDUSE_CREATE_DEV"))?;
        Ok(())
    }

    /// `VDUSE_DESTROY_DEV` (EBUSY while the device is open or still a vDPA
    /// device).
    pub fn destroy(&self, name: &str) -> Result<(), VduseError> {
        let mut buf = uapi::encode_name(name).ok_or_else(|| VduseError::Name(name.to_string()))?;
        sys::ioctl_buf(&self.file, uapi::VDUSE_DESTROY_DEV, &mut buf, 0)
            .map_err(ioctl_err("VDUSE_DESTROY_DEV"))?;
        Ok(())
    }
}

/// `/dev/vduse/NAME`, open (only one process may hold it).
pub struct Device {
    file: File,
    path: PathBuf,
}

impl Device {
    /// Open the device node of the device `name`, non-blocking (reads of
    /// requests return None when none is pending).
    pub fn open(name: &str) -> Result<Device, VduseError> {
        let path = Path::new("/dev/vduse").join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| VduseError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(Device { file, path })
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `VDUSE_VQ_SETUP`: queue `index` holds up to `max_size` descriptors.
    pub fn setup_vq(&self, index: u32, max_size: u16) -> Result<(), VduseError> {
        let mut buf = uapi::encode_vq_config(index, max_size);
        sys::ioctl_buf(&self.file, uapi::VDUSE_VQ_SETUP, &mut buf, 0)
            .map_err(ioctl_err("VDUSE_VQ_SETUP"))?;
        Ok(())
    }

    /// `VDUSE_VQ_GET_INFO`.
    pub fn vq_info(&self, index: u32) -> Result<VqInfo, VduseError> {
        let mut buf = VqInfo::request(index);
        sys::ioctl_buf(&self.file, uapi::VDUSE_VQ_GET_INFO, &mut buf, 0)
            .map_err(ioctl_err("VDUSE_VQ_GET_INFO"))?;
        Ok(VqInfo::decode(&buf))
    }

    /// `VDUSE_VQ_SETUP_KICKFD`: the kernel signals `fd` when the driver
    /// kicks queue `index` (None: stop).
    pub fn set_kickfd(&self, index: u32, fd: Option<RawFd>) -> Result<(), VduseError> {
        let mut buf = uapi::encode_vq_eventfd(index, fd.unwrap_or(uapi::EVENTFD_DEASSIGN));
        sys::ioctl_buf(&self.file, uapi::VDUSE_VQ_SETUP_KICKFD, &mut buf, 0)
            .map_err(ioctl_err("VDUSE_VQ_SETUP_KICKFD"))?;
        Ok(())
    }

    /// `VDUSE_VQ_INJECT_IRQ`: interrupt the driver for queue `index`.
    pub fn inject_irq(&self, index: u32) -> Result<(), VduseError> {
        let mut buf = index.to_ne_bytes();
        sys::ioctl_buf(&self.file, uapi::VDUSE_VQ_INJECT_IRQ, &mut buf, 0)
            .map_err(ioctl_err("VDUSE_VQ_INJECT_IRQ"))?;
        Ok(())
    }

    /// `VDUSE_DEV_GET_FEATURES`: what the driver accepted.
    pub fn driver_features(&self) -> Result<u64, VduseError> {
        let mut buf = [0u8; 8];
        sys::ioctl_buf(&self.file, uapi::VDUSE_DEV_GET_FEATURES, &mut buf, 0)
            .map_err(ioctl_err("VDUSE_DEV_GET_FEATURES"))?;
        Ok(u64::from_ne_bytes(buf))
    }

    /// `VDUSE_IOTLB_GET_FD`: the first mapping overlapping `[start, last]`
    /// and a file to mmap it from; None when there is none (EINVAL).
    pub fn iotlb_fd(
        &self,
        start: u64,
        last: u64,
    ) -> Result<Option<(IotlbEntry, File)>, VduseError> {
        let mut buf = IotlbEntry::request(start, last);
        match sys::ioctl_buf(&self.file, uapi::VDUSE_IOTLB_GET_FD, &mut buf, 0) {
            Ok(fd) => {
                let file = sys::adopt_fd(fd).map_err(ioctl_err("VDUSE_IOTLB_GET_FD"))?;
                Ok(Some((IotlbEntry::decode(&buf), file)))
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(source) => Err(VduseError::Ioctl {
                op: "VDUSE_IOTLB_GET_FD",
                source,
            }),
        }
    }

    /// Read one control request; None if none is pending.
    pub fn read_request(&mut self) -> Result<Option<Request>, VduseError> {
        let mut buf = [0u8; uapi::REQUEST_SIZE];
        match self.file.read(&mut buf) {
            Ok(n) if n == buf.len() => Ok(Some(Request::decode(&buf))),
            Ok(n) => Err(VduseError::Io {
                op: "reading a request",
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{n} of {} bytes", buf.len()),
                ),
            }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(source) => Err(VduseError::Io {
                op: "reading a request",
                source,
            }),
        }
    }

    /// Answer request `id`: `ok`, and for GET_VQ_STATE the queue's index and
    /// avail index.
    pub fn respond(
        &mut self,
        id: u32,
        ok: bool,
        vq_state: Option<(u32, u16)>,
    ) -> Result<(), VduseError> {
        let result = if ok {
            uapi::RESULT_OK
        } else {
            uapi::RESULT_FAILED
        };
        let buf = uapi::encode_response(id, result, vq_state);
        self.file.write_all(&buf).map_err(|source| VduseError::Io {
            op: "writing a response",
            source,
        })
    }
}

impl AsRawFd for Device {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
