//! `vhost-agent demo`: the main job on an embedded default, on any Linux
//! machine, in a few seconds, with nothing installed. Two agents run in
//! this process, each serving a disk (100 ms of storage latency, the API
//! write fence) on one scratch image and a net device on the built-in
//! `vdpa-191ms` cost profile (a simulated vDPA NIC: 40 ms per virtqueue
//! created). The built-in front-end plays the guest and both QEMUs.
//!
//! The guest migrates twice, with 32 disk requests in flight each time:
//!
//! 1. A -> B, as QEMU 10 does it: GET_VRING_BASE drains the disk (every
//!    request finishes on storage before the source's reply) and the
//!    destination configures every device in full at the switchover;
//! 2. B -> A, the way this project is built for: the disk's source
//!    suspends (the requests move in the inflight region, the destination
//!    resubmits them behind the write fence) and presetup gave the
//!    destination its configuration before the stop. A is restarted
//!    first: an agent keeps a device's heavy configuration for its next
//!    front-end, and the comparison wants a fresh destination.
//!
//! It prints the two timelines side by side (the source's stop, the
//! destination's critical path, the heavy ops the start executed) and
//! `demo: PASS` only if every check held: each request completed exactly
//! once with its data verified, frames flowed on every pair after each
//! migration, and the handoff and presetup did what they claim.

mod agents;
mod guest;
mod migration;
mod report;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use vhost_agent_frontend::bench::catch_panic;
use vhost_agent_frontend::TestFrontend;

use self::agents::Agent;
use self::guest::{NetGuest, StopKind};
use self::migration::{Outcome, Plan, Running};

/// Options of the demo.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Disk requests in flight at each stop (1..=64).
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Storage latency of the disk in ms (the agents' latency-ms=).
    #[arg(long, default_value_t = 100)]
    latency_ms: u64,
    /// Also write both timelines as JSON into DIR (demo.json).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Size of the scratch image.
const IMAGE_SIZE: u64 = 64 << 20;

/// Run the demo (module docs).
pub fn run(args: DemoArgs) -> Result<()> {
    if !(1..=64).contains(&args.in_flight) {
        bail!("--in-flight must be 1..=64");
    }
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let image = dir.path().join("disk.img");
    let file = std::fs::File::create(&image).context("creating the scratch image")?;
    file.set_len(IMAGE_SIZE)
        .context("sizing the scratch image")?;
    guest::fill_image(&image, 2 * args.in_flight as u64).context("filling the image")?;
    let profile = dir.path().join("vdpa-191ms.json");
    std::fs::write(&profile, netdev::sim::VDPA_191MS_PROFILE).context("writing the profile")?;
    println!(
        "demo: two agents in this process (A, B), each serving disk0 ({} ms storage latency, fence=api) \
         on one image and net0 ({} queue pairs on the sim dataplane with the vdpa-191ms profile, a \
         simulated vDPA NIC); the built-in front-end plays the guest and both QEMUs",
        args.latency_ms,
        agents::QUEUE_PAIRS
    );
    let start = |name| Agent::start(name, dir.path(), &image, args.latency_ms, &profile);
    let mut a = start("A")?;
    let b = start("B")?;
    let mut net_guest = NetGuest::default();
    let result = catch_panic(|| -> Result<Vec<Outcome>, String> {
        let running = Running {
            disk: TestFrontend::start(&a.disk_socket, &guest::disk_options(StopKind::Drain)),
            net: TestFrontend::start(&a.net_socket, &guest::net_options()),
        };
        let first = Plan {
            from: &a,
            to: &b,
            destination_stop: StopKind::Suspend,
            presetup: false,
            in_flight: args.in_flight,
            first_block: 0,
            tag: 1,
        };
        let (running, one) =
            migration::migrate(&first, running, StopKind::Drain, &image, &mut net_guest, 1)?;
        println!("demo: migration 1 (A -> B, drain and full configuration) done");
        // An agent keeps a device's heavy configuration (its dataplane
        // queues, I/O rings) for the next front-end: A, the source of the
        // first migration, would need no queue creation at all. A fresh
        // A is the destination a migration usually meets.
        a.stop();
        a = start("A").map_err(|e| format!("restarting agent A: {e:#}"))?;
        println!("demo: agent A restarted, a fresh destination");
        let second = Plan {
            from: &b,
            to: &a,
            destination_stop: StopKind::Suspend,
            presetup: true,
            in_flight: args.in_flight,
            first_block: args.in_flight as u64,
            tag: 2,
        };
        let (running, two) = migration::migrate(
            &second,
            running,
            StopKind::Suspend,
            &image,
            &mut net_guest,
            2,
        )?;
        println!("demo: migration 2 (B -> A, handoff and presetup) done");
        drop(running);
        Ok(vec![one, two])
    });
    let outcomes = match result {
        Ok(Ok(outcomes)) => outcomes,
        Ok(Err(e)) | Err(e) => {
            println!("demo: FAIL: {e}");
            bail!("the demo failed");
        }
    };
    report::print(&outcomes, args.in_flight);
    if let Some(out) = &args.out {
        report::write_json(out, &outcomes)?;
    }
    let checks = report::checks(&outcomes, args.in_flight);
    let failed = checks.iter().filter(|(_, result)| result.is_err()).count();
    for (what, result) in &checks {
        match result {
            Ok(()) => println!("check: {what}: ok"),
            Err(why) => println!("check: {what}: FAILED: {why}"),
        }
    }
    if failed > 0 {
        println!("demo: FAIL ({failed} of {} checks failed)", checks.len());
        bail!("the demo failed");
    }
    println!("demo: PASS");
    Ok(())
}
