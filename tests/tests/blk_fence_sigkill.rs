//! The write fence when a migration source dies right after suspending.
//!
//! A suspended source's abandoned writes keep going on storage; with
//! `fence=lock` it holds an OFD lock on `<image>.fence` until they finish,
//! and the destination holds its resubmitted copies until the lock is free.
//! If the source is SIGKILLed, the kernel closes its descriptors at once,
//! and with them the lock, but writes the source had already handed to the
//! kernel through io_uring are not cancelled: an O_DIRECT write queued in
//! the block layer reaches the disk later, from the ring's teardown. So
//! "storage has them" means: every operation the kernel was given has
//! finished, not: the process is gone. The agent ties the lock to its rings
//! (`IoEngine::hold_file_while_busy`), so the lock lives exactly that long.
//!
//! The test makes such writes real: the image lives on a loop device
//! (`vhost_agent_tests::slow_disk`) and the source agent, serving it with
//! `direct`, sits in a blkio cgroup whose write throttle holds its writes
//! in the kernel until the test lifts it. Driven by the test front-end;
//! tests/tests/blk_qemu11.rs does the same with QEMU 11.1 and a guest.
//!
//! Needs root, a loop device and a blkio cgroup; missing ones fail the test.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost_agent_tests::frontend::{
    wait_until, BlkRequest, StartOptions, StopRequest, TestFrontend, PROTOCOL_SUSPEND,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT,
};
use vhost_agent_tests::slow_disk::SlowDisk;
use vhost_agent_tests::support::{self, ChildGuard};

const QUEUE_SIZE: u16 = 256;
const BLOCK: usize = 4096;
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
/// Writes in flight at the stop.
const WRITES: u64 = 8;
const IMAGE_SIZE: u64 = 64 << 20;
/// How long the test watches that nothing moves while writes are held.
const HOLD_WINDOW: Duration = Duration::from_secs(1);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(20);

/// One distinct 4 KiB block per (`tag`, `block`).
fn pattern(tag: u8, block: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| tag ^ (block as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

/// Whether someone holds an OFD write lock on `path`: F_OFD_GETLK through
/// a description of our own (it takes no lock).
fn write_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_RDLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on an open fd with a pointer to a flock on our stack.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    lock.l_type == libc::F_WRLCK as libc::c_short
}

fn image_block(image: &Path, block: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut bytes, block * BLOCK as u64)
        .unwrap();
    bytes
}

/// The agents' logs, printed when the test fails.
struct Logs(Vec<PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.0 {
                eprintln!(
                    "--- {}\n{}",
                    log.display(),
                    vhost_agent_tests::qemu::log_tail(log, 40)
                );
            }
        }
    }
}

fn agent(dir: &Path, image: &Path, name: &str, logs: &mut Logs) -> (ChildGuard, PathBuf, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let control = dir.join(format!("{name}.ctl"));
    let log = dir.join(format!("{name}.log"));
    let spec = format!(
        "socket={},image={},id={name},direct",
        socket.display(),
        image.display()
    );
    let control_arg = control.display().to_string();
    let guard = support::spawn_agent(
        &[spec],
        &["--log-level", "debug", "--control", &control_arg],
        Some(&log),
    );
    logs.0.push(log);
    (guard, socket, control)
}

/// Regression: the source's lock went with its process while its writes
/// were still in the kernel, and the destination's fence opened: its
/// resubmitted writes, and any newer ones, could be overwritten by the
/// source's stale copies landing after them.
#[test]
fn regression_a_killed_source_keeps_the_fence_until_the_kernel_has_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SlowDisk::new(dir.path(), 256).unwrap_or_else(|e| panic!("{e}"));
    let image = disk.mount_point().join("disk.img");
    // Allocated, so the O_DIRECT writes are plain overwrites.
    std::fs::write(&image, vec![0u8; IMAGE_SIZE as usize]).unwrap();
    File::open(&image).unwrap().sync_all().unwrap();
    let lock = blkdev_lock_path(&image);
    let mut logs = Logs(Vec::new());
    let (mut source, source_socket, source_ctl) = agent(dir.path(), &image, "source", &mut logs);
    disk.add_process(source.child.id())
        .unwrap_or_else(|e| panic!("{e}"));
    let (destination, destination_socket, _) = agent(dir.path(), &image, "destination", &mut logs);

    let options = StartOptions::with_protocol(1, QUEUE_SIZE, PROTOCOL_SUSPEND);
    let mut src = TestFrontend::start(&source_socket, &options);
    disk.hold_writes().unwrap_or_else(|e| panic!("{e}"));
    let bytes_before = disk
        .write_bytes_submitted()
        .unwrap_or_else(|e| panic!("{e}"));
    let requests: Vec<BlkRequest> = (0..WRITES)
        .map(|block| {
            src.fill(block, &pattern(0xa, block));
            BlkRequest::write(block, block * SECTORS_PER_BLOCK, BLOCK as u32)
        })
        .collect();
    let submitted = src.submit(0, &requests);
    assert!(
        wait_until(Duration::from_secs(5), || {
            src.region().queue(0).inflight_count() == WRITES as usize
        }),
        "the source took {} of {WRITES} writes",
        src.region().queue(0).inflight_count()
    );
    // What this test is about needs the writes inside the kernel, not
    // merely taken by the agent: an io_uring operation still queued in
    // user space or punted to an io-wq worker that has not run is
    // cancelled when the process dies and never reaches storage (then the
    // lock may go at once, and rightly so). Wait until the throttle holds
    // every byte of them.
    let wanted = bytes_before + WRITES * BLOCK as u64;
    let mut held = 0;
    assert!(
        wait_until(COMPLETE_TIMEOUT, || {
            held = disk.write_bytes_submitted().unwrap_or(0);
            held >= wanted
        }),
        "the throttle holds {} of the {} bytes the source was given",
        held.saturating_sub(bytes_before),
        WRITES * BLOCK as u64
    );
    let stopped = src.stop(StopRequest::GetVringBase);
    let devices = support::control_execute(&source_ctl, "query-devices", serde_json::json!({}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        devices[0]["fence"]["abandoned-outstanding"], WRITES,
        "the suspended source reports its writes as still on storage: {devices}"
    );
    assert!(write_locked(&lock), "the source holds {}", lock.display());

    // The source dies with its writes held in the block layer.
    source.signal(libc::SIGKILL);
    source
        .wait_timeout(Duration::from_secs(10))
        .expect("the killed source is reaped");
    for block in 0..WRITES {
        assert!(
            image_block(&image, block) != pattern(0xa, block),
            "block {block}: the source's write is on the image already; the throttle did not hold it"
        );
    }
    assert!(
        write_locked(&lock),
        "the source is gone but its writes are still in the kernel: {} must still be locked",
        lock.display()
    );

    let region = src.region().migrate();
    let mut dst = TestFrontend::resume(&destination_socket, &options, &src, region, &stopped.bases);
    let early = dst.collect_used(0, WRITES as usize, HOLD_WINDOW);
    assert!(
        early.is_empty(),
        "the destination completed {} resubmitted write(s) while the dead source's writes were still held in the kernel",
        early.len()
    );
    assert!(write_locked(&lock), "still locked after the hold window");

    disk.release_writes().unwrap_or_else(|e| panic!("{e}"));
    let mut heads = dst.collect_used(0, WRITES as usize, COMPLETE_TIMEOUT);
    heads.sort_unstable();
    let mut want: Vec<u16> = submitted.iter().map(|s| s.head).collect();
    want.sort_unstable();
    assert_eq!(heads, want, "every resubmitted write completed once");
    for s in &submitted {
        assert_eq!(dst.status(s.request.slot), VIRTIO_BLK_S_OK, "{s:?}");
    }
    assert!(!write_locked(&lock), "the lock went with the last write");
    // Newer writes are what the image keeps: nothing stale lands later.
    for block in 0..WRITES {
        dst.fill(block, &pattern(0xb, block));
        let status = dst.request(
            0,
            block,
            VIRTIO_BLK_T_OUT,
            block * SECTORS_PER_BLOCK,
            BLOCK as u32,
        );
        assert_eq!(
            status,
            Some(VIRTIO_BLK_S_OK),
            "the newer write of block {block}"
        );
    }
    std::thread::sleep(HOLD_WINDOW);
    for block in 0..WRITES {
        assert!(
            image_block(&image, block) == pattern(0xb, block),
            "block {block} does not hold the newer write"
        );
    }
    drop(destination);
}

/// `<image>.fence`, the lock file of `fence=lock`.
fn blkdev_lock_path(image: &Path) -> PathBuf {
    let mut path = image.as_os_str().to_owned();
    path.push(".fence");
    PathBuf::from(path)
}
