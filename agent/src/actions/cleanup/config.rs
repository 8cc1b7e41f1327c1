//! The `disk_cleanup` settings: raw serde structs (unknown fields refused) and their
//! validation into [`CleanupConfig`], listing every problem at once with its path.
//!
//! Pure: parses strings and numbers only. Must not touch the filesystem (whether a root exists
//! and how it is owned is checked when cleanup opens it, just before acting).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::pattern::NamePattern;
use crate::actions::trigger::Trigger;

/// `[cleanup]` as written in `agent.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCleanup {
    /// Free space (0 < ratio < 1 of the filesystem) cleanup works towards.
    pub target_free_ratio: Option<f64>,
    /// At most this many bytes freed (deleted or truncated) per run.
    pub max_bytes_per_run: Option<u64>,
    /// The roots, each `[[cleanup.root]]`.
    #[serde(default)]
    pub root: Vec<RawCleanupRoot>,
    /// Which findings start a cleanup of a mount holding a root: some of "disk_full",
    /// "disk_forecast" (default both).
    pub on: Option<Vec<String>>,
    /// A humantime duration: no new cleanup of a mount for this long after one (default:
    /// `[actions] cooldown`).
    pub cooldown: Option<String>,
}

/// One `[[cleanup.root]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCleanupRoot {
    pub path: Option<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
    /// A humantime duration ("2h", "3days"); files younger than this are never touched.
    pub min_age: Option<String>,
    /// The N newest eligible files of this root are kept.
    pub keep_newest: Option<u32>,
    pub allow_truncate: Option<bool>,
    pub allow_group_writable: Option<bool>,
}

/// Validated cleanup settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CleanupConfig {
    pub target_free_ratio: f64,
    pub max_bytes_per_run: u64,
    pub roots: Vec<CleanupRoot>,
    /// The findings that start a cleanup.
    pub on: BTreeSet<Trigger>,
    /// Its own cooldown, if set (else the agent-wide one applies).
    pub cooldown: Option<Duration>,
}

/// A validated root: an absolute, normalised path that is not `/`.
#[derive(Debug, Clone, PartialEq)]
pub struct CleanupRoot {
    pub path: PathBuf,
    pub patterns: Vec<NamePattern>,
    pub min_age: Duration,
    pub keep_newest: usize,
    pub allow_truncate: bool,
    pub allow_group_writable: bool,
}

impl CleanupRoot {
    /// Whether one entry name matches any of this root's patterns.
    pub fn matches(&self, name: &[u8]) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

/// One configuration problem: where, and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupProblem {
    pub path: String,
    pub problem: String,
}

impl std::fmt::Display for CleanupProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// All problems found in one `[cleanup]` section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} cleanup problem(s): {}", .0.len(), join(.0))]
pub struct CleanupProblems(pub Vec<CleanupProblem>);

fn join(problems: &[CleanupProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl RawCleanup {
    /// Checks everything and lists every problem at once; `at` is the section's path in the
    /// file (e.g. `cleanup`), prefixed to every problem.
    pub fn validate(self, at: &str) -> Result<CleanupConfig, CleanupProblems> {
        let mut problems = Vec::new();
        let mut add = |path: String, problem: String| {
            problems.push(CleanupProblem { path, problem });
        };
        let target_free_ratio = match self.target_free_ratio {
            None => {
                add(
                    format!("{at}.target_free_ratio"),
                    "missing; set the free-space ratio to reach, e.g. 0.2".into(),
                );
                0.0
            }
            Some(r) if !(r.is_finite() && r > 0.0 && r < 1.0) => {
                add(
                    format!("{at}.target_free_ratio"),
                    format!("{r} is not strictly between 0 and 1; e.g. 0.2 for 20% free"),
                );
                0.0
            }
            Some(r) => r,
        };
        let max_bytes_per_run = match self.max_bytes_per_run {
            None | Some(0) => {
                add(
                    format!("{at}.max_bytes_per_run"),
                    "missing or 0; set the most bytes one run may free, e.g. 10737418240".into(),
                );
                0
            }
            Some(b) => b,
        };
        if self.root.is_empty() {
            add(
                format!("{at}.root"),
                "no roots; add at least one [[cleanup.root]] with a path and patterns".into(),
            );
        }
        let mut roots = Vec::new();
        for (i, raw) in self.root.into_iter().enumerate() {
            let at = format!("{at}.root[{i}]");
            if let Some(root) = validate_root(&at, raw, &mut add) {
                roots.push(root);
            }
        }
        // Nested or repeated roots would be walked twice with two keep-newest sets.
        let mut seen = BTreeSet::new();
        for (i, a) in roots.iter().enumerate() {
            if !seen.insert(a.path.clone()) {
                add(
                    format!("{at}.root[{i}].path"),
                    format!(
                        "{} is configured twice; merge the two roots",
                        a.path.display()
                    ),
                );
            }
            for b in &roots {
                if a.path != b.path && a.path.starts_with(&b.path) {
                    add(
                        format!("{at}.root[{i}].path"),
                        format!(
                            "{} lies inside root {}; remove one of them (roots must not nest)",
                            a.path.display(),
                            b.path.display()
                        ),
                    );
                }
            }
        }
        let on = match self.on {
            None => Trigger::CLEANUP.into_iter().collect(),
            Some(names) => {
                let mut on = BTreeSet::new();
                for name in &names {
                    match Trigger::parse(name, &Trigger::CLEANUP) {
                        Ok(t) => {
                            on.insert(t);
                        }
                        Err(p) => add(format!("{at}.on"), p),
                    }
                }
                if names.is_empty() {
                    add(
                        format!("{at}.on"),
                        "empty; list the findings that start a cleanup, e.g. [\"disk_full\"]"
                            .into(),
                    );
                }
                on
            }
        };
        let cooldown = match self.cooldown.as_deref().map(humantime::parse_duration) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                add(
                    format!("{at}.cooldown"),
                    format!("not a duration ({e}); write it like \"5m\""),
                );
                None
            }
        };
        if problems.is_empty() {
            Ok(CleanupConfig {
                target_free_ratio,
                max_bytes_per_run,
                roots,
                on,
                cooldown,
            })
        } else {
            Err(CleanupProblems(problems))
        }
    }
}

fn validate_root(
    at: &str,
    raw: RawCleanupRoot,
    add: &mut impl FnMut(String, String),
) -> Option<CleanupRoot> {
    let RawCleanupRoot {
        path,
        patterns,
        min_age,
        keep_newest,
        allow_truncate,
        allow_group_writable,
    } = raw;
    let mut ok = true;
    let path = match path.as_deref().map(check_root_path) {
        None => {
            add(
                format!("{at}.path"),
                "missing; set an absolute directory such as /var/log/app".into(),
            );
            ok = false;
            None
        }
        Some(Err(problem)) => {
            add(format!("{at}.path"), problem);
            ok = false;
            None
        }
        Some(Ok(p)) => Some(p),
    };
    if patterns.is_empty() {
        add(
            format!("{at}.patterns"),
            "empty; list file-name patterns such as \"*.log.[0-9]*\"".into(),
        );
        ok = false;
    }
    let mut parsed = Vec::new();
    for (j, p) in patterns.iter().enumerate() {
        match NamePattern::parse(p) {
            Ok(p) => parsed.push(p),
            Err(problem) => {
                add(format!("{at}.patterns[{j}]"), problem);
                ok = false;
            }
        }
    }
    let min_age = match min_age.as_deref().map(humantime::parse_duration) {
        None => {
            add(
                format!("{at}.min_age"),
                "missing; set how old a file must be before it may go, e.g. \"1h\"".into(),
            );
            ok = false;
            Duration::ZERO
        }
        Some(Err(e)) => {
            add(
                format!("{at}.min_age"),
                format!("not a duration ({e}); write e.g. \"30m\", \"2h\" or \"3days\""),
            );
            ok = false;
            Duration::ZERO
        }
        Some(Ok(d)) if d.is_zero() => {
            add(
                format!("{at}.min_age"),
                "0 would delete files still being written; use at least \"1m\"".into(),
            );
            ok = false;
            d
        }
        Some(Ok(d)) => d,
    };
    let keep_newest = usize::try_from(keep_newest.unwrap_or(0)).unwrap_or(usize::MAX);
    match (ok, path) {
        (true, Some(path)) => Some(CleanupRoot {
            path,
            patterns: parsed,
            min_age,
            keep_newest,
            allow_truncate: allow_truncate.unwrap_or(false),
            allow_group_writable: allow_group_writable.unwrap_or(false),
        }),
        _ => None,
    }
}

/// An absolute path made of normal components only, not `/`, without a NUL byte.
fn check_root_path(raw: &str) -> Result<PathBuf, String> {
    if raw.contains('\0') {
        return Err(format!("{raw:?} contains a NUL byte; remove it"));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(format!(
            "{raw:?} is relative; write the absolute directory, e.g. /var/log/app"
        ));
    }
    let mut clean = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => clean.push(n),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(format!(
                    "{raw:?} contains '.' or '..'; write the directory without them"
                ));
            }
        }
    }
    if clean == Path::new("/") {
        return Err("\"/\" cannot be a cleanup root; name the directory to clean".into());
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(path: &str, patterns: &[&str]) -> RawCleanupRoot {
        RawCleanupRoot {
            path: Some(path.into()),
            patterns: patterns.iter().map(|s| (*s).to_owned()).collect(),
            min_age: Some("1h".into()),
            ..RawCleanupRoot::default()
        }
    }

    #[test]
    fn accepts_a_good_section_from_toml() {
        let raw: RawCleanup = toml::from_str(
            r#"
            target_free_ratio = 0.25
            max_bytes_per_run = 1000
            [[root]]
            path = "/var/log/app/"
            patterns = ["*.log.[0-9]*", "*.gz"]
            min_age = "2h"
            keep_newest = 3
            allow_truncate = true
            "#,
        )
        .expect("parses");
        let cfg = raw.validate("cleanup").expect("valid");
        assert_eq!(cfg.roots[0].path, PathBuf::from("/var/log/app"));
        assert_eq!(cfg.roots[0].keep_newest, 3);
        assert_eq!(cfg.roots[0].min_age, Duration::from_secs(7200));
        assert!(cfg.roots[0].allow_truncate);
        assert!(!cfg.roots[0].allow_group_writable);
        assert!(cfg.roots[0].matches(b"app.log.4"));
    }

    #[test]
    fn refuses_unknown_fields() {
        let r: Result<RawCleanup, _> = toml::from_str("target_free_ratio = 0.2\nfollow = true");
        assert!(r.is_err());
    }

    #[test]
    fn lists_every_problem_at_once_with_its_path() {
        let mut bad_values = root("/srv/cache", &["*.tmp"]);
        bad_values.min_age = Some("soon".into());
        let raw = RawCleanup {
            target_free_ratio: Some(1.5),
            max_bytes_per_run: Some(0),
            root: vec![
                root("var/log", &["*.gz"]),
                root("/", &["*.gz"]),
                root("/var/log/../etc", &["*.gz"]),
                root("/var/log/app", &["../*.log", "a/b", "*"]),
                bad_values,
                RawCleanupRoot::default(),
            ],
            on: Some(vec!["crash".into()]),
            cooldown: Some("later".into()),
        };
        let CleanupProblems(problems) = raw.validate("cleanup").expect_err("invalid");
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cleanup.target_free_ratio",
                "cleanup.max_bytes_per_run",
                "cleanup.root[0].path",
                "cleanup.root[1].path",
                "cleanup.root[2].path",
                "cleanup.root[3].patterns[0]",
                "cleanup.root[3].patterns[1]",
                "cleanup.root[3].patterns[2]",
                "cleanup.root[4].min_age",
                "cleanup.root[5].path",
                "cleanup.root[5].patterns",
                "cleanup.root[5].min_age",
                "cleanup.on",
                "cleanup.cooldown",
            ],
            "{problems:#?}"
        );
        assert!(problems[2].problem.contains("relative"));
        assert!(problems[3].problem.contains("\"/\" cannot be"));
        assert!(problems[5].problem.contains("escape") || problems[5].problem.contains(".."));
    }

    #[test]
    fn refuses_nested_and_repeated_roots() {
        let raw = RawCleanup {
            target_free_ratio: Some(0.2),
            max_bytes_per_run: Some(10),
            root: vec![
                root("/var/log", &["*.gz"]),
                root("/var/log/app", &["*.gz"]),
                root("/var/log", &["*.tmp"]),
            ],
            ..RawCleanup::default()
        };
        let CleanupProblems(problems) = raw.validate("cleanup").expect_err("invalid");
        assert!(problems.iter().any(|p| p.problem.contains("inside root")));
        assert!(problems.iter().any(|p| p.problem.contains("twice")));
    }
}
