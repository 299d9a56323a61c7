//! `lab-frontend`: the test front-end as a program for the lab guest (see
//! `vhost_agent_tests::lab_net`). It drives an agent's net device over its
//! vhost-user socket, with the device's tap in the same guest, and prints
//! `LAB-RESULT key=value` lines; it exits 1 if a check failed, 2 on an
//! error.
//!
//! ```text
//! lab-frontend basic --socket S --control C --tap T --pairs N --frames F
//! lab-frontend migrate --dir D --agents a:TAP,b:TAP,... --pairs N --frames F
//! lab-frontend bench --socket S --tap T --pid P --frames F --label L
//! lab-frontend vdpa --dir D --agents a,b --pairs N --frames F --nic-pid P --dirty-file F
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vhost_agent_tests::lab_net::report::Report;
use vhost_agent_tests::lab_net::{basic, bench, migrate, vdpa};

#[derive(Parser)]
#[command(about = "The test front-end for the lab's net datapath tests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Frames both ways, stop and restart, MQ, dirty log, reconnect, a
    /// hostile ring address.
    Basic {
        /// The device's vhost-user socket.
        #[arg(long)]
        socket: PathBuf,
        /// The agent's control socket.
        #[arg(long)]
        control: PathBuf,
        /// The device's tap.
        #[arg(long)]
        tap: String,
        /// Queue pairs.
        #[arg(long, default_value_t = 1)]
        pairs: usize,
        /// Frames per pair and direction in a phase.
        #[arg(long, default_value_t = 1000)]
        frames: u64,
    },
    /// A guest migrated from agent to agent, alternately without and with
    /// in-band presetup; agent NAME's sockets are DIR/NAME.{sock,ctl}.
    Migrate {
        /// Where the agents' sockets are.
        #[arg(long)]
        dir: PathBuf,
        /// The agents in hop order, comma-separated NAME:TAP.
        #[arg(long, value_delimiter = ',')]
        agents: Vec<String>,
        /// Queue pairs.
        #[arg(long, default_value_t = 2)]
        pairs: usize,
        /// Frames per pair and direction on each agent.
        #[arg(long, default_value_t = 500)]
        frames: u64,
    },
    /// Frames per second and CPU per million frames on one device.
    Bench {
        /// The device's vhost-user socket.
        #[arg(long)]
        socket: PathBuf,
        /// The device's tap.
        #[arg(long)]
        tap: String,
        /// The agent's process id.
        #[arg(long)]
        pid: u32,
        /// TX frames to time.
        #[arg(long, default_value_t = 20000)]
        frames: u64,
        /// Bytes per frame.
        #[arg(long, default_value_t = 64)]
        len: usize,
        /// Prefix of the result keys.
        #[arg(long)]
        label: String,
    },
    /// Agents on `dataplane=vdpa:` over the lab's VDUSE loopback NICs:
    /// frames, stops, the dirty log against the NIC's record, a migration.
    Vdpa {
        /// Where the agents' sockets are.
        #[arg(long)]
        dir: PathBuf,
        /// The source and destination agents, comma-separated.
        #[arg(long, value_delimiter = ',')]
        agents: Vec<String>,
        /// Queue pairs.
        #[arg(long, default_value_t = 2)]
        pairs: usize,
        /// Frames per pair in a phase.
        #[arg(long, default_value_t = 512)]
        frames: u64,
        /// The source's NIC process (for its dirty record).
        #[arg(long)]
        nic_pid: i32,
        /// Where that NIC writes its record.
        #[arg(long)]
        dirty_file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut report = Report::default();
    let result = match cli.command {
        Command::Basic {
            socket,
            control,
            tap,
            pairs,
            frames,
        } => basic::run(&socket, &control, &tap, pairs, frames, &mut report),
        Command::Migrate {
            dir,
            agents,
            pairs,
            frames,
        } => {
            let agents: Vec<_> = agents
                .iter()
                .map(|spec| {
                    let (name, tap) = spec.split_once(':').unwrap_or((spec, spec));
                    migrate::agent(&dir, name, tap)
                })
                .collect();
            migrate::run(&agents, pairs, frames, &mut report)
        }
        Command::Bench {
            socket,
            tap,
            pid,
            frames,
            len,
            label,
        } => bench::run(&socket, &tap, pid, frames, len, &label, &mut report),
        Command::Vdpa {
            dir,
            agents,
            pairs,
            frames,
            nic_pid,
            dirty_file,
        } => match <[String; 2]>::try_from(agents) {
            Ok(agents) => vdpa::run(
                &vdpa::Setup {
                    dir,
                    agents,
                    pairs,
                    frames,
                    nic_pid,
                    dirty_file,
                },
                &mut report,
            ),
            Err(_) => Err("--agents takes two names".to_string()),
        },
    };
    match result {
        Err(e) => {
            eprintln!("lab-frontend: {e}");
            report.put("fe_error", 1);
            ExitCode::from(2)
        }
        Ok(()) if report.failures() > 0 => {
            report.put("fe_failures", report.failures());
            ExitCode::from(1)
        }
        Ok(()) => {
            report.put("fe_failures", 0);
            ExitCode::SUCCESS
        }
    }
}
