//! A hostile guest against one queue: malformed chains fail the request
//! (IOERR) when the status byte is usable, and the queue (NEEDS_RESET)
//! when it is not; other queues keep serving.

use super::*;

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

/// Put `descs` verbatim at descriptor indices `0..` (flags and next as
/// given) and publish head 0 (and nothing else) on the avail ring.
pub(super) fn publish_raw(vq: &MockSplitQueue<GuestMemoryMmap>, descs: &[RawDescriptor]) {
    for (index, desc) in descs.iter().enumerate() {
        vq.desc_table()
            .store(u16::try_from(index).unwrap(), *desc)
            .unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
}

/// A ring whose avail index runs more than a ring ahead of the device (or
/// behind it) is broken (virtio 1.2, 2.7.13.3: the driver never makes more
/// than the queue size available). Before the fix virtio-queue logged
/// "invalid available ring index" and returned no chain, every time it
/// was asked: process_avail returned Ok, and with EVENT_IDX it looped on
/// it forever (issue 18: 99% of a core, 54 MB/s of log).
#[test]
fn regression_an_avail_index_more_than_a_ring_ahead_fails_the_queue_once() {
    for (jump, event_idx) in [(17u16, false), (257, false), (65535, true), (65535, false)] {
        let fx = fixture(false);
        let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);
        queue.set_event_idx(event_idx);
        vq.add_desc_chains(&request(&fx.mem, 0, 0, VIRTIO_BLK_T_IN, 0, 512), 0)
            .unwrap();
        vq.avail().idx().store(jump);
        let err = blk.process_avail(&mut queue, &fx.mem).unwrap_err();
        assert!(
            matches!(err, QueueError::AvailIndex { ahead, size: QUEUE_SIZE, .. } if ahead == jump),
            "jump {jump}: {err}"
        );
        assert_eq!(vq.used().idx().load(), 0, "jump {jump}: nothing answered");
        assert_eq!(queue.next_avail(), 0, "jump {jump}: nothing taken");
    }
}

/// Heads are descriptor table indices (virtio 1.2, 2.7.6): a random avail
/// ring names heads beyond the table or the same head twice.
#[test]
fn a_random_avail_ring_breaks_the_queue_with_the_rule_it_broke() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);
    vq.avail().ring().ref_at(0).unwrap().store(0xbeef);
    vq.avail().idx().store(1);
    let err = blk.process_avail(&mut queue, &fx.mem).unwrap_err();
    assert!(
        matches!(&err, QueueError::NeedsReset(ParseError::Broken { reason, head: 0xbeef }) if reason.contains("beyond the queue size")),
        "{err}"
    );

    // (The first request stays in its slot until a later call reaps it: the
    // slow engine only makes sure it has not completed by then either.)
    let fx = fixture(false);
    let (vq, mut queue, _) = rig(&fx, EngineKind::ThreadPool);
    let mut blk = slow_engine(&fx);
    vq.add_desc_chains(&request(&fx.mem, 0, 0, VIRTIO_BLK_T_IN, 0, 512), 0)
        .unwrap();
    blk.process_avail(&mut queue, &fx.mem).unwrap();
    // Head 0 again while it is still in flight.
    vq.avail().ring().ref_at(1).unwrap().store(0);
    vq.avail().idx().store(2);
    let err = blk.process_avail(&mut queue, &fx.mem).unwrap_err();
    assert!(
        matches!(&err, QueueError::NeedsReset(ParseError::Broken { reason, .. }) if reason.contains("already in flight")),
        "{err}"
    );
}

fn slow_engine(fx: &Fixture) -> BlkQueue<GuestMemoryMmap> {
    let engine = IoEngine::with_latency(
        EngineKind::ThreadPool,
        fx.disk.file.clone(),
        u32::from(QUEUE_SIZE),
        Duration::from_secs(1),
    )
    .unwrap();
    BlkQueue::new(fx.disk.clone(), engine, QUEUE_SIZE)
}

/// Malformed requests are failed and recorded for the caller's rate
/// limiter; the queue logs none of them itself (issue 18: a guest alone
/// could flood the log).
#[test]
fn malformed_requests_are_recorded_for_the_caller_not_logged() {
    let fx = fixture(false);
    let (vq, mut queue, mut blk) = rig(&fx, EngineKind::ThreadPool);
    let mut chains = Vec::new();
    for slot in 0..8u16 {
        let b = buffers(u64::from(slot));
        write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
        chains.push(desc(b.header, 8, VRING_DESC_F_NEXT, 2 * slot + 1));
        chains.push(desc(b.status, 1, VRING_DESC_F_WRITE, 0));
    }
    vq.add_desc_chains(&chains, 0).unwrap();
    run(&mut blk, &mut queue, &fx.mem).unwrap();
    assert_eq!(vq.used().idx().load(), 8);
    let taken = blk.take_faults();
    assert_eq!(taken.faults.len(), 8);
    assert!(taken.faults.iter().all(|fault| matches!(
        fault,
        GuestFault::FailedRequest { reason, .. } if reason.contains("shorter than 16 bytes")
    )));
    assert!(blk.take_faults().faults.is_empty(), "taken once");
}
