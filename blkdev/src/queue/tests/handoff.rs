//! Bounced reads, suspending without draining, and resuming from an
//! inflight region.

use super::*;

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

/// The disk counts what each queue holds, for `query-devices`: requests
/// submitted to storage and not answered, then none.
#[test]
fn each_queue_reports_its_requests_in_flight_to_the_disk() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut blk = slow_queue(&fx, EngineKind::ThreadPool).with_index(3);
    let mut chains = request(&fx.mem, 0, 0, VIRTIO_BLK_T_IN, 2, 512);
    chains.extend(request(&fx.mem, 3, 1, VIRTIO_BLK_T_IN, 4, 512));
    vq.add_desc_chains(&chains, 0).unwrap();
    blk.process_avail(&mut queue, &fx.mem).unwrap();
    assert_eq!(fx.disk.in_flight(3), 2);
    assert_eq!(fx.disk.in_flight(2), 0, "other queues hold nothing");
    run(&mut blk, &mut queue, &fx.mem).unwrap();
    assert_eq!(fx.disk.in_flight(3), 0);
    assert_eq!(vq.used().idx().load(), 2);
}

/// Issue 18: after a reconnect the front-end's ring and the inflight
/// region disagree (SET_VRING_BASE, a scribbled region or avail index):
/// the index derived from the region is far from the driver's avail
/// index. Before the fix the queue took no request, reported nothing and
/// (with EVENT_IDX) looped on virtio-queue's "invalid available ring
/// index"; now the queue fails once with the index it found.
#[test]
fn regression_a_ring_that_disagrees_with_the_region_fails_the_queue_once() {
    let fx = fixture(false);
    let (region, _file) = crate::inflight::InflightRegion::create(1, QUEUE_SIZE).unwrap();
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let mut chains = request(&fx.mem, 0, 0, VIRTIO_BLK_T_IN, 2, 512);
    chains.extend(request(&fx.mem, 3, 1, VIRTIO_BLK_T_IN, 4, 512));
    vq.add_desc_chains(&chains, 0).unwrap();
    {
        let mut source = region.queue(0).unwrap();
        source.begin(QUEUE_SIZE, 0).unwrap();
        source.fetched(0);
        source.fetched(3);
    }
    // The guest's avail index went backwards (2 -> 0) behind the region.
    vq.avail().idx().store(0);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut blk = blk_queue(&fx, EngineKind::ThreadPool).with_inflight(region.queue(0));
    let report = blk.resume(&mut queue, &fx.mem, || false).unwrap();
    assert_eq!(report.resubmitted, 2);
    assert_eq!(queue.next_avail(), 2, "derived from the region");
    let err = blk.process_avail(&mut queue, &fx.mem).unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::AvailIndex {
                avail: 0,
                next_avail: 2,
                ..
            }
        ),
        "{err}"
    );
}
