//! The vhost-user session: the one request handler every device runs
//! under.
//!
//! It owns everything protocol-level (acked features, the memory table and
//! mappings, the dirty log, the device status, ring state, the inflight
//! region, device-state transfers, the in-band presetup bracket) and the
//! switchover: what the front-end configured is kept as the *desired*
//! configuration, and [`reconcile`] plans from what the device holds to it
//! (`presetup::plan`) and has the device's datapath execute the plan op by
//! op. A device ([`Device`]) implements only what differs.
//!
//! * [`handler`]: the `vhost` crate's handler trait, one thin method per
//!   request;
//! * [`own`]: the requests the agent reads itself (the request table's
//!   `HandledBy::Agent` rows);
//! * [`rings`]: starting, stopping and describing rings;
//! * [`reconcile`]: the plan, its steps and what they did;
//! * [`inflight`], [`transfer`], [`inband`]: the inflight region,
//!   device-state transfers and the presetup bracket.

use std::sync::{Arc, Mutex};

use presetup::{DeviceConfig, ValidConfig};

use super::device::{Device, EarlyError};
use super::dirty_log::DirtyLog;
use super::inband::{Bracket, PresetupProtocol};
use super::memory::{MemoryError, MemoryMap, MemoryTable};
use super::status::DeviceStatus;
use super::vring::RingState;
use crate::metrics::DeviceMetrics;

mod error;
mod handler;
mod inband;
mod inflight;
pub(crate) mod own;
mod reconcile;
mod rings;
#[cfg(test)]
mod tests;
mod transfer;

pub use error::SessionError;
pub use reconcile::OpsReport;

/// The last configuration a session published: how the control thread
/// reads it (`query-config`) without waiting for the protocol thread,
/// which may be blocked in a message.
#[derive(Debug, Default)]
pub struct ConfigSnapshot(Mutex<Option<DeviceConfig>>);

impl ConfigSnapshot {
    /// The configuration as of the last message handled; `None` before the
    /// session has published one.
    pub fn get(&self) -> Option<DeviceConfig> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, config: DeviceConfig) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(config);
    }
}

/// What the device holds, as far as the session knows.
#[derive(Clone, Debug)]
enum Applied {
    /// Exactly this (every plan so far succeeded).
    Held(DeviceConfig),
    /// Nothing: a fresh device.
    Fresh,
    /// A plan failed half-way: the next one starts with a reset.
    Untrusted,
}

/// Why an early configuration was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PresetupError {
    /// It does not fit the device.
    #[error(transparent)]
    Early(#[from] EarlyError),
    /// The device runs: an early configuration is for a device that will
    /// start, not one that serves a front-end now.
    #[error("the device is running; presetup is for a device before its start")]
    Running,
    /// What it describes does not validate.
    #[error("the early configuration is not usable")]
    Invalid(#[source] presetup::ConfigError),
    /// Executing its plan failed; the device will be configured in full.
    #[error("executing the early configuration failed")]
    Execute(#[source] SessionError),
}

/// The vhost-user session of one device (module documentation).
pub struct Session {
    name: Arc<str>,
    device: Box<dyn Device>,
    metrics: Arc<DeviceMetrics>,
    snapshot: Arc<ConfigSnapshot>,
    inband: PresetupProtocol,
    /// SET_FEATURES arrived since the connection (or a reset): before
    /// that the desired configuration is incomplete and nothing is
    /// reconciled (a plan against features 0 would undo presetup's work).
    features_set: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    table: MemoryTable,
    memory: MemoryMap,
    log: DirtyLog,
    status: DeviceStatus,
    rings: Vec<RingState>,
    inflight: Option<blkdev::inflight::InflightRegion>,
    transfer: Option<transfer::Transfer>,
    bracket: Bracket,
    applied: Applied,
    /// `applied` came from an early configuration no start used yet.
    early: bool,
    /// The current start's switchover, while it lasts.
    start: Option<reconcile::StartReport>,
    /// The message being handled may leave its plan for later: the
    /// front-end waits for no answer, so the plan can run once for a
    /// burst of messages ([`Self::flush`]).
    may_defer: bool,
    /// A plan was left for later.
    deferred: bool,
}

impl Session {
    /// A session for `device` named `name`, whose datapath reads guest
    /// memory from `memory` and raises `status`'s NEEDS_RESET flag.
    pub fn new(
        name: &str,
        device: Box<dyn Device>,
        memory: MemoryMap,
        status: DeviceStatus,
        metrics: Arc<DeviceMetrics>,
        inband: PresetupProtocol,
    ) -> Session {
        let rings = (0..device.num_rings())
            .map(|_| RingState::default())
            .collect();
        let applied = match device.baseline() {
            Some(baseline) => Applied::Held(baseline),
            None => Applied::Fresh,
        };
        let session = Session {
            name: Arc::from(name),
            device,
            metrics,
            snapshot: Arc::default(),
            inband,
            features_set: false,
            acked_features: 0,
            acked_protocol_features: 0,
            table: MemoryTable::default(),
            memory,
            log: DirtyLog::default(),
            status,
            rings,
            inflight: None,
            transfer: None,
            bracket: Bracket::default(),
            applied,
            early: false,
            start: None,
            may_defer: false,
            deferred: false,
        };
        session.publish();
        session
    }

    /// Device name for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's timeline and figures.
    pub fn metrics(&self) -> &Arc<DeviceMetrics> {
        &self.metrics
    }

    /// Where the session publishes its configuration (`query-config`).
    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        self.snapshot.clone()
    }

    /// Publish the desired configuration for `query-config`.
    pub fn publish(&self) {
        self.snapshot.set(self.desired_config());
    }

    /// Whether REPLY_ACK was negotiated.
    pub fn reply_ack_enabled(&self) -> bool {
        self.protocol_acked(vhost::vhost_user::message::VhostUserProtocolFeatures::REPLY_ACK.bits())
    }

    /// The protocol features the front-end acked.
    pub fn acked_protocol_features(&self) -> u64 {
        self.acked_protocol_features
    }

    fn protocol_acked(&self, bits: u64) -> bool {
        self.acked_protocol_features & bits == bits
    }

    /// A front-end connected: a session from scratch.
    pub fn connected(&mut self) {
        self.device.connected();
    }

    /// The front-end went away: stop the rings (requests storage has are
    /// answered), tear down what the connection set up, forget its state.
    /// Device-level resources (queues, I/O rings, MTU) stay for the next
    /// front-end.
    pub fn disconnected(&mut self) {
        self.deferred = false;
        self.may_defer = false;
        self.stop_all_rings(super::device::StopMode::Detach);
        self.teardown_connection();
        self.bracket.reset();
        self.inflight = None;
        self.transfer = None;
        self.log.forget(&mut self.memory);
        if let Err(e) = self.device.set_log(None) {
            log::warn!(
                "{}: dirty logging off: {}",
                self.name,
                crate::error_chain(&e)
            );
        }
        self.table.clear();
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        self.features_set = false;
        self.status.reset();
        self.device.disconnected();
        self.publish();
    }

    /// The agent stops: what must finish first (a suspended disk's
    /// abandoned storage operations) finishes.
    pub fn shut_down(&mut self) {
        self.device.shut_down();
    }

    /// A message arrives. `may_defer`: the front-end waits for no answer
    /// to it, so what it changes may be planned together with the
    /// messages after it. A message that is answered first sees every
    /// plan left for later executed.
    pub fn begin_message(&mut self, may_defer: bool) {
        if !may_defer {
            self.flush();
        }
        self.may_defer = may_defer;
    }

    /// A setter was refused and the front-end, which asked for no reply,
    /// cannot know: raise NEEDS_RESET so GET_STATUS tells it.
    pub fn refused_unanswered(&mut self) {
        self.status.raise_needs_reset();
    }

    /// Run the plan left for later, if any: no more messages wait (or one
    /// that is answered comes). A failure is logged and raises NEEDS_RESET
    /// (the messages it belongs to had no answer to carry it).
    pub fn flush(&mut self) {
        self.may_defer = false;
        if std::mem::take(&mut self.deferred) {
            let began = std::time::Instant::now();
            let result = self.reconcile(None);
            self.metrics.work_done(began);
            if let Err(e) = result {
                log::warn!(
                    "{}: the configuration could not be applied: {}",
                    self.name,
                    crate::error_chain(&e)
                );
            }
            self.publish();
        }
    }

    /// The reply to the last request is out: write what was held back.
    pub fn after_reply(&mut self) {
        self.device.flush_deferred_logs();
    }

    /// Take `early` as the device's early configuration (control API
    /// `presetup`): execute its plan now, so the start applies only what
    /// differs. Memory and rings come only with the start (they need fds),
    /// so what the device already holds of them stays.
    pub fn presetup(&mut self, early: ValidConfig) -> Result<OpsReport, PresetupError> {
        self.flush();
        if self.rings.iter().any(|ring| ring.running) {
            return Err(PresetupError::Running);
        }
        let early = early.into_inner();
        let device_type = match self.device.device_config() {
            presetup::DeviceKind::Net(_) => presetup::DeviceType::Net,
            presetup::DeviceKind::Blk(_) => presetup::DeviceType::Blk,
        };
        if early.device_type() != device_type {
            return Err(EarlyError::WrongKind {
                early: early.device_type(),
                device: device_type,
            }
            .into());
        }
        let device = self.device.take_early(&early)?;
        let (memory, rings) = match &self.applied {
            Applied::Held(held) => (held.memory.clone(), held.rings.clone()),
            Applied::Fresh | Applied::Untrusted => (Vec::new(), Vec::new()),
        };
        let target = DeviceConfig {
            version: presetup::FORMAT_VERSION,
            acked_features: early.acked_features,
            protocol_features: early.protocol_features,
            memory,
            rings,
            device,
        };
        let target = ValidConfig::new(target).map_err(PresetupError::Invalid)?;
        let report = self
            .reconcile_to(target, reconcile::Purpose::Early)
            .map_err(PresetupError::Execute)?;
        self.early = true;
        self.publish();
        Ok(report)
    }
}

impl From<MemoryError> for SessionError {
    fn from(e: MemoryError) -> SessionError {
        SessionError::Memory(e)
    }
}
