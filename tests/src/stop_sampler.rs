//! Were requests in flight when a draining source stopped?
//!
//! A suspend says so itself (`handed-off-last-stop`); a drain answers
//! everything before its reply and leaves no trace of how much it waited
//! for. So while a migration runs, a [`RegionSampler`] reads the source
//! QEMU's inflight region every half millisecond (how many requests the
//! agent has taken and not answered), each sample stamped with the wall
//! clock; afterwards the agent's log tells when it handled the stop (its
//! debug line `GET_VRING_BASE (11) size 8 -> ok in D`, stamped with the
//! same clock when the handling ended, so it began D earlier). A sample
//! inside that window with requests in it means the stop had to wait for
//! them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::handoff_vm::qemu_inflight_count;

/// Samples of one QEMU's inflight region, taken on a thread.
pub struct RegionSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(SystemTime, usize)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RegionSampler {
    /// Start sampling QEMU `pid`'s region.
    pub fn start(pid: u32) -> RegionSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (thread_stop, thread_samples) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                // A failed read (QEMU gone) just ends the samples.
                let Ok(count) = qemu_inflight_count(pid) else {
                    break;
                };
                let at = SystemTime::now();
                thread_samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((at, count));
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        RegionSampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// Stop and return the samples.
    pub fn finish(mut self) -> Vec<(SystemTime, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for RegionSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The most requests any sample inside `window` saw (None: no sample in it).
pub fn most_unanswered(
    samples: &[(SystemTime, usize)],
    window: (SystemTime, SystemTime),
) -> Option<usize> {
    samples
        .iter()
        .filter(|(at, _)| *at >= window.0 && *at <= window.1)
        .map(|&(_, count)| count)
        .max()
}

/// When the agent handled its last GET_VRING_BASE (11) or request 45,
/// from its `--log-level debug` log: (began, ended).
pub fn last_stop_window(log: &str) -> Option<(SystemTime, SystemTime)> {
    log.lines().rev().find_map(|line| {
        let rest = line
            .split_once("GET_VRING_BASE (11) size 8 -> ok in ")
            .or_else(|| line.split_once("GET_VRING_BASE_SKIP_DRAIN (45) size 8 -> ok in "))?
            .1;
        let took = parse_duration(rest.trim())?;
        let ended = parse_timestamp(line.strip_prefix('[')?.split_whitespace().next()?)?;
        Some((ended.checked_sub(took)?, ended))
    })
}

/// A Rust `Duration` Debug string: `7.560171ms`, `245.396µs`, `1.2s`, `80ns`.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, scale) = [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(unit, scale)| Some((text.strip_suffix(unit)?, *scale)))?;
    let value: f64 = number.parse().ok()?;
    (value >= 0.0).then(|| Duration::from_secs_f64(value * scale))
}

/// An env_logger timestamp, `2026-12-01T19:44:54.976010Z` (UTC).
fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    let micros: u64 = format!("{fraction:0<6}").get(..6)?.parse().ok()?;
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_micros(micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_give_the_stop_window() {
        let log = "[2026-12-01T19:44:34.501599Z DEBUG vhost_agent::server] blk0: GET_VRING_BASE (11) size 8 -> ok in 245.396µs\n\
                   [2026-12-01T19:44:54.976010Z DEBUG vhost_agent::server] blk0: GET_VRING_BASE (11) size 8 -> ok in 7.560171ms\n\
                   [2026-12-01T19:44:55.000000Z DEBUG vhost_agent::server] blk0: SET_VRING_ENABLE (18) size 8 -> ok in 9µs\n";
        let (began, ended) = last_stop_window(log).unwrap();
        let epoch = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        // 2026-12-01T19:44:54.976010Z = 1796154294.976010 s since the epoch.
        assert_eq!(epoch(ended), Duration::new(1_796_154_294, 976_010_000));
        assert_eq!(
            ended.duration_since(began).unwrap(),
            Duration::from_nanos(7_560_171)
        );
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("80ns"), Some(Duration::from_nanos(80)));
        assert_eq!(parse_duration("fast"), None);
        assert_eq!(last_stop_window("nothing here"), None);
    }

    #[test]
    fn only_samples_inside_the_window_count() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let ms = Duration::from_millis;
        let samples = [(t, 32), (t + ms(5), 7), (t + ms(6), 3), (t + ms(9), 0)];
        assert_eq!(most_unanswered(&samples, (t + ms(4), t + ms(10))), Some(7));
        assert_eq!(most_unanswered(&samples, (t + ms(1), t + ms(2))), None);
    }
}
