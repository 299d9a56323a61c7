//! The frames the lab's net front-end sends and expects: IPv4/UDP between
//! the guest (10.0.0.2) and the host (10.0.0.1), one flow per queue pair
//! (the tap steers a flow to the queue it last saw it on), each carrying a
//! tag (magic, direction, pair, sequence number) so every frame that
//! arrives can be told apart and checked.

/// The guest's MAC (the device's default).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The host side's MAC.
pub const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
/// First bytes of every tag.
pub const MAGIC: [u8; 4] = *b"VHNL";
/// Bytes of Ethernet + IPv4 + UDP headers.
const HEADERS: usize = 14 + 20 + 8;
/// Bytes of the tag.
const TAG: usize = 4 + 1 + 2 + 4;
/// The smallest frame [`frame`] builds.
pub const MIN_FRAME: usize = HEADERS + TAG;

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Guest to host (the guest's TX ring, out of the tap).
    Tx = 1,
    /// Host to guest (into the tap, onto the guest's RX ring).
    Rx = 2,
}

/// What a frame's tag says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// Direction.
    pub direction: u8,
    /// The pair it belongs to.
    pub pair: u16,
    /// Its number.
    pub seq: u32,
}

/// UDP ports of pair `pair`'s flow: (guest port, host port).
fn ports(pair: u16) -> (u16, u16) {
    (5000 + pair, 6000 + pair)
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A frame of `len` bytes (at least [`MIN_FRAME`]) of pair `pair`'s flow
/// going `direction`, numbered `seq`; the rest of the payload is a pattern
/// derived from the tag.
pub fn frame(direction: Direction, pair: u16, seq: u32, len: usize) -> Vec<u8> {
    let len = len.max(MIN_FRAME);
    let (guest_port, host_port) = ports(pair);
    let (dst, src, sip, dip, sport, dport) = match direction {
        Direction::Tx => (
            HOST_MAC,
            GUEST_MAC,
            [10, 0, 0, 2],
            [10, 0, 0, 1],
            guest_port,
            host_port,
        ),
        Direction::Rx => (
            GUEST_MAC,
            HOST_MAC,
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            host_port,
            guest_port,
        ),
    };
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&sip);
    ip[16..20].copy_from_slice(&dip);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it)
    f.extend_from_slice(&MAGIC);
    f.push(direction as u8);
    f.extend_from_slice(&pair.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    let seed = seq.wrapping_mul(31).wrapping_add(u32::from(pair));
    f.extend((f.len()..len).map(|i| (i as u32).wrapping_add(seed) as u8));
    f
}

/// The tag of `frame` if it is one of ours and its payload is intact.
pub fn parse(frame: &[u8]) -> Option<Tag> {
    let tag = frame.get(HEADERS..HEADERS + TAG)?;
    if tag[..4] != MAGIC {
        return None;
    }
    let parsed = Tag {
        direction: tag[4],
        pair: u16::from_be_bytes([tag[5], tag[6]]),
        seq: u32::from_be_bytes([tag[7], tag[8], tag[9], tag[10]]),
    };
    let direction = match parsed.direction {
        1 => Direction::Tx,
        2 => Direction::Rx,
        _ => return None,
    };
    (frame == frame_like(direction, parsed, frame.len()).as_slice()).then_some(parsed)
}

fn frame_like(direction: Direction, tag: Tag, len: usize) -> Vec<u8> {
    frame(direction, tag.pair, tag.seq, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_parses_back_and_a_changed_byte_does_not() {
        let f = frame(Direction::Rx, 1, 77, 200);
        assert_eq!(f.len(), 200);
        assert_eq!(
            parse(&f),
            Some(Tag {
                direction: 2,
                pair: 1,
                seq: 77
            })
        );
        let mut broken = f.clone();
        broken[150] ^= 1;
        assert_eq!(parse(&broken), None);
        assert_eq!(parse(&f[..100]), None, "cut short");
        assert_eq!(checksum(&f[14..34]), 0, "IPv4 header checksum holds");
    }
}
