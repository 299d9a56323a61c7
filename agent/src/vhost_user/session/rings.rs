//! Rings: where they stand, how they stop (GET_VRING_BASE drains or
//! suspends, a disconnect detaches), and the teardown of what a
//! connection set up.

use presetup::DeviceKind;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::{Applied, Session, SessionError};
use crate::vhost_user::datapath::Step;
use crate::vhost_user::device::StopMode;
use crate::vhost_user::requests::feature;
use crate::vhost_user::vring::RingState;

/// Which request asked for a ring's base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GetBase {
    /// GET_VRING_BASE (11).
    Plain,
    /// GET_VRING_BASE_SKIP_DRAIN (45).
    SkipDrain,
}

impl Session {
    /// Ring `ring`, if the device has it.
    pub(super) fn ring(&self, ring: u16) -> Option<&RingState> {
        self.rings.get(usize::from(ring))
    }

    /// Ring `ring`, if the device has it.
    pub(super) fn ring_mut(&mut self, ring: u16) -> Option<&mut RingState> {
        self.rings.get_mut(usize::from(ring))
    }

    /// The ring a message names, or the refusal.
    pub(super) fn ring_index(&mut self, index: u32) -> Result<(u16, &mut RingState), SessionError> {
        let ring = u16::try_from(index).map_err(|_| SessionError::QueueIndex(index))?;
        let state = self
            .rings
            .get_mut(usize::from(ring))
            .ok_or(SessionError::QueueIndex(index))?;
        Ok((ring, state))
    }

    /// The datapath took ring `ring`'s kick: it runs.
    pub(super) fn ring_started(&mut self, ring: u16) {
        let name = self.name.clone();
        if let Some(state) = self.ring_mut(ring) {
            state.running = true;
            log::info!(
                "{name}: queue {ring} started (size {}, avail {})",
                state.size,
                state.next_avail
            );
        }
        self.metrics.ring_started(ring);
    }

    /// Check that every part of a ring of `size` descriptors at the
    /// front-end `addresses` lies inside one region of the table: the
    /// descriptor table (16 bytes each), the avail ring (4 + 2 per entry +
    /// used_event) and the used ring (4 + 8 per entry + avail_event)
    /// (virtio 1.2, 2.7). A ring running past guest memory is refused
    /// before any datapath (or kernel) sees it.
    pub(super) fn check_ring_extent(
        &self,
        index: u32,
        size: u16,
        addresses: &presetup::RingAddresses,
    ) -> Result<(), SessionError> {
        let n = u64::from(size);
        for (which, addr, len) in [
            ("descriptor table", addresses.desc_table.0, 16 * n),
            ("avail ring", addresses.avail_ring.0, 6 + 2 * n),
            ("used ring", addresses.used_ring.0, 6 + 8 * n),
        ] {
            if !self.table.holds(addr, len) {
                return Err(SessionError::RingExtent {
                    index,
                    which,
                    addr,
                    len,
                });
            }
        }
        Ok(())
    }

    /// Whether any ring runs.
    pub(super) fn live(&self) -> bool {
        self.rings.iter().any(|ring| ring.running)
    }

    /// Stop ring `ring` if it runs and remember where it stopped;
    /// `keep_kick` keeps its kick for a restart (a reset), otherwise a new
    /// start needs a new kick (vhost-user spec, "Ring states"). Returns the
    /// ring's next avail index.
    pub(super) fn stop_ring(&mut self, ring: u16, mode: StopMode, keep_kick: bool) -> u16 {
        let Some(state) = self.ring(ring) else {
            return 0;
        };
        if !state.running {
            return state.next_avail;
        }
        let stopped = self.device.stop_ring(ring, mode);
        self.metrics.ring_stopped(ring, stopped.handed_off);
        let name = self.name.clone();
        let next_avail = stopped.next_avail;
        let kick_back = keep_kick && stopped.kick.is_some();
        if let Some(state) = self.ring_mut(ring) {
            state.running = false;
            state.next_avail = next_avail;
            state.kick = if keep_kick { stopped.kick } else { None };
        }
        if let Applied::Held(held) = &mut self.applied {
            if let Some(held_ring) = held.rings.iter_mut().find(|r| r.index == ring) {
                held_ring.next_avail = next_avail;
                held_ring.kick_fd = kick_back;
            }
            if stopped.io_ring_lost {
                if let DeviceKind::Blk(blk) = &mut held.device {
                    blk.num_queues = blk.num_queues.min(ring);
                    held.rings.retain(|r| r.index < blk.num_queues);
                }
            }
        }
        if mode != StopMode::Suspend {
            log::info!("{name}: queue {ring} stopped at avail {next_avail}");
        }
        if !self.live() {
            self.end_start();
        }
        next_avail
    }

    /// Stop every running ring.
    pub(super) fn stop_all_rings(&mut self, mode: StopMode) {
        for ring in 0..self.device.num_rings() {
            self.stop_ring(ring, mode, mode != StopMode::Detach);
        }
    }

    /// GET_VRING_BASE_INFLIGHT with INFLIGHT_SHMFD: the front-end may have
    /// rings suspended instead of drained.
    pub(super) fn suspend_negotiated(&self) -> bool {
        self.protocol_acked(
            VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits()
                | VhostUserProtocolFeatures::GET_VRING_BASE_INFLIGHT.bits(),
        )
    }

    /// How GET_VRING_BASE (`which`) stops a ring, per the negotiated
    /// protocol features (docs/vhost-user-notes.md, "Stopping a ring"):
    /// suspend with GET_VRING_BASE_INFLIGHT (which needs INFLIGHT_SHMFD)
    /// unless GET_VRING_BASE_SKIP_DRAIN moved suspending to request 45.
    fn stop_mode(&self, which: GetBase) -> StopMode {
        let skip_drain = self.protocol_acked(feature::mask(feature::GET_VRING_BASE_SKIP_DRAIN));
        let wants_suspend = self.suspend_negotiated()
            && match which {
                GetBase::Plain => !skip_drain,
                GetBase::SkipDrain => true,
            };
        if wants_suspend && self.inflight.is_none() {
            log::warn!(
                "{}: asked to stop without draining, but there is no inflight region to record the unfinished requests in; draining",
                self.name
            );
            return StopMode::Drain;
        }
        if wants_suspend {
            StopMode::Suspend
        } else {
            StopMode::Drain
        }
    }

    /// GET_VRING_BASE (or request 45): stop the ring as negotiated and
    /// return where it stands. The ring keeps its configuration; a restart
    /// needs a new kick.
    pub(super) fn get_base(&mut self, index: u32, which: GetBase) -> Result<u16, SessionError> {
        let (ring, _) = self.ring_index(index)?;
        let mode = self.stop_mode(which);
        let next_avail = self.stop_ring(ring, mode, false);
        let (_, state) = self.ring_index(index)?;
        state.kick = None;
        state.enabled = false;
        if let Applied::Held(held) = &mut self.applied {
            if let Some(held_ring) = held.rings.iter_mut().find(|r| r.index == ring) {
                held_ring.enabled = false;
            }
        }
        Ok(next_avail)
    }

    /// The front-end went away (its rings are stopped): the datapath
    /// forgets the rings and mappings it set up, and so does the session.
    pub(super) fn teardown_connection(&mut self) {
        if let Applied::Held(held) = &mut self.applied {
            let mut steps: Vec<Step> = held
                .rings
                .iter()
                .map(|ring| Step::ResetRing { ring: ring.index })
                .collect();
            steps.extend(held.memory.iter().map(|region| Step::UnmapRegion {
                region: region.key(),
            }));
            held.rings.clear();
            held.memory.clear();
            let count = steps.len();
            let results = self.device.execute(steps);
            if results.len() != count || results.iter().any(Result::is_err) {
                log::warn!(
                    "{}: the datapath did not forget every ring and mapping; the next start configures it in full",
                    self.name
                );
                self.applied = Applied::Untrusted;
            }
        }
        for ring in &mut self.rings {
            *ring = RingState::default();
        }
        self.memory.clear();
        self.end_start();
    }
}
