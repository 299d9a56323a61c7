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

mod error;
mod offloads;
mod sys;
#[cfg(test)]
mod tests;

pub use error::TapError;
pub use offloads::TapOffloads;
use sys::*;

/// One queue's descriptor and whether it is attached to the interface.
#[derive(Debug)]
struct Queue {
    fd: OwnedFd,
    attached: AtomicBool,
}

/// The largest MTU a tap takes: 65535 less the Ethernet header.
pub const MAX_MTU: u16 = 65521;

/// One tap interface and our queues on it: the object a net back-end's
/// workers read and write frames through. It is `Send + Sync`; each worker
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
