//! The virtio device status (SET_STATUS / GET_STATUS) with the NEEDS_RESET
//! bit a datapath raises when a ring breaks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// virtio device status bit DEVICE_NEEDS_RESET (virtio 1.2, 2.1).
pub const DEVICE_STATUS_NEEDS_RESET: u8 = 0x40;

/// The device status and the NEEDS_RESET flag (module documentation).
#[derive(Debug, Default)]
pub struct DeviceStatus {
    status: u8,
    needs_reset: Arc<AtomicBool>,
}

impl DeviceStatus {
    /// The flag for datapaths to raise.
    pub fn needs_reset_flag(&self) -> Arc<AtomicBool> {
        self.needs_reset.clone()
    }

    /// SET_STATUS; status 0 (a reset) also clears NEEDS_RESET.
    pub fn set(&mut self, status: u8) {
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

/// GET_CONFIG: `size` bytes at `offset` of `space`. Front-ends may ask for
/// more than the device defines (newer config fields); those bytes read as
/// zero, like fields of features not offered. `None` past the 256 bytes a
/// config space may have.
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Option<Vec<u8>> {
    let start = usize::try_from(offset).ok()?;
    let end = start
        .checked_add(usize::try_from(size).ok()?)
        .filter(|&end| end <= vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE as usize)?;
    let mut out = vec![0u8; end - start];
    if start < space.len() {
        let available = &space[start..end.min(space.len())];
        out[..available.len()].copy_from_slice(available);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_pad_with_zeroes_and_refuse_overflow() {
        let space = [1u8, 2, 3, 4];
        assert_eq!(read_config(&space, 2, 4).unwrap(), [3, 4, 0, 0]);
        assert_eq!(read_config(&space, 10, 2).unwrap(), [0, 0]);
        assert!(read_config(&space, u32::MAX, 2).is_none());
        assert!(read_config(&space, 0, 1 << 20).is_none());
    }

    #[test]
    fn status_carries_needs_reset_until_a_reset() {
        let mut status = DeviceStatus::default();
        status.set(0x0f);
        status.raise_needs_reset();
        assert_eq!(status.get(), 0x0f | DEVICE_STATUS_NEEDS_RESET);
        status.set(0);
        assert_eq!(status.get(), 0);
    }
}
