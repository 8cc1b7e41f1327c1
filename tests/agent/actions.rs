//! The action loop end to end (as root): real agents acting under leases from a real
//! coordinator on a real etcd, on real tmpfs mounts and real processes (the demo service the
//! agent supervises). Each test records what it saw from the client side (the agent's journal,
//! the demo service's start log, the coordinator's audit) and asserts on that history.
//!
//! Covered: a full disk cleaned back above its target with the grant and outcome under one
//! token (1); a crash restarted and healthy, with the exit → restart latency printed (2); the
//! agent killed at a failpoint mid-action and restarted: the action is reported interrupted and
//! never continued under its token (6); the agent SIGSTOPped past its lease TTL mid-action:
//! no further step after SIGCONT (7); no coordinator: findings go on, nothing acts (8); bad
//! action config refused with every problem listed (9); observe and assist modes end to end;
//! SIGTERM mid-action: stop between steps, report, release, exit.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use interlock_tests::agent::{
    Agent, Link, Tmpfs, crash_demo, demo_healthy, demo_starts, free_addr, journal_entries,
    old_logs, unix_ms,
};
use interlock_tests::coordinator::binary;
use interlock_tests::{Coordinator, CoordinatorOptions, Etcd, fresh_prefix, require_root};

/// A policy with both classes in `mode`, lease TTL `ttl`, budgets out of the way.
fn policy(mode: &str, ttl: &str) -> String {
    let class = |name: &str, reversible: bool| {
        format!(
            r#"
[classes.{name}]
tier = "green"
mode = "{mode}"
trigger = "test"
false_positives = ["none in a test"]
reversible = {reversible}
time_to_reverse = "30s"
cap = 1
lease_ttl = "{ttl}"
verification_window = "20s"
[classes.{name}.budget]
fleet = {{ max = 1000, window = "1h" }}
host = {{ max = 1000, window = "1h" }}
"#
        )
    };
    format!(
        "name = \"actions\"\nversion = 1\napproval_ttl = \"5m\"\n{}{}",
        class("disk_cleanup", false),
        class("process_restart", true)
    )
}

struct Fleet {
    _etcd: Etcd,
    coordinator: Coordinator,
}

fn fleet(test: &str, policy: &str) -> Fleet {
    let etcd = Etcd::start().expect("start etcd");
    let options = CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix(test), policy)
        .grant("alice", "operator");
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(Duration::from_secs(20))
        .expect("leader");
    Fleet {
        _etcd: etcd,
        coordinator,
    }
}

/// The operator CLI as alice (her certificate; role operator), JSON output.
fn interlock(coordinator: &Coordinator, args: &[&str]) -> Output {
    coordinator
        .cli("alice")
        .args(["-o", "json"])
        .args(args)
        .output()
        .expect("run interlock")
}

/// The audit records, oldest first.
fn audit(coordinator: &Coordinator) -> Vec<serde_json::Value> {
    let out = interlock(coordinator, &["audit"]);
    assert!(
        out.status.success(),
        "interlock audit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("audit JSON");
    assert_eq!(v["chain_ok"], true, "audit chain broken: {v}");
    v["records"].as_array().cloned().unwrap_or_default()
}

fn records<'a>(
    audit: &'a [serde_json::Value],
    kind: &str,
    class: &str,
) -> Vec<&'a serde_json::Value> {
    audit
        .iter()
        .filter(|r| r["kind"] == kind && r["class"] == class)
        .collect()
}

/// Journal entries of one kind (`planned`, `step`, `done`) under `token` (any token if 0).
fn entries(journal: &[serde_json::Value], entry: &str, token: u64) -> Vec<serde_json::Value> {
    journal
        .iter()
        .filter(|e| e["entry"] == entry && (token == 0 || e["token"] == token))
        .cloned()
        .collect()
}

/// An agent supervising a demo service on `demo` started with `demo_args` (`--ready-after`,
/// `--crash-after`, ...); `extra` is appended to its `[[restart.target]]`.
fn demo_agent(host: &str, link: &Link, demo: SocketAddr, demo_args: &[&str], extra: &str) -> Agent {
    let agent_bin = binary("interlock-agent");
    let (host, url, tls, extra) = (
        host.to_owned(),
        link.url.clone(),
        link.tls.clone(),
        extra.to_owned(),
    );
    let demo_args: String = demo_args.iter().map(|a| format!(", \"{a}\"")).collect();
    Agent::start(move |dir, metrics| {
        format!(
            r#"
host_id = "{host}"
coordinator = "{url}"
[labels]
service = "demo"
[metrics]
listen = "{metrics}"
[actions]
journal = "{dir}/actions.journal"
cooldown = "1s"
retry = "300ms"
lease_margin = "500ms"
on_agent_stop = "stop"
[[restart.target]]
name = "demo"
argv = ["{bin}", "demo-service", "--listen", "{demo}", "--starts", "{dir}/starts"{demo_args}]
http = "http://{demo}/healthz"
health_window = "20s"
grace = "2s"
cooldown = "1s"
{extra}
{tls}"#,
            dir = dir.display(),
            bin = agent_bin.display(),
        )
    })
}

/// Crashes the demo service of an agent whose restarted demo never becomes healthy (ready
/// after 60 s), and waits until the agent has journaled `steps` steps under its lease (health
/// polls, one per step). Returns the journal's path.
fn crash_into_a_long_restart(agent: &Agent, demo: SocketAddr, steps: usize) -> std::path::PathBuf {
    agent.wait_for("the process probe", Duration::from_secs(20), |a| {
        a.metric("interlock_agent_probe_loaded{probe=\"process\"}") == 1.0
    });
    wait_until(
        "the demo service listening",
        Duration::from_secs(20),
        agent,
        || interlock_tests::agent::listening(demo),
    );
    crash_demo(demo);
    let journal_path = agent.dir().join("actions.journal");
    agent.wait_for(
        "health polls under a lease",
        Duration::from_secs(20),
        |_| entries(&journal_entries(&journal_path), "step", 0).len() >= steps,
    );
    journal_path
}

/// The config of an agent that cleans `mount`/logs (old `*.log.N` files) back to 60% free once
/// the mount is more than half full, keeping the `keep_newest` newest.
fn cleanup_config(
    host: &str,
    link: Link,
    mount: &Path,
    keep_newest: u32,
) -> impl FnOnce(&Path, SocketAddr) -> String {
    let (host, url, tls, mount) = (host.to_owned(), link.url, link.tls, mount.to_owned());
    move |dir, metrics| {
        format!(
            r#"
host_id = "{host}"
coordinator = "{url}"
[labels]
service = "logs"
[metrics]
listen = "{metrics}"
[watch]
mounts = ["{m}"]
[detectors.disk]
high = 0.5
low = 0.3
for = "0s"
cooldown = "1s"
[actions]
journal = "{dir}/actions.journal"
retry = "300ms"
cooldown = "1s"
[cleanup]
target_free_ratio = 0.6
max_bytes_per_run = 104857600
on = ["disk_full"]
[[cleanup.root]]
path = "{m}/logs"
patterns = ["*.log.[0-9]"]
min_age = "1h"
keep_newest = {keep_newest}
{tls}"#,
            m = mount.display(),
            dir = dir.display(),
        )
    }
}

fn wait_until(what: &str, within: Duration, agent: &Agent, ok: impl Fn() -> bool) {
    agent.wait_for(what, within, |_| ok());
}

#[test]
fn a_full_filesystem_is_cleaned_back_above_target_under_one_token() {
    require_root("the disk cleanup action test (tmpfs mount)");
    let f = fleet("action-cleanup", &policy("autonomous", "5s"));
    let c = &f.coordinator;
    let mount = Tmpfs::mount("16m");
    let root = mount.path().join("logs");
    // 12 MiB of old rotated logs under the root; one outside it that matches the pattern too.
    let logs = old_logs(&root, "app-", 12, 1 << 20);
    let outside = old_logs(mount.path(), "outside-", 1, 1 << 20);
    let before = mount.free_ratio();
    assert!(
        before < 0.5,
        "the mount must start above the threshold: free {before}"
    );
    let agent = Agent::start(cleanup_config(
        "clean-1",
        c.link("clean-1"),
        mount.path(),
        2,
    ));
    let journal_path = agent.dir().join("actions.journal");
    agent.wait_for("a successful cleanup", Duration::from_secs(30), |a| {
        a.metric("interlock_agent_actions_total{class=\"disk_cleanup\",stage=\"success\"}") >= 1.0
    });
    let after = mount.free_ratio();
    assert!(after >= 0.6, "free {after:.3} is below the target 0.6");
    let left: Vec<_> = logs.iter().filter(|p| p.exists()).collect();
    assert!(left.len() >= 2, "keep_newest = 2 was not kept: {left:?}");
    assert!(left.len() < logs.len(), "nothing was deleted");
    assert!(outside[0].exists(), "a file outside the root was touched");

    let audit = audit(c);
    let grants = records(&audit, "grant", "disk_cleanup");
    let outcomes = records(&audit, "outcome", "disk_cleanup");
    assert_eq!(grants.len(), 1, "{audit:#?}");
    assert_eq!(outcomes.len(), 1, "{audit:#?}");
    let token = grants[0]["token"].as_u64().expect("grant token");
    assert_eq!(outcomes[0]["token"].as_u64(), Some(token));
    assert_eq!(outcomes[0]["reason"], "success");
    assert_eq!(grants[0]["target"], mount.path().display().to_string());
    let journal = journal_entries(&journal_path);
    assert_eq!(entries(&journal, "planned", token).len(), 1, "{journal:#?}");
    assert_eq!(entries(&journal, "done", token)[0]["outcome"], "success");
    println!(
        "cleanup: free {before:.3} → {after:.3} (target 0.6), {} of {} files deleted, token {token}",
        logs.len() - left.len(),
        logs.len()
    );
}

#[test]
fn a_crashed_process_is_restarted_and_healthy_with_its_latency_measured() {
    require_root("the restart action test (eBPF exit probe)");
    let f = fleet("action-restart", &policy("autonomous", "5s"));
    let c = &f.coordinator;
    let demo = free_addr();
    let agent = demo_agent(
        "restart-1",
        &c.link("restart-1"),
        demo,
        &["--ready-after", "200ms"],
        "",
    );
    let starts = agent.dir().join("starts");
    wait_until(
        "the demo service healthy",
        Duration::from_secs(20),
        &agent,
        || demo_healthy(demo),
    );
    // The exit probe must be loaded, or crashes are only polled.
    agent.wait_for("the process probe", Duration::from_secs(20), |a| {
        a.metric("interlock_agent_probe_loaded{probe=\"process\"}") == 1.0
    });
    let first = demo_starts(&starts);
    assert_eq!(first.len(), 1, "one start before the crash: {first:?}");

    let crashed_at = unix_ms();
    crash_demo(demo);
    wait_until("a restart", Duration::from_secs(20), &agent, || {
        demo_starts(&starts).len() == 2
    });
    wait_until("healthy again", Duration::from_secs(20), &agent, || {
        demo_healthy(demo)
    });
    let healthy_at = unix_ms();
    let second = demo_starts(&starts)[1];
    assert_ne!(second.0, first[0].0, "the same pid cannot be a restart");

    agent.wait_for("the outcome in the audit", Duration::from_secs(10), |_| {
        !records(&audit(c), "outcome", "process_restart").is_empty()
    });
    let audit = audit(c);
    let grants = records(&audit, "grant", "process_restart");
    let outcomes = records(&audit, "outcome", "process_restart");
    assert_eq!(grants.len(), 1, "{audit:#?}");
    let token = grants[0]["token"].as_u64().expect("token");
    assert_eq!(outcomes[0]["token"].as_u64(), Some(token));
    assert_eq!(outcomes[0]["reason"], "success");
    let journal = journal_entries(&agent.dir().join("actions.journal"));
    let planned_at = entries(&journal, "planned", token)[0]["at"]
        .as_u64()
        .expect("planned at");
    println!(
        "restart: crash → lease planned {} ms, crash → restart issued (new process started) {} ms, crash → healthy (seen by the test) {} ms",
        planned_at.saturating_sub(crashed_at),
        second.1.saturating_sub(crashed_at),
        healthy_at.saturating_sub(crashed_at)
    );
}

#[test]
fn an_agent_killed_mid_action_reports_it_interrupted_and_never_resumes_its_token() {
    require_root("the failpoint test (tmpfs mount)");
    let f = fleet("action-failpoint", &policy("autonomous", "10s"));
    let c = &f.coordinator;
    let mount = Tmpfs::mount("16m");
    let root = mount.path().join("logs");
    old_logs(&root, "app-", 12, 1 << 20);
    let config = cleanup_config("failpoint-1", c.link("failpoint-1"), mount.path(), 0);
    let mut agent =
        Agent::start_with_env(config, &[("INTERLOCK_AGENT_FAILPOINT", "kill_at_step=3")]);
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the failpoint never fired; log:\n{}", agent.log()));
    // The failpoint was hit: the agent says so and died of SIGKILL.
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        status.signal(),
        Some(9),
        "exit {status}; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("failpoint kill_at_step=3 hit"),
        "{}",
        agent.log()
    );
    let journal_path = agent.dir().join("actions.journal");
    let journal = journal_entries(&journal_path);
    let planned = entries(&journal, "planned", 0);
    assert_eq!(planned.len(), 1, "{journal:#?}");
    let token = planned[0]["token"].as_u64().expect("token");
    assert_eq!(entries(&journal, "step", token).len(), 3, "{journal:#?}");
    assert!(entries(&journal, "done", token).is_empty(), "{journal:#?}");
    let lines_before_restart = journal.len();

    agent.restart(&[]);
    agent.wait_for(
        "the interrupted outcome reported",
        Duration::from_secs(30),
        |_| {
            records(&audit(c), "outcome", "disk_cleanup")
                .iter()
                .any(|o| o["token"].as_u64() == Some(token))
        },
    );
    let audit = audit(c);
    let outcome = records(&audit, "outcome", "disk_cleanup")
        .into_iter()
        .find(|o| o["token"].as_u64() == Some(token))
        .expect("outcome")
        .clone();
    assert_eq!(outcome["reason"], "interrupted", "{outcome:#}");
    agent.wait_for(
        "the next cleanup under a new token",
        Duration::from_secs(30),
        |a| {
            a.metric("interlock_agent_actions_total{class=\"disk_cleanup\",stage=\"success\"}")
                >= 1.0
        },
    );
    let journal = journal_entries(&journal_path);
    let after = &journal[lines_before_restart..];
    // Nothing more ran under the old token: only its "interrupted" outcome was added.
    let old: Vec<_> = after
        .iter()
        .filter(|e| e["token"].as_u64() == Some(token))
        .collect();
    assert_eq!(old.len(), 1, "{after:#?}");
    assert_eq!(old[0]["entry"], "done");
    assert_eq!(old[0]["outcome"], "interrupted");
    let new = entries(after, "planned", 0);
    assert!(
        new.iter().all(|p| p["token"].as_u64() > Some(token)),
        "a later plan reused a token not above {token}: {new:#?}"
    );
}

#[test]
fn an_agent_stopped_past_its_lease_ttl_takes_no_further_step() {
    require_root("the SIGSTOP test (eBPF exit probe)");
    let f = fleet("action-sigstop", &policy("autonomous", "2s"));
    let c = &f.coordinator;
    let demo = free_addr();
    // Never healthy within the window: the agent keeps polling health (one step per poll).
    let mut agent = demo_agent(
        "sigstop-1",
        &c.link("sigstop-1"),
        demo,
        &["--ready-after", "60s"],
        "",
    );
    let journal_path = crash_into_a_long_restart(&agent, demo, 6);
    agent.signal("STOP");
    let token = entries(&journal_entries(&journal_path), "planned", 0)[0]["token"]
        .as_u64()
        .expect("token");
    let steps_at_stop = entries(&journal_entries(&journal_path), "step", token).len();
    // Past the 2 s TTL: the coordinator lets the lease expire (the fault really took effect).
    agent.wait_for(
        "the lease to expire at the coordinator",
        Duration::from_secs(15),
        |_| {
            records(&audit(c), "expired", "process_restart")
                .iter()
                .any(|e| e["token"].as_u64() == Some(token))
        },
    );
    agent.signal("CONT");
    agent.wait_for("the abandoned outcome", Duration::from_secs(15), |_| {
        !entries(&journal_entries(&journal_path), "done", token).is_empty()
    });
    std::thread::sleep(Duration::from_secs(1));
    let journal = journal_entries(&journal_path);
    let steps_after = entries(&journal, "step", token).len();
    // A step already past its check when the signal landed may be journaled, never more.
    assert!(
        steps_after <= steps_at_stop + 1,
        "{} step(s) after SIGCONT under an expired lease: {journal:#?}",
        steps_after - steps_at_stop
    );
    let done = &entries(&journal, "done", token)[0];
    assert_eq!(done["outcome"], "abandoned", "{journal:#?}");
    let log = agent.log();
    assert!(log.contains("dead-man"), "{log}");
    agent.wait_for(
        "the late outcome in the audit",
        Duration::from_secs(10),
        |_| {
            records(&audit(c), "outcome", "process_restart")
                .iter()
                .any(|o| o["token"].as_u64() == Some(token) && o["reason"] == "abandoned")
        },
    );
    let status = agent.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit {status}");
    println!(
        "SIGSTOP: {steps_at_stop} step(s) before the stop, {steps_after} after SIGCONT; outcome abandoned (dead-man)"
    );
}

#[test]
fn without_a_coordinator_findings_continue_and_nothing_acts() {
    require_root("the no-coordinator test (eBPF exit probe)");
    // Nobody serves there; the agent still speaks TLS with a certificate of its own.
    let nowhere = Link::nowhere("alone-1");
    let demo = free_addr();
    let agent = demo_agent("alone-1", &nowhere, demo, &["--ready-after", "0s"], "");
    agent.wait_for("the process probe", Duration::from_secs(20), |a| {
        a.metric("interlock_agent_probe_loaded{probe=\"process\"}") == 1.0
    });
    wait_until(
        "the demo service healthy",
        Duration::from_secs(20),
        &agent,
        || demo_healthy(demo),
    );
    crash_demo(demo);
    agent.wait_for("the crash finding", Duration::from_secs(15), |a| {
        a.metric("interlock_agent_findings_total{detector=\"process_crash\"}") >= 1.0
    });
    agent.wait_for(
        "lease attempts that found no coordinator",
        Duration::from_secs(15),
        |a| {
            a.metric(
                "interlock_agent_actions_total{class=\"process_restart\",stage=\"unreachable\"}",
            ) >= 2.0
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        demo_starts(&agent.dir().join("starts")).len(),
        1,
        "restarted without a lease"
    );
    assert!(!demo_healthy(demo));
    let journal = journal_entries(&agent.dir().join("actions.journal"));
    assert!(
        journal.is_empty(),
        "journaled without a lease: {journal:#?}"
    );
    assert_eq!(agent.metric("interlock_agent_observing_only "), 1.0);
    assert!(
        agent.log().contains("no lease, no action"),
        "{}",
        agent.log()
    );
}

#[test]
fn bad_action_config_is_refused_with_every_problem_listed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
coordinator = "http://127.0.0.1:7400"
[labels]
service = "web"
[cleanup]
target_free_ratio = 0.2
max_bytes_per_run = 1000
[[cleanup.root]]
path = "var/log/app"
patterns = ["*.gz"]
[[cleanup.root]]
path = "/"
patterns = ["*.gz"]
[[cleanup.root]]
path = "/var/cache/app"
patterns = ["../*.log"]
[[restart.target]]
name = "web"
unit = "nginx;reboot.service"
tcp = "127.0.0.1:80"
[[restart.target]]
name = "api"
argv = "/usr/bin/api --port 8080"
tcp = "127.0.0.1:8080"
"#,
    )
    .expect("write");
    let out = Command::new(binary("interlock-agent"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for want in [
        "cleanup.root[0].path",
        "cleanup.root[1].path",
        "cleanup.root[2].patterns[0]",
        "restart.target[0].unit",
        "restart.target[1].argv",
        "actions.journal",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    assert!(
        text.contains("shell"),
        "the argv string must be refused as a shell line:\n{text}"
    );
}

#[test]
fn observe_records_what_it_would_do_and_assist_acts_only_after_approval() {
    require_root("the modes test (eBPF exit probe)");
    let f = fleet("action-modes", &policy("observe", "5s"));
    let c = &f.coordinator;
    let demo = free_addr();
    let agent = demo_agent(
        "modes-1",
        &c.link("modes-1"),
        demo,
        &["--ready-after", "0s"],
        "",
    );
    let starts = agent.dir().join("starts");
    agent.wait_for("the process probe", Duration::from_secs(20), |a| {
        a.metric("interlock_agent_probe_loaded{probe=\"process\"}") == 1.0
    });
    wait_until(
        "the demo service healthy",
        Duration::from_secs(20),
        &agent,
        || demo_healthy(demo),
    );
    crash_demo(demo);
    agent.wait_for(
        "the would-grant in the audit",
        Duration::from_secs(20),
        |_| !records(&audit(c), "would_grant", "process_restart").is_empty(),
    );
    let audit_now = audit(c);
    let would = records(&audit_now, "would_grant", "process_restart")[0].to_string();
    assert!(
        would.contains("restart demo"),
        "the would-do plan is not audited: {would}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(demo_starts(&starts).len(), 1, "observe mode restarted");
    assert!(records(&audit_now, "grant", "process_restart").is_empty());
    assert!(agent.log().contains("would have done"), "{}", agent.log());

    // Assist: a pending request, nothing done until alice approves.
    let out = interlock(c, &["mode", "--class", "process_restart", "assist"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_for("a pending approval", Duration::from_secs(20), |_| {
        !records(&audit(c), "pending", "process_restart").is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        demo_starts(&starts).len(),
        1,
        "assist mode acted before approval"
    );
    let out = interlock(c, &["approvals"]);
    let approvals: serde_json::Value = serde_json::from_slice(&out.stdout).expect("approvals JSON");
    let id = approvals["approvals"][0]["approval_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no pending approval: {approvals}"))
        .to_owned();
    let out = interlock(c, &["approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the approved restart",
        Duration::from_secs(20),
        &agent,
        || demo_starts(&starts).len() == 2 && demo_healthy(demo),
    );
    let audit = audit(c);
    let grant = records(&audit, "grant", "process_restart")[0].clone();
    assert!(
        grant.to_string().contains("alice"),
        "the approver is not recorded: {grant:#}"
    );
    let token = grant["token"].as_u64();
    agent.wait_for("the outcome", Duration::from_secs(10), |_| {
        records(&self::audit(c), "outcome", "process_restart")
            .iter()
            .any(|o| o["token"].as_u64() == token && o["reason"] == "success")
    });
}

#[test]
fn sigterm_mid_action_stops_between_steps_reports_releases_and_exits() {
    require_root("the SIGTERM test (eBPF exit probe)");
    let f = fleet("action-sigterm", &policy("autonomous", "5s"));
    let c = &f.coordinator;
    let demo = free_addr();
    let mut agent = demo_agent(
        "sigterm-1",
        &c.link("sigterm-1"),
        demo,
        &["--ready-after", "60s"],
        "",
    );
    let journal_path = crash_into_a_long_restart(&agent, demo, 4);
    let sent = Instant::now();
    let status = agent.terminate(Duration::from_secs(15));
    let took = sent.elapsed();
    assert!(status.success(), "exit {status}; log:\n{}", agent.log());
    let journal = journal_entries(&journal_path);
    let token = entries(&journal, "planned", 0)[0]["token"]
        .as_u64()
        .expect("token");
    assert_eq!(entries(&journal, "done", token)[0]["outcome"], "abandoned");
    let audit = audit(c);
    let outcome = records(&audit, "outcome", "process_restart")
        .into_iter()
        .find(|o| o["token"].as_u64() == Some(token))
        .unwrap_or_else(|| panic!("no outcome for {token}: {audit:#?}"))
        .clone();
    assert_eq!(outcome["reason"], "abandoned");
    assert!(outcome.to_string().contains("shutting down"), "{outcome:#}");
    // Released, not left to expire.
    assert!(
        !records(&audit, "expired", "process_restart")
            .iter()
            .any(|e| e["token"].as_u64() == Some(token)),
        "the lease expired instead of being released"
    );
    println!("SIGTERM mid-action: exited in {took:?}, outcome abandoned, lease released");
}

#[test]
fn a_lease_revoked_mid_action_stops_the_action_at_its_next_step() {
    require_root("the revoke test (eBPF exit probe)");
    let f = fleet("action-revoke", &policy("autonomous", "3s"));
    let c = &f.coordinator;
    let demo = free_addr();
    let agent = demo_agent(
        "revoke-1",
        &c.link("revoke-1"),
        demo,
        &["--ready-after", "60s"],
        "",
    );
    let journal_path = crash_into_a_long_restart(&agent, demo, 4);
    let planned = entries(&journal_entries(&journal_path), "planned", 0);
    let lease_id = planned[0]["lease_id"]
        .as_str()
        .expect("lease id")
        .to_owned();
    let token = planned[0]["token"].as_u64().expect("token");
    let out = interlock(
        c,
        &["lease", "revoke", &lease_id, "--reason", "test: stop it"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = Instant::now();
    agent.wait_for("the action to stop", Duration::from_secs(10), |_| {
        !entries(&journal_entries(&journal_path), "done", token).is_empty()
    });
    let stopped_in = revoked.elapsed();
    let journal = journal_entries(&journal_path);
    assert_eq!(entries(&journal, "done", token)[0]["outcome"], "abandoned");
    // Stopped because the renewal learnt the lease was gone, not by the deadline running out.
    assert!(agent.log().contains("lease lost"), "{}", agent.log());
    // The revoke is the audit's ending of this lease; the agent's outcome follows as late.
    agent.wait_for("the late outcome", Duration::from_secs(10), |_| {
        records(&audit(c), "outcome", "process_restart")
            .iter()
            .any(|o| o["token"].as_u64() == Some(token) && o["detail"]["late"] == true)
    });
    assert_eq!(records(&audit(c), "revoke", "process_restart").len(), 1);
    println!("revoke mid-action: the agent stopped {stopped_in:?} after the revoke");
}

#[test]
fn a_supervised_process_that_dies_before_the_exit_probe_loads_is_still_restarted() {
    require_root("the early-crash test (eBPF exit probe)");
    let f = fleet("action-early-crash", &policy("autonomous", "5s"));
    let c = &f.coordinator;
    let demo = free_addr();
    // Exits right after every start: the first exit comes milliseconds after the agent starts
    // it, long before the exit probe is loaded (0.3-1 s), so only the agent's own poll sees it.
    let agent = demo_agent(
        "early-1",
        &c.link("early-1"),
        demo,
        &["--crash-after", "0s"],
        "on = [\"crash\"]",
    );
    let starts = agent.dir().join("starts");
    agent.wait_for(
        "a restart after the early exit",
        Duration::from_secs(30),
        |_| demo_starts(&starts).len() >= 2,
    );
    agent.wait_for("the restart audited", Duration::from_secs(10), |_| {
        !records(&audit(c), "grant", "process_restart").is_empty()
    });
    // The path this test is about: the first exit was caught by the poll, not the probe.
    assert!(
        agent
            .log()
            .contains("watched process is gone (no exit event seen)"),
        "{}",
        agent.log()
    );
}

#[test]
fn an_agent_killed_and_started_again_adopts_its_running_service_instead_of_doubling_it() {
    require_root("the adoption test (eBPF exit probe)");
    let f = fleet("action-adopt", &policy("autonomous", "5s"));
    let c = &f.coordinator;
    let demo = free_addr();
    let mut agent = demo_agent(
        "adopt-1",
        &c.link("adopt-1"),
        demo,
        &["--ready-after", "0s"],
        "",
    );
    let starts = agent.dir().join("starts");
    wait_until(
        "the demo service healthy",
        Duration::from_secs(20),
        &agent,
        || demo_healthy(demo),
    );
    let first = demo_starts(&starts);
    assert_eq!(first.len(), 1);
    agent.signal("KILL");
    agent
        .wait_exit(Duration::from_secs(10))
        .expect("the agent died of SIGKILL");
    // Its service runs on without it (its own process group).
    assert!(demo_healthy(demo), "the service died with the agent");

    agent.restart(&[]);
    agent.wait_for("the adoption", Duration::from_secs(20), |a| {
        a.log().contains("supervised target adopted")
    });
    agent.wait_for("the process probe", Duration::from_secs(20), |a| {
        a.metric("interlock_agent_probe_loaded{probe=\"process\"}") == 1.0
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(demo_starts(&starts).len(), 1, "a second copy was started");
    assert!(demo_healthy(demo));

    // The adopted instance is watched and restarted like any other.
    crash_demo(demo);
    wait_until("the restart", Duration::from_secs(20), &agent, || {
        demo_starts(&starts).len() == 2 && demo_healthy(demo)
    });
    agent.wait_for("the outcome", Duration::from_secs(10), |_| {
        records(&audit(c), "outcome", "process_restart")
            .iter()
            .any(|o| o["reason"] == "success")
    });
    let second = demo_starts(&starts)[1];
    assert_ne!(second.0, first[0].0);
}
