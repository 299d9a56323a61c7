//! The engine's state machine against a recording device: the SUSPEND /
//! RESUME paths (which the lab's VDUSE device cannot take: VDUSE has no
//! suspend), the reset fallback, and the IOTLB diff.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use presetup::{FrontendAddr, MemoryRegion};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::engine::{Engine, Phase};
use super::error::VdpaError;
use super::handle::{Caps, Ops};
use crate::net::kernel::uapi::backend;
use crate::vhost_user::memory::MemoryMap;
use crate::vhost_user::vring::RingGuestAddresses;

/// Every request, as a short string; `bases` answers VHOST_GET_VRING_BASE.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<String>>>,
    status: u8,
    bases: [u16; 4],
}

impl Recorder {
    fn push(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Ops for Recorder {
    fn set_status(&mut self, status: u8) -> Result<(), VdpaError> {
        self.status = status;
        self.push(format!("status {status}"));
        Ok(())
    }
    fn status(&mut self) -> Result<u8, VdpaError> {
        Ok(self.status)
    }
    fn set_features(&mut self, features: u64) -> Result<(), VdpaError> {
        self.push(format!("features {features:#x}"));
        Ok(())
    }
    fn set_num(&mut self, ring: u16, size: u16) -> Result<(), VdpaError> {
        self.push(format!("num {ring} {size}"));
        Ok(())
    }
    fn set_addr(&mut self, ring: u16, _: u16, _: &RingGuestAddresses) -> Result<(), VdpaError> {
        self.push(format!("addr {ring}"));
        Ok(())
    }
    fn set_base(&mut self, ring: u16, base: u16) -> Result<(), VdpaError> {
        self.push(format!("base {ring} {base}"));
        Ok(())
    }
    fn get_base(&mut self, ring: u16) -> Result<u16, VdpaError> {
        self.push(format!("get_base {ring}"));
        Ok(self.bases[usize::from(ring)])
    }
    fn set_kick(&mut self, ring: u16, kick: Option<&File>) -> Result<(), VdpaError> {
        self.push(format!("kick {ring} {}", kick.is_some()));
        Ok(())
    }
    fn set_call(&mut self, ring: u16, call: Option<&File>) -> Result<(), VdpaError> {
        self.push(format!("call {ring} {}", call.is_some()));
        Ok(())
    }
    fn set_ready(&mut self, ring: u16, ready: bool) -> Result<(), VdpaError> {
        self.push(format!("ready {ring} {ready}"));
        Ok(())
    }
    fn suspend(&mut self) -> Result<(), VdpaError> {
        self.push("suspend".into());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VdpaError> {
        self.push("resume".into());
        Ok(())
    }
    fn map(&mut self, iova: u64, size: u64, _: u64) -> Result<(), VdpaError> {
        self.push(format!("map {iova:#x} {size:#x}"));
        Ok(())
    }
    fn unmap(&mut self, iova: u64, size: u64) -> Result<(), VdpaError> {
        self.push(format!("unmap {iova:#x} {size:#x}"));
        Ok(())
    }
    fn batch(&mut self, begin: bool) -> Result<(), VdpaError> {
        self.push(if begin { "batch begin" } else { "batch end" }.into());
        Ok(())
    }
}

const SIZE: u16 = 64;
const REGION: u64 = 0x10_0000;

fn caps(backend_features: u64) -> Caps {
    Caps {
        device_features: 1 << 32,
        backend: backend_features,
        num_vqs: 2,
        max_ring: 256,
        config: [0; 12],
    }
}

fn ring(index: u64) -> RingGuestAddresses {
    let base = 0x1000 + index * 0x4000;
    RingGuestAddresses {
        desc_table: GuestAddress(base),
        avail_ring: GuestAddress(base + 0x1000),
        used_ring: GuestAddress(base + 0x2000),
    }
}

/// A two-ring engine on `backend_features` with one 1 MiB region of
/// guest memory mapped; both rings configured and started at base 5.
fn started(backend_features: u64, bases: [u16; 4]) -> (Engine<Recorder>, Recorder, MemoryMap) {
    let mut memory = MemoryMap::default();
    let file = tempfile::tempfile().unwrap();
    file.set_len(REGION).unwrap();
    let meta = file.metadata().unwrap();
    let region = MemoryRegion {
        file: presetup::FileIdentity {
            device: meta.dev(),
            inode: meta.ino(),
        },
        file_offset: 0,
        size_bytes: REGION,
        guest_phys_addr: presetup::GuestAddr(0),
        user_addr: FrontendAddr(0x7f00_0000_0000),
    };
    let mapped = memory.map(&region, file).unwrap();
    memory.publish().unwrap();
    let recorder = Recorder {
        bases,
        ..Recorder::default()
    };
    let mut engine = Engine::new(
        Arc::from("t"),
        recorder.clone(),
        caps(backend_features),
        2,
        1 << 32,
        memory.atomic(),
    );
    engine.set_acked(1 << 32);
    engine.insert_region(mapped);
    for index in 0..2u16 {
        let r = engine.ring_mut(index).unwrap();
        r.size = Some(SIZE);
        r.guest = Some(ring(u64::from(index)));
        r.base = 5;
        r.enabled = true;
        r.kick = Some(tempfile::tempfile().unwrap());
    }
    (engine, recorder, memory)
}

fn calls_of(engine: &Engine<Recorder>) -> Vec<String> {
    engine.ops().take()
}

#[test]
fn drivers_ok_once_the_rings_started_after_features_memory_and_rings() {
    let (mut engine, _, _) = started(backend::IOTLB_BATCH, [0; 4]);
    engine.sync().unwrap();
    let calls = calls_of(&engine);
    let expect_prefix = [
        "batch begin",
        "map 0x0 0x100000",
        "batch end",
        "status 3",
        "features 0x100000000",
        "status 11",
        "num 0 64",
        "addr 0",
        "base 0 5",
        "num 1 64",
        "addr 1",
        "base 1 5",
        "kick 0 true",
        "ready 0 true",
        "kick 1 true",
        "ready 1 true",
        "status 15",
    ];
    assert_eq!(calls, expect_prefix);
    assert!(matches!(
        engine.phase(),
        Phase::DriverOk {
            suspended: false,
            ..
        }
    ));
    // Nothing changed: a second sync does nothing.
    engine.sync().unwrap();
    assert!(calls_of(&engine).is_empty());
}

/// With SUSPEND and RESUME: one suspend for the device, the device's own
/// bases, and a restart that sets only the changed base and resumes.
#[test]
fn suspend_reads_the_devices_bases_and_resume_restarts_with_only_the_delta() {
    let (mut engine, _, _) = started(backend::SUSPEND | backend::RESUME, [9, 7, 0, 0]);
    engine.sync().unwrap();
    calls_of(&engine);
    let (base0, _) = engine.stop(0).unwrap().unwrap();
    let (base1, _) = engine.stop(1).unwrap().unwrap();
    assert_eq!((base0, base1), (9, 7), "the device's answers");
    assert_eq!(
        calls_of(&engine),
        [
            "suspend",
            "get_base 0",
            "kick 0 false",
            "get_base 1",
            "kick 1 false"
        ]
    );
    // Restart: ring 0 at a new base, ring 1 where it stopped.
    for (index, base) in [(0u16, 3u16), (1, 7)] {
        let r = engine.ring_mut(index).unwrap();
        r.base = base;
        r.kick = Some(tempfile::tempfile().unwrap());
    }
    engine.sync().unwrap();
    assert_eq!(
        calls_of(&engine),
        ["base 0 3", "kick 0 true", "kick 1 true", "resume"]
    );
    assert!(!calls_of(&engine).iter().any(|c| c == "status 0"));
}

/// Without SUSPEND: the stop resets the device and answers the used
/// index in guest memory; the restart reprograms it in full.
#[test]
fn without_suspend_the_stop_resets_and_the_bases_are_the_used_indices() {
    let (mut engine, _, memory) = started(0, [0; 4]);
    engine.sync().unwrap();
    calls_of(&engine);
    let ram = memory.atomic();
    for (index, used) in [(0u64, 41u16), (1, 42)] {
        ram.memory()
            .write_obj(used.to_le(), GuestAddress(ring(index).used_ring.0 + 2))
            .unwrap();
    }
    let (base0, _) = engine.stop(0).unwrap().unwrap();
    let (base1, _) = engine.stop(1).unwrap().unwrap();
    assert_eq!((base0, base1), (41, 42));
    assert_eq!(calls_of(&engine), ["status 0"]);
    assert_eq!(engine.phase(), Phase::Reset);
    for index in 0..2u16 {
        engine.ring_mut(index).unwrap().kick = Some(tempfile::tempfile().unwrap());
    }
    engine.sync().unwrap();
    let calls = calls_of(&engine);
    // The IOTLB did not survive the reset (no IOTLB_PERSIST): mapped again.
    assert_eq!(&calls[..2], ["unmap 0x0 0x100000", "map 0x0 0x100000"]);
    assert!(calls.contains(&"base 0 41".to_string()), "{calls:?}");
    assert!(calls.contains(&"base 1 42".to_string()), "{calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("status 15"));
}

/// Virtio 1.2 §2.7: the device never gets a ring outside guest memory; the
/// check comes before any ring ioctl.
#[test]
fn a_ring_outside_guest_memory_is_refused_before_the_device_sees_it() {
    let (mut engine, _, _) = started(0, [0; 4]);
    engine.ring_mut(1).unwrap().guest = Some(RingGuestAddresses {
        desc_table: GuestAddress(0x1000),
        avail_ring: GuestAddress(0x2000),
        used_ring: GuestAddress(REGION - 16),
    });
    let error = engine.sync().unwrap_err();
    assert!(
        matches!(
            error,
            VdpaError::Ring(crate::net::kernel::RingCheckError::Outside { ring: 1, .. })
        ),
        "{error}"
    );
    let calls = calls_of(&engine);
    assert!(!calls.iter().any(|c| c.starts_with("addr 1")), "{calls:?}");
    assert!(!calls.iter().any(|c| c == "status 15"), "{calls:?}");
}
