//! virtio-net device logic for vhost-agent.
//!
//! Like `blkdev`, this crate never sees a socket or a vhost-user message;
//! the agent hands it queues, guest memory and dataplane ports.
//!
//! * [`spec`]: feature bits, header and configuration space layouts.
//! * [`ring`]: a virtqueue as the data path uses it: TX frames out of
//!   chains, RX frames into (merged) chains, used entries in batches.
//! * [`dataplane`]: where frames go: `loop`, `sim` or a kernel `tap`.
//! * [`sim`]: the `sim` dataplane's configuration cost model.
//! * [`tap`]: the kernel tap device.
//! * [`stats`]: per queue pair counters.
//! * [`rss`]: backend-side receive side scaling: the Toeplitz hash, the
//!   virtio-net hash types and their rules, a frame classifier, and the
//!   indirection table that picks an RX queue for a frame.

pub mod dataplane;
pub mod ring;
pub mod rss;
pub mod sim;
pub mod spec;
pub mod stats;
pub mod tap;
