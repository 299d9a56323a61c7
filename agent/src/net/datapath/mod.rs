//! The data path of one net device: a single thread with a mio loop that
//! owns the device's running rings and its dataplane.
//!
//! One thread per device, not per ring, because the device steers received
//! frames to RX queues itself (RSS; `loop` reflects a TX frame of one pair
//! into the RX ring of whichever pair RSS picks). Owning every ring of the
//! device keeps that lock-free. The protocol thread sends it synchronous
//! commands (a batch of plan steps, a stop), so when a command returns the
//! ring is started or stopped, and a stopped ring's index is exact: frames
//! are handled whole inside one step, so nothing is ever half-done across
//! a stop.
//!
//! * [`thread`]: the thread's state and loop;
//! * `frames`: moving frames;
//! * [`ops`]: the plan's steps on the dataplane.

mod frames;
pub mod ops;
mod thread;

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Poll};
use netdev::dataplane::{Dataplane, DataplaneError};
use netdev::spec::{self, MacAddress};
use netdev::stats::{PairCounts, PairStats};
use vm_memory::GuestMemoryAtomic;

use crate::vhost_user::datapath::{DatapathError, OpResult, Step};
use crate::vhost_user::memory::GuestRam;
use crate::wake_channel::{self, Reply, WakeSender};
use thread::{DataPath, CONTROL};

/// What the cost model charged so far, per operation: a simulated
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
    /// The cost model's accounting.
    pub sim_report: Arc<Mutex<Option<SimReport>>>,
    /// Set when a ring breaks (the device needs a reset).
    pub needs_reset: Arc<AtomicBool>,
}

/// What the protocol thread asks of the data path.
pub(super) enum Command {
    /// Execute plan steps in order (stopping at the first failure).
    Execute(Vec<Step>, Reply<Vec<OpResult>>),
    /// Stop a ring: its next avail index and its kick, if it ran.
    Stop(u16, Reply<Option<(u16, File)>>),
    /// SEND_RARP: announce a MAC on the dataplane.
    Announce(MacAddress, Reply<Result<bool, DataplaneError>>),
    /// End the thread.
    Exit,
}

/// Handle to a device's data path thread.
pub struct NetDatapath {
    name: Arc<str>,
    commands: WakeSender<Command>,
    thread: Option<JoinHandle<()>>,
}

/// The data path thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetDatapathError {
    /// eventfd, epoll or thread creation failed.
    #[error("cannot start the net data path thread")]
    Setup(#[source] io::Error),
}

impl NetDatapath {
    /// Start the data path of a device with `pairs` queue pairs. It owns
    /// `dataplane` from now on; `poll` is how long to busy-poll after work.
    pub fn spawn(
        name: Arc<str>,
        dataplane: Dataplane,
        pairs: u16,
        memory: GuestMemoryAtomic<GuestRam>,
        outputs: DataPathOutputs,
        poll: Duration,
    ) -> Result<NetDatapath, NetDatapathError> {
        let DataPathOutputs {
            stats,
            sim_report,
            needs_reset,
        } = outputs;
        let (commands, receiver) = wake_channel::channel().map_err(NetDatapathError::Setup)?;
        let poller = Poll::new().map_err(NetDatapathError::Setup)?;
        let registry = poller
            .registry()
            .try_clone()
            .map_err(NetDatapathError::Setup)?;
        registry
            .register(&mut SourceFd(&receiver.fd()), CONTROL, Interest::READABLE)
            .map_err(NetDatapathError::Setup)?;
        for pair in 0..pairs {
            if let Some(fd) = dataplane.rx_fd(pair) {
                registry
                    .register(
                        &mut SourceFd(&fd),
                        ops::dataplane_token(pair),
                        Interest::READABLE,
                    )
                    .map_err(NetDatapathError::Setup)?;
            }
        }
        if let Some(hw) = dataplane.sim() {
            *sim_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(SimReport::of(hw));
        }
        let state = DataPath {
            name: name.clone(),
            dataplane,
            memory,
            registry,
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
            peers: crate::ratelimit::PeerLog::for_device(&name),
            faults: crate::vhost_user::memory::guest_mapping::FaultWatch::default(),
            sim_report,
            queues: vec![false; usize::from(pairs)],
        };
        let thread = std::thread::Builder::new()
            .name(format!("{name}-net"))
            .spawn(move || state.run(poller, receiver))
            .map_err(NetDatapathError::Setup)?;
        Ok(NetDatapath {
            name,
            commands,
            thread: Some(thread),
        })
    }

    /// Execute `steps` on the data path thread: one round trip for a plan.
    pub fn execute(&self, steps: Vec<Step>) -> Vec<OpResult> {
        match self.commands.call(|reply| Command::Execute(steps, reply)) {
            Ok(results) => results,
            Err(_) => {
                log::error!("{}: the net data path thread is gone", self.name);
                vec![Err(DatapathError::Gone)]
            }
        }
    }

    /// Stop a ring: its next avail index and kick, or `None` if it was not
    /// running.
    pub fn stop(&self, ring: u16) -> Option<(u16, File)> {
        self.commands
            .call(|reply| Command::Stop(ring, reply))
            .ok()
            .flatten()
    }

    /// SEND_RARP: announce `mac` on the dataplane; whether a frame went out.
    pub fn announce(&self, mac: MacAddress) -> Result<bool, DatapathError> {
        self.commands
            .call(|reply| Command::Announce(mac, reply))
            .map_err(|_| DatapathError::Gone)?
            .map_err(|e| DatapathError::failed("announce", e))
    }
}

impl Drop for NetDatapath {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Exit);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: the net data path thread panicked", self.name);
            }
        }
    }
}
