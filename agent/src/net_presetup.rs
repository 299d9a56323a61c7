//! Presetup for net devices: take an early configuration (control API
//! `presetup`), do its heavy work that needs no guest memory right away on
//! the data path thread (create dataplane queues, program RSS, set the
//! MTU), and remember what was actually applied. At the next start the
//! back-end plans the switchover from that ([`switchover`]), so the plan
//! and the metrics say what presetup really saved.
//!
//! Memory is never mapped early over the control API (it comes without
//! fds), so the applied configuration has no memory and no rings, as the
//! `presetup::plan` contract asks. The in-band bracket
//! ([`crate::presetup_inband`]) is different: its messages really set up
//! memory and rings, so what it leaves behind ([`NetPresetup::apply_in_band`])
//! includes them, and an unchanged memory table at switchover keeps the
//! early mapping.

use std::sync::Mutex;

use netdev::rss::{Rss, RssConfig};
use presetup::{DeviceConfig, DeviceKind, NetConfig, RssSpec, ValidConfig};
use serde::Serialize;

use crate::net_worker::{EarlyHandle, EarlyWork};

/// An early configuration could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PresetupError {
    /// The configuration is for a block device.
    #[error("the early configuration is for a blk device; this device is net")]
    WrongKind,
    /// It names more queue pairs than the device has.
    #[error("the early configuration has {early} queue pair(s); the device has {device}")]
    QueuePairs {
        /// Pairs in the early configuration.
        early: u16,
        /// Pairs of the device.
        device: u16,
    },
    /// Its RSS steering does not fit the device.
    #[error("the early RSS configuration is unusable: {0}")]
    Rss(String),
    /// The data path thread is gone.
    #[error("the net data path thread is gone")]
    DataPathGone,
    /// An in-band bracket ended with no queue pair set up and enabled.
    #[error("the presetup bracket set up no queue pair (rings sized, addressed and enabled)")]
    NoQueuePair,
    /// What an in-band bracket left behind does not validate.
    #[error("the configuration the presetup bracket left is not usable")]
    Invalid(#[source] presetup::ConfigError),
}

/// What `presetup` did, as the control API reports it.
#[derive(Clone, Copy, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EarlyApplied {
    /// Dataplane queues created ahead of their rings.
    pub queues_created: u16,
    /// RSS programmed.
    pub rss_programmed: bool,
    /// MTU set.
    pub mtu_set: bool,
    /// Header layout and offloads configured for the early features.
    pub offloads_set: bool,
}

/// The early-configuration state of a net device, shared between the
/// control API (which sets it) and the protocol thread (which uses it at
/// the next start).
#[derive(Debug)]
pub struct NetPresetup {
    handle: EarlyHandle,
    queue_pairs: u16,
    /// What the device holds from the last early configuration, until a
    /// start uses it.
    applied: Mutex<Option<DeviceConfig>>,
}

fn rss_config(spec: &RssSpec) -> RssConfig {
    RssConfig {
        hash_types: spec.hash_types,
        key: spec.key.clone(),
        indirection_table: spec.indirection_table.clone(),
        default_queue: spec.default_queue,
    }
}

/// The presetup form of the device's RSS steering.
pub fn rss_spec(config: &RssConfig) -> RssSpec {
    RssSpec {
        hash_types: config.hash_types,
        key: config.key.clone(),
        indirection_table: config.indirection_table.clone(),
        default_queue: config.default_queue,
    }
}

impl NetPresetup {
    /// Presetup for a device with `queue_pairs` pairs whose data path
    /// `handle` reaches.
    pub fn new(handle: EarlyHandle, queue_pairs: u16) -> NetPresetup {
        NetPresetup {
            handle,
            queue_pairs,
            applied: Mutex::new(None),
        }
    }

    /// Take `config` as the early configuration: do its heavy work now and
    /// remember what was applied. Returns what was done and the RSS
    /// steering now in force (for the device's state).
    pub fn apply(
        &self,
        config: &ValidConfig,
    ) -> Result<(EarlyApplied, Option<RssConfig>, u16), PresetupError> {
        let DeviceKind::Net(net) = &config.device else {
            return Err(PresetupError::WrongKind);
        };
        if net.queue_pairs > self.queue_pairs || net.queue_pairs == 0 {
            return Err(PresetupError::QueuePairs {
                early: net.queue_pairs,
                device: self.queue_pairs,
            });
        }
        let rss_config = net.rss.as_ref().map(rss_config);
        let rss = rss_config
            .clone()
            .map(|config| Rss::new(config, self.queue_pairs))
            .transpose()
            .map_err(|e| PresetupError::Rss(e.to_string()))?;
        let done = self
            .handle
            .presetup(EarlyWork {
                queues: 2 * net.queue_pairs,
                rss,
                mtu: net.mtu,
                features: (config.acked_features != 0).then_some(config.acked_features),
            })
            .ok_or(PresetupError::DataPathGone)?;
        // What the device now holds: features (offloads configured),
        // queues, RSS and MTU; memory and rings are not (no fds).
        let applied = DeviceConfig {
            version: config.version,
            acked_features: config.acked_features,
            protocol_features: config.protocol_features,
            memory: Vec::new(),
            rings: Vec::new(),
            device: DeviceKind::Net(NetConfig {
                mtu: net.mtu,
                mac: net.mac,
                queue_pairs: net.queue_pairs,
                rss: net.rss.clone(),
            }),
        };
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = Some(applied);
        Ok((
            EarlyApplied {
                queues_created: done.queues_created,
                rss_programmed: done.rss_programmed,
                mtu_set: done.mtu_set,
                offloads_set: done.offloads_set,
            },
            rss_config,
            net.mtu,
        ))
    }

    /// Take what the device holds at the end of an in-band bracket as the
    /// early configuration: `held` is the device's own description (memory
    /// and rings included: the bracket really set them up), its queue
    /// pairs cut to the pairs the bracket readied. Creates those pairs'
    /// dataplane queues now and sets the MTU if the dataplane lacks it;
    /// RSS is left as it is (the bracket never carries it, so the device's
    /// steering is already in force and `held` describes it).
    pub fn apply_in_band(&self, held: DeviceConfig) -> Result<EarlyApplied, PresetupError> {
        let DeviceKind::Net(net) = &held.device else {
            return Err(PresetupError::WrongKind);
        };
        if net.queue_pairs == 0 {
            return Err(PresetupError::NoQueuePair);
        }
        let (queue_pairs, mtu) = (net.queue_pairs, net.mtu);
        let valid = ValidConfig::new(held).map_err(PresetupError::Invalid)?;
        let done = self
            .handle
            .presetup(EarlyWork {
                queues: 2 * queue_pairs,
                rss: None,
                mtu,
                // SET_FEATURES inside the bracket configured them already.
                features: None,
            })
            .ok_or(PresetupError::DataPathGone)?;
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = Some(valid.into_inner());
        Ok(EarlyApplied {
            queues_created: done.queues_created,
            rss_programmed: done.rss_programmed,
            mtu_set: done.mtu_set,
            offloads_set: done.offloads_set,
        })
    }

    /// The front-end went away and the device dropped its memory and
    /// rings: an early configuration no longer holds them either (its
    /// queues, MTU and RSS stay, and so does the work done for them).
    pub fn connection_lost(&self) {
        if let Some(applied) = self
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            applied.memory.clear();
            applied.rings.clear();
        }
    }

    /// The applied early configuration, taken: one start uses it.
    pub fn take_applied(&self) -> Option<DeviceConfig> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}
