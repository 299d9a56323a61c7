//! Rate-limited warnings about what a peer did wrong.
//!
//! A guest or a front-end can make the agent hit the same error as fast as
//! it can fill a ring or send a message. Logging each would let it flood
//! the log (issue 18 measured 54 MB/s) and the disk under it, and drown
//! what other devices say. Warnings caused by a peer go through the
//! device's [`PeerLog`] instead: a token bucket per device (shared by all
//! its threads) lets a burst through, then a steady trickle, and the first
//! line after a quiet spell says how many were suppressed.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

/// Lines a device may log at once.
pub const BURST: u32 = 10;
/// A further line is allowed every this long.
pub const REFILL: Duration = Duration::from_secs(1);

/// What [`RateLimiter::check_at`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines were dropped since the last logged one.
    Log {
        /// Lines suppressed before this one.
        suppressed: u64,
    },
    /// Drop it (counted).
    Suppress,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When the last token was added (or the bucket was made).
    refilled: Option<Instant>,
    suppressed: u64,
}

/// A token bucket: `burst` events at once, one more per `refill`.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    refill: Duration,
    bucket: Mutex<Bucket>,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens refilled one per `refill`.
    pub fn new(burst: u32, refill: Duration) -> RateLimiter {
        RateLimiter {
            burst,
            refill,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                refilled: None,
                suppressed: 0,
            }),
        }
    }

    /// May an event at `now` be logged?
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let last = *bucket.refilled.get_or_insert(now);
        if !self.refill.is_zero() {
            let elapsed = now.saturating_duration_since(last);
            let periods = elapsed.as_nanos() / self.refill.as_nanos();
            if periods > 0 {
                let add = u32::try_from(periods).unwrap_or(u32::MAX);
                bucket.tokens = bucket.tokens.saturating_add(add).min(self.burst);
                // Keep the remainder: refills stay on their grid.
                let spent = self.refill.saturating_mul(add);
                bucket.refilled = Some(last.checked_add(spent).unwrap_or(now));
            }
        }
        if bucket.tokens == 0 {
            bucket.suppressed = bucket.suppressed.saturating_add(1);
            return Verdict::Suppress;
        }
        bucket.tokens -= 1;
        Verdict::Log {
            suppressed: std::mem::take(&mut bucket.suppressed),
        }
    }

    /// Count `count` events that were dropped before they reached the
    /// limiter (a bounded queue of them overflowed).
    pub fn count_suppressed(&self, count: u64) {
        if count > 0 {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            bucket.suppressed = bucket.suppressed.saturating_add(count);
        }
    }
}

/// One device's warnings about its peers.
#[derive(Debug)]
pub struct PeerLog {
    device: Arc<str>,
    limiter: RateLimiter,
}

/// Every device's [`PeerLog`], by name, while someone holds it.
static DEVICES: LazyLock<Mutex<HashMap<String, Weak<PeerLog>>>> = LazyLock::new(Mutex::default);

impl PeerLog {
    /// The log of device `name`: the same one for every thread of the
    /// device (its queue workers, its protocol thread), so the limit is
    /// per device.
    pub fn for_device(name: &str) -> Arc<PeerLog> {
        let mut devices = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = devices.get(name).and_then(Weak::upgrade) {
            return log;
        }
        devices.retain(|_, log| log.strong_count() > 0);
        let log = Arc::new(PeerLog {
            device: Arc::from(name),
            limiter: RateLimiter::new(BURST, REFILL),
        });
        devices.insert(name.to_string(), Arc::downgrade(&log));
        log
    }

    /// Warn (at `warn` level, prefixed with the device name) unless the
    /// device has warned too much lately.
    pub fn warn(&self, text: std::fmt::Arguments<'_>) {
        if let Verdict::Log { suppressed } = self.limiter.check_at(Instant::now()) {
            if suppressed > 0 {
                log::warn!(
                    "{}: {text} ({suppressed} similar warning(s) suppressed)",
                    self.device
                );
            } else {
                log::warn!("{}: {text}", self.device);
            }
        }
    }

    /// Count warnings dropped before they could be offered.
    pub fn count_suppressed(&self, count: u64) {
        self.limiter.count_suppressed(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_one_line_per_refill_with_the_suppressed_count() {
        let limiter = RateLimiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..10).map(|_| limiter.check_at(t0)).collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v != Verdict::Suppress).count(),
            3
        );
        // Half a period: nothing new.
        assert_eq!(
            limiter.check_at(t0 + Duration::from_millis(500)),
            Verdict::Suppress
        );
        // One period after the start: one token, which reports the 8 dropped.
        assert_eq!(
            limiter.check_at(t0 + Duration::from_secs(1)),
            Verdict::Log { suppressed: 8 }
        );
        assert_eq!(
            limiter.check_at(t0 + Duration::from_millis(1500)),
            Verdict::Suppress
        );
        // A long quiet spell refills the bucket, no more than to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(limiter.check_at(later), Verdict::Log { suppressed: 1 });
        assert_eq!(limiter.check_at(later), Verdict::Log { suppressed: 0 });
        assert_eq!(limiter.check_at(later), Verdict::Log { suppressed: 0 });
        assert_eq!(limiter.check_at(later), Verdict::Suppress);
    }

    #[test]
    fn events_dropped_upstream_are_reported_with_the_next_line() {
        let limiter = RateLimiter::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        limiter.count_suppressed(5);
        assert_eq!(limiter.check_at(t0), Verdict::Log { suppressed: 5 });
    }

    #[test]
    fn every_thread_of_a_device_shares_one_log() {
        let a = PeerLog::for_device("ratelimit-test-a");
        let again = PeerLog::for_device("ratelimit-test-a");
        let b = PeerLog::for_device("ratelimit-test-b");
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!Arc::ptr_eq(&a, &b));
        let now = Instant::now();
        for _ in 0..BURST {
            assert_ne!(a.limiter.check_at(now), Verdict::Suppress);
        }
        // a's burst is spent; b's is not.
        assert_eq!(again.limiter.check_at(now), Verdict::Suppress);
        assert_ne!(b.limiter.check_at(now), Verdict::Suppress);
    }
}
