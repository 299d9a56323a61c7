//! `vhost-agent demo` end to end, as a new user runs it: two agents in one
//! process, two migrations between them with 32 disk requests in flight
//! each. It must print `demo: PASS` with every check ok, and its JSON
//! must show what each migration claims: the first drained (nothing
//! handed off) and configured the destination in full (queue and I/O ring
//! creation at the start), the second handed every request off and used
//! presetup (neither at the start). Counts and op names, not times.

use std::process::Command;

use serde_json::Value;
use vhost_agent_tests::support::agent_binary;

/// The checks the demo prints: six per migration.
const CHECKS: usize = 12;
/// Requests in flight at each stop (the demo's default).
const IN_FLIGHT: u64 = 32;

fn device<'a>(migration: &'a Value, id: &str) -> &'a Value {
    migration["timeline"]["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|device| device["source"] == id))
        .unwrap_or_else(|| panic!("no {id} in {migration}"))
}

fn heavy(migration: &Value, id: &str) -> Vec<String> {
    device(migration, id)["heavy-applied"]
        .as_array()
        .unwrap_or_else(|| panic!("no heavy-applied for {id}"))
        .iter()
        .map(|op| op.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_demo_passes_and_shows_drain_then_handoff_with_presetup() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(agent_binary())
        .arg("demo")
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run vhost-agent demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert_eq!(stdout.lines().last(), Some("demo: PASS"), "{stdout}");
    let checks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("check: "))
        .collect();
    assert_eq!(checks.len(), CHECKS, "{stdout}");
    assert!(checks.iter().all(|l| l.ends_with(": ok")), "{stdout}");
    assert!(
        stdout.contains("net0 destination critical path (ms)"),
        "{stdout}"
    );

    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("demo.json")).expect("demo.json written"),
    )
    .expect("demo.json is JSON");
    let migrations = json["migrations"].as_array().expect("migrations");
    assert_eq!(migrations.len(), 2);
    let (drain, handoff) = (&migrations[0], &migrations[1]);
    assert_eq!(drain["source-stop"], "drain");
    assert_eq!(drain["presetup"], false);
    assert_eq!(device(drain, "disk0")["handed-off"], 0);
    assert!(heavy(drain, "net0").iter().any(|op| op == "create_queue"));
    assert!(heavy(drain, "disk0")
        .iter()
        .any(|op| op == "create_io_ring"));
    assert_eq!(handoff["source-stop"], "suspend");
    assert_eq!(handoff["presetup"], true);
    assert_eq!(device(handoff, "disk0")["handed-off"], IN_FLIGHT);
    for id in ["net0", "disk0"] {
        assert_eq!(device(handoff, id)["presetup-used"], true, "{handoff}");
    }
    assert!(!heavy(handoff, "net0").iter().any(|op| op == "create_queue"));
    assert!(!heavy(handoff, "disk0")
        .iter()
        .any(|op| op == "create_io_ring"));
    // Both timelines place the agents' phases.
    for migration in migrations {
        let phases = migration["timeline"]["phases"].as_array().unwrap();
        for name in ["source-first-get-vring-base", "destination-rings-running"] {
            let phase = phases.iter().find(|p| p["phase"] == name).unwrap();
            assert!(phase["at-ms"].is_f64(), "{name}: {phase}");
        }
    }
}

#[test]
fn the_demo_refuses_an_in_flight_count_it_cannot_hold() {
    let output = Command::new(agent_binary())
        .args(["demo", "--in-flight", "0"])
        .output()
        .expect("run vhost-agent demo");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--in-flight must be 1..=64"), "{stderr}");
}
