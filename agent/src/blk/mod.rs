//! virtio-blk under the session: the disk's offer and configuration
//! ([`device`]), its datapath of storage, I/O rings and queue workers
//! ([`storage`]), and the queue worker threads ([`worker`]).

pub mod device;
pub mod storage;
pub mod worker;

pub use device::BlkDevice;
pub use storage::{BlkStorage, EngineRecipe, StorageParts};
