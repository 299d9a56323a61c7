//! What the demo prints and checks: the two migrations' timelines side by
//! side, and every check with its result.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use vhost_agent::migrate::render::ops;
use vhost_agent::migrate::timeline::{DeviceFigures, Timeline};

use super::guest::StopKind;
use super::migration::Outcome;

fn device<'a>(timeline: &'a Timeline, id: &str) -> Option<&'a DeviceFigures> {
    timeline.devices.iter().find(|device| device.source == id)
}

fn phase_at(timeline: &Timeline, name: &str) -> Option<f64> {
    timeline
        .phases
        .iter()
        .find(|phase| phase.phase == name)
        .and_then(|phase| phase.at_ms)
}

fn title(outcome: &Outcome) -> &'static str {
    match (outcome.source_stop, outcome.presetup) {
        (StopKind::Drain, false) => "drain, full config",
        (StopKind::Suspend, true) => "handoff, presetup",
        (StopKind::Drain, true) => "drain, presetup",
        (StopKind::Suspend, false) => "handoff, full config",
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

/// The side-by-side table.
pub fn print(outcomes: &[Outcome], in_flight: usize) {
    println!();
    print!(
        "{:<52}",
        format!("{in_flight} disk requests in flight at each stop")
    );
    for (index, outcome) in outcomes.iter().enumerate() {
        print!("{:>24}", format!("{}: {}", index + 1, title(outcome)));
    }
    println!();
    let row = |label: &str, value: &dyn Fn(&Timeline) -> String| {
        print!("{label:<52}");
        for outcome in outcomes {
            print!("{:>24}", value(&outcome.timeline));
        }
        println!();
    };
    let figure = |id: &'static str, pick: fn(&DeviceFigures) -> Option<f64>| {
        move |timeline: &Timeline| ms(device(timeline, id).and_then(pick))
    };
    row(
        "disk0 source stop, GET_VRING_BASE (ms)",
        &figure("disk0", |d| d.source_stop_ms),
    );
    row("disk0 requests handed off at the stop", &|t: &Timeline| {
        device(t, "disk0")
            .and_then(|d| d.handed_off)
            .map_or_else(|| "-".to_string(), |n| n.to_string())
    });
    row(
        "net0 source stop (ms)",
        &figure("net0", |d| d.source_stop_ms),
    );
    row(
        "disk0 destination critical path (ms)",
        &figure("disk0", |d| d.destination_critical_path_ms),
    );
    row(
        "net0 destination critical path (ms)",
        &figure("net0", |d| d.destination_critical_path_ms),
    );
    row(
        "no ring ran: first GET_VRING_BASE to rings running (ms)",
        &|t: &Timeline| ms(t.devices_paused_ms),
    );
    for id in ["disk0", "net0"] {
        println!("{id} heavy ops the destination's start executed:");
        for (index, outcome) in outcomes.iter().enumerate() {
            let applied = device(&outcome.timeline, id).map(|d| ops(&d.heavy_applied));
            let done = device(&outcome.timeline, id).map(|d| ops(&d.heavy_skipped));
            println!(
                "  {}: {} (done before it: {})",
                index + 1,
                applied.unwrap_or_else(|| "-".to_string()),
                done.unwrap_or_else(|| "-".to_string())
            );
        }
    }
    println!("(times are this machine's, from the agents' timelines; the net device's heavy ops cost what the simulated profile says)");
    println!();
}

/// Every check, in order: what each migration checked itself, then what
/// its timeline must show.
pub fn checks(outcomes: &[Outcome], in_flight: usize) -> Vec<(String, Result<(), String>)> {
    let mut checks = Vec::new();
    for (index, outcome) in outcomes.iter().enumerate() {
        let number = index + 1;
        for (what, result) in &outcome.checks {
            checks.push((format!("migration {number}: {what}"), result.clone()));
        }
        let timeline = &outcome.timeline;
        let mut check = |what: String, result: Result<(), String>| {
            checks.push((format!("migration {number}: {what}"), result))
        };
        let phases = [
            "source-first-get-vring-base",
            "source-last-get-vring-base-reply",
            "destination-first-start-message",
            "destination-rings-running",
        ];
        let missing: Vec<&str> = phases
            .iter()
            .copied()
            .filter(|name| phase_at(timeline, name).is_none())
            .collect();
        check(
            "the agents' phases are on the timeline".to_string(),
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing {missing:?}"))
            },
        );
        let handed_off = device(timeline, "disk0").and_then(|d| d.handed_off);
        let wanted = match outcome.source_stop {
            StopKind::Drain => 0,
            StopKind::Suspend => in_flight as u64,
        };
        check(
            format!("the source's stop handed off {wanted} requests"),
            if handed_off == Some(wanted) {
                Ok(())
            } else {
                Err(format!("it handed off {handed_off:?}"))
            },
        );
        for (id, heavy) in [("net0", "create_queue"), ("disk0", "create_io_ring")] {
            let Some(figures) = device(timeline, id) else {
                check(format!("{id} on the timeline"), Err("missing".to_string()));
                continue;
            };
            let applied = figures.heavy_applied.iter().any(|op| op == heavy);
            let result = match (outcome.presetup, figures.presetup_used, applied) {
                (true, true, false) | (false, false, true) => Ok(()),
                (_, used, applied) => Err(format!(
                    "presetup used: {used}, {heavy} at the start: {applied}"
                )),
            };
            let what = if outcome.presetup {
                format!("{id}: presetup was used and {heavy} was not on the critical path")
            } else {
                format!("{id}: the start configured in full ({heavy} at the start)")
            };
            check(what, result);
        }
    }
    checks
}

/// Both migrations' timelines and checks as JSON, into `dir/demo.json`.
pub fn write_json(dir: &Path, outcomes: &[Outcome]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let migrations: Vec<Value> = outcomes
        .iter()
        .map(|outcome| {
            json!({
                "title": title(outcome),
                "presetup": outcome.presetup,
                "source-stop": match outcome.source_stop {
                    StopKind::Drain => "drain",
                    StopKind::Suspend => "suspend",
                },
                "timeline": outcome.timeline,
            })
        })
        .collect();
    let path = dir.join("demo.json");
    let text = serde_json::to_string_pretty(&json!({ "migrations": migrations }))? + "\n";
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
}
