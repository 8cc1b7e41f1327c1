//! Crash-loop detector: at least `max_exits` exits of one target (process or unit) within a
//! sliding window of `window_ms` is a crash loop. A single crash, or restarts spaced further
//! apart than the window allows, are not.
//!
//! Pure: exit events and `now` in, findings out. This module must not import I/O or a clock.

use std::collections::VecDeque;

use crate::finding::{Finding, Millis};

use super::{ConfigErrors, Latch, Problems, secs};

/// The finding's detector name.
pub const DETECTOR: &str = "crash_loop";

/// Evidence names for the most recent exit statuses, newest first (`Finding` evidence keys are
/// static, so the number reported is bounded by this list).
const STATUS_NAMES: [&str; 8] = [
    "status.1", "status.2", "status.3", "status.4", "status.5", "status.6", "status.7", "status.8",
];

/// Settings of the crash-loop detector.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Length of the sliding window.
    pub window_ms: Millis,
    /// Exits within the window that make a crash loop (at least 2; 1 would fire on any crash).
    pub max_exits: u32,
    /// After clearing, no new finding for this long.
    pub cooldown_ms: Millis,
}

impl Default for Config {
    /// Three exits in ten minutes.
    fn default() -> Self {
        Self {
            window_ms: 10 * 60_000,
            max_exits: 3,
            cooldown_ms: 10 * 60_000,
        }
    }
}

impl Config {
    /// Lists every problem at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems::default();
        p.positive_ms(self.window_ms, "window_ms");
        p.check(
            (2..=1000).contains(&self.max_exits),
            "max_exits",
            format!(
                "must be between 2 and 1000 (a single crash is not a loop), got {}",
                self.max_exits
            ),
        );
        p.finish()
    }
}

/// How one run of the target ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited on its own with this code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl Exit {
    /// The shell's encoding, used in evidence: the code, or 128 + the signal number.
    pub fn status(self) -> f64 {
        match self {
            Self::Code(code) => f64::from(code),
            Self::Signal(signal) => 128.0 + f64::from(signal),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit {code}"),
            Self::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// The crash-loop detector for one target.
///
/// `observe(now, exit)` is called once per exit (in time order) and returns a finding at the
/// onset of a loop only. The loop clears once fewer than `max_exits` exits lie in the window,
/// i.e. after a quiet gap; it is noticed at the next exit but dated when the window emptied,
/// and no new finding comes for `cooldown_ms` after that. Out-of-order exits are ignored. The
/// `exits` evidence counts the exits in the window, up to `max(max_exits, 8)`.
#[derive(Clone, Debug)]
pub struct CrashLoop {
    target: String,
    config: Config,
    exits: VecDeque<(Millis, Exit)>,
    latch: Latch,
}

impl CrashLoop {
    pub fn new(target: impl Into<String>, config: Config) -> Result<Self, ConfigErrors> {
        config.validate()?;
        Ok(Self {
            target: target.into(),
            config,
            exits: VecDeque::new(),
            latch: Latch::default(),
        })
    }

    pub fn is_firing(&self) -> bool {
        self.latch.is_active()
    }

    pub fn observe(&mut self, now: Millis, exit: Exit) -> Option<Finding> {
        if self.exits.back().is_some_and(|&(t, _)| now < t) {
            return None;
        }
        let Config {
            window_ms,
            max_exits,
            cooldown_ms,
        } = self.config;
        let needed = usize::try_from(max_exits).unwrap_or(usize::MAX);
        // The loop stopped holding when its `max_exits`-th most recent exit left the window,
        // which may be long before this exit: the cooldown starts then, not now.
        if self.latch.is_active()
            && let Some(&(t, _)) = self
                .exits
                .len()
                .checked_sub(needed)
                .and_then(|i| self.exits.get(i))
        {
            let clear_at = t.saturating_add(window_ms);
            if clear_at < now {
                self.latch.lower(clear_at, cooldown_ms);
            }
        }
        self.exits.push_back((now, exit));
        let oldest = now.saturating_sub(window_ms);
        while self.exits.front().is_some_and(|&(t, _)| t < oldest) {
            self.exits.pop_front();
        }
        // Only the last `max_exits` (or as many as the evidence shows) matter; keeping no more
        // bounds the state.
        while self.exits.len() > needed.max(STATUS_NAMES.len()) {
            self.exits.pop_front();
        }
        let count = u32::try_from(self.exits.len()).unwrap_or(u32::MAX);
        if count < max_exits {
            self.latch.lower(now, cooldown_ms);
            return None;
        }
        let &(first, _) = self.exits.front()?;
        if !self.latch.raise(now, first) {
            return None;
        }
        let recent: Vec<String> = self
            .exits
            .iter()
            .rev()
            .map(|(_, e)| e.to_string())
            .collect();
        let mut finding = Finding::new(DETECTOR, self.target.clone(), first)
            .summary(format!(
                "{} exited {count} times in {:.0} s ({})",
                self.target,
                secs(now - first),
                recent.join(", ")
            ))
            .evidence("exits", f64::from(count))
            .evidence("window_s", secs(window_ms))
            .evidence("span_s", secs(now - first))
            .evidence(
                "signaled",
                self.exits
                    .iter()
                    .filter(|(_, e)| matches!(e, Exit::Signal(_)))
                    .count() as f64,
            );
        for (name, (_, e)) in STATUS_NAMES.iter().zip(self.exits.iter().rev()) {
            finding = finding.evidence(name, e.status());
        }
        Some(finding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, exits fed in, times at which findings are expected.
    type Case = (&'static str, Vec<(Millis, Exit)>, Vec<Millis>);

    const MIN: Millis = 60_000;

    fn run(exits: &[(Millis, Exit)]) -> Vec<Millis> {
        let mut d = CrashLoop::new("app.service", Config::default()).unwrap();
        exits
            .iter()
            .filter_map(|&(t, e)| d.observe(t, e).map(|_| t))
            .collect()
    }

    #[test]
    fn named_behaviours() {
        use Exit::{Code, Signal};
        let cases: [Case; 6] = [
            (
                "fires on the third exit in the window",
                vec![(0, Code(1)), (MIN, Code(1)), (2 * MIN, Signal(11))],
                vec![2 * MIN],
            ),
            ("a single crash does not fire", vec![(0, Signal(9))], vec![]),
            (
                "restarts spaced beyond the window do not fire",
                (0..6).map(|i| (i * 6 * MIN, Code(0))).collect(),
                vec![],
            ),
            (
                "dedupe: a long loop fires once",
                (0..30).map(|i| (i * 30_000, Code(1))).collect(),
                vec![60_000],
            ),
            (
                "a loop after a quiet gap fires again",
                [0, 1, 2, 40, 41, 42]
                    .iter()
                    .map(|&m| (m * MIN, Code(2)))
                    .collect(),
                vec![2 * MIN, 42 * MIN],
            ),
            (
                "cooldown suppresses a quick second loop",
                [0, 1, 2, 13, 14, 15, 16]
                    .iter()
                    .map(|&m| (m * MIN, Code(2)))
                    .collect(),
                vec![2 * MIN],
            ),
        ];
        for (name, exits, want) in cases {
            assert_eq!(run(&exits), want, "{name}");
        }
    }

    #[test]
    fn evidence_lists_exit_statuses_newest_first() {
        let mut d = CrashLoop::new("app.service", Config::default()).unwrap();
        assert!(d.observe(1000, Exit::Code(1)).is_none());
        assert!(d.observe(2000, Exit::Signal(9)).is_none());
        let f = d.observe(3000, Exit::Code(3)).unwrap();
        assert_eq!(f.id, "crash_loop/app.service");
        assert_eq!(f.since, 1000);
        assert_eq!(f.evidence["exits"], 3.0);
        assert_eq!(f.evidence["signaled"], 1.0);
        assert_eq!(f.evidence["status.1"], 3.0);
        assert_eq!(f.evidence["status.2"], 137.0);
        assert_eq!(f.evidence["status.3"], 1.0);
        assert!(
            f.summary.contains("exit 3, signal 9, exit 1"),
            "{}",
            f.summary
        );
    }

    #[test]
    fn validation_names_fields() {
        let bad = Config {
            window_ms: 0,
            max_exits: 1,
            ..Config::default()
        };
        let fields: Vec<_> = bad
            .validate()
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["window_ms", "max_exits"]);
    }
}
