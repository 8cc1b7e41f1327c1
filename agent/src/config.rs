//! The agent's configuration file (`agent.toml`), read in two stages: serde parses the text into
//! raw structs that refuse unknown fields, then [`RawConfig::validate`] turns them into an
//! [`AgentConfig`] or lists every problem at once, each with its path in the file and what to
//! change.
//!
//! Detector settings map onto the pure detectors' `Config` structs (`crate::detect`), whose own
//! `validate` is reused so a rule lives in one place. This module reads no files itself except
//! in [`load`]; it must not import `probes`, `pressure` readers, tokio or tonic.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::actions::cleanup::{CleanupConfig, CleanupProblems, RawCleanup};
use crate::actions::restart::{RawRestart, RestartConfig, RestartProblems, TargetKind};
use crate::detect::{
    ConfigErrors, baseline, certexpiry, crashloop, forecast, leak, oomkill, threshold,
};
use crate::finding::Millis;

/// Where the agent serves `/metrics` unless the file says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7402";

// ------------------------------------------------------------------------------ raw stage

/// `agent.toml` exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub host_id: Option<String>,
    pub coordinator: Option<RawCoordinator>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub watch: RawWatch,
    #[serde(default)]
    pub detectors: RawDetectors,
    #[serde(default)]
    pub intervals: RawIntervals,
    pub log_format: Option<String>,
    pub actions: Option<RawActions>,
    pub cleanup: Option<RawCleanup>,
    pub restart: Option<RawRestart>,
    pub tls: Option<RawTls>,
}

/// `[tls]`: the agent's mutual-TLS identity towards the coordinator (`interlock certs issue
/// host HOST`). With it, every coordinator URL must be `https://`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Raise `cert_expiry` when fewer than this many days are left on the certificate or the CA
    /// (1 to 365, default 14). Read as any integer so a negative one is reported, not a parse
    /// error.
    pub expiry_warning_days: Option<i64>,
}

/// `[actions]`: how the agent runs green actions under leases.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawActions {
    /// The fsynced action journal (absolute path; its directory is created).
    pub journal: Option<PathBuf>,
    /// Act only while more than this is left on the lease (default 1s).
    pub lease_margin: Option<String>,
    /// No new action on a target for this long after one (default 1m); per-target settings win.
    pub cooldown: Option<String>,
    /// After a denial or an unreachable coordinator, ask again after this (default 2s).
    pub retry: Option<String>,
    /// What the agent does with the argv targets it supervises when it stops: "keep" (default:
    /// they run on and the next agent run adopts them, so an agent rollout restarts nothing)
    /// or "stop" (their stop signal and grace).
    pub on_agent_stop: Option<String>,
}

/// How often each kind of reading is taken.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntervals {
    /// Disk space and inodes of the watched mounts.
    pub disk: Option<String>,
    /// Watched processes (RSS, whether they still run) and OOM-finding expiry.
    pub process: Option<String>,
    /// PSI, system-wide and of the watched cgroups (triggers also wake it up at once).
    pub psi: Option<String>,
    /// The `[tls]` certificate and CA files, re-read so a rotated file is noticed (default 1m).
    pub cert: Option<String>,
}

/// One URL or a list of replicas.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawCoordinator {
    One(String),
    Replicas(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    /// Mount points to watch; empty or absent: every real filesystem.
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
    #[serde(default)]
    pub process: Vec<RawProcess>,
    #[serde(default)]
    pub cgroup: Vec<RawCgroup>,
}

/// A cgroup (v2) whose own PSI is watched.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCgroup {
    /// The cgroup as `/proc/<pid>/cgroup` names it (`0::/system.slice/web.service`), i.e.
    /// relative to the cgroup2 mount, starting with `/`.
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcess {
    pub name: Option<String>,
    pub pidfile: Option<PathBuf>,
    pub comm: Option<String>,
    pub cmdline: Option<String>,
    /// Bytes as an integer, or a string such as `"512MiB"` / `"2G"`.
    pub memory_limit: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDetectors {
    #[serde(default)]
    pub disk: RawThreshold,
    #[serde(default)]
    pub disk_forecast: RawTrend,
    #[serde(default)]
    pub memory_leak: RawTrend,
    #[serde(default)]
    pub crash_loop: RawCrashLoop,
    #[serde(default)]
    pub psi: RawPsi,
    /// PSI of the watched cgroups (`[[watch.cgroup]]`); unset fields take `[detectors.psi]`'s.
    #[serde(default)]
    pub cgroup_psi: RawPsi,
    #[serde(default)]
    pub oom_kill: RawOomKill,
    #[serde(default)]
    pub connect_failures: RawBaseline,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOomKill {
    /// How long an `oom_kill` finding is held after the last kill of its process name.
    pub hold: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThreshold {
    pub high: Option<f64>,
    pub low: Option<f64>,
    #[serde(rename = "for")]
    pub for_: Option<String>,
    pub cooldown: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrend {
    pub window: Option<String>,
    pub min_span: Option<String>,
    pub min_samples: Option<u32>,
    pub horizon: Option<String>,
    /// Disk forecast only: the used ratio that counts as full.
    pub full_ratio: Option<f64>,
    pub r2_min: Option<f64>,
    pub half_slope_min: Option<f64>,
    pub near_max: Option<f64>,
    pub cooldown: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCrashLoop {
    pub window: Option<String>,
    pub max_exits: Option<u32>,
    pub cooldown: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPsi {
    /// avg10 in percent (0–100) at which a finding fires.
    pub high: Option<f64>,
    pub low: Option<f64>,
    #[serde(rename = "for")]
    pub for_: Option<String>,
    pub cooldown: Option<String>,
    /// Kernel trigger on `/proc/pressure/memory` (`some`): stall time within the window.
    pub trigger_stall: Option<String>,
    pub trigger_window: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBaseline {
    pub half_life_samples: Option<f64>,
    pub warmup_samples: Option<u32>,
    pub z_fire: Option<f64>,
    pub z_clear: Option<f64>,
    pub min_samples: Option<u32>,
    pub min_rate: Option<f64>,
    pub cooldown: Option<String>,
}

// ---------------------------------------------------------------------------- valid stage

/// A checked agent configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub host_id: String,
    /// Coordinator replicas, in the order to try them.
    pub coordinator: Vec<String>,
    /// Host labels; `service` is always present.
    pub labels: BTreeMap<String, String>,
    pub metrics_listen: SocketAddr,
    /// Mount points to watch; empty means every real filesystem.
    pub mounts: Vec<PathBuf>,
    pub processes: Vec<WatchedProcess>,
    /// Cgroups whose PSI is watched, relative to the cgroup2 mount (`/` first).
    pub cgroups: Vec<String>,
    pub detectors: DetectorConfigs,
    pub intervals: Intervals,
    pub log_format: LogFormat,
    /// Mutual TLS towards the coordinator; `None` talks plaintext (`http://` only).
    pub tls: Option<TlsConfig>,
    /// Green actions; `None` when neither `[cleanup]` nor `[restart]` is configured (the agent
    /// then only observes).
    pub actions: Option<ActionsConfig>,
}

/// Validated `[actions]`, `[cleanup]` and `[restart]`.
#[derive(Clone, Debug)]
pub struct ActionsConfig {
    pub journal: PathBuf,
    pub lease_margin: Duration,
    pub cooldown: Duration,
    pub retry: Duration,
    /// Stop the supervised argv targets when the agent stops (else they keep running).
    pub stop_supervised_on_exit: bool,
    pub cleanup: Option<CleanupConfig>,
    pub restart: Option<RestartConfig>,
}

const DEFAULT_LEASE_MARGIN: Duration = Duration::from_secs(1);
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);
const DEFAULT_RETRY: Duration = Duration::from_secs(2);

/// Validated `[tls]`: the identity's files and when their expiry becomes a finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub files: interlock_proto::tls::TlsFiles,
    /// `cert_expiry` fires with fewer than this many days left (within `certexpiry::WARNING_DAYS`).
    pub expiry_warning_days: u32,
}

/// How often each reading is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intervals {
    pub disk: Duration,
    pub process: Duration,
    pub psi: Duration,
    pub cert: Duration,
}

impl Default for Intervals {
    /// Every second; the certificate files every minute (they change on rotation, days apart).
    fn default() -> Self {
        Self {
            disk: Duration::from_secs(1),
            process: Duration::from_secs(1),
            psi: Duration::from_secs(1),
            cert: Duration::from_secs(60),
        }
    }
}

/// The shortest and longest reading interval accepted.
const MIN_INTERVAL: Duration = Duration::from_millis(50);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

impl AgentConfig {
    /// The host's `service` label (required, so always there).
    pub fn service(&self) -> &str {
        self.labels.get("service").map_or("", String::as_str)
    }
}

/// A process the agent watches (memory leak, crash loop).
#[derive(Clone, Debug, PartialEq)]
pub struct WatchedProcess {
    pub name: String,
    pub locator: ProcessLocator,
    pub memory_limit: Option<u64>,
}

/// How to find a watched process's pid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessLocator {
    Pidfile(PathBuf),
    /// Exact match of `/proc/<pid>/comm`.
    Comm(String),
    /// Exact match of `/proc/<pid>/cmdline` with NULs read as spaces.
    Cmdline(String),
    /// An argv restart target the agent starts itself: its pid is the agent's child's.
    Supervised(String),
}

/// Settings of every detector, as the pure detectors take them.
#[derive(Clone, Debug)]
pub struct DetectorConfigs {
    pub disk: threshold::Config,
    pub inode: threshold::Config,
    pub disk_forecast: forecast::Config,
    pub memory_leak: leak::Config,
    pub crash_loop: crashloop::Config,
    pub psi: threshold::Config,
    /// The kernel trigger on `/proc/pressure/memory`: (stall, window).
    pub psi_trigger: (Duration, Duration),
    /// PSI of each watched cgroup, and the trigger on its `memory.pressure`.
    pub cgroup_psi: threshold::Config,
    pub cgroup_psi_trigger: (Duration, Duration),
    pub oom_kill: oomkill::Config,
    pub connect_failures: baseline::Config,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One problem in the file: where, and what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub problem: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}; check the --config path")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid agent TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path} has {} problem(s):\n{}", .problems.len(), list(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

impl ConfigError {
    /// Every problem as `path: what to change`, one per entry (a syntax error is one entry).
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Read { .. } | Self::Syntax { .. } => vec![self.to_string()],
            Self::Invalid { problems, .. } => problems.iter().map(ToString::to_string).collect(),
        }
    }
}

fn list(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads, parses and validates `path`; the host name for a missing `host_id` comes from
/// `/proc/sys/kernel/hostname`.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path, system_hostname)
}

/// Parses and validates config text; `hostname` supplies the default `host_id`.
pub fn parse(
    text: &str,
    path: &Path,
    hostname: impl FnOnce() -> Option<String>,
) -> Result<AgentConfig, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    raw.validate(hostname)
        .map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
}

/// The kernel's host name, trimmed.
pub fn system_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Collects problems with their paths.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, problem: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            problem: problem.into(),
        });
    }

    /// A humantime duration, or `default` when absent.
    fn duration(&mut self, path: &str, value: Option<&String>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.add(
                    path,
                    format!(
                        "{text:?} is not a duration ({e}); write it like \"30s\", \"5m\" or \"1h\""
                    ),
                );
                default
            }
        }
    }

    fn millis(&mut self, path: &str, value: Option<&String>, default: Millis) -> Millis {
        let d = self.duration(path, value, Duration::from_millis(default));
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    /// Moves a detector's own validation errors here, renaming `*_ms` fields to the file's
    /// names (`window_ms` is `window`, `for_ms` is `for`).
    fn detector(&mut self, section: &str, result: Result<(), ConfigErrors>) {
        if let Err(ConfigErrors(errors)) = result {
            for e in errors {
                let field = e.field.strip_suffix("_ms").unwrap_or(e.field);
                self.add(format!("{section}.{field}"), e.problem);
            }
        }
    }
}

impl RawConfig {
    /// Checks everything and lists every problem at once.
    pub fn validate(
        self,
        hostname: impl FnOnce() -> Option<String>,
    ) -> Result<AgentConfig, Vec<ConfigProblem>> {
        let RawConfig {
            host_id,
            coordinator,
            labels,
            metrics,
            watch,
            detectors,
            intervals,
            log_format,
            actions,
            cleanup,
            restart,
            tls,
        } = self;
        let mut p = Problems::default();

        let host_id = match host_id.or_else(hostname) {
            Some(h) if valid_name(&h) => h,
            Some(h) => {
                p.add(
                    "host_id",
                    format!("{h:?} must be 1-253 characters of letters, digits, '.', '-' or '_'"),
                );
                String::new()
            }
            None => {
                p.add(
                    "host_id",
                    "missing, and /proc/sys/kernel/hostname is unreadable; set host_id",
                );
                String::new()
            }
        };

        let coordinator = match coordinator {
            None => {
                p.add(
                    "coordinator",
                    "missing; set the coordinator URL, e.g. coordinator = \"http://10.0.0.1:7400\", or a list of replicas",
                );
                Vec::new()
            }
            Some(RawCoordinator::One(url)) => vec![url],
            Some(RawCoordinator::Replicas(urls)) => {
                if urls.is_empty() {
                    p.add(
                        "coordinator",
                        "the replica list is empty; name at least one URL",
                    );
                }
                urls
            }
        };
        for (i, url) in coordinator.iter().enumerate() {
            if let Err(problem) = check_url(url) {
                p.add(format!("coordinator[{i}]"), problem);
            }
        }

        match labels.get("service") {
            None => p.add(
                "labels.service",
                "missing; every host needs a service label (caps count per service), e.g. [labels] service = \"web\"",
            ),
            Some(s) if !valid_name(s) => p.add(
                "labels.service",
                format!("{s:?} must be 1-253 characters of letters, digits, '.', '-' or '_'"),
            ),
            Some(_) => {}
        }
        for (k, v) in &labels {
            if !valid_name(k) {
                p.add(
                    format!("labels.{k}"),
                    "label names are letters, digits, '.', '-' or '_'",
                );
            }
            if v.is_empty() {
                p.add(
                    format!("labels.{k}"),
                    "empty value; remove the label or give it a value",
                );
            }
        }

        let listen = metrics
            .listen
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_owned());
        let metrics_listen = listen.parse::<SocketAddr>().unwrap_or_else(|e| {
            p.add(
                "metrics.listen",
                format!("{listen:?} is not an address ({e}); write it like \"127.0.0.1:7402\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 7402))
        });

        for (i, m) in watch.mounts.iter().enumerate() {
            if !m.is_absolute() {
                p.add(
                    format!("watch.mounts[{i}]"),
                    format!("{} must be an absolute mount point", m.display()),
                );
            }
        }
        let mut processes = Vec::new();
        for (i, raw) in watch.process.into_iter().enumerate() {
            if let Some(proc_) = validate_process(&mut p, &format!("watch.process[{i}]"), raw) {
                processes.push(proc_);
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for w in &processes {
            if !seen.insert(w.name.clone()) {
                p.add(
                    "watch.process",
                    format!("the name {:?} is used twice; names must be unique", w.name),
                );
            }
        }

        let mut cgroups = Vec::new();
        for (i, RawCgroup { path }) in watch.cgroup.into_iter().enumerate() {
            let at = format!("watch.cgroup[{i}].path");
            match path {
                None => p.add(at, "missing; name the cgroup as /proc/PID/cgroup does, e.g. \"/system.slice/web.service\""),
                Some(c) if !c.starts_with('/') || c.split('/').any(|part| part == "..") => p.add(
                    at,
                    format!("{c:?} must start with '/' (relative to the cgroup2 mount, as /proc/PID/cgroup names it) and must not contain '..'"),
                ),
                Some(c) if cgroups.contains(&c) => {
                    p.add(at, format!("the cgroup {c:?} is listed twice"));
                }
                Some(c) => cgroups.push(c),
            }
        }

        let detectors = validate_detectors(&mut p, detectors);
        let intervals = validate_intervals(&mut p, &intervals);

        let log_format = match log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.add(
                    "log_format",
                    format!("{other:?} is not a log format; use \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };

        let actions = validate_actions(&mut p, actions, cleanup, restart, &mut processes);
        let tls = validate_tls(&mut p, tls, &coordinator);

        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(AgentConfig {
            host_id,
            coordinator,
            labels,
            metrics_listen,
            mounts: watch.mounts,
            processes,
            cgroups,
            detectors,
            intervals,
            log_format,
            actions,
            tls,
        })
    }
}

/// `[tls]`: all three files, absolute; the URLs' scheme must match (never plaintext when a
/// certificate is configured, never `https://` without one); the expiry warning in range. The
/// files are read at start.
fn validate_tls(
    p: &mut Problems,
    raw: Option<RawTls>,
    coordinator: &[String],
) -> Option<TlsConfig> {
    let Some(RawTls {
        ca,
        cert,
        key,
        expiry_warning_days,
    }) = raw
    else {
        for (i, url) in coordinator.iter().enumerate() {
            if url.starts_with("https://") {
                p.add(
                    format!("coordinator[{i}]"),
                    "https:// needs the host's certificate: add [tls] ca, cert and key \
                     (`interlock certs issue host HOST`)",
                );
            }
        }
        return None;
    };
    let mut file = |field: &str, value: Option<PathBuf>| match value {
        Some(path) if path.is_absolute() => Some(path),
        Some(path) => {
            p.add(
                format!("tls.{field}"),
                format!("{} must be an absolute path", path.display()),
            );
            None
        }
        None => {
            p.add(
                format!("tls.{field}"),
                format!("missing; set {field} = \"/etc/interlock/certs/…\""),
            );
            None
        }
    };
    let (ca, cert, key) = (file("ca", ca), file("cert", cert), file("key", key));
    let days = expiry_warning_days.unwrap_or(i64::from(certexpiry::DEFAULT_WARNING_DAYS));
    let expiry_warning_days = match u32::try_from(days) {
        Ok(d) if certexpiry::WARNING_DAYS.contains(&d) => Some(d),
        _ => {
            p.add(
                "tls.expiry_warning_days",
                certexpiry::warning_days_problem(days),
            );
            None
        }
    };
    for (i, url) in coordinator.iter().enumerate() {
        if !url.starts_with("https://") {
            p.add(
                format!("coordinator[{i}]"),
                format!("{url:?} is not https:// but [tls] is set; use https:// so the certificate is used"),
            );
        }
    }
    Some(TlsConfig {
        files: interlock_proto::tls::TlsFiles {
            ca: ca?,
            cert: cert?,
            key: key?,
        },
        expiry_warning_days: expiry_warning_days?,
    })
}

/// `[actions]`, `[cleanup]`, `[restart]`: every restart target must be watchable (a unit needs
/// a `[[watch.process]]` of its name; an argv target without one is watched as the agent's own
/// child), and a journal is required as soon as any action is configured.
fn validate_actions(
    p: &mut Problems,
    actions: Option<RawActions>,
    cleanup: Option<RawCleanup>,
    restart: Option<RawRestart>,
    processes: &mut Vec<WatchedProcess>,
) -> Option<ActionsConfig> {
    let configured = cleanup.is_some() || restart.is_some();
    let cleanup = cleanup.and_then(|c| match c.validate("cleanup") {
        Ok(c) => Some(c),
        Err(CleanupProblems(problems)) => {
            for e in problems {
                p.add(e.path, e.problem);
            }
            None
        }
    });
    let restart = restart.and_then(|r| match r.validate("restart") {
        Ok(r) => Some(r),
        Err(RestartProblems(problems)) => {
            for e in problems {
                p.add(e.path, e.problem);
            }
            None
        }
    });
    if let Some(r) = &restart {
        for (i, t) in r.targets().iter().enumerate() {
            if processes.iter().any(|w| w.name == t.name()) {
                continue;
            }
            match t.kind() {
                TargetKind::Supervised(_) => processes.push(WatchedProcess {
                    name: t.name().to_owned(),
                    locator: ProcessLocator::Supervised(t.name().to_owned()),
                    memory_limit: None,
                }),
                TargetKind::Unit(unit) => p.add(
                    format!("restart.target[{i}]"),
                    format!(
                        "the unit {} is not watched, so its crashes cannot be seen; add a \
                         [[watch.process]] named {:?} (pidfile, comm or cmdline)",
                        unit.as_str(),
                        t.name()
                    ),
                ),
            }
        }
    }
    let raw = actions.unwrap_or_default();
    let lease_margin = p.duration(
        "actions.lease_margin",
        raw.lease_margin.as_ref(),
        DEFAULT_LEASE_MARGIN,
    );
    if lease_margin.is_zero() {
        p.add(
            "actions.lease_margin",
            "must be above 0: the agent stops acting this long before its lease runs out",
        );
    }
    let cooldown = p.duration("actions.cooldown", raw.cooldown.as_ref(), DEFAULT_COOLDOWN);
    let retry = p.duration("actions.retry", raw.retry.as_ref(), DEFAULT_RETRY);
    if retry < Duration::from_millis(100) {
        p.add("actions.retry", "must be at least 100ms");
    }
    let stop_supervised_on_exit = match raw.on_agent_stop.as_deref() {
        None | Some("keep") => false,
        Some("stop") => true,
        Some(other) => {
            p.add(
                "actions.on_agent_stop",
                format!("{other:?} is not a choice; use \"keep\" or \"stop\""),
            );
            false
        }
    };
    if !configured {
        return None;
    }
    let journal = match raw.journal {
        None => {
            p.add(
                "actions.journal",
                "missing; [cleanup] or [restart] needs a journal file, e.g. \
                 journal = \"/var/lib/interlock/actions.journal\"",
            );
            PathBuf::new()
        }
        Some(j) if !j.is_absolute() || j.parent().is_none_or(|d| d.as_os_str().is_empty()) => {
            p.add(
                "actions.journal",
                format!("{} must be an absolute file path", j.display()),
            );
            j
        }
        Some(j) => j,
    };
    Some(ActionsConfig {
        journal,
        lease_margin,
        cooldown,
        retry,
        stop_supervised_on_exit,
        cleanup,
        restart,
    })
}

fn validate_intervals(p: &mut Problems, raw: &RawIntervals) -> Intervals {
    let RawIntervals {
        disk,
        process,
        psi,
        cert,
    } = raw;
    let d = Intervals::default();
    let mut one = |name: &str, value: Option<&String>, default: Duration| {
        let path = format!("intervals.{name}");
        let v = p.duration(&path, value, default);
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&v) {
            p.add(
                path,
                format!("{v:?} is out of range; use between {MIN_INTERVAL:?} and {MAX_INTERVAL:?}"),
            );
            return default;
        }
        v
    };
    Intervals {
        disk: one("disk", disk.as_ref(), d.disk),
        process: one("process", process.as_ref(), d.process),
        psi: one("psi", psi.as_ref(), d.psi),
        cert: one("cert", cert.as_ref(), d.cert),
    }
}

fn valid_name(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} needs a scheme; write it like \"http://{url}\""))?;
    let authority = rest.split('/').next().unwrap_or("");
    let port_ok = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if port_ok {
        Ok(())
    } else {
        Err(format!(
            "{url:?} needs a host and a port, e.g. \"http://10.0.0.1:7400\""
        ))
    }
}

fn validate_process(p: &mut Problems, path: &str, raw: RawProcess) -> Option<WatchedProcess> {
    let RawProcess {
        name,
        pidfile,
        comm,
        cmdline,
        memory_limit,
    } = raw;
    let name = match name {
        Some(n) if valid_name(&n) => Some(n),
        Some(n) => {
            p.add(
                format!("{path}.name"),
                format!("{n:?} must be letters, digits, '.', '-' or '_'"),
            );
            None
        }
        None => {
            p.add(
                format!("{path}.name"),
                "missing; name the watched process (used as the finding's target)",
            );
            None
        }
    };
    let mut locators = Vec::new();
    if let Some(f) = pidfile {
        if !f.is_absolute() {
            p.add(format!("{path}.pidfile"), "must be an absolute path");
        }
        locators.push(ProcessLocator::Pidfile(f));
    }
    if let Some(c) = comm {
        // The kernel keeps 15 bytes of comm (TASK_COMM_LEN 16 with the NUL).
        if c.is_empty() || c.len() > 15 {
            p.add(
                format!("{path}.comm"),
                "must be 1-15 bytes (the kernel truncates comm to 15)",
            );
        }
        locators.push(ProcessLocator::Comm(c));
    }
    if let Some(c) = cmdline {
        if c.is_empty() {
            p.add(format!("{path}.cmdline"), "must not be empty");
        }
        locators.push(ProcessLocator::Cmdline(c));
    }
    if locators.len() != 1 {
        p.add(
            path.to_owned(),
            format!(
                "set exactly one of pidfile, comm or cmdline to find the pid (found {})",
                locators.len()
            ),
        );
    }
    let memory_limit = memory_limit.and_then(|v| match parse_bytes(&v) {
        Ok(b) => Some(b),
        Err(e) => {
            p.add(format!("{path}.memory_limit"), e);
            None
        }
    });
    Some(WatchedProcess {
        name: name?,
        locator: locators.into_iter().next()?,
        memory_limit,
    })
}

/// Bytes as an integer or a string with a unit (`K`, `KiB`, `M`, `MiB`, `G`, `GiB`, `T`, `TiB`;
/// `B` optional). Powers of 1024 for `Ki`/`Mi`/…, powers of 1000 otherwise.
pub fn parse_bytes(value: &toml::Value) -> Result<u64, String> {
    let text = match value {
        toml::Value::Integer(n) => {
            return u64::try_from(*n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{n} must be a positive number of bytes"));
        }
        toml::Value::String(s) => s.trim(),
        other => {
            return Err(format!(
                "{other} is not a size; write bytes or a string like \"512MiB\""
            ));
        }
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write it like \"512MiB\" or \"2G\""))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix('B').unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "K" | "k" => 1000,
        "Ki" => 1 << 10,
        "M" => 1_000_000,
        "Mi" => 1 << 20,
        "G" => 1_000_000_000,
        "Gi" => 1 << 30,
        "T" => 1_000_000_000_000,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit; use K, Ki, M, Mi, G, Gi, T or Ti"
            ));
        }
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{text:?} must be a positive size below 16 EiB"))
}

fn validate_detectors(p: &mut Problems, raw: RawDetectors) -> DetectorConfigs {
    let RawDetectors {
        disk,
        disk_forecast,
        memory_leak,
        crash_loop,
        psi,
        cgroup_psi,
        oom_kill,
        connect_failures,
    } = raw;

    let disk_cfg = threshold_config(p, "detectors.disk", &disk, threshold::Config::default());
    let inode = threshold::Config {
        metric: "inode_ratio",
        ..disk_cfg.clone()
    };

    let d = forecast::Config::default();
    let s = "detectors.disk_forecast";
    let RawTrend {
        window,
        min_span,
        min_samples,
        horizon,
        full_ratio,
        r2_min,
        half_slope_min,
        near_max,
        cooldown,
    } = &disk_forecast;
    let disk_forecast = forecast::Config {
        window_ms: p.millis(&format!("{s}.window"), window.as_ref(), d.window_ms),
        min_span_ms: p.millis(&format!("{s}.min_span"), min_span.as_ref(), d.min_span_ms),
        min_samples: min_samples.unwrap_or(d.min_samples),
        horizon_ms: p.millis(&format!("{s}.horizon"), horizon.as_ref(), d.horizon_ms),
        full_ratio: full_ratio.unwrap_or(d.full_ratio),
        r2_min: r2_min.unwrap_or(d.r2_min),
        half_slope_min: half_slope_min.unwrap_or(d.half_slope_min),
        near_max: near_max.unwrap_or(d.near_max),
        cooldown_ms: p.millis(&format!("{s}.cooldown"), cooldown.as_ref(), d.cooldown_ms),
    };
    p.detector(s, disk_forecast.validate());

    let d = leak::Config::default();
    let s = "detectors.memory_leak";
    let RawTrend {
        window,
        min_span,
        min_samples,
        horizon,
        full_ratio,
        r2_min,
        half_slope_min,
        near_max,
        cooldown,
    } = &memory_leak;
    if full_ratio.is_some() {
        p.add(format!("{s}.full_ratio"), "only the disk forecast has full_ratio; set memory_limit on the watched process instead");
    }
    let memory_leak = leak::Config {
        window_ms: p.millis(&format!("{s}.window"), window.as_ref(), d.window_ms),
        min_span_ms: p.millis(&format!("{s}.min_span"), min_span.as_ref(), d.min_span_ms),
        min_samples: min_samples.unwrap_or(d.min_samples),
        horizon_ms: p.millis(&format!("{s}.horizon"), horizon.as_ref(), d.horizon_ms),
        max_bytes: None,
        r2_min: r2_min.unwrap_or(d.r2_min),
        half_slope_min: half_slope_min.unwrap_or(d.half_slope_min),
        near_max: near_max.unwrap_or(d.near_max),
        cooldown_ms: p.millis(&format!("{s}.cooldown"), cooldown.as_ref(), d.cooldown_ms),
    };
    p.detector(s, memory_leak.validate());

    let d = crashloop::Config::default();
    let s = "detectors.crash_loop";
    let crash_loop = crashloop::Config {
        window_ms: p.millis(
            &format!("{s}.window"),
            crash_loop.window.as_ref(),
            d.window_ms,
        ),
        max_exits: crash_loop.max_exits.unwrap_or(d.max_exits),
        cooldown_ms: p.millis(
            &format!("{s}.cooldown"),
            crash_loop.cooldown.as_ref(),
            d.cooldown_ms,
        ),
    };
    p.detector(s, crash_loop.validate());

    let psi_default = threshold::Config {
        metric: "psi_some_avg10",
        high: 40.0,
        low: 20.0,
        for_ms: 30_000,
        cooldown_ms: 10 * 60_000,
    };
    let default_trigger = (Duration::from_millis(200), Duration::from_secs(2));
    let (psi_cfg, psi_trigger) = psi_config(p, "detectors.psi", &psi, psi_default, default_trigger);
    // A cgroup's settings default to the (checked) system-wide ones, field by field, so a
    // mistake in [detectors.psi] is reported once.
    let (cgroup_psi, cgroup_psi_trigger) = psi_config(
        p,
        "detectors.cgroup_psi",
        &cgroup_psi,
        psi_cfg.clone(),
        psi_trigger,
    );

    let s = "detectors.oom_kill";
    let oom_kill = oomkill::Config {
        hold_ms: p.millis(
            &format!("{s}.hold"),
            oom_kill.hold.as_ref(),
            oomkill::Config::default().hold_ms,
        ),
    };
    p.detector(s, oom_kill.validate());

    let d = baseline::Config {
        metric: "failed_connects_per_s",
        ..baseline::Config::default()
    };
    let s = "detectors.connect_failures";
    let RawBaseline {
        half_life_samples,
        warmup_samples,
        z_fire,
        z_clear,
        min_samples,
        min_rate,
        cooldown,
    } = &connect_failures;
    let connect_failures = baseline::Config {
        metric: d.metric,
        half_life_samples: half_life_samples.unwrap_or(d.half_life_samples),
        warmup_samples: warmup_samples.unwrap_or(d.warmup_samples),
        z_fire: z_fire.unwrap_or(d.z_fire),
        z_clear: z_clear.unwrap_or(d.z_clear),
        min_samples: min_samples.unwrap_or(d.min_samples),
        min_rate: min_rate.unwrap_or(d.min_rate),
        eps: d.eps,
        cooldown_ms: p.millis(&format!("{s}.cooldown"), cooldown.as_ref(), d.cooldown_ms),
    };
    p.detector(s, connect_failures.validate());

    DetectorConfigs {
        disk: disk_cfg,
        inode,
        disk_forecast,
        memory_leak,
        crash_loop,
        psi: psi_cfg,
        psi_trigger,
        cgroup_psi,
        cgroup_psi_trigger,
        oom_kill,
        connect_failures,
    }
}

/// A PSI threshold and its kernel trigger (stall, window), checked against the kernel's limits.
fn psi_config(
    p: &mut Problems,
    s: &str,
    raw: &RawPsi,
    default: threshold::Config,
    default_trigger: (Duration, Duration),
) -> (threshold::Config, (Duration, Duration)) {
    let RawPsi {
        high,
        low,
        for_,
        cooldown,
        trigger_stall,
        trigger_window,
    } = raw;
    let psi_cfg = threshold_config(
        p,
        s,
        &RawThreshold {
            high: *high,
            low: *low,
            for_: for_.clone(),
            cooldown: cooldown.clone(),
        },
        default,
    );
    if !(0.0..=100.0).contains(&psi_cfg.high) {
        p.add(
            format!("{s}.high"),
            "PSI avg10 is a percentage; use a value between 0 and 100",
        );
    }
    let stall = p.duration(
        &format!("{s}.trigger_stall"),
        trigger_stall.as_ref(),
        default_trigger.0,
    );
    let window = p.duration(
        &format!("{s}.trigger_window"),
        trigger_window.as_ref(),
        default_trigger.1,
    );
    if window < Duration::from_millis(500) || window > Duration::from_secs(10) {
        p.add(format!("{s}.trigger_window"), "must be between 500ms and 10s (the kernel's limits); 2s multiples work without CAP_SYS_RESOURCE");
    }
    if stall.is_zero() || stall > window {
        p.add(
            format!("{s}.trigger_stall"),
            "must be above zero and at most trigger_window",
        );
    }
    (psi_cfg, (stall, window))
}

fn threshold_config(
    p: &mut Problems,
    section: &str,
    raw: &RawThreshold,
    default: threshold::Config,
) -> threshold::Config {
    let RawThreshold {
        high,
        low,
        for_,
        cooldown,
    } = raw;
    let config = threshold::Config {
        metric: default.metric,
        high: high.unwrap_or(default.high),
        low: low.unwrap_or(default.low),
        for_ms: p.millis(&format!("{section}.for"), for_.as_ref(), default.for_ms),
        cooldown_ms: p.millis(
            &format!("{section}.cooldown"),
            cooldown.as_ref(),
            default.cooldown_ms,
        ),
    };
    p.detector(section, config.validate());
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> AgentConfig {
        parse(text, Path::new("agent.toml"), || Some("box-1".into())).unwrap()
    }

    fn problems(text: &str) -> Vec<String> {
        parse(text, Path::new("agent.toml"), || Some("box-1".into()))
            .unwrap_err()
            .problems()
    }
    #[test]
    fn tls_needs_https_and_https_needs_tls() {
        let with_tls = "coordinator = \"https://127.0.0.1:7400\"\n[labels]\nservice = \"web\"\n\
                        [tls]\nca = \"/c/ca.pem\"\ncert = \"/c/h.pem\"\nkey = \"/c/h.key\"\n";
        let c = parse_ok(with_tls);
        let tls = c.tls.expect("tls");
        assert_eq!(tls.files.key, PathBuf::from("/c/h.key"));
        assert_eq!(tls.expiry_warning_days, 14, "the default warning");
        assert_eq!(
            c.intervals.cert,
            Duration::from_secs(60),
            "the default re-read"
        );
        let c = parse_ok(&format!(
            "{with_tls}expiry_warning_days = 30\n[intervals]\ncert = \"5s\"\n"
        ));
        assert_eq!(c.tls.expect("tls").expiry_warning_days, 30);
        assert_eq!(c.intervals.cert, Duration::from_secs(5));
        for bad in ["0", "366", "-3"] {
            let p = problems(&format!("{with_tls}expiry_warning_days = {bad}\n"));
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(
                p[0].starts_with("tls.expiry_warning_days: ")
                    && p[0].contains(&format!("{bad} is out of range"))
                    && p[0].contains("from 1 to 365"),
                "{p:?}"
            );
        }
        let p = problems(&format!("{with_tls}expiry_warning_days = 99999999999\n"));
        assert!(p[0].starts_with("tls.expiry_warning_days: "), "{p:?}");

        // A certificate configured but a plaintext URL: never silently plaintext.
        let p = problems(&with_tls.replace("https://", "http://"));
        assert!(
            p.iter()
                .any(|m| m.contains("coordinator[0]") && m.contains("use https://")),
            "{p:?}"
        );
        // https:// without a certificate.
        let p = problems("coordinator = \"https://a:1\"\n[labels]\nservice = \"w\"\n");
        assert!(p.iter().any(|m| m.contains("add [tls]")), "{p:?}");
        // Every missing or relative file at once.
        let p = problems(
            "coordinator = \"https://a:1\"\n[labels]\nservice = \"w\"\n[tls]\nca = \"ca.pem\"\n",
        );
        for needle in ["tls.ca", "absolute", "tls.cert", "tls.key"] {
            assert!(p.iter().any(|m| m.contains(needle)), "{needle}: {p:?}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse_ok("coordinator = \"http://127.0.0.1:7400\"\n[labels]\nservice = \"web\"\n");
        assert_eq!(c.host_id, "box-1");
        assert_eq!(c.coordinator, vec!["http://127.0.0.1:7400"]);
        assert_eq!(c.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.detectors.disk, threshold::Config::default());
        assert_eq!(c.service(), "web");
    }

    #[test]
    fn replicas_processes_and_detectors_are_read() {
        let c = parse_ok(
            r#"
host_id = "h1"
coordinator = ["http://a:1", "http://b:2"]
log_format = "json"
[labels]
service = "api"
zone = "z1"
[watch]
mounts = ["/var"]
[[watch.process]]
name = "api"
comm = "api-server"
memory_limit = "512MiB"
[detectors.disk]
high = 0.5
low = 0.4
for = "0s"
cooldown = "1m"
[detectors.crash_loop]
window = "5m"
max_exits = 4
"#,
        );
        assert_eq!(c.coordinator.len(), 2);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.processes[0].memory_limit, Some(512 << 20));
        assert_eq!(
            c.processes[0].locator,
            ProcessLocator::Comm("api-server".into())
        );
        assert_eq!(c.detectors.disk.high, 0.5);
        assert_eq!(c.detectors.disk.for_ms, 0);
        assert_eq!(c.detectors.inode.metric, "inode_ratio");
        assert_eq!(c.detectors.crash_loop.window_ms, 300_000);
        assert_eq!(c.detectors.crash_loop.max_exits, 4);
    }

    #[test]
    fn every_problem_is_listed_with_its_path() {
        let p = problems(
            r#"
coordinator = ["127.0.0.1:7400"]
log_format = "xml"
[labels]
zone = "z"
[metrics]
listen = "nowhere"
[[watch.process]]
name = "x"
pidfile = "/run/x.pid"
comm = "x"
[detectors.disk]
high = 0.5
low = 0.6
for = "soon"
"#,
        );
        let text = p.join("\n");
        for want in [
            "coordinator[0]: ",
            "log_format: ",
            "labels.service: missing",
            "metrics.listen: ",
            "watch.process[0]: set exactly one",
            "detectors.disk.low: ",
            "detectors.disk.for: \"soon\" is not a duration",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert_eq!(p.len(), 7, "{text}");
    }

    #[test]
    fn intervals_cgroups_and_short_windows_are_read() {
        let c = parse_ok(
            r#"
coordinator = "http://a:1"
[labels]
service = "w"
[[watch.cgroup]]
path = "/system.slice/web.service"
[intervals]
disk = "200ms"
[detectors.psi]
high = 30.0
[detectors.cgroup_psi]
for = "0s"
trigger_window = "1s"
[detectors.disk_forecast]
window = "6s"
min_span = "3s"
horizon = "60s"
[detectors.oom_kill]
hold = "30s"
"#,
        );
        assert_eq!(c.cgroups, vec!["/system.slice/web.service"]);
        assert_eq!(c.intervals.disk, Duration::from_millis(200));
        assert_eq!(c.intervals.process, Duration::from_secs(1));
        assert_eq!(c.detectors.disk_forecast.window_ms, 6000);
        assert_eq!(c.detectors.disk_forecast.horizon_ms, 60_000);
        assert_eq!(c.detectors.oom_kill.hold_ms, 30_000);
        // Unset cgroup PSI fields take the system-wide ones.
        assert_eq!(c.detectors.cgroup_psi.high, 30.0);
        assert_eq!(c.detectors.cgroup_psi.for_ms, 0);
        assert_eq!(
            c.detectors.cgroup_psi_trigger,
            (Duration::from_millis(200), Duration::from_secs(1))
        );
    }

    #[test]
    fn bad_intervals_and_cgroups_are_listed() {
        let p = problems(
            r#"
coordinator = "http://a:1"
[labels]
service = "w"
[[watch.cgroup]]
path = "relative"
[[watch.cgroup]]
[intervals]
disk = "1ms"
psi = "often"
[detectors.oom_kill]
hold = "0s"
"#,
        );
        let text = p.join("\n");
        for want in [
            "watch.cgroup[0].path: ",
            "watch.cgroup[1].path: missing",
            "intervals.disk: ",
            "intervals.psi: \"often\" is not a duration",
            "detectors.oom_kill.hold: ",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert_eq!(p.len(), 5, "{text}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let p = problems("coordinator = \"http://a:1\"\ncolour = 1\n[labels]\nservice = \"w\"\n");
        assert!(p[0].contains("unknown field `colour`"), "{p:?}");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes(&toml::Value::Integer(10)), Ok(10));
        assert_eq!(
            parse_bytes(&toml::Value::String("2G".into())),
            Ok(2_000_000_000)
        );
        assert_eq!(
            parse_bytes(&toml::Value::String("1GiB".into())),
            Ok(1 << 30)
        );
        assert!(parse_bytes(&toml::Value::String("1 parsec".into())).is_err());
        assert!(parse_bytes(&toml::Value::Integer(-1)).is_err());
    }
}
