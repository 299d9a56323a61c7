//! Presetup for disks through the control API, against the real agent with
//! the test front-end: `query-config` on a source agent describes the disk
//! as the front-end set it up; `presetup` with it on a destination agent
//! creates the per-queue storage engines early, so the start applies no
//! `create_io_ring`; a changed queue count applies exactly the missing
//! ones; and a refused early configuration is counted while the disk still
//! serves I/O.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use vhost_agent_tests::frontend::{StartOptions, TestFrontend, RAM_SIZE};
use vhost_agent_tests::support::{control_execute, create_image, spawn_agent, ChildGuard};

const QUEUE_SIZE: u16 = 128;

/// One agent serving one disk `disk0` with `queues` queues, with a control
/// socket.
struct Agent {
    dir: tempfile::TempDir,
    _child: ChildGuard,
}

impl Agent {
    fn start(queues: u16) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        create_image(&image, 8 << 20).unwrap();
        let spec = format!(
            "socket={},image={},num-queues={queues},queue-size={QUEUE_SIZE},id=disk0",
            dir.path().join("blk.sock").display(),
            image.display()
        );
        let control = dir.path().join("control.sock");
        let child = spawn_agent(
            &[spec],
            &["--control", control.to_str().unwrap()],
            Some(&dir.path().join("agent.log")),
        );
        Agent { dir, _child: child }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("blk.sock")
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn execute(&self, command: &str, arguments: Value) -> Result<Value, String> {
        control_execute(&self.control(), command, arguments)
    }

    fn metrics(&self) -> Value {
        let reports = self
            .execute("query-metrics", json!({"device": "disk0"}))
            .expect("query-metrics");
        reports[0].clone()
    }

    /// A front-end that starts `queues` queues and checks I/O on each.
    fn start_frontend(&self, queues: usize) -> TestFrontend {
        let mut frontend =
            TestFrontend::start(&self.socket(), &StartOptions::plain(queues, QUEUE_SIZE));
        for queue in 0..queues {
            assert!(
                frontend.round_trip(queue, queue as u64, 8 * queue as u64),
                "I/O on queue {queue} failed; agent log:\n{}",
                self.log()
            );
        }
        frontend
    }
}

fn names(report: &Value, list: &str) -> Vec<String> {
    report["last-switchover"][list]
        .as_array()
        .unwrap_or_else(|| panic!("no last-switchover.{list} in {report}"))
        .iter()
        .map(|name| name.as_str().unwrap().to_string())
        .collect()
}

/// The heavy ops a `presetup` reply says were executed.
fn executed(done: &Value) -> Vec<String> {
    done["heavy-executed"]
        .as_array()
        .map(|ops| {
            ops.iter()
                .filter_map(|op| op.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

fn source_config(queues: u16) -> (Agent, TestFrontend, Value) {
    let source = Agent::start(queues);
    let frontend = source.start_frontend(usize::from(queues));
    let config = source
        .execute("query-config", json!({"device": "disk0"}))
        .expect("query-config");
    (source, frontend, config)
}

#[test]
fn query_config_describes_the_disk_as_the_frontend_set_it_up() {
    let (source, frontend, config) = source_config(2);
    assert_eq!(config["version"], 1, "{config}");
    assert_eq!(config["acked_features"], frontend.features, "{config}");
    assert_eq!(config["protocol_features"], frontend.protocol, "{config}");
    let memory = config["memory"].as_array().expect("memory");
    assert_eq!(memory.len(), 1, "{config}");
    assert_eq!(memory[0]["size_bytes"], RAM_SIZE);
    assert_eq!(memory[0]["guest_phys_addr"], 0);
    assert_eq!(memory[0]["user_addr"], frontend.ram.user_addr(0));
    let rings = config["rings"].as_array().expect("rings");
    assert_eq!(rings.len(), 2, "{config}");
    for (index, ring) in rings.iter().enumerate() {
        let (desc, avail, used) = frontend.queues[index].addresses();
        assert_eq!(ring["index"], index, "{ring}");
        assert_eq!(ring["size"], QUEUE_SIZE, "{ring}");
        assert_eq!(
            ring["addresses"],
            json!({
                "desc_table": frontend.ram.user_addr(desc),
                "avail_ring": frontend.ram.user_addr(avail),
                "used_ring": frontend.ram.user_addr(used),
            }),
            "ring {index} is described with the front-end's addresses"
        );
        assert_eq!(ring["enabled"], true, "{ring}");
        assert_eq!(
            (ring["kick_fd"].clone(), ring["call_fd"].clone()),
            (json!(true), json!(true))
        );
    }
    assert_eq!(
        config["device"],
        json!({"blk": {"num_queues": 2, "queue_size": QUEUE_SIZE, "readonly": false, "direct": false, "writeback": true}})
    );
    // The front-end goes: the configuration is forgotten with it.
    drop(frontend);
    let mut forgotten = Value::Null;
    let gone = vhost_agent_tests::frontend::wait_until(std::time::Duration::from_secs(5), || {
        forgotten = source
            .execute("query-config", json!({"device": "disk0"}))
            .unwrap();
        forgotten["rings"].as_array().is_some_and(Vec::is_empty)
    });
    assert!(
        gone,
        "rings still described after the disconnect: {forgotten}"
    );
    assert_eq!(forgotten["acked_features"], 0);
    // Unknown devices and bad arguments are errors.
    let error = source
        .execute("query-config", json!({"device": "nope"}))
        .unwrap_err();
    assert!(error.contains("DeviceNotFound"), "{error}");
    assert!(source.execute("query-config", json!({})).is_err());
}

#[test]
fn presetup_creates_the_io_rings_early_and_the_start_only_takes_them() {
    let (_source, _source_frontend, config) = source_config(2);

    // Without presetup: the start creates both I/O rings; the storage was
    // open before it.
    let plain = Agent::start(2);
    let _frontend = plain.start_frontend(2);
    let report = plain.metrics();
    let applied = names(&report, "heavy-applied");
    assert_eq!(count(&applied, "create_io_ring"), 2, "{report}");
    assert_eq!(count(&applied, "open_storage"), 0, "{report}");
    assert_eq!(report["last-switchover"]["early"], false);
    assert_eq!(report["presetup"]["hits"], 0);

    // With presetup: the engines exist before the front-end comes.
    let destination = Agent::start(2);
    let done = destination
        .execute("presetup", json!({"device": "disk0", "config": config}))
        .expect("presetup");
    assert_eq!(count(&executed(&done), "create_io_ring"), 2, "{done}");
    let _frontend = destination.start_frontend(2);
    let report = destination.metrics();
    let applied = names(&report, "heavy-applied");
    let skipped = names(&report, "heavy-skipped");
    assert_eq!(count(&applied, "create_io_ring"), 0, "{report}");
    assert_eq!(count(&skipped, "create_io_ring"), 2, "{report}");
    assert_eq!(report["last-switchover"]["early"], true);
    assert_eq!(report["presetup"]["hits"], 1, "{report}");
    assert_eq!(report["presetup"]["fallbacks"], 0, "{report}");
    // Memory comes with fds only at the start: mapping it and registering
    // it with the I/O rings are what the start still does.
    assert!(applied
        .iter()
        .all(|op| op == "map_region" || op == "register_buffers"));
}

#[test]
fn a_smaller_early_queue_count_leaves_exactly_the_missing_io_ring_to_the_start() {
    let (_source, _frontend, mut config) = source_config(1);
    // The early configuration knew one queue; the disk starts two.
    assert_eq!(config["device"]["blk"]["num_queues"], 1);
    let destination = Agent::start(2);
    config["rings"] = json!([]);
    let done = destination
        .execute("presetup", json!({"device": "disk0", "config": config}))
        .expect("presetup");
    assert_eq!(count(&executed(&done), "create_io_ring"), 1, "{done}");
    let _frontend = destination.start_frontend(2);
    let report = destination.metrics();
    let applied = names(&report, "heavy-applied");
    assert_eq!(count(&applied, "create_io_ring"), 1, "{report}");
    assert_eq!(count(&names(&report, "heavy-skipped"), "create_io_ring"), 1);
}

#[test]
fn a_refused_early_configuration_is_counted_and_the_disk_still_serves() {
    let destination = Agent::start(1);
    let net = json!({"version": 1, "acked_features": 0, "protocol_features": 0, "memory": [], "rings": [],
        "device": {"net": {"mtu": 1500, "mac": [82, 84, 0, 18, 52, 86], "queue_pairs": 1, "rss": null}}});
    let too_many = json!({"version": 1, "acked_features": 0, "protocol_features": 0, "memory": [], "rings": [],
        "device": {"blk": {"num_queues": 9, "queue_size": 128, "readonly": false, "direct": false, "writeback": true}}});
    for config in [net, too_many, json!("garbage"), json!({"version": 99})] {
        let error = destination
            .execute("presetup", json!({"device": "disk0", "config": config}))
            .expect_err("refused");
        assert!(error.contains("presetup of disk0 refused"), "{error}");
    }
    let _frontend = destination.start_frontend(1);
    let report = destination.metrics();
    assert_eq!(report["presetup"]["fallbacks"], 4, "{report}");
    assert_eq!(report["presetup"]["hits"], 0, "{report}");
    assert_eq!(count(&names(&report, "heavy-applied"), "create_io_ring"), 1);
    assert!(Path::new(&destination.control()).exists());
}
