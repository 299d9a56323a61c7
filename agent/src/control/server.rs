//! The control socket: a mio loop on a thread of its own that serves
//! several clients at once, one request per line, each answered by
//! [`super::dispatch`].
//!
//! Every client is bounded: a request line may be at most
//! [`MAX_LINE_BYTES`], and a client that does not read its replies is not
//! read from either once [`MAX_PENDING_OUTPUT`] bytes wait for it. At most
//! [`MAX_CLIENTS`] are served at once.
//!
//! A command that may block ([`Dispatched::Later`], `remove-device`) is
//! finished on a thread of its own; its client's next requests wait for
//! that reply (replies stay in request order), while other clients are
//! served as usual.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::{dispatch, ControlError, Dispatched, Later, Reply, MAX_LINE_BYTES};
use crate::daemon::supervisor::Devices;
use crate::vhost_user::listener::{remove_stale_socket, ListenError};

/// Most clients served at once; one more is told so and disconnected.
pub const MAX_CLIENTS: usize = 32;
/// Reply bytes that may wait for a client before its requests are no
/// longer read.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Permissions of the socket file: only the agent's user may connect.
pub const SOCKET_MODE: u32 = 0o600;

const LISTENER: Token = Token(0);
/// The loop's one waker: a shutdown was asked for, or a command finished
/// off the loop's thread.
const WAKE: Token = Token(1);
const FIRST_CLIENT: usize = 2;
const READ_CHUNK: usize = 64 * 1024;

/// Stops a running [`ControlServer`] from another thread.
#[derive(Clone)]
pub struct ControlHandle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl ControlHandle {
    /// Ask the server to stop: pending replies are flushed as far as the
    /// clients take them without waiting, then the socket file is removed.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::error!("control: cannot wake the control server for shutdown: {e}");
        }
    }
}

/// The control socket and its clients.
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    poll: Poll,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    devices: Arc<Devices>,
    on_quit: Box<dyn Fn() + Send>,
    clients: HashMap<Token, Client>,
    next_token: usize,
    /// Finishes commands off the loop's thread.
    later: LaterRunner,
    finished: mpsc::Receiver<(Token, String)>,
}

/// Runs [`Later`] commands on threads of their own; each sends its reply
/// line back for its client and wakes the loop.
struct LaterRunner {
    waker: Arc<Waker>,
    finished: mpsc::Sender<(Token, String)>,
}

impl LaterRunner {
    /// Finish `later` for `client`: on a new thread, or here if none can
    /// be started (slower, still correct). Returns the reply if it is
    /// already done.
    fn start(&self, client: Token, later: Later) -> Option<String> {
        let waker = self.waker.clone();
        let finished = self.finished.clone();
        // The command goes to the thread once it runs, so it is still here
        // if the thread cannot start.
        let (give, take) = mpsc::channel::<Later>();
        let spawned = std::thread::Builder::new()
            .name("control-later".into())
            .spawn(move || {
                let Ok(later) = take.recv() else {
                    return;
                };
                let reply = later.finish();
                // The server may be gone (shutting down); so is the client.
                if finished.send((client, reply)).is_ok() {
                    if let Err(e) = waker.wake() {
                        log::error!("control: cannot wake the control loop: {e}");
                    }
                }
            });
        match spawned {
            Ok(_) => match give.send(later) {
                Ok(()) => None,
                Err(mpsc::SendError(later)) => Some(later.finish()),
            },
            Err(e) => {
                log::warn!("control: cannot start a thread ({e}); finishing the command here");
                Some(later.finish())
            }
        }
    }
}

impl ControlServer {
    /// Listen on `path` (mode 0600; a stale socket file is replaced, a live
    /// one is an error) for commands about `devices`. `on_quit` runs on
    /// the server's thread after the reply to `quit` is sent; it must start
    /// the agent's shutdown.
    pub fn bind(
        path: &Path,
        devices: Arc<Devices>,
        on_quit: Box<dyn Fn() + Send>,
    ) -> Result<ControlServer, ListenError> {
        let listen_error = |source| ListenError::Listen {
            path: path.to_path_buf(),
            source,
        };
        remove_stale_socket(path)?;
        let listener = listen_private(path).map_err(listen_error)?;
        // From here on the socket file exists; `server` removes it when
        // dropped, including on the error paths below.
        let poll = Poll::new().map_err(listen_error)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).map_err(listen_error)?);
        let (finished_tx, finished) = mpsc::channel();
        let mut server = ControlServer {
            path: path.to_path_buf(),
            listener: UnixListener::from_std(listener),
            poll,
            later: LaterRunner {
                waker: waker.clone(),
                finished: finished_tx,
            },
            finished,
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            devices,
            on_quit,
            clients: HashMap::new(),
            next_token: FIRST_CLIENT,
        };
        server
            .poll
            .registry()
            .register(&mut server.listener, LISTENER, Interest::READABLE)
            .map_err(listen_error)?;
        Ok(server)
    }

    /// A handle that stops [`Self::run`].
    pub fn shutdown_handle(&self) -> ControlHandle {
        ControlHandle {
            waker: self.waker.clone(),
            stop: self.stop.clone(),
        }
    }

    /// Serve clients until shut down. A client's errors end only that
    /// client's connection.
    pub fn run(mut self) {
        log::info!("control: listening on {}", self.path.display());
        let mut events = Events::with_capacity(64);
        let mut scratch = vec![0u8; READ_CHUNK];
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("control: event loop failed: {e}; the control API is gone");
                break;
            }
            for event in events.iter() {
                match event.token() {
                    WAKE => {
                        self.deliver_finished(&mut scratch);
                        if self.stop.load(Ordering::SeqCst) {
                            self.close_all();
                            log::info!("control: stopped");
                            return;
                        }
                    }
                    LISTENER => self.accept(),
                    token => self.drive(token, &mut scratch),
                }
            }
        }
        self.close_all();
    }

    fn drive(&mut self, token: Token, scratch: &mut [u8]) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let context = Context {
            devices: &self.devices,
            on_quit: &*self.on_quit,
            later: &self.later,
        };
        if client.drive(&context, scratch) == Next::Close {
            self.remove(token);
        }
    }

    /// Replies of commands finished off the loop go to their clients, who
    /// go on with the requests that waited behind them.
    fn deliver_finished(&mut self, scratch: &mut [u8]) {
        while let Ok((token, reply)) = self.finished.try_recv() {
            let Some(client) = self.clients.get_mut(&token) else {
                // The client left while its command ran; the command's
                // effect stands.
                continue;
            };
            client.output.extend_from_slice(reply.as_bytes());
            client.waiting = false;
            self.drive(token, scratch);
        }
    }

    fn accept(&mut self) {
        loop {
            let mut stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("control: accept failed: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("control: refusing a client: {MAX_CLIENTS} are connected already");
                let reply = Reply::error(
                    super::ErrorClass::GenericError,
                    format!("too many control clients (at most {MAX_CLIENTS})"),
                    None,
                );
                // Best effort: a fresh socket's buffer takes one short line.
                let _ = stream.write_all(reply.to_line().as_bytes());
                continue;
            }
            let token = Token(self.next_token);
            self.next_token += 1;
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::error!("control: cannot watch a new client: {e}");
                continue;
            }
            log::debug!("control: client {} connected", token.0);
            // Registration reports the socket writable at once, so the new
            // client is driven (and anything it sent already is read) on
            // the next poll.
            self.clients.insert(token, Client::new(stream, token));
        }
    }

    fn remove(&mut self, token: Token) {
        if let Some(mut client) = self.clients.remove(&token) {
            let _ = self.poll.registry().deregister(&mut client.stream);
            log::debug!("control: client {} disconnected", token.0);
        }
    }

    fn close_all(&mut self) {
        let tokens: Vec<Token> = self.clients.keys().copied().collect();
        for token in tokens {
            if let Some(client) = self.clients.get_mut(&token) {
                // A reply just queued (the one to `quit`, say) goes out if
                // the client's socket takes it now; nobody waits for it.
                let _ = client.flush();
            }
            self.remove(token);
        }
    }
}

impl Drop for ControlServer {
    /// The socket file goes with the server, whether it ran or not.
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("control: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// What answering a request may need besides the client.
struct Context<'a> {
    devices: &'a Devices,
    on_quit: &'a dyn Fn(),
    later: &'a LaterRunner,
}

/// What the loop does with a client after driving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Wait for its next readiness event.
    Wait,
    /// Drop the connection.
    Close,
}

/// Where the next request line is in a client's input.
enum Line {
    /// A whole line (without its newline).
    Complete(Range<usize>),
    /// No newline yet; more input may complete it.
    Partial,
    /// Longer than [`MAX_LINE_BYTES`].
    TooLong,
}

/// One connected client.
struct Client {
    stream: UnixStream,
    token: Token,
    /// Bytes read; `input[consumed..]` is not handled yet.
    input: Vec<u8>,
    consumed: usize,
    /// `input[consumed..scanned]` holds no newline.
    scanned: usize,
    /// Reply bytes not yet written.
    output: Vec<u8>,
    /// The client shut down its side: handle what is left, then close.
    peer_closed: bool,
    /// Send what is queued, then close.
    closing: bool,
    /// A command of this client is finishing off the loop: its next
    /// requests wait, so replies stay in order.
    waiting: bool,
}

impl Client {
    fn new(stream: UnixStream, token: Token) -> Client {
        Client {
            stream,
            token,
            input: Vec::new(),
            consumed: 0,
            scanned: 0,
            output: Vec::new(),
            peer_closed: false,
            closing: false,
            waiting: false,
        }
    }

    /// Do everything that can be done without blocking: write replies,
    /// answer complete lines, read more. The poll is edge-triggered, so
    /// this returns [`Next::Wait`] only once a read or write would block.
    fn drive(&mut self, context: &Context<'_>, scratch: &mut [u8]) -> Next {
        loop {
            if let Err(e) = self.flush() {
                log::debug!("control: client {}: write failed: {e}", self.token.0);
                return Next::Close;
            }
            if self.waiting {
                // A reply is being finished off the loop; its delivery
                // drives this client again.
                return Next::Wait;
            }
            if self.closing {
                return if self.output.is_empty() {
                    Next::Close
                } else {
                    Next::Wait
                };
            }
            if self.output.len() >= MAX_PENDING_OUTPUT {
                // The flush above would block: a writable event resumes.
                return Next::Wait;
            }
            match self.next_line() {
                Line::Complete(range) => {
                    self.answer(range, context);
                    continue;
                }
                Line::TooLong => {
                    log::warn!(
                        "control: client {}: request line longer than {MAX_LINE_BYTES} bytes; closing the connection",
                        self.token.0
                    );
                    let error = ControlError::LineTooLong {
                        limit: MAX_LINE_BYTES,
                    };
                    self.output
                        .extend_from_slice(error.reply(None).to_line().as_bytes());
                    self.closing = true;
                    continue;
                }
                Line::Partial => {}
            }
            if self.peer_closed {
                // A last request without its newline still counts.
                let rest = self.consumed..self.input.len();
                self.answer(rest, context);
                self.closing = true;
                continue;
            }
            self.compact();
            match self.stream.read(scratch) {
                Ok(0) => self.peer_closed = true,
                Ok(count) => self.input.extend_from_slice(&scratch[..count]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("control: client {}: read failed: {e}", self.token.0);
                    return Next::Close;
                }
            }
        }
    }

    /// Answer `input[range]` and mark it (and its newline) consumed.
    fn answer(&mut self, range: Range<usize>, context: &Context<'_>) {
        let end = range.end;
        let dispatched = self
            .input
            .get(range)
            .and_then(|line| dispatch(line, context.devices));
        self.consumed = (end + 1).min(self.input.len());
        self.scanned = self.consumed;
        match dispatched {
            None => {}
            Some(Dispatched::Now { reply, quit }) => {
                self.output.extend_from_slice(reply.as_bytes());
                if quit {
                    // Reply first, so the client hears that its quit was
                    // taken before the agent starts going away.
                    let _ = self.flush();
                    (context.on_quit)();
                }
            }
            Some(Dispatched::Later(later)) => match context.later.start(self.token, later) {
                Some(reply) => self.output.extend_from_slice(reply.as_bytes()),
                None => self.waiting = true,
            },
        }
    }

    fn next_line(&mut self) -> Line {
        let unscanned = self.input.get(self.scanned..).unwrap_or_default();
        match unscanned.iter().position(|&byte| byte == b'\n') {
            Some(offset) => {
                let end = self.scanned + offset;
                if end - self.consumed > MAX_LINE_BYTES {
                    Line::TooLong
                } else {
                    Line::Complete(self.consumed..end)
                }
            }
            None => {
                self.scanned = self.input.len();
                if self.input.len() - self.consumed > MAX_LINE_BYTES {
                    Line::TooLong
                } else {
                    Line::Partial
                }
            }
        }
    }

    /// Drop the consumed input (once per read, not once per line).
    fn compact(&mut self) {
        self.input.drain(..self.consumed);
        self.scanned -= self.consumed;
        self.consumed = 0;
    }

    /// Write queued replies until done or the socket would block.
    fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        let result = loop {
            let Some(pending) = self.output.get(written..).filter(|rest| !rest.is_empty()) else {
                break Ok(());
            };
            match self.stream.write(pending) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(count) => written += count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.output.drain(..written);
        result
    }
}

/// A listening unix socket at `path` whose file has mode [`SOCKET_MODE`]
/// from the moment it exists (see [`bind_private`]). A chmod after bind
/// then makes the mode exactly 0600, whatever the umask took away.
fn listen_private(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let listener = bind_private(path)?;
    let finish = || -> io::Result<()> {
        // SAFETY: listen(2) on a bound socket we own; no pointers.
        if unsafe { libc::listen(listener.as_raw_fd(), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// A unix socket bound (not yet listening) at `path`. Linux gives the file
/// bind(2) creates the mode of the socket's own inode less the umask, so
/// the mode is set on the socket before bind: there is no moment in which
/// others could connect, and no process-wide umask is touched (other
/// threads may be creating files meanwhile).
fn bind_private(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let (address, length) = socket_address(path)?;
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor socket(2) just returned; nothing else
    // owns it, so the OwnedFd is its only owner and closes it.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fchmod on a descriptor this function owns; no memory is
    // passed.
    if unsafe { libc::fchmod(socket.as_raw_fd(), SOCKET_MODE as libc::mode_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `address` is an initialised sockaddr_un that outlives the
    // call, and `length` (from socket_address) covers the family and the
    // NUL-terminated path, within the struct.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::addr_of!(address).cast::<libc::sockaddr>(),
            length,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::os::unix::net::UnixListener::from(socket))
}

/// `path` as a `sockaddr_un` and the length to pass with it.
fn socket_address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid
    // value (and NUL-terminates any path shorter than sun_path).
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.contains(&0) || bytes.len() >= address.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be 1 to {} bytes without NUL",
                address.sun_path.len() - 1
            ),
        ));
    }
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = libc::c_char::from_ne_bytes([*byte]);
    }
    let length = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let length = libc::socklen_t::try_from(length)
        .expect("the length was checked against sun_path, far below socklen_t::MAX");
    Ok((address, length))
}

#[cfg(test)]
mod tests;
