//! vhost-agent: a vhost-user back-end daemon for virtio-blk and virtio-net,
//! built for low-downtime live migration. The binary (`main.rs`) is a thin
//! command line over this library.
//!
//! Module map, top down:
//!
//! * [`daemon`]: `serve` (start-up, SIGINT/SIGTERM, shutdown), the
//!   `--blk`/`--net` specs, building a device, the device registry and the
//!   supervisor that adds and removes devices while the agent runs.
//! * [`vhost_user`]: the protocol, once for every device: a socket and
//!   protocol thread per device (`listener`), the request table, and the
//!   `session`, which owns negotiation, memory, dirty log, status, rings,
//!   the inflight region and the switchover. It runs each start as a
//!   presetup plan executed op by op through the `device` / `datapath`
//!   interface.
//! * [`blk`], [`net`]: what each device adds under the session. blk: its
//!   storage and I/O rings and one worker thread per queue. net: its state
//!   (MTU, MAC, RSS) and either one data path thread that owns all rings
//!   and the dataplane (loop, tap, with an optional cost profile), the
//!   kernel's vhost-net (`net::vhost_net`, the plan's steps as ioctls) or
//!   a kernel vhost-vdpa device (`net::vdpa`); `net::kernel` is what the
//!   two kernel datapaths share.
//! * [`control`]: the JSON control API (`serve --control`, `ctl`).
//! * [`metrics`]: per-device timelines, downtime figures, Prometheus text.
//! * [`migrate`]: `vhost-agent migrate`, the orchestrator of one live
//!   migration with stock QEMU (QMP client, presetup relay, write fence
//!   release, one merged timeline).
//! * [`ratelimit`]: how a worker logs what a peer keeps doing wrong.
//! * [`wake_channel`]: how the protocol thread commands a datapath thread.

pub(crate) mod blk;
pub mod control;
pub mod daemon;
pub(crate) mod metrics;
pub mod migrate;
pub(crate) mod net;
pub(crate) mod ratelimit;
pub mod vhost_user;
pub(crate) mod wake_channel;

/// `error: cause: cause...` for log lines: library errors keep their causes
/// as `source()`, not in their own message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    format!("{error}{}", error_sources(error))
}

/// `: cause: cause...`, the part of [`error_chain`] after the error's own
/// message (for a wrapper whose text already shows that message).
pub fn error_sources(error: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
