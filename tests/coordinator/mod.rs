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

use interlock_tests::{
    Coordinator, CoordinatorOptions, Etcd,
    client::{self, channel},
    fresh_prefix,
};
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

/// A real etcd, one coordinator on it and a gRPC channel to the coordinator.
pub struct Fixture {
    /// Held so that etcd lives as long as the test.
    pub _etcd: Etcd,
    pub coordinator: Coordinator,
    pub channel: Channel,
}

pub async fn fixture(test: &str, policy: &str, host_ttl: &'static str) -> Fixture {
    let etcd = Etcd::start().expect("start etcd");
    let prefix = fresh_prefix(test);
    let mut options = CoordinatorOptions::etcd(etcd.endpoint(), prefix, policy);
    options.host_ttl = host_ttl;
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(std::time::Duration::from_secs(10))
        .expect("coordinator leads");
    let channel = channel(&coordinator.url()).await;
    Fixture {
        _etcd: etcd,
        coordinator,
        channel,
    }
}

/// Registers `n` hosts `<prefix>00..` in `service`.
pub async fn register_hosts(
    channel: &Channel,
    prefix: &str,
    service: &str,
    n: usize,
) -> Vec<String> {
    let mut agent = client::agent(channel);
    let mut hosts = Vec::with_capacity(n);
    for i in 0..n {
        let host = format!("{prefix}{i:02}");
        client::register(&mut agent, &host, service).await;
        hosts.push(host);
    }
    hosts
}
