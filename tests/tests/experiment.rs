//! The experiment runner end to end: `vhost-agent experiment --quick --only
//! net` (agents spawned from the same binary) writes a CSV, a JSON and an SVG chart that parse, with one
//! row per scenario of the quick matrix, and presetup takes the sim
//! profile's queue creation off the start critical path. That last check is
//! a property of presetup (the 40 ms creations move before the start), not
//! a speed goal: the margin is a factor of two where the model gives ~200.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use vhost_agent_tests::support::agent_binary;

/// Scenarios of `--quick --only net`: one profile, one queue pair count,
/// one RAM size, presetup off and on; one repetition each.
const QUICK_NET_ROWS: usize = 2;

/// `results.csv` as maps from column to cell, with the header.
fn read_csv(path: &Path) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let text = std::fs::read_to_string(path).expect("results.csv written");
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .expect("a header line")
        .split(',')
        .map(str::to_string)
        .collect();
    let rows = lines
        .map(|line| {
            // The quick net rows have no quoted cells (no errors).
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), header.len(), "ragged CSV line {line:?}");
            header
                .iter()
                .cloned()
                .zip(cells.into_iter().map(str::to_string))
                .collect()
        })
        .collect();
    (header, rows)
}

#[test]
fn quick_net_run_writes_parsable_results_and_presetup_shortens_the_start() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(agent_binary())
        .args(["experiment", "--quick", "--only", "net", "--out"])
        .arg(out.path())
        .output()
        .expect("run vhost-agent experiment");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "experiment failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    // Progress: one line per scenario.
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with('[')).count(),
        QUICK_NET_ROWS,
        "{stderr}"
    );
    assert!(
        stdout.contains("| start critical path without presetup (ms) | with presetup (ms) |"),
        "{stdout}"
    );

    let (header, rows) = read_csv(&out.path().join("results.csv"));
    assert!(header.iter().any(|c| c == "critical_path_us"), "{header:?}");
    assert_eq!(rows.len(), QUICK_NET_ROWS, "{rows:?}");
    assert!(rows.iter().all(|r| r["status"] == "ok"), "{rows:?}");
    let critical_path = |presetup: &str| -> u64 {
        let row = rows
            .iter()
            .find(|r| r["presetup"] == presetup)
            .unwrap_or_else(|| panic!("no row with presetup={presetup}: {rows:?}"));
        row["critical_path_us"].parse().expect("a number of µs")
    };
    let (without, with) = (critical_path("false"), critical_path("true"));
    assert!(
        with < without / 2,
        "critical path with presetup {with} µs, without {without} µs"
    );
    let with_row = rows.iter().find(|r| r["presetup"] == "true").unwrap();
    assert_eq!(with_row["presetup_hits"], "1", "{with_row:?}");
    assert_ne!(with_row["heavy_skipped"], "0", "{with_row:?}");

    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results.json")).expect("results.json written"),
    )
    .expect("results.json is JSON");
    let json_rows = json["rows"].as_array().expect("rows");
    assert_eq!(json_rows.len(), QUICK_NET_ROWS);
    assert_eq!(
        json_rows
            .iter()
            .map(|r| r["critical_path_us"].as_u64())
            .collect::<Vec<_>>(),
        rows.iter()
            .map(|r| r["critical_path_us"].parse().ok())
            .collect::<Vec<_>>(),
        "JSON and CSV disagree"
    );
    let medians = json["medians"].as_array().expect("medians");
    assert_eq!(medians.len(), QUICK_NET_ROWS);
    assert!(medians
        .iter()
        .all(|m| m["median_critical_path_ms"].as_f64().is_some()));

    let svg = std::fs::read_to_string(out.path().join("presetup-start.svg"))
        .expect("presetup-start.svg written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("with presetup"), "no legend in the chart");
    assert!(
        !out.path().join("blk-stop.svg").exists(),
        "--only net drew the blk chart"
    );
}
