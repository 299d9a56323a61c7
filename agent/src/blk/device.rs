//! A virtio-blk disk under the session: what it offers, its part of the
//! configuration, and its datapath ([`BlkStorage`]).

use std::sync::Arc;

use blkdev::fence::Fence;
use blkdev::BlkConfig;
use presetup::{DeviceConfig, DeviceKind};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::storage::BlkStorage;
use crate::vhost_user::datapath::{self, OpResult, Step};
use crate::vhost_user::device::{Device, DeviceError, EarlyError, RingStopped, StopMode};
use crate::vhost_user::requests::feature;

/// Protocol features a disk offers.
pub fn blk_protocol_features() -> u64 {
    (VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT)
        .bits()
        | feature::mask(feature::GET_VRING_BASE_SKIP_DRAIN)
}

/// A disk (module documentation).
pub struct BlkDevice {
    config: BlkConfig,
    storage: BlkStorage,
    fence: Arc<Fence>,
}

impl BlkDevice {
    /// A disk described by `config` over `storage`, behind `fence`.
    pub fn new(config: BlkConfig, storage: BlkStorage, fence: Arc<Fence>) -> BlkDevice {
        BlkDevice {
            config,
            storage,
            fence,
        }
    }

    fn own(&self) -> presetup::BlkConfig {
        let options = self.config.options();
        presetup::BlkConfig {
            num_queues: options.num_queues,
            queue_size: options.queue_size,
            readonly: options.readonly,
            direct: options.direct,
            writeback: self.config.writeback(),
        }
    }
}

impl Device for BlkDevice {
    fn features(&self) -> u64 {
        self.config.features()
    }

    fn protocol_features(&self) -> u64 {
        blk_protocol_features()
    }

    fn queue_num(&self) -> u64 {
        u64::from(self.config.options().num_queues)
    }

    fn num_rings(&self) -> u16 {
        self.config.options().num_queues
    }

    fn max_ring_size(&self) -> u16 {
        self.config.options().queue_size
    }

    fn config_space(&self) -> Vec<u8> {
        self.config.config_space()
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        // The cache mode becomes what the disk should have; the plan's
        // set_writeback applies it.
        self.config
            .write_config(offset, data)
            .map_err(|e| DeviceError::ConfigWrite {
                offset,
                len: data.len(),
                source: Box::new(e),
            })
    }

    fn device_config(&self) -> DeviceKind {
        DeviceKind::Blk(self.own())
    }

    /// The storage is open from the agent's start; no I/O ring exists.
    fn baseline(&self) -> Option<DeviceConfig> {
        Some(DeviceConfig {
            version: presetup::FORMAT_VERSION,
            acked_features: 0,
            protocol_features: 0,
            memory: Vec::new(),
            rings: Vec::new(),
            device: DeviceKind::Blk(presetup::BlkConfig {
                num_queues: 0,
                ..self.own()
            }),
        })
    }

    /// The early queues get their I/O rings now; the storage options and
    /// the depth stay the disk's own (a disk opened read-write stays so
    /// whatever the early configuration says).
    fn take_early(&mut self, early: &DeviceConfig) -> Result<DeviceKind, EarlyError> {
        let own = self.own();
        let DeviceKind::Blk(blk) = &early.device else {
            return Err(EarlyError::WrongKind {
                early: early.device_type(),
                device: presetup::DeviceType::Blk,
            });
        };
        if blk.num_queues > own.num_queues {
            return Err(EarlyError::Queues {
                early: blk.num_queues,
                device: own.num_queues,
            });
        }
        if blk.queue_size > own.queue_size {
            return Err(EarlyError::QueueSize {
                early: blk.queue_size,
                device: own.queue_size,
            });
        }
        Ok(DeviceKind::Blk(presetup::BlkConfig {
            num_queues: blk.num_queues,
            ..own
        }))
    }

    fn execute(&mut self, steps: Vec<Step>) -> Vec<OpResult> {
        datapath::execute_all(&mut self.storage, steps)
    }

    fn stop_ring(&mut self, ring: u16, mode: StopMode) -> RingStopped {
        self.storage.stop(ring, mode)
    }

    fn connected(&mut self) {
        self.fence.new_session();
    }

    fn protocol_features_acked(&mut self, features: u64) {
        let suspend = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits()
            | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT.bits();
        if features & suspend == suspend {
            // Suspends are possible from now on: have the fence ready.
            self.fence.prepare();
        }
    }

    fn shut_down(&mut self) {
        self.storage.join_reapers();
    }

    fn flush_deferred_logs(&mut self) {
        for line in self.storage.deferred_logs.drain(..) {
            log::info!("{line}");
        }
    }
}
