//! Shared support for vhost-agent's workspace-level tests and benchmarks.
//!
//! Everything here talks to real processes: the `vhost-agent` binary built
//! from this workspace, `qemu-storage-daemon`, QEMU. Nothing is mocked.

pub mod blkio_client;
pub mod frontend;
pub mod qemu;
pub mod support;
