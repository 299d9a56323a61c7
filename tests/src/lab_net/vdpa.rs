//! `lab-frontend vdpa`: the test front-end on agents whose net devices
//! are `dataplane=vdpa:` on the lab's VDUSE NICs (labnic, a loopback:
//! every frame sent on a pair's TX ring comes back on its RX ring).
//!
//! On the first agent: frames out and back on every pair, a stop whose
//! bases must be exact and a restart from them, then a phase with the
//! dirty log on, checked against the NIC's own record of the pages it
//! wrote (labnic's SIGUSR2 starts a record, SIGUSR1 writes it). Then the
//! guest migrates to the second agent, set up early with the in-band
//! presetup bracket while the first still runs, and frames flow there.
//! The switchover figures of both starts are reported.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::driver::{options, pages_of, NetGuest};
use super::frames::Direction;
use super::report::{metrics, report_switchover, Report};
use super::traffic::STALL;
use crate::frontend::presetup::{EarlyConfig, PROTOCOL_F_PRESETUP};
use crate::frontend::TestFrontend;

/// Frames per pair between waits for them to come back (well below a
/// ring of RX buffers).
const BATCH: u64 = 128;
/// Bytes per frame.
const FRAME_LEN: usize = 128;

/// What the subcommand needs.
pub struct Setup {
    /// Where the agents' sockets are (`NAME.sock`, `NAME.ctl`).
    pub dir: PathBuf,
    /// The two agents, source first.
    pub agents: [String; 2],
    /// Queue pairs.
    pub pairs: usize,
    /// Frames per pair in a phase.
    pub frames: u64,
    /// The first agent's NIC: its process and its dirty-record file.
    pub nic_pid: i32,
    /// Where that NIC writes its record.
    pub dirty_file: PathBuf,
}

/// Frames out and back on every pair; per pair the intact frames of ours
/// that came back on that pair. Also every RX buffer written.
fn loopback(guest: &mut NetGuest, frames: u64, written: &mut Vec<(u64, u32)>) -> Vec<u64> {
    let mut back = vec![0u64; guest.pairs];
    let mut sent = 0;
    while sent < frames {
        let batch = BATCH.min(frames - sent);
        for pair in 0..guest.pairs {
            guest.fill_rx(pair);
            guest.send(pair, batch, FRAME_LEN, STALL);
        }
        for got in guest.receive(batch as usize * guest.pairs, STALL) {
            written.push((got.addr, got.len));
            if let Some(tag) = got.tag {
                if tag.direction == Direction::Tx as u8 && usize::from(tag.pair) == got.pair {
                    back[got.pair] += 1;
                }
            }
        }
        sent += batch;
    }
    back
}

fn phase(
    guest: &mut NetGuest,
    report: &mut Report,
    name: &str,
    frames: u64,
    written: &mut Vec<(u64, u32)>,
) {
    let back = loopback(guest, frames, written);
    for (pair, count) in back.iter().enumerate() {
        report.put(&format!("{name}_q{pair}_back"), count);
    }
    report.check(
        &format!("{name}_complete"),
        back.iter().all(|&n| n == frames),
        format!("{back:?} of {frames} per pair"),
    );
}

/// GET_VRING_BASE on every ring, which must answer what the driver knows
/// the device took and the used indices in RAM; the time it took.
fn stop(guest: &mut NetGuest, report: &mut Report, name: &str) -> Duration {
    let began = Instant::now();
    let bases = guest.stop();
    let took = began.elapsed();
    let expected = guest.expected_bases();
    report.check(
        &format!("{name}_bases_exact"),
        bases == expected && bases == guest.used_indices(),
        format!(
            "{bases:?} vs {expected:?} vs used {:?}",
            guest.used_indices()
        ),
    );
    report.put(&format!("{name}_stop_us"), took.as_micros());
    took
}

fn signal(pid: i32, signal: i32) -> Result<(), String> {
    // SAFETY: kill(2) with a pid and a signal number; no memory is shared.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(format!(
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Have the NIC write its record (`sig`) to `file`, and wait for it.
fn nic_record(pid: i32, sig: i32, file: &Path) -> Result<BTreeSet<u64>, String> {
    let _ = std::fs::remove_file(file);
    signal(pid, sig)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The NIC writes a temporary file and renames it: once the file
        // is there, it is whole.
        if let Ok(text) = std::fs::read_to_string(file) {
            return Ok(text
                .lines()
                .filter_map(|l| l.strip_prefix("0x"))
                .filter_map(|h| u64::from_str_radix(h, 16).ok())
                .collect());
        }
        if Instant::now() > deadline {
            return Err(format!("the NIC wrote no record to {}", file.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination's connection for `guest`, set up early with the
/// in-band bracket while the source still runs (the device's MTU stays).
fn presetup_destination(guest: &NetGuest, socket: &Path, report: &mut Report) -> TestFrontend {
    let ram = guest.fe.ram.clone();
    let mut fe = TestFrontend::follow(
        socket,
        &options(guest.pairs, PROTOCOL_F_PRESETUP),
        ram.clone(),
        guest.fe.continued_queues(),
    );
    report.check(
        "b_presetup_negotiated",
        fe.protocol & PROTOCOL_F_PRESETUP != 0,
        format!("protocol {:#x}", fe.protocol),
    );
    fe.presetup_bracket(
        EarlyConfig {
            ram: &ram,
            mtu: None,
            kick_fds: false,
        },
        &guest.expected_bases(),
    );
    fe
}

/// The whole scenario (module documentation).
pub fn run(setup: &Setup, report: &mut Report) -> Result<(), String> {
    let [a, b] = &setup.agents;
    let sock = |name: &str| setup.dir.join(format!("{name}.sock"));
    let ctl = |name: &str| setup.dir.join(format!("{name}.ctl"));
    let frames = setup.frames;
    let mut written = Vec::new();

    let mut guest = NetGuest::connect(&sock(a), setup.pairs, 0);
    report.put("negotiated", format!("{:#x}", guest.fe.features));
    guest.start();
    report_switchover(report, "a_", &metrics(&ctl(a))?);
    phase(&mut guest, report, "p1", frames, &mut written);
    stop(&mut guest, report, "a_stop1");
    guest.start();
    phase(&mut guest, report, "p2", frames, &mut written);

    // Dirty pages: the NIC's record of this phase against the log.
    stop(&mut guest, report, "a_stop2");
    guest.start();
    nic_record(setup.nic_pid, libc::SIGUSR2, &setup.dirty_file)?;
    let log = guest.log_on();
    let mut logged_phase = Vec::new();
    phase(&mut guest, report, "p3", frames, &mut logged_phase);
    stop(&mut guest, report, "a_stop3");
    let logged = log.pages();
    let record = nic_record(setup.nic_pid, libc::SIGUSR1, &setup.dirty_file)?;
    let missed: Vec<u64> = record.difference(&logged).copied().collect();
    let known: BTreeSet<u64> = logged_phase
        .iter()
        .flat_map(|&(addr, len)| pages_of(addr, u64::from(len)))
        .collect();
    let known_missed = known.difference(&logged).count();
    report.put("dirty_record_pages", record.len());
    report.put("dirty_logged_pages", logged.len());
    report.put("dirty_missed", missed.len());
    report.put("dirty_rx_known_pages", known.len());
    report.put("dirty_rx_known_missed", known_missed);
    report.check(
        "dirty_complete",
        !record.is_empty() && missed.is_empty() && known_missed == 0,
        format!("missed {missed:x?}"),
    );
    guest.log_off();

    // Migration to the second agent, set up early while the first runs.
    guest.start();
    phase(&mut guest, report, "p4", frames, &mut written);
    let early = presetup_destination(&guest, &sock(b), report);
    let stop_time = stop(&mut guest, report, "a_final");
    report.put("source_stop_us", stop_time.as_micros());
    guest = guest.adopt(early);
    guest.start();
    report_switchover(report, "b_", &metrics(&ctl(b))?);
    phase(&mut guest, report, "p5", frames, &mut written);
    stop(&mut guest, report, "b_stop");
    report.put("out_of_order", guest.out_of_order);
    Ok(())
}
