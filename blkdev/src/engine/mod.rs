//! Asynchronous storage I/O: submit operations tagged with a token, learn of
//! completions through an eventfd, reap them in batches.
//!
//! Two implementations behind one enum: io_uring (preferred) and a thread
//! pool for kernels or sandboxes where io_uring is unavailable. The choice is
//! made once per disk by [`EngineKind::probe`] and logged by the caller.

mod pool;
mod uring;

use std::fs::File;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

pub use pool::ThreadPoolEngine;
pub use uring::UringEngine;

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// Linux io_uring.
    IoUring,
    /// Blocking syscalls on worker threads.
    ThreadPool,
}

impl EngineKind {
    /// io_uring if this kernel lets us create a ring that supports every
    /// opcode we use, else the thread pool. Returns the reason for a fallback.
    pub fn probe() -> (EngineKind, Option<String>) {
        match uring::probe() {
            Ok(()) => (EngineKind::IoUring, None),
            Err(reason) => (EngineKind::ThreadPool, Some(reason)),
        }
    }

    /// Name as used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::ThreadPool => "threads",
        }
    }
}

/// One storage operation. Buffers are raw iovecs into guest memory; see the
/// safety contract of [`IoEngine::submit`].
#[derive(Debug)]
pub enum IoOp {
    /// preadv at `offset` into `iovecs`.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Destination buffers.
        iovecs: Vec<libc::iovec>,
    },
    /// pwritev at `offset` from `iovecs`; with `dsync`, durable on completion.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Source buffers.
        iovecs: Vec<libc::iovec>,
        /// Use RWF_DSYNC (writethrough cache mode).
        dsync: bool,
    },
    /// fdatasync.
    Flush,
    /// fallocate(mode, offset, len): discard and write-zeroes.
    Fallocate {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// fallocate mode flags.
        mode: i32,
    },
}

impl IoOp {
    /// Bytes the operation must transfer to succeed (0 for non-data ops).
    pub fn expected_bytes(&self) -> usize {
        match self {
            IoOp::Read { iovecs, .. } | IoOp::Write { iovecs, .. } => {
                iovecs.iter().map(|iov| iov.iov_len).sum()
            }
            IoOp::Flush | IoOp::Fallocate { .. } => 0,
        }
    }
}

// SAFETY: the raw iovec pointers in an IoOp point into guest memory that the
// submitter keeps mapped until the completion is reaped (the submit()
// contract); an op is owned and used by one thread at a time, so sending it
// to another thread (the worker that owns the engine, or a pool thread)
// creates no concurrent access through them.
unsafe impl Send for IoOp {}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The token given to `submit`.
    pub token: u64,
    /// Ok when the whole operation succeeded, else the error.
    pub result: io::Result<()>,
}

/// A storage engine bound to one file, used by one queue.
pub enum IoEngine {
    /// io_uring.
    IoUring(Box<UringEngine>),
    /// Thread pool.
    ThreadPool(ThreadPoolEngine),
}

impl IoEngine {
    /// Create an engine of `kind` for `file`, able to hold `depth`
    /// operations in flight without queueing in user space.
    pub fn new(kind: EngineKind, file: Arc<File>, depth: u32) -> io::Result<IoEngine> {
        Ok(match kind {
            EngineKind::IoUring => IoEngine::IoUring(Box::new(UringEngine::new(file, depth)?)),
            EngineKind::ThreadPool => IoEngine::ThreadPool(ThreadPoolEngine::new(file, 4)?),
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> EngineKind {
        match self {
            IoEngine::IoUring(_) => EngineKind::IoUring,
            IoEngine::ThreadPool(_) => EngineKind::ThreadPool,
        }
    }

    /// Queue `op`; it may not be handed to the kernel until [`Self::flush`].
    ///
    /// # Safety
    /// Every iovec in `op` must point into memory that stays mapped and is
    /// not otherwise accessed in conflicting ways until the completion for
    /// `token` has been returned by [`Self::reap`] (or the engine dropped,
    /// which waits for outstanding operations).
    pub unsafe fn submit(&mut self, token: u64, op: IoOp) {
        match self {
            // SAFETY: the caller's contract is forwarded unchanged.
            IoEngine::IoUring(engine) => unsafe { engine.submit(token, op) },
            // SAFETY: the caller's contract is forwarded unchanged.
            IoEngine::ThreadPool(engine) => unsafe { engine.submit(token, op) },
        }
    }

    /// Hand queued operations to the kernel (or the worker threads).
    pub fn flush(&mut self) {
        match self {
            IoEngine::IoUring(engine) => engine.flush(),
            IoEngine::ThreadPool(_) => {}
        }
    }

    /// Move finished operations into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        match self {
            IoEngine::IoUring(engine) => engine.reap(out),
            IoEngine::ThreadPool(engine) => engine.reap(out),
        }
    }

    /// Whether finished operations are waiting to be reaped (for polling).
    pub fn has_completions(&mut self) -> bool {
        match self {
            IoEngine::IoUring(engine) => engine.has_completions(),
            IoEngine::ThreadPool(engine) => engine.has_completions(),
        }
    }

    /// An eventfd that becomes readable when completions may be waiting.
    /// The caller drains it (read 8 bytes) before reaping.
    pub fn completion_fd(&self) -> RawFd {
        match self {
            IoEngine::IoUring(engine) => engine.completion_fd(),
            IoEngine::ThreadPool(engine) => engine.completion_fd(),
        }
    }
}

/// Advance `iovecs` past `done` bytes (after a short transfer).
pub(crate) fn advance_iovecs(iovecs: &mut Vec<libc::iovec>, mut done: usize) {
    let mut consumed = 0;
    for iov in iovecs.iter_mut() {
        if done < iov.iov_len {
            // iov_base + done stays within the same buffer (done < iov_len).
            iov.iov_base = (iov.iov_base as usize + done) as *mut libc::c_void;
            iov.iov_len -= done;
            break;
        }
        done -= iov.iov_len;
        consumed += 1;
    }
    iovecs.drain(..consumed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_iovecs_skips_whole_and_partial_buffers() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut iovecs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        advance_iovecs(&mut iovecs, 10);
        assert_eq!(iovecs.len(), 1);
        assert_eq!(iovecs[0].iov_len, 6);
        assert_eq!(iovecs[0].iov_base as usize, b.as_ptr() as usize + 2);
    }
}
