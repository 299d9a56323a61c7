//! The devices this agent serves, by id: what the control API looks up and
//! reports. Entries hold shared handles (a disk's write fence), never the
//! device's protocol state, so reading them never waits for a protocol
//! thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use blkdev::fence::Fence;

use crate::metrics::DeviceMetrics;
use crate::vhost_user::listener::ServerHandle;
use crate::vhost_user::session::ConfigSnapshot;

/// A device could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Another device already has this id; the control API addresses
    /// devices by id, so ids must be unique.
    #[error("two devices are named {0}; give each --blk and --net a distinct id=")]
    DuplicateId(String),
}

/// What kind of device an entry is, with the handles the control API needs
/// for that kind.
#[derive(Debug, Clone)]
pub enum DeviceKind {
    /// A virtio-blk disk.
    Blk {
        /// The disk's image file or block device.
        image: PathBuf,
        /// The disk's write fence, shared with its queues.
        fence: Arc<Fence>,
        /// What its queues publish (requests in flight per queue).
        disk: Arc<blkdev::queue::DiskShared>,
        /// Its queues.
        num_queues: u16,
    },
    /// A virtio-net device.
    Net {
        /// Its counters and agent-side state.
        shared: Arc<crate::net::NetShared>,
    },
}

impl DeviceKind {
    /// The kind's name in the control API (`"blk"` or `"net"`).
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Blk { .. } => "blk",
            DeviceKind::Net { .. } => "net",
        }
    }
}

/// One served device.
#[derive(Debug, Clone)]
pub struct RegisteredDevice {
    id: String,
    socket: PathBuf,
    kind: DeviceKind,
    metrics: Arc<DeviceMetrics>,
    config: Arc<ConfigSnapshot>,
    server: ServerHandle,
}

impl RegisteredDevice {
    /// A device named `id` serving on `socket`, whose session keeps
    /// `metrics`, publishes its configuration in `config` and is reached
    /// through `server`.
    pub fn new(
        id: &str,
        socket: &Path,
        kind: DeviceKind,
        metrics: Arc<DeviceMetrics>,
        config: Arc<ConfigSnapshot>,
        server: ServerHandle,
    ) -> RegisteredDevice {
        RegisteredDevice {
            id: id.to_string(),
            socket: socket.to_path_buf(),
            kind,
            metrics,
            config,
            server,
        }
    }

    /// A device nobody serves (no session, no socket bound): what the
    /// control API's own tests and the `control_line` fuzz target register.
    pub fn unserved(id: &str, socket: &Path, kind: DeviceKind) -> RegisteredDevice {
        RegisteredDevice::new(
            id,
            socket,
            kind,
            Arc::new(DeviceMetrics::new(id)),
            Arc::default(),
            ServerHandle::unserved(),
        )
    }

    /// Its timeline and downtime figures, shared with its session.
    pub fn metrics(&self) -> &Arc<DeviceMetrics> {
        &self.metrics
    }

    /// The configuration the device last published (`query-config`).
    pub fn config(&self) -> Option<presetup::DeviceConfig> {
        self.config.get()
    }

    /// The device's protocol thread (presetup goes through it).
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// The device's id (`id=` or the default `blkN`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The vhost-user socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its kind and kind-specific handles.
    pub fn kind(&self) -> &DeviceKind {
        &self.kind
    }
}

/// The served devices, in the order they were added. Shared between the
/// startup code that adds devices and the control API thread that reads
/// them.
#[derive(Debug, Default)]
pub struct Registry {
    devices: RwLock<Vec<Arc<RegisteredDevice>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Add `device`; its id must be new.
    pub fn insert(&self, device: RegisteredDevice) -> Result<Arc<RegisteredDevice>, RegistryError> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        if devices.iter().any(|existing| existing.id == device.id) {
            return Err(RegistryError::DuplicateId(device.id));
        }
        let device = Arc::new(device);
        devices.push(device.clone());
        Ok(device)
    }

    /// Take the device named `id` out (its server has stopped); the id is
    /// free again.
    pub fn remove(&self, id: &str) -> Option<Arc<RegisteredDevice>> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let index = devices.iter().position(|device| device.id == id)?;
        Some(devices.remove(index))
    }

    /// The device named `id`.
    pub fn get(&self, id: &str) -> Option<Arc<RegisteredDevice>> {
        self.devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|device| device.id == id)
            .cloned()
    }

    /// Every device, in the order they were added.
    pub fn list(&self) -> Vec<Arc<RegisteredDevice>> {
        self.devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkdev::FenceMode;

    fn blk(id: &str) -> RegisteredDevice {
        let image = PathBuf::from(format!("/nonexistent/{id}.img"));
        let fence = Fence::new(FenceMode::Api, &image);
        let file = Arc::new(tempfile::tempfile().unwrap());
        let disk = Arc::new(blkdev::queue::DiskShared::new(file, 8, false, id));
        RegisteredDevice::new(
            id,
            Path::new(&format!("/nonexistent/{id}.sock")),
            DeviceKind::Blk {
                image,
                fence,
                disk,
                num_queues: 1,
            },
            Arc::new(DeviceMetrics::new(id)),
            Arc::default(),
            ServerHandle::unserved(),
        )
    }

    #[test]
    fn devices_are_found_by_id_in_insertion_order() {
        let registry = Registry::new();
        registry.insert(blk("b")).unwrap();
        registry.insert(blk("a")).unwrap();
        let ids: Vec<_> = registry.list().iter().map(|d| d.id().to_string()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(registry.get("a").unwrap().kind().name(), "blk");
        assert!(registry.get("c").is_none());
    }

    #[test]
    fn a_duplicate_id_is_refused() {
        let registry = Registry::new();
        registry.insert(blk("disk")).unwrap();
        let error = registry.insert(blk("disk")).unwrap_err();
        assert!(matches!(error, RegistryError::DuplicateId(ref id) if id == "disk"));
        assert_eq!(registry.list().len(), 1);
    }

    #[test]
    fn a_removed_id_can_be_registered_again() {
        let registry = Registry::new();
        registry.insert(blk("a")).unwrap();
        registry.insert(blk("b")).unwrap();
        assert_eq!(registry.remove("a").unwrap().id(), "a");
        assert!(registry.remove("a").is_none());
        assert!(registry.get("a").is_none());
        registry.insert(blk("a")).unwrap();
        let ids: Vec<_> = registry.list().iter().map(|d| d.id().to_string()).collect();
        assert_eq!(ids, ["b", "a"]);
    }
}
