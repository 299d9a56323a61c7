//! The driver side of a split virtqueue in memory of our own, for the
//! lab's front-end: one descriptor per buffer (descriptor `i` is always
//! buffer slot `i`), avail entries published with a release store of the
//! index, used entries reaped in order. And the test frames it sends: each
//! one names its queue pair and sequence number and has a length and
//! payload derived from them, so the receiver can check every byte.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

#[cfg(test)]
use vm_memory::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// VIRTQ_DESC_F_WRITE.
const DESC_F_WRITE: u16 = 2;
/// VIRTQ_USED_F_NO_NOTIFY.
const USED_F_NO_NOTIFY: u16 = 1;
/// Page size used to lay the rings out.
pub const PAGE: u64 = 4096;

/// A split ring's three areas, laid out from `base`: the descriptor table,
/// then the avail ring, then (page-aligned) the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table IOVA.
    pub desc: GuestAddress,
    /// Avail ring IOVA.
    pub avail: GuestAddress,
    /// Used ring IOVA.
    pub used: GuestAddress,
    /// Bytes from `base` to the end of the used ring, page-aligned.
    pub len: u64,
}

impl RingLayout {
    /// The layout of a ring of `size` entries at page-aligned `base`.
    pub fn new(base: GuestAddress, size: u16) -> RingLayout {
        let n = u64::from(size);
        let desc = base;
        let avail = base.unchecked_add(16 * n);
        let avail_end = avail.raw_value() + 6 + 2 * n;
        let used = GuestAddress(avail_end.next_multiple_of(PAGE));
        let used_end = used.raw_value() + 6 + 8 * n;
        RingLayout {
            desc,
            avail,
            used,
            len: used_end.next_multiple_of(PAGE) - base.raw_value(),
        }
    }
}

/// One virtqueue, driver side.
pub struct DriverRing {
    /// Virtqueue index.
    pub index: u32,
    size: u16,
    layout: RingLayout,
    avail_idx: Wrapping<u16>,
    /// The avail index at the last publish (for the kick decision).
    published: Wrapping<u16>,
    last_used: Wrapping<u16>,
    /// VIRTIO_RING_F_EVENT_IDX: kicks follow the device's avail_event,
    /// interrupts our used_event.
    event_idx: bool,
}

impl DriverRing {
    /// A ring of `size` entries laid out as `layout`, zeroed in `mem`,
    /// with `event_idx` notification suppression or without.
    pub fn new<M: GuestMemory>(
        mem: &M,
        index: u32,
        size: u16,
        layout: RingLayout,
        event_idx: bool,
    ) -> Result<DriverRing, GuestMemoryError> {
        let zeros = vec![0u8; layout.len as usize];
        mem.write_slice(&zeros, layout.desc)?;
        Ok(DriverRing {
            index,
            size,
            layout,
            avail_idx: Wrapping(0),
            published: Wrapping(0),
            last_used: Wrapping(0),
            event_idx,
        })
    }

    /// The ring's addresses.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The avail index published so far (what the device will have taken
    /// once it caught up).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx.0
    }

    /// Put buffer `slot` (`len` bytes at `addr`, device-writable or not)
    /// on the avail ring; visible once [`Self::publish`]ed.
    pub fn post<M: GuestMemory>(
        &mut self,
        mem: &M,
        slot: u16,
        addr: GuestAddress,
        len: u32,
        writable: bool,
    ) -> Result<(), GuestMemoryError> {
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&addr.raw_value().to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        let flags = if writable { DESC_F_WRITE } else { 0 };
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        let slot = slot % self.size;
        mem.write_slice(&desc, self.layout.desc.unchecked_add(16 * u64::from(slot)))?;
        let entry = self.avail_idx.0 % self.size;
        let at = self.layout.avail.unchecked_add(4 + 2 * u64::from(entry));
        mem.write_obj(slot.to_le(), at)?;
        self.avail_idx += Wrapping(1);
        Ok(())
    }

    /// Make posted buffers visible (the descriptors and entries before the
    /// index) and say whether the device wants a kick for them: with
    /// EVENT_IDX if the new entries pass its avail_event, without unless it
    /// set NO_NOTIFY.
    pub fn publish<M: GuestMemory>(&mut self, mem: &M) -> Result<bool, GuestMemoryError> {
        fence(Ordering::Release);
        mem.store(
            self.avail_idx.0.to_le(),
            self.layout.avail.unchecked_add(2),
            Ordering::Release,
        )?;
        let old = std::mem::replace(&mut self.published, self.avail_idx);
        let new = self.avail_idx;
        if new == old {
            return Ok(false);
        }
        // Our index store must be visible before we read the device's
        // suppression (the device does the mirror image).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let at = self.layout.used.unchecked_add(4 + 8 * u64::from(self.size));
            let event = Wrapping(u16::from_le(mem.load::<u16>(at, Ordering::Acquire)?));
            Ok(new - event - Wrapping(1) < new - old)
        } else {
            let flags = u16::from_le(mem.load::<u16>(self.layout.used, Ordering::Acquire)?);
            Ok(flags & USED_F_NO_NOTIFY == 0)
        }
    }

    /// The next used entry: (buffer slot, bytes written), or None.
    pub fn pop_used<M: GuestMemory>(
        &mut self,
        mem: &M,
    ) -> Result<Option<(u16, u32)>, GuestMemoryError> {
        let used_at = self.layout.used.unchecked_add(2);
        let mut used_idx = u16::from_le(mem.load::<u16>(used_at, Ordering::Acquire)?);
        if used_idx == self.last_used.0 && self.event_idx {
            // Ask for an interrupt at the next used entry, then look again:
            // one published before the device saw our used_event would
            // otherwise come without an interrupt.
            let at = self
                .layout
                .avail
                .unchecked_add(4 + 2 * u64::from(self.size));
            mem.store(self.last_used.0.to_le(), at, Ordering::Release)?;
            fence(Ordering::SeqCst);
            used_idx = u16::from_le(mem.load::<u16>(used_at, Ordering::Acquire)?);
        }
        if used_idx == self.last_used.0 {
            return Ok(None);
        }
        let entry = self.last_used.0 % self.size;
        let at = self.layout.used.unchecked_add(4 + 8 * u64::from(entry));
        let id = u32::from_le(mem.read_obj::<u32>(at)?);
        let len = u32::from_le(mem.read_obj::<u32>(at.unchecked_add(4))?);
        self.last_used += Wrapping(1);
        // A device naming a slot beyond the ring is caught by the caller's
        // frame check (the slot is reduced into range here).
        Ok(Some(((id % u32::from(self.size)) as u16, len)))
    }
}

/// The ethertype of test frames (IEEE local experimental).
pub const TEST_ETHERTYPE: u16 = 0x88b5;

/// Test frame `seq` of queue pair `pair` to `dst`: 60 to 1514 bytes, the
/// pair and sequence number after the Ethernet header, then a pattern of
/// both.
pub fn test_frame(pair: u16, seq: u64, dst: [u8; 6]) -> Vec<u8> {
    let len = 60 + (seq.wrapping_mul(37) % 1455) as usize;
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&[0x02, 0, 0, 0, (pair >> 8) as u8, pair as u8]);
    frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(&pair.to_be_bytes());
    frame.extend_from_slice(&seq.to_be_bytes());
    let mut i = frame.len();
    while frame.len() < len {
        frame.push((i as u64).wrapping_add(seq).wrapping_mul(31) as u8 ^ pair as u8);
        i += 1;
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_of_256_takes_three_pages() {
        let l = RingLayout::new(GuestAddress(0x10000), 256);
        assert_eq!(l.avail, GuestAddress(0x11000));
        assert_eq!(l.used, GuestAddress(0x12000));
        assert_eq!(l.len, 3 * PAGE);
    }

    #[test]
    fn test_frames_differ_by_pair_and_sequence() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let a = test_frame(0, 7, mac);
        assert!(a.len() >= 60 && a.len() <= 1514);
        assert_eq!(&a[..6], &mac);
        assert_eq!(&a[12..14], &TEST_ETHERTYPE.to_be_bytes());
        assert_ne!(a, test_frame(1, 7, mac));
        assert_ne!(a, test_frame(0, 8, mac));
        assert!((0..2000).all(|s| test_frame(3, s, mac).len() <= 1514));
    }

    #[test]
    fn posted_buffers_come_back_through_the_used_ring() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10000), 0x10000)]).unwrap();
        let layout = RingLayout::new(GuestAddress(0x10000), 8);
        let mut ring = DriverRing::new(&mem, 0, 8, layout, false).unwrap();
        ring.post(&mem, 3, GuestAddress(0x18000), 100, true)
            .unwrap();
        assert!(ring.publish(&mem).unwrap(), "no NO_NOTIFY: kick");
        assert!(!ring.publish(&mem).unwrap(), "nothing new: no kick");
        assert_eq!(
            u16::from_le(mem.read_obj::<u16>(layout.avail.unchecked_add(2)).unwrap()),
            1
        );
        assert_eq!(
            u16::from_le(mem.read_obj::<u16>(layout.avail.unchecked_add(4)).unwrap()),
            3
        );
        assert_eq!(ring.pop_used(&mem).unwrap(), None);
        // The device uses slot 3 with 42 bytes.
        mem.write_obj(3u32.to_le(), layout.used.unchecked_add(4))
            .unwrap();
        mem.write_obj(42u32.to_le(), layout.used.unchecked_add(8))
            .unwrap();
        mem.write_obj(1u16.to_le(), layout.used.unchecked_add(2))
            .unwrap();
        assert_eq!(ring.pop_used(&mem).unwrap(), Some((3, 42)));
        assert_eq!(ring.pop_used(&mem).unwrap(), None);
    }
}
