//! The `process_restart` action class: restart an allow-listed target, either a systemd unit
//! (through the [`SystemdManager`] port) or a process the agent supervises (started from argv,
//! stopped through a pidfd), then check its health within a window.
//!
//! - Config: raw serde structs (unknown fields refused) validated into [`RestartConfig`], every
//!   problem listed with its path. Only targets named there can be restarted (I7): a
//!   [`RestartTarget`] can only be made by validation.
//! - [`plan`] is pure: the steps a restart of one target takes (what a dry run reports).
//! - [`RestartExecutor`] is the I/O port: [`HostRestart`] acts, [`DryRunRestart`] only plans.
//!
//! No shell is ever invoked (I7): every process, `systemctl` and health probes included, is
//! started from an argv with [`Command`]. Signals go through a pidfd opened on our own,
//! unreaped child (or, for an instance adopted after an agent restart, opened and then proven
//! to be the recorded pid, start time and argv), so a recycled pid can never be signalled. Like `cleanup`, this module knows
//! nothing of leases: the caller passes `continue_ok`, asked before every step. Must not import
//! tokio, gRPC or the coordinator link.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::trigger::Trigger;

/// Longest `grace` or `health_window` accepted.
const MAX_WINDOW: Duration = Duration::from_secs(600);
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_HEALTH_WINDOW: Duration = Duration::from_secs(30);
/// How long a SIGKILLed process may take to be gone before the restart fails.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Pause between health polls.
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Longest a single health poll (connect, request, probe run) may take.
const HEALTH_POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes of an HTTP response read to find its status line.
const HTTP_READ_LIMIT: u64 = 1024;
/// Unit suffixes `systemctl restart` can act on.
const UNIT_SUFFIXES: [&str; 6] = [
    ".service", ".socket", ".target", ".timer", ".mount", ".path",
];
/// Characters that make a string look like a shell command line.
const SHELL_CHARS: &[char] = &[
    ';', '|', '&', '$', '>', '<', '`', '(', ')', '*', '?', '"', '\'', '\\', '\n',
];

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `[restart]` as written in `agent.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    /// The allow-list, each `[[restart.target]]`.
    #[serde(default)]
    pub target: Vec<RawRestartTarget>,
}

/// One `[[restart.target]]`: exactly one of `unit` / `argv`, exactly one of `tcp` / `http` /
/// `probe`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestartTarget {
    pub name: Option<String>,
    pub unit: Option<String>,
    pub argv: Option<RawArgv>,
    /// `SIGTERM` (default), `SIGINT`, `SIGHUP`, `SIGQUIT`, `SIGUSR1` or `SIGUSR2`.
    pub stop_signal: Option<String>,
    /// A humantime duration: how long after the stop signal before SIGKILL (default 10s).
    pub grace: Option<String>,
    pub tcp: Option<String>,
    pub http: Option<String>,
    pub probe: Option<RawArgv>,
    /// A humantime duration: how long the target has to become healthy (default 30s).
    pub health_window: Option<String>,
    /// Which findings restart it: some of "crash", "crash_loop", "memory_leak", "oom_kill"
    /// (default all four).
    pub on: Option<Vec<String>>,
    /// A humantime duration: no new restart of this target for this long after one (default:
    /// `[actions] cooldown`). Crash loops double it per restart while the loop lasts.
    pub cooldown: Option<String>,
}

/// An argv as written: a list, or a single string (refused: no shell is ever invoked).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawArgv {
    List(Vec<String>),
    Line(String),
}

/// One configuration problem: where, and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartProblem {
    pub path: String,
    pub problem: String,
}

impl std::fmt::Display for RestartProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// All problems found in one `[restart]` section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} restart problem(s): {}", .0.len(), join(.0))]
pub struct RestartProblems(pub Vec<RestartProblem>);

fn join(problems: &[RestartProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Validated restart settings: the allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartConfig {
    targets: Vec<RestartTarget>,
}

/// A validated, allow-listed target. Only [`RawRestart::validate`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartTarget {
    name: String,
    kind: TargetKind,
    health: HealthCheck,
    health_window: Duration,
    on: BTreeSet<Trigger>,
    cooldown: Option<Duration>,
}

/// How a target runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// A systemd unit, restarted through systemd.
    Unit(UnitName),
    /// A process the agent starts and stops itself.
    Supervised(Supervised),
}

/// A checked systemd unit name: `[A-Za-z0-9:_.@-]+`, not starting with `-`, with a known
/// suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitName(String);

impl UnitName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A supervised process: how to start and stop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supervised {
    /// argv[0] is absolute; run without a shell.
    pub argv: Vec<String>,
    pub stop_signal: StopSignal,
    pub grace: Duration,
}

/// A signal a target may be asked to stop with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal {
    pub number: libc::c_int,
    pub name: &'static str,
}

const STOP_SIGNALS: [StopSignal; 6] = [
    StopSignal {
        number: libc::SIGTERM,
        name: "SIGTERM",
    },
    StopSignal {
        number: libc::SIGINT,
        name: "SIGINT",
    },
    StopSignal {
        number: libc::SIGHUP,
        name: "SIGHUP",
    },
    StopSignal {
        number: libc::SIGQUIT,
        name: "SIGQUIT",
    },
    StopSignal {
        number: libc::SIGUSR1,
        name: "SIGUSR1",
    },
    StopSignal {
        number: libc::SIGUSR2,
        name: "SIGUSR2",
    },
];

/// How health is judged after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// A loopback TCP port accepts a connection.
    Tcp(SocketAddr),
    /// A plain HTTP/1.0 GET on loopback answers 2xx.
    Http { addr: SocketAddr, path: String },
    /// An argv probe exits 0.
    Probe(Vec<String>),
}

impl RestartConfig {
    /// The allow-listed target named `name`; anything else is refused (I7).
    pub fn target(&self, name: &str) -> Result<&RestartTarget, RestartError> {
        self.targets
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| RestartError::NotAllowListed(name.to_owned()))
    }

    pub fn targets(&self) -> &[RestartTarget] {
        &self.targets
    }
}

impl RestartTarget {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn kind(&self) -> &TargetKind {
        &self.kind
    }
    pub fn health(&self) -> &HealthCheck {
        &self.health
    }
    pub fn health_window(&self) -> Duration {
        self.health_window
    }
    /// The findings that restart it.
    pub fn on(&self) -> &BTreeSet<Trigger> {
        &self.on
    }
    /// Its own cooldown, if set (else the agent-wide one applies).
    pub fn cooldown(&self) -> Option<Duration> {
        self.cooldown
    }
    /// The same target with its health window cut to at most `window` (the safety case's
    /// verification window bounds how long a restart may take to prove itself).
    pub fn within(&self, window: Duration) -> Self {
        let mut t = self.clone();
        t.health_window = t.health_window.min(window);
        t
    }
}

impl RawRestart {
    /// Checks everything and lists every problem at once; `at` is the section's path in the
    /// file (e.g. `restart`), prefixed to every problem.
    pub fn validate(self, at: &str) -> Result<RestartConfig, RestartProblems> {
        let mut problems = Vec::new();
        let mut names = BTreeSet::new();
        let mut targets = Vec::new();
        for (i, raw) in self.target.into_iter().enumerate() {
            let at = format!("{at}.target[{i}]");
            if let Some(t) = validate_target(&at, raw, &mut names, &mut problems) {
                targets.push(t);
            }
        }
        if problems.is_empty() {
            Ok(RestartConfig { targets })
        } else {
            Err(RestartProblems(problems))
        }
    }
}

fn validate_target(
    at: &str,
    raw: RawRestartTarget,
    names: &mut BTreeSet<String>,
    problems: &mut Vec<RestartProblem>,
) -> Option<RestartTarget> {
    let RawRestartTarget {
        name,
        unit,
        argv,
        stop_signal,
        grace,
        tcp,
        http,
        probe,
        health_window,
        on,
        cooldown,
    } = raw;
    let before = problems.len();
    let mut add = |field: &str, problem: String| {
        problems.push(RestartProblem {
            path: format!("{at}.{field}"),
            problem,
        });
    };
    let name = match name {
        None => {
            add("name", "missing; name the target, e.g. \"web\"".into());
            String::new()
        }
        Some(n)
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
        {
            add(
                "name",
                format!("{n:?} is not a name; use letters, digits, '_', '-', '.'"),
            );
            n
        }
        Some(n) => {
            if !names.insert(n.clone()) {
                add(
                    "name",
                    format!("{n:?} is named twice; names must be unique"),
                );
            }
            n
        }
    };
    let kind = match (unit, argv) {
        (Some(_), Some(_)) => {
            add(
                "unit",
                "both unit and argv given; a target is either a systemd unit or an argv".into(),
            );
            None
        }
        (None, None) => {
            add(
                "argv",
                "missing; give a systemd unit (unit = \"nginx.service\") or an argv \
                 (argv = [\"/usr/bin/demo\", \"--port\", \"8080\"])"
                    .into(),
            );
            None
        }
        (Some(unit), None) => {
            if stop_signal.is_some() || grace.is_some() {
                add(
                    "stop_signal",
                    "stop_signal and grace apply to argv targets; for a unit, systemd's \
                     KillSignal= and TimeoutStopSec= apply"
                        .into(),
                );
            }
            match unit_name(&unit) {
                Ok(u) => Some(TargetKind::Unit(u)),
                Err(p) => {
                    add("unit", p);
                    None
                }
            }
        }
        (None, Some(raw_argv)) => {
            let argv = match checked_argv(raw_argv) {
                Ok(a) => Some(a),
                Err(p) => {
                    add("argv", p);
                    None
                }
            };
            let stop_signal = match stop_signal.as_deref().map(parse_signal) {
                None => Some(STOP_SIGNALS[0]),
                Some(Ok(s)) => Some(s),
                Some(Err(p)) => {
                    add("stop_signal", p);
                    None
                }
            };
            let grace = match duration(grace.as_deref(), DEFAULT_GRACE) {
                Ok(g) => Some(g),
                Err(p) => {
                    add("grace", p);
                    None
                }
            };
            match (argv, stop_signal, grace) {
                (Some(argv), Some(stop_signal), Some(grace)) => {
                    Some(TargetKind::Supervised(Supervised {
                        argv,
                        stop_signal,
                        grace,
                    }))
                }
                _ => None,
            }
        }
    };
    let health = match (tcp, http, probe) {
        (Some(tcp), None, None) => match loopback_addr(&tcp) {
            Ok(a) => Some(HealthCheck::Tcp(a)),
            Err(p) => {
                add("tcp", p);
                None
            }
        },
        (None, Some(http), None) => match http_url(&http) {
            Ok((addr, path)) => Some(HealthCheck::Http { addr, path }),
            Err(p) => {
                add("http", p);
                None
            }
        },
        (None, None, Some(probe)) => match checked_argv(probe) {
            Ok(a) => Some(HealthCheck::Probe(a)),
            Err(p) => {
                add("probe", p);
                None
            }
        },
        (None, None, None) => {
            add(
                "tcp",
                "no health check; give one of tcp = \"127.0.0.1:8080\", \
                 http = \"http://127.0.0.1:8080/healthz\" or probe = [\"/usr/bin/check\"]"
                    .into(),
            );
            None
        }
        _ => {
            add(
                "tcp",
                "more than one health check; give exactly one of tcp, http, probe".into(),
            );
            None
        }
    };
    let health_window = match duration(health_window.as_deref(), DEFAULT_HEALTH_WINDOW) {
        Ok(w) => Some(w),
        Err(p) => {
            add("health_window", p);
            None
        }
    };
    let on = match on {
        None => Trigger::RESTART.into_iter().collect(),
        Some(names) => {
            let mut on = BTreeSet::new();
            for name in &names {
                match Trigger::parse(name, &Trigger::RESTART) {
                    Ok(t) => {
                        on.insert(t);
                    }
                    Err(p) => add("on", p),
                }
            }
            if names.is_empty() {
                add(
                    "on",
                    "empty; list the findings that restart it, e.g. [\"crash\"], or remove the target"
                        .into(),
                );
            }
            on
        }
    };
    let cooldown = match cooldown
        .as_deref()
        .map(|c| duration(Some(c), Duration::ZERO))
    {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(p)) => {
            add("cooldown", p);
            None
        }
    };
    if problems.len() != before {
        return None;
    }
    Some(RestartTarget {
        name,
        kind: kind?,
        health: health?,
        health_window: health_window?,
        on,
        cooldown,
    })
}

fn unit_name(unit: &str) -> Result<UnitName, String> {
    let fix = "use a unit name such as \"nginx.service\"";
    if unit.is_empty() || unit.len() > 255 {
        return Err(format!("{unit:?} is empty or too long; {fix}"));
    }
    if let Some(c) = unit
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-')))
    {
        return Err(format!(
            "{unit:?} holds {c:?}; unit names use only [A-Za-z0-9:_.@-]; {fix}"
        ));
    }
    if unit.starts_with('-') {
        return Err(format!("{unit:?} starts with '-'; {fix}"));
    }
    match UNIT_SUFFIXES.iter().find(|s| unit.ends_with(*s)) {
        Some(s) if unit.len() > s.len() => Ok(UnitName(unit.to_owned())),
        _ => Err(format!(
            "{unit:?} does not end in a known unit suffix ({}); {fix}",
            UNIT_SUFFIXES.join(", ")
        )),
    }
}

fn looks_like_shell(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_whitespace() || SHELL_CHARS.contains(&c))
}

fn checked_argv(raw: RawArgv) -> Result<Vec<String>, String> {
    let list = match raw {
        RawArgv::Line(line) if looks_like_shell(&line) => {
            return Err(format!(
                "{line:?} looks like a shell command, and no shell is ever invoked; give argv \
                 as a list, e.g. [\"/usr/bin/demo\", \"--port\", \"8080\"]"
            ));
        }
        RawArgv::Line(line) => {
            return Err(format!(
                "{line:?} is a string; give argv as a list, e.g. [{line:?}]"
            ));
        }
        RawArgv::List(list) => list,
    };
    let Some(first) = list.first() else {
        return Err("empty; give argv as a list starting with an absolute path".into());
    };
    if !first.starts_with('/') {
        return Err(format!(
            "argv[0] {first:?} is not an absolute path; give the full path, e.g. \"/usr/bin/{}\"",
            first.rsplit('/').next().unwrap_or(first)
        ));
    }
    if looks_like_shell(first) {
        return Err(format!(
            "argv[0] {first:?} looks like a shell command line; give argv as a list, one \
             element per argument"
        ));
    }
    if list.iter().any(|a| a.contains('\0')) {
        return Err("an argument holds a NUL byte".into());
    }
    Ok(list)
}

fn parse_signal(s: &str) -> Result<StopSignal, String> {
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    STOP_SIGNALS
        .iter()
        .find(|sig| &sig.name[3..] == name)
        .copied()
        .ok_or_else(|| {
            format!(
                "{s:?} is not a stop signal; use one of {}",
                STOP_SIGNALS.map(|s| s.name).join(", ")
            )
        })
}

fn duration(raw: Option<&str>, default: Duration) -> Result<Duration, String> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    match humantime::parse_duration(raw) {
        Ok(d) if !d.is_zero() && d <= MAX_WINDOW => Ok(d),
        Ok(_) => Err(format!("{raw:?} is out of range; give between 1ms and 10m")),
        Err(e) => Err(format!("{raw:?} is not a duration ({e}); e.g. \"10s\"")),
    }
}

fn loopback_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an address:port; e.g. \"127.0.0.1:8080\""))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address; health checks here only reach this host, e.g. \
             \"127.0.0.1:{}\"",
            addr.ip(),
            addr.port()
        ));
    }
    if addr.port() == 0 {
        return Err(format!(
            "{s:?} has port 0; give the port the target listens on"
        ));
    }
    Ok(addr)
}

/// `http://IP[:PORT][/PATH]` with a loopback IP literal; returns the address and the path.
fn http_url(s: &str) -> Result<(SocketAddr, String), String> {
    let Some(rest) = s.strip_prefix("http://") else {
        return Err(format!(
            "{s:?} is not a plain http:// URL; e.g. \"http://127.0.0.1:8080/healthz\""
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(format!("{s:?} has a path with spaces, controls or '#'"));
    }
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else if authority.starts_with('[') || authority.matches(':').count() == 1 {
        authority.to_owned()
    } else {
        return Err(format!("{s:?}: write IPv6 hosts in brackets, e.g. [::1]"));
    };
    let addr = with_port.parse::<SocketAddr>().map_err(|_| {
        format!(
            "{authority:?} is not an IP literal with an optional port; \
             e.g. \"http://127.0.0.1:8080/healthz\""
        )
    })?;
    let addr = loopback_addr(&addr.to_string())?;
    Ok((addr, path.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// Planning (pure)
// ---------------------------------------------------------------------------------------------

/// One step of a restart, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `systemctl restart UNIT`.
    RestartUnit(UnitName),
    /// Send the stop signal through the pidfd (skipped when the process is not running).
    Signal(StopSignal),
    /// SIGKILL through the pidfd, only if the process outlives the grace.
    KillAfter(Duration),
    /// Start the argv again.
    Start,
    /// Poll the health check until healthy or the window ends.
    HealthCheck(Duration),
}

/// The steps restarting `target` takes.
pub fn plan(target: &RestartTarget) -> Vec<Step> {
    let mut steps = match &target.kind {
        TargetKind::Unit(unit) => vec![Step::RestartUnit(unit.clone())],
        TargetKind::Supervised(s) => vec![
            Step::Signal(s.stop_signal),
            Step::KillAfter(s.grace),
            Step::Start,
        ],
    };
    steps.push(Step::HealthCheck(target.health_window));
    steps
}

// ---------------------------------------------------------------------------------------------
// Reports and errors
// ---------------------------------------------------------------------------------------------

/// How the old instance went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It exited within the grace after the stop signal.
    Signalled,
    /// It outlived the grace and was SIGKILLed.
    Killed,
    /// It had already exited (a crash) and was reaped.
    AlreadyExited,
    /// The agent was not running it (first start after a crash that was already reaped).
    NotRunning,
    /// systemd stopped it (`systemctl restart`).
    BySystemd,
}

/// The step `continue_ok` refused; nothing from there on was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    Stop,
    Kill,
    Start,
    HealthCheck,
}

/// The outcome of one restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartReport {
    pub target: String,
    /// Nothing was done: the dry-run executor (observe mode).
    pub dry_run: bool,
    /// What was (or, in a dry run, would have been) done.
    pub planned: Vec<Step>,
    pub stopped: Option<Stopped>,
    /// The old process's exit status, when the agent reaped it.
    pub old_exit: Option<ExitStatus>,
    /// The pid of the new instance (supervised targets).
    pub new_pid: Option<u32>,
    /// Whether the new instance was started (for units: whether systemd accepted the restart).
    pub started: bool,
    /// Healthy within the window.
    pub healthy: bool,
    pub health_polls: u32,
    pub stop_to_start: Option<Duration>,
    pub stop_to_healthy: Option<Duration>,
    /// `continue_ok` said no before this step.
    pub interrupted: Option<Interrupted>,
}

impl RestartReport {
    fn new(target: &RestartTarget) -> Self {
        Self {
            target: target.name.clone(),
            dry_run: false,
            planned: plan(target),
            stopped: None,
            old_exit: None,
            new_pid: None,
            started: false,
            healthy: false,
            health_polls: 0,
            stop_to_start: None,
            stop_to_healthy: None,
            interrupted: None,
        }
    }
}

/// Why a restart failed (as opposed to finishing unhealthy, which the report says).
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("target {0:?} is not in the restart allow-list; add it under [[restart.target]]")]
    NotAllowListed(String),
    #[error("target {0:?} is a systemd unit, not an argv target the agent starts")]
    NotSupervised(String),
    #[error("target {0:?} is already running under this agent")]
    AlreadyRunning(String),
    #[error("start {target:?} ({argv0}): {source}")]
    Spawn {
        target: String,
        argv0: String,
        source: io::Error,
    },
    #[error("pidfd for {target:?} (pid {pid}): {source}")]
    Pidfd {
        target: String,
        pid: u32,
        source: io::Error,
    },
    #[error("{target:?} (pid {pid}) still not gone {KILL_WAIT:?} after SIGKILL")]
    DidNotExit { target: String, pid: u32 },
    #[error("systemctl for {unit}: {detail}")]
    Systemctl { unit: String, detail: String },
}

// ---------------------------------------------------------------------------------------------
// pidfd
// ---------------------------------------------------------------------------------------------

/// A pidfd on a child of this process (pidfd_open(2), pidfd_send_signal(2); nix 0.30 has
/// neither, so they are raw syscalls). Opened while the child is unreaped, so the pid it names
/// cannot have been recycled.
#[derive(Debug)]
struct Pidfd(OwnedFd);

impl Pidfd {
    fn open(pid: u32) -> io::Result<Self> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        let flags: libc::c_uint = 0;
        // SAFETY: pidfd_open(pid_t pid, unsigned int flags) takes no pointers; it returns a new
        // file descriptor we own, or -1 with errno set.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::c_int::try_from(ret)
            .map_err(|_| io::Error::other("pidfd_open returned an out-of-range fd"))?;
        // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send_signal(&self, signal: libc::c_int) -> io::Result<()> {
        let flags: libc::c_uint = 0;
        // SAFETY: pidfd_send_signal(int pidfd, int sig, siginfo_t *info, unsigned int flags):
        // the fd is open for the lifetime of `self`; a null `info` is allowed and means the
        // kernel fills it in as kill(2) would.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                flags,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until the process has exited (the pidfd turns readable) or `timeout` passes;
    /// returns whether it exited.
    fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        // Bounded: each pass waits until the deadline; EINTR passes are few.
        for _ in 0..1000 {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass a count
            // of 1.
            let ret = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            if ret > 0 {
                return Ok(true);
            }
            if ret == 0 {
                return Ok(false);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(false)
    }
}

// ---------------------------------------------------------------------------------------------
// Supervised processes
// ---------------------------------------------------------------------------------------------

/// A process the agent supervises: its own unreaped child, or an instance an earlier run of
/// the agent started and this one adopted (not its child: init reaps it).
#[derive(Debug)]
struct Running {
    child: Option<Child>,
    pid: u32,
    pidfd: Pidfd,
}

impl Running {
    /// `None` while it runs; once it exited, its status when it is our child.
    fn exited(&mut self) -> io::Result<Option<Option<ExitStatus>>> {
        match &mut self.child {
            Some(c) => c.try_wait().map(|s| s.map(Some)),
            None => self
                .pidfd
                .wait_exit(Duration::ZERO)
                .map(|gone| gone.then_some(None)),
        }
    }

    /// Collects the exit status of an exited child (an adopted instance has none for us).
    fn reap(&mut self) -> io::Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(c) => c.wait().map(Some),
            None => Ok(None),
        }
    }
}

/// The processes the agent supervises, by target name. Dropping it SIGKILLs and reaps them.
///
/// With a state file it records `name pid starttime` of each instance (written to a temp file
/// and renamed), so an agent that was killed and started again adopts the instances still
/// running instead of starting second copies ([`Supervisor::adopt`]).
#[derive(Debug, Default)]
pub struct Supervisor {
    running: BTreeMap<String, Running>,
    state: Option<std::path::PathBuf>,
}

/// The start time of a process (clock ticks after boot): with the pid, it names one process.
fn proc_starttime(pid: u32) -> Option<u64> {
    crate::pressure::read_proc_stat(pid).map(|s| s.starttime)
}

/// A process's argv as `/proc/PID/cmdline` holds it.
fn proc_argv(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// A supervisor that records its instances in `state` (see [`Supervisor::adopt`]).
    pub fn with_state(state: std::path::PathBuf) -> Self {
        Self {
            running: BTreeMap::new(),
            state: Some(state),
        }
    }

    /// Writes the state file (temp file, fsync, rename); errors are returned for logging.
    pub fn save(&self) -> io::Result<()> {
        let Some(path) = &self.state else {
            return Ok(());
        };
        let mut text = String::new();
        for (name, r) in &self.running {
            if let Some(start) = proc_starttime(r.pid) {
                text.push_str(&format!("{name} {} {start}\n", r.pid));
            }
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Adopts the instances the state file names that still run: the same pid, the same start
    /// time and the target's exact argv (so a recycled pid is never taken for ours). The pidfd
    /// is opened first and checked alive after the checks, so it names the process checked.
    /// Returns (name, pid) of each adopted instance.
    pub fn adopt(&mut self, config: &RestartConfig) -> Vec<(String, u32)> {
        let Some(path) = &self.state else {
            return Vec::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut adopted = Vec::new();
        for line in text.lines() {
            let mut f = line.split(' ');
            let (Some(name), Some(pid), Some(start)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
                continue;
            };
            let Ok(target) = config.target(name) else {
                continue;
            };
            let TargetKind::Supervised(s) = &target.kind else {
                continue;
            };
            if self.running.contains_key(name) {
                continue;
            }
            let Ok(pidfd) = Pidfd::open(pid) else {
                continue;
            };
            let same = proc_starttime(pid) == Some(start)
                && proc_argv(pid).as_deref() == Some(s.argv.as_slice())
                && pidfd.wait_exit(Duration::ZERO).ok() == Some(false);
            if same {
                self.running.insert(
                    name.to_owned(),
                    Running {
                        child: None,
                        pid,
                        pidfd,
                    },
                );
                adopted.push((name.to_owned(), pid));
            }
        }
        adopted
    }

    /// Starts a supervised target that is not running; returns its pid.
    pub fn start(&mut self, target: &RestartTarget) -> Result<u32, RestartError> {
        let TargetKind::Supervised(s) = &target.kind else {
            return Err(RestartError::NotSupervised(target.name.clone()));
        };
        if self.running.contains_key(&target.name) {
            return Err(RestartError::AlreadyRunning(target.name.clone()));
        }
        let running = spawn(&target.name, s)?;
        let pid = running.pid;
        self.running.insert(target.name.clone(), running);
        // Recorded at once: an agent killed from here on adopts this instance (a failure to
        // record shows again, with its error, at the caller's next `save`).
        let _ = self.save();
        Ok(pid)
    }

    /// The pid of a running target.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.running.get(name).map(|r| r.pid)
    }

    /// Lets go of every instance without signalling it (after recording them for adoption):
    /// they run on when the agent exits. Returns the names let go.
    pub fn detach_all(&mut self) -> Vec<String> {
        let _ = self.save();
        let names = self.running.keys().cloned().collect();
        // Dropping a `Child` neither kills nor waits; the pidfds close.
        self.running.clear();
        names
    }

    /// Stops every running target as a restart would (its stop signal, its grace, then
    /// SIGKILL) and reaps it; for the agent's own shutdown. Returns the names stopped.
    pub fn stop_all(&mut self, config: &RestartConfig) -> Vec<String> {
        let mut stopped = Vec::new();
        for (name, mut r) in std::mem::take(&mut self.running) {
            let Ok(target) = config.target(&name) else {
                continue;
            };
            let TargetKind::Supervised(s) = &target.kind else {
                continue;
            };
            let mut report = RestartReport::new(target);
            // Whatever happens, Drop of `r` is not relied on: a failed stop is SIGKILLed here.
            if stop(&mut r, s, &mut || true, &mut report).is_err() {
                let _ = r.pidfd.send_signal(libc::SIGKILL);
                if r.pidfd.wait_exit(KILL_WAIT).unwrap_or(false) {
                    let _ = r.reap();
                }
            }
            stopped.push(name);
        }
        let _ = self.save();
        stopped
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for (_, mut r) in std::mem::take(&mut self.running) {
            let _ = r.pidfd.send_signal(libc::SIGKILL);
            if r.pidfd.wait_exit(KILL_WAIT).unwrap_or(false) {
                let _ = r.reap();
            }
        }
    }
}

fn spawn(name: &str, s: &Supervised) -> Result<Running, RestartError> {
    let spawn_err = |source| RestartError::Spawn {
        target: name.to_owned(),
        argv0: s.argv[0].clone(),
        source,
    };
    // Its own process group, so a terminal's or the agent's signals do not reach it.
    let mut child = Command::new(&s.argv[0])
        .args(&s.argv[1..])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    let pid = child.id();
    match Pidfd::open(pid) {
        Ok(pidfd) => Ok(Running {
            child: Some(child),
            pid,
            pidfd,
        }),
        Err(source) => {
            // The child is ours and unreaped, so its pid is still its own.
            let _ = child.kill();
            let _ = child.wait();
            Err(RestartError::Pidfd {
                target: name.to_owned(),
                pid,
                source,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

/// The systemd port. PID 1 is not systemd on the test machines: unit tests use
/// [`FakeSystemd`].
pub trait SystemdManager {
    /// Queues a restart of the unit and returns at once (`--no-block`): the wait for the new
    /// instance is the health check's, step by step under the lease, never one blocking call.
    fn restart_unit(&mut self, unit: &UnitName) -> Result<(), RestartError>;
    fn unit_active(&mut self, unit: &UnitName) -> Result<bool, RestartError>;
    /// The unit's current invocation id: a restarted unit has a new one, so the old instance
    /// is never taken for the new.
    fn invocation(&mut self, unit: &UnitName) -> Result<String, RestartError>;
}

/// The real one: `systemctl` run from an argv (no shell), the unit after `--`.
#[derive(Debug, Default)]
pub struct Systemctl;

impl SystemdManager for Systemctl {
    fn restart_unit(&mut self, unit: &UnitName) -> Result<(), RestartError> {
        let out = Command::new("systemctl")
            .args(["restart", "--no-block", "--", unit.as_str()])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RestartError::Systemctl {
                unit: unit.0.clone(),
                detail: e.to_string(),
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RestartError::Systemctl {
                unit: unit.0.clone(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })
        }
    }

    fn invocation(&mut self, unit: &UnitName) -> Result<String, RestartError> {
        let out = Command::new("systemctl")
            .args([
                "show",
                "--property=InvocationID",
                "--value",
                "--",
                unit.as_str(),
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RestartError::Systemctl {
                unit: unit.0.clone(),
                detail: e.to_string(),
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn unit_active(&mut self, unit: &UnitName) -> Result<bool, RestartError> {
        let status = Command::new("systemctl")
            .args(["is-active", "--quiet", "--", unit.as_str()])
            .stdin(Stdio::null())
            .status()
            .map_err(|e| RestartError::Systemctl {
                unit: unit.0.clone(),
                detail: e.to_string(),
            })?;
        Ok(status.success())
    }
}

/// A systemd stand-in for tests: records restarts, answers `unit_active` from a set.
#[derive(Debug, Default)]
pub struct FakeSystemd {
    pub restarts: Vec<String>,
    /// Units `unit_active` says are active after a restart.
    pub active_after_restart: BTreeSet<String>,
    pub active: BTreeSet<String>,
    /// Units whose restart fails.
    pub failing: BTreeSet<String>,
}

impl SystemdManager for FakeSystemd {
    fn restart_unit(&mut self, unit: &UnitName) -> Result<(), RestartError> {
        self.restarts.push(unit.0.clone());
        if self.failing.contains(&unit.0) {
            return Err(RestartError::Systemctl {
                unit: unit.0.clone(),
                detail: "fake failure".into(),
            });
        }
        if self.active_after_restart.contains(&unit.0) {
            self.active.insert(unit.0.clone());
        }
        Ok(())
    }

    fn unit_active(&mut self, unit: &UnitName) -> Result<bool, RestartError> {
        Ok(self.active.contains(&unit.0))
    }

    fn invocation(&mut self, unit: &UnitName) -> Result<String, RestartError> {
        let n = self.restarts.iter().filter(|u| **u == unit.0).count();
        Ok(format!("{}-{n}", unit.0))
    }
}

// ---------------------------------------------------------------------------------------------
// Health checks
// ---------------------------------------------------------------------------------------------

/// One health poll, bounded by [`HEALTH_POLL_TIMEOUT`].
pub fn check_health(check: &HealthCheck) -> bool {
    match check {
        HealthCheck::Tcp(addr) => TcpStream::connect_timeout(addr, HEALTH_POLL_TIMEOUT).is_ok(),
        HealthCheck::Http { addr, path } => http_ok(*addr, path).unwrap_or(false),
        HealthCheck::Probe(argv) => probe_ok(argv).unwrap_or(false),
    }
}

fn http_ok(addr: SocketAddr, path: &str) -> io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, HEALTH_POLL_TIMEOUT)?;
    stream.set_read_timeout(Some(HEALTH_POLL_TIMEOUT))?;
    stream.set_write_timeout(Some(HEALTH_POLL_TIMEOUT))?;
    let host = match addr.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    // One write: a request split over several segments trips up some small servers.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    );
    stream.write_all(request.as_bytes())?;
    let mut head = Vec::new();
    // Enough for the status line; a slow server hits the read timeout.
    (&mut stream).take(HTTP_READ_LIMIT).read_to_end(&mut head)?;
    Ok(http_status_ok(&head))
}

/// Whether a response starts with an `HTTP/1.x 2xx` status line.
fn http_status_ok(head: &[u8]) -> bool {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    version.starts_with(b"HTTP/1.")
        && code.len() == 3
        && code[0] == b'2'
        && code.iter().all(u8::is_ascii_digit)
}

fn probe_ok(argv: &[String]) -> io::Result<bool> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + HEALTH_POLL_TIMEOUT;
    // Bounded by the deadline: at most HEALTH_POLL_TIMEOUT / 10 ms passes.
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Our own unreaped child: its pid cannot have been recycled.
    let _ = child.kill();
    let _ = child.wait();
    Ok(false)
}

// ---------------------------------------------------------------------------------------------
// Executors
// ---------------------------------------------------------------------------------------------

/// The I/O port of `process_restart`. `continue_ok` is asked before every step (stop signal,
/// kill, start, each health poll); when it says no, nothing more is done and the report says
/// which step was refused.
pub trait RestartExecutor {
    fn restart(
        &mut self,
        target: &RestartTarget,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<RestartReport, RestartError>;
}

/// The real executor: systemd units through `S`, supervised processes through its
/// [`Supervisor`].
#[derive(Debug, Default)]
pub struct HostRestart<S = Systemctl> {
    pub systemd: S,
    pub supervisor: Supervisor,
}

impl<S: SystemdManager> HostRestart<S> {
    pub fn new(systemd: S) -> Self {
        Self {
            systemd,
            supervisor: Supervisor::new(),
        }
    }

    fn restart_unit(
        &mut self,
        target: &RestartTarget,
        unit: &UnitName,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<RestartReport, RestartError> {
        let mut report = RestartReport::new(target);
        if !continue_ok() {
            report.interrupted = Some(Interrupted::Stop);
            return Ok(report);
        }
        let before = self.systemd.invocation(unit)?;
        let t_stop = Instant::now();
        self.systemd.restart_unit(unit)?;
        report.stopped = Some(Stopped::BySystemd);
        report.started = true;
        report.stop_to_start = Some(t_stop.elapsed());
        let systemd = &mut self.systemd;
        poll_health(target, t_stop, &mut report, continue_ok, &mut || {
            systemd.unit_active(unit).unwrap_or(false)
                && systemd.invocation(unit).is_ok_and(|now| now != before)
        });
        Ok(report)
    }

    fn restart_supervised(
        &mut self,
        target: &RestartTarget,
        s: &Supervised,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<RestartReport, RestartError> {
        let mut report = RestartReport::new(target);
        let name = &target.name;
        let mut t_stop = Instant::now();
        if let Some(mut r) = self.running_or_reaped(name, &mut report)? {
            if !continue_ok() {
                report.interrupted = Some(Interrupted::Stop);
                self.supervisor.running.insert(name.clone(), r);
                return Ok(report);
            }
            t_stop = Instant::now();
            let pid = r.pid;
            match stop(&mut r, s, continue_ok, &mut report) {
                Ok(true) => {}
                Ok(false) => {
                    // Refused before SIGKILL: it is still ours and still running.
                    self.supervisor.running.insert(name.clone(), r);
                    return Ok(report);
                }
                Err(StopFailure::Io(source)) => {
                    self.supervisor.running.insert(name.clone(), r);
                    return Err(RestartError::Pidfd {
                        target: name.clone(),
                        pid,
                        source,
                    });
                }
                Err(StopFailure::DidNotExit) => {
                    self.supervisor.running.insert(name.clone(), r);
                    return Err(RestartError::DidNotExit {
                        target: name.clone(),
                        pid,
                    });
                }
            }
        }
        if !continue_ok() {
            report.interrupted = Some(Interrupted::Start);
            return Ok(report);
        }
        let running = spawn(name, s)?;
        report.new_pid = Some(running.pid);
        report.started = true;
        report.stop_to_start = Some(t_stop.elapsed());
        self.supervisor.running.insert(name.clone(), running);
        // Recorded before the health polls: an agent killed during them adopts this instance.
        let _ = self.supervisor.save();
        let supervisor = &mut self.supervisor;
        poll_health(target, t_stop, &mut report, continue_ok, &mut || {
            // A process that died again is not healthy, whatever answers on its port.
            supervisor
                .running
                .get_mut(name)
                .is_some_and(|r| matches!(r.exited(), Ok(None)))
        });
        Ok(report)
    }

    /// Takes the running instance out of the supervisor, or reaps it if it already exited.
    fn running_or_reaped(
        &mut self,
        name: &str,
        report: &mut RestartReport,
    ) -> Result<Option<Running>, RestartError> {
        let Some(mut r) = self.supervisor.running.remove(name) else {
            report.stopped = Some(Stopped::NotRunning);
            return Ok(None);
        };
        let pid = r.pid;
        match r.exited() {
            Ok(Some(status)) => {
                report.stopped = Some(Stopped::AlreadyExited);
                report.old_exit = status;
                Ok(None)
            }
            Ok(None) => Ok(Some(r)),
            Err(source) => {
                self.supervisor.running.insert(name.to_owned(), r);
                Err(RestartError::Pidfd {
                    target: name.to_owned(),
                    pid,
                    source,
                })
            }
        }
    }
}

/// Why stopping a supervised process failed.
#[derive(Debug)]
enum StopFailure {
    Io(io::Error),
    DidNotExit,
}

/// Stop signal, grace, SIGKILL if needed (asking `continue_ok` first), reap. Returns `false` if
/// `continue_ok` refused the kill (the process is still running).
fn stop(
    r: &mut Running,
    s: &Supervised,
    continue_ok: &mut dyn FnMut() -> bool,
    report: &mut RestartReport,
) -> Result<bool, StopFailure> {
    match r.pidfd.send_signal(s.stop_signal.number) {
        Ok(()) => {
            if r.pidfd.wait_exit(s.grace).map_err(StopFailure::Io)? {
                report.stopped = Some(Stopped::Signalled);
            } else {
                if !continue_ok() {
                    report.interrupted = Some(Interrupted::Kill);
                    return Ok(false);
                }
                r.pidfd
                    .send_signal(libc::SIGKILL)
                    .map_err(StopFailure::Io)?;
                if !r.pidfd.wait_exit(KILL_WAIT).map_err(StopFailure::Io)? {
                    return Err(StopFailure::DidNotExit);
                }
                report.stopped = Some(Stopped::Killed);
            }
        }
        // ESRCH: the process is already gone. (An exited but unreaped child usually still
        // takes the signal, as with kill(2), and then reads as `Signalled`; either way it is
        // reaped below.)
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            report.stopped = Some(Stopped::AlreadyExited);
        }
        Err(e) => return Err(StopFailure::Io(e)),
    }
    // The process has exited, so this wait returns at once.
    report.old_exit = r.reap().map_err(StopFailure::Io)?;
    Ok(true)
}

/// Polls `alive() && check_health()` until healthy, the window ends or `continue_ok` says no.
fn poll_health(
    target: &RestartTarget,
    t_stop: Instant,
    report: &mut RestartReport,
    continue_ok: &mut dyn FnMut() -> bool,
    alive: &mut dyn FnMut() -> bool,
) {
    let deadline = Instant::now() + target.health_window;
    // Bounded by the window: each pass sleeps HEALTH_POLL_INTERVAL or hits the deadline.
    loop {
        if !continue_ok() {
            report.interrupted = Some(Interrupted::HealthCheck);
            return;
        }
        report.health_polls += 1;
        if alive() && check_health(&target.health) {
            report.healthy = true;
            report.stop_to_healthy = Some(t_stop.elapsed());
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(HEALTH_POLL_INTERVAL));
    }
}

impl<S: SystemdManager> RestartExecutor for HostRestart<S> {
    fn restart(
        &mut self,
        target: &RestartTarget,
        continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<RestartReport, RestartError> {
        match &target.kind {
            TargetKind::Unit(unit) => self.restart_unit(target, unit, continue_ok),
            TargetKind::Supervised(s) => self.restart_supervised(target, s, continue_ok),
        }
    }
}

/// The observe-mode executor: reports the plan, touches nothing.
#[derive(Debug, Default)]
pub struct DryRunRestart;

impl RestartExecutor for DryRunRestart {
    fn restart(
        &mut self,
        target: &RestartTarget,
        _continue_ok: &mut dyn FnMut() -> bool,
    ) -> Result<RestartReport, RestartError> {
        let mut report = RestartReport::new(target);
        report.dry_run = true;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn parse(text: &str) -> Result<RestartConfig, RestartProblems> {
        toml::from_str::<RawRestart>(text)
            .expect("toml")
            .validate("restart")
    }

    #[test]
    fn the_verification_window_bounds_the_health_window() {
        let config = parse(
            r#"
            [[target]]
            name = "web"
            unit = "nginx.service"
            tcp = "127.0.0.1:8080"
            health_window = "45s"
            "#,
        )
        .expect("valid");
        let web = config.target("web").expect("web");
        assert_eq!(
            web.within(Duration::from_secs(10)).health_window(),
            Duration::from_secs(10)
        );
        assert_eq!(
            web.within(Duration::from_secs(60)).health_window(),
            Duration::from_secs(45)
        );
    }

    #[test]
    fn valid_targets_get_defaults() {
        let config = parse(
            r#"
            [[target]]
            name = "web"
            unit = "nginx.service"
            http = "http://127.0.0.1:8080/healthz"

            [[target]]
            name = "demo"
            argv = ["/usr/bin/demo", "--port", "8080"]
            stop_signal = "INT"
            tcp = "127.0.0.1:8080"
            "#,
        )
        .expect("valid");
        let web = config.target("web").expect("web");
        assert_eq!(
            web.kind(),
            &TargetKind::Unit(UnitName("nginx.service".into()))
        );
        assert_eq!(
            web.health(),
            &HealthCheck::Http {
                addr: "127.0.0.1:8080".parse().expect("addr"),
                path: "/healthz".into()
            }
        );
        assert_eq!(web.health_window(), DEFAULT_HEALTH_WINDOW);
        let TargetKind::Supervised(s) = config.target("demo").expect("demo").kind() else {
            panic!("demo is supervised");
        };
        assert_eq!(s.stop_signal.number, libc::SIGINT);
        assert_eq!(s.grace, DEFAULT_GRACE);
        assert!(matches!(
            config.target("other"),
            Err(RestartError::NotAllowListed(_))
        ));
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let err = parse(
            r#"
            [[target]]
            name = "shell"
            argv = "/usr/bin/demo --port 8080; rm -rf /"
            tcp = "127.0.0.1:8080"

            [[target]]
            name = "relative"
            argv = ["demo", "--port"]
            tcp = "10.0.0.1:8080"

            [[target]]
            name = "unit"
            unit = "nginx;reboot"
            probe = "/usr/bin/check && true"

            [[target]]
            name = "nosuffix"
            unit = "nginx"
            http = "http://192.168.1.1/healthz"
            health_window = "forever"
            "#,
        )
        .expect_err("invalid");
        let paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "restart.target[0].argv",
                "restart.target[1].argv",
                "restart.target[1].tcp",
                "restart.target[2].unit",
                "restart.target[2].probe",
                "restart.target[3].unit",
                "restart.target[3].http",
                "restart.target[3].health_window",
            ],
            "{err}"
        );
        assert!(err.0[0].problem.contains("give argv as a list"), "{err}");
        assert!(err.0[1].problem.contains("not an absolute path"), "{err}");
        assert!(err.0[2].problem.contains("not a loopback"), "{err}");
        assert!(err.0[4].problem.contains("give argv as a list"), "{err}");
        assert!(err.0[5].problem.contains("suffix"), "{err}");
    }

    #[test]
    fn unit_names() {
        for good in ["nginx.service", "getty@tty1.service", "a-b_c:d.socket"] {
            assert!(unit_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".service",
            "-x.service",
            "nginx",
            "ng inx.service",
            "nginx.service/../x",
            "nginx.slice",
        ] {
            assert!(unit_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn other_refusals() {
        // Unknown fields are refused by serde before validation.
        assert!(toml::from_str::<RawRestart>("[[target]]\nbogus = 1").is_err());
        let err = parse(
            r#"
            [[target]]
            name = "both"
            unit = "a.service"
            argv = ["/bin/true"]
            tcp = "127.0.0.1:1"
            [[target]]
            name = "both"
            argv = ["/bin/true"]
            stop_signal = "SIGKILL"
            grace = "0s"
            "#,
        )
        .expect_err("invalid");
        let paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "restart.target[0].unit",
                "restart.target[1].name",
                "restart.target[1].stop_signal",
                "restart.target[1].grace",
                "restart.target[1].tcp",
            ],
            "{err}"
        );
    }

    #[test]
    fn http_status_lines() {
        assert!(http_status_ok(b"HTTP/1.0 200 OK\r\n"));
        assert!(http_status_ok(b"HTTP/1.1 204 No Content\r\n"));
        assert!(!http_status_ok(b"HTTP/1.1 500 Oops\r\n"));
        assert!(!http_status_ok(b"SSH-2.0\r\n"));
        assert!(!http_status_ok(b""));
    }

    #[test]
    fn http_and_probe_checks() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            for answer in ["HTTP/1.0 200 OK\r\n\r\n", "HTTP/1.0 503 Busy\r\n\r\n"] {
                let (mut c, _) = listener.accept().expect("accept");
                let mut request = Vec::new();
                let mut buf = [0u8; 512];
                // Bounded: the request is well under 64 reads of at least one byte.
                for _ in 0..64 {
                    let n = c.read(&mut buf).expect("read");
                    request.extend_from_slice(&buf[..n]);
                    if n == 0 || request.ends_with(b"\r\n\r\n") {
                        break;
                    }
                }
                assert!(request.starts_with(b"GET /healthz HTTP/1.0\r\n"));
                c.write_all(answer.as_bytes()).expect("write");
            }
        });
        let check = HealthCheck::Http {
            addr,
            path: "/healthz".into(),
        };
        assert!(check_health(&check));
        assert!(!check_health(&check));
        server.join().expect("server");
        assert!(check_health(&HealthCheck::Probe(vec!["/bin/true".into()])));
        assert!(!check_health(&HealthCheck::Probe(vec![
            "/bin/false".into()
        ])));
        assert!(!check_health(&HealthCheck::Probe(vec![
            "/nonexistent/probe".into()
        ])));
    }

    fn unit_target(addr: SocketAddr, window: &str) -> RestartTarget {
        parse(&format!(
            "[[target]]\nname = \"web\"\nunit = \"nginx.service\"\ntcp = \"{addr}\"\n\
             health_window = \"{window}\""
        ))
        .expect("valid")
        .targets()[0]
            .clone()
    }

    #[test]
    fn systemd_restart_through_the_fake() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = unit_target(listener.local_addr().expect("addr"), "2s");
        let mut fake = FakeSystemd::default();
        fake.active_after_restart.insert("nginx.service".into());
        let mut host = HostRestart::new(fake);
        let mut asked = 0;
        let report = host
            .restart(&target, &mut || {
                asked += 1;
                true
            })
            .expect("restart");
        assert_eq!(host.systemd.restarts, ["nginx.service"]);
        assert_eq!(report.stopped, Some(Stopped::BySystemd));
        assert!(report.started && report.healthy, "{report:?}");
        assert_eq!(asked, 2, "asked before the restart and the one health poll");
        assert!(report.stop_to_healthy.is_some());
    }

    #[test]
    fn systemd_inactive_unit_is_unhealthy_and_refusal_stops_everything() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = unit_target(listener.local_addr().expect("addr"), "200ms");
        let mut host = HostRestart::new(FakeSystemd::default());
        let report = host.restart(&target, &mut || true).expect("restart");
        assert!(report.started && !report.healthy, "{report:?}");
        assert!(report.health_polls >= 2);

        let mut host = HostRestart::new(FakeSystemd::default());
        let report = host.restart(&target, &mut || false).expect("restart");
        assert!(host.systemd.restarts.is_empty());
        assert_eq!(report.interrupted, Some(Interrupted::Stop));
        assert!(!report.started);

        let mut fake = FakeSystemd::default();
        fake.failing.insert("nginx.service".into());
        let mut host = HostRestart::new(fake);
        assert!(matches!(
            host.restart(&target, &mut || true),
            Err(RestartError::Systemctl { .. })
        ));
    }

    #[test]
    fn dry_run_touches_nothing_and_plans() {
        let target = unit_target("127.0.0.1:9".parse().expect("addr"), "1s");
        let report = DryRunRestart
            .restart(&target, &mut || panic!("a dry run asks nothing"))
            .expect("dry run");
        assert!(report.dry_run && !report.started);
        assert_eq!(
            report.planned,
            [
                Step::RestartUnit(UnitName("nginx.service".into())),
                Step::HealthCheck(Duration::from_secs(1))
            ]
        );
    }
}
