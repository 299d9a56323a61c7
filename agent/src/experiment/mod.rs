//! `vhost-agent experiment`, the presetup and downtime experiment:
//! scenario matrices run against agents spawned from this very binary
//! with the test front-end (the `vhost-agent-frontend` crate), their
//! results written as CSV and JSON, drawn as SVG charts and summarised as
//! Markdown tables.
//!
//! - [`net`]: the destination start of a `sim` net device with and without
//!   `presetup`, per cost profile, queue-pair count and guest RAM size.
//! - [`blk`]: the source stop of a disk with requests in flight, draining
//!   versus suspending, per in-flight count and storage latency.
//! - [`report`]: rows, medians, CSV, JSON and the summary tables.
//! - [`chart`]: the SVG bar charts.
//! - [`cli`]: the command line (`vhost-agent experiment --help`).
//!
//! An experiment judges nothing; it measures and reports. The figures of
//! the net part come from the `sim` dataplane's cost model, not hardware.

pub mod blk;
pub mod chart;
pub mod cli;
pub mod net;
pub mod report;

use std::time::Duration;

use vhost_agent_frontend::blk_stop::StopMode;

use self::blk::{BlkAgents, BlkMeasurement, BlkScenario};
use self::net::{NetMeasurement, NetScenario};

/// The net part of the matrix: every combination is one scenario.
#[derive(Clone, Debug)]
pub struct NetMatrix {
    /// Sim profiles: (path, name).
    pub profiles: Vec<(std::path::PathBuf, String)>,
    /// Queue pair counts.
    pub queue_pairs: Vec<u16>,
    /// Guest RAM sizes in MiB.
    pub memory_mib: Vec<u64>,
    /// NET_SET_MTU at the start of every net scenario, if any.
    pub mtu: Option<u16>,
}

/// The blk part of the matrix.
#[derive(Clone, Debug)]
pub struct BlkMatrix {
    /// Requests in flight at the stop.
    pub in_flight: Vec<usize>,
    /// Storage latencies in ms.
    pub latency_ms: Vec<u64>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Matrix {
    /// The net scenarios, if any.
    pub net: Option<NetMatrix>,
    /// The blk scenarios, if any.
    pub blk: Option<BlkMatrix>,
    /// Repetitions of every scenario.
    pub reps: usize,
}

/// One point of the matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A net destination start.
    Net(NetScenario),
    /// A blk source stop.
    Blk(BlkScenario),
}

impl Scenario {
    /// A one-line description (no commas).
    pub fn describe(&self) -> String {
        match self {
            Scenario::Net(net) => net.describe(),
            Scenario::Blk(blk) => blk.describe(),
        }
    }

    /// `net` or `blk`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scenario::Net(_) => "net",
            Scenario::Blk(_) => "blk",
        }
    }
}

/// What one repetition of a scenario measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measurement {
    /// A net start.
    Net(NetMeasurement),
    /// A blk stop.
    Blk(BlkMeasurement),
}

/// One repetition of one scenario.
#[derive(Clone, Debug)]
pub struct Record {
    /// The scenario.
    pub scenario: Scenario,
    /// Repetition number, from 1.
    pub rep: usize,
    /// The figures, or why the scenario did not work.
    pub outcome: Result<Measurement, String>,
}

impl Matrix {
    /// Every scenario, in run order: net before blk; blk grouped by
    /// latency so one agent serves each latency.
    pub fn scenarios(&self) -> Vec<Scenario> {
        let mut scenarios = Vec::new();
        if let Some(net) = &self.net {
            for (profile, profile_name) in &net.profiles {
                for &queue_pairs in &net.queue_pairs {
                    for &memory_mib in &net.memory_mib {
                        for presetup in [false, true] {
                            scenarios.push(Scenario::Net(NetScenario {
                                profile: profile.clone(),
                                profile_name: profile_name.clone(),
                                queue_pairs,
                                memory_mib,
                                presetup,
                                mtu: net.mtu,
                            }));
                        }
                    }
                }
            }
        }
        if let Some(blk) = &self.blk {
            for &latency_ms in &blk.latency_ms {
                for &in_flight in &blk.in_flight {
                    for mode in StopMode::ALL {
                        scenarios.push(Scenario::Blk(BlkScenario {
                            in_flight,
                            latency_ms,
                            mode,
                        }));
                    }
                }
            }
        }
        scenarios
    }
}

/// Run every scenario `matrix.reps` times; `progress(index, total,
/// records)` is called after each scenario with its records.
pub fn run(matrix: &Matrix, mut progress: impl FnMut(usize, usize, &[Record])) -> Vec<Record> {
    let scenarios = matrix.scenarios();
    let mut blk_agents = BlkAgents::default();
    let mut records = Vec::with_capacity(scenarios.len() * matrix.reps);
    for (index, scenario) in scenarios.iter().enumerate() {
        let first = records.len();
        for rep in 1..=matrix.reps {
            let outcome = match scenario {
                Scenario::Net(net) => net::run(net).map(Measurement::Net),
                Scenario::Blk(blk) => blk_agents.run(blk).map(Measurement::Blk),
            };
            records.push(Record {
                scenario: scenario.clone(),
                rep,
                outcome,
            });
        }
        progress(index + 1, scenarios.len(), &records[first..]);
    }
    records
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
