//! virtio-net under the session: what every net device has ([`common`]:
//! config space, MTU, MAC, RSS, device state), its agent-side state
//! ([`state`]), and the agent's own datapath ([`device`] with its data
//! path thread [`datapath`], which owns the rings and the dataplane and
//! executes the plan's steps).

pub mod common;
pub mod datapath;
pub mod device;
pub mod state;

pub use device::{NetDevice, NetOptions, NetShared};
