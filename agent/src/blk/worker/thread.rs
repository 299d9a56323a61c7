//! The queue worker thread: serving the ring, stopping it in one of the
//! three ways, and collecting a suspended queue's abandoned operations.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkdev::fence::Fence;
use blkdev::BlkQueue;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use super::{Command, QueueSetup, WorkerExit};
use crate::ratelimit::PeerLog;
use crate::vhost_user::device::StopMode;
use crate::vhost_user::memory::guest_mapping::FaultWatch;
use crate::vhost_user::memory::GuestRam;
use crate::vhost_user::vring::{build_queue, drain_eventfd, notify};
use crate::wake_channel::{self, Reply, WakeReceiver};

const KICK: Token = Token(0);
const COMPLETION: Token = Token(1);
const CONTROL: Token = Token(2);

/// The worker thread's state.
pub(super) struct Loop {
    pub(super) setup: QueueSetup,
    pub(super) kick: File,
    pub(super) call: Option<Arc<File>>,
    pub(super) enabled: bool,
    pub(super) memory: GuestMemoryAtomic<GuestRam>,
    pub(super) needs_reset: Arc<AtomicBool>,
    pub(super) fence: Arc<Fence>,
    pub(super) commands: WakeReceiver<Command>,
}

/// A stop the protocol thread asked for.
struct StopRequest {
    mode: StopMode,
    reply: Reply<WorkerExit>,
}

impl Loop {
    fn signal(&self) {
        if let Some(file) = self.call.as_ref() {
            notify(file);
        }
    }

    /// Take waiting commands; a stop is kept for the loop to act on.
    fn take_commands(&mut self, stop: &mut Option<StopRequest>) {
        loop {
            match self.commands.try_recv() {
                Ok(Some(Command::SetEnabled(enabled))) => self.enabled = enabled,
                Ok(Some(Command::SetCall(call))) => self.call = call,
                Ok(Some(Command::Stop(mode, reply))) => *stop = Some(StopRequest { mode, reply }),
                Ok(None) => return,
                // The protocol thread is gone: stop as a disconnect does.
                Err(wake_channel::Gone) => {
                    if stop.is_none() {
                        let (reply, _) = std::sync::mpsc::sync_channel(1);
                        *stop = Some(StopRequest {
                            mode: StopMode::Detach,
                            reply,
                        });
                    }
                    return;
                }
            }
        }
    }

    /// A worker that could not start still answers its stop.
    fn wait_for_stop(mut self, blk: BlkQueue<GuestRam>) {
        let next_avail = self.setup.next_avail;
        let mut stop = None;
        let Ok(mut poll) = Poll::new() else { return };
        let mut events = Events::with_capacity(1);
        let _ = poll.registry().register(
            &mut SourceFd(&self.commands.fd()),
            CONTROL,
            Interest::READABLE,
        );
        loop {
            self.take_commands(&mut stop);
            if let Some(request) = stop.take() {
                let exit = WorkerExit {
                    next_avail,
                    kick: Some(self.kick),
                    engine: blk.into_engine(),
                    ..WorkerExit::default()
                };
                let _ = request.reply.send(exit);
                return;
            }
            let _ = poll.poll(&mut events, None);
            self.commands.clear();
        }
    }

    fn fail_start(self, blk: BlkQueue<GuestRam>, what: &str, reason: &dyn std::error::Error) {
        log::error!(
            "{} queue {}: {what}: {}; the device needs a reset",
            self.setup.device,
            self.setup.index,
            crate::error_chain(reason)
        );
        self.needs_reset.store(true, Ordering::SeqCst);
        self.wait_for_stop(blk);
    }

    pub(super) fn run(self, mut blk: BlkQueue<GuestRam>) {
        let device = self.setup.device.clone();
        let index = self.setup.index;
        let mem = self.memory.memory().into_inner();
        let setup = &self.setup;
        let mut queue = match build_queue(
            setup.size,
            setup.addresses,
            setup.next_avail,
            setup.event_idx,
            &mem,
        ) {
            Ok(queue) => queue,
            Err(e) => return self.fail_start(blk, "cannot start", &e),
        };
        let mut poll = match self.setup_poll(&blk) {
            Ok(poll) => poll,
            Err(e) => return self.fail_start(blk, "event loop setup failed", &e),
        };
        let fence = self.fence.clone();
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
            Err(e) => return self.fail_start(blk, "cannot resume from the inflight region", &e),
        }
        drop(mem);
        log::debug!(
            "{device} queue {index}: started at avail {} used {}",
            queue.next_avail(),
            queue.next_used()
        );
        self.serve(blk, queue, &mut poll);
    }

    fn serve(mut self, mut blk: BlkQueue<GuestRam>, mut queue: Queue, poll: &mut Poll) {
        let device = self.setup.device.clone();
        let index = self.setup.index;
        let peers = PeerLog::for_device(&device);
        report_faults(&mut blk, &peers, index);
        let mut faults = FaultWatch::default();
        let mut events = Events::with_capacity(8);
        let mut broken = false;
        let mut kick_ignored = false;
        let polling = !self.setup.poll.is_zero();
        let mut stop: Option<StopRequest> = None;
        // Guest notifications are on unless we left them off to poll.
        let mut armed = true;
        // A kick may have arrived before we registered: look at the ring once.
        let mut kicked = true;
        let exit = loop {
            self.take_commands(&mut stop);
            let mem = self.memory.memory().into_inner();
            let mut notify = false;
            match blk.process_completions(&mut queue, &mem) {
                Ok(needed) => notify |= needed,
                Err(e) => {
                    log::error!("{device} queue {index}: {}", crate::error_chain(&e));
                    broken = true;
                }
            }
            if let Some(request) = stop.take_if(|request| request.mode == StopMode::Suspend) {
                drop(mem);
                self.suspend(&queue, blk, request);
                return;
            }
            let mode = stop.as_ref().map(|request| request.mode);
            if blk.held() > 0 && self.fence.is_open() && !broken {
                match blk.release_held(&mut queue, &mem) {
                    Ok(needed) => notify |= needed,
                    Err(e) => {
                        log::error!("{device} queue {index}: {}", crate::error_chain(&e));
                        broken = true;
                    }
                }
            }
            if kicked && mode.is_none() && !broken && self.enabled {
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
                        self.needs_reset.store(true, Ordering::SeqCst);
                        broken = true;
                        // Requests completed before the bad chain may be in
                        // the used ring: a spurious interrupt is harmless, a
                        // lost one is not.
                        notify = true;
                    }
                }
            }
            report_faults(&mut blk, &peers, index);
            // After the work, before sleeping: the access that faulted may
            // have been this step's, and nothing may wake us again.
            if !broken && faults.faulted(&mem) {
                log::error!("{device} queue {index}: the front-end truncated guest memory under the agent's mapping (SIGBUS contained); no more requests are taken from this queue until it is reset");
                self.needs_reset.store(true, Ordering::SeqCst);
                broken = true;
            }
            if notify {
                self.signal();
            }
            if let Some(mode) = mode {
                if blk.in_flight() == 0 && (blk.held() == 0 || broken || mode == StopMode::Detach) {
                    let left_in_flight = blk.held();
                    break WorkerExit {
                        next_avail: queue.next_avail(),
                        stats: blk.stats(),
                        left_in_flight,
                        ..WorkerExit::default()
                    };
                }
            }

            // Busy-poll briefly before sleeping: a guest that keeps the
            // queue busy is served without kicks, wakeups or context
            // switches. Only while nothing is in flight: then we wait for
            // the guest, and spinning would only take CPU from the threads
            // storage needs (io-wq workers, writeback) on a small machine.
            kicked = false;
            if polling
                && mode.is_none()
                && !broken
                && blk.in_flight() == 0
                && self.spin(&mut blk, &queue, &mem)
            {
                kicked = true;
                continue;
            }
            if !armed && !broken {
                armed = true;
                match blk.rearm_notifications(&mut queue, &mem) {
                    // Requests arrived after the last look: their kick may
                    // never come, so process them now.
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
            // Look once more, so such a completion is not left for the next
            // kick.
            if blk.in_flight() > 0 && blk.has_work(&queue, &mem, false) {
                continue;
            }
            drop(mem);
            if self.commands.pending() {
                continue;
            }
            if broken && !kick_ignored {
                // A broken ring is never looked at again until it is reset:
                // a guest that keeps kicking it must not keep waking us.
                kick_ignored = true;
                let _ = poll
                    .registry()
                    .deregister(&mut SourceFd(&self.kick.as_raw_fd()));
            }

            let mut completed = false;
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("{device} queue {index}: poll failed: {e}");
                break WorkerExit {
                    next_avail: queue.next_avail(),
                    stats: blk.stats(),
                    ..WorkerExit::default()
                };
            }
            for event in events.iter() {
                match event.token() {
                    KICK => {
                        drain_eventfd(&self.kick);
                        kicked = true;
                    }
                    COMPLETION => completed = true,
                    CONTROL => {
                        self.commands.clear();
                        // Enable may have flipped: look at the ring again.
                        kicked = true;
                    }
                    _ => {}
                }
            }
            if completed {
                // Drain before the reap at the top of the loop, so a
                // completion that lands in between re-arms the eventfd.
                drain_completion_fd(&blk);
            }
        };
        log::debug!(
            "{device} queue {index}: stopped at avail {} used {} ({:?})",
            exit.next_avail,
            queue.next_used(),
            exit.stats
        );
        let exit = WorkerExit {
            kick: Some(self.kick),
            engine: blk.into_engine(),
            ..exit
        };
        match stop {
            Some(request) => {
                let _ = request.reply.send(exit);
            }
            None => log::error!("{device} queue {index}: stopped without being asked"),
        }
    }

    /// Stop without draining: everything unanswered stays in the inflight
    /// region, the write fence learns of storage operations still running,
    /// the protocol thread gets the ring position at once, and this thread
    /// stays only to collect the abandoned operations, never touching guest
    /// memory.
    fn suspend(self, queue: &Queue, mut blk: BlkQueue<GuestRam>, request: StopRequest) {
        let device = self.setup.device.clone();
        let index = self.setup.index;
        // Nothing on the way to the reply may block: no logging until the
        // protocol thread has the exit (a log write can stall on a busy
        // disk).
        let held = blk.held();
        let abandoned_writes = blk.suspend();
        let fenced = self.fence.abandon(abandoned_writes);
        // The lock must outlive this process while its writes are in the
        // kernel: a SIGKILL closes our descriptor at once, the ring's
        // operations finish later (IoEngine::hold_file_while_busy).
        let tied = if abandoned_writes > 0 {
            self.fence.with_held_lock(|fd| blk.hold_file_while_busy(fd))
        } else {
            None
        };
        let mut exit = WorkerExit {
            next_avail: queue.next_avail(),
            stats: blk.stats(),
            left_in_flight: blk.in_flight() + held,
            abandoned_writes,
            kick: Some(self.kick),
            engine: None,
        };
        if blk.in_flight() == 0 {
            // Nothing outstanding: the engine can serve the next start.
            exit.engine = blk.into_engine();
            let _ = request.reply.send(exit);
            return;
        }
        let left = exit.left_in_flight;
        let _ = request.reply.send(exit);
        match fenced {
            Ok(()) if abandoned_writes > 0 && self.fence.mode() == blkdev::FenceMode::Lock => {
                log::info!(
                    "{device} queue {index}: holding {} until {abandoned_writes} abandoned write(s) finish",
                    self.fence.lock_file().display()
                )
            }
            Ok(()) => {}
            Err(e) => log::error!(
                "{device} queue {index}: cannot take the write fence lock {} ({e}); a destination will not wait for {abandoned_writes} abandoned write(s)",
                self.fence.lock_file().display()
            ),
        }
        if let Some(Err(e)) = tied {
            log::warn!(
                "{device} queue {index}: cannot tie {} to the storage operations in the kernel ({e}); should this process die before they finish, a destination would not wait for them",
                self.fence.lock_file().display()
            );
        }
        log::debug!(
            "{device} queue {index}: suspended at avail {} used {} with {left} request(s) unanswered",
            queue.next_avail(),
            queue.next_used(),
        );
        let started = Instant::now();
        let mut poll = match Poll::new() {
            Ok(poll) => poll,
            Err(e) => {
                log::error!("{device} queue {index}: cannot wait for abandoned operations: {e}");
                return;
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
                self.fence.abandoned_done();
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
    }

    /// Spin for up to the poll window until there is work or the protocol
    /// thread wants something; returns whether to go around the loop again.
    fn spin(&self, blk: &mut BlkQueue<GuestRam>, queue: &Queue, mem: &GuestRam) -> bool {
        let deadline = Instant::now() + self.setup.poll;
        loop {
            if blk.has_work(queue, mem, self.enabled) || self.commands.pending() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn setup_poll(&self, blk: &BlkQueue<GuestRam>) -> io::Result<Poll> {
        let poll = Poll::new()?;
        let registry = poll.registry();
        registry.register(
            &mut SourceFd(&self.kick.as_raw_fd()),
            KICK,
            Interest::READABLE,
        )?;
        registry.register(
            &mut SourceFd(&blk.completion_fd()),
            COMPLETION,
            Interest::READABLE,
        )?;
        registry.register(
            &mut SourceFd(&self.commands.fd()),
            CONTROL,
            Interest::READABLE,
        )?;
        Ok(poll)
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

/// Log what the guest did wrong since the last look, through the device's
/// rate limiter (the queue records it rather than logging it).
fn report_faults(blk: &mut BlkQueue<GuestRam>, peers: &PeerLog, index: u16) {
    let taken = blk.take_faults();
    for fault in &taken.faults {
        peers.warn(format_args!("queue {index}: {fault}"));
    }
    peers.count_suppressed(taken.dropped);
}
