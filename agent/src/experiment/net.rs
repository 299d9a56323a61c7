//! One net scenario of the presetup experiment: a fresh agent with one
//! `sim` net device, a destination front-end that connects and negotiates
//! (as QEMU does when it starts), optionally the control API `presetup`
//! with the early configuration (as an orchestrator does during migration
//! setup), then the start (the switchover) timed two ways, and frames on
//! every pair to prove the device works.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_agent_frontend::bench::catch_panic;
use vhost_agent_frontend::net_rig::{
    ctl, early_config_with, udp_frame, NetRig, NetRigOptions, HDR,
};

/// The parameters of one net scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetScenario {
    /// The sim cost profile (JSON).
    pub profile: PathBuf,
    /// Its `name`, for reports.
    pub profile_name: String,
    /// Queue pairs of the device, all started.
    pub queue_pairs: u16,
    /// Guest RAM of the front-end, in MiB.
    pub memory_mib: u64,
    /// Whether `presetup` is called before the start.
    pub presetup: bool,
    /// The MTU the front-end sets with NET_SET_MTU as the first message of
    /// the start (QEMU with `host_mtu=`), and the early configuration's;
    /// `None`: no NET_SET_MTU, and 1500 early.
    pub mtu: Option<u16>,
}

impl NetScenario {
    /// A one-line description for progress and reports (no commas, so it
    /// is also a CSV cell).
    pub fn describe(&self) -> String {
        format!(
            "net {} qp={} mem={} presetup={}",
            self.profile_name,
            self.queue_pairs,
            memory_label(self.memory_mib).replace(' ', ""),
            if self.presetup { "on" } else { "off" }
        )
    }
}

/// `64 MiB`, `1 GiB`.
pub fn memory_label(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// The configuration op counts of the start (`query-metrics`, `presetup`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PresetupCounts {
    /// Heavy ops done at the start.
    pub heavy_applied: u64,
    /// Heavy ops skipped because presetup had done them.
    pub heavy_skipped: u64,
    /// Light ops done at the start.
    pub light_applied: u64,
    /// Light ops skipped.
    pub light_skipped: u64,
    /// Starts that used an early configuration.
    pub hits: u64,
    /// Early configurations refused.
    pub fallbacks: u64,
}

impl PresetupCounts {
    fn from_json(counts: &Value) -> Result<PresetupCounts, String> {
        let field = |name: &str| {
            counts[name]
                .as_u64()
                .ok_or_else(|| format!("no integer `{name}` in the presetup counters {counts}"))
        };
        Ok(PresetupCounts {
            heavy_applied: field("heavy-applied")?,
            heavy_skipped: field("heavy-skipped")?,
            light_applied: field("light-applied")?,
            light_skipped: field("light-skipped")?,
            hits: field("hits")?,
            fallbacks: field("fallbacks")?,
        })
    }
}

/// What one run of a net scenario measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetMeasurement {
    /// The agent's `start-critical-path-us`: first start message to every
    /// ring running on the data path.
    pub critical_path: Duration,
    /// The front-end's view: from sending the first start message to the
    /// last pair's frame coming back on its RX ring.
    pub frontend_start: Duration,
    /// The configuration op counts of the start.
    pub counts: PresetupCounts,
}

/// The profile's `name`, read from the file.
pub fn profile_name(profile: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(profile)
        .map_err(|e| format!("read the sim profile {}: {e}", profile.display()))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| format!("the sim profile {} is not JSON: {e}", profile.display()))?;
    json["name"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("the sim profile {} has no `name`", profile.display()))
}

/// Run `scenario` once. A scenario whose device does not work (no frames,
/// presetup refused, no start measured) is an `Err`, never a figure.
pub fn run(scenario: &NetScenario) -> Result<NetMeasurement, String> {
    catch_panic(|| run_once(scenario)).and_then(|result| result)
}

fn run_once(scenario: &NetScenario) -> Result<NetMeasurement, String> {
    let pairs = usize::from(scenario.queue_pairs);
    let mut options = NetRigOptions::new(&format!("sim:{}", scenario.profile.display()), pairs);
    options.ram_size = scenario.memory_mib << 20;
    options.protocol = VhostUserProtocolFeatures::MTU;
    let mut rig = NetRig::connect(&options, |_| {});
    if scenario.presetup {
        // What an orchestrator relays from the source: the guest's
        // features too (this front-end acks the same ones on every run).
        let early = early_config_with(
            scenario.queue_pairs,
            scenario.mtu.unwrap_or(1500),
            rig.frontend.features,
        );
        ctl(&rig.control(), "presetup", &early).map_err(|e| format!("presetup: {e}"))?;
    }

    let started = Instant::now();
    if let Some(mtu) = scenario.mtu {
        rig.set_mtu(mtu)?;
    }
    rig.start_device();
    let mut sent = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        let rx = rig.post_rx(pair, 1, 2048);
        let frame = udp_frame(1000 + pair as u16, 9, 200);
        rig.queue_tx(pair, &frame);
        rig.kick_tx(pair);
        sent.push((rx[0].1, frame));
    }
    for pair in 0..pairs {
        rig.used(2 * pair, 1);
    }
    let frontend_start = started.elapsed();

    for (pair, (addr, frame)) in sent.iter().enumerate() {
        if rig.read(addr + HDR as u64, frame.len()) != *frame {
            return Err(format!("pair {pair}: the frame came back changed"));
        }
    }
    let metrics = rig.metrics();
    if metrics["starts"] != 1 {
        return Err(format!("expected one start, the agent counted {metrics}"));
    }
    let critical_path = metrics["start-critical-path-us"]
        .as_u64()
        .map(Duration::from_micros)
        .ok_or_else(|| format!("no start critical path in {metrics}"))?;
    let counts = PresetupCounts::from_json(&metrics["presetup"])?;
    let expected_hits = u64::from(scenario.presetup);
    if counts.hits != expected_hits || counts.fallbacks != 0 {
        return Err(format!(
            "presetup {}: {} hit(s) and {} fallback(s)",
            if scenario.presetup { "on" } else { "off" },
            counts.hits,
            counts.fallbacks
        ));
    }
    Ok(NetMeasurement {
        critical_path,
        frontend_start,
        counts,
    })
}
