//! A disk's datapath: the storage and one I/O ring (io_uring instance or
//! thread pool) per queue, and the queue workers that serve the rings.
//! Each plan step is one method here; an I/O ring is made by
//! `create_io_ring` (at presetup time when the early configuration has it)
//! and taken by its queue's worker at `set_ring_kick`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blkdev::engine::{EngineKind, IoEngine};
use blkdev::fence::Fence;
use blkdev::queue::DiskShared;
use blkdev::Storage;
use presetup::RegionKey;
use vm_memory::GuestMemoryAtomic;

use super::worker::{QueueSetup, Worker, WorkerResources};
use crate::vhost_user::datapath::{Datapath, DatapathError, OpResult, Outcome};
use crate::vhost_user::device::{RingStart, RingStopped, StopMode};
use crate::vhost_user::memory::{GuestRam, MappedRegion};
use crate::vhost_user::vring::RingGuestAddresses;

/// How the disk's I/O rings are made.
#[derive(Clone, Copy, Debug)]
pub struct EngineRecipe {
    /// io_uring or thread pool.
    pub kind: EngineKind,
    /// Added latency (the `latency-ms` experiment knob).
    pub latency: Duration,
}

/// The disk's datapath (module documentation).
pub struct BlkStorage {
    name: Arc<str>,
    image: PathBuf,
    disk: Arc<DiskShared>,
    recipe: EngineRecipe,
    engines: Vec<Option<IoEngine>>,
    workers: Vec<Option<Worker>>,
    memory: GuestMemoryAtomic<GuestRam>,
    needs_reset: Arc<AtomicBool>,
    fence: Arc<Fence>,
    poll: Duration,
    /// Threads still collecting storage operations of suspended queues.
    reapers: Vec<JoinHandle<()>>,
    /// Log lines held back until the reply is out (a suspending
    /// GET_VRING_BASE must reply at once; a log write can stall).
    pub(super) deferred_logs: Vec<String>,
}

/// What a disk's datapath is built from.
pub struct StorageParts {
    /// Device name, for logs.
    pub name: Arc<str>,
    /// The image path (reopened by `open_storage`).
    pub image: PathBuf,
    /// The open disk.
    pub disk: Arc<DiskShared>,
    /// How I/O rings are made.
    pub recipe: EngineRecipe,
    /// Queues.
    pub num_queues: u16,
    /// Guest memory.
    pub memory: GuestMemoryAtomic<GuestRam>,
    /// NEEDS_RESET.
    pub needs_reset: Arc<AtomicBool>,
    /// The write fence.
    pub fence: Arc<Fence>,
    /// Busy-poll window of a queue.
    pub poll: Duration,
}

impl BlkStorage {
    /// A datapath over `parts` with no I/O ring yet.
    pub fn new(parts: StorageParts) -> BlkStorage {
        let queues = usize::from(parts.num_queues);
        BlkStorage {
            name: parts.name,
            image: parts.image,
            disk: parts.disk,
            recipe: parts.recipe,
            engines: (0..queues).map(|_| None).collect(),
            workers: (0..queues).map(|_| None).collect(),
            memory: parts.memory,
            needs_reset: parts.needs_reset,
            fence: parts.fence,
            poll: parts.poll,
            reapers: Vec::new(),
            deferred_logs: Vec::new(),
        }
    }

    fn slot(&self, op: &'static str, queue: u16) -> Result<usize, DatapathError> {
        let index = usize::from(queue);
        if index < self.engines.len() {
            Ok(index)
        } else {
            Err(DatapathError::Precondition {
                op,
                reason: format!("queue {queue} is beyond the disk's {}", self.engines.len()),
            })
        }
    }

    /// Stop queue `ring`'s worker, taking its I/O ring back.
    pub fn stop(&mut self, ring: u16, mode: StopMode) -> RingStopped {
        let Some(worker) = self
            .workers
            .get_mut(usize::from(ring))
            .and_then(Option::take)
        else {
            return RingStopped::default();
        };
        let stopped = worker.stop(mode);
        let exit = stopped.exit;
        let io_ring_lost = exit.engine.is_none();
        if let Some(slot) = self.engines.get_mut(usize::from(ring)) {
            *slot = exit.engine;
        }
        self.reapers.retain(|reaper| !reaper.is_finished());
        self.reapers.extend(stopped.reaper);
        match mode {
            StopMode::Suspend => self.deferred_logs.push(format!(
                "{}: queue {ring} suspended at avail {} with {} request(s) left in the inflight region, {} write(s) still on storage ({:?})",
                self.name, exit.next_avail, exit.left_in_flight, exit.abandoned_writes, exit.stats
            )),
            StopMode::Drain | StopMode::Detach => {
                log::debug!("{}: queue {ring}: {:?}", self.name, exit.stats);
                if exit.left_in_flight > 0 {
                    log::info!(
                        "{}: queue {ring}: {} request(s) held by the write fence stay in the inflight region",
                        self.name,
                        exit.left_in_flight
                    );
                }
            }
        }
        RingStopped {
            next_avail: exit.next_avail,
            kick: exit.kick,
            handed_off: u64::try_from(exit.left_in_flight).unwrap_or(u64::MAX),
            io_ring_lost,
        }
    }

    /// Wait for every suspended queue's abandoned storage operations
    /// (before the process exits, so no write is cut off).
    pub fn join_reapers(&mut self) {
        for reaper in self.reapers.drain(..) {
            if reaper.join().is_err() {
                log::error!("{}: a suspended queue's worker panicked", self.name);
            }
        }
    }
}

impl Datapath for BlkStorage {
    fn reset(&mut self) -> OpResult {
        for ring in 0..self.workers.len() {
            // ring < num_queues <= u16::MAX.
            self.stop(ring as u16, StopMode::Detach);
        }
        self.engines.iter_mut().for_each(|engine| *engine = None);
        Ok(Outcome::Done)
    }

    fn set_features(&mut self, _features: u64) -> OpResult {
        // Rings learn EVENT_IDX with their start; storage needs no feature.
        Ok(Outcome::NotNeeded)
    }

    fn map_region(&mut self, _region: &Arc<MappedRegion>) -> OpResult {
        // The queues serve from the session's mapping (published already).
        Ok(Outcome::Done)
    }

    fn unmap_region(&mut self, _region: &RegionKey) -> OpResult {
        Ok(Outcome::Done)
    }

    fn open_storage(&mut self, readonly: bool, direct: bool) -> OpResult {
        if self.engines.iter().any(Option::is_some) {
            return Err(DatapathError::Precondition {
                op: "open_storage",
                reason: "I/O rings still use the open storage".to_string(),
            });
        }
        let storage = Storage::open(&self.image, readonly, direct)
            .map_err(|e| DatapathError::failed("open_storage", e))?;
        let capacity = self.disk.capacity_sectors;
        let serial = String::from_utf8_lossy(&self.disk.serial)
            .trim_end_matches('\0')
            .to_string();
        let writeback = self.disk.writeback.load(Ordering::Relaxed);
        let disk = DiskShared::new(Arc::new(storage.into_file()), capacity, readonly, &serial);
        disk.writeback.store(writeback, Ordering::Relaxed);
        self.disk = Arc::new(disk);
        log::info!(
            "{}: storage reopened ({}{})",
            self.name,
            if readonly { "read-only" } else { "read-write" },
            if direct { ", O_DIRECT" } else { "" }
        );
        Ok(Outcome::Done)
    }

    fn create_io_ring(&mut self, queue: u16, depth: u16) -> OpResult {
        let slot = self.slot("create_io_ring", queue)?;
        let engine = IoEngine::with_latency(
            self.recipe.kind,
            self.disk.file.clone(),
            u32::from(depth),
            self.recipe.latency,
        )
        .map_err(|e| DatapathError::failed("create_io_ring", e))?;
        self.engines[slot] = Some(engine);
        Ok(Outcome::Done)
    }

    fn destroy_io_ring(&mut self, queue: u16) -> OpResult {
        let slot = self.slot("destroy_io_ring", queue)?;
        Ok(match self.engines[slot].take() {
            Some(_) => Outcome::Done,
            None => Outcome::NotNeeded,
        })
    }

    fn set_writeback(&mut self, writeback: bool) -> OpResult {
        self.disk.writeback.store(writeback, Ordering::Relaxed);
        log::info!(
            "{}: write cache {}",
            self.name,
            if writeback {
                "writeback"
            } else {
                "writethrough"
            }
        );
        Ok(Outcome::Done)
    }

    fn reset_ring(&mut self, _ring: u16) -> OpResult {
        Ok(Outcome::NotNeeded)
    }

    fn set_ring_size(&mut self, _ring: u16, _size: u16) -> OpResult {
        // Ring values come with the kick (`RingStart`).
        Ok(Outcome::NotNeeded)
    }

    fn set_ring_addresses(&mut self, _ring: u16, _addresses: RingGuestAddresses) -> OpResult {
        Ok(Outcome::NotNeeded)
    }

    fn set_ring_base(&mut self, _ring: u16, _next_avail: u16) -> OpResult {
        Ok(Outcome::NotNeeded)
    }

    fn set_ring_kick(&mut self, start: RingStart) -> OpResult {
        let slot = self.slot("set_ring_kick", start.ring)?;
        let Some(engine) = self.engines[slot].take() else {
            return Err(DatapathError::Precondition {
                op: "set_ring_kick",
                reason: format!("queue {} has no I/O ring", start.ring),
            });
        };
        let setup = QueueSetup {
            device: self.name.clone(),
            index: start.ring,
            size: start.size,
            addresses: start.addresses,
            next_avail: start.next_avail,
            event_idx: start.event_idx,
            poll: self.poll,
            bounce_reads: start.suspendable,
        };
        let worker = Worker::spawn(
            setup,
            WorkerResources {
                kick: start.kick,
                call: start.call,
                enabled: start.enabled,
                memory: self.memory.clone(),
                disk: self.disk.clone(),
                needs_reset: self.needs_reset.clone(),
                inflight: start.inflight,
                fence: self.fence.clone(),
                engine,
            },
        )
        .map_err(|e| DatapathError::failed("set_ring_kick", e))?;
        self.workers[slot] = Some(worker);
        Ok(Outcome::Done)
    }

    fn set_ring_call(&mut self, ring: u16, call: Option<Arc<std::fs::File>>) -> OpResult {
        match self.workers.get(usize::from(ring)).and_then(Option::as_ref) {
            Some(worker) => {
                worker.set_call(call);
                Ok(Outcome::Done)
            }
            // It comes with the ring's start.
            None => Ok(Outcome::NotNeeded),
        }
    }

    fn set_ring_enabled(&mut self, ring: u16, enabled: bool) -> OpResult {
        match self.workers.get(usize::from(ring)).and_then(Option::as_ref) {
            Some(worker) => {
                worker.set_enabled(enabled);
                Ok(Outcome::Done)
            }
            None => Ok(Outcome::NotNeeded),
        }
    }
}
