//! The `vhost-agent` binary at its edges: bad command lines and unusable
//! images get one clear error line and a non-zero exit (never a panic), and
//! SIGTERM shuts down cleanly, removing the socket.

use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use vhost_agent_tests::frontend::{Desc, TestFrontend, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use vhost_agent_tests::support::{agent_binary, create_image, spawn_agent};
use vm_memory::{Bytes, GuestAddress};

/// Run `vhost-agent serve` with `args`; returns (exit code, stderr).
fn serve(args: &[&str]) -> (i32, String) {
    let output = Command::new(agent_binary())
        .arg("serve")
        .args(args)
        .output()
        .expect("run vhost-agent");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_clear_error(args: &[&str], expected: &str) {
    let (code, stderr) = serve(args);
    assert_ne!(code, 0, "{args:?} must fail");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected `{expected}` in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
}

#[test]
fn missing_image_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "socket={},image={}",
        dir.path().join("s").display(),
        dir.path().join("nope.img").display()
    );
    assert_clear_error(&["--blk", &spec], "cannot open");
    assert!(
        !dir.path().join("s").exists(),
        "socket left behind after a failed start"
    );
}

#[test]
fn bad_options_are_refused_by_name() {
    assert_clear_error(
        &["--blk", "socket=/tmp/x,image=/tmp/y,queue-size=100"],
        "power of two",
    );
    assert_clear_error(
        &["--blk", "socket=/tmp/x,image=/tmp/y,frobnicate=1"],
        "unknown --blk key",
    );
    assert_clear_error(&["--blk", "image=/tmp/y"], "missing socket");
    assert_clear_error(&[], "--blk");
}

#[test]
fn presetup_protocol_is_off_by_default_and_explains_the_collision() {
    let output = Command::new(agent_binary())
        .args(["serve", "--help"])
        .output()
        .expect("run vhost-agent");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for text in [
        "--presetup-protocol",
        "nvidia-rfc",
        "default: none",
        "SHARED_OBJECT",
    ] {
        assert!(help.contains(text), "`{text}` not in serve --help:\n{help}");
    }
    assert_clear_error(
        &[
            "--net",
            "socket=/tmp/x,dataplane=loop",
            "--presetup-protocol=shared-object",
        ],
        "invalid value 'shared-object'",
    );
}

#[test]
fn socket_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    create_image(&image, 1 << 20).unwrap();
    let socket = dir.path().join("busy.sock");
    let _listener = UnixListener::bind(&socket).unwrap();
    let spec = format!("socket={},image={}", socket.display(), image.display());
    assert_clear_error(&["--blk", &spec], "in use");
    assert!(
        socket.exists(),
        "the other process's socket must not be removed"
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    create_image(&image, 1 << 20).unwrap();
    let socket = dir.path().join("stale.sock");
    drop(UnixListener::bind(&socket).unwrap()); // file stays, nobody listens
    let _agent = spawn_agent(
        &[format!(
            "socket={},image={}",
            socket.display(),
            image.display()
        )],
        &[],
        None,
    );
    let mut frontend = TestFrontend::connect(&socket, 1, 16);
    assert!(frontend.round_trip(0, 0, 0));
}

/// SIGTERM: exit 0, socket removed, and every request the agent took off
/// the ring was finished (completed OK), none dropped half-way. Requests it
/// had not taken yet stay in the avail ring for the next back-end.
#[test]
fn sigterm_exits_cleanly_finishing_what_it_took() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    create_image(&image, 8 << 20).unwrap();
    let socket = dir.path().join("a.sock");
    let mut agent = spawn_agent(
        &[format!(
            "socket={},image={}",
            socket.display(),
            image.display()
        )],
        &[],
        None,
    );
    let mut frontend = TestFrontend::connect(&socket, 1, 16);
    assert!(frontend.round_trip(0, 0, 0));
    let requests = 5;
    let mut statuses = Vec::new();
    for slot in 1..=requests {
        let (header, data, status) = TestFrontend::buffers(slot);
        frontend.write_header(header, VIRTIO_BLK_T_IN, 8 * slot);
        frontend
            .ram
            .mem
            .write_obj(0xffu8, GuestAddress(status))
            .unwrap();
        frontend.queues[0].add_chain(
            &frontend.ram,
            &[
                Desc::readable(header, 16),
                Desc::writable(data, 4096),
                Desc::writable(status, 1),
            ],
        );
        statuses.push(status);
    }
    frontend.queues[0].kick();
    agent.signal(libc::SIGTERM);
    let exit = agent
        .wait_timeout(Duration::from_secs(10))
        .expect("agent did not exit on SIGTERM");
    assert!(exit.success(), "agent exited with {exit}");
    assert!(!socket.exists(), "socket file left behind");

    let used = frontend.queues[0].used_idx(&frontend.ram);
    // One used entry is the round trip's write and one its read.
    let taken = used.wrapping_sub(2) as usize;
    assert!(
        taken <= statuses.len(),
        "{taken} used entries for {requests} requests"
    );
    for (i, &status) in statuses.iter().enumerate() {
        let value: u8 = frontend.ram.mem.read_obj(GuestAddress(status)).unwrap();
        if i < taken {
            assert_eq!(
                value, VIRTIO_BLK_S_OK,
                "request {i} was taken but not finished"
            );
        } else {
            assert_eq!(
                value, 0xff,
                "request {i} was not published but its status was written"
            );
        }
    }
}

/// This host's kernel has no vhost-net (shared/HOST.md): a vhost-net
/// device is not served, the agent says which dataplane needs what and how
/// to get it, and neither falls back to copying frames itself nor leaves a
/// socket or a tap behind. (The lab test `lab_vhost_net` checks the same
/// after `rmmod vhost_net` on a kernel that has it.)
#[test]
fn without_dev_vhost_net_a_vhost_net_device_is_refused_with_the_fix() {
    assert!(
        !std::path::Path::new("/dev/vhost-net").exists(),
        "precondition: this test needs a host without /dev/vhost-net"
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let spec = format!("socket={},dataplane=vhost-net:vhnhost0", socket.display());
    assert_clear_error(
        &["--net", &spec],
        "dataplane=vhost-net:vhnhost0 needs /dev/vhost-net, which does not exist; \
         load the vhost_net module (`modprobe vhost_net`)",
    );
    assert!(!socket.exists(), "socket left behind after a failed start");
    assert!(
        !std::path::Path::new("/sys/class/net/vhnhost0").exists(),
        "a tap was made for a device that is not served"
    );
    // The kernel picks a frame's RX queue: RSS cannot be had on vhost-net.
    assert_clear_error(
        &["--net", &format!("{spec},queue-pairs=2,rss=on")],
        "rss= does not apply to dataplane vhost-net:vhnhost0",
    );
}
