//! The agent's net device against DPDK 22.11's `net_virtio_user`, a real
//! vhost-user client we did not write, driven through `dpdk-testpmd`
//! ([`vhost_agent_tests::testpmd`]).
//!
//! The agent runs the `loop` dataplane (every frame the client transmits on
//! pair i comes back on pair i's RX queue) pinned to CPU 1; testpmd runs on
//! CPU 0 in io forwarding after `start tx_first`, so frames circle between
//! the two: a closed loop. Each session checks that
//!
//! * the link comes up (negotiation, memory table, rings, DRIVER_OK);
//! * the loop keeps running: testpmd's RX and TX counters still grow a
//!   second later;
//! * every queue carries traffic (testpmd's per-queue `rx_qN_good_packets`);
//! * after `stop`, once the agent's counters settle, for every pair the
//!   frames testpmd put on its TX ring equal the frames the agent took
//!   (`tx-packets`), each of which the agent either reflected
//!   (`rx-packets`) or dropped (`rx-dropped`/`tx-dropped`), and testpmd
//!   received no more than the agent reflected and at most one RX ring
//!   fewer.
//!
//! The `anchor_*` tests run the same session against testpmd's own
//! `net_vhost` back-end instead: they are the control that proves the
//! harness and the checks right, so a failing agent test points at the
//! agent. One more checks the harness' failure path: a client with no
//! back-end fails with testpmd's own explanation.
//!
//! Multiqueue needs no `cq=1` in 22.11: `net_virtio_user` turns its control
//! queue on by itself when `queues` > 1 and emulates it locally; the
//! back-end only sees `SET_VRING_ENABLE` for the extra pairs.
//!
//! These tests need DPDK and root (`scripts/install-test-deps.sh`); without
//! them they fail, they do not skip. They busy-poll both CPUs: nextest runs
//! this binary with the machine to itself (.config/nextest.toml). When a
//! test fails, the back-end's log and testpmd's output are printed after
//! the panic message; `RUST_LOG=debug` makes the agent's log detailed.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vhost_agent_tests::net_agent::{NetAgent, NetAgentOptions, PairCounters};
use vhost_agent_tests::testpmd::{require_dpdk, Testpmd, TestpmdError, TestpmdOptions};

/// Descriptors per virtqueue, set on the client (`queue_size=`).
const RING: u64 = 256;
/// Bursts each queue sends before forwarding (`start tx_first`).
const TX_FIRST: u32 = 32;
/// How long negotiation may take.
const LINK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a session forwards before it is measured.
const WARMUP: Duration = Duration::from_millis(500);
/// How long the loop must keep running between two looks.
const WINDOW: Duration = Duration::from_secs(1);

/// The back-end of a session: the agent, or testpmd's `net_vhost` (the
/// anchor).
enum Backend {
    Agent(NetAgent),
    Anchor(Testpmd),
}

/// What the back-end did on one queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BackendPair {
    /// Frames taken from the client's TX ring.
    from_client: u64,
    /// Frames written into the client's RX ring.
    to_client: u64,
    /// Frames for the client the back-end dropped, if it counts them.
    dropped: Option<u64>,
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Agent(_) => "vhost-agent",
            Backend::Anchor(_) => "testpmd net_vhost (anchor)",
        }
    }

    fn socket(&self) -> std::path::PathBuf {
        match self {
            Backend::Agent(agent) => agent.socket.clone(),
            Backend::Anchor(anchor) => match &anchor.options().role {
                vhost_agent_tests::testpmd::Role::Backend { socket } => socket.clone(),
                vhost_agent_tests::testpmd::Role::Client { .. } => unreachable!(),
            },
        }
    }

    /// Per-pair counts, cumulative, read once nothing moves any more.
    fn settled(&mut self, queues: u16) -> Vec<BackendPair> {
        match self {
            Backend::Agent(agent) => {
                let pairs = agent
                    .settled_pairs(Duration::from_millis(200), Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("reading the agent's counters: {e}"));
                assert_eq!(
                    pairs.len(),
                    usize::from(queues),
                    "query-devices reports {} pairs, the agent serves {queues}",
                    pairs.len()
                );
                for (i, p) in pairs.iter().enumerate() {
                    assert_eq!(p.tx_errors, 0, "pair {i}: malformed TX chains: {p:?}");
                    assert_eq!(
                        p.tx_packets,
                        p.rx_packets + p.rx_dropped + p.tx_dropped,
                        "pair {i}: the loop dataplane must reflect or drop every frame it \
                         takes: {p:?}"
                    );
                }
                pairs
                    .iter()
                    .map(|p| BackendPair {
                        from_client: p.tx_packets,
                        to_client: p.rx_packets,
                        dropped: Some(p.rx_dropped + p.tx_dropped),
                    })
                    .collect()
            }
            Backend::Anchor(anchor) => {
                let read = |anchor: &mut Testpmd| -> Vec<BackendPair> {
                    let x = anchor
                        .xstats()
                        .unwrap_or_else(|e| panic!("anchor xstats: {e}"));
                    (0..queues)
                        .map(|q| BackendPair {
                            from_client: x.rx_queue_packets(q).unwrap_or_else(|e| panic!("{e}")),
                            to_client: x.tx_queue_packets(q).unwrap_or_else(|e| panic!("{e}")),
                            dropped: None,
                        })
                        .collect()
                };
                let mut last = read(anchor);
                for _ in 0..50 {
                    std::thread::sleep(Duration::from_millis(200));
                    let now = read(anchor);
                    if now == last {
                        return now;
                    }
                    last = now;
                }
                panic!("the anchor's counters do not settle: {last:?}");
            }
        }
    }

    /// The last lines of the back-end's log or output.
    fn log_tail(&self, lines: usize) -> String {
        match self {
            Backend::Agent(agent) => agent.log_tail(lines),
            Backend::Anchor(anchor) => anchor.output_tail(lines),
        }
    }

    /// The back-end is still running.
    fn assert_alive(&mut self) {
        match self {
            Backend::Agent(agent) => {
                if let Err(e) = agent.check_alive() {
                    panic!("{e}");
                }
            }
            Backend::Anchor(anchor) => {
                // Any command answers only while it runs.
                if let Err(e) = anchor.command("show port info 0") {
                    panic!("the anchor is gone: {e}");
                }
            }
        }
    }
}

/// A back-end and the client of the current session. If the test panics
/// while it lives, dropping it prints both sides' output.
struct Rig {
    backend: Backend,
    client: Option<Testpmd>,
    /// Holds the anchor's socket.
    _dir: Option<tempfile::TempDir>,
    /// One rig at a time, also under `cargo test` (threads): the sessions
    /// pin to the same CPUs.
    _serial: MutexGuard<'static, ()>,
}

/// Taken by every [`Rig`] for its lifetime.
static SERIAL: Mutex<()> = Mutex::new(());

/// Take [`SERIAL`], whether or not an earlier test panicked holding it.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Rig {
    /// The agent's `loop` dataplane with `queues` pairs, pinned to CPU 1.
    fn agent(queues: u16) -> Rig {
        require_dpdk();
        let serial = serial();
        let agent = NetAgent::spawn(&NetAgentOptions::reflector(queues))
            .unwrap_or_else(|e| panic!("starting the agent: {e}"));
        Rig {
            backend: Backend::Agent(agent),
            client: None,
            _dir: None,
            _serial: serial,
        }
    }

    /// testpmd's `net_vhost` with `queues` pairs on CPU 1, io forwarding.
    fn anchor(queues: u16) -> Rig {
        require_dpdk();
        let serial = serial();
        let dir = tempfile::Builder::new()
            .prefix("net-anchor.")
            .tempdir()
            .expect("temporary directory");
        let socket = dir.path().join("vhost.sock");
        let mut options = TestpmdOptions::backend(&socket, queues);
        options.name = "anchor".to_string();
        let mut anchor = Testpmd::spawn(options).unwrap_or_else(|e| panic!("anchor: {e}"));
        anchor
            .start()
            .unwrap_or_else(|e| panic!("anchor start: {e}"));
        Rig {
            backend: Backend::Anchor(anchor),
            client: None,
            _dir: Some(dir),
            _serial: serial,
        }
    }

    /// Start a testpmd client with `queues` pairs and `frame_len`-byte
    /// frames, and wait for its link.
    fn connect(&mut self, queues: u16, frame_len: u16) -> Result<(), TestpmdError> {
        let mut options = TestpmdOptions::client(&self.backend.socket(), queues);
        options.frame_len = frame_len;
        options.devargs.push(format!("queue_size={RING}"));
        options.name = "testpmd client".to_string();
        let mut client = Testpmd::spawn(options)?;
        let linked = client.wait_link_up(LINK_TIMEOUT);
        self.client = Some(client);
        linked
    }

    fn client(&mut self) -> &mut Testpmd {
        self.client.as_mut().expect("a client is connected")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("NET_TEST_SHOW_LOG").is_some() {
            eprintln!(
                "---- last lines of the {} log ----\n{}\n---- end of log ----",
                self.backend.name(),
                self.backend.log_tail(60)
            );
            if let Some(client) = &self.client {
                eprintln!(
                    "---- last lines of the testpmd client's output ----\n{}\n---- end ----",
                    client.output_tail(60)
                );
            }
        }
    }
}

/// Unwrap a testpmd result, naming what was being done.
#[track_caller]
fn ok<T>(result: Result<T, TestpmdError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// What one session moved, for tests that look across sessions.
#[derive(Debug)]
struct Session {
    /// Frames the client transmitted, per queue.
    client_tx: Vec<u64>,
    /// Frames the client received, per queue.
    client_rx: Vec<u64>,
}

/// One closed-loop session on the rig's connected client: `start tx_first`,
/// the loop must keep running and use every queue, then `stop` and compare
/// the client's counts with the back-end's (`before`: the back-end's counts
/// when the session began).
fn closed_loop(rig: &mut Rig, queues: u16, frame_len: u16, before: &[BackendPair]) -> Session {
    let name = rig.backend.name();
    let client = rig.client();
    ok(client.start_tx_first(TX_FIRST), "start tx_first");
    std::thread::sleep(WARMUP);
    let first = ok(client.port_stats(), "port stats");
    std::thread::sleep(WINDOW);
    let second = ok(client.port_stats(), "port stats");
    assert!(
        second.rx_packets > first.rx_packets && second.tx_packets > first.tx_packets,
        "the closed loop through {name} stopped: testpmd's counters were {first:?}, \
         {WINDOW:?} later {second:?}"
    );
    let running = ok(client.xstats(), "xstats");
    for q in 0..queues {
        let rx = ok(running.rx_queue_packets(q), "per-queue RX");
        assert!(
            rx > 0,
            "testpmd received nothing on RX queue {q} of {queues} from {name}:\n{}",
            running.raw
        );
    }
    ok(client.stop(), "stop");
    let x = ok(client.xstats(), "xstats after stop");
    let client_tx: Vec<u64> = (0..queues)
        .map(|q| ok(x.tx_queue_packets(q), "per-queue TX"))
        .collect();
    let client_rx: Vec<u64> = (0..queues)
        .map(|q| ok(x.rx_queue_packets(q), "per-queue RX"))
        .collect();
    let bytes = ok(x.get("tx_good_bytes"), "tx bytes");
    assert_eq!(
        bytes,
        x.get("tx_good_packets").unwrap() * u64::from(frame_len),
        "testpmd sent frames of another size than {frame_len} bytes:\n{}",
        x.raw
    );

    let after = rig.backend.settled(queues);
    for q in 0..usize::from(queues) {
        let from_client = after[q].from_client - before[q].from_client;
        let to_client = after[q].to_client - before[q].to_client;
        assert_eq!(
            from_client, client_tx[q],
            "pair {q}: {name} took {from_client} frames from the TX ring, testpmd put \
             {} there",
            client_tx[q]
        );
        assert!(
            client_rx[q] <= to_client && to_client - client_rx[q] <= RING,
            "pair {q}: {name} wrote {to_client} frames into the RX ring, testpmd \
             received {} (at most one ring of {RING} may be left unread at the stop)",
            client_rx[q]
        );
        if let (Some(a), Some(b)) = (after[q].dropped, before[q].dropped) {
            eprintln!(
                "pair {q}: client sent {}, received {}; {name} reflected {to_client}, \
                 dropped {}",
                client_tx[q],
                client_rx[q],
                a - b
            );
        }
    }
    rig.backend.assert_alive();
    Session {
        client_tx,
        client_rx,
    }
}

/// The back-end's counts once they settle. Read them after the client's
/// link is up: the anchor has no counters without a client.
fn counts(rig: &mut Rig, queues: u16) -> Vec<BackendPair> {
    rig.backend.settled(queues)
}

/// One client session start to end: connect, closed loop, quit.
fn session(rig: &mut Rig, queues: u16, frame_len: u16) -> Session {
    ok(
        rig.connect(queues, frame_len),
        "connecting the testpmd client",
    );
    let before = counts(rig, queues);
    let session = closed_loop(rig, queues, frame_len, &before);
    let client = rig.client.take().expect("connected");
    ok(client.quit(Duration::from_secs(15)), "testpmd quit");
    session
}

/// The end of an agent test: it is still running, exits cleanly on
/// SIGTERM and never panicked.
fn finish(mut rig: Rig) {
    rig.client = None;
    if let Backend::Agent(agent) = &mut rig.backend {
        if let Err(e) = agent.stop() {
            panic!("{e}");
        }
    }
}

#[test]
fn agent_two_queue_pairs_closed_loop() {
    let mut rig = Rig::agent(2);
    let s = session(&mut rig, 2, 64);
    assert!(s.client_tx.iter().all(|&n| n > 0), "{s:?}");
    finish(rig);
}

#[test]
fn agent_one_queue_pair_1500_byte_frames() {
    let mut rig = Rig::agent(1);
    ok(rig.connect(1, 1500), "connecting the testpmd client");
    let before = counts(&mut rig, 1);
    closed_loop(&mut rig, 1, 1500, &before);
    // Bytes too: the agent counts frames without the virtio-net header.
    let x = ok(rig.client().xstats(), "xstats");
    if let Backend::Agent(agent) = &rig.backend {
        let pairs = agent.pairs().expect("agent counters");
        let total = PairCounters::total(&pairs);
        assert_eq!(
            total.tx_bytes,
            x.get("tx_good_bytes").unwrap(),
            "agent TX bytes vs testpmd's: {total:?}\n{}",
            x.raw
        );
        assert_eq!(
            total.rx_bytes,
            total.rx_packets * 1500,
            "the agent reflected frames of another size: {total:?}"
        );
    }
    let client = rig.client.take().unwrap();
    ok(client.quit(Duration::from_secs(15)), "testpmd quit");
    finish(rig);
}

#[test]
fn agent_serves_a_restarted_client() {
    let mut rig = Rig::agent(2);
    // 1: a clean session and a clean quit.
    session(&mut rig, 2, 64);
    // 2: a second process on the same socket: new memory table, new rings.
    session(&mut rig, 2, 64);
    // 3: a client killed while forwarding (no GET_VRING_BASE, no goodbye).
    ok(rig.connect(2, 64), "connecting the third client");
    ok(rig.client().start_tx_first(TX_FIRST), "start tx_first");
    std::thread::sleep(WARMUP);
    let killed = rig.client.take().unwrap();
    drop(killed);
    rig.backend.assert_alive();
    // 4: a new client right after the crash (as QEMU reconnects): the
    // agent must notice the hang-up and serve it, with no retry.
    ok(
        rig.connect(2, 64),
        "connecting a client right after a client was killed",
    );
    let before = counts(&mut rig, 2);
    closed_loop(&mut rig, 2, 64, &before);
    let client = rig.client.take().unwrap();
    ok(client.quit(Duration::from_secs(15)), "testpmd quit");
    finish(rig);
}

#[test]
fn a_client_without_a_back_end_fails_with_testpmds_own_words() {
    require_dpdk();
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("nobody.sock");
    let err = match Testpmd::spawn(TestpmdOptions::client(&socket, 1)) {
        Ok(_) => panic!("testpmd made a port for a socket nobody listens on"),
        Err(e) => e.to_string(),
    };
    eprintln!("as expected: {err}");
    assert!(
        err.contains(socket.to_str().unwrap()) && err.contains("virtio_user"),
        "the error should carry testpmd's words about the socket: {err}"
    );
}

#[test]
fn anchor_two_queue_pairs_closed_loop() {
    let mut rig = Rig::anchor(2);
    let s = session(&mut rig, 2, 64);
    assert!(s.client_rx.iter().all(|&n| n > 0), "{s:?}");
}

#[test]
fn anchor_serves_a_restarted_client() {
    let mut rig = Rig::anchor(1);
    session(&mut rig, 1, 1500);
    session(&mut rig, 1, 64);
}
