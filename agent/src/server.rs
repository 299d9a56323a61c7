//! One listening socket per device and one front-end at a time. A protocol
//! thread per device waits (mio) for a connection or a message, peeks at
//! each header to route it, and after a disconnect listens again (QEMU
//! reconnects with `reconnect-ms`).

use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError, VhostUserBackendReqHandlerMut};

use crate::requests::{self, HandledBy, Reply};
use crate::wire::{self, Peek};

/// How long the rest of a started message (or a reply write) may take.
pub const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

const LISTENER: Token = Token(0);
const CONNECTION: Token = Token(1);
const SHUTDOWN: Token = Token(2);

/// What the protocol loop needs from a device back-end besides the vhost
/// crate's handler trait: session events and the requests the agent reads
/// and answers itself (the crate cannot, see [`requests::REQUESTS`]).
pub trait ServedBackend: VhostUserBackendReqHandlerMut + Send + 'static {
    /// Device name for logs.
    fn name(&self) -> &str;
    /// The device's timeline: the server records connects, disconnects,
    /// message arrivals and stop replies in it.
    fn metrics(&self) -> Arc<crate::metrics::DeviceMetrics>;
    /// A front-end connected.
    fn new_session(&mut self) {}
    /// The front-end went away: stop the rings, forget its state.
    fn disconnect(&mut self);
    /// The server stops: wait for anything that must finish first.
    fn shut_down(&mut self) {}
    /// Log lines held back until a reply went out.
    fn flush_deferred_logs(&mut self) {}
    /// Whether REPLY_ACK was negotiated.
    fn reply_ack_enabled(&self) -> bool;
    /// SET_STATUS.
    fn set_status(&mut self, status: u8);
    /// GET_STATUS.
    fn get_status(&self) -> u8;
    /// The configuration the device holds now, published after every
    /// message for `query-config`.
    fn current_config(&self) -> presetup::DeviceConfig;
    /// Whether the back-end reads the request `header` announces itself,
    /// although the `vhost` crate would decode it, and the name to log it
    /// under. The opt-in presetup bracket uses it: request 41 is
    /// GET_SHARED_OBJECT to the crate (see [`crate::presetup_inband`]).
    fn claims(&self, header: &wire::Header) -> Option<&'static str> {
        let _ = header;
        None
    }
    /// A request the agent answers itself, other than SET/GET_STATUS.
    fn handle_own(&mut self, code: u32, payload: &[u8]) -> OwnRequest {
        let _ = (code, payload);
        OwnRequest::Unknown
    }
}

/// How a device answered a request the agent handles itself.
#[derive(Debug)]
pub enum OwnRequest {
    /// Done; acknowledge with this result if the front-end asked for an ack.
    Ack(bool),
    /// Done; send this reply payload.
    Reply(Vec<u8>),
    /// Failed where the front-end waits for a reply we cannot give: the
    /// connection must go.
    Fail(String),
    /// Not a request this device handles.
    Unknown,
}

/// The last configuration a device's protocol thread published: how the
/// control thread reads it (`query-config`) without waiting for that
/// thread, which may be blocked in a message.
#[derive(Debug, Default)]
pub struct ConfigSnapshot(Mutex<Option<presetup::DeviceConfig>>);

impl ConfigSnapshot {
    /// The configuration as of the last message handled; `None` before the
    /// device has published one.
    pub fn get(&self) -> Option<presetup::DeviceConfig> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, config: presetup::DeviceConfig) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(config);
    }
}

/// Setting up a device's socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
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

/// Handle to stop a running [`DeviceServer`] from another thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Ask the server to stop: in-flight requests finish, the socket file is
    /// removed.
    pub fn shutdown(&self) {
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake device server for shutdown: {e}");
        }
    }
}

/// A device's listening socket and protocol loop.
pub struct DeviceServer<B: ServedBackend> {
    name: String,
    path: PathBuf,
    listener: UnixListener,
    poll: Poll,
    waker: Arc<Waker>,
    backend: Arc<Mutex<B>>,
    metrics: Arc<crate::metrics::DeviceMetrics>,
    config: Arc<ConfigSnapshot>,
}

/// The connected front-end.
struct Connection<B: ServedBackend> {
    handler: BackendReqHandler<Mutex<B>>,
    /// A dup of the connection for peeking and for the requests the agent
    /// answers itself.
    stream: UnixStream,
}

enum Outcome {
    Continue,
    Disconnect(String),
}

fn lock<B>(backend: &Mutex<B>) -> std::sync::MutexGuard<'_, B> {
    backend
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Make way for a new socket at `path`: a stale socket file (nobody
/// listening) is removed; a live socket or any other file is an error.
pub fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !metadata.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| ServerError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

impl<B: ServedBackend> DeviceServer<B> {
    /// Bind `path` for `backend`. A stale socket file (nobody listening) is
    /// replaced; a live one is an error.
    pub fn bind(name: &str, path: &Path, backend: B) -> Result<DeviceServer<B>, ServerError> {
        let listen_error = |source| ServerError::Listen {
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
            let waker = Arc::new(Waker::new(poll.registry(), SHUTDOWN)?);
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
        let metrics = backend.metrics();
        let config = Arc::new(ConfigSnapshot::default());
        config.set(backend.current_config());
        Ok(DeviceServer {
            metrics,
            config,
            name: name.to_string(),
            path: path.to_path_buf(),
            listener,
            poll,
            waker,
            backend: Arc::new(Mutex::new(backend)),
        })
    }

    /// Where the device publishes its configuration (`query-config`).
    pub fn config_snapshot(&self) -> Arc<ConfigSnapshot> {
        self.config.clone()
    }

    /// A handle that stops [`Self::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            waker: self.waker.clone(),
        }
    }

    /// Serve until shut down. Front-end errors never end this loop: they end
    /// the connection, and the next front-end is served from scratch.
    pub fn run(mut self) {
        log::info!("{}: listening on {}", self.name, self.path.display());
        let mut events = Events::with_capacity(8);
        let mut connection: Option<Connection<B>> = None;
        'serve: loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("{}: event loop failed: {e}", self.name);
                break;
            }
            for event in events.iter() {
                match event.token() {
                    SHUTDOWN => break 'serve,
                    LISTENER => self.accept(&mut connection),
                    CONNECTION => {
                        if let Some(conn) = connection.as_mut() {
                            if let Outcome::Disconnect(reason) = self.serve_ready(conn) {
                                log::info!("{}: front-end disconnected: {reason}", self.name);
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
        lock(&self.backend).shut_down();
        log::info!("{}: stopped", self.name);
    }

    fn accept(&mut self, connection: &mut Option<Connection<B>>) {
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

    fn connect(&self, stream: UnixStream) -> io::Result<Connection<B>> {
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
        self.metrics.connected();
        lock(&self.backend).new_session();
        let handler = BackendReqHandler::from_stream(stream, self.backend.clone());
        Ok(Connection {
            handler,
            stream: peek,
        })
    }

    fn drop_connection(&self, connection: &mut Option<Connection<B>>) {
        if let Some(conn) = connection.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
            // Stop queues (in-flight requests complete) before the memory goes.
            let mut backend = lock(&self.backend);
            backend.disconnect();
            self.config.set(backend.current_config());
            drop(backend);
            self.metrics.disconnected();
        }
    }

    /// Handle every message that is waiting (the poll is edge-triggered).
    fn serve_ready(&self, conn: &mut Connection<B>) -> Outcome {
        loop {
            let header = match wire::peek_header(&conn.stream) {
                Ok(Peek::Header(header)) => header,
                Ok(Peek::Empty) => return Outcome::Continue,
                Ok(Peek::Closed) => return Outcome::Disconnect("connection closed".to_string()),
                Err(e) => return Outcome::Disconnect(format!("read failed: {e}")),
            };
            let started = Instant::now();
            let info = requests::lookup(header.code);
            let claimed = lock(&self.backend).claims(&header);
            let name = claimed.unwrap_or_else(|| requests::name(header.code));
            self.metrics.message_named(header.code, name);
            let outcome = match (claimed, info.map(|info| info.handled_by)) {
                (None, Some(HandledBy::Crate)) => match conn.handler.handle_request() {
                    Ok(()) => Ok(()),
                    Err(e) => self.crate_error(name, info.map(|info| info.reply), e),
                },
                _ => self.handle_own(conn, header.code, name),
            };
            if outcome.is_ok() && crate::metrics::is_stop(header.code) {
                self.metrics.stop_replied(header.code);
            }
            {
                let mut backend = lock(&self.backend);
                backend.flush_deferred_logs();
                self.config.set(backend.current_config());
            }
            log::debug!(
                "{}: {name} ({}) size {} -> {} in {:?}",
                self.name,
                header.code,
                header.size,
                if outcome.is_ok() { "ok" } else { "error" },
                started.elapsed()
            );
            if let Err(reason) = outcome {
                return Outcome::Disconnect(reason);
            }
        }
    }

    /// A request the crate handled failed. If the front-end still expects a
    /// reply we cannot give it any more, so the connection must go; a
    /// refused setter was already NACKed (or needs no answer) and the
    /// connection goes on.
    fn crate_error(
        &self,
        name: &str,
        reply: Option<Reply>,
        error: VhostError,
    ) -> Result<(), String> {
        match (&error, reply) {
            (VhostError::ReqHandlerError(cause), Some(Reply::Ack)) => {
                let cause = crate::error_chain(
                    cause
                        .get_ref()
                        .map_or(cause as &dyn std::error::Error, |inner| inner),
                );
                log::warn!("{}: {name} refused: {cause}", self.name);
                Ok(())
            }
            (VhostError::ReqHandlerError(cause), _) => {
                // The cause chain names the rule the peer broke.
                let cause = crate::error_chain(
                    cause
                        .get_ref()
                        .map_or(cause as &dyn std::error::Error, |inner| inner),
                );
                log::error!("{}: {name} failed: {cause}", self.name);
                Err(format!("{name} failed: {cause}"))
            }
            _ => {
                log::error!("{}: {name} failed: {error}", self.name);
                Err(format!("{name} failed: {error}"))
            }
        }
    }

    /// Requests the crate cannot handle (see [`requests::REQUESTS`]) and
    /// those the back-end claims ([`ServedBackend::claims`]).
    fn handle_own(&self, conn: &Connection<B>, code: u32, name: &str) -> Result<(), String> {
        let (header, payload, _files) = wire::read_message(&conn.stream)
            .map_err(|e| format!("reading {name} ({code}): {e}"))?;
        let mut backend = lock(&self.backend);
        let ack = |backend: &B, ok: bool| -> Result<(), String> {
            if header.need_reply() && backend.reply_ack_enabled() {
                wire::send_u64(&conn.stream, &header, u64::from(!ok))
                    .map_err(|e| format!("replying to {name}: {e}"))?;
            }
            Ok(())
        };
        match code {
            39 => {
                // SET_STATUS: u64 payload, the low byte is the status.
                let Some(status) = wire::payload_u64(&payload) else {
                    log::warn!(
                        "{}: SET_STATUS with a {}-byte payload",
                        self.name,
                        payload.len()
                    );
                    return ack(&backend, false);
                };
                backend.set_status((status & 0xff) as u8);
                ack(&backend, true)
            }
            40 => wire::send_u64(&conn.stream, &header, u64::from(backend.get_status()))
                .map_err(|e| format!("replying to GET_STATUS: {e}")),
            18 => {
                // SET_VRING_ENABLE: a vring state {index u32, num u32}. The
                // vhost crate refuses it until PROTOCOL_FEATURES is *acked*,
                // but QEMU's net client sends it before SET_FEATURES (it
                // enables pairs at connect time); we offer the feature, so
                // we accept it.
                let state = (payload.len() == 8).then(|| {
                    let word = |at: usize| {
                        u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"))
                    };
                    (word(0), word(4))
                });
                let Some((index, num @ (0 | 1))) = state else {
                    log::warn!(
                        "{}: SET_VRING_ENABLE with a bad payload ({} bytes)",
                        self.name,
                        payload.len()
                    );
                    return ack(&backend, false);
                };
                let result = backend.set_vring_enable(index, num == 1);
                if let Err(e) = &result {
                    log::warn!("{}: SET_VRING_ENABLE refused: {e}", self.name);
                }
                ack(&backend, result.is_ok())
            }
            _ => match backend.handle_own(code, &payload) {
                OwnRequest::Ack(ok) => ack(&backend, ok),
                OwnRequest::Reply(reply) => wire::send_reply(&conn.stream, &header, &reply)
                    .map_err(|e| format!("replying to {name}: {e}")),
                OwnRequest::Fail(reason) => {
                    log::error!("{}: {name} failed: {reason}", backend.name());
                    Err(format!("{name} failed: {reason}"))
                }
                OwnRequest::Unknown => Self::unhandled(&backend, name, code, ack),
            },
        }
    }

    /// A request nobody handles: refused if it needs only an ack, else the
    /// connection goes (we cannot make up a reply).
    fn unhandled(
        backend: &B,
        name: &str,
        code: u32,
        ack: impl Fn(&B, bool) -> Result<(), String>,
    ) -> Result<(), String> {
        match requests::lookup(code).map(|info| info.reply) {
            Some(Reply::Ack) => {
                log::warn!(
                    "{}: {name} ({code}) is not supported; refusing it",
                    backend.name()
                );
                ack(backend, false)
            }
            _ => {
                log::error!(
                    "{}: cannot answer request {name} ({code}); closing the connection",
                    backend.name()
                );
                Err(format!(
                    "unsupported request {name} ({code}) that requires a reply"
                ))
            }
        }
    }
}

impl<B: ServedBackend> Drop for DeviceServer<B> {
    /// The socket file goes with the server, whether it ran or not.
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("{}: cannot remove {}: {e}", self.name, self.path.display());
        }
    }
}
