//! Reading the `--out` timeline of `vhost-agent migrate`: its phases,
//! devices and heavy-op lists, and what every migration through the
//! command must show on it ([`assert_phases`]).

use serde_json::Value;

/// The phases `vhost-agent migrate` reports, in migration order
/// (docs of `vhost_agent::migrate::timeline`).
pub const PHASES: [&str; 10] = [
    "migrate",
    "vm-stop",
    "source-first-get-vring-base",
    "source-last-get-vring-base-reply",
    "device-state-save",
    "device-state-load",
    "destination-first-start-message",
    "destination-rings-running",
    "vm-resume",
    "migration-completed",
];

/// Phase `name` of a timeline: its `at-ms` and `uncertainty-ms`.
pub fn phase(timeline: &Value, name: &str) -> Option<(f64, f64)> {
    let phase = timeline["phases"]
        .as_array()?
        .iter()
        .find(|phase| phase["phase"] == name)?;
    Some((
        phase["at-ms"].as_f64()?,
        phase["uncertainty-ms"].as_f64().unwrap_or(0.0),
    ))
}

/// The end of phase `name` (phases with a duration).
pub fn phase_end(timeline: &Value, name: &str) -> Option<f64> {
    timeline["phases"]
        .as_array()?
        .iter()
        .find(|phase| phase["phase"] == name)?["end-ms"]
        .as_f64()
}

/// The entry of device `id` (source id) in a timeline's `devices`.
pub fn device<'a>(timeline: &'a Value, id: &str) -> &'a Value {
    timeline["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|device| device["source"] == id))
        .unwrap_or_else(|| panic!("no device {id} in the timeline: {timeline}"))
}

/// Heavy-op list `list` of device `id`.
pub fn ops(timeline: &Value, id: &str, list: &str) -> Vec<String> {
    device(timeline, id)[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} for {id}: {timeline}"))
        .iter()
        .filter_map(|op| op.as_str().map(str::to_string))
        .collect()
}

/// `earlier` comes no later than `later`, each a phase's start (`at`) or
/// end, within both clocks' uncertainty.
pub fn assert_before(timeline: &Value, earlier: (&str, bool), later: (&str, bool)) {
    let time = |(name, end): (&str, bool)| {
        let (at, plus_minus) =
            phase(timeline, name).unwrap_or_else(|| panic!("no phase {name}: {timeline}"));
        let value = if end {
            phase_end(timeline, name).unwrap_or_else(|| panic!("phase {name} has no end"))
        } else {
            at
        };
        (value, plus_minus)
    };
    let (a, a_pm) = time(earlier);
    let (b, b_pm) = time(later);
    assert!(
        a <= b + a_pm + b_pm,
        "{} {} at {a:.3} ms (±{a_pm:.3}) is after {} {} at {b:.3} ms (±{b_pm:.3})\n{timeline:#}",
        earlier.0,
        if earlier.1 { "ends" } else { "begins" },
        later.0,
        if later.1 { "ends" } else { "begins" },
    );
}

/// Every phase is on the timeline, and in the order the migration
/// imposes. QEMU sends STOP after its devices stopped and RESUME before
/// they start, so those two are ordered against what they must follow
/// or precede, not within the agents' chain.
pub fn assert_phases(timeline: &Value) {
    for name in PHASES {
        assert!(
            phase(timeline, name).is_some(),
            "phase {name} missing\n{timeline:#}"
        );
    }
    let at = |name| (name, false);
    let end = |name| (name, true);
    let chain = [
        at("migrate"),
        at("source-first-get-vring-base"),
        at("source-last-get-vring-base-reply"),
        at("device-state-save"),
        end("device-state-save"),
    ];
    for pair in chain.windows(2) {
        assert_before(timeline, pair[0], pair[1]);
    }
    // The destination loads what the source began saving, then starts.
    let chain = [
        at("device-state-save"),
        at("device-state-load"),
        end("device-state-load"),
        at("destination-first-start-message"),
        at("destination-rings-running"),
    ];
    for pair in chain.windows(2) {
        assert_before(timeline, pair[0], pair[1]);
    }
    assert_before(timeline, at("migrate"), at("vm-stop"));
    assert_before(timeline, at("vm-stop"), end("device-state-load"));
    assert_before(timeline, end("device-state-load"), at("vm-resume"));
    assert_before(timeline, at("vm-stop"), at("migration-completed"));
    assert!(
        phase(timeline, "fence-released").is_some(),
        "the fence=api disk was not released\n{timeline:#}"
    );
    // Both devices were found through QEMU's chardevs.
    for id in ["net0", "disk0"] {
        assert!(device(timeline, id)["chardev"].is_string(), "{timeline:#}");
    }
}
