//! The experiment's results as rows (one per scenario and repetition, the
//! same columns in CSV and JSON), per-scenario medians, and the Markdown
//! summary tables in the shape of the early-migration series' seed result.

use serde_json::{json, Map, Value};

use super::{ms, Measurement, Record, Scenario};
use crate::experiment::net::memory_label;

/// The columns of `results.csv` and of each row of `results.json`, in
/// order. Cells that do not apply to a row's kind are empty (`null`).
pub const COLUMNS: [&str; 24] = [
    "kind",
    "scenario",
    "rep",
    "status",
    "error",
    "profile",
    "queue_pairs",
    "memory_mib",
    "presetup",
    "mtu",
    "critical_path_us",
    "frontend_start_us",
    "heavy_applied",
    "heavy_skipped",
    "light_applied",
    "light_skipped",
    "presetup_hits",
    "presetup_fallbacks",
    "in_flight",
    "latency_ms",
    "stop_mode",
    "in_flight_at_stop",
    "stop_us",
    "agent_stop_us",
];

/// One record as a JSON object with every column of [`COLUMNS`].
pub fn row(record: &Record) -> Map<String, Value> {
    let mut row: Map<String, Value> = COLUMNS
        .iter()
        .map(|name| (name.to_string(), Value::Null))
        .collect();
    let mut set = |name: &str, value: Value| {
        debug_assert!(COLUMNS.contains(&name), "{name} is not a column");
        row.insert(name.to_string(), value);
    };
    set("kind", json!(record.scenario.kind()));
    set("scenario", json!(record.scenario.describe()));
    set("rep", json!(record.rep));
    match &record.outcome {
        Ok(_) => set("status", json!("ok")),
        Err(e) => {
            set("status", json!("failed"));
            set("error", json!(e));
        }
    }
    match &record.scenario {
        Scenario::Net(net) => {
            set("profile", json!(net.profile_name));
            set("queue_pairs", json!(net.queue_pairs));
            set("memory_mib", json!(net.memory_mib));
            set("presetup", json!(net.presetup));
            set("mtu", json!(net.mtu));
        }
        Scenario::Blk(blk) => {
            set("in_flight", json!(blk.in_flight));
            set("latency_ms", json!(blk.latency_ms));
            set("stop_mode", json!(blk.mode.name()));
        }
    }
    match &record.outcome {
        Ok(Measurement::Net(net)) => {
            set("critical_path_us", json!(net.critical_path.as_micros()));
            set("frontend_start_us", json!(net.frontend_start.as_micros()));
            set("heavy_applied", json!(net.counts.heavy_applied));
            set("heavy_skipped", json!(net.counts.heavy_skipped));
            set("light_applied", json!(net.counts.light_applied));
            set("light_skipped", json!(net.counts.light_skipped));
            set("presetup_hits", json!(net.counts.hits));
            set("presetup_fallbacks", json!(net.counts.fallbacks));
        }
        Ok(Measurement::Blk(blk)) => {
            set("in_flight_at_stop", json!(blk.in_flight_at_stop));
            set("stop_us", json!(blk.stop.as_micros()));
            set(
                "agent_stop_us",
                blk.agent_stop.map_or(Value::Null, |d| json!(d.as_micros())),
            );
        }
        Err(_) => {}
    }
    row
}

/// A CSV cell: empty for `null`, quoted when it holds a comma, a quote or
/// a line break.
fn csv_cell(value: &Value) -> String {
    let text = match value {
        Value::Null => return String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// `results.csv`: a header line, then one line per record.
pub fn to_csv(records: &[Record]) -> String {
    let mut csv = COLUMNS.join(",");
    csv.push('\n');
    for record in records {
        let row = row(record);
        let cells: Vec<String> = COLUMNS.iter().map(|name| csv_cell(&row[*name])).collect();
        csv.push_str(&cells.join(","));
        csv.push('\n');
    }
    csv
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    })
}

/// A median in ms as JSON, rounded to the microsecond.
fn json_ms(value: Option<f64>) -> Value {
    value.map_or(Value::Null, |v| json!((v * 1e3).round() / 1e3))
}

/// One scenario over its repetitions: medians of the successful ones.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The scenario.
    pub scenario: Scenario,
    /// Repetitions that worked.
    pub ok: usize,
    /// Repetitions that failed.
    pub failed: usize,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// (net) agent start critical path, ms.
    pub critical_path_ms: Option<f64>,
    /// (net) front-end start to the last frame back, ms.
    pub frontend_start_ms: Option<f64>,
    /// (net) heavy ops applied at the start.
    pub heavy_applied: Option<f64>,
    /// (net) heavy ops skipped at the start.
    pub heavy_skipped: Option<f64>,
    /// (blk) GET_VRING_BASE send to reply, ms.
    pub stop_ms: Option<f64>,
    /// (blk) the agent's stop time, ms.
    pub agent_stop_ms: Option<f64>,
    /// (blk) requests in flight at the stop.
    pub in_flight_at_stop: Option<f64>,
}

impl Summary {
    /// Summarise the records of one scenario (all with that scenario).
    pub fn of(scenario: &Scenario, records: &[&Record]) -> Summary {
        let net: Vec<_> = records
            .iter()
            .filter_map(|r| match &r.outcome {
                Ok(Measurement::Net(m)) => Some(*m),
                _ => None,
            })
            .collect();
        let blk: Vec<_> = records
            .iter()
            .filter_map(|r| match &r.outcome {
                Ok(Measurement::Blk(m)) => Some(*m),
                _ => None,
            })
            .collect();
        let failed = records.iter().filter(|r| r.outcome.is_err()).count();
        Summary {
            scenario: scenario.clone(),
            ok: records.len() - failed,
            failed,
            first_error: records.iter().find_map(|r| r.outcome.clone().err()),
            critical_path_ms: median(net.iter().map(|m| ms(m.critical_path)).collect()),
            frontend_start_ms: median(net.iter().map(|m| ms(m.frontend_start)).collect()),
            heavy_applied: median(net.iter().map(|m| m.counts.heavy_applied as f64).collect()),
            heavy_skipped: median(net.iter().map(|m| m.counts.heavy_skipped as f64).collect()),
            stop_ms: median(blk.iter().map(|m| ms(m.stop)).collect()),
            agent_stop_ms: median(blk.iter().filter_map(|m| m.agent_stop).map(ms).collect()),
            in_flight_at_stop: median(blk.iter().map(|m| m.in_flight_at_stop as f64).collect()),
        }
    }

    /// The summary as JSON (scenario parameters and medians).
    pub fn to_json(&self) -> Value {
        let mut value = json!({
            "kind": self.scenario.kind(),
            "scenario": self.scenario.describe(),
            "ok": self.ok,
            "failed": self.failed,
            "first_error": self.first_error,
        });
        let object = value
            .as_object_mut()
            .expect("json! of an object literal is an object");
        let mut put = |name: &str, v: Value| {
            object.insert(name.to_string(), v);
        };
        match &self.scenario {
            Scenario::Net(net) => {
                put("profile", json!(net.profile_name));
                put("queue_pairs", json!(net.queue_pairs));
                put("memory_mib", json!(net.memory_mib));
                put("presetup", json!(net.presetup));
                put("mtu", json!(net.mtu));
                put("median_critical_path_ms", json_ms(self.critical_path_ms));
                put("median_frontend_start_ms", json_ms(self.frontend_start_ms));
                put("median_heavy_applied", json!(self.heavy_applied));
                put("median_heavy_skipped", json!(self.heavy_skipped));
            }
            Scenario::Blk(blk) => {
                put("in_flight", json!(blk.in_flight));
                put("latency_ms", json!(blk.latency_ms));
                put("stop_mode", json!(blk.mode.name()));
                put("median_stop_ms", json_ms(self.stop_ms));
                put("median_agent_stop_ms", json_ms(self.agent_stop_ms));
                put("median_in_flight_at_stop", json!(self.in_flight_at_stop));
            }
        }
        value
    }
}

/// One [`Summary`] per scenario, in first-seen order.
pub fn summaries(records: &[Record]) -> Vec<Summary> {
    let mut scenarios: Vec<&Scenario> = Vec::new();
    for record in records {
        if !scenarios.contains(&&record.scenario) {
            scenarios.push(&record.scenario);
        }
    }
    scenarios
        .into_iter()
        .map(|scenario| {
            let mine: Vec<&Record> = records.iter().filter(|r| &r.scenario == scenario).collect();
            Summary::of(scenario, &mine)
        })
        .collect()
}

/// `results.json`: `settings` as given, every row, and the medians.
pub fn to_json(records: &[Record], settings: Value) -> Value {
    json!({
        "settings": settings,
        "columns": COLUMNS,
        "rows": records.iter().map(row).collect::<Vec<_>>(),
        "medians": summaries(records).iter().map(Summary::to_json).collect::<Vec<_>>(),
    })
}

/// Milliseconds for a table: three decimals below 1 ms, two below 100.
pub fn format_ms(value: Option<f64>) -> String {
    match value {
        None => "failed".to_string(),
        Some(v) if v < 1.0 => format!("{v:.3}"),
        Some(v) if v < 100.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// `before / after` as a factor.
pub fn format_ratio(before: Option<f64>, after: Option<f64>) -> String {
    match (before, after) {
        (Some(b), Some(a)) if a > 0.0 => {
            let ratio = b / a;
            if ratio >= 100.0 {
                format!("{ratio:.0}x")
            } else {
                format!("{ratio:.1}x")
            }
        }
        _ => "-".to_string(),
    }
}

/// The net summaries paired per (profile, queue pairs, memory): without
/// presetup, with presetup.
pub fn net_pairs(summaries: &[Summary]) -> Vec<(&Summary, &Summary)> {
    let mut pairs = Vec::new();
    for without in summaries {
        let Scenario::Net(a) = &without.scenario else {
            continue;
        };
        if a.presetup {
            continue;
        }
        let with = summaries.iter().find(|s| match &s.scenario {
            Scenario::Net(b) => {
                b.presetup
                    && b.profile == a.profile
                    && b.queue_pairs == a.queue_pairs
                    && b.memory_mib == a.memory_mib
            }
            Scenario::Blk(_) => false,
        });
        if let Some(with) = with {
            pairs.push((without, with));
        }
    }
    pairs
}

/// The blk summaries paired per (in flight, latency): drain, suspend.
pub fn blk_pairs(summaries: &[Summary]) -> Vec<(&Summary, &Summary)> {
    use vhost_agent_frontend::blk_stop::StopMode;
    let mut pairs = Vec::new();
    for drain in summaries {
        let Scenario::Blk(a) = &drain.scenario else {
            continue;
        };
        if a.mode != StopMode::Drain {
            continue;
        }
        let suspend = summaries.iter().find(|s| match &s.scenario {
            Scenario::Blk(b) => {
                b.mode == StopMode::Suspend
                    && b.in_flight == a.in_flight
                    && b.latency_ms == a.latency_ms
            }
            Scenario::Net(_) => false,
        });
        if let Some(suspend) = suspend {
            pairs.push((drain, suspend));
        }
    }
    pairs
}

/// The seed-result table: start critical path without and with presetup.
pub fn net_table(summaries: &[Summary]) -> String {
    let mut table = String::from(
        "| profile | queue pairs | guest RAM | start critical path without presetup (ms) | with presetup (ms) | speedup |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (without, with) in net_pairs(summaries) {
        let Scenario::Net(net) = &without.scenario else {
            continue;
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            net.profile_name,
            net.queue_pairs,
            memory_label(net.memory_mib),
            format_ms(without.critical_path_ms),
            format_ms(with.critical_path_ms),
            format_ratio(without.critical_path_ms, with.critical_path_ms),
        ));
    }
    table
}

/// The front-end's view of the same starts, and the heavy ops the start
/// itself applied.
pub fn net_frontend_table(summaries: &[Summary]) -> String {
    let mut table = String::from(
        "| profile | queue pairs | guest RAM | front-end start to last frame, without (ms) | with (ms) | heavy ops at start, without | with |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let count = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
    for (without, with) in net_pairs(summaries) {
        let Scenario::Net(net) = &without.scenario else {
            continue;
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            net.profile_name,
            net.queue_pairs,
            memory_label(net.memory_mib),
            format_ms(without.frontend_start_ms),
            format_ms(with.frontend_start_ms),
            count(without.heavy_applied),
            count(with.heavy_applied),
        ));
    }
    table
}

/// Source stop time, drain versus suspend.
pub fn blk_table(summaries: &[Summary]) -> String {
    let mut table = String::from(
        "| in flight | latency (ms) | drain (ms) | suspend (ms) | ratio |\n\
         |---:|---:|---:|---:|---:|\n",
    );
    for (drain, suspend) in blk_pairs(summaries) {
        let Scenario::Blk(blk) = &drain.scenario else {
            continue;
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            blk.in_flight,
            blk.latency_ms,
            format_ms(drain.stop_ms),
            format_ms(suspend.stop_ms),
            format_ratio(drain.stop_ms, suspend.stop_ms),
        ));
    }
    table
}

/// The progress line of one finished scenario.
pub fn progress_line(index: usize, total: usize, records: &[Record]) -> String {
    let Some(first) = records.first() else {
        return format!("[{index}/{total}] (no repetitions)");
    };
    let refs: Vec<&Record> = records.iter().collect();
    let summary = Summary::of(&first.scenario, &refs);
    let width = total.to_string().len();
    let prefix = format!("[{index:>width$}/{total}] {}", first.scenario.describe());
    let first_error = summary
        .first_error
        .as_deref()
        .and_then(|e| e.lines().next())
        .unwrap_or_default();
    if summary.ok == 0 {
        return format!(
            "{prefix}: FAILED ({} of {}): {first_error}",
            summary.failed,
            records.len()
        );
    }
    let figures = match &first.scenario {
        Scenario::Net(_) => format!(
            "critical path {} ms, front-end {} ms",
            format_ms(summary.critical_path_ms),
            format_ms(summary.frontend_start_ms)
        ),
        Scenario::Blk(_) => format!(
            "stop {} ms ({} in flight at the stop)",
            format_ms(summary.stop_ms),
            summary
                .in_flight_at_stop
                .map_or("-".to_string(), |v| format!("{v}"))
        ),
    };
    let mut line = format!("{prefix}: {figures} (median of {} run(s))", summary.ok);
    if summary.failed > 0 {
        line.push_str(&format!("; {} FAILED: {first_error}", summary.failed));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn csv_cells_with_commas_quotes_or_newlines_are_quoted() {
        assert_eq!(csv_cell(&Value::Null), "");
        assert_eq!(csv_cell(&json!(12)), "12");
        assert_eq!(csv_cell(&json!("plain text")), "plain text");
        assert_eq!(csv_cell(&json!("a, \"b\"\nc")), "\"a, \"\"b\"\"\nc\"");
    }

    #[test]
    fn ratios_and_milliseconds_are_formatted_for_tables() {
        assert_eq!(format_ratio(Some(191.4), Some(0.5)), "383x");
        assert_eq!(format_ratio(Some(3.0), Some(2.0)), "1.5x");
        assert_eq!(format_ratio(Some(3.0), None), "-");
        assert_eq!(format_ms(Some(0.4567)), "0.457");
        assert_eq!(format_ms(Some(83.296)), "83.30");
        assert_eq!(format_ms(Some(191.44)), "191.4");
        assert_eq!(format_ms(None), "failed");
    }
}
