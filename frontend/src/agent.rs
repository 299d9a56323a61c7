//! The one way tests start `vhost-agent serve`: a builder over the
//! command line that waits for every socket the agent creates. The older
//! helpers (`support::spawn_agent`, `support::spawn_net_agent`,
//! `net_agent::NetAgent::spawn`, `netns::Netns::spawn_agent`) are thin
//! conveniences over it.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{agent_binary, wait_for_path, ChildGuard};

/// How long an agent may take to create its sockets.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// `vhost-agent serve` with its devices and options (module docs).
#[derive(Debug, Default)]
pub struct AgentCommand {
    blk: Vec<String>,
    net: Vec<String>,
    control: Option<PathBuf>,
    args: Vec<OsString>,
    log: Option<PathBuf>,
    rust_log: Option<String>,
    cpu: Option<usize>,
    prefix: Option<Command>,
}

fn socket_of(spec: &str) -> Option<&Path> {
    spec.split(',')
        .find_map(|kv| kv.strip_prefix("socket="))
        .map(Path::new)
}

impl AgentCommand {
    /// An agent with no device yet.
    pub fn new() -> AgentCommand {
        AgentCommand::default()
    }

    /// Serve a disk (`socket=PATH,image=PATH,...`, as `--blk`).
    pub fn blk(mut self, spec: impl Into<String>) -> Self {
        self.blk.push(spec.into());
        self
    }

    /// Serve a net device (`socket=PATH,dataplane=DP,...`, as `--net`).
    pub fn net(mut self, spec: impl Into<String>) -> Self {
        self.net.push(spec.into());
        self
    }

    /// Serve the control API at `path`.
    pub fn control(mut self, path: impl Into<PathBuf>) -> Self {
        self.control = Some(path.into());
        self
    }

    /// More command-line arguments after the devices.
    pub fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Agent stderr (and stdout) to `path`; inherited otherwise.
    pub fn log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// `RUST_LOG` unless the environment sets one.
    pub fn rust_log(mut self, filters: &str) -> Self {
        self.rust_log = Some(filters.to_string());
        self
    }

    /// Pin the agent to one CPU (benchmarks).
    pub fn cpu(mut self, cpu: usize) -> Self {
        self.cpu = Some(cpu);
        self
    }

    /// Run it through `prefix` (e.g. `ip netns exec NAME`): the agent
    /// binary and its arguments are appended to it.
    pub fn through(mut self, prefix: Command) -> Self {
        self.prefix = Some(prefix);
        self
    }

    /// Every socket the agent will create.
    fn sockets(&self) -> Vec<PathBuf> {
        self.blk
            .iter()
            .chain(&self.net)
            .filter_map(|spec| socket_of(spec).map(Path::to_path_buf))
            .chain(self.control.clone())
            .collect()
    }

    /// The command line, not started.
    pub fn command(&self) -> Command {
        let mut cmd = match &self.prefix {
            Some(prefix) => {
                let mut cmd = Command::new(prefix.get_program());
                cmd.args(prefix.get_args()).arg(agent_binary());
                cmd
            }
            None => Command::new(agent_binary()),
        };
        cmd.arg("serve");
        for spec in &self.blk {
            cmd.arg("--blk").arg(spec);
        }
        for spec in &self.net {
            cmd.arg("--net").arg(spec);
        }
        if let Some(control) = &self.control {
            cmd.arg("--control").arg(control);
        }
        cmd.args(&self.args);
        if let (Some(filters), None) = (&self.rust_log, std::env::var_os("RUST_LOG")) {
            cmd.env("RUST_LOG", filters);
        }
        if let Some(cpu) = self.cpu {
            pin_to_cpu(&mut cmd, cpu);
        }
        cmd
    }

    /// Start the agent and wait until every socket exists; panics (with
    /// the agent's log) if it exits or takes too long.
    pub fn spawn(self) -> ChildGuard {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null());
        match &self.log {
            Some(path) => {
                let file =
                    File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                let stdout = file.try_clone().expect("dup of a log file");
                cmd.stdout(stdout).stderr(file);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", agent_binary().display()));
        let mut guard = ChildGuard {
            child,
            name: "vhost-agent".to_string(),
        };
        for socket in self.sockets() {
            let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_for_path(&socket, SOCKET_TIMEOUT, &mut guard)
            }));
            if let Err(panic) = waited {
                let log = self
                    .log
                    .as_ref()
                    .and_then(|path| std::fs::read_to_string(path).ok())
                    .unwrap_or_default();
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{why}; agent log:\n{log}");
            }
        }
        guard
    }
}

/// Make `cmd`'s process (and every thread it will create) run on `cpu`
/// only, as `taskset -c CPU` would.
pub fn pin_to_cpu(cmd: &mut Command, cpu: usize) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls sched_setaffinity(2), which is async-signal-safe, on a set
    // built on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
