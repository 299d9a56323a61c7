//! The in-band presetup bracket as the session lives it (see
//! [`crate::vhost_user::inband`] for the protocol): between START and END
//! the usual handlers record the configuration (memory table, features,
//! MTU, rings sized and addressed) without planning; no ring starts and no
//! ring is read (guest RAM has not been migrated yet). END plans it all at
//! once and keeps what the device then holds as the early configuration,
//! so the switchover applies only what differs. An abandoned bracket plans
//! nothing: the start configures the device in full.

use super::own::OwnReply;
use super::reconcile::Purpose;
use super::{Session, SessionError};
use crate::vhost_user::inband::Step;

impl Session {
    /// PRESETUP (request 41, u64 `value`): open or close the bracket. A
    /// malformed bracket is logged and counted once as a fallback, and the
    /// device is configured in full at its start. Acked (if asked) unless
    /// malformed.
    pub(super) fn presetup_request(&mut self, value: u64) -> OwnReply {
        match self.bracket.step(value) {
            Step::Opened => {
                log::info!("{}: presetup bracket opened (in-band)", self.name);
                self.metrics.presetup_bracket(true);
                OwnReply::Ack(true)
            }
            Step::Closed => {
                self.metrics.presetup_bracket(false);
                OwnReply::Ack(self.finish_bracket())
            }
            Step::ClosedAbandoned => {
                self.metrics.presetup_bracket(false);
                log::info!(
                    "{}: abandoned presetup bracket closed; the device will be configured in full",
                    self.name
                );
                self.early = false;
                OwnReply::Ack(true)
            }
            Step::Malformed(reason) => {
                log::warn!(
                    "{}: {reason}; presetup abandoned, the device will be configured in full",
                    self.name
                );
                self.metrics.record_presetup(|counts| counts.fallbacks += 1);
                self.early = false;
                OwnReply::Ack(false)
            }
            Step::Ignored(reason) => {
                log::warn!("{}: {reason} (presetup already abandoned)", self.name);
                OwnReply::Ack(false)
            }
        }
    }

    /// END of a well-formed bracket: plan what is still to do and keep the
    /// result as the early configuration.
    fn finish_bracket(&mut self) -> bool {
        let regions = self.table.describe().len();
        let configured = self
            .rings
            .iter()
            .filter(|ring| ring.size != 0 && ring.addresses.is_some())
            .count();
        let result = if self.features_set {
            presetup::ValidConfig::new(self.desired_config())
                .map_err(SessionError::Invalid)
                .and_then(|target| self.reconcile_to(target, Purpose::Early))
                .map(|_| ())
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {
                log::info!(
                    "{}: presetup bracket closed: {regions} memory region(s) mapped, {configured} ring(s) configured",
                    self.name
                );
                self.early = true;
                self.publish();
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
