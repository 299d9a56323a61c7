//! What the lab front-end reports: `LAB-RESULT key=value` lines on stdout
//! for the payload script to pass on (tests/src/lab.rs collects them),
//! checks that count failures, and the agent's control API
//! (`query-metrics`), read directly over its socket.

use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Results of one run, printed as they come.
#[derive(Debug, Default)]
pub struct Report {
    failures: u32,
}

impl Report {
    /// Report `key=value`.
    pub fn put(&mut self, key: &str, value: impl Display) {
        let value = value.to_string().replace(char::is_whitespace, "_");
        println!("LAB-RESULT {key}={value}");
    }

    /// Report `name=ok` or `name=fail` (counted), with `detail` on failure.
    pub fn check(&mut self, name: &str, ok: bool, detail: impl Display) -> bool {
        if ok {
            self.put(name, "ok");
        } else {
            self.failures += 1;
            println!("lab-frontend: check {name} failed: {detail}");
            self.put(name, "fail");
        }
        ok
    }

    /// Failed checks so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// One control API command on the agent's socket at `path`: its `return`
/// value, or the error reply.
pub fn control(path: &Path, command: &str, arguments: Value) -> Result<Value, String> {
    let stream = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let request = serde_json::json!({"execute": command, "arguments": arguments});
    let mut line = request.to_string();
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| e.to_string())?;
    let reply: Value = serde_json::from_str(&reply).map_err(|e| format!("{e}: {reply}"))?;
    match reply.get("return") {
        Some(value) => Ok(value.clone()),
        None => Err(reply.to_string()),
    }
}

/// The `query-metrics` entry of the agent's first device.
pub fn metrics(path: &Path) -> Result<Value, String> {
    let all = control(path, "query-metrics", serde_json::json!({}))?;
    all.get(0)
        .cloned()
        .ok_or_else(|| format!("query-metrics returned no device: {all}"))
}

/// Report what the last start cost, from `query-metrics`: the critical
/// path, the agent's share of it, and the ops of the switchover.
pub fn report_switchover(report: &mut Report, prefix: &str, metrics: &Value) {
    let number = |key: &str| {
        metrics[key]
            .as_u64()
            .map_or("none".into(), |v| v.to_string())
    };
    report.put(
        &format!("{prefix}critical_path_us"),
        number("start-critical-path-us"),
    );
    report.put(&format!("{prefix}agent_us"), number("start-agent-us"));
    let switchover = &metrics["last-switchover"];
    let list = |key: &str| {
        let names: Vec<&str> = switchover[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(",")
        }
    };
    report.put(&format!("{prefix}heavy_applied"), list("heavy-applied"));
    report.put(&format!("{prefix}heavy_skipped"), list("heavy-skipped"));
    report.put(
        &format!("{prefix}heavy_not_needed"),
        list("heavy-not-needed"),
    );
    report.put(
        &format!("{prefix}light_applied"),
        switchover["light-applied"].as_u64().unwrap_or(0),
    );
    report.put(
        &format!("{prefix}early"),
        switchover["early"].as_bool().unwrap_or(false),
    );
}
