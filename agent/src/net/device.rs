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
use netdev::rss::{RssConfig, RssError};
use netdev::spec::{self, MacAddress};
use netdev::stats::{PairCounts, PairStats};
use presetup::{DeviceConfig, DeviceKind};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryAtomic;

use super::datapath::ops::rss_config;
use super::datapath::{DataPathOutputs, NetDatapath, NetDatapathError, SimReport};
use super::state::{NetState, StateError, NET_STATE_VERSION};
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
    name: Arc<str>,
    queue_pairs: u16,
    offered_offloads: u64,
    max_mtu: u16,
    shared: Arc<NetShared>,
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
        let pairs = options.queue_pairs;
        let stats: Arc<[PairStats]> = (0..pairs).map(|_| PairStats::default()).collect();
        let offered_offloads = dataplane.offload_features();
        let max_mtu = dataplane.max_mtu();
        let described = dataplane.describe();
        let sim = Arc::new(Mutex::new(None));
        let datapath = NetDatapath::spawn(
            name.clone(),
            dataplane,
            pairs,
            memory,
            DataPathOutputs {
                stats: stats.clone(),
                sim_report: sim.clone(),
                needs_reset,
            },
            options.poll,
        )?;
        let shared = Arc::new(NetShared {
            stats,
            dataplane: described,
            sim,
            state: Mutex::new(NetState {
                version: NET_STATE_VERSION,
                queue_pairs: pairs,
                mtu: options.mtu,
                mac: options.mac,
                rss: options.rss,
            }),
        });
        Ok(NetDevice {
            name,
            queue_pairs: pairs,
            offered_offloads,
            max_mtu,
            shared,
            datapath,
        })
    }

    /// What the control API shows of this device.
    pub fn shared(&self) -> Arc<NetShared> {
        self.shared.clone()
    }

    /// Per-pair counters, for logs.
    fn counts(&self) -> Vec<PairCounts> {
        self.shared.stats.iter().map(PairStats::snapshot).collect()
    }

    fn check_rss(&self, config: Option<&RssConfig>) -> Result<(), RssError> {
        match config {
            Some(config) => config.validate(self.queue_pairs),
            None => Ok(()),
        }
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
        u64::from(self.queue_pairs)
    }

    fn num_rings(&self) -> u16 {
        2 * self.queue_pairs
    }

    fn max_ring_size(&self) -> u16 {
        spec::MAX_QUEUE_SIZE
    }

    fn config_space(&self) -> Vec<u8> {
        let state = self.shared.state();
        spec::config_space(state.mac, true, self.queue_pairs, state.mtu).to_vec()
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigWrite {
            offset,
            len: data.len(),
            source: "the virtio-net config space is read-only".into(),
        })
    }

    fn device_config(&self) -> DeviceKind {
        let state = self.shared.state();
        DeviceKind::Net(presetup::NetConfig {
            mtu: state.mtu,
            mac: state.mac.0,
            queue_pairs: self.queue_pairs,
            rss: state.rss_spec(),
        })
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
        let DeviceKind::Net(net) = &early.device else {
            return Err(EarlyError::WrongKind {
                early: early.device_type(),
                device: presetup::DeviceType::Net,
            });
        };
        if net.queue_pairs == 0 || net.queue_pairs > self.queue_pairs {
            return Err(EarlyError::Queues {
                early: net.queue_pairs,
                device: self.queue_pairs,
            });
        }
        let rss = net.rss.as_ref().map(rss_config);
        self.check_rss(rss.as_ref())
            .map_err(|e| EarlyError::Rss(e.into()))?;
        let mut state = self.shared.state();
        state.mtu = net.mtu;
        state.rss = rss;
        Ok(DeviceKind::Net(net.clone()))
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
        log::info!("{}: counters {:?}", self.name, self.counts());
    }

    fn net_set_mtu(&mut self, mtu: u64) -> Result<(), DeviceError> {
        let refused = || DeviceError::Mtu {
            mtu,
            min: spec::MIN_MTU,
            max: self.max_mtu,
        };
        let mtu = u16::try_from(mtu).map_err(|_| refused())?;
        if mtu < spec::MIN_MTU || mtu > self.max_mtu {
            return Err(refused());
        }
        self.shared.state().mtu = mtu;
        Ok(())
    }

    fn send_rarp(&mut self, mac: [u8; 6]) -> Result<bool, DeviceError> {
        let mac = MacAddress(mac);
        self.shared.state().mac = mac;
        let sent = self.datapath.announce(mac)?;
        if sent {
            log::info!("{}: announced {mac} on the dataplane (RARP)", self.name);
        } else {
            log::info!(
                "{}: SEND_RARP for {mac}: the dataplane has no wire to announce on",
                self.name
            );
        }
        Ok(sent)
    }

    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        serde_json::to_vec(&*self.shared.state()).map_err(|e| DeviceError::State(Box::new(e)))
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        let state = NetState::decode(bytes).map_err(|e| DeviceError::State(Box::new(e)))?;
        if state.queue_pairs != self.queue_pairs {
            log::warn!(
                "{}: device state from a device with {} queue pair(s); this one has {}",
                self.name,
                state.queue_pairs,
                self.queue_pairs
            );
        }
        self.check_rss(state.rss.as_ref())
            .map_err(|e| DeviceError::State(Box::new(StateError::Rss(e))))?;
        if state.mtu < spec::MIN_MTU || state.mtu > self.max_mtu {
            return Err(DeviceError::Mtu {
                mtu: u64::from(state.mtu),
                min: spec::MIN_MTU,
                max: self.max_mtu,
            });
        }
        log::info!(
            "{}: device state loaded (MTU {}, MAC {}, RSS {})",
            self.name,
            state.mtu,
            state.mac,
            if state.rss.is_some() { "on" } else { "off" }
        );
        let mut current = self.shared.state();
        current.mtu = state.mtu;
        current.mac = state.mac;
        current.rss = state.rss;
        Ok(())
    }

    fn supports_inband_presetup(&self) -> bool {
        true
    }
}
