//! The action task: findings → proposal → lease → journal → act → verify → report → release.
//!
//! One task per agent, one action at a time. What to propose and when is decided by the pure
//! [`Chooser`]; this module does the I/O around it:
//!
//! 1. Before asking, the action's preconditions are checked and its plan computed with the
//!    dry-run executor (a cleanup with nothing eligible asks for no lease); the plan travels
//!    in the request's evidence, so the coordinator's audit says what would be done.
//! 2. `Acquire`, timed from when it was *sent*: the local deadline is `sent + ttl − margin` on
//!    the monotonic clock. No coordinator or no grant: nothing is done (I6: the observer keeps
//!    running regardless). Observe mode logs "would have done" and touches nothing; assist
//!    mode polls the approval and, once approved, renews before acting so the deadline is
//!    measured from a request this agent sent.
//! 3. The token and plan go to the journal (fsynced) before any step; the journal refuses a
//!    token not above every token recorded for the class (I2).
//! 4. The executor runs on a blocking thread. Before every step it asks `continue_ok`, which
//!    checks the agent is not stopping, the lease was not lost, the deadline has not passed,
//!    and then journals the step. A renewal task extends the deadline while the lease renews;
//!    once the deadline has passed it is never extended again (the dead-man is final).
//! 5. Verification within the safety case's window (free space at the target; the restarted
//!    target healthy), the outcome journaled, then `Release` with it. A lease that already
//!    ended gets its outcome reported as a late outcome instead.
//!
//! After a restart, actions the journal shows as interrupted are reported as `interrupted` and
//! never resumed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use interlock_proto::v1 as pb;
use interlock_proto::v1::acquire_reply::Outcome as Reply;
use tokio::sync::watch;

use crate::actions::cleanup::{self, CleanupConfig, DryRunCleanup, FsCleanup};
use crate::actions::journal::{Journal, JournalError};
use crate::actions::restart::{
    DryRunRestart, HostRestart, RestartConfig, RestartExecutor as _, RestartReport, RestartTarget,
    Supervisor, Systemctl, TargetKind,
};
use crate::actions::trigger::{
    ActionClass, After, Chooser, CleanupRule, Proposal, RestartRule, Trigger,
};
use crate::config::{ActionsConfig, ProcessLocator, WatchedProcess};
use crate::finding::{Finding, Millis};
use crate::metrics::AgentMetrics;
use crate::report::{CallError, Replicas};
use crate::run::unix_ms;

/// Environment variable naming a failpoint, for fault tests: `kill_at_step=N` makes the agent
/// SIGKILL itself when step N of an action has been journaled and before it runs.
pub const FAILPOINT_ENV: &str = "INTERLOCK_AGENT_FAILPOINT";
/// How often an assist-mode request is polled.
const APPROVAL_POLL: Duration = Duration::from_secs(1);
/// Attempts to deliver an outcome before giving up (the journal keeps it either way).
const REPORT_ATTEMPTS: u32 = 5;
/// Pause between those attempts.
const REPORT_PAUSE: Duration = Duration::from_millis(500);
/// How often free space is read while verifying a cleanup.
const VERIFY_POLL: Duration = Duration::from_millis(200);

/// What the observer and the action task share: the pids of the argv targets the agent runs,
/// and the targets being acted on now (their exits are the agent's own doing, not crashes).
#[derive(Debug, Default)]
pub struct ActionShared {
    pub supervised: BTreeMap<String, u32>,
    /// Argv targets the agent could not start (or restart): down, so the observer reports
    /// them as crashed and the crash trigger retries.
    pub failed: BTreeSet<String>,
    pub acting: BTreeSet<String>,
}

pub type Shared = Arc<Mutex<ActionShared>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, ActionShared> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The live state of one lease, shared by the action thread and the renewal task.
#[derive(Debug)]
struct LeaseClock {
    deadline: Mutex<Instant>,
    lost: AtomicBool,
    /// Why the lease stopped allowing steps, once it did.
    why: Mutex<Option<String>>,
}

impl LeaseClock {
    fn new(deadline: Instant) -> Self {
        Self {
            deadline: Mutex::new(deadline),
            lost: AtomicBool::new(false),
            why: Mutex::new(None),
        }
    }

    fn deadline(&self) -> Instant {
        *self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a step may start now; once it says no, it says no for good.
    fn allows(&self, now: Instant) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        if now >= self.deadline() {
            self.lose("the lease deadline passed (TTL minus margin): dead-man stop");
            return false;
        }
        true
    }

    fn lose(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            *self
                .why
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why.to_owned());
        }
    }

    fn why(&self) -> Option<String> {
        self.why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A renewal sent at `sent` succeeded: the deadline moves to `sent + ttl − margin`, unless
    /// the lease was already lost (a passed deadline is final).
    fn renewed(&self, sent: Instant, ttl: Duration, margin: Duration) {
        if self.lost.load(Ordering::SeqCst) {
            return;
        }
        let mut d = self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if Instant::now() >= *d {
            drop(d);
            self.lose("the lease deadline passed before the renewal answered: dead-man stop");
            return;
        }
        let Some(new) = sent.checked_add(ttl.saturating_sub(margin)) else {
            return;
        };
        if new > *d {
            *d = new;
        }
    }
}

/// A grant as the agent holds it.
#[derive(Clone, Debug)]
struct Grant {
    lease_id: String,
    token: u64,
    ttl: Duration,
    verification_window: Duration,
    approver: String,
}

impl Grant {
    fn from_wire(g: &pb::Granted) -> Self {
        Self {
            lease_id: g.lease_id.clone(),
            token: g.token,
            ttl: Duration::from_millis(g.ttl_ms),
            verification_window: Duration::from_millis(g.verification_window_ms),
            approver: g.approver.clone(),
        }
    }
}

/// How one action ended.
#[derive(Clone, Debug)]
struct Ended {
    outcome: pb::Outcome,
    detail: String,
}

/// The outcome as the journal, metrics and logs spell it (`success`, `verification_failed`).
fn outcome_name(o: pb::Outcome) -> String {
    o.as_str_name()
        .trim_start_matches("OUTCOME_")
        .to_ascii_lowercase()
}

impl Ended {
    fn new(outcome: pb::Outcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            detail: detail.into(),
        }
    }
}

/// The action task's fixed inputs.
#[derive(Debug)]
pub struct ActorSettings {
    pub host_id: String,
    pub urls: Vec<String>,
    /// Mutual TLS towards the coordinator, if configured.
    pub tls: Option<crate::report::ClientTls>,
    pub actions: ActionsConfig,
    /// Mount points of the host (to find which mount holds each cleanup root).
    pub mounts: Vec<PathBuf>,
    /// The watched processes (a restart after a crash first checks the target is still down).
    pub processes: Vec<WatchedProcess>,
}

/// The mount point a path lies on: the longest mount that is a prefix of it.
pub fn mount_of(path: &Path, mounts: &[PathBuf]) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
        .cloned()
}

/// The cleanup settings restricted to the roots on `mount`.
fn cleanup_for(config: &CleanupConfig, mount: &Path, mounts: &[PathBuf]) -> CleanupConfig {
    let mut c = config.clone();
    c.roots
        .retain(|r| mount_of(&r.path, mounts).as_deref() == Some(mount));
    c
}

/// Free share of the filesystem at `mount`, as cleanup counts it (available / total).
fn free_ratio(mount: &Path) -> Option<f64> {
    let s = crate::pressure::disk::statvfs(mount).ok()?;
    (s.blocks > 0).then(|| s.blocks_available as f64 / s.blocks as f64)
}

/// The action task and what it owns.
struct Actor {
    settings: ActorSettings,
    replicas: Replicas,
    journal: Arc<Mutex<Journal>>,
    chooser: Chooser,
    /// The real restart executor (its supervisor owns the argv targets' processes). Moved onto
    /// the blocking thread for each restart and back.
    restart: Option<HostRestart<Systemctl>>,
    shared: Shared,
    metrics: AgentMetrics,
    stop: watch::Receiver<bool>,
    failpoint: Option<u64>,
    /// Proposals last denied by a full cap: retried with a dry run first.
    waiting_on_cap: BTreeSet<(ActionClass, String)>,
    /// The observer's current findings (preconditions are checked against them just before
    /// acting, which may be long after the proposal in assist mode).
    findings: watch::Receiver<Vec<Finding>>,
}

/// Opens the journal named in the config (creating its directory).
pub fn open_journal(config: &ActionsConfig) -> Result<Journal, JournalError> {
    if let Some(dir) = config.journal.parent() {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
            path: config.journal.clone(),
            source,
        })?;
    }
    Journal::open(&config.journal)
}

/// Runs the action task until `stop`; an action under way is stopped between steps, its
/// outcome reported and its lease released before this returns.
pub async fn actor_task(
    settings: ActorSettings,
    journal: Journal,
    mut findings: watch::Receiver<Vec<Finding>>,
    shared: Shared,
    metrics: AgentMetrics,
    stop: watch::Receiver<bool>,
) {
    let actions = &settings.actions;
    let restart_rules = actions
        .restart
        .as_ref()
        .map(|r| restart_rules(r, actions.cooldown, &settings.processes))
        .unwrap_or_default();
    let cleanup_rule = actions.cleanup.as_ref().map(|c| CleanupRule {
        mounts: c
            .roots
            .iter()
            .filter_map(|r| mount_of(&r.path, &settings.mounts))
            .collect(),
        on: c.on.clone(),
        cooldown: c.cooldown.unwrap_or(actions.cooldown),
    });
    let failpoint = std::env::var(FAILPOINT_ENV).ok().and_then(|v| {
        let n = v.strip_prefix("kill_at_step=")?.parse().ok();
        if n.is_none() {
            tracing::warn!(value = v, "unknown failpoint ignored");
        }
        n
    });
    let mut actor = Actor {
        chooser: Chooser::new(restart_rules, cleanup_rule, actions.retry),
        replicas: Replicas::new(settings.urls.clone(), settings.tls.clone()),
        journal: Arc::new(Mutex::new(journal)),
        restart: Some(HostRestart {
            systemd: Systemctl,
            // Next to the journal: which argv instances run, for adoption after a restart.
            supervisor: Supervisor::with_state(
                settings.actions.journal.with_extension("supervised"),
            ),
        }),
        settings,
        shared,
        metrics,
        stop,
        failpoint,
        findings: findings.clone(),
        waiting_on_cap: BTreeSet::new(),
    };
    actor.start_supervised().await;
    let mut unreported = actor.interrupted();
    let epoch = Instant::now();
    let now = || Millis::try_from(epoch.elapsed().as_millis()).unwrap_or(Millis::MAX);
    let mut current: Vec<Finding> = findings.borrow_and_update().clone();
    loop {
        if *actor.stop.borrow() {
            break;
        }
        if !unreported.is_empty() {
            unreported = actor.report_interrupted(unreported).await;
        }
        let busy = lock(&actor.shared).acting.clone();
        if let Some(proposal) = actor.chooser.next(&current, now(), &busy) {
            let after = actor.handle(&proposal).await;
            actor.chooser.done(&proposal, after, now());
            current = findings.borrow_and_update().clone();
            continue;
        }
        let wake = actor
            .chooser
            .next_due(now())
            .map_or(Duration::from_secs(3600), |t| {
                Duration::from_millis(t.saturating_sub(now()))
            });
        // Interrupted actions not yet reported are retried on the retry cadence.
        let wake = if unreported.is_empty() {
            wake
        } else {
            wake.min(actor.settings.actions.retry)
        };
        let mut stop = actor.stop.clone();
        tokio::select! {
            changed = findings.changed() => {
                if changed.is_err() {
                    break;
                }
                current = findings.borrow_and_update().clone();
            }
            () = tokio::time::sleep(wake) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // The argv targets the agent runs: left running for the next run to adopt (an agent
    // rollout restarts nothing without a lease), or stopped with their stop signal and grace.
    if let (Some(mut exec), Some(config)) =
        (actor.restart.take(), actor.settings.actions.restart.clone())
    {
        if actor.settings.actions.stop_supervised_on_exit {
            let stopped =
                tokio::task::spawn_blocking(move || exec.supervisor.stop_all(&config)).await;
            if let Ok(stopped) = stopped
                && !stopped.is_empty()
            {
                tracing::info!(
                    ?stopped,
                    "supervised targets stopped (on_agent_stop = \"stop\")"
                );
            }
        } else {
            let kept = exec.supervisor.detach_all();
            if !kept.is_empty() {
                tracing::info!(
                    ?kept,
                    "supervised targets left running; the next agent run adopts them"
                );
            }
        }
    }
    tracing::info!("action task stopped");
}

/// The chooser's view of the restart targets. An OOM kill names its victim by comm, so it
/// maps to a target only through a `[[watch.process]]` of the target's name that locates it by
/// that comm (a program name guessed from argv would match unrelated processes).
fn restart_rules(
    config: &RestartConfig,
    default_cooldown: Duration,
    processes: &[WatchedProcess],
) -> Vec<RestartRule> {
    config
        .targets()
        .iter()
        .map(|t| RestartRule {
            name: t.name().to_owned(),
            comm: processes
                .iter()
                .find(|w| w.name == t.name())
                .and_then(|w| match &w.locator {
                    ProcessLocator::Comm(c) => Some(c.clone()),
                    _ => None,
                }),
            on: t.on().clone(),
            cooldown: t.cooldown().unwrap_or(default_cooldown),
        })
        .collect()
}

impl Actor {
    fn class_name(class: ActionClass) -> &'static str {
        class.as_str()
    }

    /// Starts every argv target (the agent is their supervisor); a target that cannot start is
    /// logged and left to the crash trigger.
    async fn start_supervised(&mut self) {
        let Some(config) = self.settings.actions.restart.clone() else {
            return;
        };
        let Some(mut exec) = self.restart.take() else {
            return;
        };
        let (exec, adopted, started, saved) = tokio::task::spawn_blocking(move || {
            // Instances an earlier run started and that still run are adopted, not doubled.
            let adopted = exec.supervisor.adopt(&config);
            let mut started = Vec::new();
            for t in config.targets() {
                if matches!(t.kind(), TargetKind::Supervised(_))
                    && exec.supervisor.pid(t.name()).is_none()
                {
                    started.push((t.name().to_owned(), exec.supervisor.start(t)));
                }
            }
            let saved = exec.supervisor.save();
            (exec, adopted, started, saved)
        })
        .await
        .unwrap_or_else(|e| panic!("starting supervised targets panicked: {e}"));
        self.restart = Some(exec);
        if let Err(e) = saved {
            tracing::warn!(error = %e, "cannot record the supervised instances; a restarted agent will not adopt them");
        }
        for (name, pid) in adopted {
            tracing::info!(
                target = name,
                pid,
                "supervised target adopted: an earlier run of the agent started it and it still runs"
            );
            lock(&self.shared).supervised.insert(name, pid);
        }
        for (name, result) in started {
            match result {
                Ok(pid) => {
                    tracing::info!(target = name, pid, "supervised target started");
                    lock(&self.shared).supervised.insert(name, pid);
                }
                Err(e) => {
                    tracing::error!(target = name, error = %e, "supervised target did not start; it counts as crashed");
                    lock(&self.shared).failed.insert(name);
                }
            }
        }
    }

    /// The journal's interrupted actions (the agent died mid-action): reported, never resumed.
    fn interrupted(&self) -> Vec<crate::actions::journal::Interrupted> {
        let journal = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = journal.interrupted();
        for i in &list {
            tracing::warn!(
                token = i.token,
                class = i.class,
                target = i.target,
                steps = i.steps.len(),
                "an action was interrupted by an agent restart; it will not be resumed, its outcome is reported as interrupted"
            );
        }
        list
    }

    /// Reports interrupted actions; returns those that could not be reported yet.
    async fn report_interrupted(
        &mut self,
        list: Vec<crate::actions::journal::Interrupted>,
    ) -> Vec<crate::actions::journal::Interrupted> {
        let mut left = Vec::new();
        for i in list {
            let detail = format!(
                "the agent restarted mid-action after {} journaled step(s) ({}); not resumed",
                i.steps.len(),
                i.steps.last().map_or("none", String::as_str)
            );
            let ended = Ended::new(pb::Outcome::Interrupted, detail);
            if self
                .deliver(&i.lease_id, i.token, &i.class, &i.target, &ended, 1)
                .await
            {
                self.metrics.action(&i.class, "interrupted");
                let r = self
                    .journal
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .done(i.token, "interrupted", unix_ms());
                if let Err(e) = r {
                    tracing::error!(error = %e, "cannot journal the interrupted outcome");
                }
            } else {
                left.push(i);
            }
        }
        left
    }

    /// The whole life of one proposal. Returns what the chooser should do with it next.
    async fn handle(&mut self, proposal: &Proposal) -> After {
        let class = Self::class_name(proposal.class);
        let plan = match self.dry_run(proposal).await {
            Ok(plan) => plan,
            Err(why) => {
                tracing::info!(
                    class,
                    target = proposal.target,
                    finding = proposal.finding_id,
                    why,
                    "no action: nothing to do"
                );
                return After::Recorded;
            }
        };
        let evidence = serde_json::json!({
            "finding": proposal.finding_id,
            "summary": proposal.finding_summary,
            "trigger": proposal.trigger.name(),
            "plan": plan,
        })
        .to_string();
        let request = pb::AcquireRequest {
            host_id: self.settings.host_id.clone(),
            class: class.to_owned(),
            target: proposal.target.clone(),
            evidence: truncate(evidence, 4000),
            dry_run: false,
        };
        // After a cap denial, ask with a dry run first (nothing is written or audited) and for
        // real only once it would pass, so a waiting host does not add a denial to the audit
        // at every retry. The real request is still decided, and audited, on its own.
        let key = (proposal.class, proposal.target.clone());
        if self.waiting_on_cap.contains(&key) {
            let probe = pb::AcquireRequest {
                dry_run: true,
                ..request.clone()
            };
            let would = self
                .replicas
                .call(|mut c| {
                    let r = probe.clone();
                    async move { c.acquire(r).await }
                })
                .await;
            if let Ok((
                _,
                pb::AcquireReply {
                    outcome: Some(Reply::Denied(d)),
                    ..
                },
            )) = &would
                && d.check == "cap"
            {
                return After::Retry;
            }
        }
        self.waiting_on_cap.remove(&key);
        let sent = Instant::now();
        let reply = self
            .replicas
            .call(|mut c| {
                let r = request.clone();
                async move { c.acquire(r).await }
            })
            .await;
        let reply = match reply {
            Ok((_, reply)) => reply,
            Err(e) => {
                self.metrics.action(class, "unreachable");
                tracing::warn!(class, target = proposal.target, error = %e, "no lease, no action: the coordinator did not grant (observing only)");
                return After::Retry;
            }
        };
        match reply.outcome {
            Some(Reply::Granted(g)) => {
                self.metrics.action(class, "granted");
                self.act(proposal, Grant::from_wire(&g), sent, &plan).await
            }
            Some(Reply::Denied(d)) => {
                self.metrics.action(class, "denied");
                tracing::info!(
                    class,
                    target = proposal.target,
                    check = d.check,
                    reason = d.reason,
                    "lease denied; not acting"
                );
                if d.check == "cap" {
                    self.waiting_on_cap.insert(key);
                }
                After::for_denial(&d.check)
            }
            Some(Reply::Observed(o)) => {
                self.metrics.action(class, "observed");
                tracing::info!(
                    class,
                    target = proposal.target,
                    would_grant = o.would_grant,
                    check = o.check,
                    plan = %plan,
                    "observe mode: would have done this; touched nothing"
                );
                After::Recorded
            }
            Some(Reply::Pending(p)) => {
                self.metrics.action(class, "pending");
                tracing::info!(
                    class,
                    target = proposal.target,
                    approval = p.approval_id,
                    plan = %plan,
                    "assist mode: waiting for `interlock approve {}`",
                    p.approval_id
                );
                self.await_approval(proposal, &p, &plan).await
            }
            None => {
                tracing::warn!(class, "the coordinator answered without a decision");
                After::Retry
            }
        }
    }

    /// Polls a pending request until approved (then acts), refused or expired.
    async fn await_approval(
        &mut self,
        proposal: &Proposal,
        pending: &pb::Pending,
        plan: &str,
    ) -> After {
        let class = Self::class_name(proposal.class);
        let expires = pending.expires_at_ms.saturating_sub(unix_ms());
        // Approvals live minutes; an absurd expiry from the wire is capped at a day.
        let wait = Duration::from_millis(expires).min(Duration::from_secs(86_400));
        let deadline = Instant::now() + wait + APPROVAL_POLL;
        let request = pb::PollApprovalRequest {
            approval_id: pending.approval_id.clone(),
            host_id: self.settings.host_id.clone(),
        };
        // Bounded by the approval's expiry (and the agent stopping).
        while Instant::now() < deadline {
            let mut stop = self.stop.clone();
            tokio::select! {
                () = tokio::time::sleep(APPROVAL_POLL) => {}
                _ = stop.wait_for(|s| *s) => return After::Retry,
            }
            let reply = self
                .replicas
                .call(|mut c| {
                    let r = request.clone();
                    async move { c.poll_approval(r).await }
                })
                .await;
            match reply.map(|(_, r)| r.outcome) {
                Ok(Some(Reply::Granted(g))) => {
                    self.metrics.action(class, "granted");
                    tracing::info!(
                        class,
                        target = proposal.target,
                        approver = g.approver,
                        "approved"
                    );
                    let grant = Grant::from_wire(&g);
                    // The grant was made when the operator approved, before this poll was
                    // sent: renew first and time the deadline from the renewal.
                    let sent = Instant::now();
                    let renewed = self
                        .replicas
                        .call(|mut c| {
                            let r = pb::RenewRequest {
                                lease_id: grant.lease_id.clone(),
                                token: grant.token,
                            };
                            async move { c.renew(r).await }
                        })
                        .await;
                    if let Err(e) = renewed {
                        tracing::warn!(error = %e, "the approved lease could not be renewed; not acting");
                        let ended = Ended::new(
                            pb::Outcome::Abandoned,
                            format!("approved lease not renewable before acting: {e}"),
                        );
                        self.deliver_grant(&grant, proposal, &ended).await;
                        return After::Retry;
                    }
                    return self.act(proposal, grant, sent, plan).await;
                }
                Ok(Some(Reply::Denied(d))) => {
                    self.metrics.action(class, "denied");
                    tracing::info!(
                        class,
                        target = proposal.target,
                        check = d.check,
                        reason = d.reason,
                        "approval refused or expired; not acting"
                    );
                    return After::for_unapproved(&d.check);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "polling the approval failed; polling on"),
            }
        }
        After::Retry
    }

    /// What the action would do, from the dry-run executors; `Err` when there is nothing to
    /// do (a precondition does not hold).
    async fn dry_run(&self, proposal: &Proposal) -> Result<String, String> {
        match proposal.class {
            ActionClass::DiskCleanup => {
                let config = self.cleanup_config(&proposal.target)?;
                let mount = proposal.target.clone();
                let report = tokio::task::spawn_blocking(move || {
                    cleanup::run(
                        &mut DryRunCleanup::new(),
                        &config,
                        SystemTime::now(),
                        &mut || true,
                    )
                })
                .await
                .map_err(|e| format!("dry run panicked: {e}"))?
                .map_err(|e| e.to_string())?;
                if report.planned_deletes + report.planned_truncates == 0 {
                    return Err(format!(
                        "no eligible file under the cleanup roots on {mount}"
                    ));
                }
                Ok(format!(
                    "delete {} and truncate {} file(s), {} bytes, on {mount}",
                    report.planned_deletes, report.planned_truncates, report.bytes_planned
                ))
            }
            ActionClass::ProcessRestart => {
                self.still_down(proposal)?;
                let target = self.restart_target(&proposal.target)?;
                let report = DryRunRestart
                    .restart(&target, &mut || true)
                    .map_err(|e| e.to_string())?;
                Ok(format!("restart {}: {:?}", proposal.target, report.planned))
            }
        }
    }

    /// For a crash restart: the target must still be down (it may have come back on its own,
    /// or a same-named process exited). Checked before asking and again before acting.
    fn still_down(&self, proposal: &Proposal) -> Result<(), String> {
        if !matches!(proposal.trigger, Trigger::Crash | Trigger::CrashLoop) {
            return Ok(());
        }
        let supervised = lock(&self.shared).supervised.clone();
        let running = self
            .settings
            .processes
            .iter()
            .find(|w| w.name == proposal.target)
            .and_then(|w| crate::run::locate(&w.locator, &supervised));
        match running {
            // The process the crash is about may still be finishing its exit (the probe fires
            // as it starts exiting): that pid does not count as running.
            Some(pid) if Some(pid) != proposal.finding_pid => Err(format!(
                "{} is running (pid {pid}): nothing to restart",
                proposal.target
            )),
            _ => Ok(()),
        }
    }

    fn cleanup_config(&self, mount: &str) -> Result<CleanupConfig, String> {
        let config = self
            .settings
            .actions
            .cleanup
            .as_ref()
            .ok_or("no [cleanup] configured")?;
        let c = cleanup_for(config, Path::new(mount), &self.settings.mounts);
        if c.roots.is_empty() {
            return Err(format!("no cleanup root on {mount}"));
        }
        Ok(c)
    }

    fn restart_target(&self, name: &str) -> Result<RestartTarget, String> {
        self.settings
            .actions
            .restart
            .as_ref()
            .ok_or("no [restart] configured")?
            .target(name)
            .cloned()
            .map_err(|e| e.to_string())
    }

    /// Runs a granted action under its lease and reports how it ended.
    async fn act(&mut self, proposal: &Proposal, grant: Grant, sent: Instant, plan: &str) -> After {
        let class = Self::class_name(proposal.class);
        let margin = self.settings.actions.lease_margin;
        let ended = if grant.ttl <= margin {
            Ended::new(
                pb::Outcome::Abandoned,
                format!(
                    "lease TTL {:?} is not above the agent's lease_margin {margin:?}; lower [actions] lease_margin or raise the class's lease_ttl",
                    grant.ttl
                ),
            )
        } else if !self
            .findings
            .borrow()
            .iter()
            .any(|f| f.id == proposal.finding_id)
        {
            Ended::new(
                pb::Outcome::Abandoned,
                format!(
                    "precondition gone: {} cleared before acting",
                    proposal.finding_id
                ),
            )
        } else if let Err(why) = self.still_down(proposal) {
            Ended::new(pb::Outcome::Abandoned, format!("precondition gone: {why}"))
        } else {
            self.run_leased(proposal, &grant, sent, plan).await
        };
        let name = outcome_name(ended.outcome);
        self.metrics.action(class, &name);
        if ended.outcome == pb::Outcome::Success {
            tracing::info!(
                class,
                target = proposal.target,
                token = grant.token,
                detail = ended.detail,
                "action succeeded"
            );
        } else {
            tracing::warn!(
                class,
                target = proposal.target,
                token = grant.token,
                outcome = name,
                detail = ended.detail,
                "action did not succeed"
            );
        }
        self.deliver_grant(&grant, proposal, &ended).await;
        if !grant.approver.is_empty() {
            tracing::info!(
                approver = grant.approver,
                "the action ran on an operator's approval"
            );
        }
        After::Acted
    }

    /// Journal, renew, execute with a check before every step, verify, journal the outcome.
    async fn run_leased(
        &mut self,
        proposal: &Proposal,
        grant: &Grant,
        sent: Instant,
        planned: &str,
    ) -> Ended {
        let class = Self::class_name(proposal.class);
        let margin = self.settings.actions.lease_margin;
        // `act` refused TTLs not above the margin; an absurd TTL from the wire is capped.
        let allowed = grant
            .ttl
            .saturating_sub(margin)
            .min(Duration::from_secs(86_400));
        let clock = Arc::new(LeaseClock::new(sent + allowed));
        let plan = serde_json::json!({
            "finding": proposal.finding_id,
            "trigger": proposal.trigger.name(),
            "plan": planned,
            "approver": grant.approver,
        });
        let planned = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .plan(
                &grant.lease_id,
                grant.token,
                class,
                &proposal.target,
                plan,
                unix_ms(),
            );
        if let Err(e) = planned {
            return Ended::new(
                pb::Outcome::Abandoned,
                format!("journal refused the action: {e}"),
            );
        }
        lock(&self.shared).acting.insert(proposal.target.clone());
        let renewer = tokio::spawn(renew_loop(
            self.replicas.clone(),
            grant.clone(),
            clock.clone(),
            margin,
        ));
        let continue_ok = StepGate {
            clock: clock.clone(),
            journal: self.journal.clone(),
            token: grant.token,
            steps: 0,
            stop: self.stop.clone(),
            failpoint: self.failpoint,
        };
        let ended = match proposal.class {
            ActionClass::DiskCleanup => self.cleanup(proposal, grant, continue_ok, &clock).await,
            ActionClass::ProcessRestart => self.restart(proposal, grant, continue_ok, &clock).await,
        };
        renewer.abort();
        lock(&self.shared).acting.remove(&proposal.target);
        let r = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .done(grant.token, &outcome_name(ended.outcome), unix_ms());
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot journal the outcome");
        }
        ended
    }

    async fn cleanup(
        &mut self,
        proposal: &Proposal,
        grant: &Grant,
        mut gate: StepGate,
        clock: &Arc<LeaseClock>,
    ) -> Ended {
        let config = match self.cleanup_config(&proposal.target) {
            Ok(c) => c,
            Err(detail) => {
                return Ended::new(pb::Outcome::Abandoned, detail);
            }
        };
        let target_ratio = config.target_free_ratio;
        let result = tokio::task::spawn_blocking(move || {
            cleanup::run(
                &mut FsCleanup::new(),
                &config,
                SystemTime::now(),
                &mut || gate.allow(),
            )
        })
        .await;
        let report = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Ended::new(pb::Outcome::Failed, e.to_string());
            }
            Err(e) => {
                return Ended::new(pb::Outcome::Failed, format!("cleanup panicked: {e}"));
            }
        };
        let done = format!(
            "deleted {} file(s), truncated {}, freed {} bytes; races caught {}, vanished {}, errors {}",
            report.files_deleted,
            report.files_truncated,
            report.bytes_freed,
            report.races_caught,
            report.vanished,
            report.errors
        );
        if report.stopped_early {
            return Ended::new(
                pb::Outcome::Abandoned,
                format!("{}; {done}", self.stop_reason(clock)),
            );
        }
        // Verification: free space at or above the target within the window (and the lease).
        let mount = PathBuf::from(&proposal.target);
        let until = Instant::now() + grant.verification_window.min(Duration::from_secs(86_400));
        // Bounded by the window: each pass sleeps VERIFY_POLL.
        loop {
            let free = free_ratio(&mount).unwrap_or(0.0);
            if free >= target_ratio {
                return Ended::new(
                    pb::Outcome::Success,
                    format!(
                        "{done}; free {:.1}% (target {:.1}%)",
                        free * 100.0,
                        target_ratio * 100.0
                    ),
                );
            }
            if Instant::now() >= until || !clock.allows(Instant::now()) {
                return Ended::new(
                    pb::Outcome::VerificationFailed,
                    format!(
                        "{done}; free {:.1}% is below the target {:.1}%",
                        free * 100.0,
                        target_ratio * 100.0
                    ),
                );
            }
            tokio::time::sleep(VERIFY_POLL).await;
        }
    }

    async fn restart(
        &mut self,
        proposal: &Proposal,
        grant: &Grant,
        mut gate: StepGate,
        clock: &Arc<LeaseClock>,
    ) -> Ended {
        let target = match self.restart_target(&proposal.target) {
            // Healthy within the safety case's verification window, whatever the target allows.
            Ok(t) if grant.verification_window > Duration::ZERO => {
                t.within(grant.verification_window)
            }
            Ok(t) => t,
            Err(detail) => {
                return Ended::new(pb::Outcome::Abandoned, detail);
            }
        };
        let Some(mut exec) = self.restart.take() else {
            return Ended::new(
                pb::Outcome::Failed,
                "the restart executor is gone (an earlier restart panicked)",
            );
        };
        let issued = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let r = exec.restart(&target, &mut || gate.allow());
            (exec, r)
        })
        .await;
        let (exec, result) = match result {
            Ok(x) => x,
            Err(e) => {
                return Ended::new(pb::Outcome::Failed, format!("restart panicked: {e}"));
            }
        };
        {
            let supervised = matches!(
                self.restart_target(&proposal.target)
                    .map(|t| t.kind().clone()),
                Ok(TargetKind::Supervised(_))
            );
            let mut shared = lock(&self.shared);
            match exec.supervisor.pid(&proposal.target) {
                Some(pid) => {
                    shared.supervised.insert(proposal.target.clone(), pid);
                    shared.failed.remove(&proposal.target);
                }
                // Not running after the attempt: its old pid must not be taken for it later.
                None if supervised => {
                    shared.supervised.remove(&proposal.target);
                    shared.failed.insert(proposal.target.clone());
                }
                None => {}
            }
        }
        if let Err(e) = exec.supervisor.save() {
            tracing::warn!(error = %e, "cannot record the supervised instances");
        }
        self.restart = Some(exec);
        match result {
            Err(e) => Ended::new(pb::Outcome::Failed, e.to_string()),
            Ok(report) => self.restart_outcome(&report, issued, clock),
        }
    }

    fn restart_outcome(
        &self,
        report: &RestartReport,
        issued: Instant,
        clock: &LeaseClock,
    ) -> Ended {
        let timing = format!(
            "stopped {:?}, stop→start {:?}, stop→healthy {:?}, {} health poll(s), {:?} since issued",
            report.stopped,
            report.stop_to_start,
            report.stop_to_healthy,
            report.health_polls,
            issued.elapsed()
        );
        if let Some(step) = report.interrupted {
            return Ended::new(
                pb::Outcome::Abandoned,
                format!("{} before {step:?}; {timing}", self.stop_reason(clock)),
            );
        }
        if report.healthy {
            Ended::new(
                pb::Outcome::Success,
                format!("healthy again (pid {:?}); {timing}", report.new_pid),
            )
        } else {
            Ended::new(
                pb::Outcome::VerificationFailed,
                format!("not healthy within its health window; {timing}"),
            )
        }
    }

    fn stop_reason(&self, clock: &LeaseClock) -> String {
        if *self.stop.borrow() {
            "stopped: the agent is shutting down".into()
        } else {
            clock
                .why()
                .unwrap_or_else(|| "stopped: the lease no longer allows acting".into())
        }
    }

    /// [`Actor::deliver`] for a grant this run holds.
    async fn deliver_grant(&mut self, grant: &Grant, proposal: &Proposal, ended: &Ended) -> bool {
        let class = Self::class_name(proposal.class);
        self.deliver(
            &grant.lease_id,
            grant.token,
            class,
            &proposal.target,
            ended,
            REPORT_ATTEMPTS,
        )
        .await
    }

    /// Releases the lease with its outcome; a lease that already ended gets a late outcome.
    /// Returns whether the coordinator is done with it: recorded, or refused for good (a
    /// refusal is logged; retrying the same report cannot help). `false`: unreachable.
    async fn deliver(
        &mut self,
        lease_id: &str,
        token: u64,
        class: &str,
        target: &str,
        ended: &Ended,
        attempts: u32,
    ) -> bool {
        let release = pb::ReleaseRequest {
            lease_id: lease_id.to_owned(),
            token,
            outcome: ended.outcome as i32,
            detail: truncate(ended.detail.clone(), 4000),
        };
        let late = pb::ReportOutcomeRequest {
            host_id: self.settings.host_id.clone(),
            lease_id: lease_id.to_owned(),
            token,
            class: class.to_owned(),
            target: target.to_owned(),
            outcome: ended.outcome as i32,
            detail: release.detail.clone(),
        };
        // Bounded: `attempts` tries, REPORT_PAUSE apart.
        for attempt in 1..=attempts {
            let released = self
                .replicas
                .call(|mut c| {
                    let r = release.clone();
                    async move { c.release(r).await }
                })
                .await;
            let result = match released {
                Ok(_) => Ok("released"),
                Err(CallError::Rejected(why) | CallError::NotFound(why)) => {
                    tracing::info!(
                        lease = lease_id,
                        why,
                        "the lease already ended; reporting the outcome as late"
                    );
                    self.replicas
                        .call(|mut c| {
                            let r = late.clone();
                            async move { c.report_outcome(r).await }
                        })
                        .await
                        .map(|_| "late outcome recorded")
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(how) => {
                    tracing::info!(
                        lease = lease_id,
                        token,
                        outcome = outcome_name(ended.outcome),
                        how,
                        "outcome reported"
                    );
                    return true;
                }
                Err(CallError::Rejected(why) | CallError::NotFound(why)) => {
                    tracing::error!(
                        lease = lease_id,
                        token,
                        why,
                        "the coordinator refused the outcome; it stays only in the journal"
                    );
                    return true;
                }
                Err(e) => {
                    tracing::warn!(lease = lease_id, attempt, error = %e, "reporting the outcome failed");
                    if attempt < attempts {
                        tokio::time::sleep(REPORT_PAUSE).await;
                    }
                }
            }
        }
        false
    }
}

/// Renews the lease every third of its TTL until aborted; marks it lost when the coordinator
/// says it is gone. Unreachable coordinators are retried: the deadline is the dead-man.
async fn renew_loop(
    mut replicas: Replicas,
    grant: Grant,
    clock: Arc<LeaseClock>,
    margin: Duration,
) {
    // A third of the TTL, and at least twice before the local deadline (TTL minus margin), so
    // one slow renewal does not end the lease.
    let every = (grant.ttl / 3)
        .min(grant.ttl.saturating_sub(margin) / 2)
        .max(Duration::from_millis(100));
    let request = pb::RenewRequest {
        lease_id: grant.lease_id.clone(),
        token: grant.token,
    };
    // Ends when aborted, or when the lease is lost (the deadline passing marks it lost).
    loop {
        tokio::time::sleep(every).await;
        if !clock.allows(Instant::now()) {
            return;
        }
        let sent = Instant::now();
        match replicas
            .call(|mut c| {
                let r = request.clone();
                async move { c.renew(r).await }
            })
            .await
        {
            Ok((_, reply)) => clock.renewed(sent, Duration::from_millis(reply.ttl_ms), margin),
            Err(CallError::Rejected(why) | CallError::NotFound(why)) => {
                tracing::warn!(
                    lease = grant.lease_id,
                    why,
                    "lease lost; stopping at the next step"
                );
                clock.lose(&format!("lease lost: {why}"));
                return;
            }
            Err(e) => {
                tracing::warn!(lease = grant.lease_id, error = %e, "renewal failed; the deadline stands")
            }
        }
    }
}

/// What the executors call before every step.
struct StepGate {
    clock: Arc<LeaseClock>,
    journal: Arc<Mutex<Journal>>,
    token: u64,
    steps: u64,
    stop: watch::Receiver<bool>,
    failpoint: Option<u64>,
}

impl StepGate {
    fn allow(&mut self) -> bool {
        if *self.stop.borrow() {
            return false;
        }
        if !self.clock.allows(Instant::now()) {
            return false;
        }
        self.steps += 1;
        let step = format!("step {}", self.steps);
        let journaled = self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .step(self.token, &step, unix_ms());
        if let Err(e) = journaled {
            tracing::error!(error = %e, "cannot journal the step; stopping");
            self.clock.lose("the journal refused the step");
            return false;
        }
        if self.failpoint == Some(self.steps) {
            eprintln!(
                "failpoint kill_at_step={} hit (token {})",
                self.steps, self.token
            );
            // SAFETY: raising a signal on our own process has no memory-safety preconditions.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }
        // Checked again after the journal write, which may have taken a while.
        self.clock.allows(Instant::now())
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_deadline_is_final_even_if_a_renewal_answers_later() {
        let start = Instant::now();
        let clock = LeaseClock::new(start + Duration::from_millis(10));
        assert!(clock.allows(start));
        assert!(!clock.allows(start + Duration::from_millis(10)));
        clock.renewed(start, Duration::from_secs(60), Duration::from_secs(1));
        assert!(!clock.allows(start + Duration::from_millis(11)));
        assert!(clock.why().expect("why").contains("dead-man"));
    }

    #[test]
    fn renewals_extend_from_when_they_were_sent_minus_the_margin() {
        let start = Instant::now();
        let clock = LeaseClock::new(start + Duration::from_secs(3600));
        clock.renewed(start, Duration::from_secs(7200), Duration::from_secs(100));
        assert_eq!(clock.deadline(), start + Duration::from_secs(7100));
        // An older, shorter renewal never moves the deadline back.
        clock.renewed(start, Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(clock.deadline(), start + Duration::from_secs(7100));
    }

    #[test]
    fn a_lost_lease_allows_nothing_more() {
        let clock = LeaseClock::new(Instant::now() + Duration::from_secs(3600));
        clock.lose("lease lost: revoked");
        assert!(!clock.allows(Instant::now()));
        assert_eq!(clock.why().as_deref(), Some("lease lost: revoked"));
    }

    #[test]
    fn roots_map_to_the_longest_mount_that_holds_them() {
        let mounts = vec![
            PathBuf::from("/"),
            PathBuf::from("/var"),
            PathBuf::from("/var/log"),
        ];
        assert_eq!(
            mount_of(Path::new("/var/log/app"), &mounts),
            Some(PathBuf::from("/var/log"))
        );
        assert_eq!(
            mount_of(Path::new("/var/lib"), &mounts),
            Some(PathBuf::from("/var"))
        );
        // Component-wise: /variable is not under /var.
        assert_eq!(
            mount_of(Path::new("/variable"), &mounts),
            Some(PathBuf::from("/"))
        );
    }

    #[test]
    fn truncation_keeps_utf8_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 10), "abc");
    }
}
