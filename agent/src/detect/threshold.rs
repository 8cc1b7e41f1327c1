//! Threshold detector with hysteresis, a `for` duration and a cooldown: fires when a level has
//! stayed at or above `high` for `for_ms`, clears when it drops to `low` or below, and after
//! clearing does not fire again for `cooldown_ms`. Used for disk used ratio, inode ratio, PSI
//! avg10 and memory-cgroup usage/limit (the caller picks the detector name and metric name).
//!
//! Pure: samples and `now` in, findings out. This module must not import I/O or a clock.

use crate::finding::{Finding, Millis};

use super::{ConfigErrors, Latch, Problems, secs};

/// Settings of one threshold detector.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Evidence name of the level (`used_ratio`, `inode_ratio`, `psi_avg10`, `usage_ratio`).
    pub metric: &'static str,
    /// Fire at or above this level.
    pub high: f64,
    /// Clear at or below this level; must be below `high` (the gap is the hysteresis).
    pub low: f64,
    /// The level must stay at or above `high` this long before firing (0 fires at once).
    pub for_ms: Millis,
    /// After clearing, no new finding for this long.
    pub cooldown_ms: Millis,
}

impl Default for Config {
    /// Disk used ratio: 90 % for 5 minutes, clears at 85 %, 10 minutes of cooldown.
    fn default() -> Self {
        Self {
            metric: "used_ratio",
            high: 0.90,
            low: 0.85,
            for_ms: 5 * 60_000,
            cooldown_ms: 10 * 60_000,
        }
    }
}

impl Config {
    /// Lists every problem at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems::default();
        p.check(
            !self.metric.is_empty(),
            "metric",
            "must name the measured value, e.g. used_ratio",
        );
        p.check(
            self.high.is_finite(),
            "high",
            format!("must be a finite number, got {}", self.high),
        );
        p.check(
            self.low.is_finite() && self.low < self.high,
            "low",
            format!(
                "must be a finite number below high ({}), got {}; lower it to leave a hysteresis gap",
                self.high, self.low
            ),
        );
        p.finish()
    }
}

/// Where the level is relative to the thresholds.
#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Below,
    /// At or above `high` since `since`, not yet for `for_ms`.
    Pending {
        since: Millis,
    },
}

/// One threshold detector for one target.
///
/// `observe(now, value)` returns a finding at the onset only: once fired it stays silent until
/// the value drops to `low`, then stays silent for `cooldown_ms` more. A value that dips below
/// `high` before `for_ms` passed restarts the `for` clock. NaN samples are ignored.
#[derive(Clone, Debug)]
pub struct ThresholdDetector {
    detector: &'static str,
    target: String,
    config: Config,
    phase: Phase,
    latch: Latch,
}

impl ThresholdDetector {
    /// `detector` is the finding's detector name (`disk_full`, `inode_full`, `psi_memory`,
    /// `memory_cgroup`, ...).
    pub fn new(
        detector: &'static str,
        target: impl Into<String>,
        config: Config,
    ) -> Result<Self, ConfigErrors> {
        config.validate()?;
        Ok(Self {
            detector,
            target: target.into(),
            config,
            phase: Phase::Below,
            latch: Latch::default(),
        })
    }

    /// True while a reported problem has not cleared.
    pub fn is_firing(&self) -> bool {
        self.latch.is_active()
    }

    pub fn observe(&mut self, now: Millis, value: f64) -> Option<Finding> {
        if value.is_nan() {
            return None;
        }
        let Config {
            metric,
            high,
            low,
            for_ms,
            cooldown_ms,
        } = self.config;
        if self.latch.is_active() {
            if value <= low {
                self.latch.lower(now, cooldown_ms);
                self.phase = Phase::Below;
            }
            return None;
        }
        if value < high {
            self.phase = Phase::Below;
            return None;
        }
        let since = match self.phase {
            Phase::Pending { since } => since,
            Phase::Below => {
                self.phase = Phase::Pending { since: now };
                now
            }
        };
        if now.saturating_sub(since) < for_ms || !self.latch.raise(now, since) {
            return None;
        }
        Some(
            Finding::new(self.detector, self.target.clone(), since)
                .summary(format!(
                    "{metric} {value:.3} has been at or above {high} for {:.0} s",
                    secs(now - since)
                ))
                .evidence(metric, value)
                .evidence("high", high)
                .evidence("low", low)
                .evidence("for_s", secs(now - since)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, `for_ms`, `cooldown_ms`, samples fed in, times at which findings are expected.
    type Case = (
        &'static str,
        Millis,
        Millis,
        Vec<(Millis, f64)>,
        Vec<Millis>,
    );

    fn detector(for_ms: Millis, cooldown_ms: Millis) -> ThresholdDetector {
        let config = Config {
            for_ms,
            cooldown_ms,
            ..Config::default()
        };
        ThresholdDetector::new("disk_full", "/var", config).unwrap()
    }

    /// Feeds `(t, value)` and returns the times at which findings came out.
    fn run(d: &mut ThresholdDetector, samples: &[(Millis, f64)]) -> Vec<Millis> {
        samples
            .iter()
            .filter_map(|&(t, v)| d.observe(t, v).map(|_| t))
            .collect()
    }

    #[test]
    fn named_behaviours() {
        let cases: [Case; 8] = [
            (
                "fires once the for duration has passed",
                30,
                0,
                vec![(0, 0.95), (10, 0.95), (20, 0.95), (30, 0.95), (40, 0.95)],
                vec![30],
            ),
            (
                "fires at once with for = 0",
                0,
                0,
                vec![(0, 0.5), (10, 0.9)],
                vec![10],
            ),
            (
                "a brief spike under the for window does not fire",
                30,
                0,
                vec![(0, 0.95), (10, 0.95), (20, 0.5), (30, 0.5)],
                vec![],
            ),
            (
                "a dip below high restarts the for clock",
                30,
                0,
                vec![(0, 0.95), (20, 0.89), (30, 0.95), (50, 0.95), (60, 0.95)],
                vec![60],
            ),
            (
                "dedupe: a persisting problem fires once",
                0,
                0,
                vec![(0, 0.95), (10, 0.99), (20, 0.97), (30, 0.92)],
                vec![0],
            ),
            (
                "hysteresis: dropping between low and high does not clear",
                0,
                0,
                vec![(0, 0.95), (10, 0.87), (20, 0.95), (30, 0.86), (40, 0.93)],
                vec![0],
            ),
            (
                "clearing at low then rising again fires again",
                0,
                0,
                vec![(0, 0.95), (10, 0.85), (20, 0.95)],
                vec![0, 20],
            ),
            (
                "cooldown suppresses a new onset after clearing",
                0,
                100,
                vec![(0, 0.95), (10, 0.5), (50, 0.95), (60, 0.5), (200, 0.95)],
                vec![0, 200],
            ),
        ];
        for (name, for_ms, cooldown_ms, samples, want) in cases {
            let mut d = detector(for_ms, cooldown_ms);
            assert_eq!(run(&mut d, &samples), want, "{name}");
        }
    }

    #[test]
    fn finding_carries_id_since_and_evidence() {
        let mut d = detector(20, 0);
        assert!(d.observe(100, 0.93).is_none());
        let f = d.observe(120, 0.94).unwrap();
        assert_eq!(f.id, "disk_full//var");
        assert_eq!(f.since, 100);
        assert_eq!(f.evidence["used_ratio"], 0.94);
        assert_eq!(f.evidence["for_s"], 0.02);
        assert!(d.is_firing());
    }

    #[test]
    fn validation_names_fields() {
        let bad = Config {
            metric: "",
            high: 0.5,
            low: 0.7,
            ..Config::default()
        };
        let err = bad.validate().unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["metric", "low"]);
        assert!(ThresholdDetector::new("disk_full", "/", bad).is_err());
        assert!(Config::default().validate().is_ok());
    }
}
