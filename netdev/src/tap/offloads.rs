//! The receive offloads a tap may use, from the guest's feature bits.

use std::ffi::c_uint;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
};

/// The offloads the kernel may use in frames it hands us, i.e. the receive
/// offloads the guest accepted (`VIRTIO_NET_F_GUEST_*`). With one on, a
/// frame read from the tap may carry a partial checksum or be a GSO packet
/// up to 64 KiB, described by its vnet header; with it off the kernel
/// finishes checksums and segments before the frame reaches us.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapOffloads {
    /// Partial checksums (`TUN_F_CSUM`, guest `GUEST_CSUM`). Every other
    /// offload needs it.
    pub csum: bool,
    /// TCP over IPv4 segmentation (`TUN_F_TSO4`, `GUEST_TSO4`).
    pub tso4: bool,
    /// TCP over IPv6 segmentation (`TUN_F_TSO6`, `GUEST_TSO6`).
    pub tso6: bool,
    /// TSO packets with ECN CWR set (`TUN_F_TSO_ECN`, `GUEST_ECN`); needs
    /// `tso4` or `tso6`.
    pub tso_ecn: bool,
    /// UDP fragmentation offload (`TUN_F_UFO`, `GUEST_UFO`). Accepted for
    /// compatibility; current kernels ignore it and never produce UFO.
    pub ufo: bool,
    /// UDP segmentation for IPv4 and IPv6 together (`TUN_F_USO4 |
    /// TUN_F_USO6`, `GUEST_USO4` and `GUEST_USO6`): the tun driver only takes
    /// both at once. Needs Linux 6.2 or later.
    pub uso: bool,
}

impl TapOffloads {
    /// The offloads a driver accepted, from the negotiated virtio-net
    /// feature bits, so the back-end can apply `set_offloads` straight from
    /// `SET_FEATURES`. Bits whose prerequisite is missing (TSO without
    /// `GUEST_CSUM`, ECN without TSO, only one of the USO bits) are dropped,
    /// as the spec forbids a driver to accept them; the tun driver would
    /// refuse the whole set otherwise.
    pub fn from_virtio_features(features: u64) -> TapOffloads {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        let tso4 = csum && has(VIRTIO_NET_F_GUEST_TSO4);
        let tso6 = csum && has(VIRTIO_NET_F_GUEST_TSO6);
        TapOffloads {
            csum,
            tso4,
            tso6,
            tso_ecn: (tso4 || tso6) && has(VIRTIO_NET_F_GUEST_ECN),
            ufo: csum && has(VIRTIO_NET_F_GUEST_UFO),
            uso: csum && has(VIRTIO_NET_F_GUEST_USO4) && has(VIRTIO_NET_F_GUEST_USO6),
        }
    }

    /// The `TUNSETOFFLOAD` argument, or why the tun driver would refuse
    /// this combination (it answers a bare `EINVAL`).
    pub(super) fn tun_flags(self) -> Result<c_uint, &'static str> {
        if !self.csum && (self.tso4 || self.tso6 || self.tso_ecn || self.ufo || self.uso) {
            return Err("segmentation offloads need csum");
        }
        if self.tso_ecn && !(self.tso4 || self.tso6) {
            return Err("tso_ecn needs tso4 or tso6");
        }
        let mut flags = 0;
        for (on, flag) in [
            (self.csum, libc::TUN_F_CSUM),
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.tso_ecn, libc::TUN_F_TSO_ECN),
            (self.ufo, libc::TUN_F_UFO),
            (self.uso, libc::TUN_F_USO4 | libc::TUN_F_USO6),
        ] {
            if on {
                flags |= flag;
            }
        }
        Ok(flags)
    }
}
