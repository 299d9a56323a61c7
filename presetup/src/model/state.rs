//! What the reference device holds: resources next to configured values,
//! and the refusals of ops whose preconditions do not hold.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{
    DeviceType, FrontendAddr, GuestAddr, RegionKey, RingAddresses, RingPart, RssSpec,
};

/// A ring as the model holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRing {
    /// Descriptors.
    pub size: u16,
    /// Front-end addresses, once set.
    pub addresses: Option<RingAddresses>,
    /// The guest addresses they translated to when set: what the data path
    /// would use. Kept apart so that a memory change that moves them is
    /// visible even if the front-end addresses did not change.
    pub guest_addresses: Option<[GuestAddr; 3]>,
    /// Next available index.
    pub next_avail: u16,
    /// Enabled.
    pub enabled: bool,
    /// A kick eventfd is attached.
    pub kick_fd: bool,
    /// A call eventfd is attached.
    pub call_fd: bool,
}

/// An I/O ring of a blk queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIoRing {
    /// Its depth.
    pub depth: u16,
}

/// How the storage is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelStorage {
    /// Read-only.
    pub readonly: bool,
    /// O_DIRECT.
    pub direct: bool,
}

/// Net resources.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelNet {
    /// Offloads programmed on the dataplane.
    pub offloads: Option<u64>,
    /// Dataplane queues (by pair).
    pub queues: BTreeSet<u16>,
    /// MTU set on the dataplane.
    pub mtu: Option<u16>,
    /// MAC set.
    pub mac: Option<[u8; 6]>,
    /// RSS programmed (`None`: steering by pair).
    pub rss: Option<RssSpec>,
}

/// Blk resources.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelBlk {
    /// The storage, once open.
    pub storage: Option<ModelStorage>,
    /// I/O rings by queue.
    pub io_rings: BTreeMap<u16, ModelIoRing>,
    /// The guest's cache mode, once set.
    pub writeback: Option<bool>,
}

/// The kind-specific resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelResources {
    /// A net device.
    Net(ModelNet),
    /// A blk device.
    Blk(ModelBlk),
}

/// Everything the model device holds; two devices are interchangeable
/// exactly when their states are equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelState {
    /// Acked protocol features, once set.
    pub protocol_features: Option<u64>,
    /// Acked virtio features, once set.
    pub features: Option<u64>,
    /// Mapped guest memory, with the front-end address of each mapping.
    pub memory: BTreeMap<RegionKey, FrontendAddr>,
    /// Configured rings by virtqueue index.
    pub rings: BTreeMap<u16, ModelRing>,
    /// Kind-specific resources.
    pub resources: ModelResources,
}

/// An op the model refused: the plan that contained it is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A net op on a blk device or the other way round.
    #[error("{op} does not apply to a {device} device")]
    WrongKind {
        /// The op's name.
        op: &'static str,
        /// The device's kind.
        device: DeviceType,
    },
    /// The mapping is not there.
    #[error("no mapping at guest {guest_phys_addr}")]
    NoSuchRegion {
        /// Its guest address.
        guest_phys_addr: GuestAddr,
    },
    /// A new mapping is empty, wraps, or overlaps a mapped one in guest
    /// addresses.
    #[error("mapping at guest {guest_phys_addr} is empty or overlaps mapped memory")]
    RegionConflict {
        /// Its guest address.
        guest_phys_addr: GuestAddr,
    },
    /// OpenStorage while I/O rings still use the old file.
    #[error("storage reopened while {io_rings} I/O ring(s) use it")]
    StorageBusy {
        /// I/O rings alive.
        io_rings: usize,
    },
    /// An I/O ring on storage that is not open.
    #[error("I/O ring for queue {queue} with no storage open")]
    NoStorage {
        /// The queue.
        queue: u16,
    },
    /// The queue's I/O ring already exists.
    #[error("I/O ring for queue {queue} already exists")]
    IoRingExists {
        /// The queue.
        queue: u16,
    },
    /// The queue has no I/O ring.
    #[error("queue {queue} has no I/O ring")]
    NoSuchIoRing {
        /// The queue.
        queue: u16,
    },
    /// The dataplane queue already exists.
    #[error("dataplane queue {pair} already exists")]
    QueueExists {
        /// The pair.
        pair: u16,
    },
    /// The dataplane queue does not exist.
    #[error("dataplane queue {pair} does not exist")]
    NoSuchQueue {
        /// The pair.
        pair: u16,
    },
    /// RSS names a queue that does not exist.
    #[error("RSS names queue {queue}, which does not exist")]
    RssQueueMissing {
        /// The queue.
        queue: u16,
    },
    /// A queue RSS still steers to cannot go.
    #[error("dataplane queue {pair} is still named by RSS")]
    QueueInUse {
        /// The pair.
        pair: u16,
    },
    /// A ring op on a ring never sized.
    #[error("ring {ring} is not configured")]
    NoSuchRing {
        /// The ring.
        ring: u16,
    },
    /// A ring whose queue (net pair or blk I/O ring) does not exist.
    #[error("ring {ring} has no queue behind it")]
    RingWithoutQueue {
        /// The ring.
        ring: u16,
    },
    /// A ring address that no mapping (or more than one) translates.
    #[error("ring {ring}: {part} address {addr} does not translate to one mapping")]
    Untranslatable {
        /// The ring.
        ring: u16,
        /// Which part.
        part: RingPart,
        /// The front-end address.
        addr: FrontendAddr,
    },
}
