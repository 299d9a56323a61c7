//! The kernel tap device: the host end of the net dataplane.
//!
//! A guest's virtio-net frames leave through a tap interface and the host's
//! frames for the guest come back through it. [`TapDevice`] opens one with
//! the flags a virtio-net back-end wants:
//!
//! * `IFF_TAP | IFF_NO_PI`: Ethernet frames, no packet-info prefix;
//! * `IFF_VNET_HDR`: every frame carries a virtio-net header, so checksum
//!   and segmentation offloads pass between guest and kernel untouched;
//! * `IFF_MULTI_QUEUE`: one file descriptor per queue pair, each served by
//!   its own worker without a shared lock.
//!
//! All descriptors are non-blocking (the workers wait in epoll/mio, never in
//! `read` or `write`) and close-on-exec (a spawned helper must not keep the
//! tap alive). The tap is never made persistent: it disappears when its
//! last descriptor closes, so an agent that exits or crashes leaves no
//! interface behind. Opening a name that already names a multi-queue tap
//! with the same flags adds our queues to it instead.
//!
//! # What the kernel keeps per device and per queue
//!
//! The vnet header size, the offloads, the MTU and the up/down state belong
//! to the interface, not to a queue: setting them once applies to every
//! queue. `TUNSETVNETHDRSZ` and `TUNSETOFFLOAD` go through queue 0's
//! descriptor, which works whether or not that queue is attached. The MTU
//! and the flags go through an `AF_INET` datagram socket opened together
//! with the queues, so they address the interface in the network namespace
//! it was created in even if the calling thread has moved since.
//!
//! Detaching a queue (`TUNSETQUEUE`) only stops the kernel from steering
//! received frames to it: a detached queue still sends. The kernel answers
//! `EINVAL` to attaching an attached queue or detaching a detached one, so
//! [`TapDevice::set_queue_enabled`] remembers each queue's state.
//!
//! # Byte order of the vnet header
//!
//! The kernel reads and writes the header in the host's byte order, which
//! on little-endian hosts is the byte order of a virtio 1.x device. Nothing
//! here sets `TUNSETVNETLE`; a big-endian host would need it.

use std::ffi::{c_char, c_int, c_short, c_uint, c_ulong};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
};

/// The clone device every tap queue is opened from.
pub const TUN_PATH: &str = "/dev/net/tun";

/// The longest interface name in bytes: the kernel's `IFNAMSIZ` less the
/// terminating NUL. Longer names are refused, never truncated, so the
/// interface is always called what the configuration says.
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// `sizeof(struct virtio_net_hdr)`: the vnet header of a legacy device
/// without `VIRTIO_NET_F_MRG_RXBUF`.
pub const VNET_HDR_LEN: usize = 10;

/// `sizeof(struct virtio_net_hdr_mrg_rxbuf)`, which is also the virtio 1.x
/// header (`virtio_net_hdr_v1`): the common case.
pub const VNET_HDR_MRG_RXBUF_LEN: usize = 12;

/// The longest frame (without vnet header) [`TapDevice::recv`] can return:
/// a 65535-byte IP packet (a GSO packet once TSO or USO is offloaded) behind
/// an Ethernet header and a VLAN tag the kernel puts back in. Receive
/// buffers should hold this plus the vnet header, or frames may arrive
/// cut short.
pub const MAX_FRAME_LEN: usize = 65535 + 14 + 4;

/// The tun driver's limit on queues per tap (`MAX_TAP_QUEUES`).
pub const MAX_QUEUES: u16 = 256;

/// The flags every queue is opened with; see the module documentation.
const TAP_FLAGS: c_int =
    libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;

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

/// The offloads the kernel may use in frames it hands us, i.e. the receive
/// offloads the guest accepted (`VIRTIO_NET_F_GUEST_*`). With one on, a
/// frame read from the tap may carry a partial checksum or be a GSO packet
/// up to 64 KiB, described by its vnet header; with it off the kernel
/// finishes checksums and segments before the frame reaches us.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapOffloads {
    /// Partial checksums (`TUN_F_CSUM`, guest `GUEST_CSUM`). Every other
    /// offload needs it.
    pub csum: bool,
    /// TCP over IPv4 segmentation (`TUN_F_TSO4`, `GUEST_TSO4`).
    pub tso4: bool,
    /// TCP over IPv6 segmentation (`TUN_F_TSO6`, `GUEST_TSO6`).
    pub tso6: bool,
    /// TSO packets with ECN CWR set (`TUN_F_TSO_ECN`, `GUEST_ECN`); needs
    /// `tso4` or `tso6`.
    pub tso_ecn: bool,
    /// UDP fragmentation offload (`TUN_F_UFO`, `GUEST_UFO`). Accepted for
    /// compatibility; current kernels ignore it and never produce UFO.
    pub ufo: bool,
    /// UDP segmentation for IPv4 and IPv6 together (`TUN_F_USO4 |
    /// TUN_F_USO6`, `GUEST_USO4` and `GUEST_USO6`): the tun driver only takes
    /// both at once. Needs Linux 6.2 or later.
    pub uso: bool,
}

impl TapOffloads {
    /// The offloads a driver accepted, from the negotiated virtio-net
    /// feature bits, so the back-end can apply `set_offloads` straight from
    /// `SET_FEATURES`. Bits whose prerequisite is missing (TSO without
    /// `GUEST_CSUM`, ECN without TSO, only one of the USO bits) are dropped,
    /// as the spec forbids a driver to accept them; the tun driver would
    /// refuse the whole set otherwise.
    pub fn from_virtio_features(features: u64) -> TapOffloads {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        let tso4 = csum && has(VIRTIO_NET_F_GUEST_TSO4);
        let tso6 = csum && has(VIRTIO_NET_F_GUEST_TSO6);
        TapOffloads {
            csum,
            tso4,
            tso6,
            tso_ecn: (tso4 || tso6) && has(VIRTIO_NET_F_GUEST_ECN),
            ufo: csum && has(VIRTIO_NET_F_GUEST_UFO),
            uso: csum && has(VIRTIO_NET_F_GUEST_USO4) && has(VIRTIO_NET_F_GUEST_USO6),
        }
    }

    /// The `TUNSETOFFLOAD` argument, or why the tun driver would refuse
    /// this combination (it answers a bare `EINVAL`).
    fn tun_flags(self) -> Result<c_uint, &'static str> {
        if !self.csum && (self.tso4 || self.tso6 || self.tso_ecn || self.ufo || self.uso) {
            return Err("segmentation offloads need csum");
        }
        if self.tso_ecn && !(self.tso4 || self.tso6) {
            return Err("tso_ecn needs tso4 or tso6");
        }
        let mut flags = 0;
        for (on, flag) in [
            (self.csum, libc::TUN_F_CSUM),
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.tso_ecn, libc::TUN_F_TSO_ECN),
            (self.ufo, libc::TUN_F_UFO),
            (self.uso, libc::TUN_F_USO4 | libc::TUN_F_USO6),
        ] {
            if on {
                flags |= flag;
            }
        }
        Ok(flags)
    }
}

/// One queue's descriptor and whether it is attached to the interface.
#[derive(Debug)]
struct Queue {
    fd: OwnedFd,
    attached: AtomicBool,
}

/// One tap interface and our queues on it: the object a net back-end's
/// workers read and write frames through. It is `Send + Sync`; each worker
/// The largest MTU a tap takes: 65535 less the Ethernet header.
pub const MAX_MTU: u16 = 65521;

/// normally uses its own queue index.
#[derive(Debug)]
pub struct TapDevice {
    name: String,
    queues: Vec<Queue>,
    /// `AF_INET` datagram socket for the interface ioctls (MTU, flags),
    /// created in the tap's network namespace.
    ctl: OwnedFd,
    vnet_hdr_len: AtomicUsize,
    /// Held while a queue is attached or detached, so a queue's state and
    /// its `attached` flag change together.
    attach: Mutex<()>,
}

impl TapDevice {
    /// Create the tap `name`, or add `queues` queues to an existing
    /// multi-queue tap of that name, and set its vnet header length to
    /// `vnet_hdr_len` ([`VNET_HDR_LEN`] or [`VNET_HDR_MRG_RXBUF_LEN`]).
    ///
    /// `name` may be a template such as `"tap%d"`; the kernel then picks the
    /// first free number and [`name`](Self::name) says which. A new tap
    /// starts down with the default MTU and no offloads. An existing tap
    /// keeps its MTU, state and offloads, but takes our vnet header length,
    /// which every user of that tap then sees.
    pub fn open(name: &str, queues: u16, vnet_hdr_len: usize) -> Result<TapDevice, TapError> {
        validate_name(name)?;
        if queues == 0 || queues > MAX_QUEUES {
            return Err(TapError::InvalidQueueCount {
                ifname: name.to_owned(),
                queues,
            });
        }
        check_vnet_hdr_len(name, vnet_hdr_len)?;

        let mut ifname = name.to_owned();
        let mut fds = Vec::with_capacity(queues.into());
        for queue in 0..queues {
            let fd = open_tun().map_err(|source| TapError::OpenTun {
                ifname: ifname.clone(),
                queue,
                source,
            })?;
            let mut ifr = ifreq_for(&ifname);
            ifr.ifr_ifru.ifru_flags = TAP_FLAGS as c_short;
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, and
            // `ifr` is one, live and exclusively borrowed for the call.
            unsafe { ioctl_ptr(&fd, libc::TUNSETIFF, &mut ifr) }.map_err(|source| {
                TapError::QueueIoctl {
                    ioctl: "TUNSETIFF (an existing interface of this name must be a \
                             multi-queue tap we may use)",
                    ifname: ifname.clone(),
                    queue,
                    source,
                }
            })?;
            if queue == 0 {
                // The kernel wrote back the name it used (a template is
                // expanded); the other queues must attach to exactly that.
                ifname = name_from_ifreq(&ifr);
            }
            fds.push(fd);
        }

        let ctl = control_socket().map_err(|source| TapError::ControlSocket {
            ifname: ifname.clone(),
            source,
        })?;
        let device = TapDevice {
            name: ifname,
            queues: fds
                .into_iter()
                .map(|fd| Queue {
                    fd,
                    attached: AtomicBool::new(true),
                })
                .collect(),
            ctl,
            vnet_hdr_len: AtomicUsize::new(vnet_hdr_len),
            attach: Mutex::new(()),
        };
        device.set_vnet_hdr_len(vnet_hdr_len)?;
        Ok(device)
    }

    /// The interface name the kernel gave the tap, for logs and for the
    /// ioctls of other tools (a template in [`open`](Self::open) is
    /// expanded here).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many queues this device holds (not counting other users of the
    /// same tap).
    pub fn queues(&self) -> u16 {
        // `open` creates 1..=MAX_QUEUES queues, so this cannot truncate.
        self.queues.len() as u16
    }

    /// The descriptor of queue `queue`, to register with epoll or mio; `None`
    /// for an index out of range. It stays owned by this device.
    pub fn queue_fd(&self, queue: u16) -> Option<RawFd> {
        self.queues
            .get(usize::from(queue))
            .map(|q| q.fd.as_raw_fd())
    }

    /// A second descriptor of queue `queue` (a `dup`, the same tun queue),
    /// for handing the queue to the kernel's vhost-net
    /// (`VHOST_NET_SET_BACKEND` takes a file). Attaching and detaching
    /// stay with this device.
    pub fn queue_file(&self, queue: u16) -> Result<std::fs::File, TapError> {
        let q = self.queue(queue)?;
        let fd =
            q.fd.try_clone()
                .map_err(|source| self.queue_err("dup", queue, source))?;
        Ok(std::fs::File::from(fd))
    }

    /// The vnet header length frames currently carry, so the caller knows
    /// where the Ethernet frame starts.
    pub fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len.load(Ordering::Acquire)
    }

    /// Change the vnet header length (10 or 12), e.g. when the driver's
    /// negotiated features (`VERSION_1`, `MRG_RXBUF`) become known. The
    /// kernel keeps it per interface, so it applies to every queue.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        check_vnet_hdr_len(&self.name, len)?;
        // `len` is 10 or 12.
        let mut size = len as c_int;
        self.tun_ioctl("TUNSETVNETHDRSZ", |fd| {
            // SAFETY: TUNSETVNETHDRSZ reads one `int` from the pointer, and
            // `size` is one, live for the call.
            unsafe { ioctl_ptr(fd, libc::TUNSETVNETHDRSZ, &mut size) }
        })?;
        self.vnet_hdr_len.store(len, Ordering::Release);
        Ok(())
    }

    /// Tell the kernel which offloads it may leave to us in the frames we
    /// read (`TUNSETOFFLOAD`): exactly what the guest accepted, see
    /// [`TapOffloads::from_virtio_features`]. Per interface.
    pub fn set_offloads(&self, offloads: TapOffloads) -> Result<(), TapError> {
        let flags = offloads
            .tun_flags()
            .map_err(|reason| TapError::InvalidOffloads {
                ifname: self.name.clone(),
                offloads,
                reason,
            })?;
        self.set_offload_flags(flags)
    }

    /// `TUNSETOFFLOAD` with raw `TUN_F_*` flags, unchecked.
    fn set_offload_flags(&self, flags: c_uint) -> Result<(), TapError> {
        self.tun_ioctl("TUNSETOFFLOAD", |fd| {
            // SAFETY: TUNSETOFFLOAD takes its argument by value and reads no
            // memory of ours.
            unsafe { ioctl_val(fd, libc::TUNSETOFFLOAD, c_ulong::from(flags)) }
        })
    }

    /// Set the interface MTU (`SIOCSIFMTU`), to match the MTU offered to
    /// the guest (`VIRTIO_NET_F_MTU`). A tap takes 68..=[`MAX_MTU`] (65535 less
    /// the Ethernet header); the kernel answers `EINVAL` otherwise. Needs
    /// `CAP_NET_ADMIN`, unlike using a tap someone else created for us.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name);
        ifr.ifr_ifru.ifru_mtu = c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads one `struct ifreq`, and `ifr` is one,
        // live for the call.
        unsafe { ioctl_ptr(&self.ctl, libc::SIOCSIFMTU as _, &mut ifr) }
            .map_err(|source| self.if_err("SIOCSIFMTU", source))
    }

    /// The interface MTU (`SIOCGIFMTU`), e.g. to fill the device config
    /// space when the host side already set one.
    pub fn mtu(&self) -> Result<u16, TapError> {
        let mut ifr = ifreq_for(&self.name);
        // SAFETY: SIOCGIFMTU reads and writes one `struct ifreq`, and `ifr`
        // is one, live and exclusively borrowed for the call.
        unsafe { ioctl_ptr(&self.ctl, libc::SIOCGIFMTU as _, &mut ifr) }
            .map_err(|source| self.if_err("SIOCGIFMTU", source))?;
        // SAFETY: SIOCGIFMTU filled in the `ifru_mtu` member of the union.
        let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
        u16::try_from(mtu).map_err(|_| TapError::MtuOutOfRange {
            ifname: self.name.clone(),
            mtu,
        })
    }

    /// Bring the interface administratively up or down (`IFF_UP`), so
    /// frames flow only while a guest driver is there to take them.
    pub fn set_up(&self, up: bool) -> Result<(), TapError> {
        let flags = self.if_flags()?;
        let wanted = if up {
            flags | libc::IFF_UP as c_short
        } else {
            flags & !(libc::IFF_UP as c_short)
        };
        if wanted == flags {
            return Ok(());
        }
        let mut ifr = ifreq_for(&self.name);
        ifr.ifr_ifru.ifru_flags = wanted;
        // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, and `ifr` is one,
        // live for the call.
        unsafe { ioctl_ptr(&self.ctl, libc::SIOCSIFFLAGS as _, &mut ifr) }
            .map_err(|source| self.if_err("SIOCSIFFLAGS", source))
    }

    /// Whether the interface is administratively up, so the agent can
    /// mirror the host side's state into the guest's link status.
    pub fn is_up(&self) -> Result<bool, TapError> {
        Ok(self.if_flags()? & libc::IFF_UP as c_short != 0)
    }

    /// Attach (`IFF_ATTACH_QUEUE`) or detach (`IFF_DETACH_QUEUE`) one queue
    /// with `TUNSETQUEUE`, following the queue pairs the guest enables
    /// (`VIRTIO_NET_CTRL_MQ`), so the kernel steers no frames to a queue
    /// nobody serves. A detached queue can still send. Asking for the state
    /// a queue is already in does nothing.
    pub fn set_queue_enabled(&self, queue: u16, enabled: bool) -> Result<(), TapError> {
        let q = self.queue(queue)?;
        let _guard = self.lock_attach();
        if q.attached.load(Ordering::Acquire) == enabled {
            return Ok(());
        }
        let mut ifr = ifreq_for(&self.name);
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        ifr.ifr_ifru.ifru_flags = flag as c_short;
        // SAFETY: TUNSETQUEUE reads one `struct ifreq`, and `ifr` is one,
        // live for the call.
        unsafe { ioctl_ptr(&q.fd, libc::TUNSETQUEUE, &mut ifr) }.map_err(|source| {
            let ioctl = if enabled {
                "TUNSETQUEUE IFF_ATTACH_QUEUE"
            } else {
                "TUNSETQUEUE IFF_DETACH_QUEUE"
            };
            self.queue_err(ioctl, queue, source)
        })?;
        q.attached.store(enabled, Ordering::Release);
        Ok(())
    }

    /// Write one frame, vnet header first, to queue `queue`: a guest's
    /// transmitted frame enters the host here. `Ok(false)` when the frame
    /// was not taken but the queue is fine: the kernel would block, or the
    /// interface is down (the tun driver answers `EIO`). The caller drops
    /// the frame and counts it rather than stall the guest's queue.
    pub fn send(&self, queue: u16, frame: &[u8]) -> Result<bool, TapError> {
        self.send_vectored(queue, &[IoSlice::new(frame)])
    }

    /// [`send`](Self::send) with the frame in pieces (one `writev`), so a
    /// frame can go straight from the guest's descriptors without a copy.
    pub fn send_vectored(&self, queue: u16, parts: &[IoSlice<'_>]) -> Result<bool, TapError> {
        let fd = self.queue(queue)?.fd.as_raw_fd();
        // More than c_int::MAX parts are more than the kernel's limit, which
        // it reports as EINVAL without reading them.
        let count = c_int::try_from(parts.len()).unwrap_or(c_int::MAX);
        let op = if parts.len() == 1 { "write" } else { "writev" };
        let written = retry_eintr(|| {
            // SAFETY: `IoSlice` is ABI-compatible with `struct iovec`, and
            // `parts` holds at least `count` of them, each describing a live
            // buffer that the kernel only reads.
            unsafe { libc::writev(fd, parts.as_ptr().cast(), count) }
        });
        match written {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
            Err(e) => Err(self.io_err(op, queue, e)),
        }
    }

    /// Read one frame, vnet header first, from queue `queue` into `buf`:
    /// frames for the guest leave the host here. `Ok(None)` when no frame
    /// is waiting (also while the interface is down).
    ///
    /// `buf` should hold [`vnet_hdr_len`](Self::vnet_hdr_len) plus
    /// [`MAX_FRAME_LEN`] bytes: the kernel cuts a longer frame short
    /// without saying so (the length returned is then `buf.len()`) and
    /// drops the rest. With a 12-byte header the kernel writes
    /// `num_buffers` as 0; a back-end with mergeable buffers fills it in.
    pub fn recv(&self, queue: u16, buf: &mut [u8]) -> Result<Option<usize>, TapError> {
        self.recv_vectored(queue, &mut [IoSliceMut::new(buf)])
    }

    /// [`recv`](Self::recv) into several buffers (one `readv`), so a frame
    /// can go straight into the guest's descriptors without a copy.
    pub fn recv_vectored(
        &self,
        queue: u16,
        parts: &mut [IoSliceMut<'_>],
    ) -> Result<Option<usize>, TapError> {
        let fd = self.queue(queue)?.fd.as_raw_fd();
        let len = parts
            .iter()
            .map(|p| p.len())
            .fold(0usize, usize::saturating_add);
        let vnet_hdr_len = self.vnet_hdr_len();
        if len < vnet_hdr_len {
            // The kernel would answer a bare EINVAL.
            return Err(TapError::BufferTooSmall {
                ifname: self.name.clone(),
                queue,
                len,
                vnet_hdr_len,
            });
        }
        let count = c_int::try_from(parts.len()).unwrap_or(c_int::MAX);
        let op = if parts.len() == 1 { "read" } else { "readv" };
        let read = retry_eintr(|| {
            // SAFETY: `IoSliceMut` is ABI-compatible with `struct iovec`, and
            // `parts` holds at least `count` of them, each describing a live
            // buffer we borrow exclusively for the call.
            unsafe { libc::readv(fd, parts.as_mut_ptr().cast(), count) }
        });
        match read {
            // A non-negative ssize_t always fits a usize.
            Ok(n) => Ok(Some(n as usize)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(self.io_err(op, queue, e)),
        }
    }

    /// Queue `queue`, or the error for an index out of range.
    fn queue(&self, queue: u16) -> Result<&Queue, TapError> {
        self.queues
            .get(usize::from(queue))
            .ok_or_else(|| TapError::QueueOutOfRange {
                ifname: self.name.clone(),
                queue,
                queues: self.queues(),
            })
    }

    fn lock_attach(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data, so a panic while it was held left
        // nothing inconsistent behind.
        self.attach.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run a per-interface tun ioctl through queue 0, which every device
    /// has and which takes them attached or not.
    fn tun_ioctl(
        &self,
        ioctl: &'static str,
        f: impl FnOnce(&OwnedFd) -> io::Result<()>,
    ) -> Result<(), TapError> {
        f(&self.queues[0].fd).map_err(|source| self.queue_err(ioctl, 0, source))
    }

    fn if_flags(&self) -> Result<c_short, TapError> {
        let mut ifr = ifreq_for(&self.name);
        // SAFETY: SIOCGIFFLAGS reads and writes one `struct ifreq`, and `ifr`
        // is one, live and exclusively borrowed for the call.
        unsafe { ioctl_ptr(&self.ctl, libc::SIOCGIFFLAGS as _, &mut ifr) }
            .map_err(|source| self.if_err("SIOCGIFFLAGS", source))?;
        // SAFETY: SIOCGIFFLAGS filled in the `ifru_flags` member of the union.
        Ok(unsafe { ifr.ifr_ifru.ifru_flags })
    }

    fn if_err(&self, ioctl: &'static str, source: io::Error) -> TapError {
        TapError::IfIoctl {
            ioctl,
            ifname: self.name.clone(),
            source,
        }
    }

    fn queue_err(&self, ioctl: &'static str, queue: u16, source: io::Error) -> TapError {
        if source.raw_os_error() == Some(libc::EBADFD) {
            return self.deleted(ioctl, queue);
        }
        TapError::QueueIoctl {
            ioctl,
            ifname: self.name.clone(),
            queue,
            source,
        }
    }

    fn deleted(&self, op: &'static str, queue: u16) -> TapError {
        TapError::Deleted {
            ifname: self.name.clone(),
            queue,
            op,
        }
    }

    fn io_err(&self, op: &'static str, queue: u16, source: io::Error) -> TapError {
        if source.raw_os_error() == Some(libc::EBADFD) {
            return self.deleted(op, queue);
        }
        TapError::Io {
            op,
            ifname: self.name.clone(),
            queue,
            source,
        }
    }
}

/// Check `name` against the kernel's rules for interface names
/// (`dev_valid_name`, and `dev_alloc_name` for a `%d` template).
fn validate_name(name: &str) -> Result<(), TapError> {
    let invalid = |reason| {
        Err(TapError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty (use a template such as \"tap%d\" for a kernel-chosen name)");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("longer than 15 bytes (IFNAMSIZ - 1)");
    }
    if name == "." || name == ".." {
        return invalid("\".\" and \"..\" are reserved");
    }
    // The kernel's isspace() also takes 0xa0 (Latin-1 no-break space),
    // which occurs inside UTF-8 sequences.
    if name.bytes().any(|b| {
        matches!(
            b,
            b'/' | b':' | 0 | b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0
        )
    }) {
        return invalid("contains '/', ':', NUL or white space");
    }
    if let Some(at) = name.find('%') {
        if !name[at..].starts_with("%d") || name[at + 2..].contains('%') {
            return invalid("'%' may only appear once, as the template \"%d\"");
        }
    }
    Ok(())
}

fn check_vnet_hdr_len(ifname: &str, len: usize) -> Result<(), TapError> {
    if len == VNET_HDR_LEN || len == VNET_HDR_MRG_RXBUF_LEN {
        Ok(())
    } else {
        Err(TapError::InvalidVnetHdrLen {
            ifname: ifname.to_owned(),
            len,
        })
    }
}

/// A zeroed `struct ifreq` naming `name`. Longer names are cut to fit (the
/// names used here are validated or come from the kernel, so none is).
fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (a name array and a union of
    // integers, arrays, sockaddrs and a pointer) for which all zeroes is a
    // valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name[..MAX_NAME_LEN].iter_mut().zip(name.bytes()) {
        *dst = src as c_char;
    }
    ifr
}

/// The NUL-terminated name the kernel wrote into `ifr`.
fn name_from_ifreq(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn open_tun() -> io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a NUL-terminated string; open has no other
    // preconditions.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(fd, request, arg)` for requests that take a pointer.
///
/// # Safety
///
/// `request` must read and write no more than one `T` through the pointer.
unsafe fn ioctl_ptr<T>(fd: &impl AsRawFd, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: the caller vouches that `request` stays within `*arg`, which
    // is live and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, request, value)` for requests that take an integer by value.
///
/// # Safety
///
/// `request` must not treat `value` as a pointer.
unsafe fn ioctl_val(fd: &impl AsRawFd, request: libc::Ioctl, value: c_ulong) -> io::Result<()> {
    // SAFETY: the caller vouches that `request` touches no memory of ours.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, value) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Run a read or write system call again while it is interrupted.
fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<isize> {
    loop {
        let rc = call();
        if rc >= 0 {
            return Ok(rc);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::path::Path;
    use std::thread::sleep;
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM;

    /// How long a test waits for a frame before it fails.
    const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

    /// An EtherType for local experiments (IEEE 802), which no protocol on
    /// the test's interfaces answers.
    const ETHERTYPE_TEST: [u8; 2] = [0x88, 0xb5];

    /// Move this test's thread into a fresh network namespace, so nothing a
    /// test does reaches the host's network, and the namespace with every
    /// tap in it goes away with the test. Fails loudly where that is not
    /// possible: these tests are meant to run (as root), not to be skipped.
    fn enter_fresh_netns() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the tap tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network \
             namespaces and taps; run them as root (CI does), they are not skipped"
        );
        assert!(
            Path::new(TUN_PATH).exists(),
            "{TUN_PATH} is missing: the tap tests need the tun driver (modprobe tun)"
        );
        // SAFETY: unshare only changes which namespace this thread is in.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) failed: {}",
            io::Error::last_os_error()
        );
    }

    /// The interface index of `name` in this thread's namespace, 0 if there
    /// is no such interface.
    fn ifindex(name: &str) -> u32 {
        let name = CString::new(name).unwrap();
        // SAFETY: `name` is NUL-terminated and lives across the call.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    }

    /// A frame of our test EtherType from a made-up unicast address to
    /// everyone, `payload` after the header.
    fn test_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        frame.extend_from_slice(&ETHERTYPE_TEST);
        frame.extend_from_slice(payload);
        frame
    }

    /// Give `ifname` the address `addr`, a class C address so the kernel
    /// derives the /24 netmask and the broadcast address by itself.
    fn set_ipv4_addr(ifname: &str, addr: Ipv4Addr) {
        let sock = control_socket().unwrap();
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(addr).to_be(),
            },
            sin_zero: [0; 8],
        };
        let mut ifr = ifreq_for(ifname);
        // SAFETY: `sockaddr_in` and `sockaddr` are both 16 bytes of plain
        // data; SIOCSIFADDR reads the address as a `sockaddr_in`.
        ifr.ifr_ifru.ifru_addr =
            unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
        // SAFETY: SIOCSIFADDR reads one `struct ifreq`.
        unsafe { ioctl_ptr(&sock, libc::SIOCSIFADDR as _, &mut ifr) }
            .unwrap_or_else(|e| panic!("SIOCSIFADDR {addr} on {ifname}: {e}"));
    }

    /// A raw packet socket that sees every frame on `ifname`, in both
    /// directions.
    fn packet_socket(ifname: &str) -> OwnedFd {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket has no preconditions.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                c_int::from(proto),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: socket just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all zeroes is a valid `sockaddr_ll`.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex(ifname) as c_int;
        // SAFETY: `sll` is a `sockaddr_ll` of the length passed, live for the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "bind AF_PACKET to {ifname}: {}",
            io::Error::last_os_error()
        );
        fd
    }

    /// Wait for a frame on the packet socket for which `wanted` holds.
    fn packet_recv(sock: &OwnedFd, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        loop {
            // SAFETY: `buf` is live and writable for its whole length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                let frame = &buf[..n as usize];
                if wanted(frame) {
                    return frame.to_vec();
                }
                continue;
            }
            let err = io::Error::last_os_error();
            assert_eq!(
                err.kind(),
                io::ErrorKind::WouldBlock,
                "recv on packet socket: {err}"
            );
            assert!(
                Instant::now() < deadline,
                "the frame never reached the kernel"
            );
            sleep(Duration::from_millis(5));
        }
    }

    /// Wait for a frame from the kernel, on whichever queue the kernel
    /// steers it to, for which `wanted` holds of the frame after the vnet
    /// header. Returns the whole read (header and frame). The buffer starts
    /// out filled with 0xaa so bytes the kernel leaves alone show.
    fn tap_recv(tap: &TapDevice, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        let mut buf = vec![0u8; tap.vnet_hdr_len() + MAX_FRAME_LEN];
        loop {
            for queue in 0..tap.queues() {
                buf.fill(0xaa);
                while let Some(n) = tap.recv(queue, &mut buf).unwrap() {
                    if wanted(&buf[tap.vnet_hdr_len()..n]) {
                        return buf[..n].to_vec();
                    }
                    buf.fill(0xaa);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no frame from the kernel arrived"
            );
            sleep(Duration::from_millis(5));
        }
    }

    /// Whether `frame` is an IPv4 UDP datagram to `port`.
    fn is_udp_to(frame: &[u8], port: u16) -> bool {
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
            return false;
        }
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        frame.len() >= 14 + ihl + 8 && frame[14 + ihl + 2..14 + ihl + 4] == port.to_be_bytes()
    }

    fn le16(bytes: &[u8]) -> u16 {
        u16::from_le_bytes([bytes[0], bytes[1]])
    }

    #[test]
    fn bad_arguments_are_errors_before_any_syscall() {
        for name in [
            "",
            "sixteen-chars-xx",
            "a/b",
            "a:b",
            "a b",
            "tab\t",
            ".",
            "..",
            "nul\0",
            "a%s",
            "a%d%d",
            "x\u{e0}",
        ] {
            match TapDevice::open(name, 1, 12) {
                Err(TapError::InvalidName { name: n, .. }) => assert_eq!(n, name),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        for name in ["fifteen-chars-x", "tap%d", "v.1_tap-é"] {
            validate_name(name).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
        for queues in [0, MAX_QUEUES + 1, u16::MAX] {
            assert!(matches!(
                TapDevice::open("vt0", queues, 12),
                Err(TapError::InvalidQueueCount { queues: q, .. }) if q == queues
            ));
        }
        for len in [0, 1, 11, 13, 20, usize::MAX] {
            assert!(matches!(
                TapDevice::open("vt0", 1, len),
                Err(TapError::InvalidVnetHdrLen { len: l, .. }) if l == len
            ));
        }
        let err = TapDevice::open("vt0", 1, 11).unwrap_err().to_string();
        assert!(err.contains("vt0") && err.contains("11"), "{err}");
    }

    #[test]
    fn offload_flags() {
        let all = TapOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
            ufo: true,
            uso: true,
        };
        assert_eq!(all.tun_flags(), Ok(0x7f));
        assert_eq!(TapOffloads::default().tun_flags(), Ok(0));
        let csum = TapOffloads {
            csum: true,
            ..TapOffloads::default()
        };
        assert_eq!(csum.tun_flags(), Ok(libc::TUN_F_CSUM));
        for bad in [
            TapOffloads {
                tso4: true,
                ..TapOffloads::default()
            },
            TapOffloads {
                ufo: true,
                ..TapOffloads::default()
            },
            TapOffloads {
                csum: true,
                tso_ecn: true,
                ..TapOffloads::default()
            },
        ] {
            assert!(bad.tun_flags().is_err(), "{bad:?}");
        }

        let bit = |b: u32| 1u64 << b;
        let features = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_GUEST_USO4);
        assert_eq!(
            TapOffloads::from_virtio_features(features),
            TapOffloads {
                csum: true,
                tso4: true,
                tso_ecn: true,
                ..TapOffloads::default()
            }
        );
        let everything = TapOffloads::from_virtio_features(u64::MAX);
        assert_eq!(everything, all);
        // Without GUEST_CSUM nothing that needs it survives.
        let no_csum = !bit(VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(
            TapOffloads::from_virtio_features(no_csum),
            TapOffloads::default()
        );
        // Whatever the driver accepted, the result is something the kernel takes.
        for features in [0, features, no_csum, u64::MAX, bit(VIRTIO_NET_F_GUEST_ECN)] {
            TapOffloads::from_virtio_features(features)
                .tun_flags()
                .unwrap();
        }
    }

    #[test]
    fn control_path() {
        enter_fresh_netns();
        let tap = TapDevice::open("vtctl0", 2, 12).unwrap();
        assert_eq!(tap.name(), "vtctl0");
        assert_eq!(tap.queues(), 2);
        assert_eq!(tap.vnet_hdr_len(), 12);
        let index = ifindex("vtctl0");
        assert_ne!(index, 0, "the tap is not in this namespace");

        let fds = [tap.queue_fd(0).unwrap(), tap.queue_fd(1).unwrap()];
        assert_ne!(fds[0], fds[1]);
        assert_eq!(tap.queue_fd(2), None);
        assert_eq!(tap.queue_fd(u16::MAX), None);
        for fd in fds {
            // SAFETY: fcntl F_GETFL/F_GETFD on a descriptor we own.
            let (fl, fd_flags) = unsafe {
                (
                    libc::fcntl(fd, libc::F_GETFL),
                    libc::fcntl(fd, libc::F_GETFD),
                )
            };
            assert_ne!(fl & libc::O_NONBLOCK, 0, "queue fd {fd} blocks");
            assert_ne!(
                fd_flags & libc::FD_CLOEXEC,
                0,
                "queue fd {fd} is inherited by exec"
            );
        }

        // MTU.
        assert_eq!(tap.mtu().unwrap(), 1500);
        tap.set_mtu(9000).unwrap();
        assert_eq!(tap.mtu().unwrap(), 9000);
        match tap.set_mtu(65522) {
            Err(TapError::IfIoctl { ioctl, ifname, .. }) => {
                assert_eq!((ioctl, ifname.as_str()), ("SIOCSIFMTU", "vtctl0"))
            }
            other => panic!("MTU 65522: {other:?}"),
        }
        assert_eq!(tap.mtu().unwrap(), 9000);

        // Up and down.
        assert!(!tap.is_up().unwrap(), "a new tap starts down");
        tap.set_up(true).unwrap();
        assert!(tap.is_up().unwrap());
        tap.set_up(true).unwrap();
        tap.set_up(false).unwrap();
        assert!(!tap.is_up().unwrap());
        tap.set_up(true).unwrap();

        // Detach and attach, idempotently; the per-interface ioctls work
        // with any queue detached, even all of them.
        tap.set_queue_enabled(1, false).unwrap();
        tap.set_queue_enabled(1, false).unwrap();
        tap.set_vnet_hdr_len(10).unwrap();
        assert_eq!(tap.vnet_hdr_len(), 10);
        tap.set_queue_enabled(0, false).unwrap();
        tap.set_vnet_hdr_len(12).unwrap();
        tap.set_offloads(TapOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            ..TapOffloads::default()
        })
        .unwrap();
        tap.set_queue_enabled(0, true).unwrap();
        tap.set_queue_enabled(1, true).unwrap();
        tap.set_queue_enabled(1, true).unwrap();
        tap.set_offloads(TapOffloads::default()).unwrap();

        // Bad indices and arguments on a live device.
        let mut buf = vec![0u8; 12 + MAX_FRAME_LEN];
        assert!(matches!(
            tap.set_queue_enabled(2, true),
            Err(TapError::QueueOutOfRange {
                queue: 2,
                queues: 2,
                ..
            })
        ));
        assert!(matches!(
            tap.send(2, &[0; 64]),
            Err(TapError::QueueOutOfRange { queue: 2, .. })
        ));
        assert!(matches!(
            tap.send_vectored(u16::MAX, &[IoSlice::new(&[0; 64])]),
            Err(TapError::QueueOutOfRange { .. })
        ));
        assert!(matches!(
            tap.recv(7, &mut buf),
            Err(TapError::QueueOutOfRange { queue: 7, .. })
        ));
        assert!(matches!(
            tap.recv(0, &mut buf[..11]),
            Err(TapError::BufferTooSmall {
                len: 11,
                vnet_hdr_len: 12,
                ..
            })
        ));
        assert!(matches!(
            tap.set_vnet_hdr_len(16),
            Err(TapError::InvalidVnetHdrLen { len: 16, .. })
        ));
        assert_eq!(tap.vnet_hdr_len(), 12);
        assert!(matches!(
            tap.set_offloads(TapOffloads {
                tso4: true,
                ..TapOffloads::default()
            }),
            Err(TapError::InvalidOffloads { .. })
        ));
        let err = tap.set_queue_enabled(9, false).unwrap_err().to_string();
        assert!(err.contains("vtctl0") && err.contains("queue 9"), "{err}");

        // A second device on the same name adds queues to the same tap.
        let more = TapDevice::open("vtctl0", 2, 12).unwrap();
        assert_eq!(more.name(), "vtctl0");
        assert_eq!(ifindex("vtctl0"), index);
        assert_eq!(more.mtu().unwrap(), 9000);

        // A template is expanded by the kernel.
        let templated = TapDevice::open("vtt%d", 1, 10).unwrap();
        assert_eq!(templated.name(), "vtt0");
        assert_ne!(ifindex("vtt0"), 0);

        // Names the kernel refuses to attach to: not a tap, or a tap
        // without IFF_MULTI_QUEUE.
        match TapDevice::open("lo", 1, 12) {
            Err(TapError::QueueIoctl {
                ioctl,
                ifname,
                queue: 0,
                ..
            }) => {
                assert!(ioctl.starts_with("TUNSETIFF"), "{ioctl}");
                assert_eq!(ifname, "lo");
            }
            other => panic!("opening lo: {other:?}"),
        }
        let single = open_tun().unwrap();
        let mut ifr = ifreq_for("vtsq0");
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`.
        unsafe { ioctl_ptr(&single, libc::TUNSETIFF, &mut ifr) }.unwrap();
        assert!(matches!(
            TapDevice::open("vtsq0", 1, 12),
            Err(TapError::QueueIoctl { queue: 0, .. })
        ));
        drop(single);

        // Not persistent: each tap goes away with its last descriptor.
        drop(tap);
        assert_eq!(ifindex("vtctl0"), index, "the second device still holds it");
        drop(more);
        assert_eq!(ifindex("vtctl0"), 0, "the tap outlived its descriptors");
        drop(templated);
        assert_eq!(ifindex("vtt0"), 0, "the tap outlived its descriptors");
        assert_eq!(ifindex("vtsq0"), 0);
    }

    #[test]
    fn frames_from_user_space_reach_the_kernel() {
        enter_fresh_netns();
        let tap = TapDevice::open("vttx0", 2, 12).unwrap();
        let hdr = [0u8; 12];
        let first = test_frame(b"first frame, queue 0, one buffer");
        let second = test_frame(b"second frame, queue 1, three buffers");

        // While the interface is down the kernel refuses frames; that is a
        // drop, not an error.
        let mut whole = hdr.to_vec();
        whole.extend_from_slice(&first);
        assert!(!tap.send(0, &whole).unwrap(), "a down tap took a frame");

        tap.set_up(true).unwrap();
        let sock = packet_socket("vttx0");
        assert!(tap.send(0, &whole).unwrap());
        assert_eq!(
            packet_recv(&sock, |f| f[12..14] == ETHERTYPE_TEST),
            first,
            "the kernel saw another frame than the one sent"
        );

        // Scattered, from a detached queue (which can still send).
        tap.set_queue_enabled(1, false).unwrap();
        let parts = [
            IoSlice::new(&hdr),
            IoSlice::new(&second[..14]),
            IoSlice::new(&second[14..]),
        ];
        assert!(tap.send_vectored(1, &parts).unwrap());
        assert_eq!(packet_recv(&sock, |f| f[12..14] == ETHERTYPE_TEST), second);

        // A write shorter than the vnet header is refused, the queue stays usable.
        match tap.send(0, &hdr[..5]) {
            Err(TapError::Io {
                op: "write",
                source,
                ..
            }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EINVAL))
            }
            other => panic!("5-byte write: {other:?}"),
        }
        assert!(tap.send(0, &whole).unwrap());
        assert_eq!(packet_recv(&sock, |f| f[12..14] == ETHERTYPE_TEST), first);
    }

    #[test]
    fn frames_from_the_kernel_reach_user_space() {
        enter_fresh_netns();
        let tap = TapDevice::open("vtrx0", 2, 12).unwrap();
        let mut buf = vec![0u8; 12 + MAX_FRAME_LEN];
        for queue in 0..2 {
            assert_eq!(
                tap.recv(queue, &mut buf).unwrap(),
                None,
                "a frame on a down tap"
            );
        }

        tap.set_up(true).unwrap();
        set_ipv4_addr("vtrx0", Ipv4Addr::new(192, 168, 77, 1));
        let sock = UdpSocket::bind((Ipv4Addr::new(192, 168, 77, 1), 0)).unwrap();
        sock.set_broadcast(true).unwrap();
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let send = || {
            sock.send_to(&payload, (Ipv4Addr::new(192, 168, 77, 255), 9999))
                .unwrap();
        };

        // No offloads: a plain frame behind an all-zero 12-byte header.
        send();
        let got = tap_recv(&tap, |f| is_udp_to(f, 9999));
        assert_eq!(got.len(), 12 + 14 + 20 + 8 + payload.len());
        assert_eq!(got[..12], [0; 12], "flags, GSO type NONE and num_buffers 0");
        assert_eq!(got[12..18], [0xff; 6], "not the broadcast frame");
        assert_eq!(got[12 + 42..], payload[..]);

        // With checksum offload the kernel leaves the UDP checksum to us and
        // says where it goes.
        tap.set_offloads(TapOffloads {
            csum: true,
            ..TapOffloads::default()
        })
        .unwrap();
        send();
        let got = tap_recv(&tap, |f| is_udp_to(f, 9999));
        assert_ne!(
            u32::from(got[0]) & VIRTIO_NET_HDR_F_NEEDS_CSUM,
            0,
            "no NEEDS_CSUM with checksum offload on: {:?}",
            &got[..12]
        );
        assert_eq!(le16(&got[6..8]), 14 + 20, "csum_start");
        assert_eq!(le16(&got[8..10]), 6, "csum_offset");
        assert_eq!(got[12 + 42..], payload[..]);

        // A 10-byte header moves the frame.
        tap.set_offloads(TapOffloads::default()).unwrap();
        tap.set_vnet_hdr_len(10).unwrap();
        send();
        let got = tap_recv(&tap, |f| is_udp_to(f, 9999));
        assert_eq!(got.len(), 10 + 14 + 20 + 8 + payload.len());
        assert_eq!(got[..10], [0; 10]);
        assert_eq!(got[10..16], [0xff; 6]);
        assert_eq!(got[10 + 42..], payload[..]);
    }
}
