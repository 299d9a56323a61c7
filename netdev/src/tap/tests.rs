use super::*;
use std::ffi::CString;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_HDR_F_NEEDS_CSUM,
};

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
