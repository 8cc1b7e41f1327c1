//! The agent runtime as a real process (as root): `interlock-agent check` on good and bad
//! configs, `interlock-agent run` against a real coordinator on a real etcd (registration,
//! heartbeats past the host TTL, a disk finding from a real tmpfs reaching the coordinator), and
//! the same agent with no coordinator reachable (observing only, findings still local).
//!
//! Every wait is bounded; agents are stopped by pid and tmpfs mounts unmounted by guards whose
//! `Drop` also runs on panic.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use interlock_tests::coordinator::{binary, http_get};
use interlock_tests::{
    BASIC_POLICY, Coordinator, CoordinatorOptions, Etcd, fresh_prefix, require_root,
};

/// A tmpfs mounted on a fresh temp dir, unmounted (lazily, so a busy mount cannot leak) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("interlock-agent-tmpfs-")
            .tempdir()
            .expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `bytes` of data into a file on the mount.
    fn fill(&self, bytes: usize) {
        std::fs::write(self.path().join("fill"), vec![0x5a_u8; bytes]).expect("fill tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// An `interlock-agent run` process, stopped by pid (SIGTERM, then SIGKILL) on drop.
struct Agent {
    child: Child,
    metrics: SocketAddr,
    dir: tempfile::TempDir,
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

impl Agent {
    fn start(host_id: &str, coordinator: &str, mount: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("interlock-agent-")
            .tempdir()
            .expect("temp dir");
        let metrics = free_addr();
        let config = format!(
            r#"
host_id = "{host_id}"
coordinator = "{coordinator}"
[labels]
service = "web"
zone = "z1"
[metrics]
listen = "{metrics}"
[watch]
mounts = ["{mount}"]
[detectors.disk]
high = 0.5
low = 0.4
for = "0s"
cooldown = "1m"
"#,
            mount = mount.display()
        );
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, config).expect("write agent.toml");
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
            metrics,
            dir,
        };
        agent.wait_for("metrics endpoint", Duration::from_secs(20), |a| {
            http_get(a.metrics, "/healthz").is_ok_and(|(code, _)| code == 200)
        });
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        http_get(self.metrics, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The sum of the samples of lines starting with `prefix`.
    fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
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

    /// SIGTERM and a bounded wait for a clean exit.
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "agent did not exit within {within:?} of SIGTERM; log:\n{}",
            self.log()
        );
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

const FINDINGS_DISK: &str = "interlock_agent_findings_total{detector=\"disk_full\"}";

fn check(config: &Path) -> std::process::Output {
    Command::new(binary("interlock-agent"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .expect("run interlock-agent check")
}

#[test]
fn check_lists_every_problem_and_accepts_the_example() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
coordinator = "http://127.0.0.1:7400"
[labels]
zone = "z1"
[detectors.disk]
for = "five minutes"
cooldown = "soon"
"#,
    )
    .expect("write");
    let out = check(&bad);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for want in [
        "labels.service",
        "detectors.disk.for",
        "detectors.disk.cooldown",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        "coordinator = \"http://127.0.0.1:7400\"\nretries = 3\n[labels]\nservice = \"web\"\n",
    )
    .expect("write");
    let out = check(&unknown);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("unknown field `retries`"), "{text}");

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/agent.toml");
    let out = check(&example);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// `interlock hosts -o json` as the operator sees it.
fn hosts(url: &str) -> serde_json::Value {
    let out = Command::new(binary("interlock"))
        .args([
            "--coordinator",
            url,
            "--operator",
            "test",
            "-o",
            "json",
            "hosts",
        ])
        .output()
        .expect("run interlock hosts");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn host_labels(url: &str, host: &str) -> Option<serde_json::Value> {
    hosts(url)["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["host_id"] == host)
        .map(|h| h["labels"].clone())
}

#[test]
fn agent_registers_heartbeats_and_reports_a_disk_finding() {
    require_root("the agent runtime test (tmpfs mount)");
    let etcd = Etcd::start().expect("start etcd");
    let mut options =
        CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix("agent-runtime"), BASIC_POLICY);
    options.host_ttl = "3s";
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(Duration::from_secs(20))
        .expect("leader");
    let url = coordinator.url();
    let mount = Tmpfs::mount("8m");
    let mut agent = Agent::start("agent-rt-1", &url, mount.path());

    agent.wait_for("registration", Duration::from_secs(20), |_| {
        host_labels(&url, "agent-rt-1").is_some()
    });
    let labels = host_labels(&url, "agent-rt-1").expect("registered");
    assert_eq!(labels["service"], "web");
    assert_eq!(labels["zone"], "z1");
    assert_eq!(agent.metric("interlock_agent_observing_only "), 0.0);

    // Past the 3 s host TTL the registration is still there: heartbeats keep it alive.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        host_labels(&url, "agent-rt-1").is_some(),
        "the host expired despite heartbeats; agent log:\n{}",
        agent.log()
    );

    mount.fill(6 << 20);
    agent.wait_for(
        "disk_full finding in metrics",
        Duration::from_secs(15),
        |a| a.metric(FINDINGS_DISK) >= 1.0,
    );
    agent.wait_for(
        "findings at the coordinator",
        Duration::from_secs(15),
        |_| {
            coordinator
                .log()
                .lines()
                .any(|l| l.contains("findings reported") && l.contains("agent-rt-1"))
        },
    );
    assert!(agent.metric("interlock_agent_reports_total{kind=\"findings\",result=\"ok\"}") >= 1.0);

    let status = agent.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "agent exit {status}; log:\n{}",
        agent.log()
    );
}

#[test]
fn without_a_coordinator_the_agent_observes_only() {
    require_root("the agent runtime test (tmpfs mount)");
    // A port nobody listens on.
    let closed = free_addr();
    let mount = Tmpfs::mount("8m");
    mount.fill(6 << 20);
    let mut agent = Agent::start("agent-rt-2", &format!("http://{closed}"), mount.path());
    agent.wait_for("observing-only state", Duration::from_secs(15), |a| {
        a.metric("interlock_agent_observing_only ") == 1.0 && a.log().contains("observing only")
    });
    agent.wait_for("local disk finding", Duration::from_secs(15), |a| {
        a.metric(FINDINGS_DISK) >= 1.0
    });
    // Retries are bounded and logged once per state change, not per attempt.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        agent.log().matches("observing only").count(),
        1,
        "log:\n{}",
        agent.log()
    );
    assert!(
        agent.metric("interlock_agent_reports_total{kind=\"register\",result=\"failed\"}") >= 2.0
    );
    assert_eq!(
        agent.metric("interlock_agent_coordinator_link{state=\"unreachable\"}"),
        1.0
    );
    let status = agent.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "agent exit {status}; log:\n{}",
        agent.log()
    );
}
