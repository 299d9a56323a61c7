//! The steps of one migration, in order (see the module docs of
//! [`super`]), and the way back when one fails: until QEMU reports the
//! migration completed, a failure cancels it and makes sure the source
//! runs again.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::agents::{device_argument, AgentClient, AgentDevice, MetricsSample};
use super::clock::Reference;
use super::error::{Failure, MigrateError, VmWhereabouts};
use super::mapping::{map_devices, unix_chardevs, MappedDevice};
use super::qmp::{Qmp, QmpEvent};
use super::timeline::{self, FenceRelease, Observed, Timeline};
use super::{MigrateOptions, Side};

/// Run states from which a QEMU never becomes `inmigrate`.
const SETTLED_STATES: [&str; 8] = [
    "running",
    "paused",
    "postmigrate",
    "suspended",
    "shutdown",
    "guest-panicked",
    "internal-error",
    "io-error",
];

/// How often run states, `query-migrate` and fences are polled.
const POLL: Duration = Duration::from_millis(20);
/// How long the destination agent may take to report its rings running
/// once the destination QEMU runs (it has sent every start message then).
const RINGS_GRACE: Duration = Duration::from_secs(5);

/// `query-status` → the run state.
fn run_state(qmp: &mut Qmp, side: Side) -> Result<String, MigrateError> {
    let status = qmp
        .execute("query-status", None)
        .map_err(MigrateError::qmp(side, "query-status"))?;
    Ok(status["status"].as_str().unwrap_or("unknown").to_string())
}

/// The orchestrator's connections and what it learnt so far.
pub struct Orchestrator<'a> {
    options: &'a MigrateOptions,
    progress: &'a mut dyn FnMut(&str),
    source_qmp: Qmp,
    destination_qmp: Qmp,
    source_agent: AgentClient,
    destination_agent: AgentClient,
    /// The source's run state before anything was done.
    initial_state: String,
    devices: Vec<MappedDevice>,
    source_events: Vec<QmpEvent>,
    destination_events: Vec<QmpEvent>,
}

impl<'a> Orchestrator<'a> {
    /// Connect to both QEMUs and both agents and check the source VM can
    /// be migrated. Nothing is changed anywhere.
    pub fn connect(
        options: &'a MigrateOptions,
        progress: &'a mut dyn FnMut(&str),
    ) -> Result<Orchestrator<'a>, MigrateError> {
        let timeout = options.request_timeout;
        let mut source_qmp = Qmp::connect(&options.source_qmp, timeout)
            .map_err(MigrateError::qmp(Side::Source, "connect"))?;
        let destination_qmp = Qmp::connect(&options.destination_qmp, timeout)
            .map_err(MigrateError::qmp(Side::Destination, "connect"))?;
        let initial_state = run_state(&mut source_qmp, Side::Source)?;
        if initial_state != "running" && initial_state != "paused" {
            return Err(MigrateError::SourceNotRunning(initial_state));
        }
        let source_agent = AgentClient::new(&options.source_agent, timeout);
        let destination_agent = AgentClient::new(&options.destination_agent, timeout);
        Ok(Orchestrator {
            options,
            progress,
            source_qmp,
            destination_qmp,
            source_agent,
            destination_agent,
            initial_state,
            devices: Vec::new(),
            source_events: Vec::new(),
            destination_events: Vec::new(),
        })
    }

    fn say(&mut self, line: &str) {
        (self.progress)(line);
    }

    /// Where the VM is, for a failure before `migrate` was sent.
    pub fn untouched(&mut self) -> VmWhereabouts {
        match run_state(&mut self.source_qmp, Side::Source) {
            Ok(state) => VmWhereabouts::Source(state),
            Err(e) => VmWhereabouts::Unknown(crate::error_chain(&e)),
        }
    }

    /// Steps 1 and 2: wait for the destination to be `inmigrate`, map the
    /// devices, and (unless `--no-presetup`) relay each device's
    /// `query-config` from the source agent to `presetup` on the
    /// destination agent.
    pub fn prepare(&mut self) -> Result<(), MigrateError> {
        let started = Instant::now();
        loop {
            let state = run_state(&mut self.destination_qmp, Side::Destination)?;
            if state == "inmigrate" {
                break;
            }
            // A QEMU that runs a guest (or ran one) will never receive
            // this migration: the wrong socket, or no -incoming.
            if SETTLED_STATES.contains(&state.as_str()) || started.elapsed() >= self.options.timeout
            {
                return Err(MigrateError::DestinationNotIncoming {
                    state,
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(POLL);
        }
        self.say(&format!(
            "source QEMU {}, destination QEMU inmigrate",
            self.initial_state
        ));
        let source_devices = self
            .source_agent
            .devices()
            .map_err(MigrateError::agent(Side::Source, "query-devices"))?;
        let destination_devices = self
            .destination_agent
            .devices()
            .map_err(MigrateError::agent(Side::Destination, "query-devices"))?;
        let chardevs = |qmp: &mut Qmp, side: Side| -> Result<_, MigrateError> {
            let reply = qmp
                .execute("query-chardev", None)
                .map_err(MigrateError::qmp(side, "query-chardev"))?;
            unix_chardevs(side, &reply).map_err(MigrateError::mapping)
        };
        let source_chardevs = chardevs(&mut self.source_qmp, Side::Source)?;
        let destination_chardevs = chardevs(&mut self.destination_qmp, Side::Destination)?;
        self.devices = map_devices(
            &self.options.devices,
            &source_devices,
            &destination_devices,
            &source_chardevs,
            &destination_chardevs,
        )
        .map_err(MigrateError::mapping)?;
        for index in 0..self.devices.len() {
            let device = self.devices[index].clone();
            let chardev = device.chardev.as_deref().unwrap_or("?");
            self.say(&format!(
                "device {} -> {} ({}, chardev {chardev})",
                device.source.id, device.destination.id, device.source.kind
            ));
            if !self.options.presetup {
                continue;
            }
            let config = self
                .source_agent
                .config(&device.source.id)
                .map_err(MigrateError::agent(Side::Source, "query-config"))?;
            let arguments = json!({ "device": device.destination.id, "config": config });
            let done = self
                .destination_agent
                .execute("presetup", Some(arguments))
                .map_err(|source| MigrateError::Presetup {
                    source_id: device.source.id.clone(),
                    destination_id: device.destination.id.clone(),
                    source: Box::new(source),
                })?;
            self.say(&format!(
                "presetup of {} on the destination: {done}",
                device.destination.id
            ));
        }
        Ok(())
    }

    /// Ask both QEMUs for MIGRATION events and set the source's bandwidth
    /// cap, if asked. A QEMU that refuses the events is followed by
    /// polling `query-migrate` alone.
    fn set_up_qemu(&mut self) -> Result<(), MigrateError> {
        let events = json!({ "capabilities": [{ "capability": "events", "state": true }] });
        for side in [Side::Source, Side::Destination] {
            let qmp = match side {
                Side::Source => &mut self.source_qmp,
                Side::Destination => &mut self.destination_qmp,
            };
            if let Err(e) = qmp.execute("migrate-set-capabilities", Some(events.clone())) {
                let line = format!(
                    "the {side} QEMU gives no MIGRATION events ({}); following query-migrate",
                    crate::error_chain(&e)
                );
                self.say(&line);
            }
        }
        if let Some(bandwidth) = self.options.max_bandwidth {
            self.source_qmp
                .execute(
                    "migrate-set-parameters",
                    Some(json!({ "max-bandwidth": bandwidth })),
                )
                .map_err(MigrateError::qmp(Side::Source, "migrate-set-parameters"))?;
        }
        Ok(())
    }

    fn collect_events(&mut self) {
        for event in self.source_qmp.take_events() {
            (self.progress)(&describe(Side::Source, &event));
            self.source_events.push(event);
        }
        for event in self.destination_qmp.take_events() {
            (self.progress)(&describe(Side::Destination, &event));
            self.destination_events.push(event);
        }
    }

    fn sample(&self, side: Side) -> Result<MetricsSample, MigrateError> {
        let agent = match side {
            Side::Source => &self.source_agent,
            Side::Destination => &self.destination_agent,
        };
        agent
            .sample_metrics()
            .map_err(MigrateError::agent(side, "query-metrics"))
    }

    /// Steps 3 to 5: `migrate`, follow it to completion, release the
    /// fences, and build the timeline. A failure before completion is
    /// rolled back (the source runs on).
    pub fn migrate(mut self) -> Result<Timeline, Failure> {
        let before = match self.before_migrate() {
            Ok(before) => before,
            Err(error) => {
                let vm = self.untouched();
                return Err(Failure::new(error, vm));
            }
        };
        let zero = Instant::now();
        let reference = Reference::new(zero);
        let uri = self.options.uri.clone();
        if let Err(source) = self
            .source_qmp
            .execute("migrate", Some(json!({ "uri": uri })))
        {
            let vm = self.untouched();
            let error = MigrateError::Qmp {
                side: Side::Source,
                step: "migrate",
                source,
            };
            return Err(Failure::new(error, vm));
        }
        self.say(&format!("migrate {uri} sent"));
        let (query_migrate, completed_seen) = match self.follow() {
            Ok(done) => done,
            Err(error) => {
                let vm = self.roll_back();
                return Err(Failure::new(error, vm));
            }
        };
        match self.finish(&before, reference, &query_migrate, completed_seen) {
            Ok(timeline) => Ok(timeline),
            Err(error) => Err(Failure::new(error, VmWhereabouts::Destination)),
        }
    }

    /// QEMU set up, events before `migrate` dropped, both agents sampled.
    fn before_migrate(&mut self) -> Result<[MetricsSample; 2], MigrateError> {
        self.set_up_qemu()?;
        let samples = [self.sample(Side::Source)?, self.sample(Side::Destination)?];
        let _ = self.source_qmp.take_events();
        let _ = self.destination_qmp.take_events();
        Ok(samples)
    }

    /// Follow the migration until the source's `query-migrate` shows it
    /// completed and the destination runs.
    fn follow(&mut self) -> Result<(Value, Instant), MigrateError> {
        let deadline = Instant::now() + self.options.timeout;
        let mut last_status = String::new();
        // A destination QEMU that goes away fails the migration on the
        // source, whose query-migrate says so: it stays the authority.
        let mut destination_lost = None;
        let (info, completed_seen) = loop {
            self.source_qmp
                .wait_events(POLL)
                .map_err(MigrateError::qmp(Side::Source, "following the migration"))?;
            if destination_lost.is_none() {
                if let Err(e) = self.destination_qmp.wait_events(Duration::ZERO) {
                    self.say(&format!(
                        "lost the destination QEMU: {}",
                        crate::error_chain(&e)
                    ));
                    destination_lost = Some(e);
                }
            }
            self.collect_events();
            let info = self
                .source_qmp
                .execute("query-migrate", None)
                .map_err(MigrateError::qmp(Side::Source, "query-migrate"))?;
            let status = info["status"].as_str().unwrap_or("none").to_string();
            match status.as_str() {
                "completed" => break (info, Instant::now()),
                "failed" | "cancelled" => {
                    return Err(MigrateError::MigrationFailed {
                        desc: info["error-desc"]
                            .as_str()
                            .unwrap_or("no error-desc")
                            .to_string(),
                        status,
                    })
                }
                _ => {}
            }
            if status != last_status {
                self.say(&format!("source query-migrate: {status}"));
                last_status = status;
            }
            if Instant::now() >= deadline {
                return Err(MigrateError::Timeout(self.options.timeout, last_status));
            }
        };
        if let Some(source) = destination_lost {
            return Err(MigrateError::Qmp {
                side: Side::Destination,
                step: "following the migration",
                source,
            });
        }
        loop {
            let state = run_state(&mut self.destination_qmp, Side::Destination)?;
            self.collect_events();
            // A paused source arrives paused; a running one must run.
            let arrived = match self.initial_state.as_str() {
                "running" => state == "running",
                _ => state == "running" || state == "paused",
            };
            if arrived {
                self.say(&format!("migration completed; the destination is {state}"));
                break;
            }
            if Instant::now() >= deadline {
                return Err(MigrateError::DestinationNotRunning(state));
            }
            std::thread::sleep(POLL);
        }
        Ok((info, completed_seen))
    }

    /// A failure during the migration: cancel it, wait for the source
    /// to settle, and make sure it runs if it ran before.
    fn roll_back(&mut self) -> VmWhereabouts {
        let _ = self.source_qmp.execute("migrate_cancel", None);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self
                .source_qmp
                .execute("query-migrate", None)
                .map(|info| info["status"].as_str().unwrap_or("none").to_string());
            match status.as_deref() {
                Ok("completed") => return VmWhereabouts::Destination,
                Ok("cancelling" | "active" | "device" | "setup" | "pre-switchover")
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(POLL);
                }
                Ok(_) => break,
                Err(e) => return VmWhereabouts::Unknown(crate::error_chain(e)),
            }
        }
        let state = match run_state(&mut self.source_qmp, Side::Source) {
            Ok(state) => state,
            Err(e) => return VmWhereabouts::Unknown(crate::error_chain(&e)),
        };
        if state != "running" && self.initial_state == "running" {
            let _ = self.source_qmp.execute("cont", None);
            return self.untouched();
        }
        VmWhereabouts::Source(state)
    }

    /// Step 4 and 5, after completion: release `fence=api` disks once the
    /// source has no abandoned writes, wait for the destination's rings,
    /// sample both agents and build the timeline.
    fn finish(
        &mut self,
        before: &[MetricsSample; 2],
        reference: Reference,
        query_migrate: &Value,
        completed_seen: Instant,
    ) -> Result<Timeline, MigrateError> {
        let fences = self.release_fences()?;
        let destination_after = self.wait_destination_rings(&before[1])?;
        let source_after = self.sample(Side::Source)?;
        self.collect_events();
        let observed = Observed {
            reference,
            uri: &self.options.uri,
            presetup: self.options.presetup,
            devices: &self.devices,
            source_metrics: [&before[0], &source_after],
            destination_metrics: [&before[1], &destination_after],
            source_events: &self.source_events,
            destination_events: &self.destination_events,
            query_migrate,
            completed_seen,
            fences: &fences,
        };
        Ok(timeline::build(&observed))
    }

    fn release_fences(&mut self) -> Result<Vec<FenceRelease>, MigrateError> {
        let disks: Vec<MappedDevice> = self
            .devices
            .iter()
            .filter(|device| device.destination.fence_mode.as_deref() == Some("api"))
            .cloned()
            .collect();
        let mut released = Vec::new();
        for disk in disks {
            let started = Instant::now();
            loop {
                let devices = self
                    .source_agent
                    .devices()
                    .map_err(MigrateError::agent(Side::Source, "query-devices"))?;
                let outstanding = devices
                    .iter()
                    .find(|device: &&AgentDevice| device.id == disk.source.id)
                    .and_then(|device| device.abandoned_outstanding)
                    .unwrap_or(0);
                if outstanding == 0 {
                    break;
                }
                if started.elapsed() >= self.options.timeout {
                    return Err(MigrateError::FenceTimeout {
                        device: disk.source.id.clone(),
                        outstanding,
                        waited: started.elapsed(),
                    });
                }
                std::thread::sleep(POLL);
            }
            self.destination_agent
                .execute("fence-release", Some(device_argument(&disk.destination.id)))
                .map_err(MigrateError::agent(Side::Destination, "fence-release"))?;
            self.say(&format!(
                "write fence of {} released (the source had no abandoned writes after {:.1} ms)",
                disk.destination.id,
                started.elapsed().as_secs_f64() * 1e3
            ));
            released.push(FenceRelease {
                device: disk.destination.id.clone(),
                released: Instant::now(),
            });
        }
        Ok(released)
    }

    /// The destination agent's metrics once every mapped device completed
    /// a start (or after [`RINGS_GRACE`], when the timeline will show the
    /// ones that did not).
    fn wait_destination_rings(
        &mut self,
        before: &MetricsSample,
    ) -> Result<MetricsSample, MigrateError> {
        let deadline = Instant::now() + RINGS_GRACE;
        loop {
            let sample = self.sample(Side::Destination)?;
            let all_started = self.devices.iter().all(|device| {
                let starts = |sample: &MetricsSample| {
                    sample
                        .device(&device.destination.id)
                        .and_then(|report| report["starts"].as_u64())
                };
                starts(&sample) > starts(before)
            });
            if all_started || Instant::now() >= deadline {
                if !all_started {
                    self.say("not every destination device reported a start");
                }
                return Ok(sample);
            }
            std::thread::sleep(POLL);
        }
    }
}

/// A progress line for a QMP event.
fn describe(side: Side, event: &QmpEvent) -> String {
    match event.status() {
        Some(status) => format!("{side} QEMU event {} ({status})", event.name),
        None => format!("{side} QEMU event {}", event.name),
    }
}
