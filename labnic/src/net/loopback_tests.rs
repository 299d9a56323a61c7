//! The loopback driven in-process: the lab front-end's driver rings on one
//! side, this device's rings on the other, over plain memory.

use std::ops::Deref;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::driver::{test_frame, DriverRing, RingLayout};
use crate::uapi::VqInfo;

const Q: u16 = 16;
const BASE: u64 = 0x10000;
const RX_BUFS: u64 = 0x40000;
const TX_BUFS: u64 = 0x60000;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

struct Rig {
    mem: Memory,
    driver_rx: DriverRing,
    driver_tx: DriverRing,
    rx: Ring,
    tx: Ring,
    buf: Vec<u8>,
    counters: PairCounters,
}

fn device_ring(mem: &Memory, index: u32, layout: RingLayout, event_idx: bool) -> Ring {
    let info = VqInfo {
        index,
        num: u32::from(Q),
        desc_addr: layout.desc.raw_value(),
        driver_addr: layout.avail.raw_value(),
        device_addr: layout.used.raw_value(),
        avail_index: 0,
        ready: true,
    };
    Ring::start(&info, mem, Q, event_idx).unwrap()
}

fn rig() -> Rig {
    rig_with(false)
}

fn rig_with(event_idx: bool) -> Rig {
    let mem = Memory::from_ranges(&[(GuestAddress(BASE), 0x80000)]).unwrap();
    let rx_layout = RingLayout::new(GuestAddress(BASE), Q);
    let tx_layout = RingLayout::new(GuestAddress(BASE + 0x8000), Q);
    Rig {
        driver_rx: DriverRing::new(&mem, 0, Q, rx_layout, event_idx).unwrap(),
        driver_tx: DriverRing::new(&mem, 1, Q, tx_layout, event_idx).unwrap(),
        rx: device_ring(&mem, 0, rx_layout, event_idx),
        tx: device_ring(&mem, 1, tx_layout, event_idx),
        mem,
        buf: vec![0u8; MAX_CHAIN_BYTES],
        counters: PairCounters::default(),
    }
}

impl Rig {
    fn post_rx(&mut self, slot: u16, len: u32) {
        let addr = GuestAddress(RX_BUFS + 2048 * u64::from(slot));
        self.driver_rx
            .post(&self.mem, slot, addr, len, true)
            .unwrap();
        self.driver_rx.publish(&self.mem).unwrap();
    }

    fn send(&mut self, slot: u16, frame: &[u8]) {
        let addr = GuestAddress(TX_BUFS + 2048 * u64::from(slot));
        self.mem.write_slice(&[0u8; NET_HDR_LEN], addr).unwrap();
        self.mem
            .write_slice(frame, addr.unchecked_add(NET_HDR_LEN as u64))
            .unwrap();
        let len = (NET_HDR_LEN + frame.len()) as u32;
        self.driver_tx
            .post(&self.mem, slot, addr, len, false)
            .unwrap();
        self.driver_tx.publish(&self.mem).unwrap();
    }

    fn forward(&mut self, mrg_rxbuf: bool) -> Pass {
        forward(
            &mut self.tx,
            &mut self.rx,
            &self.mem,
            mrg_rxbuf,
            &mut self.buf,
            &mut self.counters,
        )
        .unwrap()
    }

    /// Used RX entries: (slot, bytes) and the bytes of each buffer.
    fn received(&mut self) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((slot, len)) = self.driver_rx.pop_used(&self.mem).unwrap() {
            let mut data = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(RX_BUFS + 2048 * u64::from(slot)))
                .unwrap();
            out.push((slot, data));
        }
        out
    }

    fn tx_used(&mut self) -> usize {
        let mut n = 0;
        while self.driver_tx.pop_used(&self.mem).unwrap().is_some() {
            n += 1;
        }
        n
    }

    fn dirty(&self, addr: u64) -> bool {
        let region = self.mem.find_region(GuestAddress(addr)).unwrap();
        region.deref().bitmap().is_addr_set((addr - BASE) as usize)
    }
}

#[test]
fn frames_come_back_in_order_behind_a_fresh_header() {
    let mut rig = rig();
    for slot in 0..4 {
        rig.post_rx(slot, 2048);
    }
    let frames: Vec<Vec<u8>> = (0..3).map(|seq| test_frame(0, seq, MAC)).collect();
    for (slot, frame) in frames.iter().enumerate() {
        rig.send(slot as u16, frame);
    }
    let pass = rig.forward(false);
    assert_eq!(pass.frames, 3);
    assert!(pass.tx_idle && pass.tx_used && pass.rx_used);
    let got = rig.received();
    assert_eq!(got.len(), 3);
    for ((slot, data), (i, frame)) in got.iter().zip(frames.iter().enumerate()) {
        assert_eq!(usize::from(*slot), i, "RX buffers are used in order");
        assert_eq!(&data[..NUM_BUFFERS_OFFSET], &[0u8; NUM_BUFFERS_OFFSET]);
        assert_eq!(&data[NUM_BUFFERS_OFFSET..NET_HDR_LEN], &1u16.to_le_bytes());
        assert_eq!(&data[NET_HDR_LEN..], &frame[..]);
    }
    assert_eq!(rig.tx_used(), 3);
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    assert_eq!(rig.counters.tx_frames, 3);
    assert_eq!(rig.counters.rx_frames, 3);
    assert_eq!(rig.counters.tx_bytes, bytes);
    assert_eq!(rig.counters.rx_bytes, bytes);
}

#[test]
fn without_rx_buffers_a_frame_waits_on_the_tx_ring() {
    let mut rig = rig();
    rig.send(0, &test_frame(0, 0, MAC));
    rig.send(1, &test_frame(0, 1, MAC));
    let pass = rig.forward(true);
    assert!(pass.rx_starved && !pass.tx_idle);
    assert_eq!(pass.frames, 0);
    assert_eq!(rig.tx_used(), 0, "nothing taken off the TX ring");
    assert_eq!(rig.counters.rx_stalls, 1);
    assert_eq!(rig.tx.next_avail(), 0);
    rig.post_rx(0, 2048);
    rig.post_rx(1, 2048);
    let pass = rig.forward(true);
    assert_eq!(pass.frames, 2);
    assert_eq!(rig.received().len(), 2);
    assert_eq!(rig.tx_used(), 2);
    assert_eq!(rig.counters.rx_dropped, 0);
}

#[test]
fn merged_buffers_carry_a_large_frame_and_count_themselves() {
    let mut rig = rig();
    for slot in 0..4 {
        rig.post_rx(slot, 512);
    }
    let frame: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
    rig.send(0, &frame);
    assert_eq!(rig.forward(true).frames, 1);
    let got = rig.received();
    let lens: Vec<usize> = got.iter().map(|(_, d)| d.len()).collect();
    assert_eq!(lens, vec![512, 512, 488]);
    assert_eq!(
        &got[0].1[NUM_BUFFERS_OFFSET..NET_HDR_LEN],
        &3u16.to_le_bytes()
    );
    let joined: Vec<u8> = got.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    assert_eq!(&joined[NET_HDR_LEN..], &frame[..]);
    assert_eq!(rig.counters.rx_buffers, 3);
}

#[test]
fn without_merged_buffers_a_frame_too_big_is_dropped_and_the_buffer_kept() {
    let mut rig = rig();
    rig.post_rx(0, 512);
    rig.send(0, &[0xaa; 1500]);
    rig.forward(false);
    assert_eq!(rig.counters.rx_dropped, 1);
    assert_eq!(rig.tx_used(), 1, "the TX chain is returned");
    assert!(rig.received().is_empty());
    let small = test_frame(0, 9, MAC);
    rig.send(1, &small[..100]);
    rig.forward(false);
    let got = rig.received();
    assert_eq!(got.len(), 1, "the same RX buffer takes the next frame");
    assert_eq!(&got[0].1[NET_HDR_LEN..], &small[..100]);
}

#[test]
fn device_writes_land_in_the_dirty_bitmap_and_reads_do_not() {
    let mut rig = rig();
    rig.post_rx(0, 2048);
    rig.send(0, &test_frame(0, 0, MAC));
    // Clear what the driver's own set-up wrote.
    let region = rig.mem.find_region(GuestAddress(BASE)).unwrap();
    region.deref().bitmap().reset();
    rig.forward(false);
    assert!(rig.dirty(RX_BUFS), "the RX buffer");
    assert!(rig.dirty(rig.rx_used_ring()), "the RX used ring");
    assert!(rig.dirty(rig.tx_used_ring()), "the TX used ring");
    assert!(!rig.dirty(TX_BUFS), "the TX buffer is only read");
}

#[test]
fn an_avail_index_more_than_a_ring_ahead_stops_the_pair() {
    let mut rig = rig();
    rig.post_rx(0, 2048);
    // The driver claims Q + 1 entries: more than the ring holds.
    let avail_idx = rig.driver_tx.layout().avail.unchecked_add(2);
    rig.mem.write_obj((Q + 1).to_le(), avail_idx).unwrap();
    let err = forward(
        &mut rig.tx,
        &mut rig.rx,
        &rig.mem,
        false,
        &mut rig.buf,
        &mut rig.counters,
    )
    .unwrap_err();
    assert!(
        matches!(err, RingError::AvailIndex { index: 1, .. }),
        "{err}"
    );
    assert_eq!(rig.counters.tx_frames, 0);
}

#[test]
fn with_event_idx_kicks_and_interrupts_follow_the_event_indices() {
    let mut rig = rig_with(true);
    for slot in 0..4 {
        rig.post_rx(slot, 2048);
    }
    rig.send(0, &test_frame(0, 0, MAC));
    assert!(rig.forward(false).tx_idle);
    // used_event is 0 (fresh ring): entry 0 passes it.
    assert!(rig.rx.needs_interrupt(&rig.mem).unwrap());
    assert!(!rig.rx.needs_interrupt(&rig.mem).unwrap(), "nothing new");
    // The driver reaps and, finding the ring empty, asks at 1.
    assert_eq!(rig.received().len(), 1);

    // Going to sleep, the device asks for a kick at its next entry (1):
    // the driver's entry 1 kicks, its entry 2 (the device not having
    // asked again) does not.
    assert!(!rig.tx.enable_kicks(&rig.mem).unwrap());
    rig.driver_tx
        .post(&rig.mem, 1, GuestAddress(TX_BUFS + 2048), 72, false)
        .unwrap();
    assert!(
        rig.driver_tx.publish(&rig.mem).unwrap(),
        "entry 1 passes avail_event 1"
    );
    rig.driver_tx
        .post(&rig.mem, 2, GuestAddress(TX_BUFS + 4096), 72, false)
        .unwrap();
    assert!(
        !rig.driver_tx.publish(&rig.mem).unwrap(),
        "avail_event is still 1"
    );

    // Both frames move in one burst: it passes used_event 1.
    assert_eq!(rig.forward(false).frames, 2);
    assert!(rig.rx.needs_interrupt(&rig.mem).unwrap());
    // The driver has not reaped (used_event still 1): the next frame
    // raises no interrupt.
    rig.send(3, &test_frame(0, 3, MAC));
    assert_eq!(rig.forward(false).frames, 1);
    assert!(!rig.rx.needs_interrupt(&rig.mem).unwrap());
    assert_eq!(rig.received().len(), 3);
}

#[test]
fn without_event_idx_no_interrupt_flag_silences_the_device() {
    let mut rig = rig();
    rig.post_rx(0, 2048);
    rig.post_rx(1, 2048);
    rig.send(0, &test_frame(0, 0, MAC));
    rig.forward(false);
    assert!(rig.rx.needs_interrupt(&rig.mem).unwrap());
    // The driver sets VRING_AVAIL_F_NO_INTERRUPT on its RX ring.
    rig.mem
        .write_obj(1u16.to_le(), rig.driver_rx.layout().avail)
        .unwrap();
    rig.send(1, &test_frame(0, 1, MAC));
    rig.forward(false);
    assert!(!rig.rx.needs_interrupt(&rig.mem).unwrap());
    assert_eq!(rig.received().len(), 2);
}

impl Rig {
    fn rx_used_ring(&self) -> u64 {
        self.driver_rx.layout().used.raw_value()
    }
    fn tx_used_ring(&self) -> u64 {
        self.driver_tx.layout().used.raw_value()
    }
}
