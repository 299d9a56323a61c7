//! The plan's steps on the net data path thread: one method per op, each
//! doing exactly what the op says on the dataplane (and, with a cost
//! profile, charging what hardware would).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use netdev::rss::{Rss, RssConfig};
use netdev::spec;
use presetup::{RegionKey, RssSpec};
use vm_memory::GuestAddressSpace;

use super::thread::{DataPath, Slot, DATAPLANE_BASE};
use crate::vhost_user::datapath::{Datapath, DatapathError, OpResult, Outcome};
use crate::vhost_user::device::RingStart;
use crate::vhost_user::memory::MappedRegion;
use crate::vhost_user::vring::{build_queue, notify, RingGuestAddresses};
use netdev::ring::NetRing;

fn done_if(did: bool) -> Outcome {
    if did {
        Outcome::Done
    } else {
        Outcome::NotNeeded
    }
}

/// The agent's RSS form of a presetup RSS description.
pub fn rss_config(spec: &RssSpec) -> RssConfig {
    RssConfig {
        hash_types: spec.hash_types,
        key: spec.key.clone(),
        indirection_table: spec.indirection_table.clone(),
        default_queue: spec.default_queue,
    }
}

impl DataPath {
    fn pair_slot(&self, op: &'static str, pair: u16) -> Result<usize, DatapathError> {
        let index = usize::from(pair);
        if index < self.queues.len() {
            Ok(index)
        } else {
            Err(DatapathError::Precondition {
                op,
                reason: format!("pair {pair} is beyond the device's {}", self.queues.len()),
            })
        }
    }
}

impl Datapath for DataPath {
    fn reset(&mut self) -> OpResult {
        for index in 0..self.rings.len() {
            // index < 2 * MAX_QUEUE_PAIRS.
            self.stop(index as u16);
        }
        for pair in 0..self.pairs() {
            if std::mem::take(&mut self.queues[usize::from(pair)]) {
                self.dataplane.destroy_queue(pair);
            }
        }
        self.rss = None;
        Ok(Outcome::Done)
    }

    fn set_features(&mut self, features: u64) -> OpResult {
        self.hdr_len = spec::header_len(features);
        self.mrg_rxbuf = spec::mrg_rxbuf(features);
        Ok(Outcome::Done)
    }

    fn configure_offloads(&mut self, features: u64) -> OpResult {
        self.dataplane
            .set_features(features)
            .map(done_if)
            .map_err(|e| DatapathError::failed("configure_offloads", e))
    }

    fn map_region(&mut self, _region: &Arc<MappedRegion>) -> OpResult {
        // The rings are served from the session's mapping (published
        // already); hardware would map and pin it for DMA.
        self.dataplane.map_memory();
        Ok(Outcome::Done)
    }

    fn unmap_region(&mut self, _region: &RegionKey) -> OpResult {
        Ok(Outcome::Done)
    }

    fn create_queue(&mut self, pair: u16) -> OpResult {
        let slot = self.pair_slot("create_queue", pair)?;
        self.queues[slot] = true;
        Ok(done_if(self.dataplane.create_queue(pair)))
    }

    fn destroy_queue(&mut self, pair: u16) -> OpResult {
        let slot = self.pair_slot("destroy_queue", pair)?;
        self.queues[slot] = false;
        Ok(done_if(self.dataplane.destroy_queue(pair)))
    }

    fn program_rss(&mut self, rss: Option<&RssSpec>) -> OpResult {
        let pairs = self.pairs();
        self.rss = rss
            .map(|spec| Rss::new(rss_config(spec), pairs))
            .transpose()
            .map_err(|e| DatapathError::failed("program_rss", e))?;
        if rss.is_some() {
            self.dataplane.program_rss();
        }
        // The agent's own steering table is real work on every dataplane.
        Ok(Outcome::Done)
    }

    fn set_mtu(&mut self, mtu: u16) -> OpResult {
        self.dataplane
            .set_mtu(mtu)
            .map(done_if)
            .map_err(|e| DatapathError::failed("set_mtu", e))
    }

    fn set_mac(&mut self, _mac: [u8; 6]) -> OpResult {
        // A config-space value and the next RARP: nothing on the wire.
        Ok(Outcome::NotNeeded)
    }

    fn reset_ring(&mut self, ring: u16) -> OpResult {
        Ok(done_if(self.stop(ring).is_some()))
    }

    fn set_ring_size(&mut self, _ring: u16, _size: u16) -> OpResult {
        // Ring values come with the kick (`RingStart`).
        Ok(Outcome::NotNeeded)
    }

    fn set_ring_addresses(&mut self, _ring: u16, _addresses: RingGuestAddresses) -> OpResult {
        Ok(Outcome::NotNeeded)
    }

    fn set_ring_base(&mut self, _ring: u16, _next_avail: u16) -> OpResult {
        Ok(Outcome::NotNeeded)
    }

    fn set_ring_kick(&mut self, start: RingStart) -> OpResult {
        let index = usize::from(start.ring);
        if index >= self.rings.len() {
            return Err(DatapathError::Precondition {
                op: "set_ring_kick",
                reason: format!("queue {index} is beyond the device"),
            });
        }
        let memory = self.memory.memory();
        let queue = build_queue(
            start.size,
            start.addresses,
            start.next_avail,
            start.event_idx,
            &memory,
        )
        .map_err(|e| DatapathError::failed("set_ring_kick", e))?;
        if let Some(old) = self.rings[index].take() {
            if old.watched {
                let _ = self
                    .registry
                    .deregister(&mut SourceFd(&old.kick.as_raw_fd()));
            }
        }
        self.registry
            .register(
                &mut SourceFd(&start.kick.as_raw_fd()),
                Token(index),
                Interest::READABLE,
            )
            .map_err(|e| DatapathError::failed("set_ring_kick", e))?;
        self.rings[index] = Some(Slot {
            ring: NetRing::new(queue),
            kick: start.kick,
            call: start.call,
            enabled: start.enabled,
            broken: false,
            watched: true,
        });
        // The dataplane may hold frames that waited for this ring.
        if index.is_multiple_of(2) {
            self.rx_ready.iter_mut().for_each(|ready| *ready = true);
        }
        Ok(Outcome::Done)
    }

    fn set_ring_call(&mut self, ring: u16, call: Option<Arc<File>>) -> OpResult {
        let Some(Some(slot)) = self.rings.get_mut(usize::from(ring)) else {
            // It comes with the ring's start.
            return Ok(Outcome::NotNeeded);
        };
        slot.call = call;
        // Entries published while no call fd was set had no interrupt: a
        // spurious one is harmless, a lost one not.
        if let Some(call) = &slot.call {
            notify(call);
        }
        Ok(Outcome::Done)
    }

    fn set_ring_enabled(&mut self, ring: u16, enabled: bool) -> OpResult {
        if let Some(Some(slot)) = self.rings.get_mut(usize::from(ring)) {
            slot.enabled = enabled;
        }
        if enabled {
            // Frames may be waiting in the dataplane for this ring.
            self.rx_ready.iter_mut().for_each(|ready| *ready = true);
        }
        // A pair's dataplane queue follows its RX ring. A tap that will not
        // attach or detach a queue still carries traffic on the others.
        if ring.is_multiple_of(2) && usize::from(ring) < self.rings.len() {
            if let Err(e) = self.dataplane.set_pair_enabled(ring / 2, enabled) {
                log::warn!(
                    "{}: pair {}: {}",
                    self.name,
                    ring / 2,
                    crate::error_chain(&e)
                );
            }
        }
        Ok(Outcome::Done)
    }
}

/// The token of a pair's dataplane fd.
pub(super) fn dataplane_token(pair: u16) -> Token {
    Token(DATAPLANE_BASE + usize::from(pair))
}
