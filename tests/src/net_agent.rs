//! The agent serving one `--net` device, for tests and benchmarks that
//! drive it with a real client (DPDK's testpmd): spawned pinned to a CPU,
//! its per-pair counters read through the control API (`query-devices`),
//! its log kept in a file, stopped with SIGTERM at the end.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::ChildGuard;

/// How long the agent may take to create its sockets or to exit.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a [`NetAgent`].
#[derive(Debug, Clone)]
pub struct NetAgentOptions {
    /// The dataplane (`loop`, `tap:IF`, `sim:PROFILE`).
    pub dataplane: String,
    /// `queue-pairs=`.
    pub queue_pairs: u16,
    /// `poll-us=`, or the agent's default when `None`.
    pub poll_us: Option<u32>,
    /// Host CPU to pin the whole agent process to (`taskset -c`), if any.
    pub cpu: Option<usize>,
    /// Further `key=value` options of `--net`, e.g. `mtu=9000`.
    pub extra: Vec<String>,
}

impl NetAgentOptions {
    /// The `loop` dataplane with `queue_pairs` pairs, pinned to CPU 1.
    pub fn reflector(queue_pairs: u16) -> NetAgentOptions {
        NetAgentOptions {
            dataplane: "loop".to_string(),
            queue_pairs,
            poll_us: None,
            cpu: Some(1),
            extra: Vec::new(),
        }
    }
}

/// Counters of one queue pair as `query-devices` reports them. RX is
/// toward the guest (the client), TX from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairCounters {
    /// `rx-packets`: frames written into the client's RX buffers.
    pub rx_packets: u64,
    /// `rx-bytes`.
    pub rx_bytes: u64,
    /// `rx-dropped`: frames for the client that found no RX buffer.
    pub rx_dropped: u64,
    /// `tx-packets`: frames taken from the client's TX ring.
    pub tx_packets: u64,
    /// `tx-bytes`.
    pub tx_bytes: u64,
    /// `tx-dropped`: TX frames the dataplane had no room for.
    pub tx_dropped: u64,
    /// `tx-errors`: malformed TX chains.
    pub tx_errors: u64,
}

impl PairCounters {
    /// Read one element of a net device's `pairs` array.
    fn from_json(pair: &Value) -> Result<PairCounters, String> {
        let field = |name: &str| {
            pair[name]
                .as_u64()
                .ok_or_else(|| format!("no integer `{name}` in the pair counters {pair}"))
        };
        Ok(PairCounters {
            rx_packets: field("rx-packets")?,
            rx_bytes: field("rx-bytes")?,
            rx_dropped: field("rx-dropped")?,
            tx_packets: field("tx-packets")?,
            tx_bytes: field("tx-bytes")?,
            tx_dropped: field("tx-dropped")?,
            tx_errors: field("tx-errors")?,
        })
    }

    /// The sum of `pairs`.
    pub fn total(pairs: &[PairCounters]) -> PairCounters {
        pairs
            .iter()
            .fold(PairCounters::default(), |a, b| PairCounters {
                rx_packets: a.rx_packets + b.rx_packets,
                rx_bytes: a.rx_bytes + b.rx_bytes,
                rx_dropped: a.rx_dropped + b.rx_dropped,
                tx_packets: a.tx_packets + b.tx_packets,
                tx_bytes: a.tx_bytes + b.tx_bytes,
                tx_dropped: a.tx_dropped + b.tx_dropped,
                tx_errors: a.tx_errors + b.tx_errors,
            })
    }

    /// `self - earlier`, counter by counter (for one session's share).
    pub fn since(&self, earlier: &PairCounters) -> PairCounters {
        PairCounters {
            rx_packets: self.rx_packets - earlier.rx_packets,
            rx_bytes: self.rx_bytes - earlier.rx_bytes,
            rx_dropped: self.rx_dropped - earlier.rx_dropped,
            tx_packets: self.tx_packets - earlier.tx_packets,
            tx_bytes: self.tx_bytes - earlier.tx_bytes,
            tx_dropped: self.tx_dropped - earlier.tx_dropped,
            tx_errors: self.tx_errors - earlier.tx_errors,
        }
    }
}

/// A running `vhost-agent serve --net ... --control ...`, killed on drop.
pub struct NetAgent {
    /// The process.
    pub guard: ChildGuard,
    /// The net device's vhost-user socket.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// The agent's stderr.
    pub log: PathBuf,
    /// The `--net` argument it was started with.
    pub spec: String,
    _dir: tempfile::TempDir,
}

impl NetAgent {
    /// Start the agent per `options` in a fresh temporary directory and
    /// wait for its sockets. `RUST_LOG` defaults to `info`.
    pub fn spawn(options: &NetAgentOptions) -> Result<NetAgent, String> {
        let dir = tempfile::Builder::new()
            .prefix("net-agent.")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let socket = dir.path().join("net.sock");
        let control = dir.path().join("control.sock");
        let log = dir.path().join("agent.log");
        let mut spec = format!(
            "socket={},dataplane={},queue-pairs={}",
            socket.display(),
            options.dataplane,
            options.queue_pairs
        );
        if let Some(us) = options.poll_us {
            spec.push_str(&format!(",poll-us={us}"));
        }
        for extra in &options.extra {
            spec.push(',');
            spec.push_str(extra);
        }
        let mut agent = crate::agent::AgentCommand::new()
            .net(spec.as_str())
            .control(&control)
            .log(&log)
            .rust_log("info");
        if let Some(cpu) = options.cpu {
            agent = agent.cpu(cpu);
        }
        let guard = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.spawn()))
            .map_err(|panic| {
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            })?;
        Ok(NetAgent {
            guard,
            socket,
            control,
            log,
            spec,
            _dir: dir,
        })
    }

    /// The net device's entry of `query-devices`.
    pub fn device(&self) -> Result<Value, String> {
        let mut stream = UnixStream::connect(&self.control)
            .map_err(|e| format!("connect to {}: {e}", self.control.display()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"{\"execute\": \"query-devices\"}\n")
            .map_err(|e| format!("send query-devices: {e}"))?;
        let mut reply = String::new();
        BufReader::new(stream)
            .read_line(&mut reply)
            .map_err(|e| format!("read the query-devices reply: {e}"))?;
        let value: Value = serde_json::from_str(&reply)
            .map_err(|e| format!("query-devices reply {reply:?}: {e}"))?;
        value["return"]
            .as_array()
            .and_then(|devices| devices.iter().find(|d| d["kind"] == "net"))
            .cloned()
            .ok_or_else(|| format!("no net device in the query-devices reply {reply}"))
    }

    /// The counters of every queue pair, in pair order.
    pub fn pairs(&self) -> Result<Vec<PairCounters>, String> {
        let device = self.device()?;
        device["pairs"]
            .as_array()
            .ok_or_else(|| format!("no `pairs` array in {device}"))?
            .iter()
            .map(PairCounters::from_json)
            .collect()
    }

    /// Read the counters until two reads `settle` apart agree (the data
    /// path has nothing left to do), or `timeout` passes.
    pub fn settled_pairs(
        &self,
        settle: Duration,
        timeout: Duration,
    ) -> Result<Vec<PairCounters>, String> {
        let deadline = Instant::now() + timeout;
        let mut last = self.pairs()?;
        loop {
            std::thread::sleep(settle);
            let now = self.pairs()?;
            if now == last {
                return Ok(now);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the agent's counters still move after {timeout:?}: {last:?} then {now:?}"
                ));
            }
            last = now;
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `Err` with the exit status if the agent is no longer running.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.guard.child.try_wait() {
            Ok(Some(status)) => Err(format!("the agent exited with {status}")),
            _ => Ok(()),
        }
    }

    /// SIGTERM, and check that the agent exits successfully within 20 s
    /// and never logged a panic. The log stays readable afterwards.
    pub fn stop(&mut self) -> Result<(), String> {
        self.check_alive()?;
        self.guard.signal(libc::SIGTERM);
        let status = self.guard.wait_timeout(PROCESS_TIMEOUT);
        if self.log_text().contains("panicked") {
            return Err("the agent panicked (see its log)".to_string());
        }
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(format!("the agent exited with {status} after SIGTERM")),
            None => Err(format!(
                "the agent did not exit within {PROCESS_TIMEOUT:?} of SIGTERM"
            )),
        }
    }
}

pub use vhost_agent_frontend::agent::pin_to_cpu;
