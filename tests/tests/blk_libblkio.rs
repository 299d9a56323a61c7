//! vhost-agent against libblkio, a real vhost-user-blk client we did not
//! write (its `virtio-blk-vhost-user` driver, through
//! [`vhost_agent_tests::blkio_client`]): data integrity checked through the
//! device and in the image file, flush, discard, write-zeroes, out-of-range
//! errors, four queues driven from four threads, reconnects, read-only disks
//! and two disks in one process.
//!
//! The `qsd_*` tests run the same checks against qemu-storage-daemon. They
//! are the control: they prove the client wrapper and the checks are right,
//! so a failing `agent_*` test points at the agent. They need
//! qemu-storage-daemon (`sudo scripts/install-test-deps.sh`); without it
//! they fail, they do not skip.
//!
//! When a test fails, the back-end's log is printed after the panic message.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use vhost_agent_tests::blkio_client::{
    fill_pattern, random_blocks, verify_image_blocks, BlkioClient, ClientError, ClientOptions,
    Direction, QueueIo, Workload,
};
use vhost_agent_tests::frontend::{Desc, TestFrontend, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use vhost_agent_tests::qemu::{spawn_qemu_storage_daemon, QsdOptions};
use vhost_agent_tests::support::{self, ChildGuard};
use vm_memory::{Bytes, GuestAddress};

/// Size of each test image.
const IMAGE_SIZE: u64 = 64 << 20;
/// Block size of the pattern I/O.
const BS: usize = 4096;
/// Blocks in an image.
const BLOCKS: u64 = IMAGE_SIZE / BS as u64;
/// Queue depth of the pattern I/O.
const QD: usize = 32;
/// Blocks of the big write/verify test.
const PATTERN_BLOCKS: usize = 4000;

/// One disk of a [`Server`].
struct Disk {
    socket: PathBuf,
    image: PathBuf,
}

/// A running back-end (vhost-agent or qemu-storage-daemon) and its disks.
/// If the test panics while it lives, dropping it prints the back-end's
/// log, so the failure report carries the back-end's side of the story.
struct Server {
    name: &'static str,
    disks: Vec<Disk>,
    log: PathBuf,
    child: ChildGuard,
    _dirs: Vec<tempfile::TempDir>,
}

/// A disk to create for [`Server::agent`].
struct DiskSpec<'a> {
    /// Image size in bytes.
    size: u64,
    /// Extra `--blk` options, e.g. `num-queues=4,readonly` (may be empty).
    options: &'a str,
}

impl<'a> DiskSpec<'a> {
    fn new(size: u64, options: &'a str) -> DiskSpec<'a> {
        DiskSpec { size, options }
    }
}

impl Server {
    /// Create sparse images per `specs`, let `prepare` put content into
    /// them, and start vhost-agent with one `--blk` per disk.
    fn agent_with(specs: &[DiskSpec<'_>], prepare: impl FnOnce(&[Disk])) -> Server {
        // Sockets in the temporary directory (short paths); images under the
        // target directory, because O_DIRECT (`direct`) fails on tmpfs.
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| support::workspace_root().join("target"));
        std::fs::create_dir_all(&target).expect("create the target directory");
        let image_dir = tempfile::Builder::new()
            .prefix("blk_libblkio.")
            .tempdir_in(&target)
            .expect("create a directory for images");
        let disks: Vec<Disk> = (0..specs.len())
            .map(|i| Disk {
                socket: dir.path().join(format!("blk{i}.sock")),
                image: image_dir.path().join(format!("disk{i}.img")),
            })
            .collect();
        for (disk, spec) in disks.iter().zip(specs) {
            support::create_image(&disk.image, spec.size).expect("create an image file");
        }
        prepare(&disks);
        let blk: Vec<String> = disks
            .iter()
            .zip(specs)
            .map(|(disk, spec)| {
                let mut s = format!(
                    "socket={},image={}",
                    disk.socket.display(),
                    disk.image.display()
                );
                if !spec.options.is_empty() {
                    s.push(',');
                    s.push_str(spec.options);
                }
                s
            })
            .collect();
        let log = dir.path().join("agent.log");
        let child = support::spawn_agent(&blk, &[], Some(&log));
        Server {
            name: "vhost-agent",
            disks,
            log,
            child,
            _dirs: vec![dir, image_dir],
        }
    }

    /// vhost-agent serving one fresh sparse image with `options`.
    fn agent(options: &str) -> Server {
        Server::agent_with(&[DiskSpec::new(IMAGE_SIZE, options)], |_| {})
    }

    /// qemu-storage-daemon exporting one fresh sparse image (panics with a
    /// pointer to scripts/install-test-deps.sh when it is not installed).
    fn qsd() -> Server {
        assert!(
            support::have_program("qemu-storage-daemon"),
            "qemu-storage-daemon is not installed; it is the control of these tests. \
             Run `sudo scripts/install-test-deps.sh` from the workspace root."
        );
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let disk = Disk {
            socket: dir.path().join("qsd.sock"),
            image: dir.path().join("disk0.img"),
        };
        support::create_image(&disk.image, IMAGE_SIZE).expect("create an image file");
        let log = dir.path().join("qsd.log");
        let child =
            spawn_qemu_storage_daemon(&disk.image, &disk.socket, &QsdOptions::default(), &log);
        Server {
            name: "qemu-storage-daemon",
            disks: vec![disk],
            log,
            child,
            _dirs: vec![dir],
        }
    }

    /// Connect a client to disk `disk` with `options`, or panic saying why.
    fn connect_with(&self, disk: usize, options: &ClientOptions) -> BlkioClient {
        BlkioClient::connect_with(&self.disks[disk].socket, options).unwrap_or_else(|e| {
            panic!(
                "libblkio could not connect to {} disk {disk} ({}): {e}",
                self.name,
                self.disks[disk].socket.display()
            )
        })
    }

    /// Connect a client with `queues` queues and a pool of `QD` blocks per
    /// queue to disk `disk`.
    fn connect(&self, disk: usize, queues: usize) -> BlkioClient {
        self.connect_with(
            disk,
            &ClientOptions {
                num_queues: queues,
                buffer_bytes: queues * QD * BS,
                ..ClientOptions::default()
            },
        )
    }

    /// The image file behind disk `disk`, read directly.
    fn image(&self, disk: usize) -> Vec<u8> {
        std::fs::read(&self.disks[disk].image).expect("read the image file")
    }

    /// Panic unless the back-end process is still running.
    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.child.try_wait() {
            panic!("{} exited with {status}", self.name);
        }
    }

    /// End of an agent test: the agent is still running, shuts down
    /// cleanly on SIGTERM, and never panicked.
    fn finish(mut self) {
        self.assert_alive();
        self.child.signal(libc::SIGTERM);
        let status = self.child.wait_timeout(Duration::from_secs(10));
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(
            !log.contains("panicked"),
            "{} panicked during the test",
            self.name
        );
        match status {
            Some(status) => assert!(
                status.success(),
                "{} exited with {status} after SIGTERM",
                self.name
            ),
            None => panic!("{} did not exit within 10 s of SIGTERM", self.name),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("BLK_TEST_SHOW_LOG").is_some() {
            eprintln!(
                "---- last lines of the {} log ({}) ----\n{}\n---- end of log ----",
                self.name,
                self.log.display(),
                self.log_tail(60)
            );
        }
    }
}

/// Unwrap a client result, naming what was being done.
#[track_caller]
fn ok<T>(result: Result<T, ClientError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Every block in `blocks` of `image` holds its pattern for `seed`, and
/// (with `rest_zero`) every other block is still all zeroes.
#[track_caller]
fn assert_image(image: &[u8], blocks: &[u64], seed: u64, rest_zero: bool) {
    assert_eq!(image.len() as u64, IMAGE_SIZE, "image file changed size");
    if let Err(e) = verify_image_blocks(image, blocks, BS, seed) {
        panic!("image file on disk is wrong: {e}");
    }
    if rest_zero {
        let mut written = vec![false; BLOCKS as usize];
        for &b in blocks {
            written[b as usize] = true;
        }
        for (block, data) in image.chunks(BS).enumerate() {
            assert!(
                written[block] || data.iter().all(|&b| b == 0),
                "image block {block} was never written but is not zero: stray write"
            );
        }
    }
}

/// Test 1: 4000 random 4 KiB blocks written at queue depth 32, each with
/// content derived from its LBA and a seed, read back and verified through
/// the device, then found at the right place in the image file.
fn pattern_write_verify(server: &Server) {
    let mut client = server.connect(0, 1);
    assert_eq!(client.capacity(), IMAGE_SIZE, "capacity of {}", server.name);
    let seed = 0x1111;
    let blocks = random_blocks(BLOCKS, PATTERN_BLOCKS, seed);
    let mut q = client.queue(0);
    ok(q.write_pattern(&blocks, BS, QD, seed), "pattern write");
    ok(q.verify_pattern(&blocks, BS, QD, seed), "pattern read-back");
    // Again in a different order and at depth 1.
    let mut sorted = blocks.clone();
    sorted.sort_unstable();
    ok(
        q.verify_pattern(&sorted[..256], BS, 1, seed),
        "read-back at QD 1",
    );
    ok(q.flush(), "flush");
    drop(client);
    assert_image(&server.image(0), &blocks, seed, true);
}

/// Test 2: flush on an idle device, after writes, and behind writes still in
/// flight.
fn flush_succeeds(server: &Server) {
    let mut client = server.connect(0, 1);
    let mut q = client.queue(0);
    ok(q.flush(), "flush of an idle device");
    ok(q.write_pattern(&[1, 2, 3], BS, 3, 7), "write");
    ok(q.flush(), "flush after writes");
    for slot in 0..8 {
        fill_pattern(
            100 + slot as u64,
            7,
            &mut q.pool()[slot * BS..(slot + 1) * BS],
        );
        q.submit_write((100 + slot as u64) * BS as u64, slot * BS, BS, slot);
    }
    q.submit_flush(99);
    let done = ok(q.wait_all(9, "8 writes and a flush"), "writes + flush");
    for d in &done {
        assert_eq!(
            d.ret, 0,
            "request {} (99 = the flush) failed: {d:?}",
            d.user_data
        );
    }
    ok(
        q.verify_pattern(&[1, 2, 3, 100, 107], BS, 4, 7),
        "read-back",
    );
    drop(client);
    let image = server.image(0);
    assert_image(&image, &[1, 2, 3, 100, 101, 102, 107], 7, false);
}

/// Test 3: discard succeeds; write-zeroes (unmap allowed, and with
/// NO_UNMAP) makes its range read as zeroes, through the device and in the
/// file, and leaves the neighbours intact.
fn discard_and_write_zeroes(server: &Server) {
    let mut client = server.connect(0, 1);
    for prop in ["max-discard-len", "max-write-zeroes-len"] {
        let value = ok(client.property_u64(prop), prop);
        assert!(
            value > 0,
            "{} does not offer {prop} (VIRTIO_BLK_F_DISCARD / F_WRITE_ZEROES missing?)",
            server.name
        );
    }
    let seed = 0x3333;
    let first = 1000u64;
    let all: Vec<u64> = (first..first + 256).collect();
    let mut q = client.queue(0);
    ok(q.write_pattern(&all, BS, QD, seed), "pattern write");
    let bytes = |blocks: u64| blocks * BS as u64;

    // Discarded content is unspecified; the request must just succeed and
    // leave the neighbours alone.
    ok(q.discard(bytes(first), bytes(16)), "discard of 16 blocks");
    // Zeroes, unmapping allowed, 64 blocks.
    ok(
        q.write_zeroes(bytes(first + 100), bytes(64)),
        "write-zeroes of 64 blocks",
    );
    // Zeroes without unmapping, one block.
    q.submit_write_zeroes(bytes(first + 200), bytes(1), true, 0);
    let done = ok(
        q.wait_all(1, "write-zeroes NO_UNMAP"),
        "write-zeroes NO_UNMAP",
    );
    assert_eq!(
        done[0].ret, 0,
        "write-zeroes with NO_UNMAP failed: {done:?}"
    );
    // A sub-block (512-byte) write-zeroes in the middle of a block.
    ok(
        q.write_zeroes(bytes(first + 210) + 1024, 512),
        "write-zeroes of 512 bytes",
    );

    let zeroed: Vec<u64> = (first + 100..first + 164).chain([first + 200]).collect();
    for &block in &zeroed {
        let data = ok(q.read(bytes(block), BS), "read of a zeroed block");
        assert!(
            data.iter().all(|&b| b == 0),
            "block {block} reads back non-zero after write-zeroes"
        );
    }
    let intact: Vec<u64> = all
        .iter()
        .copied()
        .filter(|b| *b >= first + 16 && !zeroed.contains(b) && *b != first + 210)
        .collect();
    ok(
        q.verify_pattern(&intact, BS, QD, seed),
        "neighbours of discard/write-zeroes",
    );
    let mut expected = vec![0u8; BS];
    fill_pattern(first + 210, seed, &mut expected);
    expected[1024..1536].fill(0);
    let got = ok(
        q.read(bytes(first + 210), BS),
        "read of the partly zeroed block",
    );
    assert!(
        got == expected,
        "512-byte write-zeroes hit the wrong bytes of block {}",
        first + 210
    );
    ok(q.flush(), "flush");
    drop(client);

    let image = server.image(0);
    assert_image(&image, &intact, seed, false);
    for &block in &zeroed {
        let at = bytes(block) as usize;
        assert!(
            image[at..at + BS].iter().all(|&b| b == 0),
            "block {block} is not zero in the image file after write-zeroes"
        );
    }
    let at = bytes(first + 210) as usize;
    assert!(
        image[at..at + BS] == expected,
        "partly zeroed block wrong in the image file"
    );
}

/// Test 4: reads and writes beyond the capacity fail, and the same
/// connection, and new ones, keep serving correct I/O.
fn out_of_range(server: &mut Server) {
    let mut client = server.connect(0, 1);
    let cap = client.capacity();
    let mut q = client.queue(0);
    let cases: [(&str, u64, usize); 4] = [
        ("read at the capacity", cap, BS),
        ("read straddling the end", cap - 512, BS),
        ("read far beyond the end", cap * 1024, BS),
        ("read of the last 512-byte sector below 2^64", !511u64, 512),
    ];
    for (what, offset, len) in cases {
        match q.read(offset, len) {
            Err(ClientError::Request { errno, .. }) => {
                assert_eq!(
                    errno,
                    libc::EIO,
                    "{what}: expected EIO (VIRTIO_BLK_S_IOERR)"
                )
            }
            Err(e) => panic!("{what} failed, but not as a request error: {e}"),
            Ok(_) => {
                panic!("{what} (offset {offset:#x}, {len} bytes) succeeded on a {cap}-byte disk")
            }
        }
    }
    let junk = vec![0x5au8; BS];
    for (what, offset) in [
        ("write at the capacity", cap),
        ("write straddling the end", cap - 512),
    ] {
        match q.write(offset, &junk) {
            Err(ClientError::Request { errno, .. }) => {
                assert_eq!(
                    errno,
                    libc::EIO,
                    "{what}: expected EIO (VIRTIO_BLK_S_IOERR)"
                )
            }
            Err(e) => panic!("{what} failed, but not as a request error: {e}"),
            Ok(()) => panic!("{what} succeeded on a {cap}-byte disk"),
        }
    }
    // A batch mixing good and bad requests: only the bad one fails.
    let seed = 0x4444;
    for slot in 0..4 {
        fill_pattern(slot as u64, seed, &mut q.pool()[slot * BS..(slot + 1) * BS]);
    }
    q.submit_write(0, 0, BS, 0);
    q.submit_write(cap, BS, BS, 1);
    q.submit_write(2 * BS as u64, 2 * BS, BS, 2);
    let done = ok(q.wait_all(3, "mixed batch"), "mixed batch");
    for d in done {
        match d.user_data {
            1 => assert_eq!(d.ret, -libc::EIO, "out-of-range write in a batch"),
            _ => assert_eq!(d.ret, 0, "good write next to an out-of-range one: {d:?}"),
        }
    }

    // The same connection still serves, including the very last block.
    let last = cap / BS as u64 - 1;
    let blocks: Vec<u64> = random_blocks(last, 500, seed)
        .into_iter()
        .chain([last])
        .collect();
    ok(
        q.write_pattern(&blocks, BS, QD, seed),
        "pattern write after errors",
    );
    ok(
        q.verify_pattern(&blocks, BS, QD, seed),
        "read-back after errors",
    );
    drop(client);
    server.assert_alive();

    // And so does a new connection.
    let mut client = server.connect(0, 1);
    ok(
        client.queue(0).verify_pattern(&blocks, BS, QD, seed),
        "read-back on a new connection",
    );
    drop(client);
    let image = server.image(0);
    assert_image(&image, &blocks, seed, false);
}

/// Pattern write then read-back of `blocks` on one queue.
fn write_then_verify(q: &mut QueueIo<'_>, blocks: &[u64], seed: u64) {
    let index = q.index();
    ok(
        q.write_pattern(blocks, BS, QD, seed),
        &format!("pattern write on queue {index}"),
    );
    ok(
        q.verify_pattern(blocks, BS, QD, seed),
        &format!("read-back on queue {index}"),
    );
}

// ---------------------------------------------------------------- qsd control

#[test]
fn qsd_pattern_write_verify_4000_random_blocks() {
    let server = Server::qsd();
    pattern_write_verify(&server);
    server.finish();
}

#[test]
fn qsd_flush_succeeds() {
    let server = Server::qsd();
    flush_succeeds(&server);
    server.finish();
}

#[test]
fn qsd_discard_and_write_zeroes() {
    let server = Server::qsd();
    discard_and_write_zeroes(&server);
    server.finish();
}

#[test]
fn qsd_out_of_range_fails_and_connection_keeps_serving() {
    let mut server = Server::qsd();
    out_of_range(&mut server);
    server.finish();
}

/// The checks are not vacuous: wrong, misplaced and missing data are all
/// reported, through the device and in the image file.
#[test]
fn qsd_checks_detect_wrong_data() {
    let server = Server::qsd();
    let mut client = server.connect(0, 1);
    let mut q = client.queue(0);
    let blocks: Vec<u64> = (10..20).collect();
    ok(q.write_pattern(&blocks, BS, QD, 1), "pattern write");
    let wrong_seed = q.verify_pattern(&blocks, BS, QD, 2);
    assert!(
        matches!(wrong_seed, Err(ClientError::Mismatch { .. })),
        "another seed's data passed verification: {wrong_seed:?}"
    );
    let never_written = q.verify_pattern(&[30], BS, 1, 1);
    assert!(
        matches!(&never_written, Err(ClientError::Mismatch { detail, .. }) if detail.contains("zeroes")),
        "a never-written block passed verification: {never_written:?}"
    );
    // Block 12's content written at block 15: misplaced data.
    let mut data = vec![0u8; BS];
    fill_pattern(12, 1, &mut data);
    ok(q.write(15 * BS as u64, &data), "misplaced write");
    let misplaced = q.verify_pattern(&blocks, BS, QD, 1);
    assert!(
        matches!(&misplaced, Err(ClientError::Mismatch { offset, detail })
            if *offset == 15 * BS as u64 && detail.contains("block 12")),
        "misplaced block not reported as such: {misplaced:?}"
    );
    ok(q.flush(), "flush");
    drop(client);
    let mut image = server.image(0);
    assert!(
        verify_image_blocks(&image, &blocks, BS, 1).is_err(),
        "image check missed the misplaced block"
    );
    image[11 * BS + 100] ^= 1;
    assert!(
        verify_image_blocks(&image, &[11], BS, 1).is_err(),
        "image check missed a flipped bit"
    );
    server.finish();
}

// ---------------------------------------------------------------- the agent

#[test]
fn agent_pattern_write_verify_4000_random_blocks() {
    let server = Server::agent("");
    pattern_write_verify(&server);
    server.finish();
}

#[test]
fn agent_pattern_write_verify_o_direct_threads_engine() {
    let server = Server::agent("direct,engine=threads");
    pattern_write_verify(&server);
    server.finish();
}

#[test]
fn agent_flush_succeeds() {
    let server = Server::agent("");
    flush_succeeds(&server);
    server.finish();
}

#[test]
fn agent_discard_and_write_zeroes() {
    let server = Server::agent("");
    discard_and_write_zeroes(&server);
    server.finish();
}

#[test]
fn agent_out_of_range_fails_and_connection_keeps_serving() {
    let mut server = Server::agent("");
    out_of_range(&mut server);
    server.finish();
}

/// Test 5: four queues, each driven from its own thread at queue depth 32;
/// each thread then reads back another queue's blocks.
#[test]
fn agent_multiqueue_four_queues_from_four_threads() {
    let server = Server::agent("num-queues=4");
    let mut client = server.connect(0, 4);
    assert_eq!(client.max_queues(), 4, "device num_queues in config space");
    assert_eq!(client.num_queues(), 4);
    let seed = 0x5555;
    let blocks = random_blocks(BLOCKS, 4 * 1000, seed);
    let shares: Vec<&[u64]> = blocks.chunks(1000).collect();
    std::thread::scope(|s| {
        for mut q in client.split_queues() {
            let share = shares[q.index()];
            s.spawn(move || write_then_verify(&mut q, share, seed));
        }
    });
    std::thread::scope(|s| {
        for mut q in client.split_queues() {
            // Read back what the next queue wrote.
            let share = shares[(q.index() + 1) % 4];
            s.spawn(move || {
                let index = q.index();
                ok(
                    q.verify_pattern(share, BS, QD, seed),
                    &format!("cross-queue read-back on queue {index}"),
                )
            });
        }
    });
    drop(client);
    assert_image(&server.image(0), &blocks, seed, true);
    server.finish();
}

/// Test 6: data written by one client is there for the next, across
/// several disconnects, including one with requests still in flight.
#[test]
fn agent_client_disconnect_and_reconnect() {
    let mut server = Server::agent("");
    let blocks = random_blocks(BLOCKS, 256, 6);
    let mut previous_seed = None;
    for round in 0..5u64 {
        let seed = 0x6600 + round;
        let mut client = server.connect(0, 1);
        let mut q = client.queue(0);
        if let Some(prev) = previous_seed {
            ok(
                q.verify_pattern(&blocks, BS, QD, prev),
                &format!("round {round}: data of the previous connection"),
            );
        }
        ok(
            q.write_pattern(&blocks, BS, QD, seed),
            &format!("round {round}: write"),
        );
        ok(
            q.verify_pattern(&blocks, BS, QD, seed),
            &format!("round {round}: read-back"),
        );
        previous_seed = Some(seed);
        drop(client);
        server.assert_alive();
    }

    // Disconnect with 32 writes in flight (to blocks outside `blocks`).
    let others: Vec<u64> = (0..BLOCKS)
        .filter(|b| !blocks.contains(b))
        .take(QD)
        .collect();
    {
        let mut client = server.connect(0, 1);
        let mut q = client.queue(0);
        for (slot, &block) in others.iter().enumerate() {
            fill_pattern(block, 0x66ff, &mut q.pool()[slot * BS..(slot + 1) * BS]);
            q.submit_write(block * BS as u64, slot * BS, BS, slot);
        }
        // Kick the device but do not wait.
        ok(q.reap(0, QD), "submitting without waiting");
    }
    server.assert_alive();
    let mut client = server.connect(0, 1);
    let mut q = client.queue(0);
    ok(
        q.verify_pattern(&blocks, BS, QD, previous_seed.expect("rounds ran")),
        "data after a disconnect with requests in flight",
    );
    ok(
        q.write_pattern(&others, BS, QD, 0x6700),
        "write after the aborted session",
    );
    ok(
        q.verify_pattern(&others, BS, QD, 0x6700),
        "read-back after the aborted session",
    );
    drop(client);
    let image = server.image(0);
    assert_image(&image, &blocks, previous_seed.expect("rounds ran"), false);
    assert_image(&image, &others, 0x6700, false);
    server.finish();
}

/// virtio-blk discard.
const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// virtio-blk write-zeroes.
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Send one request of `request_type` with a device-readable `payload`
/// through the test front-end's queue 0; returns the status byte, or None
/// if the agent never completed it.
fn raw_request(frontend: &mut TestFrontend, request_type: u32, payload: &[u8]) -> Option<u8> {
    let (header, data, status) = TestFrontend::buffers(1);
    frontend.write_header(header, request_type, 0);
    frontend
        .ram
        .mem
        .write_slice(payload, GuestAddress(data))
        .expect("write the payload");
    frontend
        .ram
        .mem
        .write_obj(0xffu8, GuestAddress(status))
        .expect("preset the status byte");
    let descs = [
        Desc::readable(header, 16),
        Desc::readable(data, payload.len() as u32),
        Desc::writable(status, 1),
    ];
    let queue = &mut frontend.queues[0];
    queue.add_chain(&frontend.ram, &descs);
    queue.kick();
    queue.wait_used(&frontend.ram, 1, Duration::from_secs(5))?;
    Some(
        frontend
            .ram
            .mem
            .read_obj(GuestAddress(status))
            .expect("read the status byte"),
    )
}

/// Test 7: a read-only disk advertises VIRTIO_BLK_F_RO, serves reads, and
/// its image is never modified. libblkio refuses writes to a read-only disk
/// itself, so the agent's own refusal is checked with the test front-end,
/// which sends a write anyway.
#[test]
fn agent_readonly_disk_refuses_writes_serves_reads() {
    let seed = 0x7777;
    let blocks: Vec<u64> = (0..64).chain([BLOCKS - 1]).collect();
    let mut server = Server::agent_with(&[DiskSpec::new(IMAGE_SIZE, "readonly")], |disks| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&disks[0].image)
            .expect("open the image");
        let mut buf = vec![0u8; BS];
        for &block in &blocks {
            fill_pattern(block, seed, &mut buf);
            file.write_all_at(&buf, block * BS as u64)
                .expect("prefill the image");
        }
    });
    let before = server.image(0);

    // Without read-only, libblkio must refuse to start: the device says RO.
    match BlkioClient::connect(&server.disks[0].socket, 1, QD * BS) {
        Err(e) => assert_eq!(
            e.errno(),
            Some(libc::EROFS),
            "libblkio should refuse a read-write start on a VIRTIO_BLK_F_RO disk: {e}"
        ),
        Ok(_) => {
            panic!("libblkio started read-write: the agent does not advertise VIRTIO_BLK_F_RO")
        }
    }
    server.assert_alive();

    let mut client = server.connect_with(
        0,
        &ClientOptions {
            read_only: true,
            buffer_bytes: QD * BS,
            ..ClientOptions::default()
        },
    );
    let mut q = client.queue(0);
    ok(
        q.verify_pattern(&blocks, BS, QD, seed),
        "reads of a read-only disk",
    );
    assert!(q.write(0, &[0x55; BS]).is_err(), "libblkio allowed a write");
    ok(q.flush(), "flush of a read-only disk");
    drop(client);

    // The agent itself must refuse a write that reaches it.
    let mut frontend = TestFrontend::connect(&server.disks[0].socket, 1, 16);
    let (_, data, _) = TestFrontend::buffers(0);
    frontend
        .ram
        .mem
        .write_slice(&[0x55u8; BS], GuestAddress(data))
        .expect("fill the write buffer");
    let status = frontend.request(0, 0, VIRTIO_BLK_T_OUT, 0, BS as u32);
    assert!(
        matches!(status, Some(s) if s != VIRTIO_BLK_S_OK),
        "the agent accepted a write to a read-only disk (status {status:?})"
    );
    // Discard and write-zeroes of sectors 0..8 (one 16-byte segment each).
    let mut segment = [0u8; 16];
    segment[8..12].copy_from_slice(&8u32.to_le_bytes());
    for (name, request_type) in [
        ("discard", VIRTIO_BLK_T_DISCARD),
        ("write-zeroes", VIRTIO_BLK_T_WRITE_ZEROES),
    ] {
        let status = raw_request(&mut frontend, request_type, &segment);
        assert!(
            matches!(status, Some(s) if s != VIRTIO_BLK_S_OK),
            "the agent accepted a {name} on a read-only disk (status {status:?})"
        );
    }
    drop(frontend);
    server.assert_alive();

    // Reads still work after the refused write.
    let mut client = server.connect_with(
        0,
        &ClientOptions {
            read_only: true,
            buffer_bytes: QD * BS,
            ..ClientOptions::default()
        },
    );
    ok(
        client.queue(0).verify_pattern(&blocks, BS, QD, seed),
        "reads after a refused write",
    );
    drop(client);
    assert!(
        server.image(0) == before,
        "the read-only image was modified"
    );
    server.finish();
}

/// Test 8: two disks in one agent process, of different sizes, driven at
/// the same time from two threads, hold their own data; disconnecting from
/// one does not disturb the other.
#[test]
fn agent_two_disks_in_one_process() {
    let small = IMAGE_SIZE / 2;
    let server = Server::agent_with(
        &[
            DiskSpec::new(IMAGE_SIZE, "serial=disk-a"),
            DiskSpec::new(small, "num-queues=2,serial=disk-b"),
        ],
        |_| {},
    );
    let (seed_a, seed_b) = (0x8a8a, 0x8b8b);
    // The same block numbers on both disks, with different content.
    let blocks = random_blocks(small / BS as u64, 1500, 8);
    let mut a = server.connect(0, 1);
    let mut b = server.connect(1, 2);
    assert_eq!(a.capacity(), IMAGE_SIZE, "capacity of disk a");
    assert_eq!(b.capacity(), small, "capacity of disk b");
    assert_eq!(b.max_queues(), 2, "queues of disk b");
    std::thread::scope(|s| {
        let (blocks, a, b) = (&blocks, &mut a, &mut b);
        s.spawn(move || write_then_verify(&mut a.queue(0), blocks, seed_a));
        s.spawn(move || {
            for mut q in b.split_queues() {
                write_then_verify(&mut q, blocks, seed_b);
            }
        });
    });
    // Disk a's client leaves; disk b's connection serves on.
    drop(a);
    ok(
        b.queue(1).verify_pattern(&blocks, BS, QD, seed_b),
        "disk b after disk a's client left",
    );
    let mut a = server.connect(0, 1);
    ok(
        a.queue(0).verify_pattern(&blocks, BS, QD, seed_a),
        "disk a on a new connection",
    );
    drop((a, b));

    let image_a = server.image(0);
    assert_image(&image_a, &blocks, seed_a, true);
    let image_b = std::fs::read(&server.disks[1].image).expect("read image b");
    assert_eq!(image_b.len() as u64, small, "image b changed size");
    if let Err(e) = verify_image_blocks(&image_b, &blocks, BS, seed_b) {
        panic!("image b is wrong: {e}");
    }
    server.finish();
}

/// The benchmark's workload function works end to end: a short mixed
/// random workload at queue depth 32 completes requests, about half of
/// them reads, and the convenience `random_io` reports IOPS.
#[test]
fn agent_random_workload_smoke() {
    let server = Server::agent("");
    let mut client = server.connect(0, 1);
    let stats = ok(
        client.queue(0).run_workload(&Workload {
            direction: Direction::Mixed { read_percent: 50 },
            block_size: BS,
            depth: QD,
            span: 0,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
            seed: 9,
        }),
        "mixed random workload",
    );
    assert!(stats.ops > 100, "only {} requests in 300 ms", stats.ops);
    let read_share = stats.reads as f64 / stats.ops as f64;
    assert!(
        (0.35..0.65).contains(&read_share),
        "read share {read_share:.2} of a 50% mix"
    );
    assert!(stats.iops > 0.0 && stats.mean_latency_us > 0.0, "{stats:?}");
    let iops = ok(
        client.random_io(0, Direction::Read, BS, QD, 0, Duration::from_millis(200)),
        "random reads",
    );
    assert!(iops > 0.0, "random_io reported {iops} IOPS");
    drop(client);
    assert_eq!(
        std::fs::metadata(&server.disks[0].image)
            .expect("stat the image")
            .len(),
        IMAGE_SIZE,
        "random writes changed the image size"
    );
    server.finish();
}
