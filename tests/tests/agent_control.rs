//! The control API of the real agent (`serve --control PATH`): the socket
//! is private, requests and errors have QMP's shapes, a bad request costs
//! only its reply, `fence-release` opens a `fence=api` disk's gate,
//! `vhost-agent ctl` is a usable client, `add-device` and `remove-device`
//! start and stop devices at runtime, and `quit` shuts the agent down as
//! SIGTERM does. Protocol: docs/control-api.md.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vhost::VhostBackend;
use vhost_agent_tests::frontend::{
    wait_until, BlkRequest, Desc, StartOptions, StopRequest, TestFrontend, BUFFER_BASE,
    PROTOCOL_F_INFLIGHT_SHMFD, PROTOCOL_SUSPEND, VIRTIO_BLK_S_OK,
};
use vhost_agent_tests::support::{
    agent_binary, create_image, spawn_agent, wait_for_path, ChildGuard,
};
use vm_memory::{Bytes, GuestAddress};

/// An agent serving `dst` (fence=api) and `src` (default fence=lock), with
/// its control socket.
struct Agent {
    dir: tempfile::TempDir,
    process: ChildGuard,
    control: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        Self::start_with(&[("dst", ",fence=api"), ("src", "")])
    }

    /// An agent serving one disk per (id, extra spec keys) on `ID.img` and
    /// `ID.sock`; none at all (devices come with add-device) when empty.
    fn start_with(disks: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let mut specs = Vec::new();
        for &(id, extra) in disks {
            let image = dir.path().join(format!("{id}.img"));
            create_image(&image, 1 << 20).unwrap();
            specs.push(format!(
                "socket={},image={},id={id}{extra}",
                dir.path().join(format!("{id}.sock")).display(),
                image.display()
            ));
        }
        let control = dir.path().join("control.sock");
        let log = dir.path().join("agent.log");
        let control_arg = control.to_str().unwrap().to_string();
        let mut process = spawn_agent(&specs, &["--control", &control_arg], Some(&log));
        wait_for_path(&control, Duration::from_secs(20), &mut process);
        Agent {
            dir,
            process,
            control,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    fn connect(&self) -> Client {
        Client::connect(&self.control)
    }

    /// Run `vhost-agent ctl CONTROL args...`: (exit code, stdout, stderr).
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(agent_binary())
            .arg("ctl")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("run vhost-agent ctl");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// One connection to the control socket.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    /// Send `line` (a newline is added) and return the reply line parsed.
    fn send(&mut self, line: &str) -> Value {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).expect("a reply line");
        assert!(reply.ends_with('\n'), "no whole reply to {line}: {reply:?}");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        self.send(&json!({"execute": command, "arguments": arguments}).to_string())
    }

    fn devices(&mut self) -> Vec<Value> {
        let reply = self.send(r#"{"execute": "query-devices"}"#);
        reply["return"]
            .as_array()
            .expect("an array of devices")
            .clone()
    }
}

fn device<'a>(devices: &'a [Value], id: &str) -> &'a Value {
    devices
        .iter()
        .find(|device| device["id"] == id)
        .unwrap_or_else(|| panic!("no device {id} in {devices:?}"))
}

#[test]
fn the_socket_is_private_and_query_devices_describes_every_disk() {
    let agent = Agent::start();
    let metadata = std::fs::symlink_metadata(&agent.control).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(
        metadata.permissions().mode() & 0o7777,
        0o600,
        "control socket mode"
    );

    let devices = agent.connect().devices();
    assert_eq!(devices.len(), 2);
    let dst = device(&devices, "dst");
    assert_eq!(dst["kind"], "blk");
    assert_eq!(dst["socket"], agent.path("dst.sock").to_str().unwrap());
    assert_eq!(dst["image"], agent.path("dst.img").to_str().unwrap());
    assert_eq!(
        dst["fence"],
        json!({"mode": "api", "open": false, "abandoned-outstanding": 0, "abandoned-total": 0})
    );
    let src = device(&devices, "src");
    assert_eq!(src["fence"]["mode"], "lock");
    assert_eq!(src["fence"]["open"], true);
}

#[test]
fn a_bad_request_costs_only_its_reply() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let mut other = agent.connect();

    let reply = client.send("this is not json");
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    let reply = client.send(r#"{"execute": "query-devices", "id": 7}"#);
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["return"].as_array().unwrap().len(), 2);

    let reply = client.send(r#"[1, 2, 3]"#);
    assert_eq!(reply["error"]["class"], "GenericError");
    let reply = client.send(r#"{"execute": "frobnicate", "id": "f"}"#);
    assert_eq!(reply["error"]["class"], "CommandNotFound");
    assert_eq!(reply["id"], "f");
    let reply = client.execute("fence-release", json!({"disk": "dst"}));
    assert_eq!(reply["error"]["class"], "GenericError");
    assert!(reply["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("unknown field `disk`"));

    // A second client is served meanwhile, and the first still is after.
    assert_eq!(other.devices().len(), 2);
    assert_eq!(client.devices().len(), 2);
}

#[test]
fn fence_release_opens_an_api_fence() {
    let agent = Agent::start();
    let mut client = agent.connect();
    assert_eq!(device(&client.devices(), "dst")["fence"]["open"], false);

    let reply = client.execute("fence-release", json!({"device": "nope"}));
    assert_eq!(reply["error"]["class"], "DeviceNotFound", "{reply}");
    assert_eq!(device(&client.devices(), "dst")["fence"]["open"], false);

    let reply = client.execute("fence-release", json!({"device": "dst"}));
    assert_eq!(reply, json!({"return": {}}));
    let devices = client.devices();
    assert_eq!(device(&devices, "dst")["fence"]["open"], true);
    assert_eq!(device(&devices, "src")["fence"]["open"], true);
    assert!(
        agent
            .log()
            .contains("write fence released: dst: fence-release through the control API"),
        "no log line for the release:\n{}",
        agent.log()
    );
}

#[test]
fn ctl_prints_results_and_exits_1_on_errors() {
    let agent = Agent::start();

    let (code, stdout, stderr) = agent.ctl(&["query-devices"]);
    assert_eq!(code, 0, "{stderr}");
    let devices: Value = serde_json::from_str(&stdout).expect("ctl prints JSON");
    assert_eq!(devices.as_array().unwrap().len(), 2);

    let (code, _, stderr) = agent.ctl(&["fence-release", r#"{"device": "nope"}"#]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("device 'nope' not found (DeviceNotFound)"),
        "{stderr}"
    );
    let (code, _, stderr) = agent.ctl(&["frobnicate"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("CommandNotFound"), "{stderr}");
    let (code, _, stderr) = agent.ctl(&["fence-release", "{device: dst}"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not valid JSON"), "{stderr}");

    let (code, stdout, stderr) = agent.ctl(&["fence-release", r#"{"device": "dst"}"#]);
    assert_eq!((code, stdout.trim()), (0, "{}"), "{stderr}");
    let (_, stdout, _) = agent.ctl(&["query-devices"]);
    let devices: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        device(devices.as_array().unwrap(), "dst")["fence"]["open"],
        true
    );

    let missing = agent.path("nobody.sock");
    let output = Command::new(agent_binary())
        .arg("ctl")
        .arg(&missing)
        .arg("query-devices")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot connect"));
}

#[test]
fn quit_shuts_down_like_sigterm() {
    let mut agent = Agent::start();
    // A connected front-end, so a disk has something to shut down.
    let mut frontend = TestFrontend::connect(&agent.path("dst.sock"), 1, 16);
    assert!(frontend.round_trip(0, 0, 0));

    let reply = agent.connect().send(r#"{"execute": "quit", "id": "bye"}"#);
    assert_eq!(reply, json!({"return": {}, "id": "bye"}));
    let exit = agent
        .process
        .wait_timeout(Duration::from_secs(20))
        .expect("the agent did not exit after quit");
    assert!(exit.success(), "agent exited with {exit}");
    for socket in ["dst.sock", "src.sock", "control.sock"] {
        assert!(!agent.path(socket).exists(), "{socket} left behind");
    }
    let log = agent.log();
    assert!(
        log.contains("quit requested through the control API"),
        "{log}"
    );
    assert!(log.contains("shutdown complete"), "{log}");
}

#[test]
fn duplicate_ids_and_a_control_path_that_is_not_a_socket_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    create_image(&image, 1 << 20).unwrap();
    let spec = |socket: &str| {
        format!(
            "socket={},image={},id=same",
            dir.path().join(socket).display(),
            image.display()
        )
    };
    let control = dir.path().join("control.sock");
    let output = Command::new(agent_binary())
        .args(["serve", "--blk", &spec("a.sock"), "--blk", &spec("b.sock")])
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("two devices are named same"), "{stderr}");
    for socket in ["a.sock", "b.sock", "control.sock"] {
        assert!(!dir.path().join(socket).exists(), "{socket} left behind");
    }

    let not_a_socket = dir.path().join("plain-file");
    std::fs::write(&not_a_socket, "keep me").unwrap();
    let output = Command::new(agent_binary())
        .args(["serve", "--blk", &spec("a.sock"), "--control"])
        .arg(&not_a_socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&not_a_socket).unwrap(), "keep me");
}

/// The Prometheus text of `query-metrics`: every sample line is
/// `name{device="ID"} value` with a number, and each family has HELP and
/// TYPE lines. Returns the samples as (name, device, value).
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let (name, labels) = series
            .split_once('{')
            .unwrap_or_else(|| panic!("no labels in {line:?}"));
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        let device = labels
            .strip_prefix("device=\"")
            .and_then(|rest| rest.strip_suffix("\"}"))
            .unwrap_or_else(|| panic!("bad labels in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        samples.push((name.to_string(), device.to_string(), value));
    }
    samples
}

#[test]
fn query_metrics_measures_a_start_and_a_stop_of_a_disk() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let started = std::time::Instant::now();
    let mut frontend = TestFrontend::connect(&agent.path("src.sock"), 1, 16);
    let start_wall = started.elapsed();
    assert!(frontend.round_trip(0, 0, 1), "a request after the start");
    let stopping = std::time::Instant::now();
    frontend.stop(vhost_agent_tests::frontend::StopRequest::GetVringBase);
    let stop_wall = stopping.elapsed();

    let reply = client.execute("query-metrics", json!({"device": "src"}));
    let src = &reply["return"][0];
    assert_eq!(src["device"], "src", "{reply}");
    assert_eq!(src["sessions"], 1, "{src}");
    assert_eq!(src["starts"], 1, "{src}");
    assert_eq!(src["stops"], 1, "{src}");
    let critical_path = src["start-critical-path-us"].as_u64().expect("a start");
    let stop_time = src["stop-time-us"].as_u64().expect("a stop");
    assert!(
        critical_path > 0 && critical_path < start_wall.as_micros() as u64,
        "critical path {critical_path} us, the start took {start_wall:?}"
    );
    assert!(
        stop_time > 0 && stop_time < stop_wall.as_micros() as u64,
        "stop time {stop_time} us, the stop took {stop_wall:?}"
    );
    assert_eq!(
        src["handed-off-last-stop"], 0,
        "drained, nothing handed off"
    );
    assert_eq!(src["rings-running"], 0);
    let timeline = src["timeline"].as_array().unwrap();
    let events: Vec<&str> = timeline
        .iter()
        .map(|event| event["event"].as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"connect"), "{events:?}");
    assert_eq!(events.iter().filter(|e| **e == "ring-started").count(), 1);
    assert_eq!(events.iter().filter(|e| **e == "ring-stopped").count(), 1);
    let stamps: Vec<u64> = timeline
        .iter()
        .map(|event| event["at-us"].as_u64().unwrap())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "not monotonic");

    // All devices by default; the untouched one has no windows.
    let all = client.execute("query-metrics", json!({}));
    let dst = all["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "dst")
        .expect("dst in query-metrics");
    assert_eq!(dst["start-critical-path-us"], Value::Null);

    let reply = client.execute("query-metrics", json!({"format": "prometheus"}));
    let text = reply["return"].as_str().expect("a string");
    let samples = parse_prometheus(text);
    let sample = |name: &str, device: &str| {
        samples
            .iter()
            .find(|(n, d, _)| n == name && d == device)
            .map(|(_, _, v)| *v)
    };
    let stop_seconds = sample("vhost_agent_stop_seconds", "src").expect("stop sample");
    assert!((stop_seconds * 1e6 - stop_time as f64).abs() < 1.0);
    assert_eq!(sample("vhost_agent_starts_total", "src"), Some(1.0));
    assert_eq!(sample("vhost_agent_stop_seconds", "dst"), None);
    assert_eq!(sample("vhost_agent_sessions_total", "dst"), Some(0.0));

    for bad in [
        json!({"format": "xml"}),
        json!({"device": "nope"}),
        json!({"extra": 1}),
    ] {
        let reply = client.execute("query-metrics", bad.clone());
        assert!(reply["error"]["class"].is_string(), "{bad} -> {reply}");
    }
}

/// How long a front-end waits for the agent's data path in these tests.
const WAIT: Duration = Duration::from_secs(10);

impl Agent {
    /// A fresh 1 MiB image `NAME.img` and the spec of a disk serving it on
    /// `NAME.sock`, with `extra` keys appended.
    fn disk_spec(&self, name: &str, extra: &str) -> String {
        let image = self.path(&format!("{name}.img"));
        if !image.exists() {
            create_image(&image, 1 << 20).unwrap();
        }
        format!(
            "socket={},image={}{extra}",
            self.path(&format!("{name}.sock")).display(),
            image.display()
        )
    }

    /// Every socket file left in the agent's directory.
    fn sockets(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".sock"))
            .collect();
        names.sort();
        names
    }
}

impl Client {
    fn add(&mut self, kind: &str, spec: &str) -> Value {
        self.execute("add-device", json!({"kind": kind, "spec": spec}))
    }

    fn remove(&mut self, id: &str) -> Value {
        self.execute("remove-device", json!({"device": id}))
    }

    fn ids(&mut self) -> Vec<String> {
        self.devices()
            .iter()
            .map(|device| device["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// The front-end's connection was closed by the agent: its next request
/// gets no answer.
fn assert_disconnected(frontend: &mut TestFrontend) {
    assert!(
        frontend.frontend.get_features().is_err(),
        "the front-end is still served"
    );
}

#[test]
fn add_device_serves_a_disk_at_runtime() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let reply = client.add("blk", &agent.disk_spec("new", ",num-queues=2"));
    let added = &reply["return"];
    // No id= in the spec: the first free blkN.
    assert_eq!(added["id"], "blk0", "{reply}");
    assert_eq!(added["kind"], "blk");
    assert_eq!(added["socket"], agent.path("new.sock").to_str().unwrap());
    assert_eq!(added["image"], agent.path("new.img").to_str().unwrap());
    assert_eq!(*device(&client.devices(), "blk0"), *added);
    assert_eq!(client.ids(), ["dst", "src", "blk0"]);

    let mut frontend = TestFrontend::connect(&agent.path("new.sock"), 2, 16);
    assert!(
        frontend.round_trip(0, 0, 3),
        "I/O on queue 0 of the new disk"
    );
    assert!(
        frontend.round_trip(1, 1, 9),
        "I/O on queue 1 of the new disk"
    );
    let mut image = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(agent.path("new.img"))
        .unwrap()
        .read_exact_at(&mut image, 9 * 512)
        .unwrap();
    assert_eq!(frontend.data(1, 4096), image, "the data is in the image");

    let reply = client.execute("query-metrics", json!({"device": "blk0"}));
    assert_eq!(reply["return"][0]["sessions"], 1, "{reply}");
}

#[test]
fn ctl_add_device_serves_a_net_device_that_moves_frames() {
    const HEADER: usize = 12;
    let agent = Agent::start_with(&[]);
    let socket = agent.path("n.sock");
    let arguments = json!({
        "kind": "net",
        "spec": format!("socket={},dataplane=loop", socket.display()),
    })
    .to_string();
    let (code, stdout, stderr) = agent.ctl(&["add-device", &arguments]);
    assert_eq!(code, 0, "{stderr}");
    let added: Value = serde_json::from_str(&stdout).expect("ctl prints JSON");
    assert_eq!(added["id"], "net0");
    assert_eq!(added["kind"], "net");
    assert_eq!(added["dataplane"], "loop");
    assert_eq!(added["queue-pairs"], 1);

    let mut options = StartOptions::plain(2, 256);
    options.queues_per_unit = 2;
    let mut frontend = TestFrontend::start(&socket, &options);
    let rx = BUFFER_BASE;
    let tx = BUFFER_BASE + 0x1_0000;
    let frame: Vec<u8> = (0..96u8).map(|i| i.wrapping_mul(7)).collect();
    let ram = frontend.ram.clone();
    frontend.queues[0].add_chain(&ram, &[Desc::writable(rx, 2048)]);
    ram.mem
        .write_slice(&[0u8; HEADER], GuestAddress(tx))
        .unwrap();
    ram.mem
        .write_slice(&frame, GuestAddress(tx + 0x100))
        .unwrap();
    frontend.queues[1].add_chain(
        &ram,
        &[
            Desc::readable(tx, HEADER as u32),
            Desc::readable(tx + 0x100, frame.len() as u32),
        ],
    );
    frontend.queues[1].kick();
    let used = frontend.queues[0]
        .wait_used(&ram, 1, WAIT)
        .unwrap_or_else(|| panic!("no frame came back; log:\n{}", agent.log()));
    assert_eq!(used[0].1 as usize, HEADER + frame.len());
    let mut back = vec![0u8; frame.len()];
    ram.mem
        .read_slice(&mut back, GuestAddress(rx + HEADER as u64))
        .unwrap();
    assert_eq!(back, frame, "the frame changed on the way");

    let (_, stdout, _) = agent.ctl(&["query-devices"]);
    let devices: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(devices[0]["pairs"][0]["tx-packets"], 1, "{devices}");
    assert_eq!(devices[0]["pairs"][0]["rx-packets"], 1, "{devices}");
}

#[test]
fn remove_device_disconnects_its_front_end_and_spares_the_others() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let mut src = TestFrontend::connect(&agent.path("src.sock"), 1, 16);
    let mut dst = TestFrontend::connect(&agent.path("dst.sock"), 1, 16);
    assert!(src.round_trip(0, 0, 1));
    assert!(dst.round_trip(0, 0, 1));

    let reply = client.remove("src");
    assert_eq!(reply, json!({"return": {"handed-off": 0}}));
    assert!(!agent.path("src.sock").exists(), "socket file left behind");
    assert_disconnected(&mut src);
    assert_eq!(client.ids(), ["dst"]);
    assert!(dst.round_trip(0, 1, 2), "the other disk is still served");
    let log = agent.log();
    assert!(log.contains("src: stopped"), "{log}");

    // Removed means gone, and the id and socket can be used again.
    let reply = client.remove("src");
    assert_eq!(reply["error"]["class"], "DeviceNotFound", "{reply}");
    let reply = client.add("blk", &agent.disk_spec("src", ",id=src"));
    assert_eq!(reply["return"]["id"], "src", "{reply}");
    let mut again = TestFrontend::connect(&agent.path("src.sock"), 1, 16);
    assert_eq!(
        again.request(0, 0, vhost_agent_tests::frontend::VIRTIO_BLK_T_IN, 1, 4096),
        Some(VIRTIO_BLK_S_OK)
    );
    assert_eq!(
        again.data(0, 4096),
        src.data(0, 4096),
        "the re-added disk serves what the first one wrote"
    );
    assert!(again.round_trip(0, 1, 5));
    assert_eq!(client.ids(), ["dst", "src"]);
}

#[test]
fn remove_device_lets_requests_storage_has_finish() {
    let agent = Agent::start_with(&[("slow", ",latency-ms=300")]);
    let mut client = agent.connect();
    let options = StartOptions::with_protocol(1, 16, PROTOCOL_F_INFLIGHT_SHMFD);
    let mut frontend = TestFrontend::start(&agent.path("slow.sock"), &options);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    frontend.fill(0, &data);
    let submitted = frontend.submit(0, &[BlkRequest::write(0, 16, 4096)]);
    let taken = wait_until(WAIT, || frontend.region().queue(0).inflight_count() == 1);
    assert!(taken, "the agent did not take the write");

    let removing = std::time::Instant::now();
    let reply = client.remove("slow");
    let took = removing.elapsed();
    assert_eq!(
        reply,
        json!({"return": {"handed-off": 0}}),
        "{}",
        agent.log()
    );
    // The write was answered before the reply: nothing to wait for now.
    let heads = frontend.collect_used(0, 1, Duration::ZERO);
    assert_eq!(heads, [submitted[0].head], "took {took:?}");
    assert_eq!(frontend.status(0), VIRTIO_BLK_S_OK);
    assert_eq!(frontend.region().queue(0).inflight_count(), 0);
    let mut image = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(agent.path("slow.img"))
        .unwrap()
        .read_exact_at(&mut image, 16 * 512)
        .unwrap();
    assert_eq!(image, data, "the write landed before the removal ended");
    assert_disconnected(&mut frontend);
    assert!(agent.sockets() == ["control.sock"], "{:?}", agent.sockets());
}

#[test]
fn remove_device_leaves_fence_held_writes_in_the_inflight_region() {
    // src suspends with a slow write in flight; dst (fence=api, closed)
    // takes over the same guest and holds the resubmitted write.
    let agent = Agent::start_with(&[("dst", ",fence=api"), ("src", ",latency-ms=200")]);
    let mut client = agent.connect();
    let options = StartOptions::with_protocol(1, 16, PROTOCOL_SUSPEND);
    let mut src = TestFrontend::start(&agent.path("src.sock"), &options);
    src.fill(0, &[0xab; 4096]);
    src.submit(0, &[BlkRequest::write(0, 24, 4096)]);
    let taken = wait_until(WAIT, || src.region().queue(0).inflight_count() == 1);
    assert!(taken, "the source did not take the write");
    let stopped = src.stop(StopRequest::GetVringBase);
    let region = src.region().migrate();
    let mut dst = TestFrontend::resume(
        &agent.path("dst.sock"),
        &options,
        &src,
        region,
        &stopped.bases,
    );
    let held = wait_until(WAIT, || agent.log().contains("held until the write fence"));
    assert!(held, "dst does not hold the write: {}", agent.log());

    let reply = client.remove("dst");
    assert_eq!(
        reply,
        json!({"return": {"handed-off": 1}}),
        "{}",
        agent.log()
    );
    assert_eq!(
        dst.region().queue(0).inflight_count(),
        1,
        "the held write stays in the region for the next back-end"
    );
    assert!(
        dst.collect_used(0, 1, Duration::ZERO).is_empty(),
        "not answered"
    );
    let mut image = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(agent.path("dst.img"))
        .unwrap()
        .read_exact_at(&mut image, 24 * 512)
        .unwrap();
    assert_eq!(image, [0u8; 4096], "the held write was not written");
    assert_disconnected(&mut dst);
    assert!(
        agent.log().contains("held by the write fence stay"),
        "{}",
        agent.log()
    );
}

#[test]
fn refused_adds_and_removes_leave_nothing_and_keep_the_connection() {
    let agent = Agent::start();
    let mut client = agent.connect();
    let missing = agent.path("missing.img");
    let cases = [
        (
            "blk",
            format!("socket={}", agent.path("a.sock").display()),
            "invalid blk spec: missing image=PATH",
        ),
        (
            "blk",
            format!("{},colour=blue", agent.disk_spec("a", "")),
            "invalid blk spec: unknown --blk key `colour`",
        ),
        (
            "net",
            format!(
                "socket={},dataplane=ethernet",
                agent.path("a.sock").display()
            ),
            "invalid net spec",
        ),
        (
            "blk",
            agent.disk_spec("a", ",id=src"),
            "cannot add the device: two devices are named src",
        ),
        (
            "blk",
            format!(
                "socket={},image={}",
                agent.path("dst.sock").display(),
                agent.path("a.img").display()
            ),
            "belongs to device dst",
        ),
        (
            "blk",
            format!(
                "socket={},image={}",
                agent.path("a.sock").display(),
                missing.display()
            ),
            "cannot set up blk device blk0: cannot open",
        ),
        (
            "net",
            format!(
                "socket={},dataplane=sim:{}",
                agent.path("a.sock").display(),
                agent.path("no-profile.json").display()
            ),
            "cannot set up net device net0: cannot set up dataplane",
        ),
    ];
    for (kind, spec, text) in &cases {
        let reply = client.add(kind, spec);
        assert_eq!(reply["error"]["class"], "GenericError", "{spec}: {reply}");
        let desc = reply["error"]["desc"].as_str().unwrap();
        assert!(desc.contains(text), "{spec}: `{text}` not in `{desc}`");
        assert_eq!(
            agent.sockets(),
            ["control.sock", "dst.sock", "src.sock"],
            "{spec}"
        );
        assert_eq!(client.ids(), ["dst", "src"], "{spec}");
    }
    // A socket some other process listens on.
    let foreign = std::os::unix::net::UnixListener::bind(agent.path("foreign.sock")).unwrap();
    let reply = client.add(
        "blk",
        &format!(
            "socket={},image={}",
            agent.path("foreign.sock").display(),
            agent.path("a.img").display()
        ),
    );
    let desc = reply["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("in use by another process"), "{reply}");
    assert!(agent.path("foreign.sock").exists());
    drop(foreign);

    let reply = client.execute("add-device", json!({"kind": "scsi", "spec": "x"}));
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    let reply = client.remove("nope");
    assert_eq!(reply["error"]["class"], "DeviceNotFound", "{reply}");
    let reply = client.execute("remove-device", json!({}));
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");

    // The connection and the devices are as before.
    let reply = client.add("blk", &agent.disk_spec("a", ""));
    assert_eq!(reply["return"]["id"], "blk0", "{reply}");
    let mut frontend = TestFrontend::connect(&agent.path("a.sock"), 1, 16);
    assert!(frontend.round_trip(0, 0, 0));
    let log = agent.log();
    assert!(log.contains("add-device: cannot add the device"), "{log}");
}

#[test]
fn quit_after_runtime_additions_stops_them_too() {
    let mut agent = Agent::start_with(&[]);
    let mut client = agent.connect();
    assert!(client.devices().is_empty());
    let reply = client.add("blk", &agent.disk_spec("disk", ",id=disk"));
    assert_eq!(reply["return"]["id"], "disk", "{reply}");
    let spec = format!("socket={},dataplane=loop", agent.path("net.sock").display());
    assert_eq!(client.add("net", &spec)["return"]["id"], "net0");
    let spec = format!(
        "socket={},dataplane=loop",
        agent.path("gone.sock").display()
    );
    assert_eq!(client.add("net", &spec)["return"]["id"], "net1");
    assert_eq!(client.remove("net1"), json!({"return": {"handed-off": 0}}));
    let mut frontend = TestFrontend::connect(&agent.path("disk.sock"), 1, 16);
    assert!(frontend.round_trip(0, 0, 0));

    let reply = client.send(r#"{"execute": "quit"}"#);
    assert_eq!(reply, json!({"return": {}}));
    let exit = agent
        .process
        .wait_timeout(Duration::from_secs(20))
        .expect("the agent did not exit after quit");
    assert!(exit.success(), "agent exited with {exit}");
    assert!(agent.sockets().is_empty(), "{:?}", agent.sockets());
    let log = agent.log();
    for stopped in ["disk: stopped", "net0: stopped", "net1: stopped"] {
        assert!(log.contains(stopped), "no `{stopped}` in\n{log}");
    }
    assert!(log.contains("shutdown complete"), "{log}");
}
