//! Memory table and mappings.

use std::fs::File;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::*;

fn memfd(size: u64) -> File {
    let file = tempfile::tempfile().unwrap();
    file.set_len(size).unwrap();
    file
}

fn map_all(table: &mut MemoryTable, map: &mut MemoryMap) {
    for region in table.describe() {
        let fd = table.take_fd(&region.key()).unwrap();
        map.map(&region, fd).unwrap();
    }
    map.publish().unwrap();
}

#[test]
fn a_table_translates_and_its_mappings_serve_guest_memory() {
    let mut table = MemoryTable::default();
    let regions = [
        VhostUserMemoryRegion::new(0, 0x10000, 0x7f00_0000_0000, 0),
        VhostUserMemoryRegion::new(0x100000, 0x10000, 0x7f00_1000_0000, 0),
    ];
    table
        .set(&regions, vec![memfd(0x10000), memfd(0x10000)])
        .unwrap();
    assert_eq!(table.translate(0x7f00_0000_0010), Some(GuestAddress(0x10)));
    assert_eq!(
        table.translate(0x7f00_1000_0020),
        Some(GuestAddress(0x100020))
    );
    assert_eq!(table.translate(0x7f00_0001_0000), None, "one past the end");
    let mut map = MemoryMap::default();
    map_all(&mut table, &mut map);
    let mem = map.atomic().memory();
    mem.write_obj(0x1234u32, GuestAddress(0x100000)).unwrap();
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x100000)).unwrap(), 0x1234);
    assert_eq!(mem.num_regions(), 2);
    assert_eq!(map.describe(), table.describe());
}

#[test]
fn the_same_memory_from_another_process_has_the_same_key() {
    let ram = memfd(0x20000);
    let mut first = MemoryTable::default();
    first
        .set(
            &[VhostUserMemoryRegion::new(
                0,
                0x10000,
                0x7f00_0000_0000,
                0x10000,
            )],
            vec![ram.try_clone().unwrap()],
        )
        .unwrap();
    let mut second = MemoryTable::default();
    second
        .set(
            &[VhostUserMemoryRegion::new(
                0,
                0x10000,
                0x5500_0000_0000,
                0x10000,
            )],
            vec![ram.try_clone().unwrap()],
        )
        .unwrap();
    assert_eq!(first.describe()[0].key(), second.describe()[0].key());
    assert_ne!(
        first.describe()[0].user_addr,
        second.describe()[0].user_addr
    );
    let mut other = MemoryTable::default();
    other
        .set(
            &[VhostUserMemoryRegion::new(0, 0x10000, 0x5500_0000_0000, 0)],
            vec![ram.try_clone().unwrap()],
        )
        .unwrap();
    assert_ne!(
        first.describe()[0].key(),
        other.describe()[0].key(),
        "another offset is another mapping"
    );
}

#[test]
fn add_and_remove_regions() {
    let mut table = MemoryTable::default();
    let region = VhostUserMemoryRegion::new(0x200000, 0x10000, 0x7f00_2000_0000, 0);
    table.add(&region, memfd(0x10000)).unwrap();
    assert_eq!(table.describe().len(), 1);
    let other = VhostUserMemoryRegion::new(0x300000, 0x10000, 0, 0);
    assert!(matches!(
        table.remove(&other),
        Err(MemoryError::NoSuchRegion(0x300000))
    ));
    table.remove(&region).unwrap();
    assert!(table.is_empty());
}

#[test]
fn overlapping_regions_are_refused_and_the_old_table_kept() {
    let mut table = MemoryTable::default();
    table
        .set(
            &[VhostUserMemoryRegion::new(0, 0x10000, 0x1000_0000, 0)],
            vec![memfd(0x10000)],
        )
        .unwrap();
    let guest_overlap = [
        VhostUserMemoryRegion::new(0, 0x10000, 0x2000_0000, 0),
        VhostUserMemoryRegion::new(0x8000, 0x10000, 0x3000_0000, 0),
    ];
    assert!(matches!(
        table.set(&guest_overlap, vec![memfd(0x10000), memfd(0x10000)]),
        Err(MemoryError::Overlap { space: "guest", .. })
    ));
    let user_overlap = [
        VhostUserMemoryRegion::new(0, 0x10000, 0x2000_0000, 0),
        VhostUserMemoryRegion::new(0x100000, 0x10000, 0x2000_8000, 0),
    ];
    assert!(matches!(
        table.set(&user_overlap, vec![memfd(0x10000), memfd(0x10000)]),
        Err(MemoryError::Overlap {
            space: "front-end",
            ..
        })
    ));
    assert_eq!(
        table.translate(0x1000_0000),
        Some(GuestAddress(0)),
        "old table still in place"
    );
}
