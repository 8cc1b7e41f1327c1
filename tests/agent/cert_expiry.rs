//! Certificate expiry end to end: a CA and a host certificate issued for three days by the real
//! `interlock certs` CLI, a real `interlock serve` with mutual TLS, and a real `interlock-agent
//! run` with `[tls]` talking to it. The agent must report a `cert_expiry` finding about its
//! certificate file (seen through the coordinator's findings view, as an operator with a viewer
//! certificate) and export the certificate's notAfter; it must survive the file vanishing
//! mid-rotation, and once the file is replaced with a 90-day certificate (no restart) the
//! finding must clear and the metric follow.
//!
//! The coordinator keeps the findings agents last reported and the protocol has no "cleared"
//! message (a cleared finding only ages out of the view), so the clear is read where it is
//! decided: the agent's `interlock_agent_findings_active{detector="cert_expiry"}`.
//!
//! Every wait is bounded; processes are stopped by pid when their handles drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use interlock_proto::tls::{TlsFiles, cert_facts_pem};
use interlock_proto::v1 as pb;
use interlock_tests::agent::{Agent, unix_ms};
use interlock_tests::client::{operator, tls_channel};
use interlock_tests::coordinator::certs_cli;
use interlock_tests::{BASIC_POLICY, CertDir, Coordinator, CoordinatorOptions, fresh_prefix};

const HOST: &str = "cert-host-1";
const VIEWER: &str = "cert-viewer";
const DAY: i64 = 86_400;
/// Long enough for a loaded machine; the agent re-reads the files every 200 ms here.
const WAIT: Duration = Duration::from_secs(30);

fn unix_s() -> i64 {
    i64::try_from(unix_ms() / 1000).expect("time")
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn not_after(path: &Path) -> i64 {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    cert_facts_pem(&pem)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .not_after_unix
}

/// Issues `HOST`'s certificate for `days` with the CA of `ca_dir`, into a fresh directory
/// holding a copy of that CA (a key is never overwritten, so a renewal is issued elsewhere and
/// moved into place, as an operator would). Returns the new directory.
fn issue_host(ca_dir: &Path, into: &Path, days: u32) -> PathBuf {
    std::fs::create_dir_all(into).expect("mkdir");
    for f in ["ca.pem", "ca.key", "trust-domain"] {
        std::fs::copy(ca_dir.join(f), into.join(f)).expect("copy the CA");
    }
    certs_cli(&[
        "issue",
        "host",
        HOST,
        "--dir",
        utf8(into),
        "--days",
        &days.to_string(),
    ]);
    into.to_owned()
}

/// Operator `Findings` about `HOST` at the coordinator, as the viewer.
fn coordinator_findings(rt: &tokio::runtime::Runtime, url: &str, viewer: &TlsFiles) -> Vec<Seen> {
    let reply = rt.block_on(async {
        let channel = tls_channel(url, viewer)
            .await
            .expect("connect as the viewer");
        operator(&channel)
            .findings(pb::FindingsRequest {
                host: HOST.to_owned(),
            })
            .await
    });
    let reply = reply.expect("the viewer may read findings");
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
                evidence: serde_json::from_str(&f.evidence_json).expect("evidence is JSON"),
            })
        })
        .collect()
}

#[derive(Debug)]
struct Seen {
    host: String,
    detector: String,
    target: String,
    summary: String,
    evidence: serde_json::Value,
}

impl Seen {
    fn number(&self, key: &str) -> f64 {
        self.evidence[key]
            .as_f64()
            .unwrap_or_else(|| panic!("evidence {key} missing in {self:?}"))
    }
}

/// The value of the agent's sample line `name` (name and labels exactly), if it exports it.
fn sample(agent: &Agent, name: &str) -> Option<f64> {
    agent
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Replaces `to` by `from` in one rename, as a rotation should (the reader never sees half).
fn install(from: &Path, to: &Path) {
    let staged = to.with_extension("staged");
    std::fs::copy(from, &staged).expect("stage");
    std::fs::rename(&staged, to).expect("rename into place");
}

#[test]
fn a_certificate_near_expiry_is_a_finding_that_clears_when_the_file_is_replaced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    certs_cli(&["init", utf8(&ca_dir)]);
    certs_cli(&[
        "issue",
        "operator",
        VIEWER,
        "--dir",
        utf8(&ca_dir),
        "--role",
        "viewer",
    ]);
    let before_issue = unix_s();
    let short_dir = issue_host(&ca_dir, &tmp.path().join("short"), 3);
    let after_issue = unix_s();

    // The agent's own files, as they would sit in /etc/interlock/certs.
    let agent_dir = tmp.path().join("agent-certs");
    std::fs::create_dir_all(&agent_dir).expect("mkdir");
    let (ca, cert, key) = (
        agent_dir.join("ca.pem"),
        agent_dir.join("host.pem"),
        agent_dir.join("host.key"),
    );
    std::fs::copy(ca_dir.join("ca.pem"), &ca).expect("copy CA");
    std::fs::copy(short_dir.join(format!("hosts/{HOST}.pem")), &cert).expect("copy cert");
    std::fs::copy(short_dir.join(format!("hosts/{HOST}.key")), &key).expect("copy key");
    let short_not_after = not_after(&cert);
    let ca_not_after = not_after(&ca);
    // What the CLI was asked for, independently of the parser: three days from issuing.
    assert!(
        (before_issue + 3 * DAY - 5..=after_issue + 3 * DAY + 5).contains(&short_not_after),
        "--days 3 gave notAfter {short_not_after}, issued between {before_issue} and {after_issue}"
    );

    let policy = format!("{BASIC_POLICY}\n[access.operators]\n{VIEWER} = \"viewer\"\n");
    // The embedded store: findings live in the leader's memory either way. The CA is the one
    // this test made through the CLI, and the policy grants the viewer itself.
    let mut options = CoordinatorOptions::embedded(fresh_prefix("cert-expiry"), &policy);
    options.tls = Some(CertDir::existing(&ca_dir));
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(Duration::from_secs(20))
        .expect("leads");
    let url = coordinator.url();
    let viewer = TlsFiles {
        ca: ca_dir.join("ca.pem"),
        cert: ca_dir.join(format!("operators/{VIEWER}.pem")),
        key: ca_dir.join(format!("operators/{VIEWER}.key")),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let agent = Agent::start(|_, metrics| {
        format!(
            "host_id = \"{HOST}\"\ncoordinator = \"{url}\"\n[labels]\nservice = \"web\"\n\
             [metrics]\nlisten = \"{metrics}\"\n[intervals]\ncert = \"200ms\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            ca.display(),
            cert.display(),
            key.display()
        )
    });
    let client_metric = "interlock_agent_cert_not_after_seconds{cert=\"client\"}";
    let ca_metric = "interlock_agent_cert_not_after_seconds{cert=\"ca\"}";
    let active = "interlock_agent_findings_active{detector=\"cert_expiry\"}";

    // --- the finding at the coordinator, and the agent's metric -------------------------------
    let deadline = Instant::now() + WAIT;
    let seen = loop {
        let findings = coordinator_findings(&rt, &url, &viewer);
        if let Some(f) = findings
            .into_iter()
            .find(|f| f.detector == "cert_expiry" && f.target == utf8(&cert))
        {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no cert_expiry finding at the coordinator within {WAIT:?}; agent log:\n{}\n\
             coordinator log:\n{}",
            agent.log(),
            coordinator.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(seen.host, HOST);
    assert_eq!(seen.number("not_after"), short_not_after as f64, "{seen:?}");
    assert_eq!(seen.number("warning_days"), 14.0, "{seen:?}");
    let days_left = seen.number("days_left");
    assert!(
        days_left > 2.9 && days_left <= 3.0,
        "a 3-day certificate read just now has {days_left} days left: {seen:?}"
    );
    assert!(
        seen.summary.contains("client certificate") && seen.summary.contains("expires in"),
        "{seen:?}"
    );
    // The CA (ten years) is not within the warning.
    let all = coordinator_findings(&rt, &url, &viewer);
    assert!(
        !all.iter().any(|f| f.target == utf8(&ca)),
        "the CA has years left: {all:?}"
    );
    assert_eq!(sample(&agent, client_metric), Some(short_not_after as f64));
    assert_eq!(sample(&agent, ca_metric), Some(ca_not_after as f64));
    assert_eq!(sample(&agent, active), Some(1.0), "{}", agent.metrics());

    // --- mid-rotation the file is gone: the agent goes on and keeps the finding ---------------
    let away = agent_dir.join("host.pem.away");
    std::fs::rename(&cert, &away).expect("move the certificate away");
    agent.wait_for("warning about the missing certificate", WAIT, |a| {
        a.log().contains("certificate file not readable")
    });
    assert_eq!(sample(&agent, active), Some(1.0), "{}", agent.metrics());
    assert_eq!(sample(&agent, client_metric), Some(short_not_after as f64));

    // --- replaced by a 90-day certificate, without a restart: the finding clears -------------
    let long_dir = issue_host(&ca_dir, &tmp.path().join("long"), 90);
    let long_cert = long_dir.join(format!("hosts/{HOST}.pem"));
    let long_not_after = not_after(&long_cert);
    assert!(
        long_not_after > short_not_after + 80 * DAY,
        "{long_not_after}"
    );
    install(&long_dir.join(format!("hosts/{HOST}.key")), &key);
    install(&long_cert, &cert);
    agent.wait_for("the renewed certificate's notAfter", WAIT, |a| {
        sample(a, client_metric) == Some(long_not_after as f64)
    });
    agent.wait_for("the cert_expiry finding to clear", WAIT, |a| {
        sample(a, active) == Some(0.0)
    });
    assert_eq!(sample(&agent, ca_metric), Some(ca_not_after as f64));
    let log = agent.log();
    assert_eq!(
        log.matches("agent starting").count(),
        1,
        "the agent must not have restarted:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("certificate read") && l.contains(&long_not_after.to_string())),
        "the renewed certificate's reading is logged:\n{log}"
    );
}
