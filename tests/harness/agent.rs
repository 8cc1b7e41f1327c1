//! Real `interlock-agent run` processes, tmpfs mounts and demo services for the agent tests.
//!
//! An [`Agent`] owns a temp dir holding its config, log and (if the config names one there)
//! its journal; it can be stopped (SIGTERM), frozen (SIGSTOP/SIGCONT), killed and started again
//! on the same config and journal. Every wait is bounded; processes are ended by pid and mounts
//! unmounted by guards whose `Drop` also runs on panic.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::coordinator::{CertDir, agent_tls_table, binary, http_get};

/// How an agent reaches its coordinator: `url` for its `coordinator = "…"` line and `tls`, the
/// `[tls]` table of its host certificate, to append at the end of its `agent.toml`
/// (`Coordinator::link(host)` makes one; empty for an `--insecure` coordinator). Holds the CA
/// directory, so keep the link for as long as the agent runs.
#[derive(Clone, Debug)]
pub struct Link {
    pub url: String,
    pub tls: String,
    pub(crate) _ca: Option<std::sync::Arc<CertDir>>,
}

impl Link {
    /// A coordinator nobody serves: `https://` on a free loopback port, with `host`'s
    /// certificate from a CA of its own, so the agent's TLS path is the one that fails to
    /// connect.
    pub fn nowhere(host: &str) -> Self {
        let ca = CertDir::new().expect("a CA for an unreachable coordinator");
        Self {
            url: format!("https://{}", free_addr()),
            tls: agent_tls_table(&ca.host(host)),
            _ca: Some(ca),
        }
    }
}

/// A free loopback address (bound and released at once).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sends a signal by name (`TERM`, `STOP`, `CONT`, ...) to a pid this test started.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// A tmpfs (mode 0755, so a cleanup root inside is not under a world-writable directory)
/// mounted on a fresh temp dir, unmounted (lazily, so a busy mount cannot leak) on drop. Tests
/// and benchmarks share it.
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one of `size` (e.g. "16m"), or panics saying why (for tests).
    pub fn mount(size: &str) -> Self {
        Self::try_mount(size).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Mounts one of `size`, or says why not (for benchmarks).
    pub fn try_mount(size: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("interlock-tmpfs-")
            .tempdir()?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .map_err(|e| anyhow::anyhow!("run mount(8): {e}"))?;
        anyhow::ensure!(status.success(), "mount -t tmpfs failed: {status}");
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `bytes` of data into a file `fill` on the mount.
    pub fn fill(&self, bytes: usize) {
        std::fs::write(self.path().join("fill"), vec![0x5a_u8; bytes]).expect("fill tmpfs");
    }

    /// Free share of the filesystem (available / total), as cleanup counts it.
    pub fn free_ratio(&self) -> f64 {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %b"])
            .arg(self.path())
            .output()
            .expect("stat -f");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text
            .split_whitespace()
            .map(|n| n.parse::<f64>().unwrap_or(0.0));
        let (avail, total) = (it.next().unwrap_or(0.0), it.next().unwrap_or(1.0));
        avail / total
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

/// Writes `count` files of `size` bytes named `{prefix}{i}.log.1` under `dir`, modified two
/// days ago (old enough for any test's `min_age`).
pub fn old_logs(dir: &Path, prefix: &str, count: usize, size: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).expect("create log dir");
    let old = SystemTime::now() - Duration::from_secs(2 * 86_400);
    (0..count)
        .map(|i| {
            let path = dir.join(format!("{prefix}{i}.log.1"));
            let f = std::fs::File::create(&path).expect("create log");
            f.set_len(0).expect("len");
            (&f).write_all(&vec![b'x'; size]).expect("write log");
            f.set_modified(old - Duration::from_secs(i as u64))
                .expect("set mtime");
            path
        })
        .collect()
}

/// Asks a demo service to crash (`GET /crash`); it answers, then exits with status 1.
pub fn crash_demo(addr: SocketAddr) {
    let (code, _) = http_get(addr, "/crash").expect("demo service answers /crash");
    assert_eq!(code, 200, "demo service refused /crash");
}

/// Whether a demo service answers 200 on /healthz.
pub fn demo_healthy(addr: SocketAddr) -> bool {
    http_get(addr, "/healthz").is_ok_and(|(code, _)| code == 200)
}

/// The lines `pid unix_ms` a demo service's `--starts` file holds.
pub fn demo_starts(path: &Path) -> Vec<(u32, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pid, at) = l.split_once(' ')?;
            Some((pid.parse().ok()?, at.parse().ok()?))
        })
        .collect()
}

/// The journal's entries, parsed.
pub fn journal_entries(path: &Path) -> Vec<serde_json::Value> {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An `interlock-agent run` process, stopped by pid (SIGCONT, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    pub metrics: SocketAddr,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Starts an agent on the config `config(dir, metrics)` returns, where `dir` is the
    /// agent's own temp dir (for its journal, say) and `metrics` the address to put under
    /// `[metrics] listen`. Waits for its metrics endpoint.
    pub fn start(config: impl FnOnce(&Path, SocketAddr) -> String) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(
        config: impl FnOnce(&Path, SocketAddr) -> String,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("interlock-agent-")
            .tempdir()
            .expect("temp dir");
        let metrics = free_addr();
        std::fs::write(dir.path().join("agent.toml"), config(dir.path(), metrics))
            .expect("write agent.toml");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let child = spawn(dir.path(), &env);
        let agent = Self {
            child,
            metrics,
            dir,
            env,
        };
        agent.wait_for("metrics endpoint", Duration::from_secs(20), |a| {
            http_get(a.metrics, "/healthz").is_ok_and(|(code, _)| code == 200)
        });
        agent
    }

    /// Starts the agent again on the same config and dir (after it exited), with `env`.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        assert!(
            !matches!(self.child.try_wait(), Ok(None)),
            "restart: the agent is still running"
        );
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.child = spawn(self.dir.path(), &self.env);
        self.wait_for("metrics endpoint", Duration::from_secs(20), |a| {
            http_get(a.metrics, "/healthz").is_ok_and(|(code, _)| code == 200)
        });
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.metrics, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The sum of the samples of lines starting with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Polls `ok` every 100 ms; panics with the agent's log after `within`.
    pub fn wait_for(&self, what: &str, within: Duration, ok: impl Fn(&Self) -> bool) {
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

    /// The exit status once the process ended, waiting at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM and a bounded wait for a clean exit.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        signal(self.child.id(), "TERM");
        self.wait_exit(within).unwrap_or_else(|| {
            panic!(
                "agent did not exit within {within:?} of SIGTERM; log:\n{}",
                self.log()
            )
        })
    }

    pub fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }
}

fn spawn(dir: &Path, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .expect("agent log");
    let mut cmd = Command::new(binary("interlock-agent"));
    cmd.arg("run")
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start interlock-agent run")
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), "CONT");
            // SIGTERM first, so it stops the processes it supervises; then SIGKILL.
            signal(self.child.id(), "TERM");
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// Whether something accepts connections on `addr`.
pub fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
