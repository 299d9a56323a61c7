//! virtio-net device logic for vhost-agent.
//!
//! Like `blkdev`, this crate never sees a socket or a vhost-user message;
//! the agent hands it queues, guest memory and dataplane ports.
//!
//! Today it holds one piece, pure logic with no I/O:
//! * [`rss`]: backend-side receive side scaling: the Toeplitz hash, the
//!   virtio-net hash types and their rules, a frame classifier, and the
//!   indirection table that picks an RX queue for a frame.

pub mod rss;
