//! One thread per running virtqueue: a mio loop over the guest's kick
//! eventfd, the storage engine's completion eventfd and a control eventfd
//! the protocol thread uses to enable, disable or stop the queue.
//!
//! The worker owns its `Queue` outright, so the data path takes no locks;
//! the protocol thread gets the ring indices back when it stops the worker.
//!
//! A worker stops in one of two ways ([`StopMode`]): draining (every
//! request taken from the ring is answered first) or suspending (it answers
//! nothing more at once, leaves the unanswered requests in the inflight
//! region, and keeps running only to collect its abandoned storage
//! operations, writing nothing into guest memory).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkdev::engine::{EngineKind, IoEngine};
use blkdev::fence::Fence;
use blkdev::inflight::InflightQueue;
use blkdev::queue::DiskShared;
use blkdev::{BlkQueue, QueueStats};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest_mapping::FaultWatch;
use crate::memory::GuestRam;
use crate::ratelimit::PeerLog;
use crate::vring::{drain_eventfd, notify};

const KICK: Token = Token(0);
const COMPLETION: Token = Token(1);
const CONTROL: Token = Token(2);

/// Everything needed to start serving one ring.
#[derive(Clone, Debug)]
pub struct QueueSetup {
    /// Device name, for log lines.
    pub device: Arc<str>,
    /// Queue index.
    pub index: u16,
    /// Ring size.
    pub size: u16,
    /// Descriptor table (guest physical).
    pub desc_table: GuestAddress,
    /// Avail ring (guest physical).
    pub avail_ring: GuestAddress,
    /// Used ring (guest physical).
    pub used_ring: GuestAddress,
    /// Next avail index to process (SET_VRING_BASE).
    pub next_avail: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// How long to busy-poll the ring after work before sleeping (0: never).
    pub poll: Duration,
    /// Added storage latency (the `latency-ms` experiment knob).
    pub latency: Duration,
    /// The front-end may suspend this ring: reads go through private
    /// buffers so nothing lands in guest memory after a suspend.
    pub bounce_reads: bool,
}

/// How to stop a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Answer every request taken from the ring, then stop.
    Drain,
    /// Stop at once: unanswered requests stay in the inflight region and
    /// late storage completions never reach guest memory.
    Suspend,
    /// The front-end went away: answer what storage already has (so no
    /// operation outlives the stop and lands later), but leave requests
    /// held by the write fence in the inflight region for whoever uses it
    /// next, instead of waiting for a gate that may never open.
    Detach,
}

/// State shared between the protocol thread and a worker.
struct Control {
    wake: Arc<EventFd>,
    stop: AtomicBool,
    suspend: AtomicBool,
    /// Stop without waiting for requests the write fence holds.
    leave_held: AtomicBool,
    enabled: AtomicBool,
    call: Mutex<Option<Arc<File>>>,
    /// Set when the queue hit a guest error and stopped serving the ring.
    needs_reset: Arc<AtomicBool>,
}

/// Where a stopped worker left the ring.
#[derive(Clone, Copy, Debug, Default)]
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
}

/// A running queue.
pub struct Worker {
    control: Arc<Control>,
    exit: mpsc::Receiver<WorkerExit>,
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
    /// Creating the eventfd, poll instance, engine or thread failed.
    #[error("cannot start queue {index} worker")]
    Start {
        /// Queue index.
        index: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl Worker {
    /// Start serving a ring on a new thread.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        setup: QueueSetup,
        kick: File,
        call: Option<Arc<File>>,
        enabled: bool,
        memory: GuestMemoryAtomic<GuestRam>,
        disk: Arc<DiskShared>,
        engine_kind: EngineKind,
        needs_reset: Arc<AtomicBool>,
        inflight: Option<InflightQueue>,
        fence: Arc<Fence>,
        early_engine: Option<IoEngine>,
    ) -> Result<Worker, WorkerError> {
        let index = setup.index;
        let start_error = |source| WorkerError::Start { index, source };
        let control = Arc::new(Control {
            wake: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(start_error)?),
            stop: AtomicBool::new(false),
            suspend: AtomicBool::new(false),
            leave_held: AtomicBool::new(false),
            enabled: AtomicBool::new(enabled),
            call: Mutex::new(call),
            needs_reset,
        });
        // An engine made early (presetup) is taken as it is; it is at
        // least as deep as the ring.
        let engine = match early_engine {
            Some(engine) => engine,
            None => IoEngine::with_latency(
                engine_kind,
                disk.file.clone(),
                u32::from(setup.size),
                setup.latency,
            )
            .map_err(start_error)?,
        };
        let blk = BlkQueue::new(disk, engine, setup.size)
            .with_inflight(inflight)
            .with_bounced_reads(setup.bounce_reads)
            .with_index(index);
        fence.add_waker(&control.wake);
        let thread_control = control.clone();
        let (exit_tx, exit) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("{}-q{}", setup.device, index))
            .spawn(move || {
                let exit = run(setup, kick, blk, memory, &thread_control, &fence, &exit_tx);
                // Already sent after a suspend (then the receiver may be gone).
                let _ = exit_tx.try_send(exit);
            })
            .map_err(start_error)?;
        Ok(Worker {
            control,
            exit,
            thread,
        })
    }

    /// Start or stop taking requests from the avail ring (SET_VRING_ENABLE).
    pub fn set_enabled(&self, enabled: bool) {
        self.control.enabled.store(enabled, Ordering::SeqCst);
        self.wake();
    }

    /// Replace the interrupt eventfd (SET_VRING_CALL while running).
    pub fn set_call(&self, call: Option<Arc<File>>) {
        *self.control.call.lock().unwrap_or_else(|p| p.into_inner()) = call;
    }

    /// Stop taking requests and return where the ring stands (see
    /// [`StopMode`]).
    pub fn stop(self, mode: StopMode) -> Stopped {
        self.control
            .suspend
            .store(mode == StopMode::Suspend, Ordering::SeqCst);
        self.control
            .leave_held
            .store(mode == StopMode::Detach, Ordering::SeqCst);
        self.control.stop.store(true, Ordering::SeqCst);
        self.wake();
        let exit = match self.exit.recv() {
            Ok(exit) => exit,
            Err(_) => {
                log::error!("queue worker panicked; its ring position is lost");
                WorkerExit::default()
            }
        };
        if mode == StopMode::Suspend && exit.abandoned_writes + exit.left_in_flight as u64 > 0 {
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

    fn wake(&self) {
        if let Err(e) = self.control.wake.write(1) {
            log::error!("cannot wake queue worker: {e}");
        }
    }
}

fn signal(control: &Control) {
    let call = control.call.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(file) = call.as_ref() {
        notify(file);
    }
}

/// Build the virtio-queue `Queue` for `setup`.
fn build_queue(setup: &QueueSetup, mem: &GuestRam) -> Result<Queue, String> {
    let rings = (setup.desc_table, setup.avail_ring, setup.used_ring);
    crate::vring::build_queue(setup.size, rings, setup.next_avail, setup.event_idx, mem)
}

fn run(
    setup: QueueSetup,
    kick: File,
    mut blk: BlkQueue<GuestRam>,
    memory: GuestMemoryAtomic<GuestRam>,
    control: &Control,
    fence: &Arc<Fence>,
    exit_tx: &mpsc::SyncSender<WorkerExit>,
) -> WorkerExit {
    let device = setup.device.clone();
    let index = setup.index;
    let mut exit = WorkerExit {
        next_avail: setup.next_avail,
        ..WorkerExit::default()
    };
    let mem = memory.memory().into_inner();
    let mut queue = match build_queue(&setup, &mem) {
        Ok(queue) => queue,
        Err(reason) => {
            log::error!("{device} queue {index}: cannot start: {reason}; the device needs a reset");
            control.needs_reset.store(true, Ordering::SeqCst);
            wait_for_stop(control);
            return exit;
        }
    };
    let mut poll = match setup_poll(&kick, &blk, control) {
        Ok(poll) => poll,
        Err(e) => {
            log::error!("{device} queue {index}: event loop setup failed: {e}");
            control.needs_reset.store(true, Ordering::SeqCst);
            wait_for_stop(control);
            return exit;
        }
    };
    let resumed = blk.resume(&mut queue, &mem, || {
        fence.arm();
        !fence.is_open()
    });
    match resumed {
        Ok(report) => {
            if let Some((set, derived)) = report.corrected_avail {
                log::info!("{device} queue {index}: next avail {derived} from the inflight region (front-end set {set})");
            }
            if report.resubmitted > 0 {
                log::info!(
                    "{device} queue {index}: resubmitted {} request(s) from the inflight region{}",
                    report.resubmitted,
                    if report.held > 0 {
                        format!(
                            "; {} write(s) held until the write fence ({}) opens",
                            report.held,
                            fence.mode().name()
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
        Err(e) => {
            log::error!(
                "{device} queue {index}: cannot resume from the inflight region: {}; the device needs a reset",
                crate::error_chain(&e)
            );
            control.needs_reset.store(true, Ordering::SeqCst);
            wait_for_stop(control);
            return exit;
        }
    }
    log::debug!(
        "{device} queue {index}: started at avail {} used {}",
        queue.next_avail(),
        queue.next_used()
    );

    let peers = PeerLog::for_device(&device);
    report_faults(&mut blk, &peers, index);
    let mut faults = FaultWatch::default();
    let mut events = Events::with_capacity(8);
    let mut broken = false;
    let mut kick_ignored = false;
    let polling = !setup.poll.is_zero();
    // Guest notifications are on unless we left them off to poll.
    let mut armed = true;
    // A kick may have arrived before we registered: look at the ring once.
    let mut kicked = true;
    loop {
        let mem = memory.memory().into_inner();
        let mut notify = false;
        match blk.process_completions(&mut queue, &mem) {
            Ok(needed) => notify |= needed,
            Err(e) => {
                log::error!("{device} queue {index}: {}", crate::error_chain(&e));
                broken = true;
            }
        }
        let stopping = control.stop.load(Ordering::SeqCst);
        if stopping && control.suspend.load(Ordering::SeqCst) {
            drop(mem);
            return suspend(&device, index, &queue, blk, exit, fence, exit_tx);
        }
        if blk.held() > 0 && fence.is_open() && !broken {
            match blk.release_held(&mut queue, &mem) {
                Ok(needed) => notify |= needed,
                Err(e) => {
                    log::error!("{device} queue {index}: {}", crate::error_chain(&e));
                    broken = true;
                }
            }
        }
        let enabled = control.enabled.load(Ordering::SeqCst);
        if kicked && !stopping && !broken && enabled {
            let result = if polling {
                armed = false;
                blk.process_avail_polled(&mut queue, &mem)
            } else {
                blk.process_avail(&mut queue, &mem)
            };
            match result {
                Ok(needed) => notify |= needed,
                Err(e) => {
                    let e = crate::error_chain(&e);
                    log::error!("{device} queue {index}: {e}; no more requests are taken from this queue until it is reset");
                    control.needs_reset.store(true, Ordering::SeqCst);
                    broken = true;
                    // Requests completed before the bad chain may be in the
                    // used ring: a spurious interrupt is harmless, a lost one
                    // is not.
                    notify = true;
                }
            }
        }
        report_faults(&mut blk, &peers, index);
        // After the work, before sleeping: the access that faulted may have
        // been this step's, and nothing may wake us again.
        if !broken && faults.faulted(&mem) {
            log::error!("{device} queue {index}: the front-end truncated guest memory under the agent's mapping (SIGBUS contained); no more requests are taken from this queue until it is reset");
            control.needs_reset.store(true, Ordering::SeqCst);
            broken = true;
        }
        if notify {
            signal(control);
        }
        if stopping
            && blk.in_flight() == 0
            && (blk.held() == 0 || broken || control.leave_held.load(Ordering::SeqCst))
        {
            exit.left_in_flight = blk.held();
            break;
        }

        // Busy-poll briefly before sleeping: a guest that keeps the queue
        // busy is served without kicks, wakeups or context switches. Only
        // while nothing is in flight: then we wait for the guest, and
        // spinning would only take CPU from the threads storage needs
        // (io-wq workers, writeback) on a small machine.
        kicked = false;
        if polling
            && !stopping
            && !broken
            && blk.in_flight() == 0
            && spin(&mut blk, &queue, &mem, setup.poll, enabled, control)
        {
            kicked = true;
            continue;
        }
        if !armed && !broken {
            armed = true;
            match blk.rearm_notifications(&mut queue, &mem) {
                // Requests arrived after the last look: their kick may never
                // come, so process them now.
                Ok(true) => {
                    kicked = true;
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    log::error!("{device} queue {index}: {}", crate::error_chain(&e));
                    broken = true;
                }
            }
        }
        // io_uring's eventfd only fires for completions from its worker
        // threads; others (O_DIRECT, delayed operations) are posted when
        // this thread enters the kernel, possibly just before it sleeps.
        // Look once more, so such a completion is not left for the next kick.
        if blk.in_flight() > 0 && blk.has_work(&queue, &mem, false) {
            continue;
        }
        drop(mem);
        if broken && !kick_ignored {
            // A broken ring is never looked at again until it is reset: a
            // guest that keeps kicking it must not keep waking us either.
            kick_ignored = true;
            let _ = poll.registry().deregister(&mut SourceFd(&kick.as_raw_fd()));
        }

        let mut completed = false;
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("{device} queue {index}: poll failed: {e}");
            break;
        }
        for event in events.iter() {
            match event.token() {
                KICK => {
                    drain_eventfd(&kick);
                    kicked = true;
                }
                COMPLETION => completed = true,
                CONTROL => {
                    let _ = control.wake.read();
                    // Enable may have flipped: look at the ring again.
                    kicked = true;
                }
                _ => {}
            }
        }
        if completed {
            // Drain before the reap at the top of the loop, so a completion
            // that lands in between re-arms the eventfd.
            drain_completion_fd(&blk);
        }
    }
    exit.next_avail = queue.next_avail();
    exit.stats = blk.stats();
    log::debug!(
        "{device} queue {index}: stopped at avail {} used {} ({:?})",
        exit.next_avail,
        queue.next_used(),
        exit.stats
    );
    exit
}

/// Stop without draining: everything unanswered stays in the inflight
/// region, the write fence learns of storage operations still running, the
/// protocol thread gets the ring position at once, and this thread stays
/// only to collect the abandoned operations, never touching guest memory.
#[allow(clippy::too_many_arguments)]
fn suspend(
    device: &str,
    index: u16,
    queue: &Queue,
    mut blk: BlkQueue<GuestRam>,
    mut exit: WorkerExit,
    fence: &Fence,
    exit_tx: &mpsc::SyncSender<WorkerExit>,
) -> WorkerExit {
    // Nothing on the way to the reply may block: no logging until the
    // protocol thread has the exit (a log write can stall on a busy disk).
    let held = blk.held();
    let abandoned_writes = blk.suspend();
    let fenced = fence.abandon(abandoned_writes);
    exit.next_avail = queue.next_avail();
    exit.stats = blk.stats();
    exit.left_in_flight = blk.in_flight() + held;
    exit.abandoned_writes = abandoned_writes;
    let _ = exit_tx.try_send(exit);
    match fenced {
        Ok(()) if abandoned_writes > 0 && fence.mode() == blkdev::FenceMode::Lock => log::info!(
            "{device} queue {index}: holding {} until {abandoned_writes} abandoned write(s) finish",
            fence.lock_file().display()
        ),
        Ok(()) => {}
        Err(e) => log::error!(
            "{device} queue {index}: cannot take the write fence lock {} ({e}); a destination will not wait for {abandoned_writes} abandoned write(s)",
            fence.lock_file().display()
        ),
    }
    log::debug!(
        "{device} queue {index}: suspended at avail {} used {} with {} request(s) unanswered",
        exit.next_avail,
        queue.next_used(),
        exit.left_in_flight
    );

    let started = Instant::now();
    let mut poll = match Poll::new() {
        Ok(poll) => poll,
        Err(e) => {
            log::error!("{device} queue {index}: cannot wait for abandoned operations: {e}");
            return exit;
        }
    };
    if let Err(e) = poll.registry().register(
        &mut SourceFd(&blk.completion_fd()),
        COMPLETION,
        Interest::READABLE,
    ) {
        log::error!("{device} queue {index}: cannot wait for abandoned operations: {e}");
    }
    let mut events = Events::with_capacity(2);
    while blk.in_flight() > 0 {
        drain_completion_fd(&blk);
        for _ in 0..blk.reap_abandoned() {
            fence.abandoned_done();
        }
        if blk.in_flight() == 0 {
            break;
        }
        // A timeout bounds the wait should a wakeup be missed.
        let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
    }
    log::debug!(
        "{device} queue {index}: abandoned operations finished {:?} after the suspend",
        started.elapsed()
    );
    exit
}

/// Log what the guest did wrong since the last look, through the device's
/// rate limiter (the queue records it rather than logging it).
fn report_faults(blk: &mut BlkQueue<GuestRam>, peers: &PeerLog, index: u16) {
    let taken = blk.take_faults();
    for fault in &taken.faults {
        peers.warn(format_args!("queue {index}: {fault}"));
    }
    peers.count_suppressed(taken.dropped);
}

/// Spin for up to `window` until there is work or the protocol thread
/// wants something; returns whether to go around the loop again.
fn spin(
    blk: &mut BlkQueue<GuestRam>,
    queue: &Queue,
    mem: &GuestRam,
    window: Duration,
    enabled: bool,
    control: &Control,
) -> bool {
    let deadline = Instant::now() + window;
    loop {
        if blk.has_work(queue, mem, enabled) || control.stop.load(Ordering::Relaxed) {
            return true;
        }
        if control.enabled.load(Ordering::Relaxed) != enabled {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

fn drain_completion_fd<M: vm_memory::GuestMemory>(blk: &BlkQueue<M>) {
    let mut counter = [0u8; 8];
    // SAFETY: reading at most 8 bytes into an 8-byte stack buffer from the
    // engine's non-blocking eventfd; EAGAIN (nothing pending) is fine.
    unsafe {
        libc::read(
            blk.completion_fd(),
            counter.as_mut_ptr().cast(),
            counter.len(),
        )
    };
}

fn setup_poll(kick: &File, blk: &BlkQueue<GuestRam>, control: &Control) -> io::Result<Poll> {
    let poll = Poll::new()?;
    let registry = poll.registry();
    registry.register(&mut SourceFd(&kick.as_raw_fd()), KICK, Interest::READABLE)?;
    registry.register(
        &mut SourceFd(&blk.completion_fd()),
        COMPLETION,
        Interest::READABLE,
    )?;
    registry.register(
        &mut SourceFd(&control.wake.as_raw_fd()),
        CONTROL,
        Interest::READABLE,
    )?;
    Ok(poll)
}

/// A worker that could not start still has to answer stop().
fn wait_for_stop(control: &Control) {
    let Ok(mut poll) = Poll::new() else { return };
    let mut events = Events::with_capacity(1);
    let _ = poll.registry().register(
        &mut SourceFd(&control.wake.as_raw_fd()),
        CONTROL,
        Interest::READABLE,
    );
    while !control.stop.load(Ordering::SeqCst) {
        let _ = poll.poll(&mut events, None);
        let _ = control.wake.read();
    }
}
