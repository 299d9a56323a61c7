//! End to end: a real Linux guest under QEMU runs fio with crc32c
//! verification on a vhost-user-blk disk, served by vhost-agent or, as a
//! control that proves the harness itself, by qemu-storage-daemon.
//!
//! Needs QEMU 10, qemu-storage-daemon and the guest build tools: run
//! `sudo scripts/install-test-deps.sh` first. Missing tools fail the tests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vhost_agent_tests::qemu::{self, Qemu, QsdOptions, Verdict, VhostUserBlk, VmConfig};
use vhost_agent_tests::support::{self, ChildGuard};

/// Size of the image the guest sees.
const IMAGE_SIZE: u64 = 256 << 20;
/// How much of it fio writes and verifies.
const FIO_SIZE_MIB: u64 = 64;
/// Boot + fio under TCG takes ~20 s alone; leave room for a loaded machine.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(150);

/// Which back-end serves the disk.
enum Backend {
    Agent,
    QemuStorageDaemon(QsdOptions),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Agent => "vhost-agent",
            Backend::QemuStorageDaemon(_) => "qemu-storage-daemon",
        }
    }
}

/// A temporary directory with a fresh sparse image in it.
struct Env {
    dir: tempfile::TempDir,
    image: PathBuf,
    boots: u32,
}

impl Env {
    fn new() -> Env {
        qemu::require_qemu_test_deps();
        // Build (or find cached) the guest before anything is timed.
        qemu::guest();
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let image = dir.path().join("disk.img");
        support::create_image(&image, IMAGE_SIZE).expect("create the disk image");
        Env {
            dir,
            image,
            boots: 0,
        }
    }

    /// Start `backend` on the image, boot the guest with `config` against
    /// it and return its verdict; with `expect_pass`, a FAIL verdict panics
    /// with the serial log and the back-end's log. Both processes are gone
    /// when this returns.
    fn boot(&mut self, backend: &Backend, config: VmConfig, expect_pass: bool) -> Verdict {
        self.boots += 1;
        let n = self.boots;
        let name = backend.name();
        let sock = self.dir.path().join(format!("blk{n}.sock"));
        let backend_log = self.dir.path().join(format!("{name}-{n}.log"));
        let mut peer: ChildGuard = match backend {
            Backend::Agent => support::spawn_agent(
                &[format!(
                    "socket={},image={}",
                    sock.display(),
                    self.image.display()
                )],
                &[],
                Some(&backend_log),
            ),
            Backend::QemuStorageDaemon(opts) => {
                qemu::spawn_qemu_storage_daemon(&self.image, &sock, opts, &backend_log)
            }
        };

        let config = config.disk(VhostUserBlk::new(&sock));
        let started = Instant::now();
        let mut vm = Qemu::spawn_named(&config, self.dir.path(), &format!("qemu{n}"));
        vm.add_context_log(name, &backend_log);
        let verdict = if expect_pass {
            vm.expect_pass(VERDICT_TIMEOUT)
        } else {
            vm.wait_verdict(VERDICT_TIMEOUT)
        };
        eprintln!(
            "{name}: {} verdict after {:.1?}: {} {}",
            config.test,
            started.elapsed(),
            if verdict.passed { "PASS" } else { "FAIL" },
            verdict.details
        );
        if let Ok(Some(status)) = peer.child.try_wait() {
            panic!(
                "{name} exited ({status}) during the run\n{}",
                vm.diagnostics()
            );
        }
        drop(vm);
        drop(peer);
        verdict
    }

    /// fio's verify headers make every 4 KiB block it wrote non-zero: the
    /// guest's writes must have reached the image file.
    fn assert_written(&self, len: u64) {
        let zero = qemu::count_zero_blocks(&self.image, len, 4096)
            .unwrap_or_else(|e| panic!("read back {}: {e}", self.image.display()));
        assert_eq!(
            zero,
            0,
            "{zero} of the {} blocks fio wrote are still zero in {}",
            len / 4096,
            self.image.display()
        );
    }
}

fn fio_config(mode: &str, size_mib: u64) -> VmConfig {
    VmConfig::new(mode)
        .param("vhost_size", format!("{size_mib}M"))
        .param("vhost_bs", "4k")
        .param("vhost_iodepth", 32)
}

fn assert_fio_verify_pass(v: &Verdict) {
    assert!(v.passed, "verdict: {v:?}");
    assert_eq!(v.field("fio_exit"), Some("0"), "{v:?}");
    assert_eq!(v.field("verify_errors"), Some("0"), "{v:?}");
    let expected = format!("{FIO_SIZE_MIB}.0MiB");
    assert_eq!(v.field("written"), Some(expected.as_str()), "{v:?}");
    assert_eq!(v.field("read"), Some(expected.as_str()), "{v:?}");
}

/// The control: the harness and guest are right if qemu-storage-daemon passes.
#[test]
fn qemu_guest_fio_verifies_on_qemu_storage_daemon() {
    let mut env = Env::new();
    let backend = Backend::QemuStorageDaemon(QsdOptions::default());
    let verdict = env.boot(&backend, fio_config("fio-verify", FIO_SIZE_MIB), true);
    assert_fio_verify_pass(&verdict);
    env.assert_written(FIO_SIZE_MIB << 20);
}

/// vhost-agent serves a real guest: fio writes 64 MiB at qd32 and reads it
/// all back with crc32c verification.
#[test]
fn qemu_guest_boots_and_fio_verifies_on_agent() {
    let mut env = Env::new();
    let verdict = env.boot(
        &Backend::Agent,
        fio_config("fio-verify", FIO_SIZE_MIB),
        true,
    );
    assert_fio_verify_pass(&verdict);
    env.assert_written(FIO_SIZE_MIB << 20);
}

/// The harness must see failures too: on a read-only export fio's writes
/// fail and the guest must say FAIL.
#[test]
fn qemu_guest_reports_fail_on_read_only_qemu_storage_daemon() {
    let mut env = Env::new();
    let backend = Backend::QemuStorageDaemon(QsdOptions {
        writable: false,
        ..QsdOptions::default()
    });
    let v = env.boot(&backend, fio_config("fio-verify", 8), false);
    assert!(
        !v.passed,
        "fio-verify on a read-only disk must FAIL, got {v:?}"
    );
    assert_ne!(v.field("fio_exit"), Some("0"), "{v:?}");
    let zero = qemu::count_zero_blocks(&env.image, 8 << 20, 4096).expect("read the image back");
    assert_eq!(
        zero,
        (8 << 20) / 4096,
        "a read-only export changed the image"
    );
}

/// And it must see bad data: data written in one boot verifies in the next,
/// until a byte is flipped in the image behind the guest's back.
#[test]
fn qemu_guest_detects_corruption_across_boots_on_qemu_storage_daemon() {
    const SIZE_MIB: u64 = 8;
    let mut env = Env::new();
    let backend = Backend::QemuStorageDaemon(QsdOptions::default());

    let v = env.boot(&backend, fio_config("fio-write", SIZE_MIB), true);
    assert_eq!(v.field("written"), Some("8192KiB"), "{v:?}");
    env.assert_written(SIZE_MIB << 20);

    let v = env.boot(&backend, fio_config("fio-verify-only", SIZE_MIB), true);
    assert_eq!(v.field("read"), Some("8192KiB"), "{v:?}");

    // Flip a byte in the payload (past fio's header) of the block at 4 MiB.
    qemu::flip_image_byte(&env.image, (4 << 20) + 1000);

    let v = env.boot(&backend, fio_config("fio-verify-only", SIZE_MIB), false);
    assert!(
        !v.passed,
        "a corrupted block must FAIL the verify, got {v:?}"
    );
    let errors: u32 = v
        .field("verify_errors")
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    assert!(errors > 0, "the verdict must count the verify error: {v:?}");
}
