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
//! nothing, it only reports. The measuring code is
//! `vhost_agent_tests::blk_stop`, shared with the experiment runner
//! (`vhost-agent experiment`).
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
use std::time::Instant;

use vhost_agent_tests::blk_stop::{median, StopAgent, StopMode, MAX_INFLIGHT};
use vhost_agent_tests::support::agent_binary;

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

/// Medians of one (latency, count, mode) cell.
struct Cell {
    stop_us: u128,
    in_flight: usize,
}

fn measure_cell(
    agent: &StopAgent,
    mode: StopMode,
    count: usize,
    reps: usize,
) -> Result<Cell, String> {
    let mut stops = Vec::with_capacity(reps);
    let mut in_flight = Vec::with_capacity(reps);
    for _ in 0..reps {
        let sample = agent.measure(mode, count)?;
        stops.push(sample.stop.as_micros());
        in_flight.push(sample.in_flight);
    }
    Ok(Cell {
        stop_us: median(&mut stops).unwrap_or_default(),
        in_flight: median(&mut in_flight).unwrap_or_default(),
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
        let agent = StopAgent::start(latency_ms)?;
        for &count in &config.inflight {
            let drain = measure_cell(&agent, StopMode::Drain, count, config.reps)?;
            let suspend = measure_cell(&agent, StopMode::Suspend, count, config.reps)?;
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
