//! A batch of plan steps on the kernel: each step through its method,
//! and the memory table handed to the kernel once per run of region ops.
//!
//! VHOST_SET_MEM_TABLE takes the whole table, so `map_region` and
//! `unmap_region` only change the table the agent keeps; after the last
//! op of a run of them (the plan orders every region op together, before
//! the queues and rings that use the memory) the table goes to the kernel
//! in one ioctl per queue pair, and that op's result carries the ioctls'.
//! Three regions mapped at a start are one ioctl, not three.

use super::error::VhostNetError;
use crate::vhost_user::datapath::{self, Datapath, DatapathError, OpResult, Step};

/// A datapath whose memory table is handed over separately.
pub trait TableHandover {
    /// Give the kernel the table as region ops left it (a no-op if they
    /// changed nothing).
    fn hand_over_table(&mut self) -> Result<(), VhostNetError>;
}

fn is_region_op(step: &Step) -> bool {
    matches!(step, Step::MapRegion { .. } | Step::UnmapRegion { .. })
}

/// Execute `steps` in order on `datapath`, stopping at the first failure;
/// one result per step executed (module documentation).
pub fn execute<D: Datapath + TableHandover>(datapath: &mut D, steps: Vec<Step>) -> Vec<OpResult> {
    let mut results = Vec::with_capacity(steps.len());
    let mut steps = steps.into_iter().peekable();
    while let Some(step) = steps.next() {
        let region_op = is_region_op(&step);
        let mut result = datapath::execute(datapath, step);
        let run_ends = !steps.peek().is_some_and(is_region_op);
        if region_op && run_ends && result.is_ok() {
            if let Err(e) = datapath.hand_over_table() {
                result = Err(DatapathError::failed("memory table", e));
            }
        }
        let failed = result.is_err();
        results.push(result);
        if failed {
            break;
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;

    use presetup::{FrontendAddr, MemoryRegion, RegionKey};

    use super::*;
    use crate::vhost_user::datapath::Outcome;
    use crate::vhost_user::device::RingStart;
    use crate::vhost_user::memory::{MappedRegion, MemoryMap};
    use crate::vhost_user::vring::RingGuestAddresses;

    /// Records op names and hand-overs; the hand-over fails on demand.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<&'static str>,
        refuse_handover: bool,
    }

    impl Recorder {
        fn call(&mut self, name: &'static str) -> OpResult {
            self.calls.push(name);
            Ok(Outcome::Done)
        }
    }

    impl TableHandover for Recorder {
        fn hand_over_table(&mut self) -> Result<(), VhostNetError> {
            self.calls.push("HAND-OVER");
            if self.refuse_handover {
                return Err(VhostNetError::RegionInUse { ring: 0 });
            }
            Ok(())
        }
    }

    impl Datapath for Recorder {
        fn reset(&mut self) -> OpResult {
            self.call("reset")
        }
        fn set_features(&mut self, _: u64) -> OpResult {
            self.call("set_features")
        }
        fn map_region(&mut self, _: &Arc<MappedRegion>) -> OpResult {
            self.call("map_region")
        }
        fn unmap_region(&mut self, _: &RegionKey) -> OpResult {
            self.call("unmap_region")
        }
        fn create_queue(&mut self, _: u16) -> OpResult {
            self.call("create_queue")
        }
        fn reset_ring(&mut self, _: u16) -> OpResult {
            self.call("reset_ring")
        }
        fn set_ring_size(&mut self, _: u16, _: u16) -> OpResult {
            self.call("set_ring_size")
        }
        fn set_ring_addresses(&mut self, _: u16, _: RingGuestAddresses) -> OpResult {
            self.call("set_ring_addresses")
        }
        fn set_ring_base(&mut self, _: u16, _: u16) -> OpResult {
            self.call("set_ring_base")
        }
        fn set_ring_kick(&mut self, _: RingStart) -> OpResult {
            self.call("set_ring_kick")
        }
        fn set_ring_call(&mut self, _: u16, _: Option<Arc<File>>) -> OpResult {
            self.call("set_ring_call")
        }
        fn set_ring_enabled(&mut self, _: u16, _: bool) -> OpResult {
            self.call("set_ring_enabled")
        }
    }

    fn regions(memory: &mut MemoryMap, count: u64) -> Vec<Arc<MappedRegion>> {
        (0..count)
            .map(|i| {
                let file = tempfile::tempfile().unwrap();
                file.set_len(0x10000).unwrap();
                let meta = file.metadata().unwrap();
                let region = MemoryRegion {
                    file: presetup::FileIdentity {
                        device: meta.dev(),
                        inode: meta.ino(),
                    },
                    file_offset: 0,
                    size_bytes: 0x10000,
                    guest_phys_addr: presetup::GuestAddr(i * 0x10000),
                    user_addr: FrontendAddr(0x7f00_0000_0000 + i * 0x10000),
                };
                memory.map(&region, file).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_run_of_region_ops_is_handed_over_once_after_its_last_op() {
        let mut memory = MemoryMap::default();
        let mapped = regions(&mut memory, 3);
        let steps = vec![
            Step::SetFeatures { features: 0 },
            Step::UnmapRegion {
                region: mapped[0].key(),
            },
            Step::MapRegion {
                region: mapped[1].clone(),
            },
            Step::MapRegion {
                region: mapped[2].clone(),
            },
            Step::CreateQueue { pair: 0 },
            Step::SetRingSize { ring: 0, size: 256 },
        ];
        let mut recorder = Recorder::default();
        let results = execute(&mut recorder, steps);
        assert_eq!(results.len(), 6);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(
            recorder.calls,
            [
                "set_features",
                "unmap_region",
                "map_region",
                "map_region",
                "HAND-OVER",
                "create_queue",
                "set_ring_size"
            ]
        );
        // A run at the end of the batch is handed over too.
        let mut recorder = Recorder::default();
        execute(
            &mut recorder,
            vec![Step::MapRegion {
                region: mapped[1].clone(),
            }],
        );
        assert_eq!(recorder.calls, ["map_region", "HAND-OVER"]);
    }

    #[test]
    fn a_refused_hand_over_fails_the_runs_last_op_and_stops_the_batch() {
        let mut memory = MemoryMap::default();
        let mapped = regions(&mut memory, 1);
        let mut recorder = Recorder {
            refuse_handover: true,
            ..Recorder::default()
        };
        let results = execute(
            &mut recorder,
            vec![
                Step::MapRegion {
                    region: mapped[0].clone(),
                },
                Step::CreateQueue { pair: 0 },
            ],
        );
        assert_eq!(results.len(), 1, "the batch stops at the failure");
        assert!(matches!(
            results[0],
            Err(DatapathError::Failed {
                op: "memory table",
                ..
            })
        ));
        assert_eq!(recorder.calls, ["map_region", "HAND-OVER"]);
    }
}
