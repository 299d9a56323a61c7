//! The two agents' control sockets, as the orchestrator uses them: one
//! request per call (the `ctl` client), replies checked for the shape the
//! orchestrator reads, and `query-metrics` samples timed on the
//! orchestrator's clock so the agents' timelines can be placed on it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::control::{self, Reply, Request};

/// A control request failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request could not be made or its reply not read.
    #[error("{command} on {socket}")]
    Client {
        /// The command.
        command: String,
        /// The control socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: control::client::ClientError,
    },
    /// The agent answered with an error.
    #[error("{command}: {desc} ({class})")]
    Refused {
        /// The command.
        command: String,
        /// The agent's error class.
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// The reply does not have the shape the orchestrator reads.
    #[error("{command}: unexpected reply: {what}")]
    BadReply {
        /// The command.
        command: String,
        /// What is missing or wrong.
        what: String,
    },
}

/// What one device's entry of `query-devices` tells the orchestrator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentDevice {
    /// Its id.
    pub id: String,
    /// `blk` or `net`.
    pub kind: String,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// A disk's write fence mode (`lock`, `api`, `none`).
    pub fence_mode: Option<String>,
    /// A disk's storage operations abandoned by a suspend that may still
    /// modify the image.
    pub abandoned_outstanding: Option<u64>,
    /// Whether a disk's fence gate is open.
    pub fence_open: Option<bool>,
}

/// `query-metrics` of every device, with the orchestrator's clock before
/// the request was sent and after the reply was read: each device's
/// `now-us` was taken in between.
#[derive(Clone, Debug)]
pub struct MetricsSample {
    /// Before sending.
    pub sent: Instant,
    /// After the reply.
    pub received: Instant,
    /// One report per device, as the agent sent it.
    pub reports: Vec<Value>,
}

impl MetricsSample {
    /// The report of device `id`.
    pub fn device(&self, id: &str) -> Option<&Value> {
        self.reports.iter().find(|report| report["device"] == id)
    }
}

/// One agent's control socket.
#[derive(Clone, Debug)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    /// The agent at `socket`; every reply may take up to `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> AgentClient {
        AgentClient {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// Its control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Run `command` with `arguments` (an object, or none); its result.
    pub fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, AgentError> {
        let arguments = match arguments {
            Some(Value::Object(map)) => Some(map),
            Some(_) | None => None,
        };
        let request = Request {
            execute: command.to_string(),
            arguments,
            id: None,
        };
        match control::client::execute(&self.socket, &request, self.timeout) {
            Ok(Reply::Return { value, .. }) => Ok(value),
            Ok(Reply::Error { error, .. }) => Err(AgentError::Refused {
                command: command.to_string(),
                class: error.class,
                desc: error.desc,
            }),
            Err(source) => Err(AgentError::Client {
                command: command.to_string(),
                socket: self.socket.clone(),
                source,
            }),
        }
    }

    /// `query-devices`, each entry checked.
    pub fn devices(&self) -> Result<Vec<AgentDevice>, AgentError> {
        let value = self.execute("query-devices", None)?;
        let bad = |what: String| AgentError::BadReply {
            command: "query-devices".to_string(),
            what,
        };
        let entries = value
            .as_array()
            .ok_or_else(|| bad("not an array".to_string()))?;
        entries
            .iter()
            .map(|entry| {
                let text = |key: &str| {
                    entry
                        .get(key)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("an entry has no string {key:?}: {entry}")))
                };
                let fence = entry.get("fence").and_then(Value::as_object);
                let fence_field = |key: &str| fence.and_then(|fence| fence.get(key));
                Ok(AgentDevice {
                    id: text("id")?,
                    kind: text("kind")?,
                    socket: PathBuf::from(text("socket")?),
                    fence_mode: fence_field("mode")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    abandoned_outstanding: fence_field("abandoned-outstanding")
                        .and_then(Value::as_u64),
                    fence_open: fence_field("open").and_then(Value::as_bool),
                })
            })
            .collect()
    }

    /// `query-config` of device `id`: the configuration `presetup` takes.
    pub fn config(&self, id: &str) -> Result<Value, AgentError> {
        let config = self.execute("query-config", Some(device_argument(id)))?;
        if !config.is_object() {
            return Err(AgentError::BadReply {
                command: "query-config".to_string(),
                what: format!("not an object: {config}"),
            });
        }
        Ok(config)
    }

    /// `query-metrics` of every device, timed (see [`MetricsSample`]).
    pub fn sample_metrics(&self) -> Result<MetricsSample, AgentError> {
        let sent = Instant::now();
        let value = self.execute("query-metrics", None)?;
        let received = Instant::now();
        let reports = value
            .as_array()
            .filter(|reports| {
                reports
                    .iter()
                    .all(|report| report["device"].is_string() && report["now-us"].is_u64())
            })
            .cloned()
            .ok_or_else(|| AgentError::BadReply {
                command: "query-metrics".to_string(),
                what: "not an array of reports with device and now-us (an agent older than \
                       vhost-agent migrate?)"
                    .to_string(),
            })?;
        Ok(MetricsSample {
            sent,
            received,
            reports,
        })
    }
}

/// `{"device": id}`.
pub fn device_argument(id: &str) -> Value {
    let mut map = Map::new();
    map.insert("device".to_string(), Value::String(id.to_string()));
    Value::Object(map)
}
