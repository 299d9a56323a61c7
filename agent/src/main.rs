//! `vhost-agent`: serve virtio-blk and virtio-net devices to QEMU over
//! vhost-user.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vhost_agent::control::{self, Reply, Request};
use vhost_agent::daemon::serve::{self, ServeOptions};
use vhost_agent::daemon::spec::{BlkSpec, NetSpec, BLK_HELP, NET_HELP};
use vhost_agent::migrate::{self, DevicePair, MigrateOptions};
use vhost_agent::vhost_user::inband::PresetupProtocol;

mod demo;
mod experiment;

/// vhost-user back-end for virtio-blk and virtio-net, built for
/// low-downtime live migration.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (default: info; warn
    /// for the demo, whose own lines tell the story). RUST_LOG overrides
    /// it.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve disks and net devices until SIGINT, SIGTERM or the control
    /// API's quit.
    Serve(ServeArgs),
    /// Send one command to a running agent's control socket and print the
    /// result.
    #[command(long_about = CTL_ABOUT)]
    Ctl(CtlArgs),
    /// Two agents in this process, a disk and a net device, two live
    /// migrations between them (drain and full configuration, then
    /// in-flight handoff and presetup) driven by the built-in front-end;
    /// the timelines side by side and every check. Needs nothing installed.
    Demo(demo::DemoArgs),
    /// Live-migrate a QEMU VM whose devices agents serve: presetup relayed,
    /// QMP migrate followed, write fences released, one timeline printed.
    #[command(long_about = MIGRATE_ABOUT)]
    Migrate(MigrateArgs),
    /// Run the presetup and downtime experiment (scenario matrices against
    /// agents spawned from this binary, with the built-in front-end) and
    /// write CSV, JSON and SVG charts.
    #[command(long_about = experiment::cli::ABOUT)]
    Experiment(experiment::cli::ExperimentArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[arg(
        long = "blk",
        value_name = "SPEC",
        help = BLK_HELP,
        required_unless_present_any = ["net", "control"]
    )]
    blk: Vec<BlkSpec>,
    #[arg(long = "net", value_name = "SPEC", help = NET_HELP)]
    net: Vec<NetSpec>,
    /// Serve the JSON control API on a unix socket at PATH: QMP-style
    /// requests, one per line (see docs/control-api.md, or `vhost-agent ctl`
    /// for a client). The socket is created with mode 0600, so only this
    /// user (and root) can connect; a stale socket file is replaced. With
    /// --control, --blk and --net are optional: devices can be added later
    /// with add-device.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// In-band presetup protocol for net devices: none (default) or
    /// nvidia-rfc. See --help for the collision with SHARED_OBJECT.
    #[arg(
        long,
        value_enum,
        value_name = "PROTOCOL",
        default_value_t = PresetupProtocol::None,
        long_help = PRESETUP_PROTOCOL_HELP
    )]
    presetup_protocol: PresetupProtocol,
}

const PRESETUP_PROTOCOL_HELP: &str = "\
In-band presetup protocol for net devices (default: none).

nvidia-rfc: speak the presetup bracket of NVIDIA's early-migration RFC
(never merged into QEMU; NVIDIA's QEMU branches carry it). Net devices offer
protocol feature bit 18, and request 41 with an 8-byte payload marks the
start (1) and end (2) of an early configuration sent during migration
setup: the agent maps guest memory, sets the MTU and creates dataplane
queues then, starts no ring and reads no guest memory, and at switchover
applies only what differs.

Off by default because the numbers collide with upstream QEMU (8.2+):
bit 18 is SHARED_OBJECT and request 41 is GET_SHARED_OBJECT (a 16-byte
UUID payload). The agent never offers SHARED_OBJECT; with this switch on, a
front-end that sends request 41 with a 16-byte payload after acking bit 18
means SHARED_OBJECT, and its connection is closed with an error. Turn it on
only for front-ends that speak the RFC. The control API's presetup command
works with stock QEMU and needs no switch.";

const CTL_ABOUT: &str = "\
Send one command to a running agent's control socket (serve --control PATH)
and print the result as JSON on stdout. If the agent answers with an error,
print its description and class on stderr and exit 1.

Commands (full schema in docs/control-api.md):
  query-devices                 every served device: id, kind, socket, image,
                                write fence mode, whether its gate is open,
                                abandoned writes outstanding and in total
  fence-release '{\"device\": ID}'
                                open the write fence of disk ID (fence=api:
                                a migration destination's held writes go)
  add-device '{\"kind\": \"blk\", \"spec\": \"socket=...,image=...\"}'
                                serve one more device; spec as for --blk or
                                --net (kind \"net\"); prints it as
                                query-devices shows it
  remove-device '{\"device\": ID}'
                                stop device ID as shutdown does (its
                                front-end is disconnected) and forget it
  quit                          shut the agent down as SIGTERM does
  query-commands                the commands this agent knows

Examples:
  vhost-agent ctl /run/vhost-agent.ctl fence-release '{\"device\": \"blk0\"}'
  vhost-agent ctl /run/vhost-agent.ctl add-device \\
      '{\"kind\": \"net\", \"spec\": \"socket=/run/n.sock,dataplane=loop\"}'";

const MIGRATE_ABOUT: &str = "\
Live-migrate one QEMU VM whose vhost-user devices vhost-agents serve, with
stock QEMU, and report one timeline of it.

Steps, in order:
  1. connect to both QEMUs (QMP), check the source VM runs (or is paused),
     wait until the destination QEMU (started with -incoming URI) is
     inmigrate;
  2. map the VM's devices to the agents' devices: by --device, or else
     each QEMU character device (query-chardev) that is a unix socket an
     agent device listens on, source and destination paired by the
     chardev's label; then, unless --no-presetup, read each device's
     query-config on the source agent and hand it to presetup on the
     destination agent, so the destination does its heavy configuration
     (queues, I/O rings, MTU, offloads) before the VM stops. A refused
     presetup stops here;
  3. turn on QEMU's MIGRATION events, send migrate URI to the source and
     follow STOP, RESUME, MIGRATION and query-migrate until the migration
     completed and the destination runs;
  4. for each fence=api disk on the destination, wait until the source
     agent reports no abandoned writes (query-devices) and fence-release it;
  5. merge QEMU's query-migrate, the QMP events and both agents'
     query-metrics timelines into one per-phase timeline: VM stop, the
     source's first and last GET_VRING_BASE, device-state save and load,
     the destination's first start message and its rings running, VM
     resume, completion; per device its stop time, critical path and the
     heavy ops its start executed.

Times are milliseconds since migrate was sent, on this program's
monotonic clock. QEMU's event stamps (its host's wall clock) are mapped
through this host's wall clock: exact on one host, as good as the hosts'
clock sync otherwise. Each agent device's timeline is placed by its
query-metrics now-us, read before and after the migration between this
program's send and receive: to within half that round trip (the \u{b1}
column). Progress goes to stderr, the timeline to stdout, and with --out
as JSON to FILE.

If any step fails, the command exits 1 with the step and its cause. Until
QEMU reports the migration completed, the VM is left on the source: before
migrate nothing was changed, after it the migration is cancelled and a
source that ran is resumed. The message says where the VM is.

Example:
  vhost-agent migrate --source-qmp /run/vm1/qmp.sock \\
      --destination-qmp /run/vm1-in/qmp.sock \\
      --source-agent /run/vhost-agent.ctl --destination-agent /run/vhost-agent-b.ctl \\
      --uri tcp:10.0.0.2:4444 --out /tmp/vm1-migration.json";

#[derive(clap::Args, Debug)]
struct MigrateArgs {
    /// The source QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off). A
    /// QMP socket serves one client at a time: give QEMU a second -qmp for
    /// this command if a management stack holds the first.
    #[arg(long, value_name = "PATH")]
    source_qmp: PathBuf,
    /// The destination QEMU's QMP socket; that QEMU runs with -incoming URI.
    #[arg(long, value_name = "PATH")]
    destination_qmp: PathBuf,
    /// The source agent's control socket (its serve --control PATH).
    #[arg(long, value_name = "PATH")]
    source_agent: PathBuf,
    /// The destination agent's control socket.
    #[arg(long, value_name = "PATH")]
    destination_agent: PathBuf,
    /// Where the source QEMU sends the migration stream: what the
    /// destination listens on, e.g. tcp:10.0.0.2:4444.
    #[arg(long)]
    uri: String,
    /// A device to migrate: SRC (the same id on both agents) or SRC=DST.
    /// Repeat for several. Without --device, every agent device whose
    /// socket is one of the source QEMU's chardevs is migrated.
    #[arg(long = "device", value_name = "SRC[=DST]")]
    devices: Vec<DevicePair>,
    /// Do not relay presetup (the destination configures every device in
    /// full at the switchover): for comparisons.
    #[arg(long)]
    no_presetup: bool,
    /// Write the timeline as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Set the source QEMU's max-bandwidth to N MiB/s (QEMU's default is
    /// 128 MiB/s).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    max_bandwidth_mib: Option<u64>,
    /// Seconds the destination may take to be inmigrate, the migration to
    /// complete, and a source's abandoned writes to finish.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    timeout_s: u64,
}

/// How long any one QMP or control request of `migrate` may take.
const MIGRATE_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `vhost-agent migrate`: progress on stderr, the timeline on stdout.
fn migrate(args: MigrateArgs) -> Result<()> {
    let options = MigrateOptions {
        source_qmp: args.source_qmp,
        destination_qmp: args.destination_qmp,
        source_agent: args.source_agent,
        destination_agent: args.destination_agent,
        uri: args.uri,
        devices: args.devices,
        presetup: !args.no_presetup,
        max_bandwidth: args
            .max_bandwidth_mib
            .map(|mib| mib.saturating_mul(1 << 20)),
        timeout: Duration::from_secs(args.timeout_s),
        request_timeout: MIGRATE_REQUEST_TIMEOUT,
    };
    let mut progress = |line: &str| eprintln!("migrate: {line}");
    let timeline = migrate::migrate(&options, &mut progress)?;
    print!("{}", migrate::render::render(&timeline));
    if let Some(path) = &args.out {
        let json = serde_json::to_string_pretty(&timeline)? + "\n";
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// How long `ctl` waits to send its request and again for the reply.
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The agent's control socket (its serve --control PATH).
    socket: PathBuf,
    /// The command, e.g. query-devices, fence-release, quit.
    command: String,
    /// The command's arguments as one JSON object, e.g. '{"device": "blk0"}'.
    #[arg(value_name = "JSON-ARGUMENTS")]
    arguments: Option<String>,
}

fn init_logging(level: &str) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(level);
    if let Ok(filters) = std::env::var("RUST_LOG") {
        builder.parse_filters(&filters);
    }
    builder.format_timestamp_micros().init();
}

fn serve(args: ServeArgs) -> Result<()> {
    serve::serve(ServeOptions {
        blk: args.blk,
        net: args.net,
        control: args.control,
        presetup_protocol: args.presetup_protocol,
    })?;
    Ok(())
}

/// `vhost-agent ctl`: one request, its result on stdout.
fn ctl(args: CtlArgs) -> Result<()> {
    let arguments = match &args.arguments {
        Some(text) => match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(object)) => Some(object),
            Ok(_) => bail!("JSON-ARGUMENTS must be a JSON object, like '{{\"device\": \"blk0\"}}'"),
            Err(e) => bail!("JSON-ARGUMENTS is not valid JSON: {e}"),
        },
        None => None,
    };
    let request = Request {
        execute: args.command.clone(),
        arguments,
        id: None,
    };
    let reply = control::client::execute(&args.socket, &request, CTL_TIMEOUT)
        .with_context(|| format!("{} on {}", args.command, args.socket.display()))?;
    match reply {
        Reply::Return { value, .. } => {
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
        Reply::Error { error, .. } => bail!("{} ({})", error.desc, error.class),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_level.as_deref().unwrap_or(default_level));
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Ctl(args) => ctl(args),
        Command::Demo(args) => demo::run(args),
        Command::Migrate(args) => migrate(args),
        Command::Experiment(args) => match experiment::cli::run_experiment(&args) {
            // Every file is written; a scenario failed.
            Ok(false) => return ExitCode::from(2),
            Ok(true) => Ok(()),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
