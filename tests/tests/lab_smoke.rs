//! The lab guest works: its kernel has vhost-net, VDUSE and vhost-vdpa,
//! the agent binary (a bookworm build) runs on its trixie libc, and taps
//! and network namespaces can be made. Everything is checked inside the
//! guest; the host asserts on the results the payload reports.
//!
//! `cargo nextest run -p vhost-agent-tests --release --test lab_smoke`
//! (first run: downloads and builds the lab into target/lab).

use std::time::Duration;

use vhost_agent_tests::lab::{lab, labnic_binary, LabConfig, Payload};
use vhost_agent_tests::support::agent_binary;

const SMOKE_SCRIPT: &str = r#"
. /etc/lab/lib.sh
lab_result kernel=$(uname -r)

# /dev/vhost-net opens and takes VHOST_SET_OWNER (lab-probe does both).
lab_check vhost_net_node test -c /dev/vhost-net
/usr/bin/lab-probe vhost-net || LAB_FAILED=$((LAB_FAILED + 1))

# VDUSE: unload it, then `modprobe vduse` (busybox, the image's modules.dep)
# brings back /dev/vduse/control.
lab_check vduse_rmmod rmmod vduse
if [ -e /dev/vduse/control ]; then lab_result vduse_control_after_rmmod=present
else lab_result vduse_control_after_rmmod=absent; fi
lab_check vduse_modprobe modprobe vduse
lab_check vduse_control test -c /dev/vduse/control
if vdpa mgmtdev show | grep -q '^vduse:'; then lab_result vdpa_mgmtdev_vduse=1
else lab_result vdpa_mgmtdev_vduse=0; LAB_FAILED=$((LAB_FAILED + 1)); fi

# vhost_vdpa is loaded and virtio_vdpa is not: a vDPA device becomes
# /dev/vhost-vdpa-N by itself.
lab_result vhost_vdpa_loaded=$([ -d /sys/module/vhost_vdpa ] && echo 1 || echo 0)
lab_result virtio_vdpa_loaded=$([ -d /sys/module/virtio_vdpa ] && echo 1 || echo 0)

# The agent runs here.
if version=$(vhost-agent --version); then
    lab_result agent_version=$(echo "$version" | tr ' ' '_')
else
    lab_result agent_version=fail; LAB_FAILED=$((LAB_FAILED + 1))
fi
if vhost-agent serve --help >/tmp/serve-help 2>&1; then
    lab_result agent_serve_help_net=$(grep -c -- '--net' /tmp/serve-help)
else
    cat /tmp/serve-help; lab_result agent_serve_help_net=fail; LAB_FAILED=$((LAB_FAILED + 1))
fi

# A multiqueue tap, moved into a new network namespace.
lab_check tuntap_add ip tuntap add dev labtap0 mode tap multi_queue
lab_result tap_multi_queue=$(ip -details link show labtap0 | grep -c multi_queue)
lab_check netns_add ip netns add labns
lab_check tap_to_netns ip link set labtap0 netns labns
lab_check netns_lo_up ip netns exec labns ip link set lo up
lab_check tap_in_netns ip netns exec labns ip link show labtap0
lab_result tap_in_init_ns=$(ip link show labtap0 >/dev/null 2>&1 && echo 1 || echo 0)

lab_result uptime_ms=$(lab_uptime_ms)
exit "$LAB_FAILED"
"#;

#[test]
fn lab_kernel_has_vhost_net_vduse_and_vhost_vdpa_and_runs_the_agent() {
    let lab = lab();
    let mut payload = Payload::new(SMOKE_SCRIPT);
    payload
        .binary("/usr/bin/vhost-agent", &agent_binary())
        .unwrap()
        .binary("/usr/bin/lab-probe", &labnic_binary("lab-probe"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = LabConfig::new("smoke").timeout(Duration::from_secs(300));
    let run = lab
        .run(&payload, &config, dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "lab smoke: boot to verdict {:.1?} (host clock), guest uptime {:?}, payload {} KiB, kernel {}",
        run.boot_to_verdict,
        run.guest_uptime(),
        run.payload_bytes / 1024,
        lab.kernel_package
    );
    for line in &run.results {
        eprintln!("  LAB-RESULT {line}");
    }

    assert!(run.value("kernel").is_some_and(|k| k.starts_with("6.12.")));
    assert_eq!(run.verdict.field("modules_failed"), Some("0"));
    let loaded: u32 = run
        .verdict
        .field("modules_loaded")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(loaded >= 7, "modules loaded at boot: {loaded}");
    for check in [
        "vhost_net_node",
        "vhost_net_open",
        "vhost_net_set_owner",
        "vduse_rmmod",
        "vduse_modprobe",
        "vduse_control",
        "tuntap_add",
        "netns_add",
        "tap_to_netns",
        "netns_lo_up",
        "tap_in_netns",
    ] {
        assert_eq!(run.value(check), Some("ok"), "{check}: {:?}", run.results);
    }
    // vhost-net offers VERSION_1 (bit 32) and dirty logging (bit 26).
    let features = u64::from_str_radix(
        run.value("vhost_net_features")
            .and_then(|f| f.strip_prefix("0x"))
            .expect("vhost_net_features=0x..."),
        16,
    )
    .unwrap();
    assert_ne!(features & (1 << 32), 0, "features {features:#x}");
    assert_ne!(features & (1 << 26), 0, "features {features:#x}");
    assert_eq!(run.value("vduse_control_after_rmmod"), Some("absent"));
    assert_eq!(run.value("vdpa_mgmtdev_vduse"), Some("1"));
    assert_eq!(run.value("vhost_vdpa_loaded"), Some("1"));
    assert_eq!(run.value("virtio_vdpa_loaded"), Some("0"));
    assert_eq!(run.value("agent_version"), Some("vhost-agent_0.1.0"));
    assert!(run.number("agent_serve_help_net") > 0);
    assert_eq!(run.number("tap_multi_queue"), 1);
    assert_eq!(run.value("tap_in_init_ns"), Some("0"));
}

#[test]
fn a_failing_payload_gives_fail_with_its_exit_status() {
    let payload = Payload::new(
        ". /etc/lab/lib.sh\nlab_result before=1\nlab_check missing test -e /nonexistent\nexit 3\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = LabConfig::new("fail").timeout(Duration::from_secs(300));
    let run = lab()
        .run_any(&payload, &config, dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("lab fail: boot to verdict {:.1?}", run.boot_to_verdict);
    assert!(!run.verdict.passed);
    assert_eq!(run.verdict.field("rc"), Some("3"));
    assert_eq!(run.value("before"), Some("1"));
    assert_eq!(run.value("missing"), Some("fail-1"));
    // Lab::run turns the same verdict into an error carrying the serial log.
    let err = lab()
        .run(&payload, &config, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("verdict FAIL rc=3"), "{err}");
    assert!(err.contains("LAB-RESULT before=1"), "{err}");
}
