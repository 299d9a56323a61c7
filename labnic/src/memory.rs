//! The driver's memory as the device sees it: every IOVA mapping VDUSE
//! hands out (`VDUSE_IOTLB_GET_FD` + mmap), as one `vm-memory` guest memory
//! whose addresses are IOVAs. With vhost-vdpa in front, an IOVA is the
//! front-end's virtual address and each mapping one of its shared file
//! mappings (a memfd, hugetlbfs).
//!
//! The mappings carry dirty bitmaps, so every write the device makes
//! (RX buffers, used rings) is recorded without the data path doing
//! anything; [`IovaSpace::dirty_pages`] collects them into a record that
//! outlives remappings, for a dirty-log checker.

use std::collections::BTreeSet;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionCollectionError, GuestRegionMmap,
    MmapRegion,
};

use crate::uapi;
use crate::vduse::{Device, VduseError};

/// The page size of the dirty record.
pub const PAGE_SIZE: u64 = 4096;

/// Guest memory with dirty bitmaps, addressed by IOVA.
pub type Memory = GuestMemoryMmap<AtomicBitmap>;

/// The IOVA space could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Asking VDUSE for a mapping failed.
    #[error("looking up the IOTLB")]
    Iotlb(#[source] VduseError),
    /// mmap of a mapping's file failed.
    #[error("mapping IOVA {start:#x}..={last:#x}")]
    Map {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
        /// Cause.
        #[source]
        source: MmapRegionError,
    },
    /// A mapping's numbers do not make a region (size overflow, an offset
    /// that cannot be page-aligned).
    #[error("IOTLB entry {start:#x}..={last:#x} at offset {offset:#x} cannot be mapped")]
    Entry {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
        /// File offset.
        offset: u64,
    },
    /// The mappings overlap or none is usable.
    #[error("building the IOVA space from {regions} mappings")]
    Collection {
        /// How many mappings there were.
        regions: usize,
        /// Cause.
        #[source]
        source: GuestRegionCollectionError,
    },
}

/// One mapped IOTLB entry.
struct Mapped {
    /// IOVA of the mapping's first byte (page-aligned).
    start: u64,
    /// The device may write it (RW or WO): its writes count as dirty.
    writable: bool,
    region: Arc<MmapRegion<AtomicBitmap>>,
}

/// The IOVA space: mapped lazily, dropped when the kernel says mappings
/// changed.
#[derive(Default)]
pub struct IovaSpace {
    memory: Option<Memory>,
    mapped: Vec<Mapped>,
    /// Pages (IOVA of their first byte) the device wrote, collected from
    /// the bitmaps of mappings since dropped or harvested.
    dirty: BTreeSet<u64>,
    /// Mappings made so far (for reports).
    pub maps: u64,
}

impl IovaSpace {
    /// The current memory, mapping every IOTLB entry first if the space
    /// was dropped. Err if VDUSE or mmap refuse; an empty IOTLB gives Ok
    /// with no memory (None).
    pub fn memory(&mut self, device: &Device) -> Result<Option<Memory>, MemoryError> {
        if self.memory.is_none() {
            self.map_all(device)?;
        }
        Ok(self.memory.clone())
    }

    /// Mappings in `[start, last]` changed: collect their dirty pages and
    /// drop the whole space (VDUSE sends `0..=u64::MAX` for every vhost-vdpa
    /// map change anyway); it is mapped again on next use.
    pub fn invalidate(&mut self, _start: u64, _last: u64) {
        self.harvest();
        self.memory = None;
        self.mapped.clear();
    }

    /// Pages written so far (IOVAs of their first byte). With `reset`,
    /// the record starts empty again afterwards.
    pub fn dirty_pages(&mut self, reset: bool) -> BTreeSet<u64> {
        self.harvest();
        if reset {
            std::mem::take(&mut self.dirty)
        } else {
            self.dirty.clone()
        }
    }

    fn harvest(&mut self) {
        for mapped in &self.mapped {
            if !mapped.writable {
                continue;
            }
            for (word_index, word) in mapped
                .region
                .bitmap()
                .get_and_reset()
                .into_iter()
                .enumerate()
            {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let page = word_index as u64 * 64 + bit;
                    if let Some(addr) = page
                        .checked_mul(PAGE_SIZE)
                        .and_then(|offset| mapped.start.checked_add(offset))
                    {
                        self.dirty.insert(addr);
                    }
                }
            }
        }
    }

    fn map_all(&mut self, device: &Device) -> Result<(), MemoryError> {
        let mut mapped = Vec::new();
        let mut next = 0u64;
        loop {
            let Some((entry, file)) = device
                .iotlb_fd(next, u64::MAX)
                .map_err(MemoryError::Iotlb)?
            else {
                break;
            };
            if entry.last < entry.start || entry.last < next {
                // A kernel answer that does not advance would loop forever.
                return Err(MemoryError::Entry {
                    start: entry.start,
                    last: entry.last,
                    offset: entry.offset,
                });
            }
            if entry.perm == uapi::ACCESS_WO {
                // mmap needs read access; a write-only mapping cannot be
                // served (the kernel's bounce buffers use it, vhost-vdpa
                // does not).
                log::warn!(
                    "IOTLB {:#x}..={:#x} is write-only; not mapped",
                    entry.start,
                    entry.last
                );
            } else {
                mapped.push(map_entry(&entry, file)?);
            }
            match entry.last.checked_add(1) {
                Some(n) => next = n,
                None => break,
            }
        }
        if mapped.is_empty() {
            self.mapped.clear();
            self.memory = None;
            return Ok(());
        }
        let regions: Vec<GuestRegionMmap<AtomicBitmap>> = mapped
            .iter()
            .filter_map(|m| GuestRegionMmap::with_arc(Arc::clone(&m.region), GuestAddress(m.start)))
            .collect();
        let count = regions.len();
        let memory =
            GuestMemoryMmap::from_regions(regions).map_err(|source| MemoryError::Collection {
                regions: count,
                source,
            })?;
        self.maps += mapped.len() as u64;
        self.mapped = mapped;
        self.memory = Some(memory);
        Ok(())
    }
}

/// mmap one IOTLB entry: page-aligned start, the whole range. A read-only
/// mapping is mapped private: a (buggy) device write then lands in our
/// copy, invisible to the driver, instead of faulting.
fn map_entry(entry: &uapi::IotlbEntry, file: std::fs::File) -> Result<Mapped, MemoryError> {
    let bad = || MemoryError::Entry {
        start: entry.start,
        last: entry.last,
        offset: entry.offset,
    };
    let lead = entry.start % PAGE_SIZE;
    let start = entry.start - lead;
    let offset = entry.offset.checked_sub(lead).ok_or_else(bad)?;
    if offset % PAGE_SIZE != 0 {
        return Err(bad());
    }
    let len = entry
        .last
        .checked_sub(start)
        .and_then(|l| l.checked_add(1))
        .and_then(|l| l.checked_next_multiple_of(PAGE_SIZE))
        .ok_or_else(bad)?;
    let size = usize::try_from(len).map_err(|_| bad())?;
    let writable = entry.perm == uapi::ACCESS_RW;
    let flags = libc::MAP_NORESERVE
        | if writable {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    let region = MmapRegion::<AtomicBitmap>::build(
        Some(FileOffset::new(file, offset)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
    )
    .map_err(|source| MemoryError::Map {
        start: entry.start,
        last: entry.last,
        source,
    })?;
    Ok(Mapped {
        start,
        writable,
        region: Arc::new(region),
    })
}

/// Write `pages` to `path` atomically (a temporary file renamed over it):
/// one `0x...` IOVA per line, ascending, after a `# pages=N` header.
pub fn write_dirty_log(path: &std::path::Path, pages: &BTreeSet<u64>) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        writeln!(
            out,
            "# labnic dirty pages: IOVA of each {PAGE_SIZE}-byte page the device wrote"
        )?;
        writeln!(out, "# pages={}", pages.len())?;
        for page in pages {
            writeln!(out, "{page:#x}")?;
        }
        out.flush()?;
    }
    std::fs::rename(&tmp, path)
}
