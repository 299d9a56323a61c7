//! `vdpa-frontend`: the lab's minimal vhost-vdpa front-end (see
//! `labnic::frontend`). Prints `LAB-RESULT fe_...` lines and exits non-zero
//! on any failure; `--expect-dirty FILE` writes the pages the device must
//! have written, in labnic's dirty-log format.
//!
//! ```text
//! vdpa-frontend --path /dev/vhost-vdpa-0 [--pairs N] [--frames N] [--window N]
//!               [--phases N] [--expect-dirty FILE]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use labnic::frontend::{run, FrontendOptions};
use labnic::memory::write_dirty_log;

/// Drive a vhost-vdpa net device with numbered test frames and check that
/// every one comes back (a loopback device such as labnic).
#[derive(Parser, Debug)]
#[command(name = "vdpa-frontend", version)]
struct Cli {
    /// The vhost-vdpa device.
    #[arg(long, default_value = "/dev/vhost-vdpa-0")]
    path: PathBuf,
    /// Queue pairs to use (default: all the device offers).
    #[arg(long)]
    pairs: Option<u16>,
    /// Frames per pair per phase.
    #[arg(long, default_value_t = 20_000)]
    frames: u64,
    /// Frames in flight per pair.
    #[arg(long, default_value_t = 64)]
    window: u16,
    /// Phases, with a stop (GET_VRING_BASE, reset) and restart between two.
    #[arg(long, default_value_t = 2)]
    phases: u32,
    /// Ring size.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Seconds without progress before giving up.
    #[arg(long, default_value_t = 30)]
    stall_s: u64,
    /// Write the pages the device must have written here.
    #[arg(long)]
    expect_dirty: Option<PathBuf>,
    /// Negotiate EVENT_IDX: kick only when the device's avail_event asks,
    /// be interrupted only when our used_event asks.
    #[arg(long)]
    event_idx: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !cli.queue_size.is_power_of_two() || cli.window == 0 || cli.window > cli.queue_size {
        bail!("--queue-size must be a power of two and --window in 1..=queue size");
    }
    let options = FrontendOptions {
        path: cli.path.clone(),
        pairs: cli.pairs,
        frames: cli.frames,
        window: cli.window,
        phases: cli.phases.max(1),
        queue_size: cli.queue_size,
        stall: Duration::from_secs(cli.stall_s),
        event_idx: cli.event_idx,
    };
    let report = match run(&options) {
        Ok(r) => r,
        Err(e) => {
            println!("LAB-RESULT fe_ok=0");
            return Err(e).with_context(|| format!("vdpa-frontend on {}", cli.path.display()));
        }
    };
    let mut line = format!(
        "LAB-RESULT fe_ok=1 fe_pairs={} fe_offered={:#x} fe_negotiated={:#x} fe_backend_features={:#x} fe_mismatches={}",
        report.pairs, report.offered, report.negotiated, report.backend_features, report.mismatches
    );
    let sent: u64 = report.sent.iter().sum();
    let received: u64 = report.received.iter().sum();
    line.push_str(&format!(" fe_sent={sent} fe_received={received}"));
    for (p, (s, r)) in report.sent.iter().zip(&report.received).enumerate() {
        line.push_str(&format!(" fe_q{p}_sent={s} fe_q{p}_received={r}"));
    }
    let wrong = report
        .bases
        .iter()
        .filter(|(_, want, got)| want != got)
        .count();
    line.push_str(&format!(
        " fe_bases={} fe_bases_wrong={wrong}",
        report.bases.len()
    ));
    for (i, (secs, frames)) in report
        .phase_seconds
        .iter()
        .zip(&report.phase_frames)
        .enumerate()
    {
        let fps = if *secs > 0.0 {
            *frames as f64 / secs
        } else {
            0.0
        };
        line.push_str(&format!(
            " fe_phase{i}_ms={:.0} fe_phase{i}_fps={fps:.0}",
            secs * 1000.0
        ));
    }
    line.push_str(&format!(
        " fe_written_pages={} fe_kicks={} fe_kicks_spared={} fe_late_wakeups={}",
        report.written_pages.len(),
        report.kicks,
        report.kicks_spared,
        report.late_wakeups
    ));
    println!("{line}");
    for (vq, want, got) in &report.bases {
        if want != got {
            println!("vdpa-frontend: vq {vq}: GET_VRING_BASE {got}, the driver expected {want}");
        }
    }
    if let Some(path) = &cli.expect_dirty {
        write_dirty_log(path, &report.written_pages)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.mismatches > 0 || wrong > 0 {
        bail!(
            "{} frames came back wrong, {wrong} ring bases were not exact",
            report.mismatches
        );
    }
    Ok(())
}
