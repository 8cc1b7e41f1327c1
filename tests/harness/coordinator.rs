//! A real `interlock serve` process on loopback, started from the workspace's own binary.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A policy that tests can start from: one green class, autonomous, generous budgets.
pub const BASIC_POLICY: &str = r#"
name = "test"
version = 1

[classes.disk_cleanup]
tier = "green"
mode = "autonomous"
trigger = "disk used above 90%"
false_positives = ["a batch job that writes then deletes"]
reversible = false
time_to_reverse = "none"
cap = 3
lease_ttl = "5s"
verification_window = "30s"
[classes.disk_cleanup.budget]
fleet = { max = 100000, window = "1h" }
host = { max = 100000, window = "1h" }
"#;

/// Path of a workspace binary, building it once per test run if needed (cargo does not build
/// a dependency's binaries for an integration test of another package).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = target_dir();
    let result = BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--bins",
            "-p",
            "interlock-coordinator",
            "-p",
            "interlock-agent",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(workspace_root())
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("cargo build --bins failed with {status}"))
        }
    });
    if let Err(e) = result {
        panic!("building the binaries for the tests: {e}");
    }
    dir.join(name)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// `target/<profile>` of the running binary: a test lives in `target/<profile>/deps`, a
/// benchmark binary in `target/<profile>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("the binary has a directory");
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Runs the real `interlock certs ARGS…` (init, issue), panicking with its stderr on failure.
pub fn certs_cli(args: &[&str]) {
    let out = Command::new(binary("interlock"))
        .arg("certs")
        .args(args)
        .output()
        .expect("run interlock certs");
    assert!(
        out.status.success(),
        "interlock certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How to start a coordinator.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    /// etcd endpoint; `None` for the embedded store.
    pub etcd: Option<String>,
    pub prefix: String,
    pub policy: String,
    pub host_ttl: &'static str,
    pub election_ttl: &'static str,
    pub audit_retention: Option<u64>,
    pub env: Vec<(String, String)>,
    /// A certificate directory from `interlock certs init` to serve mutual TLS with; `None`
    /// serves `--insecure` (self-asserted identities).
    pub tls: Option<PathBuf>,
    /// More `interlock serve` flags.
    pub args: Vec<String>,
}

impl CoordinatorOptions {
    pub fn etcd(endpoint: String, prefix: String, policy: &str) -> Self {
        Self {
            etcd: Some(endpoint),
            prefix,
            policy: policy.to_owned(),
            host_ttl: "10s",
            // Long enough that a loaded CI machine does not depose a healthy leader; the
            // failover tests set 2 s to measure failover.
            election_ttl: "5s",
            audit_retention: None,
            env: Vec::new(),
            tls: None,
            args: Vec::new(),
        }
    }
}

/// A running coordinator. Dropping it kills the process (by its pid).
#[derive(Debug)]
pub struct Coordinator {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    dir: tempfile::TempDir,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Coordinator {
    pub fn start(options: &CoordinatorOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("interlock-coord-")
            .tempdir()?;
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, &options.policy)?;
        let grpc = free_addr()?;
        let http = free_addr()?;
        let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
        let mut cmd = Command::new(binary("interlock"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&policy)
            .arg("--prefix")
            .arg(&options.prefix)
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--metrics-listen")
            .arg(http.to_string())
            .arg("--host-ttl")
            .arg(options.host_ttl)
            .arg("--election-ttl")
            .arg(options.election_ttl)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        match &options.etcd {
            Some(e) => {
                cmd.arg("--etcd").arg(e);
            }
            None => {
                cmd.arg("--data-dir").arg(dir.path().join("data"));
            }
        }
        if let Some(n) = options.audit_retention {
            cmd.arg("--audit-retention").arg(n.to_string());
        }
        match &options.tls {
            Some(certs) => {
                cmd.arg("--ca")
                    .arg(certs.join("ca.pem"))
                    .arg("--cert")
                    .arg(certs.join("coordinator.pem"))
                    .arg("--key")
                    .arg(certs.join("coordinator.key"));
            }
            None => {
                cmd.arg("--insecure");
            }
        }
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        cmd.args(&options.args);
        let child = cmd.spawn().context("starting interlock serve")?;
        let mut c = Self {
            child,
            grpc,
            http,
            dir,
        };
        c.wait_serving()?;
        Ok(c)
    }

    fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "interlock serve exited with {status}; its log:\n{}",
                    self.log()
                );
            }
            if http_get(self.http, "/healthz").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "interlock serve did not come up within 20 s; its log:\n{}",
            self.log()
        )
    }

    /// Waits until this replica reports itself the leader (`/readyz` says so).
    pub fn wait_leader(&self, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if let Ok((200, body)) = http_get(self.http, "/readyz")
                && body.contains("leader")
                && !body.contains("follower")
            {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("not leader within {within:?}; log:\n{}", self.log())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The gRPC address as an `https://` URL (for a coordinator started with `tls`).
    pub fn tls_url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The Prometheus text exposition.
    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.http, "/metrics")?.1)
    }

    /// The value of one sample line (`name{labels} value`), 0 when absent.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.child.id());
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit status.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "did not exit within {within:?} after SIGTERM; log:\n{}",
            self.log()
        )
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // SIGCONT first: a stopped process cannot die of SIGKILL until continued on some kernels'
        // accounting, and a stopped child would otherwise linger.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET against loopback: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    // One write: a request split over segments can leave bytes unread by a server that
    // answers and exits (the demo service's /crash), turning its close into a reset.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}
