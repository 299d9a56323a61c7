//! One migration of the demo's guest between the two agents, with the
//! built-in front-end standing in for both QEMUs and the demo doing what
//! `vhost-agent migrate` does around QEMU: the destination front-end
//! connects and negotiates, presetup is relayed (when asked), both
//! agents' metrics are sampled, the source stops (GET_VRING_BASE on every
//! ring), the inflight region moves, the destination starts from the
//! source's bases, the `fence=api` disk is released once the source has
//! no abandoned writes, and the timeline is built as `migrate` builds it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use vhost::VhostBackend;
use vhost_agent::migrate::agents::{device_argument, AgentClient, MetricsSample};
use vhost_agent::migrate::clock::Reference;
use vhost_agent::migrate::mapping::MappedDevice;
use vhost_agent::migrate::timeline::{self, FenceRelease, Observed, Timeline};
use vhost_agent_frontend::{wait_until, Inflight, StopRequest, TestFrontend};

use super::agents::Agent;
use super::guest::{self, Batch, NetGuest, StopKind};

/// How long any control request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest as it runs on one side: its front-ends.
pub struct Running {
    /// The disk's front-end.
    pub disk: TestFrontend,
    /// The net device's front-end.
    pub net: TestFrontend,
}

/// What one migration is asked to do.
pub struct Plan<'a> {
    /// Where the guest runs.
    pub from: &'a Agent,
    /// Where it goes.
    pub to: &'a Agent,
    /// How the destination's disk front-end will stop, later.
    pub destination_stop: StopKind,
    /// Relay presetup.
    pub presetup: bool,
    /// Requests in flight at the stop.
    pub in_flight: usize,
    /// First block (and buffer slot) of this migration's requests.
    pub first_block: u64,
    /// Tag of this migration's writes.
    pub tag: u64,
}

/// What one migration gave.
pub struct Outcome {
    /// Relayed presetup.
    pub presetup: bool,
    /// How the source's disk stopped.
    pub source_stop: StopKind,
    /// The timeline, as `vhost-agent migrate` builds it.
    pub timeline: Timeline,
    /// Checks that held or did not, in order.
    pub checks: Vec<(String, Result<(), String>)>,
}

/// Devices `disk0` and `net0` on both agents.
fn mapped(from: &AgentClient, to: &AgentClient) -> Result<Vec<MappedDevice>, String> {
    let source = from.devices().map_err(|e| vhost_agent::error_chain(&e))?;
    let destination = to.devices().map_err(|e| vhost_agent::error_chain(&e))?;
    ["disk0", "net0"]
        .iter()
        .map(|id| {
            let find = |devices: &[vhost_agent::migrate::agents::AgentDevice]| {
                devices.iter().find(|device| device.id == *id).cloned()
            };
            match (find(&source), find(&destination)) {
                (Some(source), Some(destination)) => Ok(MappedDevice {
                    source,
                    destination,
                    chardev: None,
                }),
                _ => Err(format!("{id} is not served by both agents")),
            }
        })
        .collect()
}

fn sample(agent: &AgentClient) -> Result<MetricsSample, String> {
    agent
        .sample_metrics()
        .map_err(|e| vhost_agent::error_chain(&e))
}

/// Migrate `running` (whose disk stops as `source_stop` says) per `plan`
/// (module docs); the guest on the destination and what it gave.
pub fn migrate(
    plan: &Plan<'_>,
    mut running: Running,
    source_stop: StopKind,
    image: &Path,
    net_guest: &mut NetGuest,
    round: u8,
) -> Result<(Running, Outcome), String> {
    let mut checks = Vec::new();
    let source = AgentClient::new(&plan.from.control_socket, CONTROL_TIMEOUT);
    let destination = AgentClient::new(&plan.to.control_socket, CONTROL_TIMEOUT);
    let devices = mapped(&source, &destination)?;
    // The destination QEMU starts: its front-ends connect and negotiate.
    let mut disk = TestFrontend::attach(
        &plan.to.disk_socket,
        &guest::disk_options(plan.destination_stop),
        &running.disk,
    );
    let mut net = TestFrontend::attach(&plan.to.net_socket, &guest::net_options(), &running.net);
    if plan.presetup {
        for device in &devices {
            let config = source
                .config(&device.source.id)
                .map_err(|e| vhost_agent::error_chain(&e))?;
            destination
                .execute(
                    "presetup",
                    Some(json!({"device": device.destination.id, "config": config})),
                )
                .map_err(|e| vhost_agent::error_chain(&e))?;
        }
    }
    let before = [sample(&source)?, sample(&destination)?];
    let reference = Reference::new(Instant::now());
    // The guest keeps working: frames on its net, then requests on its
    // disk, in flight (taken by the source agent) right up to the stop.
    net_guest.frames_flow(&mut running.net, round)?;
    let batch: Batch = guest::requests_in_flight(
        &mut running.disk,
        plan.first_block,
        plan.in_flight,
        plan.tag,
    )?;
    // The switchover: stop every ring of the source, move the region and
    // the guest (its memory, with its driver's place in each ring), start
    // the destination from the source's bases.
    let disk_stopped = running.disk.stop(StopRequest::GetVringBase);
    let mut net_bases = Vec::new();
    for queue in 0..running.net.queues.len() {
        let base = running
            .net
            .frontend
            .get_vring_base(queue)
            .map_err(|e| format!("net GET_VRING_BASE: {e}"))?;
        net_bases.push(u16::try_from(base).map_err(|_| format!("net base {base:#x}"))?);
    }
    disk.follow_driver(&running.disk);
    net.follow_driver(&running.net);
    let region = running.disk.region().migrate();
    disk.start_device(Inflight::Set(region), &disk_stopped.bases);
    net.start_device(Inflight::None, &net_bases);
    let started = Instant::now();
    // The write fence: once the source has no abandoned writes.
    let abandoned = |agent: &AgentClient| -> u64 {
        agent
            .devices()
            .ok()
            .and_then(|devices| devices.into_iter().find(|d| d.id == "disk0"))
            .and_then(|disk| disk.abandoned_outstanding)
            .unwrap_or(u64::MAX)
    };
    if !wait_until(Duration::from_secs(30), || abandoned(&source) == 0) {
        return Err("the source's abandoned writes never finished".to_string());
    }
    destination
        .execute("fence-release", Some(device_argument("disk0")))
        .map_err(|e| vhost_agent::error_chain(&e))?;
    let fences = [FenceRelease {
        device: "disk0".to_string(),
        released: Instant::now(),
    }];
    // The guest on the destination.
    let completed = guest::check_batch(&mut disk, &batch, image);
    checks.push((
        format!(
            "all {} requests in flight at the stop completed once, data verified",
            plan.in_flight
        ),
        completed.map(|_| ()),
    ));
    let frames = net_guest.frames_flow(&mut net, round.wrapping_add(100));
    checks.push((
        "frames flowed on every queue pair after the migration".to_string(),
        frames.map(|_| ()),
    ));
    let after = [sample(&source)?, sample(&destination)?];
    let observed = Observed {
        reference,
        uri: "built-in front-end",
        presetup: plan.presetup,
        devices: &devices,
        source_metrics: [&before[0], &after[0]],
        destination_metrics: [&before[1], &after[1]],
        source_events: &[],
        destination_events: &[],
        query_migrate: &json!({}),
        completed_seen: started,
        fences: &fences,
    };
    let timeline = timeline::build(&observed);
    Ok((
        Running { disk, net },
        Outcome {
            presetup: plan.presetup,
            source_stop,
            timeline,
            checks,
        },
    ))
}
