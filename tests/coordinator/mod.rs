//! The coordinator against a real etcd: caps, expiry, budgets, modes, failover, durability
//! and bad input (issue: "Coordinator: etcd-fenced leases ..."). Every test records what it
//! observed from the client side and asserts the invariant on that history.

mod bad_input;
mod bad_tls;
mod budget;
mod cap;
mod cli;
mod durability;
mod expiry;
mod failover;
mod graph;
mod late_outcome;
mod modes;
mod quarantine;
mod tokens;
mod trust;

use interlock_tests::{ADMIN, Coordinator, CoordinatorOptions, Etcd, client, fresh_prefix};
use tonic::transport::Channel;

/// A policy with one class whose cap, mode and budgets the test chooses.
pub fn policy(cap: &str, mode: &str, fleet_max: u32, host_max: u32, lease_ttl: &str) -> String {
    format!(
        r#"
name = "test"
version = 1

[classes.disk_cleanup]
tier = "green"
mode = "{mode}"
trigger = "disk used above 90%"
false_positives = ["a batch job that writes then deletes"]
reversible = false
time_to_reverse = "none"
cap = {cap}
lease_ttl = "{lease_ttl}"
verification_window = "30s"
[classes.disk_cleanup.budget]
fleet = {{ max = {fleet_max}, window = "1h" }}
host = {{ max = {host_max}, window = "1h" }}

[classes.node_reboot]
tier = "red"
mode = "assist"
trigger = "kernel deadlock"
false_positives = ["slow disk"]
reversible = false
time_to_reverse = "10m"
cap = 1
lease_ttl = "10m"
verification_window = "10m"
[classes.node_reboot.budget]
fleet = {{ max = 1, window = "24h" }}
host = {{ max = 1, window = "24h" }}
"#
    )
}

/// A real etcd, one coordinator on it serving mutual TLS, and the default operator's channel
/// (`admin`, role admin). Agent calls go over `coordinator.host_channel(host)`.
pub struct Fixture {
    /// Held so that etcd lives as long as the test.
    pub _etcd: Etcd,
    pub coordinator: Coordinator,
    pub admin: Channel,
}

pub async fn fixture(test: &str, policy: &str, host_ttl: &'static str) -> Fixture {
    fixture_granting(test, policy, host_ttl, &[]).await
}

/// A fixture whose policy also grants these operators their roles (`[access.operators]`).
pub async fn fixture_granting(
    test: &str,
    policy: &str,
    host_ttl: &'static str,
    operators: &[(&str, &str)],
) -> Fixture {
    let etcd = Etcd::start().expect("start etcd");
    let prefix = fresh_prefix(test);
    let mut options = CoordinatorOptions::etcd(etcd.endpoint(), prefix, policy);
    for (name, role) in operators {
        options = options.grant(name, role);
    }
    options.host_ttl = host_ttl;
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(std::time::Duration::from_secs(10))
        .expect("coordinator leads");
    let admin = coordinator.operator_channel(ADMIN).await;
    Fixture {
        _etcd: etcd,
        coordinator,
        admin,
    }
}

/// Registers `n` hosts `<prefix>00..` in `service`, each over its own certificate's channel
/// (a host acts only for itself); `coordinator.host_channel(host)` gives that channel again.
pub async fn register_hosts(
    coordinator: &Coordinator,
    prefix: &str,
    service: &str,
    n: usize,
) -> Vec<String> {
    let mut hosts = Vec::with_capacity(n);
    for i in 0..n {
        let host = format!("{prefix}{i:02}");
        let mut agent = client::agent(&coordinator.host_channel(&host).await);
        client::register(&mut agent, &host, service).await;
        hosts.push(host);
    }
    hosts
}

/// The agent API as `host` (its certificate's channel).
pub async fn agent_for(
    coordinator: &Coordinator,
    host: &str,
) -> interlock_proto::v1::agent_client::AgentClient<Channel> {
    client::agent(&coordinator.host_channel(host).await)
}
