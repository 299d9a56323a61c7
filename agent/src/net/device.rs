//! A virtio-net device under the session: what it offers, its part of the
//! configuration (MTU, MAC, queue pairs, RSS), the requests only it
//! answers (NET_SET_MTU, SEND_RARP, its device state), and its data path
//! thread ([`NetDatapath`]), which executes the plan's steps.
//!
//! QEMU drives a net device as one vhost device per queue pair
//! (docs/vhost-user-notes.md, "netdev vhost-user"): features and memory
//! arrive for pair 0, a pair may be enabled before its rings exist, and
//! stopping is GET_VRING_BASE alone. Its control queue stays in QEMU, so
//! the device learns the active pairs from SET_VRING_ENABLE and steers RX
//! itself.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use netdev::dataplane::Dataplane;
use netdev::rss::RssConfig;
use netdev::spec::{self, MacAddress};
use netdev::stats::PairStats;
use presetup::{DeviceConfig, DeviceKind};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryAtomic;

use super::common::NetCommon;
use super::datapath::{DataPathOutputs, NetDatapath, NetDatapathError, SimReport};
use super::state::NetState;
use crate::vhost_user::datapath::{OpResult, Step};
use crate::vhost_user::device::{Device, DeviceError, EarlyError, RingStopped, StopMode};
use crate::vhost_user::memory::GuestRam;

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
}

/// What the control API sees of a net device.
#[derive(Debug)]
pub struct NetShared {
    /// Per-pair counters.
    pub stats: Arc<[PairStats]>,
    /// The dataplane, described.
    pub dataplane: String,
    /// Agent-side state (RSS, MTU, MAC): what the device should hold.
    pub state: Mutex<NetState>,
    /// What a cost profile charged so far (`None` without one).
    pub sim: Arc<Mutex<Option<SimReport>>>,
}

impl NetShared {
    /// The agent-side state.
    pub fn state(&self) -> MutexGuard<'_, NetState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Protocol features a net device offers (the session adds the in-band
/// presetup bit when that is switched on).
pub fn net_protocol_features() -> u64 {
    (VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RARP
        | VhostUserProtocolFeatures::MTU
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::DEVICE_STATE)
        .bits()
}

/// A net device (module documentation).
pub struct NetDevice {
    common: NetCommon,
    offered_offloads: u64,
    datapath: NetDatapath,
}

impl NetDevice {
    /// A device over `dataplane` (already open) reading guest memory from
    /// `memory`; starts the data path thread.
    pub fn new(
        name: &str,
        options: NetOptions,
        dataplane: Dataplane,
        memory: GuestMemoryAtomic<GuestRam>,
        needs_reset: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<NetDevice, NetDatapathError> {
        let name: Arc<str> = Arc::from(name);
        let offered_offloads = dataplane.offload_features();
        let common = NetCommon::new(
            name.clone(),
            &options,
            dataplane.describe(),
            dataplane.max_mtu(),
            true,
        );
        let datapath = NetDatapath::spawn(
            name,
            dataplane,
            options.queue_pairs,
            memory,
            DataPathOutputs {
                stats: common.shared().stats.clone(),
                sim_report: common.shared().sim.clone(),
                needs_reset,
            },
            options.poll,
        )?;
        Ok(NetDevice {
            common,
            offered_offloads,
            datapath,
        })
    }

    /// What the control API shows of this device.
    pub fn shared(&self) -> Arc<NetShared> {
        self.common.shared().clone()
    }
}

impl Device for NetDevice {
    fn features(&self) -> u64 {
        spec::BASE_FEATURES | self.offered_offloads
    }

    fn protocol_features(&self) -> u64 {
        net_protocol_features()
    }

    /// Queue pairs, as QEMU's net client and DPDK's virtio_user read it.
    fn queue_num(&self) -> u64 {
        u64::from(self.common.queue_pairs())
    }

    fn num_rings(&self) -> u16 {
        2 * self.common.queue_pairs()
    }

    fn max_ring_size(&self) -> u16 {
        spec::MAX_QUEUE_SIZE
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

    /// Nothing is configured before a plan: queues, MTU and offloads all
    /// come from one.
    fn baseline(&self) -> Option<DeviceConfig> {
        None
    }

    /// The early pairs' queues come now; the early MTU and RSS become the
    /// device's (the destination's NET_SET_MTU and device state bring the
    /// same).
    fn take_early(&mut self, early: &DeviceConfig) -> Result<DeviceKind, EarlyError> {
        self.common.take_early(early)
    }

    fn execute(&mut self, steps: Vec<Step>) -> Vec<OpResult> {
        self.datapath.execute(steps)
    }

    fn stop_ring(&mut self, ring: u16, _mode: StopMode) -> RingStopped {
        // A net ring stops between two frames: there is nothing to drain.
        match self.datapath.stop(ring) {
            Some((next_avail, kick)) => RingStopped {
                next_avail,
                kick: Some(kick),
                handed_off: 0,
                io_ring_lost: false,
            },
            None => RingStopped::default(),
        }
    }

    fn disconnected(&mut self) {
        log::info!(
            "{}: counters {:?}",
            self.common.name(),
            self.common.counts()
        );
    }

    fn net_set_mtu(&mut self, mtu: u64) -> Result<(), DeviceError> {
        self.common.net_set_mtu(mtu)
    }

    fn send_rarp(&mut self, mac: [u8; 6]) -> Result<bool, DeviceError> {
        let mac = MacAddress(mac);
        self.common.shared().state().mac = mac;
        let sent = self.datapath.announce(mac)?;
        let name = self.common.name();
        if sent {
            log::info!("{name}: announced {mac} on the dataplane (RARP)");
        } else {
            log::info!("{name}: SEND_RARP for {mac}: the dataplane has no wire to announce on");
        }
        Ok(sent)
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
