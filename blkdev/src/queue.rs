//! One virtqueue of a disk: pop chains, parse, submit storage I/O, and on
//! completion write the status byte, publish the used entry and decide
//! whether the guest needs an interrupt.
//!
//! The caller (the agent's worker) owns the event loop: it calls
//! [`BlkQueue::process_avail`] on a kick and [`BlkQueue::process_completions`]
//! when the engine's completion eventfd fires.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::engine::{Completion, IoEngine, IoOp};
use crate::inflight::{InflightError, InflightQueue};
use crate::request::{parse_chain, ParseError, Request, RequestKind, Segment};
use crate::spec::*;
use buffers::{iovecs, write_segments, BounceBuffer};

/// A queue-level failure: the caller stops serving this queue (the device
/// needs a reset) but keeps serving every other queue and disk.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The guest put an unanswerable chain on the ring.
    #[error("queue needs reset: {0}")]
    NeedsReset(ParseError),
    /// The driver's avail index is more than a ring ahead of the device
    /// (or behind it): the driver never makes more than the queue size
    /// available (virtio 1.2, 2.7.13.3), so the ring is broken. Raised
    /// once; the caller stops taking requests until the ring is reset.
    #[error("the avail index {avail} is {ahead} entries ahead of the device's {next_avail} on a ring of {size}")]
    AvailIndex {
        /// avail->idx as the driver wrote it.
        avail: u16,
        /// The next avail index the device would process.
        next_avail: u16,
        /// avail - next_avail (mod 2^16).
        ahead: u16,
        /// Ring size.
        size: u16,
    },
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
    /// Guest errors not yet taken by the caller.
    faults: Faults,
    /// This queue's entry in its disk's in-flight counts.
    gauge: Option<InFlightGauge>,
}

/// A queue's entry in [`DiskShared::in_flight`]: a queue that is gone
/// holds nothing (what a detach left held is in the inflight region for
/// the next back-end), so the entry reads 0 once the gauge drops. Kept
/// apart from [`BlkQueue`] so the queue can still give its engine back by
/// value ([`BlkQueue::into_engine`]).
struct InFlightGauge {
    disk: Arc<DiskShared>,
    index: u16,
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.disk.set_in_flight(self.index, 0);
    }
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
            faults: Faults::default(),
            gauge: None,
        }
    }

    /// This is queue `index` of its disk: keep [`DiskShared::in_flight`]
    /// for it.
    pub fn with_index(mut self, index: u16) -> Self {
        self.gauge = Some(InFlightGauge {
            disk: self.disk.clone(),
            index,
        });
        self
    }

    /// The guest errors recorded since the last call (malformed requests
    /// failed with IOERR), for the caller to log through its rate limiter:
    /// the queue itself logs none of them.
    pub fn take_faults(&mut self) -> TakenFaults {
        self.faults.take()
    }

    /// Publish how many requests this queue holds (taken from the ring,
    /// not answered) to its disk.
    fn note_in_flight(&self) {
        if let Some(gauge) = &self.gauge {
            let held = self.in_flight.saturating_add(self.held.len());
            self.disk
                .set_in_flight(gauge.index, u64::try_from(held).unwrap_or(u64::MAX));
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
        self.note_in_flight();
        let notify = self.notify_decision(queue, mem)?;
        popped.and(published).map(|_| notify)
    }

    /// The next chain on the avail ring, or None when the device caught up
    /// with the driver. An avail index more than a ring ahead is an error
    /// (virtio-queue would log it and return None, every time it is asked:
    /// a queue that asks in a loop spins and floods the log).
    fn next_chain<'a>(
        queue: &mut Queue,
        mem: &'a M,
    ) -> Result<Option<DescriptorChain<&'a M>>, QueueError> {
        let avail = queue.avail_idx(mem, Ordering::Acquire)?;
        let next_avail = queue.next_avail();
        let ahead = (avail - Wrapping(next_avail)).0;
        if ahead > queue.size() {
            return Err(QueueError::AvailIndex {
                avail: avail.0,
                next_avail,
                ahead,
                size: queue.size(),
            });
        }
        if ahead == 0 {
            return Ok(None);
        }
        // The index may have moved on since the check; virtio-queue checks
        // it again and refuses a bad one with an error, not a log line.
        Ok(queue.iter(mem)?.next())
    }

    fn pop_all(&mut self, queue: &mut Queue, mem: &Arc<M>, rearm: bool) -> Result<(), QueueError> {
        loop {
            if queue.event_idx_enabled() || !rearm {
                queue.disable_notification(mem.as_ref())?;
            }
            while let Some(chain) = Self::next_chain(queue, mem.as_ref())? {
                let head = chain.head_index();
                let Some(slot) = self.slots.get(usize::from(head)) else {
                    // The avail ring named a descriptor the table does not
                    // have (virtio 1.2, 2.7.6: heads are table indices).
                    return Err(QueueError::NeedsReset(ParseError::Broken {
                        head,
                        reason: "head index beyond the queue size",
                    }));
                };
                if slot.is_some() {
                    // The guest reused a descriptor we own.
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
                        self.faults.push(GuestFault::FailedRequest { head, reason });
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
            (end <= self.disk.capacity_sectors.saturating_mul(SECTOR_SIZE)).then_some(offset)
        };
        let head = request.head;
        let status = request.status;
        let mut bounce = None;
        let op = match request.kind {
            RequestKind::Read => match sector_bytes(request.sector, request.data_len) {
                Some(offset) if self.bounce_reads && request.data_len > 0 => {
                    let Some(buffer) = BounceBuffer::new(request.data_len) else {
                        self.faults.push(GuestFault::ReadTooLarge {
                            head,
                            len: request.data_len,
                            max: MAX_BOUNCE_BYTES,
                        });
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
                let written = write_segments(mem.as_ref(), &request.data, &self.disk.serial);
                let written = u32::try_from(written).unwrap_or(u32::MAX);
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
}

mod buffers;
mod complete;
mod disk;
mod faults;
mod handoff;

pub use buffers::MAX_BOUNCE_BYTES;
pub use disk::{DiskShared, MAX_QUEUES};
use faults::Faults;
pub use faults::{GuestFault, TakenFaults};
pub use handoff::ResumeReport;

#[cfg(test)]
mod tests;
