//! virtio-net under the session: what every net device has ([`common`]:
//! config space, MTU, MAC, RSS, device state), its agent-side state
//! ([`state`]), and two datapaths: the agent's own ([`device`] with its
//! data path thread [`datapath`], which owns the rings and the dataplane
//! and executes the plan's steps) and the kernel's vhost-net
//! ([`vhost_net`], where the plan's steps are ioctls).

pub mod common;
pub mod datapath;
pub mod device;
pub mod kernel;
pub mod state;
pub mod vdpa;
pub mod vhost_net;

pub use device::{NetDevice, NetOptions, NetShared};
