//! Hostile input against the real agent process: descriptor chains no
//! correct driver would build, and malformed vhost-user messages. Each must
//! fail only the request (IOERR) or only that queue (needs reset), leave a
//! log line, and never stop the agent serving other queues and disks.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost_agent_tests::frontend::{
    Desc, TestFrontend, RAM_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_IN,
};
use vhost_agent_tests::support::{create_image, spawn_agent, ChildGuard};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;

struct Setup {
    _dir: tempfile::TempDir,
    agent: ChildGuard,
    disk_a: PathBuf,
    disk_b: PathBuf,
    log: PathBuf,
}

/// Disk A with two queues (hostile input goes to queue 0), disk B with one.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (img_a, img_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    create_image(&img_a, 8 << 20).unwrap();
    create_image(&img_b, 8 << 20).unwrap();
    let disk_a = dir.path().join("a.sock");
    let disk_b = dir.path().join("b.sock");
    let log = dir.path().join("agent.log");
    let agent = spawn_agent(
        &[
            format!(
                "socket={},image={},num-queues=2,id=diskA",
                disk_a.display(),
                img_a.display()
            ),
            format!(
                "socket={},image={},id=diskB",
                disk_b.display(),
                img_b.display()
            ),
        ],
        &[],
        Some(&log),
    );
    Setup {
        _dir: dir,
        agent,
        disk_a,
        disk_b,
        log,
    }
}

fn agent_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// After queue 0 of disk A was given `descs` (head 0): queue 1 of disk A
/// and disk B must still serve, and the agent must still be running.
fn assert_others_still_serve(setup: &mut Setup, fe: &mut TestFrontend) {
    assert!(
        fe.round_trip(1, 1, 8),
        "queue 1 of the same disk stopped serving"
    );
    let mut other = TestFrontend::connect(&setup.disk_b, 1, QUEUE_SIZE);
    assert!(other.round_trip(0, 0, 16), "the other disk stopped serving");
    assert!(
        setup.agent.child.try_wait().unwrap().is_none(),
        "agent exited"
    );
}

/// Put `descs` verbatim on queue 0 and kick.
fn inject(fe: &mut TestFrontend, descs: &[Desc]) {
    let q = &mut fe.queues[0];
    q.add_raw(&fe.ram, descs, 0);
    q.kick();
}

/// The injected request got IOERR with a log line naming `reason`, and
/// only the request failed: the same queue, the other queue and the other
/// disk keep serving.
fn assert_request_failed_alone(
    setup: &mut Setup,
    fe: &mut TestFrontend,
    status: u64,
    reason: &str,
) {
    expect_ioerr(fe, status);
    assert!(
        agent_log(&setup.log).contains(reason),
        "no log line with `{reason}`"
    );
    assert!(
        fe.round_trip(0, 3, 24),
        "queue 0 stopped after a failed request"
    );
    assert_others_still_serve(setup, fe);
}

fn expect_ioerr(fe: &mut TestFrontend, status: u64) {
    let used = fe.queues[0].wait_used(&fe.ram, 1, Duration::from_secs(5));
    assert!(
        used.is_some(),
        "no used entry for a request that should fail with IOERR"
    );
    let status: u8 = fe.ram.mem.read_obj(GuestAddress(status)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
}

/// The queue must publish nothing for an unanswerable chain, the agent must
/// say why, and the queue must take no further requests.
fn expect_needs_reset(setup: &Setup, fe: &mut TestFrontend, reason: &str) {
    assert!(
        fe.queues[0]
            .wait_used(&fe.ram, 1, Duration::from_millis(500))
            .is_none(),
        "a used entry was published for an unanswerable chain"
    );
    let log = agent_log(&setup.log);
    assert!(
        log.contains("diskA queue 0") && log.contains(reason) && log.contains("reset"),
        "no log line naming the queue and `{reason}`:\n{log}"
    );
    // Later requests on the broken queue are not taken.
    let (header, data, status) = TestFrontend::buffers(2);
    fe.write_header(header, VIRTIO_BLK_T_IN, 0);
    let q = &mut fe.queues[0];
    q.add_chain(
        &fe.ram,
        &[
            Desc::readable(header, 16),
            Desc::writable(data, 512),
            Desc::writable(status, 1),
        ],
    );
    q.kick();
    assert!(
        q.wait_used(&fe.ram, 1, Duration::from_millis(300))
            .is_none(),
        "broken queue kept serving"
    );
}

#[test]
fn data_descriptor_outside_guest_memory_fails_only_that_request() {
    let mut setup = setup();
    let mut fe = TestFrontend::connect(&setup.disk_a, 2, QUEUE_SIZE);
    let (header, _, status) = TestFrontend::buffers(0);
    fe.write_header(header, VIRTIO_BLK_T_IN, 0);
    inject(
        &mut fe,
        &[
            Desc {
                addr: header,
                len: 16,
                flags: VRING_DESC_F_NEXT as u16,
                next: 1,
            },
            Desc {
                addr: RAM_SIZE - 256,
                len: 4096,
                flags: (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                next: 2,
            },
            Desc {
                addr: status,
                len: 1,
                flags: VRING_DESC_F_WRITE as u16,
                next: 0,
            },
        ],
    );
    assert_request_failed_alone(&mut setup, &mut fe, status, "outside guest memory");
}

#[test]
fn header_shorter_than_16_bytes_fails_only_that_request() {
    let mut setup = setup();
    let mut fe = TestFrontend::connect(&setup.disk_a, 2, QUEUE_SIZE);
    let (header, _, status) = TestFrontend::buffers(0);
    fe.write_header(header, VIRTIO_BLK_T_IN, 0);
    inject(
        &mut fe,
        &[
            Desc {
                addr: header,
                len: 8,
                flags: VRING_DESC_F_NEXT as u16,
                next: 1,
            },
            Desc {
                addr: status,
                len: 1,
                flags: VRING_DESC_F_WRITE as u16,
                next: 0,
            },
        ],
    );
    assert_request_failed_alone(&mut setup, &mut fe, status, "header shorter than 16 bytes");
}

#[test]
fn read_only_status_descriptor_breaks_only_that_queue() {
    let mut setup = setup();
    let mut fe = TestFrontend::connect(&setup.disk_a, 2, QUEUE_SIZE);
    let (header, data, status) = TestFrontend::buffers(0);
    fe.write_header(header, VIRTIO_BLK_T_IN, 0);
    inject(
        &mut fe,
        &[
            Desc {
                addr: header,
                len: 16,
                flags: VRING_DESC_F_NEXT as u16,
                next: 1,
            },
            Desc {
                addr: data,
                len: 512,
                flags: (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                next: 2,
            },
            Desc {
                addr: status,
                len: 1,
                flags: 0,
                next: 0,
            },
        ],
    );
    expect_needs_reset(&setup, &mut fe, "status descriptor is read-only");
    assert_others_still_serve(&mut setup, &mut fe);
}

#[test]
fn chain_loop_breaks_only_that_queue() {
    let mut setup = setup();
    let mut fe = TestFrontend::connect(&setup.disk_a, 2, QUEUE_SIZE);
    let (header, data, _) = TestFrontend::buffers(0);
    fe.write_header(header, VIRTIO_BLK_T_IN, 0);
    inject(
        &mut fe,
        &[
            Desc {
                addr: header,
                len: 16,
                flags: VRING_DESC_F_NEXT as u16,
                next: 1,
            },
            Desc {
                addr: data,
                len: 512,
                flags: (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                next: 0,
            },
        ],
    );
    expect_needs_reset(&setup, &mut fe, "chain loops");
    assert_others_still_serve(&mut setup, &mut fe);
}

#[test]
fn chain_longer_than_queue_size_breaks_only_that_queue() {
    let mut setup = setup();
    let mut fe = TestFrontend::connect(&setup.disk_a, 2, QUEUE_SIZE);
    let (header, data, status) = TestFrontend::buffers(0);
    fe.write_header(header, VIRTIO_BLK_T_IN, 0);
    // An indirect table of 2 x QUEUE_SIZE descriptors.
    let table = TestFrontend::buffers(4).0;
    let entries = 2 * QUEUE_SIZE;
    for i in 0..entries {
        let (addr, len, flags) = match i {
            0 => (header, 16, VRING_DESC_F_NEXT),
            i if i == entries - 1 => (status, 1, VRING_DESC_F_WRITE),
            _ => (data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
        };
        let at = table + 16 * u64::from(i);
        fe.ram.mem.write_obj(addr, GuestAddress(at)).unwrap();
        fe.ram
            .mem
            .write_obj(len as u32, GuestAddress(at + 8))
            .unwrap();
        fe.ram
            .mem
            .write_obj(flags as u16, GuestAddress(at + 12))
            .unwrap();
        fe.ram.mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
    }
    inject(
        &mut fe,
        &[Desc {
            addr: table,
            len: u32::from(entries) * 16,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        }],
    );
    expect_needs_reset(&setup, &mut fe, "more descriptors than the queue size");
    assert_others_still_serve(&mut setup, &mut fe);
}

#[test]
fn reconnect_after_a_broken_queue_gives_a_working_device() {
    let setup = setup();
    {
        let mut fe = TestFrontend::connect(&setup.disk_a, 2, QUEUE_SIZE);
        let (header, _, status) = TestFrontend::buffers(0);
        fe.write_header(header, VIRTIO_BLK_T_IN, 0);
        inject(
            &mut fe,
            &[
                Desc {
                    addr: header,
                    len: 16,
                    flags: VRING_DESC_F_NEXT as u16,
                    next: 1,
                },
                Desc {
                    addr: status,
                    len: 1,
                    flags: 0,
                    next: 0,
                },
            ],
        );
        assert!(fe.queues[0]
            .wait_used(&fe.ram, 1, Duration::from_millis(300))
            .is_none());
    }
    let mut fe = TestFrontend::connect(&setup.disk_a, 2, QUEUE_SIZE);
    assert!(fe.round_trip(0, 0, 0), "queue 0 after reconnect");
}

/// Raw bytes that are not a valid vhost-user message must cost only that
/// connection: the agent logs, closes it, and serves the next front-end.
#[test]
fn malformed_messages_drop_the_connection_not_the_agent() {
    let mut setup = setup();
    let garbage: [&[u8]; 4] = [
        // Unknown request code 999 with a small payload.
        &[
            0xe7, 0x03, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
        ],
        // SET_FEATURES claiming a payload larger than the spec maximum.
        &[2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0],
        // Version 2 header.
        &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
        // GET_VRING_BASE with a 3-byte payload (needs 8).
        &[11, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0],
    ];
    for bytes in garbage {
        let mut stream = UnixStream::connect(&setup.disk_a).unwrap();
        stream.write_all(bytes).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        // The agent must close the connection (read returns 0) rather than
        // hang or answer garbage.
        let n = std::io::Read::read(&mut stream, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "agent answered {:?} to garbage {bytes:?}", &buf[..n]);
        let mut fe = TestFrontend::connect(&setup.disk_a, 1, QUEUE_SIZE);
        assert!(fe.round_trip(0, 0, 0), "disk A after garbage {bytes:?}");
    }
    let mut fe = TestFrontend::connect(&setup.disk_b, 1, QUEUE_SIZE);
    assert!(fe.round_trip(0, 0, 0), "disk B");
    assert!(
        setup.agent.child.try_wait().unwrap().is_none(),
        "agent exited"
    );
    assert!(
        agent_log(&setup.log).contains("front-end disconnected"),
        "no log line for the dropped connection"
    );
}

/// A front-end that sends a header and then stalls must cost only its
/// connection (after the agent's message timeout), not the device.
#[test]
fn stalled_message_drops_the_connection_not_the_device() {
    let mut setup = setup();
    let mut stream = UnixStream::connect(&setup.disk_a).unwrap();
    // SET_FEATURES announcing an 8-byte payload that never comes.
    stream
        .write_all(&[2, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0])
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 16];
    // Closed (end of file, or a reset: the agent left the stalled header
    // unread, it never blocks reading a message that has not all come),
    // rather than our read timing out (an error of another kind).
    let closed = match std::io::Read::read(&mut stream, &mut buf) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the agent must close a stalled connection");
    let mut fe = TestFrontend::connect(&setup.disk_a, 1, QUEUE_SIZE);
    assert!(fe.round_trip(0, 0, 0), "disk A after a stalled front-end");
    assert!(
        setup.agent.child.try_wait().unwrap().is_none(),
        "agent exited"
    );
}
