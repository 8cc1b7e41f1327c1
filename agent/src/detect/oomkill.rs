//! OOM-kill findings: every kill the kernel's OOM killer makes is a finding about the victim's
//! process name (`oom_kill/<comm>`), so repeated kills of one program update one finding (its
//! evidence counts the kills) instead of piling up. The finding is held for `hold_ms` after the
//! last kill of that name, then it clears.
//!
//! Pure: kill records and `now` in, findings out. This module must not import I/O or a clock.

use std::collections::BTreeMap;

use crate::finding::{Finding, Millis};

use super::{ConfigErrors, Problems};

/// The finding's detector name.
pub const DETECTOR: &str = "oom_kill";

/// At most this many process names are remembered; the one killed longest ago is forgotten.
const MAX_NAMES: usize = 256;

/// Settings of the OOM-kill findings.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// How long a finding is held after the last kill of its process name.
    pub hold_ms: Millis,
}

impl Default for Config {
    /// Ten minutes: long enough to be reported and seen, short enough to clear.
    fn default() -> Self {
        Self {
            hold_ms: 10 * 60_000,
        }
    }
}

impl Config {
    /// Lists every problem at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems::default();
        p.positive_ms(self.hold_ms, "hold_ms");
        p.finish()
    }
}

/// One OOM kill as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomKill {
    pub pid: u32,
    /// The victim's process name (`/proc/<pid>/comm`).
    pub comm: String,
    pub anon_rss_kb: u64,
    pub total_vm_kb: u64,
    pub oom_score_adj: i16,
}

#[derive(Clone, Debug)]
struct NameState {
    kills: u32,
    first: Millis,
    last: Millis,
}

/// OOM-kill findings for every process name.
#[derive(Clone, Debug)]
pub struct OomKills {
    config: Config,
    names: BTreeMap<String, NameState>,
}

impl OomKills {
    pub fn new(config: Config) -> Result<Self, ConfigErrors> {
        config.validate()?;
        Ok(Self {
            config,
            names: BTreeMap::new(),
        })
    }

    /// One kill at `now`: always a finding (with the kill count of that name while held).
    pub fn observe(&mut self, now: Millis, kill: &OomKill) -> Finding {
        let hold = self.config.hold_ms;
        let state = self
            .names
            .entry(kill.comm.clone())
            .and_modify(|s| {
                if now.saturating_sub(s.last) > hold {
                    *s = NameState {
                        kills: 0,
                        first: now,
                        last: now,
                    };
                }
            })
            .or_insert(NameState {
                kills: 0,
                first: now,
                last: now,
            });
        state.kills = state.kills.saturating_add(1);
        state.last = now;
        let (kills, first) = (state.kills, state.first);
        if self.names.len() > MAX_NAMES
            && let Some(oldest) = self
                .names
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(n, _)| n.clone())
        {
            self.names.remove(&oldest);
        }
        let target = if kill.comm.is_empty() {
            format!("pid-{}", kill.pid)
        } else {
            kill.comm.clone()
        };
        Finding::new(DETECTOR, target.clone(), first)
            .summary(format!(
                "the OOM killer killed {target} (pid {}, {} MiB anonymous memory){}",
                kill.pid,
                kill.anon_rss_kb / 1024,
                if kills > 1 {
                    format!("; {kills} kills of {target} so far")
                } else {
                    String::new()
                }
            ))
            .evidence("pid", f64::from(kill.pid))
            .evidence("kills", f64::from(kills))
            .evidence("anon_rss_kb", kill.anon_rss_kb as f64)
            .evidence("total_vm_kb", kill.total_vm_kb as f64)
            .evidence("oom_score_adj", f64::from(kill.oom_score_adj))
    }

    /// The finding ids whose hold ran out at `now`; they are forgotten.
    pub fn expire(&mut self, now: Millis) -> Vec<String> {
        let hold = self.config.hold_ms;
        let mut gone = Vec::new();
        self.names.retain(|name, s| {
            let keep = now.saturating_sub(s.last) <= hold;
            if !keep {
                gone.push(format!("{DETECTOR}/{name}"));
            }
            keep
        });
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kill(pid: u32, comm: &str) -> OomKill {
        OomKill {
            pid,
            comm: comm.to_owned(),
            anon_rss_kb: 30 * 1024,
            total_vm_kb: 40 * 1024,
            oom_score_adj: 0,
        }
    }

    #[test]
    fn every_kill_is_a_finding_with_a_stable_id_per_name() {
        let mut d = OomKills::new(Config { hold_ms: 1000 }).unwrap();
        let a = d.observe(10, &kill(7, "python3"));
        assert_eq!(a.id, "oom_kill/python3");
        assert_eq!(a.evidence["pid"], 7.0);
        assert_eq!(a.evidence["kills"], 1.0);
        let b = d.observe(500, &kill(8, "python3"));
        assert_eq!(b.id, a.id);
        assert_eq!(b.since, 10);
        assert_eq!(b.evidence["kills"], 2.0);
        assert!(b.summary.contains("pid 8"), "{}", b.summary);
        let c = d.observe(600, &kill(9, "java"));
        assert_eq!(c.id, "oom_kill/java");
        assert!(d.expire(1400).is_empty());
        assert_eq!(d.expire(1601), vec!["oom_kill/java", "oom_kill/python3"]);
        let again = d.observe(5000, &kill(10, "python3"));
        assert_eq!((again.since, again.evidence["kills"]), (5000, 1.0));
    }

    #[test]
    fn validation_names_fields() {
        let err = Config { hold_ms: 0 }.validate().unwrap_err();
        assert_eq!(err.0[0].field, "hold_ms");
    }
}
