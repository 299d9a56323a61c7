//! `net_pps`: packets per second through the agent's `loop` dataplane next
//! to DPDK's own vhost-user back-end (the anchor), with the same client.
//!
//! The client is `dpdk-testpmd` with DPDK's `net_virtio_user` PMD (the
//! guest side), one queue pair, both lcores on CPU 0
//! ([`vhost_agent_tests::testpmd`]). The back-end runs on CPU 1:
//!
//! * **agent**: `vhost-agent serve --net ...,dataplane=loop,poll-us=N`,
//!   the whole process pinned to CPU 1, once per `poll-us` value asked for;
//! * **anchor**: `dpdk-testpmd` with `net_vhost` (the vhost library that
//!   OVS-DPDK and others use) in io forwarding, which like `loop` sends
//!   every frame back on the queue pair it came from.
//!
//! For 64- and 1500-byte frames, each back-end is measured in two phases
//! with a fresh back-end process and client:
//!
//! * **txonly**: the client only transmits (`--forward-mode=txonly`); the
//!   rate is the client's TX counter over the window, that is how fast the
//!   back-end takes frames off the TX ring. The client never polls RX, so
//!   the back-end's reflected frames are dropped once the RX ring is full,
//!   in both back-ends alike.
//! * **loop**: io forwarding after `start tx_first 32`, a closed loop; the
//!   rate is the client's RX counter over the window.
//!
//! The table gives each rate, the anchor's, and agent/anchor. This is a
//! benchmark, not a test: it judges nothing, it only reports. Run it with
//! `cargo bench -p vhost-agent-tests --bench net_pps` as root with DPDK
//! installed (`scripts/install-test-deps.sh`); about 70 s with the
//! defaults. Environment knobs:
//!
//! | variable          | default    | meaning                                      |
//! |-------------------|------------|----------------------------------------------|
//! | `BENCH_WINDOW`    | 3          | measured seconds per phase                   |
//! | `BENCH_WARMUP`    | 1          | unmeasured seconds before each window        |
//! | `BENCH_ROUNDS`    | 1          | rounds; the table shows each cell's median   |
//! | `BENCH_POLL_US`   | 1000,0     | agent `poll-us` values, comma-separated      |
//! | `BENCH_FRAMES`    | 64,1500    | frame lengths in bytes, comma-separated      |
//! | `BENCH_HUGEPAGES` | 0          | 1: testpmd memory on 2 MiB pages (see below) |
//! | `VHOST_AGENT_BIN` | build it   | a prebuilt agent binary to use instead       |
//!
//! testpmd's memory is a memfd of 4 KiB pages (`--no-huge`) by default,
//! which needs no set-up. `BENCH_HUGEPAGES=1` puts it on 2 MiB pages
//! (`--in-memory --single-file-segments`, 512 MiB per testpmd, so reserve
//! them first: `echo 512 > /proc/sys/vm/nr_hugepages` covers the two
//! testpmds of an anchor cell); on this project's 2-CPU machines that was
//! not measurably faster for either back-end.
//!
//! Both sides busy-poll a CPU each, so on a 2-CPU machine anything else
//! running (builds, guests) takes from them: the load average is printed
//! with the table; compare runs made on a quiet machine.

use std::fmt::Write as _;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vhost_agent_tests::bench::{catch_panic, load_average};
use vhost_agent_tests::net_agent::{NetAgent, NetAgentOptions, PairCounters};
use vhost_agent_tests::support::agent_binary;
use vhost_agent_tests::testpmd::{check_dpdk, ForwardMode, Testpmd, TestpmdOptions};

/// Queue pairs, in the client and in both back-ends.
const QUEUES: u16 = 1;
/// Bursts sent before forwarding in the loop phase.
const TX_FIRST: u32 = 32;
/// How long the client may take to negotiate.
const LINK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a testpmd may take to quit.
const QUIT_TIMEOUT: Duration = Duration::from_secs(15);

/// The benchmark's settings, from the environment.
#[derive(Debug, Clone)]
struct Config {
    /// Measured duration of one phase.
    window: Duration,
    /// Unmeasured time before each window.
    warmup: Duration,
    /// Rounds over every cell.
    rounds: usize,
    /// Agent `poll-us` values, one agent column each.
    poll_us: Vec<u32>,
    /// Frame lengths.
    frames: Vec<u16>,
    /// testpmd memory on hugepages.
    hugepages: bool,
}

/// Read `name` from the environment and parse it, or use `default`.
fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse()
            .map_err(|_| format!("{name}={value}: not a valid value")),
        _ => Ok(default),
    }
}

/// Read a comma-separated list from `name`, or use `default`.
fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Result<Vec<T>, String> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_string());
    let text = if text.trim().is_empty() {
        default.to_string()
    } else {
        text
    };
    text.split(',')
        .map(|item| {
            item.trim()
                .parse()
                .map_err(|_| format!("{name}={text}: `{item}` is not a valid value"))
        })
        .collect()
}

impl Config {
    /// Settings from the `BENCH_*` environment variables.
    fn from_env() -> Result<Config, String> {
        let window: f64 = env_parse("BENCH_WINDOW", 3.0)?;
        let warmup: f64 = env_parse("BENCH_WARMUP", 1.0)?;
        if !(window > 0.0 && window.is_finite()) {
            return Err(format!("BENCH_WINDOW={window}: must be positive"));
        }
        if !(warmup >= 0.0 && warmup.is_finite()) {
            return Err(format!("BENCH_WARMUP={warmup}: must not be negative"));
        }
        let poll_us: Vec<u32> = env_list("BENCH_POLL_US", "1000,0")?;
        let frames: Vec<u16> = env_list("BENCH_FRAMES", "64,1500")?;
        if let Some(bad) = frames.iter().find(|&&f| !(60..=1514).contains(&f)) {
            return Err(format!(
                "BENCH_FRAMES: {bad} bytes; frames must be 60..=1514 bytes (one mbuf, \
                 within the default MTU)"
            ));
        }
        let rounds: usize = env_parse("BENCH_ROUNDS", 1)?;
        if rounds == 0 {
            return Err("BENCH_ROUNDS=0: need at least one round".to_string());
        }
        let hugepages: u8 = env_parse("BENCH_HUGEPAGES", 0)?;
        if hugepages > 1 {
            return Err(format!("BENCH_HUGEPAGES={hugepages}: expected 0 or 1"));
        }
        Ok(Config {
            window: Duration::from_secs_f64(window),
            warmup: Duration::from_secs_f64(warmup),
            rounds,
            poll_us,
            frames,
            hugepages: hugepages == 1,
        })
    }
}

/// A back-end under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The agent's `loop` dataplane with this `poll-us`.
    Agent(u32),
    /// testpmd's `net_vhost` in io forwarding.
    Anchor,
}

impl Backend {
    fn name(self) -> String {
        match self {
            Backend::Agent(us) => format!("agent poll-us={us}"),
            Backend::Anchor => "anchor".to_string(),
        }
    }
}

/// The two measurements of one phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Client txonly: client TX rate.
    TxOnly,
    /// Closed io loop: client RX rate.
    Loop,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::TxOnly => "txonly",
            Phase::Loop => "io loop",
        }
    }
}

/// A running back-end.
enum Server {
    Agent(NetAgent),
    Anchor(Testpmd, tempfile::TempDir),
}

impl Server {
    fn start(backend: Backend, hugepages: bool) -> Result<Server, String> {
        match backend {
            Backend::Agent(poll_us) => {
                let options = NetAgentOptions {
                    poll_us: Some(poll_us),
                    ..NetAgentOptions::reflector(QUEUES)
                };
                NetAgent::spawn(&options).map(Server::Agent)
            }
            Backend::Anchor => {
                let dir = tempfile::Builder::new()
                    .prefix("net-pps.")
                    .tempdir()
                    .map_err(|e| format!("temporary directory: {e}"))?;
                let mut options = TestpmdOptions::backend(&dir.path().join("vhost.sock"), QUEUES);
                options.name = "anchor".to_string();
                options.hugepages = hugepages;
                let mut anchor = Testpmd::spawn(options).map_err(|e| format!("anchor: {e}"))?;
                anchor.start().map_err(|e| format!("anchor start: {e}"))?;
                Ok(Server::Anchor(anchor, dir))
            }
        }
    }

    fn socket(&self) -> std::path::PathBuf {
        match self {
            Server::Agent(agent) => agent.socket.clone(),
            Server::Anchor(_, dir) => dir.path().join("vhost.sock"),
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Server::Agent(agent) => agent.log_tail(20),
            Server::Anchor(anchor, _) => anchor.output_tail(20),
        }
    }
}

/// One measured rate, with what the back-end said about it.
#[derive(Debug, Clone)]
struct Measurement {
    pps: f64,
    /// Agent only: its counters over the phase.
    agent: Option<PairCounters>,
}

/// Start `backend` and a client with `frame`-byte frames, run `phase`,
/// and stop both. The rate is packets over the measured window.
fn measure(
    config: &Config,
    backend: Backend,
    frame: u16,
    phase: Phase,
    notes: &mut Vec<String>,
) -> Result<Measurement, String> {
    let server = Server::start(backend, config.hugepages)?;
    let mut options = TestpmdOptions::client(&server.socket(), QUEUES);
    options.frame_len = frame;
    options.hugepages = config.hugepages;
    options.forward_mode = match phase {
        Phase::TxOnly => ForwardMode::TxOnly,
        Phase::Loop => ForwardMode::Io,
    };
    let context = |e: &dyn std::fmt::Display, server: &Server| {
        format!(
            "{} {frame} B {}: {e}\n---- {} log ----\n{}",
            backend.name(),
            phase.name(),
            backend.name(),
            server.log_tail()
        )
    };
    let mut client = Testpmd::spawn(options).map_err(|e| context(&e, &server))?;
    client
        .wait_link_up(LINK_TIMEOUT)
        .map_err(|e| context(&e, &server))?;
    let before = match &server {
        Server::Agent(agent) => Some(PairCounters::total(&agent.pairs()?)),
        Server::Anchor(..) => None,
    };
    match phase {
        Phase::TxOnly => client.start(),
        Phase::Loop => client.start_tx_first(TX_FIRST),
    }
    .map_err(|e| context(&e, &server))?;
    std::thread::sleep(config.warmup);
    let first = client.port_stats().map_err(|e| context(&e, &server))?;
    let started = Instant::now();
    std::thread::sleep(config.window);
    let second = client.port_stats().map_err(|e| context(&e, &server))?;
    let elapsed = started.elapsed().as_secs_f64();
    let packets = match phase {
        Phase::TxOnly => second.tx_packets - first.tx_packets,
        Phase::Loop => second.rx_packets - first.rx_packets,
    };
    client.stop().map_err(|e| context(&e, &server))?;
    let agent = match (&server, before) {
        (Server::Agent(agent), Some(before)) => {
            let after = agent.settled_pairs(Duration::from_millis(100), Duration::from_secs(10))?;
            Some(PairCounters::total(&after).since(&before))
        }
        _ => None,
    };
    if packets == 0 {
        notes.push(format!(
            "{} {frame} B {}: no packets in the window",
            backend.name(),
            phase.name()
        ));
    }
    if let Err(e) = client.quit(QUIT_TIMEOUT) {
        notes.push(format!("{} {frame} B: client quit: {e}", backend.name()));
    }
    match server {
        Server::Agent(mut agent) => {
            let complaints: Vec<String> = agent
                .log_text()
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .take(3)
                .map(str::to_string)
                .collect();
            for line in complaints {
                notes.push(format!("{} {frame} B: {line}", backend.name()));
            }
            agent
                .stop()
                .map_err(|e| format!("{}: {e}\n{}", backend.name(), agent.log_tail(20)))?;
        }
        Server::Anchor(anchor, _dir) => {
            if let Err(e) = anchor.quit(QUIT_TIMEOUT) {
                notes.push(format!("anchor quit: {e}"));
            }
        }
    }
    Ok(Measurement {
        pps: packets as f64 / elapsed,
        agent,
    })
}

/// The installed DPDK version (Debian's dpdk-dev package), or `"?"`.
fn dpdk_version() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "dpdk-dev"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_else(|| "?".to_string())
}

/// Median of `values` (mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0
}

/// Millions with two decimals.
fn mpps(pps: f64) -> String {
    format!("{:.2} M", pps / 1e6)
}

/// The whole benchmark.
fn bench() -> Result<(), String> {
    let config = Config::from_env()?;
    check_dpdk()?;
    let agent_bin = catch_panic(agent_binary).map_err(|e| {
        format!(
            "the agent binary is not available: {e} (set VHOST_AGENT_BIN to use a prebuilt one)"
        )
    })?;
    let load_before = load_average();
    let mut backends = vec![Backend::Anchor];
    backends.extend(config.poll_us.iter().map(|&us| Backend::Agent(us)));
    let mut notes = Vec::new();
    // rows[case].2[backend]: the rate of every round.
    let mut rows: Vec<(u16, Phase, Vec<Vec<f64>>)> = Vec::new();
    for &frame in &config.frames {
        for phase in [Phase::TxOnly, Phase::Loop] {
            rows.push((frame, phase, vec![Vec::new(); backends.len()]));
        }
    }
    let started = Instant::now();
    // Back-ends alternate within each case, so drift of the machine hits
    // all of them alike.
    for round in 1..=config.rounds {
        for (frame, phase, cells) in rows.iter_mut() {
            for (b, &backend) in backends.iter().enumerate() {
                let m = measure(&config, backend, *frame, *phase, &mut notes)?;
                eprintln!(
                    "net_pps: round {round} {frame:>4} B {:<8} {:<18} {:>10.0} pps{}",
                    phase.name(),
                    backend.name(),
                    m.pps,
                    m.agent
                        .map(|c| format!(
                            " (agent took {} TX, reflected {}, dropped {})",
                            c.tx_packets,
                            c.rx_packets,
                            c.rx_dropped + c.tx_dropped
                        ))
                        .unwrap_or_default()
                );
                cells[b].push(m.pps);
            }
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "net_pps: {QUEUES} queue pair; client dpdk-testpmd net_virtio_user on CPU 0; \
         back-end on CPU 1"
    );
    let _ = writeln!(
        out,
        "window:  {:.1} s measured after {:.1} s warm-up; fresh back-end and client per cell; \
         {} round(s), median shown; {:.0} s in all; testpmd memory on {}",
        config.window.as_secs_f64(),
        config.warmup.as_secs_f64(),
        config.rounds,
        started.elapsed().as_secs_f64(),
        if config.hugepages {
            "2 MiB hugepages"
        } else {
            "4 KiB pages (--no-huge)"
        }
    );
    let _ = writeln!(
        out,
        "agent:   {} (dataplane=loop, pinned to CPU 1)",
        agent_bin.display()
    );
    let _ = writeln!(
        out,
        "anchor:  dpdk-testpmd {} net_vhost, io forwarding, lcores on CPU 1",
        dpdk_version()
    );
    let _ = writeln!(
        out,
        "phases:  txonly = client TX pps (what the back-end takes); io loop = client RX pps \
         after start tx_first {TX_FIRST}"
    );
    let _ = writeln!(
        out,
        "load:    1-min load average {load_before} before, {} after",
        load_average()
    );
    let _ = writeln!(out);
    let mut header = format!("{:<16} {:>10}", "case", "anchor pps");
    for &us in &config.poll_us {
        let _ = write!(
            header,
            " {:>22} {:>7}",
            format!("agent pps poll-us={us}"),
            "ratio"
        );
    }
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{}", "-".repeat(header.len()));
    for (frame, phase, cells) in &rows {
        let anchor = median(&cells[0]);
        let mut line = format!(
            "{:<16} {:>10}",
            format!("{frame} B {}", phase.name()),
            mpps(anchor)
        );
        for cell in &cells[1..] {
            let agent = median(cell);
            let ratio = if anchor > 0.0 {
                format!("{:.3}", agent / anchor)
            } else {
                "-".to_string()
            };
            let _ = write!(line, " {:>22} {:>7}", mpps(agent), ratio);
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out);
    if notes.is_empty() {
        let _ = writeln!(
            out,
            "notes: none (no agent warnings or errors; every process exited cleanly)"
        );
    } else {
        let _ = writeln!(out, "notes:");
        for note in &notes {
            let _ = writeln!(out, "  {note}");
        }
    }
    println!();
    print!("{out}");
    Ok(())
}

fn main() -> ExitCode {
    // `cargo test --benches` runs bench targets without `--bench`: there is
    // nothing to check, and a minute of busy-polling is not wanted there.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "net_pps: a benchmark; run it with `cargo bench -p vhost-agent-tests --bench net_pps`"
        );
        return ExitCode::SUCCESS;
    }
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("net_pps: error: {e}");
            ExitCode::FAILURE
        }
    }
}
