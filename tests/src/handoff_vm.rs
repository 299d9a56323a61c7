//! Live migration of a real guest on QEMU 11.1 with vhost-user-blk
//! `inflight-migration=on|off`, between two agents serving one image: the
//! rig `tests/tests/blk_qemu11.rs` and `benches/blk_downtime.rs` share.
//!
//! Side 0 and side 1 each run a `vhost-agent serve` with the disk (and
//! optionally a net device) and `--control`; a VM runs on one side and is
//! migrated to a new QEMU on the other. The guest runs `/init`'s
//! `fio-rounds` mode (fio write+verify rounds until the host writes the
//! stop marker, then every region verified again), so requests are in
//! flight across the switchover and data written on one side is verified
//! on the other.
//!
//! When the stop comes is QEMU's decision, and a guest between two fio
//! rounds has nothing in flight. So a migration can be held short of its
//! stop ([`Migration::begin`] with `hold_stop`, see
//! [`crate::migration_hold`]) until the test has made the condition it
//! needs, then let go ([`Migration::allow_stop`]: bandwidth and
//! `downtime-limit` back to normal, so the stop comes as in any migration).
//! [`RoundStart`] is the usual condition: a fresh round whose requests are
//! in the source's inflight region.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vhost::vhost_user::message::VhostUserInflight;

use crate::frontend::inflight::InflightRegion;
use crate::migration_hold::qemu_memfd;
pub use crate::migration_hold::{both, migrate, Migration};
use crate::qemu::{self, Nic, Qemu, QemuBinary, Qmp, Verdict, VmConfig};
use crate::qemu11;
use crate::support::{self, ChildGuard};

/// Size of the image (its last 4 KiB block is the stop marker).
pub const IMAGE_SIZE: u64 = 256 << 20;
/// QEMU's default `downtime-limit` (ms), restored by [`Migration::allow_stop`].
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's default vhost-user-blk `queue-size`, the inflight region's.
pub const QUEUE_SIZE: u16 = 128;
/// The device id of the agents' disk.
pub const DISK_ID: &str = "blk0";
/// The device id of the agents' NIC, when there is one.
pub const NIC_ID: &str = "net0";
/// The guest's MAC.
pub const GUEST_MAC: &str = "52:54:00:11:00:01";
/// Boot and the first round.
pub const FIRST_ROUND_TIMEOUT: Duration = Duration::from_secs(120);
/// From `migrate` to `completed`, including any hold.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// What both sides run.
#[derive(Debug, Clone)]
pub struct Setup {
    /// vhost-user-blk `inflight-migration=` on both QEMUs.
    pub inflight_migration: bool,
    /// Extra `--blk` keys per side (e.g. `latency-ms=50,fence=api`).
    pub blk_keys: [String; 2],
    /// A `--net` device per side (its `socket=` is added), e.g.
    /// `dataplane=loop,queue-pairs=2,rss=on`; the VM gets a NIC for it.
    pub net_keys: Option<[String; 2]>,
    /// Queue pairs of the NIC (QEMU's side; the agents' `queue-pairs=`
    /// must match).
    pub nic_queue_pairs: u16,
    /// Where the image goes (a [`crate::slow_disk::SlowDisk`] mount);
    /// default: the rig's directory.
    pub image_dir: Option<PathBuf>,
    /// MiB one fio round writes and verifies.
    pub round_size_mib: u64,
    /// Regions the rounds cycle over.
    pub regions: u64,
    /// fio's queue depth.
    pub iodepth: u32,
}

impl Setup {
    /// One disk, `inflight-migration=on|off`, both agents with
    /// `latency-ms=latency_ms`, 8 MiB rounds over 6 regions at queue depth 32.
    pub fn blk(inflight_migration: bool, latency_ms: u32) -> Setup {
        let keys = format!("latency-ms={latency_ms}");
        Setup {
            inflight_migration,
            blk_keys: [keys.clone(), keys],
            net_keys: None,
            nic_queue_pairs: 1,
            image_dir: None,
            round_size_mib: 8,
            regions: 6,
            iodepth: 32,
        }
    }
}

/// One side: an agent and its files.
pub struct Side {
    /// The disk's vhost-user socket.
    pub socket: PathBuf,
    /// The NIC's vhost-user socket, if the setup has one.
    pub net_socket: Option<PathBuf>,
    /// The agent's control socket.
    pub control: PathBuf,
    /// The agent's log (`--log-level debug`).
    pub log: PathBuf,
    /// The agent; None once the test killed it.
    pub process: Option<ChildGuard>,
}

/// A guest on one side: QEMU, its QMP connection.
pub struct Vm {
    /// The QEMU process and its logs.
    pub qemu: Qemu,
    /// QMP.
    pub qmp: Qmp,
    /// Which side's agent serves it.
    pub side: usize,
    /// For messages, e.g. `qemu2-side1`.
    pub name: String,
}

impl Vm {
    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.qemu.process.child.id()
    }
}

/// The image, both agents, and how many VMs were started.
pub struct Rig {
    /// Scratch directory (logs, sockets, the image unless elsewhere).
    pub dir: tempfile::TempDir,
    /// The raw image both agents serve.
    pub image: PathBuf,
    /// The configuration.
    pub setup: Setup,
    /// Side 0 and side 1.
    pub sides: [Side; 2],
    vms_started: u32,
}

/// Set this variable to see every `query-migrate` poll of [`migrate`].
pub const DEBUG_ENV: &str = "VHOST_TEST_DEBUG_MIGRATION";

/// Set this variable to keep the rig's directory for a look afterwards.
pub const KEEP_DIR_ENV: &str = "VHOST_TEST_KEEP_DIR";

impl Rig {
    /// A fresh image and two agents on it. Checks QEMU 11.1 and builds the
    /// guest first, so nothing later is timed with a build in it.
    pub fn new(setup: Setup) -> Rig {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        Self::in_dir(setup, dir)
    }

    /// Like [`Rig::new`], in `dir`.
    pub fn in_dir(setup: Setup, mut dir: tempfile::TempDir) -> Rig {
        qemu11::require();
        qemu::guest();
        if std::env::var_os(KEEP_DIR_ENV).is_some() {
            dir.disable_cleanup(true);
            eprintln!("{KEEP_DIR_ENV}: keeping {}", dir.path().display());
        }
        let image_dir = setup
            .image_dir
            .clone()
            .unwrap_or_else(|| dir.path().to_path_buf());
        let image = image_dir.join("disk.img");
        if setup.image_dir.is_some() {
            // Allocated, so O_DIRECT writes are overwrites of real blocks.
            std::fs::write(&image, vec![0u8; IMAGE_SIZE as usize])
                .and_then(|()| File::open(&image)?.sync_all())
                .unwrap_or_else(|e| panic!("write {}: {e}", image.display()));
        } else {
            support::create_image(&image, IMAGE_SIZE).expect("create the disk image");
        }
        let sides = [0, 1].map(|i| Self::start_side(dir.path(), &image, &setup, i));
        Rig {
            dir,
            image,
            setup,
            sides,
            vms_started: 0,
        }
    }

    fn start_side(dir: &Path, image: &Path, setup: &Setup, i: usize) -> Side {
        let socket = dir.join(format!("blk-{i}.sock"));
        let control = dir.join(format!("ctl-{i}.sock"));
        let log = dir.join(format!("agent-{i}.log"));
        let mut blk = format!(
            "socket={},image={},id={DISK_ID}",
            socket.display(),
            image.display()
        );
        if !setup.blk_keys[i].is_empty() {
            blk = format!("{blk},{}", setup.blk_keys[i]);
        }
        let control_arg = control.display().to_string();
        let mut args = vec![
            "--log-level".to_string(),
            "debug".to_string(),
            "--control".to_string(),
            control_arg,
        ];
        let net_socket = setup.net_keys.as_ref().map(|keys| {
            let net_socket = dir.join(format!("net-{i}.sock"));
            args.push("--net".to_string());
            args.push(format!(
                "socket={},id={NIC_ID},{}",
                net_socket.display(),
                keys[i]
            ));
            net_socket
        });
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut process = support::spawn_agent(&[blk], &args, Some(&log));
        if let Some(net_socket) = &net_socket {
            support::wait_for_path(net_socket, Duration::from_secs(20), &mut process);
        }
        Side {
            socket,
            net_socket,
            control,
            log,
            process: Some(process),
        }
    }

    /// Start QEMU 11.1 on `side`: booting the guest, or with `incoming` a
    /// migration destination (`-incoming defer`) with the same machine.
    pub fn spawn_vm(&mut self, side: usize, incoming: bool) -> Vm {
        self.vms_started += 1;
        let name = format!("qemu{}-side{side}", self.vms_started);
        let setup = &self.setup;
        let mut config = VmConfig::new("fio-rounds")
            .qemu(QemuBinary::Trixie)
            .param("vhost_size", format!("{}M", setup.round_size_mib))
            .param("vhost_regions", setup.regions)
            .param("vhost_bs", "4k")
            .param("vhost_iodepth", setup.iodepth)
            .param("vhost_rw", "randwrite")
            .param("vhost_stop_wait", 1800)
            .with_qmp();
        config.extra_args = qemu11::blk_args(
            "blk0",
            &self.sides[side].socket,
            setup.inflight_migration,
            Some(1000),
        );
        if let Some(net_socket) = &self.sides[side].net_socket {
            config = config
                .nic(Nic::vhost_user(net_socket, GUEST_MAC).queue_pairs(setup.nic_queue_pairs));
        }
        if incoming {
            config = config.incoming("defer");
        }
        let mut qemu = Qemu::spawn_named(&config, self.dir.path(), &name);
        for (i, s) in self.sides.iter().enumerate() {
            qemu.add_context_log(&format!("agent side {i}"), &s.log);
        }
        let qmp = qemu.qmp();
        Vm {
            qemu,
            qmp,
            side,
            name,
        }
    }

    /// One control API call to `side`'s agent; Err with the reason.
    pub fn try_control(&self, side: usize, command: &str, args: Value) -> Result<Value, String> {
        support::control_execute(&self.sides[side].control, command, args)
    }

    /// One control API call to `side`'s agent; panics with its log.
    pub fn control(&self, side: usize, command: &str, args: Value) -> Value {
        self.try_control(side, command, args).unwrap_or_else(|e| {
            panic!(
                "side {side}: {command}: {e}\n----- agent side {side} -----\n{}",
                qemu::log_tail(&self.sides[side].log, 60)
            )
        })
    }

    /// `side`'s device `id` in `query-devices`.
    pub fn device(&self, side: usize, id: &str) -> Value {
        let devices = self.control(side, "query-devices", json!({}));
        devices
            .as_array()
            .and_then(|all| all.iter().find(|d| d["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("side {side}: no device {id} in {devices}"))
    }

    /// The disk's `fence` object in `side`'s `query-devices`.
    pub fn fence(&self, side: usize) -> Value {
        self.device(side, DISK_ID)["fence"].clone()
    }

    /// Device `id`'s entry of `side`'s `query-metrics`; Err if the agent
    /// does not answer.
    pub fn try_metrics(&self, side: usize, id: &str) -> Result<Value, String> {
        let reply = self.try_control(side, "query-metrics", json!({ "device": id }))?;
        reply
            .get(0)
            .cloned()
            .ok_or_else(|| format!("side {side}: no metrics for {id}: {reply}"))
    }

    /// Device `id`'s entry of `side`'s `query-metrics`.
    pub fn metrics(&self, side: usize, id: &str) -> Value {
        self.try_metrics(side, id)
            .unwrap_or_else(|e| panic!("{e}\n{}", qemu::log_tail(&self.sides[side].log, 60)))
    }

    /// The protocol features the front-end acked for device `id` on `side`
    /// (`query-config`).
    pub fn protocol_features(&self, side: usize, id: &str) -> u64 {
        let config = self.control(side, "query-config", json!({ "device": id }));
        config["protocol_features"]
            .as_u64()
            .unwrap_or_else(|| panic!("side {side}: no protocol_features in {config}"))
    }

    /// `side`'s agent log so far.
    pub fn agent_log(&self, side: usize) -> String {
        std::fs::read_to_string(&self.sides[side].log).unwrap_or_default()
    }

    /// Panic unless both agents still run (a killed one does not count).
    pub fn assert_agents_alive(&mut self, vm: &Vm) {
        for (i, s) in self.sides.iter_mut().enumerate() {
            if let Some(process) = s.process.as_mut() {
                if let Ok(Some(status)) = process.child.try_wait() {
                    panic!(
                        "the agent on side {i} exited ({status})\n{}",
                        vm.qemu.diagnostics()
                    );
                }
            }
        }
    }

    /// SIGKILL `side`'s agent and reap it.
    pub fn kill_agent(&mut self, side: usize) {
        let mut process = self.sides[side]
            .process
            .take()
            .unwrap_or_else(|| panic!("the agent on side {side} is not running"));
        process.signal(libc::SIGKILL);
        process
            .wait_timeout(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("the SIGKILLed agent on side {side} was not reaped"));
    }
}

/// How many requests QEMU `pid`'s vhost-user-blk inflight region (the
/// memfd the agent handed out, named `vhost-inflight`) marks in flight.
pub fn qemu_inflight_count(pid: u32) -> Result<usize, String> {
    let file = qemu_memfd(pid, "vhost-inflight", false)?
        .ok_or_else(|| format!("QEMU {pid} holds no vhost-inflight memfd"))?;
    let size = file
        .metadata()
        .map_err(|e| format!("QEMU {pid}'s inflight memfd: {e}"))?
        .len();
    let region = InflightRegion::from_reply(&VhostUserInflight::new(size, 0, 1, QUEUE_SIZE), file);
    Ok(region.queue(0).inflight_count())
}

/// Requests in the region that show fio running (the stop-marker check
/// between rounds is one read).
pub const ROUND_RUNNING_INFLIGHT: usize = 8;

/// The condition most tests stop the guest in: a round that began after
/// the migration's first RAM pass, with fio's requests in the source's
/// inflight region. Early in a round, the write phase has seconds to go.
#[derive(Debug, Default)]
pub struct RoundStart {
    rounds_seen: Option<usize>,
}

impl RoundStart {
    /// Call repeatedly (with the source's `query-migrate`); true once the
    /// guest stands at the start of a round with requests in flight.
    pub fn reached(&mut self, src: &Vm, info: &Value) -> Result<bool, String> {
        self.reached_on(&src.qemu, info)
    }

    /// [`RoundStart::reached`] for any source QEMU (another rig's VM).
    pub fn reached_on(&mut self, src: &Qemu, info: &Value) -> Result<bool, String> {
        if !Migration::first_pass_done(info) {
            return Ok(false);
        }
        let rounds = src.rounds().len();
        let seen = *self.rounds_seen.get_or_insert(rounds);
        if rounds <= seen {
            return Ok(false);
        }
        Ok(qemu_inflight_count(src.process.child.id())? >= ROUND_RUNNING_INFLIGHT)
    }
}

/// Per "resubmitted N request(s) from the inflight region" line of an
/// agent log: (N, writes held until the write fence opened).
pub fn resubmissions(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find(": resubmitted ")? + ": resubmitted ".len()..];
            let count = rest.split_whitespace().next()?.parse().ok()?;
            let held = rest
                .split_once("; ")
                .and_then(|(_, tail)| tail.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            Some((count, held))
        })
        .collect()
}

/// Assert a clean `fio-rounds` verdict after `min_rounds` rounds over
/// `regions` regions.
pub fn assert_rounds_pass(v: &Verdict, min_rounds: u64, regions: u64, vm: &Vm) {
    let fail = |what: &str| -> ! { panic!("{what}: {v:?}\n{}", vm.qemu.diagnostics()) };
    if !v.passed {
        fail("the guest's verdict is FAIL");
    }
    for key in ["fio_exit", "verify_errors", "io_errors"] {
        if v.field(key) != Some("0") {
            fail(&format!("{key} is not 0"));
        }
    }
    let rounds: u64 = v
        .field("rounds")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| fail("no rounds="));
    if rounds < min_rounds {
        fail(&format!("{rounds} rounds, expected >= {min_rounds}"));
    }
    let regions = rounds.min(regions).to_string();
    if v.field("verified_regions") != Some(regions.as_str()) {
        fail(&format!("verified_regions is not {regions}"));
    }
}

/// Write the stop marker into the image and wait for the clean verdict of
/// `vm` (which must have finished at least `min_rounds` rounds).
pub fn finish_guest(rig: &mut Rig, vm: &mut Vm, min_rounds: u64) -> Verdict {
    qemu::write_fio_rounds_stop_marker(&rig.image)
        .unwrap_or_else(|e| panic!("write the stop marker into {}: {e}", rig.image.display()));
    let verdict = vm.qemu.expect_pass(Duration::from_secs(180));
    rig.assert_agents_alive(vm);
    assert_rounds_pass(&verdict, min_rounds, rig.setup.regions, vm);
    verdict
}
