//! Configurations to test with, and the invariant check both the scenarios
//! and the property tests run.

use crate::model::ModelDevice;
use crate::{
    plan, plan_full, BlkConfig, DeviceConfig, DeviceKind, FileIdentity, FrontendAddr, GuestAddr,
    MemoryRegion, NetConfig, Plan, RingAddresses, RingConfig, RssSpec, ValidConfig, FORMAT_VERSION,
};

/// 1 MiB.
pub const MIB: u64 = 1 << 20;

/// A region of `size` bytes backed by inode `inode`.
pub fn region(inode: u64, guest: u64, size: u64, user: u64) -> MemoryRegion {
    MemoryRegion {
        file: FileIdentity { device: 24, inode },
        file_offset: 0,
        size_bytes: size,
        guest_phys_addr: GuestAddr(guest),
        user_addr: FrontendAddr(user),
    }
}

/// Ring `index` laid out at front-end address `base`.
pub fn ring(index: u16, base: u64) -> RingConfig {
    RingConfig {
        index,
        size: 256,
        addresses: RingAddresses {
            desc_table: FrontendAddr(base),
            avail_ring: FrontendAddr(base + 0x1000),
            used_ring: FrontendAddr(base + 0x2000),
        },
        next_avail: 0,
        enabled: true,
        kick_fd: true,
        call_fd: true,
    }
}

/// Front-end address of guest RAM in the fixtures.
pub const USER_BASE: u64 = 0x7f00_0000_0000;

fn memory() -> Vec<MemoryRegion> {
    vec![
        region(1001, 0, 64 * MIB, USER_BASE),
        region(1002, 4096 * MIB, 64 * MIB, USER_BASE + 1024 * MIB),
    ]
}

/// A running net device with `queue_pairs` pairs, every ring configured in
/// the first region.
pub fn net(queue_pairs: u16) -> DeviceConfig {
    DeviceConfig {
        version: FORMAT_VERSION,
        acked_features: (1 << 32) | (1 << 15) | (1 << 29) | (1 << 30) | 1,
        protocol_features: 0x8_2e3f,
        memory: memory(),
        rings: (0..2 * queue_pairs)
            .map(|index| ring(index, USER_BASE + u64::from(index) * 0x10000))
            .collect(),
        device: DeviceKind::Net(NetConfig {
            mtu: 1500,
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            queue_pairs,
            rss: None,
        }),
    }
}

/// A running blk device with `num_queues` queues.
pub fn blk(num_queues: u16) -> DeviceConfig {
    DeviceConfig {
        version: FORMAT_VERSION,
        acked_features: (1 << 32) | (1 << 29) | (1 << 30) | (1 << 12),
        protocol_features: 0x1e3f,
        memory: memory(),
        rings: (0..num_queues)
            .map(|index| ring(index, USER_BASE + u64::from(index) * 0x10000))
            .collect(),
        device: DeviceKind::Blk(BlkConfig {
            num_queues,
            queue_size: 256,
            readonly: false,
            direct: true,
            writeback: true,
        }),
    }
}

/// RSS over `queue_pairs` pairs with a table of `len` entries, shifted by
/// `rotate`.
pub fn rss(queue_pairs: u16, len: u16, rotate: u16) -> RssSpec {
    RssSpec {
        hash_types: 0x3f,
        key: (0..40).collect(),
        indirection_table: (0..len).map(|i| (i + rotate) % queue_pairs).collect(),
        default_queue: 0,
    }
}

/// `config`, validated (fixtures are valid by construction).
pub fn valid(config: DeviceConfig) -> ValidConfig {
    match ValidConfig::new(config) {
        Ok(valid) => valid,
        Err(e) => panic!("fixture is invalid: {e}"),
    }
}

/// The net part of a configuration, for editing.
pub fn net_part(config: &mut DeviceConfig) -> &mut NetConfig {
    match &mut config.device {
        DeviceKind::Net(net) => net,
        DeviceKind::Blk(_) => panic!("not a net fixture"),
    }
}

/// The blk part of a configuration, for editing.
pub fn blk_part(config: &mut DeviceConfig) -> &mut BlkConfig {
    match &mut config.device {
        DeviceKind::Blk(blk) => blk,
        DeviceKind::Net(_) => panic!("not a blk fixture"),
    }
}

/// Check the presetup invariant for `early` and `final_` and return the
/// switchover plan:
/// * a fresh device given `plan_full(final_)` realises exactly `final_`;
/// * a device that applied `early` (when the agent would have: it is valid
///   and of the right kind; otherwise the device is `previous`, a state it
///   may be in for other reasons) and then `plan(early, final_)` refuses no
///   op and ends in the same state.
pub fn check_invariant(
    early: &DeviceConfig,
    final_: &ValidConfig,
    previous: Option<&ValidConfig>,
) -> Result<Plan, String> {
    let kind = final_.device_type();
    let mut fresh = ModelDevice::new(kind);
    fresh
        .apply_all(&plan_full(final_).ops)
        .map_err(|(at, e)| format!("full plan of the final config refused op {at}: {e}"))?;
    let realised = fresh.config();
    if realised.as_ref() != Some(&final_.normalized()) {
        return Err(format!(
            "full plan realises {realised:?}, not the final config"
        ));
    }

    let mut device = ModelDevice::new(kind);
    let applied_early = ValidConfig::new(early.clone())
        .ok()
        .filter(|e| e.device_type() == kind);
    if let Some(start) = applied_early.as_ref().or(previous) {
        device
            .apply_all(&plan_full(start).ops)
            .map_err(|(at, e)| format!("full plan of the early config refused op {at}: {e}"))?;
    }
    let switchover = plan(early, final_);
    if let Err((at, e)) = device.apply_all(&switchover.ops) {
        return Err(format!(
            "switchover plan refused op {at} ({:?}): {e}",
            switchover.ops.get(at)
        ));
    }
    if device.state() != fresh.state() {
        return Err(format!(
            "switchover ends in\n{:#?}\nbut a fresh device is in\n{:#?}\nplan: {:#?}",
            device.state(),
            fresh.state(),
            switchover.ops
        ));
    }
    Ok(switchover)
}
