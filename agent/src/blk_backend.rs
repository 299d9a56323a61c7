//! The vhost-user request handler of a block device: thin methods that turn
//! each message into device state and start or stop queue workers.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blkdev::engine::EngineKind;
use blkdev::fence::Fence;
use blkdev::inflight::{InflightError, InflightRegion};
use blkdev::queue::DiskShared;
use blkdev::BlkConfig;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use vm_memory::GuestAddress;

use crate::backend_shared::{read_config, ring_addresses, ring_size, DeviceStatus, DirtyLog};
use crate::memory::{MemoryError, MemoryMap, MAX_MEM_SLOTS};
use crate::worker::{QueueSetup, StopMode, Worker, WorkerError};

/// virtio device status bit DEVICE_NEEDS_RESET (virtio 1.2, 2.1).
pub const DEVICE_STATUS_NEEDS_RESET: u8 = 0x40;

/// Protocol feature GET_VRING_BASE_SKIP_DRAIN (bit 23): request 45 suspends
/// and request 11 drains. Unknown to the vhost crate.
pub const PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN: u64 = 1 << 23;

/// Which request asked for a ring's base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetBase {
    /// GET_VRING_BASE (11).
    Plain,
    /// GET_VRING_BASE_SKIP_DRAIN (45).
    SkipDrain,
}

/// A request the handler refused; becomes a NACK or a disconnect at the
/// protocol layer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The queue index is beyond the device's queues.
    #[error("queue index {0} out of range")]
    QueueIndex(u32),
    /// SET_VRING_NUM with a size that is zero, not a power of two or too big.
    #[error("queue {index}: invalid size {size} (maximum {max})")]
    QueueSize {
        /// Queue index.
        index: u32,
        /// Requested size.
        size: u32,
        /// Largest size we accept.
        max: u16,
    },
    /// SET_FEATURES acked bits we never offered.
    #[error("front-end acked features {0:#x} we did not offer")]
    Features(u64),
    /// A ring address does not fall into any memory region.
    #[error("queue {index}: {which} address {addr:#x} is not in any memory region")]
    RingAddress {
        /// Queue index.
        index: u32,
        /// Which ring part.
        which: &'static str,
        /// Front-end virtual address.
        addr: u64,
    },
    /// Memory table change failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A worker could not start.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// SET_LOG_BASE's region could not be mapped.
    #[error("cannot map the dirty log ({size} bytes at offset {offset})")]
    LogMap {
        /// mmap_size from the request.
        size: u64,
        /// mmap_offset from the request.
        offset: u64,
        /// Cause.
        #[source]
        source: shm::ShmError,
    },
    /// A config space access out of bounds or to a read-only field.
    #[error("config space access refused: {0}")]
    Config(String),
    /// The request needs a feature this device does not implement.
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// The inflight region does not fit the device, or could not be
    /// created or mapped.
    #[error(transparent)]
    Inflight(#[from] InflightError),
    /// A request that needs a protocol feature the front-end did not ack.
    #[error("{0} without its protocol feature negotiated")]
    NotNegotiated(&'static str),
}

impl From<BackendError> for VhostError {
    fn from(e: BackendError) -> VhostError {
        VhostError::ReqHandlerError(std::io::Error::other(e))
    }
}

/// Per-ring state as configured by the front-end.
#[derive(Default)]
struct Vring {
    size: u16,
    desc_table: Option<GuestAddress>,
    avail_ring: Option<GuestAddress>,
    used_ring: Option<GuestAddress>,
    next_avail: u16,
    kick: Option<File>,
    call: Option<Arc<File>>,
    enabled: bool,
    worker: Option<Worker>,
    /// SET_VRING_ADDR as sent, for `query-config`.
    frontend_addresses: Option<presetup::RingAddresses>,
}

/// The vhost-user back-end of one disk.
pub struct BlkBackend {
    name: Arc<str>,
    config: BlkConfig,
    disk: Arc<DiskShared>,
    engine_kind: EngineKind,
    acked_features: u64,
    acked_protocol_features: u64,
    memory: MemoryMap,
    vrings: Vec<Vring>,
    status: DeviceStatus,
    /// The front-end's dirty log (SET_LOG_BASE); writes are logged into it
    /// while VHOST_F_LOG_ALL is acked.
    log: DirtyLog,
    /// The inflight region (GET/SET_INFLIGHT_FD).
    inflight: Option<InflightRegion>,
    /// The write fence shared with the queues.
    fence: Arc<Fence>,
    /// Threads still collecting storage operations of suspended queues.
    reapers: Vec<std::thread::JoinHandle<()>>,
    /// Log lines held back until the reply is sent (see
    /// [`Self::flush_deferred_logs`]).
    deferred_logs: Vec<String>,
    /// The device's timeline (ring starts and stops, requests handed off).
    metrics: Arc<crate::metrics::DeviceMetrics>,
    /// Engines and the configuration made early (control API `presetup`).
    presetup: Arc<crate::blk_presetup::BlkPresetup>,
    /// The current start's switchover was planned (first ring started).
    start_planned: bool,
}

/// Protocol features a block device offers.
pub fn blk_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT
        | VhostUserProtocolFeatures::from_bits_retain(PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN)
}

impl BlkBackend {
    /// A back-end for the disk `disk` described by `config`.
    pub fn new(
        name: &str,
        config: BlkConfig,
        disk: Arc<DiskShared>,
        engine_kind: EngineKind,
        fence: Arc<Fence>,
        metrics: Arc<crate::metrics::DeviceMetrics>,
        presetup: Arc<crate::blk_presetup::BlkPresetup>,
    ) -> BlkBackend {
        let vrings = (0..config.options().num_queues)
            .map(|_| Vring::default())
            .collect();
        BlkBackend {
            name: Arc::from(name),
            config,
            disk,
            engine_kind,
            acked_features: 0,
            acked_protocol_features: 0,
            memory: MemoryMap::default(),
            vrings,
            status: DeviceStatus::default(),
            log: DirtyLog::default(),
            inflight: None,
            fence,
            reapers: Vec::new(),
            deferred_logs: Vec::new(),
            metrics,
            presetup,
            start_planned: false,
        }
    }

    /// Write the log lines of the last request. A suspending GET_VRING_BASE
    /// must reply at once, and a log write can stall on a busy disk, so its
    /// lines wait until the protocol layer has sent the reply.
    pub fn flush_deferred_logs(&mut self) {
        for line in self.deferred_logs.drain(..) {
            log::info!("{line}");
        }
    }

    /// The disk's write fence (for the control API).
    pub fn fence(&self) -> &Arc<Fence> {
        &self.fence
    }

    /// A front-end connected.
    pub fn new_session(&mut self) {
        self.fence.new_session();
    }

    fn protocol_acked(&self, bits: u64) -> bool {
        self.acked_protocol_features & bits == bits
    }

    /// GET_VRING_BASE_INFLIGHT with INFLIGHT_SHMFD: the front-end may have
    /// rings suspended instead of drained.
    fn suspend_negotiated(&self) -> bool {
        self.protocol_acked(
            VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits()
                | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT.bits(),
        )
    }

    /// How GET_VRING_BASE (`which`) stops a ring, per the negotiated
    /// protocol features (PROTOCOL.md, "Decisions"): suspend with
    /// GET_VRING_BASE_INFLIGHT (which needs INFLIGHT_SHMFD) unless
    /// GET_VRING_BASE_SKIP_DRAIN moved suspending to request 45.
    fn stop_mode(&self, which: GetBase) -> StopMode {
        let suspend_allowed = self.suspend_negotiated();
        let skip_drain = self.protocol_acked(PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN);
        let wants_suspend = match which {
            GetBase::Plain => suspend_allowed && !skip_drain,
            GetBase::SkipDrain => suspend_allowed,
        };
        if wants_suspend && self.inflight.is_none() {
            log::warn!(
                "{}: asked to stop without draining, but there is no inflight region to record the unfinished requests in; draining",
                self.name
            );
            return StopMode::Drain;
        }
        if wants_suspend {
            StopMode::Suspend
        } else {
            StopMode::Drain
        }
    }

    /// GET_VRING_BASE_SKIP_DRAIN (45), answered by the agent because the
    /// vhost crate does not know it.
    pub fn get_vring_base_skip_drain(&mut self, index: u32) -> Result<u16, BackendError> {
        if !self.protocol_acked(PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN) {
            return Err(BackendError::NotNegotiated("GET_VRING_BASE_SKIP_DRAIN"));
        }
        self.get_base(index, GetBase::SkipDrain)
    }

    fn get_base(&mut self, index: u32, which: GetBase) -> Result<u16, BackendError> {
        self.start_planned = false;
        let mode = self.stop_mode(which);
        let next_avail = self.stop_vring(index, mode)?;
        let vring = self.vring(index)?;
        // The ring is stopped: a new start needs a new kick (spec "Ring states").
        vring.kick = None;
        vring.enabled = false;
        Ok(next_avail)
    }

    /// Wait for every suspended queue's abandoned storage operations (before
    /// the process exits, so no write is cut off).
    pub fn join_reapers(&mut self) {
        for reaper in self.reapers.drain(..) {
            if reaper.join().is_err() {
                log::error!("a suspended queue's worker panicked");
            }
        }
    }

    /// Log guest memory writes exactly while a log is mapped and
    /// VHOST_F_LOG_ALL is acked (migration in progress).
    fn update_logging(&mut self) {
        self.log
            .apply(&self.name, &mut self.memory, self.acked_features);
    }

    /// Device name for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration the disk holds, as presetup describes it: what
    /// `query-config` serves.
    pub fn current_config(&self) -> presetup::DeviceConfig {
        let options = self.config.options();
        let rings = self.vrings.iter().enumerate().filter_map(|(index, vring)| {
            crate::vring::describe_ring(
                // index < num_queues <= u16::MAX.
                index as u16,
                vring.size,
                vring.frontend_addresses,
                crate::vring::RingFds {
                    next_avail: vring.next_avail,
                    enabled: vring.enabled,
                    kick: vring.kick.is_some() || vring.worker.is_some(),
                    call: vring.call.is_some(),
                },
            )
        });
        crate::backend_shared::device_config(
            self.acked_features,
            self.acked_protocol_features,
            &self.memory,
            rings,
            presetup::DeviceKind::Blk(presetup::BlkConfig {
                num_queues: options.num_queues,
                queue_size: options.queue_size,
                readonly: options.readonly,
                direct: options.direct,
                writeback: self.config.writeback(),
            }),
        )
    }

    /// Protocol features the front-end acked (SET_PROTOCOL_FEATURES).
    pub fn acked_protocol_features(&self) -> u64 {
        self.acked_protocol_features
    }

    /// Whether REPLY_ACK is in force (needed by the agent-handled requests).
    pub fn reply_ack_enabled(&self) -> bool {
        self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// SET_STATUS, handled by the agent because the crate does not.
    pub fn set_status(&mut self, status: u8) {
        self.status.set(&self.name, status);
    }

    /// GET_STATUS: the front-end's status plus NEEDS_RESET if a queue broke.
    pub fn get_status(&self) -> u8 {
        self.status.get()
    }

    /// The front-end went away: stop every queue (finishing in-flight
    /// requests), forget the memory table and negotiated state.
    pub fn disconnect(&mut self) {
        self.start_planned = false;
        self.reset_rings();
        self.inflight = None;
        self.log.forget(&mut self.memory);
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        self.status.reset();
    }

    /// Stop every queue, answering what storage already has. Writes the
    /// write fence still holds stay in the inflight region (QEMU keeps it
    /// across reconnects and hands it to the next back-end).
    fn reset_rings(&mut self) {
        for (index, vring) in self.vrings.iter_mut().enumerate() {
            if let Some(worker) = vring.worker.take() {
                let stopped = worker.stop(StopMode::Detach);
                // index < num_queues <= u16::MAX.
                self.metrics.ring_stopped(
                    index as u16,
                    u64::try_from(stopped.exit.left_in_flight).unwrap_or(u64::MAX),
                );
                log::info!(
                    "{}: queue {index} stopped ({:?}{})",
                    self.name,
                    stopped.exit.stats,
                    if stopped.exit.left_in_flight > 0 {
                        format!(
                            ", {} request(s) left in the inflight region",
                            stopped.exit.left_in_flight
                        )
                    } else {
                        String::new()
                    }
                );
                self.reapers.extend(stopped.reaper);
            }
            *vring = Vring::default();
        }
        self.reapers.retain(|reaper| !reaper.is_finished());
    }

    /// Check an inflight description against the device.
    fn inflight_shape(&self, inflight: &VhostUserInflight) -> Result<(u16, u16), BackendError> {
        let (num_queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        let options = self.config.options();
        let device = blkdev::inflight::DeviceQueues {
            num_queues: options.num_queues,
            max_queue_size: options.queue_size,
        };
        blkdev::inflight::check_shape(num_queues, queue_size, device)?;
        Ok((num_queues, queue_size))
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring, BackendError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vrings.get_mut(i))
            .ok_or(BackendError::QueueIndex(index))
    }

    /// The device's virtio features plus the vhost-user transport bits.
    fn offered_features(&self) -> u64 {
        self.config.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Start the worker of `index` if the ring is fully configured.
    fn maybe_start(&mut self, index: u32) -> Result<(), BackendError> {
        let event_idx = self.acked_features & (1 << blkdev::spec::VIRTIO_RING_F_EVENT_IDX) != 0;
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled; with it
        // they wait for SET_VRING_ENABLE (vhost-user spec, "Ring states").
        let start_enabled = !self.protocol_features_acked();
        let memory = self.memory.atomic();
        let disk = self.disk.clone();
        let engine_kind = self.engine_kind;
        let needs_reset = self.status.needs_reset_flag();
        let name = self.name.clone();
        let poll = std::time::Duration::from_micros(u64::from(self.config.options().poll_us));
        let latency = std::time::Duration::from_millis(u64::from(self.config.options().latency_ms));
        let fence = self.fence.clone();
        // Only a front-end that negotiated suspending can abandon reads.
        let bounce_reads = self.suspend_negotiated();
        let inflight = match &self.inflight {
            // index < num_queues <= u16::MAX (checked by vring() below).
            Some(region) => match region.queue(index as u16) {
                Some(queue) => Some(queue),
                None => {
                    log::warn!(
                        "{name}: queue {index} is beyond the inflight region's {} queue(s); its requests are not tracked",
                        region.num_queues()
                    );
                    None
                }
            },
            None => None,
        };
        let vring = self.vring(index)?;
        let (Some(desc_table), Some(avail_ring), Some(used_ring)) =
            (vring.desc_table, vring.avail_ring, vring.used_ring)
        else {
            return Ok(());
        };
        if vring.size == 0 || vring.kick.is_none() || vring.worker.is_some() {
            return Ok(());
        }
        let Some(kick) = vring.kick.take() else {
            return Ok(());
        };
        // index < num_queues <= u16::MAX (checked by vring()).
        let early_engine = self.presetup.take_engine(index as u16);
        let vring = self.vring(index)?;
        let setup = QueueSetup {
            device: name.clone(),
            // index < num_queues <= u16::MAX (checked by vring()).
            index: index as u16,
            size: vring.size,
            desc_table,
            avail_ring,
            used_ring,
            next_avail: vring.next_avail,
            event_idx,
            poll,
            latency,
            bounce_reads,
        };
        let enabled = vring.enabled || start_enabled;
        vring.enabled = enabled;
        vring.worker = Some(Worker::spawn(
            setup,
            kick,
            vring.call.clone(),
            enabled,
            memory,
            disk,
            engine_kind,
            needs_reset,
            inflight,
            fence,
            early_engine,
        )?);
        log::info!(
            "{name}: queue {index} started (size {}, avail {})",
            vring.size,
            vring.next_avail
        );
        if !self.start_planned {
            // The first ring of a start: plan it against what the disk
            // holds (early engines, or just its open storage) and count it.
            self.start_planned = true;
            let early = self.presetup.take_applied();
            let baseline = self.presetup.baseline();
            let held = match &early {
                Some(early) => crate::switchover::Held::Early(early),
                None => crate::switchover::Held::Baseline(&baseline),
            };
            let final_ = self.current_config();
            crate::switchover::switchover(&self.name, held, final_, &self.metrics);
        }
        // index < num_queues <= u16::MAX (checked by vring()).
        self.metrics.ring_started(index as u16);
        Ok(())
    }

    /// Stop the worker of `index` and remember where it left the ring.
    fn stop_vring(&mut self, index: u32, mode: StopMode) -> Result<u16, BackendError> {
        let name = self.name.clone();
        let vring = self.vring(index)?;
        let Some(worker) = vring.worker.take() else {
            return Ok(vring.next_avail);
        };
        let stopped = worker.stop(mode);
        let exit = stopped.exit;
        vring.next_avail = exit.next_avail;
        // index < num_queues <= u16::MAX (checked by vring()).
        self.metrics.ring_stopped(
            index as u16,
            u64::try_from(exit.left_in_flight).unwrap_or(u64::MAX),
        );
        match mode {
            StopMode::Drain | StopMode::Detach => log::info!(
                "{name}: queue {index} stopped at avail {} ({:?})",
                exit.next_avail,
                exit.stats
            ),
            StopMode::Suspend => self.deferred_logs.push(format!(
                "{name}: queue {index} suspended at avail {} with {} request(s) left in the inflight region, {} write(s) still on storage ({:?})",
                exit.next_avail,
                exit.left_in_flight,
                exit.abandoned_writes,
                exit.stats
            )),
        }
        self.reapers.retain(|reaper| !reaper.is_finished());
        self.reapers.extend(stopped.reaper);
        Ok(exit.next_avail)
    }
}

fn unsupported<T>(what: &'static str) -> VhostResult<T> {
    Err(BackendError::Unsupported(what).into())
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.reset_rings();
        self.inflight = None;
        self.acked_features = 0;
        self.status.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = self.offered_features();
        if features & !offered != 0 {
            return Err(BackendError::Features(features & !offered).into());
        }
        if features != self.acked_features {
            log::info!("{}: features acked {features:#x}", self.name);
        }
        self.acked_features = features;
        self.update_logging();
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<u64>>> {
        self.memory
            .set_table(ctx, files)
            .map_err(BackendError::from)?;
        log::info!("{}: memory table with {} regions", self.name, ctx.len());
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let size = ring_size(index, num, self.config.options().queue_size)?;
        self.vring(index)?.size = size;
        // index < num_queues <= u16::MAX (checked by vring()).
        self.metrics.ring_configured(index as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let (desc_table, avail_ring, used_ring) =
            ring_addresses(&self.memory, index, descriptor, used, available)?;
        let vring = self.vring(index)?;
        vring.desc_table = Some(desc_table);
        vring.used_ring = Some(used_ring);
        vring.avail_ring = Some(avail_ring);
        vring.frontend_addresses = Some(crate::vring::frontend_addresses(
            descriptor, used, available,
        ));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let vring = self.vring(index)?;
        // Split rings carry a 16-bit index; higher bits are for packed rings.
        vring.next_avail = (base & 0xffff) as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let next_avail = self.get_base(index, GetBase::Plain)?;
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let index = u32::from(index);
        // A new kick for a running ring restarts its worker where it stood.
        self.stop_vring(index, StopMode::Drain)?;
        let vring = self.vring(index)?;
        vring.kick = fd;
        self.maybe_start(index).map_err(Into::into)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let vring = self.vring(u32::from(index))?;
        vring.call = fd.map(Arc::new);
        if let Some(worker) = &vring.worker {
            worker.set_call(vring.call.clone());
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        // We never report ring errors through the err eventfd; the fd closes.
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(blk_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        log::info!("{}: protocol features acked {features:#x}", self.name);
        self.acked_protocol_features = features;
        if self.suspend_negotiated() {
            // Suspends are possible from now on: have the fence ready.
            self.fence.prepare();
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.config.options().num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let vring = self.vring(index)?;
        vring.enabled = enable;
        if let Some(worker) = &vring.worker {
            worker.set_enabled(enable);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        // Front-ends may ask for more than we define (newer config fields);
        // those bytes read as zero, like fields of features not offered.
        let space = self.config.config_space();
        Ok(read_config(&space, offset, size)?)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.config
            .write_config(offset, buf)
            .map_err(|e| BackendError::Config(e.to_string()))?;
        self.disk
            .writeback
            .store(self.config.writeback(), Ordering::Relaxed);
        log::info!(
            "{}: write cache {}",
            self.name,
            if self.config.writeback() {
                "writeback"
            } else {
                "writethrough"
            }
        );
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        unsupported("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        unsupported("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = self.inflight_shape(inflight)?;
        let (region, file) =
            InflightRegion::create(num_queues, queue_size).map_err(BackendError::from)?;
        log::info!(
            "{}: new inflight region for {num_queues} queue(s) of {queue_size} ({} bytes)",
            self.name,
            region.mmap_size()
        );
        let reply = VhostUserInflight {
            mmap_size: region.mmap_size(),
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        self.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        let (num_queues, queue_size) = self.inflight_shape(inflight)?;
        let (size, offset) = (inflight.mmap_size, inflight.mmap_offset);
        let region = InflightRegion::map(&file, size, offset, num_queues, queue_size)
            .map_err(BackendError::from)?;
        log::info!(
            "{}: inflight region set for {num_queues} queue(s) of {queue_size} ({size} bytes at offset {offset})",
            self.name
        );
        if self.vrings.iter().any(|vring| vring.worker.is_some()) {
            log::warn!(
                "{}: SET_INFLIGHT_FD while queues run; it applies from their next start",
                self.name
            );
        }
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<u64>> {
        self.memory
            .add_region(region, fd)
            .map_err(BackendError::from)?;
        let guest_phys_addr = region.guest_phys_addr;
        log::debug!("{}: added memory region at {guest_phys_addr:#x}", self.name);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.memory
            .remove_region(region)
            .map_err(BackendError::from)?;
        let guest_phys_addr = region.guest_phys_addr;
        log::debug!(
            "{}: removed memory region at {guest_phys_addr:#x}",
            self.name
        );
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        unsupported("SET_DEVICE_STATE_FD")
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        unsupported("CHECK_DEVICE_STATE")
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        unsupported("GET_SHMEM_CONFIG")
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostResult<()> {
        self.log.map(&self.name, log, &file)?;
        self.update_logging();
        Ok(())
    }
}

impl crate::server::ServedBackend for BlkBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn metrics(&self) -> Arc<crate::metrics::DeviceMetrics> {
        self.metrics.clone()
    }

    fn new_session(&mut self) {
        BlkBackend::new_session(self);
    }

    fn disconnect(&mut self) {
        BlkBackend::disconnect(self);
    }

    /// Suspended queues may still have storage operations running; let them
    /// land before the process goes.
    fn shut_down(&mut self) {
        self.join_reapers();
    }

    fn flush_deferred_logs(&mut self) {
        BlkBackend::flush_deferred_logs(self);
    }

    fn reply_ack_enabled(&self) -> bool {
        BlkBackend::reply_ack_enabled(self)
    }

    fn set_status(&mut self, status: u8) {
        BlkBackend::set_status(self, status);
    }

    fn get_status(&self) -> u8 {
        BlkBackend::get_status(self)
    }

    fn current_config(&self) -> presetup::DeviceConfig {
        BlkBackend::current_config(self)
    }

    fn handle_own(&mut self, code: u32, payload: &[u8]) -> crate::server::OwnRequest {
        use crate::server::OwnRequest;
        if code != 45 {
            return OwnRequest::Unknown;
        }
        // GET_VRING_BASE_SKIP_DRAIN: a vring state {index u32, num u32}; the
        // reply has the same shape.
        let Some(index) = payload
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        else {
            return OwnRequest::Fail(format!("a {}-byte payload", payload.len()));
        };
        match self.get_vring_base_skip_drain(index) {
            Ok(base) => {
                let mut reply = Vec::with_capacity(8);
                reply.extend_from_slice(&index.to_le_bytes());
                reply.extend_from_slice(&u32::from(base).to_le_bytes());
                OwnRequest::Reply(reply)
            }
            Err(e) => OwnRequest::Fail(crate::error_chain(&e)),
        }
    }
}
