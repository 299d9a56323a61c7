//! `vhost-agent migrate`: one live migration of a QEMU VM whose vhost-user
//! devices agents serve, with stock QEMU, and one timeline of it.
//!
//! In order:
//!
//! 1. connect to both QEMUs' QMP sockets, check the source VM runs (or is
//!    paused) and wait for the destination QEMU to be `inmigrate`;
//! 2. map the VM's devices to both agents' devices ([`mapping`]: by id,
//!    or through QEMU's character devices) and, unless presetup is off,
//!    relay each device's `query-config` from the source agent to
//!    `presetup` on the destination agent, so the destination does its
//!    heavy configuration before the VM stops;
//! 3. ask both QEMUs for MIGRATION events, sample both agents' metrics,
//!    send `migrate` and follow the QMP events (STOP, RESUME, MIGRATION)
//!    and `query-migrate` until the migration completed and the
//!    destination runs;
//! 4. for each `fence=api` disk, wait until the source agent shows no
//!    abandoned writes (`query-devices`) and `fence-release` it on the
//!    destination agent;
//! 5. sample both agents again and merge QEMU's `query-migrate`, the QMP
//!    events and both agents' timelines into one per-phase
//!    [`timeline::Timeline`] ([`clock`] says how the clocks are aligned).
//!
//! Any failure before QEMU reports the migration completed leaves the VM
//! on the source: nothing was changed before `migrate`, and after it the
//! migration is cancelled and the source resumed if it ran. The
//! [`error::Failure`] says where the VM is.
//!
//! [`qmp`] is the QMP client, [`agents`] the control-API side, `steps`
//! the sequence, [`render`] the text report.

pub mod agents;
pub mod clock;
pub mod error;
pub mod mapping;
pub mod qmp;
pub mod render;
mod steps;
pub mod timeline;
mod view;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use self::error::{Failure, MigrateError, VmWhereabouts};
pub use self::mapping::DevicePair;
use self::steps::Orchestrator;
pub use self::timeline::Timeline;

/// Which end of the migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Where the VM runs before.
    Source,
    /// Where it runs after.
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// What to migrate, and how.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// The source QEMU's QMP socket.
    pub source_qmp: PathBuf,
    /// The destination QEMU's QMP socket (a QEMU started with
    /// `-incoming URI`, listening).
    pub destination_qmp: PathBuf,
    /// The source agent's control socket.
    pub source_agent: PathBuf,
    /// The destination agent's control socket.
    pub destination_agent: PathBuf,
    /// The URI the source QEMU migrates to (`tcp:HOST:PORT`, ...).
    pub uri: String,
    /// Devices by id; empty: found through QEMU's character devices.
    pub devices: Vec<DevicePair>,
    /// Relay `query-config` to `presetup` (off: for comparisons).
    pub presetup: bool,
    /// `max-bandwidth` for the source QEMU, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// How long the destination may take to be `inmigrate`, the migration
    /// to complete, and a source's abandoned writes to finish.
    pub timeout: Duration,
    /// How long any one QMP or control request may take.
    pub request_timeout: Duration,
}

/// Run one migration (module docs); `progress` gets a line per step and
/// QMP event as they happen.
pub fn migrate(
    options: &MigrateOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Timeline, Failure> {
    let mut orchestrator = match Orchestrator::connect(options, progress) {
        Ok(orchestrator) => orchestrator,
        Err(error) => {
            let vm = look_at_source(options);
            return Err(Failure::new(error, vm));
        }
    };
    if let Err(error) = orchestrator.prepare() {
        let vm = orchestrator.untouched();
        return Err(Failure::new(error, vm));
    }
    orchestrator.migrate()
}

/// Where the VM is when the orchestrator could not even connect: ask the
/// source QEMU on a connection of its own.
fn look_at_source(options: &MigrateOptions) -> VmWhereabouts {
    let state = qmp::Qmp::connect(&options.source_qmp, options.request_timeout)
        .and_then(|mut qmp| qmp.execute("query-status", None));
    match state {
        Ok(status) => {
            VmWhereabouts::Source(status["status"].as_str().unwrap_or("unknown").to_string())
        }
        Err(e) => VmWhereabouts::Unknown(crate::error_chain(&e)),
    }
}
