//! The few raw socket operations the `vhost` crate cannot do for us: peek
//! at the next request header, and read and answer the requests the agent
//! handles itself (see [`super::requests`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of a vhost-user message header.
pub const HEADER_SIZE: usize = 12;
/// Header flag: protocol version 1 (bits 0-1).
pub const FLAG_VERSION_1: u32 = 0x1;
/// Header flag: this is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the front-end wants a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest payload the spec allows (the `vhost` crate's MAX_MSG_SIZE).
pub const MAX_PAYLOAD: u32 = 0x1000;
/// Most fds one message may carry.
const MAX_FDS: usize = 32;

/// A decoded message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub code: u32,
    /// Flags (version, reply, need-reply).
    pub flags: u32,
    /// Payload size in bytes.
    pub size: u32,
}

impl Header {
    fn parse(bytes: &[u8; HEADER_SIZE]) -> Header {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Header {
            code: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// The front-end asked for an acknowledgement.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Version 1 and no reserved bits: a header we can trust the size of.
    pub fn is_valid(&self) -> bool {
        self.flags & 0x3 == FLAG_VERSION_1 && self.flags & !0xf == 0 && self.size <= MAX_PAYLOAD
    }
}

/// What a peek found.
#[derive(Debug)]
pub enum Peek {
    /// A whole message (header and payload) is waiting: reading it will
    /// not block. A header that is not valid is reported too, so its
    /// reader can refuse it.
    Message(Header),
    /// Part of a message has arrived; the rest has not yet.
    Partial {
        /// Bytes waiting.
        have: usize,
        /// Bytes the message needs (12 until the header is whole).
        need: usize,
    },
    /// Nothing to read right now.
    Empty,
    /// The front-end closed the connection (with nothing, or only part of
    /// a message, left to read).
    Closed,
}

/// Look at the next message without consuming it, and without waiting: the
/// protocol thread never blocks on a peer. A front-end that sends part of
/// a message and stalls is seen as [`Peek::Partial`] again and again (the
/// caller bounds how long it waits for the rest), one that closes
/// mid-message as [`Peek::Closed`]. No control-message buffer is passed, so
/// attached fds stay queued for whoever reads the message
/// (docs/vhost-user-notes.md, "Peeking").
pub fn peek_message(stream: &UnixStream) -> io::Result<Peek> {
    let mut bytes = [0u8; HEADER_SIZE + MAX_PAYLOAD as usize];
    loop {
        // SAFETY: recv writes at most `bytes.len()` bytes into `bytes`, a
        // live stack buffer; the fd is open for the duration of the call.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                bytes.as_mut_ptr().cast(),
                bytes.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock => return Ok(Peek::Empty),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(error),
            }
        }
        let have = usize::try_from(n).unwrap_or(0);
        if have == 0 {
            return Ok(Peek::Closed);
        }
        let need = match bytes.first_chunk::<HEADER_SIZE>() {
            Some(head) if have >= HEADER_SIZE => {
                let header = Header::parse(head);
                if !header.is_valid() {
                    return Ok(Peek::Message(header));
                }
                HEADER_SIZE + header.size as usize
            }
            _ => HEADER_SIZE,
        };
        if have >= need {
            // `need` >= 12 and the first 12 bytes are there.
            let head = bytes
                .first_chunk::<HEADER_SIZE>()
                .copied()
                .unwrap_or_default();
            return Ok(Peek::Message(Header::parse(&head)));
        }
        if hung_up(stream)? {
            return Ok(Peek::Closed);
        }
        return Ok(Peek::Partial { have, need });
    }
}

/// Whether the peer closed its end (checked without waiting).
fn hung_up(stream: &UnixStream) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, count 1, no wait; the fd is
    // open for the call.
    let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(error);
    }
    Ok(pollfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Read one whole message (header, attached fds, payload). Attached fds are
/// returned as files so they close when dropped.
pub fn read_message(stream: &UnixStream) -> io::Result<(Header, Vec<u8>, Vec<File>)> {
    let mut bytes = [0u8; HEADER_SIZE];
    let mut fds = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: HEADER_SIZE,
    }];
    // SAFETY: the only iovec points at `bytes`, a live 12-byte buffer that
    // nothing else references during the call.
    let (read, fd_count) =
        unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.map_err(io::Error::from)?;
    let files: Vec<File> = fds[..fd_count]
        .iter()
        // SAFETY: recvmsg just installed these fds for us; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if read != HEADER_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short vhost-user header",
        ));
    }
    let header = Header::parse(&bytes);
    if !header.is_valid() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("invalid header {header:?}"),
        ));
    }
    let mut payload = vec![0u8; header.size as usize];
    (&*stream).read_exact(&mut payload)?;
    Ok((header, payload, files))
}

/// Send a reply to `request` with `payload`.
pub fn send_reply(stream: &UnixStream, request: &Header, payload: &[u8]) -> io::Result<()> {
    let mut message = Vec::with_capacity(HEADER_SIZE + payload.len());
    message.extend_from_slice(&request.code.to_le_bytes());
    message.extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
    // Payloads we send are a u64 at most.
    message.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    message.extend_from_slice(payload);
    (&*stream).write_all(&message)
}

/// Send a u64 reply (a value, or a REPLY_ACK: 0 = success).
pub fn send_u64(stream: &UnixStream, request: &Header, value: u64) -> io::Result<()> {
    send_reply(stream, request, &value.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a front-end that sends 5 of the 12 header bytes and
    /// closes made the protocol thread spin in a blocking peek forever
    /// (issue 18, finding 1). A peek never waits: a stalled partial
    /// message is reported as such (the listener bounds the wait), a
    /// closed one as closed; a header whose payload has not all arrived
    /// is partial too, so nothing reads it and blocks.
    #[test]
    fn regression_a_partial_message_is_reported_not_waited_for() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 0, 0, 0, 1]).unwrap();
        assert!(matches!(
            peek_message(&b).unwrap(),
            Peek::Partial { have: 5, need: 12 }
        ));
        drop(a);
        assert!(matches!(peek_message(&b).unwrap(), Peek::Closed));
        let (a, b) = UnixStream::pair().unwrap();
        let mut header = 39u32.to_le_bytes().to_vec();
        header.extend_from_slice(&FLAG_VERSION_1.to_le_bytes());
        header.extend_from_slice(&8u32.to_le_bytes());
        header.extend_from_slice(&[0, 0, 0]);
        (&a).write_all(&header).unwrap();
        assert!(matches!(
            peek_message(&b).unwrap(),
            Peek::Partial { have: 15, need: 20 }
        ));
    }

    #[test]
    fn peek_leaves_the_message_for_the_reader() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(matches!(peek_message(&b).unwrap(), Peek::Empty));
        let mut msg = Vec::new();
        msg.extend_from_slice(&39u32.to_le_bytes());
        msg.extend_from_slice(&(FLAG_VERSION_1 | FLAG_NEED_REPLY).to_le_bytes());
        msg.extend_from_slice(&8u32.to_le_bytes());
        msg.extend_from_slice(&0xfu64.to_le_bytes());
        (&a).write_all(&msg).unwrap();
        let Peek::Message(header) = peek_message(&b).unwrap() else {
            panic!("no header")
        };
        assert_eq!(
            header,
            Header {
                code: 39,
                flags: FLAG_VERSION_1 | FLAG_NEED_REPLY,
                size: 8
            }
        );
        assert!(header.need_reply());
        let (read, payload, files) = read_message(&b).unwrap();
        assert_eq!(read, header);
        assert_eq!(payload, 0xfu64.to_le_bytes());
        assert!(files.is_empty());
        drop(a);
        assert!(matches!(peek_message(&b).unwrap(), Peek::Closed));
    }

    #[test]
    fn oversized_or_reserved_headers_are_invalid() {
        assert!(!Header {
            code: 1,
            flags: FLAG_VERSION_1,
            size: MAX_PAYLOAD + 1
        }
        .is_valid());
        assert!(!Header {
            code: 1,
            flags: 0x2,
            size: 0
        }
        .is_valid());
        assert!(!Header {
            code: 1,
            flags: FLAG_VERSION_1 | 0x100,
            size: 0
        }
        .is_valid());
        assert!(Header {
            code: 1,
            flags: FLAG_VERSION_1 | FLAG_NEED_REPLY,
            size: 8
        }
        .is_valid());
    }
}
