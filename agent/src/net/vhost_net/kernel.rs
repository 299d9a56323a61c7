//! The plan's steps as vhost-net ioctls: one [`Datapath`] method per op.
//!
//! Heavy ops: `create_queue` opens `/dev/vhost-net` and takes
//! VHOST_SET_OWNER (and gives the new instance the features, memory table
//! and log already in force), `configure_offloads` sets the tap's vnet
//! header size and offloads and the kernel's features, `map_region` /
//! `unmap_region` change the kernel's memory table, `set_mtu` is the tap's
//! MTU. Light ops: VHOST_SET_VRING_NUM / ADDR / BASE, the kick (the ring
//! starts: VHOST_SET_VRING_KICK and the tap queue as backend), the call,
//! and enabling (the backend attached or detached).
//!
//! The kernel takes the whole memory table in one ioctl, so region ops
//! only change the table kept here; [`KernelNet::flush_table`] hands it to
//! every pair once, after the last op of a run of region ops
//! ([`super::batch`]), and only then lets go of the mappings that left.

use std::fs::File;
use std::sync::Arc;

use netdev::spec::{self, bit};
use netdev::tap::{TapDevice, TapOffloads};
use presetup::{RegionKey, RssSpec};
use virtio_bindings::virtio_config::{
    VIRTIO_F_ANY_LAYOUT, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryAtomic;

use super::batch::TableHandover;
use super::error::VhostNetError;
use super::pair::{Pair, RX};
use crate::net::kernel::table::KernelTable;
use crate::vhost_user::datapath::{Datapath, DatapathError, OpResult, Outcome};
use crate::vhost_user::device::RingStart;
use crate::vhost_user::dirty_log::LogRegion;
use crate::vhost_user::memory::{GuestRam, MappedRegion};
use crate::vhost_user::vring::RingGuestAddresses;

/// VHOST_F_LOG_ALL: the kernel logs every page it writes.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// The virtio bits the kernel's vhost-net implements itself: the ring
/// layout and notifications, and the header size (it follows MRG_RXBUF and
/// VERSION_1). The device's own bits (MAC, STATUS, MTU, MQ) are the
/// agent's, the offloads the tap's; neither goes to VHOST_SET_FEATURES.
pub const KERNEL_BITS: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_F_ANY_LAYOUT)
    | bit(VIRTIO_F_NOTIFY_ON_EMPTY);

fn failed(op: &'static str, e: VhostNetError) -> DatapathError {
    DatapathError::failed(op, e)
}

/// The pair and virtqueue of ring `ring`.
fn split(ring: u16) -> (usize, usize) {
    (usize::from(ring / 2), usize::from(ring % 2))
}

/// The kernel side of a vhost-net device (module documentation).
pub struct KernelNet {
    name: Arc<str>,
    /// One slot per queue pair; `None` until `create_queue`. Declared
    /// before the table: the kernel instances close (and stop using guest
    /// memory) before the mappings go.
    pairs: Vec<Option<Pair>>,
    /// What the kernel holds (or gets at the next flush).
    table: KernelTable,
    /// Mappings that left the table but may still be in the kernel's.
    retired: Vec<Arc<MappedRegion>>,
    /// Region ops since the last flush.
    table_changed: bool,
    /// The tap, one queue per pair.
    tap: TapDevice,
    /// Handed to the `vhost` crate's handle (see [`super::pair`]).
    memory: GuestMemoryAtomic<GuestRam>,
    /// What VHOST_GET_FEATURES offered.
    kernel_offered: u64,
    /// The virtio features the front-end acked.
    acked: u64,
    /// The dirty log while the session logs.
    log: Option<Arc<LogRegion>>,
}

impl KernelNet {
    /// The kernel side for `pairs` pairs on `tap` (one queue per pair),
    /// whose `/dev/vhost-net` offered `kernel_offered`. Every tap queue is
    /// detached until its pair's RX ring runs, so frames for a ring nobody
    /// serves are dropped by the tap instead of waiting in it.
    pub fn new(
        name: Arc<str>,
        pairs: u16,
        tap: TapDevice,
        memory: GuestMemoryAtomic<GuestRam>,
        kernel_offered: u64,
    ) -> Result<KernelNet, VhostNetError> {
        for pair in 0..pairs {
            tap.set_queue_enabled(pair, false)?;
        }
        Ok(KernelNet {
            name,
            pairs: (0..pairs).map(|_| None).collect(),
            table: KernelTable::default(),
            retired: Vec::new(),
            table_changed: false,
            tap,
            memory,
            kernel_offered,
            acked: 0,
            log: None,
        })
    }

    /// The tap.
    pub fn tap(&self) -> &TapDevice {
        &self.tap
    }

    /// What VHOST_SET_FEATURES gets: the acked bits the kernel implements,
    /// and LOG_ALL while the session logs.
    fn kernel_features(&self) -> u64 {
        let log = if self.log.is_some() {
            VHOST_F_LOG_ALL
        } else {
            0
        };
        (self.acked & KERNEL_BITS & self.kernel_offered) | log
    }

    fn pair_mut(&mut self, pair: usize) -> Result<&mut Pair, VhostNetError> {
        self.pairs
            .get_mut(pair)
            .and_then(Option::as_mut)
            // `pair` came from a u16 ring index halved.
            .ok_or(VhostNetError::NoQueue { pair: pair as u16 })
    }

    /// The kernel features on every pair.
    fn apply_features(&mut self) -> Result<bool, VhostNetError> {
        let features = self.kernel_features();
        let mut changed = false;
        for pair in self.pairs.iter_mut().flatten() {
            changed |= pair.set_features(features)?;
        }
        Ok(changed)
    }

    /// Hand the memory table to every pair (one VHOST_SET_MEM_TABLE each)
    /// if region ops changed it, then let go of the mappings that left.
    /// Refused, before any ioctl, if a running ring would lose its memory
    /// or the dirty log would not cover the table.
    pub fn flush_table(&mut self) -> Result<(), VhostNetError> {
        if !self.table_changed {
            return Ok(());
        }
        for (index, pair) in self.pairs.iter().enumerate() {
            let Some(pair) = pair else { continue };
            for (vq, ring) in pair.rings.iter().enumerate() {
                let (Some(size), Some(guest), true) = (ring.size, ring.guest, ring.backend) else {
                    continue;
                };
                // index < MAX_QUEUE_PAIRS, vq < 2.
                let ring_index = (2 * index + vq) as u16;
                let still = self.table.ring_host(ring_index, size, &guest).ok();
                if still != ring.host {
                    return Err(VhostNetError::RegionInUse { ring: ring_index });
                }
            }
        }
        self.check_log_covers()?;
        let regions = self.table.kernel_regions();
        for pair in self.pairs.iter().flatten() {
            pair.set_mem_table(&regions)?;
        }
        self.table_changed = false;
        self.retired.clear();
        Ok(())
    }

    fn check_log_covers(&self) -> Result<(), VhostNetError> {
        match &self.log {
            Some(log) if !log.covers(self.table.end()) => Err(VhostNetError::LogTooSmall {
                log_bytes: log.len_bytes(),
                end: self.table.end(),
            }),
            _ => Ok(()),
        }
    }

    /// Log the kernel's writes into `log` from now on, or stop (`None`):
    /// VHOST_SET_LOG_BASE at the agent's mapping of the front-end's log,
    /// VHOST_F_LOG_ALL in the features (every buffer the kernel writes is
    /// logged), VHOST_VRING_F_LOG on every ring with its used ring's guest
    /// address (every used ring write is logged). No work per packet.
    pub fn set_log(&mut self, log: Option<Arc<LogRegion>>) -> Result<(), VhostNetError> {
        let same = match (&self.log, &log) {
            (Some(old), Some(new)) => Arc::ptr_eq(old, new),
            (None, None) => true,
            _ => false,
        };
        if same {
            return Ok(());
        }
        let on = log.is_some();
        if let Some(log) = &log {
            if !log.covers(self.table.end()) {
                return Err(VhostNetError::LogTooSmall {
                    log_bytes: log.len_bytes(),
                    end: self.table.end(),
                });
            }
            // The base first: the kernel checks the log against the memory
            // table when LOG_ALL and the ring flags are set.
            for pair in self.pairs.iter_mut().flatten() {
                pair.set_log_base(log.host_addr())?;
            }
        }
        self.log = log;
        self.apply_features()?;
        for pair in self.pairs.iter_mut().flatten() {
            for vq in 0..2 {
                let ring = &pair.rings[vq];
                if let (Some(guest), Some(host)) = (ring.guest, ring.host) {
                    if ring.log_used != on {
                        pair.set_addr(vq, guest, host, on)?;
                    }
                }
            }
            if !on {
                // Nothing logs any more: the kernel forgets the address of
                // a log that may be unmapped next.
                pair.set_log_base(0)?;
            }
        }
        Ok(())
    }

    /// Give `pair`'s RX or TX virtqueue its backend if it runs and is
    /// enabled, take it away otherwise; the tap queue follows the RX ring,
    /// so the tap steers no frames to a queue nobody serves.
    fn sync_backend(&mut self, pair: usize, vq: usize) -> Result<(), VhostNetError> {
        let p = self.pair_mut(pair)?;
        let ring = &p.rings[vq];
        let attach = ring.kick.is_some() && ring.enabled;
        if vq == RX && attach {
            // pair < MAX_QUEUE_PAIRS.
            self.tap.set_queue_enabled(pair as u16, true)?;
        }
        let p = self.pair_mut(pair)?;
        p.set_backend(vq, attach)?;
        if vq == RX && !attach {
            self.tap.set_queue_enabled(pair as u16, false)?;
        }
        Ok(())
    }

    /// Stop ring `ring` (GET_VRING_BASE): take the backend away (the
    /// kernel finishes what it is doing on the ring first), read where the
    /// kernel stands (VHOST_GET_VRING_BASE), and unbind the kick. Returns
    /// the next avail index and the kick, or `None` if the ring did not run.
    pub fn stop(&mut self, ring: u16) -> Result<Option<(u16, File)>, VhostNetError> {
        let (pair, vq) = split(ring);
        let Some(Some(p)) = self.pairs.get_mut(pair) else {
            return Ok(None);
        };
        if p.rings[vq].kick.is_none() {
            return Ok(None);
        }
        p.set_backend(vq, false)?;
        if vq == RX {
            // pair < MAX_QUEUE_PAIRS.
            self.tap.set_queue_enabled(pair as u16, false)?;
        }
        let p = self.pair_mut(pair)?;
        let base = p.get_base(vq)?;
        let kick = p.set_kick(vq, None)?;
        Ok(kick.map(|kick| (base, kick)))
    }

    /// The ring size, guest addresses and base the kernel must hold for a
    /// start, set where they differ (normally the light ops before the
    /// kick set them already).
    fn prepare_ring(&mut self, start: &RingStart) -> Result<(), VhostNetError> {
        let (pair, vq) = split(start.ring);
        if self.pair_mut(pair)?.rings[vq].size != Some(start.size) {
            self.set_size(start.ring, start.size)?;
        }
        let host = self
            .table
            .ring_host(start.ring, start.size, &start.addresses)?;
        let log_used = self.log.is_some();
        let p = self.pair_mut(pair)?;
        let ring = &p.rings[vq];
        if ring.guest != Some(start.addresses)
            || ring.host != Some(host)
            || ring.log_used != log_used
        {
            p.set_addr(vq, start.addresses, host, log_used)?;
        }
        if p.rings[vq].base != Some(start.next_avail) {
            p.set_base(vq, start.next_avail)?;
        }
        Ok(())
    }

    /// Create pair `pair`'s kernel instance with the features, memory
    /// table and log base in force.
    fn open_pair(&self, pair: u16) -> Result<Pair, VhostNetError> {
        let mut new = Pair::open(pair, self.memory.clone(), self.tap.queue_file(pair)?)?;
        new.set_features(self.kernel_features())?;
        new.set_mem_table(&self.table.kernel_regions())?;
        if let Some(log) = &self.log {
            new.set_log_base(log.host_addr())?;
        }
        Ok(new)
    }

    /// VHOST_SET_VRING_ADDR for ring `ring` at `guest`, checked against
    /// the table for the size the kernel has.
    fn set_addresses(&mut self, ring: u16, guest: RingGuestAddresses) -> Result<(), VhostNetError> {
        let (pair, vq) = split(ring);
        let log_used = self.log.is_some();
        let size = self.pair_mut(pair)?.rings[vq]
            .size
            .ok_or(VhostNetError::RingIncomplete {
                ring,
                what: "the size",
            })?;
        let host = self.table.ring_host(ring, size, &guest)?;
        self.pair_mut(pair)?.set_addr(vq, guest, host, log_used)
    }

    /// Start ring `start.ring`: its values, its call, its kick, and the
    /// backend if it is enabled.
    fn start_ring(&mut self, start: RingStart) -> Result<(), VhostNetError> {
        let (pair, vq) = split(start.ring);
        self.prepare_ring(&start)?;
        let p = self.pair_mut(pair)?;
        p.set_call(vq, start.call)?;
        p.rings[vq].enabled = start.enabled;
        p.set_kick(vq, Some(start.kick))?;
        self.sync_backend(pair, vq)
    }

    fn set_size(&mut self, ring: u16, size: u16) -> Result<(), VhostNetError> {
        if size == 0 || !size.is_power_of_two() || size > spec::MAX_QUEUE_SIZE {
            return Err(crate::net::kernel::RingCheckError::Size { ring, size }.into());
        }
        let (pair, vq) = split(ring);
        let p = self.pair_mut(pair)?;
        p.set_num(vq, size)?;
        // A new size changes the ring's extent: its addresses are checked
        // again when they are set next.
        p.rings[vq].host = None;
        Ok(())
    }
}

impl TableHandover for KernelNet {
    fn hand_over_table(&mut self) -> Result<(), VhostNetError> {
        self.flush_table()
    }
}

impl Datapath for KernelNet {
    fn reset(&mut self) -> OpResult {
        // Closing an instance stops its rings and releases its backends;
        // then nothing in the kernel uses guest memory.
        self.pairs.iter_mut().for_each(|pair| *pair = None);
        for pair in 0..self.pairs.len() {
            // pair < MAX_QUEUE_PAIRS.
            self.tap
                .set_queue_enabled(pair as u16, false)
                .map_err(|e| failed("reset", e.into()))?;
        }
        self.table.take_all();
        self.retired.clear();
        self.table_changed = false;
        Ok(Outcome::Done)
    }

    fn set_features(&mut self, features: u64) -> OpResult {
        self.acked = features;
        self.apply_features()
            .map_err(|e| failed("set_features", e))?;
        Ok(Outcome::Done)
    }

    fn configure_offloads(&mut self, features: u64) -> OpResult {
        let tap_err = |e: netdev::tap::TapError| failed("configure_offloads", e.into());
        self.tap
            .set_vnet_hdr_len(spec::header_len(features))
            .map_err(tap_err)?;
        self.tap
            .set_offloads(TapOffloads::from_virtio_features(features))
            .map_err(tap_err)?;
        self.acked = (self.acked & !presetup::NET_DATAPLANE_FEATURES)
            | (features & presetup::NET_DATAPLANE_FEATURES);
        self.apply_features()
            .map_err(|e| failed("configure_offloads", e))?;
        Ok(Outcome::Done)
    }

    fn map_region(&mut self, region: &Arc<MappedRegion>) -> OpResult {
        if let Some(old) = self.table.insert(region.clone()) {
            self.retired.push(old);
        }
        self.table_changed = true;
        Ok(Outcome::Done)
    }

    fn unmap_region(&mut self, region: &RegionKey) -> OpResult {
        match self.table.remove(region) {
            Some(old) => {
                self.retired.push(old);
                self.table_changed = true;
                Ok(Outcome::Done)
            }
            None => Ok(Outcome::NotNeeded),
        }
    }

    fn create_queue(&mut self, pair: u16) -> OpResult {
        let index = usize::from(pair);
        if index >= self.pairs.len() {
            return Err(DatapathError::Precondition {
                op: "create_queue",
                reason: format!("pair {pair} is beyond the device's {}", self.pairs.len()),
            });
        }
        let new = self
            .open_pair(pair)
            .map_err(|e| failed("create_queue", e))?;
        // A pair created again replaces the old instance (closing it).
        self.pairs[index] = Some(new);
        log::debug!("{}: queue pair {pair} on /dev/vhost-net", self.name);
        Ok(Outcome::Done)
    }

    fn destroy_queue(&mut self, pair: u16) -> OpResult {
        let Some(slot) = self.pairs.get_mut(usize::from(pair)) else {
            return Ok(Outcome::NotNeeded);
        };
        let existed = slot.take().is_some();
        self.tap
            .set_queue_enabled(pair, false)
            .map_err(|e| failed("destroy_queue", e.into()))?;
        Ok(if existed {
            Outcome::Done
        } else {
            Outcome::NotNeeded
        })
    }

    fn program_rss(&mut self, rss: Option<&RssSpec>) -> OpResult {
        match rss {
            None => Ok(Outcome::NotNeeded),
            Some(_) => Err(failed("program_rss", VhostNetError::NoSteering)),
        }
    }

    fn set_mtu(&mut self, mtu: u16) -> OpResult {
        self.tap
            .set_mtu(mtu)
            .map_err(|e| failed("set_mtu", e.into()))?;
        Ok(Outcome::Done)
    }

    fn set_mac(&mut self, _mac: [u8; 6]) -> OpResult {
        // A config-space value and the next RARP: nothing in the kernel.
        Ok(Outcome::NotNeeded)
    }

    fn reset_ring(&mut self, ring: u16) -> OpResult {
        let (pair, vq) = split(ring);
        let Some(Some(p)) = self.pairs.get_mut(pair) else {
            return Ok(Outcome::NotNeeded);
        };
        let held = p.reset_ring(vq).map_err(|e| failed("reset_ring", e))?;
        if vq == RX {
            // pair < MAX_QUEUE_PAIRS.
            self.tap
                .set_queue_enabled(pair as u16, false)
                .map_err(|e| failed("reset_ring", e.into()))?;
        }
        Ok(if held {
            Outcome::Done
        } else {
            Outcome::NotNeeded
        })
    }

    fn set_ring_size(&mut self, ring: u16, size: u16) -> OpResult {
        self.set_size(ring, size)
            .map_err(|e| failed("set_ring_size", e))?;
        Ok(Outcome::Done)
    }

    fn set_ring_addresses(&mut self, ring: u16, addresses: RingGuestAddresses) -> OpResult {
        self.set_addresses(ring, addresses)
            .map_err(|e| failed("set_ring_addresses", e))?;
        Ok(Outcome::Done)
    }

    fn set_ring_base(&mut self, ring: u16, next_avail: u16) -> OpResult {
        let (pair, vq) = split(ring);
        self.pair_mut(pair)
            .and_then(|p| p.set_base(vq, next_avail))
            .map_err(|e| failed("set_ring_base", e))?;
        Ok(Outcome::Done)
    }

    fn set_ring_kick(&mut self, start: RingStart) -> OpResult {
        self.start_ring(start)
            .map_err(|e| failed("set_ring_kick", e))?;
        Ok(Outcome::Done)
    }

    fn set_ring_call(&mut self, ring: u16, call: Option<Arc<File>>) -> OpResult {
        let (pair, vq) = split(ring);
        let Some(Some(p)) = self.pairs.get_mut(pair) else {
            // It comes with the ring's start.
            return Ok(Outcome::NotNeeded);
        };
        p.set_call(vq, call)
            .map_err(|e| failed("set_ring_call", e))?;
        Ok(Outcome::Done)
    }

    fn set_ring_enabled(&mut self, ring: u16, enabled: bool) -> OpResult {
        let (pair, vq) = split(ring);
        let Some(Some(p)) = self.pairs.get_mut(pair) else {
            return Ok(Outcome::NotNeeded);
        };
        p.rings[vq].enabled = enabled;
        self.sync_backend(pair, vq)
            .map_err(|e| failed("set_ring_enabled", e))?;
        Ok(Outcome::Done)
    }
}
