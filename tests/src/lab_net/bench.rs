//! Figures, not checks of speed: frames per second through one agent's
//! device and the CPU time the agent's process spent per million frames,
//! split into the agent's own threads and the kernel's vhost worker
//! threads (since Linux 6.4 a vhost worker is a thread of the process that
//! owns the device, named `vhost-PID`). Run once on `vhost-net:TAP` and
//! once on `tap:TAP` (the agent's own copy path) in the same lab boot.

use std::path::Path;
use std::time::Instant;

use super::driver::NetGuest;
use super::report::Report;
use super::tapside::TapCounters;
use super::traffic::{self, STALL};

/// CPU time of a process's threads, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// The agent's own threads.
    pub agent: u64,
    /// The kernel's vhost workers (`vhost-PID`).
    pub vhost: u64,
}

impl Cpu {
    /// Read `/proc/PID/task/*/stat`.
    pub fn read(pid: u32) -> Result<Cpu, String> {
        let mut cpu = Cpu::default();
        let dir = format!("/proc/{pid}/task");
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
                continue; // the thread ended meanwhile
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            // After the name: state, then fields 4.. of proc(5); utime
            // and stime are fields 14 and 15.
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let ticks: u64 = [11, 12]
                .iter()
                .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
                .sum();
            // A vhost worker is `vhost-PID` (the agent itself is
            // `vhost-agent`).
            let worker = comm
                .strip_prefix("vhost-")
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()));
            if worker {
                cpu.vhost += ticks;
            } else {
                cpu.agent += ticks;
            }
        }
        Ok(cpu)
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            agent: self.agent.saturating_sub(before.agent),
            vhost: self.vhost.saturating_sub(before.vhost),
        }
    }
}

/// Milliseconds per clock tick.
fn tick_ms() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        1000.0 / hz as f64
    } else {
        10.0
    }
}

fn report_cpu(report: &mut Report, prefix: &str, cpu: Cpu, frames: u64) {
    let ms = tick_ms();
    let per_mframe = |ticks: u64| {
        if frames == 0 {
            0.0
        } else {
            ticks as f64 * ms * 1e6 / frames as f64
        }
    };
    report.put(
        &format!("{prefix}agent_cpu_ms"),
        format!("{:.0}", cpu.agent as f64 * ms),
    );
    report.put(
        &format!("{prefix}vhost_cpu_ms"),
        format!("{:.0}", cpu.vhost as f64 * ms),
    );
    report.put(
        &format!("{prefix}agent_ms_per_mframe"),
        format!("{:.0}", per_mframe(cpu.agent)),
    );
    report.put(
        &format!("{prefix}vhost_ms_per_mframe"),
        format!("{:.0}", per_mframe(cpu.vhost)),
    );
}

/// `frames` TX frames of `len` bytes on pair 0 (timed, the agent's CPU
/// counted), then `frames / 4` injected into the tap (the same), reported
/// under `label`.
pub fn run(
    socket: &Path,
    tap: &str,
    pid: u32,
    frames: u64,
    len: usize,
    label: &str,
    report: &mut Report,
) -> Result<(), String> {
    let mut guest = NetGuest::connect(socket, 1, 0);
    guest.start();
    // Warm up: the first frames fault pages in and start the worker.
    let warm = traffic::run(&mut guest, tap, &[0], 256, len)?;
    report.check(
        &format!("{label}_warm_complete"),
        warm.complete(),
        format!("{warm:?}"),
    );

    let before = TapCounters::read(tap).map_err(|e| e.to_string())?;
    let cpu = Cpu::read(pid)?;
    let started = Instant::now();
    let sent = guest.send(0, frames, len, STALL);
    let seconds = started.elapsed().as_secs_f64();
    let cpu = Cpu::read(pid)?.since(&cpu);
    let out = TapCounters::read(tap)
        .map_err(|e| e.to_string())?
        .since(&before)
        .rx_packets;
    report.put(&format!("{label}_tx_frames"), sent);
    report.put(&format!("{label}_tx_out_of_tap"), out);
    report.put(
        &format!("{label}_tx_fps"),
        format!("{:.0}", sent as f64 / seconds),
    );
    report_cpu(report, &format!("{label}_tx_"), cpu, sent);
    report.check(
        &format!("{label}_tx_all_out"),
        sent == frames && out == frames,
        format!("sent {sent} of {frames}, {out} out of the tap"),
    );

    let rx_frames = frames / 4;
    let cpu = Cpu::read(pid)?;
    let phase = traffic::run(&mut guest, tap, &[0], rx_frames, len)?;
    let cpu = Cpu::read(pid)?.since(&cpu);
    let arrived: u64 = phase.rx_arrived.iter().sum();
    let seconds = phase.rx_seconds.max(1e-9);
    report.put(&format!("{label}_rx_frames"), arrived);
    report.put(
        &format!("{label}_rx_fps"),
        format!("{:.0}", arrived as f64 / seconds),
    );
    // The phase also sent `rx_frames` TX frames first: CPU per frame of
    // both directions together.
    report_cpu(
        report,
        &format!("{label}_txrx_"),
        cpu,
        arrived + phase.tx_taken[0],
    );
    report.check(
        &format!("{label}_rx_complete"),
        phase.complete(),
        format!("{phase:?}"),
    );
    let bases = guest.stop();
    report.check(
        &format!("{label}_bases_exact"),
        bases == guest.expected_bases(),
        format!("{bases:?} vs {:?}", guest.expected_bases()),
    );
    Ok(())
}
