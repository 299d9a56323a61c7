//! Raw vhost-user messages on the test front-end's connection, for what the
//! `vhost` crate's `Frontend` cannot send or does not show: request 45
//! (GET_VRING_BASE_SKIP_DRAIN) and every bit of GET_PROTOCOL_FEATURES.
//!
//! The `Frontend` keeps no buffered state between messages, so a raw
//! exchange on a clone of its socket is safe as long as the `Frontend` has
//! no reply pending (the test front-end is single-threaded).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// Header flags: protocol version 1.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flags: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flags: the sender wants a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// VHOST_USER_GET_VRING_BASE.
pub const GET_VRING_BASE: u32 = 11;
/// VHOST_USER_GET_PROTOCOL_FEATURES.
pub const GET_PROTOCOL_FEATURES: u32 = 15;
/// VHOST_USER_GET_QUEUE_NUM.
pub const GET_QUEUE_NUM: u32 = 17;
/// VHOST_USER_GET_VRING_BASE_SKIP_DRAIN: GET_VRING_BASE that suspends
/// instead of draining (needs protocol bit 23).
pub const GET_VRING_BASE_SKIP_DRAIN: u32 = 45;

/// Largest payload we accept in a reply (the spec's biggest fixed reply is
/// far smaller; this only bounds a broken peer).
const MAX_PAYLOAD: u32 = 4096;

/// A message as it came off the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMessage {
    /// Request code.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload bytes (`size` from the header says how many).
    pub payload: Vec<u8>,
}

impl RawMessage {
    /// The payload as a `VhostUserVringState {index u32, num u32}`, if it
    /// is exactly 8 bytes.
    pub fn vring_state(&self) -> Option<(u32, u32)> {
        let bytes: [u8; 8] = self.payload.as_slice().try_into().ok()?;
        Some((
            u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")),
            u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")),
        ))
    }

    /// The payload as a `u64`, if it is exactly 8 bytes.
    pub fn u64(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.payload.as_slice().try_into().ok()?))
    }
}

/// Send one message without fds.
pub fn send(stream: &UnixStream, request: u32, flags: u32, payload: &[u8]) -> io::Result<()> {
    let size = u32::try_from(payload.len()).expect("payload fits a u32");
    let mut bytes = Vec::with_capacity(12 + payload.len());
    bytes.extend_from_slice(&request.to_le_bytes());
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.extend_from_slice(&size.to_le_bytes());
    bytes.extend_from_slice(payload);
    (&*stream).write_all(&bytes)
}

/// Receive one message (fds, if any, are dropped by the kernel since we
/// pass no control buffer). Fails on a closed connection, a read timeout or
/// a payload size over 4 KiB.
pub fn recv(stream: &UnixStream) -> io::Result<RawMessage> {
    let mut header = [0u8; 12];
    (&*stream).read_exact(&mut header)?;
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let (request, flags, size) = (word(0), word(4), word(8));
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply to request {request} announces a {size}-byte payload"),
        ));
    }
    let mut payload = vec![0u8; size as usize];
    (&*stream).read_exact(&mut payload)?;
    Ok(RawMessage {
        request,
        flags,
        payload,
    })
}

/// A `VhostUserVringState {index, num}` payload.
pub fn vring_state(index: u32, num: u32) -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes[0..4].copy_from_slice(&index.to_le_bytes());
    bytes[4..8].copy_from_slice(&num.to_le_bytes());
    bytes
}
