//! virtio-net facts the device needs (virtio 1.2 §5.1): feature bits, the
//! per-packet header and the configuration space.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Largest ring we accept (split rings: 32768 entries).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Most queue pairs a device may have (`max_virtqueue_pairs` range, and
/// what vhost-user's 8-bit ring index in SET_VRING_KICK/CALL can address).
pub const MAX_QUEUE_PAIRS: u16 = 127;

/// Smallest MTU the spec allows a device to advertise (§5.1.4.1: 68).
pub const MIN_MTU: u16 = 68;

/// Largest frame (without the virtio-net header) that may cross the device:
/// a 64 KiB GSO packet plus its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65_535 + 18;

/// Bytes of the virtio-net header with VERSION_1 or MRG_RXBUF (`num_buffers`
/// included).
pub const HDR_LEN_MRG: usize = 12;

/// Bytes of the legacy header without `num_buffers`.
pub const HDR_LEN_LEGACY: usize = 10;

/// Offset of `num_buffers` in the 12-byte header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// `1 << bit` for a feature bit number.
pub const fn bit(n: u32) -> u64 {
    1 << n
}

/// Features every net device offers whatever its dataplane: VERSION_1,
/// merged RX buffers, MAC, link status, MTU, multiqueue, event index and
/// indirect descriptors.
pub const BASE_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(virtio_net::VIRTIO_NET_F_MRG_RXBUF)
    | bit(virtio_net::VIRTIO_NET_F_MAC)
    | bit(virtio_net::VIRTIO_NET_F_STATUS)
    | bit(virtio_net::VIRTIO_NET_F_MTU)
    | bit(virtio_net::VIRTIO_NET_F_MQ)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC);

/// Offloads a dataplane that understands the virtio-net header (a tap with
/// IFF_VNET_HDR) honours: checksum offload both ways, TSO/ECN both ways, and
/// UFO from the guest (the kernel segments it). GUEST_UFO is left out: Linux
/// taps no longer produce UFO packets.
pub const VNET_HDR_OFFLOADS: u64 = bit(virtio_net::VIRTIO_NET_F_CSUM)
    | bit(virtio_net::VIRTIO_NET_F_GUEST_CSUM)
    | bit(virtio_net::VIRTIO_NET_F_GUEST_TSO4)
    | bit(virtio_net::VIRTIO_NET_F_GUEST_TSO6)
    | bit(virtio_net::VIRTIO_NET_F_GUEST_ECN)
    | bit(virtio_net::VIRTIO_NET_F_HOST_TSO4)
    | bit(virtio_net::VIRTIO_NET_F_HOST_TSO6)
    | bit(virtio_net::VIRTIO_NET_F_HOST_ECN)
    | bit(virtio_net::VIRTIO_NET_F_HOST_UFO);

/// The header length the driver and device use for `features`
/// (§5.1.6: 12 bytes with VERSION_1 or MRG_RXBUF, otherwise 10).
pub fn header_len(features: u64) -> usize {
    if features & (bit(VIRTIO_F_VERSION_1) | bit(virtio_net::VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        HDR_LEN_MRG
    } else {
        HDR_LEN_LEGACY
    }
}

/// Whether merged RX buffers were negotiated.
pub fn mrg_rxbuf(features: u64) -> bool {
    features & bit(virtio_net::VIRTIO_NET_F_MRG_RXBUF) != 0
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MacAddress(pub [u8; 6]);

/// A MAC address string could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address {0:?} (expected six hex octets like 52:54:00:12:34:56)")]
pub struct MacParseError(pub String);

impl MacAddress {
    /// The default: QEMU's first locally administered address.
    pub const DEFAULT: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
}

impl std::str::FromStr for MacAddress {
    type Err = MacParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || MacParseError(text.to_string());
        let mut octets = [0u8; 6];
        let mut parts = text.split([':', '-']);
        for octet in &mut octets {
            let part = parts.next().ok_or_else(error)?;
            if part.len() != 2 {
                return Err(error());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(MacAddress(octets))
    }
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The device configuration space (§5.1.4): mac, status,
/// max_virtqueue_pairs, mtu, little-endian.
pub fn config_space(mac: MacAddress, link_up: bool, queue_pairs: u16, mtu: u16) -> [u8; 12] {
    let mut space = [0u8; 12];
    space[..6].copy_from_slice(&mac.0);
    let status = if link_up {
        virtio_net::VIRTIO_NET_S_LINK_UP as u16
    } else {
        0
    };
    space[6..8].copy_from_slice(&status.to_le_bytes());
    space[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
    space[10..12].copy_from_slice(&mtu.to_le_bytes());
    space
}

/// The 60-byte RARP frame a migrated guest's MAC is announced with (as
/// QEMU's self-announce builds it): broadcast, ethertype 0x8035, a reverse
/// request naming `mac` as sender and target.
pub fn rarp_frame(mac: MacAddress) -> [u8; 60] {
    let mut frame = [0u8; 60];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&mac.0);
    frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    frame[22..28].copy_from_slice(&mac.0);
    frame[32..38].copy_from_slice(&mac.0);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_follows_features() {
        assert_eq!(header_len(0), 10);
        assert_eq!(header_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(header_len(bit(virtio_net::VIRTIO_NET_F_MRG_RXBUF)), 12);
    }

    #[test]
    fn mac_parses_and_prints() {
        let mac: MacAddress = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn config_space_layout() {
        let space = config_space(MacAddress::DEFAULT, true, 4, 9000);
        assert_eq!(&space[..6], &MacAddress::DEFAULT.0);
        assert_eq!(u16::from_le_bytes([space[6], space[7]]), 1);
        assert_eq!(u16::from_le_bytes([space[8], space[9]]), 4);
        assert_eq!(u16::from_le_bytes([space[10], space[11]]), 9000);
    }

    #[test]
    fn rarp_frame_names_the_mac() {
        let mac = MacAddress([2, 0, 0, 0, 0, 7]);
        let frame = rarp_frame(mac);
        assert_eq!(&frame[12..14], &[0x80, 0x35]);
        assert_eq!(&frame[6..12], &mac.0);
        assert_eq!(&frame[22..28], &mac.0);
        assert_eq!(&frame[32..38], &mac.0);
        assert_eq!(u16::from_be_bytes([frame[20], frame[21]]), 3);
    }
}
