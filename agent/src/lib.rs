//! vhost-agent: a vhost-user back-end daemon for virtio-blk (and, later,
//! virtio-net), built for low-downtime live migration.
//!
//! The binary is a thin CLI over this library. Layers:
//! * [`server`]: one listening socket and protocol thread per device, header
//!   peeking and routing ([`requests`], [`wire`]).
//! * [`blk_backend`]: the `VhostUserBackendReqHandlerMut` of a disk.
//! * [`worker`]: one mio event loop thread per running queue.
//! * [`memory`]: guest memory from the front-end's memory table.
//! * [`device`]: building a served disk from command-line options.
//! * [`registry`]: the served devices by id.
//! * [`supervisor`]: the running devices and their protocol threads: added
//!   at start-up or through the control API, removed, shut down.
//! * [`metrics`]: per-device protocol timeline and downtime figures.
//! * [`net_presetup`], [`blk_presetup`], [`switchover`]: early
//!   configuration and the plan of a start against it.
//! * [`presetup_inband`]: the opt-in NVIDIA RFC presetup bracket (request 41).
//! * [`control`]: the JSON control API (`serve --control`, `ctl`).

pub mod backend_shared;
pub mod blk_backend;
pub mod blk_presetup;
pub mod cli;
pub mod control;
pub mod device;
pub mod dirty_log;
pub mod guest_mapping;
pub mod memory;
pub mod metrics;
pub mod net_backend;
pub mod net_presetup;
pub mod net_worker;
pub mod presetup_inband;
pub mod ratelimit;
pub mod registry;
pub mod requests;
pub mod server;
pub mod supervisor;
pub mod switchover;
pub mod vring;
pub mod wire;
pub mod worker;

/// `error: cause: cause...` for log lines: library errors keep their causes
/// as `source()`, not in their own message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
