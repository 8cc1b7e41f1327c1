//! Credentials besides client certificates, and files replaced under a running coordinator:
//! bearer tokens for automation (hashed in a file, roles from the policy, revoked by removing
//! the line), the break-glass token (admin, every use audited and alerted), and the
//! coordinator's own certificate renewed without a restart. Real coordinator, etcd, CLI.

use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use interlock_tests::{
    Coordinator, CoordinatorOptions, Etcd,
    coordinator::{binary, certs_cli},
    fresh_prefix,
};

use super::policy;

fn interlock(args: &[&str]) -> Output {
    Command::new(binary("interlock"))
        .args(args)
        .env_remove("INTERLOCK_CERT")
        .env_remove("INTERLOCK_KEY")
        .env_remove("INTERLOCK_TOKEN")
        .output()
        .expect("run interlock")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The token `interlock tokens …` printed (its first line).
fn made_token(args: &[&str]) -> String {
    let out = interlock(args);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .expect("a token")
        .to_owned()
}

/// `interlock --coordinator URL --ca CA --auth-token TOKEN ARGS…`.
fn with_token(url: &str, dir: &Path, token: &str, args: &[&str]) -> Output {
    let ca = dir.join("ca.pem");
    let mut all = vec![
        "--coordinator",
        url,
        "--ca",
        ca.to_str().expect("utf-8"),
        "--auth-token",
        token,
        "-o",
        "json",
    ];
    all.extend_from_slice(args);
    interlock(&all)
}

fn audit(url: &str, dir: &Path, token: &str) -> Vec<serde_json::Value> {
    let out = with_token(url, dir, token, &["audit"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["records"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_act_with_their_role_break_glass_is_audited_and_alerted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let d = dir.to_str().expect("utf-8");
    certs_cli(&["init", d]);
    let token_file = tmp.path().join("tokens");
    let glass_file = tmp.path().join("break-glass");
    let tf = token_file.to_str().expect("utf-8");
    let ci = made_token(&["tokens", "new", "ci-bot", "--file", tf]);
    let viewer = made_token(&["tokens", "new", "dash", "--file", tf]);
    let glass = made_token(&[
        "tokens",
        "break-glass",
        "--file",
        glass_file.to_str().expect("utf-8"),
    ]);
    let again = interlock(&[
        "tokens",
        "break-glass",
        "--file",
        glass_file.to_str().expect("utf-8"),
    ]);
    assert!(
        !again.status.success(),
        "the break-glass file is never overwritten"
    );

    let (url_hook, alerts) = interlock_tests::webhook::receiver();
    let access = "\n[access.operators]\nci-bot = \"operator\"\ndash = \"viewer\"\n";
    let text_policy = format!(
        "alert_webhook = \"{url_hook}\"\n{}{access}",
        policy("5", "assist", 1000, 1000, "30s")
    );
    let etcd = Etcd::start().expect("etcd");
    let mut options =
        CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix("tokens"), &text_policy);
    options.tls = Some(interlock_tests::CertDir::existing(&dir));
    options.args = vec![
        "--token-file".into(),
        tf.into(),
        "--break-glass-file".into(),
        glass_file.display().to_string(),
    ];
    let coordinator = Coordinator::start(&options).expect("start");
    coordinator
        .wait_leader(Duration::from_secs(15))
        .expect("leads");
    let url = coordinator.url();

    // ci-bot freezes a class with its token; the audit owner is operator:ci-bot.
    let out = with_token(
        &url,
        &dir,
        &ci,
        &["freeze", "--class", "disk_cleanup", "--reason", "ci"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let records = audit(&url, &dir, &ci);
    let freeze = records
        .iter()
        .find(|r| r["kind"] == "freeze")
        .expect("freeze record");
    assert_eq!(freeze["owner"], "operator:ci-bot");
    // Its role does not reach autonomous; a viewer cannot freeze; a made-up token is nobody.
    let out = with_token(
        &url,
        &dir,
        &ci,
        &["mode", "--class", "disk_cleanup", "autonomous"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("admin"), "{}", text(&out));
    let out = with_token(&url, &dir, &viewer, &["freeze", "--reason", "x"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("viewer"), "{}", text(&out));
    let out = with_token(&url, &dir, &"0".repeat(64), &["status"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bearer token"), "{}", text(&out));
    // A token never goes over plaintext.
    let out = interlock(&["--coordinator", &url, "--auth-token", &ci, "status"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--ca"), "{}", text(&out));

    // Break glass: admin whatever the policy says, audited before the action, and alerted.
    let out = with_token(
        &url,
        &dir,
        &glass,
        &["mode", "--class", "disk_cleanup", "autonomous"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let records = audit(&url, &dir, &ci);
    let glass_at = records
        .iter()
        .position(|r| r["kind"] == "break_glass")
        .expect("break_glass record");
    let mode_at = records
        .iter()
        .position(|r| r["kind"] == "mode_change")
        .expect("mode_change record");
    assert!(glass_at < mode_at, "audited before it acted");
    assert_eq!(records[mode_at]["owner"], "operator:break-glass");
    let body = alerts
        .recv_timeout(Duration::from_secs(10))
        .expect("break-glass use alerted");
    assert!(body.contains("break_glass"), "{body}");
    assert!(
        coordinator.metric("interlock_alerts_total{class=\"\",kind=\"break_glass\"}") >= 1.0,
        "{}",
        coordinator.metrics().unwrap_or_default()
    );

    // Revoking a token is removing its line: refused within seconds, no restart.
    let kept: String = std::fs::read_to_string(&token_file)
        .expect("read")
        .lines()
        .filter(|l| !l.starts_with("ci-bot "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&token_file, kept).expect("rewrite");
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let out = with_token(&url, &dir, &ci, &["status"]);
        if !out.status.success() {
            break Some(out);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let refused = refused.expect("a removed token is refused within 5 s");
    assert!(
        text(&refused).contains("bearer token"),
        "{}",
        text(&refused)
    );
    let out = with_token(&url, &dir, &viewer, &["status"]);
    assert!(
        out.status.success(),
        "the other token still works: {}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_certificate_is_renewed_without_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let d = dir.to_str().expect("utf-8");
    certs_cli(&["init", d]);
    certs_cli(&["issue", "coordinator", "--dir", d, "--days", "3"]);
    certs_cli(&["issue", "operator", "vic", "--dir", d]);
    let not_after = |file: &str| {
        let pem = std::fs::read(dir.join(file)).expect("read cert");
        interlock_proto::tls::cert_facts_pem(&pem)
            .expect("parse")
            .not_after_unix as f64
    };
    let etcd = Etcd::start().expect("etcd");
    let access = "\n[access.operators]\nvic = \"viewer\"\n";
    let text_policy = policy("5", "assist", 1000, 1000, "30s") + access;
    let mut options =
        CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix("renew"), &text_policy);
    options.tls = Some(interlock_tests::CertDir::existing(&dir));
    let coordinator = Coordinator::start(&options).expect("start");
    coordinator
        .wait_leader(Duration::from_secs(15))
        .expect("leads");
    let metric = "interlock_cert_not_after_seconds{cert=\"coordinator\"}";
    let short = not_after("coordinator.pem");
    assert_eq!(coordinator.metric(metric), short);

    certs_cli(&["issue", "coordinator", "--dir", d, "--days", "90"]);
    let long = not_after("coordinator.pem");
    assert!(
        long > short + 80.0 * 86_400.0,
        "the new certificate is the long one"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while coordinator.metric(metric) != long && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(coordinator.metric(metric), long, "{}", coordinator.log());
    // A new connection is served with the new certificate (the CLI verifies it against the CA).
    let ca = dir.join("ca.pem");
    let cert = dir.join("operators/vic.pem");
    let key = dir.join("operators/vic.key");
    let out = interlock(&[
        "--coordinator",
        &coordinator.url(),
        "--ca",
        ca.to_str().expect("utf-8"),
        "--cert",
        cert.to_str().expect("utf-8"),
        "--key",
        key.to_str().expect("utf-8"),
        "status",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        coordinator.log().contains("TLS files changed"),
        "{}",
        coordinator.log()
    );
    assert_eq!(
        coordinator
            .log()
            .matches("coordinator serving gRPC")
            .count(),
        1,
        "no restart"
    );
}
