//! One phase of traffic through a net device and its tap, both ways, with
//! everything counted on both sides: frames sent on every TX ring must
//! come out of the tap (the tap's own counter, and intact on a packet
//! socket), frames injected into the tap must arrive on the RX rings, each
//! on the pair whose flow it belongs to.

use std::time::{Duration, Instant};

use super::driver::NetGuest;
use super::frames::{self, Direction};
use super::report::Report;
use super::tapside::{PacketSocket, TapCounters};

/// How long nothing may move before a phase gives up.
pub const STALL: Duration = Duration::from_secs(15);
/// Frames injected per pair before waiting for them (well below the tap's
/// queue of 500 and a ring of posted buffers).
const RX_BATCH: u64 = 128;

/// What one phase moved.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    /// Per pair: frames the device took off the TX ring.
    pub tx_taken: Vec<u64>,
    /// Frames that came out of the tap (its rx_packets).
    pub tx_out_of_tap: u64,
    /// Of those, intact frames of ours seen on the packet socket.
    pub tx_seen_intact: u64,
    /// Per pair: frames injected for its flow.
    pub rx_injected: Vec<u64>,
    /// Per pair: intact frames of ours that arrived on its RX ring.
    pub rx_arrived: Vec<u64>,
    /// Arrived on the ring of the pair their flow belongs to.
    pub rx_on_own_pair: u64,
    /// Frames on RX rings that were not intact frames of ours.
    pub rx_foreign: u64,
    /// Frames the tap dropped on the way to a queue.
    pub tap_tx_dropped: u64,
    /// Every RX buffer the device wrote: guest address and length.
    pub rx_written: Vec<(u64, u32)>,
    /// Seconds the TX half took.
    pub tx_seconds: f64,
    /// Seconds the RX half took.
    pub rx_seconds: f64,
}

impl Phase {
    /// Every count as `LAB-RESULT prefix...` lines.
    pub fn report(&self, report: &mut Report, prefix: &str) {
        for (pair, (taken, (injected, arrived))) in self
            .tx_taken
            .iter()
            .zip(self.rx_injected.iter().zip(&self.rx_arrived))
            .enumerate()
        {
            report.put(&format!("{prefix}q{pair}_tx"), taken);
            report.put(&format!("{prefix}q{pair}_rx_injected"), injected);
            report.put(&format!("{prefix}q{pair}_rx"), arrived);
        }
        report.put(&format!("{prefix}tx"), self.tx_taken.iter().sum::<u64>());
        report.put(&format!("{prefix}tx_out_of_tap"), self.tx_out_of_tap);
        report.put(&format!("{prefix}tx_seen_intact"), self.tx_seen_intact);
        report.put(
            &format!("{prefix}rx_injected"),
            self.rx_injected.iter().sum::<u64>(),
        );
        report.put(&format!("{prefix}rx"), self.rx_arrived.iter().sum::<u64>());
        report.put(&format!("{prefix}rx_on_own_pair"), self.rx_on_own_pair);
        report.put(&format!("{prefix}rx_foreign"), self.rx_foreign);
        report.put(&format!("{prefix}tap_tx_dropped"), self.tap_tx_dropped);
    }

    /// Whether everything sent arrived, both ways, intact.
    pub fn complete(&self) -> bool {
        let tx: u64 = self.tx_taken.iter().sum();
        let injected: u64 = self.rx_injected.iter().sum();
        let arrived: u64 = self.rx_arrived.iter().sum();
        self.tx_out_of_tap == tx
            && self.tx_seen_intact == tx
            && arrived == injected
            && self.rx_foreign == 0
    }
}

/// Count the intact TX frames of ours waiting on `watch`.
fn drain_tx(watch: &PacketSocket, wait: Duration) -> u64 {
    let mut seen = 0;
    while let Ok(Some(frame)) = watch.recv_incoming(wait) {
        if frames::parse(&frame).is_some_and(|t| t.direction == Direction::Tx as u8) {
            seen += 1;
        }
    }
    seen
}

/// `frames` TX frames of `len` bytes per pair out of `tap`, then `frames`
/// injected per pair (in batches, each flow first taught to the tap by a
/// TX frame of its pair, so the tap steers it to that pair's queue) onto
/// the RX rings, counting every frame on both sides. `pairs` limits the
/// pairs used (disabled ones are left alone); RX frames are looked for on
/// every enabled pair's ring.
pub fn run(
    guest: &mut NetGuest,
    tap: &str,
    pairs: &[usize],
    frames: u64,
    len: usize,
) -> Result<Phase, String> {
    let all = guest.pairs;
    let mut phase = Phase {
        tx_taken: vec![0; all],
        rx_injected: vec![0; all],
        rx_arrived: vec![0; all],
        ..Phase::default()
    };
    let watch = PacketSocket::open(tap, true).map_err(|e| format!("watch {tap}: {e}"))?;
    let inject = PacketSocket::open(tap, false).map_err(|e| format!("inject {tap}: {e}"))?;
    let before = TapCounters::read(tap).map_err(|e| e.to_string())?;

    let started = Instant::now();
    for &pair in pairs {
        phase.tx_taken[pair] += guest.send(pair, frames, len, STALL);
        phase.tx_seen_intact += drain_tx(&watch, Duration::ZERO);
    }
    phase.tx_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut rx_seq = vec![0u32; all];
    let mut left = frames;
    while left > 0 {
        let batch = left.min(RX_BATCH);
        for &pair in pairs {
            guest.fill_rx(pair);
            phase.tx_taken[pair] += guest.send(pair, 1, len, STALL);
        }
        for &pair in pairs {
            for _ in 0..batch {
                let frame = frames::frame(Direction::Rx, pair as u16, rx_seq[pair], len);
                inject
                    .send(&frame)
                    .map_err(|e| format!("inject into {tap}: {e}"))?;
                rx_seq[pair] += 1;
                phase.rx_injected[pair] += 1;
            }
        }
        let want = (batch * pairs.len() as u64) as usize;
        let got = guest.receive(want, STALL);
        for received in &got {
            phase.rx_written.push((received.addr, received.len));
            match received.tag {
                Some(tag) if tag.direction == Direction::Rx as u8 => {
                    phase.rx_arrived[received.pair] += 1;
                    if usize::from(tag.pair) == received.pair {
                        phase.rx_on_own_pair += 1;
                    }
                }
                _ => phase.rx_foreign += 1,
            }
        }
        phase.tx_seen_intact += drain_tx(&watch, Duration::ZERO);
        if got.len() < want {
            println!(
                "lab-frontend: {tap}: {} of {want} injected frames arrived; giving up",
                got.len()
            );
            break;
        }
        left -= batch;
    }
    phase.rx_seconds = started.elapsed().as_secs_f64();
    phase.tx_seen_intact += drain_tx(&watch, Duration::from_millis(200));
    let after = TapCounters::read(tap).map_err(|e| e.to_string())?;
    let delta = after.since(&before);
    phase.tx_out_of_tap = delta.rx_packets;
    phase.tap_tx_dropped = delta.tx_dropped;
    Ok(phase)
}

/// Inject `count` frames of pair `flow`'s flow into `tap` without teaching
/// the tap that flow first, and collect them from every RX ring: per pair,
/// how many of ours arrived there (a disabled pair's tap queue is
/// detached, so its flow must land on the others).
pub fn inject_only(
    guest: &mut NetGuest,
    tap: &str,
    flow: usize,
    count: u64,
    len: usize,
) -> Result<Vec<u64>, String> {
    let inject = PacketSocket::open(tap, false).map_err(|e| format!("inject {tap}: {e}"))?;
    let mut arrived = vec![0; guest.pairs];
    let mut left = count;
    let mut seq = 1 << 30;
    while left > 0 {
        let batch = left.min(RX_BATCH);
        for _ in 0..batch {
            let frame = frames::frame(Direction::Rx, flow as u16, seq, len);
            inject
                .send(&frame)
                .map_err(|e| format!("inject into {tap}: {e}"))?;
            seq += 1;
        }
        let got = guest.receive(batch as usize, STALL);
        for received in &got {
            if received
                .tag
                .is_some_and(|t| t.direction == Direction::Rx as u8)
            {
                arrived[received.pair] += 1;
            }
        }
        if got.len() < batch as usize {
            break;
        }
        left -= batch;
    }
    Ok(arrived)
}
