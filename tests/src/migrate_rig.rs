//! A live migration driven by `vhost-agent migrate`, with real QEMU and
//! real agents: a private network namespace with a bridge and a DHCP
//! server ([`Lan`]), agents inside it each serving a net device on its own
//! tap (with an optional cost profile) and a disk on one shared image,
//! QEMU guests on them, and the command run as an operator would.
//!
//! Each QEMU gets two QMP sockets: the test keeps one ([`Vm::qmp`]) and
//! the orchestrator uses the other ([`Vm::orchestrator_qmp`]), as a
//! management stack and a migration tool would (a QMP socket serves one
//! client at a time).
//!
//! QEMU 11.1 with a disk `inflight-migration=on` is one more
//! [`RigOptions`] ([`RigOptions::qemu11_inflight`]); a migration held
//! short of its stop until requests are in flight is [`hold`].
//!
//! What every migration through the command must show on its timeline
//! (each phase, in order) is checked in [`timeline`] ([`assert_phases`]);
//! the rest of the judging is the tests'.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::agent::AgentCommand;
use crate::netns::Lan;
use crate::qemu::{Nic, Qemu, QemuBinary, Qmp, VhostUserBlk, VmConfig, NET_READY_MARKER};
use crate::qemu11;
use crate::support::{agent_binary, control_execute, create_image, workspace_root, ChildGuard};

pub mod hold;
pub mod timeline;

pub use self::timeline::{assert_before, assert_phases, device, ops, phase, phase_end, PHASES};

/// The guest's MAC; udhcpd leases it a fixed address.
pub const GUEST_MAC: &str = "52:54:00:77:00:40";
/// Size of the shared image (its last 4 KiB block is fio-rounds' stop
/// marker).
pub const IMAGE_SIZE: u64 = 128 << 20;
/// What one fio round writes and verifies.
pub const ROUND_SIZE: &str = "8M";
/// Regions the rounds cycle over.
pub const REGIONS: u64 = 4;
/// Boot, DHCP and the first ping.
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Seconds `vhost-agent migrate` may take (its `--timeout-s`).
pub const MIGRATE_TIMEOUT_S: u64 = 120;

/// How QEMU is launched: [`Qemu::spawn_named`], which also runs QEMU 11.1
/// when the configuration says so ([`VmConfig::qemu`]).
pub type Launch = fn(&VmConfig, &Path, &str) -> Qemu;

/// What the rig sets up.
#[derive(Clone, Debug)]
pub struct RigOptions {
    /// Put the `vdpa-191ms` cost profile on every agent's tap.
    pub profile: bool,
    /// Queue pairs of the net device.
    pub queue_pairs: u16,
    /// More `--blk` keys for every agent's disk (e.g. `,fence=api`).
    pub blk_extra: String,
    /// How to launch QEMU.
    pub launch: Launch,
    /// More QEMU configuration (a disk property of another QEMU build).
    pub configure: fn(VmConfig) -> VmConfig,
}

impl RigOptions {
    /// Two queue pairs on a tap with or without the profile, a disk with
    /// the API write fence, QEMU 10.
    pub fn new(profile: bool) -> RigOptions {
        RigOptions {
            profile,
            queue_pairs: 2,
            blk_extra: ",fence=api".to_string(),
            launch: Qemu::spawn_named,
            configure: |config| config,
        }
    }

    /// QEMU 11.1 with the disk `inflight-migration=on`, so a stop hands
    /// the disk's unanswered requests over; every agent's disk with
    /// `latency-ms` (requests stay in flight that long) and the API write
    /// fence; the net device on a tap without a profile.
    pub fn qemu11_inflight(latency_ms: u32) -> RigOptions {
        RigOptions {
            profile: false,
            queue_pairs: 2,
            blk_extra: format!(",fence=api,latency-ms={latency_ms}"),
            launch: Qemu::spawn_named,
            configure: inflight_migration_on,
        }
    }
}

/// QEMU 11.1, its disks given as `-device` arguments with
/// `inflight-migration=on` (a property [`VhostUserBlk`] does not know).
fn inflight_migration_on(mut config: VmConfig) -> VmConfig {
    for (index, disk) in std::mem::take(&mut config.disks).iter().enumerate() {
        let id = format!("blk{index}");
        let args = qemu11::blk_args(&id, &disk.socket, true, disk.reconnect_ms);
        config.extra_args.extend(args);
    }
    config.qemu(QemuBinary::Trixie)
}

/// One agent with its sockets, tap and log.
pub struct AgentSide {
    /// The process.
    pub agent: ChildGuard,
    /// Its control socket.
    pub control: PathBuf,
    /// The net device's vhost-user socket.
    pub net_socket: PathBuf,
    /// The disk's vhost-user socket.
    pub blk_socket: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// Its tap.
    pub tap: String,
}

/// A running QEMU with the test's QMP connection.
pub struct Vm {
    /// The process.
    pub qemu: Qemu,
    /// The test's monitor.
    pub qmp: Qmp,
    /// The monitor socket left for the orchestrator.
    pub orchestrator_qmp: PathBuf,
    /// Its name in logs.
    pub name: String,
}

/// What one run of `vhost-agent migrate` did.
#[derive(Debug)]
pub struct MigrateRun {
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// Its stdout (the timeline as text).
    pub stdout: String,
    /// Its stderr (progress, errors).
    pub stderr: String,
    /// The `--out` JSON, when it wrote one.
    pub timeline: Option<Value>,
}

/// A `vhost-agent migrate` under way ([`MigrationRig::start`]).
struct Started {
    child: ChildGuard,
    out: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Started {
    /// What the command did, once it exited with `status`.
    fn collect(self, status: std::process::ExitStatus) -> MigrateRun {
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        let (stdout, stderr) = (read(&self.stdout), read(&self.stderr));
        eprintln!("----- vhost-agent migrate ({status}) -----\n{stderr}{stdout}");
        let timeline = std::fs::read_to_string(&self.out).ok().map(|text| {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}\n{text}", self.out.display()))
        });
        MigrateRun {
            status,
            stdout,
            stderr,
            timeline,
        }
    }
}

/// The namespace, the agents, the image (module docs).
pub struct MigrationRig {
    /// The agents, index = side number.
    pub agents: Vec<AgentSide>,
    /// The bridge and DHCP server.
    pub lan: Lan,
    /// The shared image.
    pub image: PathBuf,
    /// What was set up.
    pub options: RigOptions,
    /// `--max-bandwidth-mib` of the commands made (loopback: fast).
    pub bandwidth_mib: u64,
    vms_started: u32,
    runs: u32,
    /// Files (logs, sockets, image); declared last, removed last.
    pub dir: tempfile::TempDir,
}

impl MigrationRig {
    /// A LAN, a fresh image and two agents (sides 0 and 1).
    pub fn new(options: RigOptions) -> MigrationRig {
        crate::qemu::require_qemu_test_deps();
        crate::qemu::guest();
        let mut dir = tempfile::tempdir().expect("a temporary directory");
        if std::env::var_os("VHOST_TEST_KEEP_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("VHOST_TEST_KEEP_DIR: keeping {}", dir.path().display());
        }
        let lan = Lan::new(dir.path(), 1500, &[GUEST_MAC]);
        let image = dir.path().join("disk.img");
        create_image(&image, IMAGE_SIZE).expect("create the image");
        let mut rig = MigrationRig {
            agents: Vec::new(),
            lan,
            image,
            options,
            bandwidth_mib: 1024,
            vms_started: 0,
            runs: 0,
            dir,
        };
        rig.add_agent("");
        rig.add_agent("");
        rig
    }

    /// Spawn one more agent (its index is returned) whose disk also gets
    /// `blk_extra` (e.g. `,queue-size=64`).
    pub fn add_agent(&mut self, blk_extra: &str) -> usize {
        let index = self.agents.len();
        let side = self.spawn_agent(index, blk_extra);
        self.agents.push(side);
        index
    }

    /// Replace agent `index` (no front-end may be connected to it) by a
    /// fresh one on the same sockets and tap name: a destination that
    /// never served this guest. An agent keeps a device's heavy
    /// configuration (dataplane queues, I/O rings) across front-ends, so
    /// one that was the source before would not show a full one.
    pub fn replace_agent(&mut self, index: usize) {
        let tap = self.agents[index].tap.clone();
        let old = &mut self.agents[index];
        old.agent.signal(libc::SIGTERM);
        if old.agent.wait_timeout(Duration::from_secs(20)).is_none() {
            panic!("agent {index} did not exit on SIGTERM");
        }
        // The tap goes with the agent that created it.
        let gone = (0..200).any(|_| {
            if self.lan.ns.has_link(&tap) {
                std::thread::sleep(Duration::from_millis(10));
                false
            } else {
                true
            }
        });
        assert!(gone, "{tap} outlived its agent");
        let side = self.spawn_agent(index, "");
        self.agents[index] = side;
    }

    fn spawn_agent(&mut self, index: usize, blk_extra: &str) -> AgentSide {
        let dir = self.dir.path();
        let net_socket = dir.join(format!("net-{index}.sock"));
        let blk_socket = dir.join(format!("blk-{index}.sock"));
        let control = dir.join(format!("control-{index}.sock"));
        let log = dir.join(format!("agent-{index}.log"));
        let tap = format!("mtap{index}");
        let mut net = format!(
            "socket={},dataplane=tap:{tap},queue-pairs={},id=net0",
            net_socket.display(),
            self.options.queue_pairs
        );
        if self.options.profile {
            let profile = workspace_root().join("netdev/profiles/vdpa-191ms.json");
            net.push_str(&format!(",profile={}", profile.display()));
        }
        let blk = format!(
            "socket={},image={},id=disk0{}{blk_extra}",
            blk_socket.display(),
            self.image.display(),
            self.options.blk_extra
        );
        let mut prefix = Command::new("ip");
        prefix.args(["netns", "exec", self.lan.ns.name()]);
        // Per-message debug lines would sit on the critical path timed.
        let mut agent = AgentCommand::new()
            .through(prefix)
            .net(net)
            .blk(blk)
            .control(&control)
            .log(&log)
            .rust_log("info")
            .spawn();
        self.lan
            .ns
            .wait_link(&tap, Duration::from_secs(5), &mut agent);
        self.lan.plug(&tap);
        AgentSide {
            agent,
            control,
            net_socket,
            blk_socket,
            log,
            tap,
        }
    }

    /// Start QEMU on agent `side`'s devices: the `net-fio-rounds` guest,
    /// or with `incoming` a destination waiting (`-incoming defer`).
    pub fn spawn_vm(&mut self, side: usize, incoming: bool) -> Vm {
        self.vms_started += 1;
        let name = format!("qemu{}-side{side}", self.vms_started);
        let agent = &self.agents[side];
        let orchestrator_qmp = self.dir.path().join(format!("{name}-orchestrator.sock"));
        let nic =
            Nic::vhost_user(&agent.net_socket, GUEST_MAC).queue_pairs(self.options.queue_pairs);
        let mut config = VmConfig::new("net-fio-rounds")
            .param("vhost_net_peer", Lan::HOST_ADDR)
            .param("vhost_size", ROUND_SIZE)
            .param("vhost_regions", REGIONS)
            .param("vhost_iodepth", 32)
            .param("vhost_stop_wait", 900)
            .nic(nic)
            .disk(VhostUserBlk::new(&agent.blk_socket))
            .with_qmp();
        config.mem_mib = 512;
        config.extra_args.extend([
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", orchestrator_qmp.display()),
        ]);
        if incoming {
            config = config.incoming("defer");
        }
        let config = (self.options.configure)(config);
        let mut qemu = (self.options.launch)(&config, self.dir.path(), &name);
        qemu.add_context_log("udhcpd", &self.lan.dhcp_log);
        for (index, other) in self.agents.iter().enumerate() {
            qemu.add_context_log(&format!("agent {index}"), &other.log);
        }
        let qmp = qemu.qmp();
        Vm {
            qemu,
            qmp,
            orchestrator_qmp,
            name,
        }
    }

    /// Boot the source on agent `side` and wait until the guest has its
    /// address, answered a ping and finished its first fio round; the
    /// guest's address.
    pub fn boot_source(&mut self, side: usize) -> (Vm, Ipv4Addr) {
        let mut vm = self.spawn_vm(side, false);
        vm.qemu.wait_marker(NET_READY_MARKER, READY_TIMEOUT);
        vm.qemu.wait_rounds(1, READY_TIMEOUT);
        (vm, self.lan.guest_addr(GUEST_MAC))
    }

    /// A destination on agent `side`, listening on a free loopback port;
    /// the URI to migrate to.
    pub fn destination(&mut self, side: usize) -> (Vm, String) {
        let mut vm = self.spawn_vm(side, true);
        if let Err(e) = vm.qmp.migrate_incoming("tcp:127.0.0.1:0") {
            panic!("destination: {e}\n{}", vm.qemu.diagnostics());
        }
        let port = vm
            .qmp
            .incoming_tcp_port()
            .unwrap_or_else(|e| panic!("destination: {e}\n{}", vm.qemu.diagnostics()));
        (vm, format!("tcp:127.0.0.1:{port}"))
    }

    /// The `fence` member of agent `side`'s disk0 (`query-devices`).
    pub fn disk_fence(&self, side: usize) -> Value {
        control_execute(&self.agents[side].control, "query-devices", json!({}))
            .unwrap_or_else(|e| panic!("query-devices on agent {side}: {e}"))
            .as_array()
            .and_then(|devices| devices.iter().find(|entry| entry["id"] == "disk0"))
            .unwrap_or_else(|| panic!("agent {side} lists no disk0"))["fence"]
            .clone()
    }

    /// Agent `side`'s disk0 entry of `query-metrics`.
    pub fn disk_metrics(&self, side: usize) -> Value {
        let reply = control_execute(
            &self.agents[side].control,
            "query-metrics",
            json!({ "device": "disk0" }),
        )
        .unwrap_or_else(|e| panic!("query-metrics on agent {side}: {e}"));
        reply
            .get(0)
            .cloned()
            .unwrap_or_else(|| panic!("agent {side}: no metrics for disk0: {reply}"))
    }

    /// `vhost-agent migrate` from `src` (agent `from`) to `dst` (agent
    /// `to`), with `extra` arguments (e.g. `--no-presetup`).
    pub fn migrate_command(
        &self,
        src: &Vm,
        dst: &Vm,
        from: usize,
        to: usize,
        uri: &str,
    ) -> Command {
        let mut cmd = migrate_command(
            src,
            dst,
            &self.agents[from].control,
            &self.agents[to].control,
            uri,
        );
        cmd.args(["--max-bandwidth-mib", &self.bandwidth_mib.to_string()]);
        cmd
    }

    /// Run `cmd` (from [`Self::migrate_command`]) with `--out` into the
    /// rig's directory; what it did.
    pub fn run(&mut self, cmd: Command) -> MigrateRun {
        let mut started = self.start(cmd);
        let status = started
            .child
            .child
            .wait()
            .expect("wait for vhost-agent migrate");
        started.collect(status)
    }

    /// Start `cmd` with `--out`, its stdout and stderr into files of the
    /// rig's directory (read by [`Started::collect`]), so nobody has to
    /// drain pipes while the test watches the migration.
    fn start(&mut self, mut cmd: Command) -> Started {
        self.runs += 1;
        let file = |what: &str| {
            self.dir
                .path()
                .join(format!("migrate-{}.{what}", self.runs))
        };
        let (out, stdout, stderr) = (file("json"), file("stdout"), file("stderr"));
        let create = |path: &Path| {
            std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let child = cmd
            .arg("--out")
            .arg(&out)
            .stdout(create(&stdout))
            .stderr(create(&stderr))
            .spawn()
            .expect("run vhost-agent migrate");
        Started {
            child: ChildGuard {
                child,
                name: "vhost-agent migrate".to_string(),
            },
            out,
            stdout,
            stderr,
        }
    }

    /// Panic unless every agent still runs.
    pub fn assert_agents_alive(&mut self) {
        for (index, side) in self.agents.iter_mut().enumerate() {
            if let Ok(Some(status)) = side.agent.child.try_wait() {
                panic!(
                    "agent {index} exited ({status}):\n{}",
                    crate::qemu::log_tail(&side.log, 40)
                );
            }
        }
    }
}

/// `vhost-agent migrate` from `src` to `dst` with the agents' control
/// sockets `from` and `to` (QEMU's default bandwidth).
pub fn migrate_command(src: &Vm, dst: &Vm, from: &Path, to: &Path, uri: &str) -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.arg("migrate")
        .arg("--source-qmp")
        .arg(&src.orchestrator_qmp)
        .arg("--destination-qmp")
        .arg(&dst.orchestrator_qmp)
        .arg("--source-agent")
        .arg(from)
        .arg("--destination-agent")
        .arg(to)
        .args(["--uri", uri])
        .args(["--timeout-s", &MIGRATE_TIMEOUT_S.to_string()]);
    cmd
}
