//! virtio-net under the session: the device's offer, configuration and own
//! requests ([`device`]), its agent-side state ([`state`]), and its data
//! path thread ([`datapath`]), which owns the rings and the dataplane and
//! executes the plan's steps.

pub mod datapath;
pub mod device;
pub mod state;

pub use device::{NetDevice, NetOptions, NetShared};
