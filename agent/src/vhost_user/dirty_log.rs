//! Dirty page logging for live migration (vhost-user "Migration" section):
//! the front-end shares a bitmap (SET_LOG_BASE) with one bit per 4 KiB page
//! of guest physical memory, and while VHOST_F_LOG_ALL is acked the back-end
//! sets the bit of every page it writes.
//!
//! Logging is a property of the memory type: guest RAM is a
//! `GuestMemoryMmap<LogBitmap>`, so every write made through vm-memory
//! (status bytes, used ring, GET_ID) is logged without anyone remembering
//! to; the writes that bypass it (io_uring reads into guest buffers) go
//! through `BlkQueue`'s one `mark_dirty` function.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};

/// Bytes of guest memory per log bit.
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// The front-end's log region, mapped shared and writable.
#[derive(Debug)]
pub struct LogRegion {
    addr: *const AtomicU8,
    len: usize,
}

// SAFETY: the mapping is valid for `len` bytes until Drop and is only ever
// accessed through `AtomicU8` operations, which are safe to perform from
// any thread concurrently (the front-end reads and clears it concurrently
// too, which is what the atomics are for).
unsafe impl Send for LogRegion {}
// SAFETY: as for Send: all access goes through atomics.
unsafe impl Sync for LogRegion {}

impl LogRegion {
    /// Map `size` bytes of `file` from `offset` (SET_LOG_BASE's
    /// mmap_size/mmap_offset). The fd must be a memfd sealed against
    /// shrinking whose size covers the range ([`shm::check()`]): a log that
    /// lies about its size, or that can be truncated later, would raise
    /// SIGBUS at the first logged write.
    pub fn map(file: &File, size: u64, offset: u64) -> Result<LogRegion, shm::ShmError> {
        let purpose = shm::Purpose::DirtyLog;
        shm::check(file, purpose, offset, size)?;
        let range = shm::check::range(purpose, offset, size)?;
        // SAFETY: a fresh shared mapping of an fd we hold open for the call;
        // no existing memory is affected. The result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                range.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                range.offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(shm::ShmError::Map {
                purpose,
                offset,
                size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(LogRegion {
            addr: addr.cast(),
            len: range.len,
        })
    }

    fn byte(&self, page: u64) -> Option<&AtomicU8> {
        let index = usize::try_from(page / 8).ok().filter(|&i| i < self.len)?;
        // SAFETY: `index < len`, and the mapping is valid for `len` bytes
        // while `self` lives; AtomicU8 has the layout of u8.
        Some(unsafe { &*self.addr.add(index) })
    }

    /// Set the bits of every page in `[gpa, gpa + len)`. Pages beyond the
    /// log are ignored: the front-end sized it for the memory it migrates.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        for page in first..=last {
            match self.byte(page) {
                Some(byte) => {
                    byte.fetch_or(1 << (page % 8), Ordering::Relaxed);
                }
                None => break,
            }
        }
    }

    /// Where the agent mapped the log: the address a kernel datapath that
    /// logs its own writes (vhost-net's VHOST_SET_LOG_BASE) takes.
    pub fn host_addr(&self) -> u64 {
        // A pointer always fits a u64 on the platforms vhost exists on.
        self.addr as usize as u64
    }

    /// Its size in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len
    }

    /// Whether the log has a bit for every page of guest addresses below
    /// `end`: a kernel datapath writes bits for whatever it touches, and
    /// past the mapping it would write into other memory of the agent.
    pub fn covers(&self, end: u64) -> bool {
        let pages = end.div_ceil(LOG_PAGE_SIZE);
        let bytes = pages.div_ceil(8);
        usize::try_from(bytes).is_ok_and(|bytes| bytes <= self.len)
    }

    /// Whether the page holding `gpa` is marked.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE_SIZE;
        self.byte(page)
            .is_some_and(|byte| byte.load(Ordering::Relaxed) & (1 << (page % 8)) != 0)
    }
}

impl Drop for LogRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`; no reference
        // into it outlives `self` (`byte` borrows from `self`).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Where a region's writes are logged, when logging is on.
#[derive(Debug)]
struct Attached {
    log: Arc<LogRegion>,
    /// Guest physical address of the region's first byte.
    region_gpa: u64,
}

/// Logging state of one region, shared by its bitmap and all slices.
#[derive(Debug, Default)]
struct LogState {
    /// Fast path: checked with one relaxed load before taking the lock, so
    /// memory accesses cost next to nothing while no migration runs.
    active: AtomicBool,
    attached: RwLock<Option<Attached>>,
}

impl LogState {
    fn mark(&self, offset: usize, len: usize) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let attached = self.attached.read().unwrap_or_else(|p| p.into_inner());
        if let Some(attached) = attached.as_ref() {
            if let Some(gpa) = attached.region_gpa.checked_add(offset as u64) {
                attached.log.mark(gpa, len as u64);
            }
        }
    }

    fn is_dirty(&self, offset: usize) -> bool {
        let attached = self.attached.read().unwrap_or_else(|p| p.into_inner());
        attached.as_ref().is_some_and(|attached| {
            attached
                .log
                .is_dirty(attached.region_gpa.saturating_add(offset as u64))
        })
    }
}

/// The vm-memory bitmap of one guest region. Turning logging on or off for
/// the region reaches every slice of it, including those workers hold.
#[derive(Debug, Default)]
pub struct LogBitmap {
    state: Arc<LogState>,
    /// The mapping of the region this bitmap belongs to, when the agent
    /// made it itself ([`crate::guest_mapping`]): the region owns its
    /// bitmap, so the mapping lives exactly as long as the region and is
    /// unmapped after every access through it.
    mapping: Option<shm::GuestMapping>,
}

impl LogBitmap {
    /// The bitmap of a region that lives in `mapping`.
    pub fn owning(mapping: shm::GuestMapping) -> LogBitmap {
        LogBitmap {
            state: Arc::default(),
            mapping: Some(mapping),
        }
    }

    /// Whether the region's mapping took a contained SIGBUS (the front-end
    /// shrank the file under it; see [`shm::fault`]).
    pub fn faulted(&self) -> bool {
        self.mapping
            .as_ref()
            .is_some_and(shm::GuestMapping::faulted)
    }

    /// Start logging this region's writes into `log`; the region starts at
    /// guest address `region_gpa`.
    pub fn attach(&self, log: Arc<LogRegion>, region_gpa: u64) {
        let mut attached = self
            .state
            .attached
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *attached = Some(Attached { log, region_gpa });
        self.state.active.store(true, Ordering::Release);
    }

    /// Stop logging this region.
    pub fn detach(&self) {
        let mut attached = self
            .state
            .attached
            .write()
            .unwrap_or_else(|p| p.into_inner());
        self.state.active.store(false, Ordering::Release);
        *attached = None;
    }
}

/// A borrowed view of a region's bitmap at an offset: what vm-memory makes
/// for every access, so it must cost no reference counting.
#[derive(Clone, Copy, Debug)]
pub struct LogSlice<'a> {
    state: &'a LogState,
    offset: usize,
}

impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = LogSlice<'a>;
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.state.mark(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.state.is_dirty(offset)
    }

    fn slice_at(&self, offset: usize) -> LogSlice<'_> {
        LogSlice {
            state: &self.state,
            offset,
        }
    }
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl<'a> WithBitmapSlice<'a> for LogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for LogSlice<'_> {}

impl Bitmap for LogSlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.state.mark(self.offset.saturating_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.state.is_dirty(self.offset.saturating_add(offset))
    }

    fn slice_at(&self, offset: usize) -> Self {
        LogSlice {
            state: self.state,
            offset: self.offset.saturating_add(offset),
        }
    }
}

/// The front-end's dirty log (SET_LOG_BASE) and whether writes go into it:
/// exactly while a log is mapped and VHOST_F_LOG_ALL is acked (a migration
/// runs).
#[derive(Debug, Default)]
pub struct DirtyLog {
    region: Option<Arc<LogRegion>>,
}

impl DirtyLog {
    /// SET_LOG_BASE: map the log the front-end shares (all or nothing: a
    /// refused log leaves the old one in place).
    pub fn map(&mut self, file: &File, size: u64, offset: u64) -> Result<(), shm::ShmError> {
        self.region = Some(Arc::new(LogRegion::map(file, size, offset)?));
        Ok(())
    }

    /// Log `memory`'s writes exactly while a log is mapped and
    /// `log_all` (VHOST_F_LOG_ALL acked); returns whether that changed.
    pub fn apply(&self, memory: &mut super::memory::MemoryMap, log_all: bool) -> bool {
        let active = if log_all { self.region.clone() } else { None };
        let changed = active.is_some() != memory.logging();
        memory.set_log(active);
        changed
    }

    /// The log writes go into while `log_all` (VHOST_F_LOG_ALL acked):
    /// the mapped log, if any.
    pub fn active(&self, log_all: bool) -> Option<Arc<LogRegion>> {
        if log_all {
            self.region.clone()
        } else {
            None
        }
    }

    /// The front-end went away: stop logging and drop the log.
    pub fn forget(&mut self, memory: &mut super::memory::MemoryMap) {
        memory.set_log(None);
        self.region = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log as QEMU makes it: a memfd sealed against resizing.
    fn log_file(size: u64) -> File {
        use std::os::unix::io::FromRawFd;
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(c"log".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS with an int argument on our memfd.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0);
        file
    }

    /// SET_LOG_BASE lies (issue 18): each would have mapped and then
    /// raised SIGBUS at the first logged write. Before the fix they were
    /// all mapped with a success ack.
    #[test]
    fn regression_log_ranges_past_the_fd_or_unsealed_fds_are_refused() {
        use shm::ShmError;
        let small = log_file(512);
        assert!(matches!(
            LogRegion::map(&small, 512, 1 << 30),
            Err(ShmError::PastEnd { .. })
        ));
        let page = log_file(4096);
        assert!(matches!(
            LogRegion::map(&page, 1 << 20, 0),
            Err(ShmError::PastEnd { .. })
        ));
        assert!(matches!(
            LogRegion::map(&page, 1 << 63, 0),
            Err(ShmError::TooLarge { .. })
        ));
        let unsealed = tempfile::tempfile().unwrap();
        unsealed.set_len(4096).unwrap();
        assert!(matches!(
            LogRegion::map(&unsealed, 4096, 0),
            Err(ShmError::NotSealed { .. })
        ));
        assert!(LogRegion::map(&page, 4096, 0).is_ok());
    }

    #[test]
    fn marks_every_page_of_a_range_and_nothing_else() {
        let log = LogRegion::map(&log_file(64), 64, 0).unwrap();
        log.mark(0x3000 - 1, 2); // straddles pages 2 and 3
        assert!(!log.is_dirty(0x1000));
        assert!(log.is_dirty(0x2fff));
        assert!(log.is_dirty(0x3000));
        assert!(!log.is_dirty(0x4000));
        log.mark(0x9000, 3 * LOG_PAGE_SIZE);
        assert!(log.is_dirty(0x9000) && log.is_dirty(0xb000) && !log.is_dirty(0xc000));
    }

    #[test]
    fn a_log_covers_exactly_the_pages_it_has_bits_for() {
        let log = LogRegion::map(&log_file(2), 2, 0).unwrap(); // 16 pages
        assert!(log.covers(0));
        assert!(log.covers(16 * LOG_PAGE_SIZE));
        assert!(!log.covers(16 * LOG_PAGE_SIZE + 1));
        assert!(!log.covers(u64::MAX));
        assert_eq!(log.len_bytes(), 2);
        assert_ne!(log.host_addr(), 0);
    }

    #[test]
    fn pages_beyond_the_log_are_ignored() {
        let log = LogRegion::map(&log_file(1), 1, 0).unwrap();
        log.mark(7 * LOG_PAGE_SIZE, 4 * LOG_PAGE_SIZE); // pages 7..=10, log holds 0..=7
        assert!(log.is_dirty(7 * LOG_PAGE_SIZE));
        assert!(!log.is_dirty(8 * LOG_PAGE_SIZE));
    }

    #[test]
    fn slices_log_at_their_guest_address_and_follow_attach_and_detach() {
        let log = Arc::new(LogRegion::map(&log_file(64), 64, 0).unwrap());
        let bitmap = LogBitmap::default();
        let slice = bitmap.slice_at(0x2000);
        slice.mark_dirty(0x10, 1);
        assert!(!log.is_dirty(0x12_2000), "not attached yet: nothing logged");
        bitmap.attach(log.clone(), 0x12_0000);
        slice.mark_dirty(0x10, 1);
        assert!(log.is_dirty(0x12_2000), "slice + offset + region base");
        assert!(slice.dirty_at(0x10));
        bitmap.detach();
        slice.mark_dirty(0x1000, 1);
        assert!(!log.is_dirty(0x12_3000), "detached: nothing logged");
    }
}
