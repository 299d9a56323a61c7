//! `vhost-agent serve`: start the control API and every device, wait for
//! SIGINT, SIGTERM or the control API's `quit`, and shut everything down
//! the same way whatever the cause.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::registry::Registry;
use super::spec::{BlkSpec, NetSpec};
use super::supervisor::{DeviceSpec, Devices, DevicesError};
use crate::control::ControlServer;
use crate::vhost_user::inband::PresetupProtocol;

/// What `serve` is asked to serve.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// `--blk` specs.
    pub blk: Vec<BlkSpec>,
    /// `--net` specs.
    pub net: Vec<NetSpec>,
    /// `--control PATH`.
    pub control: Option<PathBuf>,
    /// `--presetup-protocol`.
    pub presetup_protocol: PresetupProtocol,
}

/// `serve` could not start, or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The signal handlers could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] std::io::Error),
    /// The control socket could not be set up.
    #[error("setting up --control {path}")]
    Control {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::vhost_user::listener::ListenError,
    },
    /// A device could not be set up; the others were stopped again.
    #[error("setting up {option} {socket}")]
    Device {
        /// `--blk` or `--net`.
        option: &'static str,
        /// Its socket.
        socket: PathBuf,
        /// Cause (boxed: it is large and errors travel by value).
        #[source]
        source: Box<DevicesError>,
    },
    /// A thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// Why the agent shuts down. Every cause takes the same path.
enum ShutdownCause {
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The control API's `quit`.
    Quit,
}

/// Serve until a signal or `quit` (module documentation).
pub fn serve(options: ServeOptions) -> Result<(), ServeError> {
    // Installed before any device exists: a signal from here on shuts the
    // agent down cleanly (the socket files go) instead of killing it.
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(ServeError::Signals)?;
    let signals_handle = signals.handle();
    let devices = Arc::new(
        Devices::new(Arc::new(Registry::new())).with_presetup_protocol(options.presetup_protocol),
    );
    let (stop_tx, stop_rx) = mpsc::channel();
    // The control socket first: once the devices' sockets exist, so does it.
    let control = match &options.control {
        Some(path) => {
            let stop_tx = stop_tx.clone();
            let on_quit = Box::new(move || {
                // The receiver lives until serve returns; after that
                // nobody is left to tell.
                let _ = stop_tx.send(ShutdownCause::Quit);
            });
            let server = ControlServer::bind(path, devices.clone(), on_quit).map_err(|source| {
                ServeError::Control {
                    path: path.clone(),
                    source,
                }
            })?;
            Some(server)
        }
        None => None,
    };
    // Each device's protocol thread starts as soon as it is bound; a later
    // device that fails stops the earlier ones again.
    let specs = options
        .blk
        .iter()
        .enumerate()
        .map(|(index, spec)| ("--blk", index, DeviceSpec::Blk(spec.clone())))
        .chain(
            options
                .net
                .iter()
                .enumerate()
                .map(|(index, spec)| ("--net", index, DeviceSpec::Net(spec.clone()))),
        );
    for (option, index, spec) in specs {
        // Default ids count by position on the command line.
        let default_id = format!("{}{index}", spec.kind());
        if let Err(source) = devices.add(&spec, &default_id) {
            devices.shut_down();
            return Err(ServeError::Device {
                option,
                socket: spec.socket().to_path_buf(),
                source: Box::new(source),
            });
        }
    }
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if stop_tx.send(ShutdownCause::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| ServeError::Thread("signals", e))?;
    let control = match control {
        Some(server) => {
            let handle = server.shutdown_handle();
            let thread = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || server.run())
                .map_err(|e| ServeError::Thread("control", e))?;
            Some((handle, thread))
        }
        None => None,
    };
    match stop_rx.recv() {
        Ok(ShutdownCause::Signal(signal)) => {
            log::info!("signal {signal} received: finishing in-flight requests and shutting down")
        }
        Ok(ShutdownCause::Quit) => log::info!(
            "quit requested through the control API: finishing in-flight requests and shutting down"
        ),
        Err(mpsc::RecvError) => log::error!("the signal thread is gone; shutting down"),
    }
    // Every device, from the command line or added since, and removals
    // still under way.
    devices.shut_down();
    // The control API goes last: a device whose protocol thread is
    // draining a ring behind a closed fence=api gate (a GET_VRING_BASE
    // that waits for held writes) stops only once fence-release arrives.
    if let Some((handle, thread)) = control {
        handle.shutdown();
        let _ = thread.join();
    }
    signals_handle.close();
    let _ = signal_thread.join();
    log::info!("shutdown complete");
    Ok(())
}
