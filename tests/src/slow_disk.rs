//! A disk whose writes the test can hold inside the kernel: an ext4 file
//! system on a loop device, mounted in the test's directory, and a blkio
//! cgroup whose write throttle the test turns on and off.
//!
//! What it is for: a storage operation the kernel has already been given
//! but not finished, independent of any process. A process in the cgroup
//! that writes with O_DIRECT while the throttle is on leaves its bios
//! queued in the block layer's throttle; if the process is SIGKILLed, the
//! process is gone at once but the writes are still on their way to the
//! disk, and reach it when the test lifts the throttle. (The agent's own
//! `latency-ms` cannot model this: its delays are io_uring timers or a
//! user-space scheduler, which die with the process, so a delayed
//! operation of a killed agent never starts.)
//!
//! Buffered writes are not held (cgroup v1 does not charge page-cache
//! writeback to the writer), so the agent must serve the image with
//! `direct`. Needs root, `/dev/loop-control`, `losetup`, `mkfs.ext4`,
//! `mount` and a blkio (v1) or io (v2) cgroup controller; anything missing
//! is an error that says so, never a skip.

use std::path::{Path, PathBuf};
use std::process::Command;

/// How the throttle is set.
#[derive(Debug, Clone)]
enum Throttle {
    /// cgroup v1: `blkio.throttle.write_bps_device`.
    V1(PathBuf),
    /// cgroup v2: `io.max`.
    V2(PathBuf),
}

/// The loop device, its file system and the cgroup; all undone when dropped.
#[derive(Debug)]
pub struct SlowDisk {
    backing: PathBuf,
    mount_point: PathBuf,
    device: String,
    /// `MAJOR:MINOR` of the loop device.
    major_minor: String,
    cgroup: PathBuf,
    throttle: Throttle,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The mount point of the cgroup v1 hierarchy with `controller`, if any.
fn v1_hierarchy(controller: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (path, kind, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        (*kind == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| PathBuf::from(path))
    })
}

/// The cgroup2 mount whose root offers the `io` controller, if any.
fn v2_with_io() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (path, kind) = (fields.get(1)?, fields.get(2)?);
        if *kind != "cgroup2" {
            return None;
        }
        let root = PathBuf::from(path);
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
        controllers
            .split_whitespace()
            .any(|c| c == "io")
            .then_some(root)
    })
}

impl SlowDisk {
    /// A `size_mib` MiB ext4 file system on a loop device, mounted at
    /// `dir/mnt` (its backing file is `dir/slow-disk.img`), and a fresh
    /// cgroup for the processes whose writes are to be held.
    pub fn new(dir: &Path, size_mib: u64) -> Result<SlowDisk, String> {
        let hint = "the fence-after-SIGKILL tests need root, a loop device and a blkio cgroup";
        if !Path::new("/dev/loop-control").exists() {
            return Err(format!("/dev/loop-control is missing: {hint}"));
        }
        let backing = dir.join("slow-disk.img");
        let mount_point = dir.join("mnt");
        let file = std::fs::File::create(&backing)
            .map_err(|e| format!("create {}: {e}", backing.display()))?;
        file.set_len(size_mib << 20)
            .map_err(|e| format!("size {}: {e}", backing.display()))?;
        drop(file);
        let backing_str = backing.display().to_string();
        run("mkfs.ext4", &["-q", "-F", &backing_str]).map_err(|e| format!("{e} ({hint})"))?;
        // The loop device reads and writes its file with O_DIRECT, so what
        // reaches it goes on to the host's disk, not into a second cache.
        let device = run("losetup", &["-f", "--show", "--direct-io=on", &backing_str])
            .map_err(|e| format!("{e} ({hint})"))?;
        let name = device.trim_start_matches("/dev/");
        let major_minor = std::fs::read_to_string(format!("/sys/block/{name}/dev"))
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("{device}: no /sys/block/{name}/dev: {e}"));
        let cleanup_loop = |e: String| {
            let _ = run("losetup", &["-d", &device]);
            e
        };
        let major_minor = major_minor.map_err(cleanup_loop)?;
        let (cgroup_root, throttle_of): (PathBuf, fn(PathBuf) -> Throttle) =
            match (v1_hierarchy("blkio"), v2_with_io()) {
                (Some(root), _) => (root, Throttle::V1),
                (None, Some(root)) => (root, Throttle::V2),
                (None, None) => {
                    return Err(cleanup_loop(format!(
                        "no blkio (v1) or io (v2) cgroup controller is mounted ({hint})"
                    )))
                }
            };
        let cgroup = cgroup_root.join(format!("vhost-agent-test-{}-{}", std::process::id(), name));
        if let Err(e) = std::fs::create_dir(&cgroup) {
            return Err(cleanup_loop(format!(
                "create cgroup {}: {e} ({hint})",
                cgroup.display()
            )));
        }
        let throttle = throttle_of(cgroup.clone());
        let disk = SlowDisk {
            backing,
            mount_point,
            device,
            major_minor,
            cgroup,
            throttle,
        };
        std::fs::create_dir_all(&disk.mount_point)
            .map_err(|e| format!("create {}: {e}", disk.mount_point.display()))?;
        run(
            "mount",
            &[&disk.device, &disk.mount_point.display().to_string()],
        )?;
        Ok(disk)
    }

    /// Where the file system is mounted: put the image (and so its
    /// `.fence` lock file) here.
    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// The loop device, e.g. `/dev/loop0`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Move process `pid` (all its threads, and every thread or io_uring
    /// worker it creates later) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), String> {
        let procs = self.cgroup.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .map_err(|e| format!("move {pid} into {}: {e}", procs.display()))
    }

    fn set_throttle(&self, bytes_per_second: u64) -> Result<(), String> {
        let (file, line) = match &self.throttle {
            Throttle::V1(dir) => (
                dir.join("blkio.throttle.write_bps_device"),
                format!("{} {bytes_per_second}", self.major_minor),
            ),
            Throttle::V2(dir) => (
                dir.join("io.max"),
                if bytes_per_second == 0 {
                    format!("{} wbps=max", self.major_minor)
                } else {
                    format!("{} wbps={bytes_per_second}", self.major_minor)
                },
            ),
        };
        std::fs::write(&file, line).map_err(|e| format!("write {}: {e}", file.display()))
    }

    /// From now on, writes of the cgroup's processes to the device wait in
    /// the kernel (1 byte/s: a 4 KiB write would take over an hour).
    pub fn hold_writes(&self) -> Result<(), String> {
        self.set_throttle(1)
    }

    /// Let the held writes (and all later ones) go to the device.
    pub fn release_writes(&self) -> Result<(), String> {
        self.set_throttle(0)
    }

    /// Bytes of data the cgroup's processes have written to the device so
    /// far, held ones included (the kernel counts a bio when it enters the
    /// throttle): blkio.throttle.io_service_bytes (v1) or io.stat `wbytes`
    /// (v2). Bytes, not bios: a cache flush is a write bio of 0 bytes that
    /// the throttle lets through at once, so a bio count can grow while no
    /// data at all is held.
    pub fn write_bytes_submitted(&self) -> Result<u64, String> {
        let (file, key) = match &self.throttle {
            Throttle::V1(dir) => (dir.join("blkio.throttle.io_service_bytes"), "Write"),
            Throttle::V2(dir) => (dir.join("io.stat"), "wbytes="),
        };
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("read {}: {e}", file.display()))?;
        // v1: `MAJ:MIN Write N`; v2: `MAJ:MIN rbytes=.. wbytes=N rios=.. ..`.
        let count = text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != self.major_minor {
                return None;
            }
            match &self.throttle {
                Throttle::V1(_) => (words.next()? == key)
                    .then(|| words.next()?.parse().ok())
                    .flatten(),
                Throttle::V2(_) => words.find_map(|w| w.strip_prefix(key)?.parse().ok()),
            }
        });
        // No line yet: nothing was submitted.
        Ok(count.unwrap_or(0))
    }

    /// Completed writes the loop device has seen (the fifth field of its
    /// `stat`): a write still held in the throttle is not counted.
    pub fn writes_completed(&self) -> Result<u64, String> {
        let name = self.device.trim_start_matches("/dev/");
        let path = format!("/sys/block/{name}/stat");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
        text.split_whitespace()
            .nth(4)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{path}: unexpected content {text:?}"))
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let _ = self.release_writes();
        // Lazy: a process of a failed test may still hold a file open.
        let _ = run("umount", &["-l", &self.mount_point.display().to_string()]);
        let _ = run("losetup", &["-d", &self.device]);
        // Fails while a process is still inside; the processes a test
        // started are killed by their guards before this runs.
        if let Err(e) = std::fs::remove_dir(&self.cgroup) {
            eprintln!("slow disk: cannot remove {}: {e}", self.cgroup.display());
        }
        let _ = std::fs::remove_file(&self.backing);
    }
}
