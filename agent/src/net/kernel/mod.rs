//! What the two kernel datapaths (the kernel's vhost-net,
//! [`super::vhost_net`], and a vhost-vdpa device, [`super::vdpa`]) share:
//! the memory table the kernel holds and the check that a ring lies inside
//! it ([`table`]), and the vhost ioctls the rust-vmm `vhost` crate lacks or
//! gets wrong ([`uapi`]).

pub mod table;
pub mod uapi;

/// A ring the agent refuses to hand to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum RingCheckError {
    /// A ring part does not lie inside one region of the memory table the
    /// kernel holds: handed on, the kernel (or the device) would read or
    /// write memory that is no guest RAM.
    #[error(
        "queue {ring}: the {part} ({len} bytes at guest address {gpa:#x}) does not lie inside \
         one mapped region of guest memory; refused before it reaches the kernel"
    )]
    Outside {
        /// Virtqueue index.
        ring: u16,
        /// Which part.
        part: &'static str,
        /// Its guest physical address.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// A ring part is misaligned (virtio 1.2 §2.7: 16, 2 and 4 bytes).
    #[error("queue {ring}: the {part} at guest address {gpa:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Virtqueue index.
        ring: u16,
        /// Which part.
        part: &'static str,
        /// Its guest physical address.
        gpa: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A ring size the kernel would refuse.
    #[error("queue {ring}: size {size} is not a power of two up to 32768")]
    Size {
        /// Virtqueue index.
        ring: u16,
        /// The size.
        size: u16,
    },
}

/// The `io::Error` inside a `vhost` crate error (its kernel backends
/// report ioctl and open failures as such).
pub fn io_error(error: vhost::Error) -> std::io::Error {
    match error {
        vhost::Error::IoctlError(e) | vhost::Error::VhostOpen(e) | vhost::Error::IOError(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

/// What a kernel datapath's stop of ring `ring` answers the session: the
/// base and the kick, nothing for a ring that did not run, and on a
/// failure a logged error and NEEDS_RESET (`needs_reset`).
pub fn ring_stopped<E: std::error::Error>(
    name: &str,
    ring: u16,
    result: Result<Option<(u16, std::fs::File)>, E>,
    needs_reset: &std::sync::atomic::AtomicBool,
) -> crate::vhost_user::device::RingStopped {
    use crate::vhost_user::device::RingStopped;
    match result {
        Ok(Some((next_avail, kick))) => RingStopped {
            next_avail,
            kick: Some(kick),
            handed_off: 0,
            io_ring_lost: false,
        },
        Ok(None) => RingStopped::default(),
        Err(e) => {
            log::error!(
                "{name}: queue {ring} did not stop cleanly: {}; the device needs a reset",
                crate::error_chain(&e)
            );
            needs_reset.store(true, std::sync::atomic::Ordering::Release);
            RingStopped::default()
        }
    }
}
