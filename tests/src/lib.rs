//! Shared support for vhost-agent's workspace-level tests and benchmarks.
//!
//! Everything here talks to real processes: the `vhost-agent` binary built
//! from this workspace, `qemu-storage-daemon`, QEMU, DPDK's testpmd, and for
//! the net tests a private network namespace with a bridge and a DHCP
//! server. Nothing is mocked.

pub mod bench;
pub mod blk_stop;
pub mod blkio_client;
pub mod experiment;
pub mod frontend;
pub mod handoff;
pub mod net_agent;
pub mod net_rig;
pub mod netns;
pub mod netprobe;
pub mod pinger;
pub mod qemu;
pub mod support;
pub mod testpmd;
