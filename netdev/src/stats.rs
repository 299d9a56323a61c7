//! Per queue pair packet counters, shared between the data path (which
//! adds a burst at a time) and the control API (which reads them).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one queue pair. RX is toward the guest, TX from it.
#[derive(Debug, Default)]
pub struct PairStats {
    /// Frames written into the guest's RX buffers.
    pub rx_packets: AtomicU64,
    /// Their bytes (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames for the guest that were dropped: no RX buffer posted, ring
    /// not running, or too big for the buffers.
    pub rx_dropped: AtomicU64,
    /// Frames taken from the guest's TX ring.
    pub tx_packets: AtomicU64,
    /// Their bytes (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// TX frames the dataplane had no room for.
    pub tx_dropped: AtomicU64,
    /// TX chains that were malformed and returned unused.
    pub tx_errors: AtomicU64,
}

/// A snapshot of [`PairStats`] for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PairCounts {
    /// See [`PairStats::rx_packets`].
    pub rx_packets: u64,
    /// See [`PairStats::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`PairStats::rx_dropped`].
    pub rx_dropped: u64,
    /// See [`PairStats::tx_packets`].
    pub tx_packets: u64,
    /// See [`PairStats::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`PairStats::tx_dropped`].
    pub tx_dropped: u64,
    /// See [`PairStats::tx_errors`].
    pub tx_errors: u64,
}

impl PairStats {
    /// Add a burst's worth of counts.
    pub fn add(&self, counts: &PairCounts) {
        let add = |counter: &AtomicU64, n: u64| {
            if n != 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&self.rx_packets, counts.rx_packets);
        add(&self.rx_bytes, counts.rx_bytes);
        add(&self.rx_dropped, counts.rx_dropped);
        add(&self.tx_packets, counts.tx_packets);
        add(&self.tx_bytes, counts.tx_bytes);
        add(&self.tx_dropped, counts.tx_dropped);
        add(&self.tx_errors, counts.tx_errors);
    }

    /// Read the counters.
    pub fn snapshot(&self) -> PairCounts {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PairCounts {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_errors: get(&self.tx_errors),
        }
    }
}

impl PairCounts {
    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        *self == PairCounts::default()
    }
}
