//! `vhost-agent`: serve virtio-blk disks to QEMU over vhost-user.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vhost_agent::cli::{BlkSpec, BLK_HELP};
use vhost_agent::device::bind_blk;
use vhost_agent::registry::Registry;

mod demo;

/// vhost-user back-end for virtio-blk, built for low-downtime live migration.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log level: error, warn, info, debug or trace. RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve disks until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Create a scratch image, serve it, drive it with libblkio (a real
    /// vhost-user-blk client) and print what happened.
    Demo(demo::DemoArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[arg(long = "blk", value_name = "SPEC", help = BLK_HELP, required = true)]
    blk: Vec<BlkSpec>,
}

fn init_logging(level: &str) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(level);
    if let Ok(filters) = std::env::var("RUST_LOG") {
        builder.parse_filters(&filters);
    }
    builder.format_timestamp_micros().init();
}

/// Block SIGINT and SIGTERM in this thread and every thread it spawns, so
/// that only `wait_for_signal` receives them.
fn block_termination_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; pthread_sigmask
    // only reads it.
    let ret = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if ret != 0 {
        anyhow::bail!(
            "pthread_sigmask failed: {}",
            std::io::Error::from_raw_os_error(ret)
        );
    }
    Ok(set)
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    // SAFETY: `set` is initialised and the signals in it are blocked;
    // sigwait writes the received signal number into `signal`.
    unsafe { libc::sigwait(set, &mut signal) };
    signal
}

fn serve(args: ServeArgs) -> Result<()> {
    let signals = block_termination_signals()?;
    let registry = Registry::new();
    let mut servers = Vec::new();
    for (index, spec) in args.blk.iter().enumerate() {
        let bound = bind_blk(spec, &format!("blk{index}"))
            .with_context(|| format!("setting up --blk {}", spec.socket.display()))?;
        registry
            .insert(bound.device)
            .with_context(|| format!("setting up --blk {}", spec.socket.display()))?;
        servers.push(bound.server);
    }
    let mut threads = Vec::new();
    let mut handles = Vec::new();
    for server in servers {
        handles.push(server.shutdown_handle());
        threads.push(
            std::thread::Builder::new()
                .name("protocol".into())
                .spawn(move || server.run())?,
        );
    }
    let signal = wait_for_signal(&signals);
    log::info!("signal {signal} received: finishing in-flight requests and shutting down");
    for handle in &handles {
        handle.shutdown();
    }
    for thread in threads {
        let _ = thread.join();
    }
    log::info!("shutdown complete");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
