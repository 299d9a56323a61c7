//! Shared support for vhost-agent's workspace-level tests and benchmarks.
//!
//! Everything here talks to real processes: the `vhost-agent` binary built
//! from this workspace, `qemu-storage-daemon`, QEMU, DPDK's testpmd.
//! Nothing is mocked.

pub mod blkio_client;
pub mod frontend;
pub mod net_agent;
pub mod qemu;
pub mod support;
pub mod testpmd;
