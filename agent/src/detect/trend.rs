//! Least-squares trends over a window of `(t, value)` samples, and the "sustained growth" test
//! that the disk forecast and the memory-leak detector share.
//!
//! Pure arithmetic: this module must not import I/O, a clock or anything outside `core`/`std`
//! collections.

use std::collections::VecDeque;

use crate::finding::Millis;

use super::Problems;

/// A straight-line fit `value ≈ intercept + slope_per_s * (t - t0)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// Growth in value units per second.
    pub slope_per_s: f64,
    /// Coefficient of determination in `[0, 1]`; 0 when the values do not vary at all.
    pub r2: f64,
}

/// Ordinary least squares over `points`; `None` with fewer than two points or a zero time span.
pub fn fit(points: &[(Millis, f64)]) -> Option<Fit> {
    let &(t0, _) = points.first()?;
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    // Seconds relative to the first sample keep the sums well conditioned.
    let xs = points
        .iter()
        .map(|&(t, y)| (super::secs(t.saturating_sub(t0)), y));
    let (sx, sy) = xs.clone().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in xs {
        let (dx, dy) = (x - mx, y - my);
        sxx += dx * dx;
        sxy += dx * dy;
        syy += dy * dy;
    }
    if sxx <= 0.0 {
        return None;
    }
    let slope_per_s = sxy / sxx;
    let r2 = if syy > 0.0 {
        ((sxy * sxy) / (sxx * syy)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    Some(Fit { slope_per_s, r2 })
}

/// The shape of a window: a fit over all of it and over each half, plus its extremes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Growth {
    pub whole: Fit,
    pub first_half: Fit,
    pub second_half: Fit,
    pub span_ms: Millis,
    pub last: f64,
    pub min: f64,
    pub max: f64,
}

/// Thresholds that make growth "sustained" rather than a step, a burst or a sawtooth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sustained {
    /// Minimum R² of the whole-window fit.
    pub r2_min: f64,
    /// Each half's slope must be at least this fraction of the whole window's slope, so growth
    /// that happened only in one part of the window (a batch write, a step) does not count.
    pub half_slope_min: f64,
    /// The last sample must be within this fraction of the window's range below its maximum,
    /// so a window that already fell back (deleted, rotated, collected) does not count.
    pub near_max: f64,
}

impl Growth {
    /// Analyse a window; `None` with fewer than 6 samples (each half needs a fit).
    pub fn of(points: &[(Millis, f64)]) -> Option<Self> {
        if points.len() < 6 {
            return None;
        }
        let mid = points.len() / 2;
        let whole = fit(points)?;
        let first_half = fit(&points[..mid])?;
        let second_half = fit(&points[mid..])?;
        let (first, last) = (points.first()?, points.last()?);
        let (min, max) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, y)| {
                (lo.min(y), hi.max(y))
            });
        Some(Self {
            whole,
            first_half,
            second_half,
            span_ms: last.0.saturating_sub(first.0),
            last: last.1,
            min,
            max,
        })
    }

    /// Positive slope with a good fit, present across the window and still at its top.
    pub fn is_sustained(&self, rule: &Sustained) -> bool {
        let slope = self.whole.slope_per_s;
        slope > 0.0
            && self.whole.r2 >= rule.r2_min
            && self.first_half.slope_per_s >= rule.half_slope_min * slope
            && self.second_half.slope_per_s >= rule.half_slope_min * slope
            && self.last >= self.max - rule.near_max * (self.max - self.min)
    }
}

/// A time window of samples: pushes at the back, drops what is older than `window_ms`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    points: VecDeque<(Millis, f64)>,
}

impl Window {
    /// Add a sample and drop those older than `now - window_ms`. Out-of-order samples (older
    /// than the newest one) are ignored, because a fit over them would be meaningless.
    pub fn push(&mut self, now: Millis, value: f64, window_ms: Millis) {
        if self.points.back().is_some_and(|&(t, _)| now < t) || !value.is_finite() {
            return;
        }
        self.points.push_back((now, value));
        let oldest = now.saturating_sub(window_ms);
        while self.points.front().is_some_and(|&(t, _)| t < oldest) {
            self.points.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The window's shape; see [`Growth::of`].
    pub fn growth(&mut self) -> Option<Growth> {
        Growth::of(self.points.make_contiguous())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, samples, whether the growth is sustained.
    type Case = (&'static str, Vec<(Millis, f64)>, bool);

    fn line(n: u64, slope: f64) -> Vec<(Millis, f64)> {
        (0..n)
            .map(|i| (i * 1000, 10.0 + slope * i as f64))
            .collect()
    }

    #[test]
    fn fit_recovers_a_line() {
        let f = fit(&line(10, 2.0)).unwrap();
        assert!((f.slope_per_s - 2.0).abs() < 1e-9);
        assert!((f.r2 - 1.0).abs() < 1e-9);
        assert_eq!(fit(&line(1, 2.0)), None);
        assert_eq!(fit(&line(5, 0.0)).unwrap().r2, 0.0);
    }

    #[test]
    fn sustained_rejects_steps_and_falls() {
        let rule = Sustained {
            r2_min: 0.8,
            half_slope_min: 0.3,
            near_max: 0.1,
        };
        let cases: [Case; 3] = [
            ("line", line(20, 1.0), true),
            (
                "step",
                (0..20u64)
                    .map(|i| (i * 1000, if i < 10 { 0.0 } else { 5.0 }))
                    .collect(),
                false,
            ),
            (
                "rise then fall",
                (0..20u64)
                    .map(|i| (i * 1000, if i < 15 { i as f64 } else { 0.0 }))
                    .collect(),
                false,
            ),
        ];
        for (name, points, want) in cases {
            let g = Growth::of(&points).unwrap();
            assert_eq!(g.is_sustained(&rule), want, "{name}: {g:?}");
        }
    }

    #[test]
    fn window_drops_old_and_out_of_order_samples() {
        let mut w = Window::default();
        for t in [0, 1000, 2000, 1500, 3000] {
            w.push(t, 1.0, 1500);
        }
        assert_eq!(w.len(), 2);
    }
}

/// The window settings every trend detector (disk forecast, memory leak) takes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FitWindow {
    pub window_ms: Millis,
    pub min_span_ms: Millis,
    pub min_samples: u32,
    pub horizon_ms: Millis,
}

/// Checks the settings trend detectors share, adding every problem to `p` under the field
/// names the detectors' configs use.
pub(crate) fn check_fit(p: &mut Problems, window: FitWindow, sustained: &Sustained) {
    let FitWindow {
        window_ms,
        min_span_ms,
        min_samples,
        horizon_ms,
    } = window;
    p.positive_ms(window_ms, "window_ms");
    p.check(
        min_span_ms > 0 && min_span_ms <= window_ms,
        "min_span_ms",
        format!("must be greater than 0 and at most window_ms ({window_ms}), got {min_span_ms}"),
    );
    p.check(
        min_samples >= 6,
        "min_samples",
        "must be at least 6 (each half of the window is fitted)",
    );
    p.positive_ms(horizon_ms, "horizon_ms");
    p.range(sustained.r2_min, "r2_min", 0.0, 1.0);
    p.range(sustained.half_slope_min, "half_slope_min", 0.0, 1.0);
    p.range(sustained.near_max, "near_max", 0.0, 1.0);
}
