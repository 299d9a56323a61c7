//! Descriptor chains into the net RX path: `NetRing::push_rx` delivers
//! frames into whatever RX chains the input put on a split ring. Nothing
//! may panic or hang; a delivered frame's used lengths add up to exactly
//! the header plus the frame, and each chain's used length is at most the
//! device-writable bytes this harness finds in it by a walk of its own (a
//! chain it finds looping or malformed must not be used at all: issue 18's
//! RX loop reported 112 bytes for 16); a frame that is not delivered
//! publishes nothing.

#![no_main]

#[path = "common/ring.rs"]
mod ring;

use libfuzzer_sys::fuzz_target;
use netdev::ring::{NetRing, RxOutcome};
use netdev::spec::HDR_LEN_MRG;
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let Some((params, image)) = ring::params(data) else {
        return;
    };
    let mem = ring::memory(image);
    let mem = mem.as_ref();
    let Some(queue) = ring::queue(mem, &params) else {
        return;
    };
    let mut ring = NetRing::new(queue);
    let mrg_rxbuf = params.extra & 1 != 0;
    // Up to four frames of lengths the input picks (up to 2 KiB).
    let frame: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
    for round in 0..4u8 {
        let len = usize::from(params.extra.rotate_left(u32::from(round) * 2)) * 8;
        let mut header = [0u8; HDR_LEN_MRG];
        let before = ring.queue.next_used();
        // What each offered chain can take, before the device writes
        // anything (its writes may land in the rings themselves).
        let capacity: std::collections::HashMap<u16, Option<u64>> =
            ring::avail_heads(mem, params.size, ring.queue.next_avail())
                .into_iter()
                .map(|head| (head, ring::writable_capacity(mem, params.size, head)))
                .collect();
        let Ok(outcome) = ring.push_rx(mem, &mut header, &frame[..len], mrg_rxbuf) else {
            break;
        };
        let Ok(wrote) = ring.publish(mem) else {
            break;
        };
        let published = ring.queue.next_used().wrapping_sub(before);
        if wrote {
            assert_eq!(
                ring::used_idx(mem),
                ring.queue.next_used(),
                "published index"
            );
        }
        match outcome {
            RxOutcome::Delivered { buffers } => {
                assert_eq!(published, buffers, "used entries for one frame");
                let total: u64 = (0..published)
                    .map(|slot| {
                        u64::from(ring::used_len(mem, params.size, before.wrapping_add(slot)))
                    })
                    .sum();
                assert_eq!(
                    total,
                    (HDR_LEN_MRG + len) as u64,
                    "used lengths of one frame"
                );
                for slot in 0..published {
                    let slot = before.wrapping_add(slot);
                    let id = ring::used_id(mem, params.size, slot);
                    let used = u64::from(ring::used_len(mem, params.size, slot));
                    let offered = u16::try_from(id)
                        .ok()
                        .and_then(|head| capacity.get(&head).copied().flatten());
                    assert!(
                        offered.is_some_and(|offered| used <= offered),
                        "head {id}: used length {used}, writable {offered:?}"
                    );
                }
            }
            RxOutcome::NoBuffers | RxOutcome::TooBig => {
                assert_eq!(published, 0, "an undelivered frame published entries")
            }
        }
    }
});
