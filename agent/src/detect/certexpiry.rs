//! Certificate expiry: a `cert_expiry` finding about a certificate file (the agent's `[tls]`
//! client certificate or CA) while fewer than `warning_days` remain before its notAfter. An
//! expired certificate is the extreme case of the same finding. It clears once a reading shows
//! more time left (the file was replaced).
//!
//! Pure: the decision is [`assess`] (`now`, notAfter and the warning in, an [`Expiry`] or
//! nothing out), and [`CertExpiry`] keeps what was last said so a finding is emitted once per
//! onset or change. The caller reads the file and the clock; this module must not import I/O
//! or a clock.

use std::ops::RangeInclusive;
use std::time::{Duration, UNIX_EPOCH};

use crate::finding::{Finding, Millis};

use super::{ConfigError, ConfigErrors};

/// The finding's detector name.
pub const DETECTOR: &str = "cert_expiry";
/// The warnings accepted, in days (`[tls] expiry_warning_days`).
pub const WARNING_DAYS: RangeInclusive<u32> = 1..=365;
/// The warning when the config names none: two weeks, time to rotate by hand.
pub const DEFAULT_WARNING_DAYS: u32 = 14;

const SECONDS_PER_DAY: i64 = 86_400;

/// A certificate within its warning: when it ends and how long is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// The certificate's notAfter, unix seconds.
    pub not_after_unix: i64,
    /// Seconds from now to notAfter; negative once it has expired.
    pub seconds_left: i64,
}

impl Expiry {
    /// A certificate is valid through its notAfter second (RFC 5280 §4.1.2.5), expired after.
    pub fn expired(&self) -> bool {
        self.seconds_left < 0
    }

    pub fn days_left(&self) -> f64 {
        self.seconds_left as f64 / SECONDS_PER_DAY as f64
    }
}

/// Whether a certificate ending at `not_after_unix` is within `warning_days` of `now_unix`
/// (fewer than that many days left, or already expired).
pub fn assess(now_unix: i64, not_after_unix: i64, warning_days: u32) -> Option<Expiry> {
    let seconds_left = not_after_unix.saturating_sub(now_unix);
    (seconds_left < i64::from(warning_days) * SECONDS_PER_DAY).then_some(Expiry {
        not_after_unix,
        seconds_left,
    })
}

/// The expiry finding of one certificate file.
#[derive(Clone, Debug)]
pub struct CertExpiry {
    /// What the certificate is to the agent (`client`, `ca`), for the summary.
    which: &'static str,
    /// The certificate file, the finding's target.
    target: String,
    warning_days: u32,
    /// What the finding in force says (notAfter, expired), if one is.
    said: Option<(i64, bool)>,
}

impl CertExpiry {
    /// `warning_days` must be within [`WARNING_DAYS`].
    pub fn new(
        which: &'static str,
        target: impl Into<String>,
        warning_days: u32,
    ) -> Result<Self, ConfigErrors> {
        if !WARNING_DAYS.contains(&warning_days) {
            return Err(ConfigErrors(vec![ConfigError {
                field: "expiry_warning_days",
                problem: warning_days_problem(i64::from(warning_days)),
            }]));
        }
        Ok(Self {
            which,
            target: target.into(),
            warning_days,
            said: None,
        })
    }

    /// One reading of the certificate's notAfter at `now` (detector clock) and `now_unix`. A
    /// finding comes out at the onset, and again when what it says changed (another
    /// certificate still within the warning, or this one expired); none while it stays the
    /// same, and none once more than the warning is left ([`Self::is_firing`] turns false).
    pub fn observe(&mut self, now: Millis, now_unix: i64, not_after_unix: i64) -> Option<Finding> {
        let Some(expiry) = assess(now_unix, not_after_unix, self.warning_days) else {
            self.said = None;
            return None;
        };
        let says = (expiry.not_after_unix, expiry.expired());
        if self.said == Some(says) {
            return None;
        }
        self.said = Some(says);
        Some(self.finding(now, expiry))
    }

    pub fn is_firing(&self) -> bool {
        self.said.is_some()
    }

    fn finding(&self, now: Millis, expiry: Expiry) -> Finding {
        let when = format_unix(expiry.not_after_unix);
        let days = expiry.days_left();
        let state = if expiry.expired() {
            format!("expired {:.1} days ago ({when})", -days)
        } else {
            format!("expires in {days:.1} days ({when})")
        };
        Finding::new(DETECTOR, self.target.clone(), now)
            .summary(format!(
                "the {} certificate {} {state}, within the {}-day warning; replace the file with a \
                 newly issued one (`interlock certs issue …`)",
                self.which, self.target, self.warning_days
            ))
            .evidence("days_left", days)
            .evidence("not_after", expiry.not_after_unix as f64)
            .evidence("warning_days", f64::from(self.warning_days))
    }
}

/// What is wrong with a warning outside [`WARNING_DAYS`] (shared with the config's check).
pub fn warning_days_problem(value: i64) -> String {
    format!(
        "{value} is out of range; give a whole number of days from {} to {}",
        WARNING_DAYS.start(),
        WARNING_DAYS.end()
    )
}

/// RFC 3339 for people; the evidence carries the number.
fn format_unix(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(secs) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
        }
        Err(_) => format!("unix {unix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = SECONDS_PER_DAY;

    #[test]
    fn assess_fires_below_the_warning_and_when_expired() {
        let now = 1_800_000_000;
        // (not_after relative to now, warning days, seconds left if it fires)
        let table: [(i64, u32, Option<i64>); 9] = [
            (90 * DAY, 14, None),
            (14 * DAY + 1, 14, None),
            // Exactly the warning left is not fewer than it.
            (14 * DAY, 14, None),
            (14 * DAY - 1, 14, Some(14 * DAY - 1)),
            (3 * DAY, 14, Some(3 * DAY)),
            (3 * DAY, 1, None),
            // Its last valid second, then expired.
            (0, 14, Some(0)),
            (-5 * DAY, 14, Some(-5 * DAY)),
            (400 * DAY, 365, None),
        ];
        for (offset, days, want) in table {
            let got = assess(now, now + offset, days);
            assert_eq!(
                got.map(|e| e.seconds_left),
                want,
                "not_after now{offset:+}s, warning {days} days"
            );
            if let Some(e) = got {
                assert_eq!(e.not_after_unix, now + offset);
                assert_eq!(e.expired(), offset < 0);
            }
        }
        // Far-off instants do not overflow.
        assert!(assess(i64::MAX, i64::MIN, 14).is_some_and(|e| e.expired()));
        assert!(assess(i64::MIN, i64::MAX, 14).is_none());
    }

    #[test]
    fn days_left_is_fractional_and_negative_when_expired() {
        let e = assess(0, DAY * 5 / 2, 14).expect("fires");
        assert!((e.days_left() - 2.5).abs() < 1e-9, "{}", e.days_left());
        let e = assess(DAY, 0, 14).expect("fires");
        assert!((e.days_left() + 1.0).abs() < 1e-9, "{}", e.days_left());
    }

    #[test]
    fn the_finding_comes_once_per_onset_or_change_and_clears_on_a_renewed_certificate() {
        let mut d = CertExpiry::new("client", "/etc/interlock/host.pem", 14).expect("valid");
        let t0 = 1_800_000_000;
        let short = t0 + 3 * DAY;
        let f = d.observe(10, t0, short).expect("onset");
        assert_eq!(f.id, "cert_expiry//etc/interlock/host.pem");
        assert_eq!(f.detector, DETECTOR);
        assert_eq!(f.target, "/etc/interlock/host.pem");
        assert_eq!(f.since, 10);
        assert_eq!(f.evidence["not_after"], short as f64);
        assert!((f.evidence["days_left"] - 3.0).abs() < 1e-9);
        assert_eq!(f.evidence["warning_days"], 14.0);
        assert!(f.summary.contains("client certificate"), "{}", f.summary);
        assert!(f.summary.contains("expires in 3.0 days"), "{}", f.summary);
        assert!(f.summary.contains("2027-01-18T"), "{}", f.summary);
        assert!(d.is_firing());
        // The same certificate a minute later: still firing, nothing new to say.
        assert_eq!(d.observe(60_010, t0 + 60, short), None);
        assert!(d.is_firing());
        // Another certificate that is also short: the finding says so.
        let shorter = t0 + DAY;
        let f = d.observe(120_010, t0 + 120, shorter).expect("changed");
        assert_eq!(f.evidence["not_after"], shorter as f64);
        // It expires: the extreme case, said once.
        let f = d.observe(200_000, shorter + 10, shorter).expect("expired");
        assert!(f.summary.contains("expired 0.0 days ago"), "{}", f.summary);
        assert!(f.evidence["days_left"] < 0.0);
        assert_eq!(d.observe(200_100, shorter + 100, shorter), None);
        assert!(d.is_firing());
        // Replaced by a 90-day certificate: it clears, and a later short one fires again.
        assert_eq!(d.observe(300_000, t0 + 2 * DAY, t0 + 92 * DAY), None);
        assert!(!d.is_firing());
        assert!(d.observe(400_000, t0 + 80 * DAY, t0 + 92 * DAY).is_some());
    }

    #[test]
    fn warnings_outside_the_range_are_refused_naming_the_field() {
        for days in [0, 366] {
            let e = CertExpiry::new("ca", "/c/ca.pem", days).expect_err("out of range");
            assert_eq!(e.0[0].field, "expiry_warning_days");
            assert!(e.0[0].problem.contains("from 1 to 365"), "{e}");
        }
        for days in [1, 14, 365] {
            assert!(CertExpiry::new("ca", "/c/ca.pem", days).is_ok());
        }
    }
}
