//! The narrow interface a device implements under the session.
//!
//! The session ([`super::session::Session`]) speaks vhost-user once for
//! every device: negotiation, memory, the dirty log, status, ring state,
//! the inflight region, the switchover. A device says only what differs:
//! the features and config space it offers, its part of the configuration,
//! how its datapath executes plan steps, how a ring stops, and the few
//! requests only it can answer (net: NET_SET_MTU, SEND_RARP, its device
//! state). The same split as rust-vmm's `vhost-user-backend` (device trait
//! vs. protocol handler) and yc-libvhost-server's device vtable.

use std::fs::File;
use std::sync::Arc;

use blkdev::inflight::InflightQueue;

use super::datapath::{DatapathError, OpResult, Step};
use super::dirty_log::LogRegion;
use super::vring::RingGuestAddresses;

/// How to stop a ring (GET_VRING_BASE, a disconnect, a reset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Answer every request taken from the ring, then stop.
    Drain,
    /// Stop at once: unanswered requests stay in the inflight region and
    /// late storage completions never reach guest memory (blk with
    /// GET_VRING_BASE_INFLIGHT).
    Suspend,
    /// The front-end went away: answer what storage already has, but leave
    /// requests a closed write fence holds in the inflight region instead
    /// of waiting for a gate that may never open.
    Detach,
}

/// Everything a datapath needs to serve a ring, handed over with its kick.
#[derive(Debug)]
pub struct RingStart {
    /// Virtqueue index.
    pub ring: u16,
    /// Descriptors.
    pub size: u16,
    /// Guest physical addresses of the ring parts.
    pub addresses: RingGuestAddresses,
    /// Next available index to process.
    pub next_avail: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// SET_VRING_ENABLE state (rings start enabled without
    /// VHOST_USER_F_PROTOCOL_FEATURES).
    pub enabled: bool,
    /// The guest's kick eventfd.
    pub kick: File,
    /// The guest's call eventfd, if set yet.
    pub call: Option<Arc<File>>,
    /// The ring's part of the inflight region (blk), if one is set.
    pub inflight: Option<InflightQueue>,
    /// The front-end may suspend this ring (GET_VRING_BASE_INFLIGHT): a
    /// datapath must then keep late writes out of guest memory.
    pub suspendable: bool,
}

/// Where a stopped ring stands.
#[derive(Debug, Default)]
pub struct RingStopped {
    /// Next available index: the GET_VRING_BASE answer.
    pub next_avail: u16,
    /// The kick eventfd, back from the datapath (a restart after a reset
    /// reuses it; a GET_VRING_BASE drops it, as the spec says).
    pub kick: Option<File>,
    /// Requests left in the inflight region for whoever uses it next.
    pub handed_off: u64,
    /// The ring's I/O ring (blk) did not come back: it still collects
    /// abandoned storage operations, so the next start needs a new one.
    pub io_ring_lost: bool,
}

/// A request the device refused.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The request is not for this kind of device.
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// A config space write was refused.
    #[error("config space write of {len} byte(s) at {offset} refused")]
    ConfigWrite {
        /// Offset of the write.
        offset: u32,
        /// Its length.
        len: usize,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// NET_SET_MTU with a value the device cannot take.
    #[error("MTU {mtu} refused: the device takes {min}..={max}")]
    Mtu {
        /// The MTU asked for.
        mtu: u64,
        /// Smallest MTU.
        min: u16,
        /// Largest MTU.
        max: u16,
    },
    /// A device state could not be encoded or was refused.
    #[error("device state refused")]
    State(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The datapath failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// An early configuration the device cannot take.
#[derive(Debug, thiserror::Error)]
pub enum EarlyError {
    /// It is for the other kind of device.
    #[error("the early configuration is for a {early} device; this device is {device}")]
    WrongKind {
        /// The early configuration's kind.
        early: presetup::DeviceType,
        /// This device's.
        device: presetup::DeviceType,
    },
    /// More queues (net: pairs) than the device has, or none.
    #[error("the early configuration has {early} queue(s); the device has {device}")]
    Queues {
        /// Queues (pairs) in the early configuration.
        early: u16,
        /// The device's.
        device: u16,
    },
    /// A ring depth beyond the device's.
    #[error("the early configuration's queue size {early} exceeds the device's {device}")]
    QueueSize {
        /// Its queue size.
        early: u16,
        /// The device's.
        device: u16,
    },
    /// Its RSS steering does not fit the device.
    #[error("the early RSS configuration is unusable")]
    Rss(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A device under the session (module documentation).
pub trait Device: Send {
    /// Virtio features offered: the device's and its datapath's (the
    /// session adds the vhost-user transport bits).
    fn features(&self) -> u64;
    /// Protocol features offered (raw bits: some are unknown to the vhost
    /// crate).
    fn protocol_features(&self) -> u64;
    /// GET_QUEUE_NUM: blk queues, net queue pairs.
    fn queue_num(&self) -> u64;
    /// Virtqueues the device has.
    fn num_rings(&self) -> u16;
    /// The largest ring size it takes (a power of two).
    fn max_ring_size(&self) -> u16;
    /// The config space (GET_CONFIG reads from it).
    fn config_space(&self) -> Vec<u8>;
    /// SET_CONFIG.
    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), DeviceError>;
    /// The device's part of the configuration it should hold now.
    fn device_config(&self) -> presetup::DeviceKind;
    /// What the device holds before any plan ran (a disk's storage is open
    /// from the agent's start); `None`: nothing.
    fn baseline(&self) -> Option<presetup::DeviceConfig>;
    /// Take the device part of an early configuration (presetup): check it
    /// fits and make it what the device should hold (net: its MTU, MAC and
    /// RSS become the early ones). Returns the device part the early plan
    /// realises.
    fn take_early(
        &mut self,
        early: &presetup::DeviceConfig,
    ) -> Result<presetup::DeviceKind, EarlyError>;
    /// Execute plan steps in order, stopping at the first failure; one
    /// result per step executed.
    fn execute(&mut self, steps: Vec<Step>) -> Vec<OpResult>;
    /// Stop serving ring `ring`.
    fn stop_ring(&mut self, ring: u16, mode: StopMode) -> RingStopped;

    /// A front-end connected.
    fn connected(&mut self) {}
    /// The front-end acked these protocol features.
    fn protocol_features_acked(&mut self, features: u64) {
        let _ = features;
    }
    /// The front-end went away (its rings are stopped already).
    fn disconnected(&mut self) {}
    /// The agent stops: wait for what must finish first.
    fn shut_down(&mut self) {}
    /// The session logs guest memory writes into `log` from now on
    /// (`None`: logging is off). The agent's own writes are logged through
    /// its guest memory type; a device whose datapath writes guest memory
    /// by other means (the kernel's vhost-net) hands the log on. Called
    /// whenever logging may have changed; an error means writes would go
    /// unlogged, so the request that switched logging fails.
    fn set_log(&mut self, log: Option<Arc<LogRegion>>) -> Result<(), DeviceError> {
        let _ = log;
        Ok(())
    }
    /// Log lines held back until a reply went out.
    fn flush_deferred_logs(&mut self) {}
    /// NET_SET_MTU: check `mtu` and make it the MTU the device should have.
    fn net_set_mtu(&mut self, mtu: u64) -> Result<(), DeviceError> {
        let _ = mtu;
        Err(DeviceError::Unsupported("NET_SET_MTU"))
    }
    /// SEND_RARP: announce `mac`; whether a frame went out.
    fn send_rarp(&mut self, mac: [u8; 6]) -> Result<bool, DeviceError> {
        let _ = mac;
        Err(DeviceError::Unsupported("SEND_RARP"))
    }
    /// The agent-side device state to migrate (SET_DEVICE_STATE_FD, SAVE).
    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        Err(DeviceError::Unsupported("SET_DEVICE_STATE_FD"))
    }
    /// Take a migrated device state (CHECK_DEVICE_STATE after a LOAD); the
    /// session then applies what changed.
    fn load_state(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        let _ = bytes;
        Err(DeviceError::Unsupported("SET_DEVICE_STATE_FD"))
    }
    /// Whether the in-band presetup bracket applies to this device.
    fn supports_inband_presetup(&self) -> bool {
        false
    }
}
