//! Fleet-level action tests (several real agents against one coordinator on real etcd).
//!
//! Each agent supervises its own demo service (`interlock-agent demo-service`), sees its exits
//! through the real eBPF exit probe and restarts it only under a lease. The tests read what
//! happened from three independent records — each agent's fsynced journal, the coordinator's
//! hash-chained audit (through the `interlock` CLI, as an operator would) and the demo
//! services' own `--starts` files — and assert the safety invariants on those histories:
//! the cap (I1) and token order (I2) over a rolling repair of five hosts, and the budget freeze
//! (I3) that keeps a flapping process down until an operator unfreezes the class.
//!
//! Every wait is bounded in time; agents (and with them the services they supervise), the
//! coordinator and etcd are stopped by pid when their handles drop, also on panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use interlock_tests::agent::{
    Agent, Link, crash_demo, demo_healthy, demo_starts, free_addr, journal_entries, unix_ms,
};
use interlock_tests::client::{HeldInterval, max_overlap, token_order_violations};
use interlock_tests::coordinator::binary;
use interlock_tests::{Coordinator, CoordinatorOptions, Etcd, fresh_prefix, require_root};
use serde_json::Value;

const CLASS: &str = "process_restart";
/// The agent's gauge saying its exit probe (`process_exit`) is attached.
const PROCESS_PROBE_LOADED: &str = "interlock_agent_probe_loaded{probe=\"process\"}";

/// A policy with only `process_restart`, autonomous, with the cap and budgets the test picks.
fn restart_policy(cap: u32, fleet_max: u32, host_max: u32, webhook: Option<&str>) -> String {
    let webhook = webhook.map_or(String::new(), |url| format!("alert_webhook = \"{url}\"\n"));
    format!(
        r#"
name = "fleet"
version = 1
{webhook}
[classes.process_restart]
tier = "green"
mode = "autonomous"
trigger = "a supervised demo service exited"
false_positives = ["a deliberate stop during a deploy"]
reversible = true
time_to_reverse = "30s"
cap = {cap}
lease_ttl = "5s"
verification_window = "30s"
[classes.process_restart.budget]
fleet = {{ max = {fleet_max}, window = "1h" }}
host = {{ max = {host_max}, window = "1h" }}
"#
    )
}

/// One host of the fleet: an agent and the demo service it supervises.
struct FleetHost {
    host: String,
    demo: SocketAddr,
    agent: Agent,
}

impl FleetHost {
    /// Starts an agent (JSON logs, so the test can read fields) whose one restart target is a
    /// demo service on a port of its own, started with `demo_args` added.
    fn start(host: &str, link: &Link, demo_args: &[&str]) -> Self {
        let demo = free_addr();
        let exe = binary("interlock-agent");
        let agent = Agent::start(|dir, metrics| {
            let mut argv = vec![
                exe.display().to_string(),
                "demo-service".into(),
                "--listen".into(),
                demo.to_string(),
                "--starts".into(),
                dir.join("starts").display().to_string(),
            ];
            argv.extend(demo_args.iter().map(|a| (*a).to_owned()));
            let argv = argv
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                r#"
host_id = "{host}"
coordinator = "{url}"
log_format = "json"
[labels]
service = "demo"
[metrics]
listen = "{metrics}"
[actions]
journal = "{journal}"
cooldown = "1s"
retry = "300ms"
lease_margin = "500ms"
on_agent_stop = "stop"
[[restart.target]]
name = "demo"
argv = [{argv}]
http = "http://{demo}/healthz"
health_window = "10s"
grace = "2s"
cooldown = "1s"
{tls}"#,
                url = link.url,
                tls = link.tls,
                journal = dir.join("actions.journal").display(),
            )
        });
        Self {
            host: host.to_owned(),
            demo,
            agent,
        }
    }

    /// The demo service's starts: `(pid, unix_ms)`.
    fn starts(&self) -> Vec<(u32, u64)> {
        demo_starts(&self.agent.dir().join("starts"))
    }

    fn journal(&self) -> Vec<Value> {
        journal_entries(&self.agent.dir().join("actions.journal"))
    }

    /// The agent's JSON log events whose message is `message`, as their `fields` objects.
    fn events(&self, message: &str) -> Vec<Value> {
        self.agent
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|mut v| v["fields"].take())
            .filter(|f| f["message"] == message)
            .collect()
    }

    /// How many times the agent logged a denial naming `check`.
    fn denials(&self, check: &str) -> usize {
        self.events("lease denied; not acting")
            .iter()
            .filter(|f| f["check"] == check)
            .count()
    }

    /// Waits (bounded) until the agent's exit probe is attached, and returns when it was seen
    /// (unix ms). The agent starts its supervised targets before it loads its probes; exits
    /// before then are only seen by its slower poll.
    fn wait_exit_probe(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.agent.metric(PROCESS_PROBE_LOADED) == 1.0 {
                return unix_ms();
            }
            assert!(
                Instant::now() < deadline,
                "{}: the process exit probe did not load within 30 s\n{}",
                self.host,
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the agent's log, for failure messages.
    fn log_tail(&self, lines: usize) -> String {
        let log = self.agent.log();
        let all: Vec<&str> = log.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- {} log (last {lines} lines)\n{}",
            self.host,
            all[from..].join("\n")
        )
    }
}

/// Runs the operator CLI against `coordinator` as `operator` (that operator's certificate).
fn interlock(coordinator: &Coordinator, operator: &str, args: &[&str]) -> Output {
    coordinator
        .cli(operator)
        .args(args)
        .output()
        .expect("run interlock")
}

/// `interlock -o json ARGS` parsed; panics (with stderr) unless it succeeded.
fn interlock_json(coordinator: &Coordinator, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = interlock(coordinator, "fleet-test", &all);
    assert!(
        out.status.success(),
        "interlock {args:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "interlock {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The whole audit log of the class, after checking its hash chain.
fn audit(coordinator: &Coordinator) -> Vec<Value> {
    let reply = interlock_json(coordinator, &["audit", "--class", CLASS]);
    assert_eq!(
        reply["chain_ok"], true,
        "audit chain broken: {}",
        reply["chain_error"]
    );
    reply["records"].as_array().cloned().unwrap_or_default()
}

fn of_kind<'a>(records: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    records.iter().filter(move |r| r["kind"] == kind)
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

/// Polls `ok` every 200 ms; after `within`, panics with `context()`.
fn wait_until(
    what: &str,
    within: Duration,
    mut ok: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    loop {
        if ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {within:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Maps the unix-millisecond stamps of journals and audit records onto `Instant`s, so the
/// history checkers of the client harness can read them (one machine, one wall clock).
struct WallClock {
    instant: Instant,
    unix_ms: u64,
}

impl WallClock {
    fn now() -> Self {
        Self {
            instant: Instant::now(),
            unix_ms: unix_ms(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        if ms >= self.unix_ms {
            self.instant + Duration::from_millis(ms - self.unix_ms)
        } else {
            self.instant
                .checked_sub(Duration::from_millis(self.unix_ms - ms))
                .unwrap_or(self.instant)
        }
    }
}

/// Seconds from `from` to `to` (unix ms), signed, for the printed timelines.
fn secs(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1000.0
}

/// What one lease looked like from the coordinator's audit and the agent's journal.
#[derive(Debug)]
struct Repair {
    host: String,
    client: usize,
    token: u64,
    granted_at: u64,
    outcome_at: u64,
    outcome: String,
    planned_at: u64,
    done_at: u64,
    journal_outcome: String,
}

/// The agent's journaled action under `token`: (planned.at, done.at, done.outcome).
fn journaled(journal: &[Value], token: u64) -> Option<(u64, u64, String)> {
    let planned = journal
        .iter()
        .find(|e| e["entry"] == "planned" && e["token"] == token)?;
    let done = journal
        .iter()
        .find(|e| e["entry"] == "done" && e["token"] == token)?;
    Some((
        u64_of(&planned["at"]),
        u64_of(&done["at"]),
        done["outcome"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[test]
fn five_agents_repair_one_host_at_a_time_under_cap_1() {
    require_root("the fleet restart test (eBPF exit probe)");
    let clock = WallClock::now();
    let etcd = Etcd::start().expect("start etcd");
    let options = CoordinatorOptions::etcd(
        etcd.endpoint(),
        fresh_prefix("fleet-cap"),
        &restart_policy(1, 1000, 100, None),
    )
    .grant("fleet-test", "viewer");
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(Duration::from_secs(20))
        .expect("leader");
    let c = &coordinator;
    let hosts: Vec<FleetHost> = (1..=5)
        .map(|i| {
            let host = format!("fleet-{i}");
            FleetHost::start(&host, &c.link(&host), &["--ready-after", "800ms"])
        })
        .collect();
    let context = || {
        let mut text = hosts
            .iter()
            .map(|h| h.log_tail(25))
            .collect::<Vec<_>>()
            .join("\n");
        let log = coordinator.log();
        let lines: Vec<&str> = log.lines().collect();
        text.push_str("\n--- coordinator log (last 30 lines)\n");
        text.push_str(&lines[lines.len().saturating_sub(30)..].join("\n"));
        text
    };

    wait_until(
        "five healthy demo services and five registered hosts",
        Duration::from_secs(30),
        || {
            hosts.iter().all(|h| demo_healthy(h.demo))
                && interlock_json(c, &["hosts"])["hosts"]
                    .as_array()
                    .is_some_and(|a| a.len() == 5)
        },
        context,
    );
    for h in &hosts {
        // Exits are seen only once the exit probe is attached (a crash before that would go
        // unnoticed: see `wait_exit_probe`).
        h.wait_exit_probe();
        assert_eq!(h.starts().len(), 1, "{} started more than once", h.host);
    }

    // All five crash at once.
    let crashed_at = unix_ms();
    std::thread::scope(|s| {
        for h in &hosts {
            s.spawn(|| crash_demo(h.demo));
        }
    });

    // Every host restarted once, healthy again, its action journaled to the end and its
    // outcome recorded by the coordinator.
    wait_until(
        "rolling repair of all five hosts",
        Duration::from_secs(60),
        || {
            hosts.iter().all(|h| {
                h.starts().len() >= 2
                    && demo_healthy(h.demo)
                    && h.journal().iter().any(|e| e["entry"] == "done")
            }) && of_kind(&audit(c), "outcome").count() >= 5
        },
        context,
    );
    let repaired_at = unix_ms();
    // A repaired host is not repaired again: nothing more happens for a while.
    std::thread::sleep(Duration::from_secs(3));

    let records = audit(c);
    let grants: Vec<&Value> = of_kind(&records, "grant").collect();
    let mut repairs = Vec::new();
    for (client, h) in hosts.iter().enumerate() {
        let starts = h.starts();
        assert_eq!(
            starts.len(),
            2,
            "{}: one initial start and exactly one restart expected, got {starts:?}\n{}",
            h.host,
            context()
        );
        assert_ne!(starts[0].0, starts[1].0, "{}: the same pid twice", h.host);
        // Healthy within a few polls (a loaded machine can miss one), else a diagnosis.
        let healthy_by = Instant::now() + Duration::from_secs(5);
        while !demo_healthy(h.demo) && Instant::now() < healthy_by {
            std::thread::sleep(Duration::from_millis(200));
        }
        if !demo_healthy(h.demo) {
            let pid = starts[1].0;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let health = interlock_tests::coordinator::http_get(h.demo, "/healthz");
            panic!(
                "{} is not healthy after its restart: pid {pid} stat {stat:?}, /healthz {health:?}\n{}",
                h.host,
                context()
            );
        }

        let mine: Vec<&&Value> = grants.iter().filter(|g| g["host"] == h.host).collect();
        assert_eq!(
            mine.len(),
            1,
            "{}: exactly one grant expected: {mine:?}",
            h.host
        );
        let grant = mine[0];
        let token = u64_of(&grant["token"]);
        assert!(token > 0, "grant without a token: {grant}");
        let outcome = of_kind(&records, "outcome")
            .find(|r| r["token"] == token)
            .unwrap_or_else(|| panic!("{}: no outcome under token {token}", h.host));
        assert_eq!(outcome["host"], h.host.as_str(), "{outcome}");
        assert_eq!(outcome["lease_id"], grant["lease_id"], "{outcome}");
        assert_eq!(outcome["reason"], "success", "{}: {outcome}", h.host);

        let journal = h.journal();
        let planned: Vec<&Value> = journal.iter().filter(|e| e["entry"] == "planned").collect();
        assert_eq!(planned.len(), 1, "{}: journal {journal:?}", h.host);
        assert_eq!(planned[0]["token"], token, "{}: journal token", h.host);
        assert_eq!(planned[0]["lease_id"], grant["lease_id"]);
        let (planned_at, done_at, journal_outcome) = journaled(&journal, token)
            .unwrap_or_else(|| panic!("{}: token {token} not closed in {journal:?}", h.host));
        assert_eq!(journal_outcome, "success", "{}", h.host);
        repairs.push(Repair {
            host: h.host.clone(),
            client,
            token,
            granted_at: u64_of(&grant["at_ms"]),
            outcome_at: u64_of(&outcome["at_ms"]),
            outcome: outcome["reason"].as_str().unwrap_or_default().to_owned(),
            planned_at,
            done_at,
            journal_outcome,
        });
    }
    assert_eq!(grants.len(), 5, "one grant per host, no more: {grants:?}");
    repairs.sort_by_key(|r| r.granted_at);

    // The history as each side recorded it.
    let held = |from: fn(&Repair) -> (u64, u64)| -> Vec<HeldInterval> {
        repairs
            .iter()
            .map(|r| {
                let (start, end) = from(r);
                HeldInterval {
                    client: r.client,
                    token: r.token,
                    // Neither record knows when the request was sent; the start stands for it.
                    acquire_sent: clock.at(start),
                    acquired: clock.at(start),
                    released: clock.at(end),
                }
            })
            .collect()
    };
    let by_audit = held(|r| (r.granted_at, r.outcome_at));
    let by_journal = held(|r| (r.planned_at, r.done_at));

    let cap_denials = of_kind(&records, "deny")
        .filter(|r| r["detail"]["check"] == "cap")
        .count();
    let logged_cap_denials: usize = hosts.iter().map(|h| h.denials("cap")).sum();
    println!(
        "rolling repair after a crash of all five at t=0 (cap 1): {cap_denials} cap denials audited, {logged_cap_denials} logged by agents"
    );
    for r in &repairs {
        let denied = of_kind(&records, "deny")
            .filter(|d| d["host"] == r.host.as_str() && d["detail"]["check"] == "cap")
            .count();
        println!(
            "  {host}  token {token:>6}  granted {g:>6.3}s  journaled {p:>6.3}s..{d:>6.3}s  outcome {o:>6.3}s ({outcome}/{jo})  held {held:.3}s  cap denials {denied}",
            host = r.host,
            token = r.token,
            g = secs(crashed_at, r.granted_at),
            p = secs(crashed_at, r.planned_at),
            d = secs(crashed_at, r.done_at),
            o = secs(crashed_at, r.outcome_at),
            outcome = r.outcome,
            jo = r.journal_outcome,
            held = secs(r.granted_at, r.outcome_at),
        );
    }
    println!(
        "  all five healthy again {:.3}s after the crash",
        secs(crashed_at, repaired_at)
    );

    // I1: never two holders at once, by either record; the agent acted only inside its lease.
    assert!(
        max_overlap(&by_audit) <= 1,
        "cap 1 exceeded in the audit: {repairs:#?}"
    );
    assert!(
        max_overlap(&by_journal) <= 1,
        "cap 1 exceeded by the agents' journals: {repairs:#?}"
    );
    for r in &repairs {
        assert!(
            r.granted_at <= r.planned_at && r.done_at <= r.outcome_at,
            "{}: journaled action outside its lease: {r:?}",
            r.host
        );
    }
    // I2: tokens increase in the order the leases were held.
    assert_eq!(token_order_violations(&by_audit), Vec::<(u64, u64)>::new());
    assert_eq!(
        token_order_violations(&by_journal),
        Vec::<(u64, u64)>::new()
    );
    // The cap was really the limit: others asked while one held and were turned away.
    assert!(
        cap_denials >= 1,
        "no audited cap denial: the cap was never reached\n{}",
        context()
    );
    assert!(
        logged_cap_denials >= 1,
        "no agent logged a cap denial\n{}",
        context()
    );
}

/// How long the flapping service lives after each start: long enough that each restart's
/// health check passes (so every grant ends in a success), short enough to flap quickly.
/// (An exit before the agent's exit probe is attached is caught by the agent's own poll; the
/// `actions` tests cover that path.)
const FLAP_MS: u64 = 3000;

/// The unix ms of the demo service's first start (bounded wait for its `--starts` line).
fn wait_first_start(h: &FleetHost) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(&(_, at)) = h.starts().first() {
            return at;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the demo service never started\n{}",
            h.host,
            h.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_flapping_process_exhausts_the_budget_freezes_and_stays_down_until_unfreeze() {
    require_root("the fleet budget test (eBPF exit probe)");
    let etcd = Etcd::start().expect("start etcd");
    let (webhook_url, alerts) = interlock_tests::webhook::receiver();
    let options = CoordinatorOptions::etcd(
        etcd.endpoint(),
        fresh_prefix("fleet-budget"),
        &restart_policy(1, 3, 100, Some(&webhook_url)),
    )
    .grant("fleet-test", "viewer")
    .grant("carol", "operator");
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(Duration::from_secs(20))
        .expect("leader");
    let c = &coordinator;
    // Ready 100 ms after each start (so a restart verifies), dead FLAP_MS after it.
    let flap = format!("{FLAP_MS}ms");
    let h = FleetHost::start(
        "flap-1",
        &c.link("flap-1"),
        &["--ready-after", "100ms", "--crash-after", &flap],
    );
    // The agent starts the service before it loads its exit probe and misses an exit that
    // comes first; FLAP_MS leaves the probe time to load. Say so if it came late anyway, so
    // that a failure below names its cause.
    let probe_at = h.wait_exit_probe();
    let first_crash = wait_first_start(&h) + FLAP_MS;
    let race = if probe_at > first_crash {
        format!(
            "NOTE: the exit probe was seen attached {} ms after the first crash was due; the \
             agent does not notice an exit of a supervised target before its probe is attached",
            probe_at - first_crash
        )
    } else {
        String::new()
    };
    let context = || {
        let log = coordinator.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "{}\n--- coordinator log (last 30 lines)\n{}\nstarts: {:?}\n{race}",
            h.log_tail(40),
            lines[lines.len().saturating_sub(30)..].join("\n"),
            h.starts()
        )
    };

    // Three restarts use the fleet budget; the fourth request finds it exhausted and freezes
    // the class.
    wait_until(
        "freeze of process_restart",
        Duration::from_secs(60),
        || of_kind(&audit(c), "freeze").next().is_some(),
        context,
    );
    let frozen_at = unix_ms();
    let records = audit(c);
    let grants = of_kind(&records, "grant").count();
    assert_eq!(grants, 3, "exactly the budget's 3 grants\n{}", context());
    let freeze = of_kind(&records, "freeze").next().expect("freeze record");
    assert_eq!(freeze["detail"]["cause"], "fleet_budget", "{freeze}");
    let budget_denial = of_kind(&records, "deny")
        .find(|r| r["detail"]["check"] == "fleet_budget")
        .unwrap_or_else(|| panic!("no fleet_budget denial in {records:#?}"));
    assert_eq!(budget_denial["host"], "flap-1");
    assert!(
        budget_denial["reason"]
            .as_str()
            .is_some_and(|r| r.contains("3 of 3")),
        "{budget_denial}"
    );
    assert!(
        of_kind(&records, "alert").next().is_some(),
        "no alert record: {records:#?}"
    );
    let status = interlock_json(c, &["status"]);
    let class = status["classes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["class"] == CLASS))
        .unwrap_or_else(|| panic!("{CLASS} missing from status: {status}"));
    assert!(
        class["freezes"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["cause"] == "fleet_budget")),
        "status does not show the class frozen by the budget: {class}"
    );
    let body = alerts
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook was called");
    let alert: Value = serde_json::from_str(&body).expect("alert JSON");
    assert_eq!(alert["class"], CLASS, "{alert}");
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.contains("frozen")),
        "{alert}"
    );

    // Frozen: the process keeps crashing and the agent keeps asking, but nothing restarts it.
    let starts = h.starts();
    assert_eq!(
        starts.len(),
        4,
        "1 start and 3 restarts expected: {starts:?}\n{}",
        context()
    );
    let frozen_denials = h.denials("frozen");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(h.starts(), starts, "restarted while frozen\n{}", context());
    assert!(!demo_healthy(h.demo), "the demo service runs while frozen");
    let records = audit(c);
    assert_eq!(
        of_kind(&records, "grant").count(),
        3,
        "granted while frozen: {records:#?}"
    );
    let denied_while_frozen = h.denials("frozen") - frozen_denials;
    assert!(
        denied_while_frozen >= 2,
        "the agent should keep asking (every cooldown) and be denied as frozen; {denied_while_frozen} denials in 4 s\n{}",
        context()
    );
    let audited_frozen = of_kind(&records, "deny")
        .filter(|r| r["detail"]["check"] == "frozen")
        .count();

    // An operator unfreezes: a fresh window, and the agent restarts the service again.
    let out = interlock(
        c,
        "carol",
        &[
            "unfreeze",
            "--class",
            CLASS,
            "--reason",
            "flapping cause understood",
        ],
    );
    assert!(
        out.status.success(),
        "unfreeze: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unfrozen_at = unix_ms();
    wait_until(
        "a grant and a start after the unfreeze",
        Duration::from_secs(30),
        || h.starts().len() > starts.len() && of_kind(&audit(c), "grant").count() > 3,
        context,
    );
    let records = audit(c);
    let unfreeze = of_kind(&records, "unfreeze")
        .next()
        .unwrap_or_else(|| panic!("no unfreeze record: {records:#?}"));
    assert_eq!(unfreeze["owner"], "operator:carol", "{unfreeze}");
    let grants: Vec<&Value> = of_kind(&records, "grant").collect();
    let fourth = grants[3];
    assert!(
        u64_of(&fourth["seq"]) > u64_of(&unfreeze["seq"]),
        "the fourth grant precedes the unfreeze: {fourth} {unfreeze}"
    );
    let after = h.starts();
    let new_start = after[starts.len()];
    assert!(
        new_start.1 >= u64_of(&unfreeze["at_ms"]),
        "a start {new_start:?} before the unfreeze {unfreeze}"
    );

    // The timeline.
    let t0 = starts[0].1;
    println!("flapping service (crashes {FLAP_MS} ms after each start); t=0 at its first start");
    for (i, (pid, at)) in after.iter().enumerate() {
        println!("  start {i}: pid {pid} at {:>7.3}s", secs(t0, *at));
    }
    for g in &grants {
        let token = u64_of(&g["token"]);
        let outcome = of_kind(&records, "outcome")
            .find(|r| r["token"] == token)
            .map_or("(open)".to_owned(), |r| {
                format!("{} at {:.3}s", r["reason"], secs(t0, u64_of(&r["at_ms"])))
            });
        println!(
            "  grant token {token} at {:>7.3}s  outcome {outcome}",
            secs(t0, u64_of(&g["at_ms"]))
        );
    }
    println!(
        "  budget denial at {:.3}s, freeze at {:.3}s (seen by the test at {:.3}s), alert received",
        secs(t0, u64_of(&budget_denial["at_ms"])),
        secs(t0, u64_of(&freeze["at_ms"])),
        secs(t0, frozen_at)
    );
    println!(
        "  while frozen: {denied_while_frozen} frozen denials logged by the agent in 4 s ({audited_frozen} audited in all), starts stayed at {}",
        starts.len()
    );
    println!(
        "  unfreeze by carol at {:.3}s; next grant at {:.3}s, next start at {:.3}s",
        secs(t0, unfrozen_at),
        secs(t0, u64_of(&fourth["at_ms"])),
        secs(t0, new_start.1)
    );
    let by_kind: BTreeMap<&str, usize> = records.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r["kind"].as_str().unwrap_or("?")).or_default() += 1;
        m
    });
    println!("  audit records by kind: {by_kind:?}");
}
