//! QEMU 11.1 from a Debian trixie tree, next to the host's QEMU 10.
//!
//! Debian bookworm has no QEMU 11; trixie-backports has 11.1 (with
//! vhost-user-blk `inflight-migration=on`, the front-end half of the
//! agent's in-flight handoff), but its binaries need trixie's libc. So
//! `scripts/install-test-deps.sh` installs it inside the debootstrapped
//! tree of `scripts/trixie-tree.sh`, and it runs from the host through the
//! tree's own dynamic loader: the process is an ordinary host process,
//! every path it sees (sockets, images, the guest kernel, memfds) is the
//! host's, and only its libraries, firmware and modules come from the tree.
//!
//! ```text
//! TREE/lib64/ld-linux-x86-64.so.2 --library-path TREE/lib/x86_64-linux-gnu:TREE/usr/lib/x86_64-linux-gnu \
//!     TREE/usr/bin/qemu-system-x86_64 -L TREE/usr/share/qemu -L TREE/usr/share/seabios ...
//! QEMU_MODULE_DIR=TREE/usr/lib/x86_64-linux-gnu/qemu
//! ```
//!
//! A missing or too old QEMU 11.1 is a test failure whose message says to
//! run `sudo scripts/install-test-deps.sh`; nothing here skips.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Where the tree is unless `VHOST_AGENT_TRIXIE` says otherwise (the same
/// default as `scripts/trixie-tree.sh`).
pub const DEFAULT_TREE: &str = "/opt/vhost-agent/trixie";

/// The oldest QEMU these tests accept: 11.1 is the first Debian build with
/// `inflight-migration` that was tried with this agent (HOST.md).
pub const MIN_VERSION: (u32, u32) = (11, 1);

/// Which QEMU runs a guest ([`crate::qemu::VmConfig::qemu`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QemuBinary {
    /// `qemu-system-x86_64` on PATH: the host's QEMU 10.
    #[default]
    Host,
    /// QEMU 11.1 from the trixie tree, run through its loader.
    Trixie,
}

/// A usable QEMU 11.1 in a trixie tree.
#[derive(Debug, Clone)]
pub struct Qemu11 {
    /// The tree's root directory.
    pub root: PathBuf,
    /// The version QEMU reports, e.g. `11.1.3`.
    pub version: String,
}

/// The tree's root: `VHOST_AGENT_TRIXIE`, or [`DEFAULT_TREE`].
pub fn tree_root() -> PathBuf {
    std::env::var_os("VHOST_AGENT_TRIXIE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TREE))
}

/// `major.minor` of a `QEMU emulator version X.Y.Z ...` line.
fn parse_version(text: &str) -> Option<(String, (u32, u32))> {
    let version = text
        .lines()
        .next()?
        .strip_prefix("QEMU emulator version ")?
        .split_whitespace()
        .next()?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((version.to_string(), (major, minor)))
}

impl Qemu11 {
    /// Find QEMU in the tree at `root` and check its version; Err says what
    /// is missing and how to install it.
    pub fn locate(root: &Path) -> Result<Qemu11, String> {
        let hint = "Run `sudo scripts/install-test-deps.sh` (from the workspace root): it \
                    installs QEMU 11.1 from trixie-backports into the trixie tree.";
        let probe = Qemu11 {
            root: root.to_path_buf(),
            version: String::new(),
        };
        for file in [probe.loader(), probe.binary()] {
            if !file.exists() {
                return Err(format!(
                    "QEMU 11.1 is not installed: {} is missing. {hint}",
                    file.display()
                ));
            }
        }
        let out = probe
            .command()
            .arg("--version")
            .output()
            .map_err(|e| format!("running {} --version: {e}. {hint}", probe.describe()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        match parse_version(&text) {
            Some((version, number)) if out.status.success() && number >= MIN_VERSION => {
                Ok(Qemu11 {
                    root: root.to_path_buf(),
                    version,
                })
            }
            _ => Err(format!(
                "{} --version: {} ({}{}); QEMU {}.{} or newer is needed. {hint}",
                probe.describe(),
                out.status,
                text.lines().next().unwrap_or("no output"),
                String::from_utf8_lossy(&out.stderr).trim(),
                MIN_VERSION.0,
                MIN_VERSION.1
            )),
        }
    }

    /// The tree's dynamic loader, which runs the binary.
    pub fn loader(&self) -> PathBuf {
        self.root.join("lib64/ld-linux-x86-64.so.2")
    }

    /// `qemu-system-x86_64` in the tree.
    pub fn binary(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }

    /// The loader's `--library-path`: the tree's libraries only.
    fn library_path(&self) -> OsString {
        let mut path = self.root.join("lib/x86_64-linux-gnu").into_os_string();
        path.push(":");
        path.push(self.root.join("usr/lib/x86_64-linux-gnu"));
        path
    }

    /// The program to exec, the arguments that must come before QEMU's own
    /// (loader options, the binary, the firmware directories) and the
    /// environment QEMU needs (its module directory).
    pub fn invocation(&self) -> (PathBuf, Vec<OsString>, Vec<(String, OsString)>) {
        let args = vec![
            OsString::from("--library-path"),
            self.library_path(),
            self.binary().into_os_string(),
            OsString::from("-L"),
            self.root.join("usr/share/qemu").into_os_string(),
            OsString::from("-L"),
            self.root.join("usr/share/seabios").into_os_string(),
        ];
        let env = vec![(
            "QEMU_MODULE_DIR".to_string(),
            self.root
                .join("usr/lib/x86_64-linux-gnu/qemu")
                .into_os_string(),
        )];
        (self.loader(), args, env)
    }

    /// A `Command` running this QEMU; add QEMU's arguments to it.
    pub fn command(&self) -> Command {
        let (program, args, env) = self.invocation();
        let mut command = Command::new(program);
        command.args(args);
        for (key, value) in env {
            command.env(key, value);
        }
        command
    }

    /// For messages: how it is run.
    pub fn describe(&self) -> String {
        format!(
            "{} (through {})",
            self.binary().display(),
            self.loader().display()
        )
    }
}

/// QEMU 11.1 from [`tree_root`], located once per process; panics with the
/// install hint when it is missing.
pub fn require() -> Qemu11 {
    static QEMU11: OnceLock<Result<Qemu11, String>> = OnceLock::new();
    QEMU11
        .get_or_init(|| Qemu11::locate(&tree_root()))
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The `-chardev` and `-device` arguments of vhost-user-blk disk `id` on
/// `socket`, with `inflight-migration=on|off` (QEMU 11 only) and the
/// chardev's `reconnect-ms`. For [`crate::qemu::VmConfig::extra_args`]; the
/// first disk of a VM without others is `/dev/vda` in the guest.
pub fn blk_args(
    id: &str,
    socket: &Path,
    inflight_migration: bool,
    reconnect_ms: Option<u32>,
) -> Vec<String> {
    let mut chardev = format!("socket,id={id}-char,path={}", socket.display());
    if let Some(ms) = reconnect_ms {
        chardev.push_str(&format!(",reconnect-ms={ms}"));
    }
    let device = format!(
        "vhost-user-blk-pci,id={id},chardev={id}-char,num-queues=1,inflight-migration={}",
        if inflight_migration { "on" } else { "off" }
    );
    vec![
        "-chardev".to_string(),
        chardev,
        "-device".to_string(),
        device,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lines_parse() {
        let text = "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-2~bpo13+1)\nCopyright";
        assert_eq!(parse_version(text), Some(("11.1.3".to_string(), (11, 1))));
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian)").map(|v| v.1),
            Some((10, 0))
        );
        assert_eq!(parse_version("qemu-img version 11.1.3"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn a_missing_tree_names_the_install_script() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qemu11::locate(dir.path()).unwrap_err();
        assert!(err.contains("install-test-deps.sh"), "{err}");
        assert!(err.contains("is missing"), "{err}");
    }
}
