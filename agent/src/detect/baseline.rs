//! Rolling baseline anomaly detector: an EWMA mean and EWMA variance of a rate (failed
//! connects/s, retransmits/s, one detector per dependency), and a z-score
//! `(x - mean) / sqrt(var + eps)`. It fires when `z >= z_fire` for `min_samples` consecutive
//! samples after a warm-up, and only when the rate itself is at least `min_rate`, so 0 → 1
//! failure/s on an idle dependency is not an anomaly.
//!
//! Anomalous samples are not folded into the baseline (the update is skipped while a sample is
//! anomalous), so a long incident does not teach the baseline that failures are normal. The
//! consequence is deliberate: a permanent level shift stays one open finding until the rate
//! comes back down.
//!
//! Pure: samples and `now` in, findings out. This module must not import I/O or a clock.

use crate::finding::{Finding, Millis};

use super::{ConfigErrors, Latch, Problems};

/// Settings of one rolling-baseline detector.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Evidence name of the rate (`failed_connects_per_s`, `retransmits_per_s`).
    pub metric: &'static str,
    /// Half-life of the EWMA in samples: a sample's weight halves after this many samples.
    pub half_life_samples: f64,
    /// Samples folded in before any finding can be emitted.
    pub warmup_samples: u32,
    /// z-score at or above which a sample is anomalous.
    pub z_fire: f64,
    /// An open finding clears when z falls to this or below (hysteresis; below `z_fire`).
    pub z_clear: f64,
    /// Consecutive anomalous samples needed to fire.
    pub min_samples: u32,
    /// Absolute floor: a rate below this is never anomalous, whatever its z-score.
    pub min_rate: f64,
    /// Added to the variance so a perfectly flat baseline does not divide by zero.
    pub eps: f64,
    /// After clearing, no new finding for this long.
    pub cooldown_ms: Millis,
}

impl Default for Config {
    /// Tuned on the corpus at one sample per 10 s.
    fn default() -> Self {
        Self {
            metric: "rate",
            half_life_samples: 30.0,
            warmup_samples: 30,
            z_fire: 4.0,
            z_clear: 2.0,
            min_samples: 3,
            min_rate: 2.0,
            eps: 0.01,
            cooldown_ms: 5 * 60_000,
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
            "must name the measured rate, e.g. retransmits_per_s",
        );
        p.range(self.half_life_samples, "half_life_samples", 0.5, 1e6);
        p.check(
            self.warmup_samples >= 2,
            "warmup_samples",
            "must be at least 2 so the variance means something",
        );
        p.range(self.z_fire, "z_fire", 0.5, 1e3);
        p.check(
            self.z_clear.is_finite() && self.z_clear < self.z_fire,
            "z_clear",
            format!(
                "must be below z_fire ({}), got {}; lower it to leave a hysteresis gap",
                self.z_fire, self.z_clear
            ),
        );
        p.check(self.min_samples >= 1, "min_samples", "must be at least 1");
        p.range(self.min_rate, "min_rate", 0.0, f64::MAX);
        p.check(
            self.eps.is_finite() && self.eps > 0.0,
            "eps",
            format!(
                "must be a small positive number such as 0.01, got {}",
                self.eps
            ),
        );
        p.finish()
    }

    /// EWMA weight of a new sample: `1 - 0.5^(1 / half_life)`.
    pub fn alpha(&self) -> f64 {
        1.0 - 0.5_f64.powf(1.0 / self.half_life_samples)
    }
}

/// One rolling baseline for one target (a dependency).
///
/// `observe(now, rate)` returns a finding at the onset only; it stays silent while the anomaly
/// persists, clears when `z <= z_clear` or the rate drops below `min_rate`, and then stays
/// silent for `cooldown_ms`. Non-finite and negative rates are ignored.
#[derive(Clone, Debug)]
pub struct RollingBaseline {
    detector: &'static str,
    target: String,
    config: Config,
    alpha: f64,
    mean: f64,
    var: f64,
    samples: u32,
    /// Consecutive anomalous samples, and when the run started.
    run: Option<(u32, Millis)>,
    latch: Latch,
}

impl RollingBaseline {
    /// `detector` is the finding's detector name (`connect_failures`, `retransmits`).
    pub fn new(
        detector: &'static str,
        target: impl Into<String>,
        config: Config,
    ) -> Result<Self, ConfigErrors> {
        config.validate()?;
        Ok(Self {
            detector,
            target: target.into(),
            alpha: config.alpha(),
            config,
            mean: 0.0,
            var: 0.0,
            samples: 0,
            run: None,
            latch: Latch::default(),
        })
    }

    /// The baseline's current mean and variance.
    pub fn baseline(&self) -> (f64, f64) {
        (self.mean, self.var)
    }

    pub fn is_firing(&self) -> bool {
        self.latch.is_active()
    }

    fn update(&mut self, x: f64) {
        if self.samples == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let diff = x - self.mean;
            let incr = self.alpha * diff;
            self.mean += incr;
            self.var = (1.0 - self.alpha) * (self.var + diff * incr);
        }
        self.samples = self.samples.saturating_add(1);
    }

    pub fn observe(&mut self, now: Millis, rate: f64) -> Option<Finding> {
        if !rate.is_finite() || rate < 0.0 {
            return None;
        }
        if self.samples < self.config.warmup_samples {
            self.update(rate);
            return None;
        }
        let Config {
            metric,
            z_fire,
            z_clear,
            min_samples,
            min_rate,
            eps,
            cooldown_ms,
            ..
        } = self.config;
        let stddev = (self.var + eps).sqrt();
        let z = (rate - self.mean) / stddev;
        let anomalous = z >= z_fire && rate >= min_rate;
        if !anomalous {
            self.run = None;
            if self.latch.is_active() && (z <= z_clear || rate < min_rate) {
                self.latch.lower(now, cooldown_ms);
            }
            // While an open finding has not cleared, its in-between samples stay out too.
            if !self.latch.is_active() {
                self.update(rate);
            }
            return None;
        }
        let (count, since) = match self.run {
            Some((count, since)) => (count.saturating_add(1), since),
            None => (1, now),
        };
        self.run = Some((count, since));
        if count < min_samples || !self.latch.raise(now, since) {
            return None;
        }
        Some(
            Finding::new(self.detector, self.target.clone(), since)
                .summary(format!(
                    "{metric} {rate:.2} is {z:.1} standard deviations above its baseline {:.2}",
                    self.mean
                ))
                .evidence(metric, rate)
                .evidence("rate", rate)
                .evidence("z", z)
                .evidence("mean", self.mean)
                .evidence("stddev", stddev)
                .evidence("samples", f64::from(count)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector() -> RollingBaseline {
        let config = Config {
            warmup_samples: 10,
            cooldown_ms: 100,
            ..Config::default()
        };
        RollingBaseline::new("retransmits", "10.0.0.7:5432", config).unwrap()
    }

    /// `steady` samples alternating around 10 (sd about 1), then `tail`; times 10 ms apart.
    fn run(steady: usize, tail: &[f64]) -> Vec<usize> {
        let mut d = detector();
        let values = (0..steady)
            .map(|i| if i % 2 == 0 { 9.0 } else { 11.0 })
            .chain(tail.iter().copied());
        values
            .enumerate()
            .filter_map(|(i, v)| {
                let t = Millis::try_from(i).unwrap() * 10;
                d.observe(t, v).map(|_| i)
            })
            .collect()
    }

    #[test]
    fn named_behaviours() {
        let spike = [50.0, 50.0, 50.0, 50.0];
        let cases: [(&str, usize, Vec<f64>, Vec<usize>); 6] = [
            ("fires on a sustained spike", 40, spike.to_vec(), vec![42]),
            ("no finding during warm-up", 4, spike.to_vec(), vec![]),
            (
                "a single outlier does not fire (min_samples)",
                40,
                vec![50.0, 10.0, 50.0, 10.0],
                vec![],
            ),
            (
                "dedupe: a long anomaly fires once",
                40,
                vec![50.0; 30],
                vec![42],
            ),
            (
                "clears, then the cooldown suppresses a quick repeat",
                40,
                [&spike[..], &[10.0; 3], &spike[..]].concat(),
                vec![42],
            ),
            (
                "clears, then fires again after the cooldown",
                40,
                [&spike[..], &[10.0; 12], &spike[..]].concat(),
                vec![42, 58],
            ),
        ];
        for (name, steady, tail, want) in cases {
            assert_eq!(run(steady, &tail), want, "{name}");
        }
    }

    #[test]
    fn idle_dependency_needs_the_rate_floor() {
        let mut d = detector();
        let mut fired = Vec::new();
        for i in 0..40u64 {
            let v = if (20..25).contains(&i) { 1.0 } else { 0.0 };
            fired.extend(d.observe(i * 10, v));
        }
        assert!(
            fired.is_empty(),
            "0 -> 1/s on an idle dependency: {fired:?}"
        );
        for i in 40..44u64 {
            fired.extend(d.observe(i * 10, 30.0));
        }
        assert_eq!(fired.len(), 1, "30/s on an idle dependency is an anomaly");
        let f = &fired[0];
        assert_eq!(f.id, "retransmits/10.0.0.7:5432");
        assert_eq!(f.since, 400);
        assert_eq!(f.evidence["rate"], 30.0);
        assert!(f.evidence["z"] >= 4.0);
    }

    #[test]
    fn anomaly_does_not_poison_the_baseline() {
        let mut d = detector();
        for i in 0..40u64 {
            d.observe(i * 10, if i % 2 == 0 { 9.0 } else { 11.0 });
        }
        let before = d.baseline();
        for i in 40..100u64 {
            d.observe(i * 10, 80.0);
        }
        assert_eq!(d.baseline(), before);
        assert!(d.is_firing());
    }

    #[test]
    fn validation_names_fields() {
        let bad = Config {
            half_life_samples: 0.0,
            z_clear: 5.0,
            min_samples: 0,
            eps: 0.0,
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
            ["half_life_samples", "z_clear", "min_samples", "eps"]
        );
        assert!((Config::default().alpha() - 0.0228).abs() < 1e-3);
    }
}
