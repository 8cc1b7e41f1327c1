//! What agents report besides lease traffic: their latest findings and flow edges, kept in
//! memory for the fleet view and the dependency graph (`interlock graph`).
//!
//! Telemetry, not safety state: it is not persisted, a new leader starts empty and fills up
//! within one report interval, and entries older than [`STALE_AFTER_MS`] are dropped. Pure: it
//! takes `now` and data; it must not import the store, tonic or a clock.

use std::collections::BTreeMap;

/// A host's report older than this no longer counts (agents report flows every 10 s).
pub const STALE_AFTER_MS: u64 = 60_000;
/// Bounds per host, so one misbehaving agent cannot grow the coordinator's memory.
pub const MAX_EDGES_PER_HOST: usize = 10_000;
pub const MAX_FINDINGS_PER_HOST: usize = 1_000;

/// One flow edge as an agent reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowEdge {
    pub local_service: String,
    pub process: String,
    pub remote: String,
    pub connects_per_s: f64,
    pub failures_per_s: f64,
    pub retransmits_per_s: f64,
    pub bytes_per_s: f64,
}

/// One finding as an agent reported it (wire fields, kept as they came).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedFinding {
    pub id: String,
    pub detector: String,
    pub target: String,
    pub summary: String,
    pub evidence_json: String,
    pub since_ms: u64,
}

/// An edge of the fleet graph: a service (through one host's process) talking to a remote.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphEdge {
    pub from_service: String,
    pub from_host: String,
    pub edge: FlowEdge,
    pub reported_at_ms: u64,
}

#[derive(Clone, Debug)]
struct HostReport<T> {
    at_ms: u64,
    items: Vec<T>,
}

impl<T> Default for HostReport<T> {
    fn default() -> Self {
        Self {
            at_ms: 0,
            items: Vec::new(),
        }
    }
}

/// The latest report of each host.
#[derive(Clone, Debug, Default)]
pub struct FleetTelemetry {
    flows: BTreeMap<String, HostReport<FlowEdge>>,
    findings: BTreeMap<String, HostReport<ReportedFinding>>,
}

impl FleetTelemetry {
    /// Replaces the host's flow edges (a report is a full picture of the last interval).
    pub fn record_flows(&mut self, host: &str, mut edges: Vec<FlowEdge>, now_ms: u64) {
        edges.truncate(MAX_EDGES_PER_HOST);
        self.flows.insert(
            host.to_owned(),
            HostReport {
                at_ms: now_ms,
                items: edges,
            },
        );
        self.expire(now_ms);
    }

    /// Merges the host's findings by id (agents send only new or changed ones).
    pub fn record_findings(&mut self, host: &str, findings: Vec<ReportedFinding>, now_ms: u64) {
        let report = self.findings.entry(host.to_owned()).or_default();
        report.at_ms = now_ms;
        for f in findings {
            if let Some(old) = report.items.iter_mut().find(|old| old.id == f.id) {
                *old = f;
            } else if report.items.len() < MAX_FINDINGS_PER_HOST {
                report.items.push(f);
            }
        }
        self.expire(now_ms);
    }

    fn expire(&mut self, now_ms: u64) {
        let fresh = |at: u64| now_ms.saturating_sub(at) <= STALE_AFTER_MS;
        self.flows.retain(|_, r| fresh(r.at_ms));
        self.findings.retain(|_, r| fresh(r.at_ms));
    }

    /// The graph at `now`: every fresh edge with the service of the host that reported it
    /// (`service_of` maps a host to its service label; unregistered hosts get "").
    pub fn graph(
        &self,
        now_ms: u64,
        service_of: impl Fn(&str) -> Option<String>,
    ) -> Vec<GraphEdge> {
        self.flows
            .iter()
            .filter(|(_, r)| now_ms.saturating_sub(r.at_ms) <= STALE_AFTER_MS)
            .flat_map(|(host, r)| {
                let service = service_of(host).unwrap_or_default();
                r.items.iter().map(move |e| GraphEdge {
                    from_service: if e.local_service.is_empty() {
                        service.clone()
                    } else {
                        e.local_service.clone()
                    },
                    from_host: host.clone(),
                    edge: e.clone(),
                    reported_at_ms: r.at_ms,
                })
            })
            .collect()
    }

    /// Fresh findings, optionally of one host: (host, finding, reported at).
    pub fn findings(&self, now_ms: u64, host: Option<&str>) -> Vec<(String, ReportedFinding, u64)> {
        self.findings
            .iter()
            .filter(|(h, r)| {
                host.is_none_or(|want| want == h.as_str())
                    && now_ms.saturating_sub(r.at_ms) <= STALE_AFTER_MS
            })
            .flat_map(|(h, r)| r.items.iter().map(move |f| (h.clone(), f.clone(), r.at_ms)))
            .collect()
    }

    pub fn finding_count(&self, host: &str) -> usize {
        self.findings.get(host).map_or(0, |r| r.items.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(remote: &str) -> FlowEdge {
        FlowEdge {
            local_service: String::new(),
            process: "curl".into(),
            remote: remote.into(),
            connects_per_s: 1.0,
            failures_per_s: 0.0,
            retransmits_per_s: 0.0,
            bytes_per_s: 10.0,
        }
    }

    fn finding(id: &str, summary: &str) -> ReportedFinding {
        ReportedFinding {
            id: id.into(),
            detector: "disk_full".into(),
            target: "/data".into(),
            summary: summary.into(),
            evidence_json: "{}".into(),
            since_ms: 1,
        }
    }

    #[test]
    fn graph_edges_carry_the_reporting_hosts_service_and_go_stale() {
        let mut t = FleetTelemetry::default();
        t.record_flows("h1", vec![edge("10.0.0.2:5432")], 1_000);
        let service = |h: &str| (h == "h1").then(|| "web".to_owned());
        let g = t.graph(2_000, service);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].from_service, "web");
        assert_eq!(g[0].edge.remote, "10.0.0.2:5432");
        assert!(
            t.graph(1_000 + STALE_AFTER_MS + 1, service).is_empty(),
            "stale edges drop out"
        );
    }

    #[test]
    fn a_new_flow_report_replaces_the_hosts_previous_one() {
        let mut t = FleetTelemetry::default();
        t.record_flows("h1", vec![edge("a:1"), edge("b:2")], 1_000);
        t.record_flows("h1", vec![edge("c:3")], 2_000);
        let g = t.graph(2_000, |_| None);
        assert_eq!(
            g.iter().map(|e| e.edge.remote.as_str()).collect::<Vec<_>>(),
            vec!["c:3"]
        );
    }

    #[test]
    fn findings_merge_by_id_and_are_bounded() {
        let mut t = FleetTelemetry::default();
        t.record_findings("h1", vec![finding("disk_full//data", "90%")], 1_000);
        t.record_findings("h1", vec![finding("disk_full//data", "95%")], 2_000);
        let f = t.findings(2_000, Some("h1"));
        assert_eq!(f.len(), 1, "the same id is one finding");
        assert_eq!(f[0].1.summary, "95%", "the newest report wins");
        let many: Vec<_> = (0..MAX_FINDINGS_PER_HOST + 5)
            .map(|i| finding(&format!("x/{i}"), ""))
            .collect();
        t.record_findings("h2", many, 2_000);
        assert_eq!(t.finding_count("h2"), MAX_FINDINGS_PER_HOST);
    }
}
