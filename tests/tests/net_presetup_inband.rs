//! In-band presetup (`serve --presetup-protocol=nvidia-rfc`), driven by the
//! test front-end playing a destination QEMU with NVIDIA's early-migration
//! RFC: the bracket during migration setup, then the normal start at
//! switchover. The agent must do the heavy work in the bracket (the `sim`
//! dataplane shows when it charged it), keep an unchanged memory mapping,
//! remap a changed one, never start or read a ring inside the bracket,
//! shrug off malformed brackets, and, with the switch off or for upstream's
//! 16-byte GET_SHARED_OBJECT, treat request 41 exactly as before.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vhost_agent_tests::frontend::presetup::{
    EarlyConfig, PRESETUP, PRESETUP_END, PRESETUP_START, PROTOCOL_F_PRESETUP,
};
use vhost_agent_tests::frontend::{
    raw, Desc, GuestRam, Inflight, StartOptions, TestFrontend, BUFFER_BASE, RAM_SIZE,
};
use vhost_agent_tests::support::{agent_binary, spawn_net_agent, workspace_root, ChildGuard};
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = 12;
const QUEUE_SIZE: u16 = 256;
const WAIT: Duration = Duration::from_secs(5);
/// VIRTIO_CONFIG_S_NEEDS_RESET.
const NEEDS_RESET: u8 = 0x40;

struct Agent {
    dir: tempfile::TempDir,
    _agent: ChildGuard,
    pairs: usize,
}

impl Agent {
    /// An agent with one net device of `pairs` pairs on `dataplane`, with
    /// in-band presetup on or off.
    fn spawn(dataplane: &str, pairs: usize, in_band: bool) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("net.sock");
        let control = dir.path().join("control.sock");
        let mut extra = vec!["--control", control.to_str().unwrap()];
        if in_band {
            extra.push("--presetup-protocol=nvidia-rfc");
        }
        let agent = spawn_net_agent(
            &[format!(
                "socket={},dataplane={dataplane},queue-pairs={pairs}",
                socket.display()
            )],
            &extra,
            Some(&dir.path().join("agent.log")),
        );
        Agent {
            dir,
            _agent: agent,
            pairs,
        }
    }

    /// On the 191 ms vDPA profile.
    fn sim(pairs: usize) -> Agent {
        let profile = workspace_root().join("netdev/profiles/vdpa-191ms.json");
        Self::spawn(&format!("sim:{}", profile.display()), pairs, true)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("net.sock")
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Connect and negotiate, acking `protocol` on top of the defaults if
    /// offered; nothing is started.
    fn connect(&self, protocol: u64) -> TestFrontend {
        let mut options = StartOptions::plain(2 * self.pairs, QUEUE_SIZE);
        options.queues_per_unit = 2;
        options.protocol = protocol;
        TestFrontend::negotiate(&self.socket(), &options)
    }

    /// A front-end that negotiated PRESETUP (the agent must offer it).
    fn connect_in_band(&self) -> TestFrontend {
        let frontend = self.connect(PROTOCOL_F_PRESETUP);
        assert_ne!(
            frontend.protocol & PROTOCOL_F_PRESETUP,
            0,
            "bit 18 not offered (offered {:#x})",
            frontend.offered_protocol
        );
        frontend
    }

    /// The device's `query-devices` entry.
    fn device(&self) -> Value {
        ctl(&self.control(), "query-devices", None)[0].clone()
    }

    /// The device's `query-metrics` entry.
    fn metrics(&self) -> Value {
        ctl(
            &self.control(),
            "query-metrics",
            Some(r#"{"device": "net0"}"#),
        )[0]
        .clone()
    }

    /// How often the sim charged `op` so far (0 if never).
    fn charged(&self, op: &str) -> u64 {
        self.device()["sim"]["charged"][op]["count"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Wait until the agent's log holds `text` (a log line is written
    /// after the reply that follows it may already have arrived).
    fn wait_log(&self, text: &str) {
        assert!(
            vhost_agent_tests::frontend::wait_until(WAIT, || self.log().contains(text)),
            "`{text}` not in the agent log:\n{}",
            self.log()
        );
    }
}

fn ctl(control: &Path, command: &str, arguments: Option<&str>) -> Value {
    let mut cmd = std::process::Command::new(agent_binary());
    cmd.args(["ctl", control.to_str().unwrap(), command]);
    if let Some(arguments) = arguments {
        cmd.arg(arguments);
    }
    let output = cmd.output().expect("run vhost-agent ctl");
    assert!(output.status.success(), "ctl {command} failed: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Send one frame on every pair's TX ring and check the dataplane (loop
/// or sim) brought it back, byte for byte, on the pair's RX ring. `round`
/// keeps buffers of successive calls apart.
fn frames_come_back(frontend: &mut TestFrontend, pairs: usize, round: u64) {
    let ram = frontend.ram.clone();
    for pair in 0..pairs {
        let slot = BUFFER_BASE + (round * 8 + 2 * pair as u64) * 0x1_0000;
        let (rx, tx) = (slot, slot + 0x1_0000);
        assert!(tx + 0x1_0000 <= RAM_SIZE, "test ran out of buffers");
        let frame: Vec<u8> = (0..200u32).map(|i| (i * 7 + pair as u32) as u8).collect();
        ram.mem
            .write_slice(&[0u8; HDR as usize], GuestAddress(tx))
            .unwrap();
        ram.mem
            .write_slice(&frame, GuestAddress(tx + 0x100))
            .unwrap();
        frontend.queues[2 * pair].add_chain(&ram, &[Desc::writable(rx, 2048)]);
        frontend.queues[2 * pair + 1].add_chain(
            &ram,
            &[
                Desc::readable(tx, HDR as u32),
                Desc::readable(tx + 0x100, frame.len() as u32),
            ],
        );
        frontend.queues[2 * pair + 1].kick();
        let used = frontend.queues[2 * pair]
            .wait_used(&ram, 1, WAIT)
            .unwrap_or_else(|| panic!("pair {pair}: no frame came back"));
        assert_eq!(used[0].1 as usize, HDR as usize + frame.len());
        let mut back = vec![0u8; frame.len()];
        ram.mem
            .read_slice(&mut back, GuestAddress(rx + HDR))
            .unwrap();
        assert_eq!(back, frame, "pair {pair}: frame changed on the way");
    }
}

/// The heavy ops a full start of these tests' device applies: offloads
/// (ConfigureOffloads: VERSION_1 and MRG_RXBUF are acked), the MTU, the
/// one memory region, and one dataplane queue per pair. RSS is off, so
/// there is nothing to program (presetup/src/plan.rs).
fn full_start_heavy_ops(pairs: u64) -> u64 {
    3 + pairs
}

#[test]
fn a_bracket_then_an_identical_start_skips_every_heavy_op() {
    let agent = Agent::sim(2);
    let mut frontend = agent.connect_in_band();
    let ram = frontend.ram.clone();
    let bases = [0u16; 4];
    let early = EarlyConfig {
        ram: &ram,
        mtu: Some(1500),
        kick_fds: false,
    };
    frontend.presetup_bracket(early, &bases);
    // The sim charged the heavy work during migration setup: a queue per
    // virtqueue, the memory map, the MTU...
    assert_eq!(agent.charged("create_queue"), 4, "{}", agent.device());
    assert_eq!(agent.charged("map_memory"), 1, "{}", agent.device());
    assert_eq!(agent.charged("set_mtu"), 1, "{}", agent.device());
    // ...and no ring runs yet.
    let metrics = agent.metrics();
    assert_eq!(metrics["rings-running"], 0, "{metrics}");
    assert_eq!(metrics["starts"], 0, "{metrics}");

    // Switchover: the normal start sequence, same configuration.
    frontend.start_device(Inflight::None, &bases);
    frames_come_back(&mut frontend, 2, 0);
    // Nothing heavy again at the start.
    assert_eq!(agent.charged("create_queue"), 4, "{}", agent.device());
    assert_eq!(
        agent.charged("map_memory"),
        1,
        "memory remapped at the start"
    );
    assert_eq!(agent.charged("set_mtu"), 1);
    let metrics = agent.metrics();
    let counts = &metrics["presetup"];
    assert_eq!(counts["hits"], 1, "{metrics}");
    assert_eq!(counts["fallbacks"], 0, "{metrics}");
    assert_eq!(counts["heavy-applied"], 0, "{metrics}");
    // The memory map is among the skipped ops: the control API's presetup,
    // which gets no fds, can skip one op fewer.
    assert_eq!(
        counts["heavy-skipped"].as_u64(),
        Some(full_start_heavy_ops(2)),
        "{metrics}"
    );
    // The bracket is on the timeline, and the critical path runs from the
    // real start: it no longer holds the 160 ms of queue creation.
    let timeline = metrics["timeline"].as_array().unwrap();
    for event in ["presetup-start", "presetup-end"] {
        assert!(timeline.iter().any(|e| e["event"] == event), "{metrics}");
    }
    assert!(
        timeline
            .iter()
            .any(|e| e["event"] == "message" && e["code"] == 41 && e["name"] == "PRESETUP"),
        "{metrics}"
    );
    let critical_path = metrics["start-critical-path-us"].as_u64().expect("a start");
    assert!(critical_path < 160_000, "critical path {critical_path} us");
    assert!(agent.log().contains("mappings kept"), "{}", agent.log());
    eprintln!(
        "start critical path after an in-band bracket on vdpa-191ms, 2 pairs: {critical_path} us"
    );
}

#[test]
fn a_memory_table_changed_at_switchover_is_remapped() {
    let agent = Agent::sim(1);
    let mut frontend = agent.connect_in_band();
    // The bracket names other memory than the switchover will.
    let other = GuestRam::new(RAM_SIZE);
    let bases = [0u16; 2];
    frontend.presetup_bracket(
        EarlyConfig {
            ram: &other,
            mtu: None,
            kick_fds: false,
        },
        &bases,
    );
    assert_eq!(agent.charged("map_memory"), 1);
    assert_eq!(agent.charged("create_queue"), 2);

    frontend.start_device(Inflight::None, &bases);
    frames_come_back(&mut frontend, 1, 0);
    assert_eq!(agent.charged("map_memory"), 2, "not remapped");
    assert_eq!(agent.charged("create_queue"), 2, "queues created again");
    let metrics = agent.metrics();
    let counts = &metrics["presetup"];
    assert_eq!(counts["hits"], 1, "{metrics}");
    // Unmapping the early region and mapping the new one.
    assert_eq!(counts["heavy-applied"], 2, "{metrics}");
    assert_eq!(
        counts["heavy-skipped"].as_u64(),
        Some(full_start_heavy_ops(1) - 1),
        "{metrics}"
    );
}

#[test]
fn no_ring_starts_or_is_read_inside_the_bracket() {
    let agent = Agent::spawn("loop", 1, true);
    let mut frontend = agent.connect_in_band();
    let ram = frontend.ram.clone();
    // Before migration has brought guest RAM, the rings hold anything:
    // here an avail index and descriptors full of 0xa5, and a used index
    // of 0xa5a5.
    frontend.scribble_rings(&ram, 0xa5);
    let before = ram.snapshot();
    // A front-end that even attaches real kick fds, and kicks them.
    frontend.presetup_bracket(
        EarlyConfig {
            ram: &ram,
            mtu: None,
            kick_fds: true,
        },
        &[0, 0],
    );
    for queue in &frontend.queues {
        queue.kick();
    }
    assert_eq!(frontend.get_status() & NEEDS_RESET, 0, "a ring was read");
    assert!(ram.snapshot() == before, "the device wrote guest RAM");
    let device = agent.device();
    for counter in ["tx-packets", "tx-errors", "rx-packets"] {
        assert_eq!(device["pairs"][0][counter], 0, "{counter}: {device}");
    }
    assert_eq!(agent.metrics()["rings-running"], 0);
    agent.wait_log("inside a presetup bracket");

    // Migration brought the guest's real rings (fresh ones, all zero); the
    // device must take the used index from them, not from the bracket.
    frontend.scribble_rings(&ram, 0);
    frontend.start_device(Inflight::None, &[0, 0]);
    frames_come_back(&mut frontend, 1, 0);
    assert_eq!(frontend.queues[0].used_idx(&ram), 1);
    assert_eq!(frontend.get_status() & NEEDS_RESET, 0);
}

#[test]
fn malformed_brackets_are_counted_and_the_device_still_starts() {
    let agent = Agent::sim(1);
    let mut frontend = agent.connect_in_band();
    let ram = frontend.ram.clone();
    let early = EarlyConfig {
        ram: &ram,
        mtu: None,
        kick_fds: false,
    };
    // END without START: refused (REPLY_ACK 1 when an ack is asked).
    assert_eq!(frontend.presetup_acked(PRESETUP_END), 1);
    // A value the RFC does not define, sent as the RFC sends (no reply).
    frontend.presetup(3);
    // START, then START again inside the bracket: abandoned until END.
    assert_eq!(frontend.presetup_acked(PRESETUP_START), 0);
    frontend.presetup_configure(early, &[0, 0]);
    frontend.presetup(PRESETUP_START);
    frontend.presetup(PRESETUP_END);
    frontend.sync();
    let counts = agent.metrics()["presetup"].clone();
    assert_eq!(counts["fallbacks"], 3, "{counts}");
    // The abandoned bracket created no dataplane queue ahead of time.
    assert_eq!(agent.charged("create_queue"), 0);

    frontend.start_device(Inflight::None, &[0, 0]);
    frames_come_back(&mut frontend, 1, 0);
    let counts = agent.metrics()["presetup"].clone();
    assert_eq!(counts["hits"], 0, "{counts}");
    assert_eq!(counts["fallbacks"], 3, "{counts}");
    assert_eq!(agent.charged("create_queue"), 2);
    let log = agent.log();
    for text in [
        "PRESETUP END without a START",
        "PRESETUP with value 3",
        "PRESETUP START inside an open bracket",
        "abandoned presetup bracket closed",
    ] {
        assert!(log.contains(text), "`{text}` not logged:\n{log}");
    }
}

/// Request 41 that is not presetup keeps its upstream meaning
/// (GET_SHARED_OBJECT, which the agent does not serve): the front-end
/// waits for a reply nobody can give, so the connection is closed, and
/// the agent serves the next front-end as if nothing happened.
#[test]
fn request_41_that_is_not_presetup_closes_only_its_connection() {
    struct Case {
        in_band: bool,
        protocol: u64,
        payload: Vec<u8>,
        logged: &'static str,
    }
    let cases = [
        // The switch off: bit 18 is not even offered, and a u64 START is
        // GET_SHARED_OBJECT of the wrong size.
        Case {
            in_band: false,
            protocol: PROTOCOL_F_PRESETUP,
            payload: PRESETUP_START.to_le_bytes().to_vec(),
            logged: "GET_SHARED_OBJECT failed",
        },
        // The switch on but bit 18 not acked: not presetup either.
        Case {
            in_band: true,
            protocol: 0,
            payload: PRESETUP_START.to_le_bytes().to_vec(),
            logged: "GET_SHARED_OBJECT failed",
        },
        // Bit 18 acked as presetup, but the front-end sends upstream's
        // 16-byte UUID: it thinks bit 18 is SHARED_OBJECT.
        Case {
            in_band: true,
            protocol: PROTOCOL_F_PRESETUP,
            payload: vec![0x5a; 16],
            logged: "the front-end speaks SHARED_OBJECT",
        },
    ];
    for case in cases {
        let agent = Agent::spawn("loop", 1, case.in_band);
        let frontend = agent.connect(case.protocol);
        if !case.in_band {
            assert_eq!(frontend.offered_protocol & PROTOCOL_F_PRESETUP, 0);
        }
        frontend.send_raw(PRESETUP, raw::FLAG_VERSION, &case.payload);
        match frontend.try_recv_raw() {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}"),
            Ok(reply) => panic!("a reply to request 41: {reply:?}"),
        }
        agent.wait_log(case.logged);
        assert!(!agent.log().contains("presetup bracket opened"));
        drop(frontend);
        // A new front-end on the same socket works.
        let mut options = StartOptions::plain(2, QUEUE_SIZE);
        options.queues_per_unit = 2;
        let mut next = TestFrontend::start(&agent.socket(), &options);
        frames_come_back(&mut next, 1, 0);
    }
}
