//! The switchover scenarios issue 5 names, each checked against the model
//! device as well as for its exact ops.

use super::fixtures::*;
use crate::{
    plan, plan_full, ConfigError, ConfigOp, DeviceConfig, DeviceType, FallbackReason, FileIdentity,
    FrontendAddr, GuestAddr, OpClass, Plan,
};

fn switchover(early: &DeviceConfig, final_: &DeviceConfig) -> Plan {
    match check_invariant(early, &valid(final_.clone()), None) {
        Ok(plan) => plan,
        Err(e) => panic!("{e}"),
    }
}

fn heavy(plan: &Plan) -> Vec<ConfigOp> {
    plan.ops_of(OpClass::Heavy).cloned().collect()
}

fn light_names(plan: &Plan) -> Vec<&'static str> {
    let mut names: Vec<_> = plan.ops_of(OpClass::Light).map(ConfigOp::name).collect();
    names.sort_unstable();
    names.dedup();
    names
}

#[test]
fn identical_final_config_applies_only_kick_and_call() {
    for config in [net(4), blk(2)] {
        let plan = switchover(&config, &config);
        assert_eq!(plan.applied.heavy, 0, "{:?}", plan.ops);
        assert_eq!(light_names(&plan), ["set_ring_call", "set_ring_kick"]);
        assert_eq!(plan.applied.light, 2 * config.rings.len());
        let full = plan_full(&valid(config.clone()));
        assert_eq!(plan.skipped.heavy, full.applied.heavy);
        assert!(plan.fallback.is_none());
    }
}

#[test]
fn realistic_switchover_moves_ring_bases_and_takes_fds() {
    // During in-band presetup the rings have no fds and the base is the one
    // the early vmstate carried; at switchover the guest has moved on.
    let mut early = net(2);
    for ring in &mut early.rings {
        ring.kick_fd = false;
        ring.call_fd = false;
        ring.next_avail = 100;
    }
    let mut final_ = net(2);
    for ring in &mut final_.rings {
        ring.next_avail = 4242;
    }
    let plan = switchover(&early, &final_);
    assert_eq!(plan.applied.heavy, 0);
    assert_eq!(
        light_names(&plan),
        ["set_ring_base", "set_ring_call", "set_ring_kick"]
    );
    assert_eq!(plan.applied.light, 3 * 4);
}

#[test]
fn changed_mtu_is_exactly_one_set_mtu() {
    let early = net(2);
    let mut final_ = net(2);
    net_part(&mut final_).mtu = 9000;
    let plan = switchover(&early, &final_);
    assert_eq!(heavy(&plan), [ConfigOp::SetMtu { mtu: 9000 }]);
}

#[test]
fn more_queue_pairs_are_exactly_their_create_ops() {
    let plan = switchover(&net(2), &net(4));
    assert_eq!(
        heavy(&plan),
        [
            ConfigOp::CreateQueue { pair: 2 },
            ConfigOp::CreateQueue { pair: 3 }
        ]
    );
    // The new pairs' rings are configured in full, light.
    assert_eq!(
        plan.ops_of(OpClass::Light)
            .filter(|op| op.name() == "set_ring_size")
            .count(),
        4
    );
}

#[test]
fn fewer_queue_pairs_are_exactly_their_destroy_ops() {
    let plan = switchover(&net(4), &net(2));
    assert_eq!(
        heavy(&plan),
        [
            ConfigOp::DestroyQueue { pair: 2 },
            ConfigOp::DestroyQueue { pair: 3 }
        ]
    );
    let resets: Vec<_> = plan
        .ops
        .iter()
        .filter_map(|op| match op {
            ConfigOp::ResetRing { ring } => Some(*ring),
            _ => None,
        })
        .collect();
    assert_eq!(resets, [4, 5, 6, 7]);
}

#[test]
fn changed_rss_table_is_one_program_rss() {
    let mut early = net(4);
    net_part(&mut early).rss = Some(rss(4, 128, 0));
    let mut final_ = net(4);
    let table = rss(4, 128, 1);
    net_part(&mut final_).rss = Some(table.clone());
    let plan = switchover(&early, &final_);
    assert_eq!(heavy(&plan), [ConfigOp::ProgramRss { rss: Some(table) }]);
}

#[test]
fn fewer_queues_with_a_new_rss_table_reprogram_before_destroying() {
    let mut early = net(4);
    net_part(&mut early).rss = Some(rss(4, 64, 0));
    let mut final_ = net(2);
    net_part(&mut final_).rss = Some(rss(2, 64, 0));
    // The model refuses DestroyQueue while RSS names the pair, so the
    // invariant check alone proves the order.
    let plan = switchover(&early, &final_);
    assert_eq!(plan.applied.heavy, 3);
}

#[test]
fn replaced_region_is_exactly_unmap_and_map() {
    let early = net(1);
    let mut final_ = net(1);
    // Hot-replugged DIMM: same guest range, another file.
    final_.memory[1].file = FileIdentity {
        device: 24,
        inode: 2002,
    };
    let plan = switchover(&early, &final_);
    assert_eq!(
        heavy(&plan),
        [
            ConfigOp::UnmapRegion {
                region: early.memory[1].key()
            },
            ConfigOp::MapRegion {
                region: final_.memory[1]
            }
        ]
    );
    // The rings live in the untouched first region.
    assert_eq!(light_names(&plan), ["set_ring_call", "set_ring_kick"]);
}

#[test]
fn region_moved_in_guest_space_is_remapped_and_rings_retranslated() {
    let early = net(1);
    let mut final_ = net(1);
    final_.memory[0].guest_phys_addr = GuestAddr(128 * MIB);
    let plan = switchover(&early, &final_);
    assert_eq!(
        heavy(&plan),
        [
            ConfigOp::UnmapRegion {
                region: early.memory[0].key()
            },
            ConfigOp::MapRegion {
                region: final_.memory[0]
            }
        ]
    );
    // Same front-end ring addresses, new guest addresses: light re-translation.
    assert_eq!(
        light_names(&plan),
        ["set_ring_addresses", "set_ring_call", "set_ring_kick"]
    );
    assert_eq!(
        plan.ops_of(OpClass::Light)
            .filter(|op| op.name() == "set_ring_addresses")
            .count(),
        2
    );
}

#[test]
fn memory_at_new_front_end_addresses_is_kept_and_only_retranslated() {
    // A destination QEMU maps the same memory file at other addresses.
    let early = net(1);
    let mut final_ = net(1);
    let shift = 0x100_0000_0000;
    for region in &mut final_.memory {
        region.user_addr = FrontendAddr(region.user_addr.0 - shift);
    }
    for ring in &mut final_.rings {
        for addr in [
            &mut ring.addresses.desc_table,
            &mut ring.addresses.avail_ring,
            &mut ring.addresses.used_ring,
        ] {
            addr.0 -= shift;
        }
    }
    let plan = switchover(&early, &final_);
    assert_eq!(plan.applied.heavy, 0, "{:?}", plan.ops);
    assert_eq!(
        light_names(&plan),
        [
            "set_region_user_addr",
            "set_ring_addresses",
            "set_ring_call",
            "set_ring_kick"
        ]
    );
}

#[test]
fn blk_memory_change_remaps_only_the_changed_region() {
    let early = blk(2);
    let mut final_ = blk(2);
    final_.memory[1].file_offset = 64 * MIB;
    let plan = switchover(&early, &final_);
    assert_eq!(
        heavy(&plan),
        [
            ConfigOp::UnmapRegion {
                region: early.memory[1].key()
            },
            ConfigOp::MapRegion {
                region: final_.memory[1]
            },
        ]
    );
}

#[test]
fn blk_new_queue_gets_an_io_ring() {
    let plan = switchover(&blk(1), &blk(2));
    assert_eq!(
        heavy(&plan),
        [ConfigOp::CreateIoRing {
            queue: 1,
            depth: 256
        },]
    );
}

#[test]
fn blk_storage_options_change_rebuilds_the_io_rings() {
    let early = blk(2);
    let mut final_ = blk(2);
    blk_part(&mut final_).direct = false;
    let plan = switchover(&early, &final_);
    let names: Vec<_> = plan.ops_of(OpClass::Heavy).map(ConfigOp::name).collect();
    assert_eq!(
        names,
        [
            "destroy_io_ring",
            "destroy_io_ring",
            "open_storage",
            "create_io_ring",
            "create_io_ring"
        ]
    );
}

#[test]
fn blk_cache_mode_is_light() {
    let early = blk(1);
    let mut final_ = blk(1);
    blk_part(&mut final_).writeback = false;
    let plan = switchover(&early, &final_);
    assert_eq!(plan.applied.heavy, 0);
    assert!(plan
        .ops
        .contains(&crate::ConfigOp::SetWriteback { writeback: false }));
}

#[test]
fn log_all_from_the_source_is_light_but_an_offload_is_heavy() {
    let mut early = net(1);
    early.acked_features |= 1 << 26;
    let final_ = net(1);
    let plan = switchover(&early, &final_);
    assert_eq!(plan.applied.heavy, 0);
    assert!(plan.ops.contains(&ConfigOp::SetFeatures {
        features: final_.acked_features
    }));

    let mut offload = net(1);
    offload.acked_features |= 1 << 11; // HOST_TSO4
    let plan = switchover(&early, &offload);
    assert_eq!(
        heavy(&plan),
        [ConfigOp::ConfigureOffloads {
            features: offload.acked_features & crate::NET_DATAPLANE_FEATURES
        }]
    );
}

#[test]
fn garbage_early_config_falls_back_with_its_reason() {
    let mut early = net(2);
    early.rings[0].index = 200;
    let final_ = net(2);
    // The device may hold anything; the fallback resets it first.
    let previous = valid(net(4));
    let plan = check_invariant(&early, &valid(final_.clone()), Some(&previous)).unwrap();
    assert_eq!(
        plan.fallback,
        Some(FallbackReason::Malformed(ConfigError::RingIndex {
            ring: 200,
            rings: 4
        }))
    );
    assert_eq!(
        plan.fallback.as_ref().map(FallbackReason::label),
        Some("malformed")
    );
    assert_eq!(plan.ops.first(), Some(&ConfigOp::Reset));
    assert_eq!(plan.ops[1..], plan_full(&valid(final_)).ops[..]);
    assert_eq!(plan.skipped.heavy + plan.skipped.light, 0);
}

#[test]
fn early_config_of_another_kind_falls_back() {
    let early = blk(1);
    let final_ = valid(net(1));
    let plan = plan(&early, &final_);
    assert_eq!(
        plan.fallback,
        Some(FallbackReason::DeviceKindMismatch {
            early: DeviceType::Blk,
            device: DeviceType::Net
        })
    );
    check_invariant(&early, &final_, Some(&valid(net(3)))).unwrap();
}

#[test]
fn unsupported_version_falls_back() {
    let mut early = net(1);
    early.version = 7;
    let plan = plan(&early, &valid(net(1)));
    assert_eq!(
        plan.fallback,
        Some(FallbackReason::Malformed(ConfigError::Version { found: 7 }))
    );
}
