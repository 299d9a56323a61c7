//! What a device's metrics report: timeline events, presetup counts, the
//! last switchover op by op, and the figures `query-metrics` returns.

use serde::Serialize;

/// One protocol event the device saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    /// A front-end connected.
    Connect,
    /// The front-end went away.
    Disconnect,
    /// A message arrived (before it was handled).
    Message {
        /// Request code.
        code: u32,
        /// Its spec name.
        name: &'static str,
    },
    /// The reply to a GET_VRING_BASE (or its skip-drain variant) was sent.
    StopReply {
        /// Request code.
        code: u32,
    },
    /// A ring was handed to the data path and runs.
    RingStarted {
        /// Virtqueue index.
        queue: u16,
    },
    /// A ring was taken back from the data path.
    RingStopped {
        /// Virtqueue index.
        queue: u16,
        /// Requests left in the inflight region for the destination (blk
        /// suspend); zero when the ring drained.
        handed_off: u64,
    },
    /// A start window opened: the first start-sequence message after a
    /// connect or a stop (recorded with that message's time). The window
    /// closes `start-critical-path-us` later, when every ring runs.
    StartBegan,
    /// The device state this device saved went through the front-end's
    /// pipe (CHECK_DEVICE_STATE after SET_DEVICE_STATE_FD(SAVE)).
    DeviceStateSaved {
        /// Bytes of state written.
        bytes: u64,
    },
    /// A device state was loaded from the front-end's pipe and applied
    /// (CHECK_DEVICE_STATE after SET_DEVICE_STATE_FD(LOAD)).
    DeviceStateLoaded {
        /// Bytes of state read.
        bytes: u64,
    },
    /// An in-band presetup bracket opened (PRESETUP START).
    PresetupStart,
    /// The in-band presetup bracket closed (PRESETUP END).
    PresetupEnd,
}

/// A timeline entry.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Event {
    /// Microseconds since the device was created (monotonic clock).
    #[serde(rename = "at-us")]
    pub at_us: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What presetup did at device starts: ops of the switchover plan by class,
/// and whether the early configuration was used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PresetupCounts {
    /// Heavy ops applied at starts.
    pub heavy_applied: u64,
    /// Heavy ops skipped because the early configuration already did them.
    pub heavy_skipped: u64,
    /// Light ops applied at starts.
    pub light_applied: u64,
    /// Light ops skipped.
    pub light_skipped: u64,
    /// Starts that used an early configuration.
    pub hits: u64,
    /// Early configurations refused (malformed, mismatching): the device
    /// was configured in full.
    pub fallbacks: u64,
}

/// The last switchover plan of a device, op by op: which heavy ops its
/// start applied and which the early configuration saved, so a test or an
/// operator can tell exactly what a changed MTU or memory layout cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SwitchoverReport {
    /// Whether an early configuration was used.
    pub early: bool,
    /// Why it was not, when it was refused (a fallback label).
    pub fallback: Option<&'static str>,
    /// Heavy ops the start's datapath executed, in order
    /// (`presetup::ConfigOp` names).
    pub heavy_applied: Vec<&'static str>,
    /// Heavy ops a full configuration would have applied and this start did
    /// not call: the early configuration (or, for a disk's `open_storage`,
    /// the agent's start) had done them.
    pub heavy_skipped: Vec<&'static str>,
    /// Heavy ops the start called that its datapath had nothing to do for
    /// (a tap's queues exist from the agent's start).
    pub heavy_not_needed: Vec<&'static str>,
    /// Light ops applied at the start.
    pub light_applied: usize,
}

/// One device's figures as `query-metrics` returns them.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetricsReport {
    /// Device id.
    pub device: String,
    /// The device's clock when the report was taken, on the timeline's
    /// scale (microseconds since the device was created): what an
    /// orchestrator pairs with its own clock to place the events.
    pub now_us: u64,
    /// Front-end connections so far.
    pub sessions: u64,
    /// Starts completed (every configured ring ran).
    pub starts: u64,
    /// Destination critical path of the last start: first start-sequence
    /// message to the moment every configured ring ran.
    pub start_critical_path_us: Option<u64>,
    /// Of that, the time the agent spent handling the window's messages
    /// (arrival to reply); the rest is the front-end's own work and the
    /// socket round trips between messages.
    pub start_agent_us: Option<u64>,
    /// Stops completed.
    pub stops: u64,
    /// Source stop time of the last stop: first GET_VRING_BASE to the
    /// reply that left no ring running.
    pub stop_time_us: Option<u64>,
    /// Requests left in the inflight region at the last stop (blk suspend).
    pub handed_off_last_stop: u64,
    /// Requests left in the inflight region at all stops.
    pub handed_off_total: u64,
    /// Rings running now.
    pub rings_running: usize,
    /// Presetup at starts: ops by class, hits, fallbacks.
    pub presetup: PresetupCounts,
    /// The last start's switchover plan, op by op (none before a start).
    pub last_switchover: Option<SwitchoverReport>,
    /// Timeline events dropped to keep it bounded (oldest first).
    pub timeline_dropped: u64,
    /// The last [`TIMELINE_CAPACITY`] events, oldest first.
    pub timeline: Vec<Event>,
}
