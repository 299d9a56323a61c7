//! Asynchronous storage I/O: submit operations tagged with a token, learn of
//! completions through an eventfd, reap them in batches.
//!
//! Two implementations behind one enum: io_uring (preferred) and a thread
//! pool for kernels or sandboxes where io_uring is unavailable. The choice is
//! made once per disk by [`EngineKind::probe`] and logged by the caller.
//!
//! For experiments and tests, an engine can add a fixed latency in front of
//! every operation ([`IoEngine::with_latency`]): the operation starts on
//! storage only that long after it was submitted, and many delays run in
//! parallel, as on a slow but deep storage back-end.

mod pool;
mod uring;

use std::fs::File;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::Duration;

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
        Self::with_latency(kind, file, depth, Duration::ZERO)
    }

    /// As [`Self::new`], with `latency` added in front of every operation,
    /// for experiments and tests: each read, write, flush and fallocate
    /// starts on storage only `latency` after [`Self::submit`] (so a write's
    /// data reaches the file that late) and completes after that. Delays of
    /// many operations overlap rather than add up. `Duration::ZERO` is
    /// exactly [`Self::new`]. Dropping the engine still waits for every
    /// outstanding operation, delay included.
    pub fn with_latency(
        kind: EngineKind,
        file: Arc<File>,
        depth: u32,
        latency: Duration,
    ) -> io::Result<IoEngine> {
        Ok(match kind {
            EngineKind::IoUring => {
                IoEngine::IoUring(Box::new(UringEngine::with_latency(file, depth, latency)?))
            }
            // With a latency the wait happens on the pool's scheduler thread,
            // so four workers are enough for any number of delayed ops.
            EngineKind::ThreadPool => {
                IoEngine::ThreadPool(ThreadPoolEngine::with_latency(file, 4, latency)?)
            }
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

    /// Keep the open file description behind `fd` (e.g. the write fence's
    /// lock file, whose OFD lock lives exactly as long as the description)
    /// alive until every operation handed to the kernel so far has
    /// finished, even if this process dies first.
    ///
    /// Why: a process killed with SIGKILL closes its descriptors at once,
    /// but io_uring operations already in the kernel (an O_DIRECT write
    /// queued in the block layer, say) complete later, from the ring's
    /// teardown. Holding the description in the ring's fixed-file table ties
    /// its lifetime to that teardown. The thread pool needs nothing: a
    /// killed process is not gone, and its descriptors not closed, until
    /// every thread has returned from its system call.
    pub fn hold_file_while_busy(&mut self, fd: RawFd) -> io::Result<()> {
        match self {
            IoEngine::IoUring(engine) => engine.hold_file_while_busy(fd),
            IoEngine::ThreadPool(_) => Ok(()),
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
    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    use super::*;

    const LATENCY: Duration = Duration::from_millis(50);
    const BLOCK: usize = 4096;

    fn engines() -> Vec<EngineKind> {
        let mut kinds = vec![EngineKind::ThreadPool];
        if EngineKind::probe().0 == EngineKind::IoUring {
            kinds.push(EngineKind::IoUring);
        }
        kinds
    }

    /// A zeroed image of `blocks` blocks and a read-write handle on it.
    fn image(blocks: usize) -> (tempfile::NamedTempFile, Arc<File>) {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len((blocks * BLOCK) as u64).unwrap();
        let file = Arc::new(image.reopen().unwrap());
        (image, file)
    }

    /// One block of `byte`, the source of a write.
    fn pattern(byte: u8) -> Vec<u8> {
        vec![byte; BLOCK]
    }

    fn write_op(block: usize, data: &[u8]) -> IoOp {
        IoOp::Write {
            offset: (block * BLOCK) as u64,
            iovecs: vec![libc::iovec {
                iov_base: data.as_ptr().cast_mut().cast(),
                iov_len: data.len(),
            }],
            dsync: false,
        }
    }

    fn read_block(image: &tempfile::NamedTempFile, block: usize) -> Vec<u8> {
        let mut data = vec![0u8; BLOCK];
        image
            .as_file()
            .read_exact_at(&mut data, (block * BLOCK) as u64)
            .unwrap();
        data
    }

    /// Reap until `count` completions arrived or `timeout` passed, sleeping
    /// on the completion eventfd in between. Each completion comes with the
    /// time it was seen (never earlier than it happened).
    fn wait_for(
        engine: &mut IoEngine,
        count: usize,
        timeout: Duration,
    ) -> Vec<(Completion, Instant)> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut batch = Vec::new();
        loop {
            engine.reap(&mut batch);
            let now = Instant::now();
            seen.extend(batch.drain(..).map(|completion| (completion, now)));
            let Some(remaining) = deadline.checked_duration_since(now) else {
                return seen;
            };
            if seen.len() >= count || remaining.is_zero() {
                return seen;
            }
            let mut pollfd = libc::pollfd {
                fd: engine.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout_ms = i32::try_from(remaining.as_millis() + 1).unwrap_or(i32::MAX);
            // SAFETY: one pollfd, a local that outlives the call. EINTR
            // (io_uring task work) just loops.
            unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
            let mut value = 0u64;
            // SAFETY: reads at most 8 bytes into `value`, a local u64; the
            // eventfd is non-blocking and open while `engine` lives.
            unsafe { libc::read(pollfd.fd, (&raw mut value).cast(), 8) };
        }
    }

    #[test]
    fn latency_delays_many_writes_in_parallel_not_in_series() {
        const WRITES: usize = 64;
        for kind in engines() {
            let (image, file) = image(WRITES);
            // Declared before the engine, so dropped after it.
            let sources: Vec<Vec<u8>> = (1..=WRITES as u8).map(pattern).collect();
            let mut engine = IoEngine::with_latency(kind, file, WRITES as u32, LATENCY).unwrap();
            let start = Instant::now();
            let mut submitted = Vec::new();
            for (block, data) in sources.iter().enumerate() {
                submitted.push(Instant::now());
                // SAFETY: `sources` outlives the engine, whose drop waits for
                // outstanding operations; nothing writes to it meanwhile.
                unsafe { engine.submit(block as u64, write_op(block, data)) };
            }
            engine.flush();
            let completions = wait_for(&mut engine, WRITES, Duration::from_secs(10));
            let elapsed = start.elapsed();
            assert_eq!(completions.len(), WRITES, "{kind:?}");
            // The delays run side by side: in series they would take at
            // least WRITES x LATENCY (3.2 s), which no load makes shorter.
            let serial = LATENCY * WRITES as u32;
            assert!(elapsed < serial, "{kind:?}: {elapsed:?}");
            for (completion, seen) in &completions {
                let block = completion.token as usize;
                assert!(completion.result.is_ok(), "{kind:?}: {completion:?}");
                let waited = seen.duration_since(submitted[block]);
                assert!(
                    waited >= LATENCY,
                    "{kind:?}: write {block} after {waited:?}"
                );
                assert_eq!(read_block(&image, block), sources[block], "{kind:?}");
            }
        }
    }

    #[test]
    fn delayed_write_lands_only_after_the_latency() {
        for kind in engines() {
            let (image, file) = image(1);
            let source = pattern(0xa5);
            let mut engine = IoEngine::with_latency(kind, file, 8, LATENCY).unwrap();
            let submitted = Instant::now();
            // SAFETY: `source` outlives the engine, whose drop waits for
            // outstanding operations; nothing writes to it meanwhile.
            unsafe { engine.submit(0, write_op(0, &source)) };
            engine.flush();

            let early = wait_for(&mut engine, 1, Duration::from_millis(20));
            let data = read_block(&image, 0);
            // Read before the clock, so data seen with less than the latency
            // elapsed really was there too early (a loaded machine may take
            // us past the latency, which proves nothing either way).
            if submitted.elapsed() < LATENCY {
                assert!(early.is_empty(), "{kind:?}: completed early");
                assert_eq!(data, vec![0; BLOCK], "{kind:?}: data landed early");
            }

            let completions = wait_for(&mut engine, 1, Duration::from_secs(10));
            let (completion, seen) = early.into_iter().chain(completions).next().unwrap();
            assert!(completion.result.is_ok(), "{kind:?}: {completion:?}");
            assert!(seen.duration_since(submitted) >= LATENCY, "{kind:?}");
            assert_eq!(read_block(&image, 0), source, "{kind:?}");
        }
    }

    #[test]
    fn every_kind_of_operation_is_delayed() {
        for kind in engines() {
            let (image, file) = image(2);
            let mut destination = vec![0u8; BLOCK];
            let mut engine = IoEngine::with_latency(kind, file, 8, LATENCY).unwrap();
            image.as_file().write_all_at(&pattern(7), 0).unwrap();
            let ops = [
                IoOp::Read {
                    offset: 0,
                    iovecs: vec![libc::iovec {
                        iov_base: destination.as_mut_ptr().cast(),
                        iov_len: BLOCK,
                    }],
                },
                IoOp::Flush,
                IoOp::Fallocate {
                    offset: BLOCK as u64,
                    len: BLOCK as u64,
                    mode: 0,
                },
            ];
            let submitted = Instant::now();
            for (token, op) in ops.into_iter().enumerate() {
                // SAFETY: `destination` lives until after the completions
                // are reaped below (or the engine's drop waited for them).
                unsafe { engine.submit(token as u64, op) };
            }
            engine.flush();
            let completions = wait_for(&mut engine, 3, Duration::from_secs(10));
            assert_eq!(completions.len(), 3, "{kind:?}");
            for (completion, seen) in &completions {
                assert!(completion.result.is_ok(), "{kind:?}: {completion:?}");
                let waited = seen.duration_since(submitted);
                assert!(
                    waited >= LATENCY,
                    "{kind:?}: op {} after {waited:?}",
                    completion.token
                );
            }
            drop(engine);
            assert_eq!(destination, pattern(7), "{kind:?}");
        }
    }

    #[test]
    fn regression_delayed_cached_read_signals_the_completion_fd() {
        // The timer starts the read from task work on this thread, where a
        // cached read completes at once: an io_uring eventfd registered as
        // "async only" (io-wq) never fired for it, and a caller sleeping on
        // the completion fd slept until something else woke it.
        for kind in engines() {
            let (image, file) = image(1);
            image.as_file().write_all_at(&pattern(9), 0).unwrap();
            let mut destination = vec![0u8; BLOCK];
            let mut engine = IoEngine::with_latency(kind, file, 8, LATENCY).unwrap();
            let read = IoOp::Read {
                offset: 0,
                iovecs: vec![libc::iovec {
                    iov_base: destination.as_mut_ptr().cast(),
                    iov_len: BLOCK,
                }],
            };
            let submitted = Instant::now();
            // SAFETY: `destination` is read only after the engine is dropped,
            // which waits for outstanding operations.
            unsafe { engine.submit(0, read) };
            engine.flush();
            // The completion fd becomes readable for it (an event, not a
            // deadline: before the fix nothing signalled it and this poll
            // ran into its timeout).
            let mut pollfd = libc::pollfd {
                fd: engine.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, a local that outlives the call.
            let ready = unsafe { libc::poll(&mut pollfd, 1, 30_000) };
            assert_eq!(ready, 1, "{kind:?}: the completion fd never fired");
            assert!(pollfd.revents & libc::POLLIN != 0, "{kind:?}");
            assert!(submitted.elapsed() >= LATENCY, "{kind:?}: not delayed");
            let completions = wait_for(&mut engine, 1, Duration::from_secs(10));
            assert_eq!(completions.len(), 1, "{kind:?}");
            drop(engine);
            assert_eq!(destination, pattern(9), "{kind:?}");
        }
    }

    #[test]
    fn dropping_the_engine_waits_for_a_delayed_write() {
        for kind in engines() {
            let (image, file) = image(1);
            let source = pattern(0x3c);
            let mut engine = IoEngine::with_latency(kind, file, 8, LATENCY).unwrap();
            let submitted = Instant::now();
            // SAFETY: `source` outlives the engine, whose drop waits for
            // outstanding operations; nothing writes to it meanwhile.
            unsafe { engine.submit(0, write_op(0, &source)) };
            engine.flush();
            drop(engine);
            // The abandoned write landed, late, before drop returned.
            assert!(submitted.elapsed() >= LATENCY, "{kind:?}");
            assert_eq!(read_block(&image, 0), source, "{kind:?}");
        }
    }

    /// Whether someone holds an OFD write lock on `path` (asked through a
    /// description of our own, so our locks do not hide theirs).
    fn write_locked(path: &std::path::Path) -> bool {
        use std::os::unix::io::AsRawFd;
        let probe = File::open(path).unwrap();
        // SAFETY: flock is plain data; all-zero is a valid value.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_RDLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: fcntl on an open fd with a pointer to a flock that lives
        // across the call.
        let rc = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
        assert_eq!(rc, 0, "F_OFD_GETLK: {}", io::Error::last_os_error());
        lock.l_type == libc::F_WRLCK as libc::c_short
    }

    /// Regression: a migration source killed with SIGKILL right after a
    /// suspend closed its write-fence lock file at once, so the OFD lock
    /// was gone (and a destination wrote) while io_uring still had its
    /// abandoned O_DIRECT writes in the kernel (seen with a throttled
    /// block device: the lock was free 1 ms after the kill, the write
    /// landed 4 s later). A held file's description, and its lock, must
    /// live as long as the ring does, whatever happens to our descriptor.
    #[test]
    fn regression_a_held_file_keeps_its_ofd_lock_until_the_engine_is_gone() {
        use std::os::unix::io::AsRawFd;
        for kind in engines() {
            let (_image, file) = image(1);
            let dir = tempfile::tempdir().unwrap();
            let lock_path = dir.path().join("disk.img.fence");
            let lock_file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path)
                .unwrap();
            // SAFETY: as in write_locked().
            let mut lock: libc::flock = unsafe { std::mem::zeroed() };
            lock.l_type = libc::F_WRLCK as libc::c_short;
            lock.l_whence = libc::SEEK_SET as libc::c_short;
            // SAFETY: as in write_locked().
            let rc = unsafe { libc::fcntl(lock_file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
            assert_eq!(rc, 0, "{kind:?}: F_OFD_SETLK");
            let mut engine = IoEngine::new(kind, file, 8).unwrap();
            engine.hold_file_while_busy(lock_file.as_raw_fd()).unwrap();
            // What SIGKILL does to the process's own descriptor.
            drop(lock_file);
            match kind {
                EngineKind::IoUring => {
                    assert!(write_locked(&lock_path), "the ring keeps the lock");
                    drop(engine);
                    // The kernel frees a closed ring from a work queue.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while write_locked(&lock_path) {
                        assert!(Instant::now() < deadline, "the lock must go with the ring");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                // The pool holds nothing: its threads keep the process (and
                // so its descriptors) alive themselves.
                EngineKind::ThreadPool => assert!(!write_locked(&lock_path)),
            }
        }
    }

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
