//! The virtio-net side of the NIC: features, configuration space, and the
//! loopback that reflects every frame a queue pair transmits into that
//! pair's receive queue (like the agent's `loop` dataplane).
//!
//! The loop is lossless: a TX chain is taken only when the frame can be
//! delivered; while the RX ring has no room the frame stays on the TX ring
//! and the pair waits for the driver to post RX buffers (a kick). A frame
//! that can never fit (no merged buffers, a chain too small) is dropped
//! and counted.

use crate::memory::Memory;
use crate::ring::{Ring, RingError, RxOutcome, TxFrame};

/// VIRTIO_NET_F_MTU.
pub const F_MTU: u64 = 1 << 3;
/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_MRG_RXBUF.
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// VIRTIO_NET_F_STATUS.
pub const F_STATUS: u64 = 1 << 16;
/// VIRTIO_NET_F_CTRL_VQ (VDUSE refuses it: no control virtqueue).
pub const F_CTRL_VQ: u64 = 1 << 17;
/// VIRTIO_NET_F_MQ.
pub const F_MQ: u64 = 1 << 22;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_ACCESS_PLATFORM (VDUSE requires it).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// The virtio-net header with VERSION_1 (`struct virtio_net_hdr_v1`).
pub const NET_HDR_LEN: usize = 12;
/// Where `num_buffers` sits in it.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest frame handled, header included (64 KiB GSO frames fit).
pub const MAX_CHAIN_BYTES: usize = 65_562 + NET_HDR_LEN;
/// Frames moved per pair before the used rings are published.
pub const BURST: usize = 64;

/// VIRTIO_NET_S_LINK_UP.
const S_LINK_UP: u16 = 1;

/// The device as it is offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC in the configuration space.
    pub mac: [u8; 6],
    /// MTU in the configuration space (VIRTIO_NET_F_MTU).
    pub mtu: u16,
    /// Queue pairs (VIRTIO_NET_F_MQ when more than one).
    pub queue_pairs: u16,
    /// Largest ring size per queue.
    pub queue_size: u16,
    /// Offer VIRTIO_NET_F_MRG_RXBUF.
    pub mrg_rxbuf: bool,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

impl NetConfig {
    /// The virtio features offered.
    pub fn features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_ACCESS_PLATFORM | F_MAC | F_MTU | F_STATUS | F_INDIRECT_DESC;
        if self.queue_pairs > 1 {
            f |= F_MQ;
        }
        if self.mrg_rxbuf {
            f |= F_MRG_RXBUF;
        }
        if self.event_idx {
            f |= F_EVENT_IDX;
        }
        f
    }

    /// `struct virtio_net_config` up to `mtu` (little endian, VERSION_1):
    /// mac, status (link up), max_virtqueue_pairs, mtu.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(12);
        c.extend_from_slice(&self.mac);
        c.extend_from_slice(&S_LINK_UP.to_le_bytes());
        c.extend_from_slice(&self.queue_pairs.to_le_bytes());
        c.extend_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Virtqueues: an RX and a TX queue per pair (receiveq N = 2N,
    /// transmitq N = 2N + 1).
    pub fn vq_count(&self) -> u32 {
        2 * u32::from(self.queue_pairs)
    }
}

/// What the driver accepted, as the data path needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// The full feature word.
    pub features: u64,
    /// Merged RX buffers.
    pub mrg_rxbuf: bool,
    /// Event index notification suppression.
    pub event_idx: bool,
}

impl Negotiated {
    /// Decode a feature word.
    pub fn from_features(features: u64) -> Negotiated {
        Negotiated {
            features,
            mrg_rxbuf: features & F_MRG_RXBUF != 0,
            event_idx: features & F_EVENT_IDX != 0,
        }
    }
}

/// Frame counters of one queue pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairCounters {
    /// Frames taken from the TX ring (header excluded from bytes).
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames written into the RX ring.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// RX chains used (more than rx_frames with merged buffers).
    pub rx_buffers: u64,
    /// Frames dropped because no RX chain could ever hold them.
    pub rx_dropped: u64,
    /// TX chains that held no usable frame.
    pub tx_errors: u64,
    /// Times the pair waited for RX buffers with a frame pending.
    pub rx_stalls: u64,
}

/// How one forwarding pass ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Frames moved (or dropped).
    pub frames: usize,
    /// The TX ring is empty.
    pub tx_idle: bool,
    /// A frame waits for RX buffers.
    pub rx_starved: bool,
    /// TX used entries were published.
    pub tx_used: bool,
    /// RX used entries were published.
    pub rx_used: bool,
}

/// Move up to [`BURST`] frames from `tx` into `rx`, then publish both
/// rings' used entries. `buf` must hold [`MAX_CHAIN_BYTES`].
pub fn forward(
    tx: &mut Ring,
    rx: &mut Ring,
    memory: &Memory,
    mrg_rxbuf: bool,
    buf: &mut [u8],
    counters: &mut PairCounters,
) -> Result<Pass, RingError> {
    let mut pass = Pass::default();
    while pass.frames < BURST {
        // The avail index is checked on both rings each time: a driver's
        // index more than a ring ahead stops the pair (RingError).
        if !tx.has_avail(memory)? {
            pass.tx_idle = true;
            break;
        }
        if !rx.has_avail(memory)? {
            counters.rx_stalls += 1;
            pass.rx_starved = true;
            break;
        }
        let Some(taken) = tx.pop_tx(memory, buf) else {
            pass.tx_idle = true;
            break;
        };
        let len = match taken {
            TxFrame::Bad { .. } => {
                counters.tx_errors += 1;
                continue;
            }
            TxFrame::Frame { len, .. } if len < NET_HDR_LEN => {
                counters.tx_errors += 1;
                continue;
            }
            TxFrame::Frame { len, .. } => len,
        };
        let frame = &buf[NET_HDR_LEN..len];
        // A fresh header: no offloads are offered, so no flags or GSO.
        let mut header = [0u8; NET_HDR_LEN];
        match rx.push_rx(memory, &mut header, frame, mrg_rxbuf, NUM_BUFFERS_OFFSET) {
            RxOutcome::Delivered(buffers) => {
                counters.tx_frames += 1;
                counters.tx_bytes += frame.len() as u64;
                counters.rx_frames += 1;
                counters.rx_bytes += frame.len() as u64;
                counters.rx_buffers += u64::from(buffers);
            }
            RxOutcome::TooBig => {
                counters.tx_frames += 1;
                counters.tx_bytes += frame.len() as u64;
                counters.rx_dropped += 1;
            }
            RxOutcome::NoBuffers => {
                tx.unpop_tx();
                counters.rx_stalls += 1;
                pass.rx_starved = true;
                break;
            }
        }
        pass.frames += 1;
    }
    pass.tx_used = tx.publish(memory)?;
    pass.rx_used = rx.publish(memory)?;
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_follow_the_configuration() {
        let mut config = NetConfig {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            mtu: 1500,
            queue_pairs: 1,
            queue_size: 256,
            mrg_rxbuf: true,
            event_idx: false,
        };
        let f = config.features();
        assert_ne!(f & F_VERSION_1, 0);
        assert_ne!(f & F_ACCESS_PLATFORM, 0, "VDUSE requires ACCESS_PLATFORM");
        assert_eq!(f & F_CTRL_VQ, 0, "VDUSE refuses a control virtqueue");
        assert_eq!(f & F_MQ, 0);
        assert_eq!(f & F_EVENT_IDX, 0);
        config.queue_pairs = 4;
        assert_ne!(config.features() & F_MQ, 0);
        assert_eq!(config.vq_count(), 8);
    }

    #[test]
    fn config_space_is_little_endian_mac_status_pairs_mtu() {
        let config = NetConfig {
            mac: [1, 2, 3, 4, 5, 6],
            mtu: 9000,
            queue_pairs: 2,
            queue_size: 256,
            mrg_rxbuf: false,
            event_idx: false,
        };
        assert_eq!(
            config.config_space(),
            vec![1, 2, 3, 4, 5, 6, 1, 0, 2, 0, 0x28, 0x23]
        );
    }
}

/// The loopback driven in-process: the lab front-end's driver rings on one
/// side, this device's rings on the other, over plain memory.
#[cfg(test)]
mod loopback_tests {
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

    fn device_ring(mem: &Memory, index: u32, layout: RingLayout) -> Ring {
        let info = VqInfo {
            index,
            num: u32::from(Q),
            desc_addr: layout.desc.raw_value(),
            driver_addr: layout.avail.raw_value(),
            device_addr: layout.used.raw_value(),
            avail_index: 0,
            ready: true,
        };
        Ring::start(&info, mem, Q, false).unwrap()
    }

    fn rig() -> Rig {
        let mem = Memory::from_ranges(&[(GuestAddress(BASE), 0x80000)]).unwrap();
        let rx_layout = RingLayout::new(GuestAddress(BASE), Q);
        let tx_layout = RingLayout::new(GuestAddress(BASE + 0x8000), Q);
        Rig {
            driver_rx: DriverRing::new(&mem, 0, Q, rx_layout).unwrap(),
            driver_tx: DriverRing::new(&mem, 1, Q, tx_layout).unwrap(),
            rx: device_ring(&mem, 0, rx_layout),
            tx: device_ring(&mem, 1, tx_layout),
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

    impl Rig {
        fn rx_used_ring(&self) -> u64 {
            self.driver_rx.layout().used.raw_value()
        }
        fn tx_used_ring(&self) -> u64 {
            self.driver_tx.layout().used.raw_value()
        }
    }
}
