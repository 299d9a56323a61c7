//! QEMU harness: build the test guest, boot it against vhost-user-blk and
//! virtio-net back-ends, wait for the verdict line its `/init` prints, and
//! talk QMP.
//!
//! The guest (kernel + initramfs from Debian packages, see
//! `tests/guest/build-guest.sh`) runs the test named by `vhost_test=` on its
//! kernel command line and prints exactly one line
//! `VHOST-AGENT-VERDICT: PASS|FAIL <details>` on its serial console, then
//! powers off. Modes (see `tests/guest/init` for every parameter):
//!
//! - `fio-verify`: fio writes `/dev/vda` with crc32c verify headers and reads
//!   everything back (`vhost_size`, `vhost_bs`, `vhost_iodepth`, `vhost_rw`,
//!   `vhost_numjobs`, `vhost_loops`); details carry `fio_exit=`,
//!   `verify_errors=`, `io_errors=`, `written=`, `read=`;
//! - `fio-write` / `fio-verify-only`: the two halves of `fio-verify`, for
//!   checks across boots (same parameters, same offsets and headers);
//! - `fio-rounds`: rounds of fio write+verify (fresh seed each round, cycling
//!   over `vhost_regions` regions of `vhost_size`) until the host writes the
//!   stop marker ([`write_fio_rounds_stop_marker`]), then every region is
//!   verified again; each round logs a [`ROUND_MARKER`] line, the details
//!   carry `rounds=`, `verified_regions=`, `fio_exit=`, `verify_errors=`,
//!   `io_errors=`. For checks that span something the host does meanwhile,
//!   e.g. a live migration ([`Qmp::migrate_incoming`], [`MigrationStats`]);
//! - `fio-perf`: a time-based fio run, details carry `read_iops=`/`write_iops=`;
//! - `info`: details carry `size=`, `ro=`, `queues=`, `lbs=`, `serial=`;
//! - `shell-exit`: boot and power off (used to probe KVM);
//! - `net`: bring up `eth0` (a [`Nic`]), get an address by DHCP
//!   (`vhost_net_addr=dhcp`, the default) or a static one, ping
//!   `vhost_net_peer`, then `vhost_net_streams` TCP uploads of
//!   `vhost_net_bytes` random bytes to the peer's port `vhost_net_port` and
//!   as many downloads from the next port, stream i pinned to vCPU i; details
//!   carry `addr=`, `addr_source=`, `mtu=`, `rx_queues=`, `tx_queues=`,
//!   `ping_sent=`, `ping_received=`, `upI_bytes=`/`upI_sha256=`,
//!   `downI_bytes=`/`downI_sha256=`, `reasm_reqds=`, `frag_creates=` and
//!   `irq_rxQ=`/`irq_txQ=` (interrupts per virtqueue);
//! - `net-serve`: the same bring-up and one ping, then a
//!   [`NET_READY_MARKER`] line and one TCP connection accepted on
//!   `vhost_net_listen_port`; details carry `recv_bytes=`, `recv_sha256=`.
//!   For checks across a live migration (see `crate::netns` for the host
//!   side: namespace, bridge, DHCP server, TCP ends, pinger).
//!
//! Missing programs make every entry point panic with a message pointing at
//! `scripts/install-test-deps.sh`: these tests never skip silently.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use crate::qemu11::QemuBinary;
use crate::support::{self, ChildGuard};

/// The marker `/init` prints before its verdict.
pub const VERDICT_MARKER: &str = "VHOST-AGENT-VERDICT: ";

/// The marker `/init` prints in `net-serve` mode once the interface has its
/// address and the peer answered a ping, followed by `addr=... port=...`.
pub const NET_READY_MARKER: &str = "VHOST-AGENT-NET-READY: ";

/// The marker `/init` prints, followed by the round number, after each round
/// of the `fio-rounds` mode.
pub const ROUND_MARKER: &str = "VHOST-AGENT-ROUND: ";

/// What the host writes at the start of the disk's last 4 KiB block to end
/// the `fio-rounds` mode's rounds.
pub const FIO_ROUNDS_STOP_MARKER: &[u8; 16] = b"VHOST-AGENT-STOP";

/// Ask a guest in `fio-rounds` mode to stop its rounds and verify: write
/// [`FIO_ROUNDS_STOP_MARKER`] into the last 4 KiB block of the raw `image`
/// (through the host's page cache, which every back-end on this host shares,
/// O_DIRECT or not) and sync it.
pub fn write_fio_rounds_stop_marker(image: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(image)?;
    let len = file.metadata()?.len();
    if len < 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is smaller than one 4 KiB block", image.display()),
        ));
    }
    let mut block = vec![0u8; 4096];
    block[..FIO_ROUNDS_STOP_MARKER.len()].copy_from_slice(FIO_ROUNDS_STOP_MARKER);
    file.write_all_at(&block, (len / 4096 - 1) * 4096)?;
    file.sync_all()
}

/// Programs the QEMU tests need on the host.
pub const REQUIRED_PROGRAMS: &[&str] = &[
    "qemu-system-x86_64",
    "qemu-storage-daemon",
    "busybox",
    "fio",
    "cpio",
    "zstd",
    "depmod",
    "dpkg-deb",
    "apt-get",
];

/// Panic, loudly, if any of `programs` is not on PATH.
pub fn require_programs(programs: &[&str]) {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| !support::have_program(p))
        .collect();
    assert!(
        missing.is_empty(),
        "missing programs for the QEMU tests: {}. Run `sudo scripts/install-test-deps.sh` \
         (from the workspace root) to install them.",
        missing.join(", ")
    );
}

/// Panic unless everything the QEMU tests need (programs and QEMU >= 10) is there.
pub fn require_qemu_test_deps() {
    require_programs(REQUIRED_PROGRAMS);
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("running qemu-system-x86_64 --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    assert!(
        matches!(major, Some(m) if m >= 10),
        "QEMU 10 or newer is needed (found: {}). Run `sudo scripts/install-test-deps.sh`.",
        text.lines().next().unwrap_or("nothing")
    );
}

/// Kernel and initramfs of the test guest.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The kernel image (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`).
    pub initrd: PathBuf,
}

/// Where the guest is built: `VHOST_GUEST_DIR`, or `<target dir>/guest`.
pub fn guest_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VHOST_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| support::workspace_root().join("target"));
    target.join("guest")
}

/// Build the guest (once per process; `build-guest.sh` itself is cached on
/// disk and serialised with a lock, so parallel test processes are fine).
pub fn guest() -> Guest {
    static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
    GUEST
        .get_or_init(build_guest)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn build_guest() -> Result<Guest, String> {
    require_qemu_test_deps();
    let script = support::workspace_root().join("tests/guest/build-guest.sh");
    let dir = guest_dir();
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}):\n{log}\nRun `sudo scripts/install-test-deps.sh` if tools are missing.",
            script.display(),
            dir.display(),
            out.status
        ));
    }
    eprintln!("guest ready in {:.1?}: {}", started.elapsed(), log.trim());
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.img"),
    };
    for f in [&guest.kernel, &guest.initrd] {
        if !f.is_file() {
            return Err(format!(
                "build-guest.sh succeeded but {} is missing",
                f.display()
            ));
        }
    }
    Ok(guest)
}

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation; used only when a probe boot proved it works.
    Kvm,
    /// Emulation (`-accel tcg -cpu max -smp 1,maxcpus=2`).
    Tcg,
}

impl Accel {
    /// The accelerator's arguments; `cpus` overrides the number of vCPUs.
    fn args(self, cpus: Option<u32>) -> Vec<String> {
        let smp = match (self, cpus) {
            (Accel::Kvm, None) => "2".to_string(),
            (Accel::Kvm, Some(n)) => n.to_string(),
            // maxcpus=2 turns on parallel translation, which makes TCG emit
            // host barriers for the guest's locked instructions (see HOST.md).
            (Accel::Tcg, None) => "1,maxcpus=2".to_string(),
            (Accel::Tcg, Some(n)) => format!("{n},maxcpus={}", n.max(2)),
        };
        let cpu: &[&str] = match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
        };
        let mut args: Vec<String> = cpu.iter().map(|s| s.to_string()).collect();
        args.extend(["-smp".to_string(), smp]);
        args
    }
}

/// The accelerator to use, decided once per process.
///
/// `VHOST_TEST_ACCEL=kvm|tcg` forces one. Otherwise KVM is used only if
/// `/dev/kvm` opens, the CPU advertises VMX/SVM, and a probe boot of the
/// guest with KVM prints its verdict within 30 s; else TCG.
pub fn accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| match std::env::var("VHOST_TEST_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        Ok("tcg") => Accel::Tcg,
        _ => {
            if kvm_probe() {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    })
}

fn kvm_probe() -> bool {
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !kvm_opens || !hw_virt {
        return false;
    }
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let config = VmConfig::new("shell-exit");
    let mut vm = match Qemu::spawn_with_accel(&config, dir.path(), Accel::Kvm) {
        Ok(vm) => vm,
        Err(_) => return false,
    };
    let ok = matches!(vm.poll_verdict(Duration::from_secs(30)), Ok(v) if v.passed);
    if !ok {
        eprintln!("KVM probe boot failed; using TCG");
    }
    ok
}

/// One `vhost-user-blk-pci` device.
#[derive(Debug, Clone)]
pub struct VhostUserBlk {
    /// The back-end's unix socket.
    pub socket: PathBuf,
    /// `num-queues=` of the device.
    pub num_queues: u16,
    /// `queue-size=` of the device, if not QEMU's default.
    pub queue_size: Option<u16>,
    /// `reconnect-ms=` on the chardev: QEMU reconnects when the back-end
    /// goes away instead of failing.
    pub reconnect_ms: Option<u32>,
}

impl VhostUserBlk {
    /// A one-queue device on `socket`, no reconnect.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VhostUserBlk {
            socket: socket.into(),
            num_queues: 1,
            queue_size: None,
            reconnect_ms: None,
        }
    }

    /// Set `num-queues`.
    pub fn num_queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    /// Set `queue-size`.
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = Some(n);
        self
    }

    /// Set the chardev's `reconnect-ms`.
    pub fn reconnect_ms(mut self, ms: u32) -> Self {
        self.reconnect_ms = Some(ms);
        self
    }
}

/// Where a [`Nic`]'s frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// `-netdev vhost-user` on a back-end's unix socket (the agent's
    /// `--net socket=...`).
    VhostUser {
        /// The back-end's socket.
        socket: PathBuf,
        /// `reconnect-ms=` on the chardev.
        reconnect_ms: Option<u32>,
    },
    /// QEMU's own `-netdev tap` on the existing tap `ifname` (no vhost-net):
    /// the control that proves the harness without a vhost-user back-end.
    /// QEMU must run in the tap's network namespace ([`VmConfig::netns`]).
    Tap {
        /// The tap interface, created beforehand (multi_queue if `queues > 1`).
        ifname: String,
    },
}

/// One `virtio-net-pci` device; the first is `eth0` in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Where its frames go.
    pub backend: NetBackend,
    /// `mac=` of the device.
    pub mac: String,
    /// Queue pairs: `queues=` of the netdev; above 1 also `mq=on` and
    /// `vectors=2N+2` on the device.
    pub queue_pairs: u16,
    /// `host_mtu=` of the device (VIRTIO_NET_F_MTU), if any.
    pub host_mtu: Option<u32>,
}

impl Nic {
    /// A one-pair NIC with MAC `mac` on `backend`.
    pub fn new(backend: NetBackend, mac: &str) -> Self {
        Nic {
            backend,
            mac: mac.to_string(),
            queue_pairs: 1,
            host_mtu: None,
        }
    }

    /// A one-pair NIC on the vhost-user back-end listening on `socket`.
    pub fn vhost_user(socket: impl Into<PathBuf>, mac: &str) -> Self {
        Self::new(
            NetBackend::VhostUser {
                socket: socket.into(),
                reconnect_ms: None,
            },
            mac,
        )
    }

    /// A one-pair NIC on QEMU's own tap netdev.
    pub fn tap(ifname: &str, mac: &str) -> Self {
        Self::new(
            NetBackend::Tap {
                ifname: ifname.to_string(),
            },
            mac,
        )
    }

    /// Set the number of queue pairs.
    pub fn queue_pairs(mut self, n: u16) -> Self {
        self.queue_pairs = n;
        self
    }

    /// Set `host_mtu`.
    pub fn host_mtu(mut self, mtu: u32) -> Self {
        self.host_mtu = Some(mtu);
        self
    }

    /// The `-chardev` (vhost-user only), `-netdev` and `-device` arguments
    /// of NIC number `i`.
    fn args(&self, i: usize) -> Vec<String> {
        let mut args = Vec::new();
        let mut netdev = match &self.backend {
            NetBackend::VhostUser {
                socket,
                reconnect_ms,
            } => {
                let mut chardev = format!("socket,id=netchar{i},path={}", socket.display());
                if let Some(ms) = reconnect_ms {
                    let _ = write!(chardev, ",reconnect-ms={ms}");
                }
                args.extend(["-chardev".to_string(), chardev]);
                format!("vhost-user,id=net{i},chardev=netchar{i}")
            }
            NetBackend::Tap { ifname } => {
                format!("tap,id=net{i},ifname={ifname},script=no,downscript=no,vhost=off")
            }
        };
        let mut device = format!("virtio-net-pci,id=nic{i},netdev=net{i},mac={}", self.mac);
        if self.queue_pairs > 1 {
            let _ = write!(netdev, ",queues={}", self.queue_pairs);
            // One vector per virtqueue, one for the control queue, one for
            // config changes.
            let _ = write!(
                device,
                ",mq=on,vectors={}",
                2 * u32::from(self.queue_pairs) + 2
            );
        }
        if let Some(mtu) = self.host_mtu {
            let _ = write!(device, ",host_mtu={mtu}");
        }
        args.extend(["-netdev".to_string(), netdev, "-device".to_string(), device]);
        args
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The guest test mode (`vhost_test=`).
    pub test: String,
    /// More `key=value` words for the kernel command line (e.g.
    /// `("vhost_size", "32M")`).
    pub params: Vec<(String, String)>,
    /// vhost-user-blk devices; the first is `/dev/vda` in the guest.
    pub disks: Vec<VhostUserBlk>,
    /// virtio-net devices; the first is `eth0` in the guest.
    pub nics: Vec<Nic>,
    /// vCPUs, if not the accelerator's default (1 under TCG, 2 under KVM).
    pub cpus: Option<u32>,
    /// Run QEMU inside this network namespace (`ip netns exec NAME`), as
    /// [`NetBackend::Tap`] needs.
    pub netns: Option<String>,
    /// Guest RAM in MiB (memfd-backed, shared with the back-ends).
    pub mem_mib: u32,
    /// Add a QMP socket (`Qemu::qmp`).
    pub qmp: bool,
    /// `-incoming URI` (a migration destination), e.g. `tcp:127.0.0.1:4444`.
    pub incoming: Option<String>,
    /// Extra raw QEMU arguments.
    pub extra_args: Vec<String>,
    /// Which QEMU runs it: the host's QEMU 10 (default) or QEMU 11.1 from
    /// the trixie tree (`crate::qemu11`).
    pub qemu: QemuBinary,
}

impl VmConfig {
    /// A VM running `test` with 1 GiB of RAM, no disks, no QMP.
    pub fn new(test: &str) -> Self {
        VmConfig {
            test: test.to_string(),
            params: Vec::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            cpus: None,
            netns: None,
            mem_mib: 1024,
            qmp: false,
            incoming: None,
            extra_args: Vec::new(),
            qemu: QemuBinary::Host,
        }
    }

    /// Run it on `qemu` (e.g. [`QemuBinary::Trixie`] for QEMU 11.1).
    pub fn qemu(mut self, qemu: QemuBinary) -> Self {
        self.qemu = qemu;
        self
    }

    /// Add a kernel command-line parameter.
    pub fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push((key.to_string(), value.to_string()));
        self
    }

    /// Add a vhost-user-blk device.
    pub fn disk(mut self, disk: VhostUserBlk) -> Self {
        self.disks.push(disk);
        self
    }

    /// Add a virtio-net device.
    pub fn nic(mut self, nic: Nic) -> Self {
        self.nics.push(nic);
        self
    }

    /// Set the number of vCPUs.
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = Some(n);
        self
    }

    /// Run QEMU inside the network namespace `name`.
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

    /// Ask for a QMP socket.
    pub fn with_qmp(mut self) -> Self {
        self.qmp = true;
        self
    }

    /// Make this VM a migration destination listening on `uri`.
    pub fn incoming(mut self, uri: &str) -> Self {
        self.incoming = Some(uri.to_string());
        self
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut s = format!("console=ttyS0 panic=-1 vhost_test={}", self.test);
        for (k, v) in &self.params {
            let _ = write!(s, " {k}={v}");
        }
        s
    }
}

/// The verdict line the guest printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// PASS (true) or FAIL (false).
    pub passed: bool,
    /// Everything after PASS/FAIL.
    pub details: String,
}

impl Verdict {
    /// Value of `key=value` in the details, if present.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.details
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    fn parse(line: &str) -> Option<Verdict> {
        let rest = &line[line.find(VERDICT_MARKER)? + VERDICT_MARKER.len()..];
        let rest = rest.trim_end();
        let (word, details) = rest.split_once(' ').unwrap_or((rest, ""));
        let passed = match word {
            "PASS" => true,
            "FAIL" => false,
            _ => return None,
        };
        Some(Verdict {
            passed,
            details: details.to_string(),
        })
    }
}

/// A running QEMU, killed when dropped.
pub struct Qemu {
    /// The QEMU process.
    pub process: ChildGuard,
    /// The guest's serial console (`-serial file:`).
    pub serial_log: PathBuf,
    /// QEMU's own stdout + stderr.
    pub stderr_log: PathBuf,
    /// The QMP socket, if the config asked for one.
    pub qmp_socket: Option<PathBuf>,
    /// The full command line, for messages.
    pub command_line: String,
    context_logs: Vec<(String, PathBuf)>,
    started: Instant,
}

/// Last `max_lines` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let skip = lines.len().saturating_sub(max_lines);
            let mut out = String::new();
            if skip > 0 {
                let _ = writeln!(out, "[... {skip} earlier lines ...]");
            }
            for l in &lines[skip..] {
                let _ = writeln!(out, "{l}");
            }
            out
        }
        Err(e) => format!("[cannot read {}: {e}]\n", path.display()),
    }
}

impl Qemu {
    /// Boot `config` with files (serial log, QMP socket, QEMU's stderr) in
    /// `dir`, with the accelerator from [`accel`]. Panics if QEMU cannot start.
    pub fn spawn(config: &VmConfig, dir: &Path) -> Qemu {
        Self::spawn_named(config, dir, "qemu")
    }

    /// Like [`Qemu::spawn`], with file names prefixed by `name` (for several
    /// VMs sharing one directory, e.g. migration source and destination).
    pub fn spawn_named(config: &VmConfig, dir: &Path, name: &str) -> Qemu {
        let accel = accel();
        Self::spawn_inner(config, dir, name, accel).unwrap_or_else(|e| panic!("{e}"))
    }

    fn spawn_with_accel(config: &VmConfig, dir: &Path, accel: Accel) -> Result<Qemu, String> {
        Self::spawn_inner(config, dir, "qemu-probe", accel)
    }

    fn spawn_inner(
        config: &VmConfig,
        dir: &Path,
        name: &str,
        accel: Accel,
    ) -> Result<Qemu, String> {
        require_qemu_test_deps();
        let guest = guest();
        let serial_log = dir.join(format!("{name}-serial.log"));
        let stderr_log = dir.join(format!("{name}-stderr.log"));
        let qmp_socket = config.qmp.then(|| dir.join(format!("{name}-qmp.sock")));

        let mut args: Vec<String> = accel.args(config.cpus);
        let mem = config.mem_mib;
        args.extend([
            "-m".to_string(),
            format!("{mem}M"),
            "-object".to_string(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-numa".to_string(),
            "node,memdev=mem".to_string(),
            "-kernel".to_string(),
            guest.kernel.display().to_string(),
            "-initrd".to_string(),
            guest.initrd.display().to_string(),
            "-append".to_string(),
            config.kernel_cmdline(),
            "-serial".to_string(),
            format!("file:{}", serial_log.display()),
            "-no-reboot".to_string(),
            "-display".to_string(),
            "none".to_string(),
            "-nodefaults".to_string(),
        ]);
        for (i, disk) in config.disks.iter().enumerate() {
            let mut chardev = format!("socket,id=char{i},path={}", disk.socket.display());
            if let Some(ms) = disk.reconnect_ms {
                let _ = write!(chardev, ",reconnect-ms={ms}");
            }
            let mut device = format!(
                "vhost-user-blk-pci,id=blk{i},chardev=char{i},num-queues={}",
                disk.num_queues
            );
            if let Some(qs) = disk.queue_size {
                let _ = write!(device, ",queue-size={qs}");
            }
            args.extend([
                "-chardev".to_string(),
                chardev,
                "-device".to_string(),
                device,
            ]);
        }
        for (i, nic) in config.nics.iter().enumerate() {
            args.extend(nic.args(i));
        }
        if let Some(qmp) = &qmp_socket {
            args.push("-qmp".to_string());
            args.push(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        if let Some(uri) = &config.incoming {
            args.push("-incoming".to_string());
            args.push(uri.clone());
        }
        args.extend(config.extra_args.iter().cloned());

        // QEMU 11.1 runs through the trixie tree's loader, whose own
        // arguments come first.
        let (qemu, env) = match config.qemu {
            QemuBinary::Host => ("qemu-system-x86_64".to_string(), Vec::new()),
            QemuBinary::Trixie => {
                let (loader, prefix, env) = crate::qemu11::require().invocation();
                let prefix = prefix.iter().map(|a| a.to_string_lossy().into_owned());
                args.splice(0..0, prefix);
                (loader.display().to_string(), env)
            }
        };
        // `ip netns exec` enters the namespace and execs QEMU: same pid.
        let (program, args) = match &config.netns {
            Some(ns) => {
                let mut wrapped: Vec<String> = ["netns", "exec", ns, qemu.as_str()]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                wrapped.extend(args);
                ("ip".to_string(), wrapped)
            }
            None => (qemu, args),
        };
        let command_line = format!(
            "{program} {}",
            args.iter()
                .map(|a| if a.contains(' ') {
                    format!("'{a}'")
                } else {
                    a.clone()
                })
                .collect::<Vec<_>>()
                .join(" ")
        );
        let stderr = std::fs::File::create(&stderr_log)
            .map_err(|e| format!("creating {}: {e}", stderr_log.display()))?;
        let stdout = stderr
            .try_clone()
            .map_err(|e| format!("dup of the QEMU log file: {e}"))?;
        let child = Command::new(&program)
            .args(&args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                format!("spawning {command_line}: {e}. Run `sudo scripts/install-test-deps.sh`.")
            })?;
        eprintln!("{name}: {command_line}");
        Ok(Qemu {
            process: ChildGuard {
                child,
                name: name.to_string(),
            },
            serial_log,
            stderr_log,
            qmp_socket,
            command_line,
            context_logs: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Include the tail of `path` (e.g. the back-end's log) in every failure
    /// message from this VM.
    pub fn add_context_log(&mut self, name: &str, path: &Path) {
        self.context_logs
            .push((name.to_string(), path.to_path_buf()));
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// A report for failure messages: command line, serial tail, QEMU's
    /// stderr, and the context logs.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "command: {}", self.command_line);
        let _ = writeln!(s, "elapsed: {:.1?}", self.started.elapsed());
        let _ = writeln!(
            s,
            "----- guest serial ({}) -----",
            self.serial_log.display()
        );
        s.push_str(&log_tail(&self.serial_log, 150));
        let _ = writeln!(s, "----- QEMU stderr ({}) -----", self.stderr_log.display());
        s.push_str(&log_tail(&self.stderr_log, 50));
        for (name, path) in &self.context_logs {
            let _ = writeln!(s, "----- {name} ({}) -----", path.display());
            s.push_str(&log_tail(path, 80));
        }
        s
    }

    /// The verdict, if the guest printed it already.
    pub fn verdict(&self) -> Option<Verdict> {
        let serial = self.serial();
        // Only complete lines: the file may be caught mid-write.
        let complete = match serial.rfind('\n') {
            Some(end) => &serial[..end],
            None => "",
        };
        complete.lines().find_map(Verdict::parse)
    }

    /// The round numbers of the [`ROUND_MARKER`] lines (`fio-rounds` mode)
    /// on the serial console so far, in order.
    pub fn rounds(&self) -> Vec<u64> {
        let serial = self.serial();
        let complete = match serial.rfind('\n') {
            Some(end) => &serial[..end],
            None => "",
        };
        complete
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find(ROUND_MARKER)? + ROUND_MARKER.len()..];
                rest.split_whitespace().next()?.parse().ok()
            })
            .collect()
    }

    /// Wait until the serial console shows at least `count` round markers
    /// (`fio-rounds` mode) and return their numbers. Panics with
    /// [`Qemu::diagnostics`] if QEMU exits, the guest prints its verdict
    /// (a failed round ends the mode) or `timeout` passes first.
    pub fn wait_rounds(&mut self, count: usize, timeout: Duration) -> Vec<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let rounds = self.rounds();
            if rounds.len() >= count {
                return rounds;
            }
            let reason = if let Some(v) = self.verdict() {
                Some(format!(
                    "the guest printed its verdict ({} {}) before {count} rounds",
                    if v.passed { "PASS" } else { "FAIL" },
                    v.details
                ))
            } else if let Ok(Some(status)) = self.process.child.try_wait() {
                Some(format!("QEMU exited ({status}) before {count} rounds"))
            } else if Instant::now() >= deadline {
                Some(format!(
                    "{} of {count} rounds within {timeout:?}",
                    rounds.len()
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                self.process.signal(libc::SIGKILL);
                let _ = self.process.wait_timeout(Duration::from_secs(5));
                panic!("{reason}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until the serial console has a complete line containing
    /// `marker` (e.g. [`NET_READY_MARKER`]) and return what follows the
    /// marker on it. Panics with [`Qemu::diagnostics`] (killing QEMU) if the
    /// guest prints its verdict or QEMU exits first, or after `timeout`.
    pub fn wait_marker(&mut self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            let complete = match serial.rfind('\n') {
                Some(end) => &serial[..end],
                None => "",
            };
            if let Some(rest) = complete
                .lines()
                .find_map(|l| Some(l[l.find(marker)? + marker.len()..].trim_end()))
            {
                return rest.to_string();
            }
            let reason = if let Some(v) = self.verdict() {
                Some(format!(
                    "the guest printed its verdict ({} {}) before {marker:?}",
                    if v.passed { "PASS" } else { "FAIL" },
                    v.details
                ))
            } else if let Ok(Some(status)) = self.process.child.try_wait() {
                Some(format!("QEMU exited ({status}) before {marker:?}"))
            } else if Instant::now() >= deadline {
                Some(format!("no {marker:?} within {timeout:?}"))
            } else {
                None
            };
            if let Some(reason) = reason {
                self.process.signal(libc::SIGKILL);
                let _ = self.process.wait_timeout(Duration::from_secs(5));
                panic!("{reason}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the verdict up to `timeout`; Err with a reason when QEMU
    /// exited first or time ran out (QEMU is left running then).
    pub fn poll_verdict(&mut self, timeout: Duration) -> Result<Verdict, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.verdict() {
                return Ok(v);
            }
            if let Ok(Some(status)) = self.process.child.try_wait() {
                // The log may have been completed just before the exit.
                return self
                    .verdict()
                    .ok_or_else(|| format!("QEMU exited ({status}) without a verdict"));
            }
            if Instant::now() >= deadline {
                return Err(format!("no verdict within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait for the verdict; panics with [`Qemu::diagnostics`] if there is
    /// none within `timeout` (killing QEMU first).
    pub fn wait_verdict(&mut self, timeout: Duration) -> Verdict {
        match self.poll_verdict(timeout) {
            Ok(v) => v,
            Err(reason) => {
                self.process.signal(libc::SIGKILL);
                let _ = self.process.wait_timeout(Duration::from_secs(5));
                panic!("{reason}\n{}", self.diagnostics());
            }
        }
    }

    /// Wait for a PASS verdict, then for QEMU to power off and exit 0.
    /// Panics with diagnostics otherwise.
    pub fn expect_pass(&mut self, timeout: Duration) -> Verdict {
        let verdict = self.wait_verdict(timeout);
        if !verdict.passed {
            panic!(
                "guest verdict: FAIL {}\n{}",
                verdict.details,
                self.diagnostics()
            );
        }
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "QEMU exited with {status} after the verdict\n{}",
            self.diagnostics()
        );
        verdict
    }

    /// Wait for QEMU to exit; panics with diagnostics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.process.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "QEMU did not exit within {timeout:?}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Connect to this VM's QMP socket (the config must have asked for one).
    pub fn qmp(&mut self) -> Qmp {
        let path = self
            .qmp_socket
            .clone()
            .unwrap_or_else(|| panic!("this VM has no QMP socket (VmConfig::with_qmp)"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Qmp::connect(&path) {
                Ok(qmp) => return qmp,
                Err(e) => {
                    if let Ok(Some(status)) = self.process.child.try_wait() {
                        panic!(
                            "QEMU exited ({status}) before QMP was up\n{}",
                            self.diagnostics()
                        );
                    }
                    if Instant::now() >= deadline {
                        panic!(
                            "QMP connect to {}: {e}\n{}",
                            path.display(),
                            self.diagnostics()
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A QMP client (one connection, capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connect to `path`, read the greeting and enter command mode.
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        let stream = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("dup: {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".to_string());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: bad JSON {line:?}: {e}"))
    }

    /// Run `command` with `arguments` (`json!({})` for none); returns the
    /// `return` value, or Err with QEMU's error description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(format!(
                    "{command}: {}",
                    err["desc"].as_str().unwrap_or("unknown error")
                ));
            }
            return Err(format!("{command}: unexpected QMP reply {reply}"));
        }
    }

    /// `execute`, panicking with the error.
    pub fn cmd(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments)
            .unwrap_or_else(|e| panic!("QMP {e}"))
    }

    /// `query-status` → the run state (`running`, `paused`, `inmigrate`, ...).
    pub fn status(&mut self) -> String {
        self.cmd("query-status", json!({}))["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Poll `query-status` until the run state is `status` (e.g. `running`
    /// on a migration destination), up to `timeout`; Err with the last state.
    pub fn wait_status(&mut self, status: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.status();
            if now == status {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "run state still {now:?}, not {status:?}, after {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start a migration to `uri` (e.g. `tcp:127.0.0.1:4444`).
    pub fn migrate(&mut self, uri: &str) {
        self.cmd("migrate", json!({ "uri": uri }));
    }

    /// On a destination started with `-incoming defer`
    /// ([`VmConfig::incoming`]): listen on `uri` (`migrate-incoming`);
    /// Err with QEMU's error. `tcp:127.0.0.1:0` picks a free port: see
    /// [`Qmp::incoming_tcp_port`].
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), String> {
        self.execute("migrate-incoming", json!({ "uri": uri }))
            .map(|_| ())
    }

    /// The TCP port a listening destination accepts the migration on
    /// (`socket-address` of `query-migrate`), e.g. after
    /// `migrate_incoming("tcp:127.0.0.1:0")`.
    pub fn incoming_tcp_port(&mut self) -> Result<u16, String> {
        let info = self.query_migrate();
        info["socket-address"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|a| a["port"].as_str()?.parse().ok())
            .ok_or_else(|| format!("no TCP port in query-migrate: {info}"))
    }

    /// `migrate-set-parameters` with `params` (e.g.
    /// `json!({"max-bandwidth": 1u64 << 30})`).
    pub fn migrate_set_parameters(&mut self, params: Value) {
        self.cmd("migrate-set-parameters", params);
    }

    /// `quit`: QEMU exits (the reply may or may not arrive first).
    pub fn quit(&mut self) {
        let _ = self.execute("quit", json!({}));
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Value {
        self.cmd("query-migrate", json!({}))
    }

    /// Poll `query-migrate` until the status is `completed` (returned) or
    /// `failed`/`cancelled` (Err), up to `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate();
            match info["status"].as_str() {
                Some("completed") => return Ok(info),
                Some("failed") | Some("cancelled") => {
                    return Err(format!("migration ended: {info}"))
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "migration not completed within {timeout:?}: {info}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Live-migrate the guest of `src` into `dst`, a QEMU started with
/// `-incoming defer` ([`VmConfig::incoming`]) and the same machine: listen
/// on a free loopback port on the destination, lift the bandwidth cap,
/// `migrate`, poll the source's `query-migrate` until completed (up to
/// `timeout`), then wait for the destination to run and check that the
/// source is in `postmigrate`. Returns the source's figures; Err with the
/// state of both sides. Both QEMUs must share a network namespace (their
/// loopback carries the migration stream).
pub fn live_migrate(
    src: &mut Qmp,
    dst: &mut Qmp,
    timeout: Duration,
) -> Result<MigrationStats, String> {
    dst.migrate_incoming("tcp:127.0.0.1:0")
        .map_err(|e| format!("destination: {e}"))?;
    let port = dst
        .incoming_tcp_port()
        .map_err(|e| format!("destination: {e}"))?;
    // Loopback: don't let the default 128 MiB/s cap stretch the run.
    src.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 1u64 << 30 }),
    )
    .map_err(|e| format!("source: {e}"))?;
    src.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))
        .map_err(|e| format!("source: {e}"))?;
    let info = src.wait_migration(timeout).map_err(|e| {
        let dst_state = dst.execute("query-migrate", json!({}));
        format!("source: {e}\ndestination query-migrate: {dst_state:?}")
    })?;
    let stats = MigrationStats::from_query(&info)?;
    dst.wait_status("running", Duration::from_secs(30))
        .map_err(|e| format!("destination after the migration: {e}"))?;
    let src_state = src.status();
    if src_state != "postmigrate" {
        return Err(format!(
            "source run state after the migration: {src_state:?}, not postmigrate"
        ));
    }
    Ok(stats)
}

/// Figures of a completed migration, from the source's `query-migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationStats {
    /// `downtime`: how long the guest was stopped, in ms.
    pub downtime_ms: u64,
    /// `total-time`: from `migrate` to completion, in ms.
    pub total_time_ms: u64,
    /// `setup-time`, in ms.
    pub setup_time_ms: u64,
    /// `ram.transferred`, in bytes.
    pub ram_transferred: u64,
    /// `ram.dirty-sync-count`: passes over guest memory.
    pub dirty_sync_count: u64,
}

impl MigrationStats {
    /// Parse a `query-migrate` reply with status `completed`.
    pub fn from_query(info: &Value) -> Result<MigrationStats, String> {
        let num = |v: &Value, what: &str| {
            v.as_u64()
                .ok_or_else(|| format!("query-migrate has no {what}: {info}"))
        };
        Ok(MigrationStats {
            downtime_ms: num(&info["downtime"], "downtime")?,
            total_time_ms: num(&info["total-time"], "total-time")?,
            setup_time_ms: info["setup-time"].as_u64().unwrap_or(0),
            ram_transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
            dirty_sync_count: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        })
    }
}

impl std::fmt::Display for MigrationStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "downtime {} ms, total {} ms (setup {} ms), {:.1} MiB of RAM in {} passes",
            self.downtime_ms,
            self.total_time_ms,
            self.setup_time_ms,
            self.ram_transferred as f64 / (1u64 << 20) as f64,
            self.dirty_sync_count
        )
    }
}

/// Options for [`spawn_qemu_storage_daemon`].
#[derive(Debug, Clone)]
pub struct QsdOptions {
    /// `writable=on` on the export.
    pub writable: bool,
    /// `num-queues=` of the export.
    pub num_queues: u16,
    /// `locking=off` on the file node (two daemons on one image, migration).
    pub locking_off: bool,
    /// `cache.direct=on` (O_DIRECT) on the file node.
    pub direct: bool,
    /// `aio=` of the file node (`threads`, `native`, `io_uring`); None keeps
    /// qemu-storage-daemon's default.
    pub aio: Option<&'static str>,
}

impl Default for QsdOptions {
    fn default() -> Self {
        QsdOptions {
            writable: true,
            num_queues: 1,
            locking_off: false,
            direct: false,
            aio: None,
        }
    }
}

/// Spawn `qemu-storage-daemon` exporting raw `image` as vhost-user-blk on
/// `socket`, stderr to `log`, and wait until the socket exists.
pub fn spawn_qemu_storage_daemon(
    image: &Path,
    socket: &Path,
    opts: &QsdOptions,
    log: &Path,
) -> ChildGuard {
    require_programs(&["qemu-storage-daemon"]);
    let mut blockdev = format!("driver=file,node-name=file0,filename={}", image.display());
    if opts.locking_off {
        blockdev.push_str(",locking=off");
    }
    if opts.direct {
        blockdev.push_str(",cache.direct=on");
    }
    if let Some(aio) = opts.aio {
        blockdev.push_str(&format!(",aio={aio}"));
    }
    let export = format!(
        "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable={},num-queues={}",
        socket.display(),
        if opts.writable { "on" } else { "off" },
        opts.num_queues
    );
    let file =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let stdout = file
        .try_clone()
        .expect("dup of the qemu-storage-daemon log file");
    let child = Command::new("qemu-storage-daemon")
        .args(["--blockdev", &blockdev, "--export", &export])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("spawn qemu-storage-daemon: {e}. Run `sudo scripts/install-test-deps.sh`.")
        });
    let mut guard = ChildGuard {
        child,
        name: "qemu-storage-daemon".to_string(),
    };
    support::wait_for_path(socket, Duration::from_secs(20), &mut guard);
    guard
}

/// Count the `block`-sized blocks in the first `len` bytes of `image` that
/// are all zero (a guest that really wrote there leaves none).
pub fn count_zero_blocks(image: &Path, len: u64, block: usize) -> std::io::Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(image)?;
    let mut buf = vec![0u8; block];
    let mut zero = 0;
    let mut done = 0u64;
    while done < len {
        f.read_exact(&mut buf)?;
        if buf.iter().all(|&b| b == 0) {
            zero += 1;
        }
        done += block as u64;
    }
    Ok(zero)
}

/// Corrupt `image` behind the guest's back: invert the byte at `offset` and
/// sync, for tests proving that the guest's verification catches it.
pub fn flip_image_byte(image: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .expect("open the image");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset)
        .expect("read the image");
    byte[0] ^= 0xff;
    file.write_all_at(&byte, offset).expect("corrupt the image");
    file.sync_all().expect("sync the image");
}
