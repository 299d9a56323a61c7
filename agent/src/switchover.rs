//! Planning a device start against what the device holds: the
//! switchover plan of presetup, counted in the device's metrics. Both
//! back-ends plan their starts here.

use presetup::{DeviceConfig, ValidConfig};

/// What a device holds when its start is planned.
pub enum Held<'a> {
    /// Nothing: a start without presetup configures everything.
    Nothing,
    /// What it holds in any case (a disk's storage is open from the
    /// agent's start): a start without presetup, planned from there.
    Baseline(&'a DeviceConfig),
    /// What an early configuration set up (`presetup`).
    Early(&'a DeviceConfig),
}

/// Plan the switchover from what the device holds to `final_` and count it
/// in `metrics`; the plan's verdict is logged once.
pub fn switchover(
    name: &str,
    held: Held<'_>,
    final_: DeviceConfig,
    metrics: &crate::metrics::DeviceMetrics,
) {
    let final_ = match ValidConfig::new(final_) {
        Ok(valid) => valid,
        Err(e) => {
            log::warn!(
                "{name}: the device's own configuration does not validate ({}); presetup not counted",
                crate::error_chain(&e)
            );
            return;
        }
    };
    let (plan, early) = match held {
        Held::Nothing => (presetup::plan_full(&final_), false),
        Held::Baseline(baseline) => (presetup::plan(baseline, &final_), false),
        Held::Early(early) => (presetup::plan(early, &final_), true),
    };
    metrics.record_switchover(crate::metrics::SwitchoverReport::of(&plan, early));
    metrics.record_presetup(|counts| {
        counts.heavy_applied += plan.applied.heavy as u64;
        counts.heavy_skipped += plan.skipped.heavy as u64;
        counts.light_applied += plan.applied.light as u64;
        counts.light_skipped += plan.skipped.light as u64;
        if plan.fallback.is_some() {
            counts.fallbacks += 1;
        } else if early {
            counts.hits += 1;
        }
    });
    if !early {
        log::debug!(
            "{name}: full configuration: {} heavy and {} light op(s)",
            plan.applied.heavy,
            plan.applied.light
        );
        return;
    }
    match &plan.fallback {
        Some(reason) => log::warn!(
            "{name}: presetup fallback ({}): {}; full configuration",
            reason.label(),
            crate::error_chain(reason)
        ),
        None => log::info!(
            "{name}: presetup used: {} heavy and {} light op(s) applied, {} heavy and {} light skipped",
            plan.applied.heavy,
            plan.applied.light,
            plan.skipped.heavy,
            plan.skipped.light
        ),
    }
}
