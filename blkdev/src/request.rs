//! Turning a descriptor chain into a virtio-blk request.
//!
//! The chain is treated as two byte streams, device-readable then
//! device-writable (virtio 1.2, 2.7.4: "the device MUST NOT assume a
//! particular arrangement"): the header is the first 16 readable bytes, OUT
//! data the rest of the readable stream, the status byte the last writable
//! byte, IN data the writable bytes before it. Every address and length comes
//! from the guest and is checked before it is used.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::spec::*;

/// One contiguous guest buffer of a request's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// What the guest asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN: read `data` bytes starting at `sector`.
    Read,
    /// VIRTIO_BLK_T_OUT: write `data` bytes starting at `sector`.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the serial into `data`.
    GetId,
    /// VIRTIO_BLK_T_DISCARD of `num_sectors` from `sector`.
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        num_sectors: u32,
    },
    /// VIRTIO_BLK_T_WRITE_ZEROES of `num_sectors` from `sector`.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        num_sectors: u32,
        /// The guest allows deallocation (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
        unmap: bool,
    },
    /// A type we do not implement; answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl RequestKind {
    /// Whether the request may change the image (what the write fence of
    /// an in-flight handoff holds back).
    pub fn modifies_image(&self) -> bool {
        matches!(
            self,
            RequestKind::Write
                | RequestKind::Flush
                | RequestKind::Discard { .. }
                | RequestKind::WriteZeroes { .. }
        )
    }
}

/// A parsed request whose status byte is known to be writable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index (the used-ring id).
    pub head: u16,
    /// Request type and its type-specific fields.
    pub kind: RequestKind,
    /// `sector` from the header (meaningful for Read and Write).
    pub sector: u64,
    /// Data buffers in order: writable ones for Read/GetId, readable for Write.
    pub data: Vec<Segment>,
    /// Total length of `data` in bytes.
    pub data_len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Why a chain could not become a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The request is malformed but its status byte is usable: complete it
    /// with VIRTIO_BLK_S_IOERR.
    #[error("malformed request (head {head}): {reason}")]
    Invalid {
        /// Head descriptor index.
        head: u16,
        /// Where the status byte is.
        status: GuestAddress,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The chain cannot be answered safely (no writable status byte, a loop,
    /// an unreadable descriptor table): the queue needs a reset.
    #[error("broken descriptor chain (head {head}): {reason}")]
    Broken {
        /// Head descriptor index.
        head: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl ParseError {
    /// Head index of the chain this error is about.
    pub fn head(&self) -> u16 {
        match self {
            ParseError::Invalid { head, .. } | ParseError::Broken { head, .. } => *head,
        }
    }
}

/// Parse one chain popped from the avail ring.
///
/// `mem` must be the memory the chain was popped with; `queue_size` bounds
/// the chain length (virtio 1.2, 2.7.5.3.1: a driver MUST NOT create a chain
/// longer than the queue size, and indirect tables would otherwise allow it).
pub fn parse_chain<T: GuestMemory + ?Sized>(
    chain: DescriptorChain<&T>,
    mem: &T,
    queue_size: u16,
) -> Result<Request, ParseError> {
    parse_descriptors(chain.head_index(), chain, mem, queue_size)
}

/// Parse the chain that starts at `head` in the descriptor table at
/// `desc_table`, without the avail ring: for requests resubmitted from the
/// inflight region, whose heads come from the region rather than from the
/// ring. The same checks as [`parse_chain`] apply.
pub fn parse_head<T: GuestMemory + ?Sized>(
    mem: &T,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Request, ParseError> {
    if head >= queue_size {
        return Err(ParseError::Broken {
            head,
            reason: "head index beyond the queue size",
        });
    }
    let walker = ChainWalker {
        mem,
        table: desc_table,
        table_len: queue_size,
        next: Some(head),
        ttl: queue_size,
        indirect: false,
        bytes: 0,
    };
    parse_descriptors(head, walker, mem, queue_size)
}

/// Walks a descriptor chain like virtio-queue's `DescriptorChain`, whose
/// constructor is private to that crate: indirect tables are followed (not
/// nested), and the walk stops (the last yielded descriptor then still has
/// NEXT set) on an unreadable descriptor, an out-of-table index, more
/// descriptors than the table holds or more than 4 GiB of buffers.
struct ChainWalker<'a, T: GuestMemory + ?Sized> {
    mem: &'a T,
    table: GuestAddress,
    table_len: u16,
    next: Option<u16>,
    ttl: u16,
    indirect: bool,
    /// Bytes yielded so far: a chain may not exceed 4 GiB (virtio 1.2, 2.7.5.2).
    bytes: u32,
}

impl<T: GuestMemory + ?Sized> Iterator for ChainWalker<'_, T> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        let index = self.next.take()?;
        if self.ttl == 0 || index >= self.table_len {
            return None;
        }
        self.ttl -= 1;
        let addr = self.table.checked_add(u64::from(index) * 16)?;
        let desc: Descriptor = self.mem.read_obj(addr).ok()?;
        if desc.refers_to_indirect_table() {
            // Nested indirect tables and unaligned or oversized tables are
            // invalid (virtio 1.2, 2.7.5.3.1).
            if self.indirect
                || !desc.len().is_multiple_of(16)
                || desc.len() / 16 > u32::from(u16::MAX)
            {
                return None;
            }
            self.table = desc.addr();
            self.table_len = (desc.len() / 16) as u16;
            self.ttl = self.table_len;
            self.indirect = true;
            self.next = Some(0);
            return self.next();
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = Some(desc.next());
        }
        Some(desc)
    }
}

fn parse_descriptors<T: GuestMemory + ?Sized>(
    head: u16,
    chain: impl Iterator<Item = Descriptor>,
    mem: &T,
    queue_size: u16,
) -> Result<Request, ParseError> {
    let broken = |reason| ParseError::Broken { head, reason };

    // Walk the chain. virtio-queue stops iterating (returns None) when a
    // descriptor cannot be read or the chain is longer than the ring allows
    // (which is what a loop looks like), so a chain whose last yielded
    // descriptor still has NEXT set was cut short.
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut last: Option<Descriptor> = None;
    let mut iter = chain;
    let mut count: usize = 0;
    for desc in &mut iter {
        count += 1;
        if count > usize::from(queue_size) {
            return Err(broken("chain has more descriptors than the queue size"));
        }
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            writable.push(segment);
        } else if !writable.is_empty() {
            // A readable descriptor after a writable one: the layout is
            // invalid, but the chain may still end in a usable status byte.
            last = Some(desc);
            for rest in &mut iter {
                last = Some(rest);
            }
            if last.as_ref().is_some_and(Descriptor::has_next) {
                return Err(broken(
                    "chain loops, exceeds the queue size, or points outside the descriptor table",
                ));
            }
            if last.as_ref().is_some_and(|desc| !desc.is_write_only()) {
                return Err(broken("status descriptor is read-only"));
            }
            let status = status_byte(mem, last.as_ref()).ok_or(broken(
                "readable descriptor after writable ones and no usable status byte",
            ))?;
            return Err(ParseError::Invalid {
                head,
                status,
                reason: "readable descriptor after writable ones",
            });
        } else {
            readable.push(segment);
        }
        last = Some(desc);
    }
    let last = last.ok_or(broken("descriptor table unreadable or empty chain"))?;
    if last.has_next() {
        return Err(broken(
            "chain loops, exceeds the queue size, or points outside the descriptor table",
        ));
    }
    if !last.is_write_only() {
        return Err(broken("status descriptor is read-only"));
    }
    let status = status_byte(mem, Some(&last)).ok_or(broken("status byte outside guest memory"))?;
    let invalid = |reason| ParseError::Invalid {
        head,
        status,
        reason,
    };

    // The writable stream minus its last byte (the status) is IN data.
    trim_end(&mut writable, 1);

    let mut header = [0u8; REQUEST_HEADER_SIZE as usize];
    let data_out = take_prefix(mem, &readable, &mut header).ok_or(invalid(
        "header shorter than 16 bytes or outside guest memory",
    ))?;
    let request_type = u32::from_le_bytes(header[0..4].try_into().expect("4-byte slice"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8-byte slice"));

    let (kind, data, access) = match request_type {
        VIRTIO_BLK_T_IN => (RequestKind::Read, writable, Permissions::Write),
        VIRTIO_BLK_T_OUT => (RequestKind::Write, data_out, Permissions::Read),
        VIRTIO_BLK_T_FLUSH => (RequestKind::Flush, Vec::new(), Permissions::Read),
        VIRTIO_BLK_T_GET_ID => (RequestKind::GetId, writable, Permissions::Write),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let kind = parse_discard_segment(mem, request_type, &data_out).map_err(invalid)?;
            (kind, Vec::new(), Permissions::Read)
        }
        other => (
            RequestKind::Unsupported(other),
            Vec::new(),
            Permissions::Read,
        ),
    };

    let mut data_len: u64 = 0;
    for segment in &data {
        if !mem.check_range(segment.addr, segment.len as usize, access) {
            return Err(invalid("data buffer outside guest memory"));
        }
        data_len += u64::from(segment.len);
    }
    if matches!(kind, RequestKind::Read | RequestKind::Write)
        && !data_len.is_multiple_of(SECTOR_SIZE)
    {
        return Err(invalid("data length is not a multiple of 512 bytes"));
    }
    Ok(Request {
        head,
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

/// Address of the last byte of `last`, if it is in guest memory.
fn status_byte<M: GuestMemory + ?Sized>(
    mem: &M,
    last: Option<&Descriptor>,
) -> Option<GuestAddress> {
    let desc = last?;
    if !desc.is_write_only() || desc.len() == 0 {
        return None;
    }
    let addr = desc.addr().checked_add(u64::from(desc.len()) - 1)?;
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

/// Drop `bytes` bytes from the end of `segments`.
fn trim_end(segments: &mut Vec<Segment>, mut bytes: u32) {
    while bytes > 0 {
        let Some(last) = segments.last_mut() else {
            return;
        };
        if last.len > bytes {
            last.len -= bytes;
            return;
        }
        bytes -= last.len;
        segments.pop();
    }
}

/// Copy the first `out.len()` bytes of `segments` into `out` and return the
/// remaining segments, or None if there are too few bytes or they cannot be
/// read.
fn take_prefix<M: GuestMemory + ?Sized>(
    mem: &M,
    segments: &[Segment],
    out: &mut [u8],
) -> Option<Vec<Segment>> {
    let mut filled = 0usize;
    let mut rest = Vec::new();
    for segment in segments {
        let want = out.len() - filled;
        if want == 0 {
            rest.push(*segment);
            continue;
        }
        let take = want.min(segment.len as usize);
        mem.read_slice(&mut out[filled..filled + take], segment.addr)
            .ok()?;
        filled += take;
        if take < segment.len as usize {
            // take < len <= u32::MAX, so both conversions are exact.
            let consumed = take as u32;
            rest.push(Segment {
                addr: segment.addr.checked_add(u64::from(consumed))?,
                len: segment.len - consumed,
            });
        }
    }
    (filled == out.len()).then_some(rest)
}

/// Read the single discard / write-zeroes segment (we advertise
/// `max_discard_seg` = `max_write_zeroes_seg` = 1).
fn parse_discard_segment<M: GuestMemory + ?Sized>(
    mem: &M,
    request_type: u32,
    payload: &[Segment],
) -> Result<RequestKind, &'static str> {
    let mut raw = [0u8; DISCARD_SEGMENT_SIZE as usize];
    let rest = take_prefix(mem, payload, &mut raw)
        .ok_or("discard/write-zeroes segment missing or unreadable")?;
    if rest.iter().any(|segment| segment.len != 0) {
        return Err("more than one discard/write-zeroes segment");
    }
    let sector = u64::from_le_bytes(raw[0..8].try_into().expect("8-byte slice"));
    let num_sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4-byte slice"));
    let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4-byte slice"));
    if request_type == VIRTIO_BLK_T_DISCARD {
        if flags != 0 {
            return Err("discard with flags set");
        }
        Ok(RequestKind::Discard {
            sector,
            num_sectors,
        })
    } else {
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err("write-zeroes with unknown flags");
        }
        Ok(RequestKind::WriteZeroes {
            sector,
            num_sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        })
    }
}
