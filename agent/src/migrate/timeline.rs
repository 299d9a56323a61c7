//! One per-phase timeline of a migration from what QEMU and both agents
//! recorded, every time in milliseconds since `migrate` was sent on the
//! orchestrator's clock (see [`super::clock`] for how each clock is
//! placed and how exactly).
//!
//! Phases, in the order a migration goes through them (QEMU sends its
//! STOP event after its vm-state handlers, which stop the vhost-user
//! devices, have run, and RESUME before its handlers start them on the
//! destination, so those two are QEMU's view of the edges):
//!
//! | phase | from |
//! |---|---|
//! | `migrate` | the orchestrator sent `migrate` (zero) |
//! | `vm-stop` | the source QEMU's STOP event |
//! | `source-first-get-vring-base` | the first GET_VRING_BASE a source agent device got |
//! | `source-last-get-vring-base-reply` | the last reply to one |
//! | `device-state-save` | SET_DEVICE_STATE_FD(SAVE) to `device-state-saved` on the source |
//! | `device-state-load` | SET_DEVICE_STATE_FD(LOAD) to `device-state-loaded` on the destination |
//! | `destination-first-start-message` | the first `start-began` of a destination device |
//! | `destination-rings-running` | the last destination device's start window closed (`start-critical-path-us` after its `start-began`) |
//! | `vm-resume` | the destination QEMU's RESUME event |
//! | `migration-completed` | the source QEMU's MIGRATION event with status `completed` (else what `query-migrate` showed) |
//!
//! `fence-released` phases follow for `fence=api` disks.

use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::agents::MetricsSample;
use super::clock::{DeviceClock, Reference};
use super::mapping::MappedDevice;
use super::qmp::QmpEvent;
use super::view::{earliest, latest, DeviceView, Mark};
use super::Side;

/// Uncertainty given to QEMU's stamps: their resolution (1 µs); exact
/// on one host (module docs of [`super::clock`]).
const QEMU_STAMP_UNCERTAINTY_MS: f64 = 0.001;

/// A disk whose `fence=api` gate the orchestrator opened.
#[derive(Clone, Debug)]
pub struct FenceRelease {
    /// The destination device.
    pub device: String,
    /// When `fence-release` was answered.
    pub released: Instant,
}

/// Everything the orchestrator observed.
pub struct Observed<'a> {
    /// The axis.
    pub reference: Reference,
    /// The migration URI.
    pub uri: &'a str,
    /// Whether presetup was relayed.
    pub presetup: bool,
    /// The devices migrated.
    pub devices: &'a [MappedDevice],
    /// The source agent's `query-metrics` before `migrate` and after it
    /// completed.
    pub source_metrics: [&'a MetricsSample; 2],
    /// The destination agent's, likewise.
    pub destination_metrics: [&'a MetricsSample; 2],
    /// Events of the source QEMU since `migrate`.
    pub source_events: &'a [QmpEvent],
    /// Events of the destination QEMU since `migrate`.
    pub destination_events: &'a [QmpEvent],
    /// The source's `query-migrate` once completed.
    pub query_migrate: &'a Value,
    /// When the orchestrator saw `completed` in `query-migrate`.
    pub completed_seen: Instant,
    /// Fences opened.
    pub fences: &'a [FenceRelease],
}

/// One phase of the migration.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Phase {
    /// Its name (module docs).
    pub phase: String,
    /// When it happened (began), ms on the axis; `None` when nothing
    /// recorded it.
    pub at_ms: Option<f64>,
    /// When it ended, for phases with a duration.
    pub end_ms: Option<f64>,
    /// How exactly its clock is placed, ms.
    pub uncertainty_ms: Option<f64>,
    /// Whose clock: `orchestrator`, `source QEMU`, `source agent`, ...
    pub clock: String,
    /// What it is, or why it is missing.
    pub detail: String,
}

/// One event of the merged timeline.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TimelineEvent {
    /// When, ms on the axis.
    pub at_ms: f64,
    /// How exactly, ms.
    pub uncertainty_ms: f64,
    /// `source` or `destination`.
    pub side: Side,
    /// `qemu` or the agent device's id.
    pub origin: String,
    /// The event as its origin names it (QMP event, agent event kind).
    pub event: String,
    /// Its members (QMP `data`; the agent event's other members).
    pub detail: Value,
}

/// What one device did, from both agents' reports after the migration.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceFigures {
    /// The source agent's id.
    pub source: String,
    /// The destination agent's id.
    pub destination: String,
    /// `blk` or `net`.
    pub kind: String,
    /// QEMU's character device for it.
    pub chardev: Option<String>,
    /// The source's stop time (`stop-time-us`), ms.
    pub source_stop_ms: Option<f64>,
    /// Requests a disk left in the inflight region at the stop.
    pub handed_off: Option<u64>,
    /// The destination's start critical path, ms.
    pub destination_critical_path_ms: Option<f64>,
    /// Of that, the destination agent's own work, ms.
    pub destination_agent_ms: Option<f64>,
    /// Whether the destination's start used the presetup configuration.
    pub presetup_used: bool,
    /// Heavy ops the destination executed at its start.
    pub heavy_applied: Vec<String>,
    /// Heavy ops it did not have to (done by presetup, or before).
    pub heavy_skipped: Vec<String>,
}

/// How one device's timeline was placed.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClockPlacement {
    /// Which agent.
    pub side: Side,
    /// The device.
    pub device: String,
    /// The placement.
    #[serde(flatten)]
    pub clock: DeviceClock,
}

/// QEMU's own figures (`query-migrate` of the source).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QemuFigures {
    /// `status`.
    pub status: Option<String>,
    /// `downtime`, ms.
    pub downtime_ms: Option<u64>,
    /// `total-time`, ms.
    pub total_time_ms: Option<u64>,
    /// `setup-time`, ms.
    pub setup_time_ms: Option<u64>,
}

/// The report `vhost-agent migrate` prints and writes (`--out`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timeline {
    /// Layout version of this report.
    pub version: u32,
    /// The migration URI.
    pub uri: String,
    /// Whether presetup was relayed.
    pub presetup: bool,
    /// What the times mean.
    pub axis: &'static str,
    /// The phases, in migration order.
    pub phases: Vec<Phase>,
    /// From the source's first GET_VRING_BASE to the destination's rings
    /// running: how long no ring of the VM ran, as the agents saw it.
    pub devices_paused_ms: Option<f64>,
    /// Per device.
    pub devices: Vec<DeviceFigures>,
    /// QEMU's figures.
    pub qemu: QemuFigures,
    /// How each device's clock was placed.
    pub clocks: Vec<ClockPlacement>,
    /// Every event after `migrate` was sent, in time order.
    pub events: Vec<TimelineEvent>,
    /// Anything odd the orchestrator noticed about the clocks.
    pub notes: Vec<String>,
}

fn qemu_mark(reference: &Reference, event: &QmpEvent) -> Mark {
    match event.stamp_us {
        Some(stamp) => Mark {
            at: reference.at_wall(stamp),
            plus_minus: QEMU_STAMP_UNCERTAINTY_MS,
        },
        None => Mark {
            at: reference.at(event.received),
            plus_minus: 0.0,
        },
    }
}

fn phase(name: &str, clock: &str, mark: Option<Mark>, end: Option<Mark>, detail: String) -> Phase {
    let plus_minus = match (mark, end) {
        (Some(a), Some(b)) => Some(a.plus_minus.max(b.plus_minus)),
        (Some(a), None) => Some(a.plus_minus),
        _ => None,
    };
    Phase {
        phase: name.to_string(),
        at_ms: mark.map(|m| m.at),
        end_ms: end.map(|m| m.at),
        uncertainty_ms: plus_minus,
        clock: clock.to_string(),
        detail,
    }
}

/// Build the timeline (module docs).
pub fn build(observed: &Observed<'_>) -> Timeline {
    let reference = &observed.reference;
    let mut notes = Vec::new();
    let mut sources = Vec::new();
    let mut destinations = Vec::new();
    for device in observed.devices {
        match DeviceView::new(
            reference,
            Side::Source,
            &device.source.id,
            observed.source_metrics,
        ) {
            Some(view) => sources.push(view),
            None => notes.push(format!("no metrics of source device {}", device.source.id)),
        }
        match DeviceView::new(
            reference,
            Side::Destination,
            &device.destination.id,
            observed.destination_metrics,
        ) {
            Some(view) => destinations.push(view),
            None => notes.push(format!(
                "no metrics of destination device {}",
                device.destination.id
            )),
        }
    }
    let qemu_event = |events: &[QmpEvent], name: &str, status: Option<&str>| {
        events
            .iter()
            .find(|event| event.name == name && (status.is_none() || event.status() == status))
            .map(|event| qemu_mark(reference, event))
    };
    for (side, events) in [
        (Side::Source, observed.source_events),
        (Side::Destination, observed.destination_events),
    ] {
        for event in events {
            if let Some(stamp) = event.stamp_us {
                let lag = reference.at(event.received) - reference.at_wall(stamp);
                if lag < -1.0 {
                    notes.push(format!(
                        "the {side} QEMU stamped {} {:.3} ms after this host received it: its wall clock runs ahead of this host's",
                        event.name, -lag
                    ));
                }
            }
        }
    }

    let all = |views: &[DeviceView<'_>], event: &str, names: &[&str]| -> Vec<Mark> {
        views
            .iter()
            .flat_map(|view| view.matching(event, names))
            .collect()
    };
    let stop_messages = ["GET_VRING_BASE", "GET_VRING_BASE_SKIP_DRAIN"];
    let first_stop = earliest(all(&sources, "message", &stop_messages));
    let last_reply = latest(all(&sources, "stop-reply", &[]));
    let state_fd = ["SET_DEVICE_STATE_FD"];
    let save = (
        earliest(all(&sources, "message", &state_fd)),
        latest(all(&sources, "device-state-saved", &[])),
    );
    let load = (
        earliest(all(&destinations, "message", &state_fd)),
        latest(all(&destinations, "device-state-loaded", &[])),
    );
    let windows: Vec<(Mark, Mark)> = destinations
        .iter()
        .filter_map(DeviceView::start_window)
        .collect();
    let first_start = earliest(windows.iter().map(|w| w.0));
    let rings_running = latest(windows.iter().map(|w| w.1));
    let completed = qemu_event(observed.source_events, "MIGRATION", Some("completed"))
        .or_else(|| qemu_event(observed.destination_events, "MIGRATION", Some("completed")));

    let no_state =
        "no device transferred its state (QEMU 10 does for virtio-net with DEVICE_STATE)"
            .to_string();
    let mut phases = vec![
        phase(
            "migrate",
            "orchestrator",
            Some(Mark {
                at: 0.0,
                plus_minus: 0.0,
            }),
            None,
            format!("migrate {} sent", observed.uri),
        ),
        phase(
            "vm-stop",
            "source QEMU",
            qemu_event(observed.source_events, "STOP", None),
            None,
            "STOP event (QEMU sends it once its devices stopped)".to_string(),
        ),
        phase(
            "source-first-get-vring-base",
            "source agent",
            first_stop,
            None,
            "first GET_VRING_BASE of a source device".to_string(),
        ),
        phase(
            "source-last-get-vring-base-reply",
            "source agent",
            last_reply,
            None,
            "last GET_VRING_BASE reply of a source device".to_string(),
        ),
        phase(
            "device-state-save",
            "source agent",
            save.0,
            save.1,
            if save.1.is_some() {
                "SET_DEVICE_STATE_FD(SAVE) to device-state-saved".to_string()
            } else {
                no_state.clone()
            },
        ),
        phase(
            "device-state-load",
            "destination agent",
            load.0,
            load.1,
            if load.1.is_some() {
                "SET_DEVICE_STATE_FD(LOAD) to device-state-loaded".to_string()
            } else {
                no_state
            },
        ),
        phase(
            "destination-first-start-message",
            "destination agent",
            first_start,
            None,
            "first start-sequence message of a destination device".to_string(),
        ),
        phase(
            "destination-rings-running",
            "destination agent",
            rings_running,
            None,
            "every ring of every destination device runs".to_string(),
        ),
        phase(
            "vm-resume",
            "destination QEMU",
            qemu_event(observed.destination_events, "RESUME", None),
            None,
            "RESUME event (QEMU sends it before its devices start)".to_string(),
        ),
        match completed {
            Some(mark) => phase(
                "migration-completed",
                "source QEMU",
                Some(mark),
                None,
                "MIGRATION event, status completed".to_string(),
            ),
            None => phase(
                "migration-completed",
                "orchestrator",
                Some(Mark {
                    at: reference.at(observed.completed_seen),
                    plus_minus: 0.0,
                }),
                None,
                "query-migrate showed completed (no MIGRATION event: the events capability is off)"
                    .to_string(),
            ),
        },
    ];
    for fence in observed.fences {
        phase_push_fence(&mut phases, reference, fence);
    }

    let devices_paused_ms = match (first_stop, rings_running) {
        (Some(stop), Some(running)) => Some(running.at - stop.at),
        _ => None,
    };
    let devices = observed
        .devices
        .iter()
        .map(|device| figures(device, &sources, &destinations))
        .collect();
    let mut events: Vec<TimelineEvent> = Vec::new();
    for (side, qmp_events) in [
        (Side::Source, observed.source_events),
        (Side::Destination, observed.destination_events),
    ] {
        events.extend(qmp_events.iter().map(|event| {
            let mark = qemu_mark(reference, event);
            TimelineEvent {
                at_ms: mark.at,
                uncertainty_ms: mark.plus_minus,
                side,
                origin: "qemu".to_string(),
                event: event.name.clone(),
                detail: event.data.clone(),
            }
        }));
    }
    for view in sources.iter().chain(&destinations) {
        events.extend(view.timeline_events());
        if view.clock.readings_disagree_ms > 2.0 * view.clock.uncertainty_ms + 1.0 {
            notes.push(format!(
                "the {} device {}'s two clock readings disagree by {:.3} ms",
                view.side, view.id, view.clock.readings_disagree_ms
            ));
        }
    }
    events.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    let clocks = sources
        .iter()
        .chain(&destinations)
        .map(|view| ClockPlacement {
            side: view.side,
            device: view.id.to_string(),
            clock: view.clock,
        })
        .collect();
    let query = observed.query_migrate;
    Timeline {
        version: 1,
        uri: observed.uri.to_string(),
        presetup: observed.presetup,
        axis: "milliseconds since `migrate` was sent, on the orchestrator's monotonic clock",
        phases,
        devices_paused_ms,
        devices,
        qemu: QemuFigures {
            status: query["status"].as_str().map(str::to_string),
            downtime_ms: query["downtime"].as_u64(),
            total_time_ms: query["total-time"].as_u64(),
            setup_time_ms: query["setup-time"].as_u64(),
        },
        clocks,
        events,
        notes,
    }
}

fn phase_push_fence(phases: &mut Vec<Phase>, reference: &Reference, fence: &FenceRelease) {
    phases.push(phase(
        "fence-released",
        "orchestrator",
        Some(Mark {
            at: reference.at(fence.released),
            plus_minus: 0.0,
        }),
        None,
        format!("fence-release of destination disk {}", fence.device),
    ));
}

fn figures(
    device: &MappedDevice,
    sources: &[DeviceView<'_>],
    destinations: &[DeviceView<'_>],
) -> DeviceFigures {
    let source = sources.iter().find(|view| view.id == device.source.id);
    let destination = destinations
        .iter()
        .find(|view| view.id == device.destination.id);
    let millis = |value: Option<u64>| value.map(|us| us as f64 / 1e3);
    let stopped = source.filter(|view| view.stopped());
    let started = destination.filter(|view| view.started());
    DeviceFigures {
        source: device.source.id.clone(),
        destination: device.destination.id.clone(),
        kind: device.source.kind.clone(),
        chardev: device.chardev.clone(),
        source_stop_ms: millis(stopped.and_then(|view| view.number("stop-time-us"))),
        handed_off: stopped
            .filter(|_| device.source.kind == "blk")
            .and_then(|view| view.number("handed-off-last-stop")),
        destination_critical_path_ms: millis(
            started.and_then(|view| view.number("start-critical-path-us")),
        ),
        destination_agent_ms: millis(started.and_then(|view| view.number("start-agent-us"))),
        presetup_used: started.is_some_and(|view| view.after["last-switchover"]["early"] == true),
        heavy_applied: started
            .map(|view| view.ops("heavy-applied"))
            .unwrap_or_default(),
        heavy_skipped: started
            .map(|view| view.ops("heavy-skipped"))
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;
