//! TCP flows per (process, remote endpoint): the aggregation shared by the `flows` view and the
//! flow edges the agent reports to the coordinator, and the `interlock-agent flows` command.
//!
//! [`FlowTable`] is pure: records in, counts and rates out (the caller passes the elapsed time).
//! [`watch`] is the only part that loads probes and writes to stdout.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use interlock_agent_common::tcp_state;
use serde_json::json;

use crate::probes::{
    ConnectFailureRecord, ConnectFailures, FlowStats, ProbeError, ProbeOptions, ProbeSet,
    TcpEvents, TcpStateRecord,
};

/// One edge of the dependency graph seen from this host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    /// The connecting process's `comm`.
    pub process: String,
    pub remote: SocketAddr,
}

/// What happened on one edge during a period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// Outgoing connects started (`CLOSE → SYN_SENT`).
    pub connects: u64,
    /// Connects that ended without being established.
    pub failures: u64,
    /// Of the failures, those refused by a reset.
    pub refused: u64,
    pub retransmits: u64,
}

/// One edge with per-second rates over a period.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowRate {
    pub key: FlowKey,
    pub counts: FlowCounts,
    pub connects_per_s: f64,
    pub failures_per_s: f64,
    pub retransmits_per_s: f64,
}

/// Counts per (process, remote) for one period.
#[derive(Clone, Debug, Default)]
pub struct FlowTable {
    edges: BTreeMap<FlowKey, FlowCounts>,
    /// Retransmits come keyed by socket addresses, without a process.
    retransmits: BTreeMap<SocketAddr, u64>,
}

impl FlowTable {
    /// Counts an outgoing connect; other transitions are ignored.
    pub fn tcp(&mut self, record: &TcpStateRecord) {
        if record.new_state == tcp_state::SYN_SENT {
            self.entry(&record.comm, record.remote).connects += 1;
        }
    }

    pub fn failure(&mut self, record: &ConnectFailureRecord) {
        let counts = self.entry(&record.comm, record.remote);
        counts.failures += 1;
        counts.refused += u64::from(record.refused);
    }

    pub fn retransmits(&mut self, remote: SocketAddr, n: u64) {
        *self.retransmits.entry(remote).or_insert(0) += n;
    }

    fn entry(&mut self, process: &str, remote: SocketAddr) -> &mut FlowCounts {
        self.edges
            .entry(FlowKey {
                process: process.to_owned(),
                remote,
            })
            .or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty() && self.retransmits.is_empty()
    }

    /// Failed connects per remote endpoint (all processes), for the connect-failure baseline.
    pub fn failures_by_remote(&self) -> BTreeMap<SocketAddr, u64> {
        let mut out = BTreeMap::new();
        for (key, counts) in &self.edges {
            *out.entry(key.remote).or_insert(0) += counts.failures;
        }
        out
    }

    /// Every edge with rates over `elapsed`, busiest first. Retransmits to a remote go to the
    /// process with the most connects there (or to process `""` when no connect was seen).
    pub fn rates(&self, elapsed: Duration) -> Vec<FlowRate> {
        let mut edges = self.edges.clone();
        for (remote, &n) in &self.retransmits {
            let owner = edges
                .iter()
                .filter(|(k, _)| k.remote == *remote)
                .max_by_key(|(_, c)| c.connects)
                .map(|(k, _)| k.clone())
                .unwrap_or(FlowKey {
                    process: String::new(),
                    remote: *remote,
                });
            edges.entry(owner).or_default().retransmits += n;
        }
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = |n: u64| n as f64 / secs;
        let mut out: Vec<FlowRate> = edges
            .into_iter()
            .map(|(key, counts)| FlowRate {
                connects_per_s: rate(counts.connects),
                failures_per_s: rate(counts.failures),
                retransmits_per_s: rate(counts.retransmits),
                key,
                counts,
            })
            .collect();
        out.sort_by(|a, b| {
            let busy = |r: &FlowRate| r.counts.connects + r.counts.failures + r.counts.retransmits;
            busy(b).cmp(&busy(a)).then_with(|| a.key.cmp(&b.key))
        });
        out
    }
}

/// The probes the flow view reads, each optional: what loaded, and why the rest did not.
#[derive(Debug)]
pub struct FlowProbes {
    sets: Vec<ProbeSet>,
    pub tcp: Option<TcpEvents>,
    pub failures: Option<ConnectFailures>,
    pub stats: Option<FlowStats>,
    /// (probe name, why it did not load).
    pub missing: Vec<(&'static str, ProbeError)>,
}

impl FlowProbes {
    /// Loads the TCP lifecycle program (connects and failed connects) and the flow counters
    /// (retransmits), each on its own so one failure leaves the other working.
    pub fn load() -> Self {
        let mut this = Self {
            sets: Vec::new(),
            tcp: None,
            failures: None,
            stats: None,
            missing: Vec::new(),
        };
        match ProbeSet::load(&ProbeOptions {
            tcp_state: true,
            ..ProbeOptions::none()
        }) {
            Ok(mut set) => {
                this.tcp = set.take_tcp_events().ok();
                this.failures = set.take_connect_failures().ok();
                this.sets.push(set);
            }
            Err(e) => this.missing.push(("tcp", e)),
        }
        match ProbeSet::load(&ProbeOptions {
            flows: true,
            ..ProbeOptions::none()
        }) {
            Ok(mut set) => {
                this.stats = set.take_flow_stats().ok();
                this.sets.push(set);
            }
            Err(e) => this.missing.push(("flows", e)),
        }
        this
    }

    /// The loaded probe sets (for their kernel counters).
    pub fn sets(&self) -> &[ProbeSet] {
        &self.sets
    }

    /// Moves everything queued since the last call into `table`; returns how many TCP
    /// transitions and failed connects were drained.
    pub fn drain_into(&mut self, table: &mut FlowTable) -> (usize, usize) {
        let (mut transitions, mut failed) = (0, 0);
        if let Some(tcp) = &mut self.tcp {
            let mut batch = Vec::new();
            transitions = tcp.drain(&mut batch);
            batch.iter().for_each(|r| table.tcp(r));
        }
        if let Some(failures) = &mut self.failures {
            let mut batch = Vec::new();
            failed = failures.drain(&mut batch);
            batch.iter().for_each(|r| table.failure(r));
        }
        if let Some(stats) = &mut self.stats
            && let Ok(records) = stats.drain()
        {
            for r in records {
                table.retransmits(r.remote, r.retransmits);
            }
        }
        (transitions, failed)
    }
}

/// How the `flows` command prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowsFormat {
    Table,
    Json,
}

/// Why the flows view could not run.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("no TCP probe could be loaded: {0}")]
    NoProbe(String),
    #[error("writing to stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

/// Prints the flow table every `interval`, `count` times (forever when `None`) or until
/// `shutdown` completes.
pub async fn watch(
    interval: Duration,
    count: Option<u64>,
    format: FlowsFormat,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FlowsError> {
    let mut probes = FlowProbes::load();
    if probes.tcp.is_none() && probes.stats.is_none() {
        let why = probes
            .missing
            .iter()
            .map(|(p, e)| format!("{p}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(FlowsError::NoProbe(why));
    }
    for (probe, e) in &probes.missing {
        eprintln!("note: probe {probe} not loaded ({e}); its columns stay at 0");
    }
    tokio::pin!(shutdown);
    let mut drain = tokio::time::interval(Duration::from_millis(100));
    let mut table = FlowTable::default();
    let mut started = Instant::now();
    let mut printed = 0u64;
    loop {
        tokio::select! {
            _ = drain.tick() => {
                probes.drain_into(&mut table);
                if started.elapsed() >= interval {
                    let rates = table.rates(started.elapsed());
                    let text = match format {
                        FlowsFormat::Table => render_table(&rates),
                        FlowsFormat::Json => render_json(&rates),
                    };
                    let mut out = std::io::stdout().lock();
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                    table = FlowTable::default();
                    started = Instant::now();
                    printed += 1;
                    if count.is_some_and(|c| printed >= c) {
                        return Ok(());
                    }
                }
            }
            () = &mut shutdown => return Ok(()),
        }
    }
}

/// A table for people, one edge per line, busiest first.
pub fn render_table(rates: &[FlowRate]) -> String {
    let mut out = format!(
        "{:<16} {:<40} {:>9} {:>9} {:>9} {:>10} {:>10}\n",
        "PROCESS", "REMOTE", "CONNECTS", "FAILURES", "RETRANS", "CONN/S", "FAIL/S"
    );
    for r in rates {
        out.push_str(&format!(
            "{:<16} {:<40} {:>9} {:>9} {:>9} {:>10.2} {:>10.2}\n",
            if r.key.process.is_empty() {
                "-"
            } else {
                &r.key.process
            },
            r.key.remote.to_string(),
            r.counts.connects,
            r.counts.failures,
            r.counts.retransmits,
            r.connects_per_s,
            r.failures_per_s
        ));
    }
    out.push('\n');
    out
}

/// One JSON document per refresh, on one line (so scripts can read line by line).
pub fn render_json(rates: &[FlowRate]) -> String {
    let flows: Vec<_> = rates
        .iter()
        .map(|r| {
            json!({
                "process": r.key.process,
                "remote": r.key.remote.to_string(),
                "connects": r.counts.connects,
                "failures": r.counts.failures,
                "refused": r.counts.refused,
                "retransmits": r.counts.retransmits,
                "connects_per_s": r.connects_per_s,
                "failures_per_s": r.failures_per_s,
                "retransmits_per_s": r.retransmits_per_s,
            })
        })
        .collect();
    format!("{}\n", json!({ "flows": flows }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(comm: &str, remote: &str, new_state: i32) -> TcpStateRecord {
        TcpStateRecord {
            ts_ns: 0,
            socket: 1,
            pid: 1,
            comm: comm.into(),
            old_state: tcp_state::CLOSE,
            new_state,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    #[test]
    fn connects_failures_and_retransmits_aggregate_per_edge() {
        let mut t = FlowTable::default();
        t.tcp(&tcp("curl", "10.0.0.1:80", tcp_state::SYN_SENT));
        t.tcp(&tcp("curl", "10.0.0.1:80", tcp_state::SYN_SENT));
        t.tcp(&tcp("curl", "10.0.0.1:80", tcp_state::ESTABLISHED));
        t.tcp(&tcp("wget", "10.0.0.2:443", tcp_state::SYN_SENT));
        t.failure(&ConnectFailureRecord {
            ts_ns: 0,
            started_ns: 0,
            socket: 1,
            pid: 1,
            tid: 1,
            comm: "curl".into(),
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "10.0.0.1:80".parse().unwrap(),
            refused: true,
        });
        t.retransmits("10.0.0.1:80".parse().unwrap(), 4);
        t.retransmits("10.0.0.9:22".parse().unwrap(), 1);
        let rates = t.rates(Duration::from_secs(2));
        assert_eq!(rates.len(), 3);
        assert_eq!(rates[0].key.process, "curl");
        assert_eq!(
            rates[0].counts,
            FlowCounts {
                connects: 2,
                failures: 1,
                refused: 1,
                retransmits: 4
            }
        );
        assert!((rates[0].connects_per_s - 1.0).abs() < 1e-9);
        assert!(
            rates
                .iter()
                .any(|r| r.key.process.is_empty() && r.counts.retransmits == 1)
        );
        assert_eq!(t.failures_by_remote()[&"10.0.0.1:80".parse().unwrap()], 1);
        assert!(render_json(&rates).contains("\"process\":\"curl\""));
        assert!(render_table(&rates).contains("curl"));
    }
}
