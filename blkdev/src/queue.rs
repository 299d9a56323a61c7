//! One virtqueue of a disk: pop chains, parse, submit storage I/O, and on
//! completion write the status byte, publish the used entry and decide
//! whether the guest needs an interrupt.
//!
//! The caller (the agent's worker) owns the event loop: it calls
//! [`BlkQueue::process_avail`] on a kick and [`BlkQueue::process_completions`]
//! when the engine's completion eventfd fires.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::engine::{Completion, IoEngine, IoOp};
use crate::inflight::{InflightError, InflightQueue};
use crate::request::{parse_chain, parse_head, ParseError, Request, RequestKind, Segment};
use crate::spec::*;

/// A queue-level failure: the caller stops serving this queue (the device
/// needs a reset) but keeps serving every other queue and disk.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The guest put an unanswerable chain on the ring.
    #[error("queue needs reset: {0}")]
    NeedsReset(ParseError),
    /// The ring itself could not be accessed (bad addresses, bad index).
    #[error("virtqueue access failed")]
    Ring(#[from] virtio_queue::Error),
    /// The inflight region cannot be used for this ring.
    #[error("inflight region unusable")]
    Inflight(#[from] InflightError),
    /// Guest memory could not be written for a completion.
    #[error("cannot write status byte at {addr:#x}")]
    Status {
        /// Guest address of the status byte.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Disk state shared by all queues of one disk.
#[derive(Debug)]
pub struct DiskShared {
    /// The image.
    pub file: Arc<File>,
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Writes are refused.
    pub readonly: bool,
    /// GET_ID answer (zero-padded or truncated to 20 bytes).
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Writeback cache enabled (config `writeback`); when false, writes
    /// complete only once durable.
    pub writeback: AtomicBool,
}

impl DiskShared {
    /// Shared state for a disk of `capacity_sectors` backed by `file`.
    pub fn new(file: Arc<File>, capacity_sectors: u64, readonly: bool, serial: &str) -> DiskShared {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let bytes = serial.as_bytes();
        let len = bytes.len().min(id.len());
        id[..len].copy_from_slice(&bytes[..len]);
        DiskShared {
            file,
            capacity_sectors,
            readonly,
            serial: id,
            writeback: AtomicBool::new(true),
        }
    }
}

/// Counters a queue keeps for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests completed with VIRTIO_BLK_S_OK.
    pub ok: u64,
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    pub io_errors: u64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupported: u64,
}

/// A request handed to the engine and not yet completed.
struct InFlight<M> {
    /// Keeps the guest mapping alive while the kernel may access it.
    _mem: Arc<M>,
    status: GuestAddress,
    /// Bytes written into the guest (data + status byte), for the used entry.
    used_len: u32,
    /// Guest ranges the device writes (IN data), marked dirty on completion.
    written: Vec<Segment>,
    /// The operation may modify the image (write, flush, discard,
    /// write-zeroes): what the write fence is about.
    mutating: bool,
    /// A read that goes through a private buffer, copied into `written`
    /// only when it is answered.
    bounce: Option<BounceBuffer>,
}

/// Largest read that goes through a bounce buffer; larger reads fail with
/// IOERR while bouncing (Linux guests never issue reads this large).
pub const MAX_BOUNCE_BYTES: u64 = 32 << 20;

/// A private, page-aligned buffer (O_DIRECT needs the alignment) that a
/// read lands in before it is copied into guest memory.
struct BounceBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl BounceBuffer {
    /// None when `len` is 0, too large, or the allocation fails: the caller
    /// fails the request instead of the process.
    fn new(len: u64) -> Option<BounceBuffer> {
        if len == 0 || len > MAX_BOUNCE_BYTES {
            return None;
        }
        let layout = std::alloc::Layout::from_size_align(len as usize, 4096).ok()?;
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(BounceBuffer { ptr, layout })
    }

    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.layout.size(),
        }
    }

    fn bytes(&self) -> &[u8] {
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

/// What [`BlkQueue::resume`] found in the inflight region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResumeReport {
    /// Requests taken from the region (all of them were in flight when the
    /// previous back-end stopped).
    pub resubmitted: usize,
    /// Of those, writes held behind the write fence.
    pub held: usize,
    /// Next avail index derived from the region, when it differs from the
    /// one the front-end set.
    pub corrected_avail: Option<(u16, u16)>,
}

/// The processor of one virtqueue. `M` is the guest memory type.
pub struct BlkQueue<M: GuestMemory> {
    disk: Arc<DiskShared>,
    engine: IoEngine,
    /// Indexed by head descriptor index: a head is never reused by the guest
    /// before we return it, so it is a unique token.
    slots: Vec<Option<InFlight<M>>>,
    in_flight: usize,
    completions: Vec<Completion>,
    stats: QueueStats,
    /// Used entries published since the last notification decision.
    unsignalled: bool,
    /// The inflight region's part for this queue, when the front-end set one.
    inflight: Option<InflightQueue>,
    /// Resubmitted requests that modify the image, waiting for the write fence.
    held: Vec<Request>,
    /// Reads go through private buffers (see [`Self::with_bounced_reads`]).
    bounce_reads: bool,
}

impl<M: GuestMemory> BlkQueue<M> {
    /// A processor for a queue of `queue_size` entries.
    pub fn new(disk: Arc<DiskShared>, engine: IoEngine, queue_size: u16) -> Self {
        BlkQueue {
            disk,
            engine,
            slots: (0..queue_size).map(|_| None).collect(),
            in_flight: 0,
            completions: Vec::new(),
            stats: QueueStats::default(),
            unsignalled: false,
            inflight: None,
            held: Vec::new(),
            bounce_reads: false,
        }
    }

    /// Read into private buffers and copy into guest memory only when the
    /// request is answered. Needed when the queue may be suspended: storage
    /// cannot be stopped mid-read, and a suspended device must not write
    /// guest memory after it said it stopped (the destination may already
    /// have answered that request and the guest reused the buffer). Costs a
    /// copy per read, so it is used only when the front-end negotiated
    /// suspending.
    pub fn with_bounced_reads(mut self, bounce: bool) -> Self {
        self.bounce_reads = bounce;
        self
    }

    /// Track requests in `inflight` (the queue's part of the region set by
    /// SET_INFLIGHT_FD). Call [`Self::resume`] before serving the ring.
    pub fn with_inflight(mut self, inflight: Option<InflightQueue>) -> Self {
        self.inflight = inflight;
        self
    }

    /// Before serving the avail ring: if the inflight region lists
    /// requests an earlier back-end took and never answered, resubmit them,
    /// oldest first, and move the ring's next avail index past them. With
    /// `hold_writes`, resubmitted requests that modify the image wait for
    /// [`Self::release_held`] (the write fence); reads go at once.
    pub fn resume(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        hold_writes: impl FnOnce() -> bool,
    ) -> Result<ResumeReport, QueueError> {
        let mut report = ResumeReport::default();
        let Some(inflight) = self.inflight.as_mut() else {
            return Ok(report);
        };
        let used = queue.next_used();
        let recovery = inflight.begin(queue.size(), used)?;
        if recovery.fixed_last_batch {
            log::info!("inflight region: last batch was already published; not resubmitting it");
        }
        let heads = recovery.heads;
        // Requests fetched = used entries published + requests in flight.
        let derived = used.wrapping_add(heads.len() as u16);
        if derived != queue.next_avail() {
            report.corrected_avail = Some((queue.next_avail(), derived));
            queue.set_next_avail(derived);
        }
        let desc_table = GuestAddress(queue.desc_table());
        let mut requests = Vec::with_capacity(heads.len());
        for head in heads {
            report.resubmitted += 1;
            match parse_head(mem.as_ref(), desc_table, queue.size(), head) {
                Ok(request) => requests.push(request),
                Err(ParseError::Invalid {
                    head,
                    status,
                    reason,
                }) => {
                    log::warn!("resubmitted request head {head}: {reason}; failing it with IOERR");
                    self.complete_now(queue, mem, head, status, 0, VIRTIO_BLK_S_IOERR)?;
                }
                Err(broken @ ParseError::Broken { .. }) => {
                    return Err(QueueError::NeedsReset(broken))
                }
            }
        }
        let hold = requests.iter().any(|r| r.kind.modifies_image()) && hold_writes();
        for request in requests {
            if hold && request.kind.modifies_image() {
                report.held += 1;
                self.held.push(request);
            } else {
                self.start(queue, mem, request)?;
            }
        }
        self.engine.flush();
        Ok(report)
    }

    /// Resubmitted writes waiting for the write fence.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The write fence opened: submit the held requests. Returns whether the
    /// guest should be notified.
    pub fn release_held(&mut self, queue: &mut Queue, mem: &Arc<M>) -> Result<bool, QueueError> {
        for request in std::mem::take(&mut self.held) {
            self.start(queue, mem, request)?;
        }
        self.engine.flush();
        self.publish_completions(queue, mem)?;
        self.notify_decision(queue, mem)
    }

    /// Suspend (stop without draining): forget the held requests and stop
    /// answering. Everything not answered stays marked in the inflight
    /// region for the next back-end to resubmit. Returns how many submitted
    /// operations may still modify the image; from now on only
    /// [`Self::reap_abandoned`] may be called.
    pub fn suspend(&mut self) -> u64 {
        self.held.clear();
        self.slots
            .iter()
            .flatten()
            .filter(|request| request.mutating)
            .count() as u64
    }

    /// After [`Self::suspend`]: collect finished storage operations without
    /// writing anything into guest memory. Returns how many that modify the
    /// image finished.
    pub fn reap_abandoned(&mut self) -> u64 {
        let mut completions = std::mem::take(&mut self.completions);
        self.engine.reap(&mut completions);
        let mut mutating = 0;
        for completion in completions.drain(..) {
            let slot = usize::try_from(completion.token)
                .ok()
                .and_then(|index| self.slots.get_mut(index))
                .and_then(Option::take);
            if let Some(request) = slot {
                self.in_flight -= 1;
                mutating += u64::from(request.mutating);
            }
        }
        self.completions = completions;
        mutating
    }

    /// The engine's completion eventfd, to register with the event loop.
    pub fn completion_fd(&self) -> std::os::unix::io::RawFd {
        self.engine.completion_fd()
    }

    /// The storage engine back, for the queue's next start: `None` while
    /// requests are still in flight on it (an engine with abandoned
    /// operations must not serve another ring).
    pub fn into_engine(self) -> Option<IoEngine> {
        (self.in_flight == 0).then_some(self.engine)
    }

    /// After [`Self::suspend`]: keep `fd`'s open file description (the
    /// write fence's lock) alive until the operations already handed to
    /// the kernel have finished, even if the process dies first
    /// ([`crate::engine::IoEngine::hold_file_while_busy`]).
    pub fn hold_file_while_busy(&mut self, fd: std::os::unix::io::RawFd) -> std::io::Result<()> {
        self.engine.hold_file_while_busy(fd)
    }

    /// Requests submitted to storage and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Pop and start every available request, and publish whatever storage
    /// finished while it was submitted. Returns whether the guest should be
    /// notified. Requests still in flight afterwards signal
    /// [`Self::completion_fd`] when they finish.
    ///
    /// Stops at the first chain that cannot be answered and returns
    /// [`QueueError::NeedsReset`]; requests already started still complete.
    pub fn process_avail(&mut self, queue: &mut Queue, mem: &Arc<M>) -> Result<bool, QueueError> {
        self.process(queue, mem, true)
    }

    /// Like [`Self::process_avail`], but leaves guest notifications (kicks)
    /// off: the caller is about to poll the ring with [`Self::has_work`] and
    /// must call [`Self::rearm_notifications`] before it sleeps.
    pub fn process_avail_polled(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
    ) -> Result<bool, QueueError> {
        self.process(queue, mem, false)
    }

    /// Turn guest notifications back on before sleeping. Returns true when
    /// requests arrived meanwhile (process them instead of sleeping: their
    /// kick may never come).
    pub fn rearm_notifications(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
    ) -> Result<bool, QueueError> {
        Ok(queue.enable_notification(mem.as_ref())?)
    }

    /// Whether there is something to do without waiting for an event:
    /// finished storage operations, or (with `include_avail`) new requests
    /// in the avail ring. Cheap enough to spin on.
    pub fn has_work(&mut self, queue: &Queue, mem: &M, include_avail: bool) -> bool {
        let avail = include_avail
            && queue
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != queue.next_avail());
        avail || (self.in_flight > 0 && self.engine.has_completions())
    }

    fn process(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        rearm: bool,
    ) -> Result<bool, QueueError> {
        let popped = self.pop_all(queue, mem, rearm);
        self.engine.flush();
        // io_uring signals only completions that did not finish inside the
        // submit call (see UringEngine::new): publish those here.
        let published = self.publish_completions(queue, mem);
        let notify = self.notify_decision(queue, mem)?;
        popped.and(published).map(|_| notify)
    }

    fn pop_all(&mut self, queue: &mut Queue, mem: &Arc<M>, rearm: bool) -> Result<(), QueueError> {
        loop {
            if queue.event_idx_enabled() || !rearm {
                queue.disable_notification(mem.as_ref())?;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) {
                let head = chain.head_index();
                if usize::from(head) >= self.slots.len() || self.slots[usize::from(head)].is_some()
                {
                    // virtio-queue checks head < size; a head still in flight
                    // means the guest reused a descriptor we own.
                    return Err(QueueError::NeedsReset(ParseError::Broken {
                        head,
                        reason: "head descriptor already in flight",
                    }));
                }
                if self.held.iter().any(|request| request.head == head) {
                    return Err(QueueError::NeedsReset(ParseError::Broken {
                        head,
                        reason: "head descriptor already in flight (held by the write fence)",
                    }));
                }
                if let Some(inflight) = self.inflight.as_mut() {
                    inflight.fetched(head);
                }
                match parse_chain(chain, mem.as_ref(), queue.size()) {
                    Ok(request) => self.start(queue, mem, request)?,
                    Err(ParseError::Invalid {
                        head,
                        status,
                        reason,
                    }) => {
                        log::warn!("queue request head {head}: {reason}; failing it with IOERR");
                        self.complete_now(queue, mem, head, status, 0, VIRTIO_BLK_S_IOERR)?;
                    }
                    Err(broken @ ParseError::Broken { .. }) => {
                        return Err(QueueError::NeedsReset(broken))
                    }
                }
            }
            // Polling callers keep notifications off (with EVENT_IDX: leave
            // avail_event behind, so the driver does not kick).
            if !rearm || !queue.event_idx_enabled() || !queue.enable_notification(mem.as_ref())? {
                return Ok(());
            }
        }
    }

    /// Execute or submit one parsed request.
    fn start(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        request: Request,
    ) -> Result<(), QueueError> {
        let sector_bytes = |sector: u64, len: u64| -> Option<u64> {
            let offset = sector.checked_mul(SECTOR_SIZE)?;
            let end = offset.checked_add(len)?;
            (end <= self.disk.capacity_sectors * SECTOR_SIZE).then_some(offset)
        };
        let head = request.head;
        let status = request.status;
        let mut bounce = None;
        let op = match request.kind {
            RequestKind::Read => match sector_bytes(request.sector, request.data_len) {
                Some(offset) if self.bounce_reads && request.data_len > 0 => {
                    let Some(buffer) = BounceBuffer::new(request.data_len) else {
                        log::warn!(
                            "request head {head}: cannot buffer a read of {} bytes (at most {MAX_BOUNCE_BYTES}); failing it",
                            request.data_len
                        );
                        return self.complete_now(queue, mem, head, status, 0, VIRTIO_BLK_S_IOERR);
                    };
                    let op = IoOp::Read {
                        offset,
                        iovecs: vec![buffer.iovec()],
                    };
                    bounce = Some(buffer);
                    op
                }
                Some(offset) => IoOp::Read {
                    offset,
                    iovecs: iovecs(mem.as_ref(), &request.data, Permissions::Write),
                },
                None => return self.fail_range(queue, mem, &request),
            },
            RequestKind::Write if self.disk.readonly => {
                return self.complete_now(queue, mem, head, status, 0, VIRTIO_BLK_S_IOERR);
            }
            RequestKind::Write => match sector_bytes(request.sector, request.data_len) {
                Some(offset) => IoOp::Write {
                    offset,
                    iovecs: iovecs(mem.as_ref(), &request.data, Permissions::Read),
                    dsync: !self.disk.writeback.load(Ordering::Relaxed),
                },
                None => return self.fail_range(queue, mem, &request),
            },
            RequestKind::Flush => IoOp::Flush,
            RequestKind::GetId => {
                // At most the 20 serial bytes.
                let written = write_segments(mem.as_ref(), &request.data, &self.disk.serial) as u32;
                return self.complete_now(queue, mem, head, status, written, VIRTIO_BLK_S_OK);
            }
            RequestKind::Discard {
                sector,
                num_sectors,
            }
            | RequestKind::WriteZeroes {
                sector,
                num_sectors,
                ..
            } if self.disk.readonly => {
                let _ = (sector, num_sectors);
                return self.complete_now(queue, mem, head, status, 0, VIRTIO_BLK_S_IOERR);
            }
            RequestKind::Discard {
                sector,
                num_sectors,
            } => {
                let len = u64::from(num_sectors) * SECTOR_SIZE;
                match sector_bytes(sector, len) {
                    Some(offset) => IoOp::Fallocate {
                        offset,
                        len,
                        mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    },
                    None => return self.fail_range(queue, mem, &request),
                }
            }
            RequestKind::WriteZeroes {
                sector,
                num_sectors,
                unmap,
            } => {
                let len = u64::from(num_sectors) * SECTOR_SIZE;
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                match sector_bytes(sector, len) {
                    Some(offset) => IoOp::Fallocate { offset, len, mode },
                    None => return self.fail_range(queue, mem, &request),
                }
            }
            RequestKind::Unsupported(kind) => {
                log::debug!("request head {head}: unsupported type {kind}");
                return self.complete_now(queue, mem, head, status, 0, VIRTIO_BLK_S_UNSUPP);
            }
        };
        let (used_len, written, mutating) = match op {
            // data_len is bounded by the 4 GiB chain limit.
            IoOp::Read { .. } => (
                u32::try_from(request.data_len + 1).unwrap_or(u32::MAX),
                request.data,
                false,
            ),
            _ => (1, Vec::new(), true),
        };
        self.slots[usize::from(head)] = Some(InFlight {
            _mem: mem.clone(),
            status,
            used_len,
            written,
            mutating,
            bounce,
        });
        self.in_flight += 1;
        log::trace!("head {head}: submit {op:?}");
        // SAFETY: the iovecs were built from `mem`, which the slot just filled
        // keeps alive until this token's completion is processed; the guest
        // does not own these buffers again until we publish the used entry.
        unsafe { self.engine.submit(u64::from(head), op) };
        Ok(())
    }

    fn fail_range(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        request: &Request,
    ) -> Result<(), QueueError> {
        log::debug!(
            "request head {}: sector {} + {} bytes is beyond capacity ({} sectors)",
            request.head,
            request.sector,
            request.data_len,
            self.disk.capacity_sectors
        );
        self.complete_now(
            queue,
            mem,
            request.head,
            request.status,
            0,
            VIRTIO_BLK_S_IOERR,
        )
    }

    /// Finish a request that needed no storage I/O.
    fn complete_now(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
        head: u16,
        status: GuestAddress,
        data_written: u32,
        status_value: u32,
    ) -> Result<(), QueueError> {
        self.publish(
            queue,
            mem.as_ref(),
            head,
            status,
            data_written.saturating_add(1),
            status_value,
        )
    }

    fn publish(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        head: u16,
        status: GuestAddress,
        used_len: u32,
        status_value: u32,
    ) -> Result<(), QueueError> {
        // Status values are 0..=2 and fit the status byte.
        mem.write_obj(status_value as u8, status)
            .map_err(|source| QueueError::Status {
                addr: status.0,
                source,
            })?;
        match status_value {
            VIRTIO_BLK_S_OK => self.stats.ok += 1,
            VIRTIO_BLK_S_UNSUPP => self.stats.unsupported += 1,
            _ => self.stats.io_errors += 1,
        }
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.before_publish(head);
        }
        queue.add_used(mem, head, used_len)?;
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.after_publish(head, queue.next_used());
        }
        self.unsignalled = true;
        Ok(())
    }

    /// Reap storage completions and publish them. Returns whether the guest
    /// should be notified.
    pub fn process_completions(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
    ) -> Result<bool, QueueError> {
        self.publish_completions(queue, mem)?;
        self.notify_decision(queue, mem)
    }

    fn publish_completions(&mut self, queue: &mut Queue, mem: &Arc<M>) -> Result<(), QueueError> {
        let mut completions = std::mem::take(&mut self.completions);
        self.engine.reap(&mut completions);
        let mut result = Ok(());
        for completion in completions.drain(..) {
            let Ok(index) = usize::try_from(completion.token) else {
                continue;
            };
            let Some(request) = self.slots.get_mut(index).and_then(Option::take) else {
                log::warn!("completion for token {} with no request", completion.token);
                continue;
            };
            self.in_flight -= 1;
            let status_value = match &completion.result {
                Ok(()) => match &request.bounce {
                    // vm-memory logs these writes itself.
                    Some(buffer) => {
                        let data = buffer.bytes();
                        if write_segments(mem.as_ref(), &request.written, data) == data.len() {
                            VIRTIO_BLK_S_OK
                        } else {
                            log::error!(
                                "request head {index}: read data no longer fits guest memory"
                            );
                            VIRTIO_BLK_S_IOERR
                        }
                    }
                    None => {
                        for segment in &request.written {
                            mark_dirty(mem.as_ref(), segment);
                        }
                        VIRTIO_BLK_S_OK
                    }
                },
                Err(e) => {
                    log::error!("request head {index}: storage I/O failed: {e}");
                    VIRTIO_BLK_S_IOERR
                }
            };
            let used_len = if status_value == VIRTIO_BLK_S_OK {
                request.used_len
            } else {
                1
            };
            // index < slots.len() <= u16::MAX + 1, so it is a valid head.
            if let Err(e) = self.publish(
                queue,
                mem.as_ref(),
                index as u16,
                request.status,
                used_len,
                status_value,
            ) {
                result = Err(e);
            }
        }
        self.completions = completions;
        result
    }

    fn notify_decision(&mut self, queue: &mut Queue, mem: &Arc<M>) -> Result<bool, QueueError> {
        if !self.unsignalled {
            return Ok(false);
        }
        self.unsignalled = false;
        Ok(queue.needs_notification(mem.as_ref())?)
    }
}

/// Build iovecs for `segments`. Segments were range-checked by the parser,
/// so a slice lookup that fails here means the memory changed under us; the
/// segment is then skipped and the short transfer fails the request.
fn iovecs<M: GuestMemory>(mem: &M, segments: &[Segment], access: Permissions) -> Vec<libc::iovec> {
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
fn write_segments<M: GuestMemory>(mem: &M, segments: &[Segment], data: &[u8]) -> usize {
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
fn mark_dirty<M: GuestMemory>(mem: &M, segment: &Segment) {
    if let Ok(slices) = mem.get_slices(segment.addr, segment.len as usize, Permissions::Write) {
        for slice in slices.flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

#[cfg(test)]
mod tests;
