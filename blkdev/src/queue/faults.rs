//! What the guest did wrong, kept for the caller to log.
//!
//! A guest can fill its ring with malformed requests as fast as it likes;
//! logging each where it is found would let it flood the agent's log (and
//! the disk under it). The queue records them here instead, up to a bound,
//! and the agent's worker drains them after each step through the
//! device's rate limiter.

/// One guest error that cost a request (the queue goes on serving).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestFault {
    /// A malformed request taken from the avail ring, failed with IOERR.
    #[error("request head {head}: {reason}; failed with IOERR")]
    FailedRequest {
        /// Head descriptor index.
        head: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A malformed request resubmitted from the inflight region, failed
    /// with IOERR.
    #[error("resubmitted request head {head}: {reason}; failed with IOERR")]
    FailedResubmission {
        /// Head descriptor index.
        head: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A read too large for a bounce buffer, failed with IOERR.
    #[error("request head {head}: cannot buffer a read of {len} bytes (at most {max}); failed with IOERR")]
    ReadTooLarge {
        /// Head descriptor index.
        head: u16,
        /// Bytes asked for.
        len: u64,
        /// The largest bounced read.
        max: u64,
    },
    /// A bounced read could not be copied into its buffers (they are no
    /// longer guest memory: the memory table changed under the request).
    #[error("request head {head}: read data no longer fits guest memory; failed with IOERR")]
    ReadNotDelivered {
        /// Head descriptor index.
        head: u16,
    },
}

/// Faults kept between two [`crate::BlkQueue::take_faults`].
const KEPT: usize = 64;

/// Faults recorded and not yet taken.
#[derive(Debug, Default)]
pub(super) struct Faults {
    kept: Vec<GuestFault>,
    dropped: u64,
}

impl Faults {
    pub(super) fn push(&mut self, fault: GuestFault) {
        if self.kept.len() < KEPT {
            self.kept.push(fault);
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }

    pub(super) fn take(&mut self) -> TakenFaults {
        TakenFaults {
            faults: std::mem::take(&mut self.kept),
            dropped: std::mem::take(&mut self.dropped),
        }
    }
}

/// What [`crate::BlkQueue::take_faults`] hands over.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TakenFaults {
    /// The first faults since the last take, in order.
    pub faults: Vec<GuestFault>,
    /// How many more happened (not kept).
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_beyond_the_bound_are_counted_not_kept() {
        let mut faults = Faults::default();
        for head in 0..100 {
            faults.push(GuestFault::FailedRequest { head, reason: "x" });
        }
        let taken = faults.take();
        assert_eq!(taken.faults.len(), KEPT);
        assert_eq!(taken.dropped, 100 - KEPT as u64);
        assert_eq!(faults.take(), TakenFaults::default());
    }
}
