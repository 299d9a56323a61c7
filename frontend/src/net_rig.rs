//! One agent serving one `--net` device with a control socket, and the test
//! front-end (a QEMU stand-in) on its vhost-user socket: what the net
//! front-end tests and the presetup experiment runner both drive. Guest
//! buffers come from a simple slot allocator; frames go out on a TX ring
//! and come back on an RX ring (the `loop` and `sim` dataplanes reflect
//! them). Failures panic with the agent's log, test style; the experiment
//! runner catches them per scenario.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Bytes, GuestAddress};

use crate::support::{agent_binary, spawn_net_agent, workspace_root, ChildGuard};
use crate::{raw, Desc, Inflight, StartOptions, TestFrontend, BUFFER_BASE, RAM_SIZE};

/// Size of the virtio-net header without VIRTIO_NET_F_HASH_REPORT (with
/// `num_buffers`, as modern devices always have it).
pub const HDR: usize = 12;
/// Ring size the rig's front-end uses.
pub const QUEUE_SIZE: u16 = 256;
/// How long a used entry may take to come.
pub const WAIT: Duration = Duration::from_secs(5);
/// VHOST_USER_NET_SET_MTU (the `vhost` crate's front-end cannot send it).
pub const NET_SET_MTU: u32 = 20;
/// The guest buffer slot size of [`NetRig::slot`].
const SLOT_SIZE: u64 = 0x1_0000;

/// The shipped sim profile that reproduces the 191.4 ms vDPA `dev_conf`.
pub fn vdpa_191ms_profile() -> PathBuf {
    workspace_root().join("netdev/profiles/vdpa-191ms.json")
}

/// How to launch a [`NetRig`].
#[derive(Clone, Debug)]
pub struct NetRigOptions {
    /// `dataplane=` of the device (`loop`, `sim:PATH`, ...).
    pub dataplane: String,
    /// Queue pairs of the device, all of which the front-end starts.
    pub pairs: usize,
    /// Appended to the `--net` spec as is, e.g. `",rss=on"`.
    pub extra: String,
    /// Protocol features the front-end acks (when offered) besides MQ,
    /// REPLY_ACK and CONFIG.
    pub protocol: VhostUserProtocolFeatures,
    /// Guest RAM of the front-end, in bytes.
    pub ram_size: u64,
}

impl NetRigOptions {
    /// `pairs` pairs on `dataplane`, nothing else, 16 MiB of guest RAM.
    pub fn new(dataplane: &str, pairs: usize) -> NetRigOptions {
        NetRigOptions {
            dataplane: dataplane.to_string(),
            pairs,
            extra: String::new(),
            protocol: VhostUserProtocolFeatures::empty(),
            ram_size: RAM_SIZE,
        }
    }
}

/// An agent with one net device and a front-end connected to it.
pub struct NetRig {
    dir: tempfile::TempDir,
    _agent: ChildGuard,
    /// The front-end (QEMU stand-in).
    pub frontend: TestFrontend,
    /// Next free 64 KiB buffer slot.
    next_slot: u64,
}

impl NetRig {
    /// An agent with one `loop` net device (`extra` appended to its spec)
    /// and a front-end that started `pairs` queue pairs.
    pub fn start(pairs: usize, extra: &str, protocol: VhostUserProtocolFeatures) -> NetRig {
        Self::start_on("loop", pairs, extra, protocol)
    }

    /// Like [`Self::start`] on dataplane `dataplane`.
    pub fn start_on(
        dataplane: &str,
        pairs: usize,
        extra: &str,
        protocol: VhostUserProtocolFeatures,
    ) -> NetRig {
        Self::start_after(dataplane, pairs, extra, protocol, |_| {})
    }

    /// Like [`Self::start_on`], calling `before_start` with the control
    /// socket once the agent runs and before the front-end connects.
    pub fn start_after(
        dataplane: &str,
        pairs: usize,
        extra: &str,
        protocol: VhostUserProtocolFeatures,
        before_start: impl FnOnce(&Path),
    ) -> NetRig {
        let mut options = NetRigOptions::new(dataplane, pairs);
        options.extra = extra.to_string();
        options.protocol = protocol;
        let mut rig = Self::connect(&options, before_start);
        rig.start_device();
        rig
    }

    /// Spawn the agent per `options`, call `before_connect` with its control
    /// socket, then connect the front-end and negotiate, as a destination
    /// QEMU does when it starts; the device is not started
    /// ([`Self::start_device`] does that, as the migration's switchover).
    pub fn connect(options: &NetRigOptions, before_connect: impl FnOnce(&Path)) -> NetRig {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("net.sock");
        let control = dir.path().join("control.sock");
        let agent = spawn_net_agent(
            &[format!(
                "socket={},dataplane={},queue-pairs={}{}",
                socket.display(),
                options.dataplane,
                options.pairs,
                options.extra
            )],
            &["--control", control.to_str().expect("UTF-8 temporary path")],
            Some(&dir.path().join("agent.log")),
        );
        before_connect(&control);
        let mut start = StartOptions::plain(2 * options.pairs, QUEUE_SIZE);
        start.queues_per_unit = 2;
        start.protocol = options.protocol.bits();
        start.ram_size = options.ram_size;
        let frontend = TestFrontend::negotiate(&socket, &start);
        NetRig {
            dir,
            _agent: agent,
            frontend,
            next_slot: 0,
        }
    }

    /// Start every ring at index 0 (QEMU's start sequence, see
    /// [`TestFrontend::start_device`]).
    pub fn start_device(&mut self) {
        let bases = vec![0; self.frontend.queues.len()];
        self.frontend.start_device(Inflight::None, &bases);
    }

    /// NET_SET_MTU with NEED_REPLY, as QEMU sends it right before it
    /// starts a device whose guest acked VIRTIO_NET_F_MTU; `Err` with the
    /// reply if the agent refused.
    pub fn set_mtu(&mut self, mtu: u16) -> Result<(), String> {
        self.frontend.send_raw(
            NET_SET_MTU,
            raw::FLAG_VERSION | raw::FLAG_NEED_REPLY,
            &u64::from(mtu).to_le_bytes(),
        );
        let reply = self.frontend.recv_raw();
        match (reply.request, reply.u64()) {
            (NET_SET_MTU, Some(0)) => Ok(()),
            _ => Err(format!("NET_SET_MTU {mtu}: reply {reply:?}")),
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// A fresh 64 KiB buffer in guest RAM.
    pub fn slot(&mut self) -> u64 {
        let addr = BUFFER_BASE + self.next_slot * SLOT_SIZE;
        self.next_slot += 1;
        assert!(
            addr + SLOT_SIZE <= self.frontend.ram.size(),
            "test ran out of buffer slots"
        );
        addr
    }

    /// The slot [`Self::slot`] will hand out next.
    pub fn next_slot(&self) -> u64 {
        self.next_slot
    }

    /// Write `bytes` into guest RAM at `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.frontend
            .ram
            .mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write inside guest RAM");
    }

    /// Read `len` bytes of guest RAM at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.frontend
            .ram
            .mem
            .read_slice(&mut bytes, GuestAddress(addr))
            .expect("read inside guest RAM");
        bytes
    }

    /// Post `count` RX buffers of `len` bytes on pair `pair`; their
    /// addresses by head index.
    pub fn post_rx(&mut self, pair: usize, count: usize, len: u32) -> Vec<(u16, u64)> {
        (0..count)
            .map(|_| {
                let addr = self.slot();
                let head = self.frontend.queues[2 * pair]
                    .add_chain(&self.frontend.ram, &[Desc::writable(addr, len)]);
                (head, addr)
            })
            .collect()
    }

    /// Queue one frame on the TX ring of `pair` (header and frame in two
    /// descriptors, as Linux does), without kicking.
    pub fn queue_tx(&mut self, pair: usize, frame: &[u8]) -> u16 {
        let addr = self.slot();
        self.write(addr, &[0u8; HDR]);
        self.write(addr + 0x100, frame);
        self.frontend.queues[2 * pair + 1].add_chain(
            &self.frontend.ram,
            &[
                Desc::readable(addr, HDR as u32),
                Desc::readable(addr + 0x100, frame.len() as u32),
            ],
        )
    }

    /// Kick the TX ring of `pair`.
    pub fn kick_tx(&self, pair: usize) {
        self.frontend.queues[2 * pair + 1].kick();
    }

    /// Wait for `count` new used entries on queue `queue`; (id, len) each.
    pub fn used(&mut self, queue: usize, count: u16) -> Vec<(u32, u32)> {
        let ram = self.frontend.ram.clone();
        self.frontend.queues[queue]
            .wait_used(&ram, count, WAIT)
            .unwrap_or_else(|| {
                panic!(
                    "queue {queue}: {count} used entries did not come; agent log:\n{}",
                    self.log()
                )
            })
    }

    /// The device's entry in `query-devices`.
    pub fn device(&self) -> Value {
        query_device(&self.control())
    }

    /// The device's entry of `query-metrics`.
    pub fn metrics(&self) -> Value {
        query_metrics(&self.control(), r#"{"device": "net0"}"#)[0].clone()
    }
}

/// The first device of `query-devices`, through `vhost-agent ctl`.
pub fn query_device(control: &Path) -> Value {
    ctl(control, "query-devices", "{}").unwrap_or_else(|e| panic!("query-devices failed: {e}"))[0]
        .clone()
}

/// `query-metrics` with `arguments`, through `vhost-agent ctl`.
pub fn query_metrics(control: &Path, arguments: &str) -> Value {
    ctl(control, "query-metrics", arguments).unwrap_or_else(|e| panic!("query-metrics failed: {e}"))
}

/// Run `vhost-agent ctl CONTROL command arguments`: the result on success,
/// the error text otherwise. Through the real client, so the tests
/// exercise it too.
pub fn ctl(control: &Path, command: &str, arguments: &str) -> Result<Value, String> {
    let output = std::process::Command::new(agent_binary())
        .arg("ctl")
        .arg(control)
        .args([command, arguments])
        .output()
        .map_err(|e| format!("run vhost-agent ctl: {e}"))?;
    if output.status.success() {
        serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("ctl printed no JSON ({e}): {output:?}"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Counter `name` of pair `pair` in a `query-devices` entry.
pub fn counter(device: &Value, pair: usize, name: &str) -> u64 {
    device["pairs"][pair][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} for pair {pair} in {device}"))
}

/// An Ethernet + IPv4 + UDP frame from 10.0.0.1:`sport` to 10.0.0.2:`dport`
/// with `payload` bytes of a pattern.
pub fn udp_frame(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42 + payload);
    frame.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    frame.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload) as u16;
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    frame.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend((0..payload).map(|i| (i * 7 + usize::from(sport)) as u8));
    frame
}

/// `presetup` arguments for device `net0` with `pairs` queue pairs, MTU
/// 1500 and no RSS, as an orchestrator would relay them from the source's
/// `query-config` (docs/control-api.md).
pub fn early_config(pairs: u16) -> String {
    early_config_with(pairs, 1500, 0)
}

/// Like [`early_config`] with MTU `mtu` and the guest's acked virtio
/// features `acked_features` (what a source's `query-config` carries).
pub fn early_config_with(pairs: u16, mtu: u16, acked_features: u64) -> String {
    serde_json::json!({
        "device": "net0",
        "config": {
            "version": 1,
            "acked_features": acked_features,
            "protocol_features": 0,
            "memory": [],
            "rings": [],
            "device": {"net": {"mtu": mtu, "mac": [82, 84, 0, 18, 52, 86], "queue_pairs": pairs, "rss": null}}
        }
    })
    .to_string()
}
