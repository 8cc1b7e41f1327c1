//! What the agent concludes: a [`Finding`] is "this host has problem P on target T, evidence E,
//! since t". Detectors produce them; the reporter ships them to the coordinator; actions are
//! chosen from them.
//!
//! Pure data: no I/O, no clock (times are passed in as [`Millis`]).

use std::collections::BTreeMap;

/// Milliseconds on a clock the caller chooses (monotonic for detectors, Unix time on the wire).
pub type Millis = u64;

/// One finding. Repeats of the same problem on the same target carry the same `id`, so
/// consumers can deduplicate: `id` is `detector/target`.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub id: String,
    /// Which detector fired (`disk_full`, `disk_forecast`, `memory_leak`, `crash_loop`, ...).
    pub detector: &'static str,
    /// What it is about: a mount point, a process or unit name, a remote endpoint.
    pub target: String,
    /// One sentence for people.
    pub summary: String,
    /// The numbers that triggered it, by name.
    pub evidence: BTreeMap<&'static str, f64>,
    /// When the condition started (detector clock).
    pub since: Millis,
}

impl Finding {
    pub fn new(detector: &'static str, target: impl Into<String>, since: Millis) -> Self {
        let target = target.into();
        Self {
            id: format!("{detector}/{target}"),
            detector,
            target,
            summary: String::new(),
            evidence: BTreeMap::new(),
            since,
        }
    }

    pub fn summary(mut self, summary: impl Into<String>) -> Self {
        self.summary = summary.into();
        self
    }

    pub fn evidence(mut self, name: &'static str, value: f64) -> Self {
        self.evidence.insert(name, value);
        self
    }
}
