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

#[cfg(test)]
mod loopback_tests;
