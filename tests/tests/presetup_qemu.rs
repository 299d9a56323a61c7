//! Presetup orchestrated around a real QEMU 10 live migration, as an
//! orchestrator would do it with stock QEMU: a guest with a vhost-user net
//! device and a vhost-user disk moves from a source QEMU + agent to a
//! destination QEMU + agent. With presetup, once the destination QEMU is
//! up and before `migrate`, the test reads `query-config` of each device
//! from the source agent and hands it to `presetup` on the destination
//! agent. Each scenario runs without and with presetup and compares QEMU's
//! reported `downtime` with the destination agent's start critical path.
//!
//! Dataplanes: `sim` with the 191 ms vDPA profile (the simulated hardware
//! charges 40 ms per queue creation: presetup takes those off the critical
//! path, which the test asserts), and `tap` (real kernel taps in a
//! namespace the test creates, where presetup has little heavy work to
//! save; figures are printed).
//!
//! Needs root, iproute2, QEMU 10 and the guest build tools: run
//! `scripts/install-test-deps.sh` first. Missing tools fail the tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vhost_agent_tests::netns::Netns;
use vhost_agent_tests::qemu::{self, MigrationStats, Nic, Qemu, VhostUserBlk, VmConfig};
use vhost_agent_tests::support::ChildGuard;
use vhost_agent_tests::support::{agent_binary, control_execute, create_image, workspace_root};

const GUEST_MAC: &str = "52:54:00:77:00:30";
const IDLE_MARKER: &str = "VHOST-AGENT-IDLE: ";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(90);
const QUEUE_PAIRS: u16 = 2;

/// Which dataplane the net device runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plane {
    /// `sim` with netdev/profiles/vdpa-191ms.json.
    Sim,
    /// A kernel tap per agent.
    Tap,
}

/// One agent of the migration with its control socket.
struct Side {
    agent: ChildGuard,
    control: PathBuf,
    net_socket: PathBuf,
    blk_socket: PathBuf,
    log: PathBuf,
}

/// What one migration measured.
#[derive(Debug)]
struct Figures {
    stats: MigrationStats,
    net: Value,
    blk: Value,
}

fn spawn_side(ns: &Netns, dir: &Path, image: &Path, plane: Plane, index: usize) -> Side {
    let net_socket = dir.join(format!("net-{index}.sock"));
    let blk_socket = dir.join(format!("blk-{index}.sock"));
    let control = dir.join(format!("control-{index}.sock"));
    let log = dir.join(format!("agent-{index}.log"));
    let dataplane = match plane {
        Plane::Sim => format!(
            "sim:{}",
            workspace_root()
                .join("netdev/profiles/vdpa-191ms.json")
                .display()
        ),
        Plane::Tap => format!("tap:ptap{index}"),
    };
    let mut cmd = ns.command(agent_binary());
    cmd.arg("serve")
        .arg("--net")
        .arg(format!(
            "socket={},dataplane={dataplane},queue-pairs={QUEUE_PAIRS},id=net0",
            net_socket.display()
        ))
        .arg("--blk")
        .arg(format!(
            "socket={},image={},id=disk0",
            blk_socket.display(),
            image.display()
        ))
        .arg("--control")
        .arg(&control);
    // Per-message debug lines would sit on the critical path being timed.
    cmd.env("RUST_LOG", "info");
    let mut agent = ns.spawn("vhost-agent", cmd, &log);
    for socket in [&net_socket, &blk_socket, &control] {
        vhost_agent_tests::support::wait_for_path(socket, Duration::from_secs(20), &mut agent);
    }
    Side {
        agent,
        control,
        net_socket,
        blk_socket,
        log,
    }
}

fn vm_config(side: &Side) -> VmConfig {
    let mut nic = Nic::vhost_user(&side.net_socket, GUEST_MAC);
    nic.queue_pairs = QUEUE_PAIRS;
    let mut config = VmConfig::new("idle")
        .nic(nic)
        .disk(VhostUserBlk::new(&side.blk_socket))
        .with_qmp();
    config.mem_mib = 512;
    config
}

fn metrics(side: &Side, device: &str) -> Value {
    let reports = control_execute(&side.control, "query-metrics", json!({"device": device}))
        .expect("query-metrics");
    reports[0].clone()
}

/// Boot a guest on a fresh source, migrate it to a fresh destination (with
/// presetup relayed between the agents when asked), and return what QEMU
/// and the destination agent measured.
fn migrate(plane: Plane, presetup: bool) -> Figures {
    qemu::require_qemu_test_deps();
    qemu::guest();
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("VHOST_TEST_KEEP_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!("VHOST_TEST_KEEP_DIR: keeping {}", dir.path().display());
    }
    let ns = Netns::new();
    let image = dir.path().join("disk.img");
    create_image(&image, 64 << 20).unwrap();
    let mut source = spawn_side(&ns, dir.path(), &image, plane, 0);
    let mut destination = spawn_side(&ns, dir.path(), &image, plane, 1);

    let mut src = Qemu::spawn_named(&vm_config(&source), dir.path(), "source");
    src.add_context_log("source agent", &source.log);
    src.wait_marker(IDLE_MARKER, BOOT_TIMEOUT);
    let mut dst_qemu = Qemu::spawn_named(
        &vm_config(&destination).incoming("defer"),
        dir.path(),
        "destination",
    );
    dst_qemu.add_context_log("destination agent", &destination.log);
    let mut src_qmp = src.qmp();
    let mut dst_qmp = dst_qemu.qmp();

    if presetup {
        // What an orchestrator does during migration setup.
        for device in ["net0", "disk0"] {
            let config =
                control_execute(&source.control, "query-config", json!({"device": device}))
                    .expect("query-config on the source");
            assert!(
                !config["rings"].as_array().unwrap().is_empty(),
                "the running source describes its rings: {config}"
            );
            let done = control_execute(
                &destination.control,
                "presetup",
                json!({"device": device, "config": config}),
            )
            .unwrap_or_else(|e| panic!("presetup of {device}: {e}"));
            eprintln!("presetup {device}: {done}");
        }
    }
    let stats = qemu::live_migrate(&mut src_qmp, &mut dst_qmp, MIGRATION_TIMEOUT)
        .unwrap_or_else(|e| panic!("migration failed: {e}\n{}", dst_qemu.diagnostics()));
    for side in [&mut source, &mut destination] {
        assert!(
            side.agent.child.try_wait().unwrap().is_none(),
            "an agent exited"
        );
    }
    // Every ring of the destination runs (2 pairs = 4 net rings, 1 disk).
    let running = vhost_agent_tests::frontend::wait_until(Duration::from_secs(10), || {
        metrics(&destination, "net0")["rings-running"] == 2 * QUEUE_PAIRS
            && metrics(&destination, "disk0")["rings-running"] == 1
    });
    assert!(
        running,
        "destination rings not all running:\n{}",
        dst_qemu.diagnostics()
    );
    let figures = Figures {
        stats,
        net: metrics(&destination, "net0"),
        blk: metrics(&destination, "disk0"),
    };
    drop(src_qmp);
    drop(dst_qmp);
    drop(src);
    drop(dst_qemu);
    figures
}

fn critical_path_ms(report: &Value) -> f64 {
    report["start-critical-path-us"]
        .as_u64()
        .unwrap_or_else(|| panic!("no start critical path in {report}")) as f64
        / 1000.0
}

fn heavy(report: &Value, list: &str) -> Vec<String> {
    report["last-switchover"][list]
        .as_array()
        .unwrap_or_else(|| panic!("no last-switchover in {report}"))
        .iter()
        .map(|op| op.as_str().unwrap().to_string())
        .collect()
}

fn print(plane: Plane, without: &Figures, with: &Figures) {
    eprintln!(
        "{plane:?}, {QUEUE_PAIRS} pairs + 1 disk: QEMU downtime {} ms without presetup, {} ms with; \
         agent net start critical path {:.2} ms -> {:.2} ms; disk {:.2} ms -> {:.2} ms",
        without.stats.downtime_ms,
        with.stats.downtime_ms,
        critical_path_ms(&without.net),
        critical_path_ms(&with.net),
        critical_path_ms(&without.blk),
        critical_path_ms(&with.blk),
    );
    eprintln!(
        "  net heavy ops at the switchover: {:?} without, {:?} with (skipped {:?})",
        heavy(&without.net, "heavy-applied"),
        heavy(&with.net, "heavy-applied"),
        heavy(&with.net, "heavy-skipped"),
    );
}

fn check_presetup_used(with: &Figures) {
    for report in [&with.net, &with.blk] {
        assert_eq!(report["presetup"]["hits"], 1, "{report}");
        assert_eq!(report["presetup"]["fallbacks"], 0, "{report}");
        assert_eq!(report["last-switchover"]["early"], true, "{report}");
    }
    let net_applied = heavy(&with.net, "heavy-applied");
    assert!(
        !net_applied.iter().any(|op| op == "create_queue"),
        "queues were created at the switchover despite presetup: {net_applied:?}"
    );
    let blk_applied = heavy(&with.blk, "heavy-applied");
    assert!(
        !blk_applied.iter().any(|op| op == "create_io_ring"),
        "I/O rings were created at the switchover despite presetup: {blk_applied:?}"
    );
}

#[test]
fn presetup_on_the_sim_vdpa_profile_takes_queue_creation_off_the_switchover() {
    let without = migrate(Plane::Sim, false);
    let with = migrate(Plane::Sim, true);
    print(Plane::Sim, &without, &with);
    assert_eq!(without.net["last-switchover"]["early"], false);
    assert!(heavy(&without.net, "heavy-applied")
        .iter()
        .any(|op| op == "create_queue"));
    check_presetup_used(&with);
    // The profile charges 40 ms per virtqueue created: four of them are on
    // the critical path without presetup and none with it. A property of
    // where the work happens, with a wide margin, not a speed goal.
    assert!(
        critical_path_ms(&without.net) >= 160.0,
        "{:.1} ms",
        critical_path_ms(&without.net)
    );
    assert!(
        critical_path_ms(&with.net) < critical_path_ms(&without.net) / 2.0,
        "with presetup {:.1} ms, without {:.1} ms",
        critical_path_ms(&with.net),
        critical_path_ms(&without.net)
    );
}

#[test]
fn presetup_on_tap_is_used_and_measured() {
    let without = migrate(Plane::Tap, false);
    let with = migrate(Plane::Tap, true);
    print(Plane::Tap, &without, &with);
    check_presetup_used(&with);
    let skipped = heavy(&with.net, "heavy-skipped");
    assert!(
        skipped.iter().any(|op| op == "configure_offloads"),
        "the tap's offloads were not configured early: {skipped:?}"
    );
}
