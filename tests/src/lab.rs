//! The lab guest: a TCG guest on Debian trixie's 6.12 kernel, which has
//! vhost-net, vhost-vdpa and VDUSE (this host's kernel has none), for tests
//! of the kernel datapaths. A test builds a [`Payload`] (the agent, a
//! front-end, tools and a shell script), [`Lab::run`] boots the lab with it
//! appended to the cached base initramfs and returns what the guest
//! reported.
//!
//! The base (kernel + busybox, dash, iproute2's `ip` and `vdpa`, trixie's
//! libc, the vhost/vDPA/VDUSE/tun modules) is built by
//! `tests/lab/build-lab.sh` into `target/lab` (or `VHOST_LAB_DIR`) and
//! cached. Its `/init` (`tests/lab/init`) loads the modules, runs
//! `/lab/payload.sh`, copies its output to the serial console and prints
//! one verdict line, `LAB-VERDICT: PASS|FAIL rc=N ...`, PASS if and only if
//! the script exited 0. Result lines the script prints,
//! `LAB-RESULT key=value ...`, come back as [`LabRun::results`].
//!
//! QEMU 10 runs it under TCG (`-smp 2`: parallel translation, and two vCPUs
//! for two agents and a front-end), 2 GiB of RAM, no network device, the
//! serial console in a file, and a hard timeout.
//!
//! ```no_run
//! use vhost_agent_tests::lab::{lab, LabConfig, Payload};
//! let mut payload = Payload::new(". /etc/lab/lib.sh\nlab_result kernel=$(uname -r)\n");
//! payload.binary("/usr/bin/vhost-agent", &vhost_agent_tests::support::agent_binary()).unwrap();
//! let dir = tempfile::tempdir().unwrap();
//! let run = lab().run(&payload, &LabConfig::new("example"), dir.path()).unwrap();
//! assert!(run.value("kernel").unwrap().starts_with("6.12"));
//! ```

pub mod cpio;
pub mod payload;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use payload::Payload;

use crate::qemu::log_tail;
use crate::support::{self, ChildGuard};

/// The marker of the verdict line.
pub const VERDICT_MARKER: &str = "LAB-VERDICT: ";
/// The marker of a result line.
pub const RESULT_MARKER: &str = "LAB-RESULT ";

/// Lines of the serial console a failure message carries.
const SERIAL_TAIL_LINES: usize = 120;

/// A lab run did not give a verdict, or gave FAIL.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// `tests/lab/build-lab.sh` failed.
    #[error("building the lab guest failed:\n{log}")]
    Build {
        /// Its output.
        log: String,
    },
    /// The payload could not be assembled.
    #[error("lab payload: {what}")]
    Payload {
        /// What went wrong.
        what: String,
    },
    /// QEMU could not be started.
    #[error("starting QEMU ({command}): {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest gave no verdict within the run's timeout (QEMU was
    /// killed).
    #[error("lab {name}: no verdict within {timeout:?}\n{diagnostics}")]
    Timeout {
        /// The run's name.
        name: String,
        /// Its timeout.
        timeout: Duration,
        /// Serial tail and QEMU's output.
        diagnostics: String,
    },
    /// QEMU exited without a verdict (a kernel panic, a bad initramfs).
    #[error("lab {name}: QEMU exited ({status}) without a verdict\n{diagnostics}")]
    NoVerdict {
        /// The run's name.
        name: String,
        /// QEMU's exit status.
        status: String,
        /// Serial tail and QEMU's output.
        diagnostics: String,
    },
    /// The guest said FAIL.
    #[error("lab {name}: verdict FAIL {details}\n{diagnostics}")]
    Failed {
        /// The run's name.
        name: String,
        /// The verdict's details.
        details: String,
        /// Serial tail and QEMU's output.
        diagnostics: String,
    },
}

/// How to boot one lab run.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Names the run's files (`NAME-serial.log`, ...) and messages.
    pub name: String,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Hard limit from QEMU's start to the verdict; QEMU is killed then.
    pub timeout: Duration,
    /// More `key=value` words for the kernel command line (e.g.
    /// `lab_timeout`, or parameters the payload reads from /proc/cmdline).
    pub params: Vec<(String, String)>,
}

impl LabConfig {
    /// 2 GiB, 2 vCPUs, a 10-minute limit.
    pub fn new(name: &str) -> LabConfig {
        LabConfig {
            name: name.to_string(),
            mem_mib: 2048,
            cpus: 2,
            timeout: Duration::from_secs(600),
            params: Vec::new(),
        }
    }

    /// Set the hard timeout (the guest's own payload timeout follows it).
    pub fn timeout(mut self, timeout: Duration) -> LabConfig {
        self.timeout = timeout;
        self
    }

    /// Add a kernel command-line parameter.
    pub fn param(mut self, key: &str, value: impl ToString) -> LabConfig {
        self.params.push((key.to_string(), value.to_string()));
        self
    }

    fn kernel_cmdline(&self) -> String {
        // The payload is stopped a little before QEMU is killed, so its
        // output and the verdict still reach the log.
        let guest_timeout = self.timeout.as_secs().saturating_sub(15).max(10);
        let mut line = format!("console=ttyS0 panic=-1 lab_timeout={guest_timeout}");
        for (k, v) in &self.params {
            line.push_str(&format!(" {k}={v}"));
        }
        line
    }
}

/// The verdict line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabVerdict {
    /// PASS (true) or FAIL.
    pub passed: bool,
    /// Everything after PASS/FAIL: `rc=`, `modules_loaded=`,
    /// `modules_failed=`, `payload_cs=`, `uptime_cs=`.
    pub details: String,
}

impl LabVerdict {
    /// The value of `key=` in the details.
    pub fn field(&self, key: &str) -> Option<&str> {
        field_of(&self.details, key)
    }

    fn parse(line: &str) -> Option<LabVerdict> {
        let rest = line[line.find(VERDICT_MARKER)? + VERDICT_MARKER.len()..].trim_end();
        let (word, details) = rest.split_once(' ').unwrap_or((rest, ""));
        let passed = match word {
            "PASS" => true,
            "FAIL" => false,
            _ => return None,
        };
        Some(LabVerdict {
            passed,
            details: details.to_string(),
        })
    }
}

fn field_of<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// What a lab run reported.
#[derive(Debug, Clone)]
pub struct LabRun {
    /// The verdict.
    pub verdict: LabVerdict,
    /// Each `LAB-RESULT` line, after the marker, in order.
    pub results: Vec<String>,
    /// The whole serial console.
    pub serial: String,
    /// Where it is.
    pub serial_log: PathBuf,
    /// From QEMU's start to the verdict on the console (host clock).
    pub boot_to_verdict: Duration,
    /// The payload archive's size in bytes.
    pub payload_bytes: u64,
}

impl LabRun {
    /// The value of `key=` in the last result line that has it.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.results.iter().rev().find_map(|l| field_of(l, key))
    }

    /// Every value of `key=`, in order.
    pub fn values(&self, key: &str) -> Vec<&str> {
        self.results
            .iter()
            .filter_map(|l| field_of(l, key))
            .collect()
    }

    /// [`LabRun::value`] parsed as a number; panics naming the key and the
    /// results if it is missing or not a number (for assertions).
    pub fn number(&self, key: &str) -> u64 {
        let value = self.value(key).unwrap_or_else(|| {
            panic!(
                "no LAB-RESULT {key}= in the lab's results:\n{}\nserial tail:\n{}",
                self.results.join("\n"),
                tail(&self.serial, SERIAL_TAIL_LINES)
            )
        });
        value
            .parse()
            .unwrap_or_else(|_| panic!("LAB-RESULT {key}={value} is not a number"))
    }

    /// The guest's uptime at the verdict (its clock), if reported.
    pub fn guest_uptime(&self) -> Option<Duration> {
        let cs: u64 = self.verdict.field("uptime_cs")?.parse().ok()?;
        Some(Duration::from_millis(cs * 10))
    }
}

/// The built lab: kernel, base initramfs, and the libraries the base holds.
#[derive(Debug, Clone)]
pub struct Lab {
    /// `-kernel`.
    pub kernel: PathBuf,
    /// The base initramfs (payloads are appended to a copy).
    pub base_initrd: PathBuf,
    /// Sonames in the base's library directory.
    pub base_libs: BTreeSet<String>,
    /// The kernel package, e.g. `linux-image-6.12.117+deb13-amd64`.
    pub kernel_package: String,
}

/// Where the lab is built: `VHOST_LAB_DIR`, or `<target dir>/lab`.
pub fn lab_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VHOST_LAB_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| support::workspace_root().join("target"));
    target.join("lab")
}

/// Build the lab once per process (`build-lab.sh` is cached on disk and
/// locked, so parallel test processes are fine). Panics with the build's
/// output if it fails: lab tests never skip.
pub fn lab() -> &'static Lab {
    static LAB: OnceLock<Result<Lab, String>> = OnceLock::new();
    match LAB.get_or_init(|| build_lab().map_err(|e| e.to_string())) {
        Ok(lab) => lab,
        Err(e) => panic!("{e}"),
    }
}

fn build_lab() -> Result<Lab, LabError> {
    crate::qemu::require_programs(&[
        "qemu-system-x86_64",
        "apt-get",
        "dpkg-deb",
        "depmod",
        "xz",
        "zstd",
        "cpio",
    ]);
    let script = support::workspace_root().join("tests/lab/build-lab.sh");
    let dir = lab_dir();
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Build {
            log: format!("running {}: {e}", script.display()),
        })?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(LabError::Build {
            log: format!(
                "{} {} ({}):\n{log}\nRun `sudo scripts/install-test-deps.sh` if tools are missing.",
                script.display(),
                dir.display(),
                out.status
            ),
        });
    }
    eprintln!("lab ready in {:.1?}: {}", started.elapsed(), log.trim());
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| LabError::Build {
            log: format!(
                "build-lab.sh succeeded but {}: {e}",
                dir.join(name).display()
            ),
        })
    };
    let lab = Lab {
        kernel: dir.join("vmlinuz"),
        base_initrd: dir.join("initramfs.img"),
        base_libs: read("base-libs")?.lines().map(str::to_string).collect(),
        kernel_package: read("kernel-version")?.trim().to_string(),
    };
    for f in [&lab.kernel, &lab.base_initrd] {
        if !f.is_file() {
            return Err(LabError::Build {
                log: format!("build-lab.sh succeeded but {} is missing", f.display()),
            });
        }
    }
    Ok(lab)
}

impl Lab {
    /// Boot the lab with `payload`, files in `dir`, and wait for the
    /// verdict. Err unless the verdict is PASS (the error carries the
    /// verdict, the serial tail and QEMU's output).
    pub fn run(
        &self,
        payload: &Payload,
        config: &LabConfig,
        dir: &Path,
    ) -> Result<LabRun, LabError> {
        let run = self.run_any(payload, config, dir)?;
        if run.verdict.passed {
            return Ok(run);
        }
        Err(LabError::Failed {
            name: config.name.clone(),
            details: run.verdict.details.clone(),
            // The results first: on a slow boot the serial tail can be
            // all kernel noise printed after them.
            diagnostics: format!(
                "----- results -----\n{}----- serial ({}) -----\n{}",
                run.results
                    .iter()
                    .map(|r| format!("{RESULT_MARKER}{r}\n"))
                    .collect::<String>(),
                run.serial_log.display(),
                tail(&run.serial, SERIAL_TAIL_LINES)
            ),
        })
    }

    /// Like [`Lab::run`], but a FAIL verdict is returned too (for tests of
    /// the failure path).
    pub fn run_any(
        &self,
        payload: &Payload,
        config: &LabConfig,
        dir: &Path,
    ) -> Result<LabRun, LabError> {
        let name = &config.name;
        let archive = dir.join(format!("{name}-payload.cpio"));
        let initrd = dir.join(format!("{name}-initrd.img"));
        let serial_log = dir.join(format!("{name}-serial.log"));
        let qemu_log = dir.join(format!("{name}-qemu.log"));
        // A run before this one in the same directory left its serial log:
        // read before QEMU truncates it, its verdict would pass for ours.
        match std::fs::remove_file(&serial_log) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LabError::Spawn {
                    command: format!("remove the old {}", serial_log.display()),
                    source,
                })
            }
        }
        let payload_bytes = payload.write_archive(&archive, &self.base_libs)?;
        concatenate(&[&self.base_initrd, &archive], &initrd)?;
        let _ = std::fs::remove_file(&archive);

        let mem = config.mem_mib.to_string();
        let smp = config.cpus.to_string();
        let serial_arg = format!("file:{}", serial_log.display());
        let cmdline = config.kernel_cmdline();
        let args: Vec<&str> = vec![
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            &smp,
            "-m",
            &mem,
            "-kernel",
            path_str(&self.kernel),
            "-initrd",
            path_str(&initrd),
            "-append",
            &cmdline,
            "-serial",
            &serial_arg,
            "-no-reboot",
            "-display",
            "none",
            "-nodefaults",
            "-nic",
            "none",
        ];
        let command = format!("qemu-system-x86_64 {}", args.join(" "));
        let log_file = std::fs::File::create(&qemu_log).map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
        let log_dup = log_file.try_clone().map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
        let started = Instant::now();
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log_dup)
            .stderr(log_file)
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: command.clone(),
                source,
            })?;
        eprintln!("lab {name}: {command}");
        let mut qemu = ChildGuard {
            child,
            name: format!("lab {name}"),
        };
        let diagnostics = |serial: &str| {
            format!(
                "command: {command}\nelapsed: {:.1?}\n----- serial ({}) -----\n{}----- QEMU ({}) -----\n{}",
                started.elapsed(),
                serial_log.display(),
                tail(serial, SERIAL_TAIL_LINES),
                qemu_log.display(),
                log_tail(&qemu_log, 30)
            )
        };
        let (verdict, boot_to_verdict) = loop {
            let serial = read_lossy(&serial_log);
            if let Some(v) = complete_lines(&serial).lines().find_map(LabVerdict::parse) {
                break (v, started.elapsed());
            }
            if let Ok(Some(status)) = qemu.child.try_wait() {
                let serial = read_lossy(&serial_log);
                if let Some(v) = complete_lines(&serial).lines().find_map(LabVerdict::parse) {
                    break (v, started.elapsed());
                }
                let _ = std::fs::remove_file(&initrd);
                return Err(LabError::NoVerdict {
                    name: name.clone(),
                    status: status.to_string(),
                    diagnostics: diagnostics(&serial),
                });
            }
            if started.elapsed() >= config.timeout {
                qemu.signal(libc::SIGKILL);
                let _ = qemu.wait_timeout(Duration::from_secs(10));
                let _ = std::fs::remove_file(&initrd);
                return Err(LabError::Timeout {
                    name: name.clone(),
                    timeout: config.timeout,
                    diagnostics: diagnostics(&read_lossy(&serial_log)),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // The guest powers off right after the verdict.
        if qemu.wait_timeout(Duration::from_secs(30)).is_none() {
            eprintln!("lab {name}: QEMU still running 30 s after the verdict; killing it");
            qemu.signal(libc::SIGKILL);
            let _ = qemu.wait_timeout(Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(&initrd);
        let serial = read_lossy(&serial_log);
        keep_serial(name, &serial);
        let results = complete_lines(&serial)
            .lines()
            .filter_map(|l| {
                Some(
                    l[l.find(RESULT_MARKER)? + RESULT_MARKER.len()..]
                        .trim_end()
                        .to_string(),
                )
            })
            .collect();
        Ok(LabRun {
            verdict,
            results,
            serial,
            serial_log,
            boot_to_verdict,
            payload_bytes,
        })
    }
}

/// Keep a copy of the last run's serial log per name in
/// `<lab dir>/runs/NAME-serial.log`: a test's assertions fail after its
/// temporary directory is gone.
fn keep_serial(name: &str, serial: &str) {
    let dir = lab_dir().join("runs");
    if std::fs::create_dir_all(&dir).is_ok() {
        let path = dir.join(format!("{name}-serial.log"));
        if std::fs::write(&path, serial).is_ok() {
            eprintln!("lab {name}: serial log kept in {}", path.display());
        }
    }
}

fn path_str(path: &Path) -> &str {
    // Test directories and target/ are UTF-8 paths on these machines.
    path.to_str().unwrap_or("/nonexistent-non-utf8-path")
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Only complete lines: the log may be caught mid-write.
fn complete_lines(text: &str) -> &str {
    match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    }
}

fn tail(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(max_lines);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} earlier lines ...]\n"));
    }
    for l in &lines[skip..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn concatenate(parts: &[&Path], out: &Path) -> Result<(), LabError> {
    let fail = |what: String| LabError::Payload { what };
    let mut dest =
        std::fs::File::create(out).map_err(|e| fail(format!("creating {}: {e}", out.display())))?;
    for part in parts {
        let mut src = std::fs::File::open(part)
            .map_err(|e| fail(format!("opening {}: {e}", part.display())))?;
        std::io::copy(&mut src, &mut dest)
            .map_err(|e| fail(format!("writing {}: {e}", out.display())))?;
    }
    Ok(())
}

/// Path of the release `labnic` tools (`labnic`, `lab-probe`), built once
/// per test process. `VHOST_LABNIC_DIR` names a directory holding them
/// instead (and skips the build).
pub fn labnic_binary(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("VHOST_LABNIC_DIR") {
            return PathBuf::from(dir);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "labnic", "--bins"])
            .current_dir(support::workspace_root())
            .status()
            .expect("running cargo build for the labnic tools");
        assert!(status.success(), "cargo build -p labnic failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| support::workspace_root().join("target"));
        target.join("release")
    });
    let bin = dir.join(name);
    assert!(bin.is_file(), "labnic tool missing at {}", bin.display());
    bin
}
