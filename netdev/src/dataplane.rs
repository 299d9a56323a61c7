//! Where a net device's frames go: a wire (`loop` or a kernel `tap`) with,
//! optionally, a cost profile on top that makes configuration operations
//! cost what simulated hardware would.
//!
//! * `loop` reflects every frame the guest sends back to the guest: the
//!   device is both ends of the wire, for tests and benchmarks.
//! * `tap` is a kernel tap device with a virtio-net header, one tap queue
//!   per queue pair, so the kernel honours the guest's offloads.
//! * `sim:PROFILE.json` is `loop` with a [`SimProfile`]; `tap:IF` with a
//!   profile (`--net ...,profile=FILE`) moves real frames while its
//!   configuration costs what the profile says (a hardware model on real
//!   traffic, for downtime experiments).
//! * `vhost-net:IF` names no dataplane of this module: the kernel's
//!   vhost-net moves the frames between the guest's rings and the tap `IF`
//!   and the agent only configures it (`agent/src/net/vhost_net`). The
//!   spec is parsed here so that `dataplane=` has one grammar.
//! * `vdpa:/dev/vhost-vdpa-N` names no dataplane of this module either: a
//!   kernel vhost-vdpa device (vDPA hardware, or a VDUSE device) moves the
//!   frames and the agent only configures it (`agent/src/net/vdpa`).
//!
//! Each configuration operation returns whether it did anything, so the
//! agent can report what a start really cost. The device picks the RX
//! queue itself (RSS); the dataplane only carries frames per queue pair.

use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

use crate::sim::{SimHardware, SimOp, SimProfile, SimProfileError};
use crate::spec::{self, MacAddress};
use crate::tap::{TapDevice, TapError, TapOffloads};

/// Which dataplane a device uses, as the command line names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataplaneSpec {
    /// `loop`.
    Loop,
    /// `tap:NAME`.
    Tap(String),
    /// `sim:PROFILE.json`: `loop` with a cost profile.
    Sim(PathBuf),
    /// `vhost-net:NAME`: the kernel's vhost-net on tap `NAME` (not opened
    /// by [`Dataplane::open`]: the agent moves no frames for it).
    VhostNet(String),
    /// `vdpa:PATH`: a kernel vhost-vdpa device node (not opened here).
    Vdpa(PathBuf),
}

impl std::fmt::Display for DataplaneSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataplaneSpec::Loop => write!(f, "loop"),
            DataplaneSpec::Tap(name) => write!(f, "tap:{name}"),
            DataplaneSpec::Sim(path) => write!(f, "sim:{}", path.display()),
            DataplaneSpec::VhostNet(name) => write!(f, "vhost-net:{name}"),
            DataplaneSpec::Vdpa(path) => write!(f, "vdpa:{}", path.display()),
        }
    }
}

impl std::str::FromStr for DataplaneSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once(':') {
            None if text == "loop" => Ok(DataplaneSpec::Loop),
            Some(("tap", name)) if !name.is_empty() => Ok(DataplaneSpec::Tap(name.to_string())),
            Some(("sim", path)) if !path.is_empty() => Ok(DataplaneSpec::Sim(PathBuf::from(path))),
            Some(("vhost-net", name)) if !name.is_empty() => {
                Ok(DataplaneSpec::VhostNet(name.to_string()))
            }
            Some(("vdpa", path)) if !path.is_empty() => Ok(DataplaneSpec::Vdpa(PathBuf::from(path))),
            _ => Err(format!(
                "unknown dataplane {text:?}: expected loop, tap:IFNAME, sim:PROFILE.json, vhost-net:IFNAME or vdpa:/dev/vhost-vdpa-N"
            )),
        }
    }
}

/// A dataplane could not be set up or refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The tap device failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The cost profile could not be loaded.
    #[error(transparent)]
    Sim(#[from] SimProfileError),
    /// `sim:` already names a profile; a second one is ambiguous.
    #[error("sim:{0} has its profile already; profile= is for tap")]
    TwoProfiles(PathBuf),
    /// `vhost-net:` and `vdpa:` are kernel datapaths, not dataplanes of ours.
    #[error("{0} is a kernel datapath; the agent opens no dataplane for it")]
    KernelDatapath(String),
}

/// The wire frames travel on.
enum Wire {
    /// Frames from TX go back to RX.
    Loop,
    /// A kernel tap device.
    Tap(TapDevice),
}

/// A device's dataplane (module documentation).
pub struct Dataplane {
    wire: Wire,
    cost: Option<SimHardware>,
}

impl Dataplane {
    /// Set up the dataplane for `queue_pairs` pairs: a tap is created (or
    /// attached to) now, with `mtu`, and brought up, so it exists before a
    /// front-end connects. `profile` adds a cost profile (for `tap`).
    pub fn open(
        spec: &DataplaneSpec,
        queue_pairs: u16,
        mtu: u16,
        profile: Option<&Path>,
    ) -> Result<Dataplane, DataplaneError> {
        let (wire, profile) = match spec {
            DataplaneSpec::Loop => (Wire::Loop, profile.map(Path::to_path_buf)),
            DataplaneSpec::Sim(path) => {
                if profile.is_some() {
                    return Err(DataplaneError::TwoProfiles(path.clone()));
                }
                (Wire::Loop, Some(path.clone()))
            }
            DataplaneSpec::Tap(name) => {
                let tap = TapDevice::open(name, queue_pairs, spec::HDR_LEN_MRG)?;
                tap.set_mtu(mtu)?;
                tap.set_up(true)?;
                (Wire::Tap(tap), profile.map(Path::to_path_buf))
            }
            DataplaneSpec::VhostNet(_) | DataplaneSpec::Vdpa(_) => {
                return Err(DataplaneError::KernelDatapath(spec.to_string()))
            }
        };
        let cost = match profile {
            Some(path) => Some(SimHardware::new(SimProfile::load(&path)?)),
            None => None,
        };
        Ok(Dataplane { wire, cost })
    }

    /// A name for logs: `loop`, `sim:PROFILE`, `tap:IFNAME` or
    /// `tap:IFNAME+sim:PROFILE`.
    pub fn describe(&self) -> String {
        match (&self.wire, &self.cost) {
            (Wire::Loop, None) => "loop".to_string(),
            (Wire::Loop, Some(hw)) => format!("sim:{}", hw.profile().name),
            (Wire::Tap(tap), None) => format!("tap:{}", tap.name()),
            (Wire::Tap(tap), Some(hw)) => format!("tap:{}+sim:{}", tap.name(), hw.profile().name),
        }
    }

    /// Whether TX frames come back on RX (`loop`, `sim`).
    pub fn reflects(&self) -> bool {
        matches!(self.wire, Wire::Loop)
    }

    /// Offload features the dataplane honours (offered on top of
    /// [`spec::BASE_FEATURES`]).
    pub fn offload_features(&self) -> u64 {
        match self.wire {
            Wire::Tap(_) => spec::VNET_HDR_OFFLOADS,
            // A reflected frame keeps the guest's header: nothing may be
            // offloaded, since nobody would do the work.
            Wire::Loop => 0,
        }
    }

    fn charge(&mut self, op: SimOp, times: u32) -> bool {
        match &mut self.cost {
            Some(hw) => {
                for _ in 0..times {
                    hw.charge(op);
                }
                true
            }
            None => false,
        }
    }

    /// Program the header layout and offloads for the acked `features`: a
    /// tap learns the header length and which offloads the guest accepts.
    /// Returns whether anything was done.
    pub fn set_features(&mut self, features: u64) -> Result<bool, DataplaneError> {
        let wire = match &self.wire {
            Wire::Tap(tap) => {
                tap.set_vnet_hdr_len(spec::header_len(features))?;
                tap.set_offloads(TapOffloads::from_virtio_features(features))?;
                true
            }
            Wire::Loop => false,
        };
        Ok(self.charge(SimOp::SetFeatures, 1) || wire)
    }

    /// Set the MTU; whether anything was done.
    pub fn set_mtu(&mut self, mtu: u16) -> Result<bool, DataplaneError> {
        let wire = match &self.wire {
            Wire::Tap(tap) => {
                tap.set_mtu(mtu)?;
                true
            }
            Wire::Loop => false,
        };
        Ok(self.charge(SimOp::SetMtu, 1) || wire)
    }

    /// The largest MTU the wire takes.
    pub fn max_mtu(&self) -> u16 {
        match self.wire {
            Wire::Tap(_) => crate::tap::MAX_MTU,
            Wire::Loop => u16::MAX,
        }
    }

    /// Create queue pair `pair` (its two virtqueues) on the hardware the
    /// profile models; a tap's queues exist from the agent's start.
    /// Returns whether anything was done.
    pub fn create_queue(&mut self, pair: u16) -> bool {
        let _ = pair;
        self.charge(SimOp::CreateQueue, 2)
    }

    /// Destroy queue pair `pair`; whether anything was done.
    pub fn destroy_queue(&mut self, pair: u16) -> bool {
        let _ = pair;
        self.charge(SimOp::DestroyQueue, 2)
    }

    /// A new RSS configuration is programmed (the agent steers frames
    /// itself; the profile charges what hardware would).
    pub fn program_rss(&mut self) -> bool {
        self.charge(SimOp::ProgramRss, 1)
    }

    /// A region of guest memory is mapped for the device (the profile
    /// charges what mapping and pinning it for DMA costs).
    pub fn map_memory(&mut self) -> bool {
        self.charge(SimOp::MapMemory, 1)
    }

    /// Attach or detach a tap queue as the driver enables or disables the
    /// pair, so the kernel only spreads traffic over pairs in use.
    pub fn set_pair_enabled(&mut self, pair: u16, enabled: bool) -> Result<(), DataplaneError> {
        if let Wire::Tap(tap) = &mut self.wire {
            tap.set_queue_enabled(pair, enabled)?;
        }
        Ok(())
    }

    /// The fd that becomes readable when frames wait on `pair` (tap only;
    /// `loop` hands frames over synchronously).
    pub fn rx_fd(&self, pair: u16) -> Option<RawFd> {
        match &self.wire {
            Wire::Tap(tap) => tap.queue_fd(pair),
            Wire::Loop => None,
        }
    }

    /// Send one frame (virtio-net header included) out of `pair`. False
    /// when the dataplane had no room (the frame is dropped).
    pub fn send(&mut self, pair: u16, frame: &[u8]) -> Result<bool, DataplaneError> {
        match &mut self.wire {
            Wire::Tap(tap) => Ok(tap.send(pair, frame)?),
            Wire::Loop => Ok(false),
        }
    }

    /// Receive one frame (virtio-net header included) for `pair` into
    /// `buf`; `None` when nothing waits.
    pub fn recv(&mut self, pair: u16, buf: &mut [u8]) -> Result<Option<usize>, DataplaneError> {
        match &mut self.wire {
            Wire::Tap(tap) => Ok(tap.recv(pair, buf)?),
            Wire::Loop => Ok(None),
        }
    }

    /// Announce `mac` on the wire after a migration (SEND_RARP): a tap
    /// sends a RARP frame so switches and bridges learn the guest's new
    /// port. Returns whether a frame went out (`loop` has no wire to
    /// announce on).
    pub fn announce(&mut self, mac: MacAddress, hdr_len: usize) -> Result<bool, DataplaneError> {
        match &mut self.wire {
            Wire::Tap(tap) => {
                let mut frame = vec![0u8; hdr_len + 60];
                frame[hdr_len..].copy_from_slice(&spec::rarp_frame(mac));
                Ok(tap.send(0, &frame)?)
            }
            Wire::Loop => Ok(false),
        }
    }

    /// The cost model's accounting, if a profile is in use.
    pub fn sim(&self) -> Option<&SimHardware> {
        self.cost.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses() {
        assert_eq!(
            "loop".parse::<DataplaneSpec>().unwrap(),
            DataplaneSpec::Loop
        );
        assert_eq!(
            "tap:vh0".parse::<DataplaneSpec>().unwrap(),
            DataplaneSpec::Tap("vh0".into())
        );
        assert_eq!(
            "sim:/p.json".parse::<DataplaneSpec>().unwrap(),
            DataplaneSpec::Sim("/p.json".into())
        );
        assert_eq!(
            "vhost-net:vh0".parse::<DataplaneSpec>().unwrap(),
            DataplaneSpec::VhostNet("vh0".into())
        );
        assert_eq!(
            DataplaneSpec::VhostNet("vh0".into()).to_string(),
            "vhost-net:vh0"
        );
        let vdpa = "vdpa:/dev/vhost-vdpa-0".parse::<DataplaneSpec>().unwrap();
        assert_eq!(vdpa, DataplaneSpec::Vdpa("/dev/vhost-vdpa-0".into()));
        assert_eq!(vdpa.to_string(), "vdpa:/dev/vhost-vdpa-0");
        assert!("vdpa:".parse::<DataplaneSpec>().is_err());
        assert!(matches!(
            Dataplane::open(&DataplaneSpec::VhostNet("vh0".into()), 1, 1500, None),
            Err(DataplaneError::KernelDatapath(_))
        ));
        for bad in [
            "",
            "tap",
            "tap:",
            "sim:",
            "vdpa:",
            "loop:x",
            "vhost-net",
            "vhost-net:",
        ] {
            assert!(bad.parse::<DataplaneSpec>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_profile_charges_each_operation_and_loop_alone_does_nothing() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/vdpa-191ms.json");
        let mut plain = Dataplane::open(&DataplaneSpec::Loop, 2, 1500, None).unwrap();
        assert!(!plain.create_queue(0));
        assert!(!plain.set_mtu(9000).unwrap());
        let mut modeled =
            Dataplane::open(&DataplaneSpec::Loop, 2, 1500, Some(Path::new(path))).unwrap();
        assert!(modeled.create_queue(0));
        assert!(modeled.map_memory());
        let charged = modeled.sim().unwrap().charged();
        assert_eq!(
            charged[&SimOp::CreateQueue].0,
            2,
            "a pair is two virtqueues"
        );
        assert_eq!(charged[&SimOp::MapMemory].0, 1);
        assert!(Dataplane::open(
            &DataplaneSpec::Sim(path.into()),
            1,
            1500,
            Some(Path::new(path))
        )
        .is_err());
    }
}
