//! The vhost-user message stream into a device's session, fds included,
//! through the agent's own socket server: one real blk device (a 1 MiB
//! image, the thread-pool engine, `fence=none`) is bound with
//! `daemon::bind::bind_blk` and served by `DeviceServer::run` on its own
//! thread, once per process. Each execution is one front-end connection
//! on the device's socket: the input is decoded into up to 32 messages
//! (see [`decode`]), each written with its fds (SCM_RIGHTS), replies are
//! read and thrown away without ever blocking, and the connection is
//! closed. The whole path runs: the header peek, the request table, the
//! `vhost` crate's handler, the session's own requests, validation, the
//! memory table's mapping checks, ring starts on the blk worker threads.
//!
//! After each execution the target connects again and does a
//! GET_FEATURES round trip: the agent accepts one front-end at a time,
//! so a reply proves the session has processed the disconnect (and reset
//! the device), and that the agent still serves. That connection is the
//! next execution's, which therefore starts after GET_FEATURES, as QEMU's
//! connects do. Then nothing may be left of the closed connection: none
//! of the target's memfds open or mapped, and no growth in the process's
//! fds or threads.

#![no_main]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vhost_agent::daemon::bind::bind_blk;
use vhost_agent::daemon::spec::BlkSpec;

/// Messages per execution at most.
const MAX_MESSAGES: usize = 32;
/// Largest payload written for one message (the protocol's maximum); the
/// header's size field may claim anything.
const MAX_PAYLOAD: usize = 4096;
/// Largest memfd the input can ask for (16 MiB: sparse, but a started
/// ring's worker may touch it).
const MAX_MEMFD_PAGES: u64 = 4096;
/// The name of every memfd the target makes, to find them in /proc.
const MEMFD_NAME: &str = "session-stream-fd";
/// How /proc shows one of them (an fd's link, a mapping's path).
const MEMFD_PROC: &str = "/memfd:session-stream-fd";
/// How long a reconnect may take before the agent counts as hung (the
/// CI runs allow 10 s an input).
const SERVE_DEADLINE: Duration = Duration::from_secs(8);
/// Fds and threads the process may gain over its first executions before
/// it counts as a leak (pools that start lazily, libFuzzer's own).
const SLACK: usize = 24;

const GET_FEATURES: u32 = 1;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const HEADER_SIZE: usize = 12;

/// An fd from the input's menu.
#[derive(Clone, Copy, Debug)]
enum FdKind {
    /// A memfd of this many bytes, sealed against shrinking and growing
    /// or not.
    Memfd {
        size: u64,
        sealed: bool,
    },
    Eventfd,
    DevNull,
    /// One end of a pipe (the other is closed at once).
    Pipe {
        write_end: bool,
    },
}

/// What is written for one message: its bytes and the fds they carry.
#[derive(Debug)]
struct Message {
    bytes: Vec<u8>,
    fds: Vec<FdKind>,
}

/// The input, read front to back; past its end every byte is 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

/// The input as messages. Each one is
///
/// * a code byte: `0..=0xef` is request `1 + b % 50` (the request table's
///   codes and a few past it); `0xf0..=0xfe` is followed by a raw u32 code;
///   `0xff` is a raw chunk instead of a message: a length byte and that
///   many bytes, written as they are, with no fds (a truncated header, a
///   header split across writes);
/// * a flags byte: below `0xc0`, version 1 plus its REPLY (0x4) and
///   NEED_REPLY (0x8) bits; else a raw u32 follows;
/// * a u16: the payload's real length, modulo 4097;
/// * a size byte: below `0xe0` the header tells the truth; `0xe0..=0xef`
///   claims 1-16 bytes more than follow, `0xf0..=0xfe` 1-15 fewer; `0xff`
///   takes a raw u32 size from the 4 bytes after the payload;
/// * an fd count byte (modulo 5), and per fd a kind byte (modulo 5:
///   memfd, sealed memfd, eventfd, /dev/null, pipe; bit 7 picks a pipe's
///   write end) and for a memfd a u16 size: bits 1-12 are pages, bit 0
///   adds 512 bytes;
/// * the payload.
fn decode(data: &[u8]) -> Vec<Message> {
    let mut input = Input(data);
    let mut messages = Vec::new();
    while !input.0.is_empty() && messages.len() < MAX_MESSAGES {
        let code = match input.byte() {
            0xff => {
                let n = usize::from(input.byte());
                let bytes = input.bytes(n).to_vec();
                messages.push(Message {
                    bytes,
                    fds: Vec::new(),
                });
                continue;
            }
            0xf0..=0xfe => input.u32(),
            b => 1 + u32::from(b) % 50,
        };
        let flags = match input.byte() {
            b @ 0..=0xbf => FLAG_VERSION_1 | (u32::from(b) & 0xc),
            _ => input.u32(),
        };
        let length = usize::from(input.u16()) % (MAX_PAYLOAD + 1);
        let size_mode = input.byte();
        let fds = (0..input.byte() % 5)
            .map(|_| {
                let kind = input.byte();
                match kind % 5 {
                    k @ (0 | 1) => {
                        let v = input.u16();
                        let pages = u64::from(v >> 1) % MAX_MEMFD_PAGES;
                        FdKind::Memfd {
                            size: pages * 4096 + if v & 1 != 0 { 512 } else { 0 },
                            sealed: k == 1,
                        }
                    }
                    2 => FdKind::Eventfd,
                    3 => FdKind::DevNull,
                    _ => FdKind::Pipe {
                        write_end: kind & 0x80 != 0,
                    },
                }
            })
            .collect();
        let payload = input.bytes(length).to_vec();
        let real = payload.len() as u32;
        let size = match size_mode {
            0..=0xdf => real,
            0xe0..=0xef => real + u32::from(size_mode & 0xf) + 1,
            0xf0..=0xfe => real.saturating_sub(u32::from(size_mode & 0xf) + 1),
            0xff => input.u32(),
        };
        let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
        bytes.extend_from_slice(&code.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&size.to_le_bytes());
        bytes.extend_from_slice(&payload);
        messages.push(Message { bytes, fds });
    }
    messages
}

fn check(rc: libc::c_int, what: &str) -> RawFd {
    assert!(rc >= 0, "{what}: {}", io::Error::last_os_error());
    rc
}

/// Make one fd of the menu.
fn make_fd(kind: FdKind) -> OwnedFd {
    let fd = match kind {
        FdKind::Memfd { size, sealed } => {
            let name = std::ffi::CString::new(MEMFD_NAME).expect("no NUL");
            // SAFETY: a valid NUL-terminated name; the fd returned is ours.
            let fd = check(
                unsafe {
                    libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
                },
                "memfd_create",
            );
            // SAFETY: a fresh fd nothing else owns.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(size).expect("ftruncate a memfd");
            if sealed {
                let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
                // SAFETY: fcntl on an fd `file` keeps open.
                check(
                    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) },
                    "F_ADD_SEALS",
                );
            }
            return file.into();
        }
        // SAFETY: eventfd takes no pointers; the fd returned is ours.
        FdKind::Eventfd => check(
            unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) },
            "eventfd",
        ),
        FdKind::DevNull => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .expect("/dev/null");
            return file.into();
        }
        FdKind::Pipe { write_end } => {
            let mut ends = [0; 2];
            // SAFETY: pipe2 writes two fds into `ends`.
            check(
                unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) },
                "pipe2",
            );
            // SAFETY: both ends are fresh fds nothing else owns.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
            return if write_end { write } else { read };
        }
    };
    // SAFETY: a fresh fd nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// One sendmsg of `bytes` with `fds` attached, never blocking and never
/// raising SIGPIPE. Returns how many bytes went.
fn send_with_fds(socket: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for CMSG_SPACE of 4 fds, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as _;
        assert!(msg.msg_controllen <= std::mem::size_of_val(&control));
        // SAFETY: msg_control points at `control`, which is large enough
        // (checked above) for one header and `fds`; CMSG_FIRSTHDR and
        // CMSG_DATA stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len as usize,
            );
        }
    }
    // SAFETY: `msg` and everything it points at live across the call.
    let n = unsafe {
        libc::sendmsg(
            socket.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Read and discard whatever the agent has answered, without waiting.
/// Fds in replies (GET_INFLIGHT_FD) are closed by the kernel, as no
/// control buffer is offered. False once the agent has closed.
fn drain(socket: &UnixStream) -> bool {
    let mut buffer = [0u8; 8192];
    loop {
        // SAFETY: recv writes at most `buffer.len()` bytes into `buffer`.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => return false,
            n if n > 0 => continue,
            _ => {
                let error = io::Error::last_os_error();
                return match error.kind() {
                    io::ErrorKind::WouldBlock => true,
                    io::ErrorKind::Interrupted => continue,
                    _ => false,
                };
            }
        }
    }
}

/// Wait up to `timeout` for the socket to take more bytes (`POLLOUT`) or
/// have some to read (`POLLIN`).
fn wait_for(socket: &UnixStream, events: libc::c_short, timeout: Duration) {
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one pollfd, live across the call.
    unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
}

/// Write one message whole (its fds with its first bytes), reading replies
/// meanwhile. False once the agent has closed the connection or stopped
/// reading.
fn write_message(socket: &UnixStream, message: &Message) -> bool {
    let owned: Vec<OwnedFd> = message.fds.iter().map(|&kind| make_fd(kind)).collect();
    let mut fds: Vec<RawFd> = owned.iter().map(AsRawFd::as_raw_fd).collect();
    let mut rest = &message.bytes[..];
    let deadline = Instant::now() + Duration::from_secs(2);
    while !rest.is_empty() {
        match send_with_fds(socket, rest, &fds) {
            Ok(n) => {
                rest = &rest[n..];
                fds.clear();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !drain(socket) || Instant::now() > deadline {
                    return false;
                }
                wait_for(socket, libc::POLLOUT, Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    // Our copies close here; the agent has its own.
    drop(owned);
    drain(socket)
}

/// Tell the agent the stream is over and read its replies until it closes
/// the connection, which it does once it has handled every message and
/// the disconnect (the session's reset included).
fn finish(socket: UnixStream) {
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + SERVE_DEADLINE;
    while drain(&socket) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the agent did not close the connection within {SERVE_DEADLINE:?} of its end"
        );
        wait_for(&socket, libc::POLLIN, left);
    }
}

/// The device the executions talk to.
struct Served {
    socket: PathBuf,
    directory: PathBuf,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        // The agent binary runs with SIGPIPE ignored (Rust's runtime does
        // that before main); under libFuzzer's main nobody does, and a
        // reply written to a connection the target closed would kill the
        // process.
        // SAFETY: installing SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let directory = std::env::temp_dir().join(format!("session_stream-{}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("a temporary directory");
        let image = directory.join("disk.img");
        File::create(&image)
            .and_then(|file| file.set_len(1 << 20))
            .expect("a 1 MiB image");
        let socket = directory.join("blk.sock");
        let spec: BlkSpec = format!(
            "socket={},image={},engine=threads,fence=none,num-queues=2,queue-size=256",
            socket.display(),
            image.display()
        )
        .parse()
        .expect("a valid --blk spec");
        let bound = bind_blk(&spec, "fuzz0").expect("the blk device binds");
        let server = bound.server;
        std::thread::Builder::new()
            .name("protocol".into())
            .spawn(move || server.run())
            .expect("the protocol thread");
        extern "C" fn remove_directory() {
            if let Some(served) = SERVED.get() {
                let _ = std::fs::remove_dir_all(&served.directory);
            }
        }
        // SAFETY: a plain function with no preconditions, run at exit.
        unsafe { libc::atexit(remove_directory) };
        Served { socket, directory }
    })
}

/// One GET_FEATURES round trip on a fresh connection: `None` if the agent
/// refused it (the previous front-end is still connected) or did not
/// answer.
fn try_connect(socket: &Path) -> Option<UnixStream> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(SERVE_DEADLINE)).ok()?;
    stream.set_write_timeout(Some(SERVE_DEADLINE)).ok()?;
    let mut request = [0u8; HEADER_SIZE];
    request[..4].copy_from_slice(&GET_FEATURES.to_le_bytes());
    request[4..8].copy_from_slice(&FLAG_VERSION_1.to_le_bytes());
    stream.write_all(&request).ok()?;
    let mut reply = [0u8; HEADER_SIZE + 8];
    stream.read_exact(&mut reply).ok()?;
    let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().expect("4 bytes"));
    assert_eq!(
        (word(0), word(4), word(8)),
        (GET_FEATURES, FLAG_VERSION_1 | FLAG_REPLY, 8),
        "GET_FEATURES got a malformed reply"
    );
    stream.set_nonblocking(true).ok()?;
    Some(stream)
}

/// A connection the agent serves, once the previous one is gone.
fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + SERVE_DEADLINE;
    loop {
        if let Some(stream) = try_connect(socket) {
            return stream;
        }
        assert!(
            Instant::now() < deadline,
            "the agent no longer serves: no GET_FEATURES reply within {SERVE_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// What the process holds: fds, threads, and the fds and mappings of the
/// target's memfds.
#[derive(Clone, Copy, Debug)]
struct Held {
    fds: usize,
    threads: usize,
    memfd_fds: usize,
    memfd_maps: usize,
}

fn held() -> Held {
    let mut fds = 0;
    let mut memfd_fds = 0;
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Ok(entry) = entry else { continue };
        fds += 1;
        if std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().contains(MEMFD_PROC))
        {
            memfd_fds += 1;
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let threads = status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a thread count");
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let memfd_maps = maps
        .lines()
        .filter(|line| line.contains(MEMFD_PROC))
        .count();
    Held {
        fds,
        threads,
        memfd_fds,
        memfd_maps,
    }
}

/// The connection the next execution uses, and what the process held
/// after the first execution.
struct State {
    next: Option<UnixStream>,
    baseline: Option<Held>,
}

static STATE: Mutex<State> = Mutex::new(State {
    next: None,
    baseline: None,
});

fuzz_target!(|data: &[u8]| {
    let served = served();
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let stream = match state.next.take() {
        Some(stream) => stream,
        None => connect(&served.socket),
    };
    for message in decode(data) {
        if !write_message(&stream, &message) {
            break;
        }
    }
    finish(stream);
    // Served again: the disconnect was handled, the device reset.
    state.next = Some(connect(&served.socket));
    let now = held();
    assert_eq!(
        (now.memfd_fds, now.memfd_maps),
        (0, 0),
        "the closed connection's memfds are still open or mapped: {now:?}"
    );
    let baseline = *state.baseline.get_or_insert(now);
    assert!(
        now.fds <= baseline.fds + SLACK && now.threads <= baseline.threads + SLACK,
        "fds or threads leak: {now:?}, after the first execution {baseline:?}"
    );
});
