//! Live migration end to end, on one host: a guest under QEMU 10 runs fio
//! write+verify rounds on a vhost-user-blk disk while it is live-migrated
//! from a source QEMU (back-end A) to a destination QEMU (back-end B); both
//! back-ends serve the same raw image file. The guest's verdict must come
//! out on the destination's serial console, after every region written
//! before, during and after the migration verified clean there.
//!
//! The guest runs `/init`'s `fio-rounds` mode: rounds of fio randwrite +
//! read-back verify (a fresh seed each round, cycling over a few regions of
//! the disk) until the host writes a stop marker into the disk's last block,
//! then a verify-only pass over every region against the round that wrote it
//! last. So the reads and writes of the rounds in flight cross the switchover
//! (the back-end must log the guest pages it writes, or the destination's
//! buffers and used rings are stale), and data written on the source is
//! verified on the destination.
//!
//! qemu-storage-daemon (two daemons, `locking=off`) is the control that
//! proves the harness. vhost-agent needs dirty-page logging
//! (`VHOST_USER_PROTOCOL_F_LOG_SHMFD` + `VHOST_F_LOG_ALL`): without it QEMU
//! refuses to migrate ("vhost lacks VHOST_F_LOG_ALL feature").
//!
//! Needs QEMU 10, qemu-storage-daemon and the guest build tools: run
//! `sudo scripts/install-test-deps.sh` first. Missing tools fail the tests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use vhost_agent_tests::qemu::{
    self, MigrationStats, Qemu, Qmp, QsdOptions, Verdict, VhostUserBlk, VmConfig,
};
use vhost_agent_tests::support::{self, ChildGuard};

/// Size of the image the guest sees (its last 4 KiB block is the stop marker).
const IMAGE_SIZE: u64 = 256 << 20;
/// What one round writes and reads back: 2048 4 KiB blocks, under a second
/// of fio under TCG.
const ROUND_SIZE_MIB: u64 = 8;
/// Regions the rounds cycle over (region r at r * ROUND_SIZE_MIB MiB):
/// more than a destination's rounds before the stop (the one in flight at
/// the switchover, ROUNDS_ON_DESTINATION, the one in flight at the stop),
/// so the final verify always covers data the source wrote.
const REGIONS: u64 = 6;
/// `reconnect-ms` of the chardevs.
const RECONNECT_MS: u32 = 1000;
/// Boot (~4 s under TCG) and the first round on the source.
const FIRST_ROUND_TIMEOUT: Duration = Duration::from_secs(90);
/// From `migrate` to `completed` (a few seconds for 1 GiB of mostly zero RAM).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Rounds after a migration.
const ROUNDS_TIMEOUT: Duration = Duration::from_secs(60);
/// From the stop marker to the verdict: the round in flight plus the final
/// verify of REGIONS regions.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(90);
/// Rounds the destination must finish before the stop marker: the first
/// one may have been mostly written on the source, the second is all its own.
const ROUNDS_ON_DESTINATION: usize = 2;

/// Set this variable to keep the test's directory (image, consoles, QEMU
/// and back-end logs) for a look afterwards.
const KEEP_DIR_ENV: &str = "VHOST_TEST_KEEP_DIR";

/// Which back-end serves both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Agent,
    QemuStorageDaemon,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Agent => "vhost-agent",
            Backend::QemuStorageDaemon => "qemu-storage-daemon",
        }
    }
}

/// One side of the migration: a back-end on its own socket.
struct Side {
    socket: PathBuf,
    log: PathBuf,
    process: ChildGuard,
}

/// A running guest: its QEMU, a QMP connection and the side it runs on.
struct Vm {
    qemu: Qemu,
    qmp: Qmp,
    side: usize,
    name: String,
}

/// The image, the two back-ends on it, and the VMs started so far.
struct MigrationEnv {
    dir: tempfile::TempDir,
    image: PathBuf,
    backend: Backend,
    sides: [Side; 2],
    vms_started: u32,
    stop_wait_s: u32,
}

impl MigrationEnv {
    /// A fresh sparse image and two `backend`s serving it (sides 0 and 1).
    fn new(backend: Backend, stop_wait_s: u32) -> MigrationEnv {
        qemu::require_qemu_test_deps();
        // Build (or find cached) the guest before anything is timed.
        qemu::guest();
        let mut dir = tempfile::tempdir().expect("create a temporary directory");
        if std::env::var_os(KEEP_DIR_ENV).is_some() {
            dir.disable_cleanup(true);
            eprintln!("{KEEP_DIR_ENV}: keeping {}", dir.path().display());
        }
        let image = dir.path().join("disk.img");
        support::create_image(&image, IMAGE_SIZE).expect("create the disk image");
        let side = |i: usize| {
            let socket = dir.path().join(format!("blk-{i}.sock"));
            let log = dir.path().join(format!("{}-{i}.log", backend.name()));
            let process = match backend {
                Backend::Agent => support::spawn_agent(
                    &[format!(
                        "socket={},image={}",
                        socket.display(),
                        image.display()
                    )],
                    &[],
                    Some(&log),
                ),
                Backend::QemuStorageDaemon => qemu::spawn_qemu_storage_daemon(
                    &image,
                    &socket,
                    &QsdOptions {
                        // Two daemons on one image, as on a migration.
                        locking_off: true,
                        ..QsdOptions::default()
                    },
                    &log,
                ),
            };
            Side {
                socket,
                log,
                process,
            }
        };
        let sides = [side(0), side(1)];
        MigrationEnv {
            dir,
            image,
            backend,
            sides,
            vms_started: 0,
            stop_wait_s,
        }
    }

    /// Start QEMU on `side`'s back-end: booting the `fio-rounds` guest, or,
    /// with `incoming`, waiting for a migration (`-incoming defer`). Source
    /// and destination get the same machine and kernel command line.
    fn spawn_vm(&mut self, side: usize, incoming: bool) -> Vm {
        self.vms_started += 1;
        let name = format!("qemu{}-side{side}", self.vms_started);
        let mut config = VmConfig::new("fio-rounds")
            .param("vhost_size", format!("{ROUND_SIZE_MIB}M"))
            .param("vhost_regions", REGIONS)
            .param("vhost_bs", "4k")
            .param("vhost_iodepth", 32)
            .param("vhost_rw", "randwrite")
            .param("vhost_stop_wait", self.stop_wait_s)
            .disk(VhostUserBlk::new(&self.sides[side].socket).reconnect_ms(RECONNECT_MS))
            .with_qmp();
        if incoming {
            config = config.incoming("defer");
        }
        let mut qemu = Qemu::spawn_named(&config, self.dir.path(), &name);
        for (i, s) in self.sides.iter().enumerate() {
            qemu.add_context_log(&format!("{} side {i}", self.backend.name()), &s.log);
        }
        let qmp = qemu.qmp();
        Vm {
            qemu,
            qmp,
            side,
            name,
        }
    }

    /// Panic unless both back-ends are still running.
    fn assert_backends_alive(&mut self, vm: &Vm) {
        for (i, s) in self.sides.iter_mut().enumerate() {
            if let Ok(Some(status)) = s.process.child.try_wait() {
                panic!(
                    "{} on side {i} exited ({status})\n{}",
                    self.backend.name(),
                    vm.qemu.diagnostics()
                );
            }
        }
    }

    /// Live-migrate `src` to a new QEMU on the other side: start the
    /// destination, `migrate`, poll `query-migrate` until completed, wait
    /// for the destination to run, then quit the source. Returns the
    /// destination, the source's figures of the migration and the rounds
    /// the guest finished on the source.
    fn migrate(&mut self, mut src: Vm) -> (Vm, MigrationStats, Vec<u64>) {
        let mut dst = self.spawn_vm(1 - src.side, true);
        let fail = |what: String, src: &Vm, dst: &Vm| -> ! {
            panic!(
                "{what}\n===== source {} =====\n{}\n===== destination {} =====\n{}",
                src.name,
                src.qemu.diagnostics(),
                dst.name,
                dst.qemu.diagnostics()
            )
        };
        // Port 0: QEMU picks a free one and reports it.
        if let Err(e) = dst.qmp.migrate_incoming("tcp:127.0.0.1:0") {
            fail(format!("destination: {e}"), &src, &dst);
        }
        let port = match dst.qmp.incoming_tcp_port() {
            Ok(port) => port,
            Err(e) => fail(format!("destination: {e}"), &src, &dst),
        };
        // Loopback: don't let the default 128 MiB/s cap stretch the run.
        src.qmp
            .migrate_set_parameters(json!({ "max-bandwidth": 1u64 << 30 }));
        let uri = format!("tcp:127.0.0.1:{port}");
        if let Err(e) = src.qmp.execute("migrate", json!({ "uri": uri })) {
            fail(format!("source: QMP {e}"), &src, &dst);
        }
        let info = match src.qmp.wait_migration(MIGRATION_TIMEOUT) {
            Ok(info) => info,
            Err(e) => {
                let dst_state = dst.qmp.execute("query-migrate", json!({}));
                fail(
                    format!("source: {e}\ndestination query-migrate: {dst_state:?}"),
                    &src,
                    &dst,
                )
            }
        };
        let stats = match MigrationStats::from_query(&info) {
            Ok(stats) => stats,
            Err(e) => fail(e, &src, &dst),
        };
        if let Err(e) = dst.qmp.wait_status("running", Duration::from_secs(30)) {
            fail(format!("destination after the migration: {e}"), &src, &dst);
        }
        let src_state = src.qmp.status();
        if src_state != "postmigrate" {
            fail(
                format!("source run state after the migration: {src_state:?}, not postmigrate"),
                &src,
                &dst,
            );
        }
        if let Some(v) = src.qemu.verdict() {
            fail(format!("the source printed a verdict: {v:?}"), &src, &dst);
        }
        let src_rounds = src.qemu.rounds();
        src.qmp.quit();
        let status = src.qemu.wait_exit(Duration::from_secs(30));
        if !status.success() {
            fail(
                format!("source QEMU exited with {status} after quit"),
                &src,
                &dst,
            );
        }
        self.assert_backends_alive(&dst);
        (dst, stats, src_rounds)
    }
}

/// The verdict of a clean `fio-rounds` run of at least `min_rounds` rounds.
fn assert_rounds_pass(v: &Verdict, min_rounds: u64) {
    assert!(v.passed, "verdict: {v:?}");
    assert_eq!(v.field("fio_exit"), Some("0"), "{v:?}");
    assert_eq!(v.field("verify_errors"), Some("0"), "{v:?}");
    assert_eq!(v.field("io_errors"), Some("0"), "{v:?}");
    let rounds: u64 = v
        .field("rounds")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no rounds= in {v:?}"));
    assert!(
        rounds >= min_rounds,
        "{rounds} rounds, expected >= {min_rounds}: {v:?}"
    );
    let regions = rounds.min(REGIONS).to_string();
    assert_eq!(v.field("verified_regions"), Some(regions.as_str()), "{v:?}");
}

/// Median of `values` (the upper one of an even count).
fn median(values: &[u64]) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// The (region, round) pairs of the guest's final verify-only pass: each
/// region checked against the round that wrote it last (`randseed` is the
/// round + 1).
fn final_verified(serial: &str) -> Vec<(u64, u64)> {
    const MARKER: &str = "VHOST-AGENT-FINAL-VERIFY: ";
    serial
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(MARKER)? + MARKER.len()..];
            let field = |key: &str| -> Option<u64> {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some((field("region")?, field("randseed")?.checked_sub(1)?))
        })
        .collect()
}

/// Boot the guest on side 0, migrate it `migrations` times (alternating
/// sides) while it runs fio rounds, with `rounds_between` rounds finished
/// on each destination before it moves on, then stop the rounds and check
/// the verdict on the last destination's console: PASS, and among the
/// regions verified there at least one last written before the last
/// migration. Prints every migration's downtime and total time.
fn live_migration(backend: Backend, migrations: usize, rounds_between: usize) {
    let started = Instant::now();
    let stop_wait_s = 120 + 40 * migrations as u32;
    let mut env = MigrationEnv::new(backend, stop_wait_s);
    let mut vm = env.spawn_vm(0, false);
    // Data written on the source before the migration.
    let first = vm.qemu.wait_rounds(1, FIRST_ROUND_TIMEOUT);
    eprintln!(
        "{}: {} booted, {} round(s) done after {:.1?}",
        backend.name(),
        vm.name,
        first.len(),
        started.elapsed()
    );
    // The rounds each VM completed (numbers from its console), in order.
    let mut history: Vec<(String, Vec<u64>)> = Vec::new();
    let mut all_stats = Vec::new();
    for i in 0..migrations {
        let src_name = vm.name.clone();
        let (next, stats, src_rounds) = env.migrate(vm);
        vm = next;
        let src_last = *src_rounds.last().expect("the source finished a round");
        eprintln!(
            "{}: migration {}/{migrations} {src_name} -> {} after the source's round {src_last}: {stats}",
            backend.name(),
            i + 1,
            vm.name
        );
        history.push((src_name, src_rounds));
        all_stats.push(stats);
        let wanted = if i + 1 == migrations {
            ROUNDS_ON_DESTINATION.max(rounds_between)
        } else {
            rounds_between
        };
        let rounds = vm.qemu.wait_rounds(wanted, ROUNDS_TIMEOUT);
        // The guest kept going: its rounds continue where the source's
        // stopped (a rebooted guest would start again at round 0).
        assert!(
            rounds[0] > src_last,
            "{}: first round {} on the destination, but the source had finished {src_last}\n{}",
            vm.name,
            rounds[0],
            vm.qemu.diagnostics()
        );
        let serial = vm.qemu.serial();
        assert!(
            !serial.contains("vhost-test-init: starting") && !serial.contains("Linux version"),
            "{}: the destination booted a guest of its own\n{}",
            vm.name,
            vm.qemu.diagnostics()
        );
    }
    qemu::write_fio_rounds_stop_marker(&env.image)
        .unwrap_or_else(|e| panic!("write the stop marker into {}: {e}", env.image.display()));
    let verdict = vm.qemu.expect_pass(VERDICT_TIMEOUT);
    env.assert_backends_alive(&vm);
    let final_rounds = vm.qemu.rounds();
    let last = *final_rounds
        .last()
        .expect("the destination finished a round");
    assert_rounds_pass(&verdict, last + 1);
    history.push((vm.name.clone(), final_rounds));

    // Where each verified region's data was written.
    let verified = final_verified(&vm.qemu.serial());
    assert_eq!(
        verified.len() as u64,
        (last + 1).min(REGIONS),
        "final verify lines on {}\n{}",
        vm.name,
        vm.qemu.diagnostics()
    );
    let mut from_earlier_vms = 0;
    for &(region, round) in &verified {
        // A round whose marker line a switchover split is on no console.
        let writer = history
            .iter()
            .find(|(_, rounds)| rounds.contains(&round))
            .map(|(name, _)| name.as_str());
        if writer.is_some_and(|w| w != vm.name) {
            from_earlier_vms += 1;
        }
        eprintln!(
            "{}: region {region} verified on {} against round {round}, written on {}",
            backend.name(),
            vm.name,
            writer.unwrap_or("(a switchover split its marker line)")
        );
    }
    if migrations > 0 {
        assert!(
            from_earlier_vms > 0,
            "no region verified on {} was written before the last migration: {verified:?}, \
             rounds per VM: {history:?}",
            vm.name
        );
    }

    let downtimes: Vec<u64> = all_stats.iter().map(|s| s.downtime_ms).collect();
    let totals: Vec<u64> = all_stats.iter().map(|s| s.total_time_ms).collect();
    eprintln!(
        "{}: PASS on the destination's console after {migrations} migration(s) in {:.1?}: {}",
        backend.name(),
        started.elapsed(),
        verdict.details
    );
    eprintln!(
        "{}: downtime ms {downtimes:?} (median {}), total time ms {totals:?} (median {})",
        backend.name(),
        median(&downtimes),
        median(&totals)
    );
}

/// The control: two qemu-storage-daemons (`locking=off`) on one image; the
/// guest migrates mid-fio and verifies everything on the destination.
#[test]
fn qemu_live_migration_on_qemu_storage_daemon() {
    live_migration(Backend::QemuStorageDaemon, 1, ROUNDS_ON_DESTINATION);
}

/// The same with two vhost-agents: needs the agent's dirty-page logging.
#[test]
fn qemu_live_migration_on_agent() {
    live_migration(Backend::Agent, 1, ROUNDS_ON_DESTINATION);
}

/// The harness must see lost data: a byte flipped behind the guest's back
/// in a region written by an earlier round fails the final verify.
#[test]
fn qemu_fio_rounds_detects_corruption_on_qemu_storage_daemon() {
    let mut env = MigrationEnv::new(Backend::QemuStorageDaemon, 120);
    let mut vm = env.spawn_vm(0, false);
    // Round 0 wrote region 0; it is written again only in round REGIONS.
    let rounds = vm.qemu.wait_rounds(2, FIRST_ROUND_TIMEOUT);
    assert!(
        rounds.len() < REGIONS as usize,
        "too late to corrupt region 0: {rounds:?}"
    );
    // The payload (past fio's header) of region 0's first block.
    qemu::flip_image_byte(&env.image, 1000);
    qemu::write_fio_rounds_stop_marker(&env.image).expect("write the stop marker");
    let verdict = vm.qemu.wait_verdict(VERDICT_TIMEOUT);
    assert!(
        !verdict.passed,
        "a corrupted block must FAIL the final verify, got {verdict:?}\n{}",
        vm.qemu.diagnostics()
    );
    let errors: u64 = verdict
        .field("verify_errors")
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    assert!(
        errors > 0,
        "the verdict must count the verify error: {verdict:?}"
    );
    let verified = final_verified(&vm.qemu.serial());
    assert!(
        verified.contains(&(0, 0)),
        "region 0 must have been checked against round 0: {verified:?}"
    );
}

/// Migrations of the round-trip tests: ten there and back.
const ROUND_TRIP_MIGRATIONS: usize = 20;

/// Ten round trips (twenty migrations) between two vhost-agents, with the
/// guest writing and verifying throughout (two rounds on every host).
/// Minutes under TCG: run it by hand with `--run-ignored only`.
#[test]
#[ignore = "twenty migrations take minutes under TCG"]
fn qemu_live_migration_ten_round_trips_on_agent() {
    live_migration(Backend::Agent, ROUND_TRIP_MIGRATIONS, 2);
}

/// The control for the round trips, and the downtime figures to compare
/// the agent's with.
#[test]
#[ignore = "twenty migrations take minutes under TCG"]
fn qemu_live_migration_ten_round_trips_on_qemu_storage_daemon() {
    live_migration(Backend::QemuStorageDaemon, ROUND_TRIP_MIGRATIONS, 2);
}
