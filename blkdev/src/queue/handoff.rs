//! A queue across a handoff: resuming from the inflight region an earlier
//! back-end left (crash recovery, migration destination), holding the
//! resubmitted writes behind the write fence, and suspending without
//! draining (migration source with GET_VRING_BASE_INFLIGHT).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};

use super::{BlkQueue, GuestFault, QueueError};
use crate::request::{parse_head, ParseError};
use crate::spec::VIRTIO_BLK_S_IOERR;

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

impl<M: GuestMemory> BlkQueue<M> {
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
        // Heads are distinct and below the ring size (begin() checked), so
        // there are at most 32768 of them.
        let in_flight = u16::try_from(heads.len()).map_err(|_| {
            QueueError::Inflight(crate::inflight::InflightError::Corrupt(format!(
                "{} heads in flight",
                heads.len()
            )))
        })?;
        let derived = used.wrapping_add(in_flight);
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
                    self.faults
                        .push(GuestFault::FailedResubmission { head, reason });
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
        self.note_in_flight();
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
        let published = self.publish_completions(queue, mem);
        self.note_in_flight();
        published?;
        self.notify_decision(queue, mem)
    }

    /// Suspend (stop without draining): forget the held requests and stop
    /// answering. Everything not answered stays marked in the inflight
    /// region for the next back-end to resubmit. Returns how many submitted
    /// operations may still modify the image; from now on only
    /// [`Self::reap_abandoned`] may be called.
    pub fn suspend(&mut self) -> u64 {
        self.held.clear();
        let mutating = self
            .slots
            .iter()
            .flatten()
            .filter(|request| request.mutating)
            .count();
        // The held requests are the next back-end's now (in the region);
        // what is left counted is storage still running for this queue.
        self.note_in_flight();
        u64::try_from(mutating).unwrap_or(u64::MAX)
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
                self.in_flight = self.in_flight.saturating_sub(1);
                mutating += u64::from(request.mutating);
            }
        }
        self.completions = completions;
        self.note_in_flight();
        mutating
    }
}
