//! The memory table the kernel holds, and where a ring lies in it: shared
//! by the kernel datapaths (vhost-net, vhost-vdpa).
//!
//! vhost-net reaches guest memory in two ways. Buffers named by
//! descriptors go through the memory table (VHOST_SET_MEM_TABLE: guest
//! physical address, size, address in the owner's address space), so they
//! can only reach memory the table holds. The rings themselves are taken
//! as plain addresses in the owner's address space (VHOST_SET_VRING_ADDR)
//! and accessed with `get_user`/`put_user`; the kernel checks only that
//! they are user addresses. So every ring part is checked here to lie
//! inside one region of the table before its address is handed on, or a
//! hostile front-end could make the kernel write anywhere in the agent.
//!
//! vhost-vdpa takes ring addresses as I/O virtual addresses (here: guest
//! physical addresses) that its IOTLB translates, so a bad address would
//! only fault in the device; it is checked the same way all the same, so
//! the device is never told to DMA outside memory the front-end gave.
//!
//! The table is the agent's own mappings of guest RAM
//! ([`MappedRegion::host_addr`]): the kernel works in the agent's address
//! space. It holds each mapping (an `Arc`) for as long as the kernel may
//! use it, so a region the session unmaps stays mapped until the kernel
//! was given a table without it.

use std::sync::Arc;

use presetup::RegionKey;

use super::RingCheckError;
use crate::vhost_user::memory::MappedRegion;
use crate::vhost_user::vring::RingGuestAddresses;

/// One region as the kernel takes it: guest physical address, size,
/// address in the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelRegion {
    /// Guest physical address of its first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where the agent mapped it.
    pub host_addr: u64,
}

impl KernelRegion {
    fn of(region: &MappedRegion) -> KernelRegion {
        KernelRegion {
            guest_phys_addr: region.guest_phys_addr(),
            size: region.size_bytes(),
            // A pointer always fits a u64 where vhost exists.
            host_addr: region.host_addr() as usize as u64,
        }
    }

    /// The agent's address of `[gpa, gpa + len)`, if this region holds all
    /// of it.
    fn host_range(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        let region_end = self.guest_phys_addr.checked_add(self.size)?;
        if gpa < self.guest_phys_addr || end > region_end {
            return None;
        }
        self.host_addr.checked_add(gpa - self.guest_phys_addr)
    }
}

/// A ring's parts in the agent's address space, checked against the table
/// (what VHOST_SET_VRING_ADDR takes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingHost {
    /// Descriptor table.
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// The used ring's guest address: where the kernel logs its writes to
    /// the used ring (VHOST_VRING_F_LOG).
    pub used_gpa: u64,
}

/// The three parts of a split ring of `size` entries: name, guest address,
/// length (with the event index words, which the kernel touches when
/// EVENT_IDX is on) and alignment (virtio 1.2 §2.7).
fn ring_parts(size: u16, guest: &RingGuestAddresses) -> [(&'static str, u64, u64, u64); 3] {
    let n = u64::from(size);
    [
        ("descriptor table", guest.desc_table.0, 16 * n, 16),
        ("avail ring", guest.avail_ring.0, 6 + 2 * n, 2),
        ("used ring", guest.used_ring.0, 6 + 8 * n, 4),
    ]
}

/// The memory table the kernel holds, or will at the next hand-over
/// (module documentation).
#[derive(Debug, Default)]
pub struct KernelTable {
    /// By guest address.
    regions: Vec<Arc<MappedRegion>>,
}

impl KernelTable {
    /// Add `region` (a region of the same key is replaced).
    pub fn insert(&mut self, region: Arc<MappedRegion>) -> Option<Arc<MappedRegion>> {
        let old = self.remove(&region.key());
        self.regions.push(region);
        self.regions.sort_by_key(|r| r.guest_phys_addr());
        old
    }

    /// Take region `key` out (the caller keeps it mapped until the kernel
    /// has a table without it).
    pub fn remove(&mut self, key: &RegionKey) -> Option<Arc<MappedRegion>> {
        let index = self.regions.iter().position(|r| r.key() == *key)?;
        Some(self.regions.remove(index))
    }

    /// The mapping whose first guest address is `guest_phys_addr`.
    pub fn mapping(&self, guest_phys_addr: u64) -> Option<Arc<MappedRegion>> {
        self.regions
            .iter()
            .find(|r| r.guest_phys_addr() == guest_phys_addr)
            .cloned()
    }

    /// Drop every region (the caller keeps what the kernel may still use).
    pub fn take_all(&mut self) -> Vec<Arc<MappedRegion>> {
        std::mem::take(&mut self.regions)
    }

    /// The regions as the kernel takes them.
    pub fn kernel_regions(&self) -> Vec<KernelRegion> {
        self.regions.iter().map(|r| KernelRegion::of(r)).collect()
    }

    /// One past the highest guest address the table holds (0 if empty):
    /// how far a dirty log must reach.
    pub fn end(&self) -> u64 {
        self.kernel_regions()
            .iter()
            .filter_map(|r| r.guest_phys_addr.checked_add(r.size))
            .max()
            .unwrap_or(0)
    }

    /// Where ring `ring` of `size` entries at `guest` lies in the agent,
    /// each part checked to be aligned and inside one region.
    pub fn ring_host(
        &self,
        ring: u16,
        size: u16,
        guest: &RingGuestAddresses,
    ) -> Result<RingHost, RingCheckError> {
        ring_host(&self.kernel_regions(), ring, size, guest)
    }
}

/// [`KernelTable::ring_host`] over `regions`.
fn ring_host(
    regions: &[KernelRegion],
    ring: u16,
    size: u16,
    guest: &RingGuestAddresses,
) -> Result<RingHost, RingCheckError> {
    if size == 0 || !size.is_power_of_two() || size > 32768 {
        return Err(RingCheckError::Size { ring, size });
    }
    let mut host = [0u64; 3];
    for (slot, (part, gpa, len, align)) in host.iter_mut().zip(ring_parts(size, guest)) {
        if gpa % align != 0 {
            return Err(RingCheckError::Misaligned {
                ring,
                part,
                gpa,
                align,
            });
        }
        *slot = regions
            .iter()
            .find_map(|region| region.host_range(gpa, len))
            .ok_or(RingCheckError::Outside {
                ring,
                part,
                gpa,
                len,
            })?;
    }
    Ok(RingHost {
        desc: host[0],
        avail: host[1],
        used: host[2],
        used_gpa: guest.used_ring.0,
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    /// Two regions adjacent in guest memory but not in the agent.
    const REGIONS: [KernelRegion; 2] = [
        KernelRegion {
            guest_phys_addr: 0,
            size: 0x10_0000,
            host_addr: 0x7f00_0000_0000,
        },
        KernelRegion {
            guest_phys_addr: 0x10_0000,
            size: 0x10_0000,
            host_addr: 0x7e00_0000_0000,
        },
    ];

    fn ring(desc: u64, avail: u64, used: u64) -> RingGuestAddresses {
        RingGuestAddresses {
            desc_table: GuestAddress(desc),
            avail_ring: GuestAddress(avail),
            used_ring: GuestAddress(used),
        }
    }

    #[test]
    fn a_ring_inside_a_region_translates_into_the_agent() {
        let host = ring_host(&REGIONS, 0, 256, &ring(0x10_1000, 0x10_2000, 0x10_3000)).unwrap();
        assert_eq!(host.desc, 0x7e00_0000_1000);
        assert_eq!(host.avail, 0x7e00_0000_2000);
        assert_eq!(host.used, 0x7e00_0000_3000);
        assert_eq!(host.used_gpa, 0x10_3000);
        // A used ring in the last bytes of its region is fine (the vhost
        // crate's own check refuses one that ends at the region's end).
        let used = (0x10_0000 - (6 + 8 * 256)) & !3;
        assert!(ring_host(&REGIONS, 1, 256, &ring(0, 0x1000, used)).is_ok());
        assert!(ring_host(&REGIONS, 1, 256, &ring(0, 0x1000, used + 4)).is_err());
    }

    /// Virtio 1.2 §2.7.2: a device must not write outside the used ring
    /// the driver gave it; here: the kernel never gets a ring address whose
    /// part reaches past the memory it was handed.
    #[test]
    fn a_ring_part_past_guest_memory_or_across_two_regions_is_refused() {
        let past_end = ring(0x1000, 0x2000, 0x20_0000 - 16);
        assert!(matches!(
            ring_host(&REGIONS, 3, 256, &past_end),
            Err(RingCheckError::Outside {
                ring: 3,
                part: "used ring",
                ..
            })
        ));
        // Adjacent in guest memory, but the agent maps the two regions
        // apart: the descriptor table must lie in one of them.
        let across = ring(0x10_0000 - 0x800, 0x2000, 0x3000);
        assert!(matches!(
            ring_host(&REGIONS, 0, 256, &across),
            Err(RingCheckError::Outside {
                part: "descriptor table",
                ..
            })
        ));
        let beyond = ring(0x1000, u64::MAX - 1, 0x3000);
        assert!(matches!(
            ring_host(&REGIONS, 0, 256, &beyond),
            Err(RingCheckError::Outside {
                part: "avail ring",
                ..
            })
        ));
        assert!(matches!(
            ring_host(&[], 0, 256, &ring(0x1000, 0x2000, 0x3000)),
            Err(RingCheckError::Outside { .. })
        ));
    }

    #[test]
    fn misaligned_parts_and_bad_sizes_are_refused() {
        assert!(matches!(
            ring_host(&REGIONS, 0, 256, &ring(0x1008, 0x2000, 0x3000)),
            Err(RingCheckError::Misaligned { align: 16, .. })
        ));
        assert!(matches!(
            ring_host(&REGIONS, 0, 256, &ring(0x1000, 0x2000, 0x3002)),
            Err(RingCheckError::Misaligned { align: 4, .. })
        ));
        for size in [0, 3, 100] {
            assert!(matches!(
                ring_host(&REGIONS, 0, size, &ring(0x1000, 0x2000, 0x3000)),
                Err(RingCheckError::Size { .. })
            ));
        }
    }
}
