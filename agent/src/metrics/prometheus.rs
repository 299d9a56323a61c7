//! The figures in the Prometheus text exposition format.

use super::MetricsReport;

/// One Prometheus metric family: name, type, help, value per report.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&MetricsReport) -> Option<f64>,
}

const FAMILIES: &[Family] = &[
    Family {
        name: "vhost_agent_sessions_total",
        kind: "counter",
        help: "Front-end connections.",
        value: |r| Some(r.sessions as f64),
    },
    Family {
        name: "vhost_agent_starts_total",
        kind: "counter",
        help: "Device starts completed (every configured ring ran).",
        value: |r| Some(r.starts as f64),
    },
    Family {
        name: "vhost_agent_start_critical_path_seconds",
        kind: "gauge",
        help: "Last start: first start-sequence message to every configured ring running.",
        value: |r| r.start_critical_path_us.map(|us| us as f64 / 1e6),
    },
    Family {
        name: "vhost_agent_start_agent_seconds",
        kind: "gauge",
        help: "Last start: the agent's own handling time within the critical path.",
        value: |r| r.start_agent_us.map(|us| us as f64 / 1e6),
    },
    Family {
        name: "vhost_agent_stops_total",
        kind: "counter",
        help: "Device stops completed.",
        value: |r| Some(r.stops as f64),
    },
    Family {
        name: "vhost_agent_stop_seconds",
        kind: "gauge",
        help: "Last stop: first GET_VRING_BASE to the last reply.",
        value: |r| r.stop_time_us.map(|us| us as f64 / 1e6),
    },
    Family {
        name: "vhost_agent_requests_handed_off",
        kind: "gauge",
        help: "Requests left in the inflight region at the last stop.",
        value: |r| Some(r.handed_off_last_stop as f64),
    },
    Family {
        name: "vhost_agent_requests_handed_off_total",
        kind: "counter",
        help: "Requests left in the inflight region at all stops.",
        value: |r| Some(r.handed_off_total as f64),
    },
    Family {
        name: "vhost_agent_rings_running",
        kind: "gauge",
        help: "Rings running now.",
        value: |r| Some(r.rings_running as f64),
    },
    Family {
        name: "vhost_agent_presetup_heavy_ops_applied_total",
        kind: "counter",
        help: "Heavy configuration ops applied at device starts.",
        value: |r| Some(r.presetup.heavy_applied as f64),
    },
    Family {
        name: "vhost_agent_presetup_heavy_ops_skipped_total",
        kind: "counter",
        help: "Heavy configuration ops skipped at device starts (done early).",
        value: |r| Some(r.presetup.heavy_skipped as f64),
    },
    Family {
        name: "vhost_agent_presetup_light_ops_applied_total",
        kind: "counter",
        help: "Light configuration ops applied at device starts.",
        value: |r| Some(r.presetup.light_applied as f64),
    },
    Family {
        name: "vhost_agent_presetup_light_ops_skipped_total",
        kind: "counter",
        help: "Light configuration ops skipped at device starts.",
        value: |r| Some(r.presetup.light_skipped as f64),
    },
    Family {
        name: "vhost_agent_presetup_hits_total",
        kind: "counter",
        help: "Device starts that used an early configuration.",
        value: |r| Some(r.presetup.hits as f64),
    },
    Family {
        name: "vhost_agent_presetup_fallbacks_total",
        kind: "counter",
        help: "Early configurations refused; the device was configured in full.",
        value: |r| Some(r.presetup.fallbacks as f64),
    },
    Family {
        name: "vhost_agent_timeline_events_dropped_total",
        kind: "counter",
        help: "Timeline events dropped to keep the timeline bounded.",
        value: |r| Some(r.timeline_dropped as f64),
    },
];

/// A label value escaped as the exposition format requires.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The reports in the Prometheus text exposition format (version 0.0.4):
/// one family per figure, one sample per device (`device` label). A figure
/// not measured yet (no stop so far) has no sample.
pub fn prometheus_text(reports: &[MetricsReport]) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    for family in FAMILIES {
        let _ = writeln!(text, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(text, "# TYPE {} {}", family.name, family.kind);
        for report in reports {
            if let Some(value) = (family.value)(report) {
                let _ = writeln!(
                    text,
                    "{}{{device=\"{}\"}} {value}",
                    family.name,
                    escape_label(&report.device)
                );
            }
        }
    }
    text
}
