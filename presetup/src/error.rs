//! The errors of reading and checking a configuration. All of them mean
//! the configuration cannot be used: a `presetup` request is answered with
//! the error, an early configuration causes a fallback.

use crate::config::{FrontendAddr, GuestAddr, RingPart, FORMAT_VERSION};
use crate::validate::{
    MAX_MEMORY_REGIONS, MAX_QUEUE_PAIRS, MAX_RINGS, MAX_RING_SIZE, MAX_RSS_KEY_LEN,
    MAX_RSS_TABLE_LEN, MIN_MTU, RSS_HASH_TYPES,
};

/// A JSON text could not be read as a [`DeviceConfig`](crate::DeviceConfig).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The text is not JSON of the right shape.
    #[error("cannot parse the device configuration")]
    Json {
        /// What serde_json found.
        #[source]
        source: serde_json::Error,
    },
    /// The text names a layout version this build does not read.
    #[error("device configuration format version {found} (this build reads {FORMAT_VERSION})")]
    Version {
        /// The version in the text.
        found: u32,
    },
}

/// The address space in which two memory regions overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// Guest physical addresses: the guest would see two things at once.
    Guest,
    /// Front-end addresses: ring address translation would be ambiguous.
    Frontend,
}

impl std::fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AddressSpace::Guest => "guest physical",
            AddressSpace::Frontend => "front-end",
        })
    }
}

/// Why a [`DeviceConfig`](crate::DeviceConfig) was refused. Every variant means the same to a
/// caller: the configuration cannot be used (a `presetup` request is
/// answered with an error; an early configuration causes a fallback).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The layout version is not [`FORMAT_VERSION`].
    #[error("format version {found} (this build reads {FORMAT_VERSION})")]
    Version {
        /// The version found.
        found: u32,
    },
    /// More than [`MAX_MEMORY_REGIONS`] regions.
    #[error("{count} memory regions (at most {MAX_MEMORY_REGIONS})")]
    TooManyRegions {
        /// Regions given.
        count: usize,
    },
    /// A region is empty or runs past the end of an address space or file.
    #[error("memory region {position} (guest {guest_phys_addr}, {size_bytes} bytes) is empty or wraps around")]
    RegionRange {
        /// Position in the memory list.
        position: usize,
        /// Its guest address.
        guest_phys_addr: GuestAddr,
        /// Its size.
        size_bytes: u64,
    },
    /// Two regions overlap.
    #[error("memory regions at guest {first} and {second} overlap in {space} addresses")]
    RegionsOverlap {
        /// Guest address of one region.
        first: GuestAddr,
        /// Guest address of the other.
        second: GuestAddr,
        /// Where they overlap.
        space: AddressSpace,
    },
    /// A net device with no queue pairs or more than [`MAX_QUEUE_PAIRS`].
    #[error("{queue_pairs} queue pairs (1 to {MAX_QUEUE_PAIRS})")]
    QueuePairs {
        /// Pairs given.
        queue_pairs: u16,
    },
    /// A blk device with more virtqueues than [`MAX_RINGS`].
    #[error("{num_queues} block queues (at most {MAX_RINGS})")]
    BlkQueues {
        /// Queues given.
        num_queues: u16,
    },
    /// A blk queue size that is zero, not a power of two or too big.
    #[error("block queue size {queue_size} (a power of two up to {MAX_RING_SIZE})")]
    BlkQueueSize {
        /// Size given.
        queue_size: u16,
    },
    /// A ring index beyond the device's virtqueues.
    #[error("ring {ring} does not exist on a device with {rings} virtqueues")]
    RingIndex {
        /// The index.
        ring: u16,
        /// The device's virtqueue count.
        rings: u32,
    },
    /// The same ring index twice.
    #[error("ring {ring} is listed twice")]
    DuplicateRing {
        /// The index.
        ring: u16,
    },
    /// A ring size that is zero, not a power of two or above the device's
    /// maximum (virtio 1.2 §2.7: a power of two).
    #[error("ring {ring}: size {size} (a power of two up to {max})")]
    RingSize {
        /// The ring.
        ring: u16,
        /// Size given.
        size: u16,
        /// The device's largest ring.
        max: u16,
    },
    /// A ring address outside guest memory.
    #[error("ring {ring}: {part} address {addr} is in no memory region")]
    RingAddress {
        /// The ring.
        ring: u16,
        /// Which part.
        part: RingPart,
        /// The front-end address.
        addr: FrontendAddr,
    },
    /// An MTU below [`MIN_MTU`].
    #[error("MTU {mtu} (at least {MIN_MTU})")]
    Mtu {
        /// MTU given.
        mtu: u16,
    },
    /// RSS hash type bits the spec does not define.
    #[error("RSS hash types {bits:#x} (defined: {RSS_HASH_TYPES:#x})")]
    RssHashTypes {
        /// The whole `hash_types`.
        bits: u32,
    },
    /// An RSS key that is empty or too long.
    #[error("RSS key of {len} bytes (1 to {MAX_RSS_KEY_LEN})")]
    RssKeyLength {
        /// Its length.
        len: usize,
    },
    /// An indirection table whose length is not a power of two up to
    /// [`MAX_RSS_TABLE_LEN`] (the spec's `indirection_table_mask` is the
    /// length minus one).
    #[error("RSS indirection table of {len} entries (a power of two up to {MAX_RSS_TABLE_LEN})")]
    RssTableLength {
        /// Its length.
        len: usize,
    },
    /// An indirection table entry naming a queue pair the device lacks.
    #[error("RSS table entry {position} names queue {queue}; the device has {queue_pairs}")]
    RssTableQueue {
        /// Position in the table.
        position: usize,
        /// The queue named.
        queue: u16,
        /// The device's queue pairs.
        queue_pairs: u16,
    },
    /// A default queue the device lacks.
    #[error("RSS default queue {queue}; the device has {queue_pairs}")]
    RssDefaultQueue {
        /// The queue named.
        queue: u16,
        /// The device's queue pairs.
        queue_pairs: u16,
    },
}

/// A configuration arriving as JSON could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It could not be read.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// It was read but is not a valid configuration.
    #[error("invalid device configuration")]
    Invalid(#[from] ConfigError),
}
