//! io_uring engine: one ring per queue, the image registered as fixed file 0,
//! completions signalled through a registered eventfd.
//!
//! With an added latency, every operation goes to the kernel as a pair: an
//! `IORING_OP_TIMEOUT` of that latency hard-linked to the real SQE, so the
//! kernel starts the operation only when the timer expires and any number of
//! delays run in parallel. A hard link, not a normal one: a pure timeout
//! completes with -ETIME, which would cancel the rest of a normal link.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{advance_iovecs, Completion, IoOp};

/// Create a small ring and check every opcode we submit is supported.
pub(super) fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    for (code, name) in [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
        (opcode::Timeout::CODE, "TIMEOUT"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks {name}"));
        }
    }
    Ok(())
}

/// The fixed-file slot of [`UringEngine::hold_file_while_busy`] (slot 0 is
/// the image).
const HELD_FILE_SLOT: u32 = 1;

/// `user_data` bit marking the CQE of a delay timer. Operation tokens are
/// below the engine depth, so they never have it set.
const TIMER_TOKEN: u64 = 1 << 63;

struct Pending {
    op: IoOp,
    /// Bytes transferred so far (reads and writes may complete short).
    done: usize,
    expected: usize,
    /// The added latency. The timer SQE points here and the kernel reads it
    /// only when the SQE is submitted, so it lives in the slot, which stays
    /// put until the operation completes.
    delay: types::Timespec,
    /// A timer SQE must go in front of the next SQE pushed for this slot:
    /// set on submit when the engine has a latency, cleared once pushed (the
    /// remainder of a short transfer starts at once).
    needs_timer: bool,
}

/// io_uring engine; see the module docs.
pub struct UringEngine {
    ring: IoUring,
    _file: Arc<File>,
    eventfd: EventFd,
    /// Indexed by token (tokens are below the engine depth).
    pending: Vec<Option<Pending>>,
    in_flight: usize,
    /// Tokens whose SQE did not fit into the submission queue yet.
    backlog: VecDeque<u64>,
    /// SQEs pushed but not yet handed to the kernel.
    unsubmitted: usize,
    /// Completions drained from the completion queue but not yet handled,
    /// delay timers already left out; reused between reaps.
    finished: Vec<(u64, i32)>,
    /// Added latency before each operation starts (None: none).
    latency: Option<types::Timespec>,
}

impl UringEngine {
    /// A ring with room for `depth` operations on `file`; tokens must be
    /// below `depth`.
    pub fn new(file: Arc<File>, depth: u32) -> io::Result<UringEngine> {
        Self::with_latency(file, depth, Duration::ZERO)
    }

    /// As [`Self::new`], but every operation starts on storage only
    /// `latency` after it was submitted (see the module docs).
    pub fn with_latency(file: Arc<File>, depth: u32, latency: Duration) -> io::Result<UringEngine> {
        // Two SQEs per operation (timer + operation) with a latency. The CQ
        // is twice the SQ, so both CQEs of every operation fit too.
        let sqes_per_op = if latency.is_zero() { 1 } else { 2 };
        let entries = depth
            .saturating_mul(sqes_per_op)
            .clamp(8, 4096 * sqes_per_op)
            .next_power_of_two();
        let ring = IoUring::builder().build(entries)?;
        // Slot 0: the image; slot 1 stays empty until hold_file_while_busy.
        ring.submitter().register_files(&[file.as_raw_fd(), -1])?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        if latency.is_zero() {
            // Only completions that do not finish inside io_uring_enter
            // signal the eventfd: the caller reaps right after submitting,
            // so inline completions (buffered reads of cached pages) cost no
            // extra wakeup.
            ring.submitter()
                .register_eventfd_async(eventfd.as_raw_fd())?;
        } else {
            // "Async" means posted by an io-wq worker. A delayed operation
            // is started by its timer, from task work on the submitting
            // thread, and a cached read or an O_DIRECT transfer then
            // completes there too: an async-only eventfd would never fire
            // for it. Nothing completes inline with a delay, so signalling
            // every CQE costs nothing the async variant would save.
            ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        }
        Ok(UringEngine {
            ring,
            _file: file,
            eventfd,
            pending: (0..depth).map(|_| None).collect(),
            in_flight: 0,
            backlog: VecDeque::new(),
            unsubmitted: 0,
            finished: Vec::new(),
            latency: (!latency.is_zero()).then(|| types::Timespec::from(latency)),
        })
    }

    fn slot(&mut self, token: u64) -> Option<&mut Option<Pending>> {
        usize::try_from(token)
            .ok()
            .and_then(|index| self.pending.get_mut(index))
    }

    /// See [`super::IoEngine::submit`].
    ///
    /// # Safety
    /// As for [`super::IoEngine::submit`].
    pub unsafe fn submit(&mut self, token: u64, op: IoOp) {
        let expected = op.expected_bytes();
        let depth = self.pending.len();
        let latency = self.latency;
        let Some(slot) = self.slot(token) else {
            // A caller bug, not guest input: tokens are head indices below
            // the queue size the engine was created with.
            log::error!("io_uring token {token} beyond engine depth {depth}; operation dropped");
            return;
        };
        *slot = Some(Pending {
            op,
            done: 0,
            expected,
            delay: latency.unwrap_or_default(),
            needs_timer: latency.is_some(),
        });
        self.in_flight += 1;
        self.backlog.push_back(token);
        self.push_backlog();
    }

    fn sqe_for(token: u64, pending: &Pending) -> squeue::Entry {
        let file = types::Fixed(0);
        let entry = match &pending.op {
            IoOp::Read { offset, iovecs } => {
                // iovecs.len() is bounded by the queue size, far below u32::MAX.
                opcode::Readv::new(file, iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(offset + pending.done as u64)
                    .build()
            }
            IoOp::Write {
                offset,
                iovecs,
                dsync,
            } => opcode::Writev::new(file, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(offset + pending.done as u64)
                .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            IoOp::Flush => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Fallocate { offset, len, mode } => opcode::Fallocate::new(file, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        };
        entry.user_data(token)
    }

    fn push_backlog(&mut self) {
        while let Some(&token) = self.backlog.front() {
            let Some(Some(pending)) = usize::try_from(token)
                .ok()
                .and_then(|i| self.pending.get_mut(i))
            else {
                self.backlog.pop_front();
                continue;
            };
            let entry = Self::sqe_for(token, pending);
            let pushed = if pending.needs_timer {
                // The timer goes first and is hard-linked to the operation,
                // so the kernel starts the operation when the timer fires.
                // count 0: a pure relative timer, not a completion counter.
                let timer = opcode::Timeout::new(&pending.delay)
                    .count(0)
                    .build()
                    .user_data(token | TIMER_TOKEN)
                    .flags(squeue::Flags::IO_HARDLINK);
                // SAFETY: the timer SQE points at `pending.delay` and the
                // operation SQE at `pending.op`'s iovec array; both live in
                // the slot of `self.pending` (a Vec that is never resized),
                // which is neither moved nor overwritten until the
                // operation's completion is reaped, long after submission.
                // The buffers themselves are covered by the submit()
                // contract. push_multiple pushes both or neither, so a link
                // is never cut in half by a full submission queue.
                unsafe { self.ring.submission().push_multiple(&[timer, entry]) }
            } else {
                // SAFETY: the SQE points at `pending.op`'s iovec array, a heap
                // buffer owned by `self.pending` that neither moves nor is
                // freed until the completion is reaped; the buffers
                // themselves are covered by the submit() contract.
                unsafe { self.ring.submission().push(&entry) }
            };
            if pushed.is_err() {
                break; // submission queue full: retried after the next reap
            }
            pending.needs_timer = false;
            self.backlog.pop_front();
            self.unsubmitted += 1;
        }
    }

    /// Hand pushed SQEs to the kernel.
    pub fn flush(&mut self) {
        self.submit_pending();
    }

    /// Submit pushed SQEs; returns whether any were handed to the kernel.
    fn submit_pending(&mut self) -> bool {
        if self.unsubmitted == 0 {
            return false;
        }
        match self.ring.submit() {
            Ok(_) => {
                self.unsubmitted = 0;
                return true;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                // The kernel is short of resources; the SQEs stay queued and
                // the next flush (after reaping) submits them.
                log::trace!("io_uring submit deferred: {e}");
            }
            Err(e) => log::error!("io_uring submit failed: {e}"),
        }
        false
    }

    /// Collect finished operations; resubmits the remainder of short
    /// transfers (and collects those too when they finish inline).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        loop {
            self.drain_completion_queue();
            let mut finished = std::mem::take(&mut self.finished);
            let drained = !finished.is_empty();
            for (token, result) in finished.drain(..) {
                let Some(slot) = self.slot(token) else {
                    log::warn!("io_uring completion for unknown token {token}");
                    continue;
                };
                let Some(pending) = slot.as_mut() else {
                    log::warn!("io_uring completion for idle token {token}");
                    continue;
                };
                let result = if result < 0 {
                    Err(io::Error::from_raw_os_error(-result))
                } else {
                    pending.done += result as usize;
                    if pending.done >= pending.expected {
                        Ok(())
                    } else if result == 0 {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "short transfer at end of image",
                        ))
                    } else {
                        // Short read or write: continue where it stopped.
                        if let IoOp::Read { iovecs, .. } | IoOp::Write { iovecs, .. } =
                            &mut pending.op
                        {
                            advance_iovecs(iovecs, result as usize);
                        }
                        self.backlog.push_back(token);
                        continue;
                    }
                };
                *slot = None;
                self.in_flight -= 1;
                out.push(Completion { token, result });
            }
            self.finished = finished;
            self.push_backlog();
            // Anything submitted here (resubmissions, backlog) may finish
            // inline without signalling the async eventfd: look again.
            if !self.submit_pending() && !drained {
                return;
            }
        }
    }

    /// Move CQEs into `self.finished`, leaving out those of delay timers.
    fn drain_completion_queue(&mut self) {
        self.finished
            .extend(self.ring.completion().filter_map(|cqe| {
                let user_data = cqe.user_data();
                if user_data & TIMER_TOKEN == 0 {
                    return Some((user_data, cqe.result()));
                }
                // -ETIME is a timer that expired; anything else is a timer the
                // kernel cancelled or refused. Either way the hard-linked
                // operation completes on its own CQE, which is what counts.
                if cqe.result() != -libc::ETIME {
                    log::trace!(
                        "io_uring delay timer for token {} ended with {}",
                        user_data & !TIMER_TOKEN,
                        cqe.result()
                    );
                }
                None
            }));
    }

    /// Whether operations finished (a delay timer does not count). Drains
    /// the completion queue into the buffer the next reap starts from.
    pub fn has_completions(&mut self) -> bool {
        self.drain_completion_queue();
        !self.finished.is_empty()
    }

    /// The registered completion eventfd.
    pub fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// See [`super::IoEngine::hold_file_while_busy`]: the ring's fixed-file
    /// table takes its own reference to `fd`'s open file description, and
    /// the kernel drops the table only when it frees the ring, after every
    /// operation it was given has finished.
    pub fn hold_file_while_busy(&mut self, fd: RawFd) -> io::Result<()> {
        self.ring
            .submitter()
            .register_files_update(HELD_FILE_SLOT, &[fd])
            .map(drop)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Outstanding operations still point into guest memory: wait for them
        // so the memory may be unmapped safely once we are gone.
        // Reap first: has_completions() may have drained the last CQEs into
        // `finished` already, and waiting for another would never return.
        let mut sink = Vec::new();
        self.reap(&mut sink);
        while self.in_flight > 0 {
            self.flush();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // A signal; delayed operations make the wait long enough to
                // meet one. The operations are still outstanding: wait again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("io_uring wait during shutdown failed: {e}");
                    break;
                }
            }
            self.reap(&mut sink);
        }
    }
}
