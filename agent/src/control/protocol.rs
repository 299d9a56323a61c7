//! The control API's wire format, shared by the server and the `ctl`
//! client: QMP-style JSON objects, one per line in each direction.
//!
//! ```text
//! -> {"execute": "fence-release", "arguments": {"device": "blk0"}, "id": 7}
//! <- {"return": {}, "id": 7}
//! -> {"execute": "frobnicate"}
//! <- {"error": {"class": "CommandNotFound", "desc": "the command frobnicate has not been found"}}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest request line the server accepts, in bytes without the newline.
/// A longer one gets an error reply and the connection is closed, because
/// there is no telling where the next request would start.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A request: `{"execute": NAME, "arguments": {...}, "id": ANY}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The command's name.
    pub execute: String,
    /// The command's arguments; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Map<String, Value>>,
    /// Any JSON value; the reply carries it back unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// Why a line is not a request.
#[derive(Debug, thiserror::Error)]
pub enum ParseFailure {
    /// The line is not JSON.
    #[error("invalid JSON")]
    Json(#[source] serde_json::Error),
    /// The line is JSON but not an object.
    #[error("a request must be a JSON object")]
    NotAnObject,
    /// The object is not a request (no `execute`, unknown members, wrong
    /// types).
    #[error("invalid request")]
    NotARequest(#[source] serde_json::Error),
}

/// Parse one request line as the server does, without acting on it: JSON,
/// an object, then a [`Request`]. In two steps, so that the request's `id`
/// comes back (to be echoed in the error reply) even when the rest of the
/// object is wrong. Pure, and the entry the `control_line` fuzz target uses.
pub fn parse_request(line: &[u8]) -> Result<Request, (ParseFailure, Option<Value>)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| (ParseFailure::Json(e), None))?;
    let Value::Object(object) = value else {
        return Err((ParseFailure::NotAnObject, None));
    };
    let id = object.get("id").cloned();
    serde_json::from_value(Value::Object(object)).map_err(|e| (ParseFailure::NotARequest(e), id))
}

/// QMP's error classes, as far as the agent uses them. The class is for
/// programs to act on; the description is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Anything without a more specific class: malformed JSON, a request
    /// that is not an object, bad arguments, a line too long.
    GenericError,
    /// No command has this name.
    CommandNotFound,
    /// No device has this id.
    DeviceNotFound,
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// The body of an error reply. The class is a string, not an
/// [`ErrorClass`], so that a client reads classes newer than itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of error (see [`ErrorClass`]).
    pub class: String,
    /// What went wrong, for people.
    pub desc: String,
}

/// A reply: `{"return": VALUE}` or `{"error": {"class": ..., "desc": ...}}`,
/// with the request's `id` if it had one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// The command succeeded.
    Return {
        /// Its result (`{}` for commands that return nothing).
        #[serde(rename = "return")]
        value: Value,
        /// The request's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// The request or the command failed.
    Error {
        /// What failed.
        error: ErrorBody,
        /// The request's id, if the request got far enough to have one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

impl Reply {
    /// An error reply of `class`.
    pub fn error(class: ErrorClass, desc: String, id: Option<Value>) -> Reply {
        Reply::Error {
            error: ErrorBody {
                class: class.name().to_string(),
                desc,
            },
            id,
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self)
            .expect("a Reply is built from strings and JSON values, which always serialize");
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_round_trip_through_their_line_form() {
        let replies = [
            Reply::Return {
                value: json!({}),
                id: None,
            },
            Reply::Return {
                value: json!([{"id": "blk0"}]),
                id: Some(json!("x")),
            },
            Reply::error(ErrorClass::DeviceNotFound, "gone".into(), Some(json!(3))),
        ];
        for reply in replies {
            let line = reply.to_line();
            assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
            assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
        }
    }

    #[test]
    fn reply_shapes_are_qmp_shapes() {
        assert_eq!(
            Reply::Return {
                value: json!({}),
                id: None
            }
            .to_line(),
            "{\"return\":{}}\n"
        );
        assert_eq!(
            Reply::error(ErrorClass::GenericError, "bad".into(), Some(json!(1))).to_line(),
            "{\"error\":{\"class\":\"GenericError\",\"desc\":\"bad\"},\"id\":1}\n"
        );
    }
}
