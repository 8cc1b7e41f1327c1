//! TCP flows per (process, remote endpoint): the aggregation shared by the `flows` view and the
//! flow edges the agent reports to the coordinator, and the `interlock-agent flows` command.
//!
//! [`FlowTable`] is pure: records in, counts and rates out (the caller passes the elapsed time).
//! Bytes come from closed connections ([`TcpCloseRecord`]), attributed to the process that
//! connected through the `SYN_SENT -> ESTABLISHED` event of the same 4-tuple (which carries the
//! connecting task), kept in a bounded [`Connections`] table across periods.
//! [`watch`] is the only part that loads probes and writes to stdout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use interlock_agent_common::tcp_state;
use serde_json::json;

use crate::probes::{
    ConnectFailureRecord, ConnectFailures, FlowStats, ProbeError, ProbeOptions, ProbeSet,
    TcpCloseRecord, TcpCloses, TcpEvents, TcpStateRecord,
};

/// The process name of an edge whose process is not known (a connection accepted by this
/// host, or one whose establishment was not seen).
pub const UNKNOWN_PROCESS: &str = "-";

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
    /// Connections closed in the period.
    pub closes: u64,
    /// Bytes both ways (acked by the peer plus received) over the connections closed.
    pub bytes: u64,
}

/// One edge with per-second rates over a period.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowRate {
    pub key: FlowKey,
    pub counts: FlowCounts,
    pub connects_per_s: f64,
    pub failures_per_s: f64,
    pub retransmits_per_s: f64,
    /// Bytes both ways of the connections closed in the period, per second of the period.
    pub bytes_per_s: f64,
}

/// Established active opens by 4-tuple (local, remote) → the connecting process's `comm`, so
/// that a close, which the kernel reports without a process, can name it. Bounded: the oldest
/// entries go first, so closes that were never reported (a dropped record) cannot grow it.
#[derive(Clone, Debug, Default)]
pub struct Connections {
    by_tuple: HashMap<(SocketAddr, SocketAddr), String>,
    order: VecDeque<(SocketAddr, SocketAddr)>,
}

impl Connections {
    /// At most this many open connections are remembered.
    pub const CAPACITY: usize = 65_536;

    /// Remembers the connecting process of an established active open; ignores the rest.
    pub fn tcp(&mut self, record: &TcpStateRecord) {
        if record.old_state != tcp_state::SYN_SENT || record.new_state != tcp_state::ESTABLISHED {
            return;
        }
        let tuple = (record.local, record.remote);
        if self.by_tuple.insert(tuple, record.comm.clone()).is_none() {
            self.order.push_back(tuple);
        }
        while self.by_tuple.len() > Self::CAPACITY {
            match self.order.pop_front() {
                Some(old) => {
                    self.by_tuple.remove(&old);
                }
                None => break,
            }
        }
    }

    /// The process that opened the closed connection, forgetting it; `None` if unknown.
    pub fn close(&mut self, record: &TcpCloseRecord) -> Option<String> {
        // `order` keeps a stale tuple until it reaches the front; `by_tuple` decides.
        let comm = self.by_tuple.remove(&(record.local, record.remote));
        if self.order.len() > 2 * Self::CAPACITY {
            self.order.retain(|t| self.by_tuple.contains_key(t));
        }
        comm
    }

    pub fn len(&self) -> usize {
        self.by_tuple.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_tuple.is_empty()
    }
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

    /// Adds a closed connection's bytes to its edge: (connecting process or
    /// [`UNKNOWN_PROCESS`], remote). An accepted connection's remote is the peer's host with
    /// port 0, since its ephemeral port names nothing that lasts.
    pub fn close(&mut self, record: &TcpCloseRecord, process: Option<&str>) {
        let remote = if record.active_open {
            record.remote
        } else {
            SocketAddr::new(record.remote.ip(), 0)
        };
        let counts = self.entry(process.unwrap_or(UNKNOWN_PROCESS), remote);
        counts.closes += 1;
        counts.bytes += record.bytes_acked + record.bytes_received;
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
                bytes_per_s: rate(counts.bytes),
                key,
                counts,
            })
            .collect();
        out.sort_by(|a, b| {
            let busy = |r: &FlowRate| {
                r.counts.connects + r.counts.failures + r.counts.retransmits + r.counts.closes
            };
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
    pub closes: Option<TcpCloses>,
    /// Who opened each established connection, across periods (for closes).
    connections: Connections,
    /// (probe name, why it did not load).
    pub missing: Vec<(&'static str, ProbeError)>,
}

impl FlowProbes {
    /// Loads the TCP lifecycle program (connects and failed connects), the flow counters
    /// (retransmits) and the close program (bytes), each on its own so one failure leaves the
    /// others working.
    pub fn load() -> Self {
        let mut this = Self {
            sets: Vec::new(),
            tcp: None,
            failures: None,
            stats: None,
            closes: None,
            connections: Connections::default(),
            missing: Vec::new(),
        };
        match ProbeSet::load(&ProbeOptions {
            tcp_state: true,
            // The table uses connects (SYN_SENT) and establishments: the ring carries only
            // those, a fraction of every connection's transitions.
            tcp_state_mask: (1 << tcp_state::SYN_SENT) | (1 << tcp_state::ESTABLISHED),
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
        match ProbeSet::load(&ProbeOptions {
            tcp_close: true,
            ..ProbeOptions::none()
        }) {
            Ok(mut set) => {
                this.closes = set.take_tcp_closes().ok();
                this.sets.push(set);
            }
            Err(e) => this.missing.push(("tcp_close", e)),
        }
        this
    }

    /// The loaded probe sets (for their kernel counters).
    pub fn sets(&self) -> &[ProbeSet] {
        &self.sets
    }

    /// Moves everything queued since the last call into `table`; returns how many TCP
    /// transitions, failed connects and closes were drained.
    pub fn drain_into(&mut self, table: &mut FlowTable) -> Drained {
        let mut drained = Drained::default();
        // Transitions first: a connection's ESTABLISHED precedes its close, so the close
        // drained in the same tick finds its process.
        if let Some(tcp) = &mut self.tcp {
            let mut batch = Vec::new();
            drained.transitions = tcp.drain(&mut batch);
            for r in &batch {
                table.tcp(r);
                self.connections.tcp(r);
            }
        }
        if let Some(failures) = &mut self.failures {
            let mut batch = Vec::new();
            drained.failures = failures.drain(&mut batch);
            batch.iter().for_each(|r| table.failure(r));
        }
        if let Some(closes) = &mut self.closes {
            let mut batch = Vec::new();
            drained.closes = closes.drain(&mut batch);
            for r in &batch {
                let process = self.connections.close(r);
                table.close(r, process.as_deref());
            }
        }
        if let Some(stats) = &mut self.stats
            && let Ok(records) = stats.drain()
        {
            for r in records {
                table.retransmits(r.remote, r.retransmits);
            }
        }
        drained
    }
}

/// How many records one [`FlowProbes::drain_into`] moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    pub transitions: usize,
    pub failures: usize,
    pub closes: usize,
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
    if probes.tcp.is_none() && probes.stats.is_none() && probes.closes.is_none() {
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
        "{:<16} {:<40} {:>9} {:>9} {:>9} {:>10} {:>10} {:>12}\n",
        "PROCESS", "REMOTE", "CONNECTS", "FAILURES", "RETRANS", "CONN/S", "FAIL/S", "BYTES/S"
    );
    for r in rates {
        out.push_str(&format!(
            "{:<16} {:<40} {:>9} {:>9} {:>9} {:>10.2} {:>10.2} {:>12.0}\n",
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
            r.failures_per_s,
            r.bytes_per_s
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
                "closes": r.counts.closes,
                "bytes": r.counts.bytes,
                "bytes_per_s": r.bytes_per_s,
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
            cgroup_id: 1,
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
                retransmits: 4,
                ..FlowCounts::default()
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

    fn close(
        local: &str,
        remote: &str,
        active_open: bool,
        acked: u64,
        received: u64,
    ) -> TcpCloseRecord {
        TcpCloseRecord {
            ts_ns: 0,
            cookie: 1,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            active_open,
            bytes_received: received,
            bytes_acked: acked,
            srtt: Duration::from_micros(50),
            total_retrans: 0,
            duration: Duration::from_millis(3),
        }
    }

    #[test]
    fn closes_add_bytes_to_the_connecting_process_edge() {
        let mut connections = Connections::default();
        let mut t = FlowTable::default();
        let mut est = tcp("curl", "10.0.0.1:80", tcp_state::ESTABLISHED);
        est.old_state = tcp_state::SYN_SENT;
        est.local = "127.0.0.1:40000".parse().unwrap();
        connections.tcp(&est);
        assert_eq!(connections.len(), 1);

        let ours = close("127.0.0.1:40000", "10.0.0.1:80", true, 1_000, 3_000);
        let process = connections.close(&ours);
        assert_eq!(process.as_deref(), Some("curl"));
        assert!(connections.is_empty(), "a close forgets its connection");
        t.close(&ours, process.as_deref());
        // The same tuple again: its establishment was not seen.
        let unknown = close("127.0.0.1:40000", "10.0.0.1:80", true, 10, 0);
        t.close(&unknown, connections.close(&unknown).as_deref());
        // Accepted connections: one edge per peer host, whatever its ephemeral port.
        t.close(&close("127.0.0.1:80", "10.0.0.7:5000", false, 5, 5), None);
        t.close(&close("127.0.0.1:80", "10.0.0.7:5001", false, 5, 5), None);

        let rates = t.rates(Duration::from_secs(2));
        let edge = |process: &str, remote: &str| {
            rates
                .iter()
                .find(|r| r.key.process == process && r.key.remote == remote.parse().unwrap())
                .unwrap_or_else(|| panic!("no edge {process} {remote} in {rates:?}"))
        };
        assert_eq!(edge("curl", "10.0.0.1:80").counts.bytes, 4_000);
        assert!((edge("curl", "10.0.0.1:80").bytes_per_s - 2_000.0).abs() < 1e-9);
        assert_eq!(edge(UNKNOWN_PROCESS, "10.0.0.1:80").counts.bytes, 10);
        assert_eq!(edge(UNKNOWN_PROCESS, "10.0.0.7:0").counts.closes, 2);
        assert_eq!(edge(UNKNOWN_PROCESS, "10.0.0.7:0").counts.bytes, 20);
        assert!(render_json(&rates).contains("\"bytes_per_s\":2000.0"));
    }

    #[test]
    fn the_connection_table_stays_bounded() {
        let mut connections = Connections::default();
        let mut est = tcp("curl", "10.0.0.1:80", tcp_state::ESTABLISHED);
        est.old_state = tcp_state::SYN_SENT;
        for port in 0..(Connections::CAPACITY + 10) {
            est.local = SocketAddr::new(
                "127.0.0.1".parse().unwrap(),
                u16::try_from(port % 60_000 + 1).unwrap(),
            );
            est.remote = SocketAddr::new(
                "10.0.0.1".parse().unwrap(),
                u16::try_from(port / 60_000 + 1).unwrap(),
            );
            connections.tcp(&est);
        }
        assert_eq!(connections.len(), Connections::CAPACITY);
    }
}
