//! A `vhost-agent migrate` run whose migration is held short of its stop
//! until the test has made the condition the stop must meet (requests in
//! flight, for the handoff), then let go.
//!
//! When QEMU stops the guest is its own decision ([`crate::migration_hold`]
//! says why a guest idle between storage completions gives no say in it).
//! The orchestrator sends `migrate` and follows it on its own monitor; the
//! test holds it through the other ([`Vm::qmp`]) the way
//! [`crate::migration_hold`] does: `downtime-limit` 1 ms before the command
//! runs, the command's own bandwidth cap at [`HELD_BANDWIDTH_MIB`], and a
//! [`LogDirtier`] once QEMU has its vhost log. Let go, bandwidth and limit
//! are back to normal and the stop comes as in any migration, with the
//! orchestrator none the wiser.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::{MigrateRun, MigrationRig, Vm};
use crate::handoff_vm::DEFAULT_DOWNTIME_LIMIT_MS;
use crate::migration_hold::{LogDirtier, BANDWIDTH, HELD_BANDWIDTH, HELD_DOWNTIME_LIMIT_MS};

/// `--max-bandwidth-mib` of a held migration ([`HELD_BANDWIDTH`]): set
/// [`MigrationRig::bandwidth_mib`] to it before making the command.
pub const HELD_BANDWIDTH_MIB: u64 = HELD_BANDWIDTH >> 20;

/// How often the held migration is looked at.
const POLL: Duration = Duration::from_millis(50);

impl MigrationRig {
    /// Run `cmd` (from [`Self::migrate_command`] with
    /// [`HELD_BANDWIDTH_MIB`]) from `src`, holding its migration short of
    /// the stop until `ready(src, query-migrate)` says the guest may stop.
    /// Panics if the migration reaches its stop (or ends) while held, or
    /// the command ends before `ready` said yes: the condition was not met.
    pub fn run_held(
        &mut self,
        cmd: Command,
        src: &mut Vm,
        mut ready: impl FnMut(&Vm, &Value) -> Result<bool, String>,
    ) -> MigrateRun {
        assert_eq!(
            self.bandwidth_mib, HELD_BANDWIDTH_MIB,
            "a held migration needs --max-bandwidth-mib {HELD_BANDWIDTH_MIB}"
        );
        let fail = |src: &Vm, what: String| -> ! {
            panic!("held migration: {what}\n{}", src.qemu.diagnostics())
        };
        let limit = json!({ "downtime-limit": HELD_DOWNTIME_LIMIT_MS });
        if let Err(e) = src.qmp.execute("migrate-set-parameters", limit) {
            fail(src, format!("migrate-set-parameters: {e}"));
        }
        let mut started = self.start(cmd);
        let mut dirtier = None;
        let mut let_go = false;
        let status = loop {
            if let Some(status) = started.child.child.try_wait().expect("try_wait") {
                break status;
            }
            if !let_go {
                let info = src
                    .qmp
                    .execute("query-migrate", json!({}))
                    .unwrap_or_else(|e| fail(src, format!("query-migrate: {e}")));
                match info["status"].as_str().unwrap_or("none") {
                    // The command has not sent `migrate` yet.
                    "none" | "setup" => {}
                    "active" => {
                        if dirtier.is_none() {
                            let pid = src.qemu.process.child.id();
                            dirtier = LogDirtier::start(pid).unwrap_or_else(|e| fail(src, e));
                        }
                        let now =
                            dirtier.is_some() && ready(src, &info).unwrap_or_else(|e| fail(src, e));
                        if now {
                            dirtier = None;
                            let normal = json!({
                                "max-bandwidth": BANDWIDTH,
                                "downtime-limit": DEFAULT_DOWNTIME_LIMIT_MS,
                            });
                            if let Err(e) = src.qmp.execute("migrate-set-parameters", normal) {
                                fail(src, format!("letting go: {e}"));
                            }
                            eprintln!(
                                "held migration let go after {} RAM passes",
                                info["ram"]["dirty-sync-count"]
                            );
                            let_go = true;
                        }
                    }
                    other => fail(
                        src,
                        format!("the migration reached {other} while held: {info}"),
                    ),
                }
            }
            std::thread::sleep(POLL);
        };
        drop(dirtier);
        let run = started.collect(status);
        assert!(
            let_go,
            "vhost-agent migrate ended before the stop's condition was made:\n{}",
            run.stderr
        );
        run
    }
}
