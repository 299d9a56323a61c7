//! What every net device has whatever moves its frames: the queue pairs,
//! the config space, the agent-side state the control API shows and a
//! migration carries (MTU, MAC, RSS), the checks of an early
//! configuration, NET_SET_MTU and the device state. [`super::NetDevice`]
//! (the agent's own data path) and [`super::vhost_net::VhostNetDevice`]
//! (the kernel's) both build on it and differ only in their datapath.

use std::sync::{Arc, Mutex};

use netdev::rss::{RssConfig, RssError};
use netdev::spec;
use netdev::stats::{PairCounts, PairStats};
use presetup::{DeviceConfig, DeviceKind};

use super::datapath::ops::rss_config;
use super::device::{NetOptions, NetShared};
use super::state::{NetState, StateError, NET_STATE_VERSION};
use crate::vhost_user::device::{DeviceError, EarlyError};

/// Why an RSS configuration does not fit a device.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// The datapath picks RX queues itself (the kernel's vhost-net: the
    /// tap spreads flows over its queues), so the agent cannot steer.
    #[error("this datapath cannot steer received frames (the kernel picks the queue), so RSS is not available")]
    NotOffered,
    /// The configuration is unusable for this many pairs.
    #[error(transparent)]
    Rss(#[from] RssError),
}

/// The part of a net device its datapath does not change (module
/// documentation).
pub struct NetCommon {
    name: Arc<str>,
    queue_pairs: u16,
    max_mtu: u16,
    /// The datapath steers RX frames itself (RSS is possible).
    steers: bool,
    shared: Arc<NetShared>,
}

impl NetCommon {
    /// A device named `name` built from `options` on a datapath described
    /// as `dataplane`, taking MTUs up to `max_mtu`; `steers`: the agent
    /// picks the RX queue of a frame (RSS may be configured).
    pub fn new(
        name: Arc<str>,
        options: &NetOptions,
        dataplane: String,
        max_mtu: u16,
        steers: bool,
    ) -> NetCommon {
        let pairs = options.queue_pairs;
        let stats: Arc<[PairStats]> = (0..pairs).map(|_| PairStats::default()).collect();
        let shared = Arc::new(NetShared {
            stats,
            dataplane,
            sim: Arc::new(Mutex::new(None)),
            state: Mutex::new(NetState {
                version: NET_STATE_VERSION,
                queue_pairs: pairs,
                mtu: options.mtu,
                mac: options.mac,
                rss: options.rss.clone(),
            }),
        });
        NetCommon {
            name,
            queue_pairs: pairs,
            max_mtu,
            steers,
            shared,
        }
    }

    /// The device's name, for logs.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.queue_pairs
    }

    /// What the control API shows of the device.
    pub fn shared(&self) -> &Arc<NetShared> {
        &self.shared
    }

    /// Per-pair counters, for logs.
    pub fn counts(&self) -> Vec<PairCounts> {
        self.shared.stats.iter().map(PairStats::snapshot).collect()
    }

    /// Whether `config` (an RSS configuration, or none) fits the device.
    pub fn check_rss(&self, config: Option<&RssConfig>) -> Result<(), SteeringError> {
        match config {
            Some(_) if !self.steers => Err(SteeringError::NotOffered),
            Some(config) => Ok(config.validate(self.queue_pairs)?),
            None => Ok(()),
        }
    }

    /// GET_CONFIG's source: MAC, link up, pairs, MTU.
    pub fn config_space(&self) -> Vec<u8> {
        let state = self.shared.state();
        spec::config_space(state.mac, true, self.queue_pairs, state.mtu).to_vec()
    }

    /// SET_CONFIG: the virtio-net config space is read-only.
    pub fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigWrite {
            offset,
            len: data.len(),
            source: "the virtio-net config space is read-only".into(),
        })
    }

    /// The device part of the configuration the device should hold.
    pub fn device_config(&self) -> DeviceKind {
        let state = self.shared.state();
        DeviceKind::Net(presetup::NetConfig {
            mtu: state.mtu,
            mac: state.mac.0,
            queue_pairs: self.queue_pairs,
            rss: state.rss_spec(),
        })
    }

    /// Check the net part of an early configuration and make its MTU and
    /// RSS the device's (the destination's NET_SET_MTU and device state
    /// bring the same).
    pub fn take_early(&mut self, early: &DeviceConfig) -> Result<DeviceKind, EarlyError> {
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

    /// NET_SET_MTU: check `mtu` and make it the MTU the device should have.
    pub fn net_set_mtu(&self, mtu: u64) -> Result<(), DeviceError> {
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

    /// The agent-side state to migrate (SET_DEVICE_STATE_FD, SAVE).
    pub fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        serde_json::to_vec(&*self.shared.state()).map_err(|e| DeviceError::State(Box::new(e)))
    }

    /// Take a migrated device state (CHECK_DEVICE_STATE after a LOAD).
    pub fn load_state(&self, bytes: &[u8]) -> Result<(), DeviceError> {
        let state = NetState::decode(bytes).map_err(|e| DeviceError::State(Box::new(e)))?;
        if state.queue_pairs != self.queue_pairs {
            log::warn!(
                "{}: device state from a device with {} queue pair(s); this one has {}",
                self.name,
                state.queue_pairs,
                self.queue_pairs
            );
        }
        self.check_rss(state.rss.as_ref()).map_err(|e| match e {
            SteeringError::Rss(e) => DeviceError::State(Box::new(StateError::Rss(e))),
            other => DeviceError::State(Box::new(other)),
        })?;
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
}
