//! How a migration fails: which step, with what cause, and where the VM
//! was left.

use std::time::Duration;

use super::agents::AgentError;
use super::mapping::MappingError;
use super::qmp::QmpError;
use super::Side;

/// A step of the migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Talking to a QEMU failed.
    #[error("{step}: {side} QEMU")]
    Qmp {
        /// Which QEMU.
        side: Side,
        /// The step.
        step: &'static str,
        /// Cause.
        #[source]
        source: QmpError,
    },
    /// Talking to an agent failed.
    #[error("{step}: {side} agent")]
    Agent {
        /// Which agent.
        side: Side,
        /// The step.
        step: &'static str,
        /// Cause.
        #[source]
        source: Box<AgentError>,
    },
    /// The source QEMU is not a VM that can be migrated.
    #[error("the source VM is {0:?}, not running or paused")]
    SourceNotRunning(String),
    /// The destination QEMU did not become ready for the migration.
    #[error("the destination QEMU is {state:?}, not inmigrate, after {waited:?} (started without -incoming?)")]
    DestinationNotIncoming {
        /// Its last run state.
        state: String,
        /// How long the orchestrator waited.
        waited: Duration,
    },
    /// The devices cannot be mapped.
    #[error("device mapping")]
    Mapping(#[source] Box<MappingError>),
    /// The destination refused a device's early configuration.
    #[error("presetup of {source_id} -> {destination_id} on the destination agent")]
    Presetup {
        /// Source device.
        source_id: String,
        /// Destination device.
        destination_id: String,
        /// Cause.
        #[source]
        source: Box<AgentError>,
    },
    /// QEMU reports the migration failed or was cancelled.
    #[error("the migration {status}: {desc}")]
    MigrationFailed {
        /// `failed` or `cancelled`.
        status: String,
        /// QEMU's `error-desc`, if any.
        desc: String,
    },
    /// The migration did not complete in time.
    #[error("the migration did not complete within {0:?} (last status {1})")]
    Timeout(Duration, String),
    /// The destination did not run (or, for a paused source, settle)
    /// after the migration completed.
    #[error("the destination QEMU is {0:?} after the migration")]
    DestinationNotRunning(String),
    /// A `fence=api` disk's source never finished its abandoned writes.
    #[error(
        "disk {device}: the source still has {outstanding} abandoned writes after {waited:?}; \
         its destination's write fence stays closed"
    )]
    FenceTimeout {
        /// The source disk.
        device: String,
        /// Abandoned writes still outstanding.
        outstanding: u64,
        /// How long the orchestrator waited.
        waited: Duration,
    },
}

impl MigrateError {
    /// Wrap a QMP error of `side` in step `step`.
    pub fn qmp(side: Side, step: &'static str) -> impl FnOnce(QmpError) -> MigrateError {
        move |source| MigrateError::Qmp { side, step, source }
    }

    /// A mapping error.
    pub fn mapping(error: MappingError) -> MigrateError {
        MigrateError::Mapping(Box::new(error))
    }

    /// Wrap an agent error of `side` in step `step`.
    pub fn agent(side: Side, step: &'static str) -> impl FnOnce(AgentError) -> MigrateError {
        move |source| MigrateError::Agent {
            side,
            step,
            source: Box::new(source),
        }
    }
}

/// Where the VM is after a failed migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmWhereabouts {
    /// On the source, in this run state (`running` when all went back).
    Source(String),
    /// The migration had completed: the VM runs on the destination.
    Destination,
    /// The orchestrator could not tell (the source QEMU did not answer).
    Unknown(String),
}

impl std::fmt::Display for VmWhereabouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmWhereabouts::Source(state) if state == "running" => {
                write!(f, "the VM is still running on the source")
            }
            VmWhereabouts::Source(state) => {
                write!(f, "the VM is on the source, run state {state:?}")
            }
            VmWhereabouts::Destination => write!(
                f,
                "the migration had completed: the VM runs on the destination"
            ),
            VmWhereabouts::Unknown(why) => {
                write!(f, "the orchestrator cannot tell where the VM is: {why}")
            }
        }
    }
}

/// A failed migration: the error (its source) and where it left the VM.
#[derive(Debug, thiserror::Error)]
#[error("migration failed ({vm})")]
pub struct Failure {
    /// What failed.
    #[source]
    pub error: Box<MigrateError>,
    /// Where the VM is now.
    pub vm: VmWhereabouts,
}

impl Failure {
    /// `error` left the VM at `vm`.
    pub fn new(error: MigrateError, vm: VmWhereabouts) -> Failure {
        Failure {
            error: Box::new(error),
            vm,
        }
    }
}
