//! The `sim` dataplane's cost model: a hardware NIC (vDPA-like) whose
//! configuration operations take time. Frames move as with `loop`; only the
//! configuration is slow, by what a JSON profile says. This is a simulation
//! for downtime experiments and is named as one wherever it is used.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A configuration operation a hardware dataplane charges for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimOp {
    /// Create (start) one virtqueue on the hardware.
    CreateQueue,
    /// Destroy (stop) one virtqueue.
    DestroyQueue,
    /// Map (and pin) the guest memory table for DMA.
    MapMemory,
    /// Program the RSS key and indirection table.
    ProgramRss,
    /// Set the MTU.
    SetMtu,
    /// Negotiate features.
    SetFeatures,
}

impl SimOp {
    /// Every operation, for reports.
    pub const ALL: [SimOp; 6] = [
        SimOp::CreateQueue,
        SimOp::DestroyQueue,
        SimOp::MapMemory,
        SimOp::ProgramRss,
        SimOp::SetMtu,
        SimOp::SetFeatures,
    ];

    /// The JSON name.
    pub fn name(self) -> &'static str {
        match self {
            SimOp::CreateQueue => "create_queue",
            SimOp::DestroyQueue => "destroy_queue",
            SimOp::MapMemory => "map_memory",
            SimOp::ProgramRss => "program_rss",
            SimOp::SetMtu => "set_mtu",
            SimOp::SetFeatures => "set_features",
        }
    }
}

/// The shipped `profiles/vdpa-191ms.json` (a vDPA NIC whose `dev_conf`
/// costs 191.4 ms), built in so tools that need it (`vhost-agent demo`,
/// `vhost-agent experiment`) do not depend on the source checkout.
pub const VDPA_191MS_PROFILE: &str = include_str!("../profiles/vdpa-191ms.json");

/// A cost profile, as loaded from JSON:
/// `{"name": "...", "description": "...", "costs_us": {"create_queue": 45000, ...}}`.
/// Operations it does not name cost nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimProfile {
    /// Short name for logs and reports.
    pub name: String,
    /// Where the numbers come from.
    #[serde(default)]
    pub description: String,
    /// Microseconds per operation.
    pub costs_us: BTreeMap<SimOp, u64>,
}

/// A profile could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SimProfileError {
    /// The file could not be read.
    #[error("cannot read sim profile {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The JSON does not describe a profile.
    #[error("sim profile {path} is not valid")]
    Parse {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A cost beyond one minute is surely a typo.
    #[error("sim profile {path}: {op} costs {us} us, more than the 60 s limit")]
    TooSlow {
        /// The file.
        path: String,
        /// The operation.
        op: &'static str,
        /// Its cost.
        us: u64,
    },
}

impl SimProfile {
    /// Load and check a profile file.
    pub fn load(path: &Path) -> Result<SimProfile, SimProfileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SimProfileError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parse and check profile JSON; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<SimProfile, SimProfileError> {
        let profile: SimProfile =
            serde_json::from_str(text).map_err(|source| SimProfileError::Parse {
                path: origin.to_string(),
                source,
            })?;
        for (&op, &us) in &profile.costs_us {
            if us > 60_000_000 {
                return Err(SimProfileError::TooSlow {
                    path: origin.to_string(),
                    op: op.name(),
                    us,
                });
            }
        }
        Ok(profile)
    }

    /// What `op` costs.
    pub fn cost(&self, op: SimOp) -> Duration {
        Duration::from_micros(self.costs_us.get(&op).copied().unwrap_or(0))
    }
}

/// The simulated hardware: charges each operation its cost by waiting, and
/// keeps the totals.
#[derive(Debug)]
pub struct SimHardware {
    profile: SimProfile,
    charged: BTreeMap<SimOp, (u64, Duration)>,
}

impl SimHardware {
    /// Hardware that behaves as `profile` says.
    pub fn new(profile: SimProfile) -> SimHardware {
        SimHardware {
            profile,
            charged: BTreeMap::new(),
        }
    }

    /// The profile in use.
    pub fn profile(&self) -> &SimProfile {
        &self.profile
    }

    /// Perform `op`: wait its cost (a busy wait for the last 100 us, so
    /// short costs are not rounded up by the scheduler) and record it.
    pub fn charge(&mut self, op: SimOp) -> Duration {
        let cost = self.profile.cost(op);
        let started = Instant::now();
        if !cost.is_zero() {
            let coarse = cost.saturating_sub(Duration::from_micros(100));
            if !coarse.is_zero() {
                std::thread::sleep(coarse);
            }
            while started.elapsed() < cost {
                std::hint::spin_loop();
            }
        }
        let spent = started.elapsed();
        let entry = self.charged.entry(op).or_insert((0, Duration::ZERO));
        entry.0 += 1;
        entry.1 += spent;
        spent
    }

    /// Operations performed so far: count and time spent, per operation.
    pub fn charged(&self) -> &BTreeMap<SimOp, (u64, Duration)> {
        &self.charged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_parses_and_charges() {
        let profile = SimProfile::parse(
            r#"{"name": "t", "costs_us": {"create_queue": 2000, "set_mtu": 0}}"#,
            "test",
        )
        .unwrap();
        assert_eq!(profile.cost(SimOp::CreateQueue), Duration::from_millis(2));
        assert_eq!(profile.cost(SimOp::ProgramRss), Duration::ZERO);
        let mut hw = SimHardware::new(profile);
        let spent = hw.charge(SimOp::CreateQueue);
        assert!(spent >= Duration::from_millis(2), "{spent:?}");
        hw.charge(SimOp::CreateQueue);
        assert_eq!(hw.charged()[&SimOp::CreateQueue].0, 2);
    }

    #[test]
    fn bad_profiles_are_refused() {
        for bad in [
            "",
            "{}",
            r#"{"name": "t", "costs_us": {"warp_drive": 1}}"#,
            r#"{"name": "t", "costs_us": {"create_queue": -1}}"#,
            r#"{"name": "t", "costs_us": {}, "extra": 1}"#,
            r#"{"name": "t", "costs_us": {"create_queue": 600000000}}"#,
        ] {
            assert!(SimProfile::parse(bad, "test").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn shipped_profile_adds_up_to_the_seed_dev_conf() {
        // profiles/vdpa-191ms.json models the early-migration series'
        // vDPA dev_conf of 191.4 ms for one device with 2 queue pairs.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/vdpa-191ms.json");
        let profile = SimProfile::load(Path::new(path)).unwrap();
        let total = 4 * profile.cost(SimOp::CreateQueue)
            + profile.cost(SimOp::ProgramRss)
            + profile.cost(SimOp::SetMtu);
        assert_eq!(total, Duration::from_micros(191_400));
    }
}
