//! `blk_stop`: how long the source of a migration is stopped in
//! GET_VRING_BASE, draining versus suspending, as the work in flight grows.
//!
//! A vhost-user-blk source stops each ring with SET_VRING_ENABLE(0) and
//! GET_VRING_BASE; the guest stays paused until the reply. Without protocol
//! bit 20 (QEMU 10) the agent drains: every request in flight finishes on
//! storage first. With bits 12 and 20 (QEMU 11's `inflight-migration=on`)
//! it suspends: it replies at once and leaves the requests in the inflight
//! region for the destination.
//!
//! One agent per storage latency (`latency-ms=N`: every storage operation
//! starts N ms after submission, standing in for a slow or remote disk),
//! one fresh test front-end connection per measurement. Each measurement
//! puts N 4 KiB requests (half reads, half writes) on the ring with one
//! kick, waits until the agent has taken them all, sends SET_VRING_ENABLE(0)
//! and times GET_VRING_BASE from send to reply. The table shows medians over
//! the repetitions, how many requests were still in flight at the stop, and
//! the drain/suspend ratio. This is a benchmark, not a test: it judges
//! nothing, it only reports.
//!
//! Run it with `cargo bench -p vhost-agent-tests --bench blk_stop` (or
//! `scripts/bench-stop.sh`). Environment knobs:
//!
//! | variable             | default    | meaning                                   |
//! |----------------------|------------|-------------------------------------------|
//! | `BENCH_REPS`         | 5          | measurements per cell (median reported)   |
//! | `BENCH_LATENCIES_MS` | 0,10,100   | storage latencies, one agent each         |
//! | `BENCH_INFLIGHT`     | 1,32,128   | requests on the ring at the stop (≤ 128)  |
//! | `VHOST_AGENT_BIN`    | build it   | a prebuilt agent binary to use instead    |
//!
//! With the defaults it runs in about ten seconds.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserFrontend;
use vhost_agent_tests::frontend::{
    wait_until, BlkRequest, StartOptions, StopRequest, TestFrontend, PROTOCOL_F_INFLIGHT_SHMFD,
    PROTOCOL_SUSPEND,
};
use vhost_agent_tests::support::{agent_binary, create_image, spawn_agent, ChildGuard};

/// Ring size.
const QUEUE_SIZE: u16 = 256;
/// Request size.
const BLOCK: u32 = 4096;
/// Most requests one measurement may put on the ring (buffer slots).
const MAX_INFLIGHT: usize = 128;
/// How long the agent may take to take the requests off the ring.
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The benchmark's settings, from the environment.
struct Config {
    /// Measurements per cell.
    reps: usize,
    /// Storage latencies in ms.
    latencies_ms: Vec<u64>,
    /// Requests per measurement.
    inflight: Vec<usize>,
}

/// Read a comma-separated list of numbers from `name`, or use `default`.
fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Result<Vec<T>, String> {
    let value = std::env::var(name).unwrap_or_else(|_| default.to_string());
    let value = if value.trim().is_empty() {
        default.to_string()
    } else {
        value
    };
    value
        .split(',')
        .map(|item| {
            item.trim()
                .parse()
                .map_err(|_| format!("{name}={value}: `{item}` is not a number"))
        })
        .collect()
}

impl Config {
    /// Settings from the `BENCH_*` environment variables.
    fn from_env() -> Result<Config, String> {
        let reps: Vec<usize> = env_list("BENCH_REPS", "5")?;
        let reps = match reps.as_slice() {
            [n] if *n > 0 => *n,
            _ => return Err("BENCH_REPS: expected one positive number".to_string()),
        };
        let latencies_ms = env_list("BENCH_LATENCIES_MS", "0,10,100")?;
        let inflight: Vec<usize> = env_list("BENCH_INFLIGHT", "1,32,128")?;
        if let Some(bad) = inflight.iter().find(|&&n| n == 0 || n > MAX_INFLIGHT) {
            return Err(format!(
                "BENCH_INFLIGHT: {bad} is not in 1..={MAX_INFLIGHT}"
            ));
        }
        Ok(Config {
            reps,
            latencies_ms,
            inflight,
        })
    }
}

/// How the source is stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Bit 12 only: GET_VRING_BASE drains.
    Drain,
    /// Bits 12 and 20: GET_VRING_BASE suspends.
    Suspend,
}

impl Mode {
    fn protocol(self) -> u64 {
        match self {
            Mode::Drain => PROTOCOL_F_INFLIGHT_SHMFD,
            Mode::Suspend => PROTOCOL_SUSPEND,
        }
    }
}

/// One measurement.
struct Sample {
    /// GET_VRING_BASE, send to reply.
    stop: Duration,
    /// Requests not yet completed when GET_VRING_BASE was sent.
    in_flight: usize,
}

/// An agent serving a scratch image with `latency-ms` set.
struct Agent {
    _guard: ChildGuard,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    latency: Duration,
}

impl Agent {
    fn start(latency_ms: u64) -> Agent {
        let dir = tempfile::tempdir().expect("scratch directory");
        let image = dir.path().join("disk.img");
        let socket = dir.path().join("disk.sock");
        create_image(&image, 64 << 20).expect("create the image");
        let spec = format!(
            "socket={},image={},latency-ms={latency_ms}",
            socket.display(),
            image.display()
        );
        let guard = spawn_agent(&[spec], &[], Some(&dir.path().join("agent.log")));
        Agent {
            _guard: guard,
            _dir: dir,
            socket,
            latency: Duration::from_millis(latency_ms),
        }
    }

    /// Connect, put `count` requests on the ring, stop it, time the stop.
    fn measure(&self, mode: Mode, count: usize) -> Result<Sample, String> {
        let options = StartOptions::with_protocol(1, QUEUE_SIZE, mode.protocol());
        let mut fe = TestFrontend::start(&self.socket, &options);
        let requests: Vec<BlkRequest> = (0..count as u64)
            .map(|block| {
                let sector = block * u64::from(BLOCK / 512);
                if block % 2 == 0 {
                    fe.fill(block, &[block as u8; BLOCK as usize]);
                    BlkRequest::write(block, sector, BLOCK)
                } else {
                    BlkRequest::read(block, sector, BLOCK)
                }
            })
            .collect();
        fe.submit(0, &requests);
        // Taken = marked in flight or already published as used.
        let in_flight = || fe.region().queue(0).inflight_count();
        let taken = wait_until(TAKE_TIMEOUT, || {
            in_flight() + usize::from(fe.queues[0].pending_used(&fe.ram)) >= count
        });
        if !taken {
            return Err(format!("the agent did not take {count} requests"));
        }
        let in_flight = in_flight();
        fe.frontend
            .set_vring_enable(0, false)
            .map_err(|e| format!("SET_VRING_ENABLE(0): {e}"))?;
        let (_, stop) = fe.get_vring_base_timed(0, StopRequest::GetVringBase);
        drop(fe);
        if mode == Mode::Suspend {
            // Let the abandoned operations finish before the next
            // measurement, so they do not compete with it.
            std::thread::sleep(self.latency + Duration::from_millis(20));
        }
        Ok(Sample { stop, in_flight })
    }
}

/// The median of `values` (upper median for an even count).
fn median<T: Ord + Copy>(values: &mut [T]) -> T {
    values.sort_unstable();
    values[values.len() / 2]
}

/// Medians of one (latency, count, mode) cell.
struct Cell {
    stop_us: u128,
    in_flight: usize,
}

fn measure_cell(agent: &Agent, mode: Mode, count: usize, reps: usize) -> Result<Cell, String> {
    let mut stops = Vec::with_capacity(reps);
    let mut in_flight = Vec::with_capacity(reps);
    for _ in 0..reps {
        let sample = agent.measure(mode, count)?;
        stops.push(sample.stop.as_micros());
        in_flight.push(sample.in_flight);
    }
    Ok(Cell {
        stop_us: median(&mut stops),
        in_flight: median(&mut in_flight),
    })
}

fn bench() -> Result<(), String> {
    let config = Config::from_env()?;
    // Build the agent before the table starts.
    agent_binary();
    let started = Instant::now();
    println!(
        "blk_stop: GET_VRING_BASE send-to-reply, median of {} per cell (µs)",
        config.reps
    );
    println!(
        "{:>10} {:>9} {:>14} {:>12} {:>14} {:>12} {:>14}",
        "latency_ms",
        "requests",
        "drain_inflight",
        "drain_us",
        "susp_inflight",
        "suspend_us",
        "drain/suspend"
    );
    for &latency_ms in &config.latencies_ms {
        let agent = Agent::start(latency_ms);
        for &count in &config.inflight {
            let drain = measure_cell(&agent, Mode::Drain, count, config.reps)?;
            let suspend = measure_cell(&agent, Mode::Suspend, count, config.reps)?;
            let ratio = drain.stop_us as f64 / suspend.stop_us.max(1) as f64;
            println!(
                "{:>10} {:>9} {:>14} {:>12} {:>14} {:>12} {:>14.1}",
                latency_ms,
                count,
                drain.in_flight,
                drain.stop_us,
                suspend.in_flight,
                suspend.stop_us,
                ratio
            );
        }
    }
    println!(
        "(inflight: requests not yet completed when GET_VRING_BASE was sent; \
         total {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    // `cargo test --benches` runs bench targets without `--bench`: there is
    // nothing to check there.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "blk_stop: a benchmark; run it with `cargo bench -p vhost-agent-tests --bench blk_stop`"
        );
        return ExitCode::SUCCESS;
    }
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk_stop: error: {e}");
            ExitCode::FAILURE
        }
    }
}
