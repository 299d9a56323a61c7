//! NetRing over a real virtio-queue `Queue` in a `GuestMemoryMmap`, with
//! the driver side written by hand (MockSplitQueue's rings), for what a
//! hostile driver can put on a net ring: descriptor loops and overlong
//! chains, nested and oversized indirect tables, length overflows, buffers
//! outside guest memory and descriptors of the wrong direction (the classes
//! of DPDK's vhost CVEs 2018-2022). Each test names the spec rule (virtio
//! 1.2) it exercises; those marked `regression_` failed before issue 18's
//! fix.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

mod tx;

const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: usize = 0x10_0000;
/// Buffers live above the rings (MockSplitQueue puts them at 0).
const BUF: u64 = 0x4_0000;
const TABLE: u64 = 0x8_0000;
const INNER_TABLE: u64 = 0x9_0000;
/// The virtio-net header with num_buffers.
const HDR: usize = 12;
/// What guest buffers hold before the device writes them.
const SENTINEL: u8 = 0xee;

fn memory() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(&vec![SENTINEL; 0x4_0000], GuestAddress(BUF))
        .unwrap();
    mem
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Write `descs` at descriptor indices `0..`, verbatim.
fn table(vq: &MockSplitQueue<GuestMemoryMmap>, descs: &[RawDescriptor]) {
    for (index, entry) in descs.iter().enumerate() {
        vq.desc_table()
            .store(u16::try_from(index).unwrap(), *entry)
            .unwrap();
    }
}

/// Make `heads` available, in order, after what is already available.
fn offer(vq: &MockSplitQueue<GuestMemoryMmap>, heads: &[u16]) {
    let mut idx = vq.avail().idx().load();
    for &head in heads {
        vq.avail()
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(head);
        idx = idx.wrapping_add(1);
    }
    vq.avail().idx().store(idx);
}

fn write_table(mem: &GuestMemoryMmap, at: u64, descs: &[RawDescriptor]) {
    for (index, entry) in descs.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(at + 16 * index as u64))
            .unwrap();
    }
}

fn ring(vq: &MockSplitQueue<GuestMemoryMmap>) -> NetRing {
    let queue: Queue = vq.create_queue().unwrap();
    NetRing::new(queue)
}

/// The used entries the device published: (id, len).
fn used(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let count = vq.used().idx().load();
    (0..count)
        .map(|i| {
            let element = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
            (element.id(), element.len())
        })
        .collect()
}

fn bytes(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(at)).unwrap();
    out
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

/// Deliver a 100-byte frame with a fresh header; publish.
fn push(
    ring: &mut NetRing,
    mem: &GuestMemoryMmap,
    mrg_rxbuf: bool,
) -> Result<RxOutcome, RingError> {
    let mut header = [0u8; HDR];
    let outcome = ring.push_rx(mem, &mut header, &frame(100), mrg_rxbuf);
    ring.publish(mem).unwrap();
    outcome
}

fn assert_broken(result: Result<RxOutcome, RingError>, reason: &str) {
    match result {
        Err(RingError::BrokenChain { reason: r, .. }) => {
            assert!(r.contains(reason), "`{reason}` not in `{r}`")
        }
        other => panic!("expected a broken chain ({reason}), got {other:?}"),
    }
}

// ---- RX ----------------------------------------------------------------

#[test]
fn a_frame_lands_in_a_writable_buffer_with_the_bytes_written_as_used_length() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(&vq, &[desc(BUF, 2048, VRING_DESC_F_WRITE, 0)]);
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    assert_eq!(
        push(&mut ring, &mem, true).unwrap(),
        RxOutcome::Delivered { buffers: 1 }
    );
    assert_eq!(used(&vq), [(0, (HDR + 100) as u32)]);
    assert_eq!(bytes(&mem, BUF + HDR as u64, 100), frame(100));
    assert_eq!(bytes(&mem, BUF + (HDR + 100) as u64, 1), [SENTINEL]);
}

/// Issue 18: a writable 16-byte descriptor whose next is itself. The
/// device went round the loop, wrote the same 16 bytes seven times and
/// reported a used length of 112 for 16 writable bytes. 2.7.5.3.1: a
/// driver MUST NOT create a chain longer than the queue size (a loop is
/// infinitely long): the ring is broken and nothing is written.
#[test]
fn regression_an_rx_descriptor_that_points_to_itself_breaks_the_ring_unwritten() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[desc(BUF, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    assert_broken(push(&mut ring, &mem, true), "chain loops");
    assert_eq!(used(&vq), [], "no used entry");
    assert_eq!(bytes(&mem, BUF, 16), [SENTINEL; 16], "nothing written");
}

/// The same without merged buffers, and a two-descriptor loop.
#[test]
fn regression_a_two_descriptor_rx_loop_breaks_the_ring_unwritten() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, 32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(BUF + 0x100, 32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
        ],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    assert_broken(push(&mut ring, &mem, false), "chain loops");
    assert_eq!(bytes(&mem, BUF, 32), [SENTINEL; 32]);
    assert_eq!(ring.next_avail(), 0, "the chain was not consumed");
}

/// An indirect table of more descriptors than the queue has, chained:
/// 2.7.5.3.1 bounds a chain by the queue size, indirect or not.
#[test]
fn regression_an_rx_chain_longer_than_the_queue_breaks_the_ring() {
    let mem = memory();
    let entries: Vec<RawDescriptor> = (0..2 * QUEUE_SIZE)
        .map(|i| {
            desc(
                BUF + 8 * u64::from(i),
                8,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                i + 1,
            )
        })
        .collect();
    let mut entries = entries;
    let last = entries.len() - 1;
    entries[last] = desc(BUF + 8 * last as u64, 8, VRING_DESC_F_WRITE, 0);
    write_table(&mem, TABLE, &entries);
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[desc(
            TABLE,
            16 * u32::from(2 * QUEUE_SIZE),
            VRING_DESC_F_INDIRECT,
            0,
        )],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    assert_broken(
        push(&mut ring, &mem, true),
        "more descriptors than the queue size",
    );
    assert_eq!(bytes(&mem, BUF, 8), [SENTINEL; 8]);
}

/// 2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag
/// within an indirect descriptor".
#[test]
fn regression_an_rx_indirect_table_inside_an_indirect_table_breaks_the_ring() {
    let mem = memory();
    write_table(&mem, INNER_TABLE, &[desc(BUF, 2048, VRING_DESC_F_WRITE, 0)]);
    write_table(
        &mem,
        TABLE,
        &[
            desc(BUF + 0x1000, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(INNER_TABLE, 16, VRING_DESC_F_INDIRECT, 0),
        ],
    );
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(&vq, &[desc(TABLE, 32, VRING_DESC_F_INDIRECT, 0)]);
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    assert_broken(push(&mut ring, &mem, true), "nests indirect tables");
    assert_eq!(bytes(&mem, BUF + 0x1000, 4), [SENTINEL; 4]);
}

/// An indirect table too large for any chain (16 * 2^16 bytes) or of a
/// partial descriptor: nothing can be walked.
#[test]
fn regression_oversized_or_misaligned_rx_indirect_tables_break_the_ring() {
    for len in [16 << 16, 24, 0] {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        table(&vq, &[desc(TABLE, len, VRING_DESC_F_INDIRECT, 0)]);
        offer(&vq, &[0]);
        let mut ring = ring(&vq);
        assert_broken(push(&mut ring, &mem, true), "empty chain");
    }
}

/// CVE-2018-1059's class: every buffer is checked whole before anything is
/// written. A chain whose second buffer lies past guest memory: before the
/// fix its first buffer was written, then the copy failed half way.
#[test]
fn regression_an_rx_buffer_outside_guest_memory_breaks_the_ring_unwritten() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(MEM_SIZE as u64 - 32, 256, VRING_DESC_F_WRITE, 0),
        ],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    assert_broken(push(&mut ring, &mem, true), "outside guest memory");
    assert_eq!(bytes(&mem, BUF, 16), [SENTINEL; 16], "nothing written");
}

/// A buffer whose address plus length wraps past 2^64.
#[test]
fn regression_an_rx_buffer_whose_end_wraps_around_breaks_the_ring() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(&vq, &[desc(u64::MAX - 63, 2048, VRING_DESC_F_WRITE, 0)]);
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    assert_broken(push(&mut ring, &mem, true), "outside guest memory");
}

/// 2.7.5.2: a chain is at most 2^32 bytes: two lengths that sum past it.
#[test]
fn regression_rx_lengths_that_sum_past_4_gib_break_the_ring() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, 0xffff_ff00, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(BUF, 0x200, VRING_DESC_F_WRITE, 0),
        ],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    assert_broken(push(&mut ring, &mem, true), "exceeds 4 GiB");
}

/// 2.7.4: the device writes only device-writable buffers. A readable
/// descriptor in an RX chain is skipped, its memory untouched, and the
/// used length counts only what was written.
#[test]
fn readable_descriptors_in_an_rx_chain_are_never_written() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, 64, VRING_DESC_F_NEXT, 1),
            desc(BUF + 0x1000, 2048, VRING_DESC_F_WRITE, 0),
        ],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    push(&mut ring, &mem, true).unwrap();
    assert_eq!(bytes(&mem, BUF, 64), [SENTINEL; 64]);
    assert_eq!(used(&vq), [(0, (HDR + 100) as u32)]);
    assert_eq!(bytes(&mem, BUF + 0x1000 + HDR as u64, 100), frame(100));
}

/// CVE-2022-2132's class: a header spread over many tiny descriptors
/// (DPDK overflowed a two-descriptor header copy). Twelve 1-byte buffers
/// then one for the frame: each gets its byte, the used length is exact.
#[test]
fn a_header_spread_over_one_byte_rx_buffers_is_written_byte_by_byte() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let mut descs: Vec<RawDescriptor> = (0..HDR as u16)
        .map(|i| {
            desc(
                BUF + 0x100 * u64::from(i),
                1,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                i + 1,
            )
        })
        .collect();
    descs.push(desc(BUF + 0x2000, 200, VRING_DESC_F_WRITE, 0));
    table(&vq, &descs);
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    let mut header = [0u8; HDR];
    header[0] = 0x11;
    ring.push_rx(&mem, &mut header, &frame(100), true).unwrap();
    ring.publish(&mem).unwrap();
    assert_eq!(used(&vq), [(0, (HDR + 100) as u32)]);
    assert_eq!(bytes(&mem, BUF, 1), [0x11]);
    assert_eq!(bytes(&mem, BUF + 1, 1), [SENTINEL], "only one byte each");
    // num_buffers (header bytes 10 and 11) = 1.
    assert_eq!(bytes(&mem, BUF + 0xa00, 1), [1]);
    assert_eq!(bytes(&mem, BUF + 0x2000, 100), frame(100));
}

/// Merged buffers (5.1.6.4): a frame over several chains; each chain's used
/// length is what it received, and their sum is the frame.
#[test]
fn merged_rx_buffers_report_exactly_what_each_received() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, 48, VRING_DESC_F_WRITE, 0),
            desc(BUF + 0x1000, 48, VRING_DESC_F_WRITE, 0),
            desc(BUF + 0x2000, 48, VRING_DESC_F_WRITE, 0),
        ],
    );
    offer(&vq, &[0, 1, 2]);
    let mut ring = ring(&vq);
    assert_eq!(
        push(&mut ring, &mem, true).unwrap(),
        RxOutcome::Delivered { buffers: 3 }
    );
    assert_eq!(used(&vq), [(0, 48), (1, 48), (2, 16)]);
    assert_eq!(bytes(&mem, BUF + 0x2000 + 16, 1), [SENTINEL]);
}

/// CVE-2022-2132's class, the other half: a chain too small for the
/// header and frame. Without merged buffers the frame is dropped and the
/// chain stays; with them, the frame waits for more buffers. Nothing is
/// written either way.
#[test]
fn an_rx_chain_too_small_for_the_frame_is_not_written() {
    for (mrg_rxbuf, expected) in [(false, RxOutcome::TooBig), (true, RxOutcome::NoBuffers)] {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        table(&vq, &[desc(BUF, 8, VRING_DESC_F_WRITE, 0)]);
        offer(&vq, &[0]);
        let mut ring = ring(&vq);
        assert_eq!(push(&mut ring, &mem, mrg_rxbuf).unwrap(), expected);
        assert_eq!(used(&vq), []);
        assert_eq!(bytes(&mem, BUF, 8), [SENTINEL; 8]);
        assert_eq!(ring.next_avail(), 0, "the chain stays the driver's");
    }
}

/// Issue 18's blk spin, on net: an avail index more than a ring ahead is
/// an error, reported once, instead of "no buffers" every time it is
/// asked (virtio-queue logged and returned no chain: the data path took
/// that for an empty ring with work pending and spun).
#[test]
fn regression_an_rx_avail_index_more_than_a_ring_ahead_is_an_error() {
    for jump in [17u16, 257, 65535] {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        table(&vq, &[desc(BUF, 2048, VRING_DESC_F_WRITE, 0)]);
        vq.avail().idx().store(jump);
        let mut ring = ring(&vq);
        match push(&mut ring, &mem, true) {
            Err(RingError::AvailIndex { ahead, .. }) => assert_eq!(ahead, jump),
            other => panic!("jump {jump}: {other:?}"),
        }
    }
}
