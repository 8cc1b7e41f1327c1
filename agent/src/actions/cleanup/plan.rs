//! Planning a cleanup run: given what a survey listed (names, sizes, times, link counts, whether
//! a process holds the file open) and the free space of each filesystem, decide the victims.
//!
//! Pure: data and `now` in, a [`Plan`] out. Must not import the filesystem, a clock or `nix`;
//! `fs` (the executor) produces the survey and carries the plan out.

use std::collections::HashMap;
use std::ffi::OsString;
use std::time::SystemTime;

use super::config::CleanupConfig;

/// What identifies a planned file when it is acted on: the same inode with the same size and
/// modification time it had when planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
}

/// One regular file a survey found under a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFile {
    /// Index of the root in [`CleanupConfig::roots`].
    pub root: usize,
    /// The executor's handle of the directory holding the file (opaque here).
    pub dir: usize,
    /// One directory entry name (never a path).
    pub name: OsString,
    pub identity: FileIdentity,
    /// Bytes the file occupies on disk (`st_blocks * 512`): what deleting it frees.
    pub allocated_bytes: u64,
    pub nlink: u64,
    /// A process holds it open (deleting it would free nothing until closed).
    pub open: bool,
}

/// Space on one filesystem, keyed by its device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    pub dev: u64,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// What a survey found: the filesystems of the roots and the regular files under them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survey {
    pub filesystems: Vec<FsSpace>,
    pub files: Vec<ListedFile>,
}

/// What to do with one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Delete,
    /// The file is held open and its root allows truncation: truncate to 0 through a checked fd.
    Truncate,
}

/// One planned step on `Survey::files[file]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub file: usize,
    pub kind: StepKind,
    /// Bytes the step is expected to free.
    pub frees: u64,
}

/// Why a file matching a pattern was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// Younger than the root's `min_age` (or modified in the future).
    TooYoung,
    /// One of the root's `keep_newest` newest eligible files.
    KeptNewest,
    /// More than one link: deleting or truncating it could reach a name outside the root.
    HardLinked,
    /// Held open by a process and the root does not allow truncation.
    HeldOpen,
    /// Its filesystem already reaches the target (counting the steps before it).
    TargetMet,
    /// Taking it would pass `max_bytes_per_run`.
    ByteCap,
}

/// The victims, oldest first, and why the other matching files stay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub skipped: Vec<(usize, SkipReason)>,
    pub bytes_planned: u64,
    /// Bytes still missing, per filesystem, to reach the target after the planned steps.
    pub shortfall: Vec<(u64, u64)>,
}

/// Bytes that must be free on `fs` to reach `ratio`.
fn bytes_needed(fs: &FsSpace, ratio: f64) -> u64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "ratio is validated in (0, 1), so the product is within 0..=total_bytes"
    )]
    let want = (fs.total_bytes as f64 * ratio).ceil() as u64;
    want.saturating_sub(fs.free_bytes)
}

/// Decides the victims: files whose name matches a pattern of their root and that are at least
/// `min_age` old are eligible; each root keeps its `keep_newest` newest eligible files; the rest
/// go oldest first (ties broken by inode, so the plan is deterministic) while their filesystem
/// is below the target, until the next one would pass the byte cap.
pub fn plan(config: &CleanupConfig, survey: &Survey, now: SystemTime) -> Plan {
    let mut out = Plan::default();
    let mut eligible: Vec<usize> = Vec::new();
    let mut per_root: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, f) in survey.files.iter().enumerate() {
        let Some(root) = config.roots.get(f.root) else {
            continue;
        };
        if !root.matches(f.name.as_encoded_bytes()) {
            continue;
        }
        let age = now.duration_since(f.identity.mtime).unwrap_or_default();
        if age < root.min_age {
            out.skipped.push((i, SkipReason::TooYoung));
            continue;
        }
        per_root.entry(f.root).or_default().push(i);
    }
    let by_age = |files: &[ListedFile], a: &usize, b: &usize| {
        let (fa, fb) = (&files[*a], &files[*b]);
        (fa.identity.mtime, fa.identity.ino).cmp(&(fb.identity.mtime, fb.identity.ino))
    };
    let mut roots: Vec<_> = per_root.into_iter().collect();
    roots.sort_unstable_by_key(|(r, _)| *r);
    for (root, mut files) in roots {
        files.sort_unstable_by(|a, b| by_age(&survey.files, a, b));
        let keep = config.roots[root].keep_newest.min(files.len());
        let split = files.len() - keep;
        for &i in &files[split..] {
            out.skipped.push((i, SkipReason::KeptNewest));
        }
        eligible.extend_from_slice(&files[..split]);
    }
    eligible.sort_unstable_by(|a, b| by_age(&survey.files, a, b));

    let mut needed: HashMap<u64, u64> = survey
        .filesystems
        .iter()
        .map(|fs| (fs.dev, bytes_needed(fs, config.target_free_ratio)))
        .collect();
    let mut capped = false;
    for i in eligible {
        let f = &survey.files[i];
        let root = &config.roots[f.root];
        let need = needed.get(&f.identity.dev).copied().unwrap_or(0);
        let reason = if capped {
            Some(SkipReason::ByteCap)
        } else if need == 0 {
            Some(SkipReason::TargetMet)
        } else if f.nlink != 1 {
            Some(SkipReason::HardLinked)
        } else if f.open && !root.allow_truncate {
            Some(SkipReason::HeldOpen)
        } else if out.bytes_planned.saturating_add(f.allocated_bytes) > config.max_bytes_per_run {
            // Strictly oldest first: once the next file does not fit, newer ones do not jump
            // the queue.
            capped = true;
            Some(SkipReason::ByteCap)
        } else {
            None
        };
        if let Some(reason) = reason {
            out.skipped.push((i, reason));
            continue;
        }
        let kind = if f.open {
            StepKind::Truncate
        } else {
            StepKind::Delete
        };
        out.bytes_planned += f.allocated_bytes;
        needed.insert(f.identity.dev, need.saturating_sub(f.allocated_bytes));
        out.steps.push(Step {
            file: i,
            kind,
            frees: f.allocated_bytes,
        });
    }
    let mut shortfall: Vec<(u64, u64)> = needed.into_iter().filter(|(_, n)| *n > 0).collect();
    shortfall.sort_unstable();
    out.shortfall = shortfall;
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::super::config::CleanupRoot;
    use super::super::pattern::NamePattern;
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t(hours_ago: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
            - HOUR * u32::try_from(hours_ago).unwrap()
    }

    fn now() -> SystemTime {
        t(0)
    }

    fn config(keep_newest: usize, max_bytes: u64, ratio: f64) -> CleanupConfig {
        CleanupConfig {
            target_free_ratio: ratio,
            max_bytes_per_run: max_bytes,
            roots: vec![CleanupRoot {
                path: PathBuf::from("/var/log/app"),
                patterns: vec![NamePattern::parse("*.log.[0-9]*").unwrap()],
                min_age: 2 * HOUR,
                keep_newest,
                allow_truncate: false,
                allow_group_writable: false,
            }],
            on: std::collections::BTreeSet::new(),
            cooldown: None,
        }
    }

    fn file(name: &str, hours_ago: u64, bytes: u64, ino: u64) -> ListedFile {
        ListedFile {
            root: 0,
            dir: 0,
            name: name.into(),
            identity: FileIdentity {
                dev: 1,
                ino,
                size: bytes,
                mtime: t(hours_ago),
            },
            allocated_bytes: bytes,
            nlink: 1,
            open: false,
        }
    }

    /// A filesystem of 1000 bytes with `free` free.
    fn survey(free: u64, files: Vec<ListedFile>) -> Survey {
        Survey {
            filesystems: vec![FsSpace {
                dev: 1,
                total_bytes: 1000,
                free_bytes: free,
            }],
            files,
        }
    }

    fn victims(plan: &Plan, s: &Survey) -> Vec<String> {
        plan.steps
            .iter()
            .map(|st| s.files[st.file].name.to_string_lossy().into_owned())
            .collect()
    }

    fn reason(plan: &Plan, s: &Survey, name: &str) -> Option<SkipReason> {
        plan.skipped
            .iter()
            .find(|(i, _)| s.files[*i].name == *name)
            .map(|(_, r)| *r)
    }

    #[test]
    fn takes_oldest_first_until_the_target_is_met() {
        // Needs 500 - 100 = 400 bytes.
        let s = survey(
            100,
            vec![
                file("a.log.3", 10, 200, 3),
                file("a.log.1", 30, 200, 1),
                file("a.log.2", 20, 200, 2),
                file("a.log", 40, 900, 9),
            ],
        );
        let p = plan(&config(0, 10_000, 0.5), &s, now());
        assert_eq!(victims(&p, &s), ["a.log.1", "a.log.2"]);
        assert_eq!(p.bytes_planned, 400);
        assert_eq!(reason(&p, &s, "a.log.3"), Some(SkipReason::TargetMet));
        assert_eq!(
            reason(&p, &s, "a.log"),
            None,
            "not matching: not even listed"
        );
        assert!(p.shortfall.is_empty());
    }

    #[test]
    fn keeps_the_newest_eligible_files_of_each_root() {
        let s = survey(
            0,
            vec![
                file("a.log.1", 30, 10, 1),
                file("a.log.2", 20, 10, 2),
                file("a.log.3", 10, 10, 3),
            ],
        );
        let p = plan(&config(2, 10_000, 0.9), &s, now());
        assert_eq!(victims(&p, &s), ["a.log.1"]);
        assert_eq!(reason(&p, &s, "a.log.2"), Some(SkipReason::KeptNewest));
        assert_eq!(reason(&p, &s, "a.log.3"), Some(SkipReason::KeptNewest));
    }

    #[test]
    fn never_takes_files_younger_than_min_age() {
        let s = survey(
            0,
            vec![file("a.log.1", 1, 10, 1), file("a.log.2", 3, 10, 2)],
        );
        let p = plan(&config(0, 10_000, 0.9), &s, now());
        assert_eq!(victims(&p, &s), ["a.log.2"]);
        assert_eq!(reason(&p, &s, "a.log.1"), Some(SkipReason::TooYoung));
        // A file modified "in the future" is young, not ancient.
        let mut future = file("a.log.9", 0, 10, 9);
        future.identity.mtime = now() + HOUR;
        let s = survey(0, vec![future]);
        assert!(plan(&config(0, 10_000, 0.9), &s, now()).steps.is_empty());
    }

    #[test]
    fn stops_at_the_byte_cap_without_jumping_the_queue() {
        let s = survey(
            0,
            vec![
                file("a.log.1", 30, 300, 1),
                file("a.log.2", 20, 300, 2),
                file("a.log.3", 10, 10, 3),
            ],
        );
        let p = plan(&config(0, 500, 0.9), &s, now());
        assert_eq!(victims(&p, &s), ["a.log.1"]);
        assert_eq!(reason(&p, &s, "a.log.2"), Some(SkipReason::ByteCap));
        assert_eq!(reason(&p, &s, "a.log.3"), Some(SkipReason::ByteCap));
        assert_eq!(p.shortfall, [(1, 600)]);
    }

    #[test]
    fn nothing_when_the_target_is_already_met() {
        let s = survey(600, vec![file("a.log.1", 30, 300, 1)]);
        assert!(plan(&config(0, 500, 0.5), &s, now()).steps.is_empty());
    }

    #[test]
    fn hard_linked_and_open_files_are_skipped_or_truncated() {
        let mut linked = file("a.log.1", 30, 10, 1);
        linked.nlink = 2;
        let mut open = file("a.log.2", 20, 10, 2);
        open.open = true;
        let s = survey(0, vec![linked, open]);
        let mut cfg = config(0, 10_000, 0.9);
        let p = plan(&cfg, &s, now());
        assert!(p.steps.is_empty());
        assert_eq!(reason(&p, &s, "a.log.1"), Some(SkipReason::HardLinked));
        assert_eq!(reason(&p, &s, "a.log.2"), Some(SkipReason::HeldOpen));
        cfg.roots[0].allow_truncate = true;
        let p = plan(&cfg, &s, now());
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].kind, StepKind::Truncate);
        assert_eq!(reason(&p, &s, "a.log.1"), Some(SkipReason::HardLinked));
    }
}
