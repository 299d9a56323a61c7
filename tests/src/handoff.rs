//! The rig of the in-flight handoff tests (`tests/tests/blk_handoff.rs`):
//! a scratch directory with one patterned image, agents serving it (each
//! with a control socket), a workload of reads and writes, and the checks
//! the tests share. Assertions use what the agents report through the
//! control API (`in-flight`, the write fence's counts), never how long
//! something took.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::frontend::{
    wait_until, BlkRequest, Submitted, TestFrontend, STATUS_UNSET, VIRTIO_BLK_S_OK,
};
use crate::support::{create_image, spawn_agent, ChildGuard};

/// Ring size of every test (the agent's default maximum).
pub const QUEUE_SIZE: u16 = 256;
/// Requests in flight at the stop.
pub const REQUESTS: usize = 128;
/// Every request moves one 4 KiB block.
pub const BLOCK: usize = 4096;
/// Sectors per block.
pub const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
/// Image size.
pub const IMAGE_SIZE: u64 = 64 << 20;
/// Blocks at the start of the image filled with a known pattern.
pub const PATTERNED_BLOCKS: u64 = 256;
/// A block no workload touches, for requests after a handoff.
pub const SPARE_BLOCK: u64 = 1024;
/// `--blk` keys of a source agent: storage latency far above the few
/// system calls the test makes between seeing requests in flight and
/// stopping the source, so they are still in flight at the stop.
pub const SOURCE_KEYS: &str = "latency-ms=500";
/// Requests must be taken by the agent (marked in the region) within this.
pub const TAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests must complete within this.
pub const COMPLETE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pattern tag of the image's initial content.
pub const IMAGE_TAG: u64 = 0x1a;
/// Pattern tag of the data the workload writes.
pub const WRITE_TAG: u64 = 0x2b;
/// What read buffers hold before the device fills them.
pub const READ_SENTINEL: u8 = 0x5a;

/// 4 KiB of pseudo-random bytes, distinct for every (`tag`, `block`).
pub fn pattern(tag: u64, block: u64) -> Vec<u8> {
    let mut state = (tag << 32 ^ block).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..BLOCK)
        .map(|_| {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A scratch directory with one patterned image and the agents serving it.
pub struct Host {
    /// The scratch directory (image, sockets, logs).
    pub dir: tempfile::TempDir,
    /// The patterned image every agent serves.
    pub image: PathBuf,
    logs: Vec<PathBuf>,
}

/// One agent process serving the host's image, with its control socket.
pub struct Agent {
    /// The process.
    pub guard: ChildGuard,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
}

impl Host {
    /// A scratch directory with the patterned image.
    pub fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        create_image(&image, IMAGE_SIZE).unwrap();
        let file = File::options().write(true).open(&image).unwrap();
        for block in 0..PATTERNED_BLOCKS {
            file.write_all_at(&pattern(IMAGE_TAG, block), block * BLOCK as u64)
                .unwrap();
        }
        Host {
            dir,
            image,
            logs: Vec::new(),
        }
    }

    /// Start an agent named `name` (its socket is `<name>.sock`) with extra
    /// `--blk` keys `keys` (comma-separated, may be empty).
    pub fn agent(&mut self, name: &str, keys: &str) -> Agent {
        let socket = self.dir.path().join(format!("{name}.sock"));
        self.agent_on(&socket, name, keys)
    }

    /// Start an agent named `name` on `socket` (a dead agent's socket is
    /// removed first, so the wait for the socket means the new one), with
    /// its control API on `<name>.ctl`.
    pub fn agent_on(&mut self, socket: &Path, name: &str, keys: &str) -> Agent {
        let _ = std::fs::remove_file(socket);
        let socket = socket.to_path_buf();
        let control = self.dir.path().join(format!("{name}.ctl"));
        let control_arg = control.display().to_string();
        let log = self.dir.path().join(format!("{name}.log"));
        let mut spec = format!(
            "socket={},image={},id={name}",
            socket.display(),
            self.image.display()
        );
        if !keys.is_empty() {
            spec = format!("{spec},{keys}");
        }
        let args = ["--log-level", "debug", "--control", &control_arg];
        let guard = spawn_agent(&[spec], &args, Some(&log));
        self.logs.push(log);
        Agent {
            guard,
            socket,
            control,
        }
    }

    /// Block `block` of the image as it is now.
    pub fn image_block(&self, block: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; BLOCK];
        File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut bytes, block * BLOCK as u64)
            .unwrap();
        bytes
    }

    /// Whether someone holds a lock on `<image>.fence` (the source's write
    /// fence with `fence=lock`), asked with F_OFD_GETLK, which takes no lock.
    pub fn fence_held(&self) -> bool {
        let mut path = self.image.clone().into_os_string();
        path.push(".fence");
        let Ok(file) = File::open(&path) else {
            return false;
        };
        // SAFETY: `flock` is plain old data; all-zero is a valid value.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_OFD_GETLK reads and writes the `flock` we pass, which
        // lives on our stack for the duration of the call.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
        assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
        lock.l_type != libc::F_UNLCK as libc::c_short
    }
}

impl Default for Host {
    fn default() -> Host {
        Host::new()
    }
}

impl Drop for Host {
    /// On a failure, show what the agents said.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("--- {} (last 40 lines)\n{}", log.display(), tail.join("\n"));
            }
        }
    }
}

/// The agent's only disk as its `query-devices` shows it.
pub fn disk_state(agent: &Agent) -> serde_json::Value {
    control(&agent.control, "query-devices", serde_json::json!({}))[0].clone()
}

/// What `agent` holds per queue: requests taken and not answered, or, after
/// a suspend, abandoned storage operations still running.
pub fn in_flight(agent: &Agent) -> Vec<u64> {
    disk_state(agent)["in-flight"]
        .as_array()
        .expect("in-flight is an array")
        .iter()
        .map(|n| n.as_u64().expect("a count"))
        .collect()
}

/// Wait until `agent` holds nothing: no request in flight on any queue
/// and no abandoned write outstanding (so nothing it started can touch
/// guest memory or the image any more).
pub fn wait_idle(agent: &Agent) {
    let idle = wait_until(COMPLETE_TIMEOUT, || {
        let state = disk_state(agent);
        in_flight(agent).iter().all(|&n| n == 0) && state["fence"]["abandoned-outstanding"] == 0
    });
    assert!(idle, "the agent still holds work: {}", disk_state(agent));
}

/// Wait until `agent` reports `count` requests in flight on `queue`: the
/// precondition of a stop that leaves them in flight.
pub fn wait_in_flight(agent: &Agent, queue: usize, count: u64) {
    let reached = wait_until(TAKE_TIMEOUT, || in_flight(agent)[queue] == count);
    assert!(
        reached,
        "queue {queue}: the agent reports {:?} in flight, not {count}",
        in_flight(agent)
    );
}

/// Storage operations `agent` abandoned at suspends so far.
pub fn abandoned_total(agent: &Agent) -> u64 {
    disk_state(agent)["fence"]["abandoned-total"]
        .as_u64()
        .expect("abandoned-total is a count")
}

/// `count` 4 KiB requests on `queue`, in slots and blocks `first..`:
/// writes of distinct patterns on even blocks, reads on odd ones.
pub fn workload(fe: &mut TestFrontend, queue: usize, first: u64, count: usize) -> Vec<Submitted> {
    let requests: Vec<BlkRequest> = (first..first + count as u64)
        .map(|block| {
            let sector = block * SECTORS_PER_BLOCK;
            if block % 2 == 0 {
                fe.fill(block, &pattern(WRITE_TAG, block));
                BlkRequest::write(block, sector, BLOCK as u32)
            } else {
                fe.fill(block, &[READ_SENTINEL; BLOCK]);
                BlkRequest::read(block, sector, BLOCK as u32)
            }
        })
        .collect();
    fe.submit(queue, &requests)
}

/// Wait until the agent has taken `count` requests of `queue` (marked them
/// in the inflight region).
pub fn wait_taken(fe: &TestFrontend, queue: usize, count: usize) {
    let taken = wait_until(TAKE_TIMEOUT, || {
        fe.region().queue(queue).inflight_count() == count
    });
    assert!(
        taken,
        "queue {queue}: {} of {count} requests marked in flight in the region",
        fe.region().queue(queue).inflight_count()
    );
}

/// Every submitted request was reported exactly once in `heads`, with
/// status OK, and no further used entry came by the time `agent` reports
/// that it holds nothing any more.
pub fn assert_completed_once(
    agent: &Agent,
    fe: &mut TestFrontend,
    submitted: &[Submitted],
    heads: &[u16],
) {
    let mut got = heads.to_vec();
    got.sort_unstable();
    let mut want: Vec<u16> = submitted.iter().map(|s| s.head).collect();
    want.sort_unstable();
    assert_eq!(got, want, "used heads are not each submitted head once");
    for s in submitted {
        assert_eq!(
            fe.status(s.request.slot),
            VIRTIO_BLK_S_OK,
            "head {} ({:?}) status",
            s.head,
            s.request
        );
    }
    let queue = submitted[0].queue;
    wait_idle(agent);
    let extra = fe.queues[queue].take_used(&fe.ram);
    assert!(extra.is_empty(), "requests completed twice: {extra:?}");
}

/// Writes are on the image, reads brought the image's content.
pub fn assert_data(host: &Host, fe: &TestFrontend, submitted: &[Submitted]) {
    for s in submitted {
        let block = s.request.sector / SECTORS_PER_BLOCK;
        if s.request.is_write() {
            assert!(
                host.image_block(block) == pattern(WRITE_TAG, block),
                "block {block}: the write of head {} is not on the image",
                s.head
            );
        } else {
            assert!(
                fe.data(s.request.slot, BLOCK) == pattern(IMAGE_TAG, block),
                "block {block}: the read of head {} did not bring the image's data",
                s.head
            );
        }
    }
}

/// The first byte where two snapshots of guest RAM differ.
pub fn first_difference(before: &[u8], after: &[u8]) -> Option<usize> {
    before.iter().zip(after).position(|(a, b)| a != b)
}

/// Guest RAM and the inflight region right after a stop.
pub struct Snapshot {
    /// All of guest RAM.
    pub ram: Vec<u8>,
    /// The inflight region's bytes.
    pub region: Vec<u8>,
}

impl Snapshot {
    /// Guest RAM and the region of `fe` as they are now.
    pub fn take(fe: &TestFrontend) -> Snapshot {
        Snapshot {
            ram: fe.ram.snapshot(),
            region: fe.region().bytes(),
        }
    }
}

/// What a suspended source must not have written for `submitted`: a used
/// entry, a status byte, or a read's data (its buffer still holds the
/// sentinel).
pub fn assert_untouched(src: &TestFrontend, submitted: &[Submitted]) {
    let queue = submitted[0].queue;
    assert_eq!(
        src.queues[queue].pending_used(&src.ram),
        0,
        "the suspended source published used entries on queue {queue}"
    );
    for s in submitted {
        assert_eq!(
            src.status(s.request.slot),
            STATUS_UNSET,
            "the suspended source wrote the status of head {}",
            s.head
        );
        if !s.request.is_write() {
            assert!(
                src.data(s.request.slot, BLOCK) == [READ_SENTINEL; BLOCK],
                "the suspended source wrote the data of the read with head {} \
                 (block {}) into guest memory after its GET_VRING_BASE reply",
                s.head,
                s.request.sector / SECTORS_PER_BLOCK
            );
        }
    }
}

/// A suspended source must leave guest memory and its inflight region as
/// they were at `snapshot`, even as its abandoned storage operations
/// finish: nothing changed once the source reports them all finished.
pub fn assert_source_stays_quiet(
    source: &Agent,
    src: &TestFrontend,
    snapshot: &Snapshot,
    submitted: &[Submitted],
) {
    wait_idle(source);
    assert_untouched(src, submitted);
    if let Some(at) = first_difference(&snapshot.ram, &src.ram.snapshot()) {
        panic!("the suspended source wrote guest memory (first change at gpa {at:#x})");
    }
    if let Some(at) = first_difference(&snapshot.region, &src.region().bytes()) {
        panic!("the suspended source changed its inflight region (offset {at:#x})");
    }
}

/// One control API call (a JSON line each way); returns `"return"`.
pub fn control(path: &Path, execute: &str, arguments: serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = serde_json::json!({ "execute": execute, "arguments": arguments });
    (&stream)
        .write_all(format!("{request}\n").as_bytes())
        .unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    reply
        .get("return")
        .cloned()
        .unwrap_or_else(|| panic!("{execute} failed: {reply}"))
}

/// The `fence` object `query-devices` reports for the agent's only disk.
pub fn fence_state(path: &Path) -> serde_json::Value {
    control(path, "query-devices", serde_json::json!({}))[0]["fence"].clone()
}
