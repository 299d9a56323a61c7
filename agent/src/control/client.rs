//! One request to a running agent's control socket and its reply: what
//! `vhost-agent ctl` does.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Reply, Request};

/// Longest reply line read; far beyond any reply the agent gives.
const MAX_REPLY_BYTES: u64 = 64 << 20;

/// A request could not be made or its reply not read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket, or it is not ours to use.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Sending the request failed.
    #[error("cannot send the request")]
    Send(#[source] io::Error),
    /// Reading the reply failed (or timed out).
    #[error("cannot read the reply")]
    Receive(#[source] io::Error),
    /// The agent closed the connection before a whole reply line.
    #[error("the agent closed the connection without replying")]
    NoReply,
    /// The line is not a control API reply.
    #[error("the reply is not a control API reply")]
    BadReply(#[source] serde_json::Error),
}

/// Send `request` to the control socket at `path` and return its reply.
/// Sending and receiving each may take up to `timeout`.
pub fn execute(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .map_err(ClientError::Send)?;
    let mut line = serde_json::to_vec(request)
        .expect("a Request is built from strings and JSON values, which always serialize");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(ClientError::Send)?;
    let mut reply = Vec::new();
    BufReader::new((&stream).take(MAX_REPLY_BYTES))
        .read_until(b'\n', &mut reply)
        .map_err(ClientError::Receive)?;
    if reply.last() != Some(&b'\n') {
        return Err(ClientError::NoReply);
    }
    serde_json::from_slice(&reply).map_err(ClientError::BadReply)
}
