//! `vhost-agent experiment`: the command line of the presetup and
//! downtime experiment runner.
//!
//! Drives agents spawned from this binary (`vhost-agent serve`) with the
//! test front-end through a scenario matrix (net: presetup off/on per sim
//! profile, queue pairs and guest RAM; blk: drain versus suspend per
//! in-flight count and storage latency), prints one progress line per
//! scenario on stderr, writes `results.csv`, `results.json` and SVG charts
//! into `--out`, and prints Markdown summary tables on stdout.
//!
//! ```sh
//! cargo run --release -p vhost-agent -- experiment --help
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::ValueEnum;
use vhost_agent_frontend::bench::{catch_panic, load_average};
use vhost_agent_frontend::blk_stop::MAX_INFLIGHT;
use vhost_agent_frontend::support::{agent_binary, use_agent_binary};

use super::{chart, net::profile_name, report, run, BlkMatrix, Matrix, NetMatrix};

/// Which half of the matrix to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Only {
    /// Net destination starts, without and with presetup.
    Net,
    /// Blk source stops, drain and suspend.
    Blk,
}

/// `--help` of `vhost-agent experiment`.
pub const ABOUT: &str = "\
Presetup / downtime experiment runner for vhost-agent.

Net: a fresh agent with one `sim` net device per run; the test
front-end (a QEMU stand-in) connects and negotiates, then, with
presetup on, the control API `presetup` gets the early configuration,
then the device is started and one frame per queue pair must come back.
Measured: the agent's start critical path (`query-metrics`), the
front-end's time from the first start message to the last frame back,
and the presetup op counters. The `sim` dataplane charges each heavy op
what its profile says: the figures come from that cost model, not from
hardware.

Blk: one agent per storage latency; N requests on the ring, then
SET_VRING_ENABLE(0) and GET_VRING_BASE timed from send to reply, with
the front-end acking only INFLIGHT_SHMFD (drain) or also
GET_VRING_BASE_INFLIGHT (suspend).

A scenario that does not work is reported as failed, not measured; the
exit status is then 2 (after all files are written).";

/// Options of `vhost-agent experiment`.
#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// Run only the net or only the blk scenarios.
    #[arg(long, value_enum)]
    only: Option<Only>,

    /// Smoke run: one repetition (unless --reps is given) and only the
    /// first value of every list below.
    #[arg(long)]
    quick: bool,

    /// Repetitions of every scenario (medians are reported). [default: 5]
    #[arg(long)]
    reps: Option<usize>,

    /// Sim cost profile (JSON) for the net scenarios; repeat for several.
    /// [default: the built-in vdpa-191ms profile, netdev/profiles/vdpa-191ms.json]
    #[arg(long = "profile", value_name = "FILE")]
    profiles: Vec<PathBuf>,

    /// Queue pair counts of the net device (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    queue_pairs: Vec<u16>,

    /// Guest RAM sizes of the test front-end in MiB (comma-separated; a
    /// sparse memfd, so large sizes are cheap).
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    memory_mib: Vec<u64>,

    /// MTU the net front-end sets with NET_SET_MTU as the first message of
    /// the start, as QEMU does with `host_mtu=` (the sim charges
    /// `set_mtu`); 0: no NET_SET_MTU. The early configuration carries it.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,

    /// Requests in flight when the blk source stops (comma-separated,
    /// 1..=128).
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    in_flight: Vec<usize>,

    /// Storage latency per blk request in ms, the agent's `latency-ms=`
    /// (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    latency_ms: Vec<u64>,

    /// Directory for results.csv, results.json and the SVG charts (and the
    /// built-in profile, when it is used). [default: target/experiment]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// The first element only, under `--quick`.
fn trim<T: Clone>(values: &[T], quick: bool) -> Vec<T> {
    if quick {
        values.iter().take(1).cloned().collect()
    } else {
        values.to_vec()
    }
}

impl ExperimentArgs {
    fn matrix(&self, out: &Path) -> anyhow::Result<Matrix> {
        let reps = self.reps.unwrap_or(if self.quick { 1 } else { 5 });
        if reps == 0 {
            bail!("--reps must be at least 1");
        }
        let net = if self.only == Some(Only::Blk) {
            None
        } else {
            let paths = if self.profiles.is_empty() {
                vec![builtin_profile(out)?]
            } else {
                self.profiles.clone()
            };
            let mut profiles = Vec::new();
            for path in trim(&paths, self.quick) {
                let path = std::fs::canonicalize(&path)
                    .with_context(|| format!("sim profile {}", path.display()))?;
                let name = profile_name(&path).map_err(anyhow::Error::msg)?;
                profiles.push((path, name));
            }
            if let Some(bad) = self.queue_pairs.iter().find(|&&n| n == 0) {
                bail!("--queue-pairs: {bad} is not a queue pair count");
            }
            if let Some(bad) = self.memory_mib.iter().find(|&&n| n < 16) {
                bail!("--memory-mib: {bad} MiB is too small (at least 16)");
            }
            if (1..68).contains(&self.mtu) {
                bail!("--mtu: {} is below 68 (0 turns NET_SET_MTU off)", self.mtu);
            }
            Some(NetMatrix {
                mtu: (self.mtu != 0).then_some(self.mtu),
                profiles,
                queue_pairs: trim(&self.queue_pairs, self.quick),
                memory_mib: trim(&self.memory_mib, self.quick),
            })
        };
        let blk = if self.only == Some(Only::Net) {
            None
        } else {
            if let Some(bad) = self.in_flight.iter().find(|&&n| n == 0 || n > MAX_INFLIGHT) {
                bail!("--in-flight: {bad} is not in 1..={MAX_INFLIGHT}");
            }
            Some(BlkMatrix {
                in_flight: trim(&self.in_flight, self.quick),
                latency_ms: trim(&self.latency_ms, self.quick),
            })
        };
        Ok(Matrix { net, blk, reps })
    }
}

/// The built-in `vdpa-191ms` profile, written to `out/profiles` (the
/// agents read profiles from files; the copy also records what was used).
fn builtin_profile(out: &Path) -> anyhow::Result<PathBuf> {
    let dir = out.join("profiles");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("vdpa-191ms.json");
    std::fs::write(&path, netdev::sim::VDPA_191MS_PROFILE)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Run the experiment: `Ok(false)` when a scenario failed (the files are
/// written all the same).
pub fn run_experiment(args: &ExperimentArgs) -> anyhow::Result<bool> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/experiment"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let matrix = args.matrix(&out)?;
    // The agents are this binary, not a workspace build.
    let exe = std::env::current_exe().context("cannot find this program's own executable")?;
    use_agent_binary(exe);
    let agent = catch_panic(agent_binary).map_err(anyhow::Error::msg)?;

    let scenarios = matrix.scenarios().len();
    eprintln!(
        "experiment: {scenarios} scenario(s) x {} repetition(s), agent {}, load {}",
        matrix.reps,
        agent.display(),
        load_average()
    );
    let load_before = load_average();
    let started = Instant::now();
    let records = run(&matrix, |index, total, records| {
        eprintln!("{}", report::progress_line(index, total, records));
    });
    let elapsed = started.elapsed();

    let settings = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "reps": matrix.reps,
        "net": matrix.net.as_ref().map(|net| serde_json::json!({
            "profiles": net.profiles.iter().map(|(path, name)| serde_json::json!({
                "path": path, "name": name,
            })).collect::<Vec<_>>(),
            "queue_pairs": net.queue_pairs,
            "memory_mib": net.memory_mib,
            "mtu": net.mtu,
        })),
        "blk": matrix.blk.as_ref().map(|blk| serde_json::json!({
            "in_flight": blk.in_flight,
            "latency_ms": blk.latency_ms,
        })),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "elapsed_s": elapsed.as_secs_f64(),
        "note": "net figures come from the sim dataplane's cost model, not from hardware",
    });
    let csv_path = out.join("results.csv");
    std::fs::write(&csv_path, report::to_csv(&records))
        .with_context(|| format!("write {}", csv_path.display()))?;
    let json_path = out.join("results.json");
    let json = report::to_json(&records, settings);
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;

    let summaries = report::summaries(&records);
    let mut written = vec![csv_path, json_path];
    for (chart, name) in [
        (chart::presetup_chart(&summaries), "presetup-start.svg"),
        (chart::blk_stop_chart(&summaries), "blk-stop.svg"),
    ] {
        if let Some(chart) = chart {
            let path = out.join(name);
            match chart::render_svg(&chart, &path) {
                Ok(()) => written.push(path),
                // A chart with nothing to draw (every scenario failed)
                // is no reason to lose the tables.
                Err(e) => eprintln!("experiment: no chart: {e}"),
            }
        }
    }

    if matrix.net.is_some() {
        println!("Start critical path on the destination (agent's `query-metrics`, median of {} run(s); sim cost model):\n", matrix.reps);
        println!("{}", report::net_table(&summaries));
        println!("Front-end view (first start message to the last queue pair's frame back) and heavy ops applied at the start:\n");
        println!("{}", report::net_frontend_table(&summaries));
    }
    if matrix.blk.is_some() {
        println!(
            "Source stop time (GET_VRING_BASE send to reply, median of {} run(s)):\n",
            matrix.reps
        );
        println!("{}", report::blk_table(&summaries));
    }
    let failed = records.iter().filter(|r| r.outcome.is_err()).count();
    eprintln!(
        "experiment: {} run(s), {failed} failed, {:.1} s; wrote {}",
        records.len(),
        elapsed.as_secs_f64(),
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(failed == 0)
}
