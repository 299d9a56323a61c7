//! The test front-end: a QEMU stand-in built on the `vhost` crate's
//! `Frontend`, plus a guest-side split-ring driver over a shared memfd.
//!
//! It lets a test do what no real client will: put hostile descriptor
//! chains on a ring, send raw malformed messages, and look at the used ring
//! byte by byte, against the real agent process.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// virtio-blk request types used by tests.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// virtio-blk write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Status byte values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// I/O error status.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;

/// Guest RAM shared with the back-end through a memfd, mapped at guest
/// physical address 0.
pub struct GuestRam {
    /// The mapping, for reading and writing guest memory.
    pub mem: GuestMemoryMmap,
    file: File,
    size: u64,
}

impl GuestRam {
    /// Allocate `size` bytes of shared guest RAM.
    pub fn new(size: u64) -> GuestRam {
        let name = std::ffi::CString::new("vhost-agent-test-ram").expect("no NUL in name");
        // SAFETY: memfd_create with a valid C string; the returned fd (checked
        // below) is owned by the File we wrap it in.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            fd >= 0,
            "memfd_create failed: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).expect("size the memfd");
        let region = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().expect("dup memfd"), 0),
            size as usize,
        )
        .expect("map guest RAM");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("guest region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        GuestRam { mem, file, size }
    }

    /// Our virtual address of guest physical address `gpa` (what the
    /// front-end tells the back-end in SET_VRING_ADDR).
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("address in guest RAM") as u64
    }

    fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.user_addr(0),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

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
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_free: u16,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl DriverQueue {
    fn new(index: usize, size: u16, base: u64) -> DriverQueue {
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

    fn write_desc(&self, ram: &GuestRam, index: u16, desc: Desc) {
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

    fn publish(&mut self, ram: &GuestRam, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        ram.mem
            .write_obj(head, GuestAddress(self.avail_ring + 4 + 2 * slot))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_ring + 2))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
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
            let used_idx: u16 = ram.mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap();
            if used_idx.wrapping_sub(self.last_used) >= count {
                let mut entries = Vec::new();
                for _ in 0..count {
                    let slot = u64::from(self.last_used % self.size);
                    let at = self.used_ring + 4 + 8 * slot;
                    let id: u32 = ram.mem.read_obj(GuestAddress(at)).unwrap();
                    let len: u32 = ram.mem.read_obj(GuestAddress(at + 4)).unwrap();
                    entries.push((id, len));
                    self.last_used = self.last_used.wrapping_add(1);
                }
                return Some(entries);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let wait_ms = (deadline - now).as_millis().min(100) as i32;
            // SAFETY: one valid pollfd on the stack for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            let _ = self.call.read();
        }
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self, ram: &GuestRam) -> u16 {
        ram.mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap()
    }
}

/// A connected test front-end with its guest RAM and queues.
pub struct TestFrontend {
    /// The vhost-user connection.
    pub frontend: Frontend,
    /// Guest RAM.
    pub ram: GuestRam,
    /// Queues, indexed by queue number.
    pub queues: Vec<DriverQueue>,
    /// Virtio features acked with SET_FEATURES.
    pub features: u64,
}

/// Guest RAM size of a test front-end.
pub const RAM_SIZE: u64 = 16 << 20;
/// Where buffers may go: above the rings (queue `i` uses `i * 64 KiB`).
pub const BUFFER_BASE: u64 = 1 << 20;

impl TestFrontend {
    /// Connect to `socket`, negotiate (without EVENT_IDX, so every used
    /// entry is signalled), and start `num_queues` rings of `queue_size`.
    pub fn connect(socket: &Path, num_queues: usize, queue_size: u16) -> TestFrontend {
        Self::connect_with(
            socket,
            num_queues,
            queue_size,
            VhostUserProtocolFeatures::empty(),
        )
    }

    /// Like [`Self::connect`], also negotiating `extra` protocol features
    /// (e.g. LOG_SHMFD) when the back-end offers them.
    pub fn connect_with(
        socket: &Path,
        num_queues: usize,
        queue_size: u16,
        extra: VhostUserProtocolFeatures,
    ) -> TestFrontend {
        let mut frontend =
            Frontend::connect(socket, num_queues as u64).expect("connect to the agent");
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        let event_idx = 1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        let log_all = 1u64 << 26; // VHOST_F_LOG_ALL: only while migrating
        let features = offered & !event_idx & !log_all;
        frontend.set_features(features).expect("SET_FEATURES");
        let protocol = frontend
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | extra;
        frontend
            .set_protocol_features(protocol & wanted)
            .expect("SET_PROTOCOL_FEATURES");
        let ram = GuestRam::new(RAM_SIZE);
        frontend
            .set_mem_table(&[ram.region_info()])
            .expect("SET_MEM_TABLE");
        let mut queues = Vec::new();
        for index in 0..num_queues {
            let queue = DriverQueue::new(index, queue_size, (index as u64) * 0x1_0000);
            frontend
                .set_vring_num(index, queue_size)
                .expect("SET_VRING_NUM");
            let config = VringConfigData {
                queue_max_size: queue_size,
                queue_size,
                flags: 0,
                desc_table_addr: ram.user_addr(queue.desc_table),
                used_ring_addr: ram.user_addr(queue.used_ring),
                avail_ring_addr: ram.user_addr(queue.avail_ring),
                log_addr: None,
            };
            frontend
                .set_vring_addr(index, &config)
                .expect("SET_VRING_ADDR");
            frontend.set_vring_base(index, 0).expect("SET_VRING_BASE");
            frontend
                .set_vring_call(index, &queue.call)
                .expect("SET_VRING_CALL");
            frontend
                .set_vring_kick(index, &queue.kick)
                .expect("SET_VRING_KICK");
            frontend
                .set_vring_enable(index, true)
                .expect("SET_VRING_ENABLE");
            queues.push(queue);
        }
        TestFrontend {
            frontend,
            ram,
            queues,
            features,
        }
    }

    /// Buffer area `slot` (64 KiB each) above the rings: (header, data, status).
    pub fn buffers(slot: u64) -> (u64, u64, u64) {
        let base = BUFFER_BASE + slot * 0x1_0000;
        (base, base + 0x1000, base + 0xf000)
    }

    /// Write a virtio-blk request header at `addr`.
    pub fn write_header(&self, addr: u64, request_type: u32, sector: u64) {
        self.ram
            .mem
            .write_obj(request_type, GuestAddress(addr))
            .unwrap();
        self.ram
            .mem
            .write_obj(0u32, GuestAddress(addr + 4))
            .unwrap();
        self.ram
            .mem
            .write_obj(sector, GuestAddress(addr + 8))
            .unwrap();
    }

    /// Submit one well-formed request on `queue` using buffer `slot` and
    /// wait for it; returns the status byte. Write data must already be in
    /// the data buffer.
    pub fn request(
        &mut self,
        queue: usize,
        slot: u64,
        request_type: u32,
        sector: u64,
        len: u32,
    ) -> Option<u8> {
        let (header, data, status) = Self::buffers(slot);
        self.write_header(header, request_type, sector);
        self.ram
            .mem
            .write_obj(0xffu8, GuestAddress(status))
            .unwrap();
        let data_desc = if request_type == VIRTIO_BLK_T_OUT {
            Desc::readable(data, len)
        } else {
            Desc::writable(data, len)
        };
        let descs = [
            Desc::readable(header, 16),
            data_desc,
            Desc::writable(status, 1),
        ];
        let q = &mut self.queues[queue];
        q.add_chain(&self.ram, &descs);
        q.kick();
        q.wait_used(&self.ram, 1, Duration::from_secs(5))?;
        Some(self.ram.mem.read_obj(GuestAddress(status)).unwrap())
    }

    /// Read and write a test pattern at `sector` through `queue`; true if
    /// both succeed and the data matches.
    pub fn round_trip(&mut self, queue: usize, slot: u64, sector: u64) -> bool {
        let (_, data, _) = Self::buffers(slot);
        let pattern: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8) ^ (sector as u8) ^ (queue as u8))
            .collect();
        self.ram
            .mem
            .write_slice(&pattern, GuestAddress(data))
            .unwrap();
        if self.request(queue, slot, VIRTIO_BLK_T_OUT, sector, 4096) != Some(VIRTIO_BLK_S_OK) {
            return false;
        }
        self.ram
            .mem
            .write_slice(&[0u8; 4096], GuestAddress(data))
            .unwrap();
        if self.request(queue, slot, VIRTIO_BLK_T_IN, sector, 4096) != Some(VIRTIO_BLK_S_OK) {
            return false;
        }
        let mut back = vec![0u8; 4096];
        self.ram
            .mem
            .read_slice(&mut back, GuestAddress(data))
            .unwrap();
        back == pattern
    }
}
