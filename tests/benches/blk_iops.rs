//! `blk_iops`: 4 KiB random-read and random-write IOPS of the agent next to
//! qemu-storage-daemon (qsd), measured with the same client.
//!
//! Both back-ends serve the same preconditioned raw image with the same cache
//! mode (`direct` / `cache.direct`), one request queue each, and are driven
//! by the same libblkio client (`virtio-blk-vhost-user` driver, through
//! [`vhost_agent_tests::blkio_client`]) at queue depth 32. Back-ends
//! alternate (agent, qsd, agent, qsd, ...) so drift of the machine (page
//! cache, writeback, thermal, neighbours) hits both alike; each run starts a
//! fresh back-end process. The result is a table of per-round IOPS, the
//! medians and the agent/qsd ratio. This is a benchmark, not a test: it
//! judges nothing, it only reports.
//!
//! Run it with `cargo bench -p vhost-agent-tests --bench blk_iops` (or
//! `scripts/bench-blk.sh`). Environment knobs:
//!
//! | variable             | default           | meaning                                     |
//! |----------------------|-------------------|---------------------------------------------|
//! | `BENCH_SECONDS`      | 5                 | measured seconds per workload and run       |
//! | `BENCH_WARMUP`       | 1                 | unmeasured warm-up seconds before each one  |
//! | `BENCH_ROUNDS`       | 3                 | rounds; each runs the agent, then qsd       |
//! | `BENCH_DIRECT`       | 0                 | 1: O_DIRECT in both back-ends               |
//! | `BENCH_IMAGE_MB`     | 1024              | image size in MiB (written in full first)   |
//! | `BENCH_QSD_AIO`      | probe             | qsd `aio=`; io_uring, else native/threads   |
//! | `BENCH_AGENT_ENGINE` | auto              | agent `engine=` (auto, io_uring, threads)   |
//! | `BENCH_DIR`          | `target/blk_iops` | where the image lives (not tmpfs if direct) |
//! | `VHOST_AGENT_BIN`    | build it          | a prebuilt agent binary to use instead      |
//!
//! Each run connects one client, runs random reads, then random writes
//! (each after its warm-up), disconnects, stops the back-end with SIGTERM
//! and fsyncs the image so one run's writeback does not land on the next.
//!
//! Nothing is pinned: on a small machine the back-end and the client share
//! the CPUs, and both back-ends face the same contention. The client's queue
//! is interrupt-driven (it sleeps on its completion eventfd), not polled.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vhost_agent_tests::bench::{catch_panic, load_average};
use vhost_agent_tests::blkio_client::{fill_pattern, BlkioClient, Direction, IoStats, Workload};
use vhost_agent_tests::support::{
    agent_binary, have_program, spawn_agent, workspace_root, ChildGuard,
};

/// Request size.
const BLOCK: usize = 4096;
/// Requests kept in flight.
const DEPTH: usize = 32;
/// Request queues, in the client and in both back-ends.
const QUEUES: usize = 1;
/// The client's queue index.
const QUEUE: usize = 0;
/// Seed of the offset sequence and of the preconditioning content.
const SEED: u64 = 0x626c_6b5f_696f_7073;
/// How long a back-end may take to create its socket or to exit.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

/// Where to point users who lack the QEMU tools.
const INSTALL_HINT: &str = "run `sudo scripts/install-test-deps.sh` to install it";

/// The benchmark's settings, from the environment.
#[derive(Debug, Clone)]
struct Config {
    /// Measured duration of one workload in one run.
    seconds: Duration,
    /// Unmeasured warm-up before each measured workload.
    warmup: Duration,
    /// Number of rounds (each runs every back-end once).
    rounds: usize,
    /// O_DIRECT in both back-ends.
    direct: bool,
    /// Image size in bytes.
    image_bytes: u64,
    /// qsd `aio=` forced by the user, or `None` to probe.
    qsd_aio: Option<String>,
    /// Agent `engine=` value.
    agent_engine: String,
    /// Directory for the image.
    dir: PathBuf,
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

impl Config {
    /// Settings from the `BENCH_*` environment variables.
    fn from_env() -> Result<Config, String> {
        let seconds: f64 = env_parse("BENCH_SECONDS", 5.0)?;
        let warmup: f64 = env_parse("BENCH_WARMUP", 1.0)?;
        let rounds: usize = env_parse("BENCH_ROUNDS", 3)?;
        let direct: u8 = env_parse("BENCH_DIRECT", 0)?;
        let image_mb: u64 = env_parse("BENCH_IMAGE_MB", 1024)?;
        if !(seconds > 0.0 && seconds.is_finite()) {
            return Err(format!("BENCH_SECONDS={seconds}: must be positive"));
        }
        if !(warmup >= 0.0 && warmup.is_finite()) {
            return Err(format!("BENCH_WARMUP={warmup}: must not be negative"));
        }
        if rounds == 0 {
            return Err("BENCH_ROUNDS=0: need at least one round".to_string());
        }
        if direct > 1 {
            return Err(format!("BENCH_DIRECT={direct}: expected 0 or 1"));
        }
        if image_mb < 1 {
            return Err("BENCH_IMAGE_MB=0: need at least 1 MiB".to_string());
        }
        let qsd_aio = std::env::var("BENCH_QSD_AIO")
            .ok()
            .filter(|v| !v.is_empty());
        let agent_engine =
            std::env::var("BENCH_AGENT_ENGINE").unwrap_or_else(|_| "auto".to_string());
        let dir = match std::env::var("BENCH_DIR") {
            Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| workspace_root().join("target"))
                .join("blk_iops"),
        };
        Ok(Config {
            seconds: Duration::from_secs_f64(seconds),
            warmup: Duration::from_secs_f64(warmup),
            rounds,
            direct: direct == 1,
            image_bytes: image_mb << 20,
            qsd_aio,
            agent_engine,
            dir,
        })
    }
}

/// The two back-ends under comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// `vhost-agent serve --blk ...` from this workspace.
    Agent,
    /// `qemu-storage-daemon --export type=vhost-user-blk ...`.
    Qsd,
}

impl Backend {
    /// Short name for the table.
    fn name(self) -> &'static str {
        match self {
            Backend::Agent => "agent",
            Backend::Qsd => "qsd",
        }
    }
}

/// What one run of one back-end achieved.
#[derive(Clone, Copy, Debug)]
struct RunResult {
    /// 4 KiB random reads.
    randread: IoStats,
    /// 4 KiB random writes.
    randwrite: IoStats,
}

/// A running back-end, its socket and its log.
struct Server {
    /// The process, killed on drop.
    guard: ChildGuard,
    /// Its vhost-user socket.
    socket: PathBuf,
    /// Its stderr.
    log: PathBuf,
    /// Whether it is the agent (whose log has levels) rather than qsd.
    is_agent: bool,
}

impl Server {
    /// The log's file name, which names the run (`agent-3.log`).
    fn log_name(&self) -> String {
        self.log
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// State shared by all runs.
struct Bench {
    /// Settings.
    config: Config,
    /// The preconditioned image.
    image: PathBuf,
    /// Directory for sockets and logs (short path: sockets live here).
    run_dir: tempfile::TempDir,
    /// qsd `aio=` mode that works here (settled by the first qsd start).
    qsd_aio: Option<String>,
    /// Engine the agent reported in its log.
    agent_engine: Option<String>,
    /// Runs started so far (numbers the sockets and logs).
    runs: usize,
    /// 1-minute load average before the first run.
    load_before: String,
    /// Oddities seen in the back-ends (exit status, log complaints).
    notes: Vec<String>,
}

/// Last `lines` lines of the file at `path`, for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return "(empty)".to_string();
    }
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// First line of `program --version`, or `"?"`.
fn program_version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".to_string())
}

/// Write the whole image with non-zero, per-block-distinct content and sync
/// it, so reads hit allocated, written blocks rather than holes.
fn precondition(path: &Path, size: u64) -> Result<(), String> {
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", path.display());
    let mut file = File::create(path).map_err(|e| fail("create", e))?;
    const CHUNK: usize = 1 << 20;
    let mut chunk = vec![0u8; CHUNK];
    let mut written = 0u64;
    while written < size {
        let len = (size - written).min(CHUNK as u64) as usize;
        for (i, block) in chunk[..len].chunks_mut(BLOCK).enumerate() {
            fill_pattern(written / BLOCK as u64 + i as u64, SEED, block);
        }
        file.write_all(&chunk[..len])
            .map_err(|e| fail("write", e))?;
        written += len as u64;
    }
    file.sync_all().map_err(|e| fail("fsync", e))
}

/// Flush the image's dirty pages so writeback left by one run does not land
/// on the next run (matters in buffered mode).
fn sync_image(path: &Path) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("fsync {}: {e}", path.display()))
}

/// Wait until the server's socket file exists; `Err` with its log if it
/// exits first or takes too long.
fn wait_for_socket(server: &mut Server) -> Result<(), String> {
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    while !server.socket.exists() {
        if let Ok(Some(status)) = server.guard.child.try_wait() {
            return Err(format!(
                "{} exited with {status} before creating {}; its log:\n{}",
                server.guard.name,
                server.socket.display(),
                log_tail(&server.log, 20)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} did not create {} within {PROCESS_TIMEOUT:?}; its log:\n{}",
                server.guard.name,
                server.socket.display(),
                log_tail(&server.log, 20)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

impl Bench {
    /// Fresh socket and log paths for a run of `backend`.
    fn next_paths(&mut self, backend: Backend) -> (PathBuf, PathBuf) {
        self.runs += 1;
        let stem = format!("{}-{}", backend.name(), self.runs);
        (
            self.run_dir.path().join(format!("{stem}.sock")),
            self.run_dir.path().join(format!("{stem}.log")),
        )
    }

    /// Start the agent on the image.
    fn start_agent(&mut self) -> Result<Server, String> {
        let (socket, log) = self.next_paths(Backend::Agent);
        let mut spec = format!(
            "socket={},image={},num-queues={QUEUES},engine={}",
            socket.display(),
            self.image.display(),
            self.config.agent_engine
        );
        if self.config.direct {
            spec.push_str(",direct");
        }
        let specs = [spec];
        let guard = catch_panic(|| spawn_agent(&specs, &[], Some(&log))).map_err(|e| {
            format!(
                "starting the agent failed: {e}\nagent log:\n{}",
                log_tail(&log, 20)
            )
        })?;
        if self.agent_engine.is_none() {
            // device.rs logs "... engine io_uring)" once the disk is open;
            // the socket exists only after that.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            self.agent_engine = text
                .lines()
                .find_map(|l| l.split_once("engine ").map(|(_, rest)| rest))
                .map(|rest| rest.trim_end_matches(')').to_string());
        }
        Ok(Server {
            guard,
            socket,
            log,
            is_agent: true,
        })
    }

    /// Start qsd with `aio` on the image.
    fn spawn_qsd(&mut self, aio: &str) -> Result<Server, String> {
        let (socket, log) = self.next_paths(Backend::Qsd);
        let blockdev = format!(
            "driver=file,node-name=file0,filename={},cache.direct={},aio={aio}",
            self.image.display(),
            if self.config.direct { "on" } else { "off" }
        );
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},\
             writable=on,num-queues={QUEUES}",
            socket.display()
        );
        let file = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let stdout = file
            .try_clone()
            .map_err(|e| format!("dup {}: {e}", log.display()))?;
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &blockdev, "--export", &export])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("spawning qemu-storage-daemon: {e}; {INSTALL_HINT}"))?;
        let mut server = Server {
            guard: ChildGuard {
                child,
                name: format!("qemu-storage-daemon (aio={aio})"),
            },
            socket,
            log,
            is_agent: false,
        };
        wait_for_socket(&mut server)?;
        Ok(server)
    }

    /// Start qsd; the first start settles the `aio=` mode: the one the user
    /// asked for, else io_uring, falling back to native (O_DIRECT only) and
    /// threads when qsd refuses it.
    fn start_qsd(&mut self) -> Result<Server, String> {
        if let Some(aio) = self.qsd_aio.clone() {
            return self.spawn_qsd(&aio);
        }
        let candidates: Vec<&str> = if self.config.direct {
            vec!["io_uring", "native", "threads"]
        } else {
            vec!["io_uring", "threads"]
        };
        let mut errors = Vec::new();
        for aio in candidates {
            match self.spawn_qsd(aio) {
                Ok(server) => {
                    if !errors.is_empty() {
                        eprintln!("blk_iops: qsd fell back to aio={aio}:");
                        for e in &errors {
                            eprintln!("  {e}");
                        }
                    }
                    self.qsd_aio = Some(aio.to_string());
                    return Ok(server);
                }
                Err(e) => errors.push(e),
            }
        }
        Err(format!(
            "qemu-storage-daemon would not start with any aio mode:\n{}",
            errors.join("\n")
        ))
    }

    /// Connect the client, retrying briefly: the socket file appears at
    /// bind(2), a moment before listen(2).
    fn connect(&self, server: &mut Server) -> Result<BlkioClient, String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match BlkioClient::connect(&server.socket, QUEUES, DEPTH * BLOCK) {
                Ok(client) => return Ok(client),
                Err(e) => {
                    let e = e.to_string();
                    if let Ok(Some(status)) = server.guard.child.try_wait() {
                        return Err(format!(
                            "{} exited with {status} while the client connected ({e}); its log:\n{}",
                            server.guard.name,
                            log_tail(&server.log, 20)
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "client cannot connect to {} at {}: {e}; its log:\n{}",
                            server.guard.name,
                            server.socket.display(),
                            log_tail(&server.log, 20)
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// One workload: warm-up, then the measured stretch over the whole
    /// disk. Every run uses the same seed, so both back-ends see the same
    /// offsets in the same order.
    fn workload(
        &self,
        client: &mut BlkioClient,
        server: &mut Server,
        direction: Direction,
    ) -> Result<IoStats, String> {
        let workload = Workload {
            direction,
            block_size: BLOCK,
            depth: DEPTH,
            span: 0,
            duration: self.config.seconds,
            warmup: self.config.warmup,
            seed: SEED,
        };
        client.queue(QUEUE).run_workload(&workload).map_err(|e| {
            let exited = match server.guard.child.try_wait() {
                Ok(Some(status)) => format!(" ({} exited with {status})", server.guard.name),
                _ => String::new(),
            };
            format!(
                "{direction:?} workload against {} failed: {e}{exited}; its log:\n{}",
                server.guard.name,
                log_tail(&server.log, 20)
            )
        })
    }

    /// One run: start `backend`, measure randread then randwrite, stop it.
    fn run(&mut self, backend: Backend) -> Result<RunResult, String> {
        let mut server = match backend {
            Backend::Agent => self.start_agent()?,
            Backend::Qsd => self.start_qsd()?,
        };
        let mut client = self.connect(&mut server)?;
        let capacity = client.capacity();
        if capacity != self.config.image_bytes {
            return Err(format!(
                "{} reports a capacity of {capacity} bytes, the image has {}",
                server.guard.name, self.config.image_bytes
            ));
        }
        let randread = self.workload(&mut client, &mut server, Direction::Read)?;
        let randwrite = self.workload(&mut client, &mut server, Direction::Write)?;
        drop(client);
        self.stop(server)?;
        sync_image(&self.image)?;
        Ok(RunResult {
            randread,
            randwrite,
        })
    }

    /// SIGTERM the back-end and wait for it; one that will not exit is
    /// killed and reported, since it could still be touching the image.
    /// A non-zero exit status and the log's complaints become notes.
    fn stop(&mut self, mut server: Server) -> Result<(), String> {
        server.guard.signal(libc::SIGTERM);
        let result = match server.guard.wait_timeout(PROCESS_TIMEOUT) {
            Some(status) if status.success() => Ok(()),
            Some(status) => {
                self.notes.push(format!(
                    "{}: exited with {status} after SIGTERM",
                    server.guard.name
                ));
                Ok(())
            }
            None => Err(format!(
                "{} did not exit within {PROCESS_TIMEOUT:?} of SIGTERM; its log:\n{}",
                server.guard.name,
                log_tail(&server.log, 20)
            )),
        };
        self.note_log(&server);
        result
    }

    /// Keep the log lines of `server` that complain: the agent's WARN and
    /// ERROR lines, and anything qsd printed (it is silent when all is well).
    fn note_log(&mut self, server: &Server) {
        const MAX_LINES: usize = 5;
        let text = std::fs::read_to_string(&server.log).unwrap_or_default();
        let complaints: Vec<&str> = text
            .lines()
            .filter(|line| {
                !line.trim().is_empty()
                    && (!server.is_agent || line.contains(" WARN ") || line.contains(" ERROR "))
            })
            .collect();
        for line in complaints.iter().take(MAX_LINES) {
            self.notes.push(format!(
                "{} ({}): {line}",
                server.guard.name,
                server.log_name()
            ));
        }
        if complaints.len() > MAX_LINES {
            self.notes.push(format!(
                "{} ({}): ... {} more",
                server.guard.name,
                server.log_name(),
                complaints.len() - MAX_LINES
            ));
        }
    }
}

/// Median of `values` (mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    // For an odd count both indices name the middle element.
    let n = sorted.len();
    (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0
}

/// The printed report.
fn table(bench: &Bench, agent_bin: &Path, results: &[(usize, Backend, RunResult)]) -> String {
    let c = &bench.config;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "blk_iops: 4 KiB random I/O, queue depth {DEPTH}, {QUEUES} queue, \
         libblkio virtio-blk-vhost-user client (interrupt-driven queue)"
    );
    let _ = writeln!(
        out,
        "image:    {} MiB raw, fully written first, {} (removed afterwards)",
        c.image_bytes >> 20,
        bench.image.display()
    );
    let _ = writeln!(
        out,
        "mode:     {}; {:.1} s measured + {:.1} s warm-up per workload, {} round(s); \
         {} CPU(s), nothing pinned",
        if c.direct {
            "direct=1 (O_DIRECT in both back-ends)"
        } else {
            "direct=0 (buffered, page cache)"
        },
        c.seconds.as_secs_f64(),
        c.warmup.as_secs_f64(),
        c.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        out,
        "agent:    {} (engine {})",
        agent_bin.display(),
        bench.agent_engine.as_deref().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "qsd:      {} (aio={})",
        program_version(Path::new("qemu-storage-daemon")),
        bench.qsd_aio.as_deref().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "load:     1-min load average {} before, {} after (other work skews the figures)",
        bench.load_before,
        load_average()
    );
    let _ = writeln!(out);
    let row = |out: &mut String, label: &str, backend: &str, read: f64, write: f64, lat: String| {
        let _ = writeln!(
            out,
            "{label:<8} {backend:<8} {read:>14.0} {write:>15.0}{lat}"
        );
    };
    let _ = writeln!(
        out,
        "{:<8} {:<8} {:>14} {:>15} {:>12} {:>13}",
        "round", "backend", "randread IOPS", "randwrite IOPS", "read lat us", "write lat us"
    );
    for (round, backend, r) in results {
        row(
            &mut out,
            &round.to_string(),
            backend.name(),
            r.randread.iops,
            r.randwrite.iops,
            format!(
                " {:>12.1} {:>13.1}",
                r.randread.mean_latency_us, r.randwrite.mean_latency_us
            ),
        );
    }
    let medians = |backend: Backend| -> (f64, f64) {
        let runs: Vec<&RunResult> = results
            .iter()
            .filter(|(_, b, _)| *b == backend)
            .map(|(_, _, r)| r)
            .collect();
        let read: Vec<f64> = runs.iter().map(|r| r.randread.iops).collect();
        let write: Vec<f64> = runs.iter().map(|r| r.randwrite.iops).collect();
        (median(&read), median(&write))
    };
    let (agent_read, agent_write) = medians(Backend::Agent);
    let (qsd_read, qsd_write) = medians(Backend::Qsd);
    let _ = writeln!(out, "{}", "-".repeat(75));
    row(
        &mut out,
        "median",
        "agent",
        agent_read,
        agent_write,
        String::new(),
    );
    row(
        &mut out,
        "median",
        "qsd",
        qsd_read,
        qsd_write,
        String::new(),
    );
    let _ = writeln!(
        out,
        "{:<17} {:>14.3} {:>15.3}",
        "ratio agent/qsd",
        agent_read / qsd_read,
        agent_write / qsd_write
    );
    let _ = writeln!(out);
    if bench.notes.is_empty() {
        let _ = writeln!(
            out,
            "back-end logs: no warnings or errors; every back-end exited cleanly on SIGTERM"
        );
    } else {
        let _ = writeln!(out, "back-end notes:");
        for note in &bench.notes {
            let _ = writeln!(out, "  {note}");
        }
    }
    out
}

/// The whole benchmark.
fn bench() -> Result<(), String> {
    let config = Config::from_env()?;
    if !have_program("qemu-storage-daemon") {
        return Err(format!(
            "qemu-storage-daemon is not on PATH; it is the baseline of this benchmark: \
             {INSTALL_HINT}"
        ));
    }
    // Cargo's own errors are on stderr above this message.
    let agent_bin = catch_panic(agent_binary).map_err(|e| {
        format!(
            "the agent binary is not available: {e} (set VHOST_AGENT_BIN to use a prebuilt one)"
        )
    })?;
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| format!("create {}: {e}", config.dir.display()))?;
    let image_dir = tempfile::Builder::new()
        .prefix("blk_iops.")
        .tempdir_in(&config.dir)
        .map_err(|e| format!("temporary directory in {}: {e}", config.dir.display()))?;
    let image = image_dir.path().join("bench.img");
    let run_dir = tempfile::Builder::new()
        .prefix("blk_iops.")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;

    eprintln!(
        "blk_iops: preconditioning {} MiB at {} ...",
        config.image_bytes >> 20,
        image.display()
    );
    let started = Instant::now();
    precondition(&image, config.image_bytes)?;
    eprintln!(
        "blk_iops: preconditioned in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let rounds = config.rounds;
    let mut bench = Bench {
        config,
        image,
        run_dir,
        qsd_aio: None,
        agent_engine: None,
        runs: 0,
        load_before: load_average(),
        notes: Vec::new(),
    };
    bench.qsd_aio = bench.config.qsd_aio.clone();
    let mut results = Vec::new();
    for round in 1..=rounds {
        for backend in [Backend::Agent, Backend::Qsd] {
            let r = bench.run(backend)?;
            eprintln!(
                "blk_iops: round {round} {:<5}: randread {:>8.0} IOPS, randwrite {:>8.0} IOPS",
                backend.name(),
                r.randread.iops,
                r.randwrite.iops
            );
            results.push((round, backend, r));
        }
    }
    println!();
    print!("{}", table(&bench, &agent_bin, &results));
    Ok(())
}

fn main() -> ExitCode {
    // `cargo test --benches` runs bench targets without `--bench`: there is
    // nothing to check, and a minute-long measurement is not wanted there.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "blk_iops: a benchmark; run it with `cargo bench -p vhost-agent-tests --bench blk_iops`"
        );
        return ExitCode::SUCCESS;
    }
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk_iops: error: {e}");
            ExitCode::FAILURE
        }
    }
}
