//! io_uring engine: one ring per queue, the image registered as fixed file 0,
//! completions signalled through a registered eventfd.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

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
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks {name}"));
        }
    }
    Ok(())
}

struct Pending {
    op: IoOp,
    /// Bytes transferred so far (reads and writes may complete short).
    done: usize,
    expected: usize,
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
    /// Reused buffer for draining the completion queue.
    finished: Vec<(u64, i32)>,
}

impl UringEngine {
    /// A ring with room for `depth` operations on `file`; tokens must be
    /// below `depth`.
    pub fn new(file: Arc<File>, depth: u32) -> io::Result<UringEngine> {
        let ring = IoUring::builder().build(depth.clamp(8, 4096).next_power_of_two())?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        // Only completions that do not finish inside io_uring_enter signal
        // the eventfd: the caller reaps right after submitting, so inline
        // completions (buffered reads of cached pages) cost no extra wakeup.
        ring.submitter()
            .register_eventfd_async(eventfd.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            _file: file,
            eventfd,
            pending: (0..depth).map(|_| None).collect(),
            in_flight: 0,
            backlog: VecDeque::new(),
            unsubmitted: 0,
            finished: Vec::new(),
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
                .and_then(|i| self.pending.get(i))
            else {
                self.backlog.pop_front();
                continue;
            };
            let entry = Self::sqe_for(token, pending);
            // SAFETY: the SQE points at `pending.op`'s iovec array, a heap
            // buffer owned by `self.pending` that neither moves nor is freed
            // until the completion is reaped; the buffers themselves are
            // covered by the submit() contract.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                break; // submission queue full: retried after the next reap
            }
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
            let mut finished = std::mem::take(&mut self.finished);
            finished.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
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

    /// Whether CQEs are waiting.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// The registered completion eventfd.
    pub fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Outstanding operations still point into guest memory: wait for them
        // so the memory may be unmapped safely once we are gone.
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            self.flush();
            if let Err(e) = self.ring.submit_and_wait(1) {
                log::error!("io_uring wait during shutdown failed: {e}");
                break;
            }
            self.reap(&mut sink);
        }
    }
}
