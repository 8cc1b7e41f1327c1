//! A real `interlock serve` process on loopback, started from the workspace's own binary, over
//! mutual TLS unless a test asks for `--insecure`; and the certificates, channels, CLI commands
//! and agent links that act as one identity towards it.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use interlock_coordinator::{certs, identity::Identity};
use interlock_proto::tls::TlsFiles;
use tonic::transport::Channel;

use crate::{agent::Link, client};

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

/// A certificate authority shared by a group of coordinators (the replicas of one prefix), and
/// the host and operator certificates issued from it, each once. Made in-process with
/// `interlock_coordinator::certs` (rcgen ECDSA keys: fast enough to issue one per host).
#[derive(Debug)]
pub struct CertDir {
    path: PathBuf,
    /// Held so that a CA the harness made lives as long as any handle to it.
    _owned: Option<tempfile::TempDir>,
    /// Serialises issuing, so two tasks asking for one identity get one certificate.
    issuing: Mutex<()>,
}

impl CertDir {
    /// A new CA (and the coordinator's certificate) in a temp dir.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        let owned = tempfile::Builder::new()
            .prefix("interlock-certs-")
            .tempdir()?;
        let path = owned.path().join("certs");
        certs::init(&path, certs::DEFAULT_TRUST_DOMAIN, &[])?;
        Ok(Arc::new(Self {
            path,
            _owned: Some(owned),
            issuing: Mutex::new(()),
        }))
    }

    /// A directory a test made itself (`interlock certs init DIR`, through the real CLI).
    pub fn existing(path: &Path) -> Arc<Self> {
        Arc::new(Self {
            path: path.to_owned(),
            _owned: None,
            issuing: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files of `host`'s certificate (`spiffe://<td>/host/<host>`), issued on first use.
    pub fn host(&self, host: &str) -> TlsFiles {
        self.files(&Identity::Host(host.to_owned()))
    }

    /// The files of operator `name`'s certificate, issued on first use. Its role is the
    /// policy's business (`[access.operators]`), not the certificate's.
    pub fn operator(&self, name: &str) -> TlsFiles {
        self.files(&Identity::Operator(name.to_owned()))
    }

    fn files(&self, identity: &Identity) -> TlsFiles {
        let (sub, name) = match identity {
            Identity::Host(h) => ("hosts", h),
            Identity::Operator(o) => ("operators", o),
        };
        let files = TlsFiles {
            ca: self.path.join("ca.pem"),
            cert: self.path.join(sub).join(format!("{name}.pem")),
            key: self.path.join(sub).join(format!("{name}.key")),
        };
        let _one_at_a_time = self.issuing.lock().unwrap_or_else(|e| e.into_inner());
        if !files.cert.exists() {
            certs::issue(&self.path, identity, certs::Validity::from_now(1))
                .unwrap_or_else(|e| panic!("issue a certificate for {identity}: {e}"));
        }
        files
    }
}

/// The operator the harness grants `admin` on every mutual-TLS coordinator whose policy has no
/// `[access]` section of its own; tests that need no particular name act as this one.
pub const ADMIN: &str = "admin";

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
    /// The CA to serve mutual TLS with (`--ca/--cert/--key` from its directory). Every
    /// constructor makes a fresh one; clones share it, so the replicas of one prefix trust the
    /// same certificates. `None` serves `--insecure` (plaintext, self-asserted identities): set
    /// only through [`CoordinatorOptions::insecure`], by tests about exactly that.
    pub tls: Option<Arc<CertDir>>,
    /// Operator roles the harness appends to the policy as `[access.operators]` (mutual TLS
    /// only): [`ADMIN`] as `admin`, and whatever [`CoordinatorOptions::grant`] adds. A policy
    /// with its own `[access]` section is written as it is, and these are not added.
    pub operators: Vec<(String, String)>,
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
            tls: Some(CertDir::new().expect("a CA for the test's coordinators")),
            operators: vec![(ADMIN.to_owned(), "admin".to_owned())],
            args: Vec::new(),
        }
    }

    /// On the embedded store (a data dir in the coordinator's temp dir).
    pub fn embedded(prefix: String, policy: &str) -> Self {
        Self {
            etcd: None,
            ..Self::etcd(String::new(), prefix, policy)
        }
    }

    /// Serve `--insecure`: plaintext, identities taken at their word. Only for tests about
    /// plaintext behaviour itself; every other test runs over mutual TLS.
    pub fn insecure(mut self) -> Self {
        self.tls = None;
        self
    }

    /// Grants operator `name` the `role` (viewer, approver, operator, admin) in the policy.
    pub fn grant(mut self, name: &str, role: &str) -> Self {
        self.operators.push((name.to_owned(), role.to_owned()));
        self
    }

    /// The policy text the coordinator is started with: the test's, plus the harness's
    /// `[access.operators]` unless the test wrote an `[access]` section itself.
    fn policy_text(&self) -> String {
        let has_access = self
            .policy
            .lines()
            .any(|l| l.trim_start().starts_with("[access"));
        if self.tls.is_none() || has_access {
            return self.policy.clone();
        }
        let mut text = self.policy.clone();
        text.push_str("\n# Appended by the test harness: who may do what over mutual TLS.\n");
        text.push_str("[access.operators]\n");
        let mut seen = std::collections::BTreeSet::new();
        // A later grant of the same name wins, as the test asked last.
        for (name, role) in self.operators.iter().rev() {
            if seen.insert(name) {
                text.push_str(&format!("{name} = \"{role}\"\n"));
            }
        }
        text
    }
}

/// A running coordinator. Dropping it kills the process (by its pid).
#[derive(Debug)]
pub struct Coordinator {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    dir: tempfile::TempDir,
    /// The CA it serves mutual TLS with; `None` when `--insecure`.
    certs: Option<Arc<CertDir>>,
    /// One connection per identity, made on first use (`operator_channel`, `host_channel`).
    channels: Mutex<HashMap<String, Channel>>,
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
        std::fs::write(&policy, options.policy_text())?;
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
                let certs = certs.path();
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
            certs: options.tls.clone(),
            channels: Mutex::new(HashMap::new()),
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

    /// The gRPC address: `https://` over mutual TLS, `http://` when `--insecure`.
    pub fn url(&self) -> String {
        match self.certs {
            Some(_) => format!("https://{}", self.grpc),
            None => format!("http://{}", self.grpc),
        }
    }

    /// The CA this coordinator trusts (panics on an `--insecure` one: a test that asks for a
    /// certificate there is confused about what it tests).
    pub fn certs(&self) -> &CertDir {
        self.certs
            .as_deref()
            .expect("this coordinator runs --insecure: it has no CA to issue certificates from")
    }

    /// The certificate files of `host`, from this coordinator's CA.
    pub fn host_files(&self, host: &str) -> TlsFiles {
        self.certs().host(host)
    }

    /// The certificate files of operator `name`, from this coordinator's CA.
    pub fn operator_files(&self, name: &str) -> TlsFiles {
        self.certs().operator(name)
    }

    /// A channel presenting operator `name`'s certificate (its role is the policy's:
    /// [`CoordinatorOptions::grant`]). Made once per name and reused.
    pub async fn operator_channel(&self, name: &str) -> Channel {
        let files = self.operator_files(name);
        self.cached_channel(format!("operator:{name}"), &files)
            .await
    }

    /// A channel presenting `host`'s certificate: the agent API acts for that host only.
    /// Made once per host and reused.
    pub async fn host_channel(&self, host: &str) -> Channel {
        let files = self.host_files(host);
        self.cached_channel(format!("host:{host}"), &files).await
    }

    async fn cached_channel(&self, key: String, files: &TlsFiles) -> Channel {
        if let Some(c) = self.lock_channels().get(&key) {
            return c.clone();
        }
        // Connected outside the lock; two tasks racing for one identity both connect and the
        // first one stored wins, which is harmless.
        let made = client::channel(&self.url(), files).await;
        self.lock_channels().entry(key).or_insert(made).clone()
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The real `interlock` CLI pointed at this coordinator as operator `name`: its certificate
    /// through `INTERLOCK_CA/CERT/KEY` over mutual TLS; `--operator NAME` when `--insecure`.
    pub fn cli(&self, name: &str) -> Command {
        match &self.certs {
            Some(certs) => self.cli_with(&certs.operator(name)),
            None => {
                let mut cmd = Command::new(binary("interlock"));
                cmd.args(["--coordinator", &self.url(), "--operator", name])
                    .env_remove("INTERLOCK_CA")
                    .env_remove("INTERLOCK_CERT")
                    .env_remove("INTERLOCK_KEY");
                cmd
            }
        }
    }

    /// The `interlock` CLI as `host` (the `lease` commands speak the agent API, which acts
    /// only for the host of the certificate presented).
    pub fn host_cli(&self, host: &str) -> Command {
        self.cli_with(&self.host_files(host))
    }

    fn cli_with(&self, files: &TlsFiles) -> Command {
        let mut cmd = Command::new(binary("interlock"));
        cmd.args(["--coordinator", &self.url()])
            .env("INTERLOCK_CA", &files.ca)
            .env("INTERLOCK_CERT", &files.cert)
            .env("INTERLOCK_KEY", &files.key)
            .env_remove("INTERLOCK_OPERATOR");
        cmd
    }

    /// How agent `host` reaches this coordinator: the URL for its `coordinator =` and the
    /// `[tls]` table with its certificate from this coordinator's CA (empty when `--insecure`).
    pub fn link(&self, host: &str) -> Link {
        Link {
            url: self.url(),
            tls: match &self.certs {
                Some(certs) => agent_tls_table(&certs.host(host)),
                None => String::new(),
            },
            _ca: self.certs.clone(),
        }
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

/// `[tls]` for an `agent.toml` naming these files (TOML basic strings: the paths are quoted
/// with Rust's escapes, which TOML reads the same for paths of printable characters).
pub fn agent_tls_table(files: &TlsFiles) -> String {
    format!(
        "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        files.ca.display().to_string(),
        files.cert.display().to_string(),
        files.key.display().to_string()
    )
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
