//! The NIC's life: create the VDUSE device, set up every virtqueue (before
//! `vdpa dev add`, which fails with EINVAL otherwise), optionally attach it
//! to the vDPA bus, serve control requests and kicks until SIGTERM, then
//! detach and destroy it.
//!
//! One thread does everything, waiting in epoll on the device node (control
//! requests), one kick eventfd per virtqueue and a signalfd. The kernel
//! waits for our answer to each control request (for `msg_timeout`, 30 s,
//! then marks the device broken), so the loop keeps serving while a child
//! `vdpa dev add|del` runs: both can make the kernel ask us something.
//!
//! Signals: SIGTERM/SIGINT stop; SIGUSR1 writes the dirty-page record to
//! the `--dirty-log` file and prints the counters; SIGUSR2 does the same
//! and starts a new record.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netdev::sim::SimProfile;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::memory::write_dirty_log;
use crate::net::NetConfig;
use crate::nic::{Nic, NicError};
use crate::sys::SignalFd;
use crate::uapi::{self, DevConfig};
use crate::vduse::{Control, Device, VduseError};

const TOKEN_DEVICE: u64 = u64::MAX;
const TOKEN_SIGNALS: u64 = u64::MAX - 1;

/// How to run the NIC.
#[derive(Debug, Clone)]
pub struct Options {
    /// VDUSE (and vDPA) device name.
    pub name: String,
    /// What is offered.
    pub net: NetConfig,
    /// Cost profile charged per configuration operation.
    pub profile: Option<SimProfile>,
    /// Where SIGUSR1/SIGUSR2 and the exit write the dirty-page record.
    pub dirty_log: Option<PathBuf>,
    /// Created (empty) once the device is ready (after `--attach`'s add).
    pub ready_file: Option<PathBuf>,
    /// Run `vdpa dev add name NAME mgmtdev vduse` after set-up, and
    /// `vdpa dev del NAME` at exit.
    pub attach: bool,
    /// The `vdpa` program.
    pub vdpa_tool: PathBuf,
    /// Poll running queues this often (ms), in case a kick was lost; 0:
    /// never.
    pub poll_ms: i32,
}

/// The NIC stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A VDUSE call failed.
    #[error(transparent)]
    Vduse(#[from] VduseError),
    /// The device failed.
    #[error(transparent)]
    Nic(#[from] NicError),
    /// The device name cannot be used.
    #[error("invalid device name {0:?}")]
    Name(String),
    /// Setting up signals, epoll or the output failed.
    #[error("{what}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `vdpa dev add|del` failed.
    #[error("{command}: {outcome}")]
    Tool {
        /// The command line.
        command: String,
        /// How it ended.
        outcome: String,
    },
    /// The device was served but could not be destroyed.
    #[error("destroying VDUSE device {name}")]
    Destroy {
        /// The device.
        name: String,
        /// Cause.
        #[source]
        source: VduseError,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Os { what, source }
}

/// Create, serve and destroy the NIC; machine-readable lines
/// (`LABNIC-READY`, `LABNIC-COUNTERS`, `LABNIC-OPS`, `LABNIC-DIRTY`,
/// `LABNIC-EXIT`) go to `out`.
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<(), RunError> {
    let name = uapi::encode_name(&opts.name).ok_or_else(|| RunError::Name(opts.name.clone()))?;
    // Before anything else: the mask must hold for every thread.
    let signals = SignalFd::new(&[libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGUSR2])
        .map_err(os("signalfd"))?;
    let control = Control::open()?;
    let config = DevConfig {
        name,
        vendor_id: 0,
        device_id: 1,
        features: opts.net.features(),
        vq_num: opts.net.vq_count(),
        vq_align: 4096,
        config: opts.net.config_space(),
    };
    control.create(&config)?;
    log::info!(
        "VDUSE device {} created: {} virtqueues of up to {}, features {:#x}",
        opts.name,
        config.vq_num,
        opts.net.queue_size,
        config.features
    );
    let served = serve(opts, &signals, out);
    // The device node is closed (the NIC dropped) by now; destroying needs
    // that, and the vDPA device gone.
    let destroyed = destroy(&control, &opts.name);
    match (&served, &destroyed) {
        (Ok(()), Ok(())) => {
            let _ = writeln!(out, "LABNIC-EXIT name={} destroyed=1", opts.name);
        }
        (_, Err(e)) => {
            log::error!("{e}");
            let _ = writeln!(out, "LABNIC-EXIT name={} destroyed=0", opts.name);
        }
        _ => {}
    }
    let _ = out.flush();
    served?;
    destroyed
}

fn destroy(control: &Control, name: &str) -> Result<(), RunError> {
    // EBUSY while the kernel still holds the device (a vDPA device being
    // deleted lets go a moment after `vdpa dev del` returns).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match control.destroy(name) {
            Ok(()) => return Ok(()),
            Err(e) if e.errno() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(RunError::Destroy {
                    name: name.to_string(),
                    source,
                })
            }
        }
    }
}

fn open_device(name: &str) -> Result<Device, VduseError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Device::open(name) {
            Err(e) if e.errno() == Some(libc::ENOENT) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// What the loop is waiting for.
enum Phase {
    /// `vdpa dev add` runs.
    Attaching(Child),
    Serving,
    /// `vdpa dev del` runs.
    Detaching(Child, Instant),
    Done,
}

fn serve(opts: &Options, signals: &SignalFd, out: &mut dyn Write) -> Result<(), RunError> {
    let device = open_device(&opts.name)?;
    for vq in 0..opts.net.vq_count() {
        device.setup_vq(vq, opts.net.queue_size)?;
    }
    let mut nic = Nic::new(device, opts.net.clone(), opts.profile.clone())?;
    let epoll = Epoll::new().map_err(os("epoll_create"))?;
    let add = |fd, token| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(os("epoll_ctl"))
    };
    use std::os::fd::AsRawFd;
    add(nic.device().as_raw_fd(), TOKEN_DEVICE)?;
    add(signals.as_raw_fd(), TOKEN_SIGNALS)?;
    for vq in 0..opts.net.vq_count() as usize {
        if let Some(fd) = nic.kick_fd(vq) {
            add(fd, vq as u64)?;
        }
    }
    let mut phase = if opts.attach {
        Phase::Attaching(spawn_tool(
            &opts.vdpa_tool,
            &["dev", "add", "name", &opts.name, "mgmtdev", "vduse"],
        )?)
    } else {
        announce_ready(opts, &nic, out)?;
        Phase::Serving
    };
    let mut events = vec![EpollEvent::default(); 64];
    let mut last_poll = Instant::now();
    loop {
        let timeout = match phase {
            Phase::Attaching(_) | Phase::Detaching(..) => 20,
            _ if nic.running() && opts.poll_ms > 0 => opts.poll_ms,
            _ => -1,
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(os("epoll_wait")(e)),
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_DEVICE => nic.handle_requests()?,
                TOKEN_SIGNALS => {
                    while let Some(signal) = signals.read().map_err(os("reading the signalfd"))? {
                        phase = on_signal(signal, phase, opts, &mut nic, out)?;
                    }
                }
                vq => nic.kicked(vq as usize),
            }
        }
        let poll_every = Duration::from_millis(u64::try_from(opts.poll_ms).unwrap_or(0));
        if opts.poll_ms > 0 && nic.running() && last_poll.elapsed() >= poll_every {
            nic.poll();
            last_poll = Instant::now();
        }
        phase = match phase {
            Phase::Attaching(mut child) => {
                match child.try_wait().map_err(os("waiting for vdpa"))? {
                    Some(status) if status.success() => {
                        announce_ready(opts, &nic, out)?;
                        Phase::Serving
                    }
                    Some(status) => {
                        return Err(RunError::Tool {
                            command: format!(
                                "{} dev add name {} mgmtdev vduse",
                                opts.vdpa_tool.display(),
                                opts.name
                            ),
                            outcome: status.to_string(),
                        })
                    }
                    None => Phase::Attaching(child),
                }
            }
            Phase::Detaching(mut child, deadline) => {
                match child.try_wait().map_err(os("waiting for vdpa"))? {
                    Some(status) => {
                        if !status.success() {
                            log::warn!("vdpa dev del {} ended with {status}", opts.name);
                        }
                        Phase::Done
                    }
                    None if Instant::now() > deadline => {
                        log::warn!(
                            "vdpa dev del {} still runs after 30 s; leaving it",
                            opts.name
                        );
                        let _ = child.kill();
                        Phase::Done
                    }
                    None => Phase::Detaching(child, deadline),
                }
            }
            other => other,
        };
        if matches!(phase, Phase::Done) {
            return Ok(());
        }
    }
}

fn announce_ready(opts: &Options, nic: &Nic, out: &mut dyn Write) -> Result<(), RunError> {
    writeln!(
        out,
        "LABNIC-READY name={} queue_pairs={} vqs={} queue_size={} features={:#x} device={}",
        opts.name,
        opts.net.queue_pairs,
        opts.net.vq_count(),
        opts.net.queue_size,
        opts.net.features(),
        nic.device().path().display()
    )
    .and_then(|_| out.flush())
    .map_err(os("writing to stdout"))?;
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"").map_err(os("writing the ready file"))?;
    }
    Ok(())
}

fn on_signal(
    signal: i32,
    phase: Phase,
    opts: &Options,
    nic: &mut Nic,
    out: &mut dyn Write,
) -> Result<Phase, RunError> {
    match signal {
        libc::SIGUSR1 | libc::SIGUSR2 => {
            report(opts, nic, out, signal == libc::SIGUSR2)?;
            Ok(phase)
        }
        _ if matches!(phase, Phase::Serving | Phase::Attaching(_)) => {
            log::info!("signal {signal}: stopping");
            report(opts, nic, out, false)?;
            let attached = Path::new("/sys/bus/vdpa/devices").join(&opts.name).exists();
            if attached {
                // Served on: deleting the vDPA device resets it, which is a
                // request to us.
                let child = spawn_tool(&opts.vdpa_tool, &["dev", "del", &opts.name])?;
                Ok(Phase::Detaching(
                    child,
                    Instant::now() + Duration::from_secs(30),
                ))
            } else {
                Ok(Phase::Done)
            }
        }
        _ => Ok(phase),
    }
}

/// Print counters, operations and (with `--dirty-log`) write the dirty
/// record; `reset` starts a new record.
fn report(opts: &Options, nic: &mut Nic, out: &mut dyn Write, reset: bool) -> Result<(), RunError> {
    let counters = nic.counters_line();
    let ops = nic.ops_line();
    let pages = nic.dirty_pages(reset);
    let mut text = format!("{counters}\n{ops}\n");
    if let Some(path) = &opts.dirty_log {
        write_dirty_log(path, &pages).map_err(os("writing the dirty log"))?;
        text.push_str(&format!(
            "LABNIC-DIRTY pages={} file={} reset={}\n",
            pages.len(),
            path.display(),
            u8::from(reset)
        ));
    } else {
        text.push_str(&format!("LABNIC-DIRTY pages={}\n", pages.len()));
    }
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(os("writing to stdout"))
}

fn spawn_tool(tool: &Path, args: &[&str]) -> Result<Child, RunError> {
    log::info!("running {} {}", tool.display(), args.join(" "));
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| RunError::Tool {
            command: format!("{} {}", tool.display(), args.join(" ")),
            outcome: e.to_string(),
        })
}
