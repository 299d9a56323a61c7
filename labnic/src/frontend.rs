//! The lab's own minimal vhost-vdpa front-end (`vdpa-frontend`): it drives
//! a vhost-vdpa net device the way QEMU or DPDK would (SET_OWNER,
//! features, status, IOTLB updates of its own memory, SET_VRING_*,
//! VRING_ENABLE, DRIVER_OK), sends numbered test frames on every queue pair
//! it uses and checks that each comes back whole, in order, on the same
//! pair, as a loopback device (labnic) must return them.
//!
//! In phases: after each, it reads every ring's base (GET_VRING_BASE) and
//! checks it is exactly where the driver knows the device is, resets the
//! device, and starts the next phase from those bases on the same rings,
//! which is how a front-end stops and restarts a vDPA device without
//! SUSPEND (VDUSE has none).

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::driver::{test_frame, DriverRing, RingLayout, PAGE};
use crate::memory::PAGE_SIZE;
use crate::net::{F_ACCESS_PLATFORM, F_EVENT_IDX, F_MQ, F_VERSION_1, NET_HDR_LEN};
use crate::uapi;
use crate::vdpa::{VdpaError, VhostVdpa, VringSetup};

/// Where the front-end's memory starts in the device's IOVA space.
pub const IOVA_BASE: u64 = 0x4000_0000;
/// Bytes per buffer slot.
const BUF_LEN: u32 = 2048;
/// VIRTIO_CONFIG_S_* bits.
const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;

/// How to drive the device.
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    /// The vhost-vdpa node.
    pub path: PathBuf,
    /// Queue pairs to use (None: all the device has).
    pub pairs: Option<u16>,
    /// Frames per pair per phase.
    pub frames: u64,
    /// Frames in flight per pair.
    pub window: u16,
    /// Phases (a stop and restart between two).
    pub phases: u32,
    /// Ring size.
    pub queue_size: u16,
    /// Give up when nothing moves for this long.
    pub stall: Duration,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX (kick and interrupt suppression).
    pub event_idx: bool,
}

/// What the run saw.
#[derive(Debug, Clone, Default)]
pub struct FrontendReport {
    /// Features the device offered.
    pub offered: u64,
    /// Features negotiated.
    pub negotiated: u64,
    /// Backend features (VHOST_GET_BACKEND_FEATURES).
    pub backend_features: u64,
    /// Queue pairs used.
    pub pairs: u16,
    /// Frames sent per pair.
    pub sent: Vec<u64>,
    /// Frames received intact, per pair.
    pub received: Vec<u64>,
    /// Frames received but not as sent (content, length, order).
    pub mismatches: u64,
    /// Per phase end and virtqueue: (vq, base the driver expects, base the
    /// device reported).
    pub bases: Vec<(u32, u16, u16)>,
    /// Per phase: seconds of traffic.
    pub phase_seconds: Vec<f64>,
    /// Per phase: frames received (all pairs).
    pub phase_frames: Vec<u64>,
    /// Pages the device must have written (RX buffers it filled, used
    /// rings), as IOVAs.
    pub written_pages: BTreeSet<u64>,
    /// Kicks sent.
    pub kicks: u64,
    /// Publishes the device's suppression spared a kick.
    pub kicks_spared: u64,
    /// Waits for an interrupt that ended by timeout with work waiting (a
    /// late interrupt, or the device slow to run).
    pub late_wakeups: u64,
}

/// The front-end failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A vhost-vdpa call failed.
    #[error(transparent)]
    Vdpa(#[from] VdpaError),
    /// Our own memory could not be made or accessed.
    #[error("front-end memory")]
    Memory(#[from] GuestMemoryError),
    /// Setting up memory, eventfds or epoll failed.
    #[error("{what}")]
    Os {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The device lacks something the front-end needs.
    #[error("{0}")]
    Device(String),
    /// Nothing moved for too long.
    #[error("no progress for {seconds} s in phase {phase}: sent {sent:?}, received {received:?}")]
    Stalled {
        /// Phase.
        phase: u32,
        /// Seconds waited.
        seconds: u64,
        /// Sent per pair.
        sent: Vec<u64>,
        /// Received per pair.
        received: Vec<u64>,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> FrontendError {
    move |source| FrontendError::Os { what, source }
}

/// One queue pair, driver side.
struct Pair {
    rx: DriverRing,
    tx: DriverRing,
    rx_bufs: GuestAddress,
    tx_bufs: GuestAddress,
    tx_free: Vec<u16>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    rx_call: EventFd,
    tx_call: EventFd,
    sent: u64,
    received: u64,
}

/// `bytes` of memory for the rings and buffers, a shared mapping of a file
/// on /dev/shm: for a VDUSE device vhost-vdpa maps only shared file
/// mappings (it hands VDUSE the file, not pages).
fn make_memory(bytes: u64) -> Result<GuestMemoryMmap, FrontendError> {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("vdpa-frontend-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(os("creating the front-end's memory file"))?;
    // The mapping keeps the file alive; nothing else needs its name.
    let _ = std::fs::remove_file(&path);
    file.set_len(bytes)
        .map_err(os("sizing the front-end's memory file"))?;
    let size =
        usize::try_from(bytes).map_err(|_| FrontendError::Device("memory too large".into()))?;
    let region = MmapRegion::from_file(FileOffset::new(file, 0), size)
        .map_err(|e| FrontendError::Device(format!("mmap of the front-end's memory: {e}")))?;
    let region = GuestRegionMmap::new(region, GuestAddress(IOVA_BASE))
        .ok_or_else(|| FrontendError::Device("memory region overflows".into()))?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| FrontendError::Device(format!("front-end memory: {e}")))
}

/// Run the front-end.
pub fn run(opts: &FrontendOptions) -> Result<FrontendReport, FrontendError> {
    let mut dev = VhostVdpa::open(&opts.path)?;
    let mut report = FrontendReport {
        offered: dev.features()?,
        backend_features: dev.backend_features()?,
        ..FrontendReport::default()
    };
    if report.backend_features & (1 << uapi::VHOST_BACKEND_F_IOTLB_MSG_V2) == 0 {
        return Err(FrontendError::Device(
            "no VHOST_BACKEND_F_IOTLB_MSG_V2".into(),
        ));
    }
    dev.set_backend_features(1 << uapi::VHOST_BACKEND_F_IOTLB_MSG_V2)?;
    let config = dev.config(0, 10)?;
    let mac: [u8; 6] = config[..6].try_into().unwrap_or([0; 6]);
    let max_pairs = if report.offered & F_MQ != 0 {
        u16::from_le_bytes([config[8], config[9]]).max(1)
    } else {
        1
    };
    let pairs = opts.pairs.unwrap_or(max_pairs).min(max_pairs).max(1);
    report.pairs = pairs;
    let mut want = F_VERSION_1 | F_ACCESS_PLATFORM;
    if pairs > 1 {
        want |= F_MQ;
    }
    if report.offered & want != want {
        return Err(FrontendError::Device(format!(
            "device offers {:#x}, the front-end needs {want:#x}",
            report.offered
        )));
    }
    if opts.event_idx {
        if report.offered & F_EVENT_IDX == 0 {
            return Err(FrontendError::Device(
                "--event-idx: the device does not offer EVENT_IDX".into(),
            ));
        }
        want |= F_EVENT_IDX;
    }
    report.negotiated = want;

    // Memory: per pair, two rings and their buffers.
    let q = opts.queue_size;
    let ring_len = RingLayout::new(GuestAddress(0), q).len;
    let bufs_len = u64::from(q) * u64::from(BUF_LEN);
    let per_vq = ring_len + bufs_len;
    let bytes = (2 * u64::from(pairs) * per_vq).next_multiple_of(PAGE);
    let mem = make_memory(bytes)?;
    let uaddr = mem.get_host_address(GuestAddress(IOVA_BASE))? as u64;

    let mut pair_state = Vec::new();
    for p in 0..pairs {
        let base = |vq: u64| GuestAddress(IOVA_BASE + vq * per_vq);
        let rx_index = 2 * u32::from(p);
        let rx_base = base(u64::from(rx_index));
        let tx_base = base(u64::from(rx_index) + 1);
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(os("eventfd"));
        pair_state.push(Pair {
            rx: DriverRing::new(
                &mem,
                rx_index,
                q,
                RingLayout::new(rx_base, q),
                opts.event_idx,
            )?,
            tx: DriverRing::new(
                &mem,
                rx_index + 1,
                q,
                RingLayout::new(tx_base, q),
                opts.event_idx,
            )?,
            rx_bufs: rx_base.unchecked_add(ring_len),
            tx_bufs: tx_base.unchecked_add(ring_len),
            tx_free: (0..q).rev().collect(),
            rx_kick: eventfd()?,
            tx_kick: eventfd()?,
            rx_call: eventfd()?,
            tx_call: eventfd()?,
            sent: 0,
            received: 0,
        });
    }
    let epoll = Epoll::new().map_err(os("epoll"))?;
    for (p, pair) in pair_state.iter().enumerate() {
        for call in [&pair.rx_call, &pair.tx_call] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    call.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, p as u64),
                )
                .map_err(os("epoll_ctl"))?;
        }
    }

    let mut bases: Vec<u16> = vec![0; 2 * usize::from(pairs)];
    for phase in 0..opts.phases {
        start_device(&mut dev, report.negotiated, uaddr, bytes, phase > 0)?;
        for pair in &pair_state {
            for (ring, kick, call) in [
                (&pair.rx, &pair.rx_kick, &pair.rx_call),
                (&pair.tx, &pair.tx_kick, &pair.tx_call),
            ] {
                let l = ring.layout();
                dev.setup_vring(
                    ring.index,
                    &VringSetup {
                        size: u32::from(q),
                        base: bases[ring.index as usize],
                        desc: l.desc.raw_value(),
                        avail: l.avail.raw_value(),
                        used: l.used.raw_value(),
                        kick_fd: kick.as_raw_fd(),
                        call_fd: call.as_raw_fd(),
                    },
                )?;
                dev.enable_vring(ring.index, true)?;
            }
        }
        dev.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)?;
        if dev.status()? & S_DRIVER_OK == 0 {
            return Err(FrontendError::Device("the device refused DRIVER_OK".into()));
        }
        if phase == 0 {
            for pair in pair_state.iter_mut() {
                for slot in 0..q {
                    let addr = pair
                        .rx_bufs
                        .unchecked_add(u64::from(slot) * u64::from(BUF_LEN));
                    pair.rx.post(&mem, slot, addr, BUF_LEN, true)?;
                }
                // The first fill always kicks: the device's suppression
                // state is fresh.
                pair.rx.publish(&mem)?;
                let _ = pair.rx_kick.write(1);
                report.kicks += 1;
            }
        }
        let started = Instant::now();
        let target = opts.frames * u64::from(phase + 1);
        traffic(
            &mem,
            &mut pair_state,
            &epoll,
            target,
            opts,
            phase,
            mac,
            &mut report,
        )?;
        report.phase_seconds.push(started.elapsed().as_secs_f64());
        report.phase_frames.push(opts.frames * u64::from(pairs));
        // Stop: every ring's base must be exactly what the driver knows the
        // device consumed (all TX taken; RX: one buffer per frame).
        for pair in &pair_state {
            for (ring, consumed) in [(&pair.rx, pair.received), (&pair.tx, pair.sent)] {
                let got = dev.vring_base(ring.index)?;
                let expected = (consumed & 0xffff) as u16;
                report.bases.push((ring.index, expected, got));
                bases[ring.index as usize] = got;
            }
        }
        dev.set_status(0)?;
    }
    for pair in &pair_state {
        report.sent.push(pair.sent);
        report.received.push(pair.received);
        for ring in [&pair.rx, &pair.tx] {
            report
                .written_pages
                .insert(ring.layout().used.raw_value() & !(PAGE_SIZE - 1));
        }
    }
    Ok(report)
}

/// Publish `ring`'s new entries and kick the device if it asks for it.
fn kick(
    ring: &mut DriverRing,
    kick: &EventFd,
    mem: &GuestMemoryMmap,
    report: &mut FrontendReport,
) -> Result<(), FrontendError> {
    if ring.publish(mem)? {
        let _ = kick.write(1);
        report.kicks += 1;
    } else {
        report.kicks_spared += 1;
    }
    Ok(())
}

/// Status up to FEATURES_OK with `features`, and (re)map our memory.
fn start_device(
    dev: &mut VhostVdpa,
    features: u64,
    uaddr: u64,
    bytes: u64,
    remap: bool,
) -> Result<(), FrontendError> {
    dev.set_status(0)?;
    dev.set_status(S_ACKNOWLEDGE | S_DRIVER)?;
    dev.set_features(features)?;
    dev.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)?;
    if dev.status()? & S_FEATURES_OK == 0 {
        return Err(FrontendError::Device(format!(
            "the device refused features {features:#x}"
        )));
    }
    if remap {
        dev.iotlb_invalidate(IOVA_BASE, bytes)?;
    }
    dev.iotlb_update(IOVA_BASE, bytes, uaddr)?;
    Ok(())
}

/// Move frames until every pair received `target` in total.
#[allow(clippy::too_many_arguments)]
fn traffic(
    mem: &GuestMemoryMmap,
    pairs: &mut [Pair],
    epoll: &Epoll,
    target: u64,
    opts: &FrontendOptions,
    phase: u32,
    mac: [u8; 6],
    report: &mut FrontendReport,
) -> Result<(), FrontendError> {
    let mut events = vec![EpollEvent::default(); 16];
    let mut last_progress = Instant::now();
    let mut buf = vec![0u8; BUF_LEN as usize];
    loop {
        let mut progress = false;
        for (p, pair) in pairs.iter_mut().enumerate() {
            let p = p as u16;
            let mut added = false;
            while pair.sent < target && pair.sent - pair.received < u64::from(opts.window) {
                let Some(slot) = pair.tx_free.pop() else {
                    break;
                };
                let frame = test_frame(p, pair.sent, mac);
                let addr = pair
                    .tx_bufs
                    .unchecked_add(u64::from(slot) * u64::from(BUF_LEN));
                mem.write_slice(&[0u8; NET_HDR_LEN], addr)?;
                mem.write_slice(&frame, addr.unchecked_add(NET_HDR_LEN as u64))?;
                pair.tx
                    .post(mem, slot, addr, (NET_HDR_LEN + frame.len()) as u32, false)?;
                pair.sent += 1;
                added = true;
            }
            if added {
                kick(&mut pair.tx, &pair.tx_kick, mem, report)?;
                progress = true;
            }
            while let Some((slot, _)) = pair.tx.pop_used(mem)? {
                pair.tx_free.push(slot);
                progress = true;
            }
            let mut reposted = false;
            while let Some((slot, len)) = pair.rx.pop_used(mem)? {
                let addr = pair
                    .rx_bufs
                    .unchecked_add(u64::from(slot) * u64::from(BUF_LEN));
                let len = (len as usize).min(buf.len());
                mem.read_slice(&mut buf[..len], addr)?;
                let expected = test_frame(p, pair.received, mac);
                if len < NET_HDR_LEN || buf[NET_HDR_LEN..len] != expected[..] {
                    report.mismatches += 1;
                }
                // The device wrote [addr, addr + len).
                let first = addr.raw_value() & !(PAGE_SIZE - 1);
                let last = (addr.raw_value() + len.max(1) as u64 - 1) & !(PAGE_SIZE - 1);
                let mut page = first;
                while page <= last {
                    report.written_pages.insert(page);
                    page += PAGE_SIZE;
                }
                pair.received += 1;
                pair.rx.post(mem, slot, addr, BUF_LEN, true)?;
                reposted = true;
                progress = true;
            }
            if reposted {
                kick(&mut pair.rx, &pair.rx_kick, mem, report)?;
            }
        }
        if pairs.iter().all(|p| p.received >= target) {
            return Ok(());
        }
        if progress {
            last_progress = Instant::now();
            continue;
        }
        if last_progress.elapsed() > opts.stall {
            return Err(FrontendError::Stalled {
                phase,
                seconds: opts.stall.as_secs(),
                sent: pairs.iter().map(|p| p.sent).collect(),
                received: pairs.iter().map(|p| p.received).collect(),
            });
        }
        // Wait for an interrupt (the device injects one per used burst, or
        // as our used_event asks). Frames are always in flight here, so a
        // timeout means the interrupt came late or the device was slow.
        let n = epoll.wait(1000, &mut events).unwrap_or(0);
        if n == 0 {
            report.late_wakeups += 1;
        }
        for event in &events[..n] {
            if let Some(pair) = pairs.get(event.data() as usize) {
                let _ = pair.rx_call.read();
                let _ = pair.tx_call.read();
            }
        }
    }
}
