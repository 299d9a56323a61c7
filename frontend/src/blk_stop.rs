//! Measuring how long a vhost-user-blk migration source is stopped in
//! GET_VRING_BASE, draining versus suspending: what the `blk_stop`
//! benchmark and the experiment runner share.
//!
//! A source stops each ring with SET_VRING_ENABLE(0) and GET_VRING_BASE;
//! the guest stays paused until the reply. Without protocol bit 20 (QEMU
//! 10) the agent drains: every request in flight finishes on storage
//! first. With bits 12 and 20 (QEMU 11's `inflight-migration=on`) it
//! suspends: it replies at once and leaves the requests in the inflight
//! region for the destination.
//!
//! One [`StopAgent`] per storage latency (`latency-ms=N`: every storage
//! operation starts N ms after submission, standing in for a slow or remote
//! disk), one fresh test front-end connection per measurement.

use std::path::PathBuf;
use std::time::Duration;

use vhost::vhost_user::VhostUserFrontend;

use crate::support::{control_execute, create_image, spawn_agent, ChildGuard};
use crate::{
    wait_until, BlkRequest, StartOptions, StopRequest, TestFrontend, PROTOCOL_F_INFLIGHT_SHMFD,
    PROTOCOL_SUSPEND,
};

/// Ring size.
const QUEUE_SIZE: u16 = 256;
/// Request size.
const BLOCK: u32 = 4096;
/// Most requests one measurement may put on the ring (buffer slots).
pub const MAX_INFLIGHT: usize = 128;
/// How long the agent may take to take the requests off the ring.
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the source is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Bit 12 only: GET_VRING_BASE drains.
    Drain,
    /// Bits 12 and 20: GET_VRING_BASE suspends (GET_VRING_BASE_INFLIGHT).
    Suspend,
}

impl StopMode {
    /// Both modes, drain first.
    pub const ALL: [StopMode; 2] = [StopMode::Drain, StopMode::Suspend];

    /// The protocol features the front-end acks for this mode.
    fn protocol(self) -> u64 {
        match self {
            StopMode::Drain => PROTOCOL_F_INFLIGHT_SHMFD,
            StopMode::Suspend => PROTOCOL_SUSPEND,
        }
    }

    /// `drain` or `suspend`, for reports.
    pub fn name(self) -> &'static str {
        match self {
            StopMode::Drain => "drain",
            StopMode::Suspend => "suspend",
        }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug)]
pub struct StopSample {
    /// GET_VRING_BASE, send to reply, as the front-end saw it.
    pub stop: Duration,
    /// The agent's own `stop-time-us` of this stop (`query-metrics`).
    pub agent_stop: Option<Duration>,
    /// Requests not yet completed when GET_VRING_BASE was sent.
    pub in_flight: usize,
}

/// An agent serving a scratch image with `latency-ms` set, and a control
/// socket to read its metrics.
pub struct StopAgent {
    _guard: ChildGuard,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    control: PathBuf,
    latency: Duration,
}

impl StopAgent {
    /// Spawn the agent on a fresh 64 MiB image with `latency-ms=latency_ms`.
    pub fn start(latency_ms: u64) -> Result<StopAgent, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("scratch directory: {e}"))?;
        let image = dir.path().join("disk.img");
        let socket = dir.path().join("disk.sock");
        let control = dir.path().join("control.sock");
        create_image(&image, 64 << 20).map_err(|e| format!("create the image: {e}"))?;
        let spec = format!(
            "socket={},image={},latency-ms={latency_ms}",
            socket.display(),
            image.display()
        );
        let control_arg = control
            .to_str()
            .ok_or("the scratch directory is not UTF-8")?;
        let guard = spawn_agent(
            &[spec],
            &["--control", control_arg],
            Some(&dir.path().join("agent.log")),
        );
        Ok(StopAgent {
            _guard: guard,
            _dir: dir,
            socket,
            control,
            latency: Duration::from_millis(latency_ms),
        })
    }

    /// Connect, put `count` 4 KiB requests (half reads, half writes) on
    /// the ring with one kick, wait until the agent has taken them all,
    /// send SET_VRING_ENABLE(0) and time GET_VRING_BASE from send to reply.
    pub fn measure(&self, mode: StopMode, count: usize) -> Result<StopSample, String> {
        if count == 0 || count > MAX_INFLIGHT {
            return Err(format!("{count} requests: not in 1..={MAX_INFLIGHT}"));
        }
        let options = StartOptions::with_protocol(1, QUEUE_SIZE, mode.protocol());
        let mut fe = TestFrontend::start(&self.socket, &options);
        let requests: Vec<BlkRequest> = (0..count as u64)
            .map(|block| {
                let sector = block * u64::from(BLOCK / 512);
                if block % 2 == 0 {
                    fe.fill(block, &[block as u8; BLOCK as usize]);
                    BlkRequest::write(block, sector, BLOCK)
                } else {
                    BlkRequest::read(block, sector, BLOCK)
                }
            })
            .collect();
        fe.submit(0, &requests);
        // Taken = marked in flight or already published as used.
        let in_flight = || fe.region().queue(0).inflight_count();
        let taken = wait_until(TAKE_TIMEOUT, || {
            in_flight() + usize::from(fe.queues[0].pending_used(&fe.ram)) >= count
        });
        if !taken {
            return Err(format!("the agent did not take {count} requests"));
        }
        let in_flight = in_flight();
        fe.frontend
            .set_vring_enable(0, false)
            .map_err(|e| format!("SET_VRING_ENABLE(0): {e}"))?;
        let (_, stop) = fe.get_vring_base_timed(0, StopRequest::GetVringBase);
        let agent_stop = self.agent_stop_time()?;
        drop(fe);
        if mode == StopMode::Suspend {
            // Let the abandoned operations finish before the next
            // measurement, so they do not compete with it.
            std::thread::sleep(self.latency + Duration::from_millis(20));
        }
        Ok(StopSample {
            stop,
            agent_stop,
            in_flight,
        })
    }

    /// The agent's `stop-time-us` of its last stop.
    fn agent_stop_time(&self) -> Result<Option<Duration>, String> {
        let metrics = control_execute(
            &self.control,
            "query-metrics",
            serde_json::json!({"device": "blk0"}),
        )?;
        Ok(metrics[0]["stop-time-us"]
            .as_u64()
            .map(Duration::from_micros))
    }
}

/// The median of `values` (upper median for an even count); `None` when
/// empty.
pub fn median<T: Ord + Copy>(values: &mut [T]) -> Option<T> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}
