//! One agent device as the orchestrator saw it: its two `query-metrics`
//! reports (before `migrate` and after), its clock placed on the axis, and
//! the timeline events of the migration (those after the first report).

use serde_json::Value;

use super::agents::MetricsSample;
use super::clock::{ClockReading, DeviceClock, Reference};
use super::timeline::TimelineEvent;
use super::Side;

/// What the phases are made of: a time and its uncertainty.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    /// Where, ms on the axis.
    pub at: f64,
    /// Give or take, ms.
    pub plus_minus: f64,
}

/// The earliest of `marks`.
pub fn earliest(marks: impl IntoIterator<Item = Mark>) -> Option<Mark> {
    marks.into_iter().min_by(|a, b| a.at.total_cmp(&b.at))
}

/// The latest of `marks`.
pub fn latest(marks: impl IntoIterator<Item = Mark>) -> Option<Mark> {
    marks.into_iter().max_by(|a, b| a.at.total_cmp(&b.at))
}

/// One side's device after the migration: its placed clock and the
/// events since the first sample.
pub struct DeviceView<'a> {
    /// Which agent.
    pub side: Side,
    /// The device's id.
    pub id: &'a str,
    /// Its clock on the axis.
    pub clock: DeviceClock,
    /// Its report after the migration.
    pub after: &'a Value,
    /// Its report before `migrate`.
    pub before: &'a Value,
    /// Its timeline events since the report before.
    pub events: Vec<&'a Value>,
}

impl<'a> DeviceView<'a> {
    /// Device `id` of `side` in its two samples; `None` when a sample
    /// lacks it.
    pub fn new(
        reference: &Reference,
        side: Side,
        id: &'a str,
        samples: [&'a MetricsSample; 2],
    ) -> Option<DeviceView<'a>> {
        let before = samples[0].device(id)?;
        let after = samples[1].device(id)?;
        let readings: Vec<ClockReading> = [(samples[0], before), (samples[1], after)]
            .iter()
            .filter_map(|(sample, report)| {
                Some(ClockReading {
                    sent: sample.sent,
                    received: sample.received,
                    device_us: report["now-us"].as_u64()?,
                })
            })
            .collect();
        let clock = DeviceClock::from_readings(reference, &readings)?;
        let baseline = before["now-us"].as_u64().unwrap_or(0);
        let events = after["timeline"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter(|event| event["at-us"].as_u64().is_some_and(|at| at > baseline))
                    .collect()
            })
            .unwrap_or_default();
        Some(DeviceView {
            side,
            id,
            clock,
            after,
            before,
            events,
        })
    }

    /// Where `event` lies.
    pub fn mark(&self, event: &Value) -> Option<Mark> {
        Some(Mark {
            at: self.clock.at(event["at-us"].as_u64()?),
            plus_minus: self.clock.uncertainty_ms,
        })
    }

    /// Events named `event` (and, for messages, with one of `names`).
    pub fn matching(&self, event: &str, names: &[&str]) -> Vec<Mark> {
        self.events
            .iter()
            .filter(|e| e["event"] == event)
            .filter(|e| names.is_empty() || names.iter().any(|name| e["name"] == *name))
            .filter_map(|e| self.mark(e))
            .collect()
    }

    /// A number of the report after the migration.
    pub fn number(&self, key: &str) -> Option<u64> {
        self.after[key].as_u64()
    }

    /// Whether this device completed a start since the first sample.
    pub fn started(&self) -> bool {
        self.number("starts") > self.before["starts"].as_u64()
    }

    /// Its start window: the last `start-began` and where it closed.
    pub fn start_window(&self) -> Option<(Mark, Mark)> {
        if !self.started() {
            return None;
        }
        let began = *self.matching("start-began", &[]).last()?;
        let path_ms = self.number("start-critical-path-us")? as f64 / 1e3;
        Some((
            began,
            Mark {
                at: began.at + path_ms,
                plus_minus: began.plus_minus,
            },
        ))
    }

    /// Whether this device completed a stop since the first sample.
    pub fn stopped(&self) -> bool {
        self.number("stops") > self.before["stops"].as_u64()
    }

    /// A heavy-op list of the last switchover.
    pub fn ops(&self, list: &str) -> Vec<String> {
        self.after["last-switchover"][list]
            .as_array()
            .map(|ops| {
                ops.iter()
                    .filter_map(|op| op.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Its events for the merged timeline.
    pub fn timeline_events(&self) -> Vec<TimelineEvent> {
        self.events
            .iter()
            .filter_map(|event| {
                let mark = self.mark(event)?;
                let mut detail = (*event).clone();
                let name = detail
                    .as_object_mut()
                    .and_then(|members| {
                        members.remove("at-us");
                        members.remove("event")
                    })
                    .and_then(|name| name.as_str().map(str::to_string))?;
                Some(TimelineEvent {
                    at_ms: mark.at,
                    uncertainty_ms: mark.plus_minus,
                    side: self.side,
                    origin: self.id.to_string(),
                    event: name,
                    detail,
                })
            })
            .collect()
    }
}
