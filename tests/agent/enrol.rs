//! Enrolment that scales past issuing certificates by hand: an admin asks the coordinator for
//! a one-time join token, a real `interlock-agent enrol` trades it and a certificate request
//! for a short-lived certificate binding its host id, a second use, an expired token and a
//! token for another host are refused, and the running agent renews its certificate over mTLS
//! before it expires without a restart. Each step's audit owner is checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use interlock_proto::tls::cert_facts_pem;
use interlock_tests::agent::Agent;
use interlock_tests::coordinator::{binary, certs_cli};
use interlock_tests::{BASIC_POLICY, Coordinator, CoordinatorOptions, fresh_prefix};

const HOST: &str = "enrol-1";
const WAIT: Duration = Duration::from_secs(60);

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The operator CLI as `name` (certificate from `ca_dir`).
fn as_operator(url: &str, ca_dir: &Path, name: &str, args: &[&str]) -> Output {
    let cert = ca_dir.join(format!("operators/{name}.pem"));
    let key = ca_dir.join(format!("operators/{name}.key"));
    let ca = ca_dir.join("ca.pem");
    Command::new(binary("interlock"))
        .args([
            "--coordinator",
            url,
            "--ca",
            utf8(&ca),
            "--cert",
            utf8(&cert),
        ])
        .args(["--key", utf8(&key), "-o", "json"])
        .args(args)
        .output()
        .expect("run interlock")
}

fn join_token(url: &str, ca_dir: &Path, host: &str, ttl: &str) -> String {
    let out = as_operator(
        url,
        ca_dir,
        "ada",
        &["certs", "token", "--host", host, "--ttl", ttl],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["token"].as_str().expect("token").to_owned()
}

fn enrol(config: &Path, token: &str) -> Output {
    Command::new(binary("interlock-agent"))
        .args(["enrol", "--config", utf8(config), "--token", token])
        .output()
        .expect("run interlock-agent enrol")
}

fn audit(url: &str, ca_dir: &Path) -> Vec<serde_json::Value> {
    let out = as_operator(url, ca_dir, "ada", &["audit"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["records"].as_array().cloned().unwrap_or_default()
}

fn agent_config(url: &str, dir: &Path, metrics: Option<std::net::SocketAddr>) -> PathBuf {
    let metrics = metrics.map_or(String::new(), |m| format!("[metrics]\nlisten = \"{m}\"\n"));
    let text = format!(
        "host_id = \"{HOST}\"\ncoordinator = \"{url}\"\n[labels]\nservice = \"web\"\n{metrics}\
         [intervals]\ncert = \"500ms\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("ca.pem").display(),
        dir.join("host.pem").display(),
        dir.join("host.key").display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn a_join_token_enrols_once_and_the_certificate_renews_before_it_expires() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    certs_cli(&["init", utf8(&ca_dir)]);
    certs_cli(&[
        "issue",
        "operator",
        "ada",
        "--dir",
        utf8(&ca_dir),
        "--role",
        "admin",
    ]);
    certs_cli(&[
        "issue",
        "operator",
        "vic",
        "--dir",
        utf8(&ca_dir),
        "--role",
        "viewer",
    ]);
    let policy = format!("{BASIC_POLICY}\n[access.operators]\nada = \"admin\"\nvic = \"viewer\"\n");
    let mut options = CoordinatorOptions::etcd(String::new(), fresh_prefix("enrol"), &policy);
    options.etcd = None;
    options.tls = Some(interlock_tests::CertDir::existing(&ca_dir));
    options.args = vec![
        "--ca-key".into(),
        ca_dir.join("ca.key").display().to_string(),
        "--host-cert-lifetime".into(),
        "30s".into(),
    ];
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(Duration::from_secs(20))
        .expect("leads");
    let url = coordinator.url();

    // Only an admin mints host identities.
    let out = as_operator(&url, &ca_dir, "vic", &["certs", "token", "--host", HOST]);
    assert!(!out.status.success());
    assert!(text(&out).contains("admin"), "{}", text(&out));

    // The host's directory holds only the installation's CA certificate.
    let host_dir = tmp.path().join("host");
    std::fs::create_dir_all(&host_dir).expect("mkdir");
    std::fs::copy(ca_dir.join("ca.pem"), host_dir.join("ca.pem")).expect("copy CA");
    let config = agent_config(&url, &host_dir, None);

    let token = join_token(&url, &ca_dir, HOST, "1h");
    let out = enrol(&config, &token);
    assert!(out.status.success(), "{}", text(&out));
    let pem = std::fs::read(host_dir.join("host.pem")).expect("certificate written");
    let facts = cert_facts_pem(&pem).expect("a certificate");
    assert_eq!(facts.uris, vec![format!("spiffe://interlock/host/{HOST}")]);
    let lifetime = facts.not_after_unix - facts.not_before_unix;
    assert!((30..=40).contains(&lifetime), "short-lived: {lifetime} s");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(host_dir.join("host.key"))
        .expect("key written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Single use; for its host only; not after it expires.
    let out = enrol(&config, &token);
    assert!(!out.status.success(), "a second use must be refused");
    assert!(
        text(&out).contains("unknown, used or expired"),
        "{}",
        text(&out)
    );
    let other = join_token(&url, &ca_dir, "enrol-2", "1h");
    let out = enrol(&config, &other);
    assert!(!out.status.success());
    assert!(text(&out).contains("for host enrol-2"), "{}", text(&out));
    let short = join_token(&url, &ca_dir, HOST, "1s");
    std::thread::sleep(Duration::from_millis(2500));
    let out = enrol(&config, &short);
    assert!(!out.status.success(), "an expired token must be refused");
    assert!(
        text(&out).contains("unknown, used or expired"),
        "{}",
        text(&out)
    );

    // The enrolled agent runs with its certificate and renews it before it expires.
    let first_not_after = facts.not_after_unix;
    let agent = Agent::start(|_, metrics| {
        std::fs::read_to_string(agent_config(&url, &host_dir, Some(metrics))).expect("config")
    });
    let deadline = Instant::now() + WAIT;
    let renewed = loop {
        let now = std::fs::read(host_dir.join("host.pem"))
            .ok()
            .and_then(|p| cert_facts_pem(&p).ok())
            .map(|f| f.not_after_unix);
        if let Some(n) = now.filter(|n| *n > first_not_after) {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal within {WAIT:?}; agent log:\n{}\ncoordinator log:\n{}",
            agent.log(),
            coordinator.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        renewed < first_not_after + 60,
        "still short-lived: {renewed}"
    );
    // The link presents the renewed certificate on new connections: past the first one's end,
    // the host is still live and no handshake failed at the coordinator.
    agent.wait_for("the link to pick up the renewed files", WAIT, |a| {
        a.log()
            .contains("new connections present the new certificate")
    });
    let deadline = Instant::now() + WAIT;
    while interlock_tests::agent::unix_ms() / 1000 <= u64::try_from(first_not_after + 2).unwrap() {
        assert!(
            Instant::now() < deadline,
            "the clock did not pass the first certificate's end"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = as_operator(&url, &ca_dir, "ada", &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(status["live_hosts"].as_u64() >= Some(1), "{status}");
    assert_eq!(
        coordinator.metric("interlock_tls_handshake_failures_total"),
        0.0,
        "{}",
        coordinator.log()
    );
    assert_eq!(
        agent.log().matches("agent starting").count(),
        1,
        "no restart"
    );

    let records = audit(&url, &ca_dir);
    let owner_of = |kind: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| r["owner"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(owner_of("join_token").iter().all(|o| o == "operator:ada"));
    assert_eq!(owner_of("join_token").len(), 3);
    assert_eq!(
        owner_of("enrol"),
        vec![format!("host:{HOST}")],
        "one enrolment"
    );
    assert!(
        owner_of("cert_renewed")
            .iter()
            .any(|o| *o == format!("host:{HOST}")),
        "{records:?}"
    );
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "refused" && r["detail"]["check"] == "join_token")
        .collect();
    assert_eq!(
        refused.len(),
        3,
        "each refused enrolment is audited: {records:?}"
    );
}
