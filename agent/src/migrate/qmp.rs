//! A small QMP client on `serde_json`: connect to a QEMU monitor socket,
//! read the greeting, leave capabilities negotiation with
//! `qmp_capabilities`, run commands and collect the asynchronous events
//! that arrive meanwhile, each with the time it was received.
//!
//! QMP is line-oriented in practice: QEMU writes every reply and event as
//! one JSON object followed by a newline. Commands carry an `id` and a
//! reply is matched to its command by that id, so an event or a stray
//! reply never passes for the answer. Everything QEMU sends is checked
//! before use; a malformed line is an error, never a panic.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Longest line accepted from QEMU (a `query-migrate` is a few KiB).
const MAX_LINE_BYTES: usize = 16 << 20;

/// Something went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Nobody listens on the socket, or it is not ours to use.
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP connection failed")]
    Io(#[source] io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// A line is not a JSON object.
    #[error("QEMU sent something that is not a QMP message: {line}")]
    Malformed {
        /// The line, shortened.
        line: String,
    },
    /// A line longer than any QMP message.
    #[error("QEMU sent a line longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    /// The first message is not a QMP greeting.
    #[error("no QMP greeting: {0}")]
    Greeting(String),
    /// QEMU answered a command with an error.
    #[error("{command}: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The reply to a command is neither a return nor an error.
    #[error("{command}: unexpected reply {reply}")]
    Unexpected {
        /// The command.
        command: String,
        /// The reply, shortened.
        reply: String,
    },
    /// No reply (or event) within the time allowed.
    #[error("no answer from QEMU within {0:?}")]
    Timeout(Duration),
}

/// An asynchronous event (`{"event": ..., "data": ..., "timestamp": ...}`).
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// Its name, e.g. `STOP`, `RESUME`, `MIGRATION`.
    pub name: String,
    /// Its `data` member (`Value::Null` when absent).
    pub data: Value,
    /// QEMU's stamp: microseconds since the Unix epoch on QEMU's host
    /// wall clock, when it carries a well-formed one.
    pub stamp_us: Option<i64>,
    /// When this client read it (its monotonic clock).
    pub received: Instant,
}

impl QmpEvent {
    /// `data.status` as a string (the `MIGRATION` event's state).
    pub fn status(&self) -> Option<&str> {
        self.data.get("status").and_then(Value::as_str)
    }
}

/// A line shortened for an error message.
fn shorten(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// `{"seconds": S, "microseconds": U}` as microseconds since the epoch.
fn stamp(message: &Map<String, Value>) -> Option<i64> {
    let timestamp = message.get("timestamp")?;
    let seconds = timestamp.get("seconds")?.as_i64()?;
    let micros = timestamp.get("microseconds")?.as_i64()?;
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

/// One QMP connection in command mode.
pub struct Qmp {
    stream: UnixStream,
    /// Bytes read but not yet split into lines.
    pending: Vec<u8>,
    /// Events received and not yet taken.
    events: VecDeque<QmpEvent>,
    next_id: u64,
    /// How long a command may take to be answered.
    command_timeout: Duration,
}

impl Qmp {
    /// Connect to `path`, read the greeting and send `qmp_capabilities`;
    /// each reply may take up to `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(QmpError::Io)?;
        let mut qmp = Qmp {
            stream,
            pending: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            command_timeout: timeout,
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp
            .read_message(deadline)?
            .ok_or(QmpError::Timeout(timeout))?;
        if !greeting.contains_key("QMP") {
            return Err(QmpError::Greeting(shorten(
                &Value::Object(greeting).to_string(),
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Run `command` with `arguments`; its `return` value. Events that
    /// arrive before the reply are kept for [`Self::take_events`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(QmpError::Io)?;
        let deadline = Instant::now() + self.command_timeout;
        loop {
            let Some(message) = self.read_message(deadline)? else {
                return Err(QmpError::Timeout(self.command_timeout));
            };
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                // Replies without our id (a greeting repeated, a reply to
                // someone else's command) are not ours to interpret.
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(QmpError::Unexpected {
                command: command.to_string(),
                reply: shorten(&Value::Object(message).to_string()),
            });
        }
    }

    /// Wait up to `timeout` for more events to arrive (returns at the
    /// first); `Ok(false)` when none came.
    pub fn wait_events(&mut self, timeout: Duration) -> Result<bool, QmpError> {
        if !self.events.is_empty() {
            return Ok(true);
        }
        let deadline = Instant::now() + timeout;
        while self.events.is_empty() {
            match self.read_message(deadline)? {
                Some(_) => {} // a late reply to a command that gave up
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Every event received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// The next message that is not an event (events go to the queue), or
    /// `None` at `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Map<String, Value>>, QmpError> {
        loop {
            while let Some(line) = self.next_line()? {
                let received = Instant::now();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                let message = match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(message)) => message,
                    _ => {
                        return Err(QmpError::Malformed {
                            line: shorten(&text),
                        })
                    }
                };
                match message.get("event").and_then(Value::as_str) {
                    Some(name) => self.events.push_back(QmpEvent {
                        name: name.to_string(),
                        data: message.get("data").cloned().unwrap_or(Value::Null),
                        stamp_us: stamp(&message),
                        received,
                    }),
                    None => return Ok(Some(message)),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if !self.fill(deadline - now)? {
                return Ok(None);
            }
        }
    }

    /// Split one complete line off the bytes read.
    fn next_line(&mut self) -> Result<Option<Vec<u8>>, QmpError> {
        match self.pending.iter().position(|&byte| byte == b'\n') {
            Some(end) => {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                Ok(Some(line))
            }
            None if self.pending.len() > MAX_LINE_BYTES => Err(QmpError::TooLong),
            None => Ok(None),
        }
    }

    /// Read what QEMU sent, waiting up to `timeout`; `Ok(false)` when
    /// nothing came in time.
    fn fill(&mut self, timeout: Duration) -> Result<bool, QmpError> {
        // A zero timeout would mean "block forever".
        let timeout = timeout.max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(QmpError::Io)?;
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(QmpError::Closed),
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(QmpError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A fake QEMU monitor: greets, then answers each command line with
    /// whatever `answer` writes (it gets the request and the stream).
    fn fake_qemu(
        answer: impl Fn(&Value, &mut UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let reader = BufReader::new(stream.try_clone().unwrap());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                let request: Value = serde_json::from_str(&line).unwrap();
                answer(&request, &mut stream);
            }
        });
        (dir, path)
    }

    fn reply(stream: &mut UnixStream, request: &Value, body: &str) {
        let line = format!("{{{body}, \"id\": {}}}\n", request["id"]);
        stream.write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn commands_get_their_own_reply_and_events_are_kept_with_their_stamp() {
        let (_dir, path) = fake_qemu(|request, stream| match request["execute"].as_str() {
            Some("query-status") => {
                // An event and a reply for another id come first.
                stream
                    .write_all(
                        b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 10, \"microseconds\": 5}}\n\
                          {\"return\": {\"status\": \"wrong\"}, \"id\": 999}\n",
                    )
                    .unwrap();
                reply(stream, request, "\"return\": {\"status\": \"running\"}");
            }
            Some("bogus") => reply(
                stream,
                request,
                "\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no bogus\"}",
            ),
            _ => reply(stream, request, "\"return\": {}"),
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        let events = qmp.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "STOP");
        assert_eq!(events[0].stamp_us, Some(10_000_005));
        match qmp.execute("bogus", None) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!(
                    (class.as_str(), desc.as_str()),
                    ("CommandNotFound", "no bogus")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_from_qemu_is_an_error_not_a_panic() {
        let (_dir, path) = fake_qemu(|request, stream| {
            if request["execute"] == "qmp_capabilities" {
                reply(stream, request, "\"return\": {}");
            } else {
                stream.write_all(b"[1, 2\n").unwrap();
            }
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert!(matches!(
            qmp.execute("query-status", None),
            Err(QmpError::Malformed { .. })
        ));
    }

    #[test]
    fn a_silent_qemu_times_out() {
        let (_dir, path) = fake_qemu(|request, stream| {
            if request["execute"] == "qmp_capabilities" {
                reply(stream, request, "\"return\": {}");
            }
        });
        let mut qmp = Qmp::connect(&path, Duration::from_millis(200)).unwrap();
        assert!(matches!(
            qmp.execute("query-status", None),
            Err(QmpError::Timeout(_))
        ));
        assert!(!qmp.wait_events(Duration::from_millis(20)).unwrap());
    }
}
