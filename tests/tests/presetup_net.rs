//! Net presetup op by op, through the control API against the real agent
//! on the `sim` dataplane: an early configuration that differs from the
//! final one in one respect makes the start apply exactly the heavy ops of
//! that difference, and the simulated hardware is charged for exactly
//! those (the plan and the device agree). The device moves frames
//! afterwards.

use serde_json::Value;
use vhost_agent_tests::net_rig::{
    ctl, early_config_with, udp_frame, vdpa_191ms_profile, NetRig, NetRigOptions, HDR,
};

fn sim(pairs: usize) -> NetRigOptions {
    NetRigOptions::new(&format!("sim:{}", vdpa_191ms_profile().display()), pairs)
}

fn charged(rig: &NetRig, op: &str) -> u64 {
    let device = rig.device();
    device["sim"]["charged"][op]["count"].as_u64().unwrap_or(0)
}

fn sorted_ops(report: &Value, list: &str) -> Vec<String> {
    let mut ops: Vec<String> = report["last-switchover"][list]
        .as_array()
        .unwrap_or_else(|| panic!("no last-switchover.{list} in {report}"))
        .iter()
        .map(|op| op.as_str().unwrap().to_string())
        .collect();
    ops.sort();
    ops
}

/// One frame through each pair must come back whole.
fn frames_move(rig: &mut NetRig, pairs: usize) {
    for pair in 0..pairs {
        let rx = rig.post_rx(pair, 1, 2048);
        let frame = udp_frame(pair as u16 + 11, 9, 300);
        rig.queue_tx(pair, &frame);
        rig.kick_tx(pair);
        rig.used(2 * pair, 1);
        assert_eq!(rig.read(rx[0].1 + HDR as u64, frame.len()), frame);
    }
}

/// Connect (negotiate as a destination QEMU does), then `presetup` with
/// `pairs` pairs, MTU `mtu` and the features the front-end acked.
fn connect_with_presetup(options: &NetRigOptions, pairs: u16, mtu: u16) -> NetRig {
    let rig = NetRig::connect(options, |_| {});
    let arguments = early_config_with(pairs, mtu, rig.frontend.features);
    ctl(&rig.control(), "presetup", &arguments).expect("presetup");
    rig
}

#[test]
fn an_identical_final_configuration_leaves_only_the_memory_map_to_the_start() {
    let mut rig = connect_with_presetup(&sim(2), 2, 1500);
    rig.set_mtu(1500).expect("NET_SET_MTU");
    rig.start_device();
    frames_move(&mut rig, 2);
    let report = rig.metrics();
    // Guest memory comes with fds only at the start (the in-band bracket
    // maps it early, see net_presetup_inband); everything else was done.
    assert_eq!(
        sorted_ops(&report, "heavy-applied"),
        ["map_region"],
        "{report}"
    );
    assert_eq!(
        sorted_ops(&report, "heavy-skipped"),
        [
            "configure_offloads",
            "create_queue",
            "create_queue",
            "set_mtu"
        ],
        "{report}"
    );
    assert_eq!(report["presetup"]["hits"], 1);
    assert_eq!(
        charged(&rig, "create_queue"),
        4,
        "one per virtqueue, at presetup"
    );
    assert_eq!(charged(&rig, "set_mtu"), 1, "at presetup only");
}

#[test]
fn a_changed_mtu_applies_exactly_set_mtu_at_the_start() {
    let mut rig = connect_with_presetup(&sim(1), 1, 1500);
    assert_eq!(charged(&rig, "set_mtu"), 1);
    rig.set_mtu(9000).expect("NET_SET_MTU");
    rig.start_device();
    frames_move(&mut rig, 1);
    let report = rig.metrics();
    assert_eq!(
        sorted_ops(&report, "heavy-applied"),
        ["map_region", "set_mtu"],
        "{report}"
    );
    assert_eq!(
        charged(&rig, "set_mtu"),
        2,
        "once early, once for the change"
    );
    assert_eq!(charged(&rig, "create_queue"), 2, "both at presetup");
    assert_eq!(rig.device()["mtu"], 9000);
}

#[test]
fn more_queue_pairs_at_the_start_create_exactly_the_missing_queue() {
    let mut rig = connect_with_presetup(&sim(2), 1, 1500);
    assert_eq!(charged(&rig, "create_queue"), 2, "pair 0's two virtqueues");
    rig.set_mtu(1500).expect("NET_SET_MTU");
    rig.start_device();
    frames_move(&mut rig, 2);
    let report = rig.metrics();
    assert_eq!(
        sorted_ops(&report, "heavy-applied"),
        ["create_queue", "map_region"],
        "{report}"
    );
    assert_eq!(
        charged(&rig, "create_queue"),
        4,
        "pair 1's two virtqueues at the start"
    );
}
