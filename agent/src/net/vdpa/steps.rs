//! The plan's steps on a vDPA device: one [`Datapath`] method per op. Each
//! records what the front-end wants in the [`Engine`]; the batch's last
//! step is followed by [`Engine::sync`], which makes the device hold it
//! (so the IOTLB is updated once per batch, and DRIVER_OK comes when the
//! rings are ready, not per message).
//!
//! Heavy ops and what they are on vDPA: `configure_offloads` negotiates
//! the features (VHOST_SET_FEATURES, FEATURES_OK) at the next sync;
//! `map_region` / `unmap_region` are IOTLB updates and invalidations
//! (pinning on hardware); `create_queue` has nothing to do of its own
//! (a vDPA device creates its queues at DRIVER_OK, which needs the rings),
//! so it is reported as not needed; `set_mtu` is the device's: refused
//! above it, not needed at or below. `program_rss` is refused (no control
//! virtqueue); `reset` is status 0 and every mapping invalidated.

use std::fs::File;
use std::sync::Arc;

use presetup::{RegionKey, RssSpec};

use super::engine::Engine;
use super::error::VdpaError;
use super::handle::Ops;
use crate::vhost_user::datapath::{self, Datapath, DatapathError, OpResult, Outcome, Step};
use crate::vhost_user::device::RingStart;
use crate::vhost_user::memory::MappedRegion;
use crate::vhost_user::vring::RingGuestAddresses;

fn failed(op: &'static str, e: VdpaError) -> DatapathError {
    DatapathError::failed(op, e)
}

/// Execute `steps` in order, stopping at the first failure, then sync the
/// device; a failed sync fails the batch's last step.
pub fn execute<O: Ops>(engine: &mut Engine<O>, steps: Vec<Step>) -> Vec<OpResult> {
    let mut results = datapath::execute_all(engine, steps);
    if results.iter().all(Result::is_ok) {
        if let Err(e) = engine.sync() {
            let error = failed("vdpa device", e);
            match results.last_mut() {
                Some(last) => *last = Err(error),
                None => log::warn!("vdpa device: {}", crate::error_chain(&error)),
            }
        }
    }
    results
}

impl<O: Ops> Datapath for Engine<O> {
    fn reset(&mut self) -> OpResult {
        Engine::reset(self).map_err(|e| failed("reset", e))?;
        Ok(Outcome::Done)
    }

    fn set_features(&mut self, features: u64) -> OpResult {
        self.set_acked(features);
        Ok(Outcome::Done)
    }

    fn configure_offloads(&mut self, _features: u64) -> OpResult {
        // The offload bits are part of the acked features, negotiated
        // with the device (FEATURES_OK) at this batch's sync.
        Ok(Outcome::Done)
    }

    fn map_region(&mut self, region: &Arc<MappedRegion>) -> OpResult {
        self.insert_region(region.clone());
        Ok(Outcome::Done)
    }

    fn unmap_region(&mut self, region: &RegionKey) -> OpResult {
        Ok(if self.remove_region(region) {
            Outcome::Done
        } else {
            Outcome::NotNeeded
        })
    }

    fn create_queue(&mut self, pair: u16) -> OpResult {
        if self.ring_mut(2 * pair + 1).is_err() {
            return Err(DatapathError::Precondition {
                op: "create_queue",
                reason: format!("pair {pair} is beyond the device's rings"),
            });
        }
        Ok(Outcome::NotNeeded)
    }

    fn destroy_queue(&mut self, _pair: u16) -> OpResult {
        Ok(Outcome::NotNeeded)
    }

    fn program_rss(&mut self, rss: Option<&RssSpec>) -> OpResult {
        match rss {
            None => Ok(Outcome::NotNeeded),
            Some(_) => Err(failed("program_rss", VdpaError::NoSteering)),
        }
    }

    fn set_mtu(&mut self, mtu: u16) -> OpResult {
        match self.caps().mtu() {
            Some(device) if mtu > device => Err(DatapathError::Precondition {
                op: "set_mtu",
                reason: format!("MTU {mtu} is above the device's {device}"),
            }),
            _ => Ok(Outcome::NotNeeded),
        }
    }

    fn set_mac(&mut self, _mac: [u8; 6]) -> OpResult {
        // The device's MAC is the device's; the agent's config space shows it.
        Ok(Outcome::NotNeeded)
    }

    fn reset_ring(&mut self, ring: u16) -> OpResult {
        let r = self.ring_mut(ring).map_err(|e| failed("reset_ring", e))?;
        let held = r.size.is_some() || r.guest.is_some() || r.kick.is_some();
        r.size = None;
        r.guest = None;
        r.kick = None;
        r.call = None;
        r.enabled = false;
        r.base = 0;
        Ok(if held {
            Outcome::Done
        } else {
            Outcome::NotNeeded
        })
    }

    fn set_ring_size(&mut self, ring: u16, size: u16) -> OpResult {
        if size == 0 || !size.is_power_of_two() || size > self.caps().max_ring {
            return Err(failed(
                "set_ring_size",
                crate::net::kernel::RingCheckError::Size { ring, size }.into(),
            ));
        }
        self.ring_mut(ring)
            .map_err(|e| failed("set_ring_size", e))?
            .size = Some(size);
        Ok(Outcome::Done)
    }

    fn set_ring_addresses(&mut self, ring: u16, addresses: RingGuestAddresses) -> OpResult {
        let size = self
            .ring_mut(ring)
            .map_err(|e| failed("set_ring_addresses", e))?
            .size;
        if let Some(size) = size {
            self.check_ring(ring, size, &addresses)
                .map_err(|e| failed("set_ring_addresses", e))?;
        }
        self.ring_mut(ring)
            .map_err(|e| failed("set_ring_addresses", e))?
            .guest = Some(addresses);
        Ok(Outcome::Done)
    }

    fn set_ring_base(&mut self, ring: u16, next_avail: u16) -> OpResult {
        self.ring_mut(ring)
            .map_err(|e| failed("set_ring_base", e))?
            .base = next_avail;
        Ok(Outcome::Done)
    }

    fn set_ring_kick(&mut self, start: RingStart) -> OpResult {
        self.check_ring(start.ring, start.size, &start.addresses)
            .map_err(|e| failed("set_ring_kick", e))?;
        let r = self
            .ring_mut(start.ring)
            .map_err(|e| failed("set_ring_kick", e))?;
        r.size = Some(start.size);
        r.guest = Some(start.addresses);
        r.base = start.next_avail;
        r.call = start.call;
        r.enabled = start.enabled;
        r.kick = Some(start.kick);
        Ok(Outcome::Done)
    }

    fn set_ring_call(&mut self, ring: u16, call: Option<Arc<File>>) -> OpResult {
        self.ring_mut(ring)
            .map_err(|e| failed("set_ring_call", e))?
            .call = call;
        Ok(Outcome::Done)
    }

    fn set_ring_enabled(&mut self, ring: u16, enabled: bool) -> OpResult {
        self.ring_mut(ring)
            .map_err(|e| failed("set_ring_enabled", e))?
            .enabled = enabled;
        Ok(Outcome::Done)
    }
}
