//! `vhost-agent migrate` without QEMU: what it does with arguments and
//! peers it cannot use. Real migrations are `presetup_qemu.rs`.

use std::process::Command;

use vhost_agent_tests::support::agent_binary;

fn migrate(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let path = |name: &str| dir.join(name).display().to_string();
    Command::new(agent_binary())
        .arg("migrate")
        .args(["--source-qmp", &path("src-qmp.sock")])
        .args(["--destination-qmp", &path("dst-qmp.sock")])
        .args(["--source-agent", &path("src-ctl.sock")])
        .args(["--destination-agent", &path("dst-ctl.sock")])
        .args(["--uri", "tcp:127.0.0.1:1"])
        .args(extra)
        .output()
        .expect("run vhost-agent migrate")
}

/// No QEMU behind the socket: exit 1, naming the step, the socket, and
/// that it cannot tell where the VM is.
#[test]
fn a_source_qmp_socket_nobody_serves_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = migrate(dir.path(), &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for words in [
        "connect: source QEMU",
        "src-qmp.sock",
        "cannot tell where the VM is",
    ] {
        assert!(stderr.contains(words), "no {words:?} in {stderr}");
    }
    assert!(output.stdout.is_empty(), "a timeline for nothing");
}

#[test]
fn timeouts_and_device_pairs_are_checked_before_anything_is_done() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, words) in [
        (&["--timeout-s", "0"][..], "--timeout-s"),
        (&["--device", "=net0"][..], "SRC or SRC=DST"),
        (&["--max-bandwidth-mib", "0"][..], "--max-bandwidth-mib"),
    ] {
        let output = migrate(dir.path(), extra);
        assert_eq!(output.status.code(), Some(2), "{extra:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(words), "{extra:?}: {stderr}");
    }
}
