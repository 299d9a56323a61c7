//! What can go wrong with a tap, as one typed error.

use std::io;

use thiserror::Error;

use std::ffi::c_int;

use super::{TapOffloads, MAX_QUEUES, TUN_PATH};

/// What can go wrong with a tap. Every variant names the interface, and
/// where one is involved the queue and the ioctl, so a log line alone says
/// what failed.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name cannot be an interface name; checked before the kernel is
    /// asked, with the kernel's own rules.
    #[error("invalid tap name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The number of queues asked for is 0 or above [`MAX_QUEUES`].
    #[error("tap {ifname}: {queues} queues asked for, a tap has 1..={MAX_QUEUES}")]
    InvalidQueueCount {
        /// The interface name as given.
        ifname: String,
        /// The number asked for.
        queues: u16,
    },
    /// The vnet header length is neither [`VNET_HDR_LEN`] nor
    /// [`VNET_HDR_MRG_RXBUF_LEN`].
    #[error(
        "tap {ifname}: vnet header length {len} is neither 10 (virtio_net_hdr) \
         nor 12 (virtio_net_hdr_mrg_rxbuf / virtio 1.x)"
    )]
    InvalidVnetHdrLen {
        /// The interface name.
        ifname: String,
        /// The length asked for.
        len: usize,
    },
    /// An offload combination the tun driver would refuse.
    #[error("tap {ifname}: offloads {offloads:?} refused: {reason}")]
    InvalidOffloads {
        /// The interface name.
        ifname: String,
        /// The combination asked for.
        offloads: TapOffloads,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A queue index at or beyond the number of queues.
    #[error("tap {ifname}: queue {queue} out of range, the tap has {queues} queues")]
    QueueOutOfRange {
        /// The interface name.
        ifname: String,
        /// The index asked for.
        queue: u16,
        /// How many queues this device has.
        queues: u16,
    },
    /// The interface was deleted under us (`ip link del`): the tun driver
    /// answers `EBADFD` on every descriptor. The device is unusable; open
    /// a new one.
    #[error("tap {ifname} queue {queue}: {op} failed: the interface was deleted")]
    Deleted {
        /// The interface name.
        ifname: String,
        /// The queue whose descriptor was used.
        queue: u16,
        /// The system call or ioctl.
        op: &'static str,
    },
    /// A receive buffer cannot even hold the vnet header.
    #[error(
        "tap {ifname} queue {queue}: a {len}-byte receive buffer cannot hold \
         the {vnet_hdr_len}-byte vnet header"
    )]
    BufferTooSmall {
        /// The interface name.
        ifname: String,
        /// The queue.
        queue: u16,
        /// The buffer's length.
        len: usize,
        /// The current vnet header length.
        vnet_hdr_len: usize,
    },
    /// `/dev/net/tun` could not be opened.
    #[error(
        "tap {ifname} queue {queue}: cannot open {TUN_PATH} (is the tun module \
         loaded and are we allowed to use it?): {source}"
    )]
    OpenTun {
        /// The interface name as given.
        ifname: String,
        /// The queue being opened.
        queue: u16,
        /// The error from `open`.
        #[source]
        source: io::Error,
    },
    /// The socket for interface ioctls (MTU, flags) could not be created.
    #[error("tap {ifname}: cannot create a socket for interface ioctls: {source}")]
    ControlSocket {
        /// The interface name.
        ifname: String,
        /// The error from `socket`.
        #[source]
        source: io::Error,
    },
    /// An ioctl on one queue's descriptor failed.
    #[error("tap {ifname} queue {queue}: {ioctl} failed: {source}")]
    QueueIoctl {
        /// The ioctl, with a hint where one helps.
        ioctl: &'static str,
        /// The interface name.
        ifname: String,
        /// The queue whose descriptor was used.
        queue: u16,
        /// The error from `ioctl`.
        #[source]
        source: io::Error,
    },
    /// An ioctl on the interface (through the control socket) failed.
    #[error("tap {ifname}: {ioctl} failed: {source}")]
    IfIoctl {
        /// The ioctl.
        ioctl: &'static str,
        /// The interface name.
        ifname: String,
        /// The error from `ioctl`.
        #[source]
        source: io::Error,
    },
    /// The kernel reported an MTU that does not fit a `u16`.
    #[error("tap {ifname}: SIOCGIFMTU reported {mtu}, outside 0..=65535")]
    MtuOutOfRange {
        /// The interface name.
        ifname: String,
        /// The value reported.
        mtu: c_int,
    },
    /// Reading or writing a frame failed for a reason other than "would
    /// block" or "interface down". For a write this is usually a frame the
    /// kernel refuses (one shorter than the vnet header, or a malformed
    /// header, gives `EINVAL`); the queue stays usable.
    #[error("tap {ifname} queue {queue}: {op} failed: {source}")]
    Io {
        /// `read`, `readv`, `write` or `writev`.
        op: &'static str,
        /// The interface name.
        ifname: String,
        /// The queue.
        queue: u16,
        /// The error from the system call.
        #[source]
        source: io::Error,
    },
}
