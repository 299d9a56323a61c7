//! The control API of the real agent (`serve --control PATH`): the socket
//! is private, requests and errors have QMP's shapes, a bad request costs
//! only its reply, `fence-release` opens a `fence=api` disk's gate,
//! `vhost-agent ctl` is a usable client, and `quit` shuts the agent down
//! as SIGTERM does. Protocol: docs/control-api.md.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vhost_agent_tests::frontend::TestFrontend;
use vhost_agent_tests::support::{
    agent_binary, create_image, spawn_agent, wait_for_path, ChildGuard,
};

/// An agent serving `dst` (fence=api) and `src` (default fence=lock), with
/// its control socket.
struct Agent {
    dir: tempfile::TempDir,
    process: ChildGuard,
    control: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let mut specs = Vec::new();
        for (id, extra) in [("dst", ",fence=api"), ("src", "")] {
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
