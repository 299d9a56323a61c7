//! Why the kernel's vhost-net could not be used or refused a step.

use std::io;

use netdev::tap::TapError;

/// The kernel's vhost-net device node.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";

/// What went wrong with a vhost-net device (each variant names what it
/// concerns: the device, a queue pair, a ring).
#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    /// The agent cannot use the kernel's vhost-net at all. There is no
    /// fallback to copying frames: the device is not served.
    #[error("dataplane={dataplane} needs {VHOST_NET_PATH}, which {problem}; {fix}")]
    Unavailable {
        /// The dataplane as configured (`vhost-net:TAP`).
        dataplane: String,
        /// What is wrong with the device node.
        problem: &'static str,
        /// How to fix it.
        fix: &'static str,
        /// The error the kernel gave.
        #[source]
        source: io::Error,
    },
    /// An ioctl on a pair's vhost-net device failed.
    #[error("queue pair {pair}: {ioctl} failed")]
    Ioctl {
        /// The pair.
        pair: u16,
        /// The ioctl.
        ioctl: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A ring the agent refuses to hand to the kernel.
    #[error(transparent)]
    Ring(#[from] crate::net::kernel::RingCheckError),
    /// A ring step came before what it needs.
    #[error("queue {ring}: {what} is not set yet")]
    RingIncomplete {
        /// Virtqueue index.
        ring: u16,
        /// What is missing.
        what: &'static str,
    },
    /// A ring step for a pair whose vhost-net device does not exist.
    #[error("queue pair {pair} has no vhost-net device yet (no create_queue ran for it)")]
    NoQueue {
        /// The pair.
        pair: u16,
    },
    /// A region that a running ring lies in would leave the kernel's table.
    #[error("queue {ring} lies in guest memory that is being unmapped; stop it first")]
    RegionInUse {
        /// Virtqueue index.
        ring: u16,
    },
    /// The dirty log has no bits for part of guest memory: the kernel
    /// would set bits past the log's mapping, in other memory of the agent.
    #[error(
        "the dirty log ({log_bytes} bytes) does not cover guest memory up to {end:#x}: \
         the kernel would write past it"
    )]
    LogTooSmall {
        /// The log's size.
        log_bytes: usize,
        /// The end of guest memory.
        end: u64,
    },
    /// The kernel picks RX queues (the tap spreads flows); the agent
    /// cannot steer.
    #[error("vhost-net cannot steer received frames: RSS is not available")]
    NoSteering,
    /// The tap failed.
    #[error(transparent)]
    Tap(#[from] TapError),
}

impl VhostNetError {
    /// The error for a failed open (or VHOST_SET_OWNER) of the device node
    /// while setting up `dataplane`: what is wrong and how to fix it.
    pub fn unavailable(dataplane: &str, source: io::Error) -> VhostNetError {
        let (problem, fix) = match source.raw_os_error() {
            Some(libc::ENOENT) => (
                "does not exist",
                "load the vhost_net module (`modprobe vhost_net`) or run the agent on a kernel \
                 that has vhost-net (CONFIG_VHOST_NET)",
            ),
            Some(libc::ENODEV) | Some(libc::ENXIO) => (
                "has no driver behind it",
                "load the vhost_net module (`modprobe vhost_net`)",
            ),
            Some(libc::EACCES) | Some(libc::EPERM) => (
                "refused access",
                "run the agent as root or give its user access to /dev/vhost-net",
            ),
            _ => (
                "cannot be used",
                "check that the vhost_net module is loaded and the device node is usable",
            ),
        };
        VhostNetError::Unavailable {
            dataplane: dataplane.to_string(),
            problem,
            fix,
            source,
        }
    }
}

pub use crate::net::kernel::io_error;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_node_names_the_dataplane_and_the_fix() {
        let e =
            VhostNetError::unavailable("vhost-net:vh0", io::Error::from_raw_os_error(libc::ENOENT));
        let text = crate::error_chain(&e);
        assert!(
            text.starts_with(
                "dataplane=vhost-net:vh0 needs /dev/vhost-net, which does not exist; \
                 load the vhost_net module"
            ),
            "{text}"
        );
        assert!(text.contains("modprobe vhost_net"), "{text}");
        let e =
            VhostNetError::unavailable("vhost-net:vh1", io::Error::from_raw_os_error(libc::EACCES));
        assert!(e.to_string().contains("refused access"), "{e}");
    }
}
