//! Findings end to end (as root): a real `interlock-agent run` process watches problems the test
//! makes on this host (an OOM kill in a small memory cgroup, a process that keeps crashing, a
//! tmpfs filling up, a process whose memory grows, a cgroup thrashing), and the test reads what
//! the agent concluded where an operator would: the real coordinator's findings view (Operator
//! `Findings`, with host, detector, target, summary and evidence) on a real etcd, and the agent's
//! own `/metrics`. Look-alikes (a single crash, a batch job that writes then deletes, a steady
//! and a sawtooth process) must produce no finding.
//!
//! Every wait is bounded. Processes are killed by pid and reaped, mounts unmounted and cgroups
//! removed by guards whose `Drop` also runs on panic. Traffic stays on 127.0.0.1.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use interlock_proto::v1 as pb;
use interlock_tests::ADMIN;
use interlock_tests::client::operator;
use interlock_tests::coordinator::{binary, http_get};
use interlock_tests::{
    BASIC_POLICY, Coordinator, CoordinatorOptions, Etcd, fresh_prefix, require_root,
};

const PYTHON: &str = "/usr/bin/python3";
const MIB: usize = 1 << 20;

fn python() -> &'static str {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is needed by this test; install Debian's python3"
    );
    PYTHON
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

// ------------------------------------------------------------------------------- guards

/// A child process killed (by pid) and reaped on drop.
struct ChildGuard(Child);

impl ChildGuard {
    fn spawn(command: &mut Command) -> Self {
        Self(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn a test child"),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tmpfs on a fresh temp dir, unmounted on drop (lazily if busy, so it cannot leak).
struct Tmpfs {
    mount_point: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("interlock-findings-")
            .tempdir()
            .expect("temp dir");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount_point)
            .status()
            .expect("run mount(8); install util-linux");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Self {
            mount_point,
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mount_point)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .status();
        }
    }
}

/// A cgroup directory the test created; removed on drop once its processes are reaped (their
/// guards are declared later, so they drop first).
struct CgroupDir(PathBuf);

impl CgroupDir {
    fn create(path: PathBuf) -> Self {
        // A leftover of a killed earlier run would make mkdir fail.
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self(path)
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.0.join(file);
        std::fs::write(&path, value)
            .unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()));
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.0).is_err() && self.0.exists() && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The v1 memory hierarchy of this (hybrid) host, checked.
fn v1_memory_root() -> PathBuf {
    let root = PathBuf::from("/sys/fs/cgroup/memory");
    assert!(
        root.join("memory.limit_in_bytes").exists(),
        "this test needs the cgroup v1 memory controller at {}",
        root.display()
    );
    root
}

/// A symlink named `comm` to `program` in a temp dir: what runs through it has that comm
/// (the kernel takes comm from the executed file's name, `fs/exec.c`), so the test's processes
/// are told apart from everything else on the host.
struct NamedProgram {
    dir: tempfile::TempDir,
    comm: String,
}

impl NamedProgram {
    fn new(comm: &str, program: &str) -> Self {
        assert!(
            comm.len() <= 15,
            "comm {comm:?} is longer than the kernel keeps"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::os::unix::fs::symlink(program, dir.path().join(comm)).expect("symlink");
        Self {
            dir,
            comm: comm.to_owned(),
        }
    }

    fn command(&self) -> Command {
        Command::new(self.dir.path().join(&self.comm))
    }
}

/// A short name unique to this test process, within the 15 bytes of comm.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 100_000)
}

// ------------------------------------------------------------------------ agent + stack

/// An `interlock-agent run` process, stopped by pid on drop.
struct Agent {
    child: Child,
    host: String,
    metrics: SocketAddr,
    dir: tempfile::TempDir,
}

impl Agent {
    /// Starts an agent reporting to the stack's coordinator (over mutual TLS, with its host
    /// certificate); `extra` is appended to its config.
    fn start(host: &str, stack: &Stack, extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("interlock-agent-")
            .tempdir()
            .expect("temp dir");
        let metrics = free_addr();
        let link = stack.coordinator.link(host);
        let config = format!(
            "host_id = \"{host}\"\ncoordinator = \"{}\"\n[labels]\nservice = \"web\"\n\
             [metrics]\nlisten = \"{metrics}\"\n{extra}{}",
            link.url, link.tls
        );
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &config).expect("write agent.toml");
        let check = Command::new(binary("interlock-agent"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run interlock-agent check");
        assert!(
            check.status.success(),
            "the test's agent config is refused:\n{}\n{config}",
            String::from_utf8_lossy(&check.stdout)
        );
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("agent log");
        let child = Command::new(binary("interlock-agent"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start interlock-agent run");
        let agent = Self {
            child,
            host: host.to_owned(),
            metrics,
            dir,
        };
        agent.wait_for("metrics endpoint", Duration::from_secs(20), |a| {
            http_get(a.metrics, "/healthz").is_ok_and(|(code, _)| code == 200)
        });
        // The process probe is what sees exits and OOM kills; it must be loaded.
        agent.wait_for("process probe", Duration::from_secs(20), |a| {
            a.metric("interlock_agent_probe_loaded{probe=\"process\"}") == 1.0
        });
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The sum of the samples of the agent's metric lines starting with `prefix`.
    fn metric(&self, prefix: &str) -> f64 {
        http_get(self.metrics, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn findings_total(&self, detector: &str) -> f64 {
        self.metric(&format!(
            "interlock_agent_findings_total{{detector=\"{detector}\"}}"
        ))
    }

    fn wait_for(&self, what: &str, within: Duration, ok: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "agent: no {what} within {within:?}; its log:\n{}",
            self.log()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A finding as the coordinator's findings view shows it.
#[derive(Debug, Clone)]
struct Seen {
    host: String,
    detector: String,
    target: String,
    summary: String,
    evidence: serde_json::Value,
}

/// etcd and a coordinator on it; the operator's findings view.
struct Stack {
    coordinator: Coordinator,
    _etcd: Etcd,
    rt: tokio::runtime::Runtime,
}

impl Stack {
    fn start(test: &str) -> Self {
        let etcd = Etcd::start().expect("start etcd");
        let options = CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix(test), BASIC_POLICY);
        let coordinator = Coordinator::start(&options).expect("start coordinator");
        coordinator
            .wait_leader(Duration::from_secs(20))
            .expect("leader");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            coordinator,
            _etcd: etcd,
            rt,
        }
    }

    /// Operator `Findings` for one host.
    fn findings(&self, host: &str) -> Vec<Seen> {
        let reply = self.rt.block_on(async {
            let channel = self.coordinator.operator_channel(ADMIN).await;
            operator(&channel)
                .findings(pb::FindingsRequest {
                    host: host.to_owned(),
                })
                .await
        });
        let Ok(reply) = reply else {
            return Vec::new();
        };
        reply
            .into_inner()
            .findings
            .into_iter()
            .filter_map(|r| {
                let f = r.finding?;
                Some(Seen {
                    host: r.host_id,
                    detector: f.detector,
                    target: f.target,
                    summary: f.summary,
                    evidence: serde_json::from_str(&f.evidence_json)
                        .unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
    }

    /// Waits for a finding of `detector` matching `want` at the coordinator; returns it and how
    /// long after `since` it was seen there.
    fn wait_finding(
        &self,
        agent: &Agent,
        detector: &str,
        since: Instant,
        within: Duration,
        want: impl Fn(&Seen) -> bool,
    ) -> (Seen, Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(f) = self
                .findings(&agent.host)
                .into_iter()
                .find(|f| f.detector == detector && want(f))
            {
                return (f, since.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no {detector} finding at the coordinator within {within:?}; it has {:#?}\nagent log:\n{}",
            self.findings(&agent.host),
            agent.log()
        );
    }
}

fn evidence(f: &Seen, key: &str) -> f64 {
    f.evidence[key]
        .as_f64()
        .unwrap_or_else(|| panic!("evidence {key} missing in {f:?}"))
}

// --------------------------------------------------------------------------------- tests

#[test]
fn an_oom_kill_becomes_a_finding_naming_the_victim() {
    require_root("the agent's process probe and a memory cgroup");
    let stack = Stack::start("findings-oom");
    let agent = Agent::start("findings-oom", &stack, "");
    let cgroup = CgroupDir::create(v1_memory_root().join(unique("interlock-findings-oom-")));
    cgroup.write("memory.limit_in_bytes", &(32 * MIB).to_string());
    // The shell moves itself into the cgroup, then becomes a program named after this test
    // (same pid) that touches 200 MiB: far over the 32 MiB limit.
    let victim = NamedProgram::new(&unique("iloom"), python());
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} -c \"b = b'x' * (200 << 20)\"",
        cgroup.0.display(),
        victim.dir.path().join(&victim.comm).display()
    );
    let started = Instant::now();
    let child = ChildGuard::spawn(
        Command::new("sh")
            .args(["-c", &script])
            .stderr(Stdio::null()),
    );
    let pid = child.pid();
    let (f, delay) =
        stack.wait_finding(&agent, "oom_kill", started, Duration::from_secs(30), |f| {
            f.target == victim.comm
        });
    eprintln!("oom_kill finding at the coordinator {delay:?} after the victim started: {f:?}");
    assert_eq!(f.host, "findings-oom");
    assert_eq!(evidence(&f, "pid"), f64::from(pid), "{f:?}");
    assert!(evidence(&f, "anon_rss_kb") > 16.0 * 1024.0, "{f:?}");
    assert!(f.summary.contains(&victim.comm), "{}", f.summary);
    assert!(agent.findings_total("oom_kill") >= 1.0);
    drop(child);
    drop(cgroup);
}

#[test]
fn a_crash_loop_is_found_and_a_single_crash_is_not() {
    require_root("the agent's process probe");
    let stack = Stack::start("findings-crash");
    let looping = NamedProgram::new(&unique("ilcl"), "/bin/sh");
    let once = NamedProgram::new(&unique("il1x"), "/bin/sh");
    let agent = Agent::start(
        "findings-crash",
        &stack,
        &format!(
            r#"
[[watch.process]]
name = "looping"
comm = "{}"
[[watch.process]]
name = "once"
comm = "{}"
[detectors.crash_loop]
window = "30s"
max_exits = 3
cooldown = "1m"
"#,
            looping.comm, once.comm
        ),
    );

    // One crash of `once`; then `looping` is restarted as a supervisor would: exit 3, exit 3,
    // killed by SIGKILL. Each run lives ~100 ms, shorter than a poll: only the exit probe sees it.
    let status = once
        .command()
        .args(["-c", "sleep 0.1; exit 7"])
        .status()
        .expect("run once");
    assert_eq!(status.code(), Some(7));
    let started = Instant::now();
    for script in [
        "sleep 0.1; exit 3",
        "sleep 0.1; exit 3",
        "sleep 0.1; kill -9 $$",
    ] {
        let _ = looping
            .command()
            .args(["-c", script])
            .status()
            .expect("run looping");
        std::thread::sleep(Duration::from_millis(300));
    }
    let (f, delay) = stack.wait_finding(
        &agent,
        "crash_loop",
        started,
        Duration::from_secs(15),
        |f| f.target == "looping",
    );
    eprintln!("crash_loop finding {delay:?} after the first restart: {f:?}");
    assert_eq!(evidence(&f, "exits"), 3.0, "{f:?}");
    assert_eq!(evidence(&f, "signaled"), 1.0, "{f:?}");
    // Newest first: SIGKILL (128 + 9), then the two exit codes.
    assert_eq!(evidence(&f, "status.1"), 137.0, "{f:?}");
    assert_eq!(evidence(&f, "status.2"), 3.0, "{f:?}");
    assert_eq!(evidence(&f, "status.3"), 3.0, "{f:?}");
    assert!(f.summary.contains("signal 9"), "{}", f.summary);

    // The single crash was seen (logged) but is not a loop.
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("watched process exited") && l.contains("\"once\"")),
        "the single crash was not seen; log:\n{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    let all = stack.findings("findings-crash");
    assert!(
        !all.iter()
            .any(|f| f.detector == "crash_loop" && f.target == "once"),
        "a single crash made a finding: {all:#?}"
    );
    assert_eq!(agent.findings_total("crash_loop"), 1.0);
}

/// Appends `chunk` bytes to `file` every `every` until `stop` says so or `max` bytes are written.
fn steady_writer(
    file: PathBuf,
    chunk: usize,
    every: Duration,
    max: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(&file).expect("create steady file");
        let block = vec![0x5a_u8; chunk];
        let mut written = 0;
        while written + chunk <= max && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            f.write_all(&block).expect("write steady file");
            written += chunk;
            std::thread::sleep(every);
        }
        written
    })
}

#[test]
fn disk_full_and_forecast_findings_and_a_batch_job_is_not_one() {
    require_root("mounting tmpfs");
    let stack = Stack::start("findings-disk");
    let full = Tmpfs::mount("16m");
    let filling = Tmpfs::mount("16m");
    let batch = Tmpfs::mount("16m");
    let agent = Agent::start(
        "findings-disk",
        &stack,
        &format!(
            r#"
[watch]
mounts = ["{}", "{}", "{}"]
[intervals]
disk = "200ms"
[detectors.disk]
high = 0.9
low = 0.8
for = "0s"
cooldown = "1m"
[detectors.disk_forecast]
window = "6s"
min_span = "3s"
min_samples = 10
horizon = "60s"
cooldown = "1m"
"#,
            full.path().display(),
            filling.path().display(),
            batch.path().display()
        ),
    );

    // Steady filling: 64 KiB every 100 ms (about 640 KiB/s), at most 12 MiB (75 %).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let writer = steady_writer(
        filling.path().join("steady"),
        64 << 10,
        Duration::from_millis(100),
        12 * MIB,
        stop.clone(),
    );

    // A batch job at the same time: three runs of writing 6 MiB in 1 MiB steps, holding it a
    // second, deleting it.
    let batch_dir = batch.path().to_path_buf();
    let batch_job = std::thread::spawn(move || {
        for run in 0..3 {
            let path = batch_dir.join(format!("batch-{run}"));
            let mut f = std::fs::File::create(&path).expect("batch file");
            for _ in 0..6 {
                f.write_all(&vec![0xa5_u8; MIB]).expect("batch write");
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(f);
            std::thread::sleep(Duration::from_secs(1));
            std::fs::remove_file(&path).expect("batch delete");
            std::thread::sleep(Duration::from_millis(700));
        }
    });

    let (forecast, forecast_delay) = stack.wait_finding(
        &agent,
        "disk_forecast",
        started,
        Duration::from_secs(20),
        |f| Path::new(&f.target) == filling.path(),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("writer");
    eprintln!(
        "disk_forecast finding {forecast_delay:?} after the steady fill started ({written} bytes written by the end): {forecast:?}"
    );
    let ratio = evidence(&forecast, "used_ratio");
    assert!(
        ratio < 0.9,
        "the forecast came only at {ratio} used, not before the threshold"
    );
    assert!(evidence(&forecast, "eta_s") < 60.0, "{forecast:?}");
    assert!(
        evidence(&forecast, "slope_bytes_per_s") > 100_000.0,
        "{forecast:?}"
    );

    batch_job.join().expect("batch job");
    // The batch job's runs all lay inside the forecast's window by now; one more window.
    std::thread::sleep(Duration::from_secs(2));

    // Past the threshold at once.
    let fill_at = Instant::now();
    std::fs::write(full.path().join("fill"), vec![0x5a_u8; 15 * MIB]).expect("fill tmpfs");
    let (disk_full, full_delay) =
        stack.wait_finding(&agent, "disk_full", fill_at, Duration::from_secs(15), |f| {
            Path::new(&f.target) == full.path()
        });
    eprintln!("disk_full finding {full_delay:?} after the fill: {disk_full:?}");
    assert!(evidence(&disk_full, "used_ratio") >= 0.9, "{disk_full:?}");

    assert!(
        !agent.log().contains("watched mount not found"),
        "a test mount was not watched; log:\n{}",
        agent.log()
    );
    let all = stack.findings("findings-disk");
    let about_batch: Vec<_> = all
        .iter()
        .filter(|f| Path::new(&f.target) == batch.path())
        .collect();
    assert!(
        about_batch.is_empty(),
        "the batch job made findings: {about_batch:#?}"
    );
    assert!(
        !all.iter()
            .any(|f| f.detector == "disk_full" && Path::new(&f.target) == filling.path()),
        "the steady fill stopped below the threshold: {all:#?}"
    );
    assert_eq!(agent.findings_total("disk_forecast"), 1.0);
    assert_eq!(agent.findings_total("disk_full"), 1.0);
}

/// Grows by 256 KiB every 50 ms (about 5 MiB/s), for at most 60 s.
const LEAK: &str = r#"
import time
keep = []
end = time.time() + 60
while time.time() < end:
    keep.append(b"x" * (256 << 10))
    time.sleep(0.05)
"#;

/// Holds 20 MiB and does nothing else.
const STEADY: &str = r#"
import time
keep = b"x" * (20 << 20)
time.sleep(60)
"#;

/// Grows 256 KiB every 50 ms for 2 s, then frees it all, and again (a collector's sawtooth).
const SAWTOOTH: &str = r#"
import time
end = time.time() + 60
while time.time() < end:
    keep = []
    for _ in range(40):
        keep.append(b"x" * (256 << 10))
        time.sleep(0.05)
    del keep
"#;

#[test]
fn a_memory_leak_is_found_and_steady_and_sawtooth_processes_are_not() {
    require_root("the agent runtime");
    let stack = Stack::start("findings-leak");
    let leak = NamedProgram::new(&unique("illeak"), python());
    let steady = NamedProgram::new(&unique("ilsteady"), python());
    let saw = NamedProgram::new(&unique("ilsaw"), python());
    let agent = Agent::start(
        "findings-leak",
        &stack,
        &format!(
            r#"
[[watch.process]]
name = "leaky"
comm = "{}"
memory_limit = "1GiB"
[[watch.process]]
name = "steady"
comm = "{}"
memory_limit = "1GiB"
[[watch.process]]
name = "sawtooth"
comm = "{}"
memory_limit = "1GiB"
[intervals]
process = "200ms"
[detectors.memory_leak]
window = "8s"
min_span = "5s"
min_samples = 10
horizon = "10m"
cooldown = "1m"
"#,
            leak.comm, steady.comm, saw.comm
        ),
    );
    let started = Instant::now();
    let _leak = ChildGuard::spawn(leak.command().args(["-c", LEAK]));
    let _steady = ChildGuard::spawn(steady.command().args(["-c", STEADY]));
    let _saw = ChildGuard::spawn(saw.command().args(["-c", SAWTOOTH]));
    let (f, delay) = stack.wait_finding(
        &agent,
        "memory_leak",
        started,
        Duration::from_secs(30),
        |f| f.target == "leaky",
    );
    eprintln!("memory_leak finding {delay:?} after the leak started: {f:?}");
    assert_eq!(evidence(&f, "limit_bytes"), f64::from(1u32 << 30), "{f:?}");
    let slope = evidence(&f, "slope_bytes_per_s");
    assert!(
        (2e6..10e6).contains(&slope),
        "slope {slope} B/s, the leak grows about 5 MiB/s"
    );
    assert!(evidence(&f, "r2") >= 0.8, "{f:?}");

    // The look-alikes had as long, plus a few more of their windows; they were found (else
    // their silence would prove nothing).
    std::thread::sleep(Duration::from_secs(12));
    for name in ["\"steady\"", "\"sawtooth\""] {
        assert!(
            agent
                .log()
                .lines()
                .any(|l| l.contains("watched process located")
                    && l.contains(name)
                    && l.contains("Some(")),
            "{name} was never located; log:\n{}",
            agent.log()
        );
    }
    let all = stack.findings("findings-leak");
    let others: Vec<_> = all
        .iter()
        .filter(|f| f.detector == "memory_leak" && f.target != "leaky")
        .collect();
    assert!(others.is_empty(), "look-alikes made findings: {others:#?}");
    assert_eq!(agent.findings_total("memory_leak"), 1.0);
}

/// Allocates 40 MiB of anonymous memory, then writes and re-reads a 96 MiB file through a
/// mapping: in a 64 MiB memory cgroup without swap the file's pages are reclaimed and refault
/// in a loop, which the kernel counts as memory stall (the recipe of `pressure.rs`).
const THRASH: &str = r#"
import mmap, os, time
anon = bytearray(b"\x01") * (40 << 20)
with open(PATH, "wb") as f:
    for _ in range(96):
        f.write(os.urandom(1 << 20))
f = open(PATH, "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
end = time.time() + 60
while time.time() < end:
    s = 0
    for off in range(0, len(m), 4096):
        s += m[off]
"#;

#[test]
fn memory_pressure_in_a_watched_cgroup_is_a_finding() {
    require_root("creating cgroups");
    let v2_root = PathBuf::from("/sys/fs/cgroup/unified");
    let (v2_root, hybrid) = if v2_root.join("cgroup.procs").exists() {
        (v2_root, true)
    } else {
        (PathBuf::from("/sys/fs/cgroup"), false)
    };
    assert!(
        v2_root.join("cgroup.procs").exists(),
        "per-cgroup PSI needs cgroup2 mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    );
    let stack = Stack::start("findings-psi");
    let name = unique("interlock-findings-psi-");
    let v2 = CgroupDir::create(v2_root.join(&name));
    let limit = (64 * MIB).to_string();
    let v1 = if hybrid {
        let v1 = CgroupDir::create(v1_memory_root().join(&name));
        v1.write("memory.limit_in_bytes", &limit);
        Some(v1)
    } else {
        v2.write("memory.max", &limit);
        v2.write("memory.swap.max", "0");
        None
    };
    let agent = Agent::start(
        "findings-psi",
        &stack,
        &format!(
            r#"
[[watch.cgroup]]
path = "/{name}"
[intervals]
psi = "500ms"
[detectors.cgroup_psi]
high = 5.0
low = 1.0
for = "0s"
cooldown = "1m"
trigger_stall = "100ms"
trigger_window = "2s"
"#
        ),
    );
    agent.wait_for("the cgroup's PSI trigger", Duration::from_secs(10), |a| {
        a.log()
            .contains("PSI trigger installed on the watched cgroup")
    });
    let work = tempfile::tempdir().expect("temp dir");
    let program = THRASH.replace(
        "PATH",
        &format!("{:?}", work.path().join("thrash").display().to_string()),
    );
    // The shell joins both cgroups, then becomes the thrasher (same pid).
    let mut script = format!("echo $$ > {}/cgroup.procs", v2.0.display());
    if let Some(v1) = &v1 {
        script.push_str(&format!(" && echo $$ > {}/cgroup.procs", v1.0.display()));
    }
    script.push_str(&format!(" && exec {} -c '{program}'", python()));
    let started = Instant::now();
    let child = ChildGuard::spawn(Command::new("sh").args(["-c", &script]));
    let (f, delay) = stack.wait_finding(
        &agent,
        "psi_memory",
        started,
        Duration::from_secs(40),
        |f| f.target == format!("/{name}"),
    );
    eprintln!("psi_memory finding {delay:?} after the thrasher started: {f:?}");
    assert!(evidence(&f, "psi_some_avg10") >= 5.0, "{f:?}");
    assert!(agent.metric("interlock_agent_events_total{kind=\"psi_trigger\"}") >= 1.0);
    drop(child);
    drop(agent);
    drop(v1);
    drop(v2);
}

// ----------------------------------------------------------------------- flow edges → graph

impl Stack {
    /// Operator `Graph`: every edge the coordinator holds.
    fn graph(&self) -> Vec<pb::GraphEdge> {
        self.rt
            .block_on(async {
                let channel = self.coordinator.operator_channel(ADMIN).await;
                operator(&channel).graph(pb::GraphRequest {}).await
            })
            .map(|r| r.into_inner().edges)
            .unwrap_or_default()
    }
}

/// Issue test 9: a real agent's flow edges reach the coordinator and `interlock graph` shows
/// the edge, with the host's service and the connecting process.
#[test]
fn a_real_agents_flow_edges_show_in_interlock_graph() {
    require_root("the agent loads eBPF programs");
    let stack = Stack::start("graph-e2e");
    let host = unique("graph");
    let agent = Agent::start(&host, &stack, "");
    agent.wait_for("tcp probe", Duration::from_secs(20), |a| {
        a.metric("interlock_agent_probe_loaded{probe=\"tcp\"}") == 1.0
    });
    // Connections from this test process to a listener of its own, on loopback.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let remote = listener.local_addr().expect("addr");
    let started = Instant::now();
    for _ in 0..20 {
        let mut c = std::net::TcpStream::connect(remote).expect("connect");
        let (_s, _) = listener.accept().expect("accept");
        c.write_all(b"hello").expect("write");
    }
    // Flow edges are reported every 10 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let edge = loop {
        let found = stack
            .graph()
            .into_iter()
            .find(|e| e.from_host == host && e.to == remote.to_string());
        if let Some(edge) = found {
            break edge;
        }
        assert!(
            Instant::now() < deadline,
            "no edge to {remote} from {host} in the graph within 30 s; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "flow edge in the graph {:?} after the connections",
        started.elapsed()
    );
    assert_eq!(edge.from_service, "web", "the host's service label");
    assert!(edge.connects_per_s > 0.0, "{edge:?}");
    assert!(!edge.process.is_empty(), "{edge:?}");
    let out = stack
        .coordinator
        .cli(ADMIN)
        .args(["-o", "dot", "graph"])
        .output()
        .expect("run interlock graph");
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(
        dot.contains(&format!("\"web\" -> \"{remote}\"")),
        "the dot graph has the edge:\n{dot}"
    );
}
