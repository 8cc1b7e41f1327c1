//! The local action journal: before the first step of an action the agent records its fencing
//! token and plan, and it records each step and the outcome. The plan and the outcome are
//! fsynced before the agent goes on; steps are appended without a sync (a cleanup may take
//! 100,000 of them): a power loss can drop the last step lines, never the plan that makes the
//! action count as interrupted, and a process crash loses nothing (the page cache survives it). After a restart the journal says which actions were interrupted (they are
//! reported, never re-run under their old token) and which tokens were already used, so no step
//! ever runs under a token lower than or equal to one already recorded for the same action
//! class (I2).
//!
//! It owns the journal file and nothing else: no lease logic, no clock (times are passed in).
//! Written by hand: an append-only file of JSON lines with `sync_data` is all it needs.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::finding::Millis;

/// One line of the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum Entry {
    /// Written (and synced) before the first step.
    Planned {
        lease_id: String,
        token: u64,
        class: String,
        target: String,
        /// The action's parameters, as the action class serialises them.
        plan: serde_json::Value,
        at: Millis,
    },
    /// A step is about to run.
    Step {
        token: u64,
        step: String,
        at: Millis,
    },
    /// The action ended (success, failed, verification_failed, abandoned, interrupted).
    Done {
        token: u64,
        outcome: String,
        at: Millis,
    },
}

/// An action whose `Planned` entry has no `Done`: the agent died while running it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interrupted {
    pub lease_id: String,
    pub token: u64,
    pub class: String,
    pub target: String,
    /// The steps recorded before the agent died, in order.
    pub steps: Vec<String>,
}

/// Why the journal refused to start an action.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "token {token} for class {class} is not above {recorded}, already recorded: a stale or replayed lease must not act"
    )]
    StaleToken {
        class: String,
        token: u64,
        recorded: u64,
    },
    #[error("token {0} has no planned action in the journal: record the plan first")]
    NotPlanned(u64),
    #[error("token {0} already ended: an ended action is never resumed")]
    AlreadyDone(u64),
    #[error(
        "the action journal {path} is corrupt at line {line} ({detail}); move it aside to start a new one (its interrupted actions will not be reported)"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("the action journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The open journal and what replaying it established.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Highest token recorded per action class.
    highest: BTreeMap<String, u64>,
    /// Actions planned and not yet done, by token.
    open: BTreeMap<u64, Interrupted>,
}

impl Journal {
    /// Opens (or creates) the journal at `path` and replays it. A torn last line (the agent died
    /// mid-write) is ignored; any other unreadable line is an error.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let mut highest = BTreeMap::new();
        let mut open = BTreeMap::new();
        let mut torn_at = None;
        if path.exists() {
            let text = std::fs::read(path).map_err(io)?;
            let complete = text.ends_with(b"\n");
            let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
            for (i, line) in lines.iter().enumerate() {
                if line.is_empty() {
                    continue;
                }
                let last = i + 1 == lines.len();
                let entry: Entry = match serde_json::from_slice(line) {
                    Ok(e) => e,
                    Err(_) if last && !complete => {
                        torn_at = Some(text.len() - line.len());
                        break;
                    }
                    Err(e) => {
                        return Err(JournalError::Corrupt {
                            path: path.to_owned(),
                            line: i + 1,
                            detail: e.to_string(),
                        });
                    }
                };
                apply(&mut highest, &mut open, entry);
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        // Cut a torn tail off, so that the next entry starts on a line of its own.
        if let Some(len) = torn_at {
            let len = u64::try_from(len).unwrap_or(u64::MAX);
            file.set_len(len).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            highest,
            open,
        })
    }

    /// Actions the agent was running when it died: report them, never re-run them.
    pub fn interrupted(&self) -> Vec<Interrupted> {
        self.open.values().cloned().collect()
    }

    /// The highest token recorded for `class`, if any.
    pub fn highest_token(&self, class: &str) -> Option<u64> {
        self.highest.get(class).copied()
    }

    /// Records a plan before the first step. Refused unless `token` is above every token
    /// recorded for the class.
    pub fn plan(
        &mut self,
        lease_id: &str,
        token: u64,
        class: &str,
        target: &str,
        plan: serde_json::Value,
        at: Millis,
    ) -> Result<(), JournalError> {
        if let Some(&recorded) = self.highest.get(class)
            && token <= recorded
        {
            return Err(JournalError::StaleToken {
                class: class.to_owned(),
                token,
                recorded,
            });
        }
        self.append(
            Entry::Planned {
                lease_id: lease_id.to_owned(),
                token,
                class: class.to_owned(),
                target: target.to_owned(),
                plan,
                at,
            },
            true,
        )
    }

    /// Records that a step of the action under `token` is about to run.
    pub fn step(&mut self, token: u64, step: &str, at: Millis) -> Result<(), JournalError> {
        self.require_open(token)?;
        self.append(
            Entry::Step {
                token,
                step: step.to_owned(),
                at,
            },
            false,
        )
    }

    /// Records the outcome; the action is closed for good.
    pub fn done(&mut self, token: u64, outcome: &str, at: Millis) -> Result<(), JournalError> {
        self.require_open(token)?;
        self.append(
            Entry::Done {
                token,
                outcome: outcome.to_owned(),
                at,
            },
            true,
        )
    }

    fn require_open(&self, token: u64) -> Result<(), JournalError> {
        if self.open.contains_key(&token) {
            Ok(())
        } else if self.highest.values().any(|&t| t >= token) {
            Err(JournalError::AlreadyDone(token))
        } else {
            Err(JournalError::NotPlanned(token))
        }
    }

    /// Appends one entry, synced before returning when `sync`.
    fn append(&mut self, entry: Entry, sync: bool) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(&entry).expect("journal entries serialise");
        line.push(b'\n');
        self.file.write_all(&line).map_err(io)?;
        if sync {
            self.file.sync_data().map_err(io)?;
        }
        apply(&mut self.highest, &mut self.open, entry);
        Ok(())
    }
}

fn apply(highest: &mut BTreeMap<String, u64>, open: &mut BTreeMap<u64, Interrupted>, entry: Entry) {
    match entry {
        Entry::Planned {
            lease_id,
            token,
            class,
            target,
            plan: _,
            at: _,
        } => {
            let h = highest.entry(class.clone()).or_default();
            *h = (*h).max(token);
            open.insert(
                token,
                Interrupted {
                    lease_id,
                    token,
                    class,
                    target,
                    steps: Vec::new(),
                },
            );
        }
        Entry::Step { token, step, at: _ } => {
            if let Some(action) = open.get_mut(&token) {
                action.steps.push(step);
            }
        }
        Entry::Done {
            token,
            outcome: _,
            at: _,
        } => {
            open.remove(&token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &tempfile::TempDir) -> Journal {
        Journal::open(&dir.path().join("actions.journal")).expect("open")
    }

    #[test]
    fn an_action_interrupted_mid_way_is_reported_after_a_restart_and_not_resumable() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(&dir);
        j.plan(
            "l1",
            10,
            "disk_cleanup",
            "/var/log",
            serde_json::json!({"files": 3}),
            1,
        )
        .unwrap();
        j.step(10, "delete app.log.1", 2).unwrap();
        drop(j);
        let j = journal(&dir);
        assert_eq!(
            j.interrupted(),
            vec![Interrupted {
                lease_id: "l1".into(),
                token: 10,
                class: "disk_cleanup".into(),
                target: "/var/log".into(),
                steps: vec!["delete app.log.1".into()],
            }]
        );
        assert_eq!(j.highest_token("disk_cleanup"), Some(10));
    }

    #[test]
    fn a_token_not_above_the_recorded_one_is_refused_for_the_class() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(&dir);
        j.plan("l1", 10, "disk_cleanup", "/a", serde_json::Value::Null, 1)
            .unwrap();
        j.done(10, "success", 2).unwrap();
        for stale in [9, 10] {
            let err = j
                .plan(
                    "l0",
                    stale,
                    "disk_cleanup",
                    "/a",
                    serde_json::Value::Null,
                    3,
                )
                .unwrap_err();
            assert!(
                matches!(err, JournalError::StaleToken { recorded: 10, .. }),
                "{err}"
            );
        }
        // Another class has its own tokens.
        j.plan(
            "l2",
            5,
            "process_restart",
            "demo",
            serde_json::Value::Null,
            4,
        )
        .unwrap();
        j.plan("l3", 11, "disk_cleanup", "/a", serde_json::Value::Null, 5)
            .unwrap();
        let err = j.step(10, "again", 6).unwrap_err();
        assert!(matches!(err, JournalError::AlreadyDone(10)), "{err}");
        let err = j.step(99, "x", 6).unwrap_err();
        assert!(matches!(err, JournalError::NotPlanned(99)), "{err}");
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_corrupt_middle_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("actions.journal");
        let mut j = journal(&dir);
        j.plan("l1", 7, "disk_cleanup", "/a", serde_json::Value::Null, 1)
            .unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"entry":"done","tok"#).unwrap();
        drop(f);
        let mut j = Journal::open(&path).expect("a torn tail is a crash mid-write");
        assert_eq!(j.interrupted().len(), 1, "the torn Done did not count");
        j.done(7, "interrupted", 3)
            .expect("appends after the cut tail");
        drop(j);
        let j = Journal::open(&path).expect("the journal reads cleanly after the cut");
        assert!(j.interrupted().is_empty());
        drop(j);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("garbage\n{text}\n")).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(err, JournalError::Corrupt { line: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("move it aside"), "{err}");
    }
}
