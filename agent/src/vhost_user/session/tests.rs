//! The plan drives the datapath: a session over a device whose datapath
//! records every method called, driven by the vhost-user handler methods
//! as a front-end would. What is counted as executed is what was called;
//! an op presetup saved is one never called.

use std::fs::File;
use std::sync::{Arc, Mutex};

use presetup::{DeviceConfig, DeviceKind, NetConfig, RegionKey, RssSpec, ValidConfig};
use vhost::vhost_user::message::{
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserU64,
    VhostUserVirtioFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vm_memory::ByteValued;

use super::own::OwnReply;
use super::Session;
use crate::metrics::DeviceMetrics;
use crate::vhost_user::datapath::{self, Datapath, OpResult, Outcome, Step};
use crate::vhost_user::device::{
    Device, DeviceError, EarlyError, RingStart, RingStopped, StopMode,
};
use crate::vhost_user::dirty_log::LogRegion;
use crate::vhost_user::inband::{PresetupProtocol, VHOST_USER_PROTOCOL_F_PRESETUP};
use crate::vhost_user::memory::{MappedRegion, MemoryMap};
use crate::vhost_user::requests::code;
use crate::vhost_user::status::DeviceStatus;
use crate::vhost_user::vring::RingGuestAddresses;

type Calls = Arc<Mutex<Vec<&'static str>>>;

/// A datapath that records each method called, by op name.
struct Recorder {
    calls: Calls,
    kicks: Vec<Option<File>>,
    /// An op that fails (once), for the recovery tests.
    fail: Arc<Mutex<Option<&'static str>>>,
}

impl Recorder {
    fn call(&self, name: &'static str) -> OpResult {
        self.calls.lock().unwrap().push(name);
        let mut fail = self.fail.lock().unwrap();
        if *fail == Some(name) {
            *fail = None;
            return Err(datapath::DatapathError::Precondition {
                op: name,
                reason: "failing on purpose".into(),
            });
        }
        Ok(Outcome::Done)
    }
}

impl Datapath for Recorder {
    fn reset(&mut self) -> OpResult {
        self.call("reset")
    }
    fn set_features(&mut self, _: u64) -> OpResult {
        self.call("set_features")
    }
    fn configure_offloads(&mut self, _: u64) -> OpResult {
        self.call("configure_offloads")
    }
    fn map_region(&mut self, _: &Arc<MappedRegion>) -> OpResult {
        self.call("map_region")
    }
    fn unmap_region(&mut self, _: &RegionKey) -> OpResult {
        self.call("unmap_region")
    }
    fn create_queue(&mut self, _: u16) -> OpResult {
        self.call("create_queue")
    }
    fn destroy_queue(&mut self, _: u16) -> OpResult {
        self.call("destroy_queue")
    }
    fn program_rss(&mut self, _: Option<&RssSpec>) -> OpResult {
        self.call("program_rss")
    }
    fn set_mtu(&mut self, _: u16) -> OpResult {
        self.call("set_mtu")
    }
    fn set_mac(&mut self, _: [u8; 6]) -> OpResult {
        self.call("set_mac")
    }
    fn reset_ring(&mut self, _: u16) -> OpResult {
        self.call("reset_ring")
    }
    fn set_ring_size(&mut self, _: u16, _: u16) -> OpResult {
        self.call("set_ring_size")
    }
    fn set_ring_addresses(&mut self, _: u16, _: RingGuestAddresses) -> OpResult {
        self.call("set_ring_addresses")
    }
    fn set_ring_base(&mut self, _: u16, _: u16) -> OpResult {
        self.call("set_ring_base")
    }
    fn set_ring_kick(&mut self, start: RingStart) -> OpResult {
        let ring = usize::from(start.ring);
        self.kicks[ring] = Some(start.kick);
        self.call("set_ring_kick")
    }
    fn set_ring_call(&mut self, _: u16, _: Option<Arc<File>>) -> OpResult {
        self.call("set_ring_call")
    }
    fn set_ring_enabled(&mut self, _: u16, _: bool) -> OpResult {
        self.call("set_ring_enabled")
    }
}

/// A net device with `pairs` queue pairs whose datapath is a [`Recorder`].
struct RecordedNet {
    pairs: u16,
    mtu: u16,
    recorder: Recorder,
}

impl Device for RecordedNet {
    fn features(&self) -> u64 {
        netdev::spec::BASE_FEATURES
    }
    fn protocol_features(&self) -> u64 {
        crate::net::device::net_protocol_features()
    }
    fn queue_num(&self) -> u64 {
        u64::from(self.pairs)
    }
    fn num_rings(&self) -> u16 {
        2 * self.pairs
    }
    fn max_ring_size(&self) -> u16 {
        256
    }
    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }
    fn set_config(&mut self, _: u32, _: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported("SET_CONFIG"))
    }
    fn device_config(&self) -> DeviceKind {
        DeviceKind::Net(NetConfig {
            mtu: self.mtu,
            mac: [2, 0, 0, 0, 0, 1],
            queue_pairs: self.pairs,
            rss: None,
        })
    }
    fn baseline(&self) -> Option<DeviceConfig> {
        None
    }
    fn take_early(&mut self, early: &DeviceConfig) -> Result<DeviceKind, EarlyError> {
        match &early.device {
            DeviceKind::Net(net) if net.queue_pairs <= self.pairs => {
                self.mtu = net.mtu;
                Ok(early.device.clone())
            }
            other => Err(EarlyError::Queues {
                early: other.ring_count() as u16,
                device: self.pairs,
            }),
        }
    }
    fn execute(&mut self, steps: Vec<Step>) -> Vec<OpResult> {
        datapath::execute_all(&mut self.recorder, steps)
    }
    fn stop_ring(&mut self, ring: u16, _: StopMode) -> RingStopped {
        RingStopped {
            kick: self.recorder.kicks[usize::from(ring)].take(),
            ..RingStopped::default()
        }
    }
    fn net_set_mtu(&mut self, mtu: u64) -> Result<(), DeviceError> {
        self.mtu = u16::try_from(mtu).map_err(|_| DeviceError::Unsupported("MTU"))?;
        Ok(())
    }
    fn supports_inband_presetup(&self) -> bool {
        true
    }
    fn set_log(&mut self, log: Option<Arc<LogRegion>>) -> Result<(), DeviceError> {
        let name = if log.is_some() {
            "set_log(on)"
        } else {
            "set_log(off)"
        };
        self.recorder.call(name).map(|_| ())?;
        Ok(())
    }
}

/// A dirty log as QEMU makes it: a memfd sealed against resizing (the
/// session refuses a log that could shrink under its mapping).
fn sealed_log(size: u64) -> File {
    use std::os::unix::io::{AsRawFd, FromRawFd};
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd =
        unsafe { libc::memfd_create(c"log".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS with an int argument on our memfd.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(rc, 0, "F_ADD_SEALS");
    file
}

fn eventfd() -> File {
    use std::os::unix::io::FromRawFd;
    // SAFETY: eventfd(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: `fd` was just created and is owned by nothing else.
    unsafe { File::from_raw_fd(fd) }
}

const HEAVY: &[&str] = &[
    "reset",
    "configure_offloads",
    "map_region",
    "unmap_region",
    "create_queue",
    "destroy_queue",
    "program_rss",
    "set_mtu",
];

const USER_ADDR: u64 = 0x7f00_0000_0000;
const RAM_SIZE: u64 = 1 << 20;

struct Rig {
    session: Session,
    calls: Calls,
    /// Make this op fail once.
    fail: Arc<Mutex<Option<&'static str>>>,
    ram: File,
    /// Eventfd stand-ins made ahead of a timed start.
    spare_fds: Vec<File>,
}

impl Rig {
    fn new(pairs: u16, mtu: u16) -> Rig {
        let calls = Calls::default();
        let fail = Arc::new(Mutex::new(None));
        let device = RecordedNet {
            pairs,
            mtu,
            recorder: Recorder {
                calls: calls.clone(),
                kicks: (0..2 * pairs).map(|_| None).collect(),
                fail: fail.clone(),
            },
        };
        let session = Session::new(
            "t",
            Box::new(device),
            MemoryMap::default(),
            DeviceStatus::default(),
            Arc::new(DeviceMetrics::new("t")),
            PresetupProtocol::NvidiaRfc,
        );
        let ram = tempfile::tempfile().unwrap();
        ram.set_len(RAM_SIZE).unwrap();
        Rig {
            session,
            calls,
            fail,
            ram,
            spare_fds: Vec::new(),
        }
    }

    fn fd(&mut self) -> File {
        self.spare_fds.pop().unwrap_or_else(eventfd)
    }

    fn features() -> u64 {
        netdev::spec::BASE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn connect(&mut self, inband: bool) {
        let mut protocol = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        protocol |= VhostUserProtocolFeatures::MTU;
        let mut bits = protocol.bits();
        if inband {
            bits |= VHOST_USER_PROTOCOL_F_PRESETUP;
        }
        self.session.set_protocol_features(bits).unwrap();
    }

    /// SET_FEATURES and SET_MEM_TABLE, as a start sends them.
    fn features_and_memory(&mut self) {
        self.session.set_features(Self::features()).unwrap();
        let region = VhostUserMemoryRegion::new(0, RAM_SIZE, USER_ADDR, 0);
        self.session
            .set_mem_table(&[region], vec![self.ram.try_clone().unwrap()], None)
            .unwrap();
    }

    /// SET_VRING_NUM / ADDR / BASE of `ring` at its test addresses.
    fn layout(&mut self, ring: u32) {
        let base = USER_ADDR + 0x10000 * u64::from(ring + 1);
        self.session.set_vring_num(ring, 256).unwrap();
        let flags = VhostUserVringAddrFlags::empty();
        self.session
            .set_vring_addr(ring, flags, base, base + 0x2000, base + 0x1000, 0)
            .unwrap();
        self.session.set_vring_base(ring, 0).unwrap();
    }

    /// The start sequence QEMU sends for `pairs` pairs with `mtu`.
    fn start(&mut self, pairs: u16, mtu: u64) {
        assert!(matches!(
            self.own(code::NET_SET_MTU, mtu),
            OwnReply::Ack(true)
        ));
        self.features_and_memory();
        for ring in 0..u32::from(2 * pairs) {
            self.layout(ring);
            let index = u8::try_from(ring).unwrap();
            let (kick, call) = (self.fd(), self.fd());
            self.session.set_vring_kick(index, Some(kick)).unwrap();
            self.session.set_vring_call(index, Some(call)).unwrap();
            self.session.set_vring_enable(ring, true).unwrap();
        }
    }

    fn own(&mut self, request: u32, value: u64) -> OwnReply {
        self.session
            .handle_own(request, VhostUserU64::new(value).as_slice())
    }

    /// The in-band bracket around the start sequence (no kick fds, as the
    /// RFC sends it).
    fn bracket(&mut self, pairs: u16, mtu: u64) {
        assert!(matches!(
            self.own(code::GET_SHARED_OBJECT, 1),
            OwnReply::Ack(true)
        ));
        self.own(code::NET_SET_MTU, mtu);
        self.features_and_memory();
        for ring in 0..u32::from(2 * pairs) {
            self.layout(ring);
            self.session.set_vring_enable(ring, true).unwrap();
        }
        assert!(matches!(
            self.own(code::GET_SHARED_OBJECT, 2),
            OwnReply::Ack(true)
        ));
    }

    /// The heavy calls since the last look, in order.
    fn heavy(&self) -> Vec<&'static str> {
        let mut calls = self.calls.lock().unwrap();
        let heavy = calls
            .iter()
            .copied()
            .filter(|name| HEAVY.contains(name))
            .collect();
        calls.clear();
        heavy
    }

    fn early(pairs: u16, mtu: u16) -> ValidConfig {
        ValidConfig::new(DeviceConfig {
            version: presetup::FORMAT_VERSION,
            acked_features: Self::features(),
            protocol_features: (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MTU)
                .bits(),
            memory: Vec::new(),
            rings: Vec::new(),
            device: DeviceKind::Net(NetConfig {
                mtu,
                mac: [2, 0, 0, 0, 0, 1],
                queue_pairs: pairs,
                rss: None,
            }),
        })
        .unwrap()
    }
}

fn sorted(mut names: Vec<&'static str>) -> Vec<&'static str> {
    names.sort_unstable();
    names
}

#[test]
fn without_presetup_every_heavy_op_executes_once() {
    let mut rig = Rig::new(2, 1500);
    rig.connect(false);
    rig.start(2, 1500);
    assert_eq!(
        sorted(rig.heavy()),
        [
            "configure_offloads",
            "create_queue",
            "create_queue",
            "map_region",
            "set_mtu"
        ]
    );
    let report = rig.session.metrics().report();
    let switchover = report.last_switchover.expect("a start");
    assert_eq!(
        sorted(switchover.heavy_applied),
        sorted(vec![
            "configure_offloads",
            "create_queue",
            "create_queue",
            "map_region",
            "set_mtu"
        ])
    );
    assert!(switchover.heavy_skipped.is_empty());
    assert!(!switchover.early);
}

#[test]
fn presetup_then_an_identical_start_calls_only_what_needs_the_start_s_fds() {
    let mut rig = Rig::new(2, 1500);
    rig.connect(false);
    let done = rig.session.presetup(Rig::early(2, 1500)).unwrap();
    assert_eq!(
        sorted(done.heavy_executed),
        [
            "configure_offloads",
            "create_queue",
            "create_queue",
            "set_mtu"
        ]
    );
    rig.heavy();
    rig.start(2, 1500);
    // Memory comes with fds only at the start: its mapping is the one
    // heavy op left when presetup goes through the control API.
    assert_eq!(rig.heavy(), ["map_region"]);
    let switchover = rig.session.metrics().report().last_switchover.unwrap();
    assert!(switchover.early);
    assert_eq!(switchover.heavy_applied, ["map_region"]);
    assert_eq!(
        sorted(switchover.heavy_skipped),
        [
            "configure_offloads",
            "create_queue",
            "create_queue",
            "set_mtu"
        ]
    );
}

#[test]
fn an_in_band_bracket_then_an_identical_start_executes_no_heavy_op() {
    let mut rig = Rig::new(2, 1500);
    rig.connect(true);
    rig.bracket(2, 1500);
    assert_eq!(
        sorted(rig.heavy()),
        [
            "configure_offloads",
            "create_queue",
            "create_queue",
            "map_region",
            "set_mtu"
        ]
    );
    assert!(
        !rig.calls.lock().unwrap().contains(&"set_ring_kick"),
        "no ring starts inside the bracket"
    );
    rig.start(2, 1500);
    assert_eq!(rig.heavy(), Vec::<&str>::new());
    assert_eq!(rig.session.metrics().report().presetup.hits, 1);
}

#[test]
fn a_changed_mtu_executes_exactly_set_mtu() {
    let mut rig = Rig::new(2, 1500);
    rig.connect(true);
    rig.bracket(2, 1500);
    rig.heavy();
    rig.start(2, 9000);
    assert_eq!(rig.heavy(), ["set_mtu"]);
}

#[test]
fn a_changed_queue_count_executes_exactly_the_queue_ops() {
    let mut rig = Rig::new(2, 1500);
    rig.connect(false);
    rig.session.presetup(Rig::early(1, 1500)).unwrap();
    assert_eq!(
        rig.heavy().iter().filter(|n| **n == "create_queue").count(),
        1
    );
    rig.start(2, 1500);
    assert_eq!(sorted(rig.heavy()), ["create_queue", "map_region"]);
}

#[test]
fn a_restart_after_a_stop_executes_no_heavy_op() {
    let mut rig = Rig::new(1, 1500);
    rig.connect(false);
    rig.start(1, 1500);
    rig.heavy();
    for ring in 0..2 {
        rig.session.get_vring_base(ring).unwrap();
    }
    rig.start(1, 1500);
    let kicks = rig
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|n| **n == "set_ring_kick")
        .count();
    assert_eq!(kicks, 2, "both rings started again");
    assert_eq!(rig.heavy(), Vec::<&str>::new());
}

/// After a step failed (the datapath refused a ring, say), the next plan
/// resets the datapath and configures it in full: the memory the session
/// mapped is handed to the datapath again (its fd was spent on the
/// mapping), and the ring starts.
#[test]
fn after_a_failed_step_the_next_plan_resets_and_reuses_the_mapping() {
    let mut rig = Rig::new(1, 1500);
    rig.connect(false);
    rig.features_and_memory();
    rig.layout(0);
    *rig.fail.lock().unwrap() = Some("set_ring_kick");
    let kick = rig.fd();
    assert!(rig.session.set_vring_kick(0, Some(kick)).is_err());
    assert_ne!(rig.session.status.get() & 0x40, 0, "NEEDS_RESET");
    rig.heavy();
    let kick = rig.fd();
    rig.session.set_vring_kick(0, Some(kick)).unwrap();
    let heavy = rig.heavy();
    assert_eq!(heavy.first(), Some(&"reset"), "{heavy:?}");
    assert!(heavy.contains(&"map_region"), "{heavy:?}");
    assert!(rig.session.ring(0).is_some_and(|ring| ring.running));
}

/// A device whose datapath writes guest memory itself (the kernel's
/// vhost-net) is told whenever logging switches: on exactly while a log is
/// mapped and VHOST_F_LOG_ALL is acked, off when LOG_ALL goes or the
/// front-end does.
#[test]
fn the_device_hears_when_dirty_logging_switches() {
    let mut rig = Rig::new(1, 1500);
    rig.connect(false);
    rig.start(1, 1500);
    let last_log_call = |rig: &Rig| {
        let calls = rig.calls.lock().unwrap();
        calls
            .iter()
            .rev()
            .find(|name| name.starts_with("set_log"))
            .copied()
    };
    assert_eq!(last_log_call(&rig), Some("set_log(off)"));
    let log = sealed_log(RAM_SIZE / 4096 / 8);
    rig.session
        .set_log_base(&VhostUserLog::new(RAM_SIZE / 4096 / 8, 0), log)
        .unwrap();
    assert_eq!(last_log_call(&rig), Some("set_log(off)"), "no LOG_ALL yet");
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
    rig.session.set_features(Rig::features() | log_all).unwrap();
    assert_eq!(last_log_call(&rig), Some("set_log(on)"));
    rig.session.set_features(Rig::features()).unwrap();
    assert_eq!(last_log_call(&rig), Some("set_log(off)"));
    rig.session.set_features(Rig::features() | log_all).unwrap();
    assert_eq!(last_log_call(&rig), Some("set_log(on)"));
    rig.session.disconnected();
    assert_eq!(last_log_call(&rig), Some("set_log(off)"));
    // A device that cannot log fails the request that turns logging on,
    // and needs a reset: its writes would go unlogged.
    let mut rig = Rig::new(1, 1500);
    rig.connect(false);
    rig.start(1, 1500);
    let log = sealed_log(RAM_SIZE / 4096 / 8);
    rig.session
        .set_log_base(&VhostUserLog::new(RAM_SIZE / 4096 / 8, 0), log)
        .unwrap();
    *rig.fail.lock().unwrap() = Some("set_log(on)");
    assert!(rig.session.set_features(Rig::features() | log_all).is_err());
    assert_ne!(rig.session.status.get() & 0x40, 0, "NEEDS_RESET");
}

/// How long the session's own work for a start takes (not a pass/fail
/// figure: printed with --nocapture for the start-path breakdown).
#[test]
fn the_sessions_own_work_for_a_start_is_small() {
    let mut rig = Rig::new(4, 1500);
    rig.connect(false);
    rig.session.presetup(Rig::early(4, 1500)).unwrap();
    rig.heavy();
    rig.spare_fds = (0..16).map(|_| eventfd()).collect();
    let started = std::time::Instant::now();
    rig.start(4, 1500);
    let spent = started.elapsed();
    eprintln!("session work for a 4-pair start (recording datapath): {spent:?}");
    assert_eq!(rig.heavy(), ["map_region"]);
}

/// Many starts in a row, for a profiler (`cargo test --release
/// profile_many_starts -- --ignored`).
#[test]
#[ignore]
fn profile_many_starts() {
    for _ in 0..200 {
        let mut rig = Rig::new(4, 1500);
        rig.connect(false);
        rig.session.presetup(Rig::early(4, 1500)).unwrap();
        rig.spare_fds = (0..16).map(|_| eventfd()).collect();
        rig.start(4, 1500);
    }
}
