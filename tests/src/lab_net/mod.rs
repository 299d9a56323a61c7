//! The lab's net front-end (`lab-frontend`, run inside the lab guest):
//! the test front-end driving an agent's net device over its socket, with
//! the host end of the device's tap in the same guest, reporting
//! `LAB-RESULT key=value` lines for `tests/tests/lab_vhost_net.rs`.
//!
//! * [`frames`]: numbered frames of one flow per pair;
//! * [`tapside`]: the tap's counters and a packet socket on it;
//! * [`driver`]: the guest side of the device (rings, buffers, counters,
//!   the dirty log);
//! * [`traffic`]: one phase of frames both ways, counted on both sides;
//! * [`basic`], [`migrate`], [`mod@bench`], [`vdpa`]: what the lab tests
//!   run;
//! * [`report`]: result lines and the agent's control API.

pub mod basic;
pub mod bench;
pub mod driver;
pub mod frames;
pub mod migrate;
pub mod report;
pub mod tapside;
pub mod traffic;
pub mod vdpa;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of the release `lab-frontend` binary, built once per test process
/// (`VHOST_LAB_FRONTEND` overrides it).
pub fn frontend_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("VHOST_LAB_FRONTEND") {
            return PathBuf::from(path);
        }
        let root = crate::support::workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "vhost-agent-tests",
                "--bin",
                "lab-frontend",
            ])
            .current_dir(&root)
            .status()
            .expect("running cargo build for lab-frontend");
        assert!(status.success(), "cargo build of lab-frontend failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        let bin = target.join("release").join("lab-frontend");
        assert!(bin.is_file(), "lab-frontend missing at {}", bin.display());
        bin
    })
    .clone()
}
