//! `dataplane=vdpa:/dev/vhost-vdpa-N`: a kernel vhost-vdpa device (vDPA
//! hardware, or a VDUSE device in the lab) moves frames between the
//! front-end's rings and the wire, and the agent touches no packet. The
//! agent stays in the control path; docs/vdpa.md has the capabilities and
//! fallbacks.
//!
//! * The device is opened at start-up ([`handle`]): VHOST_SET_OWNER, the
//!   backend features the agent uses, its virtio features and its config
//!   space (MAC, MTU, max pairs), which the agent's config space shows.
//! * Features are negotiated with the device: the acked ones it offered,
//!   plus VERSION_1 and VIRTIO_F_ACCESS_PLATFORM, which the guest does not
//!   see; IOVA = guest physical address, as QEMU does without a vIOMMU.
//! * Guest memory goes to the device with IOTLB updates of the agent's
//!   own mappings, batched, only the regions that differ; the rings with
//!   VHOST_SET_VRING_NUM / ADDR / BASE, each checked to lie inside one
//!   mapped region first; the front-end's kick and call eventfds go to the
//!   device as they are; VHOST_VDPA_SET_STATUS takes it through
//!   FEATURES_OK and DRIVER_OK ([`engine`], [`steps`]).
//! * GET_VRING_BASE suspends the device (VHOST_VDPA_SUSPEND) and reads the
//!   device's index; without SUSPEND it resets the device and answers the
//!   used index. A restart resumes (VHOST_VDPA_RESUME) or reprograms.
//! * Dirty pages: the used rings are followed ([`dirty`]).

mod dirty;
mod engine;
#[cfg(test)]
mod engine_tests;
mod error;
mod handle;
mod steps;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use netdev::spec::{self, bit, MacAddress};
use presetup::{DeviceConfig, DeviceKind};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryAtomic;

pub use error::VdpaError;

use self::engine::Engine;
use self::handle::Handle;
use super::common::NetCommon;
use super::device::{net_protocol_features, NetOptions, NetShared};
use crate::vhost_user::datapath::{self, OpResult, Step};
use crate::vhost_user::device::{Device, DeviceError, EarlyError, RingStopped, StopMode};
use crate::vhost_user::dirty_log::LogRegion;
use crate::vhost_user::memory::GuestRam;

/// The virtio bits relayed between the front-end and the device: ring
/// layout and notifications, the header, offloads, MAC, MTU, STATUS, MQ.
/// Not relayed: the control virtqueue and what needs it (the front-end's
/// control queue stays in QEMU), packed rings (the agent checks split
/// rings), ACCESS_PLATFORM (the agent's own, to the device).
pub const RELAYED_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_UFO)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_F_VERSION_1);

/// A virtio-net device on a vhost-vdpa device (module documentation).
pub struct VdpaNetDevice {
    common: NetCommon,
    engine: Engine<Handle>,
    offered: u64,
    needs_reset: Arc<AtomicBool>,
}

impl VdpaNetDevice {
    /// A device named `name` on the vhost-vdpa node `path`, reaching the
    /// guest memory the agent maps into `memory`. Fails, naming the fix, if
    /// the node is missing, busy or no net device with enough pairs.
    pub fn open(
        name: &str,
        options: &NetOptions,
        path: &str,
        memory: GuestMemoryAtomic<GuestRam>,
        needs_reset: Arc<AtomicBool>,
    ) -> Result<VdpaNetDevice, VdpaError> {
        let (handle, caps) = Handle::open(path, memory.clone())?;
        let unsuitable = |what: String| VdpaError::Unsuitable {
            path: path.to_string(),
            what,
        };
        if caps.device_features & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(unsuitable(
                "the device does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let pairs = options.queue_pairs;
        if pairs > caps.max_pairs() || u32::from(2 * pairs) > caps.num_vqs {
            return Err(unsuitable(format!(
                "queue-pairs={pairs}, but the device has {} pair(s) ({} virtqueues)",
                caps.max_pairs(),
                caps.num_vqs
            )));
        }
        let name: Arc<str> = Arc::from(name);
        let mut device_options = options.clone();
        if caps.device_features & bit(VIRTIO_NET_F_MAC) != 0 {
            device_options.mac = MacAddress(caps.mac());
        }
        if let Some(mtu) = caps.mtu() {
            if mtu != options.mtu && options.mtu != 1500 {
                log::warn!(
                    "{name}: mtu={} ignored: the device's MTU is {mtu}",
                    options.mtu
                );
            }
            device_options.mtu = mtu;
        }
        let common = NetCommon::new(
            name.clone(),
            &device_options,
            format!("vdpa:{path}"),
            caps.mtu().unwrap_or(u16::MAX),
            false,
        );
        let offered = caps.device_features & RELAYED_FEATURES;
        let required =
            caps.device_features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM));
        log::info!(
            "{name}: vDPA device {path}: features {:#x}, backend features {:#x}, {} virtqueues of up to {}, MAC {}, MTU {}",
            caps.device_features,
            caps.backend,
            caps.num_vqs,
            caps.max_ring,
            device_options.mac,
            device_options.mtu
        );
        let engine = Engine::new(name, handle, caps, 2 * pairs, required, memory);
        Ok(VdpaNetDevice {
            common,
            engine,
            offered,
            needs_reset,
        })
    }

    /// What the control API shows of this device (its pair counters stay
    /// 0: the device moves the frames).
    pub fn shared(&self) -> Arc<NetShared> {
        self.common.shared().clone()
    }
}

impl Device for VdpaNetDevice {
    fn features(&self) -> u64 {
        self.offered
    }

    fn protocol_features(&self) -> u64 {
        // No RARP: the agent cannot put a frame on a vDPA device's wire.
        net_protocol_features()
            & !vhost::vhost_user::message::VhostUserProtocolFeatures::RARP.bits()
    }

    fn queue_num(&self) -> u64 {
        u64::from(self.common.queue_pairs())
    }

    fn num_rings(&self) -> u16 {
        2 * self.common.queue_pairs()
    }

    fn max_ring_size(&self) -> u16 {
        let max = self.engine.caps().max_ring.min(spec::MAX_QUEUE_SIZE);
        // The largest power of two not above the device's maximum.
        if max == 0 {
            0
        } else {
            1 << (15 - max.leading_zeros().min(15))
        }
    }

    fn config_space(&self) -> Vec<u8> {
        self.common.config_space()
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        self.common.set_config(offset, data)
    }

    fn device_config(&self) -> DeviceKind {
        self.common.device_config()
    }

    fn baseline(&self) -> Option<DeviceConfig> {
        None
    }

    fn take_early(&mut self, early: &DeviceConfig) -> Result<DeviceKind, EarlyError> {
        self.common.take_early(early)
    }

    fn execute(&mut self, steps: Vec<Step>) -> Vec<OpResult> {
        steps::execute(&mut self.engine, steps)
    }

    fn stop_ring(&mut self, ring: u16, _mode: StopMode) -> RingStopped {
        crate::net::kernel::ring_stopped(
            self.common.name(),
            ring,
            self.engine.stop(ring),
            &self.needs_reset,
        )
    }

    fn disconnected(&mut self) {
        if let Err(e) = self.engine.reset() {
            log::warn!(
                "{}: reset after the front-end left: {}",
                self.common.name(),
                crate::error_chain(&e)
            );
        }
    }

    fn set_log(&mut self, log: Option<Arc<LogRegion>>) -> Result<(), DeviceError> {
        self.engine
            .set_log(log)
            .map_err(|e| DeviceError::Datapath(datapath::DatapathError::failed("set_log", e)))
    }

    fn net_set_mtu(&mut self, mtu: u64) -> Result<(), DeviceError> {
        self.common.net_set_mtu(mtu)
    }

    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        self.common.save_state()
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        self.common.load_state(bytes)
    }

    fn supports_inband_presetup(&self) -> bool {
        true
    }
}
