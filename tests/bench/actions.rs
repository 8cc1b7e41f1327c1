//! `cargo xtask bench actions`: what Interlock's two green actions cost next to the tools people
//! use today, on this machine, as root, with all traffic on 127.0.0.1.
//!
//! A. Cleanup. 100,000 old `app-N.log.1` files in 40 directories on a fresh tmpfs, deleted by the
//!    agent's `disk_cleanup` executor (`actions::cleanup::run` with the real [`FsCleanup`],
//!    called in-process, every file eligible) versus `find DIR -name '*.log.1' -delete` on an
//!    identical fresh tree, alternating which goes first run by run. Building a tree is not
//!    timed. One extra run splits the executor's time into survey, plan and apply.
//! B. Restart. The demo service (`interlock-agent demo-service`) is crashed on request
//!    (`GET /crash`) and restarted by Debian's monit (its own foreground instance, `set daemon 1`,
//!    its fastest cycle) or by Interlock (a real `interlock serve` on the embedded store granting
//!    `process_restart` leases to a real `interlock-agent run` that supervises the demo),
//!    alternating session by session. Per crash: crash → the new process started (the
//!    `pid unix_ms` line it appends to its `--starts` file) and crash → `/healthz` answers 200.
//!
//! Every loop is bounded in count and time. Everything this bench starts (tmpfs mounts, monit,
//! the coordinator, the agent, the demo services) is owned by a guard that stops it by pid (or
//! unmounts it) on drop, also on panic. Prints a table for people and, as its last line, the
//! same figures as JSON. A half that cannot run says so (table and JSON); it never prints a
//! figure it did not measure.

use std::{
    fs::{DirBuilder, File},
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail, ensure};
use interlock_agent::actions::cleanup::{
    self, CleanupConfig, CleanupExecutor as _, CleanupReport, FsCleanup, RawCleanup, RawCleanupRoot,
};
use interlock_agent::actions::journal::Journal;
use interlock_tests::agent::{Tmpfs, free_addr};
use interlock_tests::coordinator::{binary, http_get};
use interlock_tests::{Coordinator, CoordinatorOptions, require_root};
use nix::{
    errno::Errno,
    sys::{
        signal::{Signal, kill},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use serde_json::{Value, json};

// ------------------------------------------------------------------------------ part A setup

/// Files per tree.
const FILES: u64 = 100_000;
/// The tree: `logs/svc-T/node-S/app-N.log.1`, files spread round-robin over the leaves.
const TOP_DIRS: usize = 10;
const SUB_DIRS: usize = 4;
/// Bytes written per file (each occupies one 4 KiB page on tmpfs).
const FILE_BYTES: usize = 200;
const PATTERN: &str = "*.log.1";
/// Files are 30 days (and N seconds) old; the root's `min_age` is one hour.
const FILE_AGE: Duration = Duration::from_secs(30 * 86_400);
const MIN_AGE: &str = "1h";
/// 100k files take ~391 MiB of pages; the tmpfs leaves room for the ballast and some slack.
const TMPFS_SIZE: &str = "512m";
/// The planner stops once the target free ratio is reached, and a tmpfs holding only the tree
/// is 100% free once it is gone. A ballast file outside the tree (no pattern matches it) keeps
/// the target out of reach until the last log file is deleted: it must exceed
/// (1 - ratio) × size = 0.5 MiB.
const TARGET_FREE_RATIO: f64 = 0.999;
const BALLAST_BYTES: usize = 2 << 20;
/// No byte cap in effect: far above the tree's size.
const MAX_BYTES_PER_RUN: u64 = 1 << 40;
/// Longest `find -delete` or one executor run may take before the run counts as failed.
const DELETE_LIMIT: Duration = Duration::from_secs(300);

// ------------------------------------------------------------------------------ part B setup

/// Crashes per supervisor session; sessions alternate monit / Interlock.
const CRASHES_PER_SESSION: usize = 3;
/// Pause after the service is healthy before the next crash: longer than Interlock's per-target
/// cooldown (1 s), plus a phase that walks through a second (see [`phase`]) so crashes do not
/// always land at the same point of monit's 1 s cycle.
const CRASH_GAP: Duration = Duration::from_millis(1_500);
/// Longest a crash may take to be followed by a healthy new process before the bench fails.
const RESTART_LIMIT: Duration = Duration::from_secs(30);
/// Longest a supervisor may take to bring the service up the first time.
const FIRST_START_LIMIT: Duration = Duration::from_secs(30);
/// How often the bench looks for the new start line and polls `/healthz` after a crash.
const POLL: Duration = Duration::from_millis(2);
/// monit's fastest cycle (`set daemon 1`: seconds between checks).
const MONIT_CYCLE_S: u64 = 1;
/// The reaper thread stops after this long whatever happens.
const REAPER_LIMIT: Duration = Duration::from_secs(3_600);

// ------------------------------------------------------------------------------- statistics

/// A series' median and spread: (median, min, max).
type Spread = (f64, f64, f64);

/// Median and spread (min, max) of a series.
fn stats(values: &[f64]) -> Spread {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}

fn fmt3((m, lo, hi): Spread, prec: usize) -> String {
    format!("{m:.prec$} [{lo:.prec$}-{hi:.prec$}]")
}

fn stats_json((median, min, max): Spread) -> Value {
    json!({ "median": median, "min": min, "max": max })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The k-th pause phase: the fractional parts of k × the golden ratio spread evenly over
/// [0, 1) s whatever the number of crashes.
fn phase(k: usize) -> Duration {
    let x = k as f64 * 0.618_033_988_749_895;
    Duration::from_secs_f64(x - x.floor())
}

// ------------------------------------------------------------------------------------ guards

/// A child this bench started directly: SIGTERM on drop, SIGKILL after `grace`, always reaped.
struct ChildGuard {
    child: Child,
    grace: Duration,
}

impl ChildGuard {
    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pids fit in i32"))
    }

    fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reaps the demo processes that end up as this process's children.
///
/// monit must start the demo through `setsid -f` (a start program that does not return blocks
/// monit's cycle for its 30 s start timeout), so each demo is an orphan. Orphans go to the
/// nearest child subreaper, else PID 1; PID 1 on these machines is not an init and reaps late,
/// which leaves the crashed demo a zombie that monit reports ("is a zombie") and does not
/// restart for a cycle or two. A production init reaps at once; so does this thread, after
/// the bench makes itself a child subreaper. It waits only for the pids it is given, never
/// for the children that `Child` handles own.
struct Reaper {
    pids: Arc<Mutex<Vec<Pid>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    fn start() -> anyhow::Result<Self> {
        nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")?;
        let pids: Arc<Mutex<Vec<Pid>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (pids, stop) = (Arc::clone(&pids), Arc::clone(&stop));
            std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < REAPER_LIMIT {
                    pids.lock().expect("reaper lock").retain(|&pid| {
                        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                            Ok(WaitStatus::StillAlive) => true,
                            Ok(_) => false,
                            // Not (yet) our child: keep it while it exists.
                            Err(Errno::ECHILD) => Path::new(&format!("/proc/{pid}")).exists(),
                            Err(_) => true,
                        }
                    });
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Ok(Self {
            pids,
            stop,
            thread: Some(thread),
        })
    }

    fn watch(&self, pid: u32) {
        if let Ok(pid) = i32::try_from(pid) {
            let mut pids = self.pids.lock().expect("reaper lock");
            let pid = Pid::from_raw(pid);
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------- part A

/// Builds the tree under `mount/logs` and the ballast beside it; returns the tree's root.
fn build_tree(mount: &Path) -> anyhow::Result<PathBuf> {
    let tree = mount.join("logs");
    let mut dirs = DirBuilder::new();
    dirs.mode(0o755);
    dirs.create(&tree)?;
    let mut leaves = Vec::with_capacity(TOP_DIRS * SUB_DIRS);
    for t in 0..TOP_DIRS {
        let top = tree.join(format!("svc-{t}"));
        dirs.create(&top)?;
        for s in 0..SUB_DIRS {
            let leaf = top.join(format!("node-{s}"));
            dirs.create(&leaf)?;
            leaves.push(leaf);
        }
    }
    let oldest = SystemTime::now() - FILE_AGE;
    let line = b"2026-01-01T00:00:00Z INFO request served in 3 ms\n";
    let body: Vec<u8> = line.iter().copied().cycle().take(FILE_BYTES).collect();
    for (i, leaf) in (0..FILES).zip(leaves.iter().cycle()) {
        let mut f = File::create(leaf.join(format!("app-{i}.log.1")))?;
        f.write_all(&body)?;
        f.set_modified(oldest - Duration::from_secs(i))?;
    }
    std::fs::write(mount.join("ballast.bin"), vec![0_u8; BALLAST_BYTES])?;
    Ok(tree)
}

/// Regular files left under `dir` whose name ends like the pattern (bounded by the tree).
fn remaining(dir: &Path) -> anyhow::Result<u64> {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if entry.file_name().to_string_lossy().ends_with(".log.1") {
                n += 1;
            }
        }
    }
    Ok(n)
}

fn cleanup_config(tree: &Path) -> anyhow::Result<CleanupConfig> {
    let path = tree.to_str().context("temp dir path is not UTF-8")?;
    Ok(RawCleanup {
        target_free_ratio: Some(TARGET_FREE_RATIO),
        max_bytes_per_run: Some(MAX_BYTES_PER_RUN),
        root: vec![RawCleanupRoot {
            path: Some(path.to_owned()),
            patterns: vec![PATTERN.to_owned()],
            min_age: Some(MIN_AGE.to_owned()),
            keep_newest: Some(0),
            ..RawCleanupRoot::default()
        }],
        ..RawCleanup::default()
    }
    .validate("cleanup")?)
}

/// One fresh tree deleted by Interlock's executor: the time of `cleanup::run` alone.
fn run_interlock_cleanup() -> anyhow::Result<Duration> {
    let tmpfs = Tmpfs::try_mount(TMPFS_SIZE)?;
    let tree = build_tree(tmpfs.path())?;
    let config = cleanup_config(&tree)?;
    let started = Instant::now();
    let report = cleanup::run(
        &mut FsCleanup::new(),
        &config,
        SystemTime::now(),
        &mut || started.elapsed() < DELETE_LIMIT,
    )?;
    let elapsed = started.elapsed();
    check_report(&report)?;
    let left = remaining(&tree)?;
    ensure!(left == 0, "{left} log files left after the executor ran");
    Ok(elapsed)
}

/// The same, with every step journaled as the agent's step gate does (a plan fsynced first,
/// then one journal line per step) in a journal on the disk under /var/tmp.
fn run_interlock_cleanup_journaled() -> anyhow::Result<Duration> {
    let tmpfs = Tmpfs::try_mount(TMPFS_SIZE)?;
    let tree = build_tree(tmpfs.path())?;
    let config = cleanup_config(&tree)?;
    let dir = tempfile::Builder::new()
        .prefix("interlock-bench-journal-")
        .tempdir_in("/var/tmp")?;
    let mut journal = Journal::open(&dir.path().join("actions.journal"))?;
    let started = Instant::now();
    journal.plan("bench", 1, "disk_cleanup", "/bench", json!({}), 0)?;
    let mut steps = 0_u64;
    let mut failed = None;
    let report = cleanup::run(
        &mut FsCleanup::new(),
        &config,
        SystemTime::now(),
        &mut || {
            steps += 1;
            if let Err(e) = journal.step(1, &format!("step {steps}"), 0) {
                failed = Some(e);
                return false;
            }
            started.elapsed() < DELETE_LIMIT
        },
    )?;
    journal.done(1, "success", 0)?;
    let elapsed = started.elapsed();
    if let Some(e) = failed {
        bail!("journaling a step failed: {e}");
    }
    check_report(&report)?;
    Ok(elapsed)
}

fn check_report(report: &CleanupReport) -> anyhow::Result<()> {
    ensure!(
        report.files_deleted == FILES
            && report.planned_deletes == FILES
            && report.errors == 0
            && report.races_caught == 0
            && !report.stopped_early,
        "the executor did not delete all {FILES} files: {report:?}"
    );
    Ok(())
}

/// One fresh tree deleted by `find -delete`: the time from spawn to exit.
fn run_find() -> anyhow::Result<Duration> {
    let tmpfs = Tmpfs::try_mount(TMPFS_SIZE)?;
    let tree = build_tree(tmpfs.path())?;
    let started = Instant::now();
    let mut child = Command::new("find")
        .arg(&tree)
        .args(["-name", PATTERN, "-delete"])
        .stdin(Stdio::null())
        .spawn()
        .context("start find")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > DELETE_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("find -delete took longer than {DELETE_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let elapsed = started.elapsed();
    ensure!(status.success(), "find -delete failed: {status}");
    let left = remaining(&tree)?;
    ensure!(left == 0, "{left} log files left after find -delete");
    Ok(elapsed)
}

/// Where the executor's time goes: survey, plan and apply timed separately on one more tree
/// (the same three calls `cleanup::run` makes).
struct Breakdown {
    survey: Duration,
    plan: Duration,
    apply: Duration,
}

fn cleanup_breakdown() -> anyhow::Result<Breakdown> {
    let tmpfs = Tmpfs::try_mount(TMPFS_SIZE)?;
    let tree = build_tree(tmpfs.path())?;
    let config = cleanup_config(&tree)?;
    let mut executor = FsCleanup::new();
    let mut go = || true;
    let t0 = Instant::now();
    let survey = executor.survey(&config, &mut go)?;
    let t1 = Instant::now();
    let plan = cleanup::plan::plan(&config, &survey, SystemTime::now());
    let t2 = Instant::now();
    let report = executor.apply(&config, &survey, &plan, &mut go);
    let t3 = Instant::now();
    check_report(&report)?;
    Ok(Breakdown {
        survey: t1 - t0,
        plan: t2 - t1,
        apply: t3 - t2,
    })
}

// ---------------------------------------------------------------------------------- part B

/// What one crash led to.
#[derive(Clone, Copy, Debug)]
struct Trial {
    /// Crash request sent → the new process's start line (its own wall-clock ms).
    restart_ms: f64,
    /// Crash request sent → the first `/healthz` 200 from the new process.
    healthy_ms: f64,
}

/// One demo service instance as a supervisor runs it: its address and its starts file.
struct Demo {
    addr: SocketAddr,
    starts: PathBuf,
}

impl Demo {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            addr: free_addr(),
            starts: dir.join("starts"),
        })
    }

    fn argv(&self, agent: &Path) -> Vec<String> {
        vec![
            agent.display().to_string(),
            "demo-service".into(),
            "--listen".into(),
            self.addr.to_string(),
            "--starts".into(),
            self.starts.display().to_string(),
        ]
    }

    /// `(pid, unix_ms)` per start so far.
    fn starts(&self) -> anyhow::Result<Vec<(u32, f64)>> {
        let text = match std::fs::read_to_string(&self.starts) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        // A line still being written has no newline yet; only whole lines count.
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| {
                let mut f = l.split_whitespace();
                let pid = f.next().and_then(|p| p.parse().ok());
                let at = f.next().and_then(|m| m.parse().ok());
                pid.zip(at)
                    .with_context(|| format!("malformed starts line {l:?}"))
            })
            .collect()
    }

    fn healthy(&self) -> bool {
        http_get(self.addr, "/healthz").is_ok_and(|(code, _)| code == 200)
    }

    /// Waits for the supervisor's first start to answer 200; `alive` says whether the
    /// supervisor is still running (it is asked on every poll).
    fn wait_first_start(
        &self,
        alive: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + FIRST_START_LIMIT;
        while Instant::now() < deadline {
            alive()?;
            if !self.starts()?.is_empty() && self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "the demo service on {} was not healthy within {FIRST_START_LIMIT:?}",
            self.addr
        )
    }

    /// Crashes the running instance and times the restart.
    fn crash_once(&self) -> anyhow::Result<Trial> {
        let before = self.starts()?;
        let (old_pid, _) = *before
            .last()
            .context("no start recorded before the crash")?;
        let sent_at = SystemTime::now();
        let sent = Instant::now();
        let (code, _) = http_get(self.addr, "/crash").context("GET /crash")?;
        ensure!(code == 200, "GET /crash answered {code}");
        while sent.elapsed() < RESTART_LIMIT {
            let starts = self.starts()?;
            // Health counts only once the new process has started, so a 200 from the old one
            // (it answers /crash before exiting) can never be taken for the restart.
            if let Some(&(pid, at_ms)) = starts.get(before.len())
                && self.healthy()
            {
                let healthy_ms = ms(sent.elapsed());
                ensure!(pid != old_pid, "the restarted demo has the old pid {pid}");
                return Ok(Trial {
                    restart_ms: at_ms - unix_ms(sent_at),
                    healthy_ms,
                });
            }
            std::thread::sleep(POLL);
        }
        bail!(
            "no healthy restart of the demo on {} within {RESTART_LIMIT:?} of the crash",
            self.addr
        )
    }

    /// `crashes` crashes, each after the gap and the next phase; `k` numbers phases across
    /// sessions.
    fn crash_series(
        &self,
        crashes: usize,
        k: &mut usize,
        alive: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<Trial>> {
        let mut trials = Vec::with_capacity(crashes);
        for _ in 0..crashes {
            std::thread::sleep(CRASH_GAP + phase(*k));
            *k += 1;
            alive()?;
            trials.push(self.crash_once()?);
        }
        Ok(trials)
    }
}

/// Stops the last demo instance of a session once its supervisor is gone (monit leaves its
/// service running when it exits; the agent stops its supervised targets, and then this finds
/// nothing to do): SIGKILL by the pid of the last start lines, after checking that the pid
/// still runs this session's demo.
struct DemoGuard<'a> {
    demo: &'a Demo,
    reaper: &'a Reaper,
}

impl Drop for DemoGuard<'_> {
    fn drop(&mut self) {
        let Ok(starts) = self.demo.starts() else {
            return;
        };
        for &(pid, _) in starts.iter().rev().take(2) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("demo-service") && cmdline.contains(&self.demo.addr.to_string()) {
                self.reaper.watch(pid);
                if let Ok(raw) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
            }
        }
    }
}

/// Whether `agent` has the `demo-service` subcommand.
fn demo_service_available(agent: &Path) -> Result<(), String> {
    match Command::new(agent)
        .args(["demo-service", "--help"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{} has no demo-service subcommand: {}",
            agent.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", agent.display())),
    }
}

// ------------------------------------------------------------------------------------ monit

fn monit_version() -> Result<String, String> {
    let out = Command::new("monit")
        .arg("-V")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "monit is not installed ({e}); `cargo xtask bench actions` installs it with apt"
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| format!("unexpected `monit -V` output: {text}"))
}

/// One monit session: its own foreground instance watching one demo service.
fn monit_session(
    agent: &Path,
    reaper: &Reaper,
    crashes: usize,
    k: &mut usize,
) -> anyhow::Result<Vec<Trial>> {
    let dir = tempfile::Builder::new()
        .prefix("interlock-bench-monit-")
        .tempdir()?;
    let demo = Demo::new(dir.path())?;
    let argv = demo.argv(agent);
    // monit splits the start program on spaces itself (no shell); refuse what it would split.
    ensure!(
        argv.iter().all(|a| !a.contains(char::is_whitespace)),
        "paths with spaces cannot go in monit's start program: {argv:?}"
    );
    let d = dir.path().display();
    // `setsid -f` forks and returns at once: monit runs a start program to completion (up to
    // its 30 s start timeout) before it checks anything again, and the demo never returns.
    let config = format!(
        "set daemon {MONIT_CYCLE_S}\n\
         set logfile {d}/monit.log\n\
         set pidfile {d}/monit.pid\n\
         set idfile {d}/monit.id\n\
         set statefile {d}/monit.state\n\
         check process demo matching \"demo-service --listen {addr}\"\n\
         \x20 start program = \"/usr/bin/setsid -f {argv}\"\n",
        addr = demo.addr,
        argv = argv.join(" ")
    );
    let path = dir.path().join("monitrc");
    std::fs::write(&path, config)?;
    // monit refuses a control file others can read.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let check = Command::new("monit")
        .arg("-c")
        .arg(&path)
        .arg("-t")
        .stdin(Stdio::null())
        .output()
        .context("run monit -t")?;
    ensure!(
        check.status.success(),
        "monit -t refused the config: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // Declared before monit, so it drops after monit has stopped (monit would start the demo
    // again otherwise).
    let _demo_guard = DemoGuard {
        demo: &demo,
        reaper,
    };
    let log = File::create(dir.path().join("monit.out"))?;
    let mut monit = ChildGuard {
        child: Command::new("monit")
            .arg("-c")
            .arg(&path)
            .arg("-I")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start monit -I")?,
        grace: Duration::from_secs(5),
    };
    let log_path = dir.path().join("monit.log");
    let mut alive = || -> anyhow::Result<()> {
        if let Some(pid) = demo.starts()?.last().map(|s| s.0) {
            reaper.watch(pid);
        }
        match monit.exited()? {
            None => Ok(()),
            Some(status) => bail!(
                "monit exited with {status}; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
    };
    demo.wait_first_start(&mut alive)?;
    let trials = demo.crash_series(crashes, k, &mut alive);
    if trials.is_err() {
        eprintln!(
            "monit log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    trials
}

// -------------------------------------------------------------------------------- Interlock

const POLICY: &str = r#"
name = "bench-actions"
version = 1

[classes.process_restart]
tier = "green"
mode = "autonomous"
trigger = "a watched process crashed"
false_positives = ["a deliberate stop during a deploy"]
reversible = true
time_to_reverse = "30s"
cap = 1
lease_ttl = "10s"
verification_window = "30s"
[classes.process_restart.budget]
fleet = { max = 10000, window = "1h" }
host = { max = 10000, window = "1h" }
"#;

/// The agent's configuration for one session: it starts the demo itself and restarts it on a
/// crash under a `process_restart` lease.
fn agent_config(
    coordinator: &str,
    session: usize,
    dir: &Path,
    demo: &Demo,
    agent: &Path,
    metrics: SocketAddr,
) -> anyhow::Result<String> {
    // JSON strings and arrays of strings are valid TOML.
    let argv = serde_json::to_string(&demo.argv(agent))?;
    let journal = serde_json::to_string(&dir.join("actions.journal").display().to_string())?;
    Ok(format!(
        r#"
host_id = "bench-actions-{session}"
coordinator = "{coordinator}"
[labels]
service = "bench-demo-{session}"
[metrics]
listen = "{metrics}"

[actions]
journal = {journal}
lease_margin = "1s"
cooldown = "1s"
retry = "500ms"
on_agent_stop = "stop"

[[restart.target]]
name = "demo"
argv = {argv}
http = "http://{addr}/healthz"
health_window = "10s"
grace = "2s"
on = ["crash"]
cooldown = "1s"
"#,
        addr = demo.addr,
    ))
}

/// Whether this agent accepts the `[actions]` / `[[restart.target]]` sections: `Err` carries
/// what `interlock-agent check` said.
fn interlock_available(agent: &Path) -> anyhow::Result<Result<(), String>> {
    let dir = tempfile::Builder::new()
        .prefix("interlock-bench-check-")
        .tempdir()?;
    let demo = Demo::new(dir.path())?;
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        agent_config(
            "http://127.0.0.1:1",
            0,
            dir.path(),
            &demo,
            agent,
            free_addr(),
        )?,
    )?;
    let out = Command::new(agent)
        .args(["check", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .context("run interlock-agent check")?;
    if out.status.success() {
        return Ok(Ok(()));
    }
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Err(format!(
        "this interlock-agent refuses the [actions]/[restart] config (the agent side of actions \
         under leases is not in this build): {}",
        said.trim().replace('\n', "; ")
    )))
}

/// What the agent's own metrics say of one session's restarts.
#[derive(Clone, Copy, Debug, Default)]
struct Leased {
    /// `process_restart` proposals the coordinator granted.
    granted: u64,
    /// Restarts the agent verified healthy and reported as successes.
    succeeded: u64,
}

/// The agent's action counters for `process_restart` at `stage`.
fn restart_actions(metrics: SocketAddr, stage: &str) -> anyhow::Result<u64> {
    let (code, text) = http_get(metrics, "/metrics")?;
    ensure!(code == 200, "the agent's GET /metrics answered {code}");
    let series =
        format!("interlock_agent_actions_total{{class=\"process_restart\",stage=\"{stage}\"}}");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Waits (bounded) until the agent has reported `crashes` successful restarts, so each crash
/// is known to have been restarted under its own granted lease.
fn wait_leased(metrics: SocketAddr, crashes: usize) -> anyhow::Result<Leased> {
    let want = u64::try_from(crashes)?;
    let deadline = Instant::now() + RESTART_LIMIT;
    loop {
        let leased = Leased {
            granted: restart_actions(metrics, "granted")?,
            succeeded: restart_actions(metrics, "success")?,
        };
        if leased.succeeded >= want || Instant::now() > deadline {
            return Ok(leased);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One Interlock session: a fresh agent (host and service named after the session) against
/// the bench's coordinator.
fn interlock_session(
    coordinator: &Coordinator,
    agent: &Path,
    reaper: &Reaper,
    session: usize,
    crashes: usize,
    k: &mut usize,
) -> anyhow::Result<(Vec<Trial>, Leased)> {
    let dir = tempfile::Builder::new()
        .prefix("interlock-bench-agent-")
        .tempdir()?;
    let demo = Demo::new(dir.path())?;
    let metrics = free_addr();
    let path = dir.path().join("agent.toml");
    let link = coordinator.link(&format!("bench-actions-{session}"));
    let config = agent_config(&link.url, session, dir.path(), &demo, agent, metrics)? + &link.tls;
    std::fs::write(&path, config)?;
    let log_path = dir.path().join("agent.log");
    let log = File::create(&log_path)?;
    // Declared before the agent, so it drops after the agent has stopped.
    let _demo_guard = DemoGuard {
        demo: &demo,
        reaper,
    };
    let mut agent = ChildGuard {
        child: Command::new(agent)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start interlock-agent run")?,
        grace: Duration::from_secs(5),
    };
    let mut alive = || -> anyhow::Result<()> {
        match agent.exited()? {
            None => Ok(()),
            Some(status) => bail!(
                "the agent exited with {status}; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
    };
    demo.wait_first_start(&mut alive)?;
    let result = demo
        .crash_series(crashes, k, &mut alive)
        .and_then(|trials| Ok((trials, wait_leased(metrics, crashes)?)));
    match &result {
        Ok((_, leased)) if leased.succeeded == u64::try_from(crashes)? => {}
        _ => eprintln!(
            "agent log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ),
    }
    result
}

// ------------------------------------------------------------------------------------- main

/// What one supervisor's side of part B produced.
enum Side {
    Measured(Vec<Trial>),
    Unavailable(String),
}

impl Side {
    fn trials(&self) -> &[Trial] {
        match self {
            Self::Measured(t) => t,
            Self::Unavailable(_) => &[],
        }
    }

    fn figures(&self) -> Option<(Spread, Spread)> {
        let t = self.trials();
        if t.is_empty() {
            return None;
        }
        Some((
            stats(&t.iter().map(|t| t.restart_ms).collect::<Vec<_>>()),
            stats(&t.iter().map(|t| t.healthy_ms).collect::<Vec<_>>()),
        ))
    }

    fn json(&self) -> Value {
        match (self, self.figures()) {
            (Self::Measured(t), Some((restart, healthy))) => json!({
                "available": true,
                "crashes": t.len(),
                "crash_to_restart_ms": stats_json(restart),
                "crash_to_healthy_ms": stats_json(healthy),
                "trials": t.iter().map(|t| json!({
                    "restart_ms": t.restart_ms, "healthy_ms": t.healthy_ms,
                })).collect::<Vec<_>>(),
            }),
            (Self::Unavailable(reason), _) => json!({ "available": false, "reason": reason }),
            (Self::Measured(_), None) => json!({ "available": false, "reason": "no crashes" }),
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one linear script: measure, then print the table and the JSON line"
)]
fn main() -> anyhow::Result<()> {
    require_root("bench actions");
    let runs: usize = env_or("INTERLOCK_BENCH_RUNS", 5).max(5);
    let crashes: usize = env_or("INTERLOCK_BENCH_CRASHES", CRASHES_PER_SESSION).max(1);
    // Before anything else starts a thread or a child: orphans of this bench come here.
    let reaper = Reaper::start()?;

    // ------------------------------------------------------------------ part A: cleanup
    eprintln!(
        "bench actions: A. {runs} alternating runs of deleting {FILES} files (Interlock's executor vs find -delete)"
    );
    let mut pairs = Vec::with_capacity(runs);
    for run in 0..runs {
        let (interlock, find) = if run % 2 == 0 {
            let i = run_interlock_cleanup()?;
            (i, run_find()?)
        } else {
            let f = run_find()?;
            (run_interlock_cleanup()?, f)
        };
        eprintln!(
            "  run {run}: interlock {:.3} s | find {:.3} s",
            interlock.as_secs_f64(),
            find.as_secs_f64()
        );
        pairs.push((interlock.as_secs_f64(), find.as_secs_f64()));
    }
    let breakdown = cleanup_breakdown()?;
    let journaled = run_interlock_cleanup_journaled()?;
    eprintln!(
        "  one more run with every step journaled: {:.3} s",
        journaled.as_secs_f64()
    );
    eprintln!(
        "  breakdown: survey {:.3} s, plan {:.3} s, apply {:.3} s",
        breakdown.survey.as_secs_f64(),
        breakdown.plan.as_secs_f64(),
        breakdown.apply.as_secs_f64()
    );

    // ------------------------------------------------------------------ part B: restart
    let agent_bin = binary("interlock-agent");
    let demo = demo_service_available(&agent_bin);
    let monit = match &demo {
        Err(e) => Err(e.clone()),
        Ok(()) => monit_version(),
    };
    let interlock = match &demo {
        Err(e) => Err(e.clone()),
        Ok(()) => interlock_available(&agent_bin)?,
    };
    if let Err(e) = &monit {
        eprintln!("bench actions: B. monit side unavailable: {e}");
    }
    if let Err(e) = &interlock {
        eprintln!("bench actions: B. Interlock side unavailable: {e}");
    }
    let coordinator = match interlock {
        Ok(()) => {
            // Mutual TLS, as deployed: the agent's lease calls go over its host certificate.
            let c = Coordinator::start(&CoordinatorOptions::embedded(
                "/interlock-bench/actions".into(),
                POLICY,
            ))?;
            c.wait_leader(Duration::from_secs(20))?;
            Ok(c)
        }
        Err(e) => Err(e),
    };
    eprintln!(
        "bench actions: B. {runs} alternating sessions of {crashes} crashes per supervisor, demo {}",
        agent_bin.display()
    );
    let (mut monit_trials, mut interlock_trials) = (Vec::new(), Vec::new());
    let mut leased = Leased::default();
    let mut k = 0;
    for session in 0..runs {
        for side in [session % 2, 1 - session % 2] {
            match (side, &monit, &coordinator) {
                (0, Ok(_), _) => {
                    let t = monit_session(&agent_bin, &reaper, crashes, &mut k)?;
                    log_session("monit", session, &t);
                    monit_trials.extend(t);
                }
                (1, _, Ok(c)) => {
                    let (t, l) =
                        interlock_session(c, &agent_bin, &reaper, session, crashes, &mut k)?;
                    log_session("interlock", session, &t);
                    interlock_trials.extend(t);
                    leased.granted += l.granted;
                    leased.succeeded += l.succeeded;
                }
                _ => {}
            }
        }
    }
    let monit_side = match &monit {
        Ok(_) => Side::Measured(monit_trials),
        Err(e) => Side::Unavailable(e.clone()),
    };
    let interlock_side = match &coordinator {
        Ok(_) => Side::Measured(interlock_trials),
        Err(e) => Side::Unavailable(e.clone()),
    };
    drop(coordinator);

    // ------------------------------------------------------------------------- figures
    let interlock_s = stats(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let find_s = stats(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let ratio = stats(&pairs.iter().map(|p| p.0 / p.1).collect::<Vec<_>>());
    let per_file_us = |s: f64| s * 1e6 / FILES as f64;
    let ratios = match (monit_side.figures(), interlock_side.figures()) {
        (Some((mr, mh)), Some((ir, ih))) => Some((ir.0 / mr.0, ih.0 / mh.0)),
        _ => None,
    };

    println!();
    println!(
        "Actions (median [min-max]; A: {runs} alternating runs, B: {runs} alternating sessions of {crashes} crashes)"
    );
    println!("{:<60} {:>30}", "figure", "value");
    let row = |name: &str, value: String| println!("{name:<60} {value:>30}");
    row(
        &format!("A. Interlock cleanup executor, {FILES} files, s"),
        fmt3(interlock_s, 3),
    );
    row(
        &format!("A. find -name '{PATTERN}' -delete, {FILES} files, s"),
        fmt3(find_s, 3),
    );
    row("A. ratio interlock/find", fmt3(ratio, 2));
    row(
        "A. per file, interlock / find, us",
        format!(
            "{:.1} / {:.1}",
            per_file_us(interlock_s.0),
            per_file_us(find_s.0)
        ),
    );
    row(
        "A. one more run, every step journaled as the agent does, s",
        format!("{:.3}", journaled.as_secs_f64()),
    );
    row(
        "A. one more run: survey / plan / apply, s",
        format!(
            "{:.3} / {:.3} / {:.3}",
            breakdown.survey.as_secs_f64(),
            breakdown.plan.as_secs_f64(),
            breakdown.apply.as_secs_f64()
        ),
    );
    for (name, side) in [("monit", &monit_side), ("interlock", &interlock_side)] {
        match side.figures() {
            Some((restart, healthy)) => {
                row(
                    &format!("B. {name}: crash -> restart issued (new start), ms"),
                    fmt3(restart, 0),
                );
                row(
                    &format!("B. {name}: crash -> healthy (/healthz 200), ms"),
                    fmt3(healthy, 0),
                );
            }
            None => row(&format!("B. {name}"), "unavailable".into()),
        }
    }
    if let Side::Measured(t) = &interlock_side {
        row(
            "B. interlock: leases granted / restarts verified (agent)",
            format!(
                "{} / {} of {} crashes",
                leased.granted,
                leased.succeeded,
                t.len()
            ),
        );
    }
    match ratios {
        Some((restart, healthy)) => {
            row(
                "B. ratio interlock/monit, crash -> restart (medians)",
                format!("{restart:.3}"),
            );
            row(
                "B. ratio interlock/monit, crash -> healthy (medians)",
                format!("{healthy:.3}"),
            );
        }
        None => row("B. ratios interlock/monit", "unavailable".into()),
    }
    println!(
        "A: a fresh {TMPFS_SIZE} tmpfs per run, {FILES} files of {FILE_BYTES} B in {} directories, all older than min_age {MIN_AGE}; \
         target_free_ratio {TARGET_FREE_RATIO} with a {} MiB ballast outside the root, so every file is planned; tree building untimed. \
         B: crash = GET /crash; restart issued = the new process's `pid unix_ms` start line; healthy = first /healthz 200 from it, polled every {} ms; \
         monit {} with `set daemon {MONIT_CYCLE_S}` and `start program = \"/usr/bin/setsid -f ...\"`; the bench reaps orphaned demos at once (child subreaper).",
        TOP_DIRS * SUB_DIRS + TOP_DIRS + 1,
        BALLAST_BYTES >> 20,
        POLL.as_millis(),
        monit.as_deref().unwrap_or("(unavailable)"),
    );
    for (name, side) in [("monit", &monit_side), ("Interlock", &interlock_side)] {
        if let Side::Unavailable(reason) = side {
            println!("B. the {name} side is unavailable: {reason}");
        }
    }

    let json = json!({
        "benchmark": "actions",
        "runs": runs,
        "cleanup": {
            "files": FILES,
            "directories": TOP_DIRS * SUB_DIRS + TOP_DIRS + 1,
            "file_bytes": FILE_BYTES,
            "tmpfs_size": TMPFS_SIZE,
            "target_free_ratio": TARGET_FREE_RATIO,
            "interlock_s": stats_json(interlock_s),
            "find_s": stats_json(find_s),
            "ratio_interlock_over_find": stats_json(ratio),
            "runs": pairs.iter().map(|p| json!({ "interlock_s": p.0, "find_s": p.1 })).collect::<Vec<_>>(),
            "journaled_run_s": journaled.as_secs_f64(),
            "breakdown_s": {
                "survey": breakdown.survey.as_secs_f64(),
                "plan": breakdown.plan.as_secs_f64(),
                "apply": breakdown.apply.as_secs_f64(),
            },
        },
        "restart": {
            "sessions": runs,
            "crashes_per_session": crashes,
            "endpoints": {
                "restart": "GET /crash sent -> the new demo process's start line (its unix ms)",
                "healthy": "GET /crash sent -> first /healthz 200 from the new process",
            },
            "monit_version": monit.as_ref().ok(),
            "monit_cycle_s": MONIT_CYCLE_S,
            "monit": monit_side.json(),
            "interlock": interlock_side.json(),
            "interlock_leases_granted": leased.granted,
            "interlock_restarts_verified": leased.succeeded,
            "ratio_interlock_over_monit": ratios.map(|(restart, healthy)| json!({
                "crash_to_restart": restart, "crash_to_healthy": healthy,
            })),
        },
    });
    drop(reaper);
    println!("{json}");
    Ok(())
}

fn log_session(name: &str, session: usize, trials: &[Trial]) {
    let list = |f: fn(&Trial) -> f64| {
        trials
            .iter()
            .map(|t| format!("{:.0}", f(t)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "  session {session} {name:<9}: crash->restart ms [{}] crash->healthy ms [{}]",
        list(|t| t.restart_ms),
        list(|t| t.healthy_ms)
    );
}
