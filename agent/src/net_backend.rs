//! The vhost-user request handler of a net device: turns messages into ring
//! configuration and hands running rings to the device's data path thread
//! ([`crate::net_worker`]).
//!
//! QEMU drives a net device as one vhost device per queue pair (PROTOCOL.md
//! §5b): features and memory arrive once per pair or only for pair 0, a
//! pair may be enabled before its rings exist, and stopping is
//! GET_VRING_BASE alone. Its control queue stays in QEMU, so the device
//! learns the active pairs from SET_VRING_ENABLE and steers RX itself.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use netdev::dataplane::Dataplane;
use netdev::rss::{Rss, RssConfig};
use netdev::spec::{self, MacAddress};
use netdev::stats::{PairCounts, PairStats};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut};
use vm_memory::GuestMemoryAtomic;

use crate::backend_shared::{read_config, ring_addresses, ring_size, DeviceStatus, DirtyLog};
use crate::blk_backend::BackendError;
use crate::memory::{GuestRam, MemoryMap, MAX_MEM_SLOTS};
use crate::net_worker::{DataPathOutputs, NetWorker, NetWorkerError, RingStart};
use crate::presetup_inband::{self, Bracket, PresetupProtocol};
use crate::server::OwnRequest;
use crate::vring::{build_queue, VringConfig};

mod inband;

/// Version of the device state format (SET_DEVICE_STATE_FD).
pub const NET_STATE_VERSION: u32 = 1;

/// The largest device state we read (the real one is a few hundred bytes).
const MAX_STATE_BYTES: u64 = 1 << 20;

/// The agent-side state of a net device that migrates with the guest
/// through SET_DEVICE_STATE_FD: what QEMU does not know because it lives
/// only in the agent (RSS steering, the MTU set on the device).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// [`NET_STATE_VERSION`].
    pub version: u32,
    /// Queue pairs of the device the state comes from.
    pub queue_pairs: u16,
    /// The MTU in force.
    pub mtu: u16,
    /// The MAC last announced (SEND_RARP) or configured.
    pub mac: MacAddress,
    /// RSS steering, if configured.
    pub rss: Option<RssConfig>,
}

/// How a net device is built (from `--net`).
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Queue pairs.
    pub queue_pairs: u16,
    /// MTU offered (VIRTIO_NET_F_MTU) and set on the dataplane.
    pub mtu: u16,
    /// Config space MAC.
    pub mac: MacAddress,
    /// Busy-poll time of the data path.
    pub poll: Duration,
    /// RSS steering to start with.
    pub rss: Option<RssConfig>,
    /// In-band presetup (`serve --presetup-protocol`).
    pub presetup_protocol: PresetupProtocol,
}

/// A device state transfer in progress.
enum Transfer {
    Save(JoinHandle<std::io::Result<()>>),
    Load(JoinHandle<std::io::Result<Vec<u8>>>),
}

/// What the control API sees of a net device.
#[derive(Debug)]
pub struct NetShared {
    /// Per-pair counters.
    pub stats: Arc<[PairStats]>,
    /// The dataplane, described.
    pub dataplane: String,
    /// Agent-side state (RSS, MTU, MAC).
    pub state: Mutex<NetState>,
    /// What a `sim` dataplane charged so far (`None` for others).
    pub sim: Arc<Mutex<Option<crate::net_worker::SimReport>>>,
    /// The early configuration (control API `presetup`).
    pub presetup: crate::net_presetup::NetPresetup,
    /// The device's timeline and figures.
    pub metrics: Arc<crate::metrics::DeviceMetrics>,
}

/// The vhost-user back-end of one net device.
pub struct NetBackend {
    name: Arc<str>,
    options: NetOptions,
    offered_offloads: u64,
    acked_features: u64,
    acked_protocol_features: u64,
    memory: MemoryMap,
    log: DirtyLog,
    vrings: Vec<VringConfig>,
    running: Vec<bool>,
    status: DeviceStatus,
    worker: NetWorker,
    shared: Arc<NetShared>,
    transfer: Option<Transfer>,
    metrics: Arc<crate::metrics::DeviceMetrics>,
    /// The current start was planned (and counted) against the early
    /// configuration; cleared by a stop or a disconnect.
    start_planned: bool,
    /// The in-band presetup bracket (only with `--presetup-protocol`).
    bracket: Bracket,
}

/// Protocol features a net device offers. With in-band presetup on, that
/// includes bit 18 as the RFC's PRESETUP; the agent never offers upstream
/// SHARED_OBJECT, which has the same bit.
pub fn net_protocol_features(presetup: PresetupProtocol) -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::from_bits_retain(presetup.protocol_features())
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RARP
        | VhostUserProtocolFeatures::MTU
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::DEVICE_STATE
}

impl NetBackend {
    /// A back-end over `dataplane` (already open); starts the data path
    /// thread.
    pub fn new(
        name: &str,
        options: NetOptions,
        dataplane: Dataplane,
        metrics: Arc<crate::metrics::DeviceMetrics>,
    ) -> Result<NetBackend, NetWorkerError> {
        let name: Arc<str> = Arc::from(name);
        let pairs = options.queue_pairs;
        let memory = MemoryMap::default();
        let stats: Arc<[PairStats]> = (0..pairs).map(|_| PairStats::default()).collect();
        let status = DeviceStatus::default();
        let offered_offloads = dataplane.offload_features();
        let sim = Arc::new(Mutex::new(None));
        let described = dataplane.describe();
        let atomic: GuestMemoryAtomic<GuestRam> = memory.atomic();
        let worker = NetWorker::spawn(
            name.clone(),
            dataplane,
            pairs,
            atomic,
            DataPathOutputs {
                stats: stats.clone(),
                sim_report: sim.clone(),
                needs_reset: status.needs_reset_flag(),
            },
            options.poll,
        )?;
        let shared = Arc::new(NetShared {
            sim: sim.clone(),
            stats: stats.clone(),
            presetup: crate::net_presetup::NetPresetup::new(worker.early_handle(), pairs),
            metrics: metrics.clone(),
            dataplane: described,
            state: Mutex::new(NetState {
                version: NET_STATE_VERSION,
                queue_pairs: pairs,
                mtu: options.mtu,
                mac: options.mac,
                rss: options.rss.clone(),
            }),
        });
        let mut backend = NetBackend {
            name,
            vrings: (0..2 * pairs).map(|_| VringConfig::default()).collect(),
            running: vec![false; 2 * usize::from(pairs)],
            options,
            offered_offloads,
            acked_features: 0,
            acked_protocol_features: 0,
            memory,
            log: DirtyLog::default(),
            status,
            worker,
            shared,
            transfer: None,
            metrics,
            start_planned: false,
            bracket: Bracket::default(),
        };
        if let Some(config) = backend.options.rss.clone() {
            if let Err(e) = backend.set_rss(Some(config)) {
                log::error!("{}: RSS configuration refused: {e}", backend.name);
            }
        }
        Ok(backend)
    }

    /// What the control API shows of this device.
    pub fn shared(&self) -> Arc<NetShared> {
        self.shared.clone()
    }

    /// Steer received frames with `config` (validated against the device's
    /// queue pairs), or by pair with `None`.
    pub fn set_rss(&mut self, config: Option<RssConfig>) -> Result<(), String> {
        let rss = config
            .clone()
            .map(|config| Rss::new(config, self.options.queue_pairs))
            .transpose()
            .map_err(|e| e.to_string())?;
        self.worker.set_rss(rss);
        self.lock_state().rss = config;
        Ok(())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn vring(&mut self, index: u32) -> Result<&mut VringConfig, BackendError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vrings.get_mut(i))
            .ok_or(BackendError::QueueIndex(index))
    }

    fn offered_features(&self) -> u64 {
        spec::BASE_FEATURES
            | self.offered_offloads
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn update_logging(&mut self) {
        self.log
            .apply(&self.name, &mut self.memory, self.acked_features);
    }

    /// Hand ring `index` to the data path if it is fully configured.
    fn maybe_start(&mut self, index: u32) -> Result<(), BackendError> {
        let event_idx = self.acked_features
            & spec::bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled; with
        // it they wait for SET_VRING_ENABLE (vhost-user spec, "Ring states").
        let start_enabled =
            self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        let atomic = self.memory.atomic();
        let name = self.name.clone();
        let slot = usize::try_from(index).map_err(|_| BackendError::QueueIndex(index))?;
        if self.running.get(slot).copied().unwrap_or(true) {
            return Ok(());
        }
        let in_bracket = self.bracket.is_open();
        let vring = self.vring(index)?;
        let Some(addresses) = vring.addresses() else {
            return Ok(());
        };
        if vring.size == 0 || vring.kick.is_none() {
            return Ok(());
        }
        if in_bracket {
            // Inside a presetup bracket guest RAM has not been migrated
            // yet: the ring must not start (building it reads used->idx).
            // The RFC sends no kick fd here; one that came anyway waits for
            // the real start's SET_VRING_KICK.
            log::warn!("{name}: kick fd for queue {index} inside a presetup bracket; the queue starts with the real start");
            return Ok(());
        }
        let mem = vm_memory::GuestAddressSpace::memory(&atomic);
        let queue = match build_queue(vring.size, addresses, vring.next_avail, event_idx, &mem) {
            Ok(queue) => queue,
            Err(reason) => {
                log::error!(
                    "{name}: queue {index} cannot start: {reason}; the device needs a reset"
                );
                self.status.raise_needs_reset();
                return Ok(());
            }
        };
        let Some(kick) = vring.kick.take() else {
            return Ok(());
        };
        let enabled = vring.enabled || start_enabled;
        vring.enabled = enabled;
        let (size, next_avail, call) = (vring.size, vring.next_avail, vring.call.clone());
        self.worker.start(RingStart {
            // index < 2 * MAX_QUEUE_PAIRS (checked by vring()).
            index: index as u16,
            queue,
            kick,
            call,
            enabled,
        });
        self.running[slot] = true;
        if !self.start_planned {
            // The first ring of a start: plan the switchover against what
            // the device holds early (the heavy work was done then) and
            // count it. The dataplane already skipped what it had.
            self.start_planned = true;
            let early = self.shared.presetup.take_applied();
            let held = match &early {
                Some(early) => crate::switchover::Held::Early(early),
                None => crate::switchover::Held::Nothing,
            };
            let final_ = self.current_config();
            crate::switchover::switchover(&self.name, held, final_, &self.metrics);
        }
        self.metrics.ring_started(index as u16);
        log::info!("{name}: queue {index} started (size {size}, avail {next_avail})");
        Ok(())
    }

    /// Take ring `index` back from the data path; where it stopped.
    fn stop_vring(&mut self, index: u32) -> Result<u16, BackendError> {
        let name = self.name.clone();
        let slot = usize::try_from(index).map_err(|_| BackendError::QueueIndex(index))?;
        let was_running = self.running.get(slot).copied().unwrap_or(false);
        // index < 2 * MAX_QUEUE_PAIRS (checked by vring() below).
        let stopped = if was_running {
            self.worker.stop(index as u16)
        } else {
            None
        };
        if let Some(running) = self.running.get_mut(slot) {
            *running = false;
        }
        if stopped.is_some() {
            self.metrics.ring_stopped(index as u16, 0);
        }
        let vring = self.vring(index)?;
        if let Some(next_avail) = stopped {
            vring.next_avail = next_avail;
            log::info!("{name}: queue {index} stopped at avail {next_avail}");
        }
        Ok(vring.next_avail)
    }

    fn reset_rings(&mut self) {
        for index in 0..self.vrings.len() {
            // index < 2 * MAX_QUEUE_PAIRS.
            let _ = self.stop_vring(index as u32);
            self.vrings[index] = VringConfig::default();
        }
    }

    /// The configuration the device holds, as presetup describes it: what
    /// the switchover is planned against and what `query-config` serves.
    pub fn current_config(&self) -> presetup::DeviceConfig {
        let state = self.lock_state().clone();
        let rings = self.vrings.iter().enumerate().filter_map(|(index, vring)| {
            let running = self.running.get(index).copied().unwrap_or(false);
            // index < 2 * MAX_QUEUE_PAIRS.
            vring.describe(index as u16, running)
        });
        crate::backend_shared::device_config(
            self.acked_features,
            self.acked_protocol_features,
            &self.memory,
            rings,
            presetup::DeviceKind::Net(presetup::NetConfig {
                mtu: state.mtu,
                mac: state.mac.0,
                queue_pairs: self.options.queue_pairs,
                rss: state.rss.as_ref().map(crate::net_presetup::rss_spec),
            }),
        )
    }

    /// Per-pair counters, for logs and the control API.
    pub fn counts(&self) -> Vec<PairCounts> {
        self.shared.stats.iter().map(PairStats::snapshot).collect()
    }

    fn net_set_mtu(&mut self, payload: &[u8]) -> bool {
        let Some(mtu) = crate::wire::payload_u64(payload) else {
            log::warn!(
                "{}: NET_SET_MTU with a {}-byte payload",
                self.name,
                payload.len()
            );
            return false;
        };
        let Some(mtu) = u16::try_from(mtu).ok().filter(|&m| m >= spec::MIN_MTU) else {
            log::warn!(
                "{}: NET_SET_MTU {mtu} refused: must be 68..=65535",
                self.name
            );
            return false;
        };
        match self.worker.set_mtu(mtu) {
            Ok(()) => {
                log::info!("{}: MTU {mtu}", self.name);
                self.lock_state().mtu = mtu;
                true
            }
            Err(e) => {
                log::warn!("{}: NET_SET_MTU {mtu} failed: {e}", self.name);
                false
            }
        }
    }

    fn send_rarp(&mut self, payload: &[u8]) -> bool {
        let Some(bytes) = payload.get(..6) else {
            log::warn!(
                "{}: SEND_RARP with a {}-byte payload",
                self.name,
                payload.len()
            );
            return false;
        };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(bytes);
        let mac = MacAddress(mac);
        self.lock_state().mac = mac;
        match self.worker.announce(mac) {
            Ok(true) => {
                log::info!("{}: announced {mac} on the dataplane (RARP)", self.name);
                true
            }
            Ok(false) => {
                log::info!(
                    "{}: SEND_RARP for {mac}: the dataplane has no wire to announce on",
                    self.name
                );
                true
            }
            Err(e) => {
                log::warn!("{}: SEND_RARP for {mac} failed: {e}", self.name);
                false
            }
        }
    }

    /// Apply a device state received through SET_DEVICE_STATE_FD.
    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        let state: NetState =
            serde_json::from_slice(bytes).map_err(|e| format!("device state is not valid: {e}"))?;
        if state.version != NET_STATE_VERSION {
            return Err(format!(
                "device state version {} (this agent reads {NET_STATE_VERSION})",
                state.version
            ));
        }
        if state.queue_pairs != self.options.queue_pairs {
            log::warn!(
                "{}: device state from a device with {} queue pair(s); this one has {}",
                self.name,
                state.queue_pairs,
                self.options.queue_pairs
            );
        }
        self.set_rss(state.rss.clone())?;
        if state.mtu != self.lock_state().mtu {
            self.worker.set_mtu(state.mtu)?;
        }
        let mut current = self.lock_state();
        current.mtu = state.mtu;
        current.mac = state.mac;
        log::info!(
            "{}: device state loaded (MTU {}, MAC {}, RSS {})",
            self.name,
            state.mtu,
            state.mac,
            if state.rss.is_some() { "on" } else { "off" }
        );
        Ok(())
    }
}

fn unsupported<T>(what: &'static str) -> VhostResult<T> {
    Err(BackendError::Unsupported(what).into())
}

impl VhostUserBackendReqHandlerMut for NetBackend {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        crate::server::ServedBackend::disconnect(self);
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.reset_rings();
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
            self.worker.set_features(features).map_err(|e| {
                BackendError::Config(format!("the dataplane refused the features: {e}"))
            })?;
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
        let change = self
            .memory
            .set_table_keeping(ctx, files)
            .map_err(BackendError::from)?;
        match change {
            crate::memory::TableChange::Remapped => {
                self.worker.map_memory();
                log::info!("{}: memory table with {} regions", self.name, ctx.len());
            }
            crate::memory::TableChange::Kept => log::info!(
                "{}: memory table with {} regions unchanged; mappings kept",
                self.name,
                ctx.len()
            ),
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let size = ring_size(index, num, spec::MAX_QUEUE_SIZE)?;
        self.vring(index)?.size = size;
        // index < 2 * MAX_QUEUE_PAIRS (checked by vring()).
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
        self.start_planned = false;
        let next_avail = self.stop_vring(index)?;
        let vring = self.vring(index)?;
        // The ring is stopped: a new start needs a new kick (spec "Ring states").
        vring.kick = None;
        vring.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let index = u32::from(index);
        // A new kick for a running ring restarts it where it stood.
        self.stop_vring(index)?;
        let vring = self.vring(index)?;
        vring.kick = fd;
        self.maybe_start(index).map_err(Into::into)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let vring = self.vring(u32::from(index))?;
        vring.call = fd.map(Arc::new);
        let call = vring.call.clone();
        if self.running[usize::from(index)] {
            self.worker.set_call(u16::from(index), call);
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        // Ring errors are never reported through the err eventfd.
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(net_protocol_features(self.options.presetup_protocol))
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        log::info!("{}: protocol features acked {features:#x}", self.name);
        self.acked_protocol_features = features;
        Ok(())
    }

    /// Queue pairs, as QEMU's net client and DPDK's virtio_user read it.
    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.options.queue_pairs))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let vring = self.vring(index)?;
        let changed = vring.enabled != enable;
        vring.enabled = enable;
        // index < 2 * MAX_QUEUE_PAIRS (checked by vring()). The data path
        // hears of it even for a ring not yet running: a pair's dataplane
        // queue follows its RX ring.
        self.worker.set_enabled(index as u16, enable);
        if changed && index.is_multiple_of(2) {
            log::info!(
                "{}: queue pair {} {}",
                self.name,
                index / 2,
                if enable { "enabled" } else { "disabled" }
            );
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        let state = self.lock_state().clone();
        let space = spec::config_space(state.mac, true, self.options.queue_pairs, state.mtu);
        Ok(read_config(&space, offset, size)?)
    }

    fn set_config(
        &mut self,
        offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        Err(BackendError::Config(format!(
            "write at {offset}: the virtio-net config space is read-only"
        ))
        .into())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        unsupported("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        unsupported("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        unsupported("GET_INFLIGHT_FD")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VhostResult<()> {
        unsupported("SET_INFLIGHT_FD")
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
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.memory
            .remove_region(region)
            .map_err(BackendError::from)?;
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VhostResult<Option<File>> {
        if !matches!(phase, VhostTransferStatePhase::STOPPED) {
            return Err(BackendError::Unsupported(
                "device state transfer outside the stopped phase",
            )
            .into());
        }
        if self.transfer.is_some() {
            log::warn!(
                "{}: a new device state transfer replaces one that was never checked",
                self.name
            );
        }
        // The pipe is served on a thread of its own: the front-end reads or
        // writes it only after this reply.
        let name = self.name.clone();
        self.transfer = Some(match direction {
            VhostTransferStateDirection::SAVE => {
                let state = serde_json::to_vec(&*self.lock_state()).map_err(|e| {
                    BackendError::Config(format!("cannot encode device state: {e}"))
                })?;
                log::info!("{name}: saving device state ({} bytes)", state.len());
                Transfer::Save(std::thread::spawn(move || {
                    let mut fd = fd;
                    fd.write_all(&state)
                }))
            }
            VhostTransferStateDirection::LOAD => Transfer::Load(std::thread::spawn(move || {
                let mut bytes = Vec::new();
                fd.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
                if bytes.len() as u64 > MAX_STATE_BYTES {
                    return Err(std::io::Error::other("device state larger than 1 MiB"));
                }
                Ok(bytes)
            })),
        });
        Ok(None)
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        let joined = |r: std::thread::Result<std::io::Result<()>>| match r {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("the transfer thread panicked".to_string()),
        };
        let result = match self.transfer.take() {
            None => Err("no device state transfer was started".to_string()),
            Some(Transfer::Save(thread)) => joined(thread.join()),
            Some(Transfer::Load(thread)) => match thread.join() {
                Ok(Ok(bytes)) => self.load_state(&bytes),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the transfer thread panicked".to_string()),
            },
        };
        result.map_err(|e| {
            log::error!("{}: device state transfer failed: {e}", self.name);
            BackendError::Config(format!("device state transfer failed: {e}")).into()
        })
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

impl crate::server::ServedBackend for NetBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn metrics(&self) -> Arc<crate::metrics::DeviceMetrics> {
        self.metrics.clone()
    }

    fn disconnect(&mut self) {
        self.start_planned = false;
        self.bracket.reset();
        // The memory goes below: an early configuration stops holding it.
        self.shared.presetup.connection_lost();
        self.reset_rings();
        self.log.forget(&mut self.memory);
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        self.status.reset();
        self.transfer = None;
        let counts = self.counts();
        log::info!("{}: counters {counts:?}", self.name);
    }

    fn reply_ack_enabled(&self) -> bool {
        self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn set_status(&mut self, status: u8) {
        self.status.set(&self.name, status);
    }

    fn get_status(&self) -> u8 {
        self.status.get()
    }

    fn current_config(&self) -> presetup::DeviceConfig {
        NetBackend::current_config(self)
    }

    fn claims(&self, header: &crate::wire::Header) -> Option<&'static str> {
        (header.code == presetup_inband::VHOST_USER_PRESETUP
            && self
                .options
                .presetup_protocol
                .claims_request_41(self.acked_protocol_features))
        .then_some("PRESETUP")
    }

    fn handle_own(&mut self, code: u32, payload: &[u8]) -> OwnRequest {
        match code {
            19 => OwnRequest::Ack(self.send_rarp(payload)),
            20 => OwnRequest::Ack(self.net_set_mtu(payload)),
            presetup_inband::VHOST_USER_PRESETUP => match presetup_inband::decode(payload) {
                Some(value) => self.presetup(value),
                // Only claimed with bit 18 negotiated as PRESETUP: a
                // front-end sending GET_SHARED_OBJECT's UUID means the other
                // thing by bit 18, and wants a reply we cannot give.
                None => OwnRequest::Fail(format!(
                    "request 41 with a {}-byte payload is upstream GET_SHARED_OBJECT, but \
                     protocol feature 18 was negotiated as the NVIDIA presetup \
                     (--presetup-protocol=nvidia-rfc): the front-end speaks SHARED_OBJECT",
                    payload.len()
                )),
            },
            _ => OwnRequest::Unknown,
        }
    }
}
