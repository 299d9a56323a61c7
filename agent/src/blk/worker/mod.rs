//! One thread per running disk queue: a mio loop over the guest's kick
//! eventfd, the storage engine's completion eventfd and the command channel
//! the protocol thread uses to enable, disable, re-call or stop the queue.
//!
//! The worker owns its `Queue` outright, so the data path takes no locks;
//! the protocol thread gets the ring index, the kick and the engine back
//! when it stops the worker. A worker stops in one of three ways
//! ([`StopMode`]): draining, detaching, or suspending (it answers nothing
//! more at once, leaves the unanswered requests in the inflight region,
//! and keeps running only to collect its abandoned storage operations,
//! writing nothing into guest memory).

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blkdev::engine::IoEngine;
use blkdev::fence::Fence;
use blkdev::inflight::InflightQueue;
use blkdev::queue::DiskShared;
use blkdev::{BlkQueue, QueueStats};
use vm_memory::GuestMemoryAtomic;

use crate::vhost_user::device::StopMode;
use crate::vhost_user::memory::GuestRam;
use crate::vhost_user::vring::RingGuestAddresses;
use crate::wake_channel::{self, Reply, WakeSender};

mod thread;

use thread::Loop;

/// Everything needed to start serving one ring.
#[derive(Clone, Debug)]
pub struct QueueSetup {
    /// Device name, for log lines.
    pub device: Arc<str>,
    /// Queue index.
    pub index: u16,
    /// Ring size.
    pub size: u16,
    /// The ring's parts in guest memory.
    pub addresses: RingGuestAddresses,
    /// Next avail index to process (SET_VRING_BASE).
    pub next_avail: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// How long to busy-poll the ring after work before sleeping (0: never).
    pub poll: Duration,
    /// The front-end may suspend this ring: reads go through private
    /// buffers so nothing lands in guest memory after a suspend.
    pub bounce_reads: bool,
}

/// What the protocol thread asks of a worker.
pub(super) enum Command {
    SetEnabled(bool),
    SetCall(Option<Arc<File>>),
    Stop(StopMode, Reply<WorkerExit>),
}

/// Where a stopped worker left the ring.
#[derive(Default)]
pub struct WorkerExit {
    /// Next avail index to process: the GET_VRING_BASE answer.
    pub next_avail: u16,
    /// Counters.
    pub stats: QueueStats,
    /// Requests left unanswered in the inflight region (suspend).
    pub left_in_flight: usize,
    /// Of those, storage operations still running that may modify the
    /// image (the write fence waits for them).
    pub abandoned_writes: u64,
    /// The kick eventfd, back.
    pub kick: Option<File>,
    /// The engine, back unless it still has abandoned operations.
    pub engine: Option<IoEngine>,
}

/// A running queue.
pub struct Worker {
    commands: WakeSender<Command>,
    thread: JoinHandle<()>,
}

/// A stopped worker: where it left the ring and, after a suspend, the
/// thread still collecting its abandoned storage operations.
pub struct Stopped {
    /// Where the ring stands.
    pub exit: WorkerExit,
    /// Join it before the process exits, so abandoned writes land first.
    pub reaper: Option<JoinHandle<()>>,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Creating the command channel or the thread failed.
    #[error("cannot start queue {index} worker")]
    Start {
        /// Queue index.
        index: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// What a worker serves a ring with.
pub struct WorkerResources {
    /// The guest's kick eventfd.
    pub kick: File,
    /// The guest's call eventfd.
    pub call: Option<Arc<File>>,
    /// SET_VRING_ENABLE state.
    pub enabled: bool,
    /// Guest memory.
    pub memory: GuestMemoryAtomic<GuestRam>,
    /// The disk.
    pub disk: Arc<DiskShared>,
    /// Raised when the ring breaks.
    pub needs_reset: Arc<AtomicBool>,
    /// The ring's part of the inflight region.
    pub inflight: Option<InflightQueue>,
    /// The disk's write fence.
    pub fence: Arc<Fence>,
    /// The queue's I/O ring (created by the plan's `create_io_ring`).
    pub engine: IoEngine,
}

impl Worker {
    /// Start serving a ring on a new thread.
    pub fn spawn(setup: QueueSetup, resources: WorkerResources) -> Result<Worker, WorkerError> {
        let index = setup.index;
        let start_error = |source| WorkerError::Start { index, source };
        let (commands, receiver) = wake_channel::channel().map_err(start_error)?;
        let WorkerResources {
            kick,
            call,
            enabled,
            memory,
            disk,
            needs_reset,
            inflight,
            fence,
            engine,
        } = resources;
        let blk = BlkQueue::new(disk, engine, setup.size)
            .with_inflight(inflight)
            .with_bounced_reads(setup.bounce_reads)
            .with_index(setup.index);
        fence.add_waker(&commands.eventfd());
        let state = Loop {
            setup,
            kick,
            call,
            enabled,
            memory,
            needs_reset,
            fence,
            commands: receiver,
        };
        let thread = std::thread::Builder::new()
            .name(format!("{}-q{}", state.setup.device, index))
            .spawn(move || state.run(blk))
            .map_err(start_error)?;
        Ok(Worker { commands, thread })
    }

    /// Start or stop taking requests from the avail ring (SET_VRING_ENABLE).
    pub fn set_enabled(&self, enabled: bool) {
        let _ = self.commands.send(Command::SetEnabled(enabled));
    }

    /// Replace the interrupt eventfd (SET_VRING_CALL while running).
    pub fn set_call(&self, call: Option<Arc<File>>) {
        let _ = self.commands.send(Command::SetCall(call));
    }

    /// Stop taking requests and return where the ring stands (see
    /// [`StopMode`]).
    pub fn stop(self, mode: StopMode) -> Stopped {
        let exit = match self.commands.call(|reply| Command::Stop(mode, reply)) {
            Ok(exit) => exit,
            Err(_) => {
                log::error!("queue worker panicked; its ring position is lost");
                WorkerExit::default()
            }
        };
        if mode == StopMode::Suspend && exit.engine.is_none() {
            return Stopped {
                exit,
                reaper: Some(self.thread),
            };
        }
        if self.thread.join().is_err() {
            log::error!("queue worker panicked while stopping");
        }
        Stopped { exit, reaper: None }
    }
}
