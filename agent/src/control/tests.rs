//! The control protocol without a socket: one request line in, one reply
//! line out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blkdev::fence::Fence;
use blkdev::FenceMode;
use serde_json::json;

use super::*;
use crate::daemon::registry::{DeviceKind, RegisteredDevice, Registry};
use crate::metrics::DeviceMetrics;
use crate::vhost_user::listener::ServerHandle;

/// A disk's shared state over a scratch file (no queue runs).
fn test_disk(id: &str) -> Arc<blkdev::queue::DiskShared> {
    let file = Arc::new(tempfile::tempfile().unwrap());
    Arc::new(blkdev::queue::DiskShared::new(file, 8, false, id))
}

/// Devices `dst` (fence=api, so its gate starts closed) and `src`
/// (fence=lock), registered without servers. Neither fence touches the
/// file system here.
fn registry() -> (Devices, Arc<Fence>) {
    let registry = Registry::new();
    let image = PathBuf::from("/nonexistent/dst.img");
    let fence = Fence::new(FenceMode::Api, &image);
    registry
        .insert(RegisteredDevice::new(
            "dst",
            Path::new("/run/dst.sock"),
            DeviceKind::Blk {
                image,
                fence: fence.clone(),
                disk: test_disk("dst"),
                num_queues: 1,
            },
            Arc::new(DeviceMetrics::new("dst")),
            Arc::default(),
            ServerHandle::unserved(),
        ))
        .unwrap();
    let image = PathBuf::from("/nonexistent/src.img");
    registry
        .insert(RegisteredDevice::new(
            "src",
            Path::new("/run/src.sock"),
            DeviceKind::Blk {
                fence: Fence::new(FenceMode::Lock, &image),
                image,
                disk: test_disk("src"),
                num_queues: 1,
            },
            Arc::new(DeviceMetrics::new("src")),
            Arc::default(),
            ServerHandle::unserved(),
        ))
        .unwrap();
    (Devices::new(Arc::new(registry)), fence)
}

/// Dispatch `line` (finishing it here if it answers later) and parse
/// the reply line back.
fn ask(registry: &Devices, line: &str) -> (Value, bool) {
    let (reply, quit) = match dispatch(line.as_bytes(), registry).expect("a reply") {
        Dispatched::Now { reply, quit } => (reply, quit),
        Dispatched::Later(later) => (later.finish(), false),
    };
    assert!(reply.ends_with('\n'));
    assert_eq!(reply.matches('\n').count(), 1, "one line");
    (serde_json::from_str(&reply).unwrap(), quit)
}

/// Assert an error reply of `class` whose description contains `text`;
/// returns the reply.
fn assert_error(registry: &Devices, line: &str, class: &str, text: &str) -> Value {
    let (reply, quit) = ask(registry, line);
    assert!(!quit);
    assert_eq!(reply["error"]["class"], class, "{line} -> {reply}");
    let desc = reply["error"]["desc"].as_str().unwrap();
    assert!(desc.contains(text), "{line}: `{text}` not in `{desc}`");
    assert!(reply.get("return").is_none());
    reply
}

#[test]
fn garbage_is_a_generic_error_without_id() {
    let (registry, _) = registry();
    for line in ["this is not json", "{\"execute\": ", "\u{7f}\u{1}", "{}}"] {
        let reply = assert_error(&registry, line, "GenericError", "invalid JSON");
        assert!(reply.get("id").is_none());
    }
    let invalid_utf8: &[u8] = b"{\"execute\": \"\xff\"}";
    let dispatched = dispatch(invalid_utf8, &registry).unwrap();
    assert!(matches!(dispatched, Dispatched::Now { reply, .. } if reply.contains("GenericError")));
}

#[test]
fn a_request_must_be_an_object() {
    let (registry, _) = registry();
    for line in ["[1, 2]", "\"query-devices\"", "42", "null"] {
        assert_error(&registry, line, "GenericError", "must be a JSON object");
    }
}

#[test]
fn blank_lines_get_no_reply() {
    let (registry, _) = registry();
    assert!(dispatch(b"", &registry).is_none());
    assert!(dispatch(b"  \r\n", &registry).is_none());
}

#[test]
fn malformed_requests_echo_their_id() {
    let (registry, _) = registry();
    let reply = assert_error(&registry, r#"{"id": 5}"#, "GenericError", "`execute`");
    assert_eq!(reply["id"], 5);
    let reply = assert_error(
        &registry,
        r#"{"execute": "quit", "frobnicate": 1, "id": "x"}"#,
        "GenericError",
        "frobnicate",
    );
    assert_eq!(reply["id"], "x");
    assert_error(
        &registry,
        r#"{"execute": 7}"#,
        "GenericError",
        "invalid request",
    );
    assert_error(
        &registry,
        r#"{"execute": "query-devices", "arguments": [1]}"#,
        "GenericError",
        "invalid request",
    );
}

#[test]
fn unknown_command_is_command_not_found() {
    let (registry, _) = registry();
    let reply = assert_error(
        &registry,
        r#"{"execute": "frobnicate", "id": {"seq": 1}}"#,
        "CommandNotFound",
        "frobnicate",
    );
    assert_eq!(reply["id"], json!({"seq": 1}));
}

#[test]
fn success_echoes_any_id() {
    let (registry, _) = registry();
    for id in [json!(1), json!("abc"), json!({"a": [1, 2]})] {
        let line = json!({"execute": "query-devices", "id": id}).to_string();
        let (reply, _) = ask(&registry, &line);
        assert_eq!(reply["id"], id);
        assert!(reply["return"].is_array());
    }
    let (reply, _) = ask(&registry, r#"{"execute": "query-devices"}"#);
    assert!(reply.get("id").is_none());
}

#[test]
fn query_devices_reports_each_disk_and_its_fence() {
    let (registry, _) = registry();
    let (reply, quit) = ask(&registry, r#"{"execute": "query-devices"}"#);
    assert!(!quit);
    assert_eq!(
        reply["return"],
        json!([
            {
                "id": "dst", "kind": "blk", "socket": "/run/dst.sock",
                "image": "/nonexistent/dst.img",
                "fence": {"mode": "api", "open": false,
                          "abandoned-outstanding": 0, "abandoned-total": 0},
                "in-flight": [0]
            },
            {
                "id": "src", "kind": "blk", "socket": "/run/src.sock",
                "image": "/nonexistent/src.img",
                "fence": {"mode": "lock", "open": true,
                          "abandoned-outstanding": 0, "abandoned-total": 0},
                "in-flight": [0]
            }
        ])
    );
}

#[test]
fn commands_without_arguments_refuse_arguments() {
    let (registry, _) = registry();
    assert_error(
        &registry,
        r#"{"execute": "query-devices", "arguments": {"device": "dst"}}"#,
        "GenericError",
        "invalid arguments for query-devices: unknown field `device`",
    );
    // An empty object is the same as none.
    let (reply, _) = ask(&registry, r#"{"execute": "quit", "arguments": {}}"#);
    assert_eq!(reply["return"], json!({}));
}

#[test]
fn fence_release_needs_a_device_string() {
    let (registry, fence) = registry();
    assert_error(
        &registry,
        r#"{"execute": "fence-release"}"#,
        "GenericError",
        "invalid arguments for fence-release: missing field `device`",
    );
    assert_error(
        &registry,
        r#"{"execute": "fence-release", "arguments": {"device": 3}}"#,
        "GenericError",
        "invalid type: integer `3`, expected a string",
    );
    assert_error(
        &registry,
        r#"{"execute": "fence-release", "arguments": {"device": "dst", "force": true}}"#,
        "GenericError",
        "unknown field `force`",
    );
    assert!(!fence.is_open(), "refused requests change nothing");
}

#[test]
fn fence_release_of_an_unknown_device_is_device_not_found() {
    let (registry, fence) = registry();
    let reply = assert_error(
        &registry,
        r#"{"execute": "fence-release", "arguments": {"device": "nope"}, "id": 9}"#,
        "DeviceNotFound",
        "device 'nope' not found",
    );
    assert_eq!(reply["id"], 9);
    assert!(!fence.is_open());
}

#[test]
fn fence_release_opens_the_gate() {
    let (registry, fence) = registry();
    let (reply, quit) = ask(
        &registry,
        r#"{"execute": "fence-release", "arguments": {"device": "dst"}}"#,
    );
    assert_eq!(reply, json!({"return": {}}));
    assert!(!quit);
    assert!(fence.is_open());
    let (devices, _) = ask(&registry, r#"{"execute": "query-devices"}"#);
    assert_eq!(devices["return"][0]["fence"]["open"], true);
    // Releasing an open gate is not an error.
    let (reply, _) = ask(
        &registry,
        r#"{"execute": "fence-release", "arguments": {"device": "dst"}}"#,
    );
    assert_eq!(reply, json!({"return": {}}));
}

#[test]
fn quit_returns_empty_and_asks_for_shutdown() {
    let (registry, _) = registry();
    let (reply, quit) = ask(&registry, r#"{"execute": "quit", "id": 1}"#);
    assert_eq!(reply, json!({"return": {}, "id": 1}));
    assert!(quit);
}

#[test]
fn query_commands_lists_every_command() {
    let (registry, _) = registry();
    let (reply, _) = ask(&registry, r#"{"execute": "query-commands"}"#);
    let names: Vec<&str> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|command| command["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "query-commands",
            "query-devices",
            "query-metrics",
            "query-config",
            "presetup",
            "fence-release",
            "add-device",
            "remove-device",
            "quit"
        ]
    );
}

#[test]
fn query_metrics_reports_every_device_or_one_in_either_format() {
    let (registry, _) = registry();
    registry
        .registry()
        .get("src")
        .unwrap()
        .metrics()
        .connected();
    let (reply, _) = ask(&registry, r#"{"execute": "query-metrics"}"#);
    let devices = reply["return"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[1]["device"], "src");
    assert_eq!(devices[1]["sessions"], 1);
    assert_eq!(devices[1]["stop-time-us"], Value::Null);
    let (reply, _) = ask(
        &registry,
        r#"{"execute": "query-metrics", "arguments": {"device": "dst", "format": "prometheus"}}"#,
    );
    let text = reply["return"].as_str().unwrap();
    assert!(text.contains("vhost_agent_sessions_total{device=\"dst\"} 0\n"));
    assert!(!text.contains("device=\"src\""));
    assert_error(
        &registry,
        r#"{"execute": "query-metrics", "arguments": {"device": "nope"}}"#,
        "DeviceNotFound",
        "nope",
    );
    assert_error(
        &registry,
        r#"{"execute": "query-metrics", "arguments": {"format": "xml"}}"#,
        "GenericError",
        "expected `json` or `prometheus`",
    );
}

#[test]
fn add_device_refuses_bad_arguments_and_specs() {
    let (registry, _) = registry();
    for (arguments, text) in [
        (json!({"kind": "blk"}), "missing field `spec`"),
        (json!({"spec": "socket=/x"}), "missing field `kind`"),
        (
            json!({"kind": "scsi", "spec": "socket=/x"}),
            "unknown variant `scsi`, expected `blk` or `net`",
        ),
        (
            json!({"kind": "blk", "spec": "socket=/x", "id": "a"}),
            "unknown field `id`",
        ),
        (
            json!({"kind": "blk", "spec": "socket=/x"}),
            "invalid blk spec: missing image=PATH",
        ),
        (
            json!({"kind": "net", "spec": "socket=/x,dataplane=loop,mtu=9"}),
            "invalid net spec: mtu=9: must be 68..=65535",
        ),
        (
            json!({"kind": "blk", "spec": "socket=/run/src.sock,image=/i,id=src"}),
            "cannot add the device: two devices are named src",
        ),
        (
            json!({"kind": "blk", "spec": "socket=/run/src.sock,image=/i"}),
            "socket /run/src.sock belongs to device src",
        ),
    ] {
        let line = json!({"execute": "add-device", "arguments": arguments}).to_string();
        assert_error(&registry, &line, "GenericError", text);
    }
    assert_eq!(registry.registry().list().len(), 2, "nothing was added");
}

#[test]
fn add_device_serves_a_disk_that_remove_device_takes_away() {
    let (registry, _) = registry();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let socket = dir.path().join("disk.sock");
    let spec = format!(
        "socket={},image={},engine=threads",
        socket.display(),
        image.display()
    );
    let add =
        json!({"execute": "add-device", "arguments": {"kind": "blk", "spec": spec}}).to_string();
    let (reply, _) = ask(&registry, &add);
    let added = &reply["return"];
    assert_eq!(added["id"], "blk0", "{reply}");
    assert_eq!(added["kind"], "blk");
    assert_eq!(added["socket"], socket.to_str().unwrap());
    assert_eq!(added["fence"]["mode"], "lock");
    assert!(socket.exists());
    let (devices, _) = ask(&registry, r#"{"execute": "query-devices"}"#);
    assert_eq!(devices["return"][2], *added);

    let remove = r#"{"execute": "remove-device", "arguments": {"device": "blk0"}, "id": 4}"#;
    let dispatched = dispatch(remove.as_bytes(), &registry).unwrap();
    assert!(
        matches!(dispatched, Dispatched::Later(_)),
        "a removal waits off the control thread"
    );
    drop(dispatched);
    assert!(!socket.exists(), "an unfinished removal still completes");
    assert_error(
        &registry,
        remove,
        "DeviceNotFound",
        "device 'blk0' not found",
    );

    // The id and socket are free again.
    let (reply, _) = ask(&registry, &add);
    assert_eq!(reply["return"]["id"], "blk0", "{reply}");
    let (reply, _) = ask(&registry, remove);
    assert_eq!(reply, json!({"return": {"handed-off": 0}, "id": 4}));
    assert!(!socket.exists());
    assert_eq!(registry.registry().list().len(), 2);
}

#[test]
fn a_line_too_long_is_a_generic_error() {
    let error = ControlError::LineTooLong {
        limit: MAX_LINE_BYTES,
    };
    let reply: Value = serde_json::from_str(&error.reply(None).to_line()).unwrap();
    assert_eq!(reply["error"]["class"], "GenericError");
    assert!(reply["error"]["desc"].as_str().unwrap().contains("1048576"));
}
