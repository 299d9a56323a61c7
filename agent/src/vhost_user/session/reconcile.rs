//! The switchover: plan from what the device holds to what the front-end
//! configured, turn each op into a [`Step`] and have the device's datapath
//! execute it. What the datapath reports is what is counted: an op presetup
//! saved is one whose method was never called.
//!
//! A plan runs whenever the configuration changes in a way the device must
//! follow (features, memory, a ring that can start, anything while rings
//! run), so a start is a few small plans: the first one does the heavy
//! work (or finds it done by presetup), the later ones start rings. All
//! plans of one start are gathered in one [`StartReport`], which
//! `query-metrics` shows as `last-switchover`.

use presetup::{ConfigOp, DeviceConfig, OpClass, ValidConfig};
use serde::Serialize;

use super::{Applied, Session, SessionError};
use crate::metrics::SwitchoverReport;
use crate::vhost_user::datapath::{DatapathError, Outcome, Step};
use crate::vhost_user::device::{RingStart, StopMode};
use crate::vhost_user::vring::RingGuestAddresses;

/// Why a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Purpose {
    /// A message changed the configuration: part of a start (or of a
    /// change while running).
    Message,
    /// An early configuration (control API `presetup`, or the in-band
    /// bracket): done ahead of the start, no part of it.
    Early,
}

/// What the datapath did for a plan (the control API's `presetup` reply).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OpsReport {
    /// Heavy ops executed, in order (`presetup::ConfigOp` names).
    pub heavy_executed: Vec<&'static str>,
    /// Heavy ops the datapath had nothing to do for.
    pub heavy_not_needed: Vec<&'static str>,
    /// Light ops executed.
    pub light_executed: usize,
}

impl OpsReport {
    fn add(&mut self, name: &'static str, class: OpClass, outcome: Outcome) {
        match (class, outcome) {
            (OpClass::Heavy, Outcome::Done) => self.heavy_executed.push(name),
            (OpClass::Heavy, Outcome::NotNeeded) => self.heavy_not_needed.push(name),
            (OpClass::Light, _) => self.light_executed += 1,
        }
    }
}

/// The plans of one start, gathered.
#[derive(Clone, Debug)]
pub(super) struct StartReport {
    early: bool,
    fallback: Option<&'static str>,
    ops: OpsReport,
    /// Heavy ops a full configuration would have applied that the start's
    /// first plan did not contain.
    heavy_skipped: Vec<&'static str>,
}

impl StartReport {
    fn metrics(&self) -> SwitchoverReport {
        SwitchoverReport {
            early: self.early,
            fallback: self.fallback,
            heavy_applied: self.ops.heavy_executed.clone(),
            heavy_skipped: self.heavy_skipped.clone(),
            heavy_not_needed: self.ops.heavy_not_needed.clone(),
            light_applied: self.ops.light_executed,
        }
    }
}

/// A plan op turned into what runs: a step for the datapath, something the
/// session does itself, or nothing (an eventfd the datapath has already).
enum Prepared {
    Step(Step),
    Session,
    Nothing,
}

impl Session {
    /// The configuration the front-end set up, as presetup describes it:
    /// what plans aim at and what `query-config` serves.
    pub(super) fn desired_config(&self) -> DeviceConfig {
        let rings = self
            .rings
            .iter()
            .enumerate()
            .filter_map(|(index, ring)| ring.describe(u16::try_from(index).ok()?))
            .filter(|ring| self.table.holds_ring(&ring.addresses))
            .collect();
        DeviceConfig {
            version: presetup::FORMAT_VERSION,
            acked_features: self.acked_features,
            protocol_features: self.acked_protocol_features,
            memory: self.table.describe(),
            rings,
            device: self.device.device_config(),
        }
    }

    /// After a message that changed the configuration: plan and execute
    /// what the device must follow now. Nothing happens before the
    /// front-end set its features (the configuration is incomplete until
    /// then), nor for the settings of a ring (`ring_only`: the ring
    /// message's index) that neither runs nor can start yet.
    pub(super) fn reconcile(&mut self, ring_only: Option<u32>) -> Result<(), SessionError> {
        // Inside a presetup bracket the configuration is planned once, at
        // its END (and an abandoned bracket is not planned at all: the start
        // configures the device in full).
        if !self.features_set || self.bracket.is_open() {
            return Ok(());
        }
        if let Some(index) = ring_only {
            // A ring's settings matter to the datapath only once the ring
            // can start (its kick waits) or while it runs; until then they
            // are only recorded, and the kick's plan takes them.
            let matters = usize::try_from(index)
                .ok()
                .and_then(|i| self.rings.get(i))
                .is_some_and(|ring| ring.kick.is_some() || ring.running);
            if !matters {
                return Ok(());
            }
        }
        if self.may_defer {
            self.deferred = true;
            return Ok(());
        }
        let desired = self.desired_config();
        let target = ValidConfig::new(desired).map_err(SessionError::Invalid)?;
        self.reconcile_to(target, Purpose::Message).map(|_| ())
    }

    /// Plan from what the device holds to `target`, execute the plan and
    /// account for it.
    pub(super) fn reconcile_to(
        &mut self,
        target: ValidConfig,
        purpose: Purpose,
    ) -> Result<OpsReport, SessionError> {
        // The first plan of a start is compared with a full configuration
        // (what presetup saved); the ones after it only need their ops.
        let accounted = purpose == Purpose::Early || self.start.is_none();
        let (ops, skipped, fallback) = match &self.applied {
            Applied::Held(held) if !accounted => {
                (presetup::plan_delta(held, &target), Vec::new(), None)
            }
            Applied::Held(held) => {
                let plan = presetup::plan(held, &target);
                if let Some(reason) = &plan.fallback {
                    log::warn!(
                        "{}: what the device holds does not plan ({}): {}; configuring it in full",
                        self.name,
                        reason.label(),
                        crate::error_chain(reason)
                    );
                }
                let fallback = plan.fallback.as_ref().map(presetup::FallbackReason::label);
                (plan.ops, plan.skipped_ops, fallback)
            }
            Applied::Fresh => (presetup::plan_full(&target).ops, Vec::new(), None),
            Applied::Untrusted => {
                let mut ops = vec![ConfigOp::Reset];
                ops.extend(presetup::plan_full(&target).ops);
                (ops, Vec::new(), Some("untrusted"))
            }
        };
        if ops.is_empty() {
            return Ok(OpsReport::default());
        }
        if ops.first() == Some(&ConfigOp::Reset) {
            // Everything goes: rings stop (their kicks are kept, so the
            // full plan starts them again). The session keeps the mappings
            // the full plan maps again (their fds are spent: `prepare` hands
            // the datapath the mapping it has) and drops the others.
            self.stop_all_rings(StopMode::Detach);
            let keep: Vec<presetup::RegionKey> = target.memory.iter().map(|r| r.key()).collect();
            for region in self.memory.describe() {
                if !keep.contains(&region.key()) {
                    self.memory.unmap(&region.key());
                }
            }
        }
        let mut report = OpsReport::default();
        let mut steps = Vec::with_capacity(ops.len());
        let mut named = Vec::with_capacity(ops.len());
        let mut memory_changed = false;
        for op in &ops {
            if matches!(
                op,
                ConfigOp::MapRegion { .. } | ConfigOp::UnmapRegion { .. } | ConfigOp::Reset
            ) {
                memory_changed = true;
            }
            match self.prepare(op)? {
                Prepared::Step(step) => {
                    named.push((op.name(), op.class(), step_ring(&step)));
                    steps.push(step);
                }
                Prepared::Session => report.add(op.name(), op.class(), Outcome::Done),
                Prepared::Nothing => {}
            }
        }
        if memory_changed {
            self.memory.publish()?;
            self.table.drop_fds();
        }
        let results = self.device.execute(steps);
        let executed = results.len();
        let mut failure = None;
        for ((name, class, started), result) in named.iter().zip(results) {
            match result {
                Ok(outcome) => {
                    report.add(name, *class, outcome);
                    if let Some(ring) = started {
                        self.ring_started(*ring);
                    }
                }
                Err(source) => {
                    failure = Some((*name, source));
                    break;
                }
            }
        }
        if failure.is_none() && executed < named.len() {
            failure = Some(("plan", DatapathError::Gone));
        }
        if purpose == Purpose::Message {
            self.account_start(&report, &skipped, fallback);
        }
        if let Some((op, source)) = failure {
            self.applied = Applied::Untrusted;
            self.status.raise_needs_reset();
            log::error!(
                "{}: {op} failed: {}; the device needs a reset",
                self.name,
                crate::error_chain(&source)
            );
            return Err(SessionError::Plan { op, source });
        }
        self.applied = Applied::Held(target.into_inner());
        Ok(report)
    }

    /// The step for `op`, with what the session resolves for it.
    fn prepare(&mut self, op: &ConfigOp) -> Result<Prepared, SessionError> {
        Ok(Prepared::Step(match op {
            ConfigOp::Reset => Step::Reset,
            ConfigOp::SetProtocolFeatures { .. } => return Ok(Prepared::Session),
            ConfigOp::SetFeatures { features } => Step::SetFeatures {
                features: *features,
            },
            ConfigOp::ConfigureOffloads { features } => Step::ConfigureOffloads {
                features: *features,
            },
            ConfigOp::UnmapRegion { region } => {
                self.memory.unmap(region);
                Step::UnmapRegion { region: *region }
            }
            ConfigOp::MapRegion { region } => {
                let key = region.key();
                // After a reset the session may hold the mapping already.
                let mapped = match self.memory.mapped(&key) {
                    Some(mapped) => {
                        self.memory.set_user_addr(&key, region.user_addr);
                        mapped
                    }
                    None => {
                        let fd = self.table.take_fd(&key).ok_or(
                            crate::vhost_user::memory::MemoryError::NoFd(key.guest_phys_addr.0),
                        )?;
                        self.memory.map(region, fd)?
                    }
                };
                Step::MapRegion { region: mapped }
            }
            ConfigOp::SetRegionUserAddr { region, user_addr } => {
                self.memory.set_user_addr(region, *user_addr);
                return Ok(Prepared::Session);
            }
            ConfigOp::OpenStorage { readonly, direct } => Step::OpenStorage {
                readonly: *readonly,
                direct: *direct,
            },
            ConfigOp::DestroyIoRing { queue } => Step::DestroyIoRing { queue: *queue },
            ConfigOp::CreateIoRing { queue, depth } => Step::CreateIoRing {
                queue: *queue,
                depth: *depth,
            },
            ConfigOp::CreateQueue { pair } => Step::CreateQueue { pair: *pair },
            ConfigOp::ProgramRss { rss } => Step::ProgramRss { rss: rss.clone() },
            ConfigOp::DestroyQueue { pair } => Step::DestroyQueue { pair: *pair },
            ConfigOp::SetMtu { mtu } => Step::SetMtu { mtu: *mtu },
            ConfigOp::SetMac { mac } => Step::SetMac { mac: *mac },
            ConfigOp::SetWriteback { writeback } => Step::SetWriteback {
                writeback: *writeback,
            },
            ConfigOp::ResetRing { ring } => {
                if self.ring(*ring).is_some_and(|state| state.running) {
                    self.stop_ring(*ring, StopMode::Detach, false);
                }
                Step::ResetRing { ring: *ring }
            }
            ConfigOp::SetRingSize { ring, size } => Step::SetRingSize {
                ring: *ring,
                size: *size,
            },
            ConfigOp::SetRingAddresses { ring, addresses } => Step::SetRingAddresses {
                ring: *ring,
                addresses: self.translate_ring(*ring, addresses)?,
            },
            ConfigOp::SetRingBase { ring, next_avail } => Step::SetRingBase {
                ring: *ring,
                next_avail: *next_avail,
            },
            ConfigOp::SetRingKick { ring, .. } => match self.ring_start(*ring)? {
                Some(start) => Step::SetRingKick {
                    start: Box::new(start),
                },
                None => return Ok(Prepared::Nothing),
            },
            ConfigOp::SetRingCall { ring, .. } => {
                let Some(state) = self.ring_mut(*ring) else {
                    return Ok(Prepared::Nothing);
                };
                if !state.call_pending {
                    return Ok(Prepared::Nothing);
                }
                state.call_pending = false;
                Step::SetRingCall {
                    ring: *ring,
                    call: state.call.clone(),
                }
            }
            ConfigOp::SetRingEnabled { ring, enabled } => Step::SetRingEnabled {
                ring: *ring,
                enabled: *enabled,
            },
        }))
    }

    /// A ring's front-end addresses through the current table.
    fn translate_ring(
        &self,
        ring: u16,
        addresses: &presetup::RingAddresses,
    ) -> Result<RingGuestAddresses, SessionError> {
        let translate = |which, addr: presetup::FrontendAddr| {
            self.table
                .translate(addr.0)
                .ok_or(SessionError::RingAddress {
                    index: u32::from(ring),
                    which,
                    addr: addr.0,
                })
        };
        Ok(RingGuestAddresses {
            desc_table: translate("descriptor table", addresses.desc_table)?,
            avail_ring: translate("avail ring", addresses.avail_ring)?,
            used_ring: translate("used ring", addresses.used_ring)?,
        })
    }

    /// What the datapath needs to start `ring`, if it can start now: a
    /// kick fd waits, it does not run, and no presetup bracket is open
    /// (guest RAM has not been migrated yet inside one).
    fn ring_start(&mut self, ring: u16) -> Result<Option<RingStart>, SessionError> {
        let bracket_open = self.bracket.is_open();
        let event_idx =
            self.acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled; with
        // it they wait for SET_VRING_ENABLE (vhost-user spec, "Ring states").
        let start_enabled = self.acked_features
            & vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            == 0;
        let suspendable = self.suspend_negotiated();
        let inflight = self.inflight.as_ref().and_then(|region| region.queue(ring));
        let name = self.name.clone();
        let Some(state) = self.ring(ring) else {
            return Ok(None);
        };
        if state.running || state.kick.is_none() {
            return Ok(None);
        }
        let Some(addresses) = state.addresses else {
            return Ok(None);
        };
        if bracket_open {
            // The RFC sends no kick fd inside the bracket; one that came
            // anyway must not start a ring over memory not migrated yet.
            log::warn!("{name}: kick fd for queue {ring} inside a presetup bracket is dropped; the queue starts with the real start");
            if let Some(state) = self.ring_mut(ring) {
                state.kick = None;
            }
            return Ok(None);
        }
        self.check_ring_extent(u32::from(ring), state.size, &addresses)?;
        let guest = self.translate_ring(ring, &addresses)?;
        if self.inflight.is_some() && inflight.is_none() {
            log::warn!(
                "{name}: queue {ring} is beyond the inflight region's queues; its requests are not tracked"
            );
        }
        let Some(state) = self.ring_mut(ring) else {
            return Ok(None);
        };
        let Some(kick) = state.kick.take() else {
            return Ok(None);
        };
        if start_enabled {
            state.enabled = true;
        }
        state.call_pending = false;
        Ok(Some(RingStart {
            ring,
            size: state.size,
            addresses: guest,
            next_avail: state.next_avail,
            event_idx,
            enabled: state.enabled,
            kick,
            call: state.call.clone(),
            inflight,
            suspendable,
        }))
    }

    /// Add a message plan to the current start's report (opening one if
    /// no start is under way) and publish it.
    fn account_start(
        &mut self,
        report: &OpsReport,
        skipped: &[ConfigOp],
        fallback: Option<&'static str>,
    ) {
        if report == &OpsReport::default() && self.start.is_none() {
            return;
        }
        let opened = self.start.is_none();
        let early = self.early;
        let start = self.start.get_or_insert_with(|| StartReport {
            early,
            fallback,
            ops: OpsReport::default(),
            heavy_skipped: skipped
                .iter()
                .filter(|op| op.class() == OpClass::Heavy)
                .map(ConfigOp::name)
                .collect(),
        });
        if opened {
            self.early = false;
        }
        start.ops.heavy_executed.extend(&report.heavy_executed);
        start.ops.heavy_not_needed.extend(&report.heavy_not_needed);
        start.ops.light_executed += report.light_executed;
        let published = start.metrics();
        let start_early = start.early;
        self.metrics.record_switchover(published);
        let heavy_skipped = if opened {
            skipped
                .iter()
                .filter(|op| op.class() == OpClass::Heavy)
                .count()
        } else {
            0
        };
        self.metrics.record_presetup(|counts| {
            counts.heavy_applied += report.heavy_executed.len() as u64;
            counts.heavy_skipped += heavy_skipped as u64;
            counts.light_applied += report.light_executed as u64;
            if opened {
                if fallback.is_some() {
                    counts.fallbacks += 1;
                } else if start_early {
                    counts.hits += 1;
                }
            }
        });
        if opened {
            if start_early {
                log::info!(
                    "{}: start uses the early configuration: {} heavy op(s) done before it",
                    self.name,
                    heavy_skipped
                );
            } else {
                log::debug!("{}: start without an early configuration", self.name);
            }
        }
    }

    /// The current start ended (its rings stopped, or the front-end left).
    pub(super) fn end_start(&mut self) {
        self.start = None;
    }
}

/// The ring a step starts, if it is a kick.
fn step_ring(step: &Step) -> Option<u16> {
    match step {
        Step::SetRingKick { start } => Some(start.ring),
        _ => None,
    }
}
