//! `cargo xtask run [--once]`: Interlock on this host, the whole loop visible.
//!
//! Starts the coordinator on the embedded store with `deploy/quickstart/policy.toml`, mounts a
//! small demo disk (tmpfs) filled with old rotated logs, writes the agent config from
//! `deploy/quickstart/agent.toml` and starts the agent, which supervises a demo service. It
//! then prints findings and audit records (grants, outcomes) as they appear. `--once` also
//! crashes the demo service (`GET /crash`) and exits 0 as soon as the audit holds a grant and
//! a verified (`success`) outcome under the same token; it fails after a bounded wait.
//!
//! The state lives in `target/quickstart` and is fresh on every run (an earlier run's audit
//! would otherwise answer `--once` at once). xtask depends only on `anyhow`, so it reads the
//! CLI's text output (columns) rather than JSON, and ignores SIGINT through a two-line libc
//! declaration so Ctrl-C reaches the agent and coordinator and this task still cleans up.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};

use crate::{describe, root};

const COORDINATOR: &str = "https://127.0.0.1:7400";
const DEMO: &str = "127.0.0.1:7410";
/// How long `--once` waits for a verified outcome.
const ONCE_TIMEOUT: Duration = Duration::from_secs(180);
/// Demo disk size and what is written on it: 24 old 1 MiB logs fill a 32 MiB tmpfs to 75%.
const DEMO_DISK: &str = "size=32m,mode=0755";
const DEMO_LOGS: usize = 24;

unsafe extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

/// Ignores SIGINT in this process, so Ctrl-C stops the agent and coordinator (which handle it)
/// while this task lives on to unmount the demo disk.
fn ignore_sigint() {
    const SIGINT: i32 = 2;
    const SIG_IGN: usize = 1;
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory-safety preconditions.
    unsafe {
        signal(SIGINT, SIG_IGN);
    }
}

/// Processes this task started, ended by pid when it returns (also on error).
struct Started {
    children: Vec<(&'static str, Child)>,
    mount: Option<PathBuf>,
}

impl Drop for Started {
    fn drop(&mut self) {
        // The agent first (SIGTERM: it stops its demo service and releases its lease).
        for (name, child) in self.children.iter_mut().rev() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(15);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if matches!(child.try_wait(), Ok(None)) {
                    eprintln!("xtask: {name} did not stop within 15 s of SIGTERM; killing it");
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
        if let Some(mount) = &self.mount {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
    }
}

pub fn run(bin: &Path, once: bool) -> anyhow::Result<()> {
    let state = root().join("target/quickstart");
    let disk = state.join("demo-disk");
    // A mount left by an interrupted run is removed before the state is wiped.
    let _ = Command::new("umount")
        .arg("-l")
        .arg(&disk)
        .stderr(Stdio::null())
        .status();
    match std::fs::remove_dir_all(&state) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot reset {}", state.display())),
    }
    std::fs::create_dir_all(&disk)?;
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", DEMO_DISK, "interlock-demo"])
        .arg(&disk)
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!(
            "mounting the demo disk on {} failed: {status}",
            disk.display()
        );
    }
    let mut started = Started {
        children: Vec::new(),
        mount: Some(disk.clone()),
    };
    fill_demo_disk(&disk.join("logs"))?;
    let template = std::fs::read_to_string(root().join("deploy/quickstart/agent.toml"))?;
    let agent_config = state.join("agent.toml");
    std::fs::write(
        &agent_config,
        template
            .replace("@STATE@", &state.display().to_string())
            .replace(
                "@AGENT@",
                &bin.join("interlock-agent").display().to_string(),
            ),
    )?;
    // The secure configuration is the first one a new user runs: a CA of the quickstart's own,
    // a certificate for the coordinator, the agent (host `quickstart`) and the operator
    // `quickstart` (admin in deploy/quickstart/policy.toml), keys 0600.
    let certs = state.join("certs");
    let certs_s = certs.display().to_string();
    for args in [
        vec!["certs", "init", certs_s.as_str()],
        vec![
            "certs",
            "issue",
            "host",
            "quickstart",
            "--dir",
            certs_s.as_str(),
        ],
        vec![
            "certs",
            "issue",
            "operator",
            "quickstart",
            "--dir",
            certs_s.as_str(),
            "--role",
            "admin",
        ],
    ] {
        let out = Command::new(bin.join("interlock"))
            .args(&args)
            .output()
            .context("running interlock certs")?;
        if !out.status.success() {
            bail!(
                "interlock {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    ignore_sigint();

    let log = |name: &str| -> anyhow::Result<Stdio> {
        Ok(Stdio::from(std::fs::File::create(state.join(name))?))
    };
    let mut coordinator = Command::new(bin.join("interlock"));
    coordinator
        .args(["serve", "--listen", "127.0.0.1:7400", "--config"])
        .arg(root().join("deploy/quickstart/policy.toml"));
    let coordinator = tls_args(&mut coordinator, &certs, "coordinator")
        .arg("--data-dir")
        .arg(state.join("store"))
        .stdout(log("coordinator.log")?)
        .stderr(log("coordinator.log")?)
        .spawn()
        .context("starting the coordinator")?;
    started.children.push(("coordinator", coordinator));
    wait_for("the coordinator", Duration::from_secs(15), || {
        cli(bin, &certs, &["status"]).is_ok()
    })?;
    println!("{}", cli(bin, &certs, &["status"])?);
    let agent = Command::new(bin.join("interlock-agent"))
        .args(["run", "--config"])
        .arg(&agent_config)
        .env("NO_COLOR", "1")
        .stdout(log("agent.log")?)
        .stderr(log("agent.log")?)
        .spawn()
        .context("starting the agent")?;
    started.children.push(("agent", agent));
    println!(
        "quickstart: coordinator on {COORDINATOR} (embedded store), agent `quickstart` supervising \
         the demo service on http://{DEMO} and watching the demo disk {} (75% full of old logs).\n\
         logs: {}/agent.log, coordinator.log\n\
         mutual TLS with the quickstart's own CA in {certs_s}; to use the CLI as operator `quickstart` (admin):\n\
         \x20 export INTERLOCK_COORDINATOR={COORDINATOR} INTERLOCK_CA={certs_s}/ca.pem \\\n\
         \x20        INTERLOCK_CERT={certs_s}/operators/quickstart.pem INTERLOCK_KEY={certs_s}/operators/quickstart.key\n\
         try: curl http://{DEMO}/crash   ·   target/debug/interlock leases | audit | findings | status\n\
         Ctrl-C stops.\n",
        disk.display(),
        state.display()
    );
    let began = Instant::now();
    let mut printed_audit = 0_u64;
    let mut printed_findings = BTreeSet::new();
    let mut crashed = false;
    // Bounded by ONCE_TIMEOUT with --once; otherwise until the agent exits (Ctrl-C).
    loop {
        if let Some((_, agent)) = started.children.iter_mut().find(|(n, _)| *n == "agent")
            && let Some(status) = agent.try_wait()?
        {
            if once {
                bail!(
                    "the agent exited ({status}) before a verified outcome; see {}/agent.log",
                    state.display()
                );
            }
            println!("quickstart: the agent stopped ({status})");
            return Ok(());
        }
        print_findings(bin, &certs, &mut printed_findings);
        let verified = print_audit(bin, &certs, &mut printed_audit);
        if once {
            if let Some(token) = verified {
                println!(
                    "quickstart: finding → lease → verified outcome under token {token} in {:.1} s",
                    began.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if !crashed && http_status(DEMO, "/healthz") == Some(200) {
                http_status(DEMO, "/crash");
                println!("quickstart: crashed the demo service (GET /crash)");
                crashed = true;
            }
            if began.elapsed() > ONCE_TIMEOUT {
                bail!(
                    "no verified outcome in the audit within {ONCE_TIMEOUT:?}; see {}/agent.log",
                    state.display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Old rotated logs: eligible for cleanup (older than the root's min_age).
fn fill_demo_disk(logs: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(logs)?;
    let old = SystemTime::now() - Duration::from_secs(3 * 86_400);
    let chunk = vec![b'.'; 1 << 20];
    for i in 0..DEMO_LOGS {
        let path = logs.join(format!("app-{i:02}.log.1"));
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&chunk)?;
        f.set_modified(old + Duration::from_secs(i as u64 * 60))?;
    }
    Ok(())
}

/// `--ca --cert --key` for the identity whose files are `<certs>/<who>.pem|.key`.
fn tls_args<'a>(cmd: &'a mut Command, certs: &Path, who: &str) -> &'a mut Command {
    cmd.arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join(format!("{who}.pem")))
        .arg("--key")
        .arg(certs.join(format!("{who}.key")))
}

/// Runs the `interlock` CLI against the quickstart's coordinator; its stdout on success.
fn cli(bin: &Path, certs: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin.join("interlock"));
    cmd.args(["--coordinator", COORDINATOR]);
    tls_args(&mut cmd, certs, "operators/quickstart").args(args);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(&cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            describe(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(what: &str, within: Duration, ok: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not answer within {within:?}")
}

/// Prints findings not printed yet (keyed by host, detector and target).
fn print_findings(bin: &Path, certs: &Path, printed: &mut BTreeSet<String>) {
    let Ok(text) = cli(bin, certs, &["findings"]) else {
        return;
    };
    for line in text.lines().skip(1) {
        let key: Vec<&str> = line.split_whitespace().take(3).collect();
        if key.len() == 3 && printed.insert(key.join(" ")) {
            println!("finding  {line}");
        }
    }
}

/// Prints audit records after `printed` (by seq); returns the token of a grant whose verified
/// (`success`) outcome is in the audit.
fn print_audit(bin: &Path, certs: &Path, printed: &mut u64) -> Option<u64> {
    let text = cli(bin, certs, &["audit"]).ok()?;
    let mut grants = BTreeSet::new();
    let mut verified = None;
    for line in text.lines() {
        // SEQ TIME KIND OWNER CLASS HOST TARGET TOKEN REASON
        let cols: Vec<&str> = line.split_whitespace().collect();
        let Some(seq) = cols.first().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if seq > *printed {
            println!("audit    {line}");
            *printed = seq;
        }
        let token = cols.get(7).and_then(|t| t.parse::<u64>().ok());
        match (cols.get(2), token) {
            (Some(&"grant"), Some(t)) => {
                grants.insert(t);
            }
            (Some(&"outcome"), Some(t))
                if cols.get(8) == Some(&"success") && grants.contains(&t) =>
            {
                verified = Some(t);
            }
            _ => {}
        }
    }
    verified
}

/// A plain HTTP/1.0 GET on loopback; the status code.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}
