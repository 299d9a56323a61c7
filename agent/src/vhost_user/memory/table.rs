//! The memory table the front-end sent, validated, with the fds of the
//! regions not mapped yet.

use std::fs::File;

use presetup::{FileIdentity, FrontendAddr, GuestAddr, MemoryRegion, RegionKey};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::GuestAddress;

use super::{MemoryError, MAX_MEM_SLOTS};

/// One entry of the front-end's table.
#[derive(Debug)]
struct Entry {
    region: MemoryRegion,
    /// The fd, until a mapping takes it (or the table names a mapping we
    /// have already).
    fd: Option<File>,
}

/// The memory table the front-end sent (module documentation).
#[derive(Debug, Default)]
pub struct MemoryTable {
    entries: Vec<Entry>,
}

impl MemoryTable {
    /// Replace the whole table (SET_MEM_TABLE). Validated whole: a refused
    /// table leaves the old one in place.
    pub fn set(
        &mut self,
        table: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        if table.len() as u64 > MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        if table.len() != files.len() {
            return Err(MemoryError::FdCount {
                regions: table.len(),
                fds: files.len(),
            });
        }
        let mut entries = Vec::with_capacity(table.len());
        for (region, file) in table.iter().zip(files) {
            entries.push(entry(region, file)?);
        }
        check_overlaps(&entries)?;
        self.entries = entries;
        Ok(())
    }

    /// Add one region (ADD_MEM_REG).
    pub fn add(&mut self, region: &VhostUserMemoryRegion, file: File) -> Result<(), MemoryError> {
        if self.entries.len() as u64 >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        let new = entry(region, file)?;
        let mut candidate: Vec<&Entry> = self.entries.iter().collect();
        candidate.push(&new);
        check_overlap_refs(&candidate)?;
        self.entries.push(new);
        Ok(())
    }

    /// Remove the region with this guest address and size (REM_MEM_REG;
    /// the spec identifies it by those, not by the fd).
    pub fn remove(&mut self, region: &VhostUserMemoryRegion) -> Result<(), MemoryError> {
        let before = self.entries.len();
        self.entries.retain(|entry| {
            !(entry.region.guest_phys_addr.0 == region.guest_phys_addr
                && entry.region.size_bytes == region.memory_size)
        });
        if self.entries.len() == before {
            return Err(MemoryError::NoSuchRegion(region.guest_phys_addr));
        }
        Ok(())
    }

    /// Forget the table (disconnect, RESET_OWNER).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The regions as presetup describes them.
    pub fn describe(&self) -> Vec<MemoryRegion> {
        self.entries.iter().map(|entry| entry.region).collect()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Take the fd of the region named `key` (to map it).
    pub fn take_fd(&mut self, key: &RegionKey) -> Option<File> {
        self.entries
            .iter_mut()
            .find(|entry| entry.region.key() == *key)?
            .fd
            .take()
    }

    /// Drop the fds of regions that are mapped already: only a mapping
    /// holds guest memory open.
    pub fn drop_fds(&mut self) {
        for entry in &mut self.entries {
            entry.fd = None;
        }
    }

    /// Translate a front-end virtual address into a guest physical address.
    pub fn translate(&self, user_addr: u64) -> Option<GuestAddress> {
        self.entries.iter().find_map(|entry| {
            let region = &entry.region;
            let offset = user_addr.checked_sub(region.user_addr.0)?;
            (offset < region.size_bytes)
                .then(|| region.guest_phys_addr.0.checked_add(offset))
                .flatten()
                .map(GuestAddress)
        })
    }

    /// Whether `len` bytes from front-end address `user_addr` lie inside one
    /// region of the table (a ring part is one contiguous piece of guest
    /// memory).
    pub fn holds(&self, user_addr: u64, len: u64) -> bool {
        let Some(last) = len.checked_sub(1).and_then(|n| user_addr.checked_add(n)) else {
            return len == 0 && self.translate(user_addr).is_some();
        };
        self.entries.iter().any(|entry| {
            let region = &entry.region;
            let start = region.user_addr.0;
            let end = start.saturating_add(region.size_bytes);
            user_addr >= start && last < end
        })
    }

    /// Whether all three parts of a ring lie in the table.
    pub fn holds_ring(&self, addresses: &presetup::RingAddresses) -> bool {
        addresses
            .parts()
            .iter()
            .all(|(_, addr)| self.translate(addr.0).is_some())
    }
}

fn entry(region: &VhostUserMemoryRegion, file: File) -> Result<Entry, MemoryError> {
    let guest_phys_addr = region.guest_phys_addr;
    let size = region.memory_size;
    if size == 0
        || guest_phys_addr.checked_add(size).is_none()
        || region.user_addr.checked_add(size).is_none()
        || region.mmap_offset.checked_add(size).is_none()
    {
        return Err(MemoryError::Layout {
            guest_phys_addr,
            size,
        });
    }
    let file_identity = identify(&file, guest_phys_addr)?;
    Ok(Entry {
        region: MemoryRegion {
            file: file_identity,
            file_offset: region.mmap_offset,
            size_bytes: size,
            guest_phys_addr: GuestAddr(guest_phys_addr),
            user_addr: FrontendAddr(region.user_addr),
        },
        fd: Some(file),
    })
}

fn check_overlaps(entries: &[Entry]) -> Result<(), MemoryError> {
    let refs: Vec<&Entry> = entries.iter().collect();
    check_overlap_refs(&refs)
}

fn check_overlap_refs(entries: &[&Entry]) -> Result<(), MemoryError> {
    let span = |start: u64, size: u64| (start, start.saturating_add(size));
    for (i, a) in entries.iter().enumerate() {
        for b in &entries[i + 1..] {
            let (a, b) = (&a.region, &b.region);
            for (space, (a_start, a_end), (b_start, b_end)) in [
                (
                    "guest",
                    span(a.guest_phys_addr.0, a.size_bytes),
                    span(b.guest_phys_addr.0, b.size_bytes),
                ),
                (
                    "front-end",
                    span(a.user_addr.0, a.size_bytes),
                    span(b.user_addr.0, b.size_bytes),
                ),
            ] {
                if a_start < b_end && b_start < a_end {
                    return Err(MemoryError::Overlap {
                        first: a.guest_phys_addr.0,
                        second: b.guest_phys_addr.0,
                        space,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The backing file's identity (st_dev, st_ino), which names a mapping
/// across messages and processes where fd numbers do not.
fn identify(file: &File, guest_phys_addr: u64) -> Result<FileIdentity, MemoryError> {
    use std::os::unix::fs::MetadataExt;
    let metadata = file.metadata().map_err(|source| MemoryError::Identify {
        guest_phys_addr,
        source,
    })?;
    Ok(FileIdentity {
        device: metadata.dev(),
        inode: metadata.ino(),
    })
}
