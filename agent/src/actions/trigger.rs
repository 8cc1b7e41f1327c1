//! Which finding becomes which proposal, and when: the pure core of the action loop.
//!
//! A finding maps to at most one (action class, target): a full or filling mount that holds a
//! cleanup root → `disk_cleanup` on that mount; for an allow-listed restart target, each only
//! for the triggers its config enables:
//! - a crash (`process_crash`: the target is down) → `process_restart`, proposed again after
//!   each cooldown while it stays down; while a `crash_loop` finding is also active the restart
//!   counts as a crash-loop restart and backs off exponentially (each restart made while the
//!   loop persists doubles the wait, up to [`MAX_BACKOFF`]; it resets once the loop clears). A
//!   crash loop alone, with the target running again, restarts nothing.
//! - a memory leak or an OOM kill (the target may still run) → one restart per onset of the
//!   finding: those findings stay active for a while after the restart that answered them.
//!
//! [`Chooser`] keeps, per (class, target), when it may be proposed again: a cooldown after an
//! action, a short retry after a denial or an unreachable coordinator, the backoff above.
//!
//! Pure: findings and `now` in, a proposal out. No I/O, no clock, no tokio.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use crate::finding::{Finding, Millis};

/// The longest wait a crash-loop backoff reaches.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// The action classes the agent runs (names as the coordinator's policy spells them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ActionClass {
    DiskCleanup,
    ProcessRestart,
}

impl ActionClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DiskCleanup => "disk_cleanup",
            Self::ProcessRestart => "process_restart",
        }
    }
}

/// What may start an action: the detector names it answers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trigger {
    /// A watched process exited without the agent asking it to (`process_crash`).
    Crash,
    /// Too many exits in the window (`crash_loop`); restarts back off.
    CrashLoop,
    MemoryLeak,
    OomKill,
    DiskFull,
    DiskForecast,
}

impl Trigger {
    pub const RESTART: [Trigger; 4] = [
        Trigger::Crash,
        Trigger::CrashLoop,
        Trigger::MemoryLeak,
        Trigger::OomKill,
    ];
    pub const CLEANUP: [Trigger; 2] = [Trigger::DiskFull, Trigger::DiskForecast];

    /// The config spelling (`on = ["crash", ...]`), which is also the detector's name except
    /// for `crash` (detector `process_crash`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::CrashLoop => "crash_loop",
            Self::MemoryLeak => "memory_leak",
            Self::OomKill => "oom_kill",
            Self::DiskFull => "disk_full",
            Self::DiskForecast => "disk_forecast",
        }
    }

    pub fn detector(self) -> &'static str {
        match self {
            Self::Crash => "process_crash",
            other => other.name(),
        }
    }

    /// Parses one config name among `allowed`.
    pub fn parse(name: &str, allowed: &[Trigger]) -> Result<Trigger, String> {
        allowed
            .iter()
            .copied()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                format!(
                    "{name:?} is not a trigger here; use some of {}",
                    allowed
                        .iter()
                        .map(|t| format!("{:?}", t.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    fn of_detector(detector: &str) -> Option<Trigger> {
        [
            Self::Crash,
            Self::CrashLoop,
            Self::MemoryLeak,
            Self::OomKill,
            Self::DiskFull,
            Self::DiskForecast,
        ]
        .into_iter()
        .find(|t| t.detector() == detector)
    }
}

/// What the chooser knows of one restart target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartRule {
    pub name: String,
    /// The comm (15 bytes) its process runs as, to match OOM kills; `None`: by name only.
    pub comm: Option<String>,
    pub on: BTreeSet<Trigger>,
    pub cooldown: Duration,
}

/// What the chooser knows of cleanup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CleanupRule {
    /// Mount points that hold at least one cleanup root.
    pub mounts: BTreeSet<PathBuf>,
    pub on: BTreeSet<Trigger>,
    pub cooldown: Duration,
}

/// A finding turned into a request for a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    pub class: ActionClass,
    /// A mount point (cleanup) or a restart target's name.
    pub target: String,
    pub trigger: Trigger,
    pub finding_id: String,
    pub finding_summary: String,
    /// The finding's onset (detector clock): with the id, it names one occurrence.
    pub finding_since: Millis,
    /// The pid the finding is about, when it names one (a crash: the process that exited).
    pub finding_pid: Option<u32>,
}

/// Why a proposal is put off, which sets when it may come again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// The action ran (whatever its outcome): the target's cooldown, or the crash-loop backoff.
    Acted,
    /// Observe mode answered, or an operator rejected it: the cooldown, so it is not repeated
    /// at every finding update.
    Recorded,
    /// Denied, pending approval expired, or the coordinator was unreachable: retry soon.
    Retry,
}

impl After {
    /// What a denial naming admission check `check` means for the proposal: a full cap, a
    /// lease still held or a registration not yet seen pass soon (retry); a freeze, a budget
    /// or a kill switch wait for an operator (the cooldown, so the audit is not flooded).
    pub fn for_denial(check: &str) -> Self {
        match check {
            "cap" | "already_held" | "unregistered_host" => Self::Retry,
            _ => Self::Recorded,
        }
    }

    /// What an approval that did not end in a grant means: an expired one is asked again soon,
    /// a rejected one waits for the cooldown.
    pub fn for_unapproved(check: &str) -> Self {
        if check == "expired" {
            Self::Retry
        } else {
            Self::Recorded
        }
    }
}

#[derive(Clone, Debug, Default)]
struct TargetState {
    not_before: Millis,
    /// Restarts made while the current crash loop lasts.
    loop_restarts: u32,
}

/// Chooses the next proposal from the current findings.
#[derive(Clone, Debug)]
pub struct Chooser {
    restart: Vec<RestartRule>,
    cleanup: Option<CleanupRule>,
    retry: Duration,
    state: BTreeMap<(ActionClass, String), TargetState>,
    /// Onsets (finding id, since) of memory-leak and OOM findings already answered.
    answered: BTreeSet<(String, Millis)>,
}

/// A pid carried as finding evidence (evidence values are f64).
#[expect(
    clippy::cast_possible_truncation,
    reason = "the value is checked to be a whole number in u32's range first"
)]
fn evidence_pid(v: f64) -> Option<u32> {
    (v.is_finite() && v >= 0.0 && v <= f64::from(u32::MAX) && v.fract() == 0.0).then_some(v as u32)
}

fn ms(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

impl Chooser {
    pub fn new(restart: Vec<RestartRule>, cleanup: Option<CleanupRule>, retry: Duration) -> Self {
        Self {
            restart,
            cleanup,
            retry,
            state: BTreeMap::new(),
            answered: BTreeSet::new(),
        }
    }

    /// Which (class, target, trigger) a finding maps to, if any.
    pub fn map(&self, finding: &Finding) -> Option<(ActionClass, String, Trigger)> {
        let trigger = Trigger::of_detector(finding.detector)?;
        match trigger {
            Trigger::DiskFull | Trigger::DiskForecast => {
                let rule = self.cleanup.as_ref()?;
                (rule.on.contains(&trigger)
                    && rule.mounts.contains(&PathBuf::from(&finding.target)))
                .then(|| (ActionClass::DiskCleanup, finding.target.clone(), trigger))
            }
            Trigger::OomKill => self
                .restart
                .iter()
                .find(|r| {
                    r.on.contains(&trigger) && r.comm.as_deref() == Some(finding.target.as_str())
                })
                .map(|r| (ActionClass::ProcessRestart, r.name.clone(), trigger)),
            // A loop only shapes how a down target's crash is answered (see `next`).
            Trigger::CrashLoop => None,
            Trigger::Crash => self
                .restart
                .iter()
                .find(|r| {
                    r.name == finding.target
                        && (r.on.contains(&Trigger::Crash) || r.on.contains(&Trigger::CrashLoop))
                })
                .map(|r| (ActionClass::ProcessRestart, r.name.clone(), trigger)),
            Trigger::MemoryLeak => self
                .restart
                .iter()
                .find(|r| r.on.contains(&trigger) && r.name == finding.target)
                .map(|r| (ActionClass::ProcessRestart, r.name.clone(), trigger)),
        }
    }

    fn rule(&self, target: &str) -> Option<&RestartRule> {
        self.restart.iter().find(|r| r.name == target)
    }

    /// The first proposal due at `now` among `findings`, skipping targets in `busy`. A crash
    /// of a target that is also in a crash loop is a crash-loop restart (so the backoff
    /// governs), if its config answers loops; otherwise a plain crash restart, if it answers
    /// crashes.
    pub fn next(
        &mut self,
        findings: &[Finding],
        now: Millis,
        busy: &BTreeSet<String>,
    ) -> Option<Proposal> {
        let looping: BTreeSet<&str> = findings
            .iter()
            .filter(|f| f.detector == Trigger::CrashLoop.detector())
            .map(|f| f.target.as_str())
            .collect();
        // A crash loop that cleared resets its backoff.
        for ((class, target), state) in &mut self.state {
            if *class == ActionClass::ProcessRestart && !looping.contains(target.as_str()) {
                state.loop_restarts = 0;
            }
        }
        // Answered onsets are forgotten once their finding is gone.
        self.answered
            .retain(|(id, since)| findings.iter().any(|f| &f.id == id && f.since == *since));
        let mut candidates: Vec<(&Finding, ActionClass, String, Trigger)> = Vec::new();
        for f in findings {
            let Some((class, target, trigger)) = self.map(f) else {
                continue;
            };
            let trigger = match trigger {
                Trigger::Crash => {
                    let Some(rule) = self.rule(&target) else {
                        continue;
                    };
                    if looping.contains(target.as_str()) && rule.on.contains(&Trigger::CrashLoop) {
                        Trigger::CrashLoop
                    } else if rule.on.contains(&Trigger::Crash) {
                        Trigger::Crash
                    } else {
                        continue;
                    }
                }
                Trigger::MemoryLeak | Trigger::OomKill => {
                    if self.answered.contains(&(f.id.clone(), f.since)) {
                        continue;
                    }
                    trigger
                }
                other => other,
            };
            candidates.push((f, class, target, trigger));
        }
        candidates.sort_by_key(|(f, c, t, _)| (*c, t.clone(), f.id.clone()));
        candidates
            .into_iter()
            .find_map(|(f, class, target, trigger)| {
                if busy.contains(&target) {
                    return None;
                }
                let due = self
                    .state
                    .get(&(class, target.clone()))
                    .is_none_or(|s| s.not_before <= now);
                due.then(|| Proposal {
                    class,
                    target,
                    trigger,
                    finding_id: f.id.clone(),
                    finding_summary: f.summary.clone(),
                    finding_since: f.since,
                    finding_pid: f.evidence.get("pid").copied().and_then(evidence_pid),
                })
            })
    }

    fn cooldown(&self, class: ActionClass, target: &str) -> Duration {
        match class {
            ActionClass::DiskCleanup => self.cleanup.as_ref().map(|c| c.cooldown),
            ActionClass::ProcessRestart => self
                .restart
                .iter()
                .find(|r| r.name == target)
                .map(|r| r.cooldown),
        }
        .unwrap_or(self.retry)
    }

    /// Records what became of `proposal` at `now`; returns when it may come again.
    pub fn done(&mut self, proposal: &Proposal, after: After, now: Millis) -> Millis {
        let cooldown = self.cooldown(proposal.class, &proposal.target);
        let retry = self.retry;
        if matches!(proposal.trigger, Trigger::MemoryLeak | Trigger::OomKill)
            && after != After::Retry
        {
            self.answered
                .insert((proposal.finding_id.clone(), proposal.finding_since));
        }
        let state = self
            .state
            .entry((proposal.class, proposal.target.clone()))
            .or_default();
        let wait = match after {
            After::Retry => retry,
            After::Recorded => cooldown,
            After::Acted if proposal.trigger == Trigger::CrashLoop => {
                let wait = cooldown
                    .checked_mul(1_u32 << state.loop_restarts.min(20))
                    .unwrap_or(MAX_BACKOFF)
                    .min(MAX_BACKOFF);
                state.loop_restarts = state.loop_restarts.saturating_add(1);
                wait
            }
            After::Acted => cooldown,
        };
        state.not_before = now.saturating_add(ms(wait));
        state.not_before
    }

    /// The earliest time a put-off proposal becomes due (to sleep until), if any is waiting.
    pub fn next_due(&self, now: Millis) -> Option<Millis> {
        self.state
            .values()
            .map(|s| s.not_before)
            .filter(|&t| t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chooser() -> Chooser {
        Chooser::new(
            vec![RestartRule {
                name: "web".into(),
                comm: Some("web-server".into()),
                on: Trigger::RESTART.into_iter().collect(),
                cooldown: Duration::from_secs(10),
            }],
            Some(CleanupRule {
                mounts: [PathBuf::from("/var")].into_iter().collect(),
                on: [Trigger::DiskFull].into_iter().collect(),
                cooldown: Duration::from_secs(60),
            }),
            Duration::from_secs(1),
        )
    }

    fn finding(detector: &'static str, target: &str) -> Finding {
        Finding::new(detector, target, 0).summary(format!("{detector} on {target}"))
    }

    #[test]
    fn findings_map_to_their_class_and_target_only_when_configured() {
        let c = chooser();
        assert_eq!(
            c.map(&finding("process_crash", "web")),
            Some((ActionClass::ProcessRestart, "web".into(), Trigger::Crash))
        );
        assert_eq!(
            c.map(&finding("oom_kill", "web-server")),
            Some((ActionClass::ProcessRestart, "web".into(), Trigger::OomKill))
        );
        assert_eq!(
            c.map(&finding("disk_full", "/var")),
            Some((ActionClass::DiskCleanup, "/var".into(), Trigger::DiskFull))
        );
        // Not allow-listed, no cleanup root on the mount, trigger not enabled, not actionable.
        assert_eq!(c.map(&finding("process_crash", "db")), None);
        assert_eq!(c.map(&finding("disk_full", "/home")), None);
        assert_eq!(c.map(&finding("disk_forecast", "/var")), None);
        assert_eq!(c.map(&finding("psi_memory", "system")), None);
    }

    #[test]
    fn cooldown_holds_a_target_back_and_then_releases_it() {
        let mut c = chooser();
        let findings = vec![finding("process_crash", "web")];
        let busy = BTreeSet::new();
        let p = c.next(&findings, 0, &busy).expect("due at once");
        assert_eq!(c.done(&p, After::Acted, 1_000), 11_000);
        assert_eq!(c.next(&findings, 10_999, &busy), None);
        assert_eq!(c.next_due(10_999), Some(11_000));
        assert!(c.next(&findings, 11_000, &busy).is_some());
    }

    #[test]
    fn denials_retry_soon_and_busy_targets_wait() {
        let mut c = chooser();
        let findings = vec![finding("disk_full", "/var")];
        let p = c.next(&findings, 0, &BTreeSet::new()).expect("due");
        assert_eq!(c.done(&p, After::Retry, 0), 1_000);
        let busy: BTreeSet<String> = ["/var".to_owned()].into_iter().collect();
        assert_eq!(c.next(&findings, 5_000, &busy), None);
        assert!(c.next(&findings, 5_000, &BTreeSet::new()).is_some());
    }

    #[test]
    fn crash_loops_back_off_exponentially_and_reset_when_the_loop_clears() {
        let mut c = chooser();
        let busy = BTreeSet::new();
        let both = vec![
            finding("process_crash", "web"),
            finding("crash_loop", "web"),
        ];
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..4 {
            let p = c.next(&both, now, &busy).expect("due");
            // The loop governs while it lasts, not the single crash.
            assert_eq!(p.trigger, Trigger::CrashLoop);
            let until = c.done(&p, After::Acted, now);
            waits.push(until - now);
            now = until;
        }
        assert_eq!(waits, vec![10_000, 20_000, 40_000, 80_000]);
        // The loop cleared: the next crash is handled with the plain cooldown again.
        let crash = vec![finding("process_crash", "web")];
        assert!(c.next(&crash, now, &busy).is_some());
        let p = c.next(&both, now, &busy).expect("due");
        assert_eq!(c.done(&p, After::Acted, now) - now, 10_000);
    }

    #[test]
    fn a_crash_loop_alone_with_the_target_running_restarts_nothing() {
        let mut c = chooser();
        // The loop finding stays latched after the restart that answered it.
        let latched = vec![finding("crash_loop", "web")];
        assert_eq!(c.next(&latched, 0, &BTreeSet::new()), None);
    }

    #[test]
    fn a_memory_leak_or_oom_finding_is_answered_once_per_onset() {
        let mut c = chooser();
        let busy = BTreeSet::new();
        let oom = vec![finding("oom_kill", "web-server")];
        let p = c.next(&oom, 0, &busy).expect("due");
        assert_eq!(p.trigger, Trigger::OomKill);
        c.done(&p, After::Acted, 0);
        // Held for minutes after the restart: never answered twice.
        assert_eq!(c.next(&oom, 3_600_000, &busy), None);
        // A new onset (the finding cleared and fired again) is answered again.
        let again = vec![Finding::new("oom_kill", "web-server", 5_000)];
        assert!(c.next(&again, 3_600_000, &busy).is_some());
        // A denial is not an answer: retried.
        let leak = vec![finding("memory_leak", "web")];
        let p = c.next(&leak, 3_600_000, &busy).expect("due");
        c.done(&p, After::Retry, 3_600_000);
        assert!(c.next(&leak, 3_601_000, &busy).is_some());
    }

    #[test]
    fn denials_that_pass_soon_are_retried_and_the_rest_wait_for_the_cooldown() {
        for check in ["cap", "already_held", "unregistered_host"] {
            assert_eq!(After::for_denial(check), After::Retry, "{check}");
        }
        for check in [
            "frozen",
            "kill_switch",
            "fleet_budget",
            "host_budget",
            "host_blocked",
        ] {
            assert_eq!(After::for_denial(check), After::Recorded, "{check}");
        }
        assert_eq!(After::for_unapproved("expired"), After::Retry);
        assert_eq!(After::for_unapproved("rejected"), After::Recorded);
    }

    #[test]
    fn backoff_is_capped() {
        let mut c = chooser();
        let looping = vec![
            finding("process_crash", "web"),
            finding("crash_loop", "web"),
        ];
        let mut now = 0;
        let mut last = 0;
        for _ in 0..30 {
            let p = c.next(&looping, now, &BTreeSet::new()).expect("due");
            let until = c.done(&p, After::Acted, now);
            last = until - now;
            now = until;
        }
        assert_eq!(last, ms(MAX_BACKOFF));
    }

    #[test]
    fn triggers_parse_from_their_config_names_only() {
        assert_eq!(
            Trigger::parse("crash", &Trigger::RESTART),
            Ok(Trigger::Crash)
        );
        let err =
            Trigger::parse("disk_full", &Trigger::RESTART).expect_err("not a restart trigger");
        assert!(err.contains("\"crash\""), "{err}");
    }
}
