//! The timeline built from made-up samples and events whose places on the
//! axis are known.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::*;
use crate::migrate::agents::AgentDevice;

fn ms(n: f64) -> Duration {
    Duration::from_secs_f64(n / 1e3)
}

/// `zero + n` ms (or before it, for negative `n`).
fn at(zero: Instant, n: f64) -> Instant {
    if n >= 0.0 {
        zero + ms(n)
    } else {
        zero - ms(-n)
    }
}

fn sample(zero: Instant, sent: f64, received: f64, reports: Vec<Value>) -> MetricsSample {
    MetricsSample {
        sent: at(zero, sent),
        received: at(zero, received),
        reports,
    }
}

fn agent_device(id: &str, kind: &str) -> AgentDevice {
    AgentDevice {
        id: id.to_string(),
        kind: kind.to_string(),
        socket: PathBuf::from(format!("/run/{id}.sock")),
        fence_mode: None,
        abandoned_outstanding: None,
        fence_open: None,
    }
}

fn message(at_us: u64, name: &str) -> Value {
    json!({"at-us": at_us, "event": "message", "code": 0, "name": name})
}

fn event(at_us: u64, kind: &str) -> Value {
    json!({"at-us": at_us, "event": kind})
}

fn wall_now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn qmp_event(
    name: &str,
    status: Option<&str>,
    stamp_us: Option<i64>,
    received: Instant,
) -> QmpEvent {
    QmpEvent {
        name: name.to_string(),
        data: status.map_or(Value::Null, |status| json!({ "status": status })),
        stamp_us,
        received,
    }
}

/// The values of the phases of `timeline` by name.
fn phase_of<'a>(timeline: &'a Timeline, name: &str) -> &'a Phase {
    timeline
        .phases
        .iter()
        .find(|phase| phase.phase == name)
        .unwrap_or_else(|| panic!("no phase {name}"))
}

fn close(value: Option<f64>, expected: f64, tolerance: f64) {
    let value = value.expect("a value");
    assert!(
        (value - expected).abs() <= tolerance,
        "{value} is not {expected} (±{tolerance})"
    );
}

#[test]
fn phases_come_from_the_right_clocks_and_events() {
    let zero = Instant::now();
    let reference = Reference::new(zero);
    let wall = wall_now_us();
    // The source device's zero lies at -1009.5 ms on the axis (both
    // readings agree, 1 ms round trips); the destination's at -507.5 ms
    // by its tighter first reading (the second, 2 ms round trip, says
    // -506.5).
    let source_before = sample(
        zero,
        -10.0,
        -9.0,
        vec![
            json!({"device": "net0", "now-us": 1_000_000, "starts": 1, "stops": 0, "timeline": []}),
        ],
    );
    let source_after = sample(
        zero,
        100.0,
        101.0,
        vec![json!({
            "device": "net0", "now-us": 1_110_000, "starts": 1, "stops": 1, "stop-time-us": 1000,
            "timeline": [
                message(900_000, "GET_VRING_BASE"),
                message(1_050_000, "GET_VRING_BASE"),
                event(1_051_000, "stop-reply"),
                message(1_060_000, "SET_DEVICE_STATE_FD"),
                json!({"at-us": 1_061_000, "event": "device-state-saved", "bytes": 99}),
            ]
        })],
    );
    let destination_before = sample(
        zero,
        -8.0,
        -7.0,
        vec![json!({"device": "net0", "now-us": 500_000, "starts": 0, "stops": 0, "timeline": []})],
    );
    let destination_after = sample(
        zero,
        102.0,
        104.0,
        vec![json!({
            "device": "net0", "now-us": 609_500, "starts": 1, "stops": 0,
            "start-critical-path-us": 3000, "start-agent-us": 1000,
            "last-switchover": {"early": true, "heavy-applied": ["map_region"], "heavy-skipped": ["create_queue", "create_queue"]},
            "timeline": [
                message(570_000, "SET_DEVICE_STATE_FD"),
                json!({"at-us": 571_000, "event": "device-state-loaded", "bytes": 99}),
                message(580_000, "SET_FEATURES"),
                event(580_000, "start-began"),
                json!({"at-us": 583_000, "event": "ring-started", "queue": 0}),
            ]
        })],
    );
    let received = at(zero, 200.0);
    let source_events = [
        qmp_event("STOP", None, Some(wall + 42_000), received),
        qmp_event(
            "MIGRATION",
            Some("completed"),
            Some(wall + 80_000),
            received,
        ),
    ];
    let destination_events = [qmp_event("RESUME", None, Some(wall + 70_000), received)];
    let devices = [MappedDevice {
        source: agent_device("net0", "net"),
        destination: agent_device("net0", "net"),
        chardev: Some("netchar0".to_string()),
    }];
    let observed = Observed {
        reference,
        uri: "tcp:127.0.0.1:1",
        presetup: true,
        devices: &devices,
        source_metrics: [&source_before, &source_after],
        destination_metrics: [&destination_before, &destination_after],
        source_events: &source_events,
        destination_events: &destination_events,
        query_migrate: &json!({"status": "completed", "downtime": 30, "total-time": 100, "setup-time": 2}),
        completed_seen: at(zero, 90.0),
        fences: &[],
    };
    let timeline = build(&observed);
    let exact = 1e-6;
    close(phase_of(&timeline, "migrate").at_ms, 0.0, exact);
    close(
        phase_of(&timeline, "source-first-get-vring-base").at_ms,
        40.5,
        exact,
    );
    close(
        phase_of(&timeline, "source-last-get-vring-base-reply").at_ms,
        41.5,
        exact,
    );
    close(
        phase_of(&timeline, "source-first-get-vring-base").uncertainty_ms,
        0.5,
        exact,
    );
    let save = phase_of(&timeline, "device-state-save");
    close(save.at_ms, 50.5, exact);
    close(save.end_ms, 51.5, exact);
    let load = phase_of(&timeline, "device-state-load");
    close(load.at_ms, 62.5, exact);
    close(load.end_ms, 63.5, exact);
    close(load.uncertainty_ms, 0.5, exact);
    close(
        phase_of(&timeline, "destination-first-start-message").at_ms,
        72.5,
        exact,
    );
    close(
        phase_of(&timeline, "destination-rings-running").at_ms,
        75.5,
        exact,
    );
    close(timeline.devices_paused_ms, 35.0, exact);
    // QEMU's stamps, through the wall clock read at the reference's
    // creation (a few µs apart from `wall`).
    close(phase_of(&timeline, "vm-stop").at_ms, 42.0, 1.0);
    close(phase_of(&timeline, "vm-resume").at_ms, 70.0, 1.0);
    let completed = phase_of(&timeline, "migration-completed");
    close(completed.at_ms, 80.0, 1.0);
    assert_eq!(completed.clock, "source QEMU");

    let net = &timeline.devices[0];
    assert!(net.presetup_used);
    assert_eq!(net.heavy_applied, ["map_region"]);
    assert_eq!(net.heavy_skipped, ["create_queue", "create_queue"]);
    close(net.destination_critical_path_ms, 3.0, exact);
    close(net.source_stop_ms, 1.0, exact);
    assert_eq!(net.handed_off, None, "a net device hands nothing off");
    assert_eq!(timeline.qemu.downtime_ms, Some(30));

    // The event from before the first sample is not the migration's.
    let stops = timeline
        .events
        .iter()
        .filter(|event| event.event == "message" && event.detail["name"] == "GET_VRING_BASE")
        .count();
    assert_eq!(stops, 1);
    assert!(timeline
        .events
        .windows(2)
        .all(|pair| pair[0].at_ms <= pair[1].at_ms));
    assert!(timeline.notes.is_empty(), "{:?}", timeline.notes);
    let destination_clock = timeline
        .clocks
        .iter()
        .find(|clock| clock.side == Side::Destination)
        .unwrap();
    close(
        Some(destination_clock.clock.readings_disagree_ms),
        1.0,
        exact,
    );
}

#[test]
fn what_nothing_recorded_is_missing_not_made_up() {
    let zero = Instant::now();
    let reference = Reference::new(zero);
    let report = |now: u64| json!({"device": "disk0", "now-us": now, "starts": 0, "stops": 0, "timeline": []});
    let source = [
        sample(zero, -2.0, -1.0, vec![report(10)]),
        sample(zero, 50.0, 51.0, vec![report(60_000)]),
    ];
    let destination = [
        sample(zero, -2.0, -1.0, vec![report(10)]),
        sample(zero, 50.0, 51.0, vec![report(60_000)]),
    ];
    let devices = [MappedDevice {
        source: agent_device("disk0", "blk"),
        destination: agent_device("disk0", "blk"),
        chardev: None,
    }];
    // A QEMU event without a stamp is placed where it was received.
    let source_events = [qmp_event("STOP", None, None, at(zero, 12.0))];
    let observed = Observed {
        reference,
        uri: "unix:/tmp/m",
        presetup: false,
        devices: &devices,
        source_metrics: [&source[0], &source[1]],
        destination_metrics: [&destination[0], &destination[1]],
        source_events: &source_events,
        destination_events: &[],
        query_migrate: &json!({"status": "completed"}),
        completed_seen: at(zero, 40.0),
        fences: &[FenceRelease {
            device: "disk0".to_string(),
            released: at(zero, 45.0),
        }],
    };
    let timeline = build(&observed);
    for name in [
        "source-first-get-vring-base",
        "device-state-save",
        "destination-rings-running",
        "vm-resume",
    ] {
        assert_eq!(phase_of(&timeline, name).at_ms, None, "{name}");
    }
    close(phase_of(&timeline, "vm-stop").at_ms, 12.0, 1e-6);
    let completed = phase_of(&timeline, "migration-completed");
    close(completed.at_ms, 40.0, 1e-6);
    assert_eq!(completed.clock, "orchestrator");
    close(phase_of(&timeline, "fence-released").at_ms, 45.0, 1e-6);
    assert_eq!(timeline.devices_paused_ms, None);
    let disk = &timeline.devices[0];
    assert!(!disk.presetup_used);
    assert_eq!(
        disk.destination_critical_path_ms, None,
        "no start: no figure"
    );
    assert_eq!(disk.source_stop_ms, None, "no stop: no figure");
}
