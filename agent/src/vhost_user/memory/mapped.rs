//! The mappings of guest memory the plan made, published to the
//! datapaths.

use std::fs::File;
use std::sync::Arc;

use presetup::{FrontendAddr, MemoryRegion, RegionKey};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestRegionMmap, MmapRegion};

use super::{GuestRam, MemoryError};
use crate::vhost_user::dirty_log::{LogBitmap, LogRegion};

/// One mapping of guest memory the agent made.
#[derive(Debug)]
pub struct MappedRegion {
    key: RegionKey,
    mapping: Arc<GuestRegionMmap<LogBitmap>>,
}

impl MappedRegion {
    /// Which memory it maps.
    pub fn key(&self) -> RegionKey {
        self.key
    }

    /// Guest physical address of its first byte.
    pub fn guest_phys_addr(&self) -> u64 {
        self.key.guest_phys_addr.0
    }

    /// Its size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.key.size_bytes
    }

    /// Where the agent mapped it: what a kernel datapath (vhost-net)
    /// takes as the region's userspace address.
    pub fn host_addr(&self) -> *mut u8 {
        let mmap: &MmapRegion<LogBitmap> = &self.mapping;
        mmap.as_ptr()
    }
}

/// The mappings the plan made (module documentation).
#[derive(Debug)]
pub struct MemoryMap {
    /// Each mapping with the front-end address it is known by now.
    regions: Vec<(Arc<MappedRegion>, FrontendAddr)>,
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
    /// The handle datapaths load snapshots from.
    pub fn atomic(&self) -> GuestMemoryAtomic<GuestRam> {
        self.atomic.clone()
    }

    /// The mappings as presetup describes them.
    pub fn describe(&self) -> Vec<MemoryRegion> {
        self.regions
            .iter()
            .map(|(mapped, user_addr)| {
                let key = mapped.key;
                MemoryRegion {
                    file: key.file,
                    file_offset: key.file_offset,
                    size_bytes: key.size_bytes,
                    guest_phys_addr: key.guest_phys_addr,
                    user_addr: *user_addr,
                }
            })
            .collect()
    }

    /// Map `region` from `file` (not published until [`Self::publish`]).
    pub fn map(
        &mut self,
        region: &MemoryRegion,
        file: File,
    ) -> Result<Arc<MappedRegion>, MemoryError> {
        let guest_phys_addr = region.guest_phys_addr.0;
        let size = region.size_bytes;
        let message = VhostUserMemoryRegion::new(
            guest_phys_addr,
            size,
            region.user_addr.0,
            region.file_offset,
        );
        let mmap = super::guest_mapping::map_region(&message, file).map_err(|source| {
            MemoryError::Map {
                guest_phys_addr,
                size,
                source,
            }
        })?;
        let mapping = GuestRegionMmap::new(mmap, GuestAddress(guest_phys_addr)).ok_or(
            MemoryError::Layout {
                guest_phys_addr,
                size,
            },
        )?;
        let mapped = Arc::new(MappedRegion {
            key: region.key(),
            mapping: Arc::new(mapping),
        });
        attach_log(&mapped, self.log.as_ref());
        self.regions.push((mapped.clone(), region.user_addr));
        Ok(mapped)
    }

    /// The mapping `key`, if the agent has it.
    pub fn mapped(&self, key: &RegionKey) -> Option<Arc<MappedRegion>> {
        self.regions
            .iter()
            .find(|(m, _)| m.key == *key)
            .map(|(m, _)| m.clone())
    }

    /// Drop the mapping `key` (not published until [`Self::publish`];
    /// datapaths holding a snapshot keep it alive until they let go).
    pub fn unmap(&mut self, key: &RegionKey) -> Option<Arc<MappedRegion>> {
        let index = self.regions.iter().position(|(m, _)| m.key == *key)?;
        Some(self.regions.remove(index).0)
    }

    /// The front-end address a kept mapping is known by from now on.
    pub fn set_user_addr(&mut self, key: &RegionKey, user_addr: FrontendAddr) -> bool {
        match self.regions.iter_mut().find(|(m, _)| m.key == *key) {
            Some((_, addr)) => {
                *addr = user_addr;
                true
            }
            None => false,
        }
    }

    /// Make the current mappings what the datapaths see.
    pub fn publish(&mut self) -> Result<(), MemoryError> {
        self.regions.sort_by_key(|(m, _)| m.key.guest_phys_addr);
        // vm-memory refuses an empty collection; no regions is a valid
        // table (a front-end may remove every region before adding new).
        let memory = if self.regions.is_empty() {
            GuestRam::default()
        } else {
            GuestRam::from_arc_regions(
                self.regions
                    .iter()
                    .map(|(m, _)| m.mapping.clone())
                    .collect(),
            )
            .map_err(|e| MemoryError::Publish(e.to_string()))?
        };
        // Datapaths holding the previous snapshot keep its mappings alive
        // until their in-flight requests complete.
        self.atomic
            .lock()
            .expect("memory lock is never poisoned: holders do not panic")
            .replace(memory);
        Ok(())
    }

    /// Drop every mapping and publish that (disconnect).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.atomic
            .lock()
            .expect("memory lock is never poisoned: holders do not panic")
            .replace(GuestRam::default());
    }

    /// Log every write to guest memory into `log` from now on, or stop
    /// logging (`None`). Regions mapped later follow the same setting.
    pub fn set_log(&mut self, log: Option<Arc<LogRegion>>) {
        for (region, _) in &self.regions {
            attach_log(region, log.as_ref());
        }
        self.log = log;
    }

    /// Whether writes are being logged.
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }
}

fn attach_log(region: &MappedRegion, log: Option<&Arc<LogRegion>>) {
    // The region's own bitmap (GuestMemoryRegion::bitmap gives a slice).
    let mmap: &MmapRegion<LogBitmap> = &region.mapping;
    let bitmap = mmap.bitmap();
    match log {
        Some(log) => bitmap.attach(log.clone(), region.guest_phys_addr()),
        None => bitmap.detach(),
    }
}
