//! The host side of the net tests: a private network namespace per test,
//! with a bridge, a DHCP server (busybox `udhcpd`) and the processes that
//! must live in it (the agent, whose `tap:` dataplane creates its tap in its
//! own namespace; QEMU with its own tap netdev, the control).
//!
//! Nothing leaves the machine: every link is created inside the namespace,
//! and deleting the namespace (on drop, also when the test panics) takes
//! the bridge and the taps with it. Namespaces of test processes that died
//! without cleaning up are deleted by the next [`Netns::new`].
//!
//! The subnet is fixed ([`Lan::HOST_ADDR`]/24): each test has a namespace of
//! its own, so tests running in parallel never share it.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::qemu;
use crate::support::ChildGuard;

/// Programs the net tests need on the host, besides QEMU's.
pub const NET_REQUIRED_PROGRAMS: &[&str] = &["ip", "busybox", "sha256sum"];

/// Prefix of the namespaces these tests create: `vhat-PID-N`.
const NETNS_PREFIX: &str = "vhat-";

/// Where `ip netns` keeps its namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Panic, loudly, unless the host can run the net tests: the programs, the
/// tun device and root (`ip netns add`).
pub fn require_net_test_deps() {
    qemu::require_programs(NET_REQUIRED_PROGRAMS);
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: the net tests need the tun driver (modprobe tun)"
    );
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the net tests create network namespaces, bridges and taps: run them as root"
    );
}

/// Run `program args`, Ok(stdout) or Err(a message with stderr).
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("running {program}: {e}. Run `sudo scripts/install-test-deps.sh` (iproute2).")
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Delete namespaces left behind by test processes that no longer exist.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            if let Err(e) = run("ip", &["netns", "del", &name]) {
                eprintln!("removing stale namespace {name}: {e}");
            }
        }
    }
}

/// A network namespace of this test, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create a uniquely named namespace with `lo` up.
    pub fn new() -> Netns {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        require_net_test_deps();
        remove_stale_namespaces();
        let name = format!(
            "{NETNS_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]).unwrap_or_else(|e| panic!("{e}"));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (for `ip netns exec`, [`qemu::VmConfig::in_netns`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args...`: Ok(stdout) or Err with stderr.
    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip -n NAME args...`, panicking on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A command running `program` inside the namespace (`ip netns exec`,
    /// which execs it: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Spawn `cmd` (from [`Netns::command`]) with stdout and stderr to `log`.
    pub fn spawn(&self, name: &str, mut cmd: Command, log: &Path) -> ChildGuard {
        let file = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let stdout = file.try_clone().expect("dup of a log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} in {}: {e}", self.name));
        ChildGuard {
            child,
            name: name.to_string(),
        }
    }

    /// Create the tap `name` (multi_queue when `queue_pairs > 1`, as QEMU's
    /// tap netdev with `queues=N` wants it) with `mtu`, and bring it up.
    pub fn add_tap(&self, name: &str, queue_pairs: u16, mtu: u32) {
        let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        if queue_pairs > 1 {
            args.push("multi_queue");
        }
        self.ip(&args);
        self.ip(&["link", "set", name, "mtu", &mtu.to_string(), "up"]);
    }

    /// Is there a link `name` in the namespace?
    pub fn has_link(&self, name: &str) -> bool {
        self.try_ip(&["-o", "link", "show", "dev", name]).is_ok()
    }

    /// Wait until link `name` exists (e.g. the tap `owner` creates); panics
    /// if `owner` exits first or after `timeout`.
    pub fn wait_link(&self, name: &str, timeout: Duration, owner: &mut ChildGuard) {
        let deadline = Instant::now() + timeout;
        while !self.has_link(name) {
            if let Ok(Some(status)) = owner.child.try_wait() {
                panic!(
                    "{} exited ({status}) before link {name} appeared in {}",
                    owner.name, self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "link {name} did not appear in {} within {timeout:?} ({} is running)",
                self.name,
                owner.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The MTU of link `name`.
    pub fn mtu(&self, name: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", "dev", name]);
        out.split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no mtu in `ip link show {name}`: {out}"))
    }

    /// Is link `name` administratively up?
    pub fn is_up(&self, name: &str) -> bool {
        let out = self.ip(&["-o", "link", "show", "dev", name]);
        // The flags: `<BROADCAST,MULTICAST,UP,LOWER_UP>`.
        out.split(['<', '>'])
            .nth(1)
            .is_some_and(|flags| flags.split(',').any(|f| f == "UP"))
    }

    /// Run `f` on a thread that has entered the namespace, and return its
    /// result. Sockets `f` creates belong to the namespace for their whole
    /// life, whichever thread uses them afterwards.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new(NETNS_RUN_DIR).join(&self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path)
                        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                    // SAFETY: setns(2) on an fd we just opened and keep open
                    // for the call; it changes only this thread's network
                    // namespace (a per-thread attribute) and no memory.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(
                        rc,
                        0,
                        "setns into {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                    f()
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Spawn `vhost-agent serve` inside the namespace with the given
    /// `--net` specs (each like `socket=PATH,dataplane=tap:IF`) and extra
    /// arguments, stderr to `log`, and wait until every socket exists.
    /// `RUST_LOG` defaults to `debug` (one line per vhost-user message), for
    /// the evidence a failure needs, with the control API at `info` (tests
    /// that poll it would otherwise push that evidence out of the log's
    /// tail).
    pub fn spawn_agent(&self, net_specs: &[String], extra_args: &[&str], log: &Path) -> ChildGuard {
        let mut prefix = Command::new("ip");
        prefix.args(["netns", "exec", &self.name]);
        let mut agent = crate::agent::AgentCommand::new()
            .through(prefix)
            .args(extra_args.iter().copied())
            .log(log)
            .rust_log("debug,vhost_agent::control=info");
        for spec in net_specs {
            agent = agent.net(spec.as_str());
        }
        agent.spawn()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive until they exit;
        // their guards kill them.
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("deleting namespace {}: {e}", self.name);
        }
    }
}

/// A namespace with a bridge the host side talks on and a DHCP server that
/// gives each known guest MAC a fixed address.
pub struct Lan {
    /// udhcpd; declared before `ns`, so it is killed before the namespace
    /// is deleted (fields drop in declaration order).
    dhcp: ChildGuard,
    /// udhcpd's log.
    pub dhcp_log: PathBuf,
    /// The MTU of the bridge (and of taps created for it).
    pub mtu: u32,
    /// The guests' MACs; guest i gets `10.77.0.(10 + i)`.
    macs: Vec<String>,
    /// The namespace; public for spawning and `ip` commands.
    pub ns: Netns,
}

impl Lan {
    /// The bridge.
    pub const BRIDGE: &'static str = "br0";
    /// The bridge's address: the host side of every test.
    pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    /// Prefix length of the subnet.
    pub const PREFIX_LEN: u8 = 24;

    /// A new namespace with bridge [`Lan::BRIDGE`] at [`Lan::HOST_ADDR`]
    /// with `mtu`, and `udhcpd` on it (config, leases and log in `dir`)
    /// leasing `10.77.0.(10 + i)` to `guest_macs[i]`.
    pub fn new(dir: &Path, mtu: u32, guest_macs: &[&str]) -> Lan {
        let ns = Netns::new();
        let br = Self::BRIDGE;
        ns.ip(&["link", "add", br, "type", "bridge"]);
        // Set explicitly, the bridge keeps this MTU whatever its ports have.
        ns.ip(&["link", "set", br, "mtu", &mtu.to_string()]);
        let cidr = format!("{}/{}", Self::HOST_ADDR, Self::PREFIX_LEN);
        ns.ip(&["addr", "add", &cidr, "dev", br]);
        ns.ip(&["link", "set", br, "up"]);

        let macs: Vec<String> = guest_macs.iter().map(|m| m.to_string()).collect();
        let conf = dir.join("udhcpd.conf");
        let leases = dir.join("udhcpd.leases");
        File::create(&leases).expect("create the udhcpd lease file");
        let mut text = format!(
            "interface {br}\nstart 10.77.0.100\nend 10.77.0.199\n\
             lease_file {}\npidfile {}\noption subnet 255.255.255.0\noption lease 86400\n",
            leases.display(),
            dir.join("udhcpd.pid").display()
        );
        for (i, mac) in macs.iter().enumerate() {
            text.push_str(&format!("static_lease {mac} {}\n", Self::guest_addr_of(i)));
        }
        std::fs::write(&conf, text).expect("write udhcpd.conf");
        let dhcp_log = dir.join("udhcpd.log");
        let mut cmd = ns.command("busybox");
        cmd.arg("udhcpd").arg("-f").arg(&conf);
        // A bad config makes udhcpd exit at once: [`Lan::assert_dhcp_alive`]
        // reports it with the log.
        let dhcp = ns.spawn("udhcpd", cmd, &dhcp_log);
        Lan {
            dhcp,
            dhcp_log,
            mtu,
            macs,
            ns,
        }
    }

    fn guest_addr_of(i: usize) -> Ipv4Addr {
        let last = u8::try_from(10 + i).expect("fewer than 246 guests");
        Ipv4Addr::new(10, 77, 0, last)
    }

    /// The address udhcpd leases to `mac` (one of the `guest_macs`).
    pub fn guest_addr(&self, mac: &str) -> Ipv4Addr {
        let i = self
            .macs
            .iter()
            .position(|m| m.eq_ignore_ascii_case(mac))
            .unwrap_or_else(|| panic!("{mac} is not one of the LAN's guests {:?}", self.macs));
        Self::guest_addr_of(i)
    }

    /// Create a tap for QEMU's own tap netdev (the control), with the
    /// LAN's MTU, and plug it into the bridge.
    pub fn add_tap(&self, name: &str, queue_pairs: u16) {
        self.ns.add_tap(name, queue_pairs, self.mtu);
        self.plug(name);
    }

    /// Make `link` a port of the bridge, then check that the port and the
    /// bridge are up with the LAN's MTU. Does not change the link's MTU or
    /// state: a back-end that creates its tap must set them itself.
    pub fn plug(&self, link: &str) {
        self.ns.ip(&["link", "set", link, "master", Self::BRIDGE]);
        let mtu = self.ns.mtu(link);
        assert_eq!(
            mtu,
            self.mtu,
            "{link} has MTU {mtu}, the LAN {}\n{}",
            self.mtu,
            self.ns.ip(&["link", "show"])
        );
        assert!(
            self.ns.is_up(link),
            "{link} is not up\n{}",
            self.ns.ip(&["link", "show"])
        );
        let bridge_mtu = self.ns.mtu(Self::BRIDGE);
        assert_eq!(
            bridge_mtu, self.mtu,
            "the bridge's MTU after plugging {link}"
        );
    }

    /// Panic unless udhcpd still runs.
    pub fn assert_dhcp_alive(&mut self) {
        if let Ok(Some(status)) = self.dhcp.child.try_wait() {
            panic!(
                "udhcpd exited ({status}):\n{}",
                qemu::log_tail(&self.dhcp_log, 20)
            );
        }
    }
}
