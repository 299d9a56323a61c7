//! The `vhost` crate's request handler trait, implemented once for every
//! device: each method turns its message into session state, validates it
//! and, where the device must follow, runs a plan.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut};

use super::rings::GetBase;
use super::{Session, SessionError};
use crate::vhost_user::device::StopMode;
use crate::vhost_user::memory::MAX_MEM_SLOTS;
use crate::vhost_user::status::read_config;
use crate::vhost_user::vring::frontend_addresses;

/// Kick and call fds must be eventfds (a memfd or /dev/null would be
/// polled and read as one).
fn check_eventfd(index: u32, fd: Option<&File>, which: &'static str) -> Result<(), SessionError> {
    match fd {
        Some(file) => crate::vhost_user::fd_kind::check_eventfd(file, which)
            .map_err(|source| SessionError::NotAnEventfd { index, source }),
        None => Ok(()),
    }
}

fn unsupported<T>(what: &'static str) -> VhostResult<T> {
    Err(SessionError::Unsupported(what).into())
}

impl Session {
    /// The virtio features offered: the device's plus the vhost-user
    /// transport bits.
    fn offered_features(&self) -> u64 {
        self.device.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    /// The protocol features offered: the device's plus the in-band
    /// presetup bit when the switch is on and the device takes it.
    pub(super) fn offered_protocol_features(&self) -> u64 {
        let inband = if self.device.supports_inband_presetup() {
            self.inband.protocol_features()
        } else {
            0
        };
        self.device.protocol_features() | inband
    }

    /// Log guest memory writes exactly while a log is mapped and
    /// VHOST_F_LOG_ALL is acked, the agent's own through its guest memory
    /// and the device's (a kernel datapath writing guest memory itself)
    /// through [`crate::vhost_user::device::Device::set_log`].
    fn update_logging(&mut self) -> Result<(), SessionError> {
        let log_all = self.acked_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.log.apply(&mut self.memory, log_all) {
            log::info!(
                "{}: dirty page logging {}",
                self.name,
                if self.memory.logging() { "on" } else { "off" }
            );
        }
        self.device.set_log(self.log.active(log_all)).map_err(|e| {
            // Writes the device makes would go unlogged: a migration
            // over this device is not safe any more.
            self.status.raise_needs_reset();
            SessionError::Device(e)
        })
    }

    /// RESET_DEVICE: rings stop and are forgotten, and so are the
    /// negotiated features and the inflight region; memory stays.
    fn reset(&mut self) {
        self.stop_all_rings(StopMode::Detach);
        for ring in &mut self.rings {
            ring.kick = None;
            ring.enabled = false;
        }
        self.inflight = None;
        self.acked_features = 0;
        self.features_set = false;
        self.status.reset();
        if let Err(e) = self.update_logging() {
            log::warn!(
                "{}: dirty logging after the reset: {}",
                self.name,
                crate::error_chain(&e)
            );
        }
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.disconnected();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let unoffered = features & !self.offered_features();
        if unoffered != 0 {
            return Err(SessionError::Features(unoffered).into());
        }
        if features != self.acked_features || !self.features_set {
            log::info!("{}: features acked {features:#x}", self.name);
        }
        self.acked_features = features;
        self.features_set = true;
        self.update_logging()?;
        Ok(self.reconcile(None)?)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<u64>>> {
        self.table.set(ctx, files).map_err(SessionError::from)?;
        let same = !self.table.is_empty() && {
            let keys = |regions: Vec<presetup::MemoryRegion>| {
                let mut keys: Vec<_> = regions.iter().map(presetup::MemoryRegion::key).collect();
                keys.sort();
                keys
            };
            keys(self.table.describe()) == keys(self.memory.describe())
        };
        if same {
            log::info!(
                "{}: memory table with {} region(s) unchanged; mappings kept",
                self.name,
                ctx.len()
            );
        } else {
            log::info!("{}: memory table with {} region(s)", self.name, ctx.len());
        }
        self.reconcile(None)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let max = self.device.max_ring_size();
        let size = match u16::try_from(num) {
            Ok(size) if size != 0 && size <= max && size.is_power_of_two() => size,
            _ => {
                return Err(SessionError::QueueSize {
                    index,
                    size: num,
                    max,
                }
                .into())
            }
        };
        let (_, state) = self.ring_index(index)?;
        if state.running && state.size != size {
            return Err(SessionError::RingRunning {
                index,
                request: "SET_VRING_NUM",
            }
            .into());
        }
        if let Some(addresses) = state.addresses {
            self.check_ring_extent(index, size, &addresses)?;
        }
        let (ring, state) = self.ring_index(index)?;
        state.size = size;
        self.metrics.ring_configured(ring);
        Ok(self.reconcile(Some(index))?)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        for (which, addr) in [
            ("descriptor table", descriptor),
            ("used ring", used),
            ("avail ring", available),
        ] {
            if self.table.translate(addr).is_none() {
                return Err(SessionError::RingAddress { index, which, addr }.into());
            }
        }
        let addresses = frontend_addresses(descriptor, used, available);
        let (_, state) = self.ring_index(index)?;
        let size = state.size;
        if size != 0 {
            self.check_ring_extent(index, size, &addresses)?;
        }
        let (_, state) = self.ring_index(index)?;
        if state.running && state.addresses != Some(addresses) {
            return Err(SessionError::RingRunning {
                index,
                request: "SET_VRING_ADDR",
            }
            .into());
        }
        state.addresses = Some(addresses);
        Ok(self.reconcile(Some(index))?)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        // Split rings carry a 16-bit index; higher bits are for packed rings.
        let next_avail = u16::try_from(base).map_err(|_| SessionError::RingBase { index, base })?;
        let (_, state) = self.ring_index(index)?;
        if state.running {
            return Err(SessionError::RingRunning {
                index,
                request: "SET_VRING_BASE",
            }
            .into());
        }
        state.next_avail = next_avail;
        Ok(self.reconcile(Some(index))?)
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let next_avail = self.get_base(index, GetBase::Plain)?;
        self.publish();
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let index = u32::from(index);
        check_eventfd(index, fd.as_ref(), "kick")?;
        let (ring, state) = self.ring_index(index)?;
        if state.running {
            // A new kick for a running ring restarts it where it stood.
            self.stop_ring(ring, StopMode::Drain, false);
        }
        let in_bracket = self.bracket.is_open();
        let name = self.name.clone();
        let (_, state) = self.ring_index(index)?;
        if in_bracket && fd.is_some() {
            // Inside a presetup bracket guest RAM has not been migrated yet:
            // the ring must not start (starting reads used->idx). The RFC
            // sends no fd here; one that came anyway waits for the real
            // start's SET_VRING_KICK.
            log::warn!("{name}: kick fd for queue {index} inside a presetup bracket is dropped; the queue starts with the real start");
            state.kick = None;
            return Ok(());
        }
        state.kick = fd;
        Ok(self.reconcile(None)?)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let index = u32::from(index);
        check_eventfd(index, fd.as_ref(), "call")?;
        let (_, state) = self.ring_index(index)?;
        state.call = fd.map(Arc::new);
        state.call_pending = true;
        Ok(self.reconcile(Some(index))?)
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        // Ring errors are reported through NEEDS_RESET, never through the
        // err eventfd; the fd closes.
        self.ring_index(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::from_bits_retain(
            self.offered_protocol_features(),
        ))
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        // The vhost crate offers REPLY_ACK on top of what we offer.
        let offered =
            self.offered_protocol_features() | VhostUserProtocolFeatures::REPLY_ACK.bits();
        let unoffered = features & !offered;
        if unoffered != 0 {
            return Err(SessionError::ProtocolFeatures(unoffered).into());
        }
        log::info!("{}: protocol features acked {features:#x}", self.name);
        self.acked_protocol_features = features;
        self.device.protocol_features_acked(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.device.queue_num())
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let (ring, state) = self.ring_index(index)?;
        let changed = state.enabled != enable;
        state.enabled = enable;
        if changed && self.device_is_net() && ring.is_multiple_of(2) {
            log::info!(
                "{}: queue pair {} {}",
                self.name,
                ring / 2,
                if enable { "enabled" } else { "disabled" }
            );
        }
        Ok(self.reconcile(Some(index))?)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        let space = self.device.config_space();
        Ok(read_config(&space, offset, size).ok_or(SessionError::ConfigRead { offset, size })?)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.device
            .set_config(offset, buf)
            .map_err(SessionError::from)?;
        Ok(self.reconcile(None)?)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        unsupported("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        unsupported("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        Ok(self.inflight_get(inflight)?)
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        Ok(self.inflight_set(inflight, file)?)
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<u64>> {
        self.table.add(region, fd).map_err(SessionError::from)?;
        self.reconcile(None)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.table.remove(region).map_err(SessionError::from)?;
        Ok(self.reconcile(None)?)
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VhostResult<Option<File>> {
        self.transfer_start(direction, phase, fd)?;
        // The pipe QEMU gave is used: no fd back.
        Ok(None)
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Ok(self.transfer_check()?)
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        unsupported("GET_SHMEM_CONFIG")
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        self.log
            .map(&file, size, offset)
            .map_err(|source| SessionError::LogMap {
                size,
                offset,
                source,
            })?;
        log::info!(
            "{}: dirty log of {size} bytes (covers {} MiB of guest memory)",
            self.name,
            size.saturating_mul(8 * 4096) >> 20
        );
        self.update_logging()?;
        Ok(())
    }
}

impl Session {
    fn device_is_net(&self) -> bool {
        matches!(self.device.device_config(), presetup::DeviceKind::Net(_))
    }
}
