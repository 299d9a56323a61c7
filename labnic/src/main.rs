//! `labnic`: the lab's VDUSE virtio-net loopback NIC (see the crate docs).
//!
//! ```text
//! labnic --name nic0 [--queue-pairs N] [--queue-size N] [--mac MAC] [--mtu N]
//!        [--profile PROFILE.json] [--dirty-log FILE] [--ready-file FILE]
//!        [--attach] [--no-mrg-rxbuf] [--no-event-idx]
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use labnic::net::NetConfig;
use labnic::run::{run, Options};
use netdev::sim::SimProfile;

/// A VDUSE virtio-net device that reflects every frame it is sent.
#[derive(Parser, Debug)]
#[command(name = "labnic", version)]
struct Cli {
    /// VDUSE device name (/dev/vduse/NAME; the vDPA device's name).
    #[arg(long, default_value = "labnic0")]
    name: String,
    /// RX/TX queue pairs (MQ is offered above 1; no control queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=127))]
    queue_pairs: u16,
    /// Largest ring size per virtqueue (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// MAC in the config space.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    mac: String,
    /// MTU in the config space.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..))]
    mtu: u16,
    /// Cost profile (netdev's sim JSON) charged per configuration operation.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Where SIGUSR1 / SIGUSR2 / exit write the pages the device wrote.
    #[arg(long)]
    dirty_log: Option<PathBuf>,
    /// Create this (empty) file once the device is ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Add the vDPA device (`vdpa dev add`) after set-up and delete it at exit.
    #[arg(long)]
    attach: bool,
    /// The iproute2 `vdpa` program.
    #[arg(long, default_value = "vdpa")]
    vdpa_tool: PathBuf,
    /// Do not offer VIRTIO_NET_F_MRG_RXBUF.
    #[arg(long)]
    no_mrg_rxbuf: bool,
    /// Do not offer VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,
    /// Poll running queues every this many ms (a lost kick costs no more);
    /// 0: never (kicks alone drive the device, as tests of kick handling
    /// want).
    #[arg(long, default_value_t = 100)]
    poll_ms: i32,
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC {text:?} is not six colon-separated bytes");
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text:?}"))?;
    }
    Ok(mac)
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if !cli.queue_size.is_power_of_two() {
        bail!("--queue-size {} is not a power of two", cli.queue_size);
    }
    let profile = cli
        .profile
        .as_deref()
        .map(SimProfile::load)
        .transpose()
        .context("loading the cost profile")?;
    let options = Options {
        name: cli.name.clone(),
        net: NetConfig {
            mac: parse_mac(&cli.mac)?,
            mtu: cli.mtu,
            queue_pairs: cli.queue_pairs,
            queue_size: cli.queue_size,
            mrg_rxbuf: !cli.no_mrg_rxbuf,
            event_idx: !cli.no_event_idx,
        },
        profile,
        dirty_log: cli.dirty_log,
        ready_file: cli.ready_file,
        attach: cli.attach,
        vdpa_tool: cli.vdpa_tool,
        poll_ms: cli.poll_ms.max(0),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run(&options, &mut out).with_context(|| format!("labnic {}", cli.name))
}
