//! The demo's two agents, in this process: each is what `vhost-agent
//! serve` builds (the device supervisor, its registry, the control API on
//! a socket) serving one disk and one net device, without the signal
//! handling of a daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use vhost_agent::control::server::ControlHandle;
use vhost_agent::control::ControlServer;
use vhost_agent::daemon::registry::Registry;
use vhost_agent::daemon::spec::{BlkSpec, NetSpec};
use vhost_agent::daemon::supervisor::{DeviceSpec, Devices};

/// Queue pairs of the demo's net device.
pub const QUEUE_PAIRS: usize = 2;
/// Ring size of the demo's disk (its `queue-size`).
pub const DISK_QUEUE_SIZE: u16 = 128;

/// One agent serving `disk0` and `net0`.
pub struct Agent {
    devices: Arc<Devices>,
    control: ControlHandle,
    control_thread: Option<JoinHandle<()>>,
    /// Its control socket.
    pub control_socket: PathBuf,
    /// The disk's vhost-user socket.
    pub disk_socket: PathBuf,
    /// The net device's vhost-user socket.
    pub net_socket: PathBuf,
}

impl Agent {
    /// Start agent `name` in `dir`: the disk on `image` with
    /// `latency_ms` of storage latency and the API write fence, the net
    /// device on the `sim` dataplane with `profile`.
    pub fn start(
        name: &'static str,
        dir: &Path,
        image: &Path,
        latency_ms: u64,
        profile: &Path,
    ) -> Result<Agent> {
        let control_socket = dir.join(format!("{name}-control.sock"));
        let disk_socket = dir.join(format!("{name}-disk0.sock"));
        let net_socket = dir.join(format!("{name}-net0.sock"));
        let devices = Arc::new(Devices::new(Arc::new(Registry::new())));
        let server = ControlServer::bind(&control_socket, devices.clone(), Box::new(|| {}))
            .with_context(|| format!("agent {name}: control socket"))?;
        let control = server.shutdown_handle();
        let control_thread = std::thread::Builder::new()
            .name(format!("control-{name}"))
            .spawn(move || server.run())
            .context("starting a control thread")?;
        let mut agent = Agent {
            devices,
            control,
            control_thread: Some(control_thread),
            control_socket,
            disk_socket,
            net_socket,
        };
        let disk: BlkSpec = format!(
            "socket={},image={},id=disk0,latency-ms={latency_ms},fence=api,queue-size={DISK_QUEUE_SIZE}",
            agent.disk_socket.display(),
            image.display()
        )
        .parse()
        .map_err(anyhow::Error::msg)?;
        let net: NetSpec = format!(
            "socket={},dataplane=sim:{},queue-pairs={QUEUE_PAIRS},id=net0",
            agent.net_socket.display(),
            profile.display()
        )
        .parse()
        .map_err(anyhow::Error::msg)?;
        for spec in [DeviceSpec::Blk(disk), DeviceSpec::Net(net)] {
            if let Err(e) = agent.devices.add(&spec, spec.kind()) {
                agent.stop();
                return Err(e).with_context(|| format!("agent {name}: serving {}", spec.kind()));
            }
        }
        Ok(agent)
    }

    /// Stop every device and the control API.
    pub fn stop(&mut self) {
        self.devices.shut_down();
        self.control.shutdown();
        if let Some(thread) = self.control_thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
