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

pub mod blk_backend;
pub mod cli;
pub mod device;
pub mod memory;
pub mod requests;
pub mod server;
pub mod wire;
pub mod worker;
