//! The control API's request lines: `control::protocol::parse_request`
//! (what the control server parses every line with) and, for lines that
//! are requests, `control::dispatch` against a registry of two disks that
//! nobody serves. `add-device` is only parsed (its spec with the `--blk` /
//! `--net` parsers), never carried out: it would bind sockets and open
//! files. Nothing may panic; every line gets exactly one reply line (or
//! none, for a blank one), and the reply is QMP-shaped JSON.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blkdev::fence::Fence;
use blkdev::queue::DiskShared;
use blkdev::FenceMode;
use libfuzzer_sys::fuzz_target;
use vhost_agent::control::{dispatch, protocol, Dispatched};
use vhost_agent::daemon::registry::{DeviceKind, RegisteredDevice, Registry};
use vhost_agent::daemon::spec::{BlkSpec, NetSpec};
use vhost_agent::daemon::supervisor::Devices;

fn disk(id: &str, mode: FenceMode) -> RegisteredDevice {
    let image = PathBuf::from(format!("/nonexistent/{id}.img"));
    let file = std::fs::File::open("/dev/null").expect("/dev/null");
    let disk = Arc::new(DiskShared::new(Arc::new(file), 0, true, ""));
    RegisteredDevice::unserved(
        id,
        Path::new(&format!("/run/{id}.sock")),
        DeviceKind::Blk {
            fence: Fence::new(mode, &image),
            image,
            disk,
            num_queues: 1,
        },
    )
}

fn devices() -> Devices {
    let registry = Registry::new();
    registry
        .insert(disk("dst", FenceMode::Api))
        .expect("a fresh id");
    registry
        .insert(disk("src", FenceMode::None))
        .expect("a fresh id");
    Devices::new(Arc::new(registry))
}

fuzz_target!(|data: &[u8]| {
    let parsed = protocol::parse_request(data);
    if let Ok(request) = &parsed {
        if request.execute == "add-device" {
            if let Some(spec) = request
                .arguments
                .as_ref()
                .and_then(|arguments| arguments.get("spec"))
                .and_then(|spec| spec.as_str())
            {
                let _ = spec.parse::<BlkSpec>();
                let _ = spec.parse::<NetSpec>();
            }
            return;
        }
    }
    let blank = data.iter().all(u8::is_ascii_whitespace);
    let Some(dispatched) = dispatch(data, &devices()) else {
        assert!(blank, "a non-blank line got no reply");
        return;
    };
    let reply = match dispatched {
        Dispatched::Now { reply, .. } => reply,
        // remove-device of a device nobody serves: finish it here.
        Dispatched::Later(later) => later.finish(),
    };
    assert!(
        reply.ends_with('\n') && reply.matches('\n').count() == 1,
        "{reply:?}"
    );
    let value: serde_json::Value = serde_json::from_str(&reply).expect("the reply is JSON");
    assert!(
        value.get("return").is_some() != value.get("error").is_some(),
        "not a QMP reply: {reply}"
    );
    if parsed.is_err() {
        assert!(
            value.get("error").is_some(),
            "a malformed line succeeded: {reply}"
        );
    }
});
