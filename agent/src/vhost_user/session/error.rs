//! Why the session refused a request. The protocol layer turns a refusal
//! into a NACK (REPLY_ACK), a logged refusal (no reply expected) or, for a
//! request whose reply it cannot make up, a disconnect.

use vhost::vhost_user::Error as VhostError;

use crate::vhost_user::datapath::DatapathError;
use crate::vhost_user::device::DeviceError;
use crate::vhost_user::memory::MemoryError;

/// A request the session refused (module documentation).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The queue index is beyond the device's rings.
    #[error("queue index {0} out of range")]
    QueueIndex(u32),
    /// SET_VRING_NUM with a size that is zero, not a power of two or too big.
    #[error("queue {index}: invalid size {size} (a power of two up to {max})")]
    QueueSize {
        /// Queue index.
        index: u32,
        /// Requested size.
        size: u32,
        /// Largest size we accept.
        max: u16,
    },
    /// SET_VRING_BASE beyond what a split ring's 16-bit index holds.
    #[error("queue {index}: base {base:#x} does not fit a split ring's 16-bit index")]
    RingBase {
        /// Queue index.
        index: u32,
        /// The base sent.
        base: u32,
    },
    /// A ring address does not fall into any memory region.
    #[error("queue {index}: {which} address {addr:#x} is not in any memory region")]
    RingAddress {
        /// Queue index.
        index: u32,
        /// Which ring part.
        which: &'static str,
        /// Front-end virtual address.
        addr: u64,
    },
    /// A ring part does not lie inside one region of guest memory.
    #[error("queue {index}: the {which} ({len} bytes at {addr:#x}) does not lie inside one memory region")]
    RingExtent {
        /// Queue index.
        index: u32,
        /// Which ring part.
        which: &'static str,
        /// Front-end address of its first byte.
        addr: u64,
        /// Its length for the ring's size.
        len: u64,
    },
    /// A kick or call fd that is not an eventfd.
    #[error("queue {index}")]
    NotAnEventfd {
        /// Queue index.
        index: u32,
        /// What it is.
        #[source]
        source: crate::vhost_user::fd_kind::NotAnEventfd,
    },
    /// A ring may not be reconfigured while it runs (vhost-user spec,
    /// "Ring states": stop it with GET_VRING_BASE first).
    #[error("queue {index} is running; {request} must wait until it is stopped")]
    RingRunning {
        /// Queue index.
        index: u32,
        /// The request.
        request: &'static str,
    },
    /// SET_FEATURES acked bits we never offered.
    #[error("front-end acked features {0:#x} we did not offer")]
    Features(u64),
    /// SET_PROTOCOL_FEATURES acked bits we never offered.
    #[error("front-end acked protocol features {0:#x} we did not offer")]
    ProtocolFeatures(u64),
    /// The memory table was refused.
    #[error(transparent)]
    Memory(MemoryError),
    /// SET_LOG_BASE's region could not be mapped.
    #[error("cannot map the dirty log ({size} bytes at offset {offset})")]
    LogMap {
        /// mmap_size from the request.
        size: u64,
        /// mmap_offset from the request.
        offset: u64,
        /// Cause: the fd was refused (not sealed against shrinking, too
        /// small, not memory) or mmap failed.
        #[source]
        source: shm::ShmError,
    },
    /// A config space access out of bounds.
    #[error("config space read of {size} byte(s) at {offset} is out of bounds")]
    ConfigRead {
        /// Offset.
        offset: u32,
        /// Size.
        size: u32,
    },
    /// The device refused the request.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The request needs a feature this device does not implement.
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// The request needs a protocol feature the front-end did not ack.
    #[error("{0} without its protocol feature negotiated")]
    NotNegotiated(&'static str),
    /// The inflight region does not fit the device, or could not be
    /// created or mapped.
    #[error(transparent)]
    Inflight(#[from] blkdev::inflight::InflightError),
    /// A device state transfer failed.
    #[error("device state transfer failed: {0}")]
    Transfer(String),
    /// The configuration the front-end set up does not validate, so no
    /// plan can be made for it.
    #[error("the configuration does not validate")]
    Invalid(#[source] presetup::ConfigError),
    /// A step of the plan failed; the device is configured again from
    /// scratch at the next change.
    #[error("the switchover plan failed at {op}")]
    Plan {
        /// The op that failed.
        op: &'static str,
        /// Cause.
        #[source]
        source: DatapathError,
    },
}

impl From<SessionError> for VhostError {
    fn from(e: SessionError) -> VhostError {
        VhostError::ReqHandlerError(std::io::Error::other(e))
    }
}
