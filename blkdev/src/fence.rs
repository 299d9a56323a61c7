//! The write fence of an in-flight handoff.
//!
//! When a migration source stops without draining, storage operations it
//! had already submitted keep running and land whenever the storage gets to
//! them. The destination resubmits those requests from the inflight region.
//! A resubmitted write that completes on the destination, followed by a
//! newer guest write to the same blocks, could be overwritten by the
//! source's stale copy landing late. The fence prevents it: the destination
//! resubmits reads at once but holds resubmitted writes, flushes, discards
//! and write-zeroes until the source's abandoned operations are known to
//! have finished.
//!
//! How the destination learns that ([`FenceMode`]):
//! * `lock`: the source holds an OFD write lock on a file next to the image
//!   (`<image>.fence`, on the same shared storage) while it has abandoned
//!   operations outstanding; the destination waits for a read lock on it.
//! * `api`: an orchestrator calls the control API (`fence-release`).
//! * `none`: nothing is held. Unsafe; for experiments only.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

pub use crate::config::FenceMode;

/// The lock file the `lock` fence uses for `image`.
pub fn lock_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".fence");
    PathBuf::from(name)
}

/// A disk's write fence: the destination-side gate and the source-side
/// record of abandoned operations. Shared by the disk's queues, its
/// protocol handler and the control API.
#[derive(Debug)]
pub struct Fence {
    mode: FenceMode,
    lock_path: PathBuf,
    /// Held writes may go.
    open: AtomicBool,
    /// A thread is waiting for the source's lock.
    waiting: AtomicBool,
    /// Wakes the queues' event loops when the gate opens.
    wakers: Mutex<Vec<Weak<EventFd>>>,
    source: Mutex<SourceState>,
    abandoned_total: AtomicU64,
}

#[derive(Debug, Default)]
struct SourceState {
    /// Abandoned operations that may still modify the image.
    outstanding: u64,
    /// The lock file, opened ahead of time (see [`Fence::prepare`]) and
    /// kept open, so a suspend only takes the lock.
    file: Option<File>,
    /// The file is locked (lock mode, `outstanding > 0`).
    locked: bool,
}

impl Fence {
    /// A fence for the disk backed by `image`. The gate starts open, except
    /// in `api` mode, where only the control API opens it.
    pub fn new(mode: FenceMode, image: &Path) -> Arc<Fence> {
        Arc::new(Fence {
            mode,
            lock_path: lock_path(image),
            open: AtomicBool::new(mode != FenceMode::Api),
            waiting: AtomicBool::new(false),
            wakers: Mutex::new(Vec::new()),
            source: Mutex::new(SourceState::default()),
            abandoned_total: AtomicU64::new(0),
        })
    }

    /// The configured mode.
    pub fn mode(&self) -> FenceMode {
        self.mode
    }

    /// The lock file (used in `lock` mode).
    pub fn lock_file(&self) -> &Path {
        &self.lock_path
    }

    /// Whether held writes may go now.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Wake `waker` when the gate opens (a queue's event loop).
    pub fn add_waker(&self, waker: &Arc<EventFd>) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(waker));
    }

    /// A new front-end session begins. In `api` mode the gate closes again:
    /// each handoff needs its own release.
    pub fn new_session(&self) {
        if self.mode == FenceMode::Api {
            self.open.store(false, Ordering::Release);
        }
    }

    /// A queue resubmits writes: make sure the gate reflects the source.
    /// In `lock` mode this closes the gate and starts a thread that opens
    /// it once the source's lock is free (at once when there is none).
    pub fn arm(self: &Arc<Self>) {
        if self.mode != FenceMode::Lock || self.waiting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.open.store(false, Ordering::Release);
        let fence = self.clone();
        let spawned = std::thread::Builder::new()
            .name("fence-wait".to_string())
            .spawn(move || {
                fence.wait_for_source();
                fence.waiting.store(false, Ordering::Release);
                fence.release("the source's lock is free");
            });
        if let Err(e) = spawned {
            // Without the thread nothing would ever open the gate; waiting
            // here instead is slower but still safe.
            log::error!("cannot start the fence waiter ({e}); waiting inline");
            self.wait_for_source();
            self.waiting.store(false, Ordering::Release);
            self.release("the source's lock is free");
        }
    }

    fn wait_for_source(&self) {
        let path = &self.lock_path;
        let mut reported = false;
        loop {
            match acquire_shared(path) {
                Ok(()) => return,
                Err(e) => {
                    if !reported {
                        log::error!(
                            "fence: cannot check {} ({e}); holding resubmitted writes and retrying",
                            path.display()
                        );
                        reported = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Open the gate: held writes go. `why` is logged.
    pub fn release(&self, why: &str) {
        if self.open.swap(true, Ordering::AcqRel) {
            return;
        }
        log::info!("write fence released: {why}");
        let wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for waker in wakers.iter().filter_map(Weak::upgrade) {
            if let Err(e) = waker.write(1) {
                log::error!("fence: cannot wake a queue: {e}");
            }
        }
    }

    /// Source side: a queue stopped without draining and left `count`
    /// operations that may still modify the image. In `lock` mode the lock
    /// is taken before this returns, i.e. before the front-end learns the
    /// queue stopped. It does not log (it is on that critical path).
    pub fn abandon(&self, count: u64) -> io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.abandoned_total.fetch_add(count, Ordering::Relaxed);
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        source.outstanding += count;
        if self.mode == FenceMode::Lock && !source.locked {
            if source.file.is_none() {
                source.file = Some(open_lock_file(&self.lock_path)?);
            }
            let file = source.file.as_ref().expect("opened above");
            ofd_lock(file, libc::F_WRLCK as libc::c_short, true)?;
            source.locked = true;
        }
        Ok(())
    }

    /// Source side, `lock` mode: run `f` with the descriptor of the lock
    /// file while its lock is held (None otherwise). `f` runs under the
    /// fence's lock, so the descriptor stays open meanwhile.
    pub fn with_held_lock<R>(&self, f: impl FnOnce(RawFd) -> R) -> Option<R> {
        let source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        match (&source.file, source.locked) {
            (Some(file), true) => Some(f(file.as_raw_fd())),
            _ => None,
        }
    }

    /// Source side: one abandoned operation finished.
    pub fn abandoned_done(&self) {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        source.outstanding = source.outstanding.saturating_sub(1);
        if source.outstanding == 0 && source.locked {
            source.locked = false;
            let file = source.file.take().expect("a locked file is open");
            match ofd_lock(&file, libc::F_UNLCK as libc::c_short, false) {
                Ok(()) => source.file = Some(file),
                // Closing the only descriptor of the open file description
                // releases its OFD lock too.
                Err(e) => log::warn!("fence: unlocking failed ({e}); closing the lock file"),
            }
            log::info!(
                "fence: abandoned operations finished; released {}",
                self.lock_path.display()
            );
        }
    }

    /// The front-end negotiated suspending: open (creating) the lock file
    /// now, off the critical path of a later suspend. A failure is logged
    /// and retried at the suspend.
    pub fn prepare(&self) {
        if self.mode != FenceMode::Lock {
            return;
        }
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        if source.file.is_none() {
            match open_lock_file(&self.lock_path) {
                Ok(file) => source.file = Some(file),
                Err(e) => log::warn!(
                    "fence: cannot open {} ahead of a suspend: {e}",
                    self.lock_path.display()
                ),
            }
        }
    }

    /// Abandoned operations still outstanding on this (source) side.
    pub fn abandoned_outstanding(&self) -> u64 {
        self.source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .outstanding
    }

    /// Operations abandoned since start.
    pub fn abandoned_total(&self) -> u64 {
        self.abandoned_total.load(Ordering::Relaxed)
    }
}

fn ofd_lock(file: &File, kind: libc::c_short, wait: bool) -> io::Result<()> {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = l_len = 0: the whole file; l_pid must be 0 for OFD locks.
    let command = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: fcntl on a valid fd with a pointer to an initialised flock
        // that outlives the call.
        if unsafe { libc::fcntl(file.as_raw_fd(), command, &lock) } == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Open the lock file for the source's write lock, creating it. (Taking
/// the lock may block briefly if a destination holds its read lock.)
fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Wait until no source holds the lock (a missing file means none ever did).
fn acquire_shared(path: &Path) -> io::Result<()> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    ofd_lock(&file, libc::F_RDLCK as libc::c_short, true)
    // Dropping the file releases the read lock.
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        (dir, path)
    }

    #[test]
    fn lock_gate_opens_at_once_without_a_source() {
        let (_dir, path) = image();
        let fence = Fence::new(FenceMode::Lock, &path);
        let waker = Arc::new(EventFd::new(0).unwrap());
        fence.add_waker(&waker);
        fence.arm();
        let start = Instant::now();
        while !fence.is_open() {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(waker.read().unwrap(), 1, "queues are woken");
    }

    #[test]
    fn lock_gate_waits_for_the_source() {
        let (_dir, path) = image();
        let source = Fence::new(FenceMode::Lock, &path);
        let destination = Fence::new(FenceMode::Lock, &path);
        source.abandon(2).unwrap();
        assert!(lock_path(&path).exists());
        destination.arm();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!destination.is_open(), "held while the source has work");
        source.abandoned_done();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!destination.is_open(), "one operation is still outstanding");
        source.abandoned_done();
        let start = Instant::now();
        while !destination.is_open() {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(source.abandoned_total(), 2);
        assert_eq!(source.abandoned_outstanding(), 0);
        // The lock file stays open for the next handoff, unlocked.
        source.prepare();
        source.abandon(1).unwrap();
        destination.arm();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!destination.is_open(), "a second handoff holds again");
        source.abandoned_done();
        let start = Instant::now();
        while !destination.is_open() {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn api_gate_opens_only_by_release_and_closes_per_session() {
        let (_dir, path) = image();
        let fence = Fence::new(FenceMode::Api, &path);
        fence.arm();
        assert!(!fence.is_open());
        fence.release("test");
        assert!(fence.is_open());
        fence.new_session();
        assert!(!fence.is_open());
        // No lock file is involved.
        fence.abandon(1).unwrap();
        assert!(!lock_path(&path).exists());
    }

    #[test]
    fn none_never_holds() {
        let (_dir, path) = image();
        let fence = Fence::new(FenceMode::None, &path);
        fence.arm();
        fence.new_session();
        assert!(fence.is_open());
    }
}
