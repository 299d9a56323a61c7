//! The control API's commands: one row each in [`COMMANDS`], with typed
//! arguments (serde, unknown members refused) and a typed result.
//!
//! Adding a command: write its argument struct (or use [`NoArguments`]),
//! its result type, a `fn(&Devices, Arguments) -> CommandResult`, add the
//! row, and document it in `docs/control-api.md`. A command that may block
//! returns [`Effect::Later`] with the blocking part.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use blkdev::fence::Fence;
use blkdev::FenceMode;

use super::ControlError;
use crate::daemon::registry::{DeviceKind, RegisteredDevice, Registry};
use crate::daemon::spec::{BlkSpec, NetSpec};
use crate::daemon::supervisor::{DeviceSpec, Devices, DevicesError};

/// The blocking part of a command; its result is the reply.
pub(super) type Work = Box<dyn FnOnce() -> Result<Value, ControlError> + Send>;

/// What the server does after sending a successful reply.
pub(super) enum Effect {
    /// Nothing more.
    None,
    /// Shut the agent down as on SIGTERM.
    Quit,
    /// No reply yet: run this off the control thread (it may block) and
    /// reply with its result. The command's own value is not used.
    Later(Work),
}

/// A command's JSON result and what follows it.
pub(super) type CommandResult = Result<(Value, Effect), ControlError>;

/// One command.
pub(super) struct Command {
    /// Its name (`execute`).
    pub name: &'static str,
    /// Runs it.
    pub run: fn(&Devices, Arguments) -> CommandResult,
}

/// Every command, in the order `query-commands` lists them.
static COMMANDS: &[Command] = &[
    Command {
        name: "query-commands",
        run: query_commands,
    },
    Command {
        name: "query-devices",
        run: query_devices,
    },
    Command {
        name: "query-metrics",
        run: query_metrics,
    },
    Command {
        name: "query-config",
        run: query_config,
    },
    Command {
        name: "presetup",
        run: presetup,
    },
    Command {
        name: "fence-release",
        run: fence_release,
    },
    Command {
        name: "add-device",
        run: add_device,
    },
    Command {
        name: "remove-device",
        run: remove_device,
    },
    Command {
        name: "quit",
        run: quit,
    },
];

/// The command named `name`.
pub(super) fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|command| command.name == name)
}

/// A request's `arguments`, not yet typed.
pub(super) struct Arguments(Option<Map<String, Value>>);

impl Arguments {
    /// Wrap a request's `arguments`.
    pub fn new(arguments: Option<Map<String, Value>>) -> Arguments {
        Arguments(arguments)
    }

    /// The arguments as `command`'s argument type. Absent arguments are an
    /// empty object, so a missing required member is reported by name.
    fn parse<T: DeserializeOwned>(self, command: &'static str) -> Result<T, ControlError> {
        serde_json::from_value(Value::Object(self.0.unwrap_or_default()))
            .map_err(|source| ControlError::BadArguments { command, source })
    }
}

/// Arguments of a command that takes none: any member is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArguments {}

/// Arguments that name one device.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceArguments {
    /// The device's id.
    device: String,
}

fn to_json<T: Serialize>(command: &'static str, result: &T) -> Result<Value, ControlError> {
    serde_json::to_value(result).map_err(|source| ControlError::EncodeResult { command, source })
}

fn empty() -> Value {
    Value::Object(Map::new())
}

fn device(registry: &Registry, id: &str) -> Result<std::sync::Arc<RegisteredDevice>, ControlError> {
    registry
        .get(id)
        .ok_or_else(|| ControlError::DeviceNotFound(id.to_string()))
}

/// One entry of `query-commands`.
#[derive(Debug, Serialize)]
struct CommandInfo {
    name: &'static str,
}

fn query_commands(_: &Devices, arguments: Arguments) -> CommandResult {
    let NoArguments {} = arguments.parse("query-commands")?;
    let names: Vec<CommandInfo> = COMMANDS
        .iter()
        .map(|command| CommandInfo { name: command.name })
        .collect();
    Ok((to_json("query-commands", &names)?, Effect::None))
}

/// One entry of `query-devices`.
#[derive(Debug, Serialize)]
struct DeviceInfo {
    id: String,
    /// `"blk"` (later also `"net"`).
    kind: &'static str,
    /// The vhost-user socket.
    socket: String,
    /// Members that depend on the kind.
    #[serde(flatten)]
    details: KindInfo,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum KindInfo {
    Blk {
        image: String,
        fence: FenceInfo,
        /// Per queue: requests taken from the ring, not answered yet.
        #[serde(rename = "in-flight")]
        in_flight: Vec<u64>,
    },
    Net {
        dataplane: String,
        #[serde(rename = "queue-pairs")]
        queue_pairs: u16,
        mtu: u16,
        mac: String,
        /// RSS steering in force, if any.
        rss: Option<netdev::rss::RssConfig>,
        /// Counters per queue pair, in pair order.
        pairs: Vec<netdev::stats::PairCounts>,
        /// What a `sim` dataplane charged (absent for others).
        #[serde(skip_serializing_if = "Option::is_none")]
        sim: Option<crate::net::datapath::SimReport>,
    },
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct FenceInfo {
    /// `lock`, `api` or `none`.
    mode: &'static str,
    /// Held (resubmitted) writes may go: the destination-side gate.
    open: bool,
    /// Source side: abandoned storage operations that may still modify
    /// the image. Zero means a destination's fence may be released.
    abandoned_outstanding: u64,
    /// Source side: operations abandoned since the agent started.
    abandoned_total: u64,
}

impl FenceInfo {
    fn of(fence: &Fence) -> FenceInfo {
        FenceInfo {
            mode: fence.mode().name(),
            open: fence.is_open(),
            abandoned_outstanding: fence.abandoned_outstanding(),
            abandoned_total: fence.abandoned_total(),
        }
    }
}

fn query_devices(devices: &Devices, arguments: Arguments) -> CommandResult {
    let NoArguments {} = arguments.parse("query-devices")?;
    let devices: Vec<DeviceInfo> = devices
        .registry()
        .list()
        .iter()
        .map(|device| DeviceInfo {
            id: device.id().to_string(),
            kind: device.kind().name(),
            socket: device.socket().to_string_lossy().into_owned(),
            details: match device.kind() {
                DeviceKind::Blk {
                    image,
                    fence,
                    disk,
                    num_queues,
                } => KindInfo::Blk {
                    image: image.to_string_lossy().into_owned(),
                    fence: FenceInfo::of(fence),
                    in_flight: (0..*num_queues)
                        .map(|queue| disk.in_flight(queue))
                        .collect(),
                },
                DeviceKind::Net { shared } => {
                    let state = shared
                        .state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    KindInfo::Net {
                        dataplane: shared.dataplane.clone(),
                        queue_pairs: state.queue_pairs,
                        mtu: state.mtu,
                        mac: state.mac.to_string(),
                        rss: state.rss,
                        pairs: shared.stats.iter().map(|s| s.snapshot()).collect(),
                        sim: shared.sim.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    }
                }
            },
        })
        .collect();
    Ok((to_json("query-devices", &devices)?, Effect::None))
}

/// Output format of `query-metrics`.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum MetricsFormat {
    /// An array of per-device objects.
    #[default]
    Json,
    /// The Prometheus text exposition format, as one JSON string.
    Prometheus,
}

/// Arguments of `query-metrics`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsArguments {
    /// Only this device (default: all).
    device: Option<String>,
    /// `json` (default) or `prometheus`.
    #[serde(default)]
    format: MetricsFormat,
}

/// Per-device timelines and downtime figures (source stop time,
/// destination critical path, requests handed off, presetup counts).
/// Reads only the devices' shared metrics, never a protocol thread.
fn query_metrics(devices: &Devices, arguments: Arguments) -> CommandResult {
    let MetricsArguments { device: id, format } = arguments.parse("query-metrics")?;
    let registry = devices.registry();
    let devices = match id {
        Some(id) => vec![device(registry, &id)?],
        None => registry.list(),
    };
    let reports: Vec<_> = devices
        .iter()
        .map(|device| device.metrics().report())
        .collect();
    let value = match format {
        MetricsFormat::Json => to_json("query-metrics", &reports)?,
        MetricsFormat::Prometheus => Value::String(crate::metrics::prometheus_text(&reports)),
    };
    Ok((value, Effect::None))
}

/// The device's configuration as presetup describes it (features, memory
/// regions by backing file, rings by front-end address, the device part):
/// what an orchestrator reads on the source agent and hands to `presetup`
/// on the destination. As of the last vhost-user message the device
/// handled; read without waiting for its protocol thread.
fn query_config(devices: &Devices, arguments: Arguments) -> CommandResult {
    let DeviceArguments { device: id } = arguments.parse("query-config")?;
    let device = device(devices.registry(), &id)?;
    let config = device
        .config()
        .ok_or_else(|| ControlError::NoConfig(id.clone()))?;
    Ok((to_json("query-config", &config)?, Effect::None))
}

/// Arguments of `presetup`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetupArguments {
    /// The device's id.
    device: String,
    /// Its early configuration: a `DeviceConfig` (as `query-config`
    /// returns it), checked here rather than by serde so a malformed one
    /// is counted as a presetup fallback.
    config: Value,
}

/// How long `presetup` waits for the device's protocol thread, which may be
/// in a message (a ring draining behind a closed write fence).
const PRESETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Take an early configuration for a device and have its session execute
/// the plan to it now (on the device's protocol thread, which owns what the
/// device holds), so the start applies only what differs. A malformed or
/// unfitting one is refused with an error, logged at warn and counted as a
/// fallback: the device then gets its full configuration at start, as
/// without presetup. Finished off the control thread: the protocol thread
/// may be busy.
fn presetup(devices: &Devices, arguments: Arguments) -> CommandResult {
    let PresetupArguments { device: id, config } = arguments.parse("presetup")?;
    let device = device(devices.registry(), &id)?;
    let refuse = move |id: &str,
                       device: &RegisteredDevice,
                       source: Box<dyn std::error::Error + Send + Sync>| {
        let error = ControlError::Presetup {
            id: id.to_string(),
            source,
        };
        log::warn!(
            "{id}: {}; the device will be configured in full",
            crate::error_chain(&error)
        );
        device
            .metrics()
            .record_presetup(|counts| counts.fallbacks += 1);
        error
    };
    let config: presetup::DeviceConfig =
        serde_json::from_value(config).map_err(|e| refuse(&id, &device, Box::new(e)))?;
    let valid =
        presetup::ValidConfig::new(config).map_err(|e| refuse(&id, &device, Box::new(e)))?;
    let work: Work = Box::new(move || {
        let report = match device.server().presetup(valid, PRESETUP_TIMEOUT) {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => return Err(refuse(&id, &device, Box::new(e))),
            Err(e) => return Err(refuse(&id, &device, Box::new(e))),
        };
        log::info!(
            "{id}: presetup applied: {} heavy op(s) done now ({}), {} with nothing to do, {} light",
            report.heavy_executed.len(),
            report.heavy_executed.join(", "),
            report.heavy_not_needed.len(),
            report.light_executed
        );
        to_json("presetup", &report)
    });
    Ok((Value::Null, Effect::Later(work)))
}

/// Open a disk's write fence gate. In `api` mode this is the release the
/// gate waits for; in `lock` mode it overrides the wait for the source's
/// lock; in `none` mode the gate is always open. See docs/control-api.md.
fn fence_release(devices: &Devices, arguments: Arguments) -> CommandResult {
    let DeviceArguments { device: id } = arguments.parse("fence-release")?;
    let device = device(devices.registry(), &id)?;
    match device.kind() {
        DeviceKind::Blk { fence, .. } => {
            let mode = fence.mode();
            if fence.is_open() {
                log::info!(
                    "{id}: fence-release: the write fence ({}) is already open",
                    mode.name()
                );
            } else {
                if mode == FenceMode::Lock {
                    log::warn!(
                        "{id}: fence-release overrides the lock fence: held writes go without waiting for the source's lock on {}",
                        fence.lock_file().display()
                    );
                }
                fence.release(&format!("{id}: fence-release through the control API"));
            }
        }
        DeviceKind::Net { .. } => {
            return Err(ControlError::WrongKind {
                command: "fence-release",
                id,
                kind: "net",
                applies_to: "blk",
            })
        }
    }
    Ok((empty(), Effect::None))
}

/// The kinds `add-device` takes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindArgument {
    Blk,
    Net,
}

/// Arguments of `add-device`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDeviceArguments {
    /// `blk` or `net`.
    kind: KindArgument,
    /// A `--blk` or `--net` value: `socket=PATH,...`.
    spec: String,
}

/// Serve one more device: bind its socket, register it, start its
/// protocol thread. Binding is quick (open the image or dataplane, bind
/// the socket), so it runs on the control thread. The reply is the device
/// as `query-devices` shows it.
fn add_device(devices: &Devices, arguments: Arguments) -> CommandResult {
    let AddDeviceArguments { kind, spec } = arguments.parse("add-device")?;
    let parsed = match kind {
        KindArgument::Blk => spec.parse::<BlkSpec>().map(DeviceSpec::Blk),
        KindArgument::Net => spec.parse::<NetSpec>().map(DeviceSpec::Net),
    };
    let spec = parsed.map_err(|reason| ControlError::BadSpec {
        kind: match kind {
            KindArgument::Blk => "blk",
            KindArgument::Net => "net",
        },
        reason: reason.to_string(),
    })?;
    let default_id = devices.unused_id(spec.kind());
    let device = devices.add(&spec, &default_id).map_err(|error| {
        let error = ControlError::AddDevice(Box::new(error));
        log::warn!("control: add-device: {}", crate::error_chain(&error));
        error
    })?;
    let id = device.id().to_string();
    log::info!(
        "{id}: added through the control API ({} on {})",
        spec.kind(),
        spec.socket().display()
    );
    let (listed, _) = query_devices(devices, Arguments::new(None))?;
    let shown = listed
        .as_array()
        .and_then(|listed| listed.iter().find(|device| device["id"] == id.as_str()))
        .cloned()
        // Only a racing remove-device of the new id gets here.
        .ok_or(ControlError::DeviceNotFound(id))?;
    Ok((shown, Effect::None))
}

/// What `remove-device` returns.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct RemovedInfo {
    /// Requests the stop left in the front-end's inflight region (writes
    /// held by a closed write fence).
    handed_off: u64,
}

/// Stop a device as the agent's shutdown does and forget it. The stop
/// waits for the device's protocol thread (storage operations in flight,
/// or a GET_VRING_BASE draining behind a closed write fence), so it is
/// finished off the control thread, which meanwhile serves other clients
/// (fence-release among them).
fn remove_device(devices: &Devices, arguments: Arguments) -> CommandResult {
    let DeviceArguments { device: id } = arguments.parse("remove-device")?;
    let removal = devices.remove(&id).map_err(|error| match error {
        DevicesError::NotFound(id) => ControlError::DeviceNotFound(id),
        error => ControlError::RemoveDevice(Box::new(error)),
    })?;
    log::info!("{id}: removing through the control API");
    let work: Work = Box::new(move || {
        let removed = removal.wait();
        if removed.handed_off > 0 {
            log::warn!(
                "{}: removed; {} request(s) held by the write fence stay in the front-end's inflight region",
                removed.id,
                removed.handed_off
            );
        } else {
            log::info!("{}: removed", removed.id);
        }
        to_json(
            "remove-device",
            &RemovedInfo {
                handed_off: removed.handed_off,
            },
        )
    });
    Ok((Value::Null, Effect::Later(work)))
}

fn quit(_: &Devices, arguments: Arguments) -> CommandResult {
    let NoArguments {} = arguments.parse("quit")?;
    // The shutdown itself is logged by whoever carries it out.
    Ok((empty(), Effect::Quit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_appears_once() {
        for command in COMMANDS {
            let count = COMMANDS.iter().filter(|c| c.name == command.name).count();
            assert_eq!(count, 1, "{} appears {count} times", command.name);
            assert!(std::ptr::eq(find(command.name).unwrap(), command));
        }
        assert!(find("Quit").is_none(), "names are case-sensitive, like QMP");
    }
}
