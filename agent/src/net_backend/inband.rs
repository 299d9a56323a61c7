//! The in-band presetup bracket as a net device lives it (see
//! [`crate::presetup_inband`] for the protocol and PROTOCOL.md §1 for the
//! RFC): between START and END the usual handlers set the device up and
//! [`NetBackend::maybe_start`] starts no ring; END creates the readied
//! pairs' dataplane queues and keeps what the device holds as the early
//! configuration for the switchover plan.

use super::NetBackend;
use crate::presetup_inband::Step;
use crate::server::OwnRequest;
use crate::vring::VringConfig;

impl NetBackend {
    /// PRESETUP (request 41, u64 `value`): open or close the in-band
    /// bracket. Between START and END the usual handlers set the device up
    /// (memory mapped, rings sized and addressed, MTU set) and no ring
    /// starts; END does the rest of the heavy work and keeps what the
    /// device holds as the early configuration. A malformed bracket is
    /// logged and counted once as a fallback, and the device is configured
    /// in full at its start. Acked (if asked) unless malformed.
    pub(super) fn presetup(&mut self, value: u64) -> OwnRequest {
        match self.bracket.step(value) {
            Step::Opened => {
                log::info!("{}: presetup bracket opened (in-band)", self.name);
                self.metrics.presetup_bracket(true);
                OwnRequest::Ack(true)
            }
            Step::Closed => {
                self.metrics.presetup_bracket(false);
                OwnRequest::Ack(self.finish_bracket())
            }
            Step::ClosedAbandoned => {
                self.metrics.presetup_bracket(false);
                log::info!(
                    "{}: abandoned presetup bracket closed; the device will be configured in full",
                    self.name
                );
                OwnRequest::Ack(true)
            }
            Step::Malformed(reason) => {
                log::warn!(
                    "{}: {reason}; presetup abandoned, the device will be configured in full",
                    self.name
                );
                self.metrics.record_presetup(|counts| counts.fallbacks += 1);
                OwnRequest::Ack(false)
            }
            Step::Ignored(reason) => {
                log::warn!("{}: {reason} (presetup already abandoned)", self.name);
                OwnRequest::Ack(false)
            }
        }
    }

    /// Queue pairs the bracket readied, counted from pair 0 while both
    /// rings have a size and addresses and the RX ring is enabled: the
    /// pairs QEMU will run.
    fn ready_pairs(&self) -> u16 {
        let ready = |ring: &VringConfig| ring.size != 0 && ring.addresses().is_some();
        let pairs = self
            .vrings
            .chunks_exact(2)
            .take_while(|pair| ready(&pair[0]) && ready(&pair[1]) && pair[0].enabled)
            .count();
        // At most the device's pairs (vrings has 2 per pair).
        u16::try_from(pairs).unwrap_or(self.options.queue_pairs)
    }

    /// END of a well-formed bracket: create the readied pairs' dataplane
    /// queues on the data path and keep the device's configuration as the
    /// early one for the switchover plan.
    fn finish_bracket(&mut self) -> bool {
        let pairs = self.ready_pairs();
        let mut held = self.current_config();
        if let presetup::DeviceKind::Net(net) = &mut held.device {
            net.queue_pairs = pairs;
        }
        held.rings.retain(|ring| ring.index < 2 * pairs);
        let regions = held.memory.len();
        match self.shared.presetup.apply_in_band(held) {
            Ok(done) => {
                log::info!(
                    "{}: presetup bracket closed: {regions} memory region(s) mapped, {pairs} queue pair(s) ready, {} dataplane queue(s) created, MTU {}",
                    self.name,
                    done.queues_created,
                    if done.mtu_set { "set" } else { "unchanged" }
                );
                true
            }
            Err(e) => {
                log::warn!(
                    "{}: presetup bracket not usable: {}; the device will be configured in full",
                    self.name,
                    crate::error_chain(&e)
                );
                self.metrics.record_presetup(|counts| counts.fallbacks += 1);
                false
            }
        }
    }
}
