//! Process helpers: build and locate the agent binary, spawn peers, wait for
//! their sockets, and make sure they die with the test (or the run of the
//! demo or the experiment that started them).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the frontend crate lives one level below the workspace root")
        .to_path_buf()
}

/// The agent binary, once known ([`agent_binary`], [`use_agent_binary`]).
static BIN: OnceLock<PathBuf> = OnceLock::new();

/// Make [`agent_binary`] return `path` from now on (the first call wins):
/// `vhost-agent experiment` spawns agents from its own executable, so it
/// never needs a workspace or cargo.
pub fn use_agent_binary(path: PathBuf) {
    let _ = BIN.set(path);
}

/// Path of the `vhost-agent` binary that rigs spawn: the one given to
/// [`use_agent_binary`], else `VHOST_AGENT_BIN` (without a build), else
/// the workspace's release binary, built once per process (tests).
pub fn agent_binary() -> PathBuf {
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("VHOST_AGENT_BIN") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "vhost-agent",
                "--bin",
                "vhost-agent",
            ])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build for the agent binary");
        assert!(status.success(), "cargo build of vhost-agent failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join("target"));
        let bin = target.join("release").join("vhost-agent");
        assert!(bin.exists(), "agent binary missing at {}", bin.display());
        bin
    })
    .clone()
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard {
    /// The process; public so a test can signal or wait on it itself.
    pub child: Child,
    /// What the process is, for messages.
    pub name: String,
}

impl ChildGuard {
    /// Send `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we own; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Wait for exit up to `timeout`; returns the exit status if it exited.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until `path` exists. No probing connect: the agent and
/// qemu-storage-daemon serve one front-end at a time, and a probe would be
/// that front-end.
pub fn wait_for_path(path: &Path, timeout: Duration, child: &mut ChildGuard) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Ok(Some(status)) = child.child.try_wait() {
            panic!(
                "{} exited with {status} before {} appeared",
                child.name,
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not create {}",
            child.name,
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawn `vhost-agent serve` with the given `--blk` specs (each like
/// `socket=PATH,image=PATH,num-queues=2`) and extra arguments, and wait until
/// every socket exists. Agent stderr goes to `log_path` when given.
pub fn spawn_agent(
    blk_specs: &[String],
    extra_args: &[&str],
    log_path: Option<&Path>,
) -> ChildGuard {
    let mut agent = crate::agent::AgentCommand::new().args(extra_args.iter().copied());
    for spec in blk_specs {
        agent = agent.blk(spec.as_str());
    }
    if let Some(path) = log_path {
        agent = agent.log(path);
    }
    agent.spawn()
}

/// Create a sparse image file of `size_bytes`, filled with zeroes.
pub fn create_image(path: &Path, size_bytes: u64) -> io::Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(size_bytes)
}

/// Is `program` on PATH?
pub fn have_program(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// One request to an agent's control socket (`serve --control PATH`,
/// docs/control-api.md): the `return` value, or Err with the error reply
/// or the I/O failure.
pub fn control_execute(
    control: &Path,
    command: &str,
    arguments: serde_json::Value,
) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(control)
        .map_err(|e| format!("connect to {}: {e}", control.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut line = serde_json::json!({ "execute": command, "arguments": arguments }).to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("send {command}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("read the reply to {command}: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| format!("reply to {command} {reply:?}: {e}"))?;
    match value.get("return") {
        Some(ret) => Ok(ret.clone()),
        None => Err(format!("{command}: {value}")),
    }
}

/// Spawn `vhost-agent serve` with `--net` specs (each like
/// `socket=PATH,dataplane=loop`) and extra arguments, and wait until every
/// socket exists. Agent stderr goes to `log_path` when given.
pub fn spawn_net_agent(
    net_specs: &[String],
    extra_args: &[&str],
    log_path: Option<&Path>,
) -> ChildGuard {
    let mut agent = crate::agent::AgentCommand::new().args(extra_args.iter().copied());
    for spec in net_specs {
        agent = agent.net(spec.as_str());
    }
    if let Some(path) = log_path {
        agent = agent.log(path);
    }
    agent.spawn()
}
