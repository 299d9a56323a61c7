//! The descriptor-chain classes of DPDK's vhost CVEs 2018-2022, against
//! the blk request path: descriptor loops and overlong chains, indirect
//! tables inside indirect tables, length overflows (addr + len wrapping,
//! u32 sums), descriptors outside guest memory (CVE-2018-1059,
//! CVE-2020-10725) and indirect tables larger than allowed.
//!
//! The blk path was already strict about all of these (the parser checks
//! every address and length, and a chain whose last descriptor still has
//! NEXT set was cut short by the walker): these tests held before issue
//! 18's fixes and guard them. Each names the spec rule it exercises
//! (virtio 1.2, section 2.7).

use super::hostile::publish_raw;
use super::*;

/// Expect the chain at head 0 to break the queue with `reason` in its
/// message, publishing nothing.
fn expect_broken(fx: &Fixture, vq: &MockSplitQueue<GuestMemoryMmap>, reason: &str) {
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut blk = blk_queue(fx, EngineKind::ThreadPool);
    let err = run(&mut blk, &mut queue, &fx.mem).unwrap_err();
    assert!(
        matches!(&err, QueueError::NeedsReset(ParseError::Broken { reason: r, .. }) if r.contains(reason)),
        "expected `{reason}`, got {err}"
    );
    assert_eq!(vq.used().idx().load(), 0, "nothing published");
}

/// Expect the chain at head 0 to fail alone with IOERR (used length 1).
fn expect_ioerr(fx: &Fixture, vq: &MockSplitQueue<GuestMemoryMmap>) {
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut blk = blk_queue(fx, EngineKind::ThreadPool);
    run(&mut blk, &mut queue, &fx.mem).unwrap();
    assert_eq!(status_of(&fx.mem, 0), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used_len(vq, 0), 1, "only the status byte counts as written");
}

/// Write `entries` as an indirect table at `table`.
fn write_table(fx: &Fixture, table: u64, entries: &[RawDescriptor]) {
    for (index, entry) in entries.iter().enumerate() {
        fx.mem
            .write_obj(*entry, GuestAddress(table + 16 * index as u64))
            .unwrap();
    }
}

const TABLE: u64 = BUFFERS + 0x2_0000;
const INNER_TABLE: u64 = BUFFERS + 0x3_0000;

/// 2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than the
/// Queue Size" and a loop is an infinitely long chain: a writable data
/// descriptor whose next is itself.
#[test]
fn a_descriptor_that_points_to_itself_needs_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    publish_raw(
        &vq,
        &[
            desc(b.header, 16, VRING_DESC_F_NEXT, 1),
            desc(b.data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
        ],
    );
    expect_broken(&fx, &vq, "chain loops");
}

/// The same loop inside an indirect table (the walker's budget is the
/// table's length there).
#[test]
fn a_loop_inside_an_indirect_table_needs_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    write_table(
        &fx,
        TABLE,
        &[
            desc(b.header, 16, VRING_DESC_F_NEXT, 1),
            desc(b.data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
        ],
    );
    publish_raw(&vq, &[desc(TABLE, 32, VRING_DESC_F_INDIRECT, 0)]);
    expect_broken(&fx, &vq, "chain loops");
}

/// 2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag
/// within an indirect descriptor (ie. only one table per descriptor)."
#[test]
fn an_indirect_table_inside_an_indirect_table_needs_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    write_table(
        &fx,
        INNER_TABLE,
        &[
            desc(b.data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(b.status, 1, VRING_DESC_F_WRITE, 0),
        ],
    );
    write_table(
        &fx,
        TABLE,
        &[
            desc(b.header, 16, VRING_DESC_F_NEXT, 1),
            desc(INNER_TABLE, 32, VRING_DESC_F_INDIRECT, 0),
        ],
    );
    publish_raw(&vq, &[desc(TABLE, 32, VRING_DESC_F_INDIRECT, 0)]);
    expect_broken(
        &fx,
        &vq,
        "chain loops, exceeds the queue size, or points outside",
    );
}

/// An indirect table of more than 65535 entries (its length is 16 * 2^16):
/// larger than any chain may be.
#[test]
fn an_indirect_table_larger_than_allowed_needs_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    publish_raw(&vq, &[desc(TABLE, 16 << 16, VRING_DESC_F_INDIRECT, 0)]);
    expect_broken(&fx, &vq, "unreadable or empty");
}

/// 2.7.5.3.1: an indirect table's length is a multiple of 16.
#[test]
fn an_indirect_table_of_a_partial_descriptor_needs_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    publish_raw(&vq, &[desc(TABLE, 40, VRING_DESC_F_INDIRECT, 0)]);
    expect_broken(&fx, &vq, "unreadable or empty");
}

/// An indirect table outside guest memory (CVE-2018-1059's class: every
/// guest address is translated and range-checked before use).
#[test]
fn an_indirect_table_outside_guest_memory_needs_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    publish_raw(&vq, &[desc(1 << 40, 48, VRING_DESC_F_INDIRECT, 0)]);
    expect_broken(&fx, &vq, "unreadable or empty");
}

/// 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32
/// bytes in total": two descriptors whose u32 lengths sum past 4 GiB.
#[test]
fn lengths_that_sum_past_4_gib_need_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    publish_raw(
        &vq,
        &[
            desc(b.header, 16, VRING_DESC_F_NEXT, 1),
            desc(
                b.data,
                0xffff_fff0,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                2,
            ),
            desc(b.data, 0x100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3),
            desc(b.status, 1, VRING_DESC_F_WRITE, 0),
        ],
    );
    expect_broken(
        &fx,
        &vq,
        "chain loops, exceeds the queue size, or points outside",
    );
}

/// A data buffer whose address plus length wraps past 2^64: outside guest
/// memory, so the request fails alone.
#[test]
fn a_data_buffer_whose_end_wraps_around_fails_the_request() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    publish_raw(
        &vq,
        &[
            desc(b.header, 16, VRING_DESC_F_NEXT, 1),
            desc(
                u64::MAX - 511,
                1024,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                2,
            ),
            desc(b.status, 1, VRING_DESC_F_WRITE, 0),
        ],
    );
    expect_ioerr(&fx, &vq);
}

/// A status descriptor whose last byte lies past 2^64: there is no status
/// byte to answer with, so the queue needs a reset.
#[test]
fn a_status_descriptor_whose_end_wraps_around_needs_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_FLUSH, 0);
    publish_raw(
        &vq,
        &[
            desc(b.header, 16, VRING_DESC_F_NEXT, 1),
            desc(u64::MAX, 2, VRING_DESC_F_WRITE, 0),
        ],
    );
    expect_broken(&fx, &vq, "status byte outside guest memory");
}

/// A header that starts in guest memory and ends past it (CVE-2018-1059:
/// a range must be checked whole, not by its first byte).
#[test]
fn a_header_straddling_the_end_of_guest_memory_fails_the_request() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let b = buffers(0);
    publish_raw(
        &vq,
        &[
            desc(MEM_SIZE as u64 - 8, 16, VRING_DESC_F_NEXT, 1),
            desc(b.status, 1, VRING_DESC_F_WRITE, 0),
        ],
    );
    fx.mem.write_obj(0xffu8, GuestAddress(b.status)).unwrap();
    expect_ioerr(&fx, &vq);
}

/// A chain whose next names a descriptor beyond the table.
#[test]
fn a_next_beyond_the_descriptor_table_needs_reset() {
    let fx = fixture(false);
    let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
    let b = buffers(0);
    write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
    publish_raw(
        &vq,
        &[desc(b.header, 16, VRING_DESC_F_NEXT, QUEUE_SIZE + 3)],
    );
    expect_broken(
        &fx,
        &vq,
        "chain loops, exceeds the queue size, or points outside",
    );
}

/// Requests resubmitted from the inflight region are walked by the
/// agent's own walker (not virtio-queue's): the same rules hold there.
#[test]
fn resubmitted_chains_that_loop_or_nest_tables_need_reset() {
    let b = buffers(0);
    let looping = [
        desc(b.header, 16, VRING_DESC_F_NEXT, 1),
        desc(b.data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
    ];
    let nested = [desc(TABLE, 32, VRING_DESC_F_INDIRECT, 0)];
    for (name, descs) in [("loop", &looping[..]), ("nested table", &nested[..])] {
        let fx = fixture(false);
        write_header(&fx.mem, b.header, VIRTIO_BLK_T_IN, 0);
        write_table(
            &fx,
            TABLE,
            &[
                desc(b.header, 16, VRING_DESC_F_NEXT, 1),
                desc(INNER_TABLE, 32, VRING_DESC_F_INDIRECT, 0),
            ],
        );
        let vq = MockSplitQueue::new(fx.mem.as_ref(), QUEUE_SIZE);
        for (index, entry) in descs.iter().enumerate() {
            vq.desc_table()
                .store(u16::try_from(index).unwrap(), *entry)
                .unwrap();
        }
        let (region, _file) = crate::inflight::InflightRegion::create(1, QUEUE_SIZE).unwrap();
        let mut source = region.queue(0).unwrap();
        source.begin(QUEUE_SIZE, 0).unwrap();
        source.fetched(0);
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut blk = blk_queue(&fx, EngineKind::ThreadPool).with_inflight(region.queue(0));
        let err = blk.resume(&mut queue, &fx.mem, || false).unwrap_err();
        assert!(
            matches!(err, QueueError::NeedsReset(ParseError::Broken { .. })),
            "{name}: {err}"
        );
        assert_eq!(vq.used().idx().load(), 0, "{name}: nothing published");
    }
}
