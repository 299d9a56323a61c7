//! Traffic ends on the host side of the net tests, inside a test's
//! namespace ([`Netns::run_in`]): a TCP sink and a TCP source for the
//! guest's `nc` streams, a TCP sender for a listening guest, and a watch
//! for the frames a back-end announces a migrated guest with (the ICMP
//! pinger is in `crate::pinger`).
//!
//! Checksums are SHA-256 computed by coreutils' `sha256sum`, the same
//! digest the guest's busybox `sha256sum` prints.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// How long a connection may stall before the host side gives up on it.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `sha256sum` fed through its stdin.
pub struct Sha256 {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Sha256 {
    /// Start `sha256sum`.
    pub fn new() -> Sha256 {
        let mut child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawn sha256sum: {e}. Run `sudo scripts/install-test-deps.sh`.")
            });
        let stdin = child.stdin.take();
        Sha256 { child, stdin }
    }

    /// Hash `data` next.
    pub fn update(&mut self, data: &[u8]) {
        self.stdin
            .as_mut()
            .expect("stdin is open until finish")
            .write_all(data)
            .expect("write to sha256sum");
    }

    /// The digest of everything hashed, in lowercase hex.
    pub fn finish(mut self) -> String {
        drop(self.stdin.take());
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout is piped")
            .read_to_string(&mut out)
            .expect("read sha256sum's output");
        let status = self.child.wait().expect("wait for sha256sum");
        assert!(status.success(), "sha256sum failed: {status}");
        out.split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no digest from sha256sum: {out:?}"))
            .to_string()
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

/// SHA-256 of `data`, in lowercase hex.
pub fn sha256(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finish()
}

/// What one connection to a [`TcpSink`] delivered, or what a [`TcpSource`]
/// sent on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes moved.
    pub bytes: u64,
    /// SHA-256 of them (sink only; empty for a source).
    pub sha256: String,
    /// From accept to the end of the stream.
    pub elapsed: Duration,
    /// The I/O error that ended the connection early, if any.
    pub error: Option<String>,
}

/// Bind a TCP listener on `port` of every address inside `ns`.
fn listen_in(ns: &Netns, port: u16) -> TcpListener {
    let listener = ns
        .run_in(move || TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
        .unwrap_or_else(|e| panic!("bind TCP port {port} in {}: {e}", ns.name()));
    listener
        .set_nonblocking(true)
        .expect("make the listener non-blocking");
    listener
}

/// Accept connections on `listener` until `stop`, each handled by
/// `handle` on a thread of its own (parallel streams must not wait for
/// each other); the results go to `done`.
fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Transfer>>>,
    handle: impl Fn(TcpStream) -> Transfer + Send + Sync + 'static,
) -> JoinHandle<()> {
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let handle = Arc::clone(&handle);
                    let done = Arc::clone(&done);
                    std::thread::spawn(move || {
                        let result = match stream
                            .set_nonblocking(false)
                            .and_then(|_| stream.set_read_timeout(Some(IO_TIMEOUT)))
                            .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
                        {
                            Ok(()) => handle(stream),
                            Err(e) => Transfer {
                                bytes: 0,
                                sha256: String::new(),
                                elapsed: Duration::ZERO,
                                error: Some(format!("socket setup: {e}")),
                            },
                        };
                        done.lock().expect("transfer list lock").push(result);
                    });
                }
                // Polling keeps the loop stoppable without a wake-up socket.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    eprintln!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    })
}

/// Wait until `done` holds `count` transfers; Err with what is there.
fn wait_transfers(
    done: &Mutex<Vec<Transfer>>,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Transfer>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = done.lock().expect("transfer list lock").clone();
        if now.len() >= count {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {count} connections finished within {timeout:?}: {now:?}",
                now.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP server in a namespace that reads every connection to its end and
/// records how many bytes came and their SHA-256.
pub struct TcpSink {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Transfer>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpSink {
    /// Listen on `port` inside `ns`.
    pub fn start(ns: &Netns, port: u16) -> TcpSink {
        let listener = listen_in(ns, port);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let thread = serve(listener, Arc::clone(&stop), Arc::clone(&done), |mut s| {
            let started = Instant::now();
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            let mut bytes = 0u64;
            let mut error = None;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        bytes += n as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        error = Some(format!("read after {bytes} bytes: {e}"));
                        break;
                    }
                }
            }
            Transfer {
                bytes,
                sha256: hash.finish(),
                elapsed: started.elapsed(),
                error,
            }
        });
        TcpSink {
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Wait until `count` connections have ended; their transfers in the
    /// order they ended.
    pub fn wait(&self, count: usize, timeout: Duration) -> Result<Vec<Transfer>, String> {
        wait_transfers(&self.done, count, timeout)
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server in a namespace that sends the same random bytes on every
/// connection and closes it.
pub struct TcpSource {
    /// SHA-256 of what every connection gets.
    pub sha256: String,
    /// How many bytes every connection gets.
    pub len: u64,
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Transfer>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpSource {
    /// Listen on `port` inside `ns`, serving `len` random bytes.
    pub fn start(ns: &Netns, port: u16, len: usize) -> TcpSource {
        let mut data = vec![0u8; len];
        rand::Rng::fill(&mut rand::thread_rng(), data.as_mut_slice());
        let sha256 = sha256(&data);
        let data = Arc::new(data);
        let listener = listen_in(ns, port);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let thread = serve(
            listener,
            Arc::clone(&stop),
            Arc::clone(&done),
            move |mut s| {
                let started = Instant::now();
                let error = s
                    .write_all(&data)
                    .and_then(|_| s.shutdown(Shutdown::Write))
                    .err()
                    .map(|e| format!("write: {e}"));
                // Wait for the peer to close: the data is delivered, not just queued.
                let mut sink = [0u8; 512];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                Transfer {
                    bytes: if error.is_none() {
                        data.len() as u64
                    } else {
                        0
                    },
                    sha256: String::new(),
                    elapsed: started.elapsed(),
                    error,
                }
            },
        );
        TcpSource {
            sha256,
            len: len as u64,
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Wait until `count` connections have been served.
    pub fn wait(&self, count: usize, timeout: Duration) -> Result<Vec<Transfer>, String> {
        wait_transfers(&self.done, count, timeout)
    }
}

impl Drop for TcpSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connect from inside `ns` to `addr`, send `data`, close our side and wait
/// for the peer to close its own (busybox `nc -l` exits after our EOF).
/// Returns the time from connect to the peer's close.
pub fn send_tcp(ns: &Netns, addr: SocketAddrV4, data: &[u8]) -> Result<Duration, String> {
    let mut s = ns
        .run_in(move || TcpStream::connect_timeout(&SocketAddr::V4(addr), IO_TIMEOUT))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let started = Instant::now();
    s.set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|_| s.set_read_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    s.write_all(data)
        .and_then(|_| s.shutdown(Shutdown::Write))
        .map_err(|e| format!("send {} bytes to {addr}: {e}", data.len()))?;
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(started.elapsed()),
            Ok(_) => {}
            Err(e) => return Err(format!("waiting for {addr} to close: {e}")),
        }
    }
}

/// EtherType of RARP, the frame QEMU and vhost-user back-ends announce a
/// migrated guest's MAC with (`VHOST_USER_SEND_RARP`).
pub const ETH_P_RARP: u16 = 0x8035;

/// `52:54:00:12:34:56` as bytes.
pub fn parse_mac(mac: &str) -> [u8; 6] {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("bad MAC {mac}: {e}")))
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|b: Vec<u8>| panic!("bad MAC {mac}: {} bytes", b.len()))
}

/// Counts the frames of one EtherType from one source MAC that enter the
/// host through a link (frames the host sends out of it are ignored): e.g.
/// the RARP a back-end puts on its tap to announce a migrated guest.
pub struct FrameWatch {
    seen: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FrameWatch {
    /// Watch `ifname` in `ns` for frames of `ethertype` from `src_mac`.
    pub fn start(ns: &Netns, ifname: &str, ethertype: u16, src_mac: [u8; 6]) -> FrameWatch {
        let name = ifname.to_string();
        let fd = ns.run_in(move || packet_socket(&name));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: all-zero bytes are a valid sockaddr_ll.
                    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    // SAFETY: `buf` and `from` are valid for writes of the
                    // lengths passed, for the whole call.
                    let n = unsafe {
                        libc::recvfrom(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&mut from as *mut libc::sockaddr_ll).cast(),
                            &mut from_len,
                        )
                    };
                    let at = Instant::now();
                    let Ok(n) = usize::try_from(n) else {
                        continue; // timeout (EAGAIN) or EINTR
                    };
                    let frame = &buf[..n];
                    if from.sll_pkttype == libc::PACKET_OUTGOING || frame.len() < 14 {
                        continue;
                    }
                    if frame[6..12] == src_mac
                        && u16::from_be_bytes([frame[12], frame[13]]) == ethertype
                    {
                        seen.lock().expect("frame list lock").push(at);
                    }
                }
            })
        };
        FrameWatch {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// When each matching frame arrived, so far.
    pub fn seen(&self) -> Vec<Instant> {
        self.seen.lock().expect("frame list lock").clone()
    }
}

impl Drop for FrameWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A packet socket for every EtherType, bound to `ifname` of the calling
/// thread's namespace, with a 100 ms receive timeout.
fn packet_socket(ifname: &str) -> OwnedFd {
    let c_name = std::ffi::CString::new(ifname).expect("an interface name has no NUL");
    // SAFETY: `c_name` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    assert!(
        index != 0,
        "no interface {ifname}: {}",
        std::io::Error::last_os_error()
    );
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) takes no pointers; the fd is checked below and owned
    // by the OwnedFd from then on.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a socket we just created and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero bytes are a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = i32::try_from(index).expect("interface indexes fit an i32");
    // SAFETY: `addr` is a valid sockaddr_ll for the length passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    crate::pinger::set_receive_timeout(&fd);
    fd
}
