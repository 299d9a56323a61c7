//! `dataplane=vhost-net:TAP`: the kernel's vhost-net moves frames between
//! the front-end's rings and a tap, and the agent touches no packet. The
//! agent stays in the control path: negotiation, memory, the dirty log,
//! stop and start, presetup and migration all go through the session as
//! for any device; only the datapath differs.
//!
//! * One tap queue per queue pair (created or attached to at start-up, as
//!   `tap` does) and one `/dev/vhost-net` instance per pair, opened by the
//!   plan's `create_queue` ([`pair`]). The instance's RX virtqueue is the
//!   pair's even ring, its TX virtqueue the odd one.
//! * The kernel gets the agent's own mappings of guest RAM as its memory
//!   table and ring addresses translated into the agent's address space,
//!   each checked to lie inside one mapped region first
//!   ([`crate::net::kernel::table`]); the
//!   front-end's kick and call eventfds go to the kernel as they are.
//! * Features: the acked ring bits (VERSION_1, MRG_RXBUF, EVENT_IDX,
//!   INDIRECT_DESC) go to VHOST_SET_FEATURES; the header size follows
//!   MRG_RXBUF / VERSION_1 in the kernel and, through TUNSETVNETHDRSZ, in
//!   the tap, which also takes the offloads the guest acked.
//! * The plan's steps are ioctls, one method per op ([`kernel`]); the
//!   memory table, which the kernel takes whole, is handed over once per
//!   run of region ops ([`batch`]).
//! * GET_VRING_BASE takes the backend away and reads the kernel's index
//!   (VHOST_GET_VRING_BASE): exact, since the kernel finishes what it does
//!   on a ring before the backend goes.
//! * Dirty logging is the kernel's: the log base is the agent's mapping of
//!   the front-end's log, LOG_ALL and the used rings' log flags are set
//!   while the session logs, so no agent work is done per packet.
//! * The kernel picks RX queues (the tap spreads flows): no RSS.
//!
//! Without a usable `/dev/vhost-net` the device is not served: the agent
//! says which device needs it and how to get it, and never falls back to
//! copying frames itself.

mod batch;
mod error;
mod kernel;
mod pair;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use netdev::spec::{self, MacAddress};
use netdev::tap::TapDevice;
use presetup::{DeviceConfig, DeviceKind};
use vhost::vhost_kern::net::Net;
use vhost::VhostBackend;
use vm_memory::GuestMemoryAtomic;

pub use error::VhostNetError;

use self::error::io_error;
use self::kernel::{KernelNet, KERNEL_BITS};
use super::common::NetCommon;
use super::device::{net_protocol_features, NetOptions, NetShared};
use crate::vhost_user::datapath::{self, OpResult, Step};
use crate::vhost_user::device::{Device, DeviceError, EarlyError, RingStopped, StopMode};
use crate::vhost_user::dirty_log::LogRegion;
use crate::vhost_user::memory::GuestRam;

/// Probe `/dev/vhost-net` the way a queue pair will use it (open it, take
/// VHOST_SET_OWNER) and return what it offers (VHOST_GET_FEATURES); the
/// error names `dataplane` and the fix.
fn probe(dataplane: &str, memory: &GuestMemoryAtomic<GuestRam>) -> Result<u64, VhostNetError> {
    let unavailable = |e: vhost::Error| VhostNetError::unavailable(dataplane, io_error(e));
    let handle = Net::new(memory.clone()).map_err(unavailable)?;
    handle.set_owner().map_err(unavailable)?;
    handle.get_features().map_err(unavailable)
}

/// A virtio-net device on the kernel's vhost-net (module documentation).
pub struct VhostNetDevice {
    common: NetCommon,
    kernel: KernelNet,
    offered: u64,
    needs_reset: Arc<AtomicBool>,
}

impl VhostNetDevice {
    /// A device named `name` on tap `tap_name` (created, or attached to,
    /// with one queue per pair, brought up, MTU set) whose kernel datapath
    /// reaches guest memory the agent maps into `memory`. Fails, naming the
    /// fix, if `/dev/vhost-net` is missing or refused.
    pub fn open(
        name: &str,
        options: &NetOptions,
        tap_name: &str,
        memory: GuestMemoryAtomic<GuestRam>,
        needs_reset: Arc<AtomicBool>,
    ) -> Result<VhostNetDevice, VhostNetError> {
        // First, so that a host without vhost-net gets that answer and no
        // tap is made for nothing.
        let kernel_offered = probe(&format!("vhost-net:{tap_name}"), &memory)?;
        let tap = TapDevice::open(tap_name, options.queue_pairs, spec::HDR_LEN_MRG)?;
        tap.set_mtu(options.mtu)?;
        tap.set_up(true)?;
        let name: Arc<str> = Arc::from(name);
        let common = NetCommon::new(
            name.clone(),
            options,
            format!("vhost-net:{}", tap.name()),
            netdev::tap::MAX_MTU,
            false,
        );
        // The ring bits the kernel lacks are not offered; the device bits
        // and the tap's offloads are the agent's.
        let missing = KERNEL_BITS & !kernel_offered;
        let offered = (spec::BASE_FEATURES & !missing) | spec::VNET_HDR_OFFLOADS;
        log::info!(
            "{name}: /dev/vhost-net offers {kernel_offered:#x}; tap {} with {} queue(s)",
            tap.name(),
            tap.queues()
        );
        let kernel = KernelNet::new(name, options.queue_pairs, tap, memory, kernel_offered)?;
        Ok(VhostNetDevice {
            common,
            kernel,
            offered,
            needs_reset,
        })
    }

    /// What the control API shows of this device (its pair counters stay
    /// 0: the kernel moves the frames; the tap's statistics count them).
    pub fn shared(&self) -> Arc<NetShared> {
        self.common.shared().clone()
    }
}

impl Device for VhostNetDevice {
    fn features(&self) -> u64 {
        self.offered
    }

    fn protocol_features(&self) -> u64 {
        net_protocol_features()
    }

    fn queue_num(&self) -> u64 {
        u64::from(self.common.queue_pairs())
    }

    fn num_rings(&self) -> u16 {
        2 * self.common.queue_pairs()
    }

    fn max_ring_size(&self) -> u16 {
        spec::MAX_QUEUE_SIZE
    }

    fn config_space(&self) -> Vec<u8> {
        self.common.config_space()
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        self.common.set_config(offset, data)
    }

    fn device_config(&self) -> DeviceKind {
        self.common.device_config()
    }

    fn baseline(&self) -> Option<DeviceConfig> {
        None
    }

    fn take_early(&mut self, early: &DeviceConfig) -> Result<DeviceKind, EarlyError> {
        self.common.take_early(early)
    }

    /// The steps in order on this thread (they are ioctls); the memory
    /// table once per run of region ops ([`batch`]).
    fn execute(&mut self, steps: Vec<Step>) -> Vec<OpResult> {
        batch::execute(&mut self.kernel, steps)
    }

    fn stop_ring(&mut self, ring: u16, _mode: StopMode) -> RingStopped {
        // The kernel finishes the frame it is on before the backend goes:
        // there is nothing to drain or suspend.
        crate::net::kernel::ring_stopped(
            self.common.name(),
            ring,
            self.kernel.stop(ring),
            &self.needs_reset,
        )
    }

    fn set_log(&mut self, log: Option<Arc<LogRegion>>) -> Result<(), DeviceError> {
        self.kernel
            .set_log(log)
            .map_err(|e| DeviceError::Datapath(datapath::DatapathError::failed("set_log", e)))
    }

    fn net_set_mtu(&mut self, mtu: u64) -> Result<(), DeviceError> {
        self.common.net_set_mtu(mtu)
    }

    /// A RARP frame for `mac` written to the tap by the agent (vhost-net
    /// has no way to send a frame of its own).
    fn send_rarp(&mut self, mac: [u8; 6]) -> Result<bool, DeviceError> {
        let mac = MacAddress(mac);
        self.common.shared().state().mac = mac;
        let tap = self.kernel.tap();
        let hdr_len = tap.vnet_hdr_len();
        let mut frame = vec![0u8; hdr_len + 60];
        frame[hdr_len..].copy_from_slice(&spec::rarp_frame(mac));
        let sent = tap
            .send(0, &frame)
            .map_err(|e| DeviceError::Datapath(datapath::DatapathError::failed("announce", e)))?;
        log::info!(
            "{}: announced {mac} on tap {} (RARP{})",
            self.common.name(),
            tap.name(),
            if sent {
                ""
            } else {
                ", not taken: the tap is down"
            }
        );
        Ok(sent)
    }

    fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        self.common.save_state()
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), DeviceError> {
        self.common.load_state(bytes)
    }

    fn supports_inband_presetup(&self) -> bool {
        true
    }
}
