//! BlkQueue against a real virtio-queue `Queue` in a `GuestMemoryMmap`, with
//! rings written by virtio-queue's `MockSplitQueue` (the driver side) and a
//! real image file behind a real engine.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::*;
use crate::engine::EngineKind;

mod cve;
mod handoff;
mod hostile;

const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: usize = 0x10_0000;
const DISK_SECTORS: u64 = 64;
/// Where test buffers live: above the rings MockSplitQueue puts at 0.
const BUFFERS: u64 = 0x4_0000;
const SERIAL: &str = "vhost-agent-test";

struct Fixture {
    mem: Arc<GuestMemoryMmap>,
    image: tempfile::NamedTempFile,
    disk: Arc<DiskShared>,
}

fn fixture(readonly: bool) -> Fixture {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let mut image = tempfile::NamedTempFile::new().unwrap();
    image
        .as_file_mut()
        .set_len(DISK_SECTORS * SECTOR_SIZE)
        .unwrap();
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(image.path())
            .unwrap(),
    );
    let disk = Arc::new(DiskShared::new(file, DISK_SECTORS, readonly, SERIAL));
    Fixture { mem, image, disk }
}

fn blk_queue(fx: &Fixture, kind: EngineKind) -> BlkQueue<GuestMemoryMmap> {
    let engine = IoEngine::new(kind, fx.disk.file.clone(), u32::from(QUEUE_SIZE)).unwrap();
    BlkQueue::new(fx.disk.clone(), engine, QUEUE_SIZE)
}

/// A driver-side ring at guest address 0, the device's `Queue` on it, and
/// a processor with an engine of `kind`.
fn rig(
    fx: &Fixture,
    kind: EngineKind,
) -> (
    MockSplitQueue<'_, GuestMemoryMmap>,
    Queue,
    BlkQueue<GuestMemoryMmap>,
) {
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let queue: Queue = vq.create_queue().unwrap();
    (vq, queue, blk_queue(fx, kind))
}

fn engines() -> Vec<EngineKind> {
    let mut kinds = vec![EngineKind::ThreadPool];
    if EngineKind::probe().0 == EngineKind::IoUring {
        kinds.push(EngineKind::IoUring);
    }
    kinds
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Addresses of one request's header, data and status buffers.
struct Buffers {
    header: u64,
    data: u64,
    status: u64,
}

fn buffers(slot: u64) -> Buffers {
    let base = BUFFERS + slot * 0x4000;
    Buffers {
        header: base,
        data: base + 0x1000,
        status: base + 0x3000,
    }
}

fn write_header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    mem.write_obj(request_type, GuestAddress(addr)).unwrap();
    mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
}

/// A well-formed 3-descriptor request at descriptor indices `first..first+3`.
fn request(
    mem: &GuestMemoryMmap,
    first: u16,
    slot: u64,
    request_type: u32,
    sector: u64,
    len: u32,
) -> Vec<RawDescriptor> {
    let b = buffers(slot);
    write_header(mem, b.header, request_type, sector);
    mem.write_obj(0xffu8, GuestAddress(b.status)).unwrap();
    let data_flags = if request_type == VIRTIO_BLK_T_OUT {
        0
    } else {
        VRING_DESC_F_WRITE
    };
    vec![
        desc(b.header, 16, VRING_DESC_F_NEXT, first + 1),
        desc(b.data, len, data_flags | VRING_DESC_F_NEXT, first + 2),
        desc(b.status, 1, VRING_DESC_F_WRITE, 0),
    ]
}

fn status_of(mem: &GuestMemoryMmap, slot: u64) -> u8 {
    mem.read_obj(GuestAddress(buffers(slot).status)).unwrap()
}

/// Process the ring until every started request has completed.
fn run(
    blk: &mut BlkQueue<GuestMemoryMmap>,
    queue: &mut Queue,
    mem: &Arc<GuestMemoryMmap>,
) -> Result<(), QueueError> {
    let result = blk.process_avail(queue, mem).map(|_| ());
    while blk.in_flight() > 0 {
        let mut pfd = libc::pollfd {
            fd: blk.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack.
        let ready = unsafe { libc::poll(&mut pfd, 1, Duration::from_secs(5).as_millis() as i32) };
        assert!(ready > 0, "no storage completion within 5 s");
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd into an 8-byte buffer.
        unsafe { libc::read(pfd.fd, counter.as_mut_ptr().cast(), 8) };
        blk.process_completions(queue, mem)?;
    }
    result
}

fn used_len(vq: &MockSplitQueue<GuestMemoryMmap>, index: u16) -> u32 {
    vq.used()
        .ring()
        .ref_at(usize::from(index))
        .unwrap()
        .load()
        .len()
}

#[test]
fn write_then_read_round_trips_through_the_image() {
    for kind in engines() {
        let fx = fixture(false);
        let (vq, mut queue, mut blk) = rig(&fx, kind);

        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        fx.mem
            .write_slice(&pattern, GuestAddress(buffers(0).data))
            .unwrap();
        let mut chains = request(&fx.mem, 0, 0, VIRTIO_BLK_T_OUT, 3, 1024);
        chains.extend(request(&fx.mem, 3, 1, VIRTIO_BLK_T_IN, 3, 1024));
        // Both requests are in one batch: write first, then read. Storage
        // may reorder them, so run them as two batches.
        vq.add_desc_chains(&chains[..3], 0).unwrap();
        run(&mut blk, &mut queue, &fx.mem).unwrap();
        vq.add_desc_chains(&chains[3..], 3).unwrap();
        run(&mut blk, &mut queue, &fx.mem).unwrap();

        assert_eq!(
            status_of(&fx.mem, 0),
            VIRTIO_BLK_S_OK as u8,
            "{kind:?} write status"
        );
        assert_eq!(
            status_of(&fx.mem, 1),
            VIRTIO_BLK_S_OK as u8,
            "{kind:?} read status"
        );
        let mut back = vec![0u8; 1024];
        fx.mem
            .read_slice(&mut back, GuestAddress(buffers(1).data))
            .unwrap();
        assert_eq!(back, pattern, "{kind:?} data read back");
        assert_eq!(used_len(&vq, 0), 1, "a write returns only the status byte");
        assert_eq!(used_len(&vq, 1), 1025, "a read returns data + status");

        let mut on_disk = vec![0u8; 1024];
        let mut file = fx.image.reopen().unwrap();
        file.seek(SeekFrom::Start(3 * SECTOR_SIZE)).unwrap();
        file.read_exact(&mut on_disk).unwrap();
        assert_eq!(on_disk, pattern, "{kind:?} bytes in the image file");
        assert_eq!(blk.stats().ok, 2);
    }
}

#[test]
fn read_beyond_capacity_fails_with_ioerr_and_queue_keeps_serving() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);

    // Last sector + 1 sector too many.
    let mut chains = request(&fx.mem, 0, 0, VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024);
    chains.extend(request(&fx.mem, 3, 1, VIRTIO_BLK_T_IN, u64::MAX / 2, 512));
    chains.extend(request(
        &fx.mem,
        6,
        2,
        VIRTIO_BLK_T_IN,
        DISK_SECTORS - 1,
        512,
    ));
    vq.add_desc_chains(&chains, 0).unwrap();
    run(&mut blk, &mut queue, &fx.mem).unwrap();

    assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(
        status_of(&fx.mem, 1),
        VIRTIO_BLK_S_IOERR as u8,
        "sector * 512 overflow"
    );
    assert_eq!(
        status_of(&fx.mem, 2),
        VIRTIO_BLK_S_OK as u8,
        "last sector is readable"
    );
}

#[test]
fn header_split_across_descriptors_is_accepted() {
    // virtio 1.2 2.7.4: the device must not assume a descriptor layout.
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);

    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_GET_ID, 0);
    let chain = [
        desc(b.header, 8, VRING_DESC_F_NEXT, 1),
        desc(b.header + 8, 8, VRING_DESC_F_NEXT, 2),
        desc(b.data, 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3),
        desc(b.status, 1, VRING_DESC_F_WRITE, 0),
    ];
    vq.add_desc_chains(&chain, 0).unwrap();
    run(&mut blk, &mut queue, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 20];
    fx.mem.read_slice(&mut id, GuestAddress(b.data)).unwrap();
    assert_eq!(&id[..SERIAL.len()], SERIAL.as_bytes());
    assert!(id[SERIAL.len()..].iter().all(|&byte| byte == 0));
}

#[test]
fn unknown_request_type_is_unsupported() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);
    vq.add_desc_chains(&request(&fx.mem, 0, 0, 0x77, 0, 512), 0)
        .unwrap();
    run(&mut blk, &mut queue, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(blk.stats().unsupported, 1);
}

#[test]
fn readonly_disk_fails_writes_and_serves_reads() {
    let fx = fixture(true);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);
    let mut chains = request(&fx.mem, 0, 0, VIRTIO_BLK_T_OUT, 0, 512);
    chains.extend(request(&fx.mem, 3, 1, VIRTIO_BLK_T_IN, 0, 512));
    vq.add_desc_chains(&chains, 0).unwrap();
    run(&mut blk, &mut queue, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(status_of(&fx.mem, 1), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn write_zeroes_and_discard_read_back_zeroes() {
    for kind in engines() {
        for request_type in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
            let fx = fixture(false);
            let mut file = fx.image.reopen().unwrap();
            file.write_all(&vec![0xabu8; (DISK_SECTORS * SECTOR_SIZE) as usize])
                .unwrap();
            file.flush().unwrap();
            let (vq, mut queue, mut blk) = rig(&fx, kind);

            // Zero sectors 8..16 (4 KiB, so a hole punch is page aligned).
            let b = buffers(0);
            write_header(&fx.mem, b.header, request_type, 0);
            fx.mem.write_obj(8u64, GuestAddress(b.data)).unwrap();
            fx.mem.write_obj(8u32, GuestAddress(b.data + 8)).unwrap();
            fx.mem.write_obj(0u32, GuestAddress(b.data + 12)).unwrap();
            let chain = [
                desc(b.header, 16, VRING_DESC_F_NEXT, 1),
                desc(b.data, 16, VRING_DESC_F_NEXT, 2),
                desc(b.status, 1, VRING_DESC_F_WRITE, 0),
            ];
            vq.add_desc_chains(&chain, 0).unwrap();
            run(&mut blk, &mut queue, &fx.mem).unwrap();
            assert_eq!(
                status_of(&fx.mem, 0),
                VIRTIO_BLK_S_OK as u8,
                "{kind:?} type {request_type}"
            );

            let mut contents = Vec::new();
            fx.image
                .reopen()
                .unwrap()
                .read_to_end(&mut contents)
                .unwrap();
            let (before, rest) = contents.split_at(8 * 512);
            let (zeroed, after) = rest.split_at(8 * 512);
            assert!(
                before.iter().all(|&byte| byte == 0xab),
                "sectors before the range intact"
            );
            assert!(
                zeroed.iter().all(|&byte| byte == 0),
                "{kind:?} type {request_type}: range reads zeroes"
            );
            assert!(
                after.iter().all(|&byte| byte == 0xab),
                "sectors after the range intact"
            );
            let _ = file.as_raw_fd();
        }
    }
}
