//! The vhost-user protocol layer, once for every device.
//!
//! * [`listener`]: a device's socket and protocol thread; routes each
//!   message by its header ([`requests`], [`wire`]).
//! * [`session`]: the request handler: negotiation, memory, dirty log,
//!   status, rings, inflight region, device state, the switchover.
//! * [`device`] and [`datapath`]: the narrow interface a device and its
//!   datapath implement under the session.
//! * [`memory`], [`dirty_log`], [`vring`], [`status`]: what the session
//!   keeps (guest memory and its log, ring state, device status).
//! * [`inband`]: the opt-in NVIDIA RFC presetup bracket (request 41).

pub(crate) mod datapath;
pub(crate) mod device;
pub(crate) mod dirty_log;
pub(crate) mod fd_kind;
pub mod inband;
pub mod listener;
pub(crate) mod memory;
pub(crate) mod requests;
pub(crate) mod session;
pub(crate) mod status;
pub(crate) mod vring;
pub(crate) mod wire;
