//! Issue 18, shared memory: a front-end that lies about the fds it hands
//! over, against the real agent process. Every region, log and inflight
//! fd whose claimed range lies past the end of the file used to be mapped
//! with a success ack, and the first access raised SIGBUS and killed the
//! agent with every device it served. Now each is refused (NACK, or the
//! connection closes where the protocol has no NACK), the agent serves on,
//! and guest RAM shrunk after it was mapped fails only its device.
//!
//! Each test failed before the fix: the agent died (the "agent exited"
//! assertions), except where noted.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo};
use vhost_agent_tests::frontend::inflight::queue_region_size;
use vhost_agent_tests::frontend::{
    sealed_memfd, wait_until, Desc, Inflight, StartOptions, TestFrontend, BUFFER_BASE,
    STATUS_UNSET, VIRTIO_BLK_T_OUT,
};
use vhost_agent_tests::support::{create_image, spawn_agent, ChildGuard};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;
/// DEVICE_NEEDS_RESET in the virtio device status.
const NEEDS_RESET: u8 = 0x40;
/// VIRTIO_BLK_T_FLUSH.
const VIRTIO_BLK_T_FLUSH: u32 = 4;

struct Setup {
    dir: tempfile::TempDir,
    agent: ChildGuard,
    disk_a: PathBuf,
    disk_b: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut specs = Vec::new();
        for name in ["a", "b"] {
            let image = dir.path().join(format!("{name}.img"));
            create_image(&image, 8 << 20).unwrap();
            specs.push(format!(
                "socket={},image={},id=disk{}",
                dir.path().join(format!("{name}.sock")).display(),
                image.display(),
                name.to_uppercase()
            ));
        }
        let agent = spawn_agent(&specs, &[], Some(&dir.path().join("agent.log")));
        Setup {
            disk_a: dir.path().join("a.sock"),
            disk_b: dir.path().join("b.sock"),
            dir,
            agent,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent runs, and both disks serve a fresh front-end.
    fn assert_serving(&mut self, after: &str) {
        assert!(
            self.agent.child.try_wait().unwrap().is_none(),
            "agent exited after {after}:\n{}",
            self.log()
        );
        for socket in [&self.disk_a, &self.disk_b] {
            let mut fe = TestFrontend::connect(socket, 1, QUEUE_SIZE);
            assert!(
                fe.round_trip(0, 0, 8),
                "{} does not serve after {after}",
                socket.display()
            );
        }
    }
}

/// A memfd of `size` bytes that is not sealed.
fn unsealed_memfd(size: u64) -> File {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// Connected and negotiated with `protocol` (and REPLY_ACK), features set,
/// every request asking for a REPLY_ACK; [`start`] starts the device.
fn negotiated(socket: &Path, protocol: VhostUserProtocolFeatures) -> TestFrontend {
    let mut options = StartOptions::plain(1, QUEUE_SIZE);
    options.protocol = protocol.bits();
    options.require_protocol = true;
    let fe = TestFrontend::negotiate(socket, &options);
    fe.frontend.set_features(fe.features).unwrap();
    fe.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// Start the device of a [`negotiated`] front-end the ordinary way.
fn start(fe: &mut TestFrontend) {
    fe.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    fe.start_device(Inflight::None, &[0]);
}

/// SET_MEM_TABLE and ADD_MEM_REG whose region ends past its fd: a size
/// larger than the file, an offset past it. Each is NACKed; the same
/// connection then starts the device on honest memory and serves.
#[test]
fn regression_memory_regions_past_the_end_of_their_fd_are_refused() {
    let mut setup = Setup::new();
    let lies = [(1 << 20, 0), (64 << 10, 64 << 10), (4096, 1 << 30)];
    for (size, offset) in lies {
        let mut fe = negotiated(
            &setup.disk_a,
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        );
        let file = unsealed_memfd(64 << 10);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: offset,
            mmap_handle: file.as_raw_fd(),
        };
        assert!(
            fe.frontend.set_mem_table(&[region]).is_err(),
            "SET_MEM_TABLE of {size} bytes at {offset} of a 64 KiB fd was acked"
        );
        assert!(
            fe.frontend.add_mem_region(&region).is_err(),
            "ADD_MEM_REG of {size} bytes at {offset} of a 64 KiB fd was acked"
        );
        start(&mut fe);
        assert!(
            fe.round_trip(0, 0, 0),
            "the connection serves after the NACKs"
        );
    }
    assert!(
        setup.log().contains("ends past the end of its"),
        "{}",
        setup.log()
    );
    setup.assert_serving("regions past their fds");
}

/// SET_LOG_BASE lies: a 1 GiB offset on a 512-byte memfd, a 4 KiB memfd
/// claiming 1 MiB, a size of 2^63, and an unsealed memfd. Before the fix
/// the first two were mapped and LOG_ALL plus one write killed the agent.
/// The protocol has no NACK for SET_LOG_BASE (its reply echoes the
/// request), so the agent closes that connection; LOG_ALL and writes on a
/// fresh connection with an honest log work.
#[test]
fn regression_dirty_logs_past_the_end_of_their_fd_are_refused() {
    let mut setup = Setup::new();
    let cases = [
        (sealed_memfd("vhost-log", 512), 512, 1 << 30),
        (sealed_memfd("vhost-log", 4096), 1 << 20, 0),
        (sealed_memfd("vhost-log", 4096), 1 << 63, 0),
        (unsealed_memfd(4096), 4096, 0),
    ];
    for (file, size, offset) in cases {
        let mut fe = TestFrontend::connect_with(
            &setup.disk_a,
            1,
            QUEUE_SIZE,
            VhostUserProtocolFeatures::LOG_SHMFD,
        );
        let log = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: file.as_raw_fd(),
        };
        assert!(
            fe.frontend.set_log_base(0, Some(log)).is_err(),
            "SET_LOG_BASE of {size} bytes at {offset} was answered"
        );
        // What killed the agent: LOG_ALL, then a write into guest memory
        // (only if the agent kept the connection).
        if fe.frontend.set_features(fe.features | (1 << 26)).is_ok() {
            let _ = fe.request(0, 0, VIRTIO_BLK_T_OUT, 0, 512);
        }
    }
    let log = setup.log();
    for rule in [
        "ends past the end",
        "does not fit an address space",
        "not sealed",
    ] {
        assert!(log.contains(rule), "no refusal naming `{rule}`:\n{log}");
    }
    setup.assert_serving("lying dirty logs");
    let mut fe = TestFrontend::connect_with(
        &setup.disk_a,
        1,
        QUEUE_SIZE,
        VhostUserProtocolFeatures::LOG_SHMFD,
    );
    let honest = sealed_memfd("vhost-log", 4096);
    fe.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: 4096,
                mmap_offset: 0,
                mmap_handle: honest.as_raw_fd(),
            }),
        )
        .expect("an honest SET_LOG_BASE");
    fe.frontend.set_features(fe.features | (1 << 26)).unwrap();
    assert!(fe.round_trip(0, 0, 0), "writes are logged, not fatal");
}

/// SET_INFLIGHT_FD with an empty memfd, one smaller than it claims, an
/// offset past its end, and an unsealed one: each NACKed. Before the fix
/// the agent died inside SET_INFLIGHT_FD itself (it writes every queue's
/// desc_num when it maps the region).
#[test]
fn regression_inflight_regions_past_the_end_of_their_fd_are_refused() {
    let mut setup = Setup::new();
    let stride = queue_region_size(QUEUE_SIZE);
    let cases = [
        (
            sealed_memfd("vhost-inflight", 0),
            stride,
            0,
            "ends past the end",
        ),
        (
            sealed_memfd("vhost-inflight", 64),
            stride,
            0,
            "ends past the end",
        ),
        (
            sealed_memfd("vhost-inflight", stride),
            stride,
            1 << 30,
            "ends past the end",
        ),
        (unsealed_memfd(stride), stride, 0, "not sealed"),
    ];
    for (file, mmap_size, mmap_offset, rule) in cases {
        let mut fe = negotiated(&setup.disk_a, VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let message = VhostUserInflight::new(mmap_size, mmap_offset, 1, QUEUE_SIZE);
        let refused = fe.frontend.set_inflight_fd(&message, file.as_raw_fd());
        assert!(
            refused.is_err(),
            "SET_INFLIGHT_FD ({rule}) was acked:\n{}",
            setup.log()
        );
        start(&mut fe);
        assert!(
            fe.round_trip(0, 0, 0),
            "the connection serves after the NACK"
        );
        // (Logged after the NACK was sent: read it after a later reply.)
        assert!(setup.log().contains(rule), "no refusal naming `{rule}`");
    }
    setup.assert_serving("lying inflight regions");
}

/// The front-end shrinks guest RAM after the agent mapped it (the memfd
/// is not sealed, like file-backed RAM), then submits a request whose
/// status byte lies in the part it cut off. Before the fix the agent's
/// write raised SIGBUS and killed the process. Now the fault is contained
/// in that mapping: the device reports DEVICE_NEEDS_RESET, says why once,
/// and the other disk (same process) keeps serving.
#[test]
fn regression_guest_ram_shrunk_under_the_mapping_fails_only_its_device() {
    let mut setup = Setup::new();
    let mut fe = TestFrontend::connect_with(
        &setup.disk_a,
        1,
        QUEUE_SIZE,
        VhostUserProtocolFeatures::STATUS,
    );
    assert!(fe.round_trip(0, 0, 0));
    // A flush: header in the low megabyte (kept), status byte far above.
    let (header, _, _) = TestFrontend::buffers(0);
    let (_, _, status) = TestFrontend::buffers(100);
    fe.write_header(header, VIRTIO_BLK_T_FLUSH, 0);
    fe.ram
        .mem
        .write_obj(STATUS_UNSET, GuestAddress(status))
        .unwrap();
    let keep = BUFFER_BASE + 0x1_0000;
    assert!(status > keep);
    fe.ram.file().set_len(keep).unwrap();
    let queue = &mut fe.queues[0];
    queue.add_chain(
        &fe.ram,
        &[Desc::readable(header, 16), Desc::writable(status, 1)],
    );
    queue.kick();
    let failed = wait_until(Duration::from_secs(10), || {
        fe.get_status() & NEEDS_RESET != 0
    });
    assert!(failed, "no DEVICE_NEEDS_RESET:\n{}", setup.log());
    let log = setup.log();
    assert_eq!(
        log.matches("truncated guest memory").count(),
        1,
        "one line says why:\n{log}"
    );
    assert!(
        setup.agent.child.try_wait().unwrap().is_none(),
        "agent exited:\n{log}"
    );
    let mut other = TestFrontend::connect(&setup.disk_b, 1, QUEUE_SIZE);
    assert!(other.round_trip(0, 0, 0), "the other disk stopped serving");
    drop(fe);
    // A reconnect maps the memory anew: the device works again.
    let mut again = TestFrontend::connect(&setup.disk_a, 1, QUEUE_SIZE);
    assert!(again.round_trip(0, 0, 0), "disk A after a reconnect");
}
