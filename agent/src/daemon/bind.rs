//! Building a served device from a `--blk` or `--net` spec: open the image
//! or the dataplane, make the device and its session, bind the socket.

use std::sync::Arc;

use blkdev::engine::EngineKind;
use blkdev::queue::DiskShared;
use blkdev::{BlkConfig, Storage, StorageError};

use super::registry::{DeviceKind, RegisteredDevice};
use super::spec::{BlkSpec, EngineChoice, NetSpec};
use crate::blk::{BlkDevice, BlkStorage, EngineRecipe, StorageParts};
use crate::metrics::DeviceMetrics;
use crate::net::vdpa::VdpaNetDevice;
use crate::net::vhost_net::VhostNetDevice;
use crate::net::{NetDevice, NetOptions};
use crate::vhost_user::inband::PresetupProtocol;
use crate::vhost_user::listener::{DeviceServer, ListenError};
use crate::vhost_user::memory::MemoryMap;
use crate::vhost_user::session::Session;
use crate::vhost_user::status::DeviceStatus;

/// A disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BlkSetupError {
    /// The image could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The socket could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// engine=io_uring was asked for and io_uring is unavailable.
    #[error("io_uring is unavailable: {0}")]
    NoIoUring(String),
    /// The image is smaller than one sector.
    #[error("{0} is smaller than one 512-byte sector")]
    TooSmall(String),
}

/// Resolve the engine choice, probing io_uring once; the choice is logged.
pub fn choose_engine(choice: EngineChoice) -> Result<EngineKind, BlkSetupError> {
    match choice {
        EngineChoice::Threads => Ok(EngineKind::ThreadPool),
        EngineChoice::IoUring => match EngineKind::probe() {
            (EngineKind::IoUring, _) => Ok(EngineKind::IoUring),
            (_, reason) => Err(BlkSetupError::NoIoUring(reason.unwrap_or_default())),
        },
        EngineChoice::Auto => {
            let (kind, reason) = EngineKind::probe();
            if let Some(reason) = reason {
                log::warn!("io_uring unavailable ({reason}); using the thread-pool engine");
            }
            Ok(kind)
        }
    }
}

/// A device whose socket is bound, ready to serve.
pub struct Bound {
    /// Its protocol server; `run` it on a thread of its own.
    pub server: DeviceServer,
    /// What the control API sees of it.
    pub device: RegisteredDevice,
}

/// Open the disk, make its session and bind its socket; `name` is its id.
pub fn bind_blk(spec: &BlkSpec, name: &str) -> Result<Bound, BlkSetupError> {
    let storage = Storage::open(&spec.image, spec.options.readonly, spec.options.direct)?;
    if storage.size_bytes() < blkdev::spec::SECTOR_SIZE {
        return Err(BlkSetupError::TooSmall(spec.image.display().to_string()));
    }
    let engine = choose_engine(spec.engine)?;
    let size_bytes = storage.size_bytes();
    let config = BlkConfig::new(spec.options.clone(), size_bytes);
    let disk = Arc::new(DiskShared::new(
        Arc::new(storage.into_file()),
        config.capacity_sectors(),
        spec.options.readonly,
        &spec.options.serial,
    ));
    log::info!(
        "{name}: {} ({} bytes, {} queue(s) of up to {}, {}{}engine {})",
        spec.image.display(),
        size_bytes,
        spec.options.num_queues,
        spec.options.queue_size,
        if spec.options.readonly {
            "read-only, "
        } else {
            ""
        },
        if spec.options.direct {
            "O_DIRECT, "
        } else {
            ""
        },
        engine.name()
    );
    let fence = blkdev::fence::Fence::new(spec.options.fence, &spec.image);
    let memory = MemoryMap::default();
    let status = DeviceStatus::default();
    let storage = BlkStorage::new(StorageParts {
        name: Arc::from(name),
        image: spec.image.clone(),
        disk: disk.clone(),
        recipe: EngineRecipe {
            kind: engine,
            latency: std::time::Duration::from_millis(u64::from(spec.options.latency_ms)),
        },
        num_queues: spec.options.num_queues,
        memory: memory.atomic(),
        needs_reset: status.needs_reset_flag(),
        fence: fence.clone(),
        poll: std::time::Duration::from_micros(u64::from(spec.options.poll_us)),
    });
    let device = BlkDevice::new(config, storage, fence.clone());
    let kind = DeviceKind::Blk {
        image: spec.image.clone(),
        fence,
        disk,
        num_queues: spec.options.num_queues,
    };
    let parts = DeviceParts {
        memory,
        status,
        inband: PresetupProtocol::None,
    };
    Ok(serve_device(
        name,
        &spec.socket,
        Box::new(device),
        kind,
        parts,
    )?)
}

/// What a device's session is made of besides the device.
struct DeviceParts {
    memory: MemoryMap,
    status: DeviceStatus,
    inband: PresetupProtocol,
}

/// The session of `device`, its socket at `socket`, and its registry entry.
fn serve_device(
    name: &str,
    socket: &std::path::Path,
    device: Box<dyn crate::vhost_user::device::Device>,
    kind: DeviceKind,
    parts: DeviceParts,
) -> Result<Bound, ListenError> {
    let metrics = Arc::new(DeviceMetrics::new(name));
    let session = Session::new(
        name,
        device,
        parts.memory,
        parts.status,
        metrics.clone(),
        parts.inband,
    );
    let server = DeviceServer::bind(socket, session)?;
    let device = RegisteredDevice::new(
        name,
        socket,
        kind,
        metrics,
        server.config_snapshot(),
        server.handle(),
    );
    Ok(Bound { server, device })
}

/// A net device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    /// The dataplane (tap, cost profile) could not be opened.
    #[error("cannot set up dataplane {dataplane}")]
    Dataplane {
        /// The dataplane as given.
        dataplane: String,
        /// Cause.
        #[source]
        source: netdev::dataplane::DataplaneError,
    },
    /// The RSS configuration is unusable.
    #[error("RSS configuration: {0}")]
    Rss(String),
    /// The data path thread could not start.
    #[error(transparent)]
    Datapath(#[from] crate::net::datapath::NetDatapathError),
    /// The kernel's vhost-net cannot be used (or the tap for it).
    #[error(transparent)]
    VhostNet(#[from] crate::net::vhost_net::VhostNetError),
    /// The vhost-vdpa device cannot be used.
    #[error(transparent)]
    Vdpa(#[from] crate::net::vdpa::VdpaError),
    /// A key that has no meaning for this dataplane.
    #[error("{key}= does not apply to dataplane {dataplane}: {why}")]
    NotForDataplane {
        /// The key.
        key: &'static str,
        /// The dataplane.
        dataplane: String,
        /// Why.
        why: &'static str,
    },
    /// The socket could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// Open the dataplane (a tap exists from here on), make the device and its
/// session and bind the socket; `name` is its id, `presetup_protocol` the
/// serve-wide in-band presetup switch.
pub fn bind_net(
    spec: &NetSpec,
    name: &str,
    presetup_protocol: PresetupProtocol,
) -> Result<Bound, NetSetupError> {
    let rss = spec.rss_config().map_err(NetSetupError::Rss)?;
    if let Some(config) = &rss {
        config
            .validate(spec.queue_pairs)
            .map_err(|e| NetSetupError::Rss(e.to_string()))?;
    }
    if let netdev::dataplane::DataplaneSpec::VhostNet(tap) = &spec.dataplane {
        return bind_vhost_net(spec, name, tap, rss, presetup_protocol);
    }
    if let netdev::dataplane::DataplaneSpec::Vdpa(path) = &spec.dataplane {
        return bind_vdpa(
            spec,
            name,
            &path.display().to_string(),
            rss,
            presetup_protocol,
        );
    }
    let dataplane = netdev::dataplane::Dataplane::open(
        &spec.dataplane,
        spec.queue_pairs,
        spec.mtu,
        spec.profile.as_deref(),
    )
    .map_err(|source| NetSetupError::Dataplane {
        dataplane: spec.dataplane.to_string(),
        source,
    })?;
    log::info!(
        "{name}: virtio-net on {}, {} queue pair(s), MTU {}, MAC {}{}",
        dataplane.describe(),
        spec.queue_pairs,
        spec.mtu,
        spec.mac,
        if rss.is_some() { ", RSS on" } else { "" }
    );
    let options = NetOptions {
        queue_pairs: spec.queue_pairs,
        mtu: spec.mtu,
        mac: spec.mac,
        poll: std::time::Duration::from_micros(u64::from(spec.poll_us)),
        rss,
    };
    let memory = MemoryMap::default();
    let status = DeviceStatus::default();
    let device = NetDevice::new(
        name,
        options,
        dataplane,
        memory.atomic(),
        status.needs_reset_flag(),
    )?;
    let device_shared = device.shared();
    serve_net(
        spec,
        name,
        Box::new(device),
        device_shared,
        memory,
        status,
        presetup_protocol,
    )
}

/// `dataplane=vhost-net:TAP`: the kernel's datapath on tap `tap`.
fn bind_vhost_net(
    spec: &NetSpec,
    name: &str,
    tap: &str,
    rss: Option<netdev::rss::RssConfig>,
    presetup_protocol: PresetupProtocol,
) -> Result<Bound, NetSetupError> {
    let options = kernel_options(
        spec,
        name,
        rss.is_some(),
        "the kernel picks the RX queue of a frame",
        "the kernel's configuration costs what it costs",
    )?;
    let memory = MemoryMap::default();
    let status = DeviceStatus::default();
    let device = VhostNetDevice::open(
        name,
        &options,
        tap,
        memory.atomic(),
        status.needs_reset_flag(),
    )?;
    log::info!(
        "{name}: virtio-net on the kernel's vhost-net, tap {tap}, {} queue pair(s), MTU {}, MAC {}",
        spec.queue_pairs,
        spec.mtu,
        spec.mac
    );
    let device_shared = device.shared();
    serve_net(
        spec,
        name,
        Box::new(device),
        device_shared,
        memory,
        status,
        presetup_protocol,
    )
}

/// The options of a kernel datapath (vhost-net, vdpa): `rss=` and
/// `profile=` refused with `rss_why` and `profile_why`, `poll-us=` ignored.
fn kernel_options(
    spec: &NetSpec,
    name: &str,
    rss: bool,
    rss_why: &'static str,
    profile_why: &'static str,
) -> Result<NetOptions, NetSetupError> {
    let refuse = |key, why| NetSetupError::NotForDataplane {
        key,
        dataplane: spec.dataplane.to_string(),
        why,
    };
    if rss {
        return Err(refuse("rss", rss_why));
    }
    if spec.profile.is_some() {
        return Err(refuse("profile", profile_why));
    }
    if spec.poll_us != 0 {
        log::warn!(
            "{name}: poll-us={} has no effect on {} (the kernel moves the frames)",
            spec.poll_us,
            spec.dataplane
        );
    }
    Ok(NetOptions {
        queue_pairs: spec.queue_pairs,
        mtu: spec.mtu,
        mac: spec.mac,
        poll: std::time::Duration::ZERO,
        rss: None,
    })
}

/// `dataplane=vdpa:PATH`: a kernel vhost-vdpa device.
fn bind_vdpa(
    spec: &NetSpec,
    name: &str,
    path: &str,
    rss: Option<netdev::rss::RssConfig>,
    presetup_protocol: PresetupProtocol,
) -> Result<Bound, NetSetupError> {
    let options = kernel_options(
        spec,
        name,
        rss.is_some(),
        "the device steers received frames itself (no control virtqueue to program)",
        "the device's configuration costs what it costs",
    )?;
    let memory = MemoryMap::default();
    let status = DeviceStatus::default();
    let device = VdpaNetDevice::open(
        name,
        &options,
        path,
        memory.atomic(),
        status.needs_reset_flag(),
    )?;
    log::info!(
        "{name}: virtio-net on vDPA device {path}, {} queue pair(s)",
        spec.queue_pairs
    );
    let device_shared = device.shared();
    serve_net(
        spec,
        name,
        Box::new(device),
        device_shared,
        memory,
        status,
        presetup_protocol,
    )
}

/// The session of a net device (either kind) and its bound socket.
fn serve_net(
    spec: &NetSpec,
    name: &str,
    device: Box<dyn crate::vhost_user::device::Device>,
    shared: Arc<crate::net::NetShared>,
    memory: MemoryMap,
    status: DeviceStatus,
    inband: PresetupProtocol,
) -> Result<Bound, NetSetupError> {
    let kind = DeviceKind::Net { shared };
    let parts = DeviceParts {
        memory,
        status,
        inband,
    };
    Ok(serve_device(name, &spec.socket, device, kind, parts)?)
}
