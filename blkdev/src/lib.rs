//! virtio-blk device logic for vhost-agent.
//!
//! This crate knows virtio-blk: which features a disk offers, what its
//! config space holds, how a descriptor chain becomes a request, and how a
//! request becomes storage I/O and then a status byte in the used ring. It
//! never sees a socket or a vhost-user message; the agent hands it queues and
//! guest memory.
//!
//! Layers, top to bottom:
//! * [`BlkQueue`]: one virtqueue's processor (pop, parse, submit, complete).
//! * [`request`]: descriptor chain -> [`request::Request`], with every
//!   guest-supplied number checked.
//! * [`engine`]: asynchronous storage I/O (io_uring, or a thread pool where
//!   io_uring is unavailable).
//! * [`Storage`]: the opened image file or block device.

pub mod config;
pub mod engine;
pub mod fence;
pub mod inflight;
pub mod queue;
pub mod request;
pub mod spec;
pub mod storage;

pub use config::{BlkConfig, DiskOptions, FenceMode};
pub use engine::{EngineKind, IoEngine};
pub use queue::{BlkQueue, QueueError, QueueStats};
pub use storage::{Storage, StorageError};
