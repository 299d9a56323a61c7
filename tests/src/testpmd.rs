//! `dpdk-testpmd` as a vhost-user peer of the agent, driven over its
//! interactive command line.
//!
//! One [`Testpmd`] is one testpmd process with one port, either
//!
//! * a vhost-user **client** ([`Role::Client`]): DPDK's `net_virtio_user`
//!   PMD, the guest side, connecting to a back-end's socket (the agent's);
//! * a vhost-user **back-end** ([`Role::Backend`]): DPDK's `net_vhost` PMD
//!   serving a socket, the anchor that proves a harness or a benchmark
//!   right without the agent.
//!
//! The process runs with `-i`: commands go in on stdin, and everything it
//! prints (stdout and stderr, through one pipe) is captured, so a failure message can carry
//! testpmd's own words. testpmd's statistics go through stdio, which is
//! fully buffered on a pipe, so it runs under `stdbuf -oL`. To know where
//! a command's output ends, every command is followed by a comment line
//! (`# vhost-agent-tests sync N`), which testpmd ignores but echoes when it
//! reads it, that is after the command before it has finished.
//!
//! Memory: `--no-huge -m 512` (DPDK backs it with a memfd the vhost-user
//! peer can map) and a small mbuf pool, so no hugepage set-up is needed;
//! [`TestpmdOptions::hugepages`] switches to 2 MiB pages.
//! Each process has a unique `--file-prefix`; its runtime directory is
//! removed when the [`Testpmd`] is dropped, which also kills the process.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::support::{have_program, ChildGuard};

/// The testpmd binary (package `dpdk-dev` on Debian bookworm).
pub const TESTPMD: &str = "dpdk-testpmd";

/// What to tell someone whose machine lacks DPDK.
pub const INSTALL_HINT: &str = "DPDK 22.11 is needed: run `scripts/install-test-deps.sh` as root \
     (it installs dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-net-tap23 \
     librte-mempool-ring23 with --no-install-recommends), and run the tests as root";

/// The testpmd prompt.
const PROMPT: &str = "testpmd> ";

/// Start of the comment line that marks the end of a command's output.
const SYNC_MARK: &str = "# vhost-agent-tests sync ";

/// How long testpmd may take from exec to its first prompt.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an ordinary command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// PMD plugins the tests load, as Debian installs them
/// (`/usr/lib/<triplet>/dpdk/pmds-<abi>/`).
const PMD_PLUGINS: [(&str, &str); 3] = [
    ("librte_net_virtio.so", "librte-net-virtio23"),
    ("librte_net_vhost.so", "librte-net-vhost23"),
    ("librte_mempool_ring.so", "librte-mempool-ring23"),
];

/// Everything that can go wrong talking to testpmd. Each variant carries the
/// raw testpmd text it is about, and [`fmt::Display`] prints it.
#[derive(Debug)]
pub enum TestpmdError {
    /// The process could not be started at all.
    Spawn(String),
    /// testpmd exited (or closed its output) when it should be running.
    Exited {
        /// What was being done.
        during: String,
        /// Its exit status, if it could be reaped.
        status: Option<ExitStatus>,
        /// Everything it printed.
        output: String,
    },
    /// testpmd did not answer in time.
    Timeout {
        /// What was being waited for.
        during: String,
        /// How long we waited.
        waited: Duration,
        /// Everything it printed so far.
        output: String,
    },
    /// testpmd answered something we could not make sense of.
    Parse {
        /// What was expected.
        what: String,
        /// The text that did not parse.
        raw: String,
    },
    /// testpmd answered with an error or a refusal.
    Refused {
        /// The command.
        command: String,
        /// Its output.
        raw: String,
    },
}

impl fmt::Display for TestpmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestpmdError::Spawn(e) => write!(f, "could not start {TESTPMD}: {e}"),
            TestpmdError::Exited {
                during,
                status,
                output,
            } => {
                let status = status.map_or_else(|| "unknown status".to_string(), |s| s.to_string());
                write!(
                    f,
                    "{TESTPMD} exited ({status}) during {during}; its output:\n{}",
                    tail(output, 80)
                )
            }
            TestpmdError::Timeout {
                during,
                waited,
                output,
            } => write!(
                f,
                "{TESTPMD} did not finish {during} within {waited:?}; its output so far:\n{}",
                tail(output, 80)
            ),
            TestpmdError::Parse { what, raw } => {
                write!(f, "cannot parse {what} from {TESTPMD}'s output:\n{raw}")
            }
            TestpmdError::Refused { command, raw } => {
                write!(f, "{TESTPMD} refused `{command}`:\n{raw}")
            }
        }
    }
}

impl std::error::Error for TestpmdError {}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let skipped = all.len().saturating_sub(lines);
    let mut out = String::new();
    if skipped > 0 {
        out.push_str(&format!("[... {skipped} earlier lines ...]\n"));
    }
    out.push_str(&all[skipped..].join("\n"));
    out
}

/// Can this machine run testpmd as the tests do? `Err` says what is missing
/// and how to install it.
pub fn check_dpdk() -> Result<(), String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing
            .push("root (testpmd maps memory and creates runtime files in /var/run/dpdk)".into());
    }
    if !have_program(TESTPMD) {
        missing.push(format!("{TESTPMD} (package dpdk-dev)"));
    }
    if !have_program("stdbuf") {
        missing.push("stdbuf (package coreutils)".to_string());
    }
    // Debian's DPDK loads its drivers as plugins from this directory. A
    // DPDK built elsewhere may link them in, so only check where it exists.
    let plugin_dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|triplet| std::fs::read_dir(triplet.path().join("dpdk")).into_iter())
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pmds-"))
        })
        .collect();
    if !plugin_dirs.is_empty() {
        for (file, package) in PMD_PLUGINS {
            if !plugin_dirs.iter().any(|dir| dir.join(file).exists()) {
                missing.push(format!("{file} (package {package})"));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing: {}. {INSTALL_HINT}", missing.join("; ")))
    }
}

/// Panic, loudly, unless [`check_dpdk`] passes: tests that need DPDK fail
/// on a machine without it rather than pass without testing anything.
#[track_caller]
pub fn require_dpdk() {
    if let Err(e) = check_dpdk() {
        panic!("this test drives the agent with DPDK's testpmd and cannot run here: {e}");
    }
}

/// Which side of the vhost-user connection testpmd plays.
#[derive(Debug, Clone)]
pub enum Role {
    /// `net_virtio_user`: the front-end (driver) side, connecting to the
    /// back-end listening on `socket`.
    Client {
        /// The back-end's vhost-user socket.
        socket: PathBuf,
    },
    /// `net_vhost` with `client=0`: the back-end, listening on `socket`.
    Backend {
        /// The socket to create and listen on.
        socket: PathBuf,
    },
}

/// testpmd's packet forwarding modes the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Receive a burst, transmit it unchanged on the paired port (itself).
    Io,
    /// Transmit generated frames; never receive.
    TxOnly,
    /// Receive and free; never transmit.
    RxOnly,
}

impl ForwardMode {
    /// testpmd's name of the mode (`--forward-mode=`).
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardMode::Io => "io",
            ForwardMode::TxOnly => "txonly",
            ForwardMode::RxOnly => "rxonly",
        }
    }
}

/// How to start a [`Testpmd`].
#[derive(Debug, Clone)]
pub struct TestpmdOptions {
    /// Client or back-end, and the socket.
    pub role: Role,
    /// Queue pairs of the port: the PMD's `queues=` and `--rxq`/`--txq`.
    pub queues: u16,
    /// The host CPU both lcores (main and forwarding) are pinned to.
    pub cpu: usize,
    /// The forwarding mode set at start-up.
    pub forward_mode: ForwardMode,
    /// Length of generated frames (`txonly` and `start tx_first`), bytes.
    pub frame_len: u16,
    /// mbufs in the pool (`--total-num-mbufs`).
    pub mbufs: u32,
    /// MiB of memory for EAL (`-m`).
    pub memory_mb: u32,
    /// Back the memory with hugepages (`--in-memory --single-file-segments`;
    /// the machine must have `memory_mb` of free 2 MiB pages) instead of
    /// `--no-huge` (a memfd of 4 KiB pages).
    pub hugepages: bool,
    /// Extra `key=value` pairs for the PMD's devargs, e.g. `packed_vq=1`.
    pub devargs: Vec<String>,
    /// Extra testpmd (application) arguments, after `--`.
    pub app_args: Vec<String>,
    /// A name for messages, e.g. `client` or `anchor`.
    pub name: String,
}

impl TestpmdOptions {
    /// A `net_virtio_user` client of `socket` with `queues` queue pairs on
    /// CPU 0, io forwarding, 64-byte frames.
    pub fn client(socket: &Path, queues: u16) -> TestpmdOptions {
        TestpmdOptions {
            role: Role::Client {
                socket: socket.to_path_buf(),
            },
            queues,
            cpu: 0,
            forward_mode: ForwardMode::Io,
            frame_len: 64,
            mbufs: 16384,
            memory_mb: 512,
            hugepages: false,
            devargs: Vec::new(),
            app_args: Vec::new(),
            name: "testpmd client".to_string(),
        }
    }

    /// A `net_vhost` back-end listening on `socket` with `queues` queue
    /// pairs on CPU 1, io forwarding: the anchor.
    pub fn backend(socket: &Path, queues: u16) -> TestpmdOptions {
        TestpmdOptions {
            role: Role::Backend {
                socket: socket.to_path_buf(),
            },
            cpu: 1,
            name: "testpmd back-end".to_string(),
            ..TestpmdOptions::client(socket, queues)
        }
    }

    /// The `--vdev` argument.
    fn vdev(&self) -> String {
        let mut vdev = match &self.role {
            Role::Client { socket } => format!(
                "net_virtio_user0,path={},queues={}",
                socket.display(),
                self.queues
            ),
            Role::Backend { socket } => format!(
                "net_vhost0,iface={},queues={},client=0",
                socket.display(),
                self.queues
            ),
        };
        for arg in &self.devargs {
            vdev.push(',');
            vdev.push_str(arg);
        }
        vdev
    }
}

/// testpmd's output, appended to by a reader thread.
struct Capture {
    state: Mutex<CaptureState>,
    changed: Condvar,
}

struct CaptureState {
    text: String,
    /// The output pipe is not yet at end of file.
    open: bool,
}

impl Capture {
    /// Copy `stream` into the capture until end of file.
    fn pump(self: Arc<Self>, mut stream: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = stream.read(&mut buf).unwrap_or(0);
                let mut state = self.state.lock().unwrap();
                if n == 0 {
                    state.open = false;
                    self.changed.notify_all();
                    return;
                }
                state.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                self.changed.notify_all();
            }
        });
    }
}

/// Counters of `show port stats` for one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// `RX-packets`.
    pub rx_packets: u64,
    /// `RX-missed`.
    pub rx_missed: u64,
    /// `RX-bytes`.
    pub rx_bytes: u64,
    /// `RX-errors`.
    pub rx_errors: u64,
    /// `RX-nombuf`: receives that found no mbuf.
    pub rx_nombuf: u64,
    /// `TX-packets`.
    pub tx_packets: u64,
    /// `TX-errors`.
    pub tx_errors: u64,
    /// `TX-bytes`.
    pub tx_bytes: u64,
}

/// `show port xstats` of one port: every counter by name.
#[derive(Debug, Clone, Default)]
pub struct XStats {
    /// Counter name to value.
    pub values: BTreeMap<String, u64>,
    /// The raw text, for messages.
    pub raw: String,
}

impl XStats {
    /// The counter `name`, or an error naming it with the raw text.
    pub fn get(&self, name: &str) -> Result<u64, TestpmdError> {
        self.values
            .get(name)
            .copied()
            .ok_or_else(|| TestpmdError::Parse {
                what: format!("xstat {name}"),
                raw: self.raw.clone(),
            })
    }

    /// Packets received on queue `queue`: virtio_user names it
    /// `rx_qN_good_packets`, vhost also `rx_qN_packets`.
    pub fn rx_queue_packets(&self, queue: u16) -> Result<u64, TestpmdError> {
        self.get(&format!("rx_q{queue}_good_packets"))
            .or_else(|_| self.get(&format!("rx_q{queue}_packets")))
    }

    /// Packets transmitted on queue `queue` (see [`XStats::rx_queue_packets`]).
    pub fn tx_queue_packets(&self, queue: u16) -> Result<u64, TestpmdError> {
        self.get(&format!("tx_q{queue}_good_packets"))
            .or_else(|_| self.get(&format!("tx_q{queue}_packets")))
    }
}

/// The accumulated totals `stop` prints for all forwarding streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Packets the forwarding cores received.
    pub rx_packets: u64,
    /// Received packets dropped by the forwarding engine.
    pub rx_dropped: u64,
    /// Packets the forwarding cores transmitted.
    pub tx_packets: u64,
    /// Packets the PMD would not take (ring full), freed by testpmd.
    pub tx_dropped: u64,
}

/// Parse `KEY: NUMBER` pairs (`RX-packets: 12  RX-missed: 0 ...`) out of
/// `text`; later occurrences of a key win.
fn key_numbers(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let tokens: Vec<&str> = text.split_whitespace().collect();
    for pair in tokens.windows(2) {
        if let Some(key) = pair[0].strip_suffix(':') {
            if let Ok(value) = pair[1].parse::<u64>() {
                out.insert(key.to_string(), value);
            }
        }
    }
    out
}

/// Parse the output of `show port stats <port>` (one port).
pub fn parse_port_stats(raw: &str) -> Result<PortStats, TestpmdError> {
    if !raw.contains("NIC statistics for port") {
        return Err(TestpmdError::Parse {
            what: "port statistics (no `NIC statistics for port` header)".to_string(),
            raw: raw.to_string(),
        });
    }
    let values = key_numbers(raw);
    let field = |key: &str| {
        values.get(key).copied().ok_or_else(|| TestpmdError::Parse {
            what: format!("port statistics field {key}"),
            raw: raw.to_string(),
        })
    };
    Ok(PortStats {
        rx_packets: field("RX-packets")?,
        rx_missed: field("RX-missed")?,
        rx_bytes: field("RX-bytes")?,
        rx_errors: field("RX-errors")?,
        rx_nombuf: field("RX-nombuf")?,
        tx_packets: field("TX-packets")?,
        tx_errors: field("TX-errors")?,
        tx_bytes: field("TX-bytes")?,
    })
}

/// Parse the output of `show port xstats <port>`: `name: value` lines.
pub fn parse_xstats(raw: &str) -> Result<XStats, TestpmdError> {
    let mut values = BTreeMap::new();
    for line in raw.lines() {
        if let Some((name, value)) = line.trim().split_once(": ") {
            if let Ok(value) = value.trim().parse::<u64>() {
                if !name.contains(' ') {
                    values.insert(name.to_string(), value);
                }
            }
        }
    }
    if !values.contains_key("rx_good_packets") || !values.contains_key("tx_good_packets") {
        return Err(TestpmdError::Parse {
            what: "extended statistics (no rx_good_packets / tx_good_packets)".to_string(),
            raw: raw.to_string(),
        });
    }
    Ok(XStats {
        values,
        raw: raw.to_string(),
    })
}

/// Parse the accumulated block of `stop`'s forwarding statistics.
pub fn parse_forward_stats(raw: &str) -> Result<ForwardStats, TestpmdError> {
    let block = raw
        .split_once("Accumulated forward statistics for all ports")
        .map(|(_, rest)| rest)
        .ok_or_else(|| TestpmdError::Parse {
            what: "accumulated forward statistics".to_string(),
            raw: raw.to_string(),
        })?;
    let values = key_numbers(block);
    let field = |key: &str| {
        values.get(key).copied().ok_or_else(|| TestpmdError::Parse {
            what: format!("forward statistics field {key}"),
            raw: raw.to_string(),
        })
    };
    Ok(ForwardStats {
        rx_packets: field("RX-packets")?,
        rx_dropped: field("RX-dropped")?,
        tx_packets: field("TX-packets")?,
        tx_dropped: field("TX-dropped")?,
    })
}

/// A pipe with close-on-exec ends: (read end, write end).
fn output_pipe() -> std::io::Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2(2) writes two new descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (read, write) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    Ok((read, write))
}

/// A running testpmd with one port (port 0). Killed when dropped.
pub struct Testpmd {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    capture: Arc<Capture>,
    options: TestpmdOptions,
    prefix: String,
    sync: u64,
}

impl Testpmd {
    /// Start testpmd per `options` and wait for its first prompt.
    ///
    /// A client needs its back-end's socket to exist already; the back-end
    /// role creates its socket before the prompt appears.
    pub fn spawn(options: TestpmdOptions) -> Result<Testpmd, TestpmdError> {
        static INSTANCE: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "vhost-agent-tests-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let cpu = options.cpu;
        let queues = options.queues.to_string();
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", TESTPMD])
            // EAL: lcore 0 (main, the command line) and lcore 1 (forwarding)
            // both on one host CPU.
            .arg(format!("--lcores=0@{cpu},1@{cpu}"))
            .args(["-m", &options.memory_mb.to_string()])
            .args(if options.hugepages {
                // One file for all segments, or the vhost-user memory
                // table gets a region per page and the peer drops frames.
                &["--in-memory", "--single-file-segments"][..]
            } else {
                &["--no-huge"][..]
            })
            .args(["--no-pci", "--no-telemetry"])
            .arg(format!("--file-prefix={prefix}"))
            .arg(format!("--vdev={}", options.vdev()))
            .arg("--")
            .arg("-i")
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"))
            .arg(format!("--forward-mode={}", options.forward_mode.as_str()))
            .arg(format!("--txpkts={}", options.frame_len))
            .arg(format!("--total-num-mbufs={}", options.mbufs))
            // One port, forwarding to itself.
            .arg("--port-topology=loop")
            .args(&options.app_args)
            .stdin(Stdio::piped());
        let command_line = format!("{cmd:?}");
        // stdout and stderr into one pipe, so that an error testpmd prints
        // on stderr lands before the prompt that follows it.
        let (reader, writer) = output_pipe().map_err(|e| TestpmdError::Spawn(e.to_string()))?;
        let writer2 = writer
            .try_clone()
            .map_err(|e| TestpmdError::Spawn(e.to_string()))?;
        cmd.stdout(Stdio::from(writer)).stderr(Stdio::from(writer2));
        let spawned = cmd.spawn();
        // Our copies of the write end must go, or the reader never sees
        // the end of the output.
        drop(cmd);
        let mut child = spawned.map_err(|e| TestpmdError::Spawn(format!("{command_line}: {e}")))?;
        let capture = Arc::new(Capture {
            state: Mutex::new(CaptureState {
                text: format!("$ {command_line}\n"),
                open: true,
            }),
            changed: Condvar::new(),
        });
        capture.clone().pump(reader);
        let stdin = child.stdin.take();
        let mut testpmd = Testpmd {
            child: ChildGuard {
                child,
                name: options.name.clone(),
            },
            stdin,
            capture,
            options,
            prefix,
            sync: 0,
        };
        testpmd.wait_for("start-up (the first prompt)", 0, STARTUP_TIMEOUT, |text| {
            text.contains(PROMPT)
        })?;
        let text = testpmd.output();
        if !text.contains("Port 0: ") {
            return Err(TestpmdError::Refused {
                command: "start-up: no port 0 was created (is the PMD installed? is the \
                          back-end listening?)"
                    .to_string(),
                raw: format!("{}\n({INSTALL_HINT})", tail(&text, 60)),
            });
        }
        Ok(testpmd)
    }

    /// The options it was started with.
    pub fn options(&self) -> &TestpmdOptions {
        &self.options
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.child.id()
    }

    /// Everything testpmd printed so far (stdout and stderr interleaved),
    /// after the command line it was started with.
    pub fn output(&self) -> String {
        self.capture.state.lock().unwrap().text.clone()
    }

    /// The last `lines` lines of [`Testpmd::output`].
    pub fn output_tail(&self, lines: usize) -> String {
        tail(&self.output(), lines)
    }

    /// Wait until `done` holds for the text captured from byte `from` on,
    /// or fail if testpmd exits or `timeout` passes.
    fn wait_for(
        &mut self,
        during: &str,
        from: usize,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<(), TestpmdError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.capture.state.lock().unwrap();
        loop {
            if done(state.text.get(from..).unwrap_or("")) {
                return Ok(());
            }
            if !state.open {
                let output = state.text.clone();
                drop(state);
                let status = self.child.wait_timeout(Duration::from_secs(2));
                return Err(TestpmdError::Exited {
                    during: during.to_string(),
                    status,
                    output,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TestpmdError::Timeout {
                    during: during.to_string(),
                    waited: timeout,
                    output: state.text.clone(),
                });
            }
            state = self
                .capture
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Run `command` and return what it printed (without the echo of the
    /// command and the prompts around it), waiting up to `timeout`.
    pub fn command_timeout(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<String, TestpmdError> {
        assert!(
            !command.contains('\n'),
            "one testpmd command at a time: {command:?}"
        );
        self.sync += 1;
        let mark = format!("{SYNC_MARK}{}", self.sync);
        let from = self.capture.state.lock().unwrap().text.len();
        let during = format!("`{command}`");
        let input = format!("{command}\n{mark}\n");
        let written = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(input.as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin already closed")),
        };
        if let Err(e) = written {
            // Most likely testpmd is gone: say so, with all it printed.
            let status = self.child.wait_timeout(Duration::from_secs(2));
            return Err(TestpmdError::Exited {
                during: format!("{during} (writing it to stdin failed: {e})"),
                status,
                output: self.output(),
            });
        }
        // The mark is echoed when testpmd reads it: after `command` is done.
        self.wait_for(&during, from, timeout, |text| text.contains(&mark))?;
        let text = self.capture.state.lock().unwrap().text[from..].to_string();
        let end = text.find(&mark).expect("waited for the mark");
        let mut out = &text[..end];
        // Drop the echo of the command line itself, and the prompt before
        // the mark's echo.
        if let Some(at) = out.find(command) {
            out = &out[at + command.len()..];
        }
        let out = out.strip_suffix(PROMPT).unwrap_or(out);
        Ok(out.trim_matches('\n').to_string())
    }

    /// [`Testpmd::command_timeout`] with the default timeout (15 s).
    pub fn command(&mut self, command: &str) -> Result<String, TestpmdError> {
        self.command_timeout(command, COMMAND_TIMEOUT)
    }

    /// Run `command` and fail if testpmd's answer contains any of the
    /// phrases testpmd uses for refusals and errors.
    fn checked(&mut self, command: &str) -> Result<String, TestpmdError> {
        let out = self.command(command)?;
        const REFUSALS: [&str; 6] = [
            "Bad arguments",
            "Command not found",
            "already started",
            "not started",
            "Fail",
            "Invalid",
        ];
        if REFUSALS.iter().any(|r| out.contains(r)) {
            return Err(TestpmdError::Refused {
                command: command.to_string(),
                raw: out,
            });
        }
        Ok(out)
    }

    /// `start`: begin forwarding in the current mode.
    pub fn start(&mut self) -> Result<(), TestpmdError> {
        self.checked("start").map(drop)
    }

    /// `start tx_first BURSTS`: send `bursts` bursts on every queue first,
    /// then forward (the way to close an io loop).
    pub fn start_tx_first(&mut self, bursts: u32) -> Result<(), TestpmdError> {
        self.checked(&format!("start tx_first {bursts}")).map(drop)
    }

    /// `stop`: stop forwarding; returns the accumulated totals it prints.
    pub fn stop(&mut self) -> Result<ForwardStats, TestpmdError> {
        let out = self.checked("stop")?;
        parse_forward_stats(&out)
    }

    /// `set fwd MODE`: change the forwarding mode (while stopped).
    pub fn set_forward_mode(&mut self, mode: ForwardMode) -> Result<(), TestpmdError> {
        self.checked(&format!("set fwd {}", mode.as_str()))
            .map(drop)
    }

    /// `show port stats 0`.
    pub fn port_stats(&mut self) -> Result<PortStats, TestpmdError> {
        let out = self.command("show port stats 0")?;
        parse_port_stats(&out)
    }

    /// `show port xstats 0`.
    pub fn xstats(&mut self) -> Result<XStats, TestpmdError> {
        let out = self.command("show port xstats 0")?;
        parse_xstats(&out)
    }

    /// `clear port stats 0` (basic and extended counters).
    pub fn clear_stats(&mut self) -> Result<(), TestpmdError> {
        self.checked("clear port stats 0")?;
        self.checked("clear port xstats 0").map(drop)
    }

    /// Is port 0's link up (`show port info 0`)?
    pub fn link_up(&mut self) -> Result<bool, TestpmdError> {
        let out = self.command("show port info 0")?;
        let status = out
            .lines()
            .find_map(|line| line.trim().strip_prefix("Link status:"))
            .ok_or_else(|| TestpmdError::Parse {
                what: "`Link status:` in the port information".to_string(),
                raw: out.clone(),
            })?;
        Ok(status.trim() == "up")
    }

    /// Wait up to `timeout` for port 0's link to come up: for a client, the
    /// vhost-user negotiation with the back-end is complete; for a
    /// back-end, a client has connected and set DRIVER_OK.
    pub fn wait_link_up(&mut self, timeout: Duration) -> Result<(), TestpmdError> {
        let deadline = Instant::now() + timeout;
        while !self.link_up()? {
            if Instant::now() >= deadline {
                return Err(TestpmdError::Timeout {
                    during: "waiting for the link to come up".to_string(),
                    waited: timeout,
                    output: self.output(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `quit`, and wait up to `timeout` for testpmd to exit; killed if it
    /// does not. Returns its exit status, or why it did not exit cleanly.
    pub fn quit(mut self, timeout: Duration) -> Result<ExitStatus, TestpmdError> {
        if let Some(mut stdin) = self.stdin.take() {
            // A dead testpmd cannot read it: the exit status says the rest.
            let _ = stdin.write_all(b"quit\n");
        }
        match self.child.wait_timeout(timeout) {
            Some(status) if status.success() => Ok(status),
            Some(status) => Err(TestpmdError::Exited {
                during: "quit".to_string(),
                status: Some(status),
                output: self.output(),
            }),
            None => Err(TestpmdError::Timeout {
                during: "quit".to_string(),
                waited: timeout,
                output: self.output(),
            }),
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.child.kill();
        let _ = self.child.child.wait();
        // --no-huge cannot be combined with --in-memory, so EAL leaves its
        // runtime files (config, fbarrays, sockets) behind.
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "
  ######################## NIC statistics for port 0  ########################
  RX-packets: 4141440    RX-missed: 0          RX-bytes:  6212160000
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 4141920    TX-errors: 0          TX-bytes:  6212880000

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################";

    #[test]
    fn port_stats_parse() {
        let stats = parse_port_stats(STATS).unwrap();
        assert_eq!(stats.rx_packets, 4141440);
        assert_eq!(stats.rx_bytes, 6212160000);
        assert_eq!(stats.tx_packets, 4141920);
        assert_eq!(stats.rx_nombuf, 0);
        let err = parse_port_stats("Invalid port 3").unwrap_err().to_string();
        assert!(err.contains("Invalid port 3"), "{err}");
        let err = parse_port_stats(&STATS.replace("TX-bytes", "TX-b"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TX-bytes") && err.contains("RX-nombuf"),
            "{err}"
        );
    }

    #[test]
    fn xstats_parse() {
        let raw = "###### NIC extended statistics for port 0 \nrx_good_packets: 10\n\
                   tx_good_packets: 12\nrx_q0_good_packets: 4\nrx_q1_good_packets: 6\n\
                   tx_q0_packets: 5\n";
        let x = parse_xstats(raw).unwrap();
        assert_eq!(x.rx_queue_packets(0).unwrap(), 4);
        assert_eq!(x.rx_queue_packets(1).unwrap(), 6);
        assert_eq!(x.tx_queue_packets(0).unwrap(), 5);
        let err = x.rx_queue_packets(2).unwrap_err().to_string();
        assert!(err.contains("rx_q2_packets") && err.contains("rx_q1_good_packets: 6"));
        assert!(parse_xstats("Bad arguments").is_err());
    }

    #[test]
    fn forward_stats_parse() {
        let raw = "  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 7          RX-dropped: 0             RX-total: 7
  TX-packets: 9          TX-dropped: 1             TX-total: 10
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 25653344       RX-dropped: 2             RX-total: 25653346
  TX-packets: 25655392       TX-dropped: 544           TX-total: 25655936
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
";
        let f = parse_forward_stats(raw).unwrap();
        assert_eq!(
            f,
            ForwardStats {
                rx_packets: 25653344,
                rx_dropped: 2,
                tx_packets: 25655392,
                tx_dropped: 544
            }
        );
        assert!(parse_forward_stats("Packet forwarding not started").is_err());
    }
}
