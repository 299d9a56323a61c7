//! Guest RAM regions the agent maps itself, so that a front-end cannot
//! kill the process through them (issue 18):
//!
//! * before mapping, the fd is checked against what the message claims
//!   ([`shm::check()`]: a regular file or memfd, the whole range inside it);
//! * the mapping is a [`shm::GuestMapping`], whose SIGBUS (the front-end
//!   shrank an unsealed file after it was mapped) is contained: the
//!   mapping turns into zero pages and is marked faulted;
//! * the queue workers ask [`FaultWatch::faulted`] once per loop and fail
//!   the device (NEEDS_RESET) when their memory was faulted.
//!
//! Guest RAM is not required to be sealed: file-backed RAM cannot be, and
//! DPDK's memfds are not (see `docs/hostile-peers.md`).

use std::fs::File;
use std::os::unix::io::AsRawFd;

use shm::{BackingKind, GuestMapping, Purpose, ShmError};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, MmapRegion};

use super::GuestRam;
use crate::vhost_user::dirty_log::LogBitmap;

/// Map one memory table entry, its fd checked first.
pub fn map_region(
    region: &VhostUserMemoryRegion,
    file: File,
) -> Result<MmapRegion<LogBitmap>, ShmError> {
    let (offset, size) = (region.mmap_offset, region.memory_size);
    let purpose = Purpose::GuestRam;
    let backing = shm::check(&file, purpose, offset, size)?;
    let range = shm::check::range(purpose, offset, size)?;
    let hugetlbfs = backing.kind == BackingKind::Hugetlbfs;
    let map_error = |source| ShmError::Map {
        purpose,
        offset,
        size,
        source,
    };
    let mapping = GuestMapping::map(file.as_raw_fd(), range.offset, range.len, hugetlbfs)
        .map_err(map_error)?;
    let addr = mapping.as_ptr();
    let builder = MmapRegionBuilder::new_with_bitmap(range.len, LogBitmap::owning(mapping))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .with_file_offset(FileOffset::new(file, offset))
        .with_hugetlbfs(hugetlbfs);
    // SAFETY: `addr..addr + range.len` is the mapping the bitmap now owns.
    // The region built here owns that bitmap, so the mapping stays mapped
    // for as long as the region (and every slice of it) exists.
    let builder = unsafe { builder.with_raw_mmap_pointer(addr) };
    builder
        .build()
        .map_err(|e| map_error(std::io::Error::other(e)))
}

/// Whether any region of `mem` took a contained SIGBUS.
pub fn memory_faulted(mem: &GuestRam) -> bool {
    mem.iter().any(|region| {
        let mmap: &MmapRegion<LogBitmap> = region;
        mmap.bitmap().faulted()
    })
}

/// A worker's view of contained faults: it looks at its regions only when
/// some fault happened since it last looked (one atomic load otherwise).
#[derive(Debug, Default)]
pub struct FaultWatch {
    seen: u64,
}

impl FaultWatch {
    /// Whether `mem` has a faulted region (checked only after a fault
    /// somewhere in the process since the last call).
    pub fn faulted(&mut self, mem: &GuestRam) -> bool {
        let epoch = shm::fault::epoch();
        if epoch == self.seen {
            return false;
        }
        self.seen = epoch;
        memory_faulted(mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};

    fn ram_file(size: u64) -> File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        file
    }

    /// SET_MEM_TABLE / ADD_MEM_REG lies (issue 18): mapped with a success
    /// ack before the fix, and the first access killed the agent.
    #[test]
    fn regression_regions_past_the_end_of_their_fd_are_refused() {
        for (size, offset) in [(0x20000, 0), (0x10000, 0x10000), (0x1000, 1 << 30)] {
            let region = VhostUserMemoryRegion::new(0, size, 0x7f00_0000_0000, offset);
            assert!(
                matches!(
                    map_region(&region, ram_file(0x10000)),
                    Err(ShmError::PastEnd { .. })
                ),
                "{size:#x} bytes at {offset:#x} of a 64 KiB file"
            );
        }
        let zero = File::open("/dev/zero").unwrap();
        let region = VhostUserMemoryRegion::new(0, 0x1000, 0x7f00_0000_0000, 0);
        assert!(matches!(
            map_region(&region, zero),
            Err(ShmError::NotMemory { .. })
        ));
    }

    #[test]
    fn a_region_shrunk_after_mapping_is_reported_faulted_and_reads_zero() {
        let file = ram_file(0x20000);
        let region = VhostUserMemoryRegion::new(0x100000, 0x20000, 0x7f00_0000_0000, 0);
        let mmap = map_region(&region, file.try_clone().unwrap()).unwrap();
        let mem = GuestRam::from_regions(vec![
            GuestRegionMmap::new(mmap, GuestAddress(0x100000)).unwrap()
        ])
        .unwrap();
        mem.write_obj(0xabu8, GuestAddress(0x11f000)).unwrap();
        let mut watch = FaultWatch::default();
        assert!(!watch.faulted(&mem));
        file.set_len(0x1000).unwrap();
        // This access raised SIGBUS and ended the agent before the fix.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x11f000)).unwrap(), 0);
        assert!(watch.faulted(&mem));
        assert!(memory_faulted(&mem));
    }
}
