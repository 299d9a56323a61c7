//! Dirty pages of a vDPA device without a shadow virtqueue.
//!
//! vhost-vdpa has no dirty log (VHOST_SET_LOG_BASE is refused), which is
//! why QEMU moves vDPA devices to shadow virtqueues for migration. The
//! agent follows the device's used rings instead: while the session logs,
//! a thread reads every ring's used index every millisecond and, for each
//! entry the device published since the last look, walks the descriptor
//! chain it names and marks every device-writable buffer of it in the
//! front-end's log; each look also marks the used ring itself (entries,
//! index, flags, avail_event). When a ring stops (GET_VRING_BASE) the
//! device is suspended or reset first, and the ring is scanned once more
//! before the reply.
//!
//! Why that is complete: a device writes guest memory only into buffers
//! the driver made available as device-writable, and into the used ring;
//! it publishes a used entry only after writing its buffer (virtio 1.2
//! §2.7.8), and after the stop it writes nothing more, so every buffer
//! written before the stop is named by an entry the last scan sees.
//!
//! What it cannot see: a device that writes a buffer it never publishes
//! (an RX buffer filled, then dropped at a reset); and a chain the guest
//! recycled with a different buffer between the device's publication and
//! the agent's look (the agent then marks the new buffer instead of the
//! old one). The second needs the guest to consume the entry and reuse
//! its descriptor within the scan period; once the VM is stopped for the
//! switchover (QEMU stops the vCPUs before the devices), the final scan
//! has no such race. A scan that falls a whole ring behind marks every
//! device-writable buffer the descriptor table names.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::vhost_user::dirty_log::LogRegion;
use crate::vhost_user::memory::GuestRam;
use crate::vhost_user::vring::RingGuestAddresses;

/// How often the rings are looked at while logging.
const PERIOD: Duration = Duration::from_millis(1);

/// VIRTQ_DESC_F_NEXT, _WRITE, _INDIRECT.
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One ring the scanner follows.
#[derive(Clone, Copy, Debug)]
struct Scan {
    size: u16,
    guest: RingGuestAddresses,
    /// The next used index to look at; `None` until logging starts.
    next: Option<u16>,
}

#[derive(Default)]
struct State {
    stop: bool,
    log: Option<Arc<LogRegion>>,
    rings: Vec<Option<Scan>>,
    /// Entries whose buffers were marked, for the log line at stop.
    entries: u64,
    /// Scans that fell a whole ring behind.
    overruns: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    memory: GuestMemoryAtomic<GuestRam>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The used-ring scanner of one device (module documentation).
pub struct UsedScanner {
    name: Arc<str>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UsedScanner {
    /// A scanner for `rings` rings over the agent's mappings of guest RAM;
    /// its thread sleeps while nothing is logged.
    pub fn spawn(name: Arc<str>, memory: GuestMemoryAtomic<GuestRam>, rings: u16) -> UsedScanner {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rings: vec![None; usize::from(rings)],
                ..State::default()
            }),
            wake: Condvar::new(),
            memory,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-dirty"))
            .spawn(move || run(&worker))
            .map_err(|e| log::error!("{name}: no dirty-page scanner thread: {e}; the final scans at each stop still log"))
            .ok();
        UsedScanner {
            name,
            shared,
            thread,
        }
    }

    /// The rings that run on the device (`None`: not running); a ring
    /// that keeps its layout keeps its place.
    pub fn set_rings(&self, rings: &[Option<(u16, RingGuestAddresses)>]) {
        let mut state = self.shared.lock();
        let logging = state.log.is_some();
        let mem = self.shared.memory.memory();
        for (index, slot) in state.rings.iter_mut().enumerate() {
            let wanted = rings.get(index).copied().flatten();
            *slot = match (wanted, *slot) {
                (Some((size, guest)), Some(old)) if old.size == size && old.guest == guest => {
                    Some(old)
                }
                (Some((size, guest)), _) => Some(Scan {
                    size,
                    guest,
                    next: if logging {
                        used_idx(&mem, &guest)
                    } else {
                        None
                    },
                }),
                (None, _) => None,
            };
        }
    }

    /// Log into `log` from now on (`None`: stop). Entries published before
    /// this call are not looked at: the front-end sends all of guest RAM
    /// after it turned logging on.
    pub fn set_log(&self, log: Option<Arc<LogRegion>>) {
        let mut state = self.shared.lock();
        let same = match (&state.log, &log) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let mem = self.shared.memory.memory();
        let on = log.is_some();
        for scan in state.rings.iter_mut().flatten() {
            scan.next = if on {
                used_idx(&mem, &scan.guest)
            } else {
                None
            };
        }
        if !on && state.log.is_some() {
            log::info!(
                "{}: used-ring dirty tracking off: {} entries marked, {} overrun(s)",
                self.name,
                state.entries,
                state.overruns
            );
        }
        state.log = log;
        drop(state);
        self.shared.wake.notify_all();
    }

    /// The device no longer touches ring `ring`: scan it one last time.
    pub fn final_scan(&self, ring: u16) {
        let mut state = self.shared.lock();
        let Some(log) = state.log.clone() else {
            return;
        };
        let mem = self.shared.memory.memory();
        let State {
            rings,
            entries,
            overruns,
            ..
        } = &mut *state;
        if let Some(Some(scan)) = rings.get_mut(usize::from(ring)) {
            scan_ring(&mem, &log, scan, entries, overruns);
        }
    }
}

impl Drop for UsedScanner {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        let Some(log) = state.log.clone() else {
            state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let mem = shared.memory.memory();
        let State {
            rings,
            entries,
            overruns,
            ..
        } = &mut *state;
        for scan in rings.iter_mut().flatten() {
            scan_ring(&mem, &log, scan, entries, overruns);
        }
        drop(mem);
        state = shared
            .wake
            .wait_timeout(state, PERIOD)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn used_idx(mem: &GuestRam, guest: &RingGuestAddresses) -> Option<u16> {
    let at = guest.used_ring.0.checked_add(2)?;
    mem.read_obj::<u16>(GuestAddress(at)).ok().map(u16::from_le)
}

/// Mark what the device wrote since `scan.next`: the buffers of each new
/// used entry and the used ring.
fn scan_ring(
    mem: &GuestRam,
    log: &LogRegion,
    scan: &mut Scan,
    entries: &mut u64,
    overruns: &mut u64,
) {
    let size = u64::from(scan.size);
    log.mark(scan.guest.used_ring.0, 6 + 8 * size);
    let Some(idx) = used_idx(mem, &scan.guest) else {
        return;
    };
    let next = scan.next.unwrap_or(idx);
    let pending = idx.wrapping_sub(next);
    if u64::from(pending) > size {
        // Entries were overwritten before this look: mark every writable
        // buffer the table names.
        *overruns += 1;
        for head in 0..scan.size {
            mark_chain(mem, log, &scan.guest, scan.size, head);
        }
    } else {
        for i in 0..pending {
            let slot = u64::from(next.wrapping_add(i) % scan.size);
            let at = scan.guest.used_ring.0.saturating_add(4 + 8 * slot);
            if let Ok(id) = mem.read_obj::<u32>(GuestAddress(at)) {
                if let Ok(head) = u16::try_from(u32::from_le(id)) {
                    mark_chain(mem, log, &scan.guest, scan.size, head);
                }
            }
        }
        *entries += u64::from(pending);
    }
    scan.next = Some(idx);
}

/// One descriptor: address, length, flags, next.
fn descriptor(mem: &GuestRam, table: u64, index: u16) -> Option<(u64, u32, u16, u16)> {
    let at = table.checked_add(16 * u64::from(index))?;
    let raw: [u8; 16] = mem.read_obj(GuestAddress(at)).ok()?;
    let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes(raw[12..14].try_into().ok()?);
    let next = u16::from_le_bytes(raw[14..16].try_into().ok()?);
    Some((addr, len, flags, next))
}

/// Mark every device-writable buffer of the chain at `head` (and of an
/// indirect table it names); at most a ring's worth of descriptors, so a
/// looping chain ends.
fn mark_chain(mem: &GuestRam, log: &LogRegion, guest: &RingGuestAddresses, size: u16, head: u16) {
    if head >= size {
        return;
    }
    let mut index = head;
    for _ in 0..size {
        let Some((addr, len, flags, next)) = descriptor(mem, guest.desc_table.0, index) else {
            return;
        };
        if flags & F_INDIRECT != 0 {
            let count = (len / 16).min(u32::from(u16::MAX));
            let mut inner = 0u16;
            for _ in 0..count {
                let Some((addr, len, flags, next)) = descriptor(mem, addr, inner) else {
                    break;
                };
                if flags & F_WRITE != 0 {
                    log.mark(addr, u64::from(len));
                }
                if flags & F_NEXT == 0 || u32::from(next) >= count {
                    break;
                }
                inner = next;
            }
        } else if flags & F_WRITE != 0 {
            log.mark(addr, u64::from(len));
        }
        if flags & F_NEXT == 0 || next >= size {
            return;
        }
        index = next;
    }
}
