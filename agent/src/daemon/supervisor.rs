//! The running devices: each served device's registry entry, protocol
//! thread and shutdown handle in one place, so that start-up (`--blk`,
//! `--net`), the control API (`add-device`, `remove-device`) and the
//! agent's shutdown start and stop devices the same way.
//!
//! A device is added whole or not at all: its socket is bound, it is
//! registered and its protocol thread runs, or it fails with nothing left
//! behind. A removal stops the protocol thread as the agent's shutdown does
//! (the front-end is disconnected, blk requests storage already has are
//! answered, the queue and data path threads end, the socket file goes) and
//! only then frees the id.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::bind::{bind_blk, bind_net, BlkSetupError, NetSetupError};
use super::registry::{RegisteredDevice, Registry, RegistryError};
use super::spec::{BlkSpec, NetSpec};
use crate::vhost_user::inband::PresetupProtocol;
use crate::vhost_user::listener::ServerHandle;

/// What to serve: a parsed `--blk` or `--net` spec (the same grammar at
/// start-up and in `add-device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A virtio-blk disk.
    Blk(BlkSpec),
    /// A virtio-net device.
    Net(NetSpec),
}

impl DeviceSpec {
    /// `"blk"` or `"net"`, as the control API names kinds; also the prefix
    /// of default ids.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSpec::Blk(_) => "blk",
            DeviceSpec::Net(_) => "net",
        }
    }

    /// The spec's `id=`, if it has one.
    pub fn id(&self) -> Option<&str> {
        match self {
            DeviceSpec::Blk(spec) => spec.id.as_deref(),
            DeviceSpec::Net(spec) => spec.id.as_deref(),
        }
    }

    /// The vhost-user socket to listen on.
    pub fn socket(&self) -> &Path {
        match self {
            DeviceSpec::Blk(spec) => &spec.socket,
            DeviceSpec::Net(spec) => &spec.socket,
        }
    }
}

/// A device could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// The agent is stopping every device; no more come or go.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// Another device has this id (the control API addresses devices by id).
    #[error("two devices are named {0}; each device needs a distinct id=")]
    DuplicateId(String),
    /// Another device of this agent listens on the socket.
    #[error("socket {socket} belongs to device {owner}")]
    SocketTaken {
        /// The socket asked for.
        socket: PathBuf,
        /// The device that has it.
        owner: String,
    },
    /// The disk could not be set up (image, engine, socket).
    #[error("cannot set up blk device {id}")]
    Blk {
        /// The device's id.
        id: String,
        /// Cause.
        #[source]
        source: BlkSetupError,
    },
    /// The net device could not be set up (dataplane, RSS, socket).
    #[error("cannot set up net device {id}")]
    Net {
        /// The device's id.
        id: String,
        /// Cause.
        #[source]
        source: NetSetupError,
    },
    /// The registry refused the device.
    #[error(transparent)]
    Register(#[from] RegistryError),
    /// The protocol thread could not be started.
    #[error("cannot start the protocol thread of {id}")]
    Thread {
        /// The device's id.
        id: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// No device has this id.
    #[error("device '{0}' not found")]
    NotFound(String),
    /// The device is stopping after an earlier removal.
    #[error("device {0} is being removed already")]
    BeingRemoved(String),
}

/// A device's protocol thread and the handle that stops it.
struct Running {
    id: String,
    shutdown: ServerHandle,
    thread: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    running: Vec<Running>,
    shutting_down: bool,
}

/// Removals whose protocol thread has not been joined yet; the agent's
/// shutdown waits for them.
#[derive(Default)]
struct Removals {
    in_progress: Mutex<usize>,
    finished: Condvar,
}

impl Removals {
    fn begin(&self) {
        *self.in_progress.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn end(&self) {
        let mut count = self.in_progress.lock().unwrap_or_else(|p| p.into_inner());
        *count = count.saturating_sub(1);
        self.finished.notify_all();
    }

    fn wait_idle(&self) {
        let mut count = self.in_progress.lock().unwrap_or_else(|p| p.into_inner());
        while *count > 0 {
            count = self.finished.wait(count).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The served devices and their protocol threads. Shared (in an `Arc`) by
/// `serve` and the control API thread.
pub struct Devices {
    registry: Arc<Registry>,
    /// `serve --presetup-protocol`, for net devices added at any time.
    presetup_protocol: PresetupProtocol,
    state: Mutex<State>,
    removals: Arc<Removals>,
}

impl Devices {
    /// No devices yet; `registry` is where they will be listed.
    pub fn new(registry: Arc<Registry>) -> Devices {
        Devices {
            registry,
            presetup_protocol: PresetupProtocol::default(),
            state: Mutex::new(State::default()),
            removals: Arc::new(Removals::default()),
        }
    }

    /// Serve net devices with this in-band presetup protocol
    /// (`serve --presetup-protocol`).
    pub fn with_presetup_protocol(mut self, protocol: PresetupProtocol) -> Devices {
        self.presetup_protocol = protocol;
        self
    }

    /// The served devices by id, for reading.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first of `kind0`, `kind1`, ... that no device has: the id of an
    /// `add-device` spec without `id=`.
    pub fn unused_id(&self, kind: &str) -> String {
        (0u64..)
            .map(|n| format!("{kind}{n}"))
            .find(|id| self.registry.get(id).is_none())
            .expect("fewer than u64::MAX devices exist, so some id is free")
    }

    /// Bind, register and start the device `spec` describes, named by its
    /// `id=` or else `default_id`. On error nothing is left: no socket
    /// file, no registry entry, no thread. Quick (it opens the image or
    /// dataplane and binds a socket), so the control thread may call it.
    pub fn add(
        &self,
        spec: &DeviceSpec,
        default_id: &str,
    ) -> Result<Arc<RegisteredDevice>, DevicesError> {
        let id = spec.id().unwrap_or(default_id).to_string();
        // Held throughout, so a shutdown cannot miss a device added while
        // it starts, and two adds cannot both take one id or socket.
        let mut state = self.state();
        if state.shutting_down {
            return Err(DevicesError::ShuttingDown);
        }
        if self.registry.get(&id).is_some() {
            return Err(DevicesError::DuplicateId(id));
        }
        // Checked here rather than left to the bind: probing a live socket
        // connects to it, and one of our own devices would take that probe
        // for a front-end (and close a fence=api gate).
        let wanted = resolved(spec.socket());
        if let Some(owner) = self
            .registry
            .list()
            .into_iter()
            .find(|device| resolved(device.socket()) == wanted)
        {
            return Err(DevicesError::SocketTaken {
                socket: spec.socket().to_path_buf(),
                owner: owner.id().to_string(),
            });
        }
        // The server owns the socket file: dropping `run` unused (on any
        // error below) removes it.
        let bound = match spec {
            DeviceSpec::Blk(spec) => bind_blk(spec, &id).map_err(|source| DevicesError::Blk {
                id: id.clone(),
                source,
            })?,
            DeviceSpec::Net(spec) => {
                bind_net(spec, &id, self.presetup_protocol).map_err(|source| DevicesError::Net {
                    id: id.clone(),
                    source,
                })?
            }
        };
        let shutdown = bound.server.handle();
        let server = bound.server;
        let device = bound.device;
        let run = move || server.run();
        let device = self.registry.insert(device)?;
        let thread = match std::thread::Builder::new()
            .name("protocol".into())
            .spawn(run)
        {
            Ok(thread) => thread,
            Err(source) => {
                // The closure, and with it the server, was dropped.
                self.registry.remove(&id);
                return Err(DevicesError::Thread { id, source });
            }
        };
        state.running.push(Running {
            id,
            shutdown,
            thread,
        });
        Ok(device)
    }

    /// Start removing device `id`: its protocol thread is told to stop at
    /// once; [`Removal::wait`] waits for it and frees the id. Until then
    /// the device is still listed (and its id and socket taken).
    pub fn remove(&self, id: &str) -> Result<Removal, DevicesError> {
        let mut state = self.state();
        if state.shutting_down {
            return Err(DevicesError::ShuttingDown);
        }
        let Some(device) = self.registry.get(id) else {
            return Err(DevicesError::NotFound(id.to_string()));
        };
        let Some(index) = state.running.iter().position(|running| running.id == id) else {
            return Err(DevicesError::BeingRemoved(id.to_string()));
        };
        let running = state.running.remove(index);
        self.removals.begin();
        drop(state);
        let handed_off_before = device.metrics().report().handed_off_total;
        running.shutdown.shutdown();
        Ok(Removal {
            device,
            thread: Some(running.thread),
            registry: self.registry.clone(),
            removals: self.removals.clone(),
            handed_off_before,
        })
    }

    /// Stop every device (the agent is going away): each protocol thread is
    /// told to stop, then joined, and removals under way are waited for.
    /// Devices cannot be added or removed any more.
    pub fn shut_down(&self) {
        let running = {
            let mut state = self.state();
            state.shutting_down = true;
            std::mem::take(&mut state.running)
        };
        for device in &running {
            device.shutdown.shutdown();
        }
        for device in running {
            if device.thread.join().is_err() {
                log::error!("{}: the protocol thread panicked", device.id);
            }
        }
        self.removals.wait_idle();
    }
}

/// `path` made absolute with its directory's symlinks resolved, so two
/// spellings of one socket compare equal (the file itself may not exist).
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(directory), Some(name)) => directory
            .canonicalize()
            .map(|directory| directory.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

/// A device being removed: its protocol thread was told to stop.
pub struct Removal {
    device: Arc<RegisteredDevice>,
    thread: Option<JoinHandle<()>>,
    registry: Arc<Registry>,
    removals: Arc<Removals>,
    handed_off_before: u64,
}

/// What a finished removal reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The id, free again.
    pub id: String,
    /// Requests the stop left in the front-end's inflight region: writes a
    /// closed write fence held (blk; always 0 for net).
    pub handed_off: u64,
}

impl Removal {
    /// The device's id.
    pub fn id(&self) -> &str {
        self.device.id()
    }

    /// Wait until the protocol thread has ended (the front-end is
    /// disconnected, requests storage has are answered, the socket file is
    /// gone), then unregister the device. Blocks for as long as that
    /// takes: the longest storage operation in flight, or a GET_VRING_BASE
    /// the protocol thread is draining behind a closed write fence (until
    /// fence-release).
    pub fn wait(mut self) -> Removed {
        self.finish();
        Removed {
            id: self.device.id().to_string(),
            handed_off: self
                .device
                .metrics()
                .report()
                .handed_off_total
                .saturating_sub(self.handed_off_before),
        }
    }

    fn finish(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if thread.join().is_err() {
            log::error!("{}: the protocol thread panicked", self.device.id());
        }
        self.registry.remove(self.device.id());
        self.removals.end();
    }
}

impl Drop for Removal {
    /// A removal is always completed, so the agent's shutdown, which waits
    /// for removals, cannot hang on one nobody waited for.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(dir: &Path, extra: &str) -> DeviceSpec {
        let image = dir.join("disk.img");
        if !image.exists() {
            std::fs::File::create(&image)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        }
        DeviceSpec::Blk(
            format!("image={},engine=threads,{extra}", image.display())
                .parse()
                .unwrap(),
        )
    }

    fn ids(devices: &Devices) -> Vec<String> {
        devices
            .registry()
            .list()
            .iter()
            .map(|device| device.id().to_string())
            .collect()
    }

    #[test]
    fn default_ids_take_the_first_free_number() {
        let dir = tempfile::tempdir().unwrap();
        let devices = Devices::new(Arc::new(Registry::new()));
        let socket = |name: &str| format!("socket={}", dir.path().join(name).display());
        devices.add(&blk(dir.path(), &socket("a")), "blk0").unwrap();
        assert_eq!(devices.unused_id("blk"), "blk1");
        assert_eq!(devices.unused_id("net"), "net0");
        devices
            .add(&blk(dir.path(), &format!("{},id=blk1", socket("b"))), "x")
            .unwrap();
        assert_eq!(devices.unused_id("blk"), "blk2");
        devices.remove("blk0").unwrap().wait();
        assert_eq!(devices.unused_id("blk"), "blk0");
        devices.shut_down();
    }

    #[test]
    fn refused_adds_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let devices = Devices::new(Arc::new(Registry::new()));
        let first = dir.path().join("first.sock");
        devices
            .add(
                &blk(dir.path(), &format!("socket={}", first.display())),
                "blk0",
            )
            .unwrap();

        let second = dir.path().join("second.sock");
        let spec = blk(dir.path(), &format!("socket={},id=blk0", second.display()));
        let error = devices.add(&spec, "unused").unwrap_err();
        assert!(matches!(error, DevicesError::DuplicateId(ref id) if id == "blk0"));
        assert!(!second.exists());

        // The same socket, spelled differently.
        let again = dir.path().join(".").join("first.sock");
        let spec = blk(dir.path(), &format!("socket={}", again.display()));
        let error = devices.add(&spec, "blk1").unwrap_err();
        assert!(
            matches!(error, DevicesError::SocketTaken { ref owner, .. } if owner == "blk0"),
            "{error}"
        );

        let spec = DeviceSpec::Blk(
            format!(
                "socket={},image={}",
                second.display(),
                dir.path().join("missing.img").display()
            )
            .parse()
            .unwrap(),
        );
        let error = devices.add(&spec, "blk1").unwrap_err();
        assert!(matches!(error, DevicesError::Blk { .. }), "{error}");
        assert!(!second.exists());
        assert_eq!(ids(&devices), ["blk0"]);
        devices.shut_down();
        assert!(!first.exists(), "shutdown removes the socket file");
    }

    #[test]
    fn a_removed_device_frees_its_id_and_socket() {
        let dir = tempfile::tempdir().unwrap();
        let devices = Devices::new(Arc::new(Registry::new()));
        let socket = dir.path().join("disk.sock");
        let spec = blk(dir.path(), &format!("socket={},id=disk", socket.display()));
        devices.add(&spec, "blk0").unwrap();
        assert!(socket.exists());

        let removal = devices.remove("disk").unwrap();
        assert_eq!(removal.id(), "disk");
        let error = devices.remove("disk").err().unwrap();
        assert!(matches!(error, DevicesError::BeingRemoved(_)), "{error}");
        let removed = removal.wait();
        assert_eq!(
            removed,
            Removed {
                id: "disk".into(),
                handed_off: 0
            }
        );
        assert!(!socket.exists());
        assert!(ids(&devices).is_empty());
        let error = devices.remove("disk").err().unwrap();
        assert!(matches!(error, DevicesError::NotFound(_)), "{error}");

        devices.add(&spec, "blk0").unwrap();
        assert_eq!(ids(&devices), ["disk"]);
        devices.shut_down();
        let error = devices.add(&spec, "blk0").unwrap_err();
        assert!(matches!(error, DevicesError::ShuttingDown));
        assert!(matches!(
            devices.remove("disk").err().unwrap(),
            DevicesError::ShuttingDown
        ));
    }

    #[test]
    fn a_removal_dropped_unwaited_still_completes() {
        let dir = tempfile::tempdir().unwrap();
        let devices = Devices::new(Arc::new(Registry::new()));
        let socket = dir.path().join("disk.sock");
        devices
            .add(
                &blk(dir.path(), &format!("socket={}", socket.display())),
                "blk0",
            )
            .unwrap();
        drop(devices.remove("blk0").unwrap());
        assert!(!socket.exists());
        assert!(ids(&devices).is_empty());
        devices.shut_down();
    }
}
