//! Guest memory as the front-end describes it: regions backed by shared fds,
//! mapped into our address space and published to the queue workers through
//! a `GuestMemoryAtomic`, plus translation of front-end virtual addresses
//! (what SET_VRING_ADDR carries) into guest physical addresses.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::dirty_log::{LogBitmap, LogRegion};

/// Guest RAM as the workers see it: every write through it is logged in
/// the front-end's dirty log while logging is on (see [`crate::dirty_log`]).
pub type GuestRam = GuestMemoryMmap<LogBitmap>;

/// Most regions we accept (GET_MAX_MEM_SLOTS).
pub const MAX_MEM_SLOTS: u64 = 32;

/// A memory table request could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// fstat of a region's fd failed (its file identity is needed to
    /// compare memory tables by meaning).
    #[error("cannot identify the file of the region at guest address {guest_phys_addr:#x}")]
    Identify {
        /// Guest physical address of the region.
        guest_phys_addr: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The region's fd or range was refused, or mmap failed.
    #[error("cannot map region at guest address {guest_phys_addr:#x} ({size} bytes)")]
    Map {
        /// Guest physical address of the region.
        guest_phys_addr: u64,
        /// Size of the region.
        size: u64,
        /// Cause.
        #[source]
        source: shm::ShmError,
    },
    /// Regions overlap, are empty or wrap around.
    #[error("invalid region layout: {0}")]
    Layout(String),
    /// More regions than GET_MAX_MEM_SLOTS allows.
    #[error("too many memory regions (limit {MAX_MEM_SLOTS})")]
    TooManyRegions,
    /// REM_MEM_REG named a region we do not have.
    #[error("no region at guest address {0:#x} to remove")]
    NoSuchRegion(u64),
}

/// What [`MemoryMap::set_table_keeping`] did with a memory table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableChange {
    /// The table names exactly the mappings the device has (same backing
    /// files, offsets, sizes and guest addresses): they were kept, and only
    /// the front-end addresses used for translation were updated.
    Kept,
    /// The table was mapped anew.
    Remapped,
}

/// One region: where the guest sees it and where the front-end mapped it.
#[derive(Clone, Debug)]
struct Region {
    guest_phys_addr: u64,
    size: u64,
    user_addr: u64,
    /// Backing file identity (st_dev, st_ino) and offset: what presetup
    /// compares regions by, since fd numbers mean nothing across messages.
    file: presetup::FileIdentity,
    file_offset: u64,
    mapping: Arc<GuestRegionMmap<LogBitmap>>,
}

/// The device's guest memory.
#[derive(Debug)]
pub struct MemoryMap {
    regions: Vec<Region>,
    atomic: GuestMemoryAtomic<GuestRam>,
    /// The dirty log every region writes into, while logging is on.
    log: Option<Arc<LogRegion>>,
}

impl Default for MemoryMap {
    fn default() -> Self {
        MemoryMap {
            regions: Vec::new(),
            atomic: GuestMemoryAtomic::new(GuestRam::default()),
            log: None,
        }
    }
}

impl MemoryMap {
    /// The handle workers load snapshots from.
    pub fn atomic(&self) -> GuestMemoryAtomic<GuestRam> {
        self.atomic.clone()
    }

    /// Number of regions mapped.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// The regions as presetup describes them (file identity, offset,
    /// size, guest and front-end addresses), for the switchover plan and
    /// `query-config`.
    pub fn describe(&self) -> Vec<presetup::MemoryRegion> {
        self.regions
            .iter()
            .map(|region| presetup::MemoryRegion {
                file: region.file,
                file_offset: region.file_offset,
                size_bytes: region.size,
                guest_phys_addr: presetup::GuestAddr(region.guest_phys_addr),
                user_addr: presetup::FrontendAddr(region.user_addr),
            })
            .collect()
    }

    /// Whether any memory is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Replace the whole table (SET_MEM_TABLE). All regions are mapped before
    /// anything is swapped, so a failure leaves the old table in place.
    pub fn set_table(
        &mut self,
        table: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        if table.len() as u64 > MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        let mut regions = Vec::with_capacity(table.len());
        for (region, file) in table.iter().zip(files) {
            regions.push(map_region(region, file)?);
        }
        self.install(regions)
    }

    /// SET_MEM_TABLE that keeps what is already mapped: a table naming the
    /// same mappings as the current one (compared by backing file identity,
    /// file offset, size and guest address, as [`presetup::RegionKey`]
    /// does; fd numbers differ between messages) keeps them, pre-faulted
    /// pages and dirty-log attachment included, and takes only the new
    /// front-end addresses. Any other table is mapped anew with
    /// [`Self::set_table`]. This is what lets an early (presetup) mapping
    /// survive the switchover's identical SET_MEM_TABLE.
    pub fn set_table_keeping(
        &mut self,
        table: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<TableChange, MemoryError> {
        if let Some(kept) = self.same_mappings(table, &files) {
            // The workers' GuestRam holds guest addresses only: it stays.
            self.regions = kept;
            return Ok(TableChange::Kept);
        }
        self.set_table(table, files)?;
        Ok(TableChange::Remapped)
    }

    /// The current regions with `table`'s front-end addresses, if `table`
    /// names exactly the current mappings.
    fn same_mappings(
        &self,
        table: &[VhostUserMemoryRegion],
        files: &[File],
    ) -> Option<Vec<Region>> {
        if self.regions.is_empty()
            || table.len() != self.regions.len()
            || files.len() != table.len()
        {
            return None;
        }
        let mut kept = Vec::with_capacity(table.len());
        for (entry, file) in table.iter().zip(files) {
            // A file we cannot identify is left to set_table to report.
            let file_identity = identify(file, entry.guest_phys_addr).ok()?;
            entry.user_addr.checked_add(entry.memory_size)?;
            let old = self.regions.iter().find(|region| {
                region.file == file_identity
                    && region.file_offset == entry.mmap_offset
                    && region.size == entry.memory_size
                    && region.guest_phys_addr == entry.guest_phys_addr
            })?;
            let mut region = old.clone();
            region.user_addr = entry.user_addr;
            kept.push(region);
        }
        // Equal counts and distinct guest addresses: every current region
        // was matched exactly once.
        kept.sort_by_key(|region| region.guest_phys_addr);
        if kept
            .windows(2)
            .any(|pair| pair[0].guest_phys_addr == pair[1].guest_phys_addr)
        {
            return None;
        }
        Some(kept)
    }

    /// Add one region (ADD_MEM_REG).
    pub fn add_region(
        &mut self,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<(), MemoryError> {
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        let mut regions = self.regions.clone();
        regions.push(map_region(region, file)?);
        self.install(regions)
    }

    /// Remove the region with the same guest address and size (REM_MEM_REG;
    /// the spec identifies it by those, not by the fd).
    pub fn remove_region(&mut self, region: &VhostUserMemoryRegion) -> Result<(), MemoryError> {
        let mut regions = self.regions.clone();
        let before = regions.len();
        regions.retain(|r| {
            !(r.guest_phys_addr == region.guest_phys_addr && r.size == region.memory_size)
        });
        if regions.len() == before {
            return Err(MemoryError::NoSuchRegion(region.guest_phys_addr));
        }
        self.install(regions)
    }

    /// Drop every region (disconnect, RESET_OWNER).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.atomic
            .lock()
            .expect("memory lock is never poisoned: holders do not panic")
            .replace(GuestRam::default());
    }

    /// Log every write to guest memory into `log` from now on, or stop
    /// logging (None). Regions added later follow the same setting.
    pub fn set_log(&mut self, log: Option<Arc<LogRegion>>) {
        for region in &self.regions {
            attach_log(region, log.as_ref());
        }
        self.log = log;
    }

    /// Whether writes are being logged.
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Whether all three addresses of a ring lie in the current table: a
    /// ring set up under an older table (its SET_VRING_ADDR not re-sent
    /// yet) is not described as configured.
    pub fn holds_ring(&self, ring: &presetup::RingConfig) -> bool {
        ring.addresses
            .parts()
            .iter()
            .all(|(_, addr)| self.vmm_to_guest(addr.0).is_some())
    }

    /// Translate a front-end virtual address into a guest physical address.
    pub fn vmm_to_guest(&self, user_addr: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|r| {
            let offset = user_addr.checked_sub(r.user_addr)?;
            (offset < r.size).then(|| GuestAddress(r.guest_phys_addr + offset))
        })
    }

    fn install(&mut self, mut regions: Vec<Region>) -> Result<(), MemoryError> {
        regions.sort_by_key(|r| r.guest_phys_addr);
        for region in &regions {
            attach_log(region, self.log.as_ref());
        }
        // vm-memory refuses an empty collection; no regions is a valid table
        // (a front-end may remove every region before adding new ones).
        let memory = if regions.is_empty() {
            GuestRam::default()
        } else {
            GuestRam::from_arc_regions(regions.iter().map(|r| r.mapping.clone()).collect())
                .map_err(|e| MemoryError::Layout(e.to_string()))?
        };
        // Workers holding the previous snapshot keep its mappings alive
        // until their in-flight requests complete.
        self.atomic
            .lock()
            .expect("memory lock is never poisoned: holders do not panic")
            .replace(memory);
        self.regions = regions;
        Ok(())
    }
}

fn attach_log(region: &Region, log: Option<&Arc<LogRegion>>) {
    // The region's own bitmap (GuestMemoryRegion::bitmap gives a slice).
    let mmap: &MmapRegion<LogBitmap> = &region.mapping;
    let bitmap = mmap.bitmap();
    match log {
        Some(log) => bitmap.attach(log.clone(), region.guest_phys_addr),
        None => bitmap.detach(),
    }
}

/// The backing file's identity (st_dev, st_ino), which names a mapping
/// across messages and processes where fd numbers do not.
fn identify(file: &File, guest_phys_addr: u64) -> Result<presetup::FileIdentity, MemoryError> {
    use std::os::unix::fs::MetadataExt;
    let metadata = file.metadata().map_err(|source| MemoryError::Identify {
        guest_phys_addr,
        source,
    })?;
    Ok(presetup::FileIdentity {
        device: metadata.dev(),
        inode: metadata.ino(),
    })
}

fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<Region, MemoryError> {
    let guest_phys_addr = region.guest_phys_addr;
    let size = region.memory_size;
    if size == 0
        || guest_phys_addr.checked_add(size).is_none()
        || region.user_addr.checked_add(size).is_none()
    {
        return Err(MemoryError::Layout(format!(
            "region at {guest_phys_addr:#x} of {size} bytes"
        )));
    }
    let file_identity = identify(&file, guest_phys_addr)?;
    let file_offset = region.mmap_offset;
    let mmap =
        crate::guest_mapping::map_region(region, file).map_err(|source| MemoryError::Map {
            guest_phys_addr,
            size,
            source,
        })?;
    let mapping = GuestRegionMmap::new(mmap, GuestAddress(guest_phys_addr)).ok_or_else(|| {
        MemoryError::Layout(format!("region at {guest_phys_addr:#x} wraps around"))
    })?;
    Ok(Region {
        guest_phys_addr,
        size,
        user_addr: region.user_addr,
        file: file_identity,
        file_offset,
        mapping: Arc::new(mapping),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryBackend};

    fn memfd(size: u64) -> File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        file
    }

    #[test]
    fn table_maps_regions_and_translates_addresses() {
        let mut map = MemoryMap::default();
        let table = [
            VhostUserMemoryRegion::new(0, 0x10000, 0x7f00_0000_0000, 0),
            VhostUserMemoryRegion::new(0x100000, 0x10000, 0x7f00_1000_0000, 0),
        ];
        map.set_table(&table, vec![memfd(0x10000), memfd(0x10000)])
            .unwrap();
        assert_eq!(map.vmm_to_guest(0x7f00_0000_0010), Some(GuestAddress(0x10)));
        assert_eq!(
            map.vmm_to_guest(0x7f00_1000_0020),
            Some(GuestAddress(0x100020))
        );
        assert_eq!(map.vmm_to_guest(0x7f00_0001_0000), None, "one past the end");
        let mem = map.atomic().memory();
        mem.write_obj(0x1234u32, GuestAddress(0x100000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x100000)).unwrap(), 0x1234);
        assert_eq!(mem.num_regions(), 2);
    }

    #[test]
    fn an_identical_table_keeps_its_mappings_and_takes_new_user_addresses() {
        let mut map = MemoryMap::default();
        let ram = memfd(0x20000);
        let table = [VhostUserMemoryRegion::new(
            0,
            0x10000,
            0x7f00_0000_0000,
            0x10000,
        )];
        assert_eq!(
            map.set_table_keeping(&table, vec![ram.try_clone().unwrap()])
                .unwrap(),
            TableChange::Remapped
        );
        let host = |map: &MemoryMap| {
            map.atomic()
                .memory()
                .get_host_address(GuestAddress(0))
                .unwrap() as usize
        };
        let mapped_at = host(&map);
        // The same memory from another front-end process: a new fd for the
        // same file, another front-end address.
        let again = [VhostUserMemoryRegion::new(
            0,
            0x10000,
            0x5500_0000_0000,
            0x10000,
        )];
        assert_eq!(
            map.set_table_keeping(&again, vec![ram.try_clone().unwrap()])
                .unwrap(),
            TableChange::Kept
        );
        assert_eq!(host(&map), mapped_at, "the mapping was kept");
        assert_eq!(map.vmm_to_guest(0x5500_0000_0010), Some(GuestAddress(0x10)));
        assert_eq!(map.vmm_to_guest(0x7f00_0000_0010), None);
        assert_eq!(map.describe()[0].user_addr.0, 0x5500_0000_0000);
        // Another offset, another file or another guest address: a remap.
        for (table, file) in [
            (
                VhostUserMemoryRegion::new(0, 0x10000, 0x5500_0000_0000, 0),
                ram.try_clone().unwrap(),
            ),
            (
                VhostUserMemoryRegion::new(0, 0x10000, 0x5500_0000_0000, 0),
                memfd(0x10000),
            ),
            (
                VhostUserMemoryRegion::new(0x100000, 0x10000, 0x5500_0000_0000, 0),
                memfd(0x10000),
            ),
        ] {
            assert_eq!(
                map.set_table_keeping(&[table], vec![file]).unwrap(),
                TableChange::Remapped
            );
        }
    }

    #[test]
    fn add_and_remove_regions() {
        let mut map = MemoryMap::default();
        let region = VhostUserMemoryRegion::new(0x200000, 0x10000, 0x7f00_2000_0000, 0);
        map.add_region(&region, memfd(0x10000)).unwrap();
        assert_eq!(map.region_count(), 1);
        let other = VhostUserMemoryRegion::new(0x300000, 0x10000, 0, 0);
        assert!(matches!(
            map.remove_region(&other),
            Err(MemoryError::NoSuchRegion(0x300000))
        ));
        map.remove_region(&region).unwrap();
        assert!(map.is_empty());
    }

    #[test]
    fn overlapping_regions_are_refused_and_old_table_kept() {
        let mut map = MemoryMap::default();
        map.set_table(
            &[VhostUserMemoryRegion::new(0, 0x10000, 0x1000_0000, 0)],
            vec![memfd(0x10000)],
        )
        .unwrap();
        let overlapping = [
            VhostUserMemoryRegion::new(0, 0x10000, 0x2000_0000, 0),
            VhostUserMemoryRegion::new(0x8000, 0x10000, 0x3000_0000, 0),
        ];
        assert!(map
            .set_table(&overlapping, vec![memfd(0x10000), memfd(0x10000)])
            .is_err());
        assert_eq!(
            map.vmm_to_guest(0x1000_0000),
            Some(GuestAddress(0)),
            "old table still in place"
        );
    }
}
