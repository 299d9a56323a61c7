//! Where request data goes besides guest memory: bounce buffers for reads
//! that must not land in the guest until answered, and the helpers that
//! turn request segments into iovecs, copy into them and mark them dirty.

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemory, Permissions};

use crate::request::Segment;

/// Largest read that goes through a bounce buffer; larger reads fail with
/// IOERR while bouncing (Linux guests never issue reads this large).
pub const MAX_BOUNCE_BYTES: u64 = 32 << 20;

/// A private, page-aligned buffer (O_DIRECT needs the alignment) that a
/// read lands in before it is copied into guest memory.
pub(super) struct BounceBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl BounceBuffer {
    /// None when `len` is 0, too large, or the allocation fails: the caller
    /// fails the request instead of the process.
    pub(super) fn new(len: u64) -> Option<BounceBuffer> {
        if len == 0 || len > MAX_BOUNCE_BYTES {
            return None;
        }
        let layout = std::alloc::Layout::from_size_align(usize::try_from(len).ok()?, 4096).ok()?;
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(BounceBuffer { ptr, layout })
    }

    pub(super) fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.layout.size(),
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of layout.size() initialised
        // (zeroed) bytes; the engine is done with it once the completion is
        // reaped, which is the only time this is called.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout and freed only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: the buffer is plain owned memory; moving it to another thread
// moves that ownership (a Box<[u8]> would be Send too).
unsafe impl Send for BounceBuffer {}

/// Build iovecs for `segments`. Segments were range-checked by the parser,
/// so a slice lookup that fails here means the memory changed under us; the
/// segment is then skipped and the short transfer fails the request.
pub(super) fn iovecs<M: GuestMemory>(
    mem: &M,
    segments: &[Segment],
    access: Permissions,
) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(segments.len());
    for segment in segments {
        let Ok(slices) = mem.get_slices(segment.addr, segment.len as usize, access) else {
            continue;
        };
        for slice in slices.flatten() {
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    out
}

/// Copy `data` into the guest `segments` (up to their total length); returns
/// the number of bytes written.
pub(super) fn write_segments<M: GuestMemory>(mem: &M, segments: &[Segment], data: &[u8]) -> usize {
    let mut written = 0usize;
    for segment in segments {
        if written == data.len() {
            break;
        }
        let take = (data.len() - written).min(segment.len as usize);
        if mem
            .write_slice(&data[written..written + take], segment.addr)
            .is_err()
        {
            break;
        }
        written += take;
    }
    written
}

/// Record in the memory's dirty bitmap that the device wrote `segment`
/// (writes made by the kernel through io_uring bypass vm-memory's tracking).
pub(super) fn mark_dirty<M: GuestMemory>(mem: &M, segment: &Segment) {
    if let Ok(slices) = mem.get_slices(segment.addr, segment.len as usize, Permissions::Write) {
        for slice in slices.flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}
