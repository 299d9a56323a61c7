//! The host end of a tap, as the lab's front-end sees it: the kernel's
//! counters of the interface (exact, lossless: what the guest sent is the
//! tap's `rx_packets`, what reached the tap's queues its `tx_packets`), and
//! an `AF_PACKET` socket to inject frames into the tap (they go to a tap
//! queue and from there onto the guest's RX ring) and to watch frames come
//! out of it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// One counter of `/sys/class/net/IF/statistics`.
pub fn counter(ifname: &str, name: &str) -> io::Result<u64> {
    let path = format!("/sys/class/net/{ifname}/statistics/{name}");
    let text = std::fs::read_to_string(&path)?;
    text.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))
}

/// The interface's MTU.
pub fn mtu(ifname: &str) -> io::Result<u64> {
    let path = format!("/sys/class/net/{ifname}/mtu");
    std::fs::read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))
}

/// The tap's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapCounters {
    /// Frames the guest side wrote into the tap (guest TX).
    pub rx_packets: u64,
    /// Frames the host sent into the tap's queues (guest RX).
    pub tx_packets: u64,
    /// Frames the tap could not take from the guest side.
    pub rx_dropped: u64,
    /// Frames the tap dropped on the way to a queue (none attached, or
    /// full).
    pub tx_dropped: u64,
}

impl TapCounters {
    /// Read them.
    pub fn read(ifname: &str) -> io::Result<TapCounters> {
        Ok(TapCounters {
            rx_packets: counter(ifname, "rx_packets")?,
            tx_packets: counter(ifname, "tx_packets")?,
            rx_dropped: counter(ifname, "rx_dropped")?,
            tx_dropped: counter(ifname, "tx_dropped")?,
        })
    }

    /// What changed since `before`.
    pub fn since(&self, before: &TapCounters) -> TapCounters {
        TapCounters {
            rx_packets: self.rx_packets.wrapping_sub(before.rx_packets),
            tx_packets: self.tx_packets.wrapping_sub(before.tx_packets),
            rx_dropped: self.rx_dropped.wrapping_sub(before.rx_dropped),
            tx_dropped: self.tx_dropped.wrapping_sub(before.tx_dropped),
        }
    }
}

/// An `AF_PACKET` socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// A socket on `ifname` that receives every frame the interface sees
    /// (`listen`) or none (injection only).
    pub fn open(ifname: &str, listen: bool) -> io::Result<PacketSocket> {
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let ifindex = i32::try_from(ifindex)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "ifindex"))?;
        let protocol = if listen {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: socket(2) with constant arguments; the fd is checked and
        // owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(protocol),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let socket = PacketSocket { fd, ifindex };
        let addr = socket.address(protocol);
        // SAFETY: bind reads one sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                socket.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if listen {
            let on: libc::c_int = 1;
            // SAFETY: PACKET_AUXDATA reads one int of the size given.
            unsafe {
                libc::setsockopt(
                    socket.fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            // Room for a whole phase of small frames: the lab runs as root,
            // so the buffer may exceed rmem_max.
            let size: libc::c_int = 16 << 20;
            // SAFETY: SO_RCVBUFFORCE reads one int of the size given.
            unsafe {
                libc::setsockopt(
                    socket.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        Ok(socket)
    }

    fn address(&self, protocol: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = self.ifindex;
        addr
    }

    /// Send `frame` out of the interface (into the tap, towards the
    /// guest). Retries while the socket's buffer is full, for up to 5 s.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // SAFETY: send reads `frame.len()` bytes of a live slice.
            let rc =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            let full = matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS));
            if !full || Instant::now() >= deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The next frame coming in from the interface (sent by the guest
    /// side), waiting up to `timeout`; frames going out are skipped.
    pub fn recv_incoming(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        Ok(self.recv_incoming_status(timeout)?.map(|(frame, _)| frame))
    }

    /// [`Self::recv_incoming`] with the kernel's `tp_status` of the frame
    /// (`TP_STATUS_CSUMNOTREADY`: its checksum is left to offload, as the
    /// virtio-net header it came with said).
    pub fn recv_incoming_status(&self, timeout: Duration) -> io::Result<Option<(Vec<u8>, u32)>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        // Room for one cmsg with a tpacket_auxdata, u64-aligned.
        let mut control = [0u64; 8];
        loop {
            // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain old data; all zeroes is valid.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: recvmsg writes at most the lengths `msg` gives into
            // `buf`, `from` and `control`, all live and exclusively ours.
            let rc = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) };
            if rc >= 0 {
                if from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let mut status = 0;
                // SAFETY: the CMSG macros walk the control buffer recvmsg
                // filled, within `msg_controllen`; an auxdata cmsg holds a
                // whole tpacket_auxdata, read unaligned.
                unsafe {
                    let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                    while !cmsg.is_null() {
                        if (*cmsg).cmsg_level == libc::SOL_PACKET
                            && (*cmsg).cmsg_type == libc::PACKET_AUXDATA
                        {
                            let aux: libc::tpacket_auxdata =
                                std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                            status = aux.tp_status;
                        }
                        cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                    }
                }
                buf.truncate(rc as usize);
                return Ok(Some((buf, status)));
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().min(100))
                .unwrap_or(100)
                .max(1);
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }
}
