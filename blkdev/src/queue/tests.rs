//! BlkQueue against a real virtio-queue `Queue` in a `GuestMemoryMmap`, with
//! rings written by virtio-queue's `MockSplitQueue` (the driver side) and a
//! real image file behind a real engine.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, GuestMemoryMmap};

use super::*;
use crate::engine::EngineKind;

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
fn header_shorter_than_16_bytes_fails_the_request() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);

    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    let chain = [
        desc(b.header, 12, VRING_DESC_F_NEXT, 1),
        desc(b.status, 1, VRING_DESC_F_WRITE, 0),
    ];
    vq.add_desc_chains(&chain, 0).unwrap();
    run(&mut blk, &mut queue, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used_len(&vq, 0), 1);
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
fn read_only_status_descriptor_needs_reset() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);

    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_FLUSH, 0);
    let chain = [
        desc(b.header, 16, VRING_DESC_F_NEXT, 1),
        desc(b.status, 1, 0, 0),
    ];
    vq.add_desc_chains(&chain, 0).unwrap();
    let err = run(&mut blk, &mut queue, &fx.mem).unwrap_err();
    assert!(
        matches!(err, QueueError::NeedsReset(ParseError::Broken { reason, .. }) if reason.contains("read-only")),
        "{err}"
    );
    assert_eq!(
        vq.used().idx().load(),
        0,
        "nothing published for an unanswerable chain"
    );
}

#[test]
fn chain_loop_needs_reset() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);

    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> 1 ...
    let chain = [
        desc(b.header, 16, VRING_DESC_F_NEXT, 1),
        desc(b.data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
    ];
    // Publish head 0 as a one-descriptor chain, then rewrite the table into
    // a loop (add_desc_chains only publishes terminated chains).
    vq.add_desc_chains(&[desc(b.header, 16, 0, 0)], 0).unwrap();
    vq.desc_table().store(0, chain[0]).unwrap();
    vq.desc_table().store(1, chain[1]).unwrap();
    let err = run(&mut blk, &mut queue, &fx.mem).unwrap_err();
    assert!(
        matches!(err, QueueError::NeedsReset(ParseError::Broken { .. })),
        "{err}"
    );
}

#[test]
fn chain_longer_than_queue_size_needs_reset() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);

    // An indirect table with twice as many descriptors as the ring has.
    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    let table = GuestAddress(BUFFERS + 0x2_0000);
    let entries = 2 * QUEUE_SIZE;
    for i in 0..entries {
        let entry = if i == 0 {
            desc(b.header, 16, VRING_DESC_F_NEXT, 1)
        } else if i == entries - 1 {
            desc(b.status, 1, VRING_DESC_F_WRITE, 0)
        } else {
            desc(b.data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, i + 1)
        };
        fx.mem
            .write_obj(entry, table.unchecked_add(u64::from(i) * 16))
            .unwrap();
    }
    vq.add_desc_chains(
        &[desc(
            table.0,
            u32::from(entries) * 16,
            VRING_DESC_F_INDIRECT,
            0,
        )],
        0,
    )
    .unwrap();
    let err = run(&mut blk, &mut queue, &fx.mem).unwrap_err();
    assert!(
        matches!(err, QueueError::NeedsReset(ParseError::Broken { reason, .. }) if reason.contains("queue size")),
        "{err}"
    );
}

#[test]
fn data_descriptor_outside_guest_memory_fails_the_request() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);

    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    let chain = [
        desc(b.header, 16, VRING_DESC_F_NEXT, 1),
        desc(
            MEM_SIZE as u64 - 256,
            512,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            2,
        ),
        desc(b.status, 1, VRING_DESC_F_WRITE, 0),
    ];
    vq.add_desc_chains(&chain, 0).unwrap();
    run(&mut blk, &mut queue, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn status_byte_outside_guest_memory_needs_reset() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);

    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_FLUSH, 0);
    let chain = [
        desc(b.header, 16, VRING_DESC_F_NEXT, 1),
        desc(1 << 40, 1, VRING_DESC_F_WRITE, 0),
    ];
    vq.add_desc_chains(&chain, 0).unwrap();
    let err = run(&mut blk, &mut queue, &fx.mem).unwrap_err();
    assert!(matches!(err, QueueError::NeedsReset(_)), "{err}");
}

#[test]
fn broken_queue_does_not_stop_another_queue_of_the_same_disk() {
    let fx = fixture(false);
    let vq_bad = MockSplitQueue::create(fx.mem.as_ref(), GuestAddress(0), QUEUE_SIZE);
    let vq_good = MockSplitQueue::create(fx.mem.as_ref(), GuestAddress(0x2_0000), QUEUE_SIZE);
    let mut queue_bad: Queue = vq_bad.create_queue().unwrap();
    let mut queue_good: Queue = vq_good.create_queue().unwrap();
    let mut blk_bad = blk_queue(&fx, EngineKind::ThreadPool);
    let mut blk_good = blk_queue(&fx, EngineKind::ThreadPool);

    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_FLUSH, 0);
    vq_bad
        .add_desc_chains(
            &[
                desc(b.header, 16, VRING_DESC_F_NEXT, 1),
                desc(b.status, 1, 0, 0),
            ],
            0,
        )
        .unwrap();
    assert!(run(&mut blk_bad, &mut queue_bad, &fx.mem).is_err());

    vq_good
        .add_desc_chains(&request(&fx.mem, 0, 1, VIRTIO_BLK_T_IN, 0, 512), 0)
        .unwrap();
    run(&mut blk_good, &mut queue_good, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 1), VIRTIO_BLK_S_OK as u8);
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

/// An engine that starts every operation 50 ms after submit, so a test can
/// stop a queue while its requests are surely on storage.
fn slow_queue(fx: &Fixture, kind: EngineKind) -> BlkQueue<GuestMemoryMmap> {
    let engine = IoEngine::with_latency(
        kind,
        fx.disk.file.clone(),
        u32::from(QUEUE_SIZE),
        Duration::from_millis(50),
    )
    .unwrap();
    BlkQueue::new(fx.disk.clone(), engine, QUEUE_SIZE)
}

fn image_bytes(fx: &Fixture, sector: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    let mut file = fx.image.reopen().unwrap();
    file.seek(SeekFrom::Start(sector * SECTOR_SIZE)).unwrap();
    file.read_exact(&mut bytes).unwrap();
    bytes
}

fn fill_image(fx: &Fixture, sector: u64, byte: u8, len: usize) {
    let mut file = fx.image.reopen().unwrap();
    file.seek(SeekFrom::Start(sector * SECTOR_SIZE)).unwrap();
    file.write_all(&vec![byte; len]).unwrap();
}

#[test]
fn bounced_reads_reach_the_guest_only_when_answered() {
    for kind in engines() {
        let fx = fixture(false);
        fill_image(&fx, 5, 0xab, 2048);
        let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut blk = slow_queue(&fx, kind).with_bounced_reads(true);
        let data = GuestAddress(buffers(0).data);
        fx.mem.write_slice(&[0x5a; 2048], data).unwrap();
        vq.add_desc_chains(&request(&fx.mem, 0, 0, VIRTIO_BLK_T_IN, 5, 2048), 0)
            .unwrap();
        blk.process_avail(&mut queue, &fx.mem).unwrap();
        assert_eq!(blk.in_flight(), 1);
        std::thread::sleep(Duration::from_millis(150));
        // The storage read has happened; the guest buffer is untouched
        // until the completion is processed.
        let mut guest = vec![0u8; 2048];
        fx.mem.read_slice(&mut guest, data).unwrap();
        assert!(
            guest.iter().all(|&b| b == 0x5a),
            "{kind:?}: read landed early"
        );
        run(&mut blk, &mut queue, &fx.mem).unwrap();
        fx.mem.read_slice(&mut guest, data).unwrap();
        assert!(
            guest.iter().all(|&b| b == 0xab),
            "{kind:?}: data not copied"
        );
        assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_OK as u8);
        assert_eq!(used_len(&vq, 0), 2049);
    }
}

#[test]
fn suspended_queue_writes_nothing_into_guest_memory() {
    for kind in engines() {
        let fx = fixture(false);
        fill_image(&fx, 8, 0xcd, 1024);
        let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut blk = slow_queue(&fx, kind).with_bounced_reads(true);
        fx.mem
            .write_slice(&[0x11; 1024], GuestAddress(buffers(1).data))
            .unwrap();
        fx.mem
            .write_slice(&[0x5a; 1024], GuestAddress(buffers(0).data))
            .unwrap();
        let mut chains = request(&fx.mem, 0, 0, VIRTIO_BLK_T_IN, 8, 1024);
        chains.extend(request(&fx.mem, 3, 1, VIRTIO_BLK_T_OUT, 20, 1024));
        vq.add_desc_chains(&chains, 0).unwrap();
        blk.process_avail(&mut queue, &fx.mem).unwrap();
        assert_eq!(blk.in_flight(), 2);
        assert_eq!(blk.suspend(), 1, "{kind:?}: one abandoned write");
        let mut mutating = 0;
        while blk.in_flight() > 0 {
            std::thread::sleep(Duration::from_millis(10));
            mutating += blk.reap_abandoned();
        }
        assert_eq!(mutating, 1);
        let mut guest = vec![0u8; 1024];
        fx.mem
            .read_slice(&mut guest, GuestAddress(buffers(0).data))
            .unwrap();
        assert!(
            guest.iter().all(|&b| b == 0x5a),
            "{kind:?}: read data landed"
        );
        assert_eq!(status_of(&fx.mem, 0), 0xff, "{kind:?}: status written");
        assert_eq!(status_of(&fx.mem, 1), 0xff, "{kind:?}: status written");
        assert_eq!(
            vq.used().idx().load(),
            0,
            "{kind:?}: used entries published"
        );
        // The abandoned write still lands: the fence is about exactly that.
        assert_eq!(image_bytes(&fx, 20, 1024), vec![0x11; 1024]);
    }
}

#[test]
fn resume_resubmits_from_the_region_and_holds_writes_until_released() {
    let fx = fixture(false);
    fill_image(&fx, 2, 0x77, 512);
    let (region, _file) = crate::inflight::InflightRegion::create(1, QUEUE_SIZE).unwrap();
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    // The "source": takes a read and a write, then suspends.
    {
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut source = slow_queue(&fx, EngineKind::ThreadPool).with_inflight(region.queue(0));
        source.resume(&mut queue, &fx.mem, || false).unwrap();
        fx.mem
            .write_slice(&[0x33; 512], GuestAddress(buffers(1).data))
            .unwrap();
        let mut chains = request(&fx.mem, 0, 0, VIRTIO_BLK_T_IN, 2, 512);
        chains.extend(request(&fx.mem, 3, 1, VIRTIO_BLK_T_OUT, 30, 512));
        vq.add_desc_chains(&chains, 0).unwrap();
        source.process_avail(&mut queue, &fx.mem).unwrap();
        source.suspend();
        while source.in_flight() > 0 {
            std::thread::sleep(Duration::from_millis(10));
            source.reap_abandoned();
        }
    }
    assert_eq!(region.queue(0).unwrap().inflight_count(), 2);
    // The "destination": the front-end sets the base to the used index.
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.set_next_avail(0);
    let mut destination = blk_queue(&fx, EngineKind::ThreadPool).with_inflight(region.queue(0));
    let report = destination.resume(&mut queue, &fx.mem, || true).unwrap();
    assert_eq!(report.resubmitted, 2);
    assert_eq!(report.held, 1, "the write waits for the fence");
    assert_eq!(report.corrected_avail, Some((0, 2)));
    assert_eq!(queue.next_avail(), 2);
    // The read goes at once.
    run(&mut destination, &mut queue, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_OK as u8);
    assert_eq!(status_of(&fx.mem, 1), 0xff, "held write answered early");
    assert_eq!(destination.held(), 1);
    destination.release_held(&mut queue, &fx.mem).unwrap();
    run(&mut destination, &mut queue, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 1), VIRTIO_BLK_S_OK as u8);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(region.queue(0).unwrap().inflight_count(), 0);
    let mut guest = vec![0u8; 512];
    fx.mem
        .read_slice(&mut guest, GuestAddress(buffers(0).data))
        .unwrap();
    assert_eq!(guest, vec![0x77; 512]);
}
