//! Walking and checking a net descriptor chain before the device touches
//! what it describes, and moving frames between chains and host buffers.
//!
//! The rules are the blk parser's: a chain is walked whole before any of
//! its buffers is read or written, and refused when no correct driver
//! would build it (virtio 1.2, 2.7.5.3.1 and 2.7.5.2):
//!
//! * structurally broken: a loop (a chain that does not end within the
//!   queue size), more descriptors than the queue size (an indirect table
//!   may hold more), an indirect table inside an indirect table, an empty,
//!   oversized or misaligned indirect table, more than 4 GiB of buffers, a
//!   next or a table outside guest memory. virtio-queue's iterator stops
//!   at each of these, which shows as a last descriptor that still has
//!   NEXT set (or no descriptor at all). The ring is then broken.
//! * wrong for its direction: TX chains are only read, from device-readable
//!   descriptors; RX chains are only written, into device-writable ones,
//!   and every buffer written must lie in guest memory as a whole.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, Permissions,
};

use super::{RingError, TxChain};

/// Walk `chain` whole into `out` (cleared first). `Err` names the rule a
/// structurally broken chain breaks.
pub(super) fn walk<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    queue_size: u16,
    out: &mut Vec<Descriptor>,
) -> Result<(), &'static str> {
    out.clear();
    if chain.head_index() >= queue_size {
        return Err("head index beyond the queue size");
    }
    for desc in chain {
        if out.len() >= usize::from(queue_size) {
            return Err("chain has more descriptors than the queue size");
        }
        out.push(desc);
    }
    match out.last() {
        None => Err("empty chain (unreadable descriptor, or an empty, misaligned, oversized or nested indirect table)"),
        Some(last) if last.has_next() => Err(
            "chain loops, exceeds the queue size, nests indirect tables, exceeds 4 GiB or points outside the descriptor table",
        ),
        Some(_) => Ok(()),
    }
}

/// The broken-chain error for `head`.
pub(super) fn broken(head: u16, reason: &'static str) -> RingError {
    RingError::BrokenChain { head, reason }
}

/// Copy the frame of TX chain `head`, walked into `descs`, into `buf`.
pub(super) fn copy_tx<M: GuestMemory>(
    head: u16,
    descs: &[Descriptor],
    mem: &M,
    buf: &mut [u8],
) -> TxChain {
    let bad = |reason| TxChain::Bad { head, reason };
    let mut len = 0usize;
    for desc in descs {
        if desc.is_write_only() {
            // virtio 1.2, 5.1.6.2: the driver puts outgoing packets in
            // device-readable buffers; the device never reads a writable one.
            return bad("device-writable descriptor in a TX chain");
        }
        let Ok(part) = usize::try_from(desc.len()) else {
            return bad("TX frame larger than the largest Ethernet frame");
        };
        let Some(dest) = len.checked_add(part).and_then(|end| buf.get_mut(len..end)) else {
            return bad("TX frame larger than the largest Ethernet frame");
        };
        if read_guest(mem, desc.addr(), dest).is_err() {
            return bad("TX buffer outside guest memory");
        }
        len += part;
    }
    TxChain::Frame { head, len }
}

/// The device-writable buffers of RX chain `head`, walked into `descs`,
/// appended to `segments` up to `want` bytes; returns the bytes taken.
/// Every buffer used must lie in guest memory as a whole (checked before
/// anything is written); device-readable descriptors are never written.
pub(super) fn rx_segments<M: GuestMemory>(
    head: u16,
    descs: &[Descriptor],
    mem: &M,
    want: usize,
    segments: &mut Vec<(GuestAddress, u32)>,
) -> Result<u32, RingError> {
    let mut taken = 0u32;
    for desc in descs {
        if !desc.is_write_only() || desc.len() == 0 {
            continue;
        }
        let left = want.saturating_sub(usize::try_from(taken).unwrap_or(usize::MAX));
        if left == 0 {
            break;
        }
        // take <= desc.len(), a u32.
        let take = u32::try_from(left).unwrap_or(u32::MAX).min(desc.len());
        let Ok(take_len) = usize::try_from(take) else {
            return Err(broken(head, "RX buffer larger than this host can address"));
        };
        if !mem.check_range(desc.addr(), take_len, Permissions::Write) {
            return Err(broken(head, "RX buffer outside guest memory"));
        }
        segments.push((desc.addr(), take));
        // The chain holds at most 4 GiB (walk() checked), so the sum fits.
        taken = taken.saturating_add(take);
    }
    Ok(taken)
}

/// Header then frame, read sequentially into guest segments.
pub(super) struct Source<'a> {
    parts: [&'a [u8]; 2],
    part: usize,
    offset: usize,
}

impl<'a> Source<'a> {
    /// `header`, then `frame`.
    pub(super) fn new(header: &'a [u8], frame: &'a [u8]) -> Source<'a> {
        Source {
            parts: [header, frame],
            part: 0,
            offset: 0,
        }
    }

    /// Copy the next `len` bytes into guest memory at `addr`: one region
    /// lookup for the whole segment (the usual case: header and frame go
    /// into one buffer), per-chunk lookups only across a region boundary.
    pub(super) fn write_to<M: GuestMemory>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), RingError> {
        if let Some(slice) = mem
            .physical_memory()
            .and_then(|phys| phys.get_slice(addr, len).ok())
        {
            let mut offset = 0;
            while offset < len && self.part < self.parts.len() {
                let chunk = self.next_chunk(len - offset);
                slice
                    .subslice(offset, chunk.len())
                    .map_err(GuestMemoryError::from)?
                    .copy_from(chunk);
                offset += chunk.len();
            }
            return Ok(());
        }
        let mut addr = addr;
        let mut left = len;
        while left > 0 && self.part < self.parts.len() {
            let chunk = self.next_chunk(left);
            mem.write_slice(chunk, addr)?;
            left -= chunk.len();
            let step =
                u64::try_from(chunk.len()).map_err(|_| virtio_queue::Error::AddressOverflow)?;
            addr = addr
                .checked_add(step)
                .ok_or(virtio_queue::Error::AddressOverflow)?;
        }
        Ok(())
    }

    /// Up to `max` bytes of the current part, advancing past them.
    fn next_chunk(&mut self, max: usize) -> &'a [u8] {
        let part = self.parts[self.part];
        let chunk = (part.len() - self.offset).min(max);
        let start = self.offset;
        self.offset += chunk;
        if self.offset == part.len() {
            self.part += 1;
            self.offset = 0;
        }
        &part[start..start + chunk]
    }
}

/// Copy guest memory at `addr` into `dest`: one region lookup in the usual
/// case, the general path across region boundaries.
fn read_guest<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    dest: &mut [u8],
) -> Result<(), RingError> {
    match mem
        .physical_memory()
        .and_then(|phys| phys.get_slice(addr, dest.len()).ok())
    {
        Some(slice) => {
            slice.copy_to(dest);
            Ok(())
        }
        None => Ok(mem.read_slice(dest, addr)?),
    }
}
