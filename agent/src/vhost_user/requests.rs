//! The request table: one row per vhost-user request, the only place that
//! knows request numbers. A row says what the request carries, what the
//! front-end waits for, which protocol feature it needs, what it does to a
//! device (begins a start, stops a ring, changes state, only asks) and who
//! reads it: the `vhost` crate's `BackendReqHandler`, or the agent itself
//! for the codes the crate does not know or reads without answering
//! (vhost 0.18; docs/vhost-user-notes.md, "The vhost crate").

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

/// The fds a request may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fds {
    /// None.
    None,
    /// One, or none when the payload says so (u64 bit 8, "no fd").
    Optional,
    /// Exactly one.
    One,
    /// One per memory region.
    PerRegion,
}

/// What a request does to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Only asks (GET_FEATURES, GET_CONFIG, ...) or is part of the
    /// handshake (SET_OWNER): state that a start does not depend on.
    Query,
    /// Configures what a start uses: when no ring runs it begins a start
    /// (the destination's critical path is measured from it).
    Starts,
    /// Changes state, but is no start by itself: QEMU sends it at connect
    /// time and whenever it masks interrupts (SET_VRING_CALL), long before
    /// a start.
    Configures,
    /// Stops a ring (GET_VRING_BASE and its skip-drain variant).
    Stops,
}

/// A row of the table.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo {
    /// Wire code.
    pub code: u32,
    /// Spec name.
    pub name: &'static str,
    /// Fds it may carry.
    pub fds: Fds,
    /// Reply behaviour.
    pub reply: Reply,
    /// The protocol feature bit it needs, if any.
    pub feature: Option<u32>,
    /// What it does to the device.
    pub effect: Effect,
    /// Routing.
    pub handled_by: HandledBy,
}

/// Request codes, by spec name (vhost-user.rst, QEMU master).
#[allow(missing_docs)]
pub mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SEND_RARP: u32 = 19;
    pub const NET_SET_MTU: u32 = 20;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const IOTLB_MSG: u32 = 22;
    pub const SET_VRING_ENDIAN: u32 = 23;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const CREATE_CRYPTO_SESSION: u32 = 26;
    pub const CLOSE_CRYPTO_SESSION: u32 = 27;
    pub const POSTCOPY_ADVISE: u32 = 28;
    pub const POSTCOPY_LISTEN: u32 = 29;
    pub const POSTCOPY_END: u32 = 30;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const GPU_SET_SOCKET: u32 = 33;
    pub const RESET_DEVICE: u32 = 34;
    pub const VRING_KICK: u32 = 35;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const SET_STATUS: u32 = 39;
    pub const GET_STATUS: u32 = 40;
    /// Upstream GET_SHARED_OBJECT; the NVIDIA RFC's PRESETUP (8-byte u64).
    pub const GET_SHARED_OBJECT: u32 = 41;
    pub const SET_DEVICE_STATE_FD: u32 = 42;
    pub const CHECK_DEVICE_STATE: u32 = 43;
    pub const GET_SHMEM_CONFIG: u32 = 44;
    pub const GET_VRING_BASE_SKIP_DRAIN: u32 = 45;
}

/// Protocol feature bits the table refers to (VHOST_USER_PROTOCOL_F_*).
pub mod feature {
    /// MQ.
    pub const MQ: u32 = 0;
    /// LOG_SHMFD.
    pub const LOG_SHMFD: u32 = 1;
    /// RARP.
    pub const RARP: u32 = 2;
    /// MTU.
    pub const MTU: u32 = 4;
    /// BACKEND_REQ.
    pub const BACKEND_REQ: u32 = 5;
    /// CONFIG.
    pub const CONFIG: u32 = 9;
    /// INFLIGHT_SHMFD.
    pub const INFLIGHT_SHMFD: u32 = 12;
    /// RESET_DEVICE.
    pub const RESET_DEVICE: u32 = 13;
    /// CONFIGURE_MEM_SLOTS.
    pub const CONFIGURE_MEM_SLOTS: u32 = 15;
    /// STATUS.
    pub const STATUS: u32 = 16;
    /// SHARED_OBJECT upstream; the NVIDIA RFC's PRESETUP.
    pub const SHARED_OBJECT: u32 = 18;
    /// DEVICE_STATE.
    pub const DEVICE_STATE: u32 = 19;
    /// GET_VRING_BASE_SKIP_DRAIN (unknown to vhost 0.18).
    pub const GET_VRING_BASE_SKIP_DRAIN: u32 = 23;

    /// The mask of bit `bit`.
    pub const fn mask(bit: u32) -> u64 {
        1 << bit
    }
}

const fn row(
    code: u32,
    name: &'static str,
    fds: Fds,
    reply: Reply,
    feature: Option<u32>,
    effect: Effect,
    handled_by: HandledBy,
) -> RequestInfo {
    RequestInfo {
        code,
        name,
        fds,
        reply,
        feature,
        effect,
        handled_by,
    }
}

use code::*;
use feature as f;
use Effect::{Configures, Query, Starts, Stops};
use Fds::{One, Optional, PerRegion};
use HandledBy::{Agent, Crate};
use Reply::{Ack, Always};

const NO: Fds = Fds::None;

/// Every request code of the vhost-user spec we know of, in code order.
#[rustfmt::skip]
pub const REQUESTS: &[RequestInfo] = &[
    row(GET_FEATURES, "GET_FEATURES", NO, Always, None, Query, Crate),
    row(SET_FEATURES, "SET_FEATURES", NO, Ack, None, Starts, Crate),
    row(SET_OWNER, "SET_OWNER", NO, Ack, None, Query, Crate),
    row(RESET_OWNER, "RESET_OWNER", NO, Ack, None, Configures, Crate),
    row(SET_MEM_TABLE, "SET_MEM_TABLE", PerRegion, Ack, None, Starts, Crate),
    row(SET_LOG_BASE, "SET_LOG_BASE", One, Always, Some(f::LOG_SHMFD), Configures, Crate),
    row(SET_LOG_FD, "SET_LOG_FD", One, Ack, None, Configures, Agent),
    row(SET_VRING_NUM, "SET_VRING_NUM", NO, Ack, None, Starts, Crate),
    row(SET_VRING_ADDR, "SET_VRING_ADDR", NO, Ack, None, Starts, Crate),
    row(SET_VRING_BASE, "SET_VRING_BASE", NO, Ack, None, Starts, Crate),
    row(GET_VRING_BASE, "GET_VRING_BASE", NO, Always, None, Stops, Crate),
    row(SET_VRING_KICK, "SET_VRING_KICK", Optional, Ack, None, Starts, Crate),
    row(SET_VRING_CALL, "SET_VRING_CALL", Optional, Ack, None, Configures, Crate),
    row(SET_VRING_ERR, "SET_VRING_ERR", Optional, Ack, None, Configures, Crate),
    row(GET_PROTOCOL_FEATURES, "GET_PROTOCOL_FEATURES", NO, Always, None, Query, Crate),
    row(SET_PROTOCOL_FEATURES, "SET_PROTOCOL_FEATURES", NO, Ack, None, Query, Crate),
    row(GET_QUEUE_NUM, "GET_QUEUE_NUM", NO, Always, Some(f::MQ), Query, Crate),
    row(SET_VRING_ENABLE, "SET_VRING_ENABLE", NO, Ack, None, Configures, Agent),
    row(SEND_RARP, "SEND_RARP", NO, Ack, Some(f::RARP), Configures, Agent),
    row(NET_SET_MTU, "NET_SET_MTU", NO, Ack, Some(f::MTU), Starts, Agent),
    row(SET_BACKEND_REQ_FD, "SET_BACKEND_REQ_FD", One, Ack, Some(f::BACKEND_REQ), Configures, Crate),
    row(IOTLB_MSG, "IOTLB_MSG", NO, Ack, None, Configures, Agent),
    row(SET_VRING_ENDIAN, "SET_VRING_ENDIAN", NO, Ack, None, Configures, Agent),
    row(GET_CONFIG, "GET_CONFIG", NO, Always, Some(f::CONFIG), Query, Crate),
    row(SET_CONFIG, "SET_CONFIG", NO, Ack, Some(f::CONFIG), Configures, Crate),
    row(CREATE_CRYPTO_SESSION, "CREATE_CRYPTO_SESSION", NO, Always, None, Query, Agent),
    row(CLOSE_CRYPTO_SESSION, "CLOSE_CRYPTO_SESSION", NO, Ack, None, Query, Agent),
    row(POSTCOPY_ADVISE, "POSTCOPY_ADVISE", NO, Always, None, Query, Agent),
    row(POSTCOPY_LISTEN, "POSTCOPY_LISTEN", NO, Ack, None, Query, Agent),
    row(POSTCOPY_END, "POSTCOPY_END", NO, Always, None, Query, Agent),
    row(GET_INFLIGHT_FD, "GET_INFLIGHT_FD", NO, Always, Some(f::INFLIGHT_SHMFD), Configures, Crate),
    row(SET_INFLIGHT_FD, "SET_INFLIGHT_FD", One, Ack, Some(f::INFLIGHT_SHMFD), Starts, Crate),
    row(GPU_SET_SOCKET, "GPU_SET_SOCKET", One, Ack, None, Query, Crate),
    row(RESET_DEVICE, "RESET_DEVICE", NO, Ack, Some(f::RESET_DEVICE), Configures, Crate),
    row(VRING_KICK, "VRING_KICK", NO, Ack, None, Query, Agent),
    row(GET_MAX_MEM_SLOTS, "GET_MAX_MEM_SLOTS", NO, Always, Some(f::CONFIGURE_MEM_SLOTS), Query, Crate),
    row(ADD_MEM_REG, "ADD_MEM_REG", One, Ack, Some(f::CONFIGURE_MEM_SLOTS), Starts, Crate),
    row(REM_MEM_REG, "REM_MEM_REG", NO, Ack, Some(f::CONFIGURE_MEM_SLOTS), Configures, Crate),
    row(SET_STATUS, "SET_STATUS", NO, Ack, Some(f::STATUS), Configures, Agent),
    row(GET_STATUS, "GET_STATUS", NO, Always, Some(f::STATUS), Query, Agent),
    row(GET_SHARED_OBJECT, "GET_SHARED_OBJECT", NO, Always, Some(f::SHARED_OBJECT), Query, Crate),
    row(SET_DEVICE_STATE_FD, "SET_DEVICE_STATE_FD", One, Always, Some(f::DEVICE_STATE), Configures, Crate),
    row(CHECK_DEVICE_STATE, "CHECK_DEVICE_STATE", NO, Always, Some(f::DEVICE_STATE), Configures, Crate),
    row(GET_SHMEM_CONFIG, "GET_SHMEM_CONFIG", NO, Always, None, Query, Crate),
    row(GET_VRING_BASE_SKIP_DRAIN, "GET_VRING_BASE_SKIP_DRAIN", NO, Always, Some(f::GET_VRING_BASE_SKIP_DRAIN), Stops, Agent),
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

/// What `code` does to a device; an unknown code only asks.
pub fn effect(code: u32) -> Effect {
    lookup(code).map_or(Effect::Query, |info| info.effect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_appears_exactly_once_in_order() {
        for (index, info) in REQUESTS.iter().enumerate() {
            assert_eq!(info.code as usize, index + 1, "{} out of order", info.name);
            assert_eq!(lookup(info.code).map(|row| row.name), Some(info.name));
            let count = REQUESTS.iter().filter(|r| r.code == info.code).count();
            assert_eq!(count, 1, "{} appears {count} times", info.name);
        }
        assert!(lookup(0).is_none());
        assert!(lookup(46).is_none());
        assert_eq!(name(u32::MAX), "UNKNOWN");
    }

    #[test]
    fn crate_rows_are_codes_the_crate_decodes() {
        // vhost 0.18 decodes 1..=44; a row routed to the crate outside that
        // range would desynchronise the stream (docs/vhost-user-notes.md).
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

    #[test]
    fn names_match_the_vhost_crate() {
        use vhost::vhost_user::message::FrontendReq;
        for info in REQUESTS {
            if let Ok(request) = FrontendReq::try_from(info.code) {
                let spelled = format!("{request:?}");
                assert_eq!(spelled, info.name, "code {}", info.code);
            }
        }
    }

    #[test]
    fn only_stop_requests_stop_and_queries_change_nothing() {
        let stops: Vec<_> = REQUESTS
            .iter()
            .filter(|info| info.effect == Effect::Stops)
            .map(|info| info.code)
            .collect();
        assert_eq!(stops, [GET_VRING_BASE, GET_VRING_BASE_SKIP_DRAIN]);
        assert_eq!(effect(SET_VRING_CALL), Effect::Configures);
        assert_eq!(effect(GET_FEATURES), Effect::Query);
    }
}
