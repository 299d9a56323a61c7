//! One listening socket per device and one front-end at a time. A protocol
//! thread per device waits (mio) for a connection, a message or a request
//! from the control API, peeks at each header to route it (the request
//! table), and after a disconnect listens again (QEMU reconnects with
//! `reconnect-ms`).

use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use vhost::vhost_user::BackendReqHandler;

use super::requests::{self, Effect, HandledBy};
use super::session::{ConfigSnapshot, OpsReport, PresetupError, Session};
use super::wire::{self, Peek};

mod dispatch;

/// How long the rest of a started message (or a reply write) may take.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

const LISTENER: Token = Token(0);
const CONNECTION: Token = Token(1);
const WAKE: Token = Token(2);

/// Setting up a device's socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another process is listening on the path.
    #[error("socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The path exists and is not a socket: refuse to delete it.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// bind/listen or the event loop failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
enum Disconnect {
    /// The front-end closed it.
    #[error("connection closed")]
    Closed,
    /// Reading failed.
    #[error("read failed")]
    Read(#[source] io::Error),
    /// Part of a message arrived and the rest did not, in time.
    #[error(
        "a partial message ({have} of {need} bytes) and no more within {:?}",
        MESSAGE_TIMEOUT
    )]
    Stalled {
        /// Bytes that arrived.
        have: usize,
        /// Bytes the message needs.
        need: usize,
    },
    /// A reply could not be written.
    #[error("replying to {request} failed")]
    Reply {
        /// The request.
        request: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A request the front-end waits for an answer to failed: no answer
    /// can be made up.
    #[error("{request} failed: {reason}")]
    Failed {
        /// The request.
        request: &'static str,
        /// Why.
        reason: String,
    },
}

/// A request from another thread for the protocol thread, which owns the
/// session.
enum SessionRequest {
    Presetup(
        presetup::ValidConfig,
        mpsc::SyncSender<Result<OpsReport, PresetupError>>,
    ),
}

/// A control request could not reach the session.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The protocol thread is gone (the device is being removed).
    #[error("the device's protocol thread is gone")]
    Gone,
    /// It did not answer in time (a message it handles blocks: a ring
    /// draining behind a closed write fence).
    #[error("the device's protocol thread did not answer within {0:?}")]
    Timeout(Duration),
}

/// Reaches a running [`DeviceServer`] from other threads: stop it, or ask
/// its session to do something (the control API's `presetup`).
#[derive(Clone)]
pub struct ServerHandle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    requests: mpsc::Sender<SessionRequest>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// A handle to no server (the registry's and control API's tests, the
    /// control-line fuzzer): every request finds the protocol thread gone.
    pub fn unserved() -> ServerHandle {
        let poll = Poll::new().expect("an epoll instance");
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).expect("an eventfd waker"));
        let (requests, _) = mpsc::channel();
        ServerHandle {
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            requests,
        }
    }

    /// Ask the server to stop: in-flight requests finish, the socket file
    /// is removed.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake a device server for shutdown: {e}");
        }
    }

    /// Give the device `config` as its early configuration, on its
    /// protocol thread, waiting at most `timeout`.
    pub fn presetup(
        &self,
        config: presetup::ValidConfig,
        timeout: Duration,
    ) -> Result<Result<OpsReport, PresetupError>, HandleError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send(SessionRequest::Presetup(config, reply))
            .map_err(|_| HandleError::Gone)?;
        self.waker.wake().map_err(|_| HandleError::Gone)?;
        answer.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => HandleError::Timeout(timeout),
            mpsc::RecvTimeoutError::Disconnected => HandleError::Gone,
        })
    }
}

/// A device's listening socket and protocol loop.
pub struct DeviceServer {
    name: String,
    path: PathBuf,
    listener: UnixListener,
    poll: Poll,
    handle: ServerHandle,
    requests: mpsc::Receiver<SessionRequest>,
    session: Arc<Mutex<Session>>,
    snapshot: Arc<ConfigSnapshot>,
}

/// The connected front-end.
struct Connection {
    handler: BackendReqHandler<Mutex<Session>>,
    /// A dup of the connection for peeking and for the requests the agent
    /// answers itself.
    stream: UnixStream,
    /// A message changed the configuration since it was last published.
    changed: bool,
    /// When the message that is only partly here began to arrive.
    partial_since: Option<Instant>,
}

fn lock(session: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    session
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Make way for a new socket at `path`: a stale socket file (nobody
/// listening) is removed; a live socket or any other file is an error.
pub fn remove_stale_socket(path: &Path) -> Result<(), ListenError> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !metadata.file_type().is_socket() {
            return Err(ListenError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| ListenError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

impl DeviceServer {
    /// Bind `path` for `session`. A stale socket file (nobody listening)
    /// is replaced; a live one is an error.
    pub fn bind(path: &Path, session: Session) -> Result<DeviceServer, ListenError> {
        let listen_error = |source| ListenError::Listen {
            path: path.to_path_buf(),
            source,
        };
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(listen_error)?;
        // From here on the socket file exists: a failure below removes it,
        // so a refused device (add-device at runtime) leaves nothing behind.
        let watch = || -> io::Result<(Poll, Arc<Waker>)> {
            listener.set_nonblocking(true)?;
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            poll.registry().register(
                &mut SourceFd(&listener.as_raw_fd()),
                LISTENER,
                Interest::READABLE,
            )?;
            Ok((poll, waker))
        };
        let (poll, waker) = watch().map_err(|source| {
            let _ = std::fs::remove_file(path);
            listen_error(source)
        })?;
        let (requests_tx, requests) = mpsc::channel();
        Ok(DeviceServer {
            name: session.name().to_string(),
            snapshot: session.snapshot(),
            path: path.to_path_buf(),
            listener,
            poll,
            handle: ServerHandle {
                waker,
                stop: Arc::new(AtomicBool::new(false)),
                requests: requests_tx,
            },
            requests,
            session: Arc::new(Mutex::new(session)),
        })
    }

    /// Where the device publishes its configuration (`query-config`).
    pub fn config_snapshot(&self) -> Arc<ConfigSnapshot> {
        self.snapshot.clone()
    }

    /// A handle that stops [`Self::run`] or reaches the session.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serve until shut down. Front-end errors never end this loop: they end
    /// the connection, and the next front-end is served from scratch.
    pub fn run(mut self) {
        log::info!("{}: listening on {}", self.name, self.path.display());
        let mut events = Events::with_capacity(8);
        let mut connection: Option<Connection> = None;
        'serve: loop {
            // While a message is only partly here, wake up to give up on it.
            let timeout = connection
                .as_ref()
                .and_then(|conn| conn.partial_since)
                .map(|since| MESSAGE_TIMEOUT.saturating_sub(since.elapsed()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("{}: event loop failed: {e}", self.name);
                break;
            }
            if events.is_empty() {
                // The poll timed out: a partial message's time is up.
                if let Some(conn) = connection.as_mut() {
                    if let Err(reason) = self.serve_ready(conn) {
                        log::info!(
                            "{}: front-end disconnected: {}",
                            self.name,
                            crate::error_chain(&reason)
                        );
                        self.drop_connection(&mut connection);
                    }
                }
            }
            for event in events.iter() {
                match event.token() {
                    WAKE => {
                        if self.handle.stop.load(Ordering::SeqCst) {
                            break 'serve;
                        }
                        self.serve_requests();
                    }
                    LISTENER => self.accept(&mut connection),
                    CONNECTION => {
                        if let Some(conn) = connection.as_mut() {
                            if let Err(reason) = self.serve_ready(conn) {
                                log::info!(
                                    "{}: front-end disconnected: {}",
                                    self.name,
                                    crate::error_chain(&reason)
                                );
                                self.drop_connection(&mut connection);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        self.drop_connection(&mut connection);
        // Suspended queues may still have storage operations running; let
        // them land before the process goes.
        lock(&self.session).shut_down();
        log::info!("{}: stopped", self.name);
    }

    fn serve_requests(&self) {
        while let Ok(request) = self.requests.try_recv() {
            lock(&self.session).flush();
            match request {
                SessionRequest::Presetup(config, reply) => {
                    let result = lock(&self.session).presetup(config);
                    // The asker may have given up waiting.
                    let _ = reply.send(result);
                }
            }
        }
    }

    fn accept(&mut self, connection: &mut Option<Connection>) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::error!("{}: accept failed: {e}", self.name);
                    return;
                }
            };
            if connection.is_some() {
                log::warn!(
                    "{}: refusing a second front-end while one is connected",
                    self.name
                );
                continue;
            }
            match self.connect(stream) {
                Ok(conn) => {
                    log::info!("{}: front-end connected", self.name);
                    *connection = Some(conn);
                }
                Err(e) => log::error!("{}: cannot set up connection: {e}", self.name),
            }
        }
    }

    fn connect(&self, stream: UnixStream) -> io::Result<Connection> {
        stream.set_nonblocking(false)?;
        // A front-end writes each message whole; one that stops half-way
        // through (or stops reading our replies) must cost its connection,
        // not this device's protocol thread. Applies to the dup too.
        stream.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
        stream.set_write_timeout(Some(MESSAGE_TIMEOUT))?;
        let peek = stream.try_clone()?;
        self.poll.registry().register(
            &mut SourceFd(&peek.as_raw_fd()),
            CONNECTION,
            Interest::READABLE,
        )?;
        {
            let mut session = lock(&self.session);
            session.metrics().connected();
            session.connected();
        }
        let handler = BackendReqHandler::from_stream(stream, self.session.clone());
        Ok(Connection {
            handler,
            stream: peek,
            changed: false,
            partial_since: None,
        })
    }

    fn drop_connection(&self, connection: &mut Option<Connection>) {
        if let Some(conn) = connection.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
            // Stop queues (in-flight requests complete) before the memory goes.
            let mut session = lock(&self.session);
            session.disconnected();
            session.metrics().disconnected();
        }
    }

    /// Handle every message that is waiting (the poll is edge-triggered).
    fn serve_ready(&self, conn: &mut Connection) -> Result<(), Disconnect> {
        loop {
            let header = match wire::peek_message(&conn.stream) {
                Ok(Peek::Message(header)) => {
                    conn.partial_since = None;
                    header
                }
                Ok(Peek::Partial { have, need }) => {
                    // Wait for the rest without blocking: the poll wakes us
                    // when it comes, and gives up on it after the timeout.
                    let since = *conn.partial_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= MESSAGE_TIMEOUT {
                        return Err(Disconnect::Stalled { have, need });
                    }
                    return Ok(());
                }
                Ok(Peek::Empty) => {
                    // The burst is over: plan what it changed, once, and
                    // publish the configuration for query-config.
                    let mut session = lock(&self.session);
                    session.flush();
                    if std::mem::take(&mut conn.changed) {
                        session.publish();
                    }
                    return Ok(());
                }
                Ok(Peek::Closed) => return Err(Disconnect::Closed),
                Err(e) => return Err(Disconnect::Read(e)),
            };
            let started = Instant::now();
            let info = requests::lookup(header.code);
            let (claimed, metrics, answered) = {
                let mut session = lock(&self.session);
                // Only a setter nobody waits on may leave its plan for the
                // end of the burst; anything answered sees it executed.
                let answered = header.need_reply() && session.reply_ack_enabled();
                let effect = requests::effect(header.code);
                let may_defer = !answered && matches!(effect, Effect::Starts | Effect::Configures);
                session.begin_message(may_defer);
                (session.claims(&header), session.metrics().clone(), answered)
            };
            let name = claimed.unwrap_or_else(|| requests::name(header.code));
            metrics.message_named(header.code, name);
            let outcome = match (claimed, info.map(|info| info.handled_by)) {
                (None, Some(HandledBy::Crate)) => match conn.handler.handle_request() {
                    Ok(()) => Ok(()),
                    Err(e) => self.crate_error(name, info.map(|info| info.reply), answered, e),
                },
                _ => self.handle_own(conn, header.code, name),
            };
            if outcome.is_ok() && requests::effect(header.code) == Effect::Stops {
                metrics.stop_replied(header.code);
            }
            {
                let mut session = lock(&self.session);
                session.after_reply();
                if requests::effect(header.code) != Effect::Query {
                    conn.changed = true;
                }
            }
            metrics.message_done();
            log::debug!(
                "{}: {name} ({}) size {} -> {} in {:?}",
                self.name,
                header.code,
                header.size,
                if outcome.is_ok() { "ok" } else { "error" },
                started.elapsed()
            );
            outcome?;
        }
    }
}

impl Drop for DeviceServer {
    /// The socket file goes with the server, whether it ran or not.
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("{}: cannot remove {}: {e}", self.name, self.path.display());
        }
    }
}
