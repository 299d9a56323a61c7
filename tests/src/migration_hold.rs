//! Driving a QEMU live migration from a test ([`migrate`], [`Migration`]),
//! and holding it short of its stop for as long as the test needs to make
//! the condition it wants the stop to meet.
//!
//! QEMU stops the guest once what is left to send fits the downtime limit
//! (measured bandwidth × `downtime-limit`). A guest that idles between
//! storage completions leaves almost nothing dirty, so lowering the limit
//! is not enough: even a 0 ms limit is met the moment the pages known
//! dirty have been sent. The hold therefore also keeps some pages dirty,
//! through the channel a vhost-user back-end uses for that: QEMU's vhost
//! dirty log (LOG_SHMFD), a shared bitmap QEMU reads at every sync.
//!
//! Which pages matters. QEMU sends a zero page as a few bytes, so a pass
//! over dirty zero pages takes no time and the next sync can come before
//! the bits are set again; what holds is real data that takes the rate
//! limiter more than one 100 ms slot to send. So the [`LogDirtier`] picks
//! [`DIRTY_PAGES`] non-zero pages of guest RAM (read from QEMU's RAM
//! memfd) and the hold caps the bandwidth at [`HELD_BANDWIDTH`]: 8 MiB
//! take over 100 ms at 64 MiB/s, and the dirtier sets the bits again every
//! millisecond. Tried on QEMU 11.1 before settling on this: 4 MiB of
//! (probably zero) pages did not hold at full bandwidth, and only now and
//! then at 64 MiB/s. Pages sent again cost nothing but bandwidth; their
//! content is the guest's.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::handoff_vm::{Rig, Vm, DEBUG_ENV, DEFAULT_DOWNTIME_LIMIT_MS, MIGRATION_TIMEOUT};
use crate::qemu::MigrationStats;

/// `downtime-limit` (ms) while a migration is held.
pub const HELD_DOWNTIME_LIMIT_MS: u64 = 1;
/// `max-bandwidth` while a migration is held (bytes/s).
pub const HELD_BANDWIDTH: u64 = 64 << 20;
/// `max-bandwidth` otherwise: uncapped on loopback.
pub const BANDWIDTH: u64 = 1 << 30;
/// Guest pages the dirtier keeps dirty: 8 MiB, more than one rate-limit
/// slot (a tenth of [`HELD_BANDWIDTH`]) can carry.
pub const DIRTY_PAGES: usize = 2048;
const PAGE: u64 = 4096;

/// The memfd named `name` (e.g. `vhost-log`) among QEMU `pid`'s open
/// files, opened again through /proc; Ok(None) if QEMU has none (yet).
pub fn qemu_memfd(pid: u32, name: &str, write: bool) -> Result<Option<File>, String> {
    let fds = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&fds).map_err(|e| format!("{fds}: {e}"))?;
    let wanted = format!("/memfd:{name}");
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy().starts_with(&wanted) {
            return File::options()
                .read(true)
                .write(write)
                .open(entry.path())
                .map(Some)
                .map_err(|e| format!("open {}: {e}", entry.path().display()));
        }
    }
    Ok(None)
}

/// Up to `count` non-zero pages of guest RAM (page numbers = guest
/// physical address / 4 KiB), from the top down: below the top lies the
/// initramfs QEMU loaded, freed by the guest but not cleared.
fn non_zero_pages(ram: &File, count: usize) -> Result<Vec<u64>, String> {
    let size = ram.metadata().map_err(|e| format!("guest RAM: {e}"))?.len();
    const CHUNK: u64 = 1 << 20;
    let mut buffer = vec![0u8; CHUNK as usize];
    let mut pages = Vec::with_capacity(count);
    let mut end = size - size % CHUNK;
    while end >= CHUNK && pages.len() < count {
        let start = end - CHUNK;
        ram.read_exact_at(&mut buffer, start)
            .map_err(|e| format!("read guest RAM at {start:#x}: {e}"))?;
        for (i, page) in buffer.chunks(PAGE as usize).enumerate() {
            if pages.len() < count && page.iter().any(|&b| b != 0) {
                pages.push(start / PAGE + i as u64);
            }
        }
        end = start;
    }
    Ok(pages)
}

/// Keeps a held migration from converging (see the module docs).
pub struct LogDirtier {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogDirtier {
    /// Start on QEMU `pid`: pick the pages, map its vhost log. Ok(None)
    /// while QEMU has no log yet (it makes one at the migration's setup).
    /// The guest's RAM must be QEMU's `memory-backend-memfd` starting at
    /// guest physical address 0, as [`crate::qemu::VmConfig`] sets it up.
    pub fn start(pid: u32) -> Result<Option<LogDirtier>, String> {
        let Some(log) = qemu_memfd(pid, "vhost-log", true)? else {
            return Ok(None);
        };
        let ram = qemu_memfd(pid, "memory-backend-memfd", false)?
            .ok_or_else(|| format!("QEMU {pid} has no memory-backend-memfd"))?;
        let pages = non_zero_pages(&ram, DIRTY_PAGES)?;
        if pages.len() < DIRTY_PAGES {
            return Err(format!(
                "only {} non-zero pages in the guest's RAM",
                pages.len()
            ));
        }
        let log_bytes = log.metadata().map_err(|e| format!("vhost log: {e}"))?.len();
        let words = usize::try_from(log_bytes / 8).map_err(|e| format!("vhost log size: {e}"))?;
        if let Some(beyond) = pages.iter().find(|&&p| p / 64 >= words as u64) {
            return Err(format!(
                "page {beyond:#x} is beyond QEMU's {log_bytes}-byte vhost log"
            ));
        }
        // SAFETY: a fresh shared mapping of the whole log file we opened;
        // the kernel picks the address, nothing else is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                words * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                log.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(format!(
                "mmap of QEMU's vhost log: {}",
                std::io::Error::last_os_error()
            ));
        }
        let address = map as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: `address` is the start of a live, page-aligned mapping
            // of `words` u64s, unmapped only below, after this loop; every
            // page's word was checked to be below `words`. QEMU and the
            // agent update the log atomically too, so an atomic OR loses
            // none of their bits.
            let log = unsafe { std::slice::from_raw_parts(address as *const AtomicU64, words) };
            while !thread_stop.load(Ordering::Relaxed) {
                for &page in &pages {
                    // page / 64 < words (checked above).
                    log[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // SAFETY: the mapping made above, no longer used.
            unsafe { libc::munmap(address as *mut libc::c_void, words * 8) };
        });
        Ok(Some(LogDirtier {
            stop,
            thread: Some(thread),
        }))
    }
}

impl Drop for LogDirtier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The failure report of a migration: both VMs' diagnostics.
pub fn both(src: &Vm, dst: &Vm) -> String {
    format!(
        "===== source {} =====\n{}\n===== destination {} =====\n{}",
        src.name,
        src.qemu.diagnostics(),
        dst.name,
        dst.qemu.diagnostics()
    )
}

/// A migration under way from `src` to `dst`.
pub struct Migration {
    /// When `migrate` was issued.
    pub started: Instant,
    /// The stop may come (not held, or let go).
    pub stop_allowed: bool,
    /// Keeps a held migration from converging on its own.
    dirtier: Option<LogDirtier>,
}

impl Migration {
    /// Let `dst` listen on a free loopback port and `migrate` `src` there,
    /// bandwidth uncapped. With `hold_stop`, `downtime-limit` is 1 ms and
    /// the bandwidth 64 MiB/s, and with [`Migration::hold`]'s
    /// [`LogDirtier`] QEMU iterates over RAM without stopping the guest
    /// until [`Migration::allow_stop`] ([`crate::migration_hold`]).
    pub fn begin(src: &mut Vm, dst: &mut Vm, hold_stop: bool) -> Result<Migration, String> {
        dst.qmp
            .migrate_incoming("tcp:127.0.0.1:0")
            .map_err(|e| format!("destination: {e}"))?;
        let port = dst.qmp.incoming_tcp_port()?;
        let (bandwidth, limit) = if hold_stop {
            (HELD_BANDWIDTH, HELD_DOWNTIME_LIMIT_MS)
        } else {
            (BANDWIDTH, DEFAULT_DOWNTIME_LIMIT_MS)
        };
        src.qmp
            .execute(
                "migrate-set-parameters",
                json!({ "max-bandwidth": bandwidth, "downtime-limit": limit }),
            )
            .map_err(|e| format!("source: {e}"))?;
        src.qmp
            .execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))
            .map_err(|e| format!("source: {e}"))?;
        Ok(Migration {
            started: Instant::now(),
            stop_allowed: !hold_stop,
            dirtier: None,
        })
    }

    /// The source's `query-migrate` now; Err when it failed or was cancelled.
    pub fn status(src: &mut Vm) -> Result<Value, String> {
        let info = src
            .qmp
            .execute("query-migrate", json!({}))
            .map_err(|e| format!("source: {e}"))?;
        match info["status"].as_str() {
            Some("failed") | Some("cancelled") => Err(format!("migration ended: {info}")),
            _ => Ok(info),
        }
    }

    /// Whether the first pass over RAM is done (`dirty-sync-count` >= 2):
    /// from then on a held migration only iterates.
    pub fn first_pass_done(info: &Value) -> bool {
        info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
    }

    /// A held migration: start the [`LogDirtier`] once QEMU has its log;
    /// Ok(true) once it runs (only then is the hold sure).
    pub fn hold(&mut self, src: &Vm) -> Result<bool, String> {
        if self.dirtier.is_none() {
            self.dirtier = LogDirtier::start(src.pid())?;
        }
        Ok(self.dirtier.is_some())
    }

    /// Let a held migration stop the guest as any migration would
    /// (uncapped, QEMU's default downtime limit).
    pub fn allow_stop(&mut self, src: &mut Vm) -> Result<(), String> {
        self.dirtier = None;
        src.qmp
            .execute(
                "migrate-set-parameters",
                json!({ "max-bandwidth": BANDWIDTH, "downtime-limit": DEFAULT_DOWNTIME_LIMIT_MS }),
            )
            .map_err(|e| format!("source: {e}"))?;
        self.stop_allowed = true;
        Ok(())
    }

    /// After `completed`: wait for the destination to run, check the source
    /// is in `postmigrate`, quit the source. Returns the figures.
    pub fn finish(info: &Value, mut src: Vm, dst: &mut Vm) -> Result<MigrationStats, String> {
        let stats = MigrationStats::from_query(info)?;
        dst.qmp
            .wait_status("running", Duration::from_secs(30))
            .map_err(|e| format!("destination after the migration: {e}"))?;
        let state = src.qmp.status();
        if state != "postmigrate" {
            return Err(format!("source run state {state:?}, not postmigrate"));
        }
        if let Some(v) = src.qemu.verdict() {
            return Err(format!("the source printed a verdict: {v:?}"));
        }
        src.qmp.quit();
        match src.qemu.process.wait_timeout(Duration::from_secs(30)) {
            Some(status) if status.success() => Ok(stats),
            Some(status) => Err(format!("source QEMU exited with {status} after quit")),
            None => Err("source QEMU did not exit after quit".to_string()),
        }
    }
}

/// Live-migrate `src` to a new QEMU on the other side and return it with
/// the source's figures; panics with both VMs' diagnostics on a failure.
///
/// With `hold`, the stop is held back ([`Migration::begin`]) and
/// `ready(rig, src, query-migrate)` is asked every 50 ms until it says the
/// guest may stop; `watch(rig, src)` is then called every 2 ms until the
/// migration completes, and once more when it has (to observe or act
/// around the stop: a stop and the completion can both fall between two
/// polls, and a `watch` waiting for the stop must still get its turn).
pub fn migrate(
    rig: &mut Rig,
    mut src: Vm,
    hold: bool,
    mut ready: impl FnMut(&Rig, &Vm, &Value) -> Result<bool, String>,
    mut watch: impl FnMut(&mut Rig, &Vm) -> Result<(), String>,
) -> (Vm, MigrationStats) {
    let mut dst = rig.spawn_vm(1 - src.side, true);
    let mut migration = match Migration::begin(&mut src, &mut dst, hold) {
        Ok(m) => m,
        Err(e) => panic!("{e}\n{}", both(&src, &dst)),
    };
    let info = loop {
        let info = match Migration::status(&mut src) {
            Ok(info) => info,
            Err(e) => panic!("{e}\n{}", both(&src, &dst)),
        };
        if info["status"] == "completed" {
            if migration.stop_allowed {
                if let Err(e) = watch(rig, &src) {
                    panic!("{e}\n{}", both(&src, &dst));
                }
            }
            break info;
        }
        if std::env::var_os(DEBUG_ENV).is_some() {
            eprintln!(
                "{:.2?} {} passes {} remaining {} mbps {} stop allowed {}",
                migration.started.elapsed(),
                info["status"],
                info["ram"]["dirty-sync-count"],
                info["ram"]["remaining"],
                info["ram"]["mbps"],
                migration.stop_allowed
            );
        }
        if migration.started.elapsed() > MIGRATION_TIMEOUT {
            panic!(
                "migration not completed within {MIGRATION_TIMEOUT:?} (stop allowed: {}): {info}\n{}",
                migration.stop_allowed,
                both(&src, &dst)
            );
        }
        let step = if migration.stop_allowed {
            watch(rig, &src)
        } else if !migration
            .hold(&src)
            .unwrap_or_else(|e| panic!("{e}\n{}", both(&src, &dst)))
        {
            Ok(())
        } else {
            match ready(rig, &src, &info) {
                Ok(true) => migration.allow_stop(&mut src),
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = step {
            panic!("{e}\n{}", both(&src, &dst));
        }
        let pause = if migration.stop_allowed { 2 } else { 50 };
        std::thread::sleep(Duration::from_millis(pause));
    };
    let src_name = src.name.clone();
    let src_rounds = src.qemu.rounds();
    let diagnostics = src.qemu.diagnostics();
    match Migration::finish(&info, src, &mut dst) {
        Ok(stats) => {
            eprintln!(
                "migration {src_name} -> {} after the source's rounds {src_rounds:?}: {stats}",
                dst.name
            );
            (dst, stats)
        }
        Err(e) => panic!(
            "{e}\n===== source {src_name} =====\n{diagnostics}\n===== destination {} =====\n{}",
            dst.name,
            dst.qemu.diagnostics()
        ),
    }
}
