//! The block in-flight handoff with a front-end that negotiates it: QEMU
//! 11.1 (`-device vhost-user-blk-pci,...,inflight-migration=on`) live
//! migrates a guest running fio write+verify rounds between two agents on
//! one image. With the property on, QEMU acks protocol bit 20
//! (GET_VRING_BASE_INFLIGHT): the source suspends at GET_VRING_BASE instead
//! of draining, the unanswered requests travel in QEMU's migration stream
//! as the inflight region, and the destination resubmits them behind the
//! write fence. The guest must verify everything on the destination.
//!
//! Requests in flight at the stop are made, not hoped for: the migration is
//! held short of its stop (`vhost_agent_tests::handoff_vm::LogDirtier`) until the source's inflight
//! region shows a fresh round's requests, or, for the fence cases, until
//! the source's writes are stuck in the kernel behind a blkio throttle
//! (`vhost_agent_tests::slow_disk`); each case then checks what it needed
//! from the agents' control APIs and logs.
//!
//! Needs QEMU 11.1 in the trixie tree, the guest build tools and, for the
//! fence cases, root with a loop device and a blkio cgroup: run
//! `sudo scripts/install-test-deps.sh`. Missing tools fail the tests.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_agent_tests::handoff_vm::{
    self, finish_guest, migrate, qemu_inflight_count, resubmissions, Rig, RoundStart, Setup, Vm,
    DISK_ID, FIRST_ROUND_TIMEOUT, NIC_ID,
};
use vhost_agent_tests::slow_disk::SlowDisk;
use vhost_agent_tests::stop_sampler::{last_stop_window, most_unanswered, RegionSampler};

const PROTOCOL_F_INFLIGHT_SHMFD: u64 = 1 << 12;
const PROTOCOL_F_DEVICE_STATE: u64 = 1 << 19;
const PROTOCOL_F_GET_VRING_BASE_INFLIGHT: u64 = 1 << 20;
const PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN: u64 = 1 << 23;
/// Storage latency of the handoff/drain pair: a round's 32 requests are in
/// flight for this long, so the stop surely meets some.
const LATENCY_MS: u32 = 50;
/// Migrations a test may take to get a stop with requests in flight.
const PRECONDITION_ATTEMPTS: u32 = 3;
/// Rounds each destination finishes before it moves on or stops.
const ROUNDS_AFTER: usize = 2;
const ROUNDS_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a held fence is watched: nothing may move meanwhile.
const HOLD_WINDOW: Duration = Duration::from_secs(2);

fn u64_of(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer {key} in {value}"))
}

/// Boot on side 0 and wait for the first round (data the source wrote).
fn boot(rig: &mut Rig) -> Vm {
    let started = Instant::now();
    let mut vm = rig.spawn_vm(0, false);
    vm.qemu.wait_rounds(1, FIRST_ROUND_TIMEOUT);
    eprintln!(
        "{} booted, first round after {:.1?}",
        vm.name,
        started.elapsed()
    );
    vm
}

/// The destination kept the guest going: its rounds continue the source's.
fn wait_rounds_after(vm: &mut Vm, source_last: Option<u64>, count: usize) -> Vec<u64> {
    let rounds = vm.qemu.wait_rounds(count, ROUNDS_TIMEOUT);
    if let Some(last) = source_last {
        assert!(
            rounds[0] > last,
            "{}: first round {} but the source had finished {last}: a new guest?\n{}",
            vm.name,
            rounds[0],
            vm.qemu.diagnostics()
        );
    }
    rounds
}

/// One migration from side 0 held until a round starts, then: with
/// `inflight-migration=on` the source hands its requests over, with `off`
/// it drains them; the guest verifies clean either way.
fn handoff_or_drain(inflight_migration: bool) {
    let mode = if inflight_migration {
        "handoff"
    } else {
        "drain"
    };
    let mut rig = Rig::new(Setup::blk(inflight_migration, LATENCY_MS));
    let vm = boot(&mut rig);
    let acked = rig.protocol_features(0, DISK_ID);
    eprintln!("{mode}: QEMU 11.1 acked blk protocol features {acked:#x}");
    assert_ne!(
        acked & PROTOCOL_F_INFLIGHT_SHMFD,
        0,
        "INFLIGHT_SHMFD: {acked:#x}"
    );
    assert_eq!(
        acked & PROTOCOL_F_GET_VRING_BASE_INFLIGHT != 0,
        inflight_migration,
        "bit 20 must be acked exactly with inflight-migration=on: {acked:#x}"
    );
    assert_eq!(
        acked & PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN,
        0,
        "QEMU 11.1 has no bit 23"
    );
    let mut vm = vm;
    let mut source_last = vm.qemu.rounds().last().copied();
    // The stop must find requests in flight, and only QEMU decides when it
    // stops: the migration is held until a round runs with requests in
    // flight, but the guest can still be between requests when the stop
    // lands (a loaded machine slows the guest, not the 50 ms storage).
    // Such a migration shows nothing either way; it is checked like any
    // other and the guest migrates again, a few times at most.
    let mut attempt = 0;
    let (handed_off, unanswered_during_stop, stats) = loop {
        attempt += 1;
        let source = vm.side;
        let before = rig.metrics(source, DISK_ID);
        let resubmitted_before = resubmissions(&rig.agent_log(1 - source)).len();
        let mut round_start = RoundStart::default();
        // The source's region, sampled from the moment the stop may come.
        let mut sampler = None;
        let (next, stats) = migrate(
            &mut rig,
            vm,
            true,
            |_, src, info| {
                let ready = round_start.reached(src, info)?;
                if ready {
                    sampler = Some(RegionSampler::start(src.pid()));
                }
                Ok(ready)
            },
            |_, _| Ok(()),
        );
        vm = next;
        let samples = sampler.map(RegionSampler::finish).unwrap_or_default();
        let window = last_stop_window(&rig.agent_log(source))
            .unwrap_or_else(|| panic!("no GET_VRING_BASE in the source agent's log"));
        // Requests seen unanswered while the source handled its stop.
        let unanswered_during_stop = most_unanswered(&samples, window).unwrap_or(0);

        let after = rig.metrics(source, DISK_ID);
        assert_eq!(
            u64_of(&after, "stops"),
            u64_of(&before, "stops") + 1,
            "one stop on the source: {after}"
        );
        let handed_off = u64_of(&after, "handed-off-last-stop");
        let resubmitted = resubmissions(&rig.agent_log(vm.side)).split_off(resubmitted_before);
        if inflight_migration {
            assert_eq!(
                resubmitted.iter().map(|r| r.0).collect::<Vec<_>>(),
                if handed_off > 0 {
                    vec![handed_off]
                } else {
                    vec![]
                },
                "the destination resubmits exactly what the source left in the region"
            );
        } else {
            assert_eq!(handed_off, 0, "a drain hands nothing off: {after}");
            assert!(
                resubmitted.is_empty(),
                "the destination resubmitted {resubmitted:?}"
            );
        }
        let met = if inflight_migration {
            handed_off > 0
        } else {
            unanswered_during_stop > 0
        };
        if met {
            break (handed_off, unanswered_during_stop, stats);
        }
        assert!(
            attempt < PRECONDITION_ATTEMPTS,
            "{attempt} migrations and not one stop found requests in flight \
             (last: {} samples, stop window {window:?}, handed off {handed_off}): \
             the precondition was never met",
            samples.len()
        );
        eprintln!("{mode}: migration {attempt} stopped with no request in flight; migrating again");
        rig.assert_agents_alive(&vm);
        source_last = vm.qemu.rounds().last().copied().or(source_last);
    };
    rig.assert_agents_alive(&vm);
    let rounds = wait_rounds_after(&mut vm, source_last, ROUNDS_AFTER);
    let verdict = finish_guest(&mut rig, &mut vm, *rounds.last().unwrap_or(&0) + 1);
    eprintln!(
        "{mode}: latency-ms={LATENCY_MS}, {handed_off} request(s) handed off, \
         {unanswered_during_stop} seen in flight during the stop, {stats}; guest: {}",
        verdict.details
    );
}

/// inflight-migration=on: the source suspends and the destination resubmits.
#[test]
fn qemu11_inflight_migration_hands_requests_to_the_destination() {
    handoff_or_drain(true);
}

/// inflight-migration=off (what QEMU 10 does): the source drains.
#[test]
fn qemu11_without_inflight_migration_the_source_drains() {
    handoff_or_drain(false);
}

/// How the fence cases end the source's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fence {
    /// `fence=lock`: the destination waits for the source's lock.
    Lock,
    /// `fence=api`: the test, as orchestrator, releases the destination.
    Api,
    /// `fence=lock`, and the source agent is SIGKILLed after its
    /// suspending reply: at the first poll that sees the stop, or when
    /// the migration completes if the stop fell between two polls. Either
    /// way its writes are still held in the kernel.
    LockSourceKilled,
}

/// The source's writes stuck in the kernel at the stop (a throttled slow
/// disk), then: the destination must hold its resubmitted writes (gate
/// closed, the guest's round cannot finish) for as long as `fence` says.
fn fence_case(fence: Fence) {
    let slow_dir = tempfile::tempdir().expect("a directory for the slow disk");
    let disk = SlowDisk::new(slow_dir.path(), 512).unwrap_or_else(|e| panic!("{e}"));
    let keys = match fence {
        Fence::Api => "direct,fence=api",
        Fence::Lock | Fence::LockSourceKilled => "direct,fence=lock",
    };
    let mut setup = Setup::blk(true, 0);
    setup.blk_keys = [keys.to_string(), keys.to_string()];
    setup.image_dir = Some(disk.mount_point().to_path_buf());
    setup.round_size_mib = 4;
    let mut rig = Rig::new(setup);
    let source_pid = rig.sides[0].process.as_ref().map(|p| p.child.id());
    disk.add_process(source_pid.expect("the source agent runs"))
        .unwrap_or_else(|e| panic!("{e}"));
    let lock = {
        let mut path = rig.image.clone().into_os_string();
        path.push(".fence");
        std::path::PathBuf::from(path)
    };
    let vm = boot(&mut rig);
    let before = rig.metrics(0, DISK_ID);
    let source_last = vm.qemu.rounds().last().copied();

    disk.hold_writes().unwrap_or_else(|e| panic!("{e}"));
    let submitted_before = disk
        .write_bytes_submitted()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut abandoned_at_kill = None;
    let (mut vm, stats) = migrate(
        &mut rig,
        vm,
        true,
        |_, src, info| {
            // Ready once data is held in the kernel (bytes: a flush is a
            // 0-byte write bio the throttle passes): that round cannot
            // finish, so the guest's writes pile up until the stop.
            Ok(handoff_vm::Migration::first_pass_done(info)
                && disk.write_bytes_submitted()? > submitted_before
                && qemu_inflight_count(src.pid())? > 0)
        },
        |rig, _| {
            if fence != Fence::LockSourceKilled || abandoned_at_kill.is_some() {
                return Ok(());
            }
            let metrics = rig.try_metrics(0, DISK_ID)?;
            if u64_of(&metrics, "stops") > u64_of(&before, "stops") {
                let fence = rig.fence(0);
                abandoned_at_kill = Some(u64_of(&fence, "abandoned-outstanding"));
                rig.kill_agent(0);
                eprintln!("SIGKILLed the source agent after its suspending reply: {fence}");
            }
            Ok(())
        },
    );

    let abandoned = match fence {
        Fence::LockSourceKilled => {
            abandoned_at_kill.expect("the source agent was killed after its stop")
        }
        _ => {
            let after = rig.metrics(0, DISK_ID);
            assert!(u64_of(&after, "handed-off-last-stop") > 0, "{after}");
            u64_of(&rig.fence(0), "abandoned-outstanding")
        }
    };
    assert!(
        abandoned > 0,
        "the source's writes were held in the kernel at the stop, yet it reports none outstanding"
    );
    // The destination resumed and holds the resubmitted writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (resubmitted, held) = loop {
        if let Some(&r) = resubmissions(&rig.agent_log(1)).first() {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the destination resubmitted nothing\n{}",
            vm.qemu.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        held > 0,
        "{resubmitted} resubmitted, but no write held by the fence"
    );
    let watch_until = Instant::now() + HOLD_WINDOW;
    while Instant::now() < watch_until {
        assert_eq!(
            rig.fence(1)["open"],
            false,
            "the destination's fence opened while the source's writes were held"
        );
        assert!(
            vm.qemu.rounds().is_empty(),
            "the guest finished a round with its writes held"
        );
        if fence != Fence::Api {
            assert!(
                lock_held(&lock),
                "{} is free while the source's writes are still in the kernel",
                lock.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Storage gets the source's writes.
    disk.release_writes().unwrap_or_else(|e| panic!("{e}"));
    if fence != Fence::LockSourceKilled {
        assert!(
            wait_for(Duration::from_secs(30), || rig.fence(0)
                ["abandoned-outstanding"]
                == 0),
            "the source's abandoned writes never finished: {}",
            rig.fence(0)
        );
    }
    if fence == Fence::Api {
        // Nothing but the orchestrator opens an api fence.
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            assert_eq!(
                rig.fence(1)["open"],
                false,
                "the api fence opened by itself"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            vm.qemu.rounds().is_empty(),
            "the guest finished a round before fence-release"
        );
        rig.control(1, "fence-release", json!({ "device": DISK_ID }));
    }
    assert!(
        wait_for(Duration::from_secs(30), || rig.fence(1)["open"] == true),
        "the destination's fence stayed closed after the source's writes landed: {}",
        rig.fence(1)
    );
    let rounds = wait_rounds_after(&mut vm, source_last, ROUNDS_AFTER);
    let verdict = finish_guest(&mut rig, &mut vm, *rounds.last().unwrap_or(&0) + 1);
    eprintln!(
        "{fence:?}: {abandoned} write(s) abandoned in the kernel, {resubmitted} resubmitted, {held} held; {stats}; guest: {}",
        verdict.details
    );
}

fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether someone holds an OFD write lock on `path` (F_OFD_GETLK, which
/// takes none).
fn lock_held(path: &std::path::Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_RDLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on an open fd with a pointer to a flock on our stack.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    lock.l_type == libc::F_WRLCK as libc::c_short
}

/// `fence=lock`: the destination waits until the source's writes landed.
#[test]
fn qemu11_lock_fence_holds_until_the_sources_writes_land() {
    fence_case(Fence::Lock);
}

/// `fence=api`: the destination waits for the orchestrator's release.
#[test]
fn qemu11_api_fence_holds_until_fence_release() {
    fence_case(Fence::Api);
}

/// The source agent dies right after suspending, its writes still in the
/// kernel: the fence holds until they are on storage, not until the death.
#[test]
fn qemu11_fence_holds_after_the_source_agent_is_sigkilled() {
    fence_case(Fence::LockSourceKilled);
}

/// The net device on QEMU 11.1: what the agent holds beyond QEMU's view
/// (here RSS) reaches the destination agent through QEMU's device-state
/// pipe (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE).
#[test]
fn qemu11_net_device_state_moves_through_qemu() {
    let mut setup = Setup::blk(true, 0);
    setup.round_size_mib = 4;
    setup.net_keys = Some([
        "dataplane=loop,queue-pairs=2,rss=on".to_string(),
        "dataplane=loop,queue-pairs=2".to_string(),
    ]);
    setup.nic_queue_pairs = 2;
    let mut rig = Rig::new(setup);
    let vm = boot(&mut rig);
    let acked = rig.protocol_features(0, NIC_ID);
    eprintln!("net: QEMU 11.1 acked net protocol features {acked:#x}");
    assert_ne!(
        acked & PROTOCOL_F_DEVICE_STATE,
        0,
        "DEVICE_STATE: {acked:#x}"
    );
    let source_rss = rig.device(0, NIC_ID)["rss"].clone();
    assert!(
        source_rss.is_object(),
        "the source steers with RSS: {source_rss}"
    );
    assert!(
        rig.device(1, NIC_ID)["rss"].is_null(),
        "the destination starts without RSS"
    );
    let source_last = vm.qemu.rounds().last().copied();

    let (mut vm, stats) = migrate(&mut rig, vm, false, |_, _, _| Ok(true), |_, _| Ok(()));

    assert_eq!(
        rig.device(1, NIC_ID)["rss"],
        source_rss,
        "the destination agent took the source's RSS from the device state"
    );
    for side in [0, 1] {
        let names: Vec<String> = rig.metrics(side, NIC_ID)["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["event"] == "message")
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect();
        for wanted in ["SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE"] {
            assert!(
                names.iter().any(|n| n == wanted),
                "side {side}: no {wanted} in {names:?}"
            );
        }
        let state = names.iter().position(|n| n == "SET_DEVICE_STATE_FD");
        let first_start = names.iter().position(|n| n == "SET_FEATURES");
        eprintln!(
            "net side {side}: SET_DEVICE_STATE_FD at message {state:?}, first SET_FEATURES at {first_start:?}"
        );
        if side == 1 {
            // QEMU 11.1 loads the back-end's state before it starts the
            // destination's device: the agent must take it with no rings.
            assert!(
                state < first_start,
                "destination: the device state came after the start began: {names:?}"
            );
        }
    }
    assert_eq!(
        rig.protocol_features(1, NIC_ID),
        acked,
        "both sides negotiate alike"
    );
    let rounds = wait_rounds_after(&mut vm, source_last, 1);
    let verdict = finish_guest(&mut rig, &mut vm, *rounds.last().unwrap_or(&0) + 1);
    eprintln!("net: {stats}; guest: {}", verdict.details);
}

/// Twenty migrations in a row, each held until a round starts so each
/// stop hands requests over; the guest verifies everything at the end.
#[test]
#[ignore = "twenty migrations under TCG take many minutes: run with --run-ignored only"]
fn qemu11_twenty_handoff_migrations() {
    const MIGRATIONS: usize = 20;
    let mut rig = Rig::new(Setup::blk(true, LATENCY_MS));
    let mut vm = boot(&mut rig);
    let mut downtimes = Vec::new();
    let mut handed = Vec::new();
    for i in 0..MIGRATIONS {
        let source = vm.side;
        let before = rig.metrics(source, DISK_ID);
        let destination_log = rig.agent_log(1 - source).len();
        let source_last = vm.qemu.rounds().last().copied();
        let mut round_start = RoundStart::default();
        let (next, stats) = migrate(
            &mut rig,
            vm,
            true,
            |_, src, info| round_start.reached(src, info),
            |_, _| Ok(()),
        );
        vm = next;
        let after = rig.metrics(source, DISK_ID);
        assert_eq!(u64_of(&after, "stops"), u64_of(&before, "stops") + 1);
        let handed_off = u64_of(&after, "handed-off-last-stop");
        assert!(
            handed_off > 0,
            "migration {}: nothing handed off: {after}",
            i + 1
        );
        let log = rig.agent_log(1 - source);
        let resubmitted: Vec<u64> = resubmissions(&log[destination_log..])
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(resubmitted, [handed_off], "migration {}", i + 1);
        wait_rounds_after(&mut vm, source_last, 1);
        downtimes.push(stats.downtime_ms);
        handed.push(handed_off);
    }
    let verdict = finish_guest(&mut rig, &mut vm, MIGRATIONS as u64);
    eprintln!(
        "{MIGRATIONS} migrations: downtime ms {downtimes:?}, handed off {handed:?}; guest: {}",
        verdict.details
    );
}
