//! The inflight region (GET/SET_INFLIGHT_FD): created or mapped here, its
//! queues handed to the datapath with each ring's start. Only devices that
//! offer INFLIGHT_SHMFD get it (blk).

use std::fs::File;

use blkdev::inflight::InflightRegion;
use vhost::vhost_user::message::VhostUserInflight;

use super::{Session, SessionError};
use crate::vhost_user::requests::feature;

impl Session {
    /// Check an inflight description against the device.
    fn inflight_shape(&self, inflight: &VhostUserInflight) -> Result<(u16, u16), SessionError> {
        if self.device.protocol_features() & feature::mask(feature::INFLIGHT_SHMFD) == 0 {
            return Err(SessionError::Unsupported("the inflight region"));
        }
        let (num_queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        let device = blkdev::inflight::DeviceQueues {
            num_queues: self.device.num_rings(),
            max_queue_size: self.device.max_ring_size(),
        };
        blkdev::inflight::check_shape(num_queues, queue_size, device)?;
        Ok((num_queues, queue_size))
    }

    /// GET_INFLIGHT_FD: a new region for the queues described.
    pub(super) fn inflight_get(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File), SessionError> {
        let (num_queues, queue_size) = self.inflight_shape(inflight)?;
        let (region, file) = InflightRegion::create(num_queues, queue_size)?;
        log::info!(
            "{}: new inflight region for {num_queues} queue(s) of {queue_size} ({} bytes)",
            self.name,
            region.mmap_size()
        );
        let reply = VhostUserInflight {
            mmap_size: region.mmap_size(),
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        self.inflight = Some(region);
        Ok((reply, file))
    }

    /// SET_INFLIGHT_FD: a region the front-end kept (a reconnect) or
    /// brought (a migration destination); taken with no GET before it.
    pub(super) fn inflight_set(
        &mut self,
        inflight: &VhostUserInflight,
        file: File,
    ) -> Result<(), SessionError> {
        let (num_queues, queue_size) = self.inflight_shape(inflight)?;
        let (size, offset) = (inflight.mmap_size, inflight.mmap_offset);
        let region = InflightRegion::map(&file, size, offset, num_queues, queue_size)?;
        log::info!(
            "{}: inflight region set for {num_queues} queue(s) of {queue_size} ({size} bytes at offset {offset})",
            self.name
        );
        if self.live() {
            log::warn!(
                "{}: SET_INFLIGHT_FD while queues run; it applies from their next start",
                self.name
            );
        }
        self.inflight = Some(region);
        Ok(())
    }
}
