//! A real etcd server on 127.0.0.1 with ephemeral ports and a temporary data directory.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// How long a fresh etcd may take to report healthy (it usually takes well under a second).
const HEALTHY_WITHIN: Duration = Duration::from_secs(15);

/// A running etcd. Dropping it kills the process (by its pid) and removes its data directory.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    client: SocketAddr,
    peer: SocketAddr,
    data_dir: tempfile::TempDir,
    tls: Option<EtcdTls>,
}

/// TLS for etcd's client URL, with client certificates required (`--client-cert-auth`): the
/// CA that signs clients, and the server's certificate and key (`interlock certs issue
/// etcd-server`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Etcd {
    /// Path of the etcd binary: `$INTERLOCK_ETCD_BIN`, or Debian's `/usr/bin/etcd`.
    pub fn binary() -> PathBuf {
        std::env::var_os("INTERLOCK_ETCD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
    }

    /// Starts etcd and waits until it reports healthy. Fails (never skips) when etcd is not
    /// installed, naming the command that installs it.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// Starts etcd serving TLS on its client URL and requiring client certificates.
    pub fn start_tls(tls: EtcdTls) -> anyhow::Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> anyhow::Result<Self> {
        let binary = Self::binary();
        if !binary.exists() {
            bail!(
                "etcd not found at {}: run `cargo xtask setup` (installs Debian's etcd-server)",
                binary.display()
            );
        }
        // A port picked by binding :0 can be taken by someone else before etcd binds it;
        // try a few times instead of failing the test on that race.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::start_once(&binary, tls.clone()) {
                Ok(etcd) => return Ok(etcd),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn start_once(binary: &Path, tls: Option<EtcdTls>) -> anyhow::Result<Self> {
        let client = free_port()?;
        let peer = free_port()?;
        let data_dir = tempfile::Builder::new()
            .prefix("interlock-etcd-")
            .tempdir()?;
        let child = spawn(binary, client, peer, data_dir.path(), tls.as_ref())?;
        let mut etcd = Self {
            child,
            client,
            peer,
            data_dir,
            tls,
        };
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    /// SIGKILLs the server (a crash, not a shutdown) and waits until it is gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same ports and data directory (after `kill9`).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn(
            &Self::binary(),
            self.client,
            self.peer,
            self.data_dir.path(),
            self.tls.as_ref(),
        )?;
        self.wait_healthy()
    }
}

fn spawn(
    binary: &Path,
    client: SocketAddr,
    peer: SocketAddr,
    dir: &Path,
    tls: Option<&EtcdTls>,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client_url = format!("{scheme}://{client}");
    let peer_url = format!("http://{peer}");
    let mut command = Command::new(binary);
    if let Some(t) = tls {
        command
            .arg(format!("--cert-file={}", t.cert.display()))
            .arg(format!("--key-file={}", t.key.display()))
            .arg(format!("--trusted-ca-file={}", t.ca.display()))
            .arg("--client-cert-auth");
    }
    command
        .arg("--name=test")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=test={peer_url}"))
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

impl Etcd {
    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "etcd exited with {status} before becoming healthy; its log:\n{}",
                    self.log()
                );
            }
            let healthy = match &self.tls {
                None => health(self.client).unwrap_or(false),
                Some(tls) => self.health_tls(tls),
            };
            if healthy {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "etcd did not become healthy within {HEALTHY_WITHIN:?}; its log:\n{}",
            self.log()
        )
    }

    /// `etcdctl endpoint health` over TLS, presenting the server's own certificate (it is
    /// also a client certificate signed by the CA; good until authentication is enabled).
    fn health_tls(&self, tls: &EtcdTls) -> bool {
        self.etcdctl(&tls.cert, &tls.key, &["endpoint", "health"])
            .is_ok_and(|o| o.status.success())
    }

    /// Runs `etcdctl` against this etcd (over TLS with `cert`/`key` when it serves TLS).
    pub fn etcdctl(
        &self,
        cert: &Path,
        key: &Path,
        args: &[&str],
    ) -> std::io::Result<std::process::Output> {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--command-timeout=3s");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", cert.display()))
                .arg(format!("--key={}", key.display()));
        }
        command.args(args).stdin(Stdio::null()).output()
    }

    /// Client URL, e.g. `http://127.0.0.1:34567` (`https://` when it serves TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    /// Process id of the etcd server (for fault tests that stop or kill it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Ends only the process this handle started, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// `GET /health` over a plain socket: `{"health":"true"}` once etcd has a leader.
fn health(addr: SocketAddr) -> anyhow::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body.contains("\"health\":\"true\""))
}
