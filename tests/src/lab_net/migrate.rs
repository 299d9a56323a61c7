//! A guest migrated from agent to agent on one lab host, the way the test
//! front-end plays both QEMUs: the same guest RAM and rings throughout,
//! the source stopped with GET_VRING_BASE, the destination started from
//! those bases. Hops alternate: a plain start (no presetup), then one
//! with the in-band presetup bracket during "migration setup", so that
//! switchover is light ops only. Frames flow on every pair after each switchover,
//! through the destination's tap; the device state (MTU, MAC) goes along;
//! SEND_RARP makes the destination's tap carry a RARP frame for the
//! guest's MAC.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::VhostUserFrontend;

use super::driver::{options, NetGuest};
use super::frames::GUEST_MAC;
use super::report::{metrics, report_switchover, Report};
use super::tapside::{self, PacketSocket};
use super::traffic;
use crate::frontend::presetup::{EarlyConfig, PROTOCOL_F_PRESETUP};
use crate::frontend::TestFrontend;

/// One agent: its vhost-user socket, control socket and tap.
#[derive(Clone, Debug)]
pub struct Agent {
    /// Its name in the results.
    pub name: String,
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Control socket.
    pub control: PathBuf,
    /// Its tap.
    pub tap: String,
}

/// The MTU the guest runs with (NET_SET_MTU, and the device state).
const MTU: u16 = 4000;
/// Bytes per frame.
const FRAME_LEN: usize = 128;

fn pipe() -> Result<(std::fs::File, std::fs::File), String> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    use std::os::unix::io::FromRawFd;
    // SAFETY: pipe2 succeeded: both fds are open and ours alone.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// The source's device state (SET_DEVICE_STATE_FD SAVE, then CHECK).
fn save_state(guest: &NetGuest) -> Result<Vec<u8>, String> {
    let (mut reader, writer) = pipe()?;
    guest
        .fe
        .frontend
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            writer.into(),
        )
        .map_err(|e| format!("SET_DEVICE_STATE_FD save: {e}"))?;
    let mut state = Vec::new();
    reader.read_to_end(&mut state).map_err(|e| e.to_string())?;
    guest
        .fe
        .frontend
        .check_device_state()
        .map_err(|e| format!("CHECK_DEVICE_STATE save: {e}"))?;
    Ok(state)
}

/// Hand `state` to the destination (SET_DEVICE_STATE_FD LOAD, CHECK).
fn load_state(guest: &NetGuest, state: &[u8]) -> Result<(), String> {
    let (reader, mut writer) = pipe()?;
    guest
        .fe
        .frontend
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            reader.into(),
        )
        .map_err(|e| format!("SET_DEVICE_STATE_FD load: {e}"))?;
    writer.write_all(state).map_err(|e| e.to_string())?;
    drop(writer);
    guest
        .fe
        .frontend
        .check_device_state()
        .map_err(|e| format!("CHECK_DEVICE_STATE load: {e}"))
}

/// Whether a RARP frame for `mac` comes out of `watch` within `timeout`.
fn saw_rarp(watch: &PacketSocket, mac: [u8; 6], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match watch.recv_incoming(left) {
            Ok(Some(frame)) if frame.len() >= 28 => {
                if frame[12..14] == [0x80, 0x35] && frame[6..12] == mac && frame[22..28] == mac {
                    return true;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return false,
        }
    }
    false
}

/// Traffic on every pair through `tap`, reported under `name`.
fn flows(
    guest: &mut NetGuest,
    report: &mut Report,
    tap: &str,
    name: &str,
    frames: u64,
) -> Result<(), String> {
    let pairs: Vec<usize> = (0..guest.pairs).collect();
    let phase = traffic::run(guest, tap, &pairs, frames, FRAME_LEN)?;
    phase.report(report, &format!("{name}_"));
    report.check(
        &format!("{name}_complete"),
        phase.complete(),
        format!("{phase:?}"),
    );
    Ok(())
}

/// Stop the source: every ring's base must be exact.
fn stop_source(guest: &mut NetGuest, report: &mut Report, name: &str) -> Vec<u16> {
    let bases = guest.stop();
    let expected = guest.expected_bases();
    report.check(
        &format!("{name}_bases_exact"),
        bases == expected && bases == guest.used_indices(),
        format!("{bases:?} vs {expected:?}"),
    );
    bases
}

/// The destination's switchover, as QEMU orders it: NET_SET_MTU, the
/// device state, the start from the source's bases; then SEND_RARP.
fn switch_over(
    guest: &mut NetGuest,
    report: &mut Report,
    dest: &Agent,
    state: &[u8],
    name: &str,
) -> Result<(), String> {
    let watch = PacketSocket::open(&dest.tap, true).map_err(|e| e.to_string())?;
    load_state(guest, state)?;
    guest.set_mtu(MTU)?;
    guest.start();
    let rarp = guest.send_rarp(GUEST_MAC);
    report.check(
        &format!("{name}_rarp"),
        rarp && saw_rarp(&watch, GUEST_MAC, Duration::from_secs(5)),
        format!(
            "SEND_RARP acked {rarp}, but no RARP frame for the guest on {}",
            dest.tap
        ),
    );
    report.put(
        &format!("{name}_tap_mtu"),
        tapside::mtu(&dest.tap).map_err(|e| e.to_string())?,
    );
    report_switchover(report, &format!("{name}_"), &metrics(&dest.control)?);
    Ok(())
}

/// The destination's connection for `guest`, set up early with the
/// in-band bracket while the source still runs: it maps the memory, sets
/// the features and MTU, creates its queues and takes the rings' values,
/// so the switchover only starts the rings.
fn presetup_destination(
    guest: &NetGuest,
    dest: &Agent,
    report: &mut Report,
    name: &str,
) -> TestFrontend {
    let ram = guest.fe.ram.clone();
    let mut fe = TestFrontend::follow(
        &dest.socket,
        &options(guest.pairs, PROTOCOL_F_PRESETUP),
        ram.clone(),
        guest.fe.continued_queues(),
    );
    report.check(
        &format!("{name}_presetup_negotiated"),
        fe.protocol & PROTOCOL_F_PRESETUP != 0,
        format!("protocol {:#x}", fe.protocol),
    );
    fe.presetup_bracket(
        EarlyConfig {
            ram: &ram,
            mtu: Some(MTU),
            kick_fds: false,
        },
        &guest.expected_bases(),
    );
    fe
}

/// The whole run (module documentation): the guest starts on the first
/// agent and hops to each next one, without presetup to the 2nd, 4th, ...
/// agent and with it to the 3rd, 5th, ...; results are named after the
/// agents (`b_...`).
pub fn run(agents: &[Agent], pairs: usize, frames: u64, report: &mut Report) -> Result<(), String> {
    let Some((first, hops)) = agents.split_first() else {
        return Err("no agents".into());
    };
    let mut guest = NetGuest::connect(&first.socket, pairs, 0);
    guest.set_mtu(MTU)?;
    guest.start();
    flows(
        &mut guest,
        report,
        &first.tap,
        &format!("on_{}", first.name),
        frames,
    )?;
    let mut source = first;
    for (hop, dest) in hops.iter().enumerate() {
        let presetup = hop % 2 == 1;
        report.put(&format!("{}_presetup", dest.name), presetup);
        let state = save_state(&guest)?;
        let early = presetup.then(|| presetup_destination(&guest, dest, report, &dest.name));
        stop_source(&mut guest, report, &format!("stop_{}", source.name));
        guest = match early {
            Some(fe) => guest.adopt(fe),
            None => guest.follow(&dest.socket, 0),
        };
        switch_over(&mut guest, report, dest, &state, &dest.name)?;
        flows(
            &mut guest,
            report,
            &dest.tap,
            &format!("on_{}", dest.name),
            frames,
        )?;
        source = dest;
    }
    stop_source(&mut guest, report, &format!("stop_{}", source.name));
    report.put("out_of_order", guest.out_of_order);
    Ok(())
}

/// Agent `name`'s sockets under `dir` (`NAME.sock`, `NAME.ctl`).
pub fn agent(dir: &Path, name: &str, tap: &str) -> Agent {
    Agent {
        name: name.to_string(),
        socket: dir.join(format!("{name}.sock")),
        control: dir.join(format!("{name}.ctl")),
        tap: tap.to_string(),
    }
}
