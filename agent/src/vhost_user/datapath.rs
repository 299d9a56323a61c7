//! The datapath interface: one method per op of a presetup plan.
//!
//! The session turns each [`presetup::ConfigOp`] of a plan into a [`Step`]
//! (the op with what the session resolved for it: the mapped region, the
//! guest addresses of a ring, the eventfds) and hands it to the device,
//! whose datapath executes it with [`execute`]. A datapath answers what it
//! did ([`Outcome`]); the switchover counts exactly that, so an op that
//! presetup saved is one whose method was never called, and an op a
//! datapath has nothing to do for is reported as such, never as work.
//!
//! Ops that only change the session's own bookkeeping (acked protocol
//! features, a region's front-end address) never reach a datapath.

use std::fs::File;
use std::sync::Arc;

use presetup::{RegionKey, RssSpec};

use super::device::RingStart;
use super::memory::MappedRegion;
use super::vring::RingGuestAddresses;

/// What a datapath did for one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The work was done (an ioctl, a mapping, a queue, a charge of the
    /// cost model, a value the data path reads).
    Done,
    /// This datapath has nothing to do for the op (a tap's queues exist
    /// from the agent's start; `loop` programs no RSS hardware).
    NotNeeded,
}

/// A datapath refused or failed a step.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The op does not apply to this kind of device (a plan bug).
    #[error("{op} does not apply to this device")]
    NotForThisDevice {
        /// The op's name.
        op: &'static str,
    },
    /// The step needs something that is not there (an I/O ring for a
    /// queue, a queue for a ring).
    #[error("{op}: {reason}")]
    Precondition {
        /// The op's name.
        op: &'static str,
        /// What is missing.
        reason: String,
    },
    /// The datapath failed doing it.
    #[error("{op} failed")]
    Failed {
        /// The op's name.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The datapath thread is gone.
    #[error("the data path thread is gone")]
    Gone,
}

impl DatapathError {
    /// A failure of `op` caused by `source`.
    pub fn failed(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> DatapathError {
        DatapathError::Failed {
            op,
            source: source.into(),
        }
    }
}

/// A step's result.
pub type OpResult = Result<Outcome, DatapathError>;

/// A plan op with what the session resolved for it.
#[derive(Debug)]
pub enum Step {
    /// Tear everything down (the start of a fallback plan).
    Reset,
    /// Record the acked virtio features (the header layout follows them).
    SetFeatures {
        /// The acked bits.
        features: u64,
    },
    /// Program the dataplane's offloads and header layout (net).
    ConfigureOffloads {
        /// The acked features that matter to the dataplane.
        features: u64,
    },
    /// A region of guest memory the session has just mapped.
    MapRegion {
        /// The mapping.
        region: Arc<MappedRegion>,
    },
    /// A mapping that goes away.
    UnmapRegion {
        /// Which.
        region: RegionKey,
    },
    /// Open the storage with these options (blk).
    OpenStorage {
        /// Read-only.
        readonly: bool,
        /// O_DIRECT.
        direct: bool,
    },
    /// Create a queue's I/O ring (blk).
    CreateIoRing {
        /// The queue.
        queue: u16,
        /// Its depth.
        depth: u16,
    },
    /// Tear down a queue's I/O ring (blk).
    DestroyIoRing {
        /// The queue.
        queue: u16,
    },
    /// Create a dataplane queue pair (net).
    CreateQueue {
        /// The pair.
        pair: u16,
    },
    /// Destroy a dataplane queue pair (net).
    DestroyQueue {
        /// The pair.
        pair: u16,
    },
    /// Steer received frames (net); `None`: by pair.
    ProgramRss {
        /// The steering.
        rss: Option<RssSpec>,
    },
    /// Set the MTU (net).
    SetMtu {
        /// The MTU.
        mtu: u16,
    },
    /// Set the MAC (net).
    SetMac {
        /// The MAC.
        mac: [u8; 6],
    },
    /// Set the guest's cache mode (blk).
    SetWriteback {
        /// Writeback (true) or writethrough.
        writeback: bool,
    },
    /// Forget a ring's configuration.
    ResetRing {
        /// Virtqueue index.
        ring: u16,
    },
    /// Set a ring's size.
    SetRingSize {
        /// Virtqueue index.
        ring: u16,
        /// Descriptors.
        size: u16,
    },
    /// Set a ring's guest addresses.
    SetRingAddresses {
        /// Virtqueue index.
        ring: u16,
        /// Descriptor table, avail and used ring.
        addresses: RingGuestAddresses,
    },
    /// Set where a ring resumes.
    SetRingBase {
        /// Virtqueue index.
        ring: u16,
        /// Next available index.
        next_avail: u16,
    },
    /// Take the ring's kick eventfd: the ring starts (vhost-user spec,
    /// "Ring states"). Carries everything a datapath needs to serve it.
    SetRingKick {
        /// The ring and its configuration.
        start: Box<RingStart>,
    },
    /// Take the ring's call eventfd.
    SetRingCall {
        /// Virtqueue index.
        ring: u16,
        /// The eventfd (none: interrupts are masked).
        call: Option<Arc<File>>,
    },
    /// Enable or disable a ring.
    SetRingEnabled {
        /// Virtqueue index.
        ring: u16,
        /// Enabled.
        enabled: bool,
    },
}

/// What a device's datapath does for each step: one method per op. The
/// defaults refuse ops of the other device kind, so a net datapath
/// implements the net ops and a blk storage the blk ones; the ring ops are
/// common.
pub trait Datapath {
    /// [`Step::Reset`]: back to a device that holds nothing.
    fn reset(&mut self) -> OpResult;
    /// [`Step::SetFeatures`].
    fn set_features(&mut self, features: u64) -> OpResult;
    /// [`Step::ConfigureOffloads`].
    fn configure_offloads(&mut self, features: u64) -> OpResult {
        let _ = features;
        not_for_this_device("configure_offloads")
    }
    /// [`Step::MapRegion`].
    fn map_region(&mut self, region: &Arc<MappedRegion>) -> OpResult;
    /// [`Step::UnmapRegion`].
    fn unmap_region(&mut self, region: &RegionKey) -> OpResult;
    /// [`Step::OpenStorage`].
    fn open_storage(&mut self, readonly: bool, direct: bool) -> OpResult {
        let _ = (readonly, direct);
        not_for_this_device("open_storage")
    }
    /// [`Step::CreateIoRing`].
    fn create_io_ring(&mut self, queue: u16, depth: u16) -> OpResult {
        let _ = (queue, depth);
        not_for_this_device("create_io_ring")
    }
    /// [`Step::DestroyIoRing`].
    fn destroy_io_ring(&mut self, queue: u16) -> OpResult {
        let _ = queue;
        not_for_this_device("destroy_io_ring")
    }
    /// [`Step::CreateQueue`].
    fn create_queue(&mut self, pair: u16) -> OpResult {
        let _ = pair;
        not_for_this_device("create_queue")
    }
    /// [`Step::DestroyQueue`].
    fn destroy_queue(&mut self, pair: u16) -> OpResult {
        let _ = pair;
        not_for_this_device("destroy_queue")
    }
    /// [`Step::ProgramRss`].
    fn program_rss(&mut self, rss: Option<&RssSpec>) -> OpResult {
        let _ = rss;
        not_for_this_device("program_rss")
    }
    /// [`Step::SetMtu`].
    fn set_mtu(&mut self, mtu: u16) -> OpResult {
        let _ = mtu;
        not_for_this_device("set_mtu")
    }
    /// [`Step::SetMac`].
    fn set_mac(&mut self, mac: [u8; 6]) -> OpResult {
        let _ = mac;
        not_for_this_device("set_mac")
    }
    /// [`Step::SetWriteback`].
    fn set_writeback(&mut self, writeback: bool) -> OpResult {
        let _ = writeback;
        not_for_this_device("set_writeback")
    }
    /// [`Step::ResetRing`].
    fn reset_ring(&mut self, ring: u16) -> OpResult;
    /// [`Step::SetRingSize`].
    fn set_ring_size(&mut self, ring: u16, size: u16) -> OpResult;
    /// [`Step::SetRingAddresses`].
    fn set_ring_addresses(&mut self, ring: u16, addresses: RingGuestAddresses) -> OpResult;
    /// [`Step::SetRingBase`].
    fn set_ring_base(&mut self, ring: u16, next_avail: u16) -> OpResult;
    /// [`Step::SetRingKick`]: start serving the ring.
    fn set_ring_kick(&mut self, start: RingStart) -> OpResult;
    /// [`Step::SetRingCall`].
    fn set_ring_call(&mut self, ring: u16, call: Option<Arc<File>>) -> OpResult;
    /// [`Step::SetRingEnabled`].
    fn set_ring_enabled(&mut self, ring: u16, enabled: bool) -> OpResult;
}

fn not_for_this_device(op: &'static str) -> OpResult {
    Err(DatapathError::NotForThisDevice { op })
}

/// Execute `step` on `datapath`: the one place that maps steps to methods.
pub fn execute(datapath: &mut dyn Datapath, step: Step) -> OpResult {
    match step {
        Step::Reset => datapath.reset(),
        Step::SetFeatures { features } => datapath.set_features(features),
        Step::ConfigureOffloads { features } => datapath.configure_offloads(features),
        Step::MapRegion { region } => datapath.map_region(&region),
        Step::UnmapRegion { region } => datapath.unmap_region(&region),
        Step::OpenStorage { readonly, direct } => datapath.open_storage(readonly, direct),
        Step::CreateIoRing { queue, depth } => datapath.create_io_ring(queue, depth),
        Step::DestroyIoRing { queue } => datapath.destroy_io_ring(queue),
        Step::CreateQueue { pair } => datapath.create_queue(pair),
        Step::DestroyQueue { pair } => datapath.destroy_queue(pair),
        Step::ProgramRss { rss } => datapath.program_rss(rss.as_ref()),
        Step::SetMtu { mtu } => datapath.set_mtu(mtu),
        Step::SetMac { mac } => datapath.set_mac(mac),
        Step::SetWriteback { writeback } => datapath.set_writeback(writeback),
        Step::ResetRing { ring } => datapath.reset_ring(ring),
        Step::SetRingSize { ring, size } => datapath.set_ring_size(ring, size),
        Step::SetRingAddresses { ring, addresses } => datapath.set_ring_addresses(ring, addresses),
        Step::SetRingBase { ring, next_avail } => datapath.set_ring_base(ring, next_avail),
        Step::SetRingKick { start } => datapath.set_ring_kick(*start),
        Step::SetRingCall { ring, call } => datapath.set_ring_call(ring, call),
        Step::SetRingEnabled { ring, enabled } => datapath.set_ring_enabled(ring, enabled),
    }
}

/// Execute `steps` in order, stopping at the first failure: what a device
/// with its datapath on the protocol thread does with a batch. The results
/// line up with the steps executed.
pub fn execute_all(datapath: &mut dyn Datapath, steps: Vec<Step>) -> Vec<OpResult> {
    let mut results = Vec::with_capacity(steps.len());
    for step in steps {
        let result = execute(datapath, step);
        let failed = result.is_err();
        results.push(result);
        if failed {
            break;
        }
    }
    results
}
