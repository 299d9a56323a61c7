//! Shared support for vhost-agent's workspace-level tests and benchmarks.
//!
//! Everything here talks to real processes: the `vhost-agent` binary built
//! from this workspace, `qemu-storage-daemon`, QEMU, DPDK's testpmd, and for
//! the net tests a private network namespace with a bridge and a DHCP
//! server. Nothing is mocked.

// The test front-end and the rigs on it live in the front-end crate, which
// the demo and the experiment share; re-exported here under their old
// names, so `vhost_agent_tests::frontend` and friends keep working.
pub use vhost_agent_frontend as frontend;
pub use vhost_agent_frontend::{agent, bench, blk_stop, net_rig, support};

pub mod blkio_client;
pub mod handoff;
pub mod handoff_vm;
pub mod lab;
pub mod lab_net;
pub mod migrate_rig;
pub mod migration_hold;
pub mod net_agent;
pub mod netns;
pub mod netprobe;
pub mod pinger;
pub mod qemu;
pub mod qemu11;
pub mod slow_disk;
pub mod stop_sampler;
pub mod testpmd;
