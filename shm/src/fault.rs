//! Containing a SIGBUS in guest RAM to the device that maps it.
//!
//! [`crate::check()`] makes sure a region lies inside its file when it is
//! mapped. But guest RAM fds need not be sealed (file-backed RAM cannot
//! be), so the front-end may shrink the file afterwards; the next access to
//! a page past the new end raises SIGBUS, which by default kills the agent
//! and every device it serves. A [`GuestMapping`] registers its address
//! range in a fixed table that the SIGBUS handler installed here reads.
//! When the faulting address lies in a registered mapping, the handler
//! replaces the whole mapping with private zero pages (`MAP_FIXED`
//! anonymous memory at the same address, so every pointer into it stays
//! valid), marks it faulted and returns: the interrupted access is retried
//! against zero memory and completes. The device's worker sees the mark
//! ([`GuestMapping::faulted`], cheaply gated by [`epoch`]) and fails the
//! device with NEEDS_RESET. Writes that land in the zero pages after the
//! fault reach nobody, which is right for a device that failed.
//!
//! A SIGBUS anywhere else goes to the handler that was installed before
//! (Rust's own, which reports stack overflows) or takes the default action.
//!
//! The handler is async-signal-safe: it reads atomics from a static table,
//! calls `mmap` (a system call with no locks in user space) and
//! `sigaction`, and allocates nothing.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::check::ShmError;

/// Mappings that can be registered at once (32 regions per device; this
/// covers a few dozen devices with full memory tables).
pub const SLOTS: usize = 2048;

const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const LIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Bumped by every contained fault.
static EPOCH: AtomicU64 = AtomicU64::new(0);
/// The SIGBUS disposition before ours, to chain to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// How many faults were contained so far. A worker remembers the value it
/// last saw and looks at its mappings only when it changed.
pub fn epoch() -> u64 {
    EPOCH.load(Ordering::Acquire)
}

/// A slot in the registry, freed on drop.
#[derive(Debug)]
struct Registration {
    slot: usize,
}

impl Registration {
    /// Claim a slot for `start..start + len`. The slot is released by
    /// [`GuestMapping`]'s drop (not by a Drop of its own, which would run
    /// after the munmap and could free a slot someone claimed meanwhile).
    fn new(start: usize, len: usize) -> Result<Registration, ShmError> {
        install();
        for (index, slot) in REGISTRY.iter().enumerate() {
            if slot
                .state
                .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                slot.start.store(start, Ordering::Relaxed);
                slot.len.store(len, Ordering::Relaxed);
                slot.faulted.store(false, Ordering::Relaxed);
                slot.state.store(LIVE, Ordering::Release);
                return Ok(Registration { slot: index });
            }
        }
        Err(ShmError::TooManyMappings { limit: SLOTS })
    }

    fn slot(&self) -> &'static Slot {
        &REGISTRY[self.slot]
    }
}

/// A shared mapping of guest RAM whose SIGBUS is contained. It unmaps
/// itself on drop; whoever builds a `vm-memory` region on it must keep it
/// alive at least as long as that region (the agent keeps it in the
/// region's bitmap, which the region owns).
#[derive(Debug)]
pub struct GuestMapping {
    registration: Registration,
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; the
// pointer is only handed out, never dereferenced here, and munmap in Drop
// may run on any thread.
unsafe impl Send for GuestMapping {}
// SAFETY: &GuestMapping only reads the address, length and an atomic flag.
unsafe impl Sync for GuestMapping {}

impl GuestMapping {
    /// Map `len` bytes of `fd` from `offset`, shared and read-write (with
    /// MAP_NORESERVE unless `hugetlbfs`: huge pages are reserved at mmap
    /// time, so a shortage is an mmap error rather than a later SIGBUS),
    /// and register the range. `fd`, `offset` and `len` should have passed
    /// [`crate::check::check`] (the result is memory-safe either way:
    /// nothing is overwritten, and a range past the file is contained).
    pub fn map(
        fd: std::os::unix::io::RawFd,
        offset: libc::off_t,
        len: usize,
        hugetlbfs: bool,
    ) -> Result<GuestMapping, std::io::Error> {
        let flags = libc::MAP_SHARED | if hugetlbfs { 0 } else { libc::MAP_NORESERVE };
        // SAFETY: a fresh mapping at an address the kernel picks (no
        // MAP_FIXED), so no existing memory is affected; the result is
        // checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let Some(addr) = NonNull::new(addr.cast::<u8>()) else {
            return Err(std::io::Error::other("mmap returned a null mapping"));
        };
        let registration = match Registration::new(addr.as_ptr() as usize, len) {
            Ok(registration) => registration,
            Err(e) => {
                // SAFETY: unmapping exactly the mapping made above, which
                // nobody else has seen yet.
                unsafe { libc::munmap(addr.as_ptr().cast(), len) };
                return Err(std::io::Error::other(e));
            }
        };
        Ok(GuestMapping {
            registration,
            addr,
            len,
        })
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: mappings have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a SIGBUS was contained in this mapping: the front-end shrank
    /// the file under it, and its contents are now private zero pages.
    pub fn faulted(&self) -> bool {
        self.registration.slot().faulted.load(Ordering::Acquire)
    }
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        // Leave the registry before unmapping, so that a new mapping the
        // kernel puts at the same address is never mistaken for this one.
        self.registration
            .slot()
            .state
            .store(FREE, Ordering::Release);
        // SAFETY: unmapping exactly the mapping made in `map`; whoever built
        // memory accessors on it keeps this value alive longer than them.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// Install the SIGBUS handler once per process.
fn install() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: `sigaction` is plain old data; all-zero is a valid value.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
        ours.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sigemptyset initialises the mask inside `ours`.
        unsafe { libc::sigemptyset(&mut ours.sa_mask) };
        // SAFETY: both pointers are to sigaction values on our stack.
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &ours, &mut previous) };
        if rc != 0 {
            // Without the handler a fault kills the process, as before.
            previous.sa_sigaction = libc::SIG_DFL;
        }
        previous
    });
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler;
    // si_addr is the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in REGISTRY.iter() {
        if slot.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let start = slot.start.load(Ordering::Relaxed);
        let len = slot.len.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: replaces exactly the registered mapping (which its owner
        // keeps mapped while it is registered) with anonymous memory of the
        // same size at the same address; every pointer into it stays valid
        // and now reads zeros.
        let replaced = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if replaced != libc::MAP_FAILED {
            slot.faulted.store(true, Ordering::Release);
            EPOCH.fetch_add(1, Ordering::AcqRel);
            return;
        }
        break;
    }
    chain(signal, info, context);
}

/// Not ours: hand the signal to the previous handler, or restore the
/// default action so that the retried access takes it.
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS
        .get()
        .map(|action| (action.sa_sigaction, action.sa_flags));
    match previous {
        Some((handler, flags)) if handler != libc::SIG_DFL && handler != libc::SIG_IGN => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous disposition was installed with
                // SA_SIGINFO, so its handler has this signature.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                handler(signal, info, context);
            } else {
                // SAFETY: without SA_SIGINFO the handler takes the signal only.
                let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                handler(signal);
            }
        }
        _ => {
            // SAFETY: `sigaction` is plain old data; all-zero with SIG_DFL
            // (0) is the default disposition.
            let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
            default.sa_sigaction = libc::SIG_DFL;
            // SAFETY: a pointer to a sigaction value on our stack.
            unsafe { libc::sigaction(signal, &default, std::ptr::null_mut()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::memfd;
    use std::os::unix::io::AsRawFd;
    use std::sync::Mutex;

    /// Tests that count registry slots must not run next to each other.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn read_byte(mapping: &GuestMapping, offset: usize) -> u8 {
        assert!(offset < mapping.len());
        // SAFETY: offset < len; the mapping is alive; a volatile read because
        // the file under it is shared with "another process" (the test).
        unsafe { mapping.as_ptr().add(offset).read_volatile() }
    }

    fn write_byte(mapping: &GuestMapping, offset: usize, value: u8) {
        assert!(offset < mapping.len());
        // SAFETY: as in read_byte.
        unsafe { mapping.as_ptr().add(offset).write_volatile(value) }
    }

    #[test]
    fn a_file_shrunk_under_the_mapping_faults_into_zero_pages_not_a_crash() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let file = memfd(64 * 1024, false);
        let mapping = GuestMapping::map(file.as_raw_fd(), 0, 64 * 1024, false).unwrap();
        write_byte(&mapping, 40_000, 7);
        assert_eq!(read_byte(&mapping, 40_000), 7);
        assert!(!mapping.faulted());
        let before = epoch();
        // The front-end shrinks its RAM file to 4 KiB.
        file.set_len(4096).unwrap();
        // Without containment this read raises SIGBUS and ends the process.
        assert_eq!(read_byte(&mapping, 40_000), 0);
        assert!(mapping.faulted());
        assert!(epoch() > before);
        // The whole mapping is zero pages now, writes included.
        write_byte(&mapping, 10, 3);
        assert_eq!(read_byte(&mapping, 10), 3);
        let mut first = [0u8; 1];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut first, 10).unwrap();
        assert_eq!(
            first[0], 0,
            "a write after the fault must not reach the file"
        );
    }

    #[test]
    fn an_untouched_mapping_of_another_file_is_not_marked() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let file = memfd(8192, false);
        let other = memfd(8192, false);
        let faulting = GuestMapping::map(file.as_raw_fd(), 0, 8192, false).unwrap();
        let bystander = GuestMapping::map(other.as_raw_fd(), 0, 8192, false).unwrap();
        write_byte(&bystander, 5000, 9);
        file.set_len(0).unwrap();
        assert_eq!(read_byte(&faulting, 5000), 0);
        assert!(faulting.faulted());
        assert!(!bystander.faulted());
        assert_eq!(read_byte(&bystander, 5000), 9);
    }

    #[test]
    fn slots_are_reused_after_drop() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let file = memfd(4096, false);
        let mappings: Vec<GuestMapping> = (0..16)
            .map(|_| GuestMapping::map(file.as_raw_fd(), 0, 4096, false).unwrap())
            .collect();
        let live = || {
            REGISTRY
                .iter()
                .filter(|slot| slot.state.load(Ordering::Acquire) == LIVE)
                .count()
        };
        let with = live();
        drop(mappings);
        assert_eq!(live() + 16, with, "drop frees the slots");
    }
}
