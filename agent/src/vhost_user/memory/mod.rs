//! Guest memory in two halves.
//!
//! * [`MemoryTable`]: the table the front-end sent (SET_MEM_TABLE,
//!   ADD_MEM_REG, REM_MEM_REG), validated and with the fds of regions not
//!   mapped yet. It translates front-end virtual addresses (what
//!   SET_VRING_ADDR carries) into guest physical addresses, and is what the
//!   switchover plan is computed against.
//! * [`MemoryMap`]: the mappings the plan made (`map_region`), published to
//!   the datapaths through a `GuestMemoryAtomic`. Regions are compared by
//!   meaning ([`presetup::RegionKey`]: backing file identity, offset, size,
//!   guest address), so a table naming the same memory again, from another
//!   QEMU process with new fds and new addresses, keeps its mappings.

use vm_memory::GuestMemoryMmap;

use super::dirty_log::LogBitmap;

pub(crate) mod guest_mapping;
mod mapped;
mod table;
#[cfg(test)]
mod tests;

pub use mapped::{MappedRegion, MemoryMap};
pub use table::MemoryTable;

/// Guest RAM as the datapaths see it: every write through it is logged in
/// the front-end's dirty log while logging is on (see [`super::dirty_log`]).
pub type GuestRam = GuestMemoryMmap<LogBitmap>;

/// Most regions we accept (GET_MAX_MEM_SLOTS).
pub const MAX_MEM_SLOTS: u64 = 32;

/// A memory table request could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// fstat of a region's fd failed.
    #[error("cannot identify the file of the region at guest address {guest_phys_addr:#x}")]
    Identify {
        /// Guest physical address of the region.
        guest_phys_addr: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// mmap of a region failed.
    #[error("cannot map region at guest address {guest_phys_addr:#x} ({size} bytes)")]
    Map {
        /// Guest physical address of the region.
        guest_phys_addr: u64,
        /// Size of the region.
        size: u64,
        /// Cause: the fd or range was refused, or mmap failed.
        #[source]
        source: shm::ShmError,
    },
    /// A region is empty or wraps around.
    #[error("region at guest address {guest_phys_addr:#x} of {size} bytes is empty or wraps")]
    Layout {
        /// Guest physical address.
        guest_phys_addr: u64,
        /// Size.
        size: u64,
    },
    /// Two regions overlap in guest or front-end addresses.
    #[error("regions at guest addresses {first:#x} and {second:#x} overlap in {space} addresses")]
    Overlap {
        /// One region.
        first: u64,
        /// The other.
        second: u64,
        /// Which address space.
        space: &'static str,
    },
    /// More regions than GET_MAX_MEM_SLOTS allows.
    #[error("too many memory regions (limit {MAX_MEM_SLOTS})")]
    TooManyRegions,
    /// A region without its fd.
    #[error("{regions} region(s) but {fds} fd(s)")]
    FdCount {
        /// Regions described.
        regions: usize,
        /// Fds attached.
        fds: usize,
    },
    /// REM_MEM_REG named a region we do not have.
    #[error("no region at guest address {0:#x} to remove")]
    NoSuchRegion(u64),
    /// The plan maps a region the table does not have an fd for (a bug).
    #[error("no fd for the region at guest address {0:#x}")]
    NoFd(u64),
    /// vm-memory refused the set of mappings.
    #[error("the mappings do not form a guest memory: {0}")]
    Publish(String),
}
