//! Backend-side receive side scaling (RSS) for virtio-net.
//!
//! Stock QEMU never hands RSS to a vhost-user back-end, so where the agent
//! picks the RX queue for a frame it does what a virtio-net device with
//! `VIRTIO_NET_F_RSS` does (virtio 1.2 §5.1.6.4.3 "Processing of Incoming
//! Packets", §5.1.6.4.3.1 "RSS processing"):
//!
//! 1. [`classify`] the frame into addresses and, for TCP/UDP, ports;
//! 2. pick the hash input by the enabled hash types: for TCP over IPv4 with
//!    `VIRTIO_NET_RSS_HASH_TYPE_TCPv4`, source address, destination address,
//!    source port, destination port; otherwise, for UDP with `UDPv4`, the
//!    same; otherwise with `IPv4`, the two addresses; otherwise no hash.
//!    IPv6 likewise with `TCPv6`, `UDPv6` and `IPv6`;
//! 3. hash it with [`toeplitz_hash`] under the configured key;
//! 4. index the indirection table with `hash & (table length - 1)`; a frame
//!    with no hash goes to the default (the spec's "unclassified") queue.
//!
//! The hash report type (`VIRTIO_NET_HASH_REPORT_*`) comes with the hash,
//! for the `hash_report` field once `VIRTIO_NET_F_HASH_REPORT` is offered.
//!
//! # The `_EX` hash types
//!
//! `VIRTIO_NET_RSS_HASH_TYPE_IP_EX`, `TCP_EX` and `UDP_EX` are accepted but
//! treated as `IPv6`, `TCPv6` and `UDPv6`:
//! * the addresses are always the fixed header's; the home address option
//!   of a destination options header and the address of a type 2 routing
//!   header are not used;
//! * the report type is the non-EX one (`IPv6`, `TCPv6`, `UDPv6`, never
//!   `*_EX`);
//! * an `_EX` bit also enables its non-EX form for IPv6 packets without
//!   extension headers.
//!
//! A device that offers RSS would therefore leave the `_EX` bits out of its
//! `supported_hash_types`; they are accepted here so that a configuration
//! copied from another device is not refused.

mod classify;
mod toeplitz;

pub use classify::{
    classify, Flow, IpAddrs, L4Proto, Ports, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_QINQ,
    ETHERTYPE_VLAN, IPPROTO_TCP, IPPROTO_UDP, MAX_EXT_HEADERS,
};
pub use toeplitz::{toeplitz_hash, DEFAULT_KEY, MAX_KEY_LEN};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HASH_REPORT_IPv4, VIRTIO_NET_HASH_REPORT_IPv6, VIRTIO_NET_HASH_REPORT_TCPv4,
    VIRTIO_NET_HASH_REPORT_TCPv6, VIRTIO_NET_HASH_REPORT_UDPv4, VIRTIO_NET_HASH_REPORT_UDPv6,
    VIRTIO_NET_RSS_HASH_TYPE_IPv4, VIRTIO_NET_RSS_HASH_TYPE_IPv6, VIRTIO_NET_RSS_HASH_TYPE_TCPv4,
    VIRTIO_NET_RSS_HASH_TYPE_TCPv6, VIRTIO_NET_RSS_HASH_TYPE_UDPv4, VIRTIO_NET_RSS_HASH_TYPE_UDPv6,
    VIRTIO_NET_HASH_REPORT_NONE, VIRTIO_NET_RSS_HASH_TYPE_IP_EX, VIRTIO_NET_RSS_HASH_TYPE_TCP_EX,
    VIRTIO_NET_RSS_HASH_TYPE_UDP_EX,
};

/// The longest indirection table accepted: the
/// `rss_max_indirection_table_length` the agent will advertise (QEMU's
/// value). The spec's `indirection_table_mask` is the length minus one.
pub const MAX_TABLE_LEN: usize = 128;

/// Every hash type bit the spec defines (`VIRTIO_NET_RSS_HASH_TYPE_*`).
pub const ALL_HASH_TYPES: u32 = VIRTIO_NET_RSS_HASH_TYPE_IPv4
    | VIRTIO_NET_RSS_HASH_TYPE_TCPv4
    | VIRTIO_NET_RSS_HASH_TYPE_UDPv4
    | VIRTIO_NET_RSS_HASH_TYPE_IPv6
    | VIRTIO_NET_RSS_HASH_TYPE_TCPv6
    | VIRTIO_NET_RSS_HASH_TYPE_UDPv6
    | VIRTIO_NET_RSS_HASH_TYPE_IP_EX
    | VIRTIO_NET_RSS_HASH_TYPE_TCP_EX
    | VIRTIO_NET_RSS_HASH_TYPE_UDP_EX;

/// The hash types this implementation honours as the spec says: all but
/// the `_EX` ones (see the module documentation).
pub const SUPPORTED_HASH_TYPES: u32 = VIRTIO_NET_RSS_HASH_TYPE_IPv4
    | VIRTIO_NET_RSS_HASH_TYPE_TCPv4
    | VIRTIO_NET_RSS_HASH_TYPE_UDPv4
    | VIRTIO_NET_RSS_HASH_TYPE_IPv6
    | VIRTIO_NET_RSS_HASH_TYPE_TCPv6
    | VIRTIO_NET_RSS_HASH_TYPE_UDPv6;

/// Which input a hash was computed over: the virtio-net hash report types
/// this implementation produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashReport {
    /// IPv4 source and destination addresses.
    Ipv4,
    /// IPv4 addresses and TCP ports.
    Tcpv4,
    /// IPv4 addresses and UDP ports.
    Udpv4,
    /// IPv6 source and destination addresses.
    Ipv6,
    /// IPv6 addresses and TCP ports.
    Tcpv6,
    /// IPv6 addresses and UDP ports.
    Udpv6,
}

// The report codes are small; the narrowing below cannot lose bits.
const _: () = assert!(VIRTIO_NET_HASH_REPORT_UDPv6 <= u16::MAX as u32);

impl HashReport {
    /// The `VIRTIO_NET_HASH_REPORT_*` value for `hash_report`.
    pub const fn code(self) -> u16 {
        (match self {
            HashReport::Ipv4 => VIRTIO_NET_HASH_REPORT_IPv4,
            HashReport::Tcpv4 => VIRTIO_NET_HASH_REPORT_TCPv4,
            HashReport::Udpv4 => VIRTIO_NET_HASH_REPORT_UDPv4,
            HashReport::Ipv6 => VIRTIO_NET_HASH_REPORT_IPv6,
            HashReport::Tcpv6 => VIRTIO_NET_HASH_REPORT_TCPv6,
            HashReport::Udpv6 => VIRTIO_NET_HASH_REPORT_UDPv6,
        }) as u16
    }

    /// `hash_report` for an optional hash: `VIRTIO_NET_HASH_REPORT_NONE`
    /// when there is none.
    pub const fn code_of(hash: Option<RssHash>) -> u16 {
        match hash {
            Some(h) => h.report.code(),
            None => VIRTIO_NET_HASH_REPORT_NONE as u16,
        }
    }
}

/// A computed RSS hash and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssHash {
    /// The Toeplitz hash.
    pub value: u32,
    /// The input it covers.
    pub report: HashReport,
}

/// The enabled hash types with the `_EX` bits folded into their non-EX
/// forms.
fn effective_hash_types(hash_types: u32) -> u32 {
    let mut types = hash_types;
    for (ex, plain) in [
        (
            VIRTIO_NET_RSS_HASH_TYPE_IP_EX,
            VIRTIO_NET_RSS_HASH_TYPE_IPv6,
        ),
        (
            VIRTIO_NET_RSS_HASH_TYPE_TCP_EX,
            VIRTIO_NET_RSS_HASH_TYPE_TCPv6,
        ),
        (
            VIRTIO_NET_RSS_HASH_TYPE_UDP_EX,
            VIRTIO_NET_RSS_HASH_TYPE_UDPv6,
        ),
    ] {
        if types & ex != 0 {
            types |= plain;
        }
    }
    types
}

/// Hashes a classified flow by the spec's rules (module documentation);
/// `None` if no enabled hash type applies.
pub fn hash_flow(key: &[u8], hash_types: u32, flow: &Flow) -> Option<RssHash> {
    let types = effective_hash_types(hash_types);
    let enabled = |bit: u32| types & bit != 0;
    // Longest input: two IPv6 addresses and two ports.
    let mut input = [0u8; 36];
    let (addr_len, report_ports, report_ip) = match flow.addrs {
        IpAddrs::V4 { src, dst } => {
            input[..4].copy_from_slice(&src.octets());
            input[4..8].copy_from_slice(&dst.octets());
            let ports = flow.ports.and_then(|p| match p.proto {
                L4Proto::Tcp if enabled(VIRTIO_NET_RSS_HASH_TYPE_TCPv4) => {
                    Some((p, HashReport::Tcpv4))
                }
                L4Proto::Udp if enabled(VIRTIO_NET_RSS_HASH_TYPE_UDPv4) => {
                    Some((p, HashReport::Udpv4))
                }
                _ => None,
            });
            let ip = enabled(VIRTIO_NET_RSS_HASH_TYPE_IPv4).then_some(HashReport::Ipv4);
            (8, ports, ip)
        }
        IpAddrs::V6 { src, dst } => {
            input[..16].copy_from_slice(&src.octets());
            input[16..32].copy_from_slice(&dst.octets());
            let ports = flow.ports.and_then(|p| match p.proto {
                L4Proto::Tcp if enabled(VIRTIO_NET_RSS_HASH_TYPE_TCPv6) => {
                    Some((p, HashReport::Tcpv6))
                }
                L4Proto::Udp if enabled(VIRTIO_NET_RSS_HASH_TYPE_UDPv6) => {
                    Some((p, HashReport::Udpv6))
                }
                _ => None,
            });
            let ip = enabled(VIRTIO_NET_RSS_HASH_TYPE_IPv6).then_some(HashReport::Ipv6);
            (32, ports, ip)
        }
    };
    let (len, report) = match (report_ports, report_ip) {
        (Some((ports, report)), _) => {
            input[addr_len..addr_len + 2].copy_from_slice(&ports.src.to_be_bytes());
            input[addr_len + 2..addr_len + 4].copy_from_slice(&ports.dst.to_be_bytes());
            (addr_len + 4, report)
        }
        (None, Some(report)) => (addr_len, report),
        (None, None) => return None,
    };
    Some(RssHash {
        value: toeplitz_hash(key, &input[..len]),
        report,
    })
}

/// Why an RSS configuration was refused. Every variant means the same to
/// the caller: the configuration is not applied and the previous one (or
/// none) stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RssError {
    /// The key is empty or longer than [`MAX_KEY_LEN`].
    #[error("RSS key of {len} bytes refused: it must be 1 to {MAX_KEY_LEN} bytes")]
    KeyLength {
        /// The key's length.
        len: usize,
    },
    /// The indirection table is empty, too long or not a power of two.
    #[error(
        "RSS indirection table of {len} entries refused: \
         it must be a power of two from 1 to {MAX_TABLE_LEN}"
    )]
    TableLength {
        /// The table's length.
        len: usize,
    },
    /// An indirection table entry names a queue that does not exist.
    #[error(
        "RSS indirection table entry {index} refused: \
         queue {queue} is not one of the {rx_queues} RX queues"
    )]
    TableQueue {
        /// Index of the entry.
        index: usize,
        /// The queue it names.
        queue: u16,
        /// The number of RX queues.
        rx_queues: u16,
    },
    /// The default queue does not exist.
    #[error("RSS default queue {queue} refused: it is not one of the {rx_queues} RX queues")]
    DefaultQueue {
        /// The queue named.
        queue: u16,
        /// The number of RX queues.
        rx_queues: u16,
    },
    /// Bits outside the spec's hash types.
    #[error("RSS hash types {bits:#x} refused: bits outside {ALL_HASH_TYPES:#x} are not defined")]
    UnknownHashTypes {
        /// The whole `hash_types` value.
        bits: u32,
    },
}

/// An RSS configuration, as `VIRTIO_NET_CTRL_MQ_RSS_CONFIG` carries it
/// (virtio 1.2 §5.1.6.5.7.1), in a form the control API can carry as JSON.
/// Check it against the device with [`Rss::new`] before use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssConfig {
    /// `VIRTIO_NET_RSS_HASH_TYPE_*` bits; the `_EX` bits act as their
    /// non-EX forms (module documentation).
    pub hash_types: u32,
    /// The Toeplitz key, 1 to [`MAX_KEY_LEN`] bytes; missing key bits count
    /// as zero.
    pub key: Vec<u8>,
    /// RX queue indices (0-based: queue pair numbers, not virtqueue
    /// numbers); the length is a power of two up to [`MAX_TABLE_LEN`].
    pub indirection_table: Vec<u16>,
    /// The RX queue for frames with no hash (the spec's
    /// `unclassified_queue`).
    pub default_queue: u16,
}

impl RssConfig {
    /// The default configuration for `rx_queues` queues: every supported
    /// hash type, [`DEFAULT_KEY`], and a [`MAX_TABLE_LEN`]-entry table that
    /// spreads over the queues round-robin, default queue 0.
    pub fn spread(rx_queues: u16) -> Self {
        let queues = rx_queues.max(1);
        RssConfig {
            hash_types: SUPPORTED_HASH_TYPES,
            key: DEFAULT_KEY.to_vec(),
            indirection_table: (0..MAX_TABLE_LEN)
                .map(|i| {
                    // Both fit: i < MAX_TABLE_LEN = 128, and the remainder
                    // is below `queues`.
                    u16::try_from(i % usize::from(queues)).unwrap_or(0)
                })
                .collect(),
            default_queue: 0,
        }
    }

    /// Checks the configuration against a device with `rx_queues` RX
    /// queues (the spec's rules for the driver's `VIRTIO_NET_CTRL_MQ_RSS_CONFIG`).
    pub fn validate(&self, rx_queues: u16) -> Result<(), RssError> {
        if self.hash_types & !ALL_HASH_TYPES != 0 {
            return Err(RssError::UnknownHashTypes {
                bits: self.hash_types,
            });
        }
        if self.key.is_empty() || self.key.len() > MAX_KEY_LEN {
            return Err(RssError::KeyLength {
                len: self.key.len(),
            });
        }
        let len = self.indirection_table.len();
        if !len.is_power_of_two() || len > MAX_TABLE_LEN {
            return Err(RssError::TableLength { len });
        }
        if let Some((index, &queue)) = self
            .indirection_table
            .iter()
            .enumerate()
            .find(|(_, &q)| q >= rx_queues)
        {
            return Err(RssError::TableQueue {
                index,
                queue,
                rx_queues,
            });
        }
        if self.default_queue >= rx_queues {
            return Err(RssError::DefaultQueue {
                queue: self.default_queue,
                rx_queues,
            });
        }
        Ok(())
    }
}

/// A validated RSS configuration that steers frames to RX queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rss {
    config: RssConfig,
    mask: u32,
}

impl Rss {
    /// Validates `config` for a device with `rx_queues` RX queues.
    pub fn new(config: RssConfig, rx_queues: u16) -> Result<Self, RssError> {
        config.validate(rx_queues)?;
        // A power of two no larger than MAX_TABLE_LEN: validated above.
        let mask = u32::try_from(config.indirection_table.len() - 1).unwrap_or(0);
        Ok(Rss { config, mask })
    }

    /// The configuration in force.
    pub fn config(&self) -> &RssConfig {
        &self.config
    }

    /// The hash of an Ethernet frame and its report type; `None` if the
    /// frame is not IP, is malformed, or no enabled hash type applies.
    pub fn hash(&self, frame: &[u8]) -> Option<RssHash> {
        let flow = classify(frame)?;
        hash_flow(&self.config.key, self.config.hash_types, &flow)
    }

    /// The RX queue for a hash (or the default queue for none).
    pub fn queue_for(&self, hash: Option<RssHash>) -> u16 {
        hash.and_then(|h| {
            let index = usize::try_from(h.value & self.mask).ok()?;
            self.config.indirection_table.get(index).copied()
        })
        .unwrap_or(self.config.default_queue)
    }

    /// The RX queue for an Ethernet frame.
    pub fn select_queue(&self, frame: &[u8]) -> u16 {
        self.queue_for(self.hash(frame))
    }
}

#[cfg(test)]
mod tests;
