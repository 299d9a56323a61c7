use super::classify::frames::{l4, Builder};
use super::*;
use rand::{Rng, SeedableRng};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Microsoft, "Verifying the RSS Hash Calculation": (source, source
/// port, destination, destination port, IPv4 only, IPv4 with TCP).
const MS_IPV4: [(&str, u16, &str, u16, u32, u32); 5] = [
    (
        "66.9.149.187",
        2794,
        "161.142.100.80",
        1766,
        0x323e8fc2,
        0x51ccc178,
    ),
    (
        "199.92.111.2",
        14230,
        "65.69.140.83",
        4739,
        0xd718262a,
        0xc626b0ea,
    ),
    (
        "24.19.198.95",
        12898,
        "12.22.207.184",
        38024,
        0xd2d0a5de,
        0x5c2b394a,
    ),
    (
        "38.27.205.30",
        48228,
        "209.142.163.6",
        2217,
        0x82989176,
        0xafc7327f,
    ),
    (
        "153.39.163.191",
        44251,
        "202.188.127.2",
        1303,
        0x5d1809c5,
        0x10e828a2,
    ),
];

/// The same page's IPv6 table (it has three rows).
const MS_IPV6: [(&str, u16, &str, u16, u32, u32); 3] = [
    (
        "3ffe:2501:200:1fff::7",
        2794,
        "3ffe:2501:200:3::1",
        1766,
        0x2cc18cd5,
        0x40207d3d,
    ),
    (
        "3ffe:501:8::260:97ff:fe40:efab",
        14230,
        "ff02::1",
        4739,
        0x0f0c461c,
        0xdde51bbf,
    ),
    (
        "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
        44251,
        "fe80::200:f8ff:fe21:67cf",
        38024,
        0x4b61e985,
        0x02d1feef,
    ),
];

fn rss(hash_types: u32) -> Rss {
    Rss::new(
        RssConfig {
            hash_types,
            ..RssConfig::spread(4)
        },
        4,
    )
    .unwrap()
}

fn hash(value: u32, report: HashReport) -> Option<RssHash> {
    Some(RssHash { value, report })
}

#[test]
fn ms_ipv4_vectors_from_fields() {
    for (src, sport, dst, dport, ip_only, with_tcp) in MS_IPV4 {
        let src: Ipv4Addr = src.parse().unwrap();
        let dst: Ipv4Addr = dst.parse().unwrap();
        let mut input = [0u8; 12];
        input[..4].copy_from_slice(&src.octets());
        input[4..8].copy_from_slice(&dst.octets());
        input[8..10].copy_from_slice(&sport.to_be_bytes());
        input[10..12].copy_from_slice(&dport.to_be_bytes());
        assert_eq!(toeplitz_hash(&DEFAULT_KEY, &input[..8]), ip_only, "{src}");
        assert_eq!(toeplitz_hash(&DEFAULT_KEY, &input), with_tcp, "{src}");
    }
}

#[test]
fn ms_ipv6_vectors_from_fields() {
    for (src, sport, dst, dport, ip_only, with_tcp) in MS_IPV6 {
        let src: Ipv6Addr = src.parse().unwrap();
        let dst: Ipv6Addr = dst.parse().unwrap();
        let mut input = [0u8; 36];
        input[..16].copy_from_slice(&src.octets());
        input[16..32].copy_from_slice(&dst.octets());
        input[32..34].copy_from_slice(&sport.to_be_bytes());
        input[34..36].copy_from_slice(&dport.to_be_bytes());
        assert_eq!(toeplitz_hash(&DEFAULT_KEY, &input[..32]), ip_only, "{src}");
        assert_eq!(toeplitz_hash(&DEFAULT_KEY, &input), with_tcp, "{src}");
    }
}

#[test]
fn ms_ipv4_vectors_from_frames() {
    let all = rss(SUPPORTED_HASH_TYPES);
    let ip_only = rss(VIRTIO_NET_RSS_HASH_TYPE_IPv4);
    let b = Builder::default();
    for (src, sport, dst, dport, h_ip, h_tcp) in MS_IPV4 {
        let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
        let tcp = b.ipv4(src, dst, IPPROTO_TCP, &l4(IPPROTO_TCP, sport, dport));
        let udp = b.ipv4(src, dst, IPPROTO_UDP, &l4(IPPROTO_UDP, sport, dport));
        assert_eq!(all.hash(&tcp), hash(h_tcp, HashReport::Tcpv4), "{src}");
        assert_eq!(all.hash(&udp), hash(h_tcp, HashReport::Udpv4), "{src}");
        assert_eq!(ip_only.hash(&tcp), hash(h_ip, HashReport::Ipv4), "{src}");
        assert_eq!(ip_only.hash(&udp), hash(h_ip, HashReport::Ipv4), "{src}");
        let frag = Builder {
            ipv4_frag: 0x2000,
            ..Builder::default()
        };
        let first_fragment = frag.ipv4(src, dst, IPPROTO_TCP, &l4(IPPROTO_TCP, sport, dport));
        assert_eq!(all.hash(&first_fragment), hash(h_ip, HashReport::Ipv4));
        let table = &all.config().indirection_table;
        assert_eq!(all.select_queue(&tcp), table[(h_tcp & 127) as usize]);
        assert_eq!(ip_only.select_queue(&tcp), table[(h_ip & 127) as usize]);
    }
}

#[test]
fn ms_ipv6_vectors_from_frames() {
    let all = rss(SUPPORTED_HASH_TYPES);
    let ip_only = rss(VIRTIO_NET_RSS_HASH_TYPE_IPv6);
    let b = Builder::default();
    for (src, sport, dst, dport, h_ip, h_tcp) in MS_IPV6 {
        let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
        let tcp = b.ipv6(src, dst, IPPROTO_TCP, &l4(IPPROTO_TCP, sport, dport));
        let udp = b.ipv6(src, dst, IPPROTO_UDP, &l4(IPPROTO_UDP, sport, dport));
        assert_eq!(all.hash(&tcp), hash(h_tcp, HashReport::Tcpv6), "{src}");
        assert_eq!(all.hash(&udp), hash(h_tcp, HashReport::Udpv6), "{src}");
        assert_eq!(ip_only.hash(&tcp), hash(h_ip, HashReport::Ipv6), "{src}");
        assert_eq!(ip_only.hash(&udp), hash(h_ip, HashReport::Ipv6), "{src}");
        let table = &all.config().indirection_table;
        assert_eq!(all.select_queue(&tcp), table[(h_tcp & 127) as usize]);
    }
}

#[test]
fn hash_type_fallbacks() {
    let (src, sport, dst, dport, h_ip, h_tcp) = MS_IPV4[0];
    let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
    let b = Builder::default();
    let tcp = b.ipv4(src, dst, IPPROTO_TCP, &l4(IPPROTO_TCP, sport, dport));
    let udp = b.ipv4(src, dst, IPPROTO_UDP, &l4(IPPROTO_UDP, sport, dport));
    let icmp = b.ipv4(src, dst, 1, &[8, 0, 0, 0]);
    // TCP without TCPv4 but with UDPv4 and IPv4: the 2-tuple.
    let udp_ip = rss(VIRTIO_NET_RSS_HASH_TYPE_UDPv4 | VIRTIO_NET_RSS_HASH_TYPE_IPv4);
    assert_eq!(udp_ip.hash(&tcp), hash(h_ip, HashReport::Ipv4));
    assert_eq!(udp_ip.hash(&udp), hash(h_tcp, HashReport::Udpv4));
    // TCPv4 alone: only TCP is hashed.
    let tcp_only = rss(VIRTIO_NET_RSS_HASH_TYPE_TCPv4);
    assert_eq!(tcp_only.hash(&tcp), hash(h_tcp, HashReport::Tcpv4));
    assert_eq!(tcp_only.hash(&udp), None);
    assert_eq!(tcp_only.hash(&icmp), None);
    // IPv6 types do not apply to IPv4 and no types hash nothing.
    assert_eq!(rss(VIRTIO_NET_RSS_HASH_TYPE_IPv6).hash(&tcp), None);
    assert_eq!(rss(0).hash(&tcp), None);
    assert_eq!(
        rss(SUPPORTED_HASH_TYPES).hash(&icmp),
        hash(h_ip, HashReport::Ipv4)
    );
}

#[test]
fn ex_types_act_as_their_plain_forms() {
    let (src, sport, dst, dport, h_ip, h_tcp) = MS_IPV6[0];
    let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
    let b = Builder::default();
    let tcp = b.ipv6(src, dst, IPPROTO_TCP, &l4(IPPROTO_TCP, sport, dport));
    let udp = b.ipv6(src, dst, IPPROTO_UDP, &l4(IPPROTO_UDP, sport, dport));
    let ex = rss(VIRTIO_NET_RSS_HASH_TYPE_TCP_EX | VIRTIO_NET_RSS_HASH_TYPE_IP_EX);
    assert_eq!(ex.hash(&tcp), hash(h_tcp, HashReport::Tcpv6));
    assert_eq!(ex.hash(&udp), hash(h_ip, HashReport::Ipv6));
    let udp_ex = rss(VIRTIO_NET_RSS_HASH_TYPE_UDP_EX);
    assert_eq!(udp_ex.hash(&udp), hash(h_tcp, HashReport::Udpv6));
    assert_eq!(udp_ex.hash(&tcp), None);
}

#[test]
fn report_codes() {
    assert_eq!(HashReport::code_of(None), 0);
    let codes = [
        (HashReport::Ipv4, 1),
        (HashReport::Tcpv4, 2),
        (HashReport::Udpv4, 3),
        (HashReport::Ipv6, 4),
        (HashReport::Tcpv6, 5),
        (HashReport::Udpv6, 6),
    ];
    for (report, code) in codes {
        assert_eq!(report.code(), code);
        assert_eq!(HashReport::code_of(hash(7, report)), code);
    }
}

#[test]
fn validation() {
    let good = RssConfig::spread(4);
    assert!(good.validate(4).is_ok());
    assert_eq!(
        good.validate(3),
        Err(RssError::TableQueue {
            index: 3,
            queue: 3,
            rx_queues: 3
        })
    );
    let with = |f: &dyn Fn(&mut RssConfig)| {
        let mut c = good.clone();
        f(&mut c);
        Rss::new(c, 4)
    };
    assert_eq!(
        with(&|c| c.key.clear()),
        Err(RssError::KeyLength { len: 0 })
    );
    assert_eq!(
        with(&|c| c.key.push(0)),
        Err(RssError::KeyLength { len: 41 })
    );
    assert!(with(&|c| c.key.truncate(1)).is_ok());
    for len in [0, 3, 6, 100, 256] {
        assert_eq!(
            with(&|c| c.indirection_table.resize(len, 0)),
            Err(RssError::TableLength { len })
        );
    }
    for len in [1, 2, 64, 128] {
        assert!(with(&|c| c.indirection_table.truncate(len)).is_ok());
    }
    assert_eq!(
        with(&|c| c.default_queue = 4),
        Err(RssError::DefaultQueue {
            queue: 4,
            rx_queues: 4
        })
    );
    assert_eq!(
        with(&|c| c.hash_types |= 1 << 9),
        Err(RssError::UnknownHashTypes { bits: 0x23f })
    );
    assert!(with(&|c| c.hash_types = ALL_HASH_TYPES).is_ok());
    assert_eq!(
        Rss::new(RssConfig::spread(0), 0),
        Err(RssError::TableQueue {
            index: 0,
            queue: 0,
            rx_queues: 0
        })
    );
    // Errors read as sentences naming what was refused.
    let msg = with(&|c| c.key.clear()).unwrap_err().to_string();
    assert_eq!(msg, "RSS key of 0 bytes refused: it must be 1 to 40 bytes");
}

#[test]
fn spread_and_default_queue() {
    let rss = Rss::new(RssConfig::spread(3), 3).unwrap();
    let table = &rss.config().indirection_table;
    assert_eq!(table.len(), MAX_TABLE_LEN);
    assert_eq!(&table[..4], &[0, 1, 2, 0]);
    let mut config = RssConfig::spread(3);
    config.default_queue = 2;
    let rss = Rss::new(config, 3).unwrap();
    assert_eq!(rss.select_queue(&[]), 2);
    assert_eq!(rss.select_queue(&[0u8; 64]), 2);
    // A one-entry table sends every hashed frame to its queue.
    let one = Rss::new(
        RssConfig {
            indirection_table: vec![1],
            ..RssConfig::spread(3)
        },
        3,
    )
    .unwrap();
    let b = Builder::default();
    let (src, dst) = (Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8));
    assert_eq!(one.select_queue(&b.ipv4(src, dst, 1, &[])), 1);
}

#[test]
fn serde_round_trip() {
    let config = RssConfig {
        indirection_table: vec![0, 1],
        ..RssConfig::spread(2)
    };
    let json = serde_json::to_string(&config).unwrap();
    assert!(json.contains("\"hash_types\":63"), "{json}");
    assert_eq!(serde_json::from_str::<RssConfig>(&json).unwrap(), config);
}

/// Random bytes, and valid frames with random damage, never panic,
/// and a frame with no hash goes to the default queue.
#[test]
fn arbitrary_frames_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_f00d);
    let mut config = RssConfig::spread(4);
    config.hash_types = ALL_HASH_TYPES;
    config.default_queue = 3;
    let rss = Rss::new(config, 4).unwrap();
    let b = Builder::default();
    let (a4, b4) = (Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 3, 2, 1));
    let (a6, b6): (Ipv6Addr, Ipv6Addr) = ("2001:db8::1".parse().unwrap(), "::2".parse().unwrap());
    let vlan = Builder {
        vlan_tags: vec![ETHERTYPE_VLAN],
        ipv6_ext: vec![(0, vec![0; 8]), (44, vec![0; 8])],
        ipv4_options: 8,
        ..Builder::default()
    };
    let seeds = [
        b.ipv4(a4, b4, IPPROTO_TCP, &l4(IPPROTO_TCP, 1, 2)),
        b.ipv6(a6, b6, IPPROTO_UDP, &l4(IPPROTO_UDP, 1, 2)),
        vlan.ipv4(a4, b4, IPPROTO_UDP, &l4(IPPROTO_UDP, 1, 2)),
        vlan.ipv6(a6, b6, IPPROTO_TCP, &l4(IPPROTO_TCP, 1, 2)),
    ];
    let mut hashed = 0;
    for i in 0..60_000 {
        let frame: Vec<u8> = if i % 3 == 0 {
            (0..rng.gen_range(0..128)).map(|_| rng.gen()).collect()
        } else {
            let mut f = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..f.len());
                f[at] = rng.gen();
            }
            if rng.gen_ratio(1, 4) {
                f.truncate(rng.gen_range(0..=f.len()));
            }
            f
        };
        let h = rss.hash(&frame);
        let queue = rss.select_queue(&frame);
        assert!(queue < 4);
        if h.is_none() {
            assert_eq!(queue, 3);
        } else {
            hashed += 1;
        }
    }
    // The mutations leave many frames valid enough to hash.
    assert!(hashed > 5_000, "{hashed}");
}
