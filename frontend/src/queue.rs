//! The driver side of a split virtqueue in guest RAM: descriptors, the
//! avail ring the driver fills, the used ring it reads, and the kick and
//! call eventfds.

use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestRam;

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// VRING_DESC_F_* flags (NEXT is set by `add_chain`).
    pub flags: u16,
    /// Next index (only used by `add_raw`).
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE as u16,
            next: 0,
        }
    }
}

/// The driver side of one split virtqueue.
pub struct DriverQueue {
    /// Queue index.
    pub index: usize,
    pub(crate) size: u16,
    pub(crate) desc_table: u64,
    pub(crate) avail_ring: u64,
    pub(crate) used_ring: u64,
    pub(crate) next_free: u16,
    pub(crate) avail_idx: u16,
    pub(crate) last_used: u16,
    pub(crate) kick: EventFd,
    pub(crate) call: EventFd,
}

impl DriverQueue {
    /// The ring's descriptor table, avail ring and used ring (guest
    /// physical addresses).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc_table, self.avail_ring, self.used_ring)
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    pub(crate) fn new(index: usize, size: u16, base: u64) -> DriverQueue {
        let desc_table = base;
        let avail_ring = desc_table + 16 * u64::from(size);
        let used_ring = (avail_ring + 6 + 2 * u64::from(size) + 3) & !3;
        DriverQueue {
            index,
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_free: 0,
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    pub(crate) fn write_desc(&self, ram: &GuestRam, index: u16, desc: Desc) {
        let at = GuestAddress(self.desc_table + 16 * u64::from(index));
        ram.mem.write_obj(desc.addr, at).unwrap();
        ram.mem.write_obj(desc.len, GuestAddress(at.0 + 8)).unwrap();
        ram.mem
            .write_obj(desc.flags, GuestAddress(at.0 + 12))
            .unwrap();
        ram.mem
            .write_obj(desc.next, GuestAddress(at.0 + 14))
            .unwrap();
    }

    /// The same queue of the same guest, for a front-end on another
    /// connection (migration destination, reconnect): same rings and
    /// indices, new kick and call eventfds.
    pub(crate) fn continued(&self) -> DriverQueue {
        DriverQueue {
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
            ..*self
        }
    }

    /// Take the driver's place in the ring from `other`, the same queue
    /// on another connection (what [`Self::continued`] copied, again).
    pub(crate) fn take_place(&mut self, other: &DriverQueue) {
        self.next_free = other.next_free;
        self.avail_idx = other.avail_idx;
        self.last_used = other.last_used;
    }

    /// Write `head` into the next avail slot without publishing it.
    pub(crate) fn place(&mut self, ram: &GuestRam, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        ram.mem
            .write_obj(head, GuestAddress(self.avail_ring + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Make every placed head visible: write avail->idx once.
    pub(crate) fn publish_avail(&self, ram: &GuestRam) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ram.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_ring + 2))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn publish(&mut self, ram: &GuestRam, head: u16) {
        self.place(ram, head);
        self.publish_avail(ram);
    }

    /// Write `descs` as an indirect table at guest address `table` (NEXT
    /// linking done here), put one INDIRECT descriptor for it in the ring
    /// and place it in the avail ring, unpublished. Returns the head.
    pub(crate) fn place_indirect(&mut self, ram: &GuestRam, table: u64, descs: &[Desc]) -> u16 {
        for (i, desc) in descs.iter().enumerate() {
            let mut desc = *desc;
            if i + 1 < descs.len() {
                desc.flags |= VRING_DESC_F_NEXT as u16;
                desc.next = i as u16 + 1;
            }
            let at = table + 16 * i as u64;
            ram.mem.write_obj(desc.addr, GuestAddress(at)).unwrap();
            ram.mem.write_obj(desc.len, GuestAddress(at + 8)).unwrap();
            ram.mem
                .write_obj(desc.flags, GuestAddress(at + 12))
                .unwrap();
            ram.mem.write_obj(desc.next, GuestAddress(at + 14)).unwrap();
        }
        let head = self.next_free;
        let table_desc = Desc {
            addr: table,
            len: 16 * descs.len() as u32,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        };
        self.write_desc(ram, head, table_desc);
        self.next_free = (head + 1) % self.size;
        self.place(ram, head);
        head
    }

    /// Put `descs` on the ring as an indirect table at guest address
    /// `table` and publish it; returns the head.
    pub fn add_indirect(&mut self, ram: &GuestRam, table: u64, descs: &[Desc]) -> u16 {
        let head = self.place_indirect(ram, table, descs);
        self.publish_avail(ram);
        head
    }

    /// Put a chain of consecutive descriptors on the ring (NEXT linking is
    /// done here) and return its head. The caller keeps at most `size`
    /// descriptors outstanding.
    pub fn add_chain(&mut self, ram: &GuestRam, descs: &[Desc]) -> u16 {
        let head = self.next_free;
        for (i, desc) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut desc = *desc;
            if i + 1 < descs.len() {
                desc.flags |= VRING_DESC_F_NEXT as u16;
                desc.next = (index + 1) % self.size;
            }
            self.write_desc(ram, index, desc);
        }
        self.next_free = (head + descs.len() as u16) % self.size;
        self.publish(ram, head);
        head
    }

    /// Write `descs` verbatim at descriptor indices `0..` (flags and next
    /// as given, for hostile chains) and publish `head`.
    pub fn add_raw(&mut self, ram: &GuestRam, descs: &[Desc], head: u16) {
        for (i, desc) in descs.iter().enumerate() {
            self.write_desc(ram, i as u16, *desc);
        }
        self.publish(ram, head);
    }

    /// Write the avail ring's index as the driver would, without placing
    /// any head (a hostile driver's runaway index).
    pub fn set_avail_idx(&mut self, ram: &GuestRam, idx: u16) {
        self.avail_idx = idx;
        self.publish_avail(ram);
    }

    /// The avail index the driver last published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Notify the device.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    /// Wait until `count` new used entries appear; returns (id, len) for
    /// each, or None on timeout.
    pub fn wait_used(
        &mut self,
        ram: &GuestRam,
        count: u16,
        timeout: Duration,
    ) -> Option<Vec<(u32, u32)>> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pending_used(ram) >= count {
                return Some(self.take_entries(ram, count));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.wait_call((deadline - now).min(Duration::from_millis(100)));
        }
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self, ram: &GuestRam) -> u16 {
        ram.mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap()
    }

    /// Used entries the device published that the driver has not taken.
    pub fn pending_used(&self, ram: &GuestRam) -> u16 {
        self.used_idx(ram).wrapping_sub(self.last_used)
    }

    /// Take every used entry published so far; (id, len) for each.
    pub fn take_used(&mut self, ram: &GuestRam) -> Vec<(u32, u32)> {
        let pending = self.pending_used(ram);
        self.take_entries(ram, pending)
    }

    /// Take the next `count` used entries (the caller checked they are
    /// published); (id, len) for each.
    fn take_entries(&mut self, ram: &GuestRam, count: u16) -> Vec<(u32, u32)> {
        let mut entries = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let slot = u64::from(self.last_used % self.size);
            let at = self.used_ring + 4 + 8 * slot;
            let id: u32 = ram.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = ram.mem.read_obj(GuestAddress(at + 4)).unwrap();
            entries.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        entries
    }

    /// Take used entries until `count` have come or `timeout` passes
    /// (sleeping on the call eventfd); returns what came, maybe fewer.
    pub fn collect_used(
        &mut self,
        ram: &GuestRam,
        count: usize,
        timeout: Duration,
    ) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut entries = Vec::new();
        loop {
            entries.extend(self.take_used(ram));
            let now = Instant::now();
            if entries.len() >= count || now >= deadline {
                return entries;
            }
            self.wait_call((deadline - now).min(Duration::from_millis(10)));
        }
    }

    /// Wait up to `timeout` for the device's interrupt, and consume it.
    pub fn wait_call(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        let _ = self.call.read();
    }
}
