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

use crate::supervisor::{Devices, DevicesError};

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
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use blkdev::fence::Fence;
    use blkdev::FenceMode;
    use serde_json::json;

    use super::*;
    use crate::registry::{DeviceKind, RegisteredDevice, Registry};

    /// Devices `dst` (fence=api, so its gate starts closed) and `src`
    /// (fence=lock), registered without servers. Neither fence touches the
    /// file system here.
    fn registry() -> (Devices, Arc<Fence>) {
        let registry = Registry::new();
        let image = PathBuf::from("/nonexistent/dst.img");
        let fence = Fence::new(FenceMode::Api, &image);
        registry
            .insert(RegisteredDevice::new(
                "dst",
                Path::new("/run/dst.sock"),
                DeviceKind::Blk {
                    image,
                    fence: fence.clone(),
                    presetup: crate::blk_presetup::unserved(),
                },
            ))
            .unwrap();
        let image = PathBuf::from("/nonexistent/src.img");
        registry
            .insert(RegisteredDevice::new(
                "src",
                Path::new("/run/src.sock"),
                DeviceKind::Blk {
                    fence: Fence::new(FenceMode::Lock, &image),
                    image,
                    presetup: crate::blk_presetup::unserved(),
                },
            ))
            .unwrap();
        (Devices::new(Arc::new(registry)), fence)
    }

    /// Dispatch `line` (finishing it here if it answers later) and parse
    /// the reply line back.
    fn ask(registry: &Devices, line: &str) -> (Value, bool) {
        let (reply, quit) = match dispatch(line.as_bytes(), registry).expect("a reply") {
            Dispatched::Now { reply, quit } => (reply, quit),
            Dispatched::Later(later) => (later.finish(), false),
        };
        assert!(reply.ends_with('\n'));
        assert_eq!(reply.matches('\n').count(), 1, "one line");
        (serde_json::from_str(&reply).unwrap(), quit)
    }

    /// Assert an error reply of `class` whose description contains `text`;
    /// returns the reply.
    fn assert_error(registry: &Devices, line: &str, class: &str, text: &str) -> Value {
        let (reply, quit) = ask(registry, line);
        assert!(!quit);
        assert_eq!(reply["error"]["class"], class, "{line} -> {reply}");
        let desc = reply["error"]["desc"].as_str().unwrap();
        assert!(desc.contains(text), "{line}: `{text}` not in `{desc}`");
        assert!(reply.get("return").is_none());
        reply
    }

    #[test]
    fn garbage_is_a_generic_error_without_id() {
        let (registry, _) = registry();
        for line in ["this is not json", "{\"execute\": ", "\u{7f}\u{1}", "{}}"] {
            let reply = assert_error(&registry, line, "GenericError", "invalid JSON");
            assert!(reply.get("id").is_none());
        }
        let invalid_utf8: &[u8] = b"{\"execute\": \"\xff\"}";
        let dispatched = dispatch(invalid_utf8, &registry).unwrap();
        assert!(
            matches!(dispatched, Dispatched::Now { reply, .. } if reply.contains("GenericError"))
        );
    }

    #[test]
    fn a_request_must_be_an_object() {
        let (registry, _) = registry();
        for line in ["[1, 2]", "\"query-devices\"", "42", "null"] {
            assert_error(&registry, line, "GenericError", "must be a JSON object");
        }
    }

    #[test]
    fn blank_lines_get_no_reply() {
        let (registry, _) = registry();
        assert!(dispatch(b"", &registry).is_none());
        assert!(dispatch(b"  \r\n", &registry).is_none());
    }

    #[test]
    fn malformed_requests_echo_their_id() {
        let (registry, _) = registry();
        let reply = assert_error(&registry, r#"{"id": 5}"#, "GenericError", "`execute`");
        assert_eq!(reply["id"], 5);
        let reply = assert_error(
            &registry,
            r#"{"execute": "quit", "frobnicate": 1, "id": "x"}"#,
            "GenericError",
            "frobnicate",
        );
        assert_eq!(reply["id"], "x");
        assert_error(
            &registry,
            r#"{"execute": 7}"#,
            "GenericError",
            "invalid request",
        );
        assert_error(
            &registry,
            r#"{"execute": "query-devices", "arguments": [1]}"#,
            "GenericError",
            "invalid request",
        );
    }

    #[test]
    fn unknown_command_is_command_not_found() {
        let (registry, _) = registry();
        let reply = assert_error(
            &registry,
            r#"{"execute": "frobnicate", "id": {"seq": 1}}"#,
            "CommandNotFound",
            "frobnicate",
        );
        assert_eq!(reply["id"], json!({"seq": 1}));
    }

    #[test]
    fn success_echoes_any_id() {
        let (registry, _) = registry();
        for id in [json!(1), json!("abc"), json!({"a": [1, 2]})] {
            let line = json!({"execute": "query-devices", "id": id}).to_string();
            let (reply, _) = ask(&registry, &line);
            assert_eq!(reply["id"], id);
            assert!(reply["return"].is_array());
        }
        let (reply, _) = ask(&registry, r#"{"execute": "query-devices"}"#);
        assert!(reply.get("id").is_none());
    }

    #[test]
    fn query_devices_reports_each_disk_and_its_fence() {
        let (registry, _) = registry();
        let (reply, quit) = ask(&registry, r#"{"execute": "query-devices"}"#);
        assert!(!quit);
        assert_eq!(
            reply["return"],
            json!([
                {
                    "id": "dst", "kind": "blk", "socket": "/run/dst.sock",
                    "image": "/nonexistent/dst.img",
                    "fence": {"mode": "api", "open": false,
                              "abandoned-outstanding": 0, "abandoned-total": 0},
                    "in-flight": [0]
                },
                {
                    "id": "src", "kind": "blk", "socket": "/run/src.sock",
                    "image": "/nonexistent/src.img",
                    "fence": {"mode": "lock", "open": true,
                              "abandoned-outstanding": 0, "abandoned-total": 0},
                    "in-flight": [0]
                }
            ])
        );
    }

    #[test]
    fn commands_without_arguments_refuse_arguments() {
        let (registry, _) = registry();
        assert_error(
            &registry,
            r#"{"execute": "query-devices", "arguments": {"device": "dst"}}"#,
            "GenericError",
            "invalid arguments for query-devices: unknown field `device`",
        );
        // An empty object is the same as none.
        let (reply, _) = ask(&registry, r#"{"execute": "quit", "arguments": {}}"#);
        assert_eq!(reply["return"], json!({}));
    }

    #[test]
    fn fence_release_needs_a_device_string() {
        let (registry, fence) = registry();
        assert_error(
            &registry,
            r#"{"execute": "fence-release"}"#,
            "GenericError",
            "invalid arguments for fence-release: missing field `device`",
        );
        assert_error(
            &registry,
            r#"{"execute": "fence-release", "arguments": {"device": 3}}"#,
            "GenericError",
            "invalid type: integer `3`, expected a string",
        );
        assert_error(
            &registry,
            r#"{"execute": "fence-release", "arguments": {"device": "dst", "force": true}}"#,
            "GenericError",
            "unknown field `force`",
        );
        assert!(!fence.is_open(), "refused requests change nothing");
    }

    #[test]
    fn fence_release_of_an_unknown_device_is_device_not_found() {
        let (registry, fence) = registry();
        let reply = assert_error(
            &registry,
            r#"{"execute": "fence-release", "arguments": {"device": "nope"}, "id": 9}"#,
            "DeviceNotFound",
            "device 'nope' not found",
        );
        assert_eq!(reply["id"], 9);
        assert!(!fence.is_open());
    }

    #[test]
    fn fence_release_opens_the_gate() {
        let (registry, fence) = registry();
        let (reply, quit) = ask(
            &registry,
            r#"{"execute": "fence-release", "arguments": {"device": "dst"}}"#,
        );
        assert_eq!(reply, json!({"return": {}}));
        assert!(!quit);
        assert!(fence.is_open());
        let (devices, _) = ask(&registry, r#"{"execute": "query-devices"}"#);
        assert_eq!(devices["return"][0]["fence"]["open"], true);
        // Releasing an open gate is not an error.
        let (reply, _) = ask(
            &registry,
            r#"{"execute": "fence-release", "arguments": {"device": "dst"}}"#,
        );
        assert_eq!(reply, json!({"return": {}}));
    }

    #[test]
    fn quit_returns_empty_and_asks_for_shutdown() {
        let (registry, _) = registry();
        let (reply, quit) = ask(&registry, r#"{"execute": "quit", "id": 1}"#);
        assert_eq!(reply, json!({"return": {}, "id": 1}));
        assert!(quit);
    }

    #[test]
    fn query_commands_lists_every_command() {
        let (registry, _) = registry();
        let (reply, _) = ask(&registry, r#"{"execute": "query-commands"}"#);
        let names: Vec<&str> = reply["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|command| command["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "query-commands",
                "query-devices",
                "query-metrics",
                "query-config",
                "presetup",
                "fence-release",
                "add-device",
                "remove-device",
                "quit"
            ]
        );
    }

    #[test]
    fn query_metrics_reports_every_device_or_one_in_either_format() {
        let (registry, _) = registry();
        registry
            .registry()
            .get("src")
            .unwrap()
            .metrics()
            .connected();
        let (reply, _) = ask(&registry, r#"{"execute": "query-metrics"}"#);
        let devices = reply["return"].as_array().unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[1]["device"], "src");
        assert_eq!(devices[1]["sessions"], 1);
        assert_eq!(devices[1]["stop-time-us"], Value::Null);
        let (reply, _) = ask(
            &registry,
            r#"{"execute": "query-metrics", "arguments": {"device": "dst", "format": "prometheus"}}"#,
        );
        let text = reply["return"].as_str().unwrap();
        assert!(text.contains("vhost_agent_sessions_total{device=\"dst\"} 0\n"));
        assert!(!text.contains("device=\"src\""));
        assert_error(
            &registry,
            r#"{"execute": "query-metrics", "arguments": {"device": "nope"}}"#,
            "DeviceNotFound",
            "nope",
        );
        assert_error(
            &registry,
            r#"{"execute": "query-metrics", "arguments": {"format": "xml"}}"#,
            "GenericError",
            "expected `json` or `prometheus`",
        );
    }

    #[test]
    fn add_device_refuses_bad_arguments_and_specs() {
        let (registry, _) = registry();
        for (arguments, text) in [
            (json!({"kind": "blk"}), "missing field `spec`"),
            (json!({"spec": "socket=/x"}), "missing field `kind`"),
            (
                json!({"kind": "scsi", "spec": "socket=/x"}),
                "unknown variant `scsi`, expected `blk` or `net`",
            ),
            (
                json!({"kind": "blk", "spec": "socket=/x", "id": "a"}),
                "unknown field `id`",
            ),
            (
                json!({"kind": "blk", "spec": "socket=/x"}),
                "invalid blk spec: missing image=PATH",
            ),
            (
                json!({"kind": "net", "spec": "socket=/x,dataplane=loop,mtu=9"}),
                "invalid net spec: mtu=9: must be 68..=65535",
            ),
            (
                json!({"kind": "blk", "spec": "socket=/run/src.sock,image=/i,id=src"}),
                "cannot add the device: two devices are named src",
            ),
            (
                json!({"kind": "blk", "spec": "socket=/run/src.sock,image=/i"}),
                "socket /run/src.sock belongs to device src",
            ),
        ] {
            let line = json!({"execute": "add-device", "arguments": arguments}).to_string();
            assert_error(&registry, &line, "GenericError", text);
        }
        assert_eq!(registry.registry().list().len(), 2, "nothing was added");
    }

    #[test]
    fn add_device_serves_a_disk_that_remove_device_takes_away() {
        let (registry, _) = registry();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let socket = dir.path().join("disk.sock");
        let spec = format!(
            "socket={},image={},engine=threads",
            socket.display(),
            image.display()
        );
        let add = json!({"execute": "add-device", "arguments": {"kind": "blk", "spec": spec}})
            .to_string();
        let (reply, _) = ask(&registry, &add);
        let added = &reply["return"];
        assert_eq!(added["id"], "blk0", "{reply}");
        assert_eq!(added["kind"], "blk");
        assert_eq!(added["socket"], socket.to_str().unwrap());
        assert_eq!(added["fence"]["mode"], "lock");
        assert!(socket.exists());
        let (devices, _) = ask(&registry, r#"{"execute": "query-devices"}"#);
        assert_eq!(devices["return"][2], *added);

        let remove = r#"{"execute": "remove-device", "arguments": {"device": "blk0"}, "id": 4}"#;
        let dispatched = dispatch(remove.as_bytes(), &registry).unwrap();
        assert!(
            matches!(dispatched, Dispatched::Later(_)),
            "a removal waits off the control thread"
        );
        drop(dispatched);
        assert!(!socket.exists(), "an unfinished removal still completes");
        assert_error(
            &registry,
            remove,
            "DeviceNotFound",
            "device 'blk0' not found",
        );

        // The id and socket are free again.
        let (reply, _) = ask(&registry, &add);
        assert_eq!(reply["return"]["id"], "blk0", "{reply}");
        let (reply, _) = ask(&registry, remove);
        assert_eq!(reply, json!({"return": {"handed-off": 0}, "id": 4}));
        assert!(!socket.exists());
        assert_eq!(registry.registry().list().len(), 2);
    }

    #[test]
    fn a_line_too_long_is_a_generic_error() {
        let error = ControlError::LineTooLong {
            limit: MAX_LINE_BYTES,
        };
        let reply: Value = serde_json::from_str(&error.reply(None).to_line()).unwrap();
        assert_eq!(reply["error"]["class"], "GenericError");
        assert!(reply["error"]["desc"].as_str().unwrap().contains("1048576"));
    }
}
