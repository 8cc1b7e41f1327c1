//! `interlock-agent run`: the observing loop and the coordinator link, as one library call
//! [`run`] that `main.rs` and tests share.
//!
//! Two tasks: the observer (this task) loads the probes, polls the pressure readers, feeds the
//! pure detectors and keeps the current findings; the link task registers with the coordinator,
//! heartbeats, and reports findings and flow edges. They talk over channels, so a slow or absent
//! coordinator never stalls observation. Without a link the agent observes only and never acts
//! (there are no actions yet; the state is explicit in [`CoordinatorLink`] and in metrics).
//!
//! Decisions live in pure code: the detectors (`crate::detect`), what to report and when to
//! re-register (`crate::report`), flow aggregation (`crate::flows`). This module wires them to
//! I/O and time.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use interlock_proto::v1 as pb;
use tokio::sync::{mpsc, watch};

use crate::act::{ActorSettings, Shared, actor_task};
use crate::config::{AgentConfig, ProcessLocator, WatchedProcess};
use crate::detect::ConfigErrors;
use crate::detect::baseline::RollingBaseline;
use crate::detect::certexpiry::CertExpiry;
use crate::detect::crashloop::{CrashLoop, Exit};
use crate::detect::forecast::{DiskForecast, DiskSample};
use crate::detect::leak::{LeakDetector, MemorySample};
use crate::detect::oomkill::{OomKill, OomKills};
use crate::detect::threshold::ThresholdDetector;
use crate::finding::{Finding, Millis};
use crate::flows::{FlowProbes, FlowTable};
use crate::metrics::{AgentMetrics, serve_http};
use crate::pressure::{
    HostPressure, Pid, PressureSource, PsiResource, PsiTrigger, PsiTriggerSpec, StallKind,
};
use crate::probes::{ExitStatus, ProbeOptions, ProbeSet, ProcessEvents, ProcessRecord};
use crate::report::{
    Backoff, CallError, CoordinatorLink, FindingLedger, LinkTracker, NextStep, Replicas,
    after_call, finding_to_wire, heartbeat_interval,
};

/// How often the rings of frequent events (TCP transitions, failed connects, closes) are
/// drained. The kernel does not wake us for those (waking costs several times the probe), so
/// the timer bounds both their latency and how fast they can come without filling a ring:
/// 10 ms empties a 256 KiB ring at up to ~250k events/s (../shared/TOOLCHAIN.md).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// How often flow edges are reported (and the connect-failure baselines sampled).
pub const FLOW_INTERVAL: Duration = Duration::from_secs(10);
/// At most this many remote endpoints get their own connect-failure baseline.
const MAX_BASELINES: usize = 1024;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen for metrics on {addr}: {source}; change [metrics] listen")]
    MetricsListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the host's pressure: {0}")]
    Pressure(#[from] crate::pressure::PressureError),
    #[error("detector settings: {0}")]
    Detector(#[from] ConfigErrors),
    #[error("{0}")]
    Journal(#[from] crate::actions::journal::JournalError),
    #[error("[tls]: {0}")]
    Tls(#[from] interlock_proto::tls::TlsFileError),
    #[error("[tls]: {0}")]
    TlsFiles(String),
}

/// Runs the agent until `shutdown` completes; returns once every task stopped.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // Read now: a missing or readable key stops the agent before anything starts.
    let tls = config
        .tls
        .as_ref()
        .map(|t| crate::report::ClientTls::load(t.files.clone()))
        .transpose()
        .map_err(RunError::TlsFiles)?;
    match &config.tls {
        Some(t) => {
            tracing::info!(cert = %t.files.cert.display(), "mutual TLS towards the coordinator");
        }
        None => tracing::warn!(
            "talking to the coordinator without TLS: add [tls] (`interlock certs issue host HOST`)"
        ),
    }
    let metrics = AgentMetrics::new();
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| RunError::MetricsListen {
            addr: config.metrics_listen,
            source,
        })?;
    tracing::info!(
        host = config.host_id,
        service = config.service(),
        metrics = %listener.local_addr().unwrap_or(config.metrics_listen),
        "agent starting"
    );
    let pressure = HostPressure::detect()?;
    // Opened before anything runs: a journal that cannot be read stops the agent with what to
    // do, rather than risk re-running an action.
    let journal = match &config.actions {
        Some(actions) => Some(crate::act::open_journal(actions)?),
        None => None,
    };
    let shared = Shared::default();
    let mut observer = Observer::new(&config, metrics.clone(), shared.clone())?;

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let http = tokio::spawn(serve_http(
        listener,
        metrics.clone(),
        stopped(stop_rx.clone()),
    ));

    let (findings_tx, findings_rx) = watch::channel(Vec::new());
    let (flows_tx, flows_rx) = mpsc::channel(4);
    let link = tokio::spawn(link_task(
        LinkSettings {
            host_id: config.host_id.clone(),
            labels: config.labels.clone(),
            urls: config.coordinator.clone(),
            tls: tls.clone(),
            epoch: observer.epoch,
        },
        findings_rx,
        flows_rx,
        metrics.clone(),
        stop_rx.clone(),
    ));

    let renewal = config.tls.as_ref().map(|t| {
        tokio::spawn(renewal_task(
            config.coordinator.clone(),
            t.files.clone(),
            config.intervals.cert,
            stop_rx.clone(),
        ))
    });

    let actor = match (config.actions.clone(), journal) {
        (Some(actions), Some(journal)) => {
            let mounts = pressure
                .disks()
                .map(|r| r.disks.into_iter().map(|d| d.mount_point).collect())
                .unwrap_or_default();
            Some(tokio::spawn(actor_task(
                ActorSettings {
                    host_id: config.host_id.clone(),
                    urls: config.coordinator.clone(),
                    tls: tls.clone(),
                    actions,
                    mounts,
                    processes: config.processes.clone(),
                },
                journal,
                findings_tx.subscribe(),
                shared,
                metrics.clone(),
                stop_rx.clone(),
            )))
        }
        _ => {
            tracing::info!("no [cleanup] or [restart] configured: observing and reporting only");
            None
        }
    };

    observer
        .observe(&pressure, &config, findings_tx, flows_tx, stop_rx)
        .await;
    if let Some(actor) = actor {
        let _ = actor.await;
    }
    let _ = link.await;
    if let Some(renewal) = renewal {
        let _ = renewal.await;
    }
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "metrics server ended with an error");
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Renews the agent's certificate over mutual TLS once a third of its lifetime is left,
/// checked every `every`; each distinct failure is logged once (a coordinator without
/// `--ca-key` cannot renew: hand-issued certificates are then replaced by hand).
async fn renewal_task(
    urls: Vec<String>,
    files: interlock_proto::tls::TlsFiles,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        match crate::enrol::renew_if_due(&urls, &files, unix_s()).await {
            Ok(None) => {}
            Ok(Some(not_after_unix)) => {
                last_error.clear();
                tracing::info!(
                    cert = %files.cert.display(),
                    not_after_unix,
                    "certificate renewed; new connections present it"
                );
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = e, "renewing the certificate failed; will retry");
                    last_error = e;
                }
            }
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

// ------------------------------------------------------------------------------ observer

/// The detectors of one watched mount.
struct MountDetectors {
    full: ThresholdDetector,
    inode: ThresholdDetector,
    forecast: DiskForecast,
}

/// One watched cgroup: its PSI detectors, and whether its memory trigger is installed.
struct CgroupWatch {
    path: String,
    psi: Vec<(PsiResource, ThresholdDetector)>,
    trigger: bool,
    /// The cgroup's PSI could not be read last time (logged once per change).
    missing: bool,
}

/// One `[tls]` certificate file, re-read every `[intervals] cert` so a rotated file is noticed
/// without a restart.
struct CertWatch {
    /// `client` or `ca` (the metric's label).
    which: &'static str,
    path: PathBuf,
    expiry: CertExpiry,
    /// The last reading: its notAfter, or why the file could not be read (logged once per
    /// change).
    last: Option<Result<i64, String>>,
}

/// One watched process: where it is now and its detectors.
struct ProcessWatch {
    spec: WatchedProcess,
    pid: Option<u32>,
    leak: LeakDetector,
    crash: CrashLoop,
}

struct Observer {
    metrics: AgentMetrics,
    /// The detectors' clock starts here; `epoch.1` is the Unix time (ms) at that instant.
    epoch: (Instant, u64),
    mounts: BTreeMap<PathBuf, MountDetectors>,
    missing_mounts: BTreeSet<PathBuf>,
    psi: BTreeMap<&'static str, ThresholdDetector>,
    psi_available: bool,
    processes: Vec<ProcessWatch>,
    cgroups: Vec<CgroupWatch>,
    certs: Vec<CertWatch>,
    oom: OomKills,
    baselines: BTreeMap<SocketAddr, RollingBaseline>,
    connect_config: crate::detect::baseline::Config,
    /// Findings whose condition still holds, by id.
    active: BTreeMap<String, Finding>,
    /// Supervised pids and the targets being acted on (shared with the action task).
    shared: Shared,
}

/// Unix time in seconds (certificate validity).
fn unix_s() -> i64 {
    i64::try_from(unix_ms() / 1000).unwrap_or(i64::MAX)
}

/// Unix time in milliseconds (wire and journal times).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Observer {
    fn new(config: &AgentConfig, metrics: AgentMetrics, shared: Shared) -> Result<Self, RunError> {
        let d = &config.detectors;
        let mut psi = BTreeMap::new();
        for (name, _) in PSI_RESOURCES {
            psi.insert(name, ThresholdDetector::new(name, "system", d.psi.clone())?);
        }
        let mut processes = Vec::new();
        for spec in &config.processes {
            processes.push(ProcessWatch {
                leak: LeakDetector::new(spec.name.clone(), d.memory_leak.clone())?,
                crash: CrashLoop::new(spec.name.clone(), d.crash_loop.clone())?,
                spec: spec.clone(),
                pid: None,
            });
        }
        let mut cgroups = Vec::new();
        for path in &config.cgroups {
            let mut psi = Vec::new();
            for (name, resource) in PSI_RESOURCES {
                psi.push((
                    resource,
                    ThresholdDetector::new(name, path.clone(), d.cgroup_psi.clone())?,
                ));
            }
            cgroups.push(CgroupWatch {
                path: path.clone(),
                psi,
                trigger: false,
                missing: false,
            });
        }
        let mut certs = Vec::new();
        if let Some(tls) = &config.tls {
            for (which, path) in [("client", &tls.files.cert), ("ca", &tls.files.ca)] {
                certs.push(CertWatch {
                    which,
                    path: path.clone(),
                    expiry: CertExpiry::new(
                        which,
                        path.display().to_string(),
                        tls.expiry_warning_days,
                    )?,
                    last: None,
                });
            }
        }
        Ok(Self {
            metrics,
            epoch: (Instant::now(), unix_ms()),
            mounts: BTreeMap::new(),
            missing_mounts: BTreeSet::new(),
            psi,
            psi_available: true,
            processes,
            cgroups,
            certs,
            oom: OomKills::new(d.oom_kill.clone())?,
            baselines: BTreeMap::new(),
            connect_config: d.connect_failures.clone(),
            active: BTreeMap::new(),
            shared,
        })
    }

    fn now(&self) -> Millis {
        u64::try_from(self.epoch.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records what one detector said: a new finding is logged, counted and kept; a detector
    /// that stopped firing drops its finding. Returns true when the set of findings changed.
    fn track(&mut self, id: String, firing: bool, finding: Option<Finding>) -> bool {
        if let Some(f) = finding {
            self.metrics.finding(&f);
            self.active.insert(f.id.clone(), f);
            return true;
        }
        !firing && self.active.remove(&id).is_some()
    }

    async fn observe(
        &mut self,
        pressure: &HostPressure,
        config: &AgentConfig,
        findings_tx: watch::Sender<Vec<Finding>>,
        flows_tx: mpsc::Sender<Vec<pb::FlowEdge>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut probes = Probes::load(&self.metrics);
        let mut trigger = open_psi_trigger(config);
        // Each watched cgroup's trigger runs in its own task and names its cgroup here.
        let (cgroup_tx, mut cgroup_events) = mpsc::channel::<CgroupTriggerEvent>(16);
        let mut disk_tick = tokio::time::interval(config.intervals.disk);
        let mut process_tick = tokio::time::interval(config.intervals.process);
        let mut psi_tick = tokio::time::interval(config.intervals.psi);
        // The first tick is at once: the certificates are read at start.
        let mut cert_tick = tokio::time::interval(config.intervals.cert);
        for tick in [
            &mut disk_tick,
            &mut process_tick,
            &mut psi_tick,
            &mut cert_tick,
        ] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut drain = tokio::time::interval(DRAIN_INTERVAL);
        let mut flow_tick = tokio::time::interval(FLOW_INTERVAL);
        flow_tick.reset();
        let mut flow_table = FlowTable::default();
        let mut flow_started = Instant::now();
        let mut exits = Vec::new();
        let mut kills = Vec::new();
        loop {
            let mut changed = false;
            tokio::select! {
                _ = disk_tick.tick() => {
                    changed |= self.poll_disks(pressure, config);
                }
                _ = psi_tick.tick() => {
                    changed |= self.poll_psi(pressure);
                    changed |= self.poll_cgroups(pressure, config, &cgroup_tx);
                }
                _ = cert_tick.tick() => {
                    changed |= self.poll_certs();
                }
                _ = process_tick.tick() => {
                    changed |= self.poll_processes(pressure, probes.process.is_some());
                    changed |= self.expire_oom_kills();
                }
                _ = drain.tick() => {
                    probes.drain(&self.metrics, &mut flow_table);
                }
                // Exits and OOM kills wake us: they are handled as soon as the kernel queues them.
                record = next_process_record(&mut probes.process) => {
                    exits.clear();
                    kills.clear();
                    match record {
                        Ok(record) => {
                            Probes::process_record(&self.metrics, record, &mut exits, &mut kills);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the process probe failed; exits are polled");
                            probes.process = None;
                        }
                    }
                    for kill in &kills {
                        changed |= self.oom_kill(kill);
                    }
                    for (pid, comm, exit) in &exits {
                        changed |= self.process_exit(*pid, comm, *exit);
                    }
                }
                Some(event) = cgroup_events.recv() => {
                    changed |= self.cgroup_trigger(pressure, event);
                }
                _ = flow_tick.tick() => {
                    let elapsed = flow_started.elapsed();
                    changed |= self.sample_connect_failures(&flow_table, elapsed);
                    let edges = flow_table
                        .rates(elapsed)
                        .into_iter()
                        .map(|r| pb::FlowEdge {
                            local_service: config.service().to_owned(),
                            process: r.key.process,
                            remote: r.key.remote.to_string(),
                            connects_per_s: r.connects_per_s,
                            failures_per_s: r.failures_per_s,
                            retransmits_per_s: r.retransmits_per_s,
                            bytes_per_s: r.bytes_per_s,
                        })
                        .collect::<Vec<_>>();
                    // A full queue means the link is behind; this period's edges are dropped.
                    if !edges.is_empty() {
                        let _ = flows_tx.try_send(edges);
                    }
                    flow_table = FlowTable::default();
                    flow_started = Instant::now();
                }
                event = next_trigger(&mut trigger) => {
                    match event {
                        Ok(()) => {
                            self.metrics.events("psi_trigger", 1);
                            changed |= self.poll_psi(pressure);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "PSI trigger failed; PSI is still polled");
                            trigger = None;
                        }
                    }
                }
                _ = stop.wait_for(|s| *s) => break,
            }
            if changed {
                self.metrics.set_findings_current(self.active.values());
                let _ = findings_tx.send(self.active.values().cloned().collect());
            }
        }
    }

    fn poll_disks(&mut self, pressure: &HostPressure, config: &AgentConfig) -> bool {
        let report = match pressure.disks() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading disks failed");
                return false;
            }
        };
        let now = self.now();
        let mut changed = false;
        let wanted: Vec<PathBuf> = if config.mounts.is_empty() {
            report.disks.iter().map(|d| d.mount_point.clone()).collect()
        } else {
            config.mounts.clone()
        };
        for mount in wanted {
            let Some(usage) = report.get(&mount) else {
                if self.missing_mounts.insert(mount.clone()) {
                    tracing::warn!(mount = %mount.display(), "watched mount not found in the mount table (or not a real filesystem)");
                }
                continue;
            };
            self.missing_mounts.remove(&mount);
            let target = mount.display().to_string();
            let d = &config.detectors;
            let detectors = match self.mounts.entry(mount.clone()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    // Configs were validated at load, so these cannot fail; skip the mount if
                    // they somehow do.
                    let (Ok(full), Ok(inode), Ok(forecast)) = (
                        ThresholdDetector::new("disk_full", target.clone(), d.disk.clone()),
                        ThresholdDetector::new("inode_full", target.clone(), d.inode.clone()),
                        DiskForecast::new(target.clone(), d.disk_forecast.clone()),
                    ) else {
                        continue;
                    };
                    v.insert(MountDetectors {
                        full,
                        inode,
                        forecast,
                    })
                }
            };
            let full = detectors.full.observe(now, usage.used_ratio());
            let full_firing = detectors.full.is_firing();
            let inode = usage
                .inode_used_ratio()
                .and_then(|r| detectors.inode.observe(now, r));
            let inode_firing = detectors.inode.is_firing();
            let forecast = detectors.forecast.observe(
                now,
                DiskSample {
                    used_bytes: usage.used_bytes,
                    capacity_bytes: usage.total_bytes,
                },
            );
            let forecast_firing = detectors.forecast.is_firing();
            let full = full.map(|f| f.evidence("used_bytes", usage.used_bytes as f64));
            changed |= self.track(format!("disk_full/{target}"), full_firing, full);
            changed |= self.track(format!("inode_full/{target}"), inode_firing, inode);
            changed |= self.track(format!("disk_forecast/{target}"), forecast_firing, forecast);
        }
        changed
    }

    /// Re-reads the `[tls]` certificate files and feeds their notAfter to the expiry
    /// detectors. A file that cannot be read or parsed now (mid-rotation, removed, garbage)
    /// keeps its last reading and any finding about it; the agent goes on.
    fn poll_certs(&mut self) -> bool {
        let now = self.now();
        let now_unix = unix_s();
        let mut results = Vec::new();
        for w in &mut self.certs {
            let reading = std::fs::read(&w.path)
                .map_err(|e| format!("cannot read it: {e}"))
                .and_then(|pem| {
                    interlock_proto::tls::cert_facts_pem(&pem)
                        .map(|facts| facts.not_after_unix)
                        .map_err(|e| e.to_string())
                });
            if w.last.as_ref() != Some(&reading) {
                self.metrics.cert_read(
                    w.which,
                    &w.path,
                    reading.as_ref().copied().map_err(String::as_str),
                );
                w.last = Some(reading.clone());
            }
            if let Ok(not_after) = reading {
                let finding = w.expiry.observe(now, now_unix, not_after);
                results.push((
                    format!(
                        "{}/{}",
                        crate::detect::certexpiry::DETECTOR,
                        w.path.display()
                    ),
                    w.expiry.is_firing(),
                    finding,
                ));
            }
        }
        let mut changed = false;
        for (id, firing, finding) in results {
            changed |= self.track(id, firing, finding);
        }
        changed
    }

    fn poll_psi(&mut self, pressure: &HostPressure) -> bool {
        if !self.psi_available {
            return false;
        }
        let now = self.now();
        let mut changed = false;
        for (name, resource) in PSI_RESOURCES {
            match pressure.system_psi(resource) {
                Ok(psi) => {
                    let Some(det) = self.psi.get_mut(name) else {
                        continue;
                    };
                    let finding = det.observe(now, psi.some.avg10);
                    let firing = det.is_firing();
                    changed |= self.track(format!("{name}/system"), firing, finding);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "PSI not readable; PSI detectors are off");
                    self.psi_available = false;
                    return changed;
                }
            }
        }
        changed
    }

    fn poll_processes(&mut self, pressure: &HostPressure, exits_from_probe: bool) -> bool {
        let now = self.now();
        let host_memory = pressure.meminfo().ok().map(|m| m.total);
        let mut changed = false;
        let mut results = Vec::new();
        let shared = self.shared_state();
        let supervised = &shared.supervised;
        let crashed: BTreeSet<String> = self
            .active
            .keys()
            .filter(|id| id.starts_with("process_crash/"))
            .cloned()
            .collect();
        let mut recovered = Vec::new();
        let mut gone = Vec::new();
        for w in &mut self.processes {
            let pid = locate(&w.spec.locator, supervised);
            let crash_id = format!("process_crash/{}", w.spec.name);
            if pid.is_some() {
                // Running again: a crash finding about it is over.
                recovered.push(crash_id.clone());
            }
            // Gone without an exit the probe reported (it was not loaded yet, or missed it):
            // a process this agent saw, or an argv target it started, is not running.
            let started_by_us = matches!(&w.spec.locator, ProcessLocator::Supervised(n)
                if supervised.contains_key(n) || shared.failed.contains(n));
            if pid.is_none()
                && (w.pid.is_some() || started_by_us)
                && !shared.acting.contains(&w.spec.name)
                && !crashed.contains(&crash_id)
            {
                tracing::info!(process = w.spec.name, last_pid = ?w.pid, "watched process is gone (no exit event seen)");
                gone.push(
                    Finding::new("process_crash", w.spec.name.clone(), now)
                        .summary(format!(
                            "{} is not running (its exit was not seen)",
                            w.spec.name
                        ))
                        .evidence("exit_status", -1.0),
                );
            }
            let mut crash = None;
            if !exits_from_probe && w.pid.is_some() && pid != w.pid {
                // Without the exit probe a vanished pid is the only sign of an exit; its
                // status is unknown.
                crash = w.crash.observe(now, Exit::Code(-1));
            }
            if pid != w.pid {
                tracing::info!(process = w.spec.name, ?pid, "watched process located");
                w.pid = pid;
            }
            let leak = match pid.map(|p| pressure.process_rss(Pid(p))) {
                Some(Ok(Some(rss))) => w.leak.observe(
                    now,
                    MemorySample {
                        rss_bytes: rss,
                        limit_bytes: w.spec.memory_limit.or(host_memory),
                    },
                ),
                _ => None,
            };
            results.push((
                format!("memory_leak/{}", w.spec.name),
                w.leak.is_firing(),
                leak,
                format!("crash_loop/{}", w.spec.name),
                w.crash.is_firing(),
                crash,
            ));
        }
        for (leak_id, leak_firing, leak, crash_id, crash_firing, crash) in results {
            changed |= self.track(leak_id, leak_firing, leak);
            changed |= self.track(crash_id, crash_firing, crash);
        }
        for id in recovered {
            changed |= self.active.remove(&id).is_some();
        }
        for finding in gone {
            changed |= self.track(finding.id.clone(), true, Some(finding));
        }
        changed
    }

    /// A copy of what the action task shares (a short lock, never held across I/O).
    fn shared_state(&self) -> crate::act::ActionShared {
        let s = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::act::ActionShared {
            supervised: s.supervised.clone(),
            failed: s.failed.clone(),
            acting: s.acting.clone(),
        }
    }

    /// One process ended. It counts for a watched process when it is the pid last located, or
    /// when it matches the locator now: the same comm, or the pid its pidfile names (a process
    /// that dies within a poll interval is never located, yet its exits make the loop).
    fn process_exit(&mut self, pid: u32, comm: &str, exit: Exit) -> bool {
        let now = self.now();
        let shared = self.shared_state();
        let mut hits = Vec::new();
        let mut crashes = Vec::new();
        for w in &mut self.processes {
            // The exact process: the pid last located, the agent's own child, the pidfile's pid.
            let exact = w.pid == Some(pid)
                || match &w.spec.locator {
                    ProcessLocator::Supervised(name) => shared.supervised.get(name) == Some(&pid),
                    ProcessLocator::Pidfile(path) => {
                        std::fs::read_to_string(path)
                            .ok()
                            .and_then(|t| t.trim().parse::<u32>().ok())
                            == Some(pid)
                    }
                    ProcessLocator::Comm(_) | ProcessLocator::Cmdline(_) => false,
                };
            // Another process of the same name (a worker, or an instance that died before it
            // was located): it counts toward a crash loop, but it is not the target going down.
            let same_name = matches!(&w.spec.locator, ProcessLocator::Comm(c) if c == comm);
            if (exact || same_name) && shared.acting.contains(&w.spec.name) {
                // The agent is restarting it: this exit is the agent's own doing.
                tracing::info!(process = w.spec.name, pid, %exit, "watched process exited during its restart");
                if exact {
                    w.pid = None;
                }
                continue;
            }
            if exact || same_name {
                // `exact`: the target itself is down (a crash finding follows); otherwise a
                // process of its name (a worker, an instance never located) ended.
                tracing::info!(process = w.spec.name, pid, %exit, exact, "watched process exited");
            }
            if exact {
                crashes.push(
                    Finding::new("process_crash", w.spec.name.clone(), now)
                        .summary(format!(
                            "{} (pid {pid}) exited ({exit}) and is not running",
                            w.spec.name
                        ))
                        .evidence("pid", f64::from(pid))
                        .evidence("exit_status", exit.status()),
                );
            }
            if exact || same_name {
                let finding = w.crash.observe(now, exit);
                hits.push((
                    format!("crash_loop/{}", w.spec.name),
                    w.crash.is_firing(),
                    finding,
                ));
            }
            if exact {
                w.pid = None;
            }
        }
        let mut changed = false;
        for (id, firing, finding) in hits {
            changed |= self.track(id, firing, finding);
        }
        for finding in crashes {
            changed |= self.track(finding.id.clone(), true, Some(finding));
        }
        changed
    }

    /// One OOM kill: a finding about the victim's process name (updated on every kill).
    fn oom_kill(&mut self, kill: &OomKill) -> bool {
        let now = self.now();
        let finding = self.oom.observe(now, kill);
        self.track(finding.id.clone(), true, Some(finding))
    }

    /// Drops the OOM findings whose hold ran out.
    fn expire_oom_kills(&mut self) -> bool {
        let now = self.now();
        let mut changed = false;
        for id in self.oom.expire(now) {
            changed |= self.active.remove(&id).is_some();
        }
        changed
    }

    /// Reads each watched cgroup's PSI and installs its memory trigger while it has none.
    fn poll_cgroups(
        &mut self,
        pressure: &HostPressure,
        config: &AgentConfig,
        events: &mpsc::Sender<CgroupTriggerEvent>,
    ) -> bool {
        let mut changed = false;
        for i in 0..self.cgroups.len() {
            if !self.cgroups[i].trigger {
                self.cgroups[i].trigger =
                    spawn_cgroup_trigger(pressure, config, i, &self.cgroups[i].path, events);
            }
            changed |= self.read_cgroup(pressure, i);
        }
        changed
    }

    fn cgroup_trigger(&mut self, pressure: &HostPressure, event: CgroupTriggerEvent) -> bool {
        match event {
            CgroupTriggerEvent::Fired(i) => {
                self.metrics.events("psi_trigger", 1);
                self.read_cgroup(pressure, i)
            }
            CgroupTriggerEvent::Gone(i) => {
                if let Some(w) = self.cgroups.get_mut(i) {
                    w.trigger = false;
                }
                false
            }
        }
    }

    /// Feeds one cgroup's PSI (some avg10 per resource) to its detectors.
    fn read_cgroup(&mut self, pressure: &HostPressure, i: usize) -> bool {
        let now = self.now();
        let Some(w) = self.cgroups.get_mut(i) else {
            return false;
        };
        let mut results = Vec::new();
        for (resource, det) in &mut w.psi {
            match pressure.cgroup_psi(&w.path, *resource) {
                Ok(psi) => {
                    if w.missing {
                        tracing::info!(cgroup = w.path, "watched cgroup found");
                        w.missing = false;
                    }
                    let finding = det
                        .observe(now, psi.some.avg10)
                        .map(|f| f.evidence("full_avg10", psi.full.map_or(0.0, |l| l.avg10)));
                    results.push((
                        format!("{}/{}", det_name(*resource), w.path),
                        det.is_firing(),
                        finding,
                    ));
                }
                Err(e) => {
                    if !w.missing {
                        tracing::warn!(cgroup = w.path, error = %e, "watched cgroup's PSI is not readable (no such cgroup yet?)");
                        w.missing = true;
                    }
                    break;
                }
            }
        }
        let mut changed = false;
        for (id, firing, finding) in results {
            changed |= self.track(id, firing, finding);
        }
        changed
    }

    fn sample_connect_failures(&mut self, table: &FlowTable, elapsed: Duration) -> bool {
        let now = self.now();
        let secs = elapsed.as_secs_f64().max(1e-3);
        let failures = table.failures_by_remote();
        let mut changed = false;
        // Every known baseline gets a sample (0 when quiet), new remotes get one while there is
        // room.
        let remotes: BTreeSet<SocketAddr> = self
            .baselines
            .keys()
            .copied()
            .chain(failures.keys().copied())
            .collect();
        for remote in remotes {
            let rate = failures.get(&remote).copied().unwrap_or(0) as f64 / secs;
            if !self.baselines.contains_key(&remote) {
                if self.baselines.len() >= MAX_BASELINES {
                    continue;
                }
                let Ok(b) = RollingBaseline::new(
                    "connect_failures",
                    remote.to_string(),
                    self.connect_config.clone(),
                ) else {
                    continue;
                };
                self.baselines.insert(remote, b);
            }
            let Some(b) = self.baselines.get_mut(&remote) else {
                continue;
            };
            let finding = b.observe(now, rate);
            let firing = b.is_firing();
            changed |= self.track(format!("connect_failures/{remote}"), firing, finding);
        }
        changed
    }
}

const PSI_RESOURCES: [(&str, PsiResource); 3] = [
    ("psi_cpu", PsiResource::Cpu),
    ("psi_memory", PsiResource::Memory),
    ("psi_io", PsiResource::Io),
];

/// The detector name of a PSI resource.
fn det_name(resource: PsiResource) -> &'static str {
    PSI_RESOURCES
        .iter()
        .find(|(_, r)| *r == resource)
        .map_or("psi", |(n, _)| n)
}

/// What a watched cgroup's trigger task says: it fired, or it ended (the cgroup is gone or the
/// kernel refused it) and must be installed again.
#[derive(Clone, Copy, Debug)]
enum CgroupTriggerEvent {
    Fired(usize),
    Gone(usize),
}

/// Installs the memory trigger of watched cgroup `index` and runs it in a task that reports to
/// `events`; false when it cannot be installed now (no cgroup2, no such cgroup yet).
fn spawn_cgroup_trigger(
    pressure: &HostPressure,
    config: &AgentConfig,
    index: usize,
    cgroup: &str,
    events: &mpsc::Sender<CgroupTriggerEvent>,
) -> bool {
    let Some(root) = pressure.layout().v2_root.as_ref() else {
        return false;
    };
    let file = crate::pressure::cgroup::join_cgroup(root, cgroup).join("memory.pressure");
    let (stall, window) = config.detectors.cgroup_psi_trigger;
    let spec = PsiTriggerSpec {
        kind: StallKind::Some,
        stall,
        window,
    };
    let mut trigger = match PsiTrigger::open(&file, spec) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(cgroup, error = %e, "no PSI trigger on the cgroup yet");
            return false;
        }
    };
    tracing::info!(cgroup, file = %file.display(), "PSI trigger installed on the watched cgroup");
    let events = events.clone();
    tokio::spawn(async move {
        loop {
            let event = match trigger.next_event().await {
                Ok(_) => CgroupTriggerEvent::Fired(index),
                Err(e) => {
                    tracing::info!(error = %e, "PSI trigger of a watched cgroup ended");
                    let _ = events.send(CgroupTriggerEvent::Gone(index)).await;
                    return;
                }
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    });
    true
}

/// The pid of a watched process now, if it runs (a zombie does not count).
pub(crate) fn locate(locator: &ProcessLocator, supervised: &BTreeMap<String, u32>) -> Option<u32> {
    match locator {
        ProcessLocator::Supervised(name) => {
            let pid = *supervised.get(name)?;
            crate::pressure::read_proc_stat(pid)?.alive().then_some(pid)
        }
        ProcessLocator::Pidfile(path) => {
            let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
            std::path::Path::new(&format!("/proc/{pid}"))
                .exists()
                .then_some(pid)
        }
        ProcessLocator::Comm(comm) => find_pid(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end_matches('\n') == comm)
        }),
        ProcessLocator::Cmdline(cmdline) => find_pid(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let text = String::from_utf8_lossy(&raw);
                text.trim_end_matches('\0').replace('\0', " ") == *cmdline
            })
        }),
    }
}

/// The lowest pid for which `matches` holds (the oldest process, usually the parent).
fn find_pid(matches: impl Fn(u32) -> bool) -> Option<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.into_iter().find(|&p| matches(p))
}

fn open_psi_trigger(config: &AgentConfig) -> Option<PsiTrigger> {
    let (stall, window) = config.detectors.psi_trigger;
    let spec = PsiTriggerSpec {
        kind: StallKind::Some,
        stall,
        window,
    };
    match PsiTrigger::open(std::path::Path::new("/proc/pressure/memory"), spec) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "no PSI trigger on memory; PSI is polled every second only");
            None
        }
    }
}

async fn next_trigger(
    trigger: &mut Option<PsiTrigger>,
) -> Result<(), crate::pressure::PressureError> {
    match trigger {
        Some(t) => t.next_event().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// The next exit or OOM kill, or never when the process probe is not loaded.
async fn next_process_record(
    events: &mut Option<ProcessEvents>,
) -> Result<ProcessRecord, crate::probes::ProbeError> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

// -------------------------------------------------------------------------------- probes

/// The probes the agent runs, each loaded on its own so one failure leaves the others working.
/// New probes are added here: load, report status, drain.
struct Probes {
    flows: FlowProbes,
    process: Option<ProcessEvents>,
    process_set: Option<ProbeSet>,
}

impl Probes {
    fn load(metrics: &AgentMetrics) -> Self {
        let flows = FlowProbes::load();
        for (name, loaded) in [
            ("tcp", flows.tcp.is_some()),
            ("flows", flows.stats.is_some()),
            ("tcp_close", flows.closes.is_some()),
        ] {
            let error = flows
                .missing
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, e)| e.to_string());
            match (loaded, error) {
                (true, _) => metrics.probe(name, Ok(&[])),
                (false, Some(e)) => metrics.probe(name, Err(&e)),
                (false, None) => metrics.probe(name, Err("not available")),
            }
        }
        let (process, process_set) = match ProbeSet::load(&ProbeOptions {
            process: true,
            ..ProbeOptions::none()
        }) {
            Ok(mut set) => {
                metrics.probe("process", Ok(set.programs()));
                (set.take_process_events().ok(), Some(set))
            }
            Err(e) => {
                metrics.probe("process", Err(&e.to_string()));
                (None, None)
            }
        };
        Self {
            flows,
            process,
            process_set,
        }
    }

    fn drain(&mut self, metrics: &AgentMetrics, table: &mut FlowTable) {
        let drained = self.flows.drain_into(table);
        metrics.events("tcp_state", drained.transitions);
        metrics.events("connect_failure", drained.failures);
        metrics.events("tcp_close", drained.closes);
        self.drops(metrics);
    }

    /// Turns one process-probe record into an exit or an OOM kill.
    fn process_record(
        metrics: &AgentMetrics,
        record: ProcessRecord,
        exits: &mut Vec<(u32, String, Exit)>,
        kills: &mut Vec<OomKill>,
    ) {
        match record {
            ProcessRecord::Exit(e) => {
                metrics.events("process_exit", 1);
                let exit = match e.status {
                    ExitStatus::Exited(code) => Exit::Code(code),
                    ExitStatus::Signaled { signal, .. } => Exit::Signal(signal),
                };
                exits.push((e.pid, e.comm, exit));
            }
            ProcessRecord::OomKill(k) => {
                metrics.events("oom_kill", 1);
                tracing::warn!(pid = k.pid, comm = k.comm, "OOM kill");
                kills.push(OomKill {
                    pid: k.pid,
                    comm: k.comm,
                    anon_rss_kb: k.anon_rss_kb,
                    total_vm_kb: k.total_vm_kb,
                    oom_score_adj: k.oom_score_adj,
                });
            }
            ProcessRecord::Unknown(_) => {}
        }
    }

    fn drops(&self, metrics: &AgentMetrics) {
        let mut dropped = BTreeMap::<&str, u64>::new();
        for set in self.flows.sets().iter().chain(self.process_set.as_ref()) {
            if let Ok(c) = set.counters() {
                *dropped.entry("tcp_events").or_default() += c.tcp_events.dropped;
                *dropped.entry("connect_failures").or_default() += c.connect_failures.dropped;
                *dropped.entry("process_events").or_default() += c.process_events.dropped;
                *dropped.entry("tcp_closes").or_default() += c.tcp_closes.dropped;
            }
        }
        for (ring, total) in dropped {
            metrics.kernel_drops(ring, total);
        }
    }
}

// ---------------------------------------------------------------------------------- link

struct LinkSettings {
    host_id: String,
    labels: BTreeMap<String, String>,
    urls: Vec<String>,
    tls: Option<crate::report::ClientTls>,
    epoch: (Instant, u64),
}

/// The link's mutable state; every transition goes through [`Link::set`].
struct Link {
    settings: LinkSettings,
    replicas: Replicas,
    metrics: AgentMetrics,
    tracker: LinkTracker,
    ledger: FindingLedger,
    backoff: Backoff,
    registered: bool,
    /// The last call reached a replica.
    connected: bool,
    interval: Duration,
    /// When the next register or heartbeat attempt is due.
    due: tokio::time::Instant,
}

impl Link {
    fn set(&mut self, link: CoordinatorLink) {
        self.connected = link.is_connected();
        if let Some(changed) = self.tracker.update(link) {
            self.metrics.link(&changed);
        }
    }

    fn unreachable(&mut self, error: &CallError) {
        self.set(CoordinatorLink::Unreachable {
            reason: error.to_string(),
        });
        self.due = tokio::time::Instant::now() + self.backoff.next_delay();
    }

    async fn register(&mut self) {
        let request = pb::RegisterRequest {
            host_id: self.settings.host_id.clone(),
            labels: self.settings.labels.clone().into_iter().collect(),
        };
        let result = self
            .replicas
            .call(|mut c| {
                let r = request.clone();
                async move { c.register(r).await }
            })
            .await;
        self.metrics.report("register", result.is_ok());
        match result {
            Ok((url, reply)) => {
                self.registered = true;
                self.interval = heartbeat_interval(reply.heartbeat_interval_ms, reply.ttl_ms);
                self.backoff.reset();
                self.due = tokio::time::Instant::now() + self.interval;
                self.set(CoordinatorLink::Connected { url });
                // A (re-)registered host starts with a blank slate at the coordinator.
                self.ledger.forget_sent();
                self.flush().await;
            }
            Err(e) => self.unreachable(&e),
        }
    }

    async fn heartbeat(&mut self) {
        let request = pb::HeartbeatRequest {
            host_id: self.settings.host_id.clone(),
        };
        let result = self
            .replicas
            .call(|mut c| {
                let r = request.clone();
                async move { c.heartbeat(r).await }
            })
            .await;
        self.metrics.report("heartbeat", result.is_ok());
        let (url, result) = match result {
            Ok((url, _)) => (Some(url), Ok(())),
            Err(e) => (None, Err(e)),
        };
        match after_call(&result) {
            NextStep::Continue => {
                self.backoff.reset();
                self.due = tokio::time::Instant::now() + self.interval;
                if let Some(url) = url {
                    self.set(CoordinatorLink::Connected { url });
                }
                self.flush().await;
            }
            NextStep::Reregister => {
                tracing::info!(
                    "the coordinator forgot this host (registration expired); registering again"
                );
                self.registered = false;
                self.due = tokio::time::Instant::now();
            }
            NextStep::Backoff => {
                if let Err(e) = &result {
                    self.unreachable(e);
                }
            }
            NextStep::Drop => {
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "heartbeat refused");
                }
                self.due = tokio::time::Instant::now() + self.interval;
            }
        }
    }

    /// Reports the findings the coordinator has not seen in their current form.
    async fn flush(&mut self) {
        if !self.registered || !self.tracker_connected() {
            return;
        }
        let pending = self.ledger.pending();
        if pending.is_empty() {
            return;
        }
        let (start, start_unix) = self.settings.epoch;
        let now_mono = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let request = pb::ReportFindingsRequest {
            host_id: self.settings.host_id.clone(),
            findings: pending
                .iter()
                .map(|f| {
                    let age = now_mono.saturating_sub(f.since);
                    finding_to_wire(f, (start_unix + now_mono).saturating_sub(age))
                })
                .collect(),
        };
        let result = self
            .replicas
            .call(|mut c| {
                let r = request.clone();
                async move { c.report_findings(r).await }
            })
            .await;
        self.metrics.report("findings", result.is_ok());
        let result = result.map(|(_, reply)| {
            tracing::info!(
                sent = pending.len(),
                accepted = reply.accepted,
                "findings reported"
            );
            self.ledger.mark_sent(&pending);
        });
        self.after_report(&result);
    }

    async fn report_flows(&mut self, edges: Vec<pb::FlowEdge>) {
        if !self.registered || !self.tracker_connected() {
            // Observing only: flows are not kept for later, the next period brings fresh ones.
            return;
        }
        let request = pb::ReportFlowsRequest {
            host_id: self.settings.host_id.clone(),
            edges,
        };
        let result = self
            .replicas
            .call(|mut c| {
                let r = request.clone();
                async move { c.report_flows(r).await }
            })
            .await
            .map(|_| ());
        self.metrics.report("flows", result.is_ok());
        self.after_report(&result);
    }

    fn after_report(&mut self, result: &Result<(), CallError>) {
        match (after_call(result), result) {
            (NextStep::Continue, _) | (_, Ok(())) => {}
            (NextStep::Reregister, Err(_)) => {
                self.registered = false;
                self.due = tokio::time::Instant::now();
            }
            (NextStep::Backoff, Err(e)) => self.unreachable(e),
            (NextStep::Drop, Err(e)) => tracing::warn!(error = %e, "report refused; dropped"),
        }
    }

    fn tracker_connected(&self) -> bool {
        self.connected
    }
}

async fn link_task(
    settings: LinkSettings,
    mut findings: watch::Receiver<Vec<Finding>>,
    mut flows: mpsc::Receiver<Vec<pb::FlowEdge>>,
    metrics: AgentMetrics,
    stop: watch::Receiver<bool>,
) {
    let urls = settings.urls.clone();
    let tls = settings.tls.clone();
    let mut link = Link {
        settings,
        replicas: Replicas::new(urls, tls),
        metrics,
        tracker: LinkTracker::default(),
        ledger: FindingLedger::default(),
        backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
        registered: false,
        connected: false,
        interval: Duration::from_secs(5),
        due: tokio::time::Instant::now(),
    };
    loop {
        // Each step is raced against shutdown, so a slow coordinator never delays exit beyond
        // the current select.
        tokio::select! {
            () = tokio::time::sleep_until(link.due) => {
                tokio::select! {
                    () = async {
                        if link.registered { link.heartbeat().await } else { link.register().await }
                    } => {}
                    () = stopped(stop.clone()) => break,
                }
            }
            changed = findings.changed() => {
                if changed.is_err() {
                    break;
                }
                let current = findings.borrow_and_update().clone();
                link.ledger.set_current(current);
                tokio::select! {
                    () = link.flush() => {}
                    () = stopped(stop.clone()) => break,
                }
            }
            Some(edges) = flows.recv() => {
                tokio::select! {
                    () = link.report_flows(edges) => {}
                    () = stopped(stop.clone()) => break,
                }
            }
            () = stopped(stop.clone()) => break,
        }
    }
}
