//! The NIC's device state: the status byte the driver writes (through
//! VDUSE's SET_STATUS requests), the negotiated features, each virtqueue's
//! life (stopped, running, frozen after its state was read, broken), the
//! cost profile charged per configuration operation, and the counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, RawFd};

use netdev::sim::{SimHardware, SimOp, SimProfile};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::{IovaSpace, MemoryError};
use crate::net::{self, Negotiated, NetConfig, PairCounters, F_MTU, F_VERSION_1, MAX_CHAIN_BYTES};
use crate::ring::{Ring, RingError};
use crate::uapi::Request;
use crate::vduse::{Device, VduseError};

/// VIRTIO_CONFIG_S_DRIVER_OK.
pub const S_DRIVER_OK: u8 = 4;
/// VIRTIO_CONFIG_S_FEATURES_OK.
pub const S_FEATURES_OK: u8 = 8;

/// The NIC could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// A VDUSE call failed.
    #[error(transparent)]
    Vduse(#[from] VduseError),
    /// The IOVA space could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A ring could not be used.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// An eventfd could not be made or read.
    #[error("kick eventfd")]
    EventFd(#[source] std::io::Error),
    /// The kernel named a virtqueue the device does not have.
    #[error("no virtqueue {0}")]
    NoQueue(u32),
    /// A queue was ready at DRIVER_OK but no memory was mapped.
    #[error("virtqueue {0} is ready but the IOTLB maps nothing")]
    NoMemory(u32),
}

/// Where a virtqueue stands.
enum QueueState {
    Stopped,
    Running(Ring),
    /// Its state was read (GET_VQ_STATE): it stays where it was, so the
    /// index reported is exact, until the device is reset.
    Frozen(u16),
    /// Starting or serving it failed; nothing more happens on it until a
    /// reset.
    Broken,
}

/// Counts of what happened, for the counters line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Events {
    /// Kicks received.
    pub kicks: u64,
    /// Interrupts injected.
    pub irqs: u64,
    /// SET_STATUS requests.
    pub status_writes: u64,
    /// UPDATE_IOTLB requests.
    pub iotlb_updates: u64,
    /// GET_VQ_STATE requests.
    pub vq_state_reads: u64,
    /// Queues that broke.
    pub queue_errors: u64,
    /// Device resets (status 0).
    pub resets: u64,
    /// The features the driver accepted last (kept across resets).
    pub last_features: u64,
}

/// The lab NIC.
pub struct Nic {
    device: Device,
    config: NetConfig,
    status: u8,
    negotiated: Negotiated,
    space: IovaSpace,
    kicks: Vec<EventFd>,
    queues: Vec<QueueState>,
    pairs: Vec<PairCounters>,
    buf: Vec<u8>,
    hardware: Option<SimHardware>,
    ops: BTreeMap<SimOp, u64>,
    /// What happened so far.
    pub events: Events,
}

impl Nic {
    /// A NIC on `device` (its queues set up already), charging `profile`.
    pub fn new(
        device: Device,
        config: NetConfig,
        profile: Option<SimProfile>,
    ) -> Result<Nic, NicError> {
        let vqs = config.vq_count() as usize;
        let kicks = (0..vqs)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(NicError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Nic {
            device,
            pairs: vec![PairCounters::default(); usize::from(config.queue_pairs)],
            config,
            status: 0,
            negotiated: Negotiated::default(),
            space: IovaSpace::default(),
            kicks,
            queues: (0..vqs).map(|_| QueueState::Stopped).collect(),
            buf: vec![0u8; MAX_CHAIN_BYTES],
            hardware: profile.map(SimHardware::new),
            ops: BTreeMap::new(),
            events: Events::default(),
        })
    }

    /// The VDUSE device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The kick eventfd of queue `index`, to wait on.
    pub fn kick_fd(&self, index: usize) -> Option<RawFd> {
        self.kicks.get(index).map(|k| k.as_raw_fd())
    }

    /// Whether any queue is running (the caller then polls now and then,
    /// a safety net against a lost kick).
    pub fn running(&self) -> bool {
        self.queues
            .iter()
            .any(|q| matches!(q, QueueState::Running(_)))
    }

    /// Answer every pending control request.
    pub fn handle_requests(&mut self) -> Result<(), NicError> {
        while let Some(request) = self.device.read_request()? {
            self.handle(request)?;
        }
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Result<(), NicError> {
        match request {
            Request::GetVqState { id, index } => {
                self.events.vq_state_reads += 1;
                match self.vq_state(index) {
                    Ok(avail) => {
                        log::info!("GET_VQ_STATE vq {index}: avail index {avail}");
                        self.device.respond(id, true, Some((index, avail)))?;
                    }
                    Err(e) => {
                        log::warn!("GET_VQ_STATE vq {index}: {e}");
                        self.device.respond(id, false, None)?;
                    }
                }
            }
            Request::SetStatus { id, status } => {
                self.events.status_writes += 1;
                let ok = self.set_status(status);
                log::info!(
                    "SET_STATUS {:#04x} -> {:#04x}: {}",
                    self.status,
                    status,
                    if ok { "ok" } else { "failed" }
                );
                if ok {
                    self.status = status;
                }
                self.device.respond(id, ok, None)?;
            }
            Request::UpdateIotlb { id, start, last } => {
                self.events.iotlb_updates += 1;
                self.space.invalidate(start, last);
                // Mapping (and pinning) the new table is what the profile's
                // map_memory models; the mmap itself happens on first use.
                self.charge(SimOp::MapMemory);
                log::debug!("UPDATE_IOTLB {start:#x}..={last:#x}");
                self.device.respond(id, true, None)?;
            }
            Request::Unknown { id, kind } => {
                log::warn!("unknown VDUSE request type {kind}; answered FAILED");
                self.device.respond(id, false, None)?;
            }
        }
        Ok(())
    }

    fn vq_state(&mut self, index: u32) -> Result<u16, NicError> {
        let slot = usize::try_from(index)
            .ok()
            .filter(|&i| i < self.queues.len())
            .ok_or(NicError::NoQueue(index))?;
        let avail = match &self.queues[slot] {
            QueueState::Running(ring) => ring.next_avail(),
            QueueState::Frozen(avail) => *avail,
            QueueState::Stopped | QueueState::Broken => self.device.vq_info(index)?.avail_index,
        };
        if matches!(self.queues[slot], QueueState::Running(_)) {
            self.queues[slot] = QueueState::Frozen(avail);
        }
        Ok(avail)
    }

    /// Apply a status write; false refuses it (the driver sees the old
    /// status).
    fn set_status(&mut self, status: u8) -> bool {
        let old = self.status;
        if status == 0 {
            self.reset();
            return true;
        }
        if status & S_FEATURES_OK != 0 && old & S_FEATURES_OK == 0 {
            let features = match self.device.driver_features() {
                Ok(f) => f,
                Err(e) => {
                    log::error!("reading the driver's features: {e}");
                    return false;
                }
            };
            if features & F_VERSION_1 == 0 {
                log::warn!("driver features {features:#x} lack VERSION_1; FEATURES_OK refused");
                return false;
            }
            self.charge(SimOp::SetFeatures);
            self.negotiated = Negotiated::from_features(features);
            self.events.last_features = features;
            log::info!("features negotiated: {features:#x}");
        }
        if status & S_DRIVER_OK != 0 && old & S_DRIVER_OK == 0 {
            if self.negotiated.features & F_MTU != 0 {
                self.charge(SimOp::SetMtu);
            }
            for index in 0..self.queues.len() {
                if let Err(e) = self.start_queue(index) {
                    log::error!("DRIVER_OK: {e}");
                    self.queues[index] = QueueState::Broken;
                    self.events.queue_errors += 1;
                    return false;
                }
            }
        }
        true
    }

    fn reset(&mut self) {
        self.events.resets += 1;
        for index in 0..self.queues.len() {
            let was = std::mem::replace(&mut self.queues[index], QueueState::Stopped);
            if matches!(was, QueueState::Running(_) | QueueState::Frozen(_)) {
                self.charge(SimOp::DestroyQueue);
            }
        }
        self.negotiated = Negotiated::default();
    }

    /// Start queue `index` if the driver made it ready and it is stopped.
    fn start_queue(&mut self, index: usize) -> Result<(), NicError> {
        if !matches!(self.queues[index], QueueState::Stopped) {
            return Ok(());
        }
        // Queue indices fit u32: there are at most 2 * u16::MAX queues.
        let vq = index as u32;
        let info = self.device.vq_info(vq)?;
        if !info.ready || info.num == 0 {
            return Ok(());
        }
        let memory = self
            .space
            .memory(&self.device)?
            .ok_or(NicError::NoMemory(vq))?;
        let ring = Ring::start(
            &info,
            &memory,
            self.config.queue_size,
            self.negotiated.event_idx,
        )?;
        self.device
            .set_kickfd(vq, Some(self.kicks[index].as_raw_fd()))?;
        self.charge(SimOp::CreateQueue);
        log::info!(
            "vq {vq} started: size {} desc {:#x} avail {:#x} used {:#x} from avail index {}",
            info.num,
            info.desc_addr,
            info.driver_addr,
            info.device_addr,
            info.avail_index
        );
        self.queues[index] = QueueState::Running(ring);
        Ok(())
    }

    fn charge(&mut self, op: SimOp) {
        *self.ops.entry(op).or_insert(0) += 1;
        if let Some(hw) = self.hardware.as_mut() {
            hw.charge(op);
        }
    }

    /// Queue `index` was kicked: start it if it just became ready, then
    /// move its pair's frames.
    pub fn kicked(&mut self, index: usize) {
        if let Some(kick) = self.kicks.get(index) {
            // Non-blocking: WouldBlock only if a poll raced us to it.
            let _ = kick.read();
        }
        self.events.kicks += 1;
        if self.status & S_DRIVER_OK == 0 {
            return;
        }
        if let Err(e) = self.start_queue(index) {
            log::error!("vq {index}: {e}");
            self.queues[index] = QueueState::Broken;
            self.events.queue_errors += 1;
            return;
        }
        self.serve_pair(index / 2);
    }

    /// Serve every pair (the periodic safety net).
    pub fn poll(&mut self) {
        for pair in 0..self.pairs.len() {
            self.serve_pair(pair);
        }
    }

    fn serve_pair(&mut self, pair: usize) {
        if let Err(e) = self.try_serve_pair(pair) {
            log::error!("queue pair {pair}: {e}; its queues stop until a reset");
            self.queues[2 * pair] = QueueState::Broken;
            self.queues[2 * pair + 1] = QueueState::Broken;
            self.events.queue_errors += 1;
        }
    }

    fn try_serve_pair(&mut self, pair: usize) -> Result<(), NicError> {
        let (head, rest) = self.queues.split_at_mut(2 * pair + 1);
        let (QueueState::Running(rx), Some(QueueState::Running(tx))) =
            (&mut head[2 * pair], rest.first_mut())
        else {
            return Ok(());
        };
        let Some(memory) = self.space.memory(&self.device)? else {
            return Ok(());
        };
        loop {
            let counters = &mut self.pairs[pair];
            let pass = net::forward(
                tx,
                rx,
                &memory,
                self.negotiated.mrg_rxbuf,
                &mut self.buf,
                counters,
            )?;
            for ring in [&mut *rx, &mut *tx] {
                let published = if ring.index % 2 == 0 {
                    pass.rx_used
                } else {
                    pass.tx_used
                };
                if published && ring.needs_interrupt(&memory)? {
                    self.device.inject_irq(ring.index)?;
                    self.events.irqs += 1;
                }
            }
            let again = if pass.frames >= net::BURST {
                true
            } else if pass.rx_starved {
                rx.enable_kicks(&memory)?
            } else if pass.tx_idle {
                tx.enable_kicks(&memory)?
            } else {
                false
            };
            if !again {
                return Ok(());
            }
        }
    }

    /// The counters, as one `LABNIC-COUNTERS key=value ...` line: totals,
    /// then per pair (`qN_tx_frames=`, ...).
    pub fn counters_line(&self) -> String {
        let mut total = PairCounters::default();
        for c in &self.pairs {
            total.tx_frames += c.tx_frames;
            total.tx_bytes += c.tx_bytes;
            total.rx_frames += c.rx_frames;
            total.rx_bytes += c.rx_bytes;
            total.rx_buffers += c.rx_buffers;
            total.rx_dropped += c.rx_dropped;
            total.tx_errors += c.tx_errors;
            total.rx_stalls += c.rx_stalls;
        }
        let mut line = String::from("LABNIC-COUNTERS");
        let mut put = |prefix: &str, c: &PairCounters| {
            let _ = write!(
                line,
                " {prefix}tx_frames={} {prefix}tx_bytes={} {prefix}rx_frames={} {prefix}rx_bytes={} \
                 {prefix}rx_buffers={} {prefix}rx_dropped={} {prefix}tx_errors={} {prefix}rx_stalls={}",
                c.tx_frames, c.tx_bytes, c.rx_frames, c.rx_bytes, c.rx_buffers, c.rx_dropped, c.tx_errors, c.rx_stalls
            );
        };
        put("", &total);
        for (i, c) in self.pairs.iter().enumerate() {
            put(&format!("q{i}_"), c);
        }
        let e = &self.events;
        let _ = write!(
            line,
            " kicks={} irqs={} status_writes={} iotlb_updates={} iotlb_maps={} vq_state_reads={} resets={} queue_errors={} features={:#x}",
            e.kicks, e.irqs, e.status_writes, e.iotlb_updates, self.space.maps, e.vq_state_reads, e.resets, e.queue_errors,
            e.last_features
        );
        line
    }

    /// The configuration operations performed, as one `LABNIC-OPS` line:
    /// `NAME=COUNT` and, with a profile, `NAME_us=` charged.
    pub fn ops_line(&self) -> String {
        let mut line = String::from("LABNIC-OPS");
        let profile = self.hardware.as_ref().map(|h| h.profile().name.clone());
        let _ = write!(line, " profile={}", profile.as_deref().unwrap_or("none"));
        let mut total_us = 0u128;
        for op in SimOp::ALL {
            let _ = write!(
                line,
                " {}={}",
                op.name(),
                self.ops.get(&op).copied().unwrap_or(0)
            );
            if let Some(hw) = &self.hardware {
                let us = hw
                    .charged()
                    .get(&op)
                    .map(|(_, d)| d.as_micros())
                    .unwrap_or(0);
                total_us += us;
                let _ = write!(line, " {}_us={us}", op.name());
            }
        }
        let _ = write!(line, " charged_us={total_us}");
        line
    }

    /// Pages the device wrote (IOVAs); `reset` starts a new record.
    pub fn dirty_pages(&mut self, reset: bool) -> std::collections::BTreeSet<u64> {
        self.space.dirty_pages(reset)
    }

    /// How many queue pairs.
    pub fn queue_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Counters of pair `pair`.
    pub fn pair_counters(&self, pair: usize) -> Option<PairCounters> {
        self.pairs.get(pair).copied()
    }
}
