//! Command-line syntax: `--blk socket=PATH,image=PATH[,key=value...]` and
//! `--net socket=PATH,dataplane=DP[,key=value...]`.

use std::path::PathBuf;
use std::str::FromStr;

use blkdev::{DiskOptions, FenceMode};
use netdev::dataplane::DataplaneSpec;
use netdev::rss::RssConfig;
use netdev::spec::MacAddress;

/// A `--blk` or `--net` spec that does not parse; the message names the
/// key and what it takes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A key without its value.
    #[error("{0} needs a value ({0}=...)")]
    NeedsValue(String),
    /// A key given twice: which value was meant is a guess.
    #[error("{0} is given twice")]
    Twice(String),
    /// A key this kind of device does not have.
    #[error("unknown --{option} key `{key}`")]
    UnknownKey {
        /// `blk` or `net`.
        option: &'static str,
        /// The key.
        key: String,
    },
    /// A required key is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A value out of range or of the wrong form.
    #[error("{key}={value}: {expected}")]
    Value {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What it takes.
        expected: String,
    },
    /// A value a lower layer refused (dataplane, fence mode), with its
    /// own message.
    #[error("{0}")]
    Refused(String),
}

fn bad(key: &str, value: impl ToString, expected: impl Into<String>) -> SpecError {
    SpecError::Value {
        key: key.to_string(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// Storage engine choice on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring if the kernel allows it, else the thread pool.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// The thread pool.
    Threads,
}

/// One `--blk` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkSpec {
    /// Device name for logs (default `blkN`).
    pub id: Option<String>,
    /// vhost-user socket to listen on.
    pub socket: PathBuf,
    /// Raw image file or block device.
    pub image: PathBuf,
    /// Disk options.
    pub options: DiskOptions,
    /// Storage engine.
    pub engine: EngineChoice,
}

/// Help text for the `--blk` value, shown by `--help`.
pub const BLK_HELP: &str = "\
Serve a virtio-blk disk: socket=PATH,image=PATH[,KEY=VALUE...]. Keys:
  socket=PATH       vhost-user socket to listen on (required)
  image=PATH        raw image file or block device (required)
  id=NAME           name used in logs (default blk0, blk1, ...)
  num-queues=N      request queues, 1..=64 (default 1)
  queue-size=N      largest ring size, power of two 2..=32768 (default 256)
  readonly          refuse writes (VIRTIO_BLK_F_RO)
  direct            open the image with O_DIRECT (bypass the page cache)
  serial=S          GET_ID serial, up to 20 bytes (default: empty)
  engine=E          auto | io_uring | threads (default auto)
  poll-us=N         busy-poll each queue for N microseconds after work
                    before sleeping; 0 disables (default 32)
  fence=MODE        how a migration destination holds the writes it
                    resubmits until the source can no longer write:
                    lock: until the source releases a lock file next to
                    the image on shared storage (default);
                    api: until the control API call fence-release;
                    none: no fence (unsafe; experiments only)
  latency-ms=N      TESTING KNOB: adds N ms before every storage operation
                    starts; for experiments and tests,
                    never for production. 0..=60000 (default 0)
Repeat --blk for several disks.";

/// Largest `latency-ms` accepted: a minute is plenty to make any race
/// visible, and far beyond what a front-end tolerates anyway.
const MAX_LATENCY_MS: u32 = 60_000;

fn parse_number<T: FromStr>(key: &str, value: &str) -> Result<T, SpecError> {
    value
        .parse()
        .map_err(|_| bad(key, value, "not a valid number"))
}

impl FromStr for BlkSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<BlkSpec, SpecError> {
        let mut id = None;
        let mut socket = None;
        let mut image = None;
        let mut options = DiskOptions::default();
        let mut engine = EngineChoice::Auto;
        let mut seen = Vec::new();
        for item in spec.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (item, None),
            };
            once(&mut seen, key)?;
            let need = |value: Option<&'_ str>| -> Result<String, SpecError> {
                value
                    .map(str::to_string)
                    .ok_or_else(|| SpecError::NeedsValue(key.to_string()))
            };
            match key {
                "id" => id = Some(need(value)?),
                "socket" => socket = Some(PathBuf::from(need(value)?)),
                "image" => image = Some(PathBuf::from(need(value)?)),
                "num-queues" => {
                    let n: u16 = parse_number(key, &need(value)?)?;
                    if !(1..=64).contains(&n) {
                        return Err(bad(key, n, "must be 1..=64"));
                    }
                    options.num_queues = n;
                }
                "queue-size" => {
                    let n: u16 = parse_number(key, &need(value)?)?;
                    if n < 2 || !n.is_power_of_two() {
                        return Err(bad(key, n, "must be a power of two from 2 to 32768"));
                    }
                    options.queue_size = n;
                }
                "readonly" | "direct" => {
                    let on = match value {
                        None | Some("on" | "true" | "1") => true,
                        Some("off" | "false" | "0") => false,
                        Some(other) => return Err(bad(key, other, "expected on or off")),
                    };
                    if key == "readonly" {
                        options.readonly = on;
                    } else {
                        options.direct = on;
                    }
                }
                "poll-us" => {
                    let us: u32 = parse_number(key, &need(value)?)?;
                    if us > 1_000_000 {
                        return Err(bad(key, us, "at most 1000000"));
                    }
                    options.poll_us = us;
                }
                "latency-ms" => {
                    let ms: u32 = parse_number(key, &need(value)?)?;
                    if ms > MAX_LATENCY_MS {
                        return Err(bad(key, ms, format!("at most {MAX_LATENCY_MS}")));
                    }
                    options.latency_ms = ms;
                }
                "fence" => {
                    options.fence = need(value)?
                        .parse::<FenceMode>()
                        .map_err(SpecError::Refused)?
                }
                "serial" => {
                    let serial = need(value)?;
                    if serial.len() > 20 {
                        return Err(bad(key, &serial, "longer than 20 bytes"));
                    }
                    options.serial = serial;
                }
                "engine" => {
                    engine = match need(value)?.as_str() {
                        "auto" => EngineChoice::Auto,
                        "io_uring" | "io-uring" => EngineChoice::IoUring,
                        "threads" => EngineChoice::Threads,
                        other => return Err(bad(key, other, "expected auto, io_uring or threads")),
                    }
                }
                other => {
                    return Err(SpecError::UnknownKey {
                        option: "blk",
                        key: other.to_string(),
                    })
                }
            }
        }
        Ok(BlkSpec {
            id,
            socket: socket.ok_or(SpecError::Missing("socket=PATH"))?,
            image: image.ok_or(SpecError::Missing("image=PATH"))?,
            options,
            engine,
        })
    }
}

/// How a net device steers received frames to RX queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RssChoice {
    /// No RSS: a frame goes to the RX queue of the pair it belongs to.
    Off,
    /// RSS over every queue pair with the default key and hash types.
    Spread,
    /// RSS as a JSON file (`RssConfig`) describes it.
    File(PathBuf),
}

/// One `--net` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// Device name for logs (default `netN`).
    pub id: Option<String>,
    /// vhost-user socket to listen on.
    pub socket: PathBuf,
    /// Where frames go.
    pub dataplane: DataplaneSpec,
    /// Queue pairs (VIRTIO_NET_F_MQ).
    pub queue_pairs: u16,
    /// MTU (VIRTIO_NET_F_MTU, and the tap's MTU).
    pub mtu: u16,
    /// MAC address in the config space (for front-ends that read it with
    /// GET_CONFIG; QEMU and DPDK 22.11 bring their own).
    pub mac: MacAddress,
    /// Busy-poll time after work, microseconds.
    pub poll_us: u32,
    /// Receive steering.
    pub rss: RssChoice,
    /// A cost profile on top of the dataplane (`profile=FILE`, for `tap`).
    pub profile: Option<PathBuf>,
}

impl NetSpec {
    /// The RSS configuration to start with, if any.
    pub fn rss_config(&self) -> Result<Option<RssConfig>, String> {
        match &self.rss {
            RssChoice::Off => Ok(None),
            RssChoice::Spread => Ok(Some(RssConfig::spread(self.queue_pairs))),
            RssChoice::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read RSS configuration {}: {e}", path.display())
                })?;
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| format!("RSS configuration {}: {e}", path.display()))
            }
        }
    }
}

/// Help text for the `--net` value, shown by `--help`.
pub const NET_HELP: &str = "\
Serve a virtio-net device: socket=PATH,dataplane=DP[,KEY=VALUE...]. Keys:
  socket=PATH       vhost-user socket to listen on (required)
  dataplane=DP      where frames go (required):
                    loop: every frame the guest sends comes back to it
                    (tests, benchmarks);
                    tap:IFNAME: a kernel tap device, created (or attached
                    to) at start-up, one tap queue per queue pair, with a
                    virtio-net header so checksum/TSO offloads work;
                    sim:PROFILE.json: like loop, but configuration steps
                    cost what the profile says (a simulated hardware NIC
                    for downtime experiments);
                    vhost-net:IFNAME: the kernel's vhost-net moves frames
                    between the guest's rings and tap IFNAME (one tap
                    queue and one /dev/vhost-net per queue pair); the
                    agent copies nothing (needs /dev/vhost-net; no rss=)
                    vdpa:/dev/vhost-vdpa-N: a kernel vhost-vdpa device
                    (vDPA hardware or VDUSE) moves the frames; the agent
                    configures it and tracks dirty pages from its used
                    rings (MAC and MTU are the device's; no rss=)
  profile=FILE      with tap: real frames, and configuration steps that cost
                    what the JSON cost profile says (as sim: does for loop;
                    netdev/profiles/vdpa-191ms.json models a vDPA NIC)
  id=NAME           name used in logs (default net0, net1, ...)
  queue-pairs=N     RX/TX queue pairs, 1..=127 (default 1)
  mtu=N             MTU offered to the guest and set on a tap, 68..=65535
                    (default 1500)
  mac=MAC           MAC address in the device config space, for a
                    front-end that reads it with GET_CONFIG (default
                    52:54:00:12:34:56; QEMU uses its own -device mac=,
                    DPDK 22.11's virtio_user its own mac= devarg)
  poll-us=N         busy-poll the rings for N microseconds after work
                    before sleeping; 0 disables (default 0)
  rss=on|off|FILE   steer received frames by Toeplitz hash over the queue
                    pairs: on = default key, IPv4/IPv6/TCP/UDP hash types,
                    table spread over all pairs; FILE = a JSON RssConfig
                    {hash_types, key, indirection_table, default_queue}
                    (default off: a frame stays on its pair)
Repeat --net for several devices.";

impl FromStr for NetSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<NetSpec, SpecError> {
        let mut id = None;
        let mut socket = None;
        let mut dataplane = None;
        let mut queue_pairs = 1u16;
        let mut mtu = 1500u16;
        let mut mac = MacAddress::DEFAULT;
        let mut poll_us = 0u32;
        let mut rss = RssChoice::Off;
        let mut profile = None;
        let mut seen = Vec::new();
        for item in spec.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| SpecError::NeedsValue(item.to_string()))?;
            once(&mut seen, key)?;
            match key {
                "id" => id = Some(value.to_string()),
                "socket" => socket = Some(PathBuf::from(value)),
                "dataplane" => {
                    dataplane = Some(value.parse::<DataplaneSpec>().map_err(SpecError::Refused)?)
                }
                "queue-pairs" => {
                    let n: u16 = parse_number(key, value)?;
                    if !(1..=netdev::spec::MAX_QUEUE_PAIRS).contains(&n) {
                        return Err(bad(
                            key,
                            n,
                            format!("must be 1..={}", netdev::spec::MAX_QUEUE_PAIRS),
                        ));
                    }
                    queue_pairs = n;
                }
                "mtu" => {
                    let n: u32 = parse_number(key, value)?;
                    if n < u32::from(netdev::spec::MIN_MTU) || n > 65535 {
                        return Err(bad(key, n, "must be 68..=65535"));
                    }
                    mtu = n as u16;
                }
                "mac" => {
                    mac = value
                        .parse()
                        .map_err(|e: netdev::spec::MacParseError| bad(key, value, e.to_string()))?
                }
                "poll-us" => {
                    let us: u32 = parse_number(key, value)?;
                    if us > 1_000_000 {
                        return Err(bad(key, us, "at most 1000000"));
                    }
                    poll_us = us;
                }
                "rss" => {
                    rss = match value {
                        "on" => RssChoice::Spread,
                        "off" => RssChoice::Off,
                        "" => return Err(SpecError::NeedsValue("rss".to_string())),
                        path => RssChoice::File(PathBuf::from(path)),
                    }
                }
                "profile" if !value.is_empty() => profile = Some(PathBuf::from(value)),
                "profile" => return Err(SpecError::NeedsValue("profile".to_string())),
                other => {
                    return Err(SpecError::UnknownKey {
                        option: "net",
                        key: other.to_string(),
                    })
                }
            }
        }
        Ok(NetSpec {
            id,
            socket: socket.ok_or(SpecError::Missing("socket=PATH"))?,
            dataplane: dataplane.ok_or(SpecError::Missing(
                "dataplane=DP (loop, tap:IFNAME, sim:PROFILE.json, vhost-net:IFNAME or vdpa:PATH)",
            ))?,
            queue_pairs,
            mtu,
            mac,
            poll_us,
            rss,
            profile,
        })
    }
}

/// Refuse a key given twice: which of two values was meant is a guess.
fn once<'a>(seen: &mut Vec<&'a str>, key: &'a str) -> Result<(), SpecError> {
    if seen.contains(&key) {
        return Err(SpecError::Twice(key.to_string()));
    }
    seen.push(key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_spec_parses() {
        let spec: BlkSpec =
            "socket=/tmp/s,image=/tmp/i,num-queues=4,queue-size=128,readonly,direct,serial=abc,engine=threads,id=d0"
                .parse()
                .unwrap();
        assert_eq!(spec.socket, PathBuf::from("/tmp/s"));
        assert_eq!(spec.image, PathBuf::from("/tmp/i"));
        assert_eq!(spec.options.num_queues, 4);
        assert_eq!(spec.options.queue_size, 128);
        assert!(spec.options.readonly && spec.options.direct);
        assert_eq!(spec.options.serial, "abc");
        assert_eq!(spec.engine, EngineChoice::Threads);
        assert_eq!(spec.id.as_deref(), Some("d0"));
    }

    #[test]
    fn latency_and_fence_default_to_none_and_lock() {
        let spec: BlkSpec = "socket=/s,image=/i".parse().unwrap();
        assert_eq!(spec.options.latency_ms, 0);
        assert_eq!(spec.options.fence, FenceMode::Lock);
    }

    #[test]
    fn latency_and_fence_parse() {
        let spec: BlkSpec = "socket=/s,image=/i,latency-ms=250,fence=api"
            .parse()
            .unwrap();
        assert_eq!(spec.options.latency_ms, 250);
        assert_eq!(spec.options.fence, FenceMode::Api);
        let spec: BlkSpec = "socket=/s,image=/i,latency-ms=60000,fence=none"
            .parse()
            .unwrap();
        assert_eq!(spec.options.latency_ms, 60_000);
        assert_eq!(spec.options.fence, FenceMode::None);
    }

    #[test]
    fn bad_latency_and_fence_name_the_problem() {
        let err = |s: &str| s.parse::<BlkSpec>().unwrap_err().to_string();
        assert_eq!(
            err("socket=/s,image=/i,latency-ms=60001"),
            "latency-ms=60001: at most 60000"
        );
        assert!(err("socket=/s,image=/i,latency-ms=-1").contains("not a valid number"));
        assert!(err("socket=/s,image=/i,latency-ms=1.5").contains("not a valid number"));
        assert!(err("socket=/s,image=/i,latency-ms").contains("needs a value"));
        assert_eq!(
            err("socket=/s,image=/i,fence=lokc"),
            "fence=lokc: expected lock, api or none"
        );
        assert!(err("socket=/s,image=/i,fence").contains("needs a value"));
    }

    #[test]
    fn help_lists_latency_and_fence() {
        assert!(BLK_HELP.contains("latency-ms=N"));
        assert!(BLK_HELP.contains("never for production"));
        assert!(BLK_HELP.contains("fence=MODE"));
    }

    #[test]
    fn net_spec_parses_with_defaults() {
        let spec: NetSpec = "socket=/s,dataplane=loop".parse().unwrap();
        assert_eq!(spec.dataplane, DataplaneSpec::Loop);
        assert_eq!((spec.queue_pairs, spec.mtu, spec.poll_us), (1, 1500, 0));
        assert_eq!(spec.mac, MacAddress::DEFAULT);
        assert_eq!(spec.rss, RssChoice::Off);
        let spec: NetSpec =
            "socket=/s,dataplane=tap:vh0,queue-pairs=4,mtu=9000,mac=02:00:00:00:00:01,poll-us=50,rss=on,id=n"
                .parse()
                .unwrap();
        assert_eq!(spec.dataplane, DataplaneSpec::Tap("vh0".into()));
        assert_eq!((spec.queue_pairs, spec.mtu, spec.poll_us), (4, 9000, 50));
        assert_eq!(spec.mac.to_string(), "02:00:00:00:00:01");
        assert_eq!(spec.rss, RssChoice::Spread);
        assert_eq!(spec.rss_config().unwrap().unwrap().indirection_table[3], 3);
        let spec: NetSpec = "socket=/s,dataplane=vhost-net:vh1,queue-pairs=2"
            .parse()
            .unwrap();
        assert_eq!(spec.dataplane, DataplaneSpec::VhostNet("vh1".into()));
        assert!(NET_HELP.contains("vhost-net:IFNAME"));
    }

    #[test]
    fn bad_net_specs_name_the_problem() {
        let err = |s: &str| s.parse::<NetSpec>().unwrap_err().to_string();
        assert!(err("dataplane=loop").contains("socket"));
        assert!(err("socket=/s").contains("dataplane"));
        assert!(err("socket=/s,dataplane=vdpa").contains("unknown dataplane"));
        assert!(err("socket=/s,dataplane=loop,queue-pairs=0").contains("1..=127"));
        assert!(err("socket=/s,dataplane=loop,queue-pairs=128").contains("1..=127"));
        assert!(err("socket=/s,dataplane=loop,mtu=67").contains("68..=65535"));
        assert!(err("socket=/s,dataplane=loop,mtu=65536").contains("68..=65535"));
        assert!(err("socket=/s,dataplane=loop,mac=zz").contains("mac=zz"));
        assert!(err("socket=/s,dataplane=loop,bogus=1").contains("unknown --net key"));
        assert!(err("socket=/s,dataplane=loop,readonly").contains("needs a value"));
        assert!(err("socket=/s,dataplane=loop,mtu=1500,mtu=9000").contains("mtu is given twice"));
        assert!(err("socket=/s,dataplane=loop,profile=").contains("profile needs a value"));
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let err = |s: &str| s.parse::<BlkSpec>().unwrap_err().to_string();
        assert!(err("image=/i").contains("socket"));
        assert!(err("socket=/s").contains("image"));
        assert!(err("socket=/s,image=/i,queue-size=100").contains("power of two"));
        assert!(err("socket=/s,image=/i,num-queues=0").contains("1..=64"));
        assert!(err("socket=/s,image=/i,bogus=1").contains("unknown"));
        assert!(err("socket=/s,image=/i,num-queues=x").contains("not a valid number"));
        assert!(err("socket=/s,image=/i,serial=123456789012345678901").contains("20 bytes"));
    }
}
