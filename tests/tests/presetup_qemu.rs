//! Live migrations of a real QEMU 10 guest driven by `vhost-agent
//! migrate`, the orchestrator for stock QEMU: it waits for the
//! destination, relays `query-config` -> `presetup` per device, issues the
//! QMP `migrate`, releases the `fence=api` disk and merges QEMU's and both
//! agents' timelines.
//!
//! The guest has a net device with two queue pairs on a kernel tap with
//! the `vdpa-191ms` cost profile (every virtqueue creation costs 40 ms,
//! the MTU 6.4 ms: a simulated vDPA NIC on a real tap) and a disk both
//! agents serve from one image. It answers the host's pings every 20 ms
//! and runs fio write+verify rounds. Each migration is checked from the
//! guest (pings answered on the destination, every region verified clean
//! there) and from the timeline (every phase present and in the order the
//! migration imposes; presetup took the heavy ops off the switchover).
//!
//! The same on QEMU 11.1 (the trixie tree) with the disk
//! `inflight-migration=on` and 50 ms of storage latency: the migration is
//! held short of its stop until a fio round's requests are in flight
//! (after checking QEMU acked GET_VRING_BASE_INFLIGHT), so the source
//! hands them over: its `query-metrics` count them, the timeline carries
//! that count, and the destination resubmitted exactly those behind its
//! `fence=api` gate, closed before the migration and opened by the
//! command's `fence-release` after QEMU completed.
//!
//! Then the failing steps: a wrong control socket, a destination agent
//! that refuses presetup, and a QMP error each make the command exit 1
//! and leave the VM running on the source, still answering and verifying.
//!
//! `ping_gap_figures` (ignored) prints the longest ping gap with and
//! without presetup, and on a tap without the profile, over alternating
//! runs (`VHOST_PING_GAP_RUNS`, default 5).
//!
//! Needs root, iproute2, QEMU 10, QEMU 11.1 in the trixie tree and the
//! guest build tools: run `scripts/install-test-deps.sh` first. Missing tools fail the tests.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_agent_tests::handoff_vm::{resubmissions, RoundStart};
use vhost_agent_tests::migrate_rig::hold::HELD_BANDWIDTH_MIB;
use vhost_agent_tests::migrate_rig::{
    assert_before, assert_phases, device, migrate_command, ops, MigrationRig, RigOptions, Vm,
    PHASES, REGIONS,
};
use vhost_agent_tests::pinger::{PingReport, Pinger};
use vhost_agent_tests::qemu::{self, Verdict};
use vhost_agent_tests::support::control_execute;

/// How often the host pings the guest.
const PING_INTERVAL: Duration = Duration::from_millis(20);
/// Echo replies that prove the guest answers (half a second's worth).
const STEADY_REPLIES: usize = 25;
/// How long the guest may take to answer again.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Rounds the guest finishes after the migration (or the failure) before
/// the stop marker: the first may have begun before it.
const ROUNDS_AFTER: usize = 2;
/// Rounds after a migration, and the final verify.
const ROUNDS_TIMEOUT: Duration = Duration::from_secs(180);
/// Storage latency of the QEMU 11.1 case's disk: a fio round's 32
/// requests stay in flight this long, so the stop meets some.
const LATENCY_MS: u32 = 50;
/// The protocol feature QEMU 11.1 acks with `inflight-migration=on`.
const PROTOCOL_F_GET_VRING_BASE_INFLIGHT: u64 = 1 << 20;

/// A guest-visible check: the verdict of a clean `net-fio-rounds` run.
fn assert_verified(verdict: &Verdict) {
    assert!(verdict.passed, "verdict: {verdict:?}");
    assert_eq!(verdict.field("verify_errors"), Some("0"), "{verdict:?}");
    assert_eq!(verdict.field("io_errors"), Some("0"), "{verdict:?}");
    let rounds: u64 = verdict
        .field("rounds")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no rounds= in {verdict:?}"));
    let regions = rounds.min(REGIONS).to_string();
    assert_eq!(
        verdict.field("verified_regions"),
        Some(regions.as_str()),
        "{verdict:?}"
    );
}

/// Let the guest on `vm` finish [`ROUNDS_AFTER`] more rounds, stop them and
/// check its verdict: every region verified clean.
fn finish_guest(rig: &MigrationRig, vm: &mut Vm) {
    let done = vm.qemu.rounds().len();
    vm.qemu.wait_rounds(done + ROUNDS_AFTER, ROUNDS_TIMEOUT);
    qemu::write_fio_rounds_stop_marker(&rig.image).expect("write the stop marker");
    let verdict = vm.qemu.expect_pass(ROUNDS_TIMEOUT);
    assert_verified(&verdict);
}

/// What one successful migration gave.
struct Migrated {
    timeline: Value,
    pings: PingReport,
    /// The destination agent's log.
    destination_log: String,
    /// The source agent's disk0 `query-metrics` after the migration.
    source_disk: Value,
}

/// When the guest may stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// When QEMU decides.
    Free,
    /// Held ([`MigrationRig::run_held`]) until a fresh fio round's
    /// requests are in the source's inflight region, so a stop that hands
    /// them over surely has some; only after checking the source QEMU
    /// negotiated that handoff.
    AtRoundStart,
}

/// Boot on side 0, ping, migrate to side 1 through `vhost-agent migrate`
/// (with `--no-presetup` unless `presetup`) with the stop as `stop` says,
/// check the guest answers on the destination and verifies its disk
/// there, and the timeline.
fn migrate_and_verify(options: RigOptions, presetup: bool, stop: Stop) -> Migrated {
    let mut rig = MigrationRig::new(options);
    let (mut src, guest) = rig.boot_source(0);
    if stop == Stop::AtRoundStart {
        let config = control_execute(
            &rig.agents[0].control,
            "query-config",
            json!({ "device": "disk0" }),
        )
        .expect("query-config of the source's disk");
        let acked = config["protocol_features"].as_u64().unwrap_or(0);
        assert_ne!(
            acked & PROTOCOL_F_GET_VRING_BASE_INFLIGHT,
            0,
            "the source QEMU did not negotiate the handoff: {config}"
        );
    }
    let pinger = Pinger::start(&rig.lan.ns, guest, PING_INTERVAL);
    if let Err(e) = pinger.wait_replies_since(Instant::now(), STEADY_REPLIES, ANSWER_TIMEOUT) {
        panic!("before the migration: {e}\n{}", src.qemu.diagnostics());
    }
    let (mut dst, uri) = rig.destination(1);
    let fence = rig.disk_fence(1);
    assert_eq!(
        fence["open"], false,
        "the destination's fence before: {fence}"
    );
    let source_before = rig.disk_metrics(0);
    if stop == Stop::AtRoundStart {
        rig.bandwidth_mib = HELD_BANDWIDTH_MIB;
    }
    let mut cmd = rig.migrate_command(&src, &dst, 0, 1, &uri);
    if !presetup {
        cmd.arg("--no-presetup");
    }
    let run = match stop {
        Stop::Free => rig.run(cmd),
        Stop::AtRoundStart => {
            let mut round_start = RoundStart::default();
            rig.run_held(cmd, &mut src, |src, info| {
                round_start.reached_on(&src.qemu, info)
            })
        }
    };
    assert!(
        run.status.success(),
        "vhost-agent migrate failed:\n{}\n{}",
        run.stderr,
        dst.qemu.diagnostics()
    );
    let migrated = Instant::now();
    if let Err(e) = pinger.wait_replies_since(migrated, STEADY_REPLIES, ANSWER_TIMEOUT) {
        panic!(
            "the guest does not answer after the migration: {e}\n{}",
            dst.qemu.diagnostics()
        );
    }
    let pings = pinger.stop();
    assert_eq!(src.qmp.status(), "postmigrate");
    assert_eq!(dst.qmp.status(), "running");
    src.qmp.quit();
    src.qemu.wait_exit(Duration::from_secs(30));
    let timeline = run.timeline.expect("--out wrote the timeline");
    // The printed timeline lists every phase, in the migration's order.
    let printed: Vec<Option<usize>> = PHASES
        .iter()
        .map(|name| run.stdout.find(&format!("  {name} ")))
        .collect();
    assert!(
        printed.iter().all(Option::is_some) && printed.windows(2).all(|w| w[0] < w[1]),
        "phases printed at {printed:?}:\n{}",
        run.stdout
    );
    assert_phases(&timeline);
    assert_eq!(timeline["presetup"], presetup);
    let fence = rig.disk_fence(1);
    assert_eq!(
        fence["open"], true,
        "the destination's fence after: {fence}"
    );
    let source_after = rig.disk_metrics(0);
    assert_eq!(
        source_after["stops"].as_u64(),
        source_before["stops"].as_u64().map(|stops| stops + 1),
        "one stop on the source: {source_before} -> {source_after}"
    );
    finish_guest(&rig, &mut dst);
    rig.assert_agents_alive();
    let net = device(&timeline, "net0");
    eprintln!(
        "presetup={presetup}: QEMU downtime {} ms; no ring ran for {:.1} ms; net critical path \
         {:.1} ms; pings: {pings}",
        timeline["qemu"]["downtime-ms"],
        timeline["devices-paused-ms"].as_f64().unwrap_or(f64::NAN),
        net["destination-critical-path-ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
    );
    let destination_log = std::fs::read_to_string(&rig.agents[1].log).unwrap_or_default();
    Migrated {
        timeline,
        pings,
        destination_log,
        source_disk: source_after,
    }
}

#[test]
fn migrate_without_presetup_configures_the_destination_in_full() {
    let migrated = migrate_and_verify(RigOptions::new(true), false, Stop::Free);
    let timeline = &migrated.timeline;
    for id in ["net0", "disk0"] {
        assert_eq!(device(timeline, id)["presetup-used"], false, "{timeline:#}");
    }
    // The profile's queue creations happen at the switchover: one op per
    // queue pair (the profile charges each of its two virtqueues).
    let applied = ops(timeline, "net0", "heavy-applied");
    let created = applied.iter().filter(|op| *op == "create_queue").count();
    assert_eq!(created, 2, "{applied:?}");
    assert!(applied.iter().any(|op| op == "set_mtu"), "{applied:?}");
    assert!(migrated.pings.received > 0);
}

#[test]
fn migrate_with_presetup_takes_the_heavy_ops_off_the_switchover() {
    let migrated = migrate_and_verify(RigOptions::new(true), true, Stop::Free);
    let timeline = &migrated.timeline;
    for id in ["net0", "disk0"] {
        assert_eq!(device(timeline, id)["presetup-used"], true, "{timeline:#}");
    }
    let applied = ops(timeline, "net0", "heavy-applied");
    assert!(
        !applied
            .iter()
            .any(|op| op == "create_queue" || op == "set_mtu"),
        "heavy ops at the switchover despite presetup: {applied:?}"
    );
    let skipped = ops(timeline, "net0", "heavy-skipped");
    assert_eq!(
        skipped.iter().filter(|op| *op == "create_queue").count(),
        2,
        "{skipped:?}"
    );
    let disk = ops(timeline, "disk0", "heavy-applied");
    assert!(
        !disk.iter().any(|op| op == "create_io_ring"),
        "I/O rings created at the switchover despite presetup: {disk:?}"
    );
    assert!(migrated.pings.received > 0);
}

/// QEMU 11.1 with the disk `inflight-migration=on`, presetup on: the
/// stop comes with a fio round's requests in flight (made so, see
/// [`Stop::AtRoundStart`]), the source hands them over instead of
/// draining, the destination resubmits exactly those behind the `fence=api`
/// write fence, and the orchestrator releases it once the source has no
/// abandoned writes left.
#[test]
fn migrate_qemu11_hands_in_flight_requests_to_the_destination() {
    let options = RigOptions::qemu11_inflight(LATENCY_MS);
    let migrated = migrate_and_verify(options, true, Stop::AtRoundStart);
    let timeline = &migrated.timeline;
    // The source agent's own count, and the orchestrator's copy of it.
    let handed_off = migrated.source_disk["handed-off-last-stop"]
        .as_u64()
        .unwrap_or_else(|| panic!("no handed-off-last-stop: {}", migrated.source_disk));
    assert!(
        handed_off > 0,
        "the stop came with a round's requests in flight, yet the source handed nothing off: {}",
        migrated.source_disk
    );
    assert_eq!(
        device(timeline, "disk0")["handed-off"].as_u64(),
        Some(handed_off),
        "the timeline's handed-off count is the source's\n{timeline:#}"
    );
    let resubmitted = resubmissions(&migrated.destination_log);
    assert_eq!(
        resubmitted.iter().map(|r| r.0).collect::<Vec<_>>(),
        [handed_off],
        "the destination resubmits exactly what the source left in the region"
    );
    // The orchestrator opened the fence only once QEMU was done.
    assert_before(
        timeline,
        ("migration-completed", false),
        ("fence-released", false),
    );
    for id in ["net0", "disk0"] {
        assert_eq!(device(timeline, id)["presetup-used"], true, "{timeline:#}");
    }
    assert!(migrated.pings.received > 0);
    let phases: Vec<String> = timeline["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| {
            let at = p["at-ms"].as_f64().unwrap_or(f64::NAN);
            format!("{} {at:.3}", p["phase"].as_str().unwrap_or("?"))
        })
        .collect();
    eprintln!(
        "QEMU 11.1: {handed_off} request(s) handed off, {} write(s) held by the fence until \
         fence-release; QEMU downtime {} ms; phases (ms): {}",
        resubmitted[0].1,
        timeline["qemu"]["downtime-ms"],
        phases.join(", ")
    );
}

/// A source VM that keeps running while `vhost-agent migrate` fails:
/// boot, ping, set up with `arrange` (the destination and the command),
/// run it, then check the failure and that the VM is untouched.
fn failing_step(
    arrange: impl FnOnce(&mut MigrationRig, &Vm) -> (Vm, std::process::Command),
    expected: &[&str],
) {
    let mut rig = MigrationRig::new(RigOptions::new(false));
    let (mut src, guest) = rig.boot_source(0);
    let pinger = Pinger::start(&rig.lan.ns, guest, PING_INTERVAL);
    if let Err(e) = pinger.wait_replies_since(Instant::now(), STEADY_REPLIES, ANSWER_TIMEOUT) {
        panic!("before the migration: {e}\n{}", src.qemu.diagnostics());
    }
    let (mut dst, cmd) = arrange(&mut rig, &src);
    let run = rig.run(cmd);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    for words in expected
        .iter()
        .chain(&["the VM is still running on the source"])
    {
        assert!(
            run.stderr.contains(words),
            "no {words:?} in:\n{}",
            run.stderr
        );
    }
    assert!(run.timeline.is_none(), "a timeline for a failed migration");
    // Nothing moved: the source runs, the destination still waits.
    assert_eq!(src.qmp.status(), "running");
    assert_eq!(dst.qmp.status(), "inmigrate");
    let failed = Instant::now();
    if let Err(e) = pinger.wait_replies_since(failed, STEADY_REPLIES, ANSWER_TIMEOUT) {
        panic!(
            "the guest stopped answering after the failure: {e}\n{}",
            src.qemu.diagnostics()
        );
    }
    drop(pinger);
    dst.qmp.quit();
    finish_guest(&rig, &mut src);
    rig.assert_agents_alive();
}

#[test]
fn a_wrong_control_socket_leaves_the_vm_running_on_the_source() {
    failing_step(
        |rig, src| {
            let (dst, uri) = rig.destination(1);
            let wrong = rig.dir.path().join("no-such-agent.sock");
            let cmd = migrate_command(src, &dst, &rig.agents[0].control, &wrong, &uri);
            (dst, cmd)
        },
        &["destination agent", "no-such-agent.sock"],
    );
}

#[test]
fn a_destination_refusing_presetup_leaves_the_vm_running_on_the_source() {
    failing_step(
        |rig, src| {
            // Its disk takes rings of at most 64; the source's early
            // configuration says 256.
            let small = rig.add_agent(",queue-size=64");
            let (dst, uri) = rig.destination(small);
            let cmd = rig.migrate_command(src, &dst, 0, small, &uri);
            (dst, cmd)
        },
        &[
            "presetup of disk0 -> disk0 on the destination agent",
            "refused",
        ],
    );
}

#[test]
fn a_qmp_error_leaves_the_vm_running_on_the_source() {
    failing_step(
        |rig, src| {
            let (dst, _) = rig.destination(1);
            let cmd = rig.migrate_command(src, &dst, 0, 1, "bogus:127.0.0.1:1");
            (dst, cmd)
        },
        &["migrate: source QEMU"],
    );
}

/// The destination QEMU dies while the migration is active: QEMU fails
/// the migration and the source runs on; the orchestrator reports the
/// failure and where the VM is.
#[test]
fn a_destination_lost_during_the_migration_leaves_the_vm_running_on_the_source() {
    let mut rig = MigrationRig::new(RigOptions::new(false));
    let (mut src, guest) = rig.boot_source(0);
    let pinger = Pinger::start(&rig.lan.ns, guest, PING_INTERVAL);
    if let Err(e) = pinger.wait_replies_since(Instant::now(), STEADY_REPLIES, ANSWER_TIMEOUT) {
        panic!("before the migration: {e}\n{}", src.qemu.diagnostics());
    }
    let (dst, uri) = rig.destination(1);
    // Slow enough that the active phase lasts seconds, so the kill lands
    // in it.
    rig.bandwidth_mib = 4;
    let mut cmd = rig.migrate_command(&src, &dst, 0, 1, &uri);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vhost-agent migrate");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = Vec::new();
    let mut killed = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("read the command's stderr");
        eprintln!("{line}");
        if !killed && line.contains("source QEMU event MIGRATION (active)") {
            dst.qemu.process.signal(libc::SIGKILL);
            killed = true;
        }
        lines.push(line);
    }
    let status = child.wait().expect("wait for vhost-agent migrate");
    let stderr = lines.join("\n");
    assert!(killed, "the migration never became active:\n{stderr}");
    assert_eq!(status.code(), Some(1), "{stderr}");
    for words in [
        "the migration failed",
        "the VM is still running on the source",
    ] {
        assert!(stderr.contains(words), "no {words:?} in:\n{stderr}");
    }
    assert_eq!(src.qmp.status(), "running");
    let failed = Instant::now();
    if let Err(e) = pinger.wait_replies_since(failed, STEADY_REPLIES, ANSWER_TIMEOUT) {
        panic!(
            "the guest stopped answering after the failure: {e}\n{}",
            src.qemu.diagnostics()
        );
    }
    drop(pinger);
    finish_guest(&rig, &mut src);
    rig.assert_agents_alive();
}

/// One migration's figures for [`ping_gap_figures`].
#[derive(Clone, Copy, Debug)]
struct GapSample {
    gap_ms: u128,
    downtime_ms: u64,
    paused_ms: f64,
    critical_path_ms: f64,
}

/// `2 * runs` migrations of one guest back and forth between the rig's
/// two agents, alternating without and with presetup, each to a fresh
/// destination agent; the figures of each, by presetup.
fn ping_pong(options: RigOptions, runs: usize) -> [Vec<GapSample>; 2] {
    let mut rig = MigrationRig::new(options);
    let (mut vm, guest) = rig.boot_source(0);
    let mut side = 0;
    let mut samples = [Vec::new(), Vec::new()];
    for index in 0..2 * runs {
        let presetup = index % 2 == 1;
        let pinger = Pinger::start(&rig.lan.ns, guest, PING_INTERVAL);
        if let Err(e) = pinger.wait_replies_since(Instant::now(), STEADY_REPLIES, ANSWER_TIMEOUT) {
            panic!("before migration {index}: {e}\n{}", vm.qemu.diagnostics());
        }
        // A destination agent that never served this guest.
        rig.replace_agent(1 - side);
        let (dst, uri) = rig.destination(1 - side);
        let mut cmd = rig.migrate_command(&vm, &dst, side, 1 - side, &uri);
        if !presetup {
            cmd.arg("--no-presetup");
        }
        let run = rig.run(cmd);
        assert!(run.status.success(), "migration {index}: {}", run.stderr);
        if let Err(e) = pinger.wait_replies_since(Instant::now(), STEADY_REPLIES, ANSWER_TIMEOUT) {
            panic!("after migration {index}: {e}\n{}", dst.qemu.diagnostics());
        }
        let pings = pinger.stop();
        let timeline = run.timeline.expect("a timeline");
        let sample = GapSample {
            gap_ms: pings.longest_gap.as_millis(),
            downtime_ms: timeline["qemu"]["downtime-ms"].as_u64().unwrap_or(0),
            paused_ms: timeline["devices-paused-ms"].as_f64().unwrap_or(f64::NAN),
            critical_path_ms: device(&timeline, "net0")["destination-critical-path-ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        };
        eprintln!(
            "figures: profile={} presetup={presetup} run {}: {sample:?}",
            rig.options.profile,
            index / 2 + 1
        );
        samples[usize::from(presetup)].push(sample);
        vm.qmp.quit();
        vm.qemu.wait_exit(Duration::from_secs(30));
        vm = dst;
        side = 1 - side;
    }
    finish_guest(&rig, &mut vm);
    samples
}

fn median<T: Copy + PartialOrd>(values: impl Iterator<Item = T>) -> T {
    let mut values: Vec<T> = values.collect();
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[values.len() / 2]
}

/// Figures for a report, not a test of them (no bound is asserted): the
/// longest ping gap of the guest across `vhost-agent migrate`, on a tap
/// with the 191 ms profile without and with presetup, and on a tap
/// without the profile, medians of `VHOST_PING_GAP_RUNS` (default 5)
/// alternating runs each. Run it alone:
/// `cargo nextest run -p vhost-agent-tests --release --test presetup_qemu
/// --run-ignored only ping_gap_figures --no-capture`.
#[test]
#[ignore = "figures for a report: minutes of migrations"]
fn ping_gap_figures() {
    let runs: usize = std::env::var("VHOST_PING_GAP_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let profiled = ping_pong(RigOptions::new(true), runs);
    let plain = ping_pong(RigOptions::new(false), runs);
    eprintln!(
        "| tap | presetup | runs | longest ping gap, median (ms) | all (ms) | QEMU downtime (ms) | no ring ran (ms) | net critical path (ms) |"
    );
    eprintln!("|---|---|---:|---:|---|---:|---:|---:|");
    for (profile, samples) in [("vdpa-191ms", &profiled), ("no profile", &plain)] {
        for presetup in [false, true] {
            let list = &samples[usize::from(presetup)];
            eprintln!(
                "| {profile} | {} | {} | {} | {:?} | {} | {:.1} | {:.1} |",
                if presetup { "on" } else { "off" },
                list.len(),
                median(list.iter().map(|s| s.gap_ms)),
                list.iter().map(|s| s.gap_ms).collect::<Vec<_>>(),
                median(list.iter().map(|s| s.downtime_ms)),
                median(list.iter().map(|s| s.paused_ms)),
                median(list.iter().map(|s| s.critical_path_ms)),
            );
        }
    }
}
