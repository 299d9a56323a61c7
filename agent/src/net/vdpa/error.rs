//! Why a vhost-vdpa device could not be used or refused a step.

use std::io;

use crate::net::kernel::RingCheckError;

/// What went wrong with a vhost-vdpa device.
#[derive(Debug, thiserror::Error)]
pub enum VdpaError {
    /// The device node cannot be used at all: the device is not served.
    #[error("dataplane=vdpa:{path} {problem}; {fix}")]
    Unavailable {
        /// The device node as configured.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
        /// How to fix it.
        fix: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The vDPA device is not a network device.
    #[error("dataplane=vdpa:{path} is a vDPA device of virtio type {device_id}, not a network device (1)")]
    NotNet {
        /// The device node.
        path: String,
        /// Its virtio device id.
        device_id: u32,
    },
    /// The device lacks something the agent needs.
    #[error("dataplane=vdpa:{path}: {what}")]
    Unsuitable {
        /// The device node.
        path: String,
        /// What it lacks.
        what: String,
    },
    /// An ioctl (or IOTLB message) on the device failed.
    #[error("{ioctl} failed")]
    Ioctl {
        /// The request.
        ioctl: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The device did not take a status the agent set (it refused the
    /// features, or failed).
    #[error("the device's status is {got:#x} after setting {wanted:#x}")]
    Status {
        /// The status set.
        wanted: u8,
        /// The status read back.
        got: u8,
    },
    /// A ring the agent refuses to hand to the device.
    #[error(transparent)]
    Ring(#[from] RingCheckError),
    /// A ring step for a ring the device does not have.
    #[error("queue {ring} is beyond the device's {rings} virtqueue(s)")]
    NoRing {
        /// Virtqueue index.
        ring: u16,
        /// Rings the device serves.
        rings: u16,
    },
    /// A region that a running ring lies in would leave the IOTLB.
    #[error("queue {ring} lies in guest memory that is being unmapped; stop it first")]
    RegionInUse {
        /// Virtqueue index.
        ring: u16,
    },
    /// A device of this kind cannot steer received frames for the agent.
    #[error("a vDPA net device without a control virtqueue cannot be given RSS by the agent")]
    NoSteering,
}

impl VdpaError {
    /// The error for a failed open (or VHOST_SET_OWNER) of `path`: what is
    /// wrong and how to fix it.
    pub fn unavailable(path: &str, source: io::Error) -> VdpaError {
        let (problem, fix) = match source.raw_os_error() {
            Some(libc::ENOENT) => (
                "does not exist",
                "create the vDPA device (`vdpa dev add name NAME mgmtdev MGMTDEV`) with the \
                 vhost_vdpa module loaded (`modprobe vhost_vdpa`), and name its /dev/vhost-vdpa-N",
            ),
            Some(libc::EBUSY) => (
                "is busy: another process (or another device of this agent) has it open",
                "give every vDPA net device its own /dev/vhost-vdpa-N, and stop whatever holds it",
            ),
            Some(libc::ENODEV) | Some(libc::ENXIO) => (
                "has no driver behind it",
                "load vhost_vdpa (`modprobe vhost_vdpa`) and bind the vDPA device to it",
            ),
            Some(libc::EACCES) | Some(libc::EPERM) => (
                "refused access",
                "run the agent as root or give its user access to the device node",
            ),
            _ => (
                "cannot be used",
                "check that the vDPA device exists and is bound to vhost_vdpa",
            ),
        };
        VdpaError::Unavailable {
            path: path.to_string(),
            problem,
            fix,
            source,
        }
    }

    /// `ioctl` failed with `source` (a `vhost` crate error).
    pub fn ioctl(ioctl: &'static str, source: vhost::Error) -> VdpaError {
        VdpaError::Ioctl {
            ioctl,
            source: crate::net::kernel::io_error(source),
        }
    }

    /// `ioctl` failed with `source`.
    pub fn io(ioctl: &'static str, source: io::Error) -> VdpaError {
        VdpaError::Ioctl { ioctl, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_busy_node_names_the_dataplane_and_the_fix() {
        let e = VdpaError::unavailable(
            "/dev/vhost-vdpa-7",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        let text = crate::error_chain(&e);
        assert!(
            text.starts_with(
                "dataplane=vdpa:/dev/vhost-vdpa-7 does not exist; create the vDPA device"
            ),
            "{text}"
        );
        let e = VdpaError::unavailable(
            "/dev/vhost-vdpa-0",
            io::Error::from_raw_os_error(libc::EBUSY),
        );
        assert!(e.to_string().contains("is busy"), "{e}");
    }
}
