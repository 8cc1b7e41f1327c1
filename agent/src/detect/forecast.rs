//! Disk time-to-full forecast: a least-squares slope of used bytes over a sliding window, and a
//! finding when the projected time to reach `full_ratio` of capacity is below `horizon_ms`, the
//! fit is good (`r2 >= r2_min`), the window spans at least `min_span_ms`, and the growth is
//! sustained (present in both halves of the window and still at the window's top). The last
//! condition is what keeps a batch job that writes then deletes, or a log-rotation sawtooth,
//! from firing.
//!
//! Pure: samples and `now` in, findings out. This module must not import I/O or a clock.

use crate::finding::{Finding, Millis};

use super::trend::{FitWindow, Sustained, Window, check_fit};
use super::{ConfigErrors, Latch, Problems, secs};

/// The finding's detector name.
pub const DETECTOR: &str = "disk_forecast";

/// An open finding clears when the projected time to full exceeds this many horizons (or the
/// window stops growing), so a forecast wobbling around the horizon is reported once.
const CLEAR_HORIZONS: f64 = 2.0;

/// Settings of the disk forecast.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Length of the sliding window the slope is fitted over.
    pub window_ms: Millis,
    /// The samples in the window must span at least this long before any forecast.
    pub min_span_ms: Millis,
    /// Minimum number of samples in the window.
    pub min_samples: u32,
    /// Fire when the projected time to full is below this.
    pub horizon_ms: Millis,
    /// "Full" means `used >= full_ratio * capacity` (1.0 = every byte).
    pub full_ratio: f64,
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
    /// One-hour window, six-hour horizon; tuned on the corpus at one sample per minute.
    fn default() -> Self {
        Self {
            window_ms: 60 * 60_000,
            min_span_ms: 30 * 60_000,
            min_samples: 10,
            horizon_ms: 6 * 3_600_000,
            full_ratio: 1.0,
            r2_min: 0.8,
            half_slope_min: 0.4,
            near_max: 0.1,
            cooldown_ms: 30 * 60_000,
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
            self.full_ratio.is_finite() && self.full_ratio > 0.0 && self.full_ratio <= 1.0,
            "full_ratio",
            format!("must be in (0, 1], got {}", self.full_ratio),
        );
        p.finish()
    }

    pub(crate) fn sustained(&self) -> Sustained {
        Sustained {
            r2_min: self.r2_min,
            half_slope_min: self.half_slope_min,
            near_max: self.near_max,
        }
    }
}

/// One reading of a filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSample {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

/// The disk forecast for one mount point.
///
/// `observe(now, sample)` returns a finding at the onset of a forecast below the horizon; it
/// stays silent while the forecast holds, clears when the window stops growing or the time to
/// full exceeds twice the horizon, then stays silent for `cooldown_ms`. Samples with zero
/// capacity or out of time order are ignored.
#[derive(Clone, Debug)]
pub struct DiskForecast {
    target: String,
    config: Config,
    window: Window,
    latch: Latch,
}

impl DiskForecast {
    pub fn new(mount: impl Into<String>, config: Config) -> Result<Self, ConfigErrors> {
        config.validate()?;
        Ok(Self {
            target: mount.into(),
            config,
            window: Window::default(),
            latch: Latch::default(),
        })
    }

    pub fn is_firing(&self) -> bool {
        self.latch.is_active()
    }

    pub fn observe(&mut self, now: Millis, sample: DiskSample) -> Option<Finding> {
        let DiskSample {
            used_bytes,
            capacity_bytes,
        } = sample;
        if capacity_bytes == 0 {
            return None;
        }
        let cfg = &self.config;
        self.window.push(now, used_bytes as f64, cfg.window_ms);
        let growth = self.window.growth()?;
        let full_at = cfg.full_ratio * capacity_bytes as f64;
        let slope = growth.whole.slope_per_s;
        let eta_s = if slope > 0.0 {
            ((full_at - growth.last) / slope).max(0.0)
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
        let used_ratio = used_bytes as f64 / capacity_bytes as f64;
        Some(
            Finding::new(DETECTOR, self.target.clone(), now)
                .summary(format!(
                    "{} is {:.1} % full and growing {:.1} MB/s; full in about {:.0} min",
                    self.target,
                    used_ratio * 100.0,
                    slope / 1e6,
                    eta_s / 60.0
                ))
                .evidence("used_ratio", used_ratio)
                .evidence("used_bytes", used_bytes as f64)
                .evidence("capacity_bytes", capacity_bytes as f64)
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

    const GB: f64 = 1e9;
    const MIN: Millis = 60_000;

    /// Feeds one sample a minute for `minutes` from `used(minute)` on a 100 GB disk; returns
    /// the minutes at which findings came out.
    fn run(minutes: u64, used: impl Fn(u64) -> f64) -> Vec<u64> {
        let mut d = DiskForecast::new("/var", Config::default()).unwrap();
        (0..minutes)
            .filter(|&m| {
                let sample = DiskSample {
                    used_bytes: to_bytes(used(m)),
                    capacity_bytes: to_bytes(100.0 * GB),
                };
                d.observe(m * MIN, sample).is_some()
            })
            .collect()
    }

    #[expect(
        clippy::cast_possible_truncation,
        reason = "test byte counts are small and positive"
    )]
    fn to_bytes(x: f64) -> u64 {
        x.max(0.0) as u64
    }

    #[test]
    fn named_behaviours() {
        type Curve = Box<dyn Fn(u64) -> f64>;
        let cases: [(&str, u64, Curve, Vec<u64>); 6] = [
            (
                "fires on a steady fill once the window spans min_span",
                120,
                Box::new(|m| 50.0 * GB + m as f64 * 0.2 * GB),
                vec![30],
            ),
            (
                "does not fire on a fill that is beyond the horizon",
                120,
                Box::new(|m| 50.0 * GB + m as f64 * 0.01 * GB),
                vec![],
            ),
            (
                "does not fire on a flat disk",
                120,
                Box::new(|_| 95.0 * GB),
                vec![],
            ),
            (
                "batch write then delete does not fire",
                180,
                Box::new(|m| match m {
                    0..90 => 70.0 * GB,
                    90..110 => 70.0 * GB + (m - 90) as f64 * GB,
                    _ => 70.0 * GB,
                }),
                vec![],
            ),
            (
                "sawtooth of log rotation does not fire",
                180,
                Box::new(|m| 80.0 * GB + (m % 20) as f64 * 0.25 * GB),
                vec![],
            ),
            (
                "dedupe: a fill that persists fires once",
                240,
                Box::new(|m| (30.0 * GB + m as f64 * 0.25 * GB).min(100.0 * GB)),
                vec![30],
            ),
        ];
        for (name, minutes, used, want) in cases {
            assert_eq!(run(minutes, used), want, "{name}");
        }
    }

    #[test]
    fn clears_and_fires_again_after_cooldown() {
        let fill = |m: u64| 40.0 * GB + (m % 150) as f64 * 0.3 * GB;
        let fired = run(300, fill);
        // The window holds the cleanup's drop until minute 210, so the second fill is judged on its
        // own only from then.
        assert_eq!(fired, vec![30, 210], "fill, cleanup at 150, fill again");
    }

    #[test]
    fn finding_evidence() {
        let mut d = DiskForecast::new("/var", Config::default()).unwrap();
        let mut found = None;
        for m in 0..60u64 {
            let used = to_bytes(50.0 * GB + m as f64 * 0.2 * GB);
            let sample = DiskSample {
                used_bytes: used,
                capacity_bytes: to_bytes(100.0 * GB),
            };
            found = found.or(d.observe(m * MIN, sample));
        }
        let f = found.unwrap();
        assert_eq!(f.id, "disk_forecast//var");
        assert_eq!(f.since, 30 * MIN);
        assert!((f.evidence["slope_bytes_per_s"] - 0.2 * GB / 60.0).abs() < 1.0);
        assert!(f.evidence["r2"] > 0.999);
        assert!((f.evidence["eta_s"] - 220.0 * 60.0).abs() < 1.0);
        assert!((f.evidence["used_ratio"] - 0.56).abs() < 1e-9);
    }

    #[test]
    fn validation_names_fields() {
        let bad = Config {
            min_span_ms: 2 * 3_600_000,
            full_ratio: 1.5,
            r2_min: 2.0,
            ..Config::default()
        };
        let fields: Vec<_> = bad
            .validate()
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["min_span_ms", "r2_min", "full_ratio"]);
    }
}
