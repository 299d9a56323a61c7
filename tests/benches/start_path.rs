//! `start_path`: the destination's start critical path with DPDK's
//! `virtio_user` as the front-end, without and with presetup, and where
//! the time goes.
//!
//! Each measurement starts a fresh agent with one net device on the
//! `sim:netdev/profiles/vdpa-191ms.json` profile (`BENCH_PAIRS` queue
//! pairs, default 4), pinned to CPU 1. With presetup, the control API's
//! `presetup` first receives the early configuration: the `query-config`
//! of another agent that served the same client (what an orchestrator
//! relays during migration setup). Then `dpdk-testpmd` with
//! `net_virtio_user` (CPU 0) connects and starts the port: that is the
//! start sequence. The figure is the agent's own `start-critical-path-us`
//! from `query-metrics` (first start message to every ring running).
//! Without and with presetup alternate; the table shows medians.
//!
//! A last run of each kind with `RUST_LOG=debug` splits the critical path
//! into the agent's handling of each request (the one debug line per
//! message carries its duration) and the rest: the front-end's own work
//! and the socket round trips between messages.
//!
//! Benchmark, not a test. `cargo bench -p vhost-agent-tests --bench
//! start_path`, as root with DPDK installed. Knobs: `BENCH_ROUNDS` (5),
//! `BENCH_PAIRS` (4), `BENCH_HUGEPAGES` (0; 1 backs testpmd with 2 MiB
//! pages, which needs `echo 512 > /proc/sys/vm/nr_hugepages` first),
//! `VHOST_AGENT_BIN` (a prebuilt agent: compare two builds by running
//! this twice).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_agent_tests::agent::AgentCommand;
use vhost_agent_tests::bench::load_average;
use vhost_agent_tests::net_rig::vdpa_191ms_profile;
use vhost_agent_tests::support::{control_execute, ChildGuard};
use vhost_agent_tests::testpmd::{check_dpdk, Testpmd, TestpmdOptions};

const LINK_TIMEOUT: Duration = Duration::from_secs(30);

fn knob(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An agent with one sim net device, in its own directory.
struct Run {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
    _agent: ChildGuard,
}

impl Run {
    fn start(pairs: u16, rust_log: &str) -> Run {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("net.sock");
        let control = dir.path().join("control.sock");
        let log = dir.path().join("agent.log");
        let agent = AgentCommand::new()
            .net(format!(
                "socket={},dataplane=sim:{},queue-pairs={pairs}",
                socket.display(),
                vdpa_191ms_profile().display()
            ))
            .control(&control)
            .log(&log)
            .rust_log(rust_log)
            .cpu(1)
            .spawn();
        Run {
            _dir: dir,
            socket,
            control,
            log,
            _agent: agent,
        }
    }

    fn execute(&self, command: &str, arguments: Value) -> Value {
        control_execute(&self.control, command, arguments)
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    fn metrics(&self) -> Value {
        let all = self.execute("query-metrics", json!({"device": "net0"}));
        all.as_array()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or(all)
    }

    /// testpmd connects and starts its port; returns it once every ring
    /// runs (after the link is up).
    fn connect(&self, pairs: u16) -> Testpmd {
        let mut options = TestpmdOptions::client(&self.socket, pairs);
        // DPDK builds the memory table from its memory segments: with
        // 4 KiB pages that walk is milliseconds of the front-end's time
        // between GET_STATUS and SET_MEM_TABLE, inside the window.
        options.hugepages = knob("BENCH_HUGEPAGES", 0) == 1;
        let mut client = Testpmd::spawn(options).unwrap_or_else(|e| panic!("testpmd: {e}"));
        client
            .wait_link_up(LINK_TIMEOUT)
            .unwrap_or_else(|e| panic!("link: {e}\n{}", client.output_tail(30)));
        let deadline = Instant::now() + LINK_TIMEOUT;
        loop {
            let metrics = self.metrics();
            if metrics["rings-running"].as_u64() == Some(u64::from(2 * pairs))
                && metrics["start-critical-path-us"].is_u64()
            {
                return client;
            }
            assert!(Instant::now() < deadline, "rings never all ran: {metrics}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One start: its critical path (us) and the switchover's heavy ops.
struct Start {
    critical_us: u64,
    agent_us: Option<u64>,
    heavy: Vec<String>,
    log: String,
    timeline: Vec<Value>,
}

fn one_start(pairs: u16, early: Option<&Value>, rust_log: &str) -> Start {
    let run = Run::start(pairs, rust_log);
    if let Some(early) = early {
        run.execute("presetup", json!({"device": "net0", "config": early}));
    }
    let client = run.connect(pairs);
    let metrics = run.metrics();
    let _ = client.quit(Duration::from_secs(10));
    Start {
        critical_us: metrics["start-critical-path-us"].as_u64().unwrap_or(0),
        agent_us: metrics["start-agent-us"].as_u64(),
        heavy: metrics["last-switchover"]["heavy-applied"]
            .as_array()
            .map(|ops| {
                ops.iter()
                    .filter_map(|op| op.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        log: std::fs::read_to_string(&run.log).unwrap_or_default(),
        timeline: metrics["timeline"].as_array().cloned().unwrap_or_default(),
    }
}

/// The largest gaps between consecutive timeline events from the first
/// start message to the last ring start: where the window's time went.
fn largest_gaps(timeline: &[Value], count: usize) -> Vec<(u64, String, String)> {
    let label = |e: &Value| {
        e["name"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| e["event"].as_str().unwrap_or("?").to_string())
    };
    let first = timeline
        .iter()
        .position(|e| matches!(e["name"].as_str(), Some("SET_FEATURES" | "NET_SET_MTU")));
    let last = timeline.iter().rposition(|e| e["event"] == "ring-started");
    let (Some(first), Some(last)) = (first, last) else {
        return Vec::new();
    };
    let mut gaps: Vec<_> = timeline[first..=last]
        .windows(2)
        .map(|pair| {
            let at = |e: &Value| e["at-us"].as_u64().unwrap_or(0);
            (
                at(&pair[1]).saturating_sub(at(&pair[0])),
                label(&pair[0]),
                label(&pair[1]),
            )
        })
        .collect();
    gaps.sort_by_key(|gap| std::cmp::Reverse(gap.0));
    gaps.truncate(count);
    gaps
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// A duration as `Debug` prints it (`12.3µs`, `1.2ms`, `800ns`), in us.
fn parse_debug_duration(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("µs") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = text.strip_suffix("ns") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// Per request name: how many and how long the agent spent in them (us),
/// from the debug lines `NAME (CODE) size N -> ok in DURATION`, counting
/// only what lies between the first start message and the moment the
/// last of `rings` rings started.
fn handling(log: &str, rings: usize) -> BTreeMap<String, (u32, f64)> {
    let mut out: BTreeMap<String, (u32, f64)> = BTreeMap::new();
    let mut started = false;
    let mut running = 0;
    for line in log.lines() {
        if line.contains(": queue ") && line.contains(" started (size ") {
            running += 1;
        }
        let Some((head, duration)) = line.rsplit_once(" in ") else {
            continue;
        };
        let Some(us) = parse_debug_duration(duration.trim()) else {
            continue;
        };
        let Some(rest) = head.split(": ").nth(1) else {
            continue;
        };
        let Some(name) = rest.split_whitespace().next() else {
            continue;
        };
        if !rest.contains(" size ") {
            continue;
        }
        if name == "SET_FEATURES" || name == "NET_SET_MTU" {
            started = true;
        }
        if started {
            let entry = out.entry(name.to_string()).or_default();
            entry.0 += 1;
            entry.1 += us;
        }
        if running >= rings {
            break;
        }
    }
    out
}

fn main() -> ExitCode {
    if let Err(e) = check_dpdk() {
        eprintln!("start_path: {e}");
        return ExitCode::FAILURE;
    }
    let rounds = knob("BENCH_ROUNDS", 5);
    let pairs = u16::try_from(knob("BENCH_PAIRS", 4)).unwrap_or(4);
    // The early configuration: what a source agent serving this client
    // holds, as an orchestrator would read it.
    let source = Run::start(pairs, "info");
    let client = source.connect(pairs);
    let early = source.execute("query-config", json!({"device": "net0"}));
    let _ = client.quit(Duration::from_secs(10));
    drop(source);

    let mut full = Vec::new();
    let mut early_runs = Vec::new();
    let mut agent_share = (Vec::new(), Vec::new());
    let mut heavy = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let without = one_start(pairs, None, "info");
        let with = one_start(pairs, Some(&early), "info");
        eprintln!(
            "round {}: without presetup {} us, with {} us",
            round + 1,
            without.critical_us,
            with.critical_us
        );
        full.push(without.critical_us);
        early_runs.push(with.critical_us);
        agent_share.0.extend(without.agent_us);
        agent_share.1.extend(with.agent_us);
        heavy = (without.heavy, with.heavy);
    }
    println!(
        "start critical path, {pairs} queue pairs, vdpa-191ms, DPDK virtio_user ({} pages), median of {rounds} (load {}):",
        if knob("BENCH_HUGEPAGES", 0) == 1 { "2 MiB" } else { "4 KiB" },
        load_average()
    );
    println!(
        "| presetup | critical path (us) | of it, the agent's (us) | heavy ops at the start |"
    );
    println!("|---|---:|---:|---|");
    let share = |values: &mut Vec<u64>| {
        if values.is_empty() {
            "n/a".to_string()
        } else {
            median(values).to_string()
        }
    };
    println!(
        "| off | {} | {} | {} |",
        median(&mut full),
        share(&mut agent_share.0),
        heavy.0.join(", ")
    );
    println!(
        "| on | {} | {} | {} |",
        median(&mut early_runs),
        share(&mut agent_share.1),
        heavy.1.join(", ")
    );

    for (label, config) in [("off", None), ("on", Some(&early))] {
        let start = one_start(pairs, config, "debug");
        let table = handling(&start.log, usize::from(2 * pairs));
        let agent_us: f64 = table.values().map(|(_, us)| us).sum();
        println!(
            "\nbreakdown, presetup {label} (debug logging on: {} us critical path):",
            start.critical_us
        );
        println!("| request | count | agent time (us) |");
        println!("|---|---:|---:|");
        for (name, (count, us)) in &table {
            println!("| {name} | {count} | {us:.1} |");
        }
        println!(
            "| all requests | {} | {agent_us:.1} |",
            table.values().map(|(count, _)| count).sum::<u32>()
        );
        println!(
            "| between requests (front-end, round trips) | | {:.1} |",
            start.critical_us as f64 - agent_us
        );
        println!("largest gaps in the window (us, from, to):");
        for (us, from, to) in largest_gaps(&start.timeline, 5) {
            println!("  {us:>7} {from} -> {to}");
        }
    }
    ExitCode::SUCCESS
}
