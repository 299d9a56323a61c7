//! Answering requests: the status byte, the used entry (with the inflight
//! region's bookkeeping around it), reaping storage completions, and the
//! interrupt decision.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::buffers::{mark_dirty, write_segments};
use super::{BlkQueue, GuestFault, QueueError};
use crate::spec::*;

impl<M: GuestMemory> BlkQueue<M> {
    /// Finish a request that needed no storage I/O.
    pub(super) fn complete_now(
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
        let published = self.publish_completions(queue, mem);
        self.note_in_flight();
        published?;
        self.notify_decision(queue, mem)
    }

    pub(super) fn publish_completions(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
    ) -> Result<(), QueueError> {
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
            self.in_flight = self.in_flight.saturating_sub(1);
            let status_value = match &completion.result {
                Ok(()) => match &request.bounce {
                    // vm-memory logs these writes itself.
                    Some(buffer) => {
                        let data = buffer.bytes();
                        if write_segments(mem.as_ref(), &request.written, data) == data.len() {
                            VIRTIO_BLK_S_OK
                        } else {
                            // index < slots.len(), the ring size: a u16.
                            let head = u16::try_from(index).unwrap_or(u16::MAX);
                            self.faults.push(GuestFault::ReadNotDelivered { head });
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
            // index < slots.len(), the ring size, so it is a valid head.
            let Ok(head) = u16::try_from(index) else {
                continue;
            };
            if let Err(e) = self.publish(
                queue,
                mem.as_ref(),
                head,
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

    pub(super) fn notify_decision(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<M>,
    ) -> Result<bool, QueueError> {
        if !self.unsignalled {
            return Ok(false);
        }
        self.unsignalled = false;
        Ok(queue.needs_notification(mem.as_ref())?)
    }
}
