//! One blk scenario of the experiment: a source stopped with requests in
//! flight on storage of a given latency, draining or suspending (the
//! measuring code is [`vhost_agent_frontend::blk_stop`], shared with the `blk_stop`
//! benchmark).

use std::time::Duration;

use vhost_agent_frontend::bench::catch_panic;
use vhost_agent_frontend::blk_stop::{StopAgent, StopMode};

/// The parameters of one blk scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkScenario {
    /// Requests on the ring when the source stops.
    pub in_flight: usize,
    /// The agent's `latency-ms=`: each storage operation starts this late.
    pub latency_ms: u64,
    /// GET_VRING_BASE drains or suspends.
    pub mode: StopMode,
}

impl BlkScenario {
    /// A one-line description for progress and reports (no commas).
    pub fn describe(&self) -> String {
        format!(
            "blk in-flight={} latency={}ms {}",
            self.in_flight,
            self.latency_ms,
            self.mode.name()
        )
    }
}

/// What one run of a blk scenario measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkMeasurement {
    /// GET_VRING_BASE, send to reply, as the front-end saw it.
    pub stop: Duration,
    /// The agent's own `stop-time-us`.
    pub agent_stop: Option<Duration>,
    /// Requests not yet completed when GET_VRING_BASE was sent.
    pub in_flight_at_stop: usize,
}

/// The agents of the blk scenarios, one per storage latency, started when
/// first needed and replaced after a failure (its state is unknown then).
#[derive(Default)]
pub struct BlkAgents {
    current: Option<(u64, StopAgent)>,
}

impl BlkAgents {
    /// Run `scenario` once on an agent with its latency.
    pub fn run(&mut self, scenario: &BlkScenario) -> Result<BlkMeasurement, String> {
        let fits =
            matches!(&self.current, Some((latency_ms, _)) if *latency_ms == scenario.latency_ms);
        if !fits {
            // The old agent goes first: two agents would compete.
            self.current = None;
            let agent =
                catch_panic(|| StopAgent::start(scenario.latency_ms)).and_then(|result| result)?;
            self.current = Some((scenario.latency_ms, agent));
        }
        let (_, agent) = self
            .current
            .as_ref()
            .expect("an agent for this latency was started just above");
        let result = catch_panic(|| agent.measure(scenario.mode, scenario.in_flight))
            .and_then(|result| result);
        match result {
            Ok(sample) => Ok(BlkMeasurement {
                stop: sample.stop,
                agent_stop: sample.agent_stop,
                in_flight_at_stop: sample.in_flight,
            }),
            Err(e) => {
                self.current = None;
                Err(e)
            }
        }
    }
}
