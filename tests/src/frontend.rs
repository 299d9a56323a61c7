//! The test front-end: a QEMU stand-in built on the `vhost` crate's
//! `Frontend`, plus a guest-side split-ring driver over a shared memfd.
//!
//! It lets a test do what no real client will: put hostile descriptor
//! chains on a ring, send raw malformed messages, and look at the used ring
//! byte by byte, against the real agent process.
//!
//! It can also play both QEMUs of a live migration on one host: start a
//! device with an inflight region (GET_INFLIGHT_FD + SET_INFLIGHT_FD), put
//! many requests on a ring at once, stop the source the way QEMU does
//! (SET_VRING_ENABLE(0), then GET_VRING_BASE or the raw request 45), copy the
//! region as QEMU migrates it, and start a destination front-end on a second
//! back-end over the SAME guest RAM (both agents map one memfd, so the rings
//! and buffers stay where they are) with SET_INFLIGHT_FD and no GET.

pub mod inflight;
pub mod presetup;
pub mod raw;

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::inflight::InflightRegion;
use self::raw::RawMessage;

/// virtio-blk request types used by tests.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// virtio-blk write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Status byte values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// I/O error status.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// What the front-end writes into a status byte before submitting, so a
/// status the device never wrote is visible.
pub const STATUS_UNSET: u8 = 0xff;

/// Protocol feature INFLIGHT_SHMFD (bit 12): GET/SET_INFLIGHT_FD.
pub const PROTOCOL_F_INFLIGHT_SHMFD: u64 = 1 << 12;
/// Protocol feature GET_VRING_BASE_INFLIGHT (bit 20): GET_VRING_BASE may
/// suspend in-flight requests into the inflight region instead of draining.
pub const PROTOCOL_F_GET_VRING_BASE_INFLIGHT: u64 = 1 << 20;
/// Protocol feature GET_VRING_BASE_SKIP_DRAIN (bit 23): request 11 drains
/// again and request 45 suspends. The `vhost` crate does not know it.
pub const PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN: u64 = 1 << 23;
/// What a QEMU with `inflight-migration=on` acks (bits 12 and 20).
pub const PROTOCOL_SUSPEND: u64 = PROTOCOL_F_INFLIGHT_SHMFD | PROTOCOL_F_GET_VRING_BASE_INFLIGHT;

/// How long any reply on the connection may take before the test fails
/// (instead of hanging on a stuck back-end).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A memfd of `size` bytes named `name`; `sealing` allows F_ADD_SEALS.
fn memfd(name: &str, size: u64, sealing: bool) -> File {
    let name = std::ffi::CString::new(name).expect("no NUL in name");
    let flags = libc::MFD_CLOEXEC | if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create with a valid C string; the returned fd (checked
    // below) is owned by the File we wrap it in.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    assert!(
        fd >= 0,
        "memfd_create failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("size the memfd");
    file
}

/// A memfd of `size` bytes sealed against shrinking and growing, the way
/// QEMU's `qemu_memfd_alloc(F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)`
/// makes its dirty log and its migrated inflight region: the agent refuses
/// a log or an inflight region that is not sealed.
pub fn sealed_memfd(name: &str, size: u64) -> File {
    let file = memfd(name, size, true);
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on a memfd we own, with an integer
    // argument; no memory is passed.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(rc, 0, "seal: {}", std::io::Error::last_os_error());
    file
}

/// Poll `condition` every millisecond until it holds (true) or `timeout`
/// passes (false). For state that has no event to wait on, such as the
/// inflight region.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

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
        let file = memfd("vhost-agent-test-ram", size, false);
        let region = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().expect("dup memfd"), 0),
            size as usize,
        )
        .expect("map guest RAM");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("guest region");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        GuestRam { mem, file, size }
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd behind it (unsealed, like file-backed RAM): a hostile
    /// front-end can truncate it under the back-end's mapping.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Our virtual address of guest physical address `gpa` (what the
    /// front-end tells the back-end in SET_VRING_ADDR).
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("address in guest RAM") as u64
    }

    /// A copy of all of guest RAM, to prove later that nobody wrote to it.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.size as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(0))
            .expect("read guest RAM");
        bytes
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
    /// The ring's descriptor table, avail ring and used ring (guest
    /// physical addresses).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc_table, self.avail_ring, self.used_ring)
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.size
    }

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

    /// The same queue of the same guest, for a front-end on another
    /// connection (migration destination, reconnect): same rings and
    /// indices, new kick and call eventfds.
    fn continued(&self) -> DriverQueue {
        DriverQueue {
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
            ..*self
        }
    }

    /// Write `head` into the next avail slot without publishing it.
    fn place(&mut self, ram: &GuestRam, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        ram.mem
            .write_obj(head, GuestAddress(self.avail_ring + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Make every placed head visible: write avail->idx once.
    fn publish_avail(&self, ram: &GuestRam) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ram.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_ring + 2))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    fn publish(&mut self, ram: &GuestRam, head: u16) {
        self.place(ram, head);
        self.publish_avail(ram);
    }

    /// Write `descs` as an indirect table at guest address `table` (NEXT
    /// linking done here), put one INDIRECT descriptor for it in the ring
    /// and place it in the avail ring, unpublished. Returns the head.
    fn place_indirect(&mut self, ram: &GuestRam, table: u64, descs: &[Desc]) -> u16 {
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
    fn wait_call(&self, timeout: Duration) {
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

/// A connected test front-end with its guest RAM and queues.
pub struct TestFrontend {
    /// The vhost-user connection.
    pub frontend: Frontend,
    /// Guest RAM (shared with a migration destination's front-end).
    pub ram: Arc<GuestRam>,
    /// Queues, indexed by queue number.
    pub queues: Vec<DriverQueue>,
    /// Virtio features acked with SET_FEATURES.
    pub features: u64,
    /// Every protocol feature bit the back-end offered (the `vhost` crate's
    /// own view drops the bits it does not know, such as 23).
    pub offered_protocol: u64,
    /// Protocol features acked with SET_PROTOCOL_FEATURES.
    pub protocol: u64,
    /// The inflight region the back-end was given, if any.
    pub inflight: Option<InflightRegion>,
    /// A clone of the connection for raw messages.
    stream: UnixStream,
}

/// Guest RAM size of a test front-end unless [`StartOptions::ram_size`]
/// says otherwise.
pub const RAM_SIZE: u64 = 16 << 20;
/// Where buffers may go: above the rings (queue `i` uses `i * 64 KiB`).
pub const BUFFER_BASE: u64 = 1 << 20;
/// Buffer slots that fit in guest RAM (64 KiB each, from BUFFER_BASE).
pub const SLOTS: u64 = (RAM_SIZE - BUFFER_BASE) / 0x1_0000;
/// Where in a slot [`TestFrontend::submit`] puts the indirect table.
const INDIRECT_TABLE_OFFSET: u64 = 0x100;

/// How a test front-end connects and starts the device.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// Queues to start.
    pub num_queues: usize,
    /// Size of every queue.
    pub queue_size: u16,
    /// Protocol features to ack besides MQ, REPLY_ACK and CONFIG (raw bits,
    /// so bit 23 fits), when the back-end offers them.
    pub protocol: u64,
    /// Fail the test if the back-end does not offer all of `protocol`.
    pub require_protocol: bool,
    /// Start with GET_INFLIGHT_FD + SET_INFLIGHT_FD, like QEMU's
    /// vhost-user-blk when INFLIGHT_SHMFD is negotiated.
    pub get_inflight: bool,
    /// Virtqueues per unit of GET_QUEUE_NUM: 1 for block (queues), 2 for
    /// net (queue pairs, as QEMU and DPDK read it).
    pub queues_per_unit: usize,
    /// Guest RAM of a fresh front-end, in bytes (a sparse memfd, so a
    /// large guest costs only what is touched); [`RAM_SIZE`] by default.
    pub ram_size: u64,
}

impl StartOptions {
    /// MQ, REPLY_ACK and CONFIG only; no inflight region.
    pub fn plain(num_queues: usize, queue_size: u16) -> StartOptions {
        StartOptions {
            num_queues,
            queue_size,
            protocol: 0,
            require_protocol: false,
            get_inflight: false,
            queues_per_unit: 1,
            ram_size: RAM_SIZE,
        }
    }

    /// Also ack `protocol` (which the back-end must offer) and, if it
    /// holds INFLIGHT_SHMFD, start with a fresh inflight region.
    pub fn with_protocol(num_queues: usize, queue_size: u16, protocol: u64) -> StartOptions {
        StartOptions {
            num_queues,
            queue_size,
            protocol,
            require_protocol: true,
            queues_per_unit: 1,
            get_inflight: protocol & PROTOCOL_F_INFLIGHT_SHMFD != 0,
            ram_size: RAM_SIZE,
        }
    }
}

/// Where the inflight region of [`TestFrontend::start_device`] comes from.
pub enum Inflight {
    /// No region (INFLIGHT_SHMFD not used).
    None,
    /// GET_INFLIGHT_FD, then SET_INFLIGHT_FD with what came back.
    Get,
    /// SET_INFLIGHT_FD with this region and no GET (reconnect, migration
    /// destination).
    Set(InflightRegion),
}

/// Which request stops a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// GET_VRING_BASE (11), through the `vhost` crate.
    GetVringBase,
    /// GET_VRING_BASE_SKIP_DRAIN (45), written raw.
    SkipDrain,
}

/// What a stop returned.
#[derive(Clone, Debug)]
pub struct Stopped {
    /// Per queue: the next avail index the back-end reported.
    pub bases: Vec<u16>,
    /// Per queue: from sending the stop request to its reply.
    pub reply_times: Vec<Duration>,
}

/// One virtio-blk read or write for [`TestFrontend::submit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    /// VIRTIO_BLK_T_IN or VIRTIO_BLK_T_OUT.
    pub request_type: u32,
    /// First sector (512 bytes).
    pub sector: u64,
    /// Data length in bytes (at most 52 KiB, the slot's data area).
    pub len: u32,
    /// Buffer slot (see [`TestFrontend::buffers`]); distinct per request
    /// in flight.
    pub slot: u64,
}

impl BlkRequest {
    /// A read of `len` bytes at `sector` into slot `slot`.
    pub fn read(slot: u64, sector: u64, len: u32) -> BlkRequest {
        BlkRequest {
            request_type: VIRTIO_BLK_T_IN,
            sector,
            len,
            slot,
        }
    }

    /// A write of slot `slot`'s first `len` data bytes to `sector`.
    pub fn write(slot: u64, sector: u64, len: u32) -> BlkRequest {
        BlkRequest {
            request_type: VIRTIO_BLK_T_OUT,
            sector,
            len,
            slot,
        }
    }

    /// Whether the device reads guest memory for it (a write).
    pub fn is_write(&self) -> bool {
        self.request_type == VIRTIO_BLK_T_OUT
    }
}

/// A request on a ring and the head the device will report it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// Queue index.
    pub queue: usize,
    /// Head descriptor index (the used-ring id).
    pub head: u16,
    /// The request.
    pub request: BlkRequest,
}

/// Connect to `socket`, retrying for up to 5 s while nobody listens yet
/// (a restarted back-end replacing its stale socket).
fn connect_stream(socket: &Path) -> UnixStream {
    let mut retries = 50;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return stream,
            Err(e)
                if retries > 0
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
            {
                retries -= 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("connect to {}: {e}", socket.display()),
        }
    }
}

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
        let mut options = StartOptions::plain(num_queues, queue_size);
        options.protocol = extra.bits();
        Self::start(socket, &options)
    }

    /// Connect, negotiate and start the device with fresh guest RAM and
    /// every ring at index 0.
    pub fn start(socket: &Path, options: &StartOptions) -> TestFrontend {
        let mut frontend = Self::negotiate(socket, options);
        let inflight = if options.get_inflight {
            Inflight::Get
        } else {
            Inflight::None
        };
        frontend.start_device(inflight, &vec![0; options.num_queues]);
        frontend
    }

    /// Start the device of `guest` (its RAM, its rings, where its driver
    /// stands) on the back-end at `socket`, from `region` without a
    /// GET_INFLIGHT_FD and with SET_VRING_BASE `bases`: a migration
    /// destination (`region` = the source's region migrated, `bases` = what
    /// the source's stop returned) or a reconnect after a back-end crash
    /// (`region` = the same memfd, `bases` = the used indices).
    pub fn resume(
        socket: &Path,
        options: &StartOptions,
        guest: &TestFrontend,
        region: InflightRegion,
        bases: &[u16],
    ) -> TestFrontend {
        let queues = guest.queues.iter().map(DriverQueue::continued).collect();
        let mut frontend = Self::negotiate_for(socket, options, guest.ram.clone(), queues);
        frontend.start_device(Inflight::Set(region), bases);
        frontend
    }

    /// Connect and negotiate only (SET_OWNER, GET_FEATURES,
    /// GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM), with fresh guest RAM;
    /// [`Self::start_device`] does the rest.
    pub fn negotiate(socket: &Path, options: &StartOptions) -> TestFrontend {
        let ram = Arc::new(GuestRam::new(options.ram_size));
        let queues = (0..options.num_queues)
            .map(|index| DriverQueue::new(index, options.queue_size, index as u64 * 0x1_0000))
            .collect();
        Self::negotiate_for(socket, options, ram, queues)
    }

    fn negotiate_for(
        socket: &Path,
        options: &StartOptions,
        ram: Arc<GuestRam>,
        queues: Vec<DriverQueue>,
    ) -> TestFrontend {
        let stream = connect_stream(socket);
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("reply timeout on the connection");
        let raw_stream = stream.try_clone().expect("clone the connection");
        let mut frontend = Frontend::from_stream(stream, options.num_queues as u64);
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        let event_idx = 1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        let log_all = 1u64 << 26; // VHOST_F_LOG_ALL: only while migrating
        let features = offered & !event_idx & !log_all;

        let reply = raw_exchange(&raw_stream, raw::GET_PROTOCOL_FEATURES, &[]);
        let offered_protocol = reply.u64().expect("GET_PROTOCOL_FEATURES reply is a u64");
        if options.require_protocol {
            let missing = options.protocol & !offered_protocol;
            assert!(
                missing == 0,
                "the back-end does not offer protocol features {missing:#x} \
                 (offered {offered_protocol:#x})"
            );
        }
        let wanted = (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG)
            .bits()
            | options.protocol;
        let protocol = offered_protocol & wanted;
        frontend
            .set_protocol_features(VhostUserProtocolFeatures::from_bits_retain(protocol))
            .expect("SET_PROTOCOL_FEATURES");
        if protocol & VhostUserProtocolFeatures::MQ.bits() != 0 {
            // Raw, because the crate's front-end takes the answer as its
            // queue limit, which is wrong for net (the answer counts pairs).
            let queue_num = raw_exchange(&raw_stream, raw::GET_QUEUE_NUM, &[])
                .u64()
                .expect("GET_QUEUE_NUM reply is a u64");
            assert!(
                queue_num * options.queues_per_unit as u64 >= options.num_queues as u64,
                "the back-end has {queue_num} queues, the test wants {}",
                options.num_queues
            );
        }
        TestFrontend {
            frontend,
            ram,
            queues,
            features,
            offered_protocol,
            protocol,
            inflight: None,
            stream: raw_stream,
        }
    }

    /// Start the device in QEMU's order (vhost_user_blk_start and
    /// vhost_dev_start): SET_FEATURES, GET_INFLIGHT_FD (if asked), SET_INFLIGHT_FD (if any),
    /// SET_VRING_CALL per ring, SET_MEM_TABLE, per ring SET_VRING_NUM /
    /// BASE (`bases[i]`) / ADDR / KICK, then SET_VRING_ENABLE(1) per ring;
    /// then one round trip so the back-end has applied all of it.
    pub fn start_device(&mut self, inflight: Inflight, bases: &[u16]) {
        assert_eq!(bases.len(), self.queues.len(), "one base per queue");
        self.frontend
            .set_features(self.features)
            .expect("SET_FEATURES");
        let region = match inflight {
            Inflight::None => None,
            Inflight::Get => Some(self.get_inflight_fd()),
            Inflight::Set(region) => Some(region),
        };
        if let Some(region) = &region {
            self.frontend
                .set_inflight_fd(&region.message(), region.fd())
                .expect("SET_INFLIGHT_FD");
        }
        self.inflight = region;
        for queue in &self.queues {
            self.frontend
                .set_vring_call(queue.index, &queue.call)
                .expect("SET_VRING_CALL");
        }
        self.frontend
            .set_mem_table(&[self.ram.region_info()])
            .expect("SET_MEM_TABLE");
        for (queue, &base) in self.queues.iter().zip(bases) {
            self.set_ring_layout(&self.ram, queue, base);
            self.frontend
                .set_vring_kick(queue.index, &queue.kick)
                .expect("SET_VRING_KICK");
        }
        for queue in &self.queues {
            self.frontend
                .set_vring_enable(queue.index, true)
                .expect("SET_VRING_ENABLE");
        }
        self.sync();
    }

    /// SET_VRING_NUM, SET_VRING_BASE (`base`) and SET_VRING_ADDR of
    /// `queue`, its addresses as `ram` maps them.
    fn set_ring_layout(&self, ram: &GuestRam, queue: &DriverQueue, base: u16) {
        let index = queue.index;
        self.frontend
            .set_vring_num(index, queue.size)
            .expect("SET_VRING_NUM");
        self.frontend
            .set_vring_base(index, base)
            .expect("SET_VRING_BASE");
        let config = VringConfigData {
            queue_max_size: queue.size,
            queue_size: queue.size,
            flags: 0,
            desc_table_addr: ram.user_addr(queue.desc_table),
            used_ring_addr: ram.user_addr(queue.used_ring),
            avail_ring_addr: ram.user_addr(queue.avail_ring),
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(index, &config)
            .expect("SET_VRING_ADDR");
    }

    /// Start ring `queue` again after a GET_VRING_BASE, as a front-end that
    /// lies about its size: SET_VRING_NUM `size` (the driver's ring stays as
    /// it is), SET_VRING_BASE `base`, SET_VRING_ADDR, SET_VRING_KICK and
    /// SET_VRING_ENABLE(1), then a round trip.
    pub fn restart_ring_as(&mut self, queue: usize, size: u16, base: u16) {
        let ring = &self.queues[queue];
        self.frontend
            .set_vring_num(queue, size)
            .expect("SET_VRING_NUM");
        self.frontend
            .set_vring_base(queue, base)
            .expect("SET_VRING_BASE");
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.ram.user_addr(ring.desc_table),
            used_ring_addr: self.ram.user_addr(ring.used_ring),
            avail_ring_addr: self.ram.user_addr(ring.avail_ring),
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(queue, &config)
            .expect("SET_VRING_ADDR");
        self.frontend
            .set_vring_kick(queue, &ring.kick)
            .expect("SET_VRING_KICK");
        self.frontend
            .set_vring_enable(queue, true)
            .expect("SET_VRING_ENABLE");
        self.sync();
    }

    /// GET_INFLIGHT_FD for this front-end's queues.
    pub fn get_inflight_fd(&mut self) -> InflightRegion {
        let queue_size = self.queues.first().map_or(0, |queue| queue.size);
        let request = VhostUserInflight::new(0, 0, self.queues.len() as u16, queue_size);
        let (reply, file) = self
            .frontend
            .get_inflight_fd(&request)
            .expect("GET_INFLIGHT_FD");
        InflightRegion::from_reply(&reply, file)
    }

    /// The inflight region the back-end was given (panics if none).
    pub fn region(&self) -> &InflightRegion {
        self.inflight
            .as_ref()
            .expect("the device was started without an inflight region")
    }

    /// A round trip (GET_FEATURES), so every message sent before has been
    /// applied: messages without NEED_REPLY have no reply, and kicks do not
    /// travel on the socket. QEMU does the same (vhost_user_write_sync).
    pub fn sync(&mut self) {
        self.frontend.get_features().expect("GET_FEATURES");
    }

    /// Send a raw message on the connection (no fds).
    pub fn send_raw(&self, request: u32, flags: u32, payload: &[u8]) {
        raw::send(&self.stream, request, flags, payload).expect("send a raw message");
    }

    /// Receive one raw message from the connection.
    pub fn recv_raw(&self) -> RawMessage {
        raw::recv(&self.stream).expect("receive a raw message")
    }

    /// QEMU's stop of a blk device: SET_VRING_ENABLE(0) on every ring, then
    /// `how` on every ring, each reply timed.
    pub fn stop(&mut self, how: StopRequest) -> Stopped {
        for queue in 0..self.queues.len() {
            self.frontend
                .set_vring_enable(queue, false)
                .expect("SET_VRING_ENABLE(0)");
        }
        let mut stopped = Stopped {
            bases: Vec::new(),
            reply_times: Vec::new(),
        };
        for queue in 0..self.queues.len() {
            let (base, elapsed) = self.get_vring_base_timed(queue, how);
            stopped.bases.push(base);
            stopped.reply_times.push(elapsed);
        }
        stopped
    }

    /// Stop ring `queue` with `how`; returns the base and the time from
    /// sending the request to its reply.
    pub fn get_vring_base_timed(&mut self, queue: usize, how: StopRequest) -> (u16, Duration) {
        let (num, elapsed) = match how {
            StopRequest::GetVringBase => {
                let started = Instant::now();
                let num = self.frontend.get_vring_base(queue).expect("GET_VRING_BASE");
                (num, started.elapsed())
            }
            StopRequest::SkipDrain => {
                let (reply, elapsed) = self.get_vring_base_skip_drain(queue);
                assert_eq!(
                    reply.request,
                    raw::GET_VRING_BASE_SKIP_DRAIN,
                    "reply to request 45 carries request {}",
                    reply.request
                );
                assert_eq!(
                    reply.flags,
                    raw::FLAG_VERSION | raw::FLAG_REPLY,
                    "reply to request 45 has flags {:#x}",
                    reply.flags
                );
                let (index, num) = reply
                    .vring_state()
                    .unwrap_or_else(|| panic!("reply to request 45 has {reply:?}"));
                assert_eq!(
                    index as usize, queue,
                    "reply to request 45 names ring {index}"
                );
                (num, elapsed)
            }
        };
        let base = u16::try_from(num)
            .unwrap_or_else(|_| panic!("ring {queue}: base {num:#x} is not a split-ring index"));
        (base, elapsed)
    }

    /// Send GET_VRING_BASE_SKIP_DRAIN (45) for ring `queue` raw and return
    /// the reply unchecked, with the time it took.
    pub fn get_vring_base_skip_drain(&self, queue: usize) -> (RawMessage, Duration) {
        let started = Instant::now();
        let payload = raw::vring_state(queue as u32, 0);
        self.send_raw(raw::GET_VRING_BASE_SKIP_DRAIN, raw::FLAG_VERSION, &payload);
        let reply = self.recv_raw();
        (reply, started.elapsed())
    }

    /// Every ring's used index as it stands in guest memory (what QEMU
    /// restores as the avail index after a back-end crash).
    pub fn used_indices(&self) -> Vec<u16> {
        self.queues
            .iter()
            .map(|queue| queue.used_idx(&self.ram))
            .collect()
    }

    /// Buffer area `slot` (64 KiB each) above the rings: (header, data, status).
    pub fn buffers(slot: u64) -> (u64, u64, u64) {
        assert!(slot < SLOTS, "slot {slot} beyond guest RAM");
        let base = BUFFER_BASE + slot * 0x1_0000;
        (base, base + 0x1000, base + 0xf000)
    }

    /// Write `bytes` into slot `slot`'s data buffer.
    pub fn fill(&self, slot: u64, bytes: &[u8]) {
        let (_, data, _) = Self::buffers(slot);
        self.ram.mem.write_slice(bytes, GuestAddress(data)).unwrap();
    }

    /// The first `len` bytes of slot `slot`'s data buffer.
    pub fn data(&self, slot: u64, len: usize) -> Vec<u8> {
        let (_, data, _) = Self::buffers(slot);
        let mut bytes = vec![0u8; len];
        self.ram
            .mem
            .read_slice(&mut bytes, GuestAddress(data))
            .unwrap();
        bytes
    }

    /// Slot `slot`'s status byte.
    pub fn status(&self, slot: u64) -> u8 {
        let (_, _, status) = Self::buffers(slot);
        self.ram.mem.read_obj(GuestAddress(status)).unwrap()
    }

    /// Put `requests` on ring `queue` the way a Linux guest does (one
    /// INDIRECT descriptor each, table in the request's slot), make them
    /// visible with a single avail->idx update and kick once. Status bytes
    /// are set to [`STATUS_UNSET`]; write data must already be in the
    /// slots. Heads are taken round-robin: at most `queue_size` in flight.
    pub fn submit(&mut self, queue: usize, requests: &[BlkRequest]) -> Vec<Submitted> {
        let mut submitted = Vec::with_capacity(requests.len());
        for request in requests {
            let (header, data, status) = Self::buffers(request.slot);
            assert!(
                u64::from(request.len) <= status - data,
                "{} bytes do not fit a slot",
                request.len
            );
            self.write_header(header, request.request_type, request.sector);
            self.ram
                .mem
                .write_obj(STATUS_UNSET, GuestAddress(status))
                .unwrap();
            let data_desc = if request.is_write() {
                Desc::readable(data, request.len)
            } else {
                Desc::writable(data, request.len)
            };
            let descs = [
                Desc::readable(header, 16),
                data_desc,
                Desc::writable(status, 1),
            ];
            let table = header + INDIRECT_TABLE_OFFSET;
            let head = self.queues[queue].place_indirect(&self.ram, table, &descs);
            submitted.push(Submitted {
                queue,
                head,
                request: *request,
            });
        }
        let ring = &self.queues[queue];
        ring.publish_avail(&self.ram);
        ring.kick();
        submitted
    }

    /// Take used entries of ring `queue` until `count` have come or
    /// `timeout` passes; returns their ids (heads), maybe fewer.
    pub fn collect_used(&mut self, queue: usize, count: usize, timeout: Duration) -> Vec<u16> {
        self.queues[queue]
            .collect_used(&self.ram, count, timeout)
            .into_iter()
            .map(|(id, _)| u16::try_from(id).unwrap_or(u16::MAX))
            .collect()
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

/// Send a raw request expecting a reply and return the reply, checking
/// that it answers `request`.
fn raw_exchange(stream: &UnixStream, request: u32, payload: &[u8]) -> RawMessage {
    raw::send(stream, request, raw::FLAG_VERSION, payload).expect("send a raw request");
    let reply = raw::recv(stream).expect("receive a raw reply");
    assert_eq!(reply.request, request, "reply answers another request");
    assert!(
        reply.flags & raw::FLAG_REPLY != 0,
        "reply to {request} lacks the reply flag"
    );
    reply
}
