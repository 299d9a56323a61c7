//! TX chains: only device-readable buffers are read, a structurally broken
//! chain breaks the ring, a well-formed but unusable one is returned
//! unused (used length 0) and counted by the caller.

use super::*;

/// What a burst handed on: each chain's outcome and its frame's bytes.
type Seen = Vec<(TxChain, Vec<u8>)>;

/// Take every available TX chain; the outcomes and the frames' bytes.
fn burst(ring: &mut NetRing, mem: &GuestMemoryMmap) -> (Result<usize, RingError>, Seen) {
    let mut buf = vec![0u8; HDR + crate::spec::MAX_FRAME_LEN];
    let mut seen = Vec::new();
    let result = ring.tx_burst(mem, &mut buf, 64, |chain, buf| {
        let bytes = match chain {
            TxChain::Frame { len, .. } => buf[..len].to_vec(),
            TxChain::Bad { .. } => Vec::new(),
        };
        seen.push((chain, bytes));
    });
    ring.publish(mem).unwrap();
    (result, seen)
}

fn assert_broken_tx(result: Result<usize, RingError>, reason: &str) {
    match result {
        Err(RingError::BrokenChain { reason: r, .. }) => {
            assert!(r.contains(reason), "`{reason}` not in `{r}`")
        }
        other => panic!("expected a broken chain ({reason}), got {other:?}"),
    }
}

#[test]
fn a_frame_is_read_from_its_readable_buffers_and_returned_with_length_0() {
    let mem = memory();
    mem.write_slice(&frame(100), GuestAddress(BUF + 0x100))
        .unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, HDR as u32, VRING_DESC_F_NEXT, 1),
            desc(BUF + 0x100, 100, 0, 0),
        ],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    let (result, seen) = burst(&mut ring, &mem);
    assert_eq!(result.unwrap(), 1);
    assert_eq!(
        seen[0].0,
        TxChain::Frame {
            head: 0,
            len: HDR + 100
        }
    );
    assert_eq!(&seen[0].1[HDR..], &frame(100)[..]);
    assert_eq!(used(&vq), [(0, 0)]);
}

/// Before the fix a looping TX chain was read round the loop (up to the
/// queue size) and sent as a frame. 2.7.5.3.1: the ring is broken; the
/// chain before it was still handled and returned.
#[test]
fn regression_a_tx_loop_breaks_the_ring_after_the_chains_before_it() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, 64, 0, 0),
            desc(BUF, 16, VRING_DESC_F_NEXT, 2),
            desc(BUF + 0x100, 16, VRING_DESC_F_NEXT, 1),
        ],
    );
    offer(&vq, &[0, 1]);
    let mut ring = ring(&vq);
    let (result, seen) = burst(&mut ring, &mem);
    assert_broken_tx(result, "chain loops");
    assert_eq!(seen.len(), 1, "only the good chain was handed on");
    assert_eq!(used(&vq), [(0, 0)], "the good chain is returned");
}

/// 2.7.5.3.1: no indirect table inside an indirect table. Before the fix
/// the walk stopped at the nested table and the part before it went out
/// as a (truncated) frame.
#[test]
fn regression_a_tx_indirect_table_inside_an_indirect_table_breaks_the_ring() {
    let mem = memory();
    write_table(&mem, INNER_TABLE, &[desc(BUF + 0x100, 100, 0, 0)]);
    write_table(
        &mem,
        TABLE,
        &[
            desc(BUF, HDR as u32, VRING_DESC_F_NEXT, 1),
            desc(INNER_TABLE, 16, VRING_DESC_F_INDIRECT, 0),
        ],
    );
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(&vq, &[desc(TABLE, 32, VRING_DESC_F_INDIRECT, 0)]);
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    let (result, seen) = burst(&mut ring, &mem);
    assert_broken_tx(result, "nests indirect tables");
    assert!(seen.is_empty());
}

/// A TX indirect table of more descriptors than the queue: before the fix
/// up to 2^16 descriptors were read into one frame.
#[test]
fn regression_a_tx_chain_longer_than_the_queue_breaks_the_ring() {
    let mem = memory();
    let count = 2 * QUEUE_SIZE;
    let entries: Vec<RawDescriptor> = (0..count)
        .map(|i| {
            let flags = if i + 1 < count { VRING_DESC_F_NEXT } else { 0 };
            desc(BUF + 8 * u64::from(i), 8, flags, i + 1)
        })
        .collect();
    write_table(&mem, TABLE, &entries);
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[desc(TABLE, 16 * u32::from(count), VRING_DESC_F_INDIRECT, 0)],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    let (result, _) = burst(&mut ring, &mem);
    assert_broken_tx(result, "more descriptors than the queue size");
}

/// 2.7.4 / 5.1.6.2: the device only reads device-readable buffers; a
/// writable one makes the chain unusable (returned, counted by the caller).
#[test]
fn a_device_writable_descriptor_makes_a_tx_chain_bad() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, HDR as u32, VRING_DESC_F_NEXT, 1),
            desc(BUF + 0x100, 64, VRING_DESC_F_WRITE, 0),
        ],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    let (result, seen) = burst(&mut ring, &mem);
    assert_eq!(result.unwrap(), 1);
    assert!(matches!(seen[0].0, TxChain::Bad { reason, .. } if reason.contains("device-writable")));
    assert_eq!(used(&vq), [(0, 0)]);
}

/// CVE-2018-1059's class: a TX buffer outside guest memory, straddling its
/// end, or whose end wraps past 2^64 is never read.
#[test]
fn tx_buffers_outside_guest_memory_make_the_chain_bad() {
    for (addr, len) in [
        (1u64 << 40, 100u32),
        (MEM_SIZE as u64 - 16, 64),
        (u64::MAX - 15, 64),
    ] {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        table(&vq, &[desc(addr, len, 0, 0)]);
        offer(&vq, &[0]);
        let mut ring = ring(&vq);
        let (result, seen) = burst(&mut ring, &mem);
        assert_eq!(result.unwrap(), 1, "{addr:#x}+{len}");
        assert!(
            matches!(seen[0].0, TxChain::Bad { reason, .. } if reason.contains("outside guest memory")),
            "{addr:#x}+{len}: {:?}",
            seen[0].0
        );
    }
}

/// A TX frame larger than any Ethernet frame (and lengths near u32::MAX)
/// makes the chain bad without reading past the host buffer.
#[test]
fn an_oversized_tx_frame_makes_the_chain_bad() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(
        &vq,
        &[
            desc(BUF, 0x8000, VRING_DESC_F_NEXT, 1),
            desc(BUF, 0xffff_0000, 0, 0),
        ],
    );
    offer(&vq, &[0]);
    let mut ring = ring(&vq);
    let (result, seen) = burst(&mut ring, &mem);
    assert_eq!(result.unwrap(), 1);
    assert!(matches!(seen[0].0, TxChain::Bad { reason, .. } if reason.contains("larger than")));
}

/// CVE-2022-2132's class: a header spread over twelve 1-byte descriptors
/// is gathered whole; a chain shorter than the header is handed on with its
/// length (the caller refuses it: "shorter than the virtio-net header").
#[test]
fn tx_headers_spread_over_tiny_buffers_or_too_short_are_handled_exactly() {
    let mem = memory();
    let header: Vec<u8> = (1..=HDR as u8).collect();
    let mut descs: Vec<RawDescriptor> = (0..HDR as u16)
        .map(|i| {
            mem.write_obj(
                header[usize::from(i)],
                GuestAddress(BUF + 0x100 * u64::from(i)),
            )
            .unwrap();
            desc(BUF + 0x100 * u64::from(i), 1, VRING_DESC_F_NEXT, i + 1)
        })
        .collect();
    mem.write_slice(&frame(60), GuestAddress(BUF + 0x2000))
        .unwrap();
    descs.push(desc(BUF + 0x2000, 60, 0, 0));
    descs.push(desc(BUF, 4, 0, 0));
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    table(&vq, &descs);
    offer(&vq, &[0, HDR as u16 + 1]);
    let mut ring = ring(&vq);
    let (result, seen) = burst(&mut ring, &mem);
    assert_eq!(result.unwrap(), 2);
    assert_eq!(
        seen[0].0,
        TxChain::Frame {
            head: 0,
            len: HDR + 60
        }
    );
    assert_eq!(&seen[0].1[..HDR], &header[..]);
    assert_eq!(&seen[0].1[HDR..], &frame(60)[..]);
    assert_eq!(
        seen[1].0,
        TxChain::Frame {
            head: HDR as u16 + 1,
            len: 4
        }
    );
}

/// A head beyond the descriptor table (2.7.6: heads are table indices).
#[test]
fn a_tx_head_beyond_the_table_breaks_the_ring() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    offer(&vq, &[QUEUE_SIZE + 5]);
    let mut ring = ring(&vq);
    let (result, _) = burst(&mut ring, &mem);
    assert_broken_tx(result, "head index beyond the queue size");
    assert_eq!(used(&vq), []);
}

#[test]
/// (This one held before the fix too: tx_burst took its avail iterator once
/// and virtio-queue refused the index with an error, not a log line.)
fn a_tx_avail_index_more_than_a_ring_ahead_is_an_error() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    vq.avail().idx().store(257);
    let mut ring = ring(&vq);
    let (result, _) = burst(&mut ring, &mem);
    assert!(
        matches!(result, Err(RingError::AvailIndex { ahead: 257, .. })),
        "{result:?}"
    );
}
