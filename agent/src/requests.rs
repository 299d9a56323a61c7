//! One row per vhost-user request: what it carries, what it expects back,
//! and who handles it. The server consults this table to route requests the
//! `vhost` crate cannot handle, and to decide whether a failed request
//! left the front-end waiting for a reply (then the only safe answer is to
//! drop the connection).

/// What a front-end waits for after sending a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing, unless NEED_REPLY is set and REPLY_ACK negotiated (then a
    /// u64 ack).
    Ack,
    /// Always a reply with a payload.
    Always,
}

/// Who reads and answers the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandledBy {
    /// `vhost::vhost_user::BackendReqHandler::handle_request`.
    Crate,
    /// The agent itself (the crate does not know the code, or reads it and
    /// answers nothing).
    Agent,
}

/// A row of the table.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo {
    /// Wire code.
    pub code: u32,
    /// Spec name.
    pub name: &'static str,
    /// Reply behaviour.
    pub reply: Reply,
    /// Routing.
    pub handled_by: HandledBy,
}

const fn row(code: u32, name: &'static str, reply: Reply, handled_by: HandledBy) -> RequestInfo {
    RequestInfo {
        code,
        name,
        reply,
        handled_by,
    }
}

use HandledBy::{Agent, Crate};
use Reply::{Ack, Always};

/// Every request code of the vhost-user spec we know of (QEMU master), in
/// code order.
pub const REQUESTS: &[RequestInfo] = &[
    row(1, "GET_FEATURES", Always, Crate),
    row(2, "SET_FEATURES", Ack, Crate),
    row(3, "SET_OWNER", Ack, Crate),
    row(4, "RESET_OWNER", Ack, Crate),
    row(5, "SET_MEM_TABLE", Ack, Crate),
    row(6, "SET_LOG_BASE", Always, Crate),
    row(7, "SET_LOG_FD", Ack, Agent),
    row(8, "SET_VRING_NUM", Ack, Crate),
    row(9, "SET_VRING_ADDR", Ack, Crate),
    row(10, "SET_VRING_BASE", Ack, Crate),
    row(11, "GET_VRING_BASE", Always, Crate),
    row(12, "SET_VRING_KICK", Ack, Crate),
    row(13, "SET_VRING_CALL", Ack, Crate),
    row(14, "SET_VRING_ERR", Ack, Crate),
    row(15, "GET_PROTOCOL_FEATURES", Always, Crate),
    row(16, "SET_PROTOCOL_FEATURES", Ack, Crate),
    row(17, "GET_QUEUE_NUM", Always, Crate),
    row(18, "SET_VRING_ENABLE", Ack, Agent),
    row(19, "SEND_RARP", Ack, Agent),
    row(20, "NET_SET_MTU", Ack, Agent),
    row(21, "SET_BACKEND_REQ_FD", Ack, Crate),
    row(22, "IOTLB_MSG", Ack, Agent),
    row(23, "SET_VRING_ENDIAN", Ack, Agent),
    row(24, "GET_CONFIG", Always, Crate),
    row(25, "SET_CONFIG", Ack, Crate),
    row(26, "CREATE_CRYPTO_SESSION", Always, Agent),
    row(27, "CLOSE_CRYPTO_SESSION", Ack, Agent),
    row(28, "POSTCOPY_ADVISE", Always, Agent),
    row(29, "POSTCOPY_LISTEN", Ack, Agent),
    row(30, "POSTCOPY_END", Always, Agent),
    row(31, "GET_INFLIGHT_FD", Always, Crate),
    row(32, "SET_INFLIGHT_FD", Ack, Crate),
    row(33, "GPU_SET_SOCKET", Ack, Crate),
    row(34, "RESET_DEVICE", Ack, Crate),
    row(35, "VRING_KICK", Ack, Agent),
    row(36, "GET_MAX_MEM_SLOTS", Always, Crate),
    row(37, "ADD_MEM_REG", Ack, Crate),
    row(38, "REM_MEM_REG", Ack, Crate),
    row(39, "SET_STATUS", Ack, Agent),
    row(40, "GET_STATUS", Always, Agent),
    row(41, "GET_SHARED_OBJECT", Always, Crate),
    row(42, "SET_DEVICE_STATE_FD", Always, Crate),
    row(43, "CHECK_DEVICE_STATE", Always, Crate),
    row(44, "GET_SHMEM_CONFIG", Always, Crate),
    row(45, "GET_VRING_BASE_SKIP_DRAIN", Always, Agent),
];

/// The row for `code`, if the code is known.
pub fn lookup(code: u32) -> Option<&'static RequestInfo> {
    let index = usize::try_from(code).ok()?.checked_sub(1)?;
    REQUESTS.get(index).filter(|info| info.code == code)
}

/// A printable name for `code`, known or not.
pub fn name(code: u32) -> &'static str {
    lookup(code).map_or("UNKNOWN", |info| info.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_appears_exactly_once_in_order() {
        for (index, info) in REQUESTS.iter().enumerate() {
            assert_eq!(info.code as usize, index + 1, "{} out of order", info.name);
            assert_eq!(lookup(info.code).map(|row| row.name), Some(info.name));
        }
        assert!(lookup(0).is_none());
        assert!(lookup(46).is_none());
    }

    #[test]
    fn crate_rows_are_codes_the_crate_decodes() {
        // vhost 0.18 decodes 1..=44; a row routed to the crate outside that
        // range would desynchronise the stream (PROTOCOL.md fact 1).
        for info in REQUESTS
            .iter()
            .filter(|info| info.handled_by == HandledBy::Crate)
        {
            assert!(
                vhost::vhost_user::message::FrontendReq::try_from(info.code).is_ok(),
                "{} routed to the crate, which does not decode it",
                info.name
            );
        }
    }
}
