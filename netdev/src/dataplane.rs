//! Where a net device's frames go: one small enum over the dataplanes.
//!
//! * `loop` reflects every frame the guest sends back to the guest: the
//!   device is both ends of the wire, for tests and benchmarks.
//! * `sim` moves frames like `loop` but charges configuration operations
//!   what a [`SimProfile`] says (a hardware model for downtime experiments).
//! * `tap` is a kernel tap device with a virtio-net header, one tap queue
//!   per queue pair, so the kernel honours the guest's offloads.
//!
//! The device picks the RX queue itself (RSS); the dataplane only carries
//! frames per queue pair.

use std::os::unix::io::RawFd;
use std::path::PathBuf;

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
    /// `sim:PROFILE.json`.
    Sim(PathBuf),
}

impl std::fmt::Display for DataplaneSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataplaneSpec::Loop => write!(f, "loop"),
            DataplaneSpec::Tap(name) => write!(f, "tap:{name}"),
            DataplaneSpec::Sim(path) => write!(f, "sim:{}", path.display()),
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
            _ => Err(format!(
                "unknown dataplane {text:?}: expected loop, tap:IFNAME or sim:PROFILE.json"
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
    /// The sim profile could not be loaded.
    #[error(transparent)]
    Sim(#[from] SimProfileError),
}

/// A device's dataplane.
pub enum Dataplane {
    /// Frames from TX go back to RX.
    Loop,
    /// Like `Loop`, with configuration costs.
    Sim(SimHardware),
    /// A kernel tap device.
    Tap(TapDevice),
}

impl Dataplane {
    /// Set up the dataplane for `queue_pairs` pairs: a tap is created (or
    /// attached to) now, with `mtu`, and brought up, so it exists before a
    /// front-end connects.
    pub fn open(
        spec: &DataplaneSpec,
        queue_pairs: u16,
        mtu: u16,
    ) -> Result<Dataplane, DataplaneError> {
        Ok(match spec {
            DataplaneSpec::Loop => Dataplane::Loop,
            DataplaneSpec::Sim(path) => Dataplane::Sim(SimHardware::new(SimProfile::load(path)?)),
            DataplaneSpec::Tap(name) => {
                let tap = TapDevice::open(name, queue_pairs, spec::HDR_LEN_MRG)?;
                tap.set_mtu(mtu)?;
                tap.set_up(true)?;
                Dataplane::Tap(tap)
            }
        })
    }

    /// A name for logs: `loop`, `sim:PROFILE` or `tap:IFNAME`.
    pub fn describe(&self) -> String {
        match self {
            Dataplane::Loop => "loop".to_string(),
            Dataplane::Sim(hw) => format!("sim:{}", hw.profile().name),
            Dataplane::Tap(tap) => format!("tap:{}", tap.name()),
        }
    }

    /// Whether TX frames come back on RX (loop and sim).
    pub fn reflects(&self) -> bool {
        !matches!(self, Dataplane::Tap(_))
    }

    /// Offload features the dataplane honours (offered on top of
    /// [`spec::BASE_FEATURES`]).
    pub fn offload_features(&self) -> u64 {
        match self {
            Dataplane::Tap(_) => spec::VNET_HDR_OFFLOADS,
            // A reflected frame keeps the guest's header: nothing may be
            // offloaded, since nobody would do the work.
            Dataplane::Loop | Dataplane::Sim(_) => 0,
        }
    }

    /// The front-end acked `features`: a tap learns the header length and
    /// which offloads the guest accepts on receive.
    pub fn set_features(&mut self, features: u64) -> Result<(), DataplaneError> {
        match self {
            Dataplane::Tap(tap) => {
                tap.set_vnet_hdr_len(spec::header_len(features))?;
                tap.set_offloads(TapOffloads::from_virtio_features(features))?;
            }
            Dataplane::Sim(hw) => {
                hw.charge(SimOp::SetFeatures);
            }
            Dataplane::Loop => {}
        }
        Ok(())
    }

    /// Set the MTU (NET_SET_MTU).
    pub fn set_mtu(&mut self, mtu: u16) -> Result<(), DataplaneError> {
        match self {
            Dataplane::Tap(tap) => tap.set_mtu(mtu)?,
            Dataplane::Sim(hw) => {
                hw.charge(SimOp::SetMtu);
            }
            Dataplane::Loop => {}
        }
        Ok(())
    }

    /// A virtqueue starts or stops on the dataplane: the simulated
    /// hardware creates or destroys it (tap queues exist from start-up and
    /// follow [`Self::set_pair_enabled`]).
    pub fn queue_started(&mut self, started: bool) {
        if let Dataplane::Sim(hw) = self {
            hw.charge(if started {
                SimOp::CreateQueue
            } else {
                SimOp::DestroyQueue
            });
        }
    }

    /// Attach or detach a tap queue as the driver enables or disables the
    /// pair, so the kernel only spreads traffic over pairs in use.
    pub fn set_pair_enabled(&mut self, pair: u16, enabled: bool) -> Result<(), DataplaneError> {
        if let Dataplane::Tap(tap) = self {
            tap.set_queue_enabled(pair, enabled)?;
        }
        Ok(())
    }

    /// A new RSS configuration is programmed.
    pub fn program_rss(&mut self) {
        if let Dataplane::Sim(hw) = self {
            hw.charge(SimOp::ProgramRss);
        }
    }

    /// A new memory table is mapped.
    pub fn map_memory(&mut self) {
        if let Dataplane::Sim(hw) = self {
            hw.charge(SimOp::MapMemory);
        }
    }

    /// The fd that becomes readable when frames wait on `pair` (tap only;
    /// reflecting dataplanes hand frames over synchronously).
    pub fn rx_fd(&self, pair: u16) -> Option<RawFd> {
        match self {
            Dataplane::Tap(tap) => tap.queue_fd(pair),
            Dataplane::Loop | Dataplane::Sim(_) => None,
        }
    }

    /// Send one frame (virtio-net header included) out of `pair`. False
    /// when the dataplane had no room (the frame is dropped).
    pub fn send(&mut self, pair: u16, frame: &[u8]) -> Result<bool, DataplaneError> {
        match self {
            Dataplane::Tap(tap) => Ok(tap.send(pair, frame)?),
            Dataplane::Loop | Dataplane::Sim(_) => Ok(false),
        }
    }

    /// Receive one frame (virtio-net header included) for `pair` into
    /// `buf`; `None` when nothing waits.
    pub fn recv(&mut self, pair: u16, buf: &mut [u8]) -> Result<Option<usize>, DataplaneError> {
        match self {
            Dataplane::Tap(tap) => Ok(tap.recv(pair, buf)?),
            Dataplane::Loop | Dataplane::Sim(_) => Ok(None),
        }
    }

    /// Announce `mac` on the wire after a migration (SEND_RARP): a tap
    /// sends a RARP frame so switches and bridges learn the guest's new
    /// port. Returns whether a frame went out (reflecting dataplanes have no
    /// wire to announce on).
    pub fn announce(&mut self, mac: MacAddress, hdr_len: usize) -> Result<bool, DataplaneError> {
        match self {
            Dataplane::Tap(tap) => {
                let mut frame = vec![0u8; hdr_len + 60];
                frame[hdr_len..].copy_from_slice(&spec::rarp_frame(mac));
                Ok(tap.send(0, &frame)?)
            }
            Dataplane::Loop | Dataplane::Sim(_) => Ok(false),
        }
    }

    /// The sim hardware's accounting, if this is `sim`.
    pub fn sim(&self) -> Option<&SimHardware> {
        match self {
            Dataplane::Sim(hw) => Some(hw),
            _ => None,
        }
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
        for bad in ["", "tap", "tap:", "sim:", "vdpa:x", "loop:x"] {
            assert!(bad.parse::<DataplaneSpec>().is_err(), "{bad:?} accepted");
        }
    }
}
