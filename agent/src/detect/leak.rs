//! Memory-leak detector: sustained RSS growth of one process (or cgroup) with a good linear fit,
//! projected to reach its limit (the cgroup's memory limit when the sample carries one, else the
//! configured `max_bytes`) within a horizon. A steady process, a GC-like sawtooth and a one-off
//! step up do not fire: the growth must be present across the window and still at its top (see
//! [`super::trend::Growth::is_sustained`]).
//!
//! Pure: samples and `now` in, findings out. This module must not import I/O or a clock.

use crate::finding::{Finding, Millis};

use super::trend::{FitWindow, Sustained, Window, check_fit};
use super::{ConfigErrors, Latch, Problems, secs};

/// The finding's detector name.
pub const DETECTOR: &str = "memory_leak";

/// An open finding clears when the projected time to the limit exceeds this many horizons (or
/// the window stops growing).
const CLEAR_HORIZONS: f64 = 2.0;

/// Settings of the leak detector.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Length of the sliding window the slope is fitted over.
    pub window_ms: Millis,
    /// The samples in the window must span at least this long.
    pub min_span_ms: Millis,
    /// Minimum number of samples in the window.
    pub min_samples: u32,
    /// Fire when the projected time to the limit is below this.
    pub horizon_ms: Millis,
    /// The limit when the sample carries none (no cgroup limit); `None` means such samples are
    /// never judged.
    pub max_bytes: Option<u64>,
    /// Minimum R² of the fit.
    pub r2_min: f64,
    /// Each half of the window must grow at least this fraction of the whole window's slope.
    pub half_slope_min: f64,
    /// The last sample must lie within this fraction of the window's range below its maximum.
    pub near_max: f64,
    /// After clearing, no new finding for this long.
    pub cooldown_ms: Millis,
}

impl Default for Config {
    /// Two-hour window, one-day horizon; tuned on the corpus at one sample per minute.
    fn default() -> Self {
        Self {
            window_ms: 2 * 3_600_000,
            min_span_ms: 3_600_000,
            min_samples: 20,
            horizon_ms: 24 * 3_600_000,
            max_bytes: None,
            r2_min: 0.8,
            half_slope_min: 0.4,
            near_max: 0.15,
            cooldown_ms: 3_600_000,
        }
    }
}

impl Config {
    /// Lists every problem at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems::default();
        check_fit(
            &mut p,
            FitWindow {
                window_ms: self.window_ms,
                min_span_ms: self.min_span_ms,
                min_samples: self.min_samples,
                horizon_ms: self.horizon_ms,
            },
            &self.sustained(),
        );
        p.check(
            self.max_bytes != Some(0),
            "max_bytes",
            "must be greater than 0, or left out to judge only samples with a cgroup limit",
        );
        p.finish()
    }

    fn sustained(&self) -> Sustained {
        Sustained {
            r2_min: self.r2_min,
            half_slope_min: self.half_slope_min,
            near_max: self.near_max,
        }
    }
}

/// One memory reading of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySample {
    pub rss_bytes: u64,
    /// The cgroup's memory limit, when it has one.
    pub limit_bytes: Option<u64>,
}

/// The leak detector for one process or unit.
///
/// `observe(now, sample)` returns a finding at the onset of a projected limit hit within the
/// horizon; it stays silent while that holds, clears when the window stops growing or the time
/// to the limit exceeds twice the horizon, then stays silent for `cooldown_ms`. A sample with no
/// limit (and no `max_bytes`) still enters the window but is not judged.
#[derive(Clone, Debug)]
pub struct LeakDetector {
    target: String,
    config: Config,
    window: Window,
    latch: Latch,
}

impl LeakDetector {
    pub fn new(target: impl Into<String>, config: Config) -> Result<Self, ConfigErrors> {
        config.validate()?;
        Ok(Self {
            target: target.into(),
            config,
            window: Window::default(),
            latch: Latch::default(),
        })
    }

    pub fn is_firing(&self) -> bool {
        self.latch.is_active()
    }

    pub fn observe(&mut self, now: Millis, sample: MemorySample) -> Option<Finding> {
        let MemorySample {
            rss_bytes,
            limit_bytes,
        } = sample;
        let cfg = &self.config;
        self.window.push(now, rss_bytes as f64, cfg.window_ms);
        let limit = limit_bytes.or(cfg.max_bytes).filter(|&l| l > 0)?;
        let growth = self.window.growth()?;
        let slope = growth.whole.slope_per_s;
        let eta_s = if slope > 0.0 {
            ((limit as f64 - growth.last) / slope).max(0.0)
        } else {
            f64::INFINITY
        };
        let horizon_s = secs(cfg.horizon_ms);
        if self.latch.is_active() {
            if slope <= 0.0 || eta_s > CLEAR_HORIZONS * horizon_s {
                self.latch.lower(now, cfg.cooldown_ms);
            }
            return None;
        }
        let enough = growth.span_ms >= cfg.min_span_ms
            && u32::try_from(self.window.len()).unwrap_or(u32::MAX) >= cfg.min_samples;
        if !enough || !growth.is_sustained(&cfg.sustained()) || eta_s >= horizon_s {
            return None;
        }
        if !self.latch.raise(now, now) {
            return None;
        }
        Some(
            Finding::new(DETECTOR, self.target.clone(), now)
                .summary(format!(
                    "{} grows {:.1} MB/h (R² {:.2}); at {:.0} MB it reaches its {:.0} MB limit in about {:.1} h",
                    self.target,
                    slope * 3600.0 / 1e6,
                    growth.whole.r2,
                    rss_bytes as f64 / 1e6,
                    limit as f64 / 1e6,
                    eta_s / 3600.0
                ))
                .evidence("rss_bytes", rss_bytes as f64)
                .evidence("limit_bytes", limit as f64)
                .evidence("slope_bytes_per_s", slope)
                .evidence("r2", growth.whole.r2)
                .evidence("eta_s", eta_s)
                .evidence("span_s", secs(growth.span_ms)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;
    const MIN: Millis = 60_000;

    #[expect(
        clippy::cast_possible_truncation,
        reason = "test byte counts are small and positive"
    )]
    fn to_bytes(x: f64) -> u64 {
        x.max(0.0) as u64
    }

    /// One sample a minute with a 2 GB cgroup limit; returns the minutes that produced findings.
    fn run(minutes: u64, rss: impl Fn(u64) -> f64) -> Vec<u64> {
        let mut d = LeakDetector::new("app.service", Config::default()).unwrap();
        (0..minutes)
            .filter(|&m| {
                let sample = MemorySample {
                    rss_bytes: to_bytes(rss(m)),
                    limit_bytes: Some(2000 * 1_000_000),
                };
                d.observe(m * MIN, sample).is_some()
            })
            .collect()
    }

    #[test]
    fn named_behaviours() {
        type Curve = Box<dyn Fn(u64) -> f64>;
        let cases: [(&str, Curve, Vec<u64>); 6] = [
            (
                "fires on a linear leak once the window spans min_span",
                Box::new(|m| 300.0 * MB + m as f64 * 2.0 * MB),
                vec![60],
            ),
            (
                "does not fire on growth that reaches the limit beyond the horizon",
                Box::new(|m| 300.0 * MB + m as f64 * 0.05 * MB),
                vec![],
            ),
            (
                "does not fire on a steady process",
                Box::new(|m| 500.0 * MB + (m % 3) as f64 * MB),
                vec![],
            ),
            (
                "does not fire on a GC sawtooth",
                Box::new(|m| 400.0 * MB + (m % 15) as f64 * 10.0 * MB),
                vec![],
            ),
            (
                "does not fire on one step up",
                Box::new(|m| if m < 100 { 300.0 * MB } else { 900.0 * MB }),
                vec![],
            ),
            (
                "dedupe: a persisting leak fires once",
                Box::new(|m| 300.0 * MB + m as f64 * 3.0 * MB),
                vec![60],
            ),
        ];
        for (name, rss, want) in cases {
            assert_eq!(run(300, rss), want, "{name}");
        }
    }

    #[test]
    fn uses_max_bytes_without_a_cgroup_limit() {
        let config = Config {
            max_bytes: Some(1_000_000_000),
            ..Config::default()
        };
        let mut d = LeakDetector::new("worker", config).unwrap();
        let mut none = LeakDetector::new("worker", Config::default()).unwrap();
        let mut found = Vec::new();
        for m in 0..90u64 {
            let sample = MemorySample {
                rss_bytes: 100_000_000 + m * 2_000_000,
                limit_bytes: None,
            };
            found.extend(d.observe(m * MIN, sample));
            assert!(
                none.observe(m * MIN, sample).is_none(),
                "no limit, no judgement"
            );
        }
        assert_eq!(found.len(), 1);
        let f = &found[0];
        assert_eq!(f.id, "memory_leak/worker");
        assert_eq!(f.evidence["limit_bytes"], 1e9);
        assert!((f.evidence["slope_bytes_per_s"] - 2e6 / 60.0).abs() < 1.0);
        assert!(f.evidence["eta_s"] < 24.0 * 3600.0);
    }

    #[test]
    fn validation_names_fields() {
        let bad = Config {
            window_ms: 0,
            max_bytes: Some(0),
            half_slope_min: -1.0,
            ..Config::default()
        };
        let fields: Vec<_> = bad
            .validate()
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            ["window_ms", "min_span_ms", "half_slope_min", "max_bytes"]
        );
    }
}
