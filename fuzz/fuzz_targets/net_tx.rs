//! Descriptor chains into the net TX path: `NetRing::tx_burst` over
//! whatever the input put on a split ring. Nothing may panic or hang; a
//! frame is never longer than the host buffer; every chain taken is
//! returned with used length 0 (TX writes nothing into the guest).

#![no_main]

#[path = "common/ring.rs"]
mod ring;

use libfuzzer_sys::fuzz_target;
use netdev::ring::{NetRing, TxChain};
use netdev::spec::{HDR_LEN_MRG, MAX_FRAME_LEN};
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
    let used_before = ring.queue.next_used();
    let mut buf = vec![0u8; HDR_LEN_MRG + MAX_FRAME_LEN];
    let capacity = buf.len();
    let max = usize::from(params.extra % 32) + 1;
    let mut seen = 0usize;
    let result = ring.tx_burst(mem, &mut buf, max, |chain, _| {
        seen += 1;
        if let TxChain::Frame { len, .. } = chain {
            assert!(len <= capacity, "a frame of {len} bytes");
        }
    });
    if let Ok(taken) = result {
        assert_eq!(taken, seen);
        assert!(taken <= max);
    }
    if ring.publish(mem).unwrap_or(false) {
        let published = ring.queue.next_used().wrapping_sub(used_before);
        assert_eq!(
            ring::used_idx(mem),
            ring.queue.next_used(),
            "published index"
        );
        assert!(usize::from(published) <= seen);
        for slot in 0..published {
            let len = ring::used_len(mem, params.size, used_before.wrapping_add(slot));
            assert_eq!(len, 0, "TX used length");
        }
    }
});
