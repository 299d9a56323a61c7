//! End to end: a real Linux guest under QEMU 10 on a virtio-net device
//! whose frames vhost-agent's `tap:` dataplane carries to a bridge in a
//! private network namespace; as the control that proves the harness
//! itself, the same guest on QEMU's own tap netdev.
//!
//! The guest (`/init`'s `net` mode) gets its address from busybox `udhcpd`
//! on the bridge (a static lease for its MAC, so the test knows the
//! address to expect), pings the bridge's address, and moves TCP streams
//! through busybox `nc` both ways: uploads to a sink the test runs in the
//! namespace, downloads from a source there. Byte counts and SHA-256 are
//! compared on both sides. Variants: one queue pair; two pairs on two
//! vCPUs (both pairs must carry traffic: the guest's interrupts per
//! virtqueue and the agent's per-queue counters); MTU 9000 end to end (a
//! ping with an 8972-byte payload must cross without IP fragmentation).
//!
//! Needs root, iproute2, QEMU 10 and the guest build tools: run
//! `sudo scripts/install-test-deps.sh` first. Missing tools fail the tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_agent_tests::netns::Lan;
use vhost_agent_tests::netprobe::{TcpSink, TcpSource, Transfer};
use vhost_agent_tests::qemu::{self, Nic, Qemu, Verdict, VmConfig};
use vhost_agent_tests::support::{self, ChildGuard};

/// The guest's MAC; udhcpd leases it a fixed address.
const GUEST_MAC: &str = "52:54:00:77:00:10";
/// The sink's port (guest uploads); the source (downloads) is the next one.
const SINK_PORT: u16 = 5000;
/// Bytes of each stream, each way.
const STREAM_BYTES: usize = 8 << 20;
/// Boot (~4 s), DHCP, ping and the streams (a few seconds under TCG); room
/// for a loaded machine.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(180);
/// The agent's tap.
const AGENT_TAP: &str = "vtap0";
/// The control's tap.
const QEMU_TAP: &str = "qtap0";
/// The agent's net device id.
const DEVICE_ID: &str = "net0";

/// Set this variable to keep the test's directory (consoles, QEMU, agent
/// and udhcpd logs) for a look afterwards.
const KEEP_DIR_ENV: &str = "VHOST_TEST_KEEP_DIR";

/// Which back-end carries the guest's frames to the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// vhost-agent `--net dataplane=tap:...`, QEMU `-netdev vhost-user`.
    Agent,
    /// QEMU's own `-netdev tap` (no vhost-user back-end): the control.
    QemuTap,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Agent => "vhost-agent",
            Backend::QemuTap => "qemu-tap",
        }
    }
}

/// What the guest does.
#[derive(Debug, Clone, Copy)]
struct Case {
    /// Queue pairs of the device (and vCPUs of the guest, when above 1).
    pairs: u16,
    /// MTU of the device, the taps and the bridge.
    mtu: u32,
    /// Payload of the guest's pings.
    ping_size: u32,
    /// Parallel TCP streams each way.
    streams: usize,
}

/// What a run left to check.
struct Outcome {
    verdict: Verdict,
    uploads: Vec<Transfer>,
    source_sha256: String,
    /// The agent's `query-devices` reply after the run (or the last one
    /// while the guest ran).
    devices: Option<Value>,
    /// The agent's log.
    agent_log: String,
    elapsed: Duration,
    /// The address (with prefix) udhcpd's static lease gives the guest.
    lease: String,
}

/// The back-end process and what QEMU attaches to.
struct Attached {
    nic: Nic,
    agent: Option<ChildGuard>,
    agent_log: PathBuf,
    control: PathBuf,
}

/// Start `backend` on `lan` for `case`.
fn attach(backend: Backend, lan: &Lan, case: &Case, dir: &Path) -> Attached {
    let agent_log = dir.join("vhost-agent.log");
    let control = dir.join("control.sock");
    match backend {
        Backend::Agent => {
            let socket = dir.join("net.sock");
            let mut spec = format!(
                "socket={},dataplane=tap:{AGENT_TAP},id={DEVICE_ID}",
                socket.display()
            );
            // The defaults (one pair, MTU 1500) stay implicit: they are
            // part of what the single-queue case checks.
            if case.pairs > 1 {
                spec.push_str(&format!(",queue-pairs={}", case.pairs));
            }
            if case.mtu != 1500 {
                spec.push_str(&format!(",mtu={}", case.mtu));
            }
            let control_arg = control.display().to_string();
            let mut agent = lan
                .ns
                .spawn_agent(&[spec], &["--control", &control_arg], &agent_log);
            // The contract: the tap exists, up and with its MTU, before the
            // socket does.
            lan.ns
                .wait_link(AGENT_TAP, Duration::from_secs(1), &mut agent);
            lan.plug(AGENT_TAP);
            let mut nic = Nic::vhost_user(&socket, GUEST_MAC).queue_pairs(case.pairs);
            if case.mtu != 1500 {
                nic = nic.host_mtu(case.mtu);
            }
            Attached {
                nic,
                agent: Some(agent),
                agent_log,
                control,
            }
        }
        Backend::QemuTap => {
            lan.add_tap(QEMU_TAP, case.pairs);
            let mut nic = Nic::tap(QEMU_TAP, GUEST_MAC).queue_pairs(case.pairs);
            if case.mtu != 1500 {
                nic = nic.host_mtu(case.mtu);
            }
            Attached {
                nic,
                agent: None,
                agent_log,
                control,
            }
        }
    }
}

/// Boot the guest in `net` mode on `backend` and collect what it and the
/// host side saw. Panics (with the consoles and logs) unless the guest's
/// verdict is PASS.
fn run(backend: Backend, case: Case) -> Outcome {
    qemu::require_qemu_test_deps();
    qemu::guest();
    let mut dir = tempfile::tempdir().expect("create a temporary directory");
    if std::env::var_os(KEEP_DIR_ENV).is_some() {
        dir.disable_cleanup(true);
        eprintln!("{KEEP_DIR_ENV}: keeping {}", dir.path().display());
    }
    let mut lan = Lan::new(dir.path(), case.mtu, &[GUEST_MAC]);
    let sink = TcpSink::start(&lan.ns, SINK_PORT);
    let source = TcpSource::start(&lan.ns, SINK_PORT + 1, STREAM_BYTES);
    let mut attached = attach(backend, &lan, &case, dir.path());

    let mut config = VmConfig::new("net")
        .param("vhost_net_peer", Lan::HOST_ADDR)
        .param("vhost_net_ping_size", case.ping_size)
        .param("vhost_net_port", SINK_PORT)
        .param("vhost_net_bytes", STREAM_BYTES)
        .param("vhost_net_streams", case.streams)
        .nic(attached.nic.clone());
    if case.pairs > 1 {
        // Linux enables min(vCPUs, pairs) queue pairs.
        config = config.cpus(u32::from(case.pairs));
    }
    if backend == Backend::QemuTap {
        config = config.in_netns(lan.ns.name());
    }
    let started = Instant::now();
    let mut vm = Qemu::spawn_named(&config, dir.path(), "qemu");
    vm.add_context_log("udhcpd", &lan.dhcp_log);
    if attached.agent.is_some() {
        vm.add_context_log("vhost-agent", &attached.agent_log);
    }

    // Poll the agent's counters while the guest runs: they are the host's
    // evidence of which queues carried traffic, and the device may be gone
    // once QEMU has powered off.
    let mut devices = None;
    let deadline = Instant::now() + VERDICT_TIMEOUT;
    while vm.verdict().is_none()
        && matches!(vm.process.child.try_wait(), Ok(None))
        && Instant::now() < deadline
    {
        if attached.agent.is_some() {
            if let Ok(reply) =
                support::control_execute(&attached.control, "query-devices", json!({}))
            {
                devices = Some(reply);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let verdict = vm.expect_pass(Duration::from_secs(5));
    let elapsed = started.elapsed();
    // The counters survive the disconnect (docs/control-api.md): the last
    // word, if the agent answers.
    if attached.agent.is_some() {
        if let Ok(reply) = support::control_execute(&attached.control, "query-devices", json!({})) {
            devices = Some(reply);
        }
    }
    lan.assert_dhcp_alive();
    if let Some(agent) = attached.agent.as_mut() {
        if let Ok(Some(status)) = agent.child.try_wait() {
            panic!(
                "the agent exited ({status}) during the run\n{}",
                vm.diagnostics()
            );
        }
    }
    let uploads = sink
        .wait(case.streams, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("sink: {e}\n{}", vm.diagnostics()));
    let downloads = source
        .wait(case.streams, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("source: {e}\n{}", vm.diagnostics()));
    for d in &downloads {
        assert_eq!(d.error, None, "source: {downloads:?}\n{}", vm.diagnostics());
    }
    Outcome {
        verdict,
        uploads,
        source_sha256: source.sha256.clone(),
        devices,
        agent_log: std::fs::read_to_string(&attached.agent_log).unwrap_or_default(),
        elapsed,
        lease: format!("{}/{}", lan.guest_addr(GUEST_MAC), Lan::PREFIX_LEN),
    }
}

/// A numeric field of the verdict.
fn num(v: &Verdict, key: &str) -> u64 {
    v.field(key)
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {v:?}"))
}

/// The checks every case shares: the leased address, the device's shape,
/// the pings, and every stream's bytes and SHA-256 on both sides.
fn assert_common(backend: Backend, case: &Case, out: &Outcome) {
    let v = &out.verdict;
    assert!(v.passed, "{v:?}");
    assert_eq!(
        v.field("addr"),
        Some(out.lease.as_str()),
        "the DHCP lease: {v:?}"
    );
    assert_eq!(v.field("addr_source"), Some("dhcp"), "{v:?}");
    let server = Lan::HOST_ADDR.to_string();
    assert_eq!(v.field("server"), Some(server.as_str()), "{v:?}");
    assert_eq!(v.field("mac"), Some(GUEST_MAC), "{v:?}");
    assert_eq!(num(v, "mtu"), u64::from(case.mtu), "guest MTU: {v:?}");
    assert_eq!(num(v, "rx_queues"), u64::from(case.pairs), "{v:?}");
    assert_eq!(num(v, "tx_queues"), u64::from(case.pairs), "{v:?}");
    assert_eq!(num(v, "ping_size"), u64::from(case.ping_size), "{v:?}");
    let sent = num(v, "ping_sent");
    assert!(sent > 0, "{v:?}");
    assert_eq!(num(v, "ping_received"), sent, "ping loss: {v:?}");

    // Uploads: each of the guest's streams arrived whole at the sink
    // (connections end in any order).
    assert_eq!(out.uploads.len(), case.streams, "{:?}", out.uploads);
    let mut host: Vec<(u64, String)> = out
        .uploads
        .iter()
        .map(|t| {
            assert_eq!(t.error, None, "sink: {:?}", out.uploads);
            (t.bytes, t.sha256.clone())
        })
        .collect();
    let mut guest: Vec<(u64, String)> = (0..case.streams)
        .map(|i| {
            assert_eq!(v.field(&format!("up{i}_rc")), Some("0"), "{v:?}");
            let sha = v
                .field(&format!("up{i}_sha256"))
                .unwrap_or_else(|| panic!("no up{i}_sha256 in {v:?}"));
            (num(v, &format!("up{i}_bytes")), sha.to_string())
        })
        .collect();
    host.sort();
    guest.sort();
    assert_eq!(host, guest, "uploads: host side vs guest side");
    for (bytes, _) in &host {
        assert_eq!(*bytes, STREAM_BYTES as u64, "upload size");
    }
    // Downloads: the guest got the source's bytes.
    for i in 0..case.streams {
        assert_eq!(v.field(&format!("down{i}_rc")), Some("0"), "{v:?}");
        assert_eq!(
            num(v, &format!("down{i}_bytes")),
            STREAM_BYTES as u64,
            "{v:?}"
        );
        assert_eq!(
            v.field(&format!("down{i}_sha256")),
            Some(out.source_sha256.as_str()),
            "download {i}: {v:?}"
        );
    }
    let mib = (STREAM_BYTES * case.streams) as f64 / f64::from(1 << 20);
    let rate = |cs: u64| mib / (cs.max(1) as f64 / 100.0);
    eprintln!(
        "{}: {case:?} PASS in {:.1?}: up {:.1} MiB/s, down {:.1} MiB/s (guest clock); {}",
        backend.name(),
        out.elapsed,
        rate(num(v, "up_cs")),
        rate(num(v, "down_cs")),
        v.details
    );
}

/// The agent's side of a run: every data queue started, and, from
/// `query-devices` (docs/control-api.md), the device's shape and traffic
/// on every queue pair in both directions.
fn assert_agent(case: &Case, out: &Outcome) {
    for q in 0..2 * case.pairs {
        assert!(
            out.agent_log
                .contains(&format!("{DEVICE_ID}: queue {q} started")),
            "the agent did not log queue {q} starting:\n{}",
            out.agent_log
        );
    }
    let devices = out
        .devices
        .as_ref()
        .expect("query-devices answered during or after the run");
    let device = devices
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == DEVICE_ID))
        .unwrap_or_else(|| panic!("no device {DEVICE_ID} in query-devices: {devices}"));
    assert_eq!(device["kind"], "net", "{device}");
    assert_eq!(device["queue-pairs"], u64::from(case.pairs), "{device}");
    assert_eq!(device["mtu"], u64::from(case.mtu), "{device}");
    let pairs = device["pairs"]
        .as_array()
        .unwrap_or_else(|| panic!("no pairs array in {device}"));
    assert_eq!(pairs.len(), usize::from(case.pairs), "{device}");
    for (i, pair) in pairs.iter().enumerate() {
        let count = |k: &str| {
            pair[k]
                .as_u64()
                .unwrap_or_else(|| panic!("no {k} in pair {i} of {device}"))
        };
        eprintln!("vhost-agent: pair {i}: {pair}");
        assert!(
            count("rx-packets") > 0 && count("tx-packets") > 0,
            "pair {i} did not carry traffic both ways: {device}"
        );
        assert_eq!(count("tx-errors"), 0, "pair {i}: {device}");
    }
}

const SINGLE: Case = Case {
    pairs: 1,
    mtu: 1500,
    ping_size: 56,
    streams: 1,
};

const MULTIQUEUE: Case = Case {
    pairs: 2,
    mtu: 1500,
    ping_size: 56,
    streams: 2,
};

const JUMBO: Case = Case {
    pairs: 1,
    mtu: 9000,
    // 8972 + 8 (ICMP) + 20 (IPv4) = 9000: the largest unfragmented ping.
    ping_size: 8972,
    streams: 1,
};

/// Both queue pairs carried traffic: the guest took interrupts on all four
/// data virtqueues.
fn assert_both_pairs_in_guest(v: &Verdict) {
    for q in 0..2 {
        for kind in ["rx", "tx"] {
            let n = num(v, &format!("irq_{kind}{q}"));
            assert!(n > 0, "no interrupts on {kind} queue {q}: {v:?}");
        }
    }
}

/// The jumbo path: no IP fragments either way (an MTU of 1500 anywhere on
/// the path makes the host's 9000-byte replies arrive in fragments).
fn assert_no_fragments(v: &Verdict) {
    assert_eq!(
        num(v, "reasm_reqds"),
        0,
        "the guest reassembled fragments: {v:?}"
    );
    assert_eq!(num(v, "frag_creates"), 0, "the guest fragmented: {v:?}");
}

#[test]
fn qemu_net_single_queue_on_qemu_tap() {
    let out = run(Backend::QemuTap, SINGLE);
    assert_common(Backend::QemuTap, &SINGLE, &out);
}

#[test]
fn qemu_net_single_queue_on_agent() {
    let out = run(Backend::Agent, SINGLE);
    assert_common(Backend::Agent, &SINGLE, &out);
    assert_agent(&SINGLE, &out);
}

#[test]
fn qemu_net_two_queue_pairs_on_qemu_tap() {
    let out = run(Backend::QemuTap, MULTIQUEUE);
    assert_common(Backend::QemuTap, &MULTIQUEUE, &out);
    assert_both_pairs_in_guest(&out.verdict);
}

#[test]
fn qemu_net_two_queue_pairs_on_agent() {
    let out = run(Backend::Agent, MULTIQUEUE);
    assert_common(Backend::Agent, &MULTIQUEUE, &out);
    assert_both_pairs_in_guest(&out.verdict);
    assert_agent(&MULTIQUEUE, &out);
}

#[test]
fn qemu_net_mtu_9000_on_qemu_tap() {
    let out = run(Backend::QemuTap, JUMBO);
    assert_common(Backend::QemuTap, &JUMBO, &out);
    assert_no_fragments(&out.verdict);
}

#[test]
fn qemu_net_mtu_9000_on_agent() {
    let out = run(Backend::Agent, JUMBO);
    assert_common(Backend::Agent, &JUMBO, &out);
    assert_no_fragments(&out.verdict);
    assert_agent(&JUMBO, &out);
}
