//! The control API: a unix socket (`serve --control PATH`, mode 0600) that
//! speaks QMP-style JSON, one request per line. Orchestrators use it to
//! look at the served devices and to drive migrations; `fence-release` is
//! how a migration destination with `fence=api` learns that the source's
//! abandoned writes have landed. The protocol and every command are
//! documented in `docs/control-api.md`.
//!
//! * [`protocol`]: the request and reply types on the wire.
//! * [`dispatch`] (here): one request line in, one reply line out, given
//!   the [`Devices`]; every protocol rule lives here, so it is tested
//!   without a socket. A command that may block (`remove-device`) answers
//!   [`Dispatched::Later`]: the server finishes it off its thread.
//! * `commands`: the command table and the commands themselves. A new
//!   command is a row there plus its typed arguments.
//! * [`server`]: the socket and its mio loop on a thread of its own.
//! * [`client`]: one request and its reply (`vhost-agent ctl`).

use serde_json::Value;

use crate::daemon::supervisor::{Devices, DevicesError};

pub mod client;
mod commands;
pub mod protocol;
pub mod server;

pub use protocol::{ErrorClass, Reply, Request, MAX_LINE_BYTES};
pub use server::{ControlHandle, ControlServer};

/// A request failed; the client gets an error reply of [`Self::class`] and
/// the connection stays usable (except after [`Self::LineTooLong`]).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The line is not JSON.
    #[error("invalid JSON")]
    Parse(#[source] serde_json::Error),
    /// The line is JSON but not an object.
    #[error("a request must be a JSON object")]
    NotAnObject,
    /// The object is not a request (no `execute`, unknown members, wrong
    /// types).
    #[error("invalid request")]
    BadRequest(#[source] serde_json::Error),
    /// No command has this name.
    #[error("the command {0} has not been found")]
    CommandNotFound(String),
    /// The command's arguments do not fit it.
    #[error("invalid arguments for {command}")]
    BadArguments {
        /// The command.
        command: &'static str,
        /// What does not fit.
        #[source]
        source: serde_json::Error,
    },
    /// No device has this id.
    #[error("device '{0}' not found")]
    DeviceNotFound(String),
    /// An `add-device` spec does not parse (same grammar as `--blk` /
    /// `--net`).
    #[error("invalid {kind} spec: {reason}")]
    BadSpec {
        /// `blk` or `net`.
        kind: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `add-device` failed; nothing was added. (Boxed: the cause is large
    /// and errors travel by value.)
    #[error("cannot add the device")]
    AddDevice(#[source] Box<DevicesError>),
    /// `remove-device` was refused (the device is being removed already,
    /// or the agent is shutting down).
    #[error("cannot remove the device")]
    RemoveDevice(#[source] Box<DevicesError>),
    /// The command does not apply to this kind of device.
    #[error("{id} is a {kind} device; {command} applies to {applies_to} devices")]
    WrongKind {
        /// The command.
        command: &'static str,
        /// The device id.
        id: String,
        /// Its kind.
        kind: &'static str,
        /// The kind the command is for.
        applies_to: &'static str,
    },
    /// An early configuration was refused (malformed, or it does not fit
    /// the device); the device keeps its full configuration path.
    #[error("presetup of {id} refused")]
    Presetup {
        /// The device id.
        id: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The device has not published a configuration yet (its protocol
    /// thread has not been set up).
    #[error("{0} has no configuration yet")]
    NoConfig(String),
    /// The request line exceeds [`MAX_LINE_BYTES`]; the connection closes.
    #[error("request line longer than {limit} bytes; closing the connection")]
    LineTooLong {
        /// The limit.
        limit: usize,
    },
    /// A command's result could not be turned into JSON (a bug).
    #[error("cannot encode the result of {command}")]
    EncodeResult {
        /// The command.
        command: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl ControlError {
    /// The QMP error class the client sees.
    pub fn class(&self) -> ErrorClass {
        match self {
            ControlError::CommandNotFound(_) => ErrorClass::CommandNotFound,
            ControlError::DeviceNotFound(_) => ErrorClass::DeviceNotFound,
            ControlError::Parse(_)
            | ControlError::NotAnObject
            | ControlError::BadRequest(_)
            | ControlError::BadArguments { .. }
            | ControlError::LineTooLong { .. }
            | ControlError::WrongKind { .. }
            | ControlError::BadSpec { .. }
            | ControlError::AddDevice(_)
            | ControlError::RemoveDevice(_)
            | ControlError::Presetup { .. }
            | ControlError::NoConfig(_)
            | ControlError::EncodeResult { .. } => ErrorClass::GenericError,
        }
    }

    /// The error reply for this error.
    pub fn reply(&self, id: Option<Value>) -> Reply {
        Reply::error(self.class(), crate::error_chain(self), id)
    }
}

/// The answer to one request line.
#[derive(Debug)]
pub enum Dispatched {
    /// The reply is ready.
    Now {
        /// The reply line, newline included.
        reply: String,
        /// The request was `quit`: once the reply is on its way, the
        /// agent shuts down as on SIGTERM.
        quit: bool,
    },
    /// The command goes on and may block (`remove-device` waits for the
    /// device to stop): [`Later::finish`] it off the control thread.
    Later(Later),
}

/// The blocking rest of a command, and the reply it makes.
pub struct Later {
    command: &'static str,
    work: commands::Work,
    id: Option<Value>,
}

impl std::fmt::Debug for Later {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Later")
            .field("command", &self.command)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Later {
    /// Run the rest of the command (this may block) and return the reply
    /// line, newline included.
    pub fn finish(self) -> String {
        let reply = match (self.work)() {
            Ok(value) => {
                log::debug!("control: {} done", self.command);
                Reply::Return { value, id: self.id }
            }
            Err(error) => {
                log::debug!("control: request refused: {}", crate::error_chain(&error));
                error.reply(self.id)
            }
        };
        reply.to_line()
    }
}

/// Answer one request line (with or without its newline). A blank line
/// gets no reply (`None`), so people typing at the socket can press Enter.
/// Never fails: every error becomes an error reply, with the request's
/// `id` when the request got far enough to have one.
pub fn dispatch(line: &[u8], devices: &Devices) -> Option<Dispatched> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let dispatched = match execute(line, devices) {
        Ok((value, effect, id, command)) => match effect {
            commands::Effect::Later(work) => Dispatched::Later(Later { command, work, id }),
            effect => Dispatched::Now {
                reply: Reply::Return { value, id }.to_line(),
                quit: matches!(effect, commands::Effect::Quit),
            },
        },
        Err((error, id)) => {
            log::debug!("control: request refused: {}", crate::error_chain(&error));
            Dispatched::Now {
                reply: error.reply(id).to_line(),
                quit: false,
            }
        }
    };
    Some(dispatched)
}

type Executed = (Value, commands::Effect, Option<Value>, &'static str);

fn execute(line: &[u8], devices: &Devices) -> Result<Executed, (ControlError, Option<Value>)> {
    let request = protocol::parse_request(line).map_err(|(failure, id)| {
        let error = match failure {
            protocol::ParseFailure::Json(e) => ControlError::Parse(e),
            protocol::ParseFailure::NotAnObject => ControlError::NotAnObject,
            protocol::ParseFailure::NotARequest(e) => ControlError::BadRequest(e),
        };
        (error, id)
    })?;
    let id = request.id.clone();
    let command = commands::find(&request.execute).ok_or_else(|| {
        (
            ControlError::CommandNotFound(request.execute.clone()),
            id.clone(),
        )
    })?;
    let (value, effect) = (command.run)(devices, commands::Arguments::new(request.arguments))
        .map_err(|e| (e, id.clone()))?;
    if !matches!(effect, commands::Effect::Later(_)) {
        log::debug!("control: {} done", command.name);
    }
    Ok((value, effect, id, command.name))
}

#[cfg(test)]
mod tests;
