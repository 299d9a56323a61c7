//! Building a served disk from a `--blk` spec: open the image, pick the
//! storage engine, bind the socket.

use std::sync::Arc;

use blkdev::engine::EngineKind;
use blkdev::queue::DiskShared;
use blkdev::{BlkConfig, Storage, StorageError};

use crate::blk_backend::BlkBackend;
use crate::blk_presetup::{BlkPresetup, EngineRecipe};
use crate::cli::{BlkSpec, EngineChoice};
use crate::registry::{DeviceKind, RegisteredDevice};
use crate::server::{DeviceServer, ServerError};

/// A disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The image could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The socket could not be bound.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// engine=io_uring was asked for and io_uring is unavailable.
    #[error("io_uring is unavailable: {0}")]
    NoIoUring(String),
    /// The image is smaller than one sector.
    #[error("{0} is smaller than one 512-byte sector")]
    TooSmall(String),
}

/// Resolve the engine choice, probing io_uring once; the choice is logged.
pub fn choose_engine(choice: EngineChoice) -> Result<EngineKind, DeviceError> {
    match choice {
        EngineChoice::Threads => Ok(EngineKind::ThreadPool),
        EngineChoice::IoUring => match EngineKind::probe() {
            (EngineKind::IoUring, _) => Ok(EngineKind::IoUring),
            (_, reason) => Err(DeviceError::NoIoUring(reason.unwrap_or_default())),
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

/// A disk whose socket is bound, ready to serve.
pub struct BoundBlk {
    /// Its protocol server; `run` it on a thread of its own.
    pub server: DeviceServer<BlkBackend>,
    /// What the control API sees of it (id, socket, image, write fence).
    pub device: RegisteredDevice,
}

/// Open the disk and bind its socket; `default_name` is used when the spec
/// has no id.
pub fn bind_blk(spec: &BlkSpec, default_name: &str) -> Result<BoundBlk, DeviceError> {
    let name = spec.id.clone().unwrap_or_else(|| default_name.to_string());
    let storage = Storage::open(&spec.image, spec.options.readonly, spec.options.direct)?;
    if storage.size_bytes() < blkdev::spec::SECTOR_SIZE {
        return Err(DeviceError::TooSmall(spec.image.display().to_string()));
    }
    let engine = choose_engine(spec.engine)?;
    let size_bytes = storage.size_bytes();
    let config = BlkConfig::new(spec.options.clone(), size_bytes);
    let file = Arc::new(storage.into_file());
    let disk = Arc::new(DiskShared::new(
        file,
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
    let presetup = Arc::new(BlkPresetup::new(
        disk.clone(),
        EngineRecipe {
            kind: engine,
            depth: spec.options.queue_size,
            latency: std::time::Duration::from_millis(u64::from(spec.options.latency_ms)),
        },
        presetup::BlkConfig {
            num_queues: spec.options.num_queues,
            queue_size: spec.options.queue_size,
            readonly: spec.options.readonly,
            direct: spec.options.direct,
            writeback: config.writeback(),
        },
    ));
    let device = RegisteredDevice::new(
        &name,
        &spec.socket,
        DeviceKind::Blk {
            image: spec.image.clone(),
            fence: fence.clone(),
            presetup: presetup.clone(),
        },
    );
    let backend = BlkBackend::new(
        &name,
        config,
        disk,
        engine,
        fence,
        device.metrics().clone(),
        presetup,
    );
    let server = DeviceServer::bind(&name, &spec.socket, backend)?;
    let device = device.with_config(server.config_snapshot());
    Ok(BoundBlk { server, device })
}

/// A net device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    /// The dataplane (tap, sim profile) could not be opened.
    #[error("cannot set up dataplane {dataplane}")]
    Dataplane {
        /// The dataplane as given.
        dataplane: String,
        /// Cause.
        #[source]
        source: netdev::dataplane::DataplaneError,
    },
    /// The RSS configuration is unusable.
    #[error("{0}")]
    Rss(String),
    /// The data path thread could not start.
    #[error(transparent)]
    Worker(#[from] crate::net_worker::NetWorkerError),
    /// The socket could not be bound.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// A net device whose socket is bound, ready to serve.
pub struct BoundNet {
    /// Its protocol server; `run` it on a thread of its own.
    pub server: DeviceServer<crate::net_backend::NetBackend>,
    /// What the control API sees of it.
    pub device: RegisteredDevice,
}

/// Open the dataplane (a tap exists from here on) and bind the socket;
/// `default_name` is used when the spec has no id, `presetup_protocol` is
/// the serve-wide in-band presetup switch.
pub fn bind_net(
    spec: &crate::cli::NetSpec,
    default_name: &str,
    presetup_protocol: crate::presetup_inband::PresetupProtocol,
) -> Result<BoundNet, NetDeviceError> {
    use crate::net_backend::{NetBackend, NetOptions};
    let name = spec.id.clone().unwrap_or_else(|| default_name.to_string());
    let rss = spec.rss_config().map_err(NetDeviceError::Rss)?;
    if let Some(config) = &rss {
        config
            .validate(spec.queue_pairs)
            .map_err(|e| NetDeviceError::Rss(format!("RSS configuration: {e}")))?;
    }
    let dataplane = netdev::dataplane::Dataplane::open(&spec.dataplane, spec.queue_pairs, spec.mtu)
        .map_err(|source| NetDeviceError::Dataplane {
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
        presetup_protocol,
    };
    let metrics = Arc::new(crate::metrics::DeviceMetrics::new(&name));
    let backend = NetBackend::new(&name, options, dataplane, metrics.clone())?;
    let device = RegisteredDevice::with_metrics(
        &name,
        &spec.socket,
        DeviceKind::Net {
            shared: backend.shared(),
        },
        metrics,
    );
    let server = DeviceServer::bind(&name, &spec.socket, backend)?;
    let device = device.with_config(server.config_snapshot());
    Ok(BoundNet { server, device })
}
