//! Ethernet frame -> the fields RSS hashes.
//!
//! The classifier reads a frame as it would reach the guest (Ethernet
//! header first, no virtio-net header) and returns its IP addresses and,
//! when the frame carries a whole TCP or UDP header, its ports. It never
//! panics and never reads outside the frame: every offset is checked.
//!
//! [`classify`] documents what it accepts.

use std::net::{Ipv4Addr, Ipv6Addr};

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType (TPID) of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType (TPID) of an 802.1ad service VLAN tag (QinQ outer tag).
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// The most IPv6 extension headers the classifier walks before it gives
/// up on finding TCP or UDP.
pub const MAX_EXT_HEADERS: usize = 8;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;

/// The addresses of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpAddrs {
    /// IPv4 source and destination.
    V4 {
        /// Source address.
        src: Ipv4Addr,
        /// Destination address.
        dst: Ipv4Addr,
    },
    /// IPv6 source and destination, from the fixed header.
    V6 {
        /// Source address.
        src: Ipv6Addr,
        /// Destination address.
        dst: Ipv6Addr,
    },
}

/// The transport protocols RSS distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// The ports of a TCP or UDP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// TCP or UDP.
    pub proto: L4Proto,
    /// Source port.
    pub src: u16,
    /// Destination port.
    pub dst: u16,
}

/// What RSS may hash in one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// The IP addresses.
    pub addrs: IpAddrs,
    /// The ports, if the packet carries a whole TCP or UDP header (and is
    /// not a fragment).
    pub ports: Option<Ports>,
}

/// Classifies an Ethernet frame; `None` if it is not IP or is malformed.
///
/// What it accepts:
/// * Ethernet II with up to two VLAN tags (802.1Q `0x8100`, 802.1ad
///   `0x88a8`) before the EtherType.
/// * IPv4 (`0x0800`): version 4, IHL >= 5 with options skipped, total
///   length covering the header and inside the frame (bytes after it are
///   Ethernet padding and ignored). A fragment (MF set or a non-zero
///   offset) has no ports, even the first one: the other fragments of the
///   same datagram could not be hashed the same way otherwise.
/// * IPv6 (`0x86dd`): version 6, payload length inside the frame (0, a
///   jumbogram, leaves the packet IP-only). The
///   extension headers hop-by-hop (0), routing (43), destination options
///   (60) and fragment (44) are skipped, up to [`MAX_EXT_HEADERS`] of them,
///   to find TCP or UDP; a fragment has no ports as for IPv4. Anything else
///   (AH, ESP, no-next-header, mobility, a truncated extension header, a
///   longer chain) leaves the packet IP-only. Addresses are always the ones
///   in the fixed header (see the `_EX` note in the [`rss`](super) module).
/// * TCP (6) with at least its 20-byte header, UDP (17) with its 8-byte
///   header, inside the IP payload. A shorter L4 header leaves the packet
///   IP-only.
///
/// Anything else, a frame too short for its Ethernet or IP header, or an
/// IP header that contradicts itself, gives `None`: no hash.
pub fn classify(frame: &[u8]) -> Option<Flow> {
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        ethertype = be16(frame, l3.checked_add(2)?)?;
        l3 = l3.checked_add(VLAN_HLEN)?;
    }
    let packet = frame.get(l3..)?;
    match ethertype {
        ETHERTYPE_IPV4 => classify_ipv4(packet),
        ETHERTYPE_IPV6 => classify_ipv6(packet),
        _ => None,
    }
}

fn classify_ipv4(packet: &[u8]) -> Option<Flow> {
    let header = packet.get(..IPV4_MIN_HLEN)?;
    let (version_ihl, proto) = (*header.first()?, *header.get(9)?);
    if version_ihl >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    let total_len = usize::from(be16(header, 2)?);
    if header_len < IPV4_MIN_HLEN || total_len < header_len {
        return None;
    }
    let datagram = packet.get(..total_len)?;
    let addrs = IpAddrs::V4 {
        src: Ipv4Addr::from(addr::<4>(header, 12)?),
        dst: Ipv4Addr::from(addr::<4>(header, 16)?),
    };
    let flags_offset = be16(header, 6)?;
    let more_fragments = flags_offset & 0x2000 != 0;
    let fragment_offset = flags_offset & 0x1fff;
    let ports = if more_fragments || fragment_offset != 0 {
        None
    } else {
        ports(proto, datagram.get(header_len..)?)
    };
    Some(Flow { addrs, ports })
}

fn classify_ipv6(packet: &[u8]) -> Option<Flow> {
    let header = packet.get(..IPV6_HLEN)?;
    if header.first()? >> 4 != 6 {
        return None;
    }
    let payload_len = usize::from(be16(header, 4)?);
    let payload = packet.get(IPV6_HLEN..IPV6_HLEN.checked_add(payload_len)?)?;
    let addrs = IpAddrs::V6 {
        src: Ipv6Addr::from(addr::<16>(header, 8)?),
        dst: Ipv6Addr::from(addr::<16>(header, 24)?),
    };
    let ports = ipv6_l4(*header.get(6)?, payload).and_then(|(proto, l4)| ports(proto, l4));
    Some(Flow { addrs, ports })
}

/// Walks the IPv6 extension headers; `(next header, its bytes)` of the
/// first header that is not one we skip, or `None` if the packet has no
/// ports to offer (a fragment, a truncated or too long chain).
fn ipv6_l4(mut next: u8, mut rest: &[u8]) -> Option<(u8, &[u8])> {
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => (usize::from(*rest.get(1)?) + 1) * 8,
            IPV6_FRAGMENT => {
                let offset_flags = be16(rest, 2)?;
                // Offset in the top 13 bits, M (more fragments) in bit 0.
                if offset_flags >> 3 != 0 || offset_flags & 1 != 0 {
                    return None;
                }
                8
            }
            _ => return Some((next, rest)),
        };
        next = *rest.first()?;
        rest = rest.get(len..)?;
    }
    None
}

fn ports(proto: u8, l4: &[u8]) -> Option<Ports> {
    let proto = match proto {
        IPPROTO_TCP if l4.len() >= TCP_MIN_HLEN => L4Proto::Tcp,
        IPPROTO_UDP if l4.len() >= UDP_HLEN => L4Proto::Udp,
        _ => return None,
    };
    Some(Ports {
        proto,
        src: be16(l4, 0)?,
        dst: be16(l4, 2)?,
    })
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(addr::<2>(bytes, at)?))
}

fn addr<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
pub(crate) mod frames {
    //! Frame builders for the tests of this crate.

    use super::*;

    /// A frame header and payload builder.
    pub struct Builder {
        pub vlan_tags: Vec<u16>,
        pub ipv4_options: usize,
        /// IPv4 flags+offset field.
        pub ipv4_frag: u16,
        /// IPv6 extension headers as (type, whole header bytes).
        pub ipv6_ext: Vec<(u8, Vec<u8>)>,
        pub payload: Vec<u8>,
        pub padding: usize,
    }

    impl Default for Builder {
        fn default() -> Self {
            Builder {
                vlan_tags: Vec::new(),
                ipv4_options: 0,
                ipv4_frag: 0x4000, // DF
                ipv6_ext: Vec::new(),
                payload: b"payload".to_vec(),
                padding: 0,
            }
        }
    }

    pub fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        let len = if proto == IPPROTO_TCP {
            TCP_MIN_HLEN
        } else {
            UDP_HLEN
        };
        h.resize(len, 0);
        if proto == IPPROTO_TCP {
            h[12] = 5 << 4;
        }
        h
    }

    impl Builder {
        fn ethernet(&self, ethertype: u16) -> Vec<u8> {
            let mut f = vec![
                0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x54, 0, 0xab, 0xcd, 0xef,
            ];
            for &tag in &self.vlan_tags {
                f.extend_from_slice(&tag.to_be_bytes());
                f.extend_from_slice(&7u16.to_be_bytes());
            }
            f.extend_from_slice(&ethertype.to_be_bytes());
            f
        }

        /// IPv4 with protocol `proto` whose payload is `l4` + `self.payload`.
        pub fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
            let mut f = self.ethernet(ETHERTYPE_IPV4);
            let hlen = IPV4_MIN_HLEN + self.ipv4_options;
            let total = hlen + l4.len() + self.payload.len();
            f.push(0x40 | u8::try_from(hlen / 4).unwrap());
            f.push(0);
            f.extend_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
            f.extend_from_slice(&[0x12, 0x34]);
            f.extend_from_slice(&self.ipv4_frag.to_be_bytes());
            f.extend_from_slice(&[64, proto, 0, 0]);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
            f.resize(f.len() + self.ipv4_options, 1); // NOPs
            f.extend_from_slice(l4);
            f.extend_from_slice(&self.payload);
            f.resize(f.len() + self.padding, 0);
            f
        }

        /// IPv6 whose chain is `self.ipv6_ext` then `proto` with `l4` +
        /// `self.payload`.
        pub fn ipv6(&self, src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
            let mut f = self.ethernet(ETHERTYPE_IPV6);
            let ext_len: usize = self.ipv6_ext.iter().map(|(_, h)| h.len()).sum();
            let payload_len = ext_len + l4.len() + self.payload.len();
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&u16::try_from(payload_len).unwrap().to_be_bytes());
            f.push(self.ipv6_ext.first().map_or(proto, |(t, _)| *t));
            f.push(64);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
            for (i, (_, h)) in self.ipv6_ext.iter().enumerate() {
                let next = self.ipv6_ext.get(i + 1).map_or(proto, |(t, _)| *t);
                f.push(next);
                f.extend_from_slice(&h[1..]);
            }
            f.extend_from_slice(l4);
            f.extend_from_slice(&self.payload);
            f.resize(f.len() + self.padding, 0);
            f
        }
    }

    /// An options-style extension header (hop-by-hop, routing, dest
    /// options) of `units` 8-byte units; byte 0 is filled in by the builder.
    pub fn ext_options(units: u8) -> Vec<u8> {
        let mut h = vec![0u8; usize::from(units) * 8];
        h[1] = units - 1;
        h
    }

    /// A fragment extension header.
    pub fn ext_fragment(offset: u16, more: bool) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::frames::*;
    use super::*;

    const A4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B4: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 9);

    fn a6() -> Ipv6Addr {
        "2001:db8::1".parse().unwrap()
    }
    fn b6() -> Ipv6Addr {
        "fe80::abcd".parse().unwrap()
    }

    fn v4(ports: Option<Ports>) -> Option<Flow> {
        Some(Flow {
            addrs: IpAddrs::V4 { src: A4, dst: B4 },
            ports,
        })
    }
    fn v6(ports: Option<Ports>) -> Option<Flow> {
        Some(Flow {
            addrs: IpAddrs::V6 {
                src: a6(),
                dst: b6(),
            },
            ports,
        })
    }
    const TCP: Option<Ports> = Some(Ports {
        proto: L4Proto::Tcp,
        src: 1234,
        dst: 80,
    });
    const UDP: Option<Ports> = Some(Ports {
        proto: L4Proto::Udp,
        src: 1234,
        dst: 80,
    });

    #[test]
    fn ipv4_tcp_udp_and_other() {
        let b = Builder::default();
        let tcp = l4(IPPROTO_TCP, 1234, 80);
        let udp = l4(IPPROTO_UDP, 1234, 80);
        assert_eq!(classify(&b.ipv4(A4, B4, IPPROTO_TCP, &tcp)), v4(TCP));
        assert_eq!(classify(&b.ipv4(A4, B4, IPPROTO_UDP, &udp)), v4(UDP));
        // ICMP: IP only.
        assert_eq!(classify(&b.ipv4(A4, B4, 1, &[8, 0, 0, 0])), v4(None));
    }

    #[test]
    fn ipv4_options_vlan_and_padding() {
        let tcp = l4(IPPROTO_TCP, 1234, 80);
        for (options, tags, padding) in [(4, vec![], 0), (40, vec![ETHERTYPE_VLAN], 30)] {
            let b = Builder {
                ipv4_options: options,
                vlan_tags: tags,
                padding,
                ..Builder::default()
            };
            assert_eq!(classify(&b.ipv4(A4, B4, IPPROTO_TCP, &tcp)), v4(TCP));
        }
        let qinq = Builder {
            vlan_tags: vec![ETHERTYPE_QINQ, ETHERTYPE_VLAN],
            ..Builder::default()
        };
        assert_eq!(classify(&qinq.ipv4(A4, B4, IPPROTO_TCP, &tcp)), v4(TCP));
        // A third tag is more than we walk.
        let three = Builder {
            vlan_tags: vec![ETHERTYPE_QINQ, ETHERTYPE_VLAN, ETHERTYPE_VLAN],
            ..Builder::default()
        };
        assert_eq!(classify(&three.ipv4(A4, B4, IPPROTO_TCP, &tcp)), None);
    }

    #[test]
    fn ipv4_fragments_have_no_ports() {
        let tcp = l4(IPPROTO_TCP, 1234, 80);
        for (frag, ports) in [
            (0x0000, TCP),
            (0x4000, TCP),
            (0x2000, None), // first fragment, MF
            (0x0010, None), // last fragment
            (0x2010, None), // middle fragment
        ] {
            let b = Builder {
                ipv4_frag: frag,
                ..Builder::default()
            };
            assert_eq!(
                classify(&b.ipv4(A4, B4, IPPROTO_TCP, &tcp)),
                v4(ports),
                "{frag:#x}"
            );
        }
    }

    #[test]
    fn ipv4_malformed() {
        let b = Builder::default();
        let good = b.ipv4(A4, B4, IPPROTO_TCP, &l4(IPPROTO_TCP, 1234, 80));
        let mut bad_version = good.clone();
        bad_version[14] = 0x65;
        assert_eq!(classify(&bad_version), None);
        let mut short_ihl = good.clone();
        short_ihl[14] = 0x44;
        assert_eq!(classify(&short_ihl), None);
        let mut long_ihl = good.clone();
        long_ihl[14] = 0x4f; // 60 bytes of header in a 47-byte datagram
        assert_eq!(classify(&long_ihl), None);
        let mut long_total = good.clone();
        long_total[16..18].copy_from_slice(&1500u16.to_be_bytes());
        assert_eq!(classify(&long_total), None);
        let mut total_below_header = good.clone();
        total_below_header[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(classify(&total_below_header), None);
        // Total length ending inside the TCP header: IP only.
        let mut short_tcp = good.clone();
        short_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(classify(&short_tcp), v4(None));
        for len in 0..14 + 20 {
            assert_eq!(classify(&good[..len]), None, "truncated to {len}");
        }
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(classify(&arp), None);
    }

    #[test]
    fn ipv6_tcp_udp_and_other() {
        let b = Builder::default();
        let tcp = l4(IPPROTO_TCP, 1234, 80);
        let udp = l4(IPPROTO_UDP, 1234, 80);
        assert_eq!(classify(&b.ipv6(a6(), b6(), IPPROTO_TCP, &tcp)), v6(TCP));
        assert_eq!(classify(&b.ipv6(a6(), b6(), IPPROTO_UDP, &udp)), v6(UDP));
        assert_eq!(classify(&b.ipv6(a6(), b6(), 58, &[128, 0, 0, 0])), v6(None));
        let vlan = Builder {
            vlan_tags: vec![ETHERTYPE_VLAN],
            padding: 9,
            ..Builder::default()
        };
        assert_eq!(classify(&vlan.ipv6(a6(), b6(), IPPROTO_TCP, &tcp)), v6(TCP));
    }

    #[test]
    fn ipv6_extension_headers() {
        let tcp = l4(IPPROTO_TCP, 1234, 80);
        let with = |ext: Vec<(u8, Vec<u8>)>| {
            let b = Builder {
                ipv6_ext: ext,
                ..Builder::default()
            };
            classify(&b.ipv6(a6(), b6(), IPPROTO_TCP, &tcp))
        };
        assert_eq!(
            with(vec![
                (IPV6_HOP_BY_HOP, ext_options(1)),
                (IPV6_DEST_OPTS, ext_options(3)),
                (IPV6_ROUTING, ext_options(2)),
                (IPV6_FRAGMENT, ext_fragment(0, false)),
                (IPV6_DEST_OPTS, ext_options(1)),
            ]),
            v6(TCP)
        );
        assert_eq!(with(vec![(IPV6_FRAGMENT, ext_fragment(0, true))]), v6(None));
        assert_eq!(
            with(vec![(IPV6_FRAGMENT, ext_fragment(100, false))]),
            v6(None)
        );
        assert_eq!(
            with(vec![(IPV6_FRAGMENT, ext_fragment(100, true))]),
            v6(None)
        );
        // AH is not skipped: IP only.
        assert_eq!(with(vec![(51, ext_options(3))]), v6(None));
        let chain = |n| vec![(IPV6_DEST_OPTS, ext_options(1)); n];
        assert_eq!(with(chain(MAX_EXT_HEADERS)), v6(None));
        assert_eq!(with(chain(MAX_EXT_HEADERS - 1)), v6(TCP));
    }

    #[test]
    fn ipv6_malformed() {
        let b = Builder::default();
        let good = b.ipv6(a6(), b6(), IPPROTO_UDP, &l4(IPPROTO_UDP, 1234, 80));
        let mut bad_version = good.clone();
        bad_version[14] = 0x40;
        assert_eq!(classify(&bad_version), None);
        let mut long_payload = good.clone();
        long_payload[18..20].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(classify(&long_payload), None);
        // Payload length ending inside the UDP header: IP only.
        let mut short_udp = good.clone();
        short_udp[18..20].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(classify(&short_udp), v6(None));
        for len in 0..14 + 40 {
            assert_eq!(classify(&good[..len]), None, "truncated to {len}");
        }
        // An extension header that claims more than the payload: IP only.
        let ext = Builder {
            ipv6_ext: vec![(IPV6_HOP_BY_HOP, ext_options(1))],
            ..Builder::default()
        };
        let mut long_ext = ext.ipv6(a6(), b6(), IPPROTO_UDP, &l4(IPPROTO_UDP, 1, 2));
        long_ext[14 + 40 + 1] = 200;
        assert_eq!(classify(&long_ext), v6(None));
    }
}
