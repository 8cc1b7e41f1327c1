//! Detectors: pure code that turns windows of signals into [`crate::finding::Finding`]s.
//!
//! Every detector here has the same shape: a `Config` checked once by `Config::validate` (which
//! lists every problem, naming the field and what to change), and a state struct built from a
//! valid config for one target whose `observe(now_ms, sample) -> Option<Finding>` is called once
//! per sample, in time order. A detector emits a finding once, at the onset of a problem; while
//! the problem persists it stays silent, and it emits again only after the problem cleared (with
//! hysteresis) and its cooldown passed. The shared [`Latch`] implements that.
//!
//! - [`threshold`]: level with hysteresis, a `for` duration and a cooldown (disk and inode ratio,
//!   PSI avg10, cgroup memory usage/limit).
//! - [`baseline`]: rolling EWMA baseline and z-score with a rate floor (failed connects/s,
//!   retransmits/s per dependency).
//! - [`forecast`]: disk time-to-full from a least-squares trend.
//! - [`leak`]: memory leak from sustained RSS growth projected to hit its limit.
//! - [`crashloop`]: too many exits of one target in a sliding window.
//! - [`certexpiry`]: a certificate with fewer than N days left (or expired); unlike the
//!   others it speaks again when what it says changes (another notAfter, expired), and it
//!   takes the Unix time of the reading besides the monotonic `now`.
//! - [`trend`]: the least-squares fit and "sustained growth" test shared by forecast and leak.
//! - [`corpus`]: a seeded, labelled corpus of generated series and [`corpus::evaluate`].
//!
//! This module and everything under it own no I/O: they must not import a clock, the
//! filesystem, sockets, tokio, aya or `crate::pressure` readers. Times are caller-chosen
//! [`Millis`] on a monotonic clock; values come in as arguments.

pub mod baseline;
pub mod certexpiry;
pub mod corpus;
pub mod crashloop;
pub mod forecast;
pub mod leak;
pub mod oomkill;
pub mod threshold;
pub mod trend;

use crate::finding::Millis;

/// One problem with a detector's configuration: which field, and what to change.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    /// The field name as written in the agent's config (`high`, `window_ms`, ...).
    pub field: &'static str,
    /// What is wrong and what to change, lowercase, no trailing period.
    pub problem: String,
}

/// Every problem found in one detector config, reported at once.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid detector config: {}", join(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn join(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects [`ConfigError`]s during validation.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<ConfigError>);

impl Problems {
    pub(crate) fn check(&mut self, ok: bool, field: &'static str, problem: impl Into<String>) {
        if !ok {
            self.0.push(ConfigError {
                field,
                problem: problem.into(),
            });
        }
    }

    /// A finite number inside `[min, max]`.
    pub(crate) fn range(&mut self, value: f64, field: &'static str, min: f64, max: f64) {
        self.check(
            value.is_finite() && value >= min && value <= max,
            field,
            format!("must be a number between {min} and {max}, got {value}"),
        );
    }

    pub(crate) fn positive_ms(&mut self, value: Millis, field: &'static str) {
        self.check(
            value > 0,
            field,
            "must be greater than 0 milliseconds".to_string(),
        );
    }

    pub(crate) fn finish(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}

/// Onset/clear latch with a cooldown, shared by every detector so that a persisting problem
/// yields one finding: [`Latch::raise`] returns true only on the transition from clear to
/// active, and only once the cooldown that started at the last [`Latch::lower`] has passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Latch {
    state: LatchState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LatchState {
    /// No problem; a new onset is suppressed before `quiet_until` (cooldown).
    Clear { quiet_until: Millis },
    /// A finding was emitted for a problem that started at `since` and has not cleared.
    Active { since: Millis },
}

impl Default for Latch {
    fn default() -> Self {
        Self {
            state: LatchState::Clear { quiet_until: 0 },
        }
    }
}

impl Latch {
    /// The condition holds at `now`. Returns true when this is an onset that must be reported.
    pub fn raise(&mut self, now: Millis, since: Millis) -> bool {
        match self.state {
            LatchState::Clear { quiet_until } if now >= quiet_until => {
                self.state = LatchState::Active { since };
                true
            }
            LatchState::Clear { .. } | LatchState::Active { .. } => false,
        }
    }

    /// The condition cleared at `now`; no new onset before `now + cooldown_ms`.
    pub fn lower(&mut self, now: Millis, cooldown_ms: Millis) {
        if self.is_active() {
            self.state = LatchState::Clear {
                quiet_until: now.saturating_add(cooldown_ms),
            };
        }
    }

    /// True while a reported problem has not cleared.
    pub fn is_active(&self) -> bool {
        matches!(self.state, LatchState::Active { .. })
    }

    /// True when a new onset at `now` would be suppressed by the cooldown.
    pub fn cooling_down(&self, now: Millis) -> bool {
        matches!(self.state, LatchState::Clear { quiet_until } if now < quiet_until)
    }

    /// When the active problem started, if one is active.
    pub fn since(&self) -> Option<Millis> {
        match self.state {
            LatchState::Active { since } => Some(since),
            LatchState::Clear { .. } => None,
        }
    }
}

/// Milliseconds as seconds, for evidence.
pub(crate) fn secs(ms: Millis) -> f64 {
    // Durations stay far below 2^52 ms, so the conversion is exact.
    ms as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latch_emits_once_per_onset_and_respects_cooldown() {
        let mut latch = Latch::default();
        assert!(latch.raise(10, 5));
        assert!(!latch.raise(20, 5), "a persisting problem is reported once");
        assert_eq!(latch.since(), Some(5));
        latch.lower(30, 100);
        assert!(latch.cooling_down(50));
        assert!(!latch.raise(50, 50), "no onset during the cooldown");
        assert!(latch.raise(130, 130), "onset again after the cooldown");
    }

    #[test]
    fn config_errors_name_every_field() {
        let mut p = Problems::default();
        p.range(2.0, "high", 0.0, 1.0);
        p.positive_ms(0, "window_ms");
        let err = p.finish().unwrap_err();
        assert_eq!(err.0.len(), 2);
        let text = err.to_string();
        assert!(
            text.contains("high: must be a number between 0 and 1"),
            "{text}"
        );
        assert!(text.contains("window_ms: must be greater than 0"), "{text}");
    }
}
