//! Per-device protocol timeline and the downtime figures derived from it.
//!
//! Migration downtime is made of two windows the agent can see: on the
//! source, from the first GET_VRING_BASE to the last reply (the rings must
//! stop before the VM can move); on the destination, from the first
//! message of the start sequence to the moment every configured ring runs.
//! Each device keeps a bounded timeline of protocol events with monotonic
//! timestamps and derives both windows as the events arrive, so a full
//! timeline never loses a figure.
//!
//! [`DeviceMetrics`] is shared (an `Arc`) between the device's protocol
//! thread, which records, and the control API, which reads. Its own small
//! mutex is held only to push an event or copy a report out, never while a
//! message is handled, so `query-metrics` never waits on a protocol thread.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::vhost_user::requests::{self, Effect};

mod prometheus;
mod report;

pub use prometheus::prometheus_text;
pub use report::{Event, EventKind, MetricsReport, PresetupCounts, SwitchoverReport};

/// Events a device's timeline keeps; older ones are dropped (and counted)
/// so a long-lived device's memory stays bounded.
pub const TIMELINE_CAPACITY: usize = 512;

/// Whether a request begins a start sequence when no ring runs (the
/// request table's `Effect::Starts`: features, memory, ring configuration,
/// NET_SET_MTU, the inflight region). Queries, the handshake and
/// SET_VRING_CALL do not: QEMU sends them long before it starts the device.
fn starts_device(code: u32) -> bool {
    requests::effect(code) == Effect::Starts
}

/// Whether `code` is a stop request (GET_VRING_BASE or its skip-drain
/// variant), whose reply the listener reports with
/// [`DeviceMetrics::stop_replied`].
pub fn is_stop(code: u32) -> bool {
    requests::effect(code) == Effect::Stops
}

/// Where the device is between starts and stops, for deriving windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing runs and no start sequence began (after connect or a stop).
    Idle,
    /// A start sequence began; not every configured ring runs yet.
    Starting,
    /// Every configured ring ran at least once since the start began.
    Running,
    /// A GET_VRING_BASE arrived while rings ran; waiting for the last reply.
    Stopping,
}

#[derive(Debug)]
struct Inner {
    timeline: VecDeque<Event>,
    dropped: u64,
    sessions: u64,
    phase: Phase,
    configured: BTreeSet<u16>,
    running: BTreeSet<u16>,
    start_began: Option<Instant>,
    stop_began: Option<Instant>,
    last_stop_reply: Option<Instant>,
    /// The message being handled is a stop request: a ring stopping now
    /// is stopped by it, and its reply follows at once.
    in_stop_request: bool,
    last_critical_path: Option<Duration>,
    /// When the message being handled arrived.
    message_began: Option<Instant>,
    /// Time the agent spent handling the messages of the open start window.
    window_agent: Duration,
    /// The message being handled ended the critical path.
    ended_critical_path: bool,
    /// The agent's share of the last start's critical path.
    last_start_agent: Option<Duration>,
    starts: u64,
    last_stop_time: Option<Duration>,
    stops: u64,
    handed_off_this_stop: u64,
    handed_off_last_stop: u64,
    handed_off_total: u64,
    presetup: PresetupCounts,
    last_switchover: Option<SwitchoverReport>,
    /// Inside an in-band presetup bracket: configuration messages set the
    /// device up early and do not begin a start.
    in_presetup: bool,
}

/// A device's timeline and derived figures (see the module docs).
#[derive(Debug)]
pub struct DeviceMetrics {
    device: String,
    epoch: Instant,
    inner: Mutex<Inner>,
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl DeviceMetrics {
    /// Metrics for the device named `device`, its clock starting now.
    pub fn new(device: &str) -> DeviceMetrics {
        DeviceMetrics {
            device: device.to_string(),
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                timeline: VecDeque::with_capacity(64),
                dropped: 0,
                sessions: 0,
                phase: Phase::Idle,
                configured: BTreeSet::new(),
                running: BTreeSet::new(),
                start_began: None,
                stop_began: None,
                last_stop_reply: None,
                in_stop_request: false,
                last_critical_path: None,
                message_began: None,
                window_agent: Duration::ZERO,
                ended_critical_path: false,
                last_start_agent: None,
                starts: 0,
                last_stop_time: None,
                stops: 0,
                handed_off_this_stop: 0,
                handed_off_last_stop: 0,
                handed_off_total: 0,
                presetup: PresetupCounts::default(),
                last_switchover: None,
                in_presetup: false,
            }),
        }
    }

    /// The device's id.
    pub fn device(&self) -> &str {
        &self.device
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, inner: &mut Inner, now: Instant, kind: EventKind) {
        if inner.timeline.len() >= TIMELINE_CAPACITY {
            inner.timeline.pop_front();
            inner.dropped += 1;
        }
        inner.timeline.push_back(Event {
            at_us: micros(now.saturating_duration_since(self.epoch)),
            kind,
        });
    }

    /// A front-end connected: a new session, nothing runs.
    pub fn connected(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.push(&mut inner, now, EventKind::Connect);
        inner.sessions += 1;
        Self::reset_session(&mut inner);
    }

    /// The front-end went away. A stop that got its replies but whose
    /// rings were not all asked for still counts, up to its last reply.
    pub fn disconnected(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.push(&mut inner, now, EventKind::Disconnect);
        if inner.phase == Phase::Stopping {
            if let (Some(began), Some(reply)) = (inner.stop_began, inner.last_stop_reply) {
                Self::finish_stop(&mut inner, reply.saturating_duration_since(began));
            }
        }
        Self::reset_session(&mut inner);
    }

    fn reset_session(inner: &mut Inner) {
        inner.phase = Phase::Idle;
        inner.configured.clear();
        inner.running.clear();
        inner.start_began = None;
        inner.stop_began = None;
        inner.last_stop_reply = None;
        inner.handed_off_this_stop = 0;
        inner.in_presetup = false;
    }

    /// A message with request `code` arrived (recorded before it is
    /// handled, so its handling time is inside the windows).
    pub fn message(&self, code: u32) {
        self.message_named(code, requests::name(code));
    }

    /// Like [`Self::message`], under `name`: a request the back-end
    /// claims may mean something else than the spec's code (PRESETUP is
    /// 41, upstream's GET_SHARED_OBJECT).
    pub fn message_named(&self, code: u32, name: &'static str) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.push(&mut inner, now, EventKind::Message { code, name });
        inner.in_stop_request = is_stop(code);
        inner.message_began = Some(now);
        if inner.phase == Phase::Idle && starts_device(code) && !inner.in_presetup {
            self.push(&mut inner, now, EventKind::StartBegan);
            inner.phase = Phase::Starting;
            inner.start_began = Some(now);
            inner.window_agent = Duration::ZERO;
        } else if is_stop(code)
            && matches!(inner.phase, Phase::Starting | Phase::Running)
            && !inner.running.is_empty()
        {
            inner.phase = Phase::Stopping;
            inner.stop_began = Some(now);
            inner.last_stop_reply = None;
            inner.handed_off_this_stop = 0;
        }
    }

    /// The message that arrived last was handled and answered: its time
    /// counts as the agent's if a start window is open, and a message that
    /// ended the critical path fixes the agent's share of it.
    pub fn message_done(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(began) = inner.message_began.take() {
            Self::agent_work(&mut inner, now.saturating_duration_since(began));
        }
    }

    /// Work the agent did for the front-end outside a message since
    /// `began` (a plan left for the end of a burst of messages): it counts
    /// like message handling.
    pub fn work_done(&self, began: Instant) {
        let now = Instant::now();
        let mut inner = self.lock();
        Self::agent_work(&mut inner, now.saturating_duration_since(began));
    }

    fn agent_work(inner: &mut Inner, spent: Duration) {
        if inner.start_began.is_some() && matches!(inner.phase, Phase::Starting | Phase::Running) {
            inner.window_agent += spent;
        }
        if std::mem::take(&mut inner.ended_critical_path) {
            inner.last_start_agent = Some(inner.window_agent);
        }
    }

    /// The reply to a stop request (`code` 11 or 45) went out. The stop
    /// itself ends in [`Self::ring_stopped`], when the request that stops
    /// the last running ring has stopped it: its reply is written right
    /// after, and a front-end that got the reply must find the figure
    /// already there (the server records this event only once the write
    /// returned, and a busy host may deschedule it in between).
    pub fn stop_replied(&self, code: u32) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.push(&mut inner, now, EventKind::StopReply { code });
        inner.in_stop_request = false;
        if inner.phase == Phase::Stopping {
            inner.last_stop_reply = Some(now);
        }
    }

    fn finish_stop(inner: &mut Inner, took: Duration) {
        inner.last_stop_time = Some(took);
        inner.stops += 1;
        inner.handed_off_last_stop = inner.handed_off_this_stop;
        inner.handed_off_this_stop = 0;
        inner.phase = Phase::Idle;
        inner.configured.clear();
        inner.start_began = None;
        inner.stop_began = None;
        inner.last_stop_reply = None;
    }

    /// An in-band presetup bracket opened (`open`) or closed. What the
    /// bracket configures is set up ahead of the start, so it is no part
    /// of the start's critical path: while no ring runs, a start window
    /// that opened before the bracket (QEMU's connect sends SET_VRING_CALL)
    /// is dropped, and when the bracket closes the rings it configured are
    /// forgotten, because the real start configures them again.
    pub fn presetup_bracket(&self, open: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        let kind = if open {
            EventKind::PresetupStart
        } else {
            EventKind::PresetupEnd
        };
        self.push(&mut inner, now, kind);
        inner.in_presetup = open;
        if inner.running.is_empty() {
            if inner.phase == Phase::Starting {
                inner.phase = Phase::Idle;
                inner.start_began = None;
            }
            if !open {
                inner.configured.clear();
            }
        }
    }

    /// A device state transfer finished and was checked: `saved` (the
    /// source side) or loaded and applied (the destination), `bytes` long.
    pub fn device_state(&self, saved: bool, bytes: u64) {
        let now = Instant::now();
        let mut inner = self.lock();
        let kind = if saved {
            EventKind::DeviceStateSaved { bytes }
        } else {
            EventKind::DeviceStateLoaded { bytes }
        };
        self.push(&mut inner, now, kind);
    }

    /// Ring `queue` got its size: the device will run it, so a start is
    /// complete only once it runs.
    pub fn ring_configured(&self, queue: u16) {
        self.lock().configured.insert(queue);
    }

    /// Ring `queue` runs. While a start is open, each start that leaves
    /// every configured ring running moves the end of the critical path to
    /// now (the front-end configures rings one after another).
    pub fn ring_started(&self, queue: u16) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.push(&mut inner, now, EventKind::RingStarted { queue });
        inner.configured.insert(queue);
        inner.running.insert(queue);
        let all_running = inner.configured.is_subset(&inner.running);
        match (inner.phase, inner.start_began) {
            (Phase::Starting | Phase::Running, Some(began)) if all_running => {
                if inner.phase == Phase::Starting {
                    inner.starts += 1;
                }
                inner.phase = Phase::Running;
                inner.last_critical_path = Some(now.saturating_duration_since(began));
                inner.ended_critical_path = true;
            }
            (Phase::Idle, _) => inner.phase = Phase::Running,
            _ => {}
        }
    }

    /// Ring `queue` was taken back from the data path, leaving
    /// `handed_off` requests in the inflight region (blk suspend).
    pub fn ring_stopped(&self, queue: u16, handed_off: u64) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.push(
            &mut inner,
            now,
            EventKind::RingStopped { queue, handed_off },
        );
        inner.running.remove(&queue);
        inner.handed_off_this_stop = inner.handed_off_this_stop.saturating_add(handed_off);
        inner.handed_off_total = inner.handed_off_total.saturating_add(handed_off);
        if inner.phase == Phase::Stopping && inner.in_stop_request && inner.running.is_empty() {
            if let Some(began) = inner.stop_began {
                Self::finish_stop(&mut inner, now.saturating_duration_since(began));
            }
        }
    }

    /// Add what presetup planned for one device start.
    pub fn record_presetup(&self, update: impl FnOnce(&mut PresetupCounts)) {
        update(&mut self.lock().presetup);
    }

    /// Keep the op-by-op report of the last start's switchover plan.
    pub fn record_switchover(&self, report: SwitchoverReport) {
        self.lock().last_switchover = Some(report);
    }

    /// A copy of the figures and the timeline, for the control API.
    pub fn report(&self) -> MetricsReport {
        let inner = self.lock();
        MetricsReport {
            device: self.device.clone(),
            now_us: micros(self.epoch.elapsed()),
            sessions: inner.sessions,
            starts: inner.starts,
            start_critical_path_us: inner.last_critical_path.map(micros),
            start_agent_us: inner.last_start_agent.map(micros),
            stops: inner.stops,
            stop_time_us: inner.last_stop_time.map(micros),
            handed_off_last_stop: inner.handed_off_last_stop,
            handed_off_total: inner.handed_off_total,
            rings_running: inner.running.len(),
            presetup: inner.presetup,
            last_switchover: inner.last_switchover.clone(),
            timeline_dropped: inner.dropped,
            timeline: inner.timeline.iter().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::requests::code::*;

    /// A start over two rings, then a stop: both windows are measured and
    /// the critical path ends at the second ring, not the first.
    #[test]
    fn a_start_and_a_stop_give_both_windows() {
        let metrics = DeviceMetrics::new("net0");
        metrics.connected();
        metrics.message(GET_FEATURES);
        assert_eq!(metrics.lock().phase, Phase::Idle);
        metrics.message(SET_FEATURES);
        metrics.ring_configured(0);
        metrics.ring_started(0);
        let first = metrics.report().start_critical_path_us;
        metrics.ring_configured(1);
        std::thread::sleep(Duration::from_millis(2));
        metrics.ring_started(1);
        let report = metrics.report();
        assert_eq!(report.starts, 1);
        assert!(report.start_critical_path_us.unwrap() >= first.unwrap() + 2000);
        metrics.message(GET_VRING_BASE);
        metrics.ring_stopped(0, 3);
        metrics.stop_replied(GET_VRING_BASE);
        assert_eq!(metrics.report().stops, 0, "ring 1 still runs");
        metrics.message(GET_VRING_BASE);
        metrics.ring_stopped(1, 0);
        metrics.stop_replied(GET_VRING_BASE);
        let report = metrics.report();
        assert_eq!(report.stops, 1);
        assert!(report.stop_time_us.is_some());
        assert_eq!(report.handed_off_last_stop, 3);
        assert_eq!(report.rings_running, 0);
        // A restart after the stop is a new start window.
        metrics.message(SET_VRING_BASE);
        metrics.ring_started(0);
        assert_eq!(metrics.report().starts, 2);
    }

    /// The in-band bracket is set-up work ahead of the start: its
    /// messages begin no start window, and the critical path is measured
    /// from the real start's first message.
    #[test]
    fn a_presetup_bracket_is_not_part_of_the_start() {
        let metrics = DeviceMetrics::new("net0");
        metrics.connected();
        metrics.message(SET_FEATURES);
        assert_eq!(metrics.lock().phase, Phase::Starting);
        metrics.presetup_bracket(true);
        assert_eq!(metrics.lock().phase, Phase::Idle, "window dropped");
        metrics.message(SET_MEM_TABLE);
        metrics.ring_configured(0);
        metrics.ring_configured(1);
        assert_eq!(metrics.lock().phase, Phase::Idle);
        metrics.presetup_bracket(false);
        assert!(metrics.lock().configured.is_empty());
        std::thread::sleep(Duration::from_millis(5));
        let real_start = Instant::now();
        metrics.message(SET_FEATURES);
        metrics.ring_configured(0);
        metrics.ring_started(0);
        let report = metrics.report();
        assert_eq!(report.starts, 1);
        let path = Duration::from_micros(report.start_critical_path_us.unwrap());
        assert!(path <= real_start.elapsed(), "measured from the bracket");
        let kinds: Vec<EventKind> = report.timeline.iter().map(|event| event.kind).collect();
        assert!(kinds.contains(&EventKind::PresetupStart));
        assert!(kinds.contains(&EventKind::PresetupEnd));
    }

    /// The agent's share of a start counts the handling of the window's
    /// messages and not the time between them.
    #[test]
    fn the_agents_share_of_a_start_excludes_the_gaps_between_messages() {
        let metrics = DeviceMetrics::new("net0");
        metrics.connected();
        metrics.message(SET_FEATURES);
        metrics.message_done();
        std::thread::sleep(Duration::from_millis(20));
        metrics.message(SET_VRING_KICK);
        metrics.ring_configured(0);
        metrics.ring_started(0);
        metrics.message_done();
        let report = metrics.report();
        let path = report.start_critical_path_us.unwrap();
        let agent = report.start_agent_us.unwrap();
        assert!(path >= 20_000, "{path}");
        assert!(agent < path && agent < 20_000, "agent {agent} of {path}");
    }

    /// What an orchestrator reads to place a migration's phases: each
    /// start window's opening once, the device-state transfers, and the
    /// device's clock at report time on the timeline's scale.
    #[test]
    fn start_windows_and_device_state_are_on_the_timeline() {
        let metrics = DeviceMetrics::new("net0");
        metrics.connected();
        metrics.message(GET_FEATURES);
        metrics.message(SET_FEATURES);
        metrics.message(SET_MEM_TABLE);
        metrics.ring_configured(0);
        metrics.ring_started(0);
        metrics.message(GET_VRING_BASE);
        metrics.ring_stopped(0, 0);
        metrics.stop_replied(GET_VRING_BASE);
        metrics.device_state(true, 120);
        metrics.message(SET_VRING_BASE);
        metrics.device_state(false, 80);
        let report = metrics.report();
        let kinds: Vec<EventKind> = report.timeline.iter().map(|event| event.kind).collect();
        let began: Vec<usize> = kinds
            .iter()
            .enumerate()
            .filter(|(_, kind)| **kind == EventKind::StartBegan)
            .map(|(index, _)| index)
            .collect();
        // After SET_FEATURES (the first start message) and after the
        // SET_VRING_BASE that follows the stop; not after SET_MEM_TABLE.
        assert_eq!(began.len(), 2, "{kinds:?}");
        assert_eq!(
            kinds[began[0] - 1],
            EventKind::Message {
                code: SET_FEATURES,
                name: "SET_FEATURES"
            }
        );
        assert_eq!(
            report.timeline[began[0]].at_us,
            report.timeline[began[0] - 1].at_us
        );
        assert!(kinds.contains(&EventKind::DeviceStateSaved { bytes: 120 }));
        assert!(kinds.contains(&EventKind::DeviceStateLoaded { bytes: 80 }));
        let last = report.timeline.last().unwrap().at_us;
        assert!(report.now_us >= last, "now {} < {last}", report.now_us);
    }

    #[test]
    fn the_timeline_stays_bounded() {
        let metrics = DeviceMetrics::new("blk0");
        for _ in 0..TIMELINE_CAPACITY + 10 {
            metrics.message(SET_OWNER);
        }
        let report = metrics.report();
        assert_eq!(report.timeline.len(), TIMELINE_CAPACITY);
        assert_eq!(report.timeline_dropped, 10);
    }

    #[test]
    fn prometheus_lines_carry_the_device_label() {
        let metrics = DeviceMetrics::new("a\"b");
        let text = prometheus_text(&[metrics.report()]);
        assert!(text.contains("vhost_agent_sessions_total{device=\"a\\\"b\"} 0\n"));
        assert!(
            !text.contains("vhost_agent_stop_seconds{"),
            "no sample before a stop"
        );
    }
}
