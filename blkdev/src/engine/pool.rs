//! Thread-pool engine: blocking preadv2/pwritev2/fdatasync/fallocate on a few
//! worker threads. The fallback where io_uring cannot be used.
//!
//! With an added latency, submitted jobs first go to one scheduler thread,
//! which hands each to the workers when its deadline comes. Sleeping on a
//! worker instead would serialise the delays: four workers could hold only
//! four operations in their wait at a time.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{advance_iovecs, Completion, IoOp};

struct Job {
    token: u64,
    op: IoOp,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wakeup: Condvar,
    completions: Mutex<Vec<Completion>>,
    eventfd: EventFd,
    file: Arc<File>,
}

/// A job waiting for its deadline in the scheduler.
struct Delayed {
    deadline: Instant,
    job: Job,
}

/// Jobs waiting in the scheduler. Every job waits the same latency and
/// submit() takes `&mut self`, so deadlines arrive in non-decreasing order
/// (Instant is monotonic): first in, first due, and a FIFO is ordered by
/// deadline without a heap.
#[derive(Default)]
struct DelayQueue {
    jobs: VecDeque<Delayed>,
    shutdown: bool,
}

struct DelayShared {
    queue: Mutex<DelayQueue>,
    wakeup: Condvar,
}

/// The scheduler thread of an engine with an added latency.
struct DelayLine {
    latency: Duration,
    shared: Arc<DelayShared>,
    thread: JoinHandle<()>,
}

/// Thread-pool engine; see the module docs.
pub struct ThreadPoolEngine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Present when operations start only after an added latency.
    delay: Option<DelayLine>,
}

impl ThreadPoolEngine {
    /// Start `threads` workers for `file`.
    pub fn new(file: Arc<File>, threads: usize) -> io::Result<ThreadPoolEngine> {
        Self::with_latency(file, threads, Duration::ZERO)
    }

    /// As [`Self::new`], but every operation starts on storage only
    /// `latency` after it was submitted (see the module docs).
    pub fn with_latency(
        file: Arc<File>,
        threads: usize,
        latency: Duration,
    ) -> io::Result<ThreadPoolEngine> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wakeup: Condvar::new(),
            completions: Mutex::new(Vec::new()),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
            file,
        });
        let mut handles = Vec::with_capacity(threads);
        for index in 0..threads {
            let shared = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("blk-io-{index}"))
                    .spawn(move || worker(&shared))?,
            );
        }
        let mut engine = ThreadPoolEngine {
            shared,
            threads: handles,
            delay: None,
        };
        if !latency.is_zero() {
            let delay = Arc::new(DelayShared {
                queue: Mutex::new(DelayQueue::default()),
                wakeup: Condvar::new(),
            });
            let (scheduler_delay, scheduler_shared) = (delay.clone(), engine.shared.clone());
            // On failure `engine` is dropped, which stops the workers.
            let thread = std::thread::Builder::new()
                .name("blk-io-delay".to_string())
                .spawn(move || scheduler(&scheduler_delay, &scheduler_shared))?;
            engine.delay = Some(DelayLine {
                latency,
                shared: delay,
                thread,
            });
        }
        Ok(engine)
    }

    /// See [`super::IoEngine::submit`].
    ///
    /// # Safety
    /// As for [`super::IoEngine::submit`].
    pub unsafe fn submit(&mut self, token: u64, op: IoOp) {
        let job = Job { token, op };
        if let Some(delay) = &self.delay {
            let deadline = Instant::now() + delay.latency;
            lock(&delay.shared.queue)
                .jobs
                .push_back(Delayed { deadline, job });
            delay.shared.wakeup.notify_one();
            return;
        }
        lock(&self.shared.queue).jobs.push_back(job);
        self.shared.wakeup.notify_one();
    }

    /// Collect finished operations.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut lock(&self.shared.completions));
    }

    /// Whether workers finished jobs not yet reaped.
    pub fn has_completions(&self) -> bool {
        !lock(&self.shared.completions).is_empty()
    }

    /// The completion eventfd.
    pub fn completion_fd(&self) -> RawFd {
        self.shared.eventfd.as_raw_fd()
    }
}

impl Drop for ThreadPoolEngine {
    fn drop(&mut self) {
        // Workers finish every queued job before they exit: the jobs point
        // into guest memory that our owner unmaps after we are gone. Delayed
        // jobs still wait for their deadline (an abandoned write lands late,
        // as it would on slow storage): the scheduler exits only once it has
        // handed over its last job, and the workers are told to stop after.
        if let Some(delay) = self.delay.take() {
            lock(&delay.shared.queue).shutdown = true;
            delay.shared.wakeup.notify_one();
            let _ = delay.thread.join();
        }
        lock(&self.shared.queue).shutdown = true;
        self.shared.wakeup.notify_all();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Lock, recovering from a poisoned mutex (a panicking worker must not take
/// the whole queue down with it; the data stays consistent because every
/// critical section is a single push or take).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Hand each delayed job to the workers when its deadline comes; return on
/// shutdown once none is left.
fn scheduler(delay: &DelayShared, shared: &Shared) {
    let mut queue = lock(&delay.queue);
    loop {
        let now = Instant::now();
        let Some(first) = queue.jobs.front() else {
            if queue.shutdown {
                return;
            }
            queue = delay.wakeup.wait(queue).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        if first.deadline > now {
            let wait = first.deadline - now;
            queue = match delay.wakeup.wait_timeout(queue, wait) {
                Ok((queue, _)) => queue,
                Err(poisoned) => poisoned.into_inner().0,
            };
            continue;
        }
        // Deadlines are in order: take every job that is due in one go.
        let due = queue.jobs.iter().take_while(|d| d.deadline <= now).count();
        let jobs: Vec<Job> = queue.jobs.drain(..due).map(|d| d.job).collect();
        drop(queue);
        lock(&shared.queue).jobs.extend(jobs);
        if due == 1 {
            shared.wakeup.notify_one();
        } else {
            shared.wakeup.notify_all();
        }
        queue = lock(&delay.queue);
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut queue = lock(&shared.queue);
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.shutdown {
                    return;
                }
                queue = shared.wakeup.wait(queue).unwrap_or_else(|p| p.into_inner());
            }
        };
        let result = execute(shared.file.as_raw_fd(), job.op);
        lock(&shared.completions).push(Completion {
            token: job.token,
            result,
        });
        if let Err(e) = shared.eventfd.write(1) {
            log::error!("thread-pool engine cannot signal completion: {e}");
        }
    }
}

fn execute(fd: RawFd, op: IoOp) -> io::Result<()> {
    match op {
        IoOp::Read { offset, iovecs } => transfer(fd, offset, iovecs, 0, false),
        IoOp::Write {
            offset,
            iovecs,
            dsync,
        } => transfer(
            fd,
            offset,
            iovecs,
            if dsync { libc::RWF_DSYNC } else { 0 },
            true,
        ),
        IoOp::Flush => {
            // SAFETY: fdatasync on an fd we keep open; no memory involved.
            check(unsafe { libc::fdatasync(fd) }).map(|_| ())
        }
        IoOp::Fallocate { offset, len, mode } => {
            let offset =
                i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: fallocate on an fd we keep open; no memory involved.
            check(unsafe { libc::fallocate(fd, mode, offset, len) }).map(|_| ())
        }
    }
}

fn transfer(
    fd: RawFd,
    mut offset: u64,
    mut iovecs: Vec<libc::iovec>,
    flags: i32,
    write: bool,
) -> io::Result<()> {
    while !iovecs.is_empty() {
        let file_offset =
            i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let count = iovecs.len().min(libc::UIO_MAXIOV as usize) as i32;
        // SAFETY: the iovecs describe guest buffers kept mapped by the
        // submit() contract; `count` does not exceed the array length.
        let ret = unsafe {
            if write {
                libc::pwritev2(fd, iovecs.as_ptr(), count, file_offset, flags)
            } else {
                libc::preadv2(fd, iovecs.as_ptr(), count, file_offset, flags)
            }
        };
        let done = match check(ret as i32) {
            Ok(_) => ret as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if done == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short transfer at end of image",
            ));
        }
        offset += done as u64;
        advance_iovecs(&mut iovecs, done);
    }
    Ok(())
}

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
