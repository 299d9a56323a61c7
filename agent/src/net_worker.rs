//! The data path of one net device: a single thread with a mio loop that
//! owns the device's running rings and its dataplane.
//!
//! One thread per device, not per ring, because the device steers received
//! frames to RX queues itself (RSS; `loop` reflects a TX frame of one pair
//! into the RX ring of whichever pair RSS picks). Owning every ring of the
//! device keeps that lock-free. The protocol thread talks to it with
//! synchronous commands, so when a command returns the ring is started or
//! stopped, and a stopped ring's index is exact: frames are handled whole
//! inside one step, so nothing is ever half-done across a stop.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use netdev::dataplane::Dataplane;
use netdev::ring::{NetRing, RxOutcome, TxChain};
use netdev::rss::Rss;
use netdev::spec::{self, MacAddress};
use netdev::stats::{PairCounts, PairStats};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest_mapping::FaultWatch;
use crate::memory::GuestRam;
use crate::ratelimit::PeerLog;
use crate::vring::{drain_eventfd, notify};

/// Chains taken from one ring before the loop looks at the others.
const BURST: usize = 64;

const CONTROL: Token = Token(usize::MAX);
/// Tokens from here on are dataplane fds, by pair.
const DATAPLANE_BASE: usize = 1 << 16;

/// What the `sim` dataplane charged so far, per operation: a simulated
/// hardware's configuration cost, for the control API and experiments.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimReport {
    /// The profile's name.
    pub profile: String,
    /// Per operation (`create_queue`, ...): how often and the time spent.
    pub charged: std::collections::BTreeMap<&'static str, SimCharge>,
}

/// One operation's total in a [`SimReport`].
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct SimCharge {
    /// Times performed.
    pub count: u64,
    /// Microseconds spent.
    pub us: u64,
}

impl SimReport {
    fn of(hw: &netdev::sim::SimHardware) -> SimReport {
        SimReport {
            profile: hw.profile().name.clone(),
            charged: hw
                .charged()
                .iter()
                .map(|(op, (count, spent))| {
                    let us = u64::try_from(spent.as_micros()).unwrap_or(u64::MAX);
                    (op.name(), SimCharge { count: *count, us })
                })
                .collect(),
        }
    }
}

/// What the data path reports to the rest of the agent.
pub struct DataPathOutputs {
    /// Per-pair counters.
    pub stats: Arc<[PairStats]>,
    /// The sim dataplane's accounting.
    pub sim_report: Arc<Mutex<Option<SimReport>>>,
    /// Set when a ring breaks (the device needs a reset).
    pub needs_reset: Arc<AtomicBool>,
}

/// A ring ready to serve, handed to the worker.
pub struct RingStart {
    /// Virtqueue index (2p is RX of pair p, 2p+1 its TX).
    pub index: u16,
    /// The configured queue.
    pub queue: Queue,
    /// The guest's kick eventfd.
    pub kick: File,
    /// The guest's call eventfd, if set yet.
    pub call: Option<Arc<File>>,
    /// SET_VRING_ENABLE state.
    pub enabled: bool,
}

type Reply<T> = mpsc::SyncSender<T>;

enum Command {
    Start(RingStart, Reply<()>),
    Stop(u16, Reply<Option<u16>>),
    SetCall(u16, Option<Arc<File>>),
    SetEnabled(u16, bool, Reply<()>),
    SetFeatures(u64, Reply<Result<(), String>>),
    SetMtu(u16, Reply<Result<(), String>>),
    SetRss(Option<Rss>, Reply<()>),
    Announce(MacAddress, Reply<Result<bool, String>>),
    MapMemory(Reply<()>),
    Presetup(EarlyWork, Reply<EarlyDone>),
    Exit,
}

/// The heavy work of an early configuration that needs no guest memory,
/// done by the data path thread so the dataplane charges it now.
#[derive(Debug)]
pub struct EarlyWork {
    /// Virtqueues whose dataplane queue to create ahead of their start.
    pub queues: u16,
    /// RSS steering to program (`None`: leave it as it is).
    pub rss: Option<Rss>,
    /// MTU to set if the dataplane does not have it already.
    pub mtu: u16,
    /// Virtio features whose offloads to configure (`None`: none acked
    /// yet in the early configuration).
    pub features: Option<u64>,
}

/// What the data path actually did for an [`EarlyWork`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EarlyDone {
    /// Dataplane queues created (waiting for their rings).
    pub queues_created: u16,
    /// RSS programmed.
    pub rss_programmed: bool,
    /// MTU set.
    pub mtu_set: bool,
    /// Header layout and offloads configured.
    pub offloads_set: bool,
}

/// Handle to a device's data path thread.
pub struct NetWorker {
    name: Arc<str>,
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// The data path thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetWorkerError {
    /// eventfd, epoll or thread creation failed.
    #[error("cannot start the net data path thread")]
    Setup(#[source] io::Error),
}

impl NetWorker {
    /// Start the data path of a device with `pairs` queue pairs. It owns
    /// `dataplane` from now on; `poll` is how long to busy-poll after work.
    pub fn spawn(
        name: Arc<str>,
        dataplane: Dataplane,
        pairs: u16,
        memory: GuestMemoryAtomic<GuestRam>,
        outputs: DataPathOutputs,
        poll: Duration,
    ) -> Result<NetWorker, NetWorkerError> {
        let DataPathOutputs {
            stats,
            sim_report,
            needs_reset,
        } = outputs;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(NetWorkerError::Setup)?);
        let poller = Poll::new().map_err(NetWorkerError::Setup)?;
        poller
            .registry()
            .register(
                &mut SourceFd(&wake.as_raw_fd()),
                CONTROL,
                Interest::READABLE,
            )
            .map_err(NetWorkerError::Setup)?;
        for pair in 0..pairs {
            if let Some(fd) = dataplane.rx_fd(pair) {
                poller
                    .registry()
                    .register(
                        &mut SourceFd(&fd),
                        Token(DATAPLANE_BASE + usize::from(pair)),
                        Interest::READABLE,
                    )
                    .map_err(NetWorkerError::Setup)?;
            }
        }
        if let Some(hw) = dataplane.sim() {
            *sim_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(SimReport::of(hw));
        }
        let (commands, receiver) = mpsc::channel();
        let state = DataPath {
            name: name.clone(),
            dataplane,
            memory,
            rings: (0..2 * pairs).map(|_| None).collect(),
            rx_ready: vec![true; usize::from(pairs)],
            pending: (0..pairs).map(|_| None).collect(),
            stats,
            counts: vec![PairCounts::default(); usize::from(pairs)],
            rss: None,
            hdr_len: spec::HDR_LEN_MRG,
            mrg_rxbuf: true,
            tx_buf: vec![0u8; spec::HDR_LEN_MRG + spec::MAX_FRAME_LEN],
            rx_buf: vec![0u8; spec::HDR_LEN_MRG + spec::MAX_FRAME_LEN],
            needs_reset,
            poll,
            peers: PeerLog::for_device(&name),
            faults: FaultWatch::default(),
            sim_report,
            precreated: 0,
            mtu: None,
            offloads: None,
        };
        let wake_thread = wake.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-net"))
            .spawn(move || state.run(poller, &wake_thread, &receiver))
            .map_err(NetWorkerError::Setup)?;
        Ok(NetWorker {
            name,
            commands,
            wake,
            thread: Some(thread),
        })
    }

    fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            log::error!("{}: the net data path thread is gone", self.name);
            return;
        }
        if let Err(e) = self.wake.write(1) {
            log::error!("{}: cannot wake the net data path: {e}", self.name);
        }
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(make(reply));
        answer.recv().ok()
    }

    /// Start serving a ring; returns once it runs.
    pub fn start(&self, ring: RingStart) {
        self.call(|reply| Command::Start(ring, reply));
    }

    /// Stop a ring; its next avail index, or `None` if it was not running.
    pub fn stop(&self, index: u16) -> Option<u16> {
        self.call(|reply| Command::Stop(index, reply)).flatten()
    }

    /// New call eventfd for a ring.
    pub fn set_call(&self, index: u16, call: Option<Arc<File>>) {
        self.send(Command::SetCall(index, call));
    }

    /// SET_VRING_ENABLE for a running ring.
    pub fn set_enabled(&self, index: u16, enabled: bool) {
        self.call(|reply| Command::SetEnabled(index, enabled, reply));
    }

    /// The front-end acked `features` (header layout, tap offloads).
    pub fn set_features(&self, features: u64) -> Result<(), String> {
        self.call(|reply| Command::SetFeatures(features, reply))
            .unwrap_or_else(|| Err("data path thread gone".to_string()))
    }

    /// NET_SET_MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), String> {
        self.call(|reply| Command::SetMtu(mtu, reply))
            .unwrap_or_else(|| Err("data path thread gone".to_string()))
    }

    /// Steer received frames with `rss` (or by pair, with `None`).
    pub fn set_rss(&self, rss: Option<Rss>) {
        self.call(|reply| Command::SetRss(rss, reply));
    }

    /// SEND_RARP: announce `mac` on the dataplane.
    pub fn announce(&self, mac: MacAddress) -> Result<bool, String> {
        self.call(|reply| Command::Announce(mac, reply))
            .unwrap_or_else(|| Err("data path thread gone".to_string()))
    }

    /// A new memory table was mapped (the sim dataplane charges for it).
    pub fn map_memory(&self) {
        self.call(Command::MapMemory);
    }

    /// A handle the control API can use to do early (presetup) work on
    /// this data path without going through the protocol thread.
    pub fn early_handle(&self) -> EarlyHandle {
        EarlyHandle {
            name: self.name.clone(),
            commands: self.commands.clone(),
            wake: self.wake.clone(),
        }
    }
}

/// Sends presetup work to a device's data path thread (see
/// [`NetWorker::early_handle`]).
#[derive(Clone)]
pub struct EarlyHandle {
    name: Arc<str>,
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for EarlyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyHandle")
            .field("name", &self.name)
            .finish()
    }
}

impl EarlyHandle {
    /// Do `work` now; returns what was done, or `None` if the data path
    /// thread is gone.
    pub fn presetup(&self, work: EarlyWork) -> Option<EarlyDone> {
        let (reply, answer) = mpsc::sync_channel(1);
        if self.commands.send(Command::Presetup(work, reply)).is_err() {
            log::error!("{}: the net data path thread is gone", self.name);
            return None;
        }
        if let Err(e) = self.wake.write(1) {
            log::error!("{}: cannot wake the net data path: {e}", self.name);
        }
        answer.recv().ok()
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        self.send(Command::Exit);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: the net data path thread panicked", self.name);
            }
        }
    }
}

/// A running ring.
struct Slot {
    ring: NetRing,
    kick: File,
    call: Option<Arc<File>>,
    enabled: bool,
    broken: bool,
    /// Its kick is still watched (a broken ring's is not: a guest that
    /// keeps kicking it must not keep waking the data path).
    watched: bool,
}

impl Slot {
    fn usable(&self) -> bool {
        self.enabled && !self.broken
    }
}

/// A frame from the dataplane waiting for RX buffers.
struct Pending {
    target: u16,
    len: usize,
    frame: Vec<u8>,
}

struct DataPath {
    name: Arc<str>,
    dataplane: Dataplane,
    memory: GuestMemoryAtomic<GuestRam>,
    rings: Vec<Option<Slot>>,
    /// Per pair: the dataplane may have frames (edge-triggered readiness).
    rx_ready: Vec<bool>,
    /// Per pair: a dataplane frame that found no RX buffer yet.
    pending: Vec<Option<Pending>>,
    stats: Arc<[PairStats]>,
    /// This step's counts, per pair, added to `stats` at the end of a step.
    counts: Vec<PairCounts>,
    rss: Option<Rss>,
    hdr_len: usize,
    mrg_rxbuf: bool,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    needs_reset: Arc<AtomicBool>,
    poll: Duration,
    /// Warnings about what the guest did wrong, rate-limited per device.
    peers: Arc<PeerLog>,
    /// Contained SIGBUS in guest memory (the front-end shrank it).
    faults: FaultWatch,
    /// The sim dataplane's accounting, for the control API.
    sim_report: Arc<Mutex<Option<SimReport>>>,
    /// Dataplane queues created early (presetup) that no ring took yet: a
    /// ring that starts takes one instead of creating its own.
    precreated: u16,
    /// The MTU the dataplane has, once one was set.
    mtu: Option<u16>,
    /// The dataplane-relevant features ([`presetup::NET_DATAPLANE_FEATURES`])
    /// the dataplane was configured for, once it was.
    offloads: Option<u64>,
}

fn tx_index(pair: u16) -> usize {
    2 * usize::from(pair) + 1
}

fn rx_index(pair: u16) -> usize {
    2 * usize::from(pair)
}

impl DataPath {
    fn pairs(&self) -> u16 {
        // rings has 2 * pairs entries, pairs <= MAX_QUEUE_PAIRS.
        (self.rings.len() / 2) as u16
    }

    fn warn(&mut self, text: std::fmt::Arguments<'_>) {
        self.peers.warn(text);
    }

    fn run(mut self, mut poller: Poll, wake: &EventFd, commands: &mpsc::Receiver<Command>) {
        let mut events = Events::with_capacity(64);
        loop {
            let mut did_work = false;
            // Commands first: a stop must not wait behind traffic.
            loop {
                match commands.try_recv() {
                    Ok(Command::Exit) | Err(mpsc::TryRecvError::Disconnected) => {
                        self.stop_all(&poller);
                        return;
                    }
                    Ok(command) => {
                        self.command(command, &poller);
                        did_work = true;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if self.step() {
                continue;
            }
            if did_work {
                continue;
            }
            if !self.poll.is_zero() && self.spin() {
                continue;
            }
            if self.arm_kicks() {
                continue;
            }
            self.unwatch_broken(&poller);
            if let Err(e) = poller.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("{}: net data path poll failed: {e}", self.name);
                self.needs_reset.store(true, Ordering::SeqCst);
                return;
            }
            for event in events.iter() {
                let token = event.token();
                if token == CONTROL {
                    let _ = wake.read();
                } else if token.0 >= DATAPLANE_BASE {
                    if let Some(ready) = self.rx_ready.get_mut(token.0 - DATAPLANE_BASE) {
                        *ready = true;
                    }
                } else if let Some(Some(slot)) = self.rings.get(token.0) {
                    drain_eventfd(&slot.kick);
                }
            }
        }
    }

    /// One pass over every pair: TX chains out, dataplane frames in, used
    /// entries published, guests signalled. Returns whether anything moved.
    fn step(&mut self) -> bool {
        let memory = self.memory.memory();
        let mem: &GuestRam = &memory;
        let mut moved = false;
        for pair in 0..self.pairs() {
            moved |= self.transmit(mem, pair);
            if !self.dataplane.reflects() {
                moved |= self.receive(mem, pair);
            }
        }
        self.finish_step(mem);
        // After the work: the access that faulted may have been this
        // step's, and nothing may wake us again.
        if self.faults.faulted(mem) {
            self.memory_faulted();
        }
        moved
    }

    /// Stop watching the kicks of broken rings: they are not looked at
    /// again until they are started anew.
    fn unwatch_broken(&mut self, poller: &Poll) {
        for slot in self.rings.iter_mut().flatten() {
            if slot.broken && slot.watched {
                slot.watched = false;
                let _ = poller
                    .registry()
                    .deregister(&mut SourceFd(&slot.kick.as_raw_fd()));
            }
        }
    }

    /// The front-end truncated guest memory under our mapping (a SIGBUS
    /// was contained): every ring stops until the device is reset.
    fn memory_faulted(&mut self) {
        let mut stopped = 0;
        for slot in self.rings.iter_mut().flatten() {
            if !slot.broken {
                slot.broken = true;
                stopped += 1;
            }
        }
        self.needs_reset.store(true, Ordering::SeqCst);
        if stopped > 0 {
            log::error!(
                "{}: the front-end truncated guest memory under the agent's mapping (SIGBUS contained); {stopped} ring(s) stopped, the device needs a reset",
                self.name
            );
        }
    }

    /// Publish used entries, signal guests, fold counts into the stats.
    fn finish_step(&mut self, mem: &GuestRam) {
        // Counters first: whoever sees a used entry sees it counted.
        for (pair, counts) in self.counts.iter_mut().enumerate() {
            if !counts.is_empty() {
                self.stats[pair].add(counts);
                *counts = PairCounts::default();
            }
        }
        for index in 0..self.rings.len() {
            let Some(slot) = self.rings[index].as_mut() else {
                continue;
            };
            let signal = match slot
                .ring
                .publish(mem)
                .and_then(|published| Ok(published && slot.ring.needs_call(mem)?))
            {
                Ok(signal) => signal,
                Err(e) => {
                    slot.broken = true;
                    self.needs_reset.store(true, Ordering::SeqCst);
                    log::error!(
                        "{}: queue {index}: {}; the device needs a reset",
                        self.name,
                        crate::error_chain(&e)
                    );
                    true
                }
            };
            if signal {
                if let Some(call) = &slot.call {
                    notify(call);
                }
            }
        }
    }

    /// Take up to a burst of TX chains of `pair` and send their frames.
    fn transmit(&mut self, mem: &GuestRam, pair: u16) -> bool {
        let tx = tx_index(pair);
        // The TX ring and the scratch buffer leave `self` for the burst, so
        // the frames can go into other rings meanwhile.
        let Some(mut slot) = self.rings[tx].take() else {
            return false;
        };
        if !slot.usable() {
            self.rings[tx] = Some(slot);
            return false;
        }
        let mut buf = std::mem::take(&mut self.tx_buf);
        let result = slot.ring.tx_burst(mem, &mut buf, BURST, |chain, frame| match chain {
            TxChain::Bad { head, reason } => {
                self.counts[usize::from(pair)].tx_errors += 1;
                self.warn(format_args!("TX queue {tx}: chain {head} dropped: {reason}"));
            }
            TxChain::Frame { head, len } if len < self.hdr_len => {
                self.counts[usize::from(pair)].tx_errors += 1;
                self.warn(format_args!(
                    "TX queue {tx}: chain {head} of {len} bytes is shorter than the virtio-net header"
                ));
            }
            TxChain::Frame { len, .. } => self.forward(mem, pair, &frame[..len]),
        });
        self.tx_buf = buf;
        let moved = match result {
            Ok(taken) => taken > 0,
            Err(e) => {
                slot.broken = true;
                self.needs_reset.store(true, Ordering::SeqCst);
                log::error!("{}: TX queue {tx}: {}", self.name, crate::error_chain(&e));
                true
            }
        };
        self.rings[tx] = Some(slot);
        moved
    }

    /// Send `frame` (virtio-net header included), taken from the TX ring
    /// of `pair`.
    fn forward(&mut self, mem: &GuestRam, pair: u16, frame: &[u8]) {
        let counts = &mut self.counts[usize::from(pair)];
        counts.tx_packets += 1;
        counts.tx_bytes += (frame.len() - self.hdr_len) as u64;
        if self.dataplane.reflects() {
            let payload = &frame[self.hdr_len..];
            let target = self.steer(payload, pair);
            // The guest's header carries no offload work (none is offered
            // for reflecting dataplanes): the RX header starts zeroed.
            let mut header = [0u8; spec::HDR_LEN_MRG];
            let header = &mut header[..self.hdr_len];
            let outcome = self.deliver_frame(mem, target, header, payload);
            if outcome == Some(RxOutcome::NoBuffers) {
                self.counts[usize::from(target)].rx_dropped += 1;
            }
            return;
        }
        match self.dataplane.send(pair, frame) {
            Ok(true) => {}
            Ok(false) => self.counts[usize::from(pair)].tx_dropped += 1,
            Err(e) => {
                self.counts[usize::from(pair)].tx_dropped += 1;
                self.warn(format_args!(
                    "pair {pair}: dataplane send failed: {}",
                    crate::error_chain(&e)
                ));
            }
        }
    }

    /// The RX pair for a frame: the one RSS picks (if configured), else the
    /// pair the frame came in on; if that RX ring is not running, the first
    /// that is (the guest may use fewer pairs than the device has).
    fn steer(&self, frame: &[u8], pair: u16) -> u16 {
        let usable =
            |p: u16| matches!(self.rings.get(rx_index(p)), Some(Some(slot)) if slot.usable());
        let wanted = self
            .rss
            .as_ref()
            .map_or(pair, |rss| rss.select_queue(frame));
        if usable(wanted) {
            return wanted;
        }
        if usable(pair) {
            return pair;
        }
        (0..self.pairs()).find(|&p| usable(p)).unwrap_or(pair)
    }

    /// Write one frame into the RX ring of `target`. Returns the outcome, or
    /// `None` if the ring is not running (the frame is dropped).
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        rings: &mut [Option<Slot>],
        counts: &mut [PairCounts],
        needs_reset: &AtomicBool,
        name: &str,
        mem: &GuestRam,
        target: u16,
        header: &mut [u8],
        frame: &[u8],
        mrg_rxbuf: bool,
    ) -> Option<RxOutcome> {
        let counts = &mut counts[usize::from(target)];
        let Some(slot) = rings[rx_index(target)]
            .as_mut()
            .filter(|slot| slot.usable())
        else {
            counts.rx_dropped += 1;
            return None;
        };
        match slot.ring.push_rx(mem, header, frame, mrg_rxbuf) {
            Ok(RxOutcome::Delivered { buffers }) => {
                counts.rx_packets += 1;
                counts.rx_bytes += frame.len() as u64;
                Some(RxOutcome::Delivered { buffers })
            }
            Ok(RxOutcome::TooBig) => {
                counts.rx_dropped += 1;
                Some(RxOutcome::TooBig)
            }
            // The caller decides: a reflected frame is dropped, a dataplane
            // frame waits for buffers.
            Ok(RxOutcome::NoBuffers) => Some(RxOutcome::NoBuffers),
            Err(e) => {
                counts.rx_dropped += 1;
                slot.broken = true;
                needs_reset.store(true, Ordering::SeqCst);
                log::error!(
                    "{name}: RX queue {}: {}; the device needs a reset",
                    rx_index(target),
                    crate::error_chain(&e)
                );
                None
            }
        }
    }

    /// Move frames from the dataplane queue of `pair` into RX rings.
    fn receive(&mut self, mem: &GuestRam, pair: u16) -> bool {
        let p = usize::from(pair);
        let mut moved = false;
        // With no RX ring running the frames stay in the dataplane (the
        // kernel queues them) instead of being read only to be dropped;
        // starting a ring makes us look again.
        let any_rx = (0..self.pairs())
            .any(|q| matches!(self.rings.get(rx_index(q)), Some(Some(slot)) if slot.usable()));
        if !any_rx {
            return false;
        }
        // A frame that waited for buffers goes first, in order.
        if let Some(mut pending) = self.pending[p].take() {
            let hdr_len = self.hdr_len;
            let (header, frame) = pending.frame[..pending.len].split_at_mut(hdr_len);
            let outcome = Self::deliver_frame(self, mem, pending.target, header, frame);
            if outcome == Some(RxOutcome::NoBuffers) {
                self.pending[p] = Some(pending);
                return false;
            }
            moved = true;
        }
        for _ in 0..BURST {
            if !self.rx_ready[p] {
                break;
            }
            let len = match self.dataplane.recv(pair, &mut self.rx_buf) {
                Ok(Some(len)) => len,
                Ok(None) => {
                    self.rx_ready[p] = false;
                    break;
                }
                Err(e) => {
                    self.rx_ready[p] = false;
                    self.warn(format_args!(
                        "pair {pair}: dataplane receive failed: {}",
                        crate::error_chain(&e)
                    ));
                    break;
                }
            };
            moved = true;
            if len < self.hdr_len {
                self.counts[p].rx_dropped += 1;
                continue;
            }
            let target = self.steer(&self.rx_buf[self.hdr_len..len], pair);
            let mut buf = std::mem::take(&mut self.rx_buf);
            let (header, frame) = buf[..len].split_at_mut(self.hdr_len);
            let outcome = Self::deliver_frame(self, mem, target, header, frame);
            if outcome == Some(RxOutcome::NoBuffers) {
                // Keep the frame and stop reading until the guest posts
                // buffers: the kernel queues (and drops) the rest.
                self.pending[p] = Some(Pending {
                    target,
                    len,
                    frame: buf,
                });
                self.rx_buf = vec![0u8; self.hdr_len.max(spec::HDR_LEN_MRG) + spec::MAX_FRAME_LEN];
                break;
            }
            self.rx_buf = buf;
        }
        moved
    }

    /// [`Self::deliver`] with this device's rings, counters and header
    /// layout.
    fn deliver_frame(
        &mut self,
        mem: &GuestRam,
        target: u16,
        header: &mut [u8],
        frame: &[u8],
    ) -> Option<RxOutcome> {
        Self::deliver(
            &mut self.rings,
            &mut self.counts,
            &self.needs_reset,
            &self.name,
            mem,
            target,
            header,
            frame,
            self.mrg_rxbuf,
        )
    }

    /// Busy-poll the rings (and a tap) for up to `poll` with kicks off.
    /// Returns true when there is work.
    fn spin(&mut self) -> bool {
        let memory = self.memory.memory();
        let mem: &GuestRam = &memory;
        for slot in self.rings.iter_mut().flatten() {
            let _ = slot.ring.disable_kicks(mem);
        }
        let deadline = Instant::now() + self.poll;
        let mut rounds = 0u32;
        while Instant::now() < deadline {
            for pair in 0..self.pairs() {
                if let Some(Some(slot)) = self.rings.get(tx_index(pair)) {
                    if slot.usable() && slot.ring.has_avail(mem) {
                        return true;
                    }
                }
                if let Some(pending) = &self.pending[usize::from(pair)] {
                    if let Some(Some(slot)) = self.rings.get(rx_index(pending.target)) {
                        if slot.usable() && slot.ring.has_avail(mem) {
                            return true;
                        }
                    }
                }
            }
            rounds += 1;
            // A tap can only be asked with a system call: every 64 rounds.
            if !self.dataplane.reflects() && rounds.is_multiple_of(64) {
                self.rx_ready.iter_mut().for_each(|ready| *ready = true);
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Turn kicks on for the rings we wait on before sleeping: TX rings,
    /// and RX rings a pending frame waits for. Returns true if chains arrived
    /// meanwhile.
    fn arm_kicks(&mut self) -> bool {
        let memory = self.memory.memory();
        let mem: &GuestRam = &memory;
        let mut waiting_rx = vec![false; self.rings.len()];
        for pending in self.pending.iter().flatten() {
            waiting_rx[rx_index(pending.target)] = true;
        }
        let mut arrived = false;
        for (index, slot) in self.rings.iter_mut().enumerate() {
            let Some(slot) = slot.as_mut().filter(|slot| slot.usable()) else {
                continue;
            };
            if !index.is_multiple_of(2) || waiting_rx[index] {
                match slot.ring.enable_kicks(mem) {
                    Ok(true) => arrived = true,
                    Ok(false) => {}
                    Err(e) => {
                        slot.broken = true;
                        self.needs_reset.store(true, Ordering::SeqCst);
                        log::error!("{}: queue {index}: {}", self.name, crate::error_chain(&e));
                    }
                }
            }
        }
        // Pending frames whose ring already has buffers: deliver now.
        arrived
            || self.pending.iter().flatten().any(|pending| {
                matches!(self.rings.get(rx_index(pending.target)), Some(Some(slot)) if slot.usable() && slot.ring.has_avail(mem))
            })
    }

    fn command(&mut self, command: Command, poller: &Poll) {
        self.apply(command, poller);
        // Commands without a reply (Exit) may have charged the sim too.
        self.publish_sim_report();
    }

    /// Refresh what the control API shows of the sim's charges.
    fn publish_sim_report(&self) {
        if let Some(hw) = self.dataplane.sim() {
            let report = SimReport::of(hw);
            *self.sim_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        }
    }

    /// Answer a command once what it charged is visible: whoever waits for
    /// the reply (a control API `presetup`, a GET_VRING_BASE) may read the
    /// sim's report next.
    fn answer<T>(&self, reply: Reply<T>, value: T) {
        self.publish_sim_report();
        let _ = reply.send(value);
    }

    fn apply(&mut self, command: Command, poller: &Poll) {
        match command {
            Command::Start(start, reply) => {
                self.start(start, poller);
                self.answer(reply, ());
            }
            Command::Stop(index, reply) => {
                let stopped = self.stop(index, poller);
                self.answer(reply, stopped);
            }
            Command::SetCall(index, call) => {
                if let Some(Some(slot)) = self.rings.get_mut(usize::from(index)) {
                    slot.call = call;
                    // Entries published while no call fd was set had no
                    // interrupt: a spurious one is harmless, a lost one not.
                    if let Some(call) = &slot.call {
                        notify(call);
                    }
                }
            }
            Command::SetEnabled(index, enabled, reply) => {
                if let Some(Some(slot)) = self.rings.get_mut(usize::from(index)) {
                    slot.enabled = enabled;
                }
                if enabled {
                    // Frames may be waiting in the dataplane for this ring.
                    self.rx_ready.iter_mut().for_each(|ready| *ready = true);
                }
                // A pair's dataplane queue follows its RX ring, configured
                // or not (QEMU enables pairs before it sets their rings up).
                if index.is_multiple_of(2) && usize::from(index) < self.rings.len() {
                    if let Err(e) = self.dataplane.set_pair_enabled(index / 2, enabled) {
                        log::warn!(
                            "{}: pair {}: {}",
                            self.name,
                            index / 2,
                            crate::error_chain(&e)
                        );
                    }
                }
                self.answer(reply, ());
            }
            Command::SetFeatures(features, reply) => {
                self.hdr_len = spec::header_len(features);
                self.mrg_rxbuf = spec::mrg_rxbuf(features);
                let result = self.configure_offloads(features);
                self.answer(reply, result);
            }
            Command::SetMtu(mtu, reply) => {
                let result = self.set_mtu(mtu);
                self.answer(reply, result);
            }
            Command::Presetup(work, reply) => {
                let mut done = EarlyDone::default();
                if let Some(features) = work.features {
                    let before = self.offloads;
                    match self.configure_offloads(features) {
                        Ok(()) => done.offloads_set = before != self.offloads,
                        Err(e) => log::warn!("{}: presetup offloads: {e}", self.name),
                    }
                }
                let wanted = work.queues.saturating_sub(self.precreated);
                for _ in 0..wanted {
                    self.dataplane.queue_started(true);
                    self.precreated += 1;
                    done.queues_created += 1;
                }
                if let Some(rss) = work.rss {
                    self.dataplane.program_rss();
                    self.rss = Some(rss);
                    done.rss_programmed = true;
                }
                if self.mtu != Some(work.mtu) {
                    match self.set_mtu(work.mtu) {
                        Ok(()) => done.mtu_set = true,
                        Err(e) => log::warn!("{}: presetup MTU {}: {e}", self.name, work.mtu),
                    }
                }
                self.answer(reply, done);
            }
            Command::SetRss(rss, reply) => {
                if rss.is_some() {
                    self.dataplane.program_rss();
                }
                self.rss = rss;
                self.answer(reply, ());
            }
            Command::Announce(mac, reply) => {
                let result = self
                    .dataplane
                    .announce(mac, self.hdr_len)
                    .map_err(|e| crate::error_chain(&e));
                self.answer(reply, result);
            }
            Command::MapMemory(reply) => {
                self.dataplane.map_memory();
                self.answer(reply, ());
            }
            Command::Exit => {}
        }
    }

    fn start(&mut self, start: RingStart, poller: &Poll) {
        let index = usize::from(start.index);
        if index >= self.rings.len() {
            log::error!("{}: queue {index} is beyond the device", self.name);
            return;
        }
        if let Some(old) = self.rings[index].take() {
            if old.watched {
                let _ = poller
                    .registry()
                    .deregister(&mut SourceFd(&old.kick.as_raw_fd()));
            }
        }
        let kick_fd: RawFd = start.kick.as_raw_fd();
        if let Err(e) =
            poller
                .registry()
                .register(&mut SourceFd(&kick_fd), Token(index), Interest::READABLE)
        {
            log::error!("{}: queue {index}: cannot watch its kick: {e}", self.name);
            self.needs_reset.store(true, Ordering::SeqCst);
            return;
        }
        if self.precreated > 0 {
            // Created early (presetup): the ring takes it as it is.
            self.precreated -= 1;
        } else {
            self.dataplane.queue_started(true);
        }
        self.rings[index] = Some(Slot {
            ring: NetRing::new(start.queue),
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
    }

    fn stop(&mut self, index: u16, poller: &Poll) -> Option<u16> {
        let slot = self.rings.get_mut(usize::from(index))?.take()?;
        if slot.watched {
            let _ = poller
                .registry()
                .deregister(&mut SourceFd(&slot.kick.as_raw_fd()));
        }
        self.dataplane.queue_started(false);
        // Everything taken from the ring was answered within its step and
        // published at the step's end: the index is exact.
        Some(slot.ring.next_avail())
    }

    /// Configure the dataplane's header layout and offloads for `features`
    /// unless it has them already (an early configuration may have set
    /// them).
    fn configure_offloads(&mut self, features: u64) -> Result<(), String> {
        let relevant = features & presetup::NET_DATAPLANE_FEATURES;
        if self.offloads == Some(relevant) {
            return Ok(());
        }
        self.dataplane
            .set_features(features)
            .map_err(|e| crate::error_chain(&e))?;
        self.offloads = Some(relevant);
        Ok(())
    }

    /// Set the MTU on the dataplane unless it has it already (an early
    /// configuration may have set it).
    fn set_mtu(&mut self, mtu: u16) -> Result<(), String> {
        if self.mtu == Some(mtu) {
            return Ok(());
        }
        self.dataplane
            .set_mtu(mtu)
            .map_err(|e| crate::error_chain(&e))?;
        self.mtu = Some(mtu);
        Ok(())
    }

    fn stop_all(&mut self, poller: &Poll) {
        for index in 0..self.rings.len() {
            // index < 2 * MAX_QUEUE_PAIRS.
            self.stop(index as u16, poller);
        }
        self.pending.iter_mut().for_each(|pending| *pending = None);
    }
}
