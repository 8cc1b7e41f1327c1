//! The agent runtime as a real process (as root): `interlock-agent check` on good and bad
//! configs, `interlock-agent run` against a real coordinator on a real etcd (registration,
//! heartbeats past the host TTL, a disk finding from a real tmpfs reaching the coordinator), and
//! the same agent with no coordinator reachable (observing only, findings still local).
//!
//! Every wait is bounded; agents are stopped by pid and tmpfs mounts unmounted by guards whose
//! `Drop` also runs on panic.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use interlock_tests::agent::{Agent, Link, Tmpfs};
use interlock_tests::coordinator::binary;
use interlock_tests::{
    ADMIN, BASIC_POLICY, Coordinator, CoordinatorOptions, Etcd, fresh_prefix, require_root,
};

/// An agent watching `mount` with a low disk threshold, reaching its coordinator by `link`.
fn start_agent(host_id: &str, link: &Link, mount: &Path) -> Agent {
    Agent::start(|_, metrics| {
        format!(
            r#"
host_id = "{host_id}"
coordinator = "{url}"
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
{tls}"#,
            url = link.url,
            tls = link.tls,
            mount = mount.display()
        )
    })
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
fn hosts(coordinator: &Coordinator) -> serde_json::Value {
    let out = coordinator
        .cli(ADMIN)
        .args(["-o", "json", "hosts"])
        .output()
        .expect("run interlock hosts");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn host_labels(coordinator: &Coordinator, host: &str) -> Option<serde_json::Value> {
    hosts(coordinator)["hosts"]
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
    let link = coordinator.link("agent-rt-1");
    let mount = Tmpfs::mount("8m");
    let mut agent = start_agent("agent-rt-1", &link, mount.path());

    agent.wait_for("registration", Duration::from_secs(20), |_| {
        host_labels(&coordinator, "agent-rt-1").is_some()
    });
    let labels = host_labels(&coordinator, "agent-rt-1").expect("registered");
    assert_eq!(labels["service"], "web");
    assert_eq!(labels["zone"], "z1");
    assert_eq!(agent.metric("interlock_agent_observing_only "), 0.0);

    // Past the 3 s host TTL the registration is still there: heartbeats keep it alive.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        host_labels(&coordinator, "agent-rt-1").is_some(),
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
    // A port nobody listens on (over TLS, with a certificate, as every agent here).
    let nowhere = Link::nowhere("agent-rt-2");
    let mount = Tmpfs::mount("8m");
    mount.fill(6 << 20);
    let mut agent = start_agent("agent-rt-2", &nowhere, mount.path());
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
