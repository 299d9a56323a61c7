//! One agent's net device end to end: frames both ways on every pair,
//! exact ring indices across a stop and a restart, pairs disabled and
//! enabled again, the MTU on the tap, the kernel's dirty log, a
//! reconnecting front-end, and a hostile ring address.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::driver::{buffer, pages_of, NetGuest, HDR, QUEUE_SIZE};
use super::frames::{self, Direction};
use super::report::{metrics, report_switchover, Report};
use super::tapside;
use super::traffic;
use crate::frontend::RAM_SIZE;

/// The MTU the front-end asks for (NET_SET_MTU): the tap must take it.
pub const MTU: u16 = 9000;
/// Bytes per frame.
const FRAME_LEN: usize = 128;
/// VIRTIO_CONFIG_S_NEEDS_RESET.
const NEEDS_RESET: u8 = 0x40;

/// Stop every ring and check the indices: what the device returned, what
/// the driver knows it handed out and got back, and the used indices in
/// guest memory must all agree.
fn stop_and_check(guest: &mut NetGuest, report: &mut Report, name: &str) -> bool {
    let bases = guest.stop();
    let expected = guest.expected_bases();
    let used = guest.used_indices();
    report.put(
        &format!("{name}_bases"),
        format!("{bases:?}").replace(' ', ""),
    );
    report.check(
        &format!("{name}_bases_exact"),
        bases == expected && bases == used,
        format!("GET_VRING_BASE {bases:?}, driver {expected:?}, used rings {used:?}"),
    )
}

fn phase(
    guest: &mut NetGuest,
    report: &mut Report,
    tap: &str,
    name: &str,
    pairs: &[usize],
    frames: u64,
) -> Result<traffic::Phase, String> {
    let phase = traffic::run(guest, tap, pairs, frames, FRAME_LEN)?;
    phase.report(report, &format!("{name}_"));
    report.check(
        &format!("{name}_complete"),
        phase.complete(),
        format!("{phase:?}"),
    );
    Ok(phase)
}

/// The whole run (module documentation).
pub fn run(
    socket: &Path,
    control: &Path,
    tap: &str,
    pairs: usize,
    frames: u64,
    report: &mut Report,
) -> Result<(), String> {
    let all: Vec<usize> = (0..pairs).collect();
    let mut guest = NetGuest::connect(socket, pairs, 0);
    guest.set_mtu(MTU)?;
    guest.start();
    report.put("tap_mtu", tapside::mtu(tap).map_err(|e| e.to_string())?);
    report.put("negotiated", format!("{:#x}", guest.fe.features));
    report_switchover(report, "start_", &metrics(control)?);

    phase(&mut guest, report, tap, "p1", &all, frames)?;
    offload(&mut guest, report, tap)?;
    stop_and_check(&mut guest, report, "stop1");
    guest.start();
    phase(&mut guest, report, tap, "p2", &all, frames)?;

    if pairs > 1 {
        // The last pair disabled: its tap queue is detached, so its flow
        // lands on another pair, and its rings see nothing.
        let last = pairs - 1;
        guest.enable_pair(last, false);
        let rest: Vec<usize> = (0..last).collect();
        for pair in &rest {
            guest.fill_rx(*pair);
        }
        let off = traffic::run(&mut guest, tap, &rest, frames / 4, FRAME_LEN)?;
        off.report(report, "mq_off_");
        // Frames of the disabled pair's own flow: the tap must give them
        // to the pairs left, none to the disabled one.
        let stray = traffic::inject_only(&mut guest, tap, last, frames / 4, FRAME_LEN)?;
        for (pair, count) in stray.iter().enumerate() {
            report.put(&format!("mq_off_stray_q{pair}_rx"), count);
        }
        guest.enable_pair(last, true);
        let back = traffic::run(&mut guest, tap, &all, frames / 4, FRAME_LEN)?;
        back.report(report, "mq_on_");
        report.check(
            "mq_complete",
            off.complete()
                && back.complete()
                && off.rx_arrived[last] == 0
                && stray[last] == 0
                && stray.iter().sum::<u64>() == frames / 4,
            format!("off {off:?} stray {stray:?} on {back:?}"),
        );
    }

    dirty_log(&mut guest, report, tap, &all, frames / 4)?;

    // A front-end that reconnects (a new connection for the same guest):
    // the device forgets the old connection's rings and memory, and the
    // new one resumes where the rings stand.
    stop_and_check(&mut guest, report, "stop2");
    let mut guest = guest.follow(socket, 0);
    guest.set_mtu(MTU)?;
    guest.start();
    phase(&mut guest, report, tap, "p3", &all, frames / 2)?;
    stop_and_check(&mut guest, report, "stop3");
    report.put("out_of_order", guest.out_of_order);
    let guest = guest.follow(socket, 0);
    hostile(guest, report, tap)
}

/// Checksum offload from the guest (CSUM): a frame whose virtio-net
/// header says NEEDS_CSUM reaches the tap's host side as a packet whose
/// checksum is left to offload (the kernel passed the header to the tap,
/// which took it at the size the agent set), and a frame without the flag
/// does not.
fn offload(guest: &mut NetGuest, report: &mut Report, tap: &str) -> Result<(), String> {
    let watch = tapside::PacketSocket::open(tap, true).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    for (seq, needs_csum) in [(1_000_000u32, true), (1_000_001, false)] {
        let frame = frames::frame(Direction::Tx, 0, seq, FRAME_LEN);
        let mut header = [0u8; HDR];
        if needs_csum {
            // flags NEEDS_CSUM; csum_start: the UDP header (14 + 20);
            // csum_offset: its checksum field.
            header[0] = 1;
            header[6..8].copy_from_slice(&34u16.to_le_bytes());
            header[8..10].copy_from_slice(&6u16.to_le_bytes());
        }
        if !guest.send_with_header(0, header, &frame, traffic::STALL) {
            return Err("the offload frame was not taken".into());
        }
        let mut status = None;
        while let Ok(Some((got, tp_status))) = watch.recv_incoming_status(Duration::from_secs(2)) {
            if frames::parse(&got).is_some_and(|t| t.seq == seq) {
                status = Some(tp_status & libc::TP_STATUS_CSUMNOTREADY != 0);
                break;
            }
        }
        seen.push(status);
    }
    report.put("offload_csum_partial", format!("{:?}", seen[0]));
    report.put("offload_csum_plain", format!("{:?}", seen[1]));
    report.check(
        "offload_csum",
        seen == [Some(true), Some(false)],
        format!("NEEDS_CSUM frame left to offload / plain frame: {seen:?}"),
    );
    Ok(())
}

/// With VHOST_F_LOG_ALL on, the pages the kernel wrote (RX buffers, used
/// rings) are exactly those marked, and no page it only read (TX buffers)
/// is; with it off again, nothing is marked.
fn dirty_log(
    guest: &mut NetGuest,
    report: &mut Report,
    tap: &str,
    pairs: &[usize],
    frames: u64,
) -> Result<(), String> {
    let log = guest.log_on();
    log.clear();
    // TX and RX both: the TX buffers of every frame sent are read only.
    let mut tx_pages = BTreeSet::new();
    let mut written = BTreeSet::new();
    let before: Vec<u16> = guest.expected_bases();
    let phase = traffic::run(guest, tap, pairs, frames, FRAME_LEN)?;
    let after = guest.expected_bases();
    for (ring, (&start, &end)) in before.iter().zip(&after).enumerate() {
        let mut index = start;
        while index != end {
            let addr = buffer(ring, index % QUEUE_SIZE);
            if ring % 2 == 1 {
                tx_pages.extend(pages_of(addr, 2048));
            }
            index = index.wrapping_add(1);
        }
        if start != end {
            let (used, used_end) = guest.used_ring(ring);
            written.extend(pages_of(used, used_end - used));
        }
    }
    for &(addr, len) in &phase.rx_written {
        written.extend(pages_of(addr, u64::from(len)));
    }
    let marked = log.pages();
    let missing: Vec<_> = written.difference(&marked).collect();
    let extra: Vec<_> = marked.difference(&written).collect();
    let tx_marked = tx_pages.intersection(&marked).count();
    report.put("dirty_frames", phase.tx_taken.iter().sum::<u64>());
    report.put("dirty_expected", written.len());
    report.put("dirty_marked", marked.len());
    report.put("dirty_missing", missing.len());
    report.put("dirty_extra", extra.len());
    report.put("dirty_tx_pages", tx_pages.len());
    report.put("dirty_tx_marked", tx_marked);
    report.check(
        "dirty_exact",
        phase.complete() && missing.is_empty() && extra.is_empty() && tx_marked == 0,
        format!("missing {missing:x?} extra {extra:x?} tx marked {tx_marked}"),
    );
    guest.log_off();
    log.clear();
    let quiet = traffic::run(guest, tap, pairs, frames / 2, FRAME_LEN)?;
    let after_off = log.pages().len();
    report.put("dirty_after_off", after_off);
    report.check(
        "dirty_off_quiet",
        quiet.complete() && after_off == 0,
        format!("{after_off} page(s) marked with LOG_ALL off"),
    );
    Ok(())
}

/// A ring whose used ring starts inside guest RAM but ends past it: the
/// session takes the address (it starts in a region), the device refuses
/// the ring before any ioctl names it, the kick is NACKed, the device
/// needs a reset; a correct configuration then works.
fn hostile(mut guest: NetGuest, report: &mut Report, tap: &str) -> Result<(), String> {
    let fe = &mut guest.fe;
    let ram = fe.ram.clone();
    let used = RAM_SIZE - 64;
    let (desc, avail, _) = fe.queues[0].addresses();
    let vhost_err = |what: &str, e: vhost::Error| format!("{what}: {e}");
    fe.frontend
        .set_features(fe.features)
        .map_err(|e| vhost_err("SET_FEATURES", e))?;
    fe.frontend
        .set_mem_table(&[ram.region_info()])
        .map_err(|e| vhost_err("SET_MEM_TABLE", e))?;
    fe.frontend
        .set_vring_num(0, QUEUE_SIZE)
        .map_err(|e| vhost_err("SET_VRING_NUM", e))?;
    fe.frontend
        .set_vring_base(0, 0)
        .map_err(|e| vhost_err("SET_VRING_BASE", e))?;
    fe.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let addressed = fe.frontend.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: ram.user_addr(desc),
            used_ring_addr: ram.user_addr(used),
            avail_ring_addr: ram.user_addr(avail),
            log_addr: None,
        },
    );
    let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
    // A kick for a ring without addresses is taken; the ring must not run.
    let kicked = fe.frontend.set_vring_kick(0, &kick);
    fe.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    let status = fe.get_status();
    report.put("hostile_used_ring_gpa", format!("{used:#x}"));
    report.put("hostile_status", format!("{status:#x}"));
    report.check(
        "hostile_refused",
        addressed.is_err() && kicked.is_ok() && status & NEEDS_RESET == 0,
        format!("SET_VRING_ADDR {addressed:?}, kick {kicked:?}, status {status:#x}"),
    );
    // The front-end sets the device up properly again.
    guest.start();
    let pairs: Vec<usize> = (0..guest.pairs).collect();
    let after = traffic::run(&mut guest, tap, &pairs, 64, FRAME_LEN)?;
    after.report(report, "hostile_after_");
    report.check("hostile_recovered", after.complete(), format!("{after:?}"));
    Ok(())
}
