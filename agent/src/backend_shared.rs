//! What the block and the net back-end do the same way with the front-end's
//! messages: validate ring sizes, translate ring addresses, read a config
//! space, map the dirty log and switch logging with VHOST_F_LOG_ALL, and
//! keep the device status with its NEEDS_RESET bit.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserLog, VhostUserVirtioFeatures};
use vm_memory::GuestAddress;

use crate::blk_backend::{BackendError, DEVICE_STATUS_NEEDS_RESET};
use crate::dirty_log::LogRegion;
use crate::memory::MemoryMap;

/// A device's presetup description from what its back-end holds: the acked
/// features, the memory table, the rings (those whose addresses lie in the
/// current table) and the device part. Both back-ends' `query-config` and
/// switchover plans come from here.
pub fn device_config(
    acked_features: u64,
    protocol_features: u64,
    memory: &MemoryMap,
    rings: impl Iterator<Item = presetup::RingConfig>,
    device: presetup::DeviceKind,
) -> presetup::DeviceConfig {
    presetup::DeviceConfig {
        version: presetup::FORMAT_VERSION,
        acked_features,
        protocol_features,
        memory: memory.describe(),
        rings: rings.filter(|ring| memory.holds_ring(ring)).collect(),
        device,
    }
}

/// SET_VRING_NUM: a power of two from 1 to `max`.
pub fn ring_size(index: u32, num: u32, max: u16) -> Result<u16, BackendError> {
    match u16::try_from(num) {
        Ok(size) if size != 0 && size <= max && size.is_power_of_two() => Ok(size),
        _ => Err(BackendError::QueueSize {
            index,
            size: num,
            max,
        }),
    }
}

/// SET_VRING_ADDR: the descriptor table, avail ring and used ring as guest
/// physical addresses (the message carries front-end virtual addresses).
pub fn ring_addresses(
    memory: &MemoryMap,
    index: u32,
    descriptor: u64,
    used: u64,
    available: u64,
) -> Result<(GuestAddress, GuestAddress, GuestAddress), BackendError> {
    let translate = |which, addr| {
        memory
            .vmm_to_guest(addr)
            .ok_or(BackendError::RingAddress { index, which, addr })
    };
    Ok((
        translate("descriptor table", descriptor)?,
        translate("avail ring", available)?,
        translate("used ring", used)?,
    ))
}

/// GET_CONFIG: `size` bytes at `offset` of `space`. Front-ends may ask for
/// more than the device defines (newer config fields); those bytes read as
/// zero, like fields of features not offered.
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Result<Vec<u8>, BackendError> {
    let start = offset as usize;
    let end = start
        .checked_add(size as usize)
        .filter(|&end| end <= vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE as usize)
        .ok_or_else(|| BackendError::Config(format!("read of {size} bytes at {offset}")))?;
    let mut out = vec![0u8; end - start];
    if start < space.len() {
        let available = &space[start..end.min(space.len())];
        out[..available.len()].copy_from_slice(available);
    }
    Ok(out)
}

/// The front-end's dirty log (SET_LOG_BASE); guest memory writes go into it
/// while VHOST_F_LOG_ALL is acked.
#[derive(Default)]
pub struct DirtyLog {
    region: Option<Arc<LogRegion>>,
}

impl DirtyLog {
    /// SET_LOG_BASE: map the log the front-end shares.
    pub fn map(&mut self, name: &str, log: &VhostUserLog, file: &File) -> Result<(), BackendError> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let region = LogRegion::map(file, size, offset).map_err(|source| BackendError::LogMap {
            size,
            offset,
            source,
        })?;
        log::info!(
            "{name}: dirty log of {size} bytes (covers {} MiB of guest memory)",
            size.saturating_mul(8 * 4096) >> 20
        );
        self.region = Some(Arc::new(region));
        Ok(())
    }

    /// Log `memory`'s writes exactly while a log is mapped and
    /// VHOST_F_LOG_ALL is among `acked_features` (a migration runs).
    pub fn apply(&self, name: &str, memory: &mut MemoryMap, acked_features: u64) {
        let log_all = acked_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        let active = if log_all { self.region.clone() } else { None };
        if active.is_some() != memory.logging() {
            log::info!(
                "{name}: dirty page logging {}",
                if active.is_some() { "on" } else { "off" }
            );
        }
        memory.set_log(active);
    }

    /// The front-end went away: stop logging and drop the log and memory.
    pub fn forget(&mut self, memory: &mut MemoryMap) {
        memory.set_log(None);
        self.region = None;
        memory.clear();
    }
}

/// The virtio device status (SET_STATUS / GET_STATUS) and the NEEDS_RESET
/// flag the data path raises when a ring breaks.
#[derive(Default)]
pub struct DeviceStatus {
    status: u8,
    needs_reset: Arc<AtomicBool>,
}

impl DeviceStatus {
    /// The flag for the data path to raise.
    pub fn needs_reset_flag(&self) -> Arc<AtomicBool> {
        self.needs_reset.clone()
    }

    /// SET_STATUS; status 0 (a reset) also clears NEEDS_RESET.
    pub fn set(&mut self, name: &str, status: u8) {
        log::debug!("{name}: device status {status:#x}");
        self.status = status;
        if status == 0 {
            self.needs_reset.store(false, Ordering::SeqCst);
        }
    }

    /// GET_STATUS: the front-end's status plus NEEDS_RESET if a ring broke.
    pub fn get(&self) -> u8 {
        let mut status = self.status;
        if self.needs_reset.load(Ordering::SeqCst) {
            status |= DEVICE_STATUS_NEEDS_RESET;
        }
        status
    }

    /// Back to the state of a fresh device.
    pub fn reset(&mut self) {
        self.status = 0;
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Mark the device as needing a reset.
    pub fn raise_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_are_powers_of_two_up_to_the_maximum() {
        assert_eq!(ring_size(0, 256, 256).unwrap(), 256);
        assert_eq!(ring_size(0, 1, 256).unwrap(), 1);
        for bad in [0, 3, 512, 65536, u32::MAX] {
            assert!(ring_size(0, bad, 256).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn config_reads_pad_with_zeroes_and_refuse_overflow() {
        let space = [1u8, 2, 3, 4];
        assert_eq!(read_config(&space, 2, 4).unwrap(), [3, 4, 0, 0]);
        assert_eq!(read_config(&space, 10, 2).unwrap(), [0, 0]);
        assert!(read_config(&space, u32::MAX, 2).is_err());
        assert!(read_config(&space, 0, 1 << 20).is_err());
    }

    #[test]
    fn status_carries_needs_reset_until_a_reset() {
        let mut status = DeviceStatus::default();
        status.set("t", 0x0f);
        status.raise_needs_reset();
        assert_eq!(status.get(), 0x0f | DEVICE_STATUS_NEEDS_RESET);
        status.set("t", 0);
        assert_eq!(status.get(), 0);
    }
}
