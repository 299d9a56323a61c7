//! Putting three kinds of clocks on one axis: the orchestrator's
//! monotonic clock (the reference, zero when `migrate` was sent), QEMU's
//! event stamps, and each agent device's timeline.
//!
//! * QEMU stamps its QMP events with its host's wall clock (microseconds
//!   since the Unix epoch). The orchestrator reads its own wall clock and
//!   its monotonic clock back to back and maps a stamp through that pair.
//!   On one host both read the same wall clock, so the mapping is exact to
//!   the microsecond (unless the wall clock is stepped during the run); on
//!   two hosts it is as good as their clock synchronisation, which the
//!   orchestrator cannot measure. The time the orchestrator received the
//!   event bounds it from above, and is kept next to it.
//! * An agent device's timeline counts microseconds from the device's own
//!   creation (its monotonic clock), and `query-metrics` reports the
//!   device's clock (`now-us`) when it answered. That reading was taken
//!   between the orchestrator sending the request and reading the reply,
//!   so the device's zero lies at `midpoint - now-us`, give or take half
//!   the round trip. Samples are taken before and after the migration;
//!   the one with the shorter round trip places the device, and the two
//!   must agree to within the sum of their half round trips (monotonic
//!   clocks of two hosts drift by parts per million, nothing over a
//!   migration).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Milliseconds from `from` to `to`, negative when `to` is earlier.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(from.duration_since(to).as_secs_f64() * 1e3),
    }
}

/// The orchestrator's reference clock.
#[derive(Clone, Copy, Debug)]
pub struct Reference {
    /// Zero of the axis: when `migrate` was sent.
    pub zero: Instant,
    /// The wall clock (µs since the epoch) read right after `wall_at`.
    wall_us: i64,
    /// The monotonic clock read right before `wall_us`.
    wall_at: Instant,
}

impl Reference {
    /// The axis with its zero at `zero`, and the wall clock read now.
    pub fn new(zero: Instant) -> Reference {
        let wall_at = Instant::now();
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Reference {
            zero,
            wall_us,
            wall_at,
        }
    }

    /// Where `instant` (the orchestrator's clock) lies on the axis, in ms.
    pub fn at(&self, instant: Instant) -> f64 {
        signed_ms(self.zero, instant)
    }

    /// Where a QEMU stamp (µs since the epoch) lies on the axis, in ms.
    pub fn at_wall(&self, stamp_us: i64) -> f64 {
        let since = stamp_us.saturating_sub(self.wall_us) as f64 / 1e3;
        self.at(self.wall_at) + since
    }
}

/// One `query-metrics` reading of a device's clock: the orchestrator's
/// clock before the request and after the reply, the device's in between.
#[derive(Clone, Copy, Debug)]
pub struct ClockReading {
    /// Before the request was sent.
    pub sent: Instant,
    /// After the reply was read.
    pub received: Instant,
    /// The device's `now-us`.
    pub device_us: u64,
}

/// How a device's timeline is placed on the axis.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceClock {
    /// Where the device's zero lies on the axis, in ms.
    pub zero_ms: f64,
    /// Half the round trip of the reading used: every event of the device
    /// is placed to within this, in ms.
    pub uncertainty_ms: f64,
    /// How far the zeros that the readings imply lie apart (a check:
    /// within the sum of their uncertainties unless a clock misbehaved).
    pub readings_disagree_ms: f64,
}

impl DeviceClock {
    /// Place a device from its readings; `None` without any.
    pub fn from_readings(reference: &Reference, readings: &[ClockReading]) -> Option<DeviceClock> {
        let placed: Vec<(f64, f64)> = readings
            .iter()
            .map(|reading| {
                let sent = reference.at(reading.sent);
                let received = reference.at(reading.received);
                let midpoint = (sent + received) / 2.0;
                let half = ((received - sent) / 2.0).max(0.0);
                (midpoint - reading.device_us as f64 / 1e3, half)
            })
            .collect();
        let &(zero_ms, uncertainty_ms) = placed.iter().min_by(|a, b| a.1.total_cmp(&b.1))?;
        let lowest = placed.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let highest = placed.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        Some(DeviceClock {
            zero_ms,
            uncertainty_ms,
            readings_disagree_ms: highest - lowest,
        })
    }

    /// Where the device's `at-us` lies on the axis, in ms.
    pub fn at(&self, at_us: u64) -> f64 {
        self.zero_ms + at_us as f64 / 1e3
    }
}

/// `duration` in ms, for reports.
pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_placed_by_its_tightest_reading() {
        let zero = Instant::now();
        let reference = Reference::new(zero);
        let at = |ms: u64| zero + Duration::from_millis(ms);
        // The device's zero is at 100 ms on the axis. A loose reading
        // (round trip 40 ms) and a tight one (2 ms), both consistent.
        let readings = [
            ClockReading {
                sent: at(200),
                received: at(240),
                device_us: 125_000,
            },
            ClockReading {
                sent: at(1000),
                received: at(1002),
                device_us: 901_000,
            },
        ];
        let clock = DeviceClock::from_readings(&reference, &readings).unwrap();
        assert!((clock.zero_ms - 100.0).abs() < 1e-6, "{clock:?}");
        assert!((clock.uncertainty_ms - 1.0).abs() < 1e-6);
        assert!((clock.readings_disagree_ms - 5.0).abs() < 1e-6);
        assert!((clock.at(5_000) - 105.0).abs() < 1e-6);
        assert!(DeviceClock::from_readings(&reference, &[]).is_none());
    }

    #[test]
    fn wall_stamps_map_through_the_reference_pair() {
        let zero = Instant::now();
        let reference = Reference::new(zero);
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        // A stamp taken now is near the axis' now, which is near zero.
        assert!(reference.at_wall(now_us).abs() < 50.0);
        assert!(
            (reference.at_wall(now_us + 10_000) - reference.at_wall(now_us) - 10.0).abs() < 1e-6
        );
        assert!(reference.at(zero - Duration::from_millis(3)) + 3.0 < 1e-6);
    }
}
