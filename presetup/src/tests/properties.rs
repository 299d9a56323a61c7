//! Property tests of the presetup invariant (DESIGN.md "Presetup details"):
//! a device given early E and then `plan(E, F)` ends in exactly the state of
//! a fresh device given F, for arbitrary E and F: F derived from E by small
//! changes, F unrelated to E, E malformed, E of another kind. And nothing
//! that arrives as JSON panics.
//!
//! Configurations are built from [`Raw`] values, plain random numbers that
//! [`build`] resolves into a valid configuration (indices taken modulo the
//! counts, addresses placed inside the generated regions), so that small
//! changes to a `Raw` ([`Mutation`]) give related configurations.

use proptest::prelude::*;

use super::fixtures::check_invariant;
use crate::{
    plan, BlkConfig, ConfigOp, DeviceConfig, DeviceKind, FallbackReason, FileIdentity,
    FrontendAddr, GuestAddr, MemoryRegion, NetConfig, OpClass, RingAddresses, RingConfig, RssSpec,
    ValidConfig, FORMAT_VERSION,
};

/// Region granule: small enough that layouts collide often.
const PAGE: u64 = 0x10000;

/// Feature bits drawn from: offload and header bits (heavy when they
/// change) mixed with bits that are only recorded (LOG_ALL, EVENT_IDX, ...).
const FEATURE_BITS: [u32; 16] = [0, 1, 7, 11, 15, 32, 57, 26, 28, 29, 30, 33, 34, 5, 16, 17];

#[derive(Clone, Debug)]
struct RawRegion {
    inode: u8,
    file_page: u8,
    pages: u8,
    gap: u8,
    user_gap: u8,
}

#[derive(Clone, Debug)]
struct RawRing {
    index: u8,
    size_exp: u8,
    parts: [(u8, u32); 3],
    next_avail: u16,
    enabled: bool,
    kick_fd: bool,
    call_fd: bool,
}

#[derive(Clone, Debug)]
struct RawRss {
    hash_types: u8,
    key_len: u8,
    table_exp: u8,
    table: Vec<u8>,
    default_queue: u8,
}

#[derive(Clone, Debug)]
struct Raw {
    net: bool,
    features: u16,
    protocol_features: u64,
    user_base: u8,
    regions: Vec<RawRegion>,
    rings: Vec<RawRing>,
    queues: u8,
    queue_size_exp: u8,
    mtu: u8,
    mac: u8,
    rss: Option<RawRss>,
    readonly: bool,
    direct: bool,
    writeback: bool,
}

fn raw_region() -> impl Strategy<Value = RawRegion> {
    (0..4u8, 0..4u8, 0..4u8, 0..3u8, 0..3u8).prop_map(|(inode, file_page, pages, gap, user_gap)| {
        RawRegion {
            inode,
            file_page,
            pages,
            gap,
            user_gap,
        }
    })
}

fn raw_ring() -> impl Strategy<Value = RawRing> {
    (
        any::<u8>(),
        0..9u8,
        [
            (any::<u8>(), any::<u32>()),
            (any::<u8>(), any::<u32>()),
            (any::<u8>(), any::<u32>()),
        ],
        prop_oneof![Just(0u16), Just(0xffff), any::<u16>()],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(index, size_exp, parts, next_avail, enabled, kick_fd, call_fd)| RawRing {
                index,
                size_exp,
                parts,
                next_avail,
                enabled,
                kick_fd,
                call_fd,
            },
        )
}

fn raw_rss() -> impl Strategy<Value = RawRss> {
    (
        0..4u8,
        any::<u8>(),
        0..5u8,
        prop::collection::vec(any::<u8>(), 0..16),
        any::<u8>(),
    )
        .prop_map(
            |(hash_types, key_len, table_exp, table, default_queue)| RawRss {
                hash_types,
                key_len,
                table_exp,
                table,
                default_queue,
            },
        )
}

fn raw() -> impl Strategy<Value = Raw> {
    (
        (
            any::<bool>(),
            any::<u16>(),
            prop_oneof![Just(0u64), Just(0x8_2e3f), any::<u64>()],
            0..3u8,
            prop::collection::vec(raw_region(), 0..5),
            prop::collection::vec(raw_ring(), 0..10),
        ),
        (
            0..4u8,
            0..9u8,
            0..3u8,
            0..3u8,
            prop::option::of(raw_rss()),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (net, features, protocol_features, user_base, regions, rings),
                (queues, queue_size_exp, mtu, mac, rss, readonly, direct, writeback),
            )| Raw {
                net,
                features,
                protocol_features,
                user_base,
                regions,
                rings,
                queues,
                queue_size_exp,
                mtu,
                mac,
                rss,
                readonly,
                direct,
                writeback,
            },
        )
}

/// Resolve random numbers into a valid configuration.
fn build(raw: &Raw) -> DeviceConfig {
    let mut memory = Vec::new();
    let mut guest = 0u64;
    let mut user =
        [0x7f00_0000_0000u64, 0x7e00_0000_0000, 0x5555_0000_0000][usize::from(raw.user_base % 3)];
    for region in &raw.regions {
        let size = (u64::from(region.pages % 4) + 1) * PAGE;
        let guest_phys_addr = guest + u64::from(region.gap % 3) * PAGE;
        let user_addr = user + u64::from(region.user_gap % 3) * PAGE;
        memory.push(MemoryRegion {
            file: FileIdentity {
                device: 24,
                inode: u64::from(region.inode % 4),
            },
            file_offset: u64::from(region.file_page % 4) * PAGE,
            size_bytes: size,
            guest_phys_addr: GuestAddr(guest_phys_addr),
            user_addr: FrontendAddr(user_addr),
        });
        guest = guest_phys_addr + size;
        user = user_addr + size;
    }
    let queues = u16::from(raw.queues % 4) + 1;
    let device = if raw.net {
        DeviceKind::Net(NetConfig {
            mtu: [68, 1500, 9000][usize::from(raw.mtu % 3)],
            mac: [0x52, 0x54, 0, 0x12, 0x34, raw.mac % 3],
            queue_pairs: queues,
            rss: raw.rss.as_ref().map(|rss| {
                let len = 1usize << (rss.table_exp % 5);
                let key_len = usize::from(rss.key_len % 40) + 1;
                RssSpec {
                    hash_types: [0x3f, 0x1ff, 0x1, 0x12][usize::from(rss.hash_types % 4)],
                    key: (0..key_len).map(|i| (i as u8) ^ rss.key_len).collect(),
                    indirection_table: (0..len)
                        .map(|i| u16::from(rss.table.get(i).copied().unwrap_or(0)) % queues)
                        .collect(),
                    default_queue: u16::from(rss.default_queue) % queues,
                }
            }),
        })
    } else {
        DeviceKind::Blk(BlkConfig {
            // 0 included: storage open, no queue set up yet (a baseline).
            num_queues: u16::from(raw.queues % 5),
            queue_size: 1 << (raw.queue_size_exp % 9),
            readonly: raw.readonly,
            direct: raw.direct,
            writeback: raw.writeback,
        })
    };
    let ring_count = device.ring_count();
    let max_size_exp = match &device {
        DeviceKind::Net(_) => 8,
        DeviceKind::Blk(blk) => blk.queue_size.trailing_zeros(),
    };
    let mut rings: Vec<RingConfig> = Vec::new();
    for ring in &raw.rings {
        if memory.is_empty() || ring_count == 0 {
            break;
        }
        // ring_count <= 8 here.
        let index = (u32::from(ring.index) % ring_count) as u16;
        if rings.iter().any(|r| r.index == index) {
            continue;
        }
        let place = |(region, offset): (u8, u32)| {
            let region: &MemoryRegion = &memory[usize::from(region) % memory.len()];
            FrontendAddr(region.user_addr.0 + u64::from(offset) % region.size_bytes)
        };
        rings.push(RingConfig {
            index,
            size: 1 << (u32::from(ring.size_exp) % (max_size_exp + 1)),
            addresses: RingAddresses {
                desc_table: place(ring.parts[0]),
                avail_ring: place(ring.parts[1]),
                used_ring: place(ring.parts[2]),
            },
            next_avail: ring.next_avail,
            enabled: ring.enabled,
            kick_fd: ring.kick_fd,
            call_fd: ring.call_fd,
        });
    }
    let features = FEATURE_BITS
        .iter()
        .enumerate()
        .filter(|(i, _)| raw.features & (1 << i) != 0)
        .fold(0u64, |acc, (_, bit)| acc | 1 << bit);
    DeviceConfig {
        version: FORMAT_VERSION,
        acked_features: features,
        protocol_features: raw.protocol_features,
        memory,
        rings,
        device,
    }
}

/// One small change to a configuration, in `Raw` terms.
#[derive(Clone, Debug)]
enum Mutation {
    Features(u16),
    ProtocolFeatures(u64),
    UserBase(u8),
    Region(u8, RawRegion),
    AddRegion(RawRegion),
    RemoveRegion(u8),
    Ring(u8, RawRing),
    RingBase(u8, u16),
    RingFlags(u8, bool, bool, bool),
    AddRing(RawRing),
    RemoveRing(u8),
    Queues(u8),
    QueueSize(u8),
    Mtu(u8),
    Mac(u8),
    Rss(Option<RawRss>),
    StorageOptions(bool, bool, bool),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<u16>().prop_map(Mutation::Features),
        any::<u64>().prop_map(Mutation::ProtocolFeatures),
        (0..3u8).prop_map(Mutation::UserBase),
        (any::<u8>(), raw_region()).prop_map(|(i, r)| Mutation::Region(i, r)),
        raw_region().prop_map(Mutation::AddRegion),
        any::<u8>().prop_map(Mutation::RemoveRegion),
        (any::<u8>(), raw_ring()).prop_map(|(i, r)| Mutation::Ring(i, r)),
        (any::<u8>(), any::<u16>()).prop_map(|(i, b)| Mutation::RingBase(i, b)),
        (any::<u8>(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(i, e, k, c)| Mutation::RingFlags(i, e, k, c)),
        raw_ring().prop_map(Mutation::AddRing),
        any::<u8>().prop_map(Mutation::RemoveRing),
        (0..4u8).prop_map(Mutation::Queues),
        (0..9u8).prop_map(Mutation::QueueSize),
        (0..3u8).prop_map(Mutation::Mtu),
        (0..3u8).prop_map(Mutation::Mac),
        prop::option::of(raw_rss()).prop_map(Mutation::Rss),
        (any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(r, d, w)| Mutation::StorageOptions(r, d, w)),
    ]
}

fn pick<T>(items: &mut [T], at: u8) -> Option<&mut T> {
    let len = items.len();
    (len > 0).then(|| &mut items[usize::from(at) % len])
}

fn mutate(raw: &Raw, mutations: &[Mutation]) -> Raw {
    let mut raw = raw.clone();
    for mutation in mutations {
        match mutation.clone() {
            Mutation::Features(bits) => raw.features = bits,
            Mutation::ProtocolFeatures(bits) => raw.protocol_features = bits,
            Mutation::UserBase(base) => raw.user_base = base,
            Mutation::Region(at, region) => {
                if let Some(slot) = pick(&mut raw.regions, at) {
                    *slot = region;
                }
            }
            Mutation::AddRegion(region) => raw.regions.push(region),
            Mutation::RemoveRegion(at) => {
                if !raw.regions.is_empty() {
                    let len = raw.regions.len();
                    raw.regions.remove(usize::from(at) % len);
                }
            }
            Mutation::Ring(at, ring) => {
                if let Some(slot) = pick(&mut raw.rings, at) {
                    *slot = ring;
                }
            }
            Mutation::RingBase(at, base) => {
                if let Some(slot) = pick(&mut raw.rings, at) {
                    slot.next_avail = base;
                }
            }
            Mutation::RingFlags(at, enabled, kick_fd, call_fd) => {
                if let Some(slot) = pick(&mut raw.rings, at) {
                    slot.enabled = enabled;
                    slot.kick_fd = kick_fd;
                    slot.call_fd = call_fd;
                }
            }
            Mutation::AddRing(ring) => raw.rings.push(ring),
            Mutation::RemoveRing(at) => {
                if !raw.rings.is_empty() {
                    let len = raw.rings.len();
                    raw.rings.remove(usize::from(at) % len);
                }
            }
            Mutation::Queues(queues) => raw.queues = queues,
            Mutation::QueueSize(exp) => raw.queue_size_exp = exp,
            Mutation::Mtu(mtu) => raw.mtu = mtu,
            Mutation::Mac(mac) => raw.mac = mac,
            Mutation::Rss(rss) => raw.rss = rss,
            Mutation::StorageOptions(readonly, direct, writeback) => {
                raw.readonly = readonly;
                raw.direct = direct;
                raw.writeback = writeback;
            }
        }
    }
    raw
}

/// Ways to break a valid configuration; some do not apply to every
/// configuration (no rings to break), which leaves it valid.
#[derive(Clone, Debug)]
enum Corruption {
    Version(u32),
    RingIndex(u16),
    DuplicateRing,
    RingSize(u16),
    RingAddress(u64),
    OverlappingRegion,
    FrontendAlias,
    EmptyRegion,
    WrappingRegion,
    Mtu(u16),
    QueueCount(u16),
    RssTable(Vec<u16>),
    RssEntry(prop::sample::Index, u16),
    RssDefault(u16),
    RssKey(usize),
    BlkQueueSize(u16),
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (2..u32::MAX).prop_map(Corruption::Version),
        (8..u16::MAX).prop_map(Corruption::RingIndex),
        Just(Corruption::DuplicateRing),
        prop_oneof![Just(0u16), Just(3), Just(384), Just(u16::MAX)].prop_map(Corruption::RingSize),
        any::<u64>().prop_map(Corruption::RingAddress),
        Just(Corruption::OverlappingRegion),
        Just(Corruption::FrontendAlias),
        Just(Corruption::EmptyRegion),
        Just(Corruption::WrappingRegion),
        (0..68u16).prop_map(Corruption::Mtu),
        prop_oneof![Just(0u16), 128..u16::MAX].prop_map(Corruption::QueueCount),
        prop::collection::vec(any::<u16>(), 0..200).prop_map(Corruption::RssTable),
        (any::<prop::sample::Index>(), 4..u16::MAX).prop_map(|(i, q)| Corruption::RssEntry(i, q)),
        (4..u16::MAX).prop_map(Corruption::RssDefault),
        prop_oneof![Just(0usize), 41..300usize].prop_map(Corruption::RssKey),
        prop_oneof![Just(0u16), Just(3), Just(1000)].prop_map(Corruption::BlkQueueSize),
    ]
}

fn corrupt(mut config: DeviceConfig, corruption: &Corruption) -> DeviceConfig {
    let region = config.memory.first().copied();
    match corruption.clone() {
        Corruption::Version(version) => config.version = version,
        Corruption::RingIndex(index) => {
            if let Some(ring) = config.rings.first_mut() {
                ring.index = index;
            }
        }
        Corruption::DuplicateRing => {
            if let Some(ring) = config.rings.first().copied() {
                config.rings.push(ring);
            }
        }
        Corruption::RingSize(size) => {
            if let Some(ring) = config.rings.first_mut() {
                ring.size = size;
            }
        }
        Corruption::RingAddress(addr) => {
            if let Some(ring) = config.rings.first_mut() {
                ring.addresses.used_ring = FrontendAddr(addr);
            }
        }
        Corruption::OverlappingRegion => {
            if let Some(mut region) = region {
                region.user_addr = FrontendAddr(1 << 40);
                region.guest_phys_addr.0 =
                    region.guest_phys_addr.0.wrapping_add(region.size_bytes / 2);
                config.memory.push(region);
            }
        }
        Corruption::FrontendAlias => {
            // Other guest memory at the same front-end addresses: ring
            // translation becomes ambiguous.
            if let Some(mut region) = region {
                region.guest_phys_addr = GuestAddr(1 << 50);
                config.memory.push(region);
            }
        }
        Corruption::EmptyRegion => {
            if let Some(region) = config.memory.first_mut() {
                region.size_bytes = 0;
            }
        }
        Corruption::WrappingRegion => {
            if let Some(region) = config.memory.first_mut() {
                region.guest_phys_addr = GuestAddr(u64::MAX - 1);
            }
        }
        Corruption::Mtu(mtu) => {
            if let DeviceKind::Net(net) = &mut config.device {
                net.mtu = mtu;
            }
        }
        Corruption::QueueCount(count) => match &mut config.device {
            DeviceKind::Net(net) => net.queue_pairs = count,
            DeviceKind::Blk(blk) => blk.num_queues = count.saturating_mul(3),
        },
        Corruption::RssTable(table) => {
            if let DeviceKind::Net(NetConfig { rss: Some(rss), .. }) = &mut config.device {
                rss.indirection_table = table;
            }
        }
        Corruption::RssEntry(at, queue) => {
            if let DeviceKind::Net(NetConfig { rss: Some(rss), .. }) = &mut config.device {
                let position = at.index(rss.indirection_table.len());
                rss.indirection_table[position] = queue;
            }
        }
        Corruption::RssDefault(queue) => {
            if let DeviceKind::Net(NetConfig { rss: Some(rss), .. }) = &mut config.device {
                rss.default_queue = queue;
            }
        }
        Corruption::RssKey(len) => {
            if let DeviceKind::Net(NetConfig { rss: Some(rss), .. }) = &mut config.device {
                rss.key = vec![0x5a; len];
            }
        }
        Corruption::BlkQueueSize(size) => {
            if let DeviceKind::Blk(blk) = &mut config.device {
                blk.queue_size = size;
            }
        }
    }
    config
}

fn valid_or_fail(config: DeviceConfig) -> Result<ValidConfig, TestCaseError> {
    ValidConfig::new(config.clone())
        .map_err(|e| TestCaseError::fail(format!("generated config invalid: {e}\n{config:#?}")))
}

fn invariant(
    early: &DeviceConfig,
    final_: &ValidConfig,
    previous: Option<&ValidConfig>,
) -> Result<crate::Plan, TestCaseError> {
    check_invariant(early, final_, previous).map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn generated_configs_are_valid_and_survive_json(raw in raw()) {
        let config = build(&raw);
        prop_assert_eq!(config.validate(), Ok(()));
        prop_assert_eq!(DeviceConfig::from_json(&config.to_json()).ok(), Some(config));
    }

    #[test]
    fn invariant_for_small_changes(
        raw in raw(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let early = build(&raw);
        let final_ = valid_or_fail(build(&mutate(&raw, &mutations)))?;
        let plan = invariant(&early, &final_, None)?;
        prop_assert!(plan.fallback.is_none());
    }

    #[test]
    fn invariant_for_unrelated_configs(early in raw(), final_ in raw(), previous in raw()) {
        let early = build(&early);
        let final_ = valid_or_fail(build(&final_))?;
        let previous = valid_or_fail(build(&previous))?;
        let previous = (previous.device_type() == final_.device_type()).then_some(&previous);
        let plan = invariant(&early, &final_, previous)?;
        prop_assert_eq!(plan.fallback.is_some(), early.device_type() != final_.device_type());
    }

    #[test]
    fn invariant_for_malformed_early_configs(
        raw in raw(),
        corruptions in prop::collection::vec(corruption(), 1..3),
        mutations in prop::collection::vec(mutation(), 0..3),
    ) {
        // The device holds the configuration before it was corrupted (or
        // nothing); the plan must not trust the corrupted one.
        let applied = valid_or_fail(build(&raw))?;
        let early = corruptions
            .iter()
            .fold(applied.clone().into_inner(), corrupt);
        let final_ = valid_or_fail(build(&mutate(&raw, &mutations)))?;
        let plan = invariant(&early, &final_, Some(&applied))?;
        match early.validate() {
            Ok(()) => prop_assert!(plan.fallback.is_none()),
            Err(e) => {
                prop_assert_eq!(plan.fallback, Some(FallbackReason::Malformed(e)));
                prop_assert_eq!(plan.ops.first(), Some(&ConfigOp::Reset));
            }
        }
    }

    #[test]
    fn plan_delta_is_the_plans_ops(
        raw in raw(),
        mutations in prop::collection::vec(mutation(), 0..4),
    ) {
        let early = build(&raw);
        let final_ = valid_or_fail(build(&mutate(&raw, &mutations)))?;
        prop_assert_eq!(crate::plan_delta(&early, &final_), plan(&early, &final_).ops);
    }

    #[test]
    fn same_config_again_is_all_light(raw in raw()) {
        let config = build(&raw);
        let plan = invariant(&config, &valid_or_fail(config.clone())?, None)?;
        prop_assert_eq!(plan.applied.heavy, 0);
        let only_fds = plan
            .ops
            .iter()
            .all(|op| matches!(op, ConfigOp::SetRingKick { .. } | ConfigOp::SetRingCall { .. }));
        prop_assert!(only_fds, "{:?}", plan.ops);
    }

    #[test]
    fn ring_state_changes_are_all_light(
        raw in raw(),
        changes in prop::collection::vec(
            prop_oneof![
                (any::<u8>(), any::<u16>()).prop_map(|(i, b)| Mutation::RingBase(i, b)),
                (any::<u8>(), any::<bool>(), any::<bool>(), any::<bool>())
                    .prop_map(|(i, e, k, c)| Mutation::RingFlags(i, e, k, c)),
            ],
            1..6,
        ),
    ) {
        let early = build(&raw);
        let final_ = valid_or_fail(build(&mutate(&raw, &changes)))?;
        let plan = invariant(&early, &final_, None)?;
        prop_assert_eq!(plan.applied.heavy, 0);
    }

    #[test]
    fn skipped_and_applied_account_for_the_full_plan(
        raw in raw(),
        mutations in prop::collection::vec(mutation(), 0..4),
    ) {
        let early = build(&raw);
        let final_ = valid_or_fail(build(&mutate(&raw, &mutations)))?;
        let switchover = plan(&early, &final_);
        let full = crate::plan_full(&final_);
        for class in [OpClass::Heavy, OpClass::Light] {
            // Every op of the full plan is either applied again or skipped.
            prop_assert!(switchover.skipped.get(class) <= full.applied.get(class));
            prop_assert!(
                switchover.skipped.get(class) + switchover.applied.get(class)
                    >= full.applied.get(class)
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = DeviceConfig::from_json(&text).map(|config| config.validate());
        let _ = ValidConfig::from_json(&text);
    }

    #[test]
    fn damaged_json_never_panics_and_what_loads_is_checked(
        raw in raw(),
        corruptions in prop::collection::vec(corruption(), 0..2),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        final_raw in raw(),
    ) {
        let config = corruptions.iter().fold(build(&raw), corrupt);
        let mut bytes = config.to_json().into_bytes();
        for (at, byte) in edits {
            let position = at.index(bytes.len());
            bytes[position] = byte;
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(loaded) = DeviceConfig::from_json(&text) {
            // Whatever parses is still only used through validation and the
            // planner, which must cope with it.
            let final_ = valid_or_fail(build(&final_raw))?;
            invariant(&loaded, &final_, None)?;
            prop_assert_eq!(
                ValidConfig::from_json(&text).is_ok(),
                loaded.validate().is_ok()
            );
        }
    }

    #[test]
    fn json_of_the_right_shape_with_wild_numbers_never_panics(
        numbers in prop::collection::vec(any::<u64>(), 12),
        table in prop::collection::vec(any::<u16>(), 0..300),
        rings in 0..4usize,
    ) {
        let ring = format!(
            r#"{{"index":{},"size":{},"addresses":{{"desc_table":{},"avail_ring":{},"used_ring":{}}},"next_avail":0,"enabled":true,"kick_fd":true,"call_fd":false}}"#,
            numbers[0] % 70000, numbers[1] % 70000, numbers[2], numbers[3], numbers[4]
        );
        let text = format!(
            r#"{{"version":1,"acked_features":{},"protocol_features":0,"memory":[{{"file":{{"device":1,"inode":2}},"file_offset":{},"size_bytes":{},"guest_phys_addr":{},"user_addr":{}}}],"rings":[{}],"device":{{"net":{{"mtu":{},"mac":[1,2,3,4,5,6],"queue_pairs":{},"rss":{{"hash_types":{},"key":[1],"indirection_table":{:?},"default_queue":0}}}}}}}}"#,
            numbers[5], numbers[6], numbers[7], numbers[8], numbers[9],
            vec![ring; rings].join(","),
            numbers[10] % 70000, numbers[11] % 300, numbers[0] % 1024, table
        );
        if let Ok(loaded) = DeviceConfig::from_json(&text) {
            let _ = loaded.validate();
            let _ = plan(&loaded, &valid_or_fail(build_sample_net())?);
        }
    }
}

fn build_sample_net() -> DeviceConfig {
    super::fixtures::net(2)
}
