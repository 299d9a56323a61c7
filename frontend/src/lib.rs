//! The test front-end: a QEMU stand-in built on the `vhost` crate's
//! `Frontend`, plus a guest-side split-ring driver over a shared memfd.
//! The tests, `vhost-agent demo` and `vhost-agent experiment` share it.
//!
//! It lets a test do what no real client will: put hostile descriptor
//! chains on a ring, send raw malformed messages, and look at the used ring
//! byte by byte, against the real agent process.
//!
//! It can also play both QEMUs of a live migration on one host: start a
//! device with an inflight region (GET_INFLIGHT_FD + SET_INFLIGHT_FD), put
//! many requests on a ring at once, stop the source the way QEMU does
//! (SET_VRING_ENABLE(0), then GET_VRING_BASE or the raw request 45), copy the
//! region as QEMU migrates it, and start a destination front-end on a second
//! back-end over the SAME guest RAM (both agents map one memfd, so the rings
//! and buffers stay where they are) with SET_INFLIGHT_FD and no GET.
//!
//! Failures panic, test style (with the message a test needs); the demo
//! and the experiment catch them per run ([`bench::catch_panic`]).
//!
//! Besides the front-end itself, the rigs built on it:
//!
//! * [`support`], [`agent`]: find (or build) the agent binary, spawn
//!   `vhost-agent serve` and wait for its sockets, one control request;
//! * [`net_rig`]: an agent with one `--net` device and a front-end on it;
//! * [`blk_stop`]: a blk source's stop timed, drain versus suspend;
//! * [`bench`](mod@bench): a failed run reported instead of a panic, the load average.

pub mod agent;
pub mod bench;
mod blk;
pub mod blk_stop;
pub mod inflight;
pub mod net_rig;
pub mod presetup;
mod queue;
mod ram;
pub mod raw;
pub mod support;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};

pub use self::blk::{
    BlkRequest, Submitted, STATUS_UNSET, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use self::inflight::InflightRegion;
pub use self::queue::{Desc, DriverQueue};
pub use self::ram::{sealed_memfd, GuestRam};
use self::raw::RawMessage;

/// Protocol feature INFLIGHT_SHMFD (bit 12): GET/SET_INFLIGHT_FD.
pub const PROTOCOL_F_INFLIGHT_SHMFD: u64 = 1 << 12;
/// Protocol feature GET_VRING_BASE_INFLIGHT (bit 20): GET_VRING_BASE may
/// suspend in-flight requests into the inflight region instead of draining.
pub const PROTOCOL_F_GET_VRING_BASE_INFLIGHT: u64 = 1 << 20;
/// Protocol feature GET_VRING_BASE_SKIP_DRAIN (bit 23): request 11 drains
/// again and request 45 suspends. The `vhost` crate does not know it.
pub const PROTOCOL_F_GET_VRING_BASE_SKIP_DRAIN: u64 = 1 << 23;
/// What a QEMU with `inflight-migration=on` acks (bits 12 and 20).
pub const PROTOCOL_SUSPEND: u64 = PROTOCOL_F_INFLIGHT_SHMFD | PROTOCOL_F_GET_VRING_BASE_INFLIGHT;

/// How long any reply on the connection may take before the test fails
/// (instead of hanging on a stuck back-end).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// Poll `condition` every millisecond until it holds (true) or `timeout`
/// passes (false). For state that has no event to wait on, such as the
/// inflight region.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A connected test front-end with its guest RAM and queues.
pub struct TestFrontend {
    /// The vhost-user connection.
    pub frontend: Frontend,
    /// Guest RAM (shared with a migration destination's front-end).
    pub ram: Arc<GuestRam>,
    /// Queues, indexed by queue number.
    pub queues: Vec<DriverQueue>,
    /// Virtio features acked with SET_FEATURES.
    pub features: u64,
    /// Every protocol feature bit the back-end offered (the `vhost` crate's
    /// own view drops the bits it does not know, such as 23).
    pub offered_protocol: u64,
    /// Protocol features acked with SET_PROTOCOL_FEATURES.
    pub protocol: u64,
    /// The inflight region the back-end was given, if any.
    pub inflight: Option<InflightRegion>,
    /// A clone of the connection for raw messages.
    stream: UnixStream,
}

/// Guest RAM size of a test front-end unless [`StartOptions::ram_size`]
/// says otherwise.
pub const RAM_SIZE: u64 = 16 << 20;
/// Where buffers may go: above the rings (queue `i` uses `i * 64 KiB`).
pub const BUFFER_BASE: u64 = 1 << 20;
/// Buffer slots that fit in guest RAM (64 KiB each, from BUFFER_BASE).
pub const SLOTS: u64 = (RAM_SIZE - BUFFER_BASE) / 0x1_0000;

/// How a test front-end connects and starts the device.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// Queues to start.
    pub num_queues: usize,
    /// Size of every queue.
    pub queue_size: u16,
    /// Protocol features to ack besides MQ, REPLY_ACK and CONFIG (raw bits,
    /// so bit 23 fits), when the back-end offers them.
    pub protocol: u64,
    /// Fail the test if the back-end does not offer all of `protocol`.
    pub require_protocol: bool,
    /// Start with GET_INFLIGHT_FD + SET_INFLIGHT_FD, like QEMU's
    /// vhost-user-blk when INFLIGHT_SHMFD is negotiated.
    pub get_inflight: bool,
    /// Virtqueues per unit of GET_QUEUE_NUM: 1 for block (queues), 2 for
    /// net (queue pairs, as QEMU and DPDK read it).
    pub queues_per_unit: usize,
    /// Guest RAM of a fresh front-end, in bytes (a sparse memfd, so a
    /// large guest costs only what is touched); [`RAM_SIZE`] by default.
    pub ram_size: u64,
}

impl StartOptions {
    /// MQ, REPLY_ACK and CONFIG only; no inflight region.
    pub fn plain(num_queues: usize, queue_size: u16) -> StartOptions {
        StartOptions {
            num_queues,
            queue_size,
            protocol: 0,
            require_protocol: false,
            get_inflight: false,
            queues_per_unit: 1,
            ram_size: RAM_SIZE,
        }
    }

    /// Also ack `protocol` (which the back-end must offer) and, if it
    /// holds INFLIGHT_SHMFD, start with a fresh inflight region.
    pub fn with_protocol(num_queues: usize, queue_size: u16, protocol: u64) -> StartOptions {
        StartOptions {
            num_queues,
            queue_size,
            protocol,
            require_protocol: true,
            queues_per_unit: 1,
            get_inflight: protocol & PROTOCOL_F_INFLIGHT_SHMFD != 0,
            ram_size: RAM_SIZE,
        }
    }
}

/// Where the inflight region of [`TestFrontend::start_device`] comes from.
pub enum Inflight {
    /// No region (INFLIGHT_SHMFD not used).
    None,
    /// GET_INFLIGHT_FD, then SET_INFLIGHT_FD with what came back.
    Get,
    /// SET_INFLIGHT_FD with this region and no GET (reconnect, migration
    /// destination).
    Set(InflightRegion),
}

/// Which request stops a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// GET_VRING_BASE (11), through the `vhost` crate.
    GetVringBase,
    /// GET_VRING_BASE_SKIP_DRAIN (45), written raw.
    SkipDrain,
}

/// What a stop returned.
#[derive(Clone, Debug)]
pub struct Stopped {
    /// Per queue: the next avail index the back-end reported.
    pub bases: Vec<u16>,
    /// Per queue: from sending the stop request to its reply.
    pub reply_times: Vec<Duration>,
}

/// Connect to `socket`, retrying for up to 5 s while nobody listens yet
/// (a restarted back-end replacing its stale socket).
fn connect_stream(socket: &Path) -> UnixStream {
    let mut retries = 50;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return stream,
            Err(e)
                if retries > 0
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
            {
                retries -= 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("connect to {}: {e}", socket.display()),
        }
    }
}

impl TestFrontend {
    /// Connect to `socket`, negotiate (without EVENT_IDX, so every used
    /// entry is signalled), and start `num_queues` rings of `queue_size`.
    pub fn connect(socket: &Path, num_queues: usize, queue_size: u16) -> TestFrontend {
        Self::connect_with(
            socket,
            num_queues,
            queue_size,
            VhostUserProtocolFeatures::empty(),
        )
    }

    /// Like [`Self::connect`], also negotiating `extra` protocol features
    /// (e.g. LOG_SHMFD) when the back-end offers them.
    pub fn connect_with(
        socket: &Path,
        num_queues: usize,
        queue_size: u16,
        extra: VhostUserProtocolFeatures,
    ) -> TestFrontend {
        let mut options = StartOptions::plain(num_queues, queue_size);
        options.protocol = extra.bits();
        Self::start(socket, &options)
    }

    /// Connect, negotiate and start the device with fresh guest RAM and
    /// every ring at index 0.
    pub fn start(socket: &Path, options: &StartOptions) -> TestFrontend {
        let mut frontend = Self::negotiate(socket, options);
        let inflight = if options.get_inflight {
            Inflight::Get
        } else {
            Inflight::None
        };
        frontend.start_device(inflight, &vec![0; options.num_queues]);
        frontend
    }

    /// Start the device of `guest` (its RAM, its rings, where its driver
    /// stands) on the back-end at `socket`, from `region` without a
    /// GET_INFLIGHT_FD and with SET_VRING_BASE `bases`: a migration
    /// destination (`region` = the source's region migrated, `bases` = what
    /// the source's stop returned) or a reconnect after a back-end crash
    /// (`region` = the same memfd, `bases` = the used indices).
    pub fn resume(
        socket: &Path,
        options: &StartOptions,
        guest: &TestFrontend,
        region: InflightRegion,
        bases: &[u16],
    ) -> TestFrontend {
        let mut frontend = Self::attach(socket, options, guest);
        frontend.start_device(Inflight::Set(region), bases);
        frontend
    }

    /// Connect to `socket` and negotiate for the device of `guest` (its
    /// RAM, its rings where its driver stands) without starting it: a
    /// migration destination's QEMU from its start-up until the
    /// switchover, which is [`Self::start_device`] with what the source's
    /// stop returned (an orchestrator relays presetup in between).
    pub fn attach(socket: &Path, options: &StartOptions, guest: &TestFrontend) -> TestFrontend {
        let queues = guest.queues.iter().map(DriverQueue::continued).collect();
        Self::negotiate_for(socket, options, guest.ram.clone(), queues)
    }

    /// Take the guest driver's place in every ring from `guest`, its
    /// front-end on the other side: the guest kept working there after
    /// [`Self::attach`] copied it, and a migration carries the guest's
    /// memory, driver state included, up to the stop. Call it at the
    /// switchover, before [`Self::start_device`].
    pub fn follow_driver(&mut self, guest: &TestFrontend) {
        for (queue, theirs) in self.queues.iter_mut().zip(&guest.queues) {
            queue.take_place(theirs);
        }
    }

    /// This guest's queues for a front-end on another connection: the same
    /// rings and driver state, new kick and call eventfds (see
    /// [`Self::follow`]).
    pub fn continued_queues(&self) -> Vec<DriverQueue> {
        self.queues.iter().map(DriverQueue::continued).collect()
    }

    /// Connect to `socket` and negotiate only, for a guest whose RAM and
    /// queues ([`Self::continued_queues`]) another front-end drove: a
    /// migration destination or a reconnect of a device without an
    /// inflight region (net), started with [`Self::start_device`] and the
    /// bases the last stop returned.
    pub fn follow(
        socket: &Path,
        options: &StartOptions,
        ram: Arc<GuestRam>,
        queues: Vec<DriverQueue>,
    ) -> TestFrontend {
        Self::negotiate_for(socket, options, ram, queues)
    }

    /// Connect and negotiate only (SET_OWNER, GET_FEATURES,
    /// GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM), with fresh guest RAM;
    /// [`Self::start_device`] does the rest.
    pub fn negotiate(socket: &Path, options: &StartOptions) -> TestFrontend {
        let ram = Arc::new(GuestRam::new(options.ram_size));
        let queues = (0..options.num_queues)
            .map(|index| DriverQueue::new(index, options.queue_size, index as u64 * 0x1_0000))
            .collect();
        Self::negotiate_for(socket, options, ram, queues)
    }

    fn negotiate_for(
        socket: &Path,
        options: &StartOptions,
        ram: Arc<GuestRam>,
        queues: Vec<DriverQueue>,
    ) -> TestFrontend {
        let stream = connect_stream(socket);
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("reply timeout on the connection");
        let raw_stream = stream.try_clone().expect("clone the connection");
        let mut frontend = Frontend::from_stream(stream, options.num_queues as u64);
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        let event_idx = 1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        let log_all = 1u64 << 26; // VHOST_F_LOG_ALL: only while migrating
        let features = offered & !event_idx & !log_all;

        let reply = raw_exchange(&raw_stream, raw::GET_PROTOCOL_FEATURES, &[]);
        let offered_protocol = reply.u64().expect("GET_PROTOCOL_FEATURES reply is a u64");
        if options.require_protocol {
            let missing = options.protocol & !offered_protocol;
            assert!(
                missing == 0,
                "the back-end does not offer protocol features {missing:#x} \
                 (offered {offered_protocol:#x})"
            );
        }
        // As QEMU does, MTU and STATUS are acked when offered: the agent
        // refuses NET_SET_MTU and SET/GET_STATUS without them (vhost-user
        // spec: each needs its protocol feature).
        let wanted = (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MTU
            | VhostUserProtocolFeatures::STATUS)
            .bits()
            | options.protocol;
        let protocol = offered_protocol & wanted;
        frontend
            .set_protocol_features(VhostUserProtocolFeatures::from_bits_retain(protocol))
            .expect("SET_PROTOCOL_FEATURES");
        if protocol & VhostUserProtocolFeatures::MQ.bits() != 0 {
            // Raw, because the crate's front-end takes the answer as its
            // queue limit, which is wrong for net (the answer counts pairs).
            let queue_num = raw_exchange(&raw_stream, raw::GET_QUEUE_NUM, &[])
                .u64()
                .expect("GET_QUEUE_NUM reply is a u64");
            assert!(
                queue_num * options.queues_per_unit as u64 >= options.num_queues as u64,
                "the back-end has {queue_num} queues, the test wants {}",
                options.num_queues
            );
        }
        TestFrontend {
            frontend,
            ram,
            queues,
            features,
            offered_protocol,
            protocol,
            inflight: None,
            stream: raw_stream,
        }
    }

    /// Start the device in QEMU's order (vhost_user_blk_start and
    /// vhost_dev_start): SET_FEATURES, GET_INFLIGHT_FD (if asked), SET_INFLIGHT_FD (if any),
    /// SET_VRING_CALL per ring, SET_MEM_TABLE, per ring SET_VRING_NUM /
    /// BASE (`bases[i]`) / ADDR / KICK, then SET_VRING_ENABLE(1) per ring;
    /// then one round trip so the back-end has applied all of it.
    pub fn start_device(&mut self, inflight: Inflight, bases: &[u16]) {
        assert_eq!(bases.len(), self.queues.len(), "one base per queue");
        self.frontend
            .set_features(self.features)
            .expect("SET_FEATURES");
        let region = match inflight {
            Inflight::None => None,
            Inflight::Get => Some(self.get_inflight_fd()),
            Inflight::Set(region) => Some(region),
        };
        if let Some(region) = &region {
            self.frontend
                .set_inflight_fd(&region.message(), region.fd())
                .expect("SET_INFLIGHT_FD");
        }
        self.inflight = region;
        for queue in &self.queues {
            self.frontend
                .set_vring_call(queue.index, &queue.call)
                .expect("SET_VRING_CALL");
        }
        self.frontend
            .set_mem_table(&[self.ram.region_info()])
            .expect("SET_MEM_TABLE");
        for (queue, &base) in self.queues.iter().zip(bases) {
            self.set_ring_layout(&self.ram, queue, base);
            self.frontend
                .set_vring_kick(queue.index, &queue.kick)
                .expect("SET_VRING_KICK");
        }
        for queue in &self.queues {
            self.frontend
                .set_vring_enable(queue.index, true)
                .expect("SET_VRING_ENABLE");
        }
        self.sync();
    }

    /// SET_VRING_NUM, SET_VRING_BASE (`base`) and SET_VRING_ADDR of
    /// `queue`, its addresses as `ram` maps them.
    fn set_ring_layout(&self, ram: &GuestRam, queue: &DriverQueue, base: u16) {
        let index = queue.index;
        self.frontend
            .set_vring_num(index, queue.size)
            .expect("SET_VRING_NUM");
        self.frontend
            .set_vring_base(index, base)
            .expect("SET_VRING_BASE");
        let config = VringConfigData {
            queue_max_size: queue.size,
            queue_size: queue.size,
            flags: 0,
            desc_table_addr: ram.user_addr(queue.desc_table),
            used_ring_addr: ram.user_addr(queue.used_ring),
            avail_ring_addr: ram.user_addr(queue.avail_ring),
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(index, &config)
            .expect("SET_VRING_ADDR");
    }

    /// Start ring `queue` again after a GET_VRING_BASE, as a front-end that
    /// lies about its size: SET_VRING_NUM `size` (the driver's ring stays as
    /// it is), SET_VRING_BASE `base`, SET_VRING_ADDR, SET_VRING_KICK and
    /// SET_VRING_ENABLE(1), then a round trip.
    pub fn restart_ring_as(&mut self, queue: usize, size: u16, base: u16) {
        let ring = &self.queues[queue];
        self.frontend
            .set_vring_num(queue, size)
            .expect("SET_VRING_NUM");
        self.frontend
            .set_vring_base(queue, base)
            .expect("SET_VRING_BASE");
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.ram.user_addr(ring.desc_table),
            used_ring_addr: self.ram.user_addr(ring.used_ring),
            avail_ring_addr: self.ram.user_addr(ring.avail_ring),
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(queue, &config)
            .expect("SET_VRING_ADDR");
        self.frontend
            .set_vring_kick(queue, &ring.kick)
            .expect("SET_VRING_KICK");
        self.frontend
            .set_vring_enable(queue, true)
            .expect("SET_VRING_ENABLE");
        self.sync();
    }

    /// GET_INFLIGHT_FD for this front-end's queues.
    pub fn get_inflight_fd(&mut self) -> InflightRegion {
        let queue_size = self.queues.first().map_or(0, |queue| queue.size);
        let request = VhostUserInflight::new(0, 0, self.queues.len() as u16, queue_size);
        let (reply, file) = self
            .frontend
            .get_inflight_fd(&request)
            .expect("GET_INFLIGHT_FD");
        InflightRegion::from_reply(&reply, file)
    }

    /// The inflight region the back-end was given (panics if none).
    pub fn region(&self) -> &InflightRegion {
        self.inflight
            .as_ref()
            .expect("the device was started without an inflight region")
    }

    /// A round trip (GET_FEATURES), so every message sent before has been
    /// applied: messages without NEED_REPLY have no reply, and kicks do not
    /// travel on the socket. QEMU does the same (vhost_user_write_sync).
    pub fn sync(&mut self) {
        self.frontend.get_features().expect("GET_FEATURES");
    }

    /// Send a raw message on the connection (no fds).
    pub fn send_raw(&self, request: u32, flags: u32, payload: &[u8]) {
        raw::send(&self.stream, request, flags, payload).expect("send a raw message");
    }

    /// Receive one raw message from the connection.
    pub fn recv_raw(&self) -> RawMessage {
        raw::recv(&self.stream).expect("receive a raw message")
    }

    /// QEMU's stop of a blk device: SET_VRING_ENABLE(0) on every ring, then
    /// `how` on every ring, each reply timed.
    pub fn stop(&mut self, how: StopRequest) -> Stopped {
        for queue in 0..self.queues.len() {
            self.frontend
                .set_vring_enable(queue, false)
                .expect("SET_VRING_ENABLE(0)");
        }
        let mut stopped = Stopped {
            bases: Vec::new(),
            reply_times: Vec::new(),
        };
        for queue in 0..self.queues.len() {
            let (base, elapsed) = self.get_vring_base_timed(queue, how);
            stopped.bases.push(base);
            stopped.reply_times.push(elapsed);
        }
        stopped
    }

    /// Stop ring `queue` with `how`; returns the base and the time from
    /// sending the request to its reply.
    pub fn get_vring_base_timed(&mut self, queue: usize, how: StopRequest) -> (u16, Duration) {
        let (num, elapsed) = match how {
            StopRequest::GetVringBase => {
                let started = Instant::now();
                let num = self.frontend.get_vring_base(queue).expect("GET_VRING_BASE");
                (num, started.elapsed())
            }
            StopRequest::SkipDrain => {
                let (reply, elapsed) = self.get_vring_base_skip_drain(queue);
                assert_eq!(
                    reply.request,
                    raw::GET_VRING_BASE_SKIP_DRAIN,
                    "reply to request 45 carries request {}",
                    reply.request
                );
                assert_eq!(
                    reply.flags,
                    raw::FLAG_VERSION | raw::FLAG_REPLY,
                    "reply to request 45 has flags {:#x}",
                    reply.flags
                );
                let (index, num) = reply
                    .vring_state()
                    .unwrap_or_else(|| panic!("reply to request 45 has {reply:?}"));
                assert_eq!(
                    index as usize, queue,
                    "reply to request 45 names ring {index}"
                );
                (num, elapsed)
            }
        };
        let base = u16::try_from(num)
            .unwrap_or_else(|_| panic!("ring {queue}: base {num:#x} is not a split-ring index"));
        (base, elapsed)
    }

    /// Send GET_VRING_BASE_SKIP_DRAIN (45) for ring `queue` raw and return
    /// the reply unchecked, with the time it took.
    pub fn get_vring_base_skip_drain(&self, queue: usize) -> (RawMessage, Duration) {
        let started = Instant::now();
        let payload = raw::vring_state(queue as u32, 0);
        self.send_raw(raw::GET_VRING_BASE_SKIP_DRAIN, raw::FLAG_VERSION, &payload);
        let reply = self.recv_raw();
        (reply, started.elapsed())
    }

    /// Every ring's used index as it stands in guest memory (what QEMU
    /// restores as the avail index after a back-end crash).
    pub fn used_indices(&self) -> Vec<u16> {
        self.queues
            .iter()
            .map(|queue| queue.used_idx(&self.ram))
            .collect()
    }
}

/// Send a raw request expecting a reply and return the reply, checking
/// that it answers `request`.
fn raw_exchange(stream: &UnixStream, request: u32, payload: &[u8]) -> RawMessage {
    raw::send(stream, request, raw::FLAG_VERSION, payload).expect("send a raw request");
    let reply = raw::recv(stream).expect("receive a raw reply");
    assert_eq!(reply.request, request, "reply answers another request");
    assert!(
        reply.flags & raw::FLAG_REPLY != 0,
        "reply to {request} lacks the reply flag"
    );
    reply
}
