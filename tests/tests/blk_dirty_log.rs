//! Dirty page logging through the real agent process: with a log shared by
//! SET_LOG_BASE and VHOST_F_LOG_ALL acked, every page the device writes
//! (read data, status byte, used ring) is marked; nothing is logged without
//! LOG_ALL; pages the device only reads are not marked. Without this a live
//! migration silently loses the guest's freshest disk reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vhost_agent_tests::frontend::{
    sealed_memfd, TestFrontend, RAM_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vhost_agent_tests::support::{create_image, spawn_agent, ChildGuard};

const PAGE: u64 = 4096;
const VHOST_F_LOG_ALL: u64 = 1 << 26;

struct Rig {
    _dir: tempfile::TempDir,
    _agent: ChildGuard,
    frontend: TestFrontend,
    log: File,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    let socket = dir.path().join("a.sock");
    create_image(&image, 8 << 20).unwrap();
    let agent = spawn_agent(
        &[format!(
            "socket={},image={}",
            socket.display(),
            image.display()
        )],
        &[],
        Some(&dir.path().join("agent.log")),
    );
    let frontend = TestFrontend::connect_with(&socket, 1, 16, VhostUserProtocolFeatures::LOG_SHMFD);
    let log_size = RAM_SIZE / PAGE / 8;
    let log = sealed_memfd("vhost-log", log_size);
    frontend
        .frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log_size,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .expect("SET_LOG_BASE");
    Rig {
        _dir: dir,
        _agent: agent,
        frontend,
        log,
    }
}

fn dirty_pages(log: &File) -> Vec<u64> {
    let mut bytes = vec![0u8; (RAM_SIZE / PAGE / 8) as usize];
    log.read_exact_at(&mut bytes, 0).unwrap();
    let mut pages = Vec::new();
    for (index, byte) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                pages.push(index as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn clear(log: &File) {
    log.write_all_at(&vec![0u8; (RAM_SIZE / PAGE / 8) as usize], 0)
        .unwrap();
}

fn set_log_all(rig: &mut Rig, on: bool) {
    let features = if on {
        rig.frontend.features | VHOST_F_LOG_ALL
    } else {
        rig.frontend.features
    };
    rig.frontend
        .frontend
        .set_features(features)
        .expect("SET_FEATURES");
    // SET_FEATURES has no reply here; a GET_FEATURES round trip makes sure
    // the agent applied it before the next kick (which does not travel on
    // the socket). QEMU does the same (vhost_user_write_sync).
    rig.frontend.frontend.get_features().expect("GET_FEATURES");
}

#[test]
fn nothing_is_logged_without_log_all() {
    let mut rig = rig();
    assert!(rig.frontend.round_trip(0, 0, 0));
    assert_eq!(dirty_pages(&rig.log), Vec::<u64>::new());
}

#[test]
fn device_writes_are_logged_while_log_all_is_on() {
    let mut rig = rig();
    set_log_all(&mut rig, true);

    // A read: the device writes the data buffer (2 pages), the status byte
    // and the used ring.
    let (_, data, status) = TestFrontend::buffers(2);
    assert_eq!(
        rig.frontend
            .request(0, 2, VIRTIO_BLK_T_IN, 0, 2 * PAGE as u32),
        Some(VIRTIO_BLK_S_OK)
    );
    let dirty = dirty_pages(&rig.log);
    for page in [data / PAGE, data / PAGE + 1, status / PAGE] {
        assert!(
            dirty.contains(&page),
            "page {page:#x} not logged: {dirty:x?}"
        );
    }
    // Queue 0's rings live in the first 64 KiB; the used ring is after the
    // descriptor table and avail ring.
    assert!(
        dirty.iter().any(|&page| page < 0x1_0000 / PAGE),
        "used ring not logged: {dirty:x?}"
    );
    assert!(
        !dirty.contains(&(data / PAGE + 2)),
        "a page past the buffer was logged"
    );

    // A write: the device only reads the data buffer, so only the status
    // byte and the used ring are logged.
    clear(&rig.log);
    let (_, data, status) = TestFrontend::buffers(3);
    assert_eq!(
        rig.frontend.request(0, 3, VIRTIO_BLK_T_OUT, 8, PAGE as u32),
        Some(VIRTIO_BLK_S_OK)
    );
    let dirty = dirty_pages(&rig.log);
    assert!(
        dirty.contains(&(status / PAGE)),
        "status not logged: {dirty:x?}"
    );
    assert!(
        !dirty.contains(&(data / PAGE)),
        "a buffer the device only read was logged"
    );

    // Logging stops with LOG_ALL.
    set_log_all(&mut rig, false);
    clear(&rig.log);
    assert!(rig.frontend.round_trip(0, 4, 16));
    assert_eq!(dirty_pages(&rig.log), Vec::<u64>::new());
}
