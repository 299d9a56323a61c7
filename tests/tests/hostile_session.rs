//! A hostile front-end against the session's validation (issue 18,
//! findings 1 and 5): each bad message gets a NACK (or a logged refusal
//! where nothing is answered), changes nothing, and the device goes on to
//! serve. Each test is named `regression_...` after the class it guards.

use std::io::Write;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_agent_tests::frontend::raw::{FLAG_NEED_REPLY, FLAG_VERSION};
use vhost_agent_tests::frontend::{StartOptions, TestFrontend, RAM_SIZE};
use vhost_agent_tests::support::{create_image, spawn_agent, ChildGuard};
use vmm_sys_util::eventfd::EventFd;

/// SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE (vhost-user.rst).
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;

struct Disk {
    _dir: tempfile::TempDir,
    agent: ChildGuard,
    socket: PathBuf,
    log: PathBuf,
}

/// A disk with two queues; the tests start queue 0 and abuse queue 1.
fn disk() -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    create_image(&image, 8 << 20).unwrap();
    let socket = dir.path().join("disk.sock");
    let log = dir.path().join("agent.log");
    let agent = spawn_agent(
        &[format!(
            "socket={},image={},num-queues=2,queue-size=16",
            socket.display(),
            image.display()
        )],
        &[],
        Some(&log),
    );
    Disk {
        _dir: dir,
        agent,
        socket,
        log,
    }
}

impl Disk {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the agent's log has `text` (a refusal is logged right
    /// after its NACK went out).
    fn wait_log(&self, text: &str) {
        let found = vhost_agent_tests::frontend::wait_until(Duration::from_secs(10), || {
            self.log().contains(text)
        });
        assert!(found, "`{text}` never logged:\n{}", self.log());
    }

    /// A front-end that started queue 0 of the disk.
    fn frontend(&self) -> TestFrontend {
        TestFrontend::start(&self.socket, &StartOptions::plain(1, 16))
    }
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut payload = index.to_le_bytes().to_vec();
    payload.extend_from_slice(&num.to_le_bytes());
    payload
}

fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut payload = index.to_le_bytes().to_vec();
    payload.extend_from_slice(&0u32.to_le_bytes());
    for addr in [desc, used, avail, 0] {
        payload.extend_from_slice(&addr.to_le_bytes());
    }
    payload
}

/// Send `request` with NEED_REPLY and return the REPLY_ACK value.
fn acked(frontend: &TestFrontend, request: u32, payload: &[u8]) -> u64 {
    frontend.send_raw(request, FLAG_VERSION | FLAG_NEED_REPLY, payload);
    let reply = frontend.recv_raw();
    assert_eq!(reply.request, request, "a reply to another request");
    reply.u64().expect("a u64 ack")
}

/// virtio 1.2, 2.7: a used ring of 16 entries takes 6 + 8 * 16 bytes; one
/// that starts 16 bytes before the end of guest RAM runs past it. The
/// start address alone translates; the agent used to accept it.
#[test]
fn regression_a_ring_running_past_guest_memory_is_refused() {
    let disk = disk();
    let mut frontend = disk.frontend();
    let base = frontend.ram.user_addr(0);
    assert_eq!(acked(&frontend, SET_VRING_NUM, &vring_state(1, 16)), 0);
    let (desc, used, avail) = (base + 0x2_0000, base + RAM_SIZE - 16, base + 0x2_1000);
    let nack = acked(&frontend, SET_VRING_ADDR, &vring_addr(1, desc, used, avail));
    assert_ne!(nack, 0, "a used ring past guest RAM was accepted");
    disk.wait_log("does not lie inside one memory region");
    // Inside RAM it is taken, and queue 0 still serves.
    let good = acked(
        &frontend,
        SET_VRING_ADDR,
        &vring_addr(1, desc, base + 0x2_2000, avail),
    );
    assert_eq!(good, 0);
    assert!(frontend.round_trip(0, 2, 8), "queue 0 stopped serving");
}

/// The same ring without NEED_REPLY: nobody hears the refusal, so the
/// device raises NEEDS_RESET (GET_STATUS), or the front-end would wait on a
/// ring that never starts.
#[test]
fn regression_a_refusal_nobody_hears_raises_needs_reset() {
    let disk = disk();
    let mut frontend = disk.frontend();
    let base = frontend.ram.user_addr(0);
    assert_eq!(
        frontend.get_status() & 0x40,
        0,
        "NEEDS_RESET before anything"
    );
    assert_eq!(acked(&frontend, SET_VRING_NUM, &vring_state(1, 16)), 0);
    let (desc, used, avail) = (base + 0x2_0000, base + RAM_SIZE - 16, base + 0x2_1000);
    frontend.send_raw(
        SET_VRING_ADDR,
        FLAG_VERSION,
        &vring_addr(1, desc, used, avail),
    );
    assert_ne!(
        frontend.get_status() & 0x40,
        0,
        "an unheard refusal left no NEEDS_RESET"
    );
    disk.wait_log("asked for no reply");
    assert!(frontend.round_trip(0, 2, 8), "queue 0 stopped serving");
}

/// vhost-user spec: a split ring's index is 16 bits; a base above 0xffff
/// means a packed ring this device did not negotiate.
#[test]
fn regression_a_split_ring_base_above_16_bits_is_refused() {
    let disk = disk();
    let mut frontend = disk.frontend();
    assert_ne!(
        acked(&frontend, SET_VRING_BASE, &vring_state(1, 0x1_0000)),
        0,
        "base 0x10000 accepted"
    );
    assert_eq!(acked(&frontend, SET_VRING_BASE, &vring_state(1, 7)), 0);
    assert!(frontend.round_trip(0, 2, 8));
}

/// A kick must be an eventfd: a memfd would be polled and read as one.
#[test]
fn regression_a_memfd_as_kick_is_refused() {
    let disk = disk();
    let mut frontend = disk.frontend();
    let memfd = tempfile::tempfile().unwrap();
    // SAFETY: the fd was just taken from a file we own and nothing else
    // holds it; the EventFd owns it from here on.
    let fake = unsafe { EventFd::from_raw_fd(memfd.into_raw_fd()) };
    frontend
        .frontend
        .set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // Queue 0 runs: the refusal must come before anything stops it.
    let refused = frontend.frontend.set_vring_kick(0, &fake);
    frontend
        .frontend
        .set_hdr_flags(VhostUserHeaderFlag::empty());
    assert!(refused.is_err(), "a memfd was taken as a kick");
    disk.wait_log("not an eventfd");
    assert!(frontend.round_trip(0, 2, 8));
}

/// A front-end may ack only protocol features the back-end offered.
#[test]
fn regression_protocol_features_never_offered_are_refused() {
    let disk = disk();
    let mut frontend = disk.frontend();
    let acked_before = frontend.protocol;
    let bogus = acked_before | (1 << 62);
    let result = frontend.frontend.set_protocol_features(
        vhost::vhost_user::message::VhostUserProtocolFeatures::from_bits_retain(bogus),
    );
    // No reply is defined for it before REPLY_ACK takes effect; the
    // refusal is logged and the connection goes on.
    let _ = result;
    frontend.sync();
    disk.wait_log("we did not offer");
    assert!(frontend.round_trip(0, 2, 8));
}

/// Issue 18, finding 1: 5 of 12 header bytes, then the front-end closes
/// (or stalls): the connection goes, the device serves the next one, and
/// SIGTERM still ends the agent.
#[test]
fn regression_a_partial_header_costs_only_its_connection() {
    let mut disk = disk();
    {
        let mut stream = UnixStream::connect(&disk.socket).unwrap();
        stream.write_all(&[1, 0, 0, 0, 1]).unwrap();
    }
    // One front-end at a time: the next connects once this one is gone.
    disk.wait_log("front-end disconnected");
    let mut frontend = disk.frontend();
    assert!(
        frontend.round_trip(0, 2, 8),
        "the device did not serve again"
    );
    drop(frontend);
    // Now one that stalls mid-header, and a shutdown meanwhile.
    let mut stalled = UnixStream::connect(&disk.socket).unwrap();
    stalled.write_all(&[1, 0, 0]).unwrap();
    // The agent has that connection (three connects so far) before the
    // signal comes.
    let connected = vhost_agent_tests::frontend::wait_until(Duration::from_secs(10), || {
        disk.log().matches("front-end connected").count() >= 3
    });
    assert!(connected, "{}", disk.log());
    disk.agent.signal(libc::SIGTERM);
    let exited = disk.agent.wait_timeout(Duration::from_secs(60));
    assert!(
        exited.is_some_and(|status| status.success()),
        "SIGTERM did not end the agent while a header was half sent: {exited:?}\n{}",
        disk.log()
    );
    drop(stalled);
}
