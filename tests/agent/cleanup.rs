//! `disk_cleanup` against real files (as root): what it deletes, what it never touches (I7),
//! and the adversarial run of issue 5 test 5, where a thread swaps entries for symlinks and
//! hard links to files outside the root and renames directories out while cleanup runs.
//!
//! Mounts are tmpfs instances this file mounts and unmounts (guards unmount on panic too).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use interlock_agent::actions::cleanup::{
    self, CleanupConfig, CleanupError, CleanupReport, CleanupRoot, DryRunCleanup, FsCleanup,
    NamePattern, SkipReason, Skipped,
};
use interlock_tests::require_root;

const HOUR: Duration = Duration::from_secs(3600);
/// A target no test filesystem reaches: every eligible file goes.
const ALL: f64 = 0.999_999;

/// A tmpfs mounted on a fresh temporary directory; unmounted on drop.
struct Tmpfs {
    mount_point: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount_at(mount_point: &Path, options: &str) {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(mount_point)
            .status()
            .expect("run mount(8); install util-linux");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
    }

    fn new(options: &str) -> Self {
        require_root("mounting a tmpfs");
        let dir = tempfile::tempdir().expect("tempdir");
        let mount_point = dir.path().join("mnt");
        fs::create_dir(&mount_point).expect("mount point");
        Self::mount_at(&mount_point, options);
        fs::set_permissions(&mount_point, fs::Permissions::from_mode(0o755)).expect("chmod");
        Self {
            mount_point,
            _dir: dir,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg(&self.mount_point)
            .status();
    }
}

/// An inner mount to unmount before its parent.
struct InnerMount(PathBuf);

impl Drop for InnerMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn write_file(path: &Path, bytes: usize, hours_ago: u32) {
    let mut f = File::create(path).expect("create file");
    f.write_all(&vec![b'x'; bytes]).expect("write");
    f.set_modified(SystemTime::now() - HOUR * hours_ago)
        .expect("set mtime");
}

fn root(path: &Path, patterns: &[&str]) -> CleanupRoot {
    CleanupRoot {
        path: path.to_path_buf(),
        patterns: patterns
            .iter()
            .map(|p| NamePattern::parse(p).expect("pattern"))
            .collect(),
        min_age: HOUR,
        keep_newest: 0,
        allow_truncate: false,
        allow_group_writable: false,
    }
}

fn config(roots: Vec<CleanupRoot>, ratio: f64) -> CleanupConfig {
    CleanupConfig {
        target_free_ratio: ratio,
        max_bytes_per_run: u64::MAX,
        roots,
        on: std::collections::BTreeSet::new(),
        cooldown: None,
    }
}

fn run(cfg: &CleanupConfig) -> Result<CleanupReport, CleanupError> {
    cleanup::run(&mut FsCleanup::new(), cfg, SystemTime::now(), &mut || true)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn deletes_only_eligible_files_oldest_first_until_the_target() {
    // 1 MiB tmpfs: eight 100 KiB logs leave 224 KiB free; 50% free needs 288 KiB more, so the
    // three oldest of the seven not kept go.
    let fs_ = Tmpfs::new("size=1m");
    let r = fs_.mount_point.join("root");
    fs::create_dir(&r).expect("root");
    fs::set_permissions(&r, fs::Permissions::from_mode(0o755)).expect("chmod");
    for i in 1..=8u32 {
        write_file(&r.join(format!("app.log.{i}")), 100 * 1024, 20 - i);
    }
    write_file(&r.join("app.log"), 0, 30);
    write_file(&r.join("young.log.1"), 0, 0);
    write_file(&fs_.mount_point.join("outside.log.1"), 0, 30);
    let mut root_cfg = root(&r, &["*.log.[0-9]*"]);
    root_cfg.keep_newest = 1;
    let report = run(&config(vec![root_cfg], 0.5)).expect("cleanup runs");
    assert_eq!(
        names(&r),
        [
            "app.log",
            "app.log.4",
            "app.log.5",
            "app.log.6",
            "app.log.7",
            "app.log.8",
            "young.log.1"
        ]
    );
    assert!(fs_.mount_point.join("outside.log.1").exists());
    assert_eq!(report.files_deleted, 3, "{report:?}");
    assert_eq!(report.bytes_freed, 3 * 100 * 1024);
    assert_eq!(
        report.skipped.get(&Skipped::Plan(SkipReason::KeptNewest)),
        Some(&1)
    );
    assert_eq!(
        report.skipped.get(&Skipped::Plan(SkipReason::TooYoung)),
        Some(&1)
    );
    assert_eq!(report.races_caught, 0);
}

#[test]
fn never_follows_symlinks_nor_deletes_hard_linked_files() {
    let fs_ = Tmpfs::new("size=4m");
    let (r, outside) = (
        fs_.mount_point.join("root"),
        fs_.mount_point.join("outside"),
    );
    fs::create_dir(&r).expect("root");
    fs::create_dir(&outside).expect("outside");
    write_file(&outside.join("secret.log.1"), 4096, 30);
    write_file(&outside.join("linked.log.1"), 4096, 30);
    write_file(&outside.join("in-dir.log.1"), 4096, 30);
    symlink(outside.join("secret.log.1"), r.join("link.log.1")).expect("symlink");
    symlink(&outside, r.join("sub")).expect("dir symlink");
    fs::hard_link(outside.join("linked.log.1"), r.join("hard.log.2")).expect("hard link");
    write_file(&r.join("plain.log.3"), 4096, 30);
    let report = run(&config(vec![root(&r, &["*.log.[0-9]*"])], ALL)).expect("runs");
    assert_eq!(names(&r), ["hard.log.2", "link.log.1", "sub"]);
    assert_eq!(
        names(&outside),
        ["in-dir.log.1", "linked.log.1", "secret.log.1"]
    );
    for n in names(&outside) {
        assert_eq!(fs::metadata(outside.join(n)).expect("stat").len(), 4096);
    }
    assert_eq!(report.files_deleted, 1);
    assert_eq!(report.skipped.get(&Skipped::Symlink), Some(&2));
    assert_eq!(
        report.skipped.get(&Skipped::Plan(SkipReason::HardLinked)),
        Some(&1)
    );
}

#[test]
fn refuses_writable_roots_and_a_symlinked_root() {
    let fs_ = Tmpfs::new("size=1m");
    let r = fs_.mount_point.join("root");
    fs::create_dir(&r).expect("root");
    write_file(&r.join("a.log.1"), 10, 30);
    fs::set_permissions(&r, fs::Permissions::from_mode(0o777)).expect("chmod");
    let err = run(&config(vec![root(&r, &["*.log.[0-9]*"])], ALL)).expect_err("refused");
    assert!(matches!(err, CleanupError::WorldWritable { .. }), "{err}");
    fs::set_permissions(&r, fs::Permissions::from_mode(0o775)).expect("chmod");
    let err = run(&config(vec![root(&r, &["*.log.[0-9]*"])], ALL)).expect_err("refused");
    assert!(matches!(err, CleanupError::GroupWritable { .. }), "{err}");
    assert!(err.to_string().contains("allow_group_writable"));
    let link = fs_.mount_point.join("link");
    symlink(&r, &link).expect("symlink");
    let mut allowed = root(&link, &["*.log.[0-9]*"]);
    allowed.allow_group_writable = true;
    let err = run(&config(vec![allowed.clone()], ALL)).expect_err("refused");
    assert!(
        matches!(
            err,
            CleanupError::OpenRoot { .. } | CleanupError::NotDirectory { .. }
        ),
        "{err}"
    );
    allowed.path = r.clone();
    assert_eq!(
        run(&config(vec![allowed], ALL))
            .expect("runs")
            .files_deleted,
        1
    );
    assert!(names(&r).is_empty());
}

#[test]
fn does_not_cross_into_a_mount_inside_the_root() {
    let fs_ = Tmpfs::new("size=4m");
    let r = fs_.mount_point.join("root");
    let inner = r.join("inner");
    fs::create_dir_all(&inner).expect("dirs");
    Tmpfs::mount_at(&inner, "size=1m,mode=0755");
    let _inner = InnerMount(inner.clone());
    write_file(&inner.join("a.log.1"), 4096, 30);
    write_file(&r.join("b.log.1"), 4096, 30);
    let report = run(&config(vec![root(&r, &["*.log.[0-9]*"])], ALL)).expect("runs");
    assert_eq!(names(&inner), ["a.log.1"]);
    assert_eq!(names(&r), ["inner"]);
    assert_eq!(report.skipped.get(&Skipped::MountPoint), Some(&1));
}

#[test]
fn dry_run_touches_nothing_and_continue_ok_stops_at_once() {
    let fs_ = Tmpfs::new("size=1m");
    let r = fs_.mount_point.join("root");
    fs::create_dir(&r).expect("root");
    for i in 1..=5u32 {
        write_file(&r.join(format!("a.log.{i}")), 10, 30 + i);
    }
    let cfg = config(vec![root(&r, &["*.log.[0-9]*"])], ALL);
    let dry = cleanup::run(
        &mut DryRunCleanup::new(),
        &cfg,
        SystemTime::now(),
        &mut || true,
    )
    .expect("dry run");
    assert!(dry.dry_run);
    assert_eq!((dry.planned_deletes, dry.files_deleted), (5, 0));
    assert_eq!(names(&r).len(), 5);
    // One "yes" per root (1), per directory walked (1) and two steps, then "no".
    let mut budget = 4;
    let report = cleanup::run(&mut FsCleanup::new(), &cfg, SystemTime::now(), &mut || {
        budget -= 1;
        budget >= 0
    })
    .expect("runs");
    assert!(report.stopped_early);
    assert_eq!(report.files_deleted, 2);
    assert_eq!(
        names(&r),
        ["a.log.1", "a.log.2", "a.log.3"],
        "the oldest went first"
    );
}

/// Issue 5 test 5. A thread swaps entries of the root for symlinks and hard links to files
/// outside, holds some files open (so truncation is planned), and renames directories out of
/// the root (replacing them with symlinks) while cleanup runs over and over; at the end every
/// file outside is byte-for-byte intact.
#[test]
fn adversarial_swaps_never_reach_files_outside_the_root() {
    const SWAPS: u64 = 100_000;
    const TIME_LIMIT: Duration = Duration::from_secs(120);
    let fs_ = Tmpfs::new("size=64m");
    let base = fs_.mount_point.clone();
    let (r, outside, away) = (base.join("root"), base.join("outside"), base.join("away"));
    for d in [&r, &outside, &away] {
        fs::create_dir(d).expect("dir");
    }
    let mut sentinels = BTreeMap::new();
    for i in 0..16u32 {
        let p = outside.join(format!("victim.log.{i}"));
        let content: Vec<u8> = (0..4096u32)
            .map(|b| u8::try_from((b * 31 + i * 7) % 251).expect("< 251"))
            .collect();
        fs::write(&p, &content).expect("sentinel");
        File::options()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_modified(SystemTime::now() - 30 * HOUR))
            .expect("mtime");
        sentinels.insert(p, content);
    }
    let dirs = 4u32;
    for d in 0..dirs {
        fs::create_dir(r.join(format!("d{d}"))).expect("subdir");
    }
    let mut root_cfg = root(&r, &["*.log.[0-9]*"]);
    root_cfg.allow_truncate = true;
    let cfg = config(vec![root_cfg], ALL);

    let done = Arc::new(AtomicBool::new(false));
    let attacker = {
        let (r, outside, away, done) = (r.clone(), outside.clone(), away.clone(), done.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut swaps = 0u64;
            let mut held: Vec<File> = Vec::new();
            let mut i = 0u64;
            while swaps < SWAPS && started.elapsed() < TIME_LIMIT {
                i += 1;
                let d = r.join(format!("d{}", i % u64::from(dirs)));
                let target = outside.join(format!("victim.log.{}", i % 16));
                let name = d.join(format!("f{}.log.1", i % 8));
                let tmp = d.join(format!(".tmp{i}"));
                // A fresh, old, eligible regular file (sometimes held open)...
                // `create_new` (O_EXCL) never follows a symlink nor reuses a hard link left
                // by the previous round: the attacker must not write through them itself.
                let _ = fs::remove_file(&name);
                if let Ok(mut f) = File::options().write(true).create_new(true).open(&name) {
                    let _ = f.write_all(b"0123456789");
                    let _ = f.set_modified(SystemTime::now() - 30 * HOUR);
                    if i.is_multiple_of(4) {
                        held.push(f);
                        if held.len() > 8 {
                            held.remove(0);
                        }
                    }
                }
                // ...replaced by a symlink or a hard link to a file outside.
                let made = if i.is_multiple_of(2) {
                    symlink(&target, &tmp)
                } else {
                    fs::hard_link(&target, &tmp)
                };
                if made.is_ok() && fs::rename(&tmp, &name).is_ok() {
                    swaps += 1;
                }
                let _ = fs::remove_file(&tmp);
                if i.is_multiple_of(3) {
                    let _ = fs::remove_file(&name);
                }
                // Move a directory out of the root (cleanup may hold it open) and put a
                // symlink to the outside in its place; later, put it back.
                if i.is_multiple_of(16) {
                    let parked = away.join(format!("d{}", i % u64::from(dirs)));
                    if fs::rename(&d, &parked).is_ok() {
                        swaps += 1;
                        if symlink(&outside, &d).is_ok() {
                            swaps += 1;
                        }
                        std::thread::yield_now();
                        let _ = fs::remove_file(&d);
                        if fs::rename(&parked, &d).is_ok() {
                            swaps += 1;
                        }
                    }
                }
            }
            done.store(true, Ordering::SeqCst);
            (swaps, started.elapsed())
        })
    };

    let started = Instant::now();
    let mut total = CleanupReport::default();
    let mut runs = 0u64;
    while !done.load(Ordering::SeqCst) {
        let report = run(&cfg).expect("cleanup runs");
        runs += 1;
        total.files_deleted += report.files_deleted;
        total.files_truncated += report.files_truncated;
        total.races_caught += report.races_caught;
        total.vanished += report.vanished;
        total.moved_during_step += report.moved_during_step;
        for (k, v) in report.skipped {
            *total.skipped.entry(k).or_default() += v;
        }
    }
    let (swaps, attack_time) = attacker.join().expect("attacker thread");
    let elapsed = started.elapsed();
    for (path, content) in &sentinels {
        let now = fs::read(path).unwrap_or_else(|e| panic!("{} is gone: {e}", path.display()));
        assert_eq!(&now, content, "{} changed", path.display());
    }
    println!(
        "adversarial cleanup: {swaps} swaps in {attack_time:.2?}; {runs} cleanup runs in \
         {elapsed:.2?}; races caught {}, deleted {}, truncated {}, vanished {}, moved during \
         a step {}, skipped {:?}; {} files outside intact",
        total.races_caught,
        total.files_deleted,
        total.files_truncated,
        total.vanished,
        total.moved_during_step,
        total.skipped,
        sentinels.len()
    );
    assert!(swaps >= SWAPS, "only {swaps} swaps within {TIME_LIMIT:?}");
    assert!(total.races_caught > 0, "no race caught: {total:?}");
}
