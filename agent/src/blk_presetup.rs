//! Presetup for disks: take an early configuration (control API
//! `presetup`) and create the per-queue storage engines (io_uring
//! instances or thread pools) right away, so that a start only hands them
//! to its queue workers. The storage itself is open from the agent's start,
//! so a start without presetup is planned from that baseline
//! ([`BlkPresetup::baseline`]).
//!
//! As for net, memory and rings are never set up early over the control
//! API (they come without fds), and the applied configuration describes
//! what the disk really holds, not what was asked: a disk opened read-write
//! stays read-write whatever the early configuration says.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkdev::engine::{EngineKind, IoEngine};
use blkdev::queue::DiskShared;
use presetup::{BlkConfig, DeviceConfig, DeviceKind, ValidConfig};
use serde::Serialize;

/// An early configuration could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum BlkPresetupError {
    /// The configuration is for a net device.
    #[error("the early configuration is for a net device; this device is blk")]
    WrongKind,
    /// It names more queues than the disk has.
    #[error("the early configuration has {early} queue(s); the disk has {device}")]
    Queues {
        /// Queues in the early configuration.
        early: u16,
        /// Queues of the disk.
        device: u16,
    },
    /// Its ring depth exceeds the disk's.
    #[error("the early configuration's queue size {early} exceeds the disk's {device}")]
    QueueSize {
        /// Its queue size.
        early: u16,
        /// The disk's.
        device: u16,
    },
    /// Creating an engine failed.
    #[error("cannot create the storage engine of queue {queue}")]
    Engine {
        /// The queue.
        queue: u16,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What `presetup` did for a disk, as the control API reports it.
#[derive(Clone, Copy, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlkEarlyApplied {
    /// Storage engines (one per queue) created ahead of their rings.
    pub io_rings_created: u16,
    /// Engines already waiting from an earlier presetup, kept.
    pub io_rings_kept: u16,
}

/// How the disk's engines are made.
#[derive(Clone, Copy, Debug)]
pub struct EngineRecipe {
    /// io_uring or thread pool.
    pub kind: EngineKind,
    /// Depth of each engine: the disk's largest ring.
    pub depth: u16,
    /// Added latency (experiments).
    pub latency: Duration,
}

impl EngineRecipe {
    /// An engine for `disk`'s file.
    pub fn create(&self, disk: &DiskShared) -> std::io::Result<IoEngine> {
        IoEngine::with_latency(
            self.kind,
            disk.file.clone(),
            u32::from(self.depth),
            self.latency,
        )
    }
}

#[derive(Default)]
struct State {
    /// Per queue: an engine created early that no worker took yet.
    engines: Vec<Option<IoEngine>>,
    /// What the disk holds from the last early configuration, until a start
    /// uses it.
    applied: Option<DeviceConfig>,
}

/// The early-configuration state of a disk, shared between the control API
/// (which sets it) and the protocol thread (which uses it at the next
/// start).
pub struct BlkPresetup {
    disk: Arc<DiskShared>,
    recipe: EngineRecipe,
    /// The disk's own part of the configuration (queues, options).
    own: BlkConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for BlkPresetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkPresetup")
            .field("recipe", &self.recipe)
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

impl BlkPresetup {
    /// Presetup for `disk`, whose queues and options `own` describes and
    /// whose engines `recipe` makes.
    pub fn new(disk: Arc<DiskShared>, recipe: EngineRecipe, own: BlkConfig) -> BlkPresetup {
        BlkPresetup {
            disk,
            recipe,
            own,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Per queue of the disk: requests taken from the ring and not yet
    /// answered (`query-devices`' `in-flight`).
    pub fn in_flight(&self) -> Vec<u64> {
        (0..self.own.num_queues)
            .map(|queue| self.disk.in_flight(queue))
            .collect()
    }

    /// How engines are made (the queue workers make theirs the same way).
    pub fn recipe(&self) -> EngineRecipe {
        self.recipe
    }

    /// Take `config` as the early configuration: create the engines of its
    /// queues now and remember what the disk holds.
    pub fn apply(&self, config: &ValidConfig) -> Result<BlkEarlyApplied, BlkPresetupError> {
        let DeviceKind::Blk(blk) = &config.device else {
            return Err(BlkPresetupError::WrongKind);
        };
        if blk.num_queues > self.own.num_queues {
            return Err(BlkPresetupError::Queues {
                early: blk.num_queues,
                device: self.own.num_queues,
            });
        }
        if blk.queue_size > self.own.queue_size {
            return Err(BlkPresetupError::QueueSize {
                early: blk.queue_size,
                device: self.own.queue_size,
            });
        }
        let mut done = BlkEarlyApplied::default();
        // Create outside the lock: a start may want an engine meanwhile.
        let waiting: Vec<bool> = {
            let state = self.lock();
            (0..blk.num_queues)
                .map(|queue| {
                    state
                        .engines
                        .get(usize::from(queue))
                        .is_some_and(Option::is_some)
                })
                .collect()
        };
        let mut created = Vec::new();
        for (queue, &waiting) in (0..blk.num_queues).zip(&waiting) {
            if waiting {
                done.io_rings_kept += 1;
                continue;
            }
            let engine = self
                .recipe
                .create(&self.disk)
                .map_err(|source| BlkPresetupError::Engine { queue, source })?;
            created.push((queue, engine));
        }
        let mut state = self.lock();
        if state.engines.len() < usize::from(self.own.num_queues) {
            state
                .engines
                .resize_with(usize::from(self.own.num_queues), || None);
        }
        for (queue, engine) in created {
            state.engines[usize::from(queue)] = Some(engine);
            done.io_rings_created += 1;
        }
        let ready = state.engines.iter().take_while(|e| e.is_some()).count();
        state.applied = Some(DeviceConfig {
            version: config.version,
            acked_features: config.acked_features,
            protocol_features: config.protocol_features,
            memory: Vec::new(),
            rings: Vec::new(),
            device: DeviceKind::Blk(BlkConfig {
                // Queues 0..ready have their engine (queues are used from 0).
                num_queues: u16::try_from(ready).unwrap_or(u16::MAX),
                ..self.own
            }),
        });
        Ok(done)
    }

    /// The engine made early for `queue`, taken; `None` when there is none
    /// (the worker makes its own).
    pub fn take_engine(&self, queue: u16) -> Option<IoEngine> {
        self.lock().engines.get_mut(usize::from(queue))?.take()
    }

    /// The applied early configuration, taken: one start uses it.
    pub fn take_applied(&self) -> Option<DeviceConfig> {
        self.lock().applied.take()
    }

    /// What the disk holds without any presetup: its storage, open since
    /// the agent started, and no I/O rings.
    pub fn baseline(&self) -> DeviceConfig {
        DeviceConfig {
            version: presetup::FORMAT_VERSION,
            acked_features: 0,
            protocol_features: 0,
            memory: Vec::new(),
            rings: Vec::new(),
            device: DeviceKind::Blk(BlkConfig {
                num_queues: 0,
                ..self.own
            }),
        }
    }
}

/// A presetup for a disk nobody serves (registry and control API unit
/// tests): `/dev/null`, one queue.
#[cfg(test)]
pub(crate) fn unserved() -> Arc<BlkPresetup> {
    let file = std::fs::File::open("/dev/null").expect("/dev/null");
    let disk = Arc::new(DiskShared::new(Arc::new(file), 0, true, ""));
    let recipe = EngineRecipe {
        kind: EngineKind::ThreadPool,
        depth: 128,
        latency: Duration::ZERO,
    };
    let own = BlkConfig {
        num_queues: 1,
        queue_size: 128,
        readonly: true,
        direct: false,
        writeback: true,
    };
    Arc::new(BlkPresetup::new(disk, recipe, own))
}
