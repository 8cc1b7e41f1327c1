//! The agent's telemetry: the Prometheus registry, the name of every agent metric (the `pub
//! const`s below, as they appear in the exposition) and one method per event that writes both
//! the log line and the metric, so callers never spell a metric name or log an event twice.
//! It also serves `GET /metrics` and `GET /healthz`.
//!
//! It holds no decision logic and must not import `probes`, `pressure` or the gRPC client; it
//! knows only the [`Finding`] and [`CoordinatorLink`] types it reports.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::finding::Finding;
use crate::report::CoordinatorLink;

/// Kernel and pressure events seen, by kind (`tcp_state`, `connect_failure`, `process_exit`,
/// `oom_kill`, `psi_trigger`).
pub const EVENTS_TOTAL: &str = "interlock_agent_events_total";
/// Events the kernel could not queue (ring buffer full), by ring.
pub const KERNEL_DROPS_TOTAL: &str = "interlock_agent_kernel_drops_total";
/// Findings raised, by detector.
pub const FINDINGS_TOTAL: &str = "interlock_agent_findings_total";
/// Findings currently held (reported or waiting to be).
pub const FINDINGS_CURRENT: &str = "interlock_agent_findings_current";
/// Findings currently held, by detector (0 once a detector's last finding cleared).
pub const FINDINGS_ACTIVE: &str = "interlock_agent_findings_active";
/// The notAfter (unix seconds) of the `[tls]` certificates as last read, by `cert` (`client`,
/// `ca`); a file that cannot be read keeps its last value.
pub const CERT_NOT_AFTER: &str = "interlock_agent_cert_not_after_seconds";
/// 1 when a probe is loaded and attached, 0 when it could not be, by probe.
pub const PROBE_LOADED: &str = "interlock_agent_probe_loaded";
/// 1 for the current coordinator link state (`connected`, `unreachable`), 0 for the others.
pub const COORDINATOR_LINK: &str = "interlock_agent_coordinator_link";
/// 1 while the agent observes only (no coordinator link: it will not act).
pub const OBSERVING_ONLY: &str = "interlock_agent_observing_only";
/// Calls to the coordinator, by kind (`register`, `heartbeat`, `findings`, `flows`) and result
/// (`ok`, `failed`).
pub const REPORTS_TOTAL: &str = "interlock_agent_reports_total";
pub const ACTIONS_TOTAL: &str = "interlock_agent_actions_total";

/// The content type of [`AgentMetrics::render`].
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const LINK_STATES: [&str; 2] = ["connected", "unreachable"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RingLabels {
    ring: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectorLabels {
    detector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    cert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    class: String,
    stage: String,
}

/// `prometheus-client` appends `_total` to counter names itself.
fn counter_family_name(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

struct Metrics {
    registry: Registry,
    events: Family<KindLabels, Counter>,
    drops: Family<RingLabels, Counter>,
    findings: Family<DetectorLabels, Counter>,
    findings_current: Gauge,
    findings_active: Family<DetectorLabels, Gauge>,
    cert_not_after: Family<CertLabels, Gauge>,
    probe_loaded: Family<ProbeLabels, Gauge>,
    link: Family<StateLabels, Gauge>,
    observing_only: Gauge,
    reports: Family<ReportLabels, Counter>,
    actions: Family<ActionLabels, Counter>,
    /// Last cumulative kernel drop count per ring, to turn totals into increments.
    drops_seen: Mutex<BTreeMap<String, u64>>,
    /// Every detector that ever held a finding, so one whose findings cleared reads 0.
    detectors_seen: Mutex<std::collections::BTreeSet<&'static str>>,
}

/// Every agent metric and its registry. Clones share the same metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    inner: Arc<Metrics>,
}

impl fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// A fresh registry with every agent metric registered. The link starts unreachable
    /// (observing only) until a registration succeeds.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            events: Family::default(),
            drops: Family::default(),
            findings: Family::default(),
            findings_current: Gauge::default(),
            findings_active: Family::default(),
            cert_not_after: Family::default(),
            probe_loaded: Family::default(),
            link: Family::default(),
            observing_only: Gauge::default(),
            reports: Family::default(),
            actions: Family::default(),
            drops_seen: Mutex::new(BTreeMap::new()),
            detectors_seen: Mutex::new(std::collections::BTreeSet::new()),
        };
        registry.register(
            counter_family_name(EVENTS_TOTAL),
            "Kernel and pressure events seen, by kind",
            m.events.clone(),
        );
        registry.register(
            counter_family_name(KERNEL_DROPS_TOTAL),
            "Events the kernel could not queue (ring full), by ring",
            m.drops.clone(),
        );
        registry.register(
            counter_family_name(FINDINGS_TOTAL),
            "Findings raised, by detector",
            m.findings.clone(),
        );
        registry.register(
            FINDINGS_CURRENT,
            "Findings currently held",
            m.findings_current.clone(),
        );
        registry.register(
            FINDINGS_ACTIVE,
            "Findings currently held, by detector",
            m.findings_active.clone(),
        );
        registry.register(
            CERT_NOT_AFTER,
            "notAfter (unix seconds) of the agent's TLS certificates as last read, by cert",
            m.cert_not_after.clone(),
        );
        registry.register(
            PROBE_LOADED,
            "1 when the probe is loaded and attached, 0 when not",
            m.probe_loaded.clone(),
        );
        registry.register(
            COORDINATOR_LINK,
            "1 for the current coordinator link state",
            m.link.clone(),
        );
        registry.register(
            OBSERVING_ONLY,
            "1 while the agent observes only (no coordinator link, never acts)",
            m.observing_only.clone(),
        );
        registry.register(
            counter_family_name(REPORTS_TOTAL),
            "Calls to the coordinator, by kind and result",
            m.reports.clone(),
        );
        registry.register(
            counter_family_name(ACTIONS_TOTAL),
            "Action proposals by class and stage: what the coordinator answered (granted, denied, \
             pending, observed, unreachable) and how actions ended (success, failed, \
             verification_failed, abandoned, interrupted)",
            m.actions.clone(),
        );
        for state in LINK_STATES {
            m.link
                .get_or_create(&StateLabels {
                    state: state.to_owned(),
                })
                .set(i64::from(state == "unreachable"));
        }
        m.observing_only.set(1);
        let m = Metrics { registry, ..m };
        Self { inner: Arc::new(m) }
    }

    /// `n` events of `kind` were drained (no log line: these are frequent).
    pub fn events(&self, kind: &str, n: usize) {
        if n > 0 {
            self.inner
                .events
                .get_or_create(&KindLabels {
                    kind: kind.to_owned(),
                })
                .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        }
    }

    /// The kernel's cumulative drop count for `ring`; a rise is logged as a warning once per
    /// reading that rose.
    pub fn kernel_drops(&self, ring: &str, total: u64) {
        let mut seen = self
            .inner
            .drops_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = seen.entry(ring.to_owned()).or_insert(0);
        if total > *last {
            let delta = total - *last;
            *last = total;
            tracing::warn!(
                ring,
                dropped = delta,
                total,
                "kernel dropped events: the ring buffer was full"
            );
            self.inner
                .drops
                .get_or_create(&RingLabels {
                    ring: ring.to_owned(),
                })
                .inc_by(delta);
        }
    }

    /// A detector raised `finding`.
    pub fn finding(&self, finding: &Finding) {
        tracing::info!(
            id = finding.id,
            detector = finding.detector,
            target = finding.target,
            summary = finding.summary,
            "finding"
        );
        self.inner
            .findings
            .get_or_create(&DetectorLabels {
                detector: finding.detector.to_owned(),
            })
            .inc();
    }

    /// The findings held now (no log line: each was logged when raised).
    pub fn set_findings_current<'a>(&self, findings: impl IntoIterator<Item = &'a Finding>) {
        let mut by_detector = BTreeMap::<&'static str, i64>::new();
        for f in findings {
            *by_detector.entry(f.detector).or_default() += 1;
        }
        let mut seen = self
            .inner
            .detectors_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.extend(by_detector.keys().copied());
        for detector in seen.iter() {
            self.inner
                .findings_active
                .get_or_create(&DetectorLabels {
                    detector: (*detector).to_owned(),
                })
                .set(by_detector.get(detector).copied().unwrap_or(0));
        }
        self.inner.findings_current.set(by_detector.values().sum());
    }

    /// A `[tls]` certificate file was read and its reading differs from the last one (the
    /// caller reports changes only, so each is logged once): its notAfter, or why it could not
    /// be read (the agent keeps the last reading and any finding about it).
    pub fn cert_read(&self, cert: &str, path: &Path, reading: Result<i64, &str>) {
        match reading {
            Ok(not_after) => {
                tracing::info!(cert, file = %path.display(), not_after, "certificate read");
                self.inner
                    .cert_not_after
                    .get_or_create(&CertLabels {
                        cert: cert.to_owned(),
                    })
                    .set(not_after);
            }
            Err(error) => tracing::warn!(
                cert,
                file = %path.display(),
                error,
                "certificate file not readable; keeping its last reading and any cert_expiry \
                 finding"
            ),
        }
    }

    /// A probe was loaded, or could not be (with the reason, which says what to change).
    pub fn probe(&self, probe: &str, result: Result<&[&str], &str>) {
        match result {
            Ok(programs) => tracing::info!(probe, ?programs, "probe loaded"),
            Err(error) => tracing::warn!(probe, error, "probe not loaded; its signals are missing"),
        }
        self.inner
            .probe_loaded
            .get_or_create(&ProbeLabels {
                probe: probe.to_owned(),
            })
            .set(i64::from(result.is_ok()));
    }

    /// The coordinator link changed (callers report changes only; see `report::LinkTracker`).
    pub fn link(&self, link: &CoordinatorLink) {
        match link {
            CoordinatorLink::Connected { url } => {
                tracing::info!(coordinator = url, "registered with the coordinator");
            }
            CoordinatorLink::Unreachable { reason } => tracing::warn!(
                reason,
                "coordinator unreachable: observing only (no leases, so no actions); retrying with backoff"
            ),
        }
        for state in LINK_STATES {
            self.inner
                .link
                .get_or_create(&StateLabels {
                    state: state.to_owned(),
                })
                .set(i64::from(state == link.name()));
        }
        self.inner
            .observing_only
            .set(i64::from(!link.is_connected()));
    }

    /// One call to the coordinator finished.
    pub fn report(&self, kind: &str, ok: bool) {
        self.inner
            .reports
            .get_or_create(&ReportLabels {
                kind: kind.to_owned(),
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// An action of `class` reached `stage` (the caller logs it with its details).
    pub fn action(&self, class: &str, stage: &str) {
        self.inner
            .actions
            .get_or_create(&ActionLabels {
                class: class.to_owned(),
                stage: stage.to_owned(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
        {
            tracing::error!(%error, "metrics encoding failed");
            out.push_str("# encoding failed\n");
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: AgentMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(metrics): State<AgentMetrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_with_labels() {
        let m = AgentMetrics::new();
        m.finding(&Finding::new("disk_full", "/var", 1));
        m.events("tcp_state", 3);
        m.kernel_drops("tcp_events", 5);
        m.kernel_drops("tcp_events", 5);
        m.kernel_drops("tcp_events", 7);
        m.probe("tcp", Err("needs root"));
        m.report("findings", true);
        m.cert_read("client", Path::new("/c/h.pem"), Ok(1_800_000_000));
        m.cert_read("ca", Path::new("/c/ca.pem"), Ok(2_100_000_000));
        // An unreadable file keeps the last value.
        m.cert_read("client", Path::new("/c/h.pem"), Err("no such file"));
        let cert = Finding::new("cert_expiry", "/c/h.pem", 1);
        let disk = Finding::new("disk_full", "/var", 1);
        m.set_findings_current([&cert, &disk, &Finding::new("disk_full", "/", 1)]);
        let text = m.render();
        for want in [
            "interlock_agent_findings_total{detector=\"disk_full\"} 1\n",
            "interlock_agent_events_total{kind=\"tcp_state\"} 3\n",
            "interlock_agent_kernel_drops_total{ring=\"tcp_events\"} 7\n",
            "interlock_agent_probe_loaded{probe=\"tcp\"} 0\n",
            "interlock_agent_observing_only 1\n",
            "interlock_agent_coordinator_link{state=\"unreachable\"} 1\n",
            "interlock_agent_reports_total{kind=\"findings\",result=\"ok\"} 1\n",
            "interlock_agent_cert_not_after_seconds{cert=\"client\"} 1800000000\n",
            "interlock_agent_cert_not_after_seconds{cert=\"ca\"} 2100000000\n",
            "interlock_agent_findings_active{detector=\"cert_expiry\"} 1\n",
            "interlock_agent_findings_active{detector=\"disk_full\"} 2\n",
            "interlock_agent_findings_current 3\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // The certificate was replaced: its detector reads 0, the others stay.
        m.set_findings_current([&disk]);
        let text = m.render();
        for want in [
            "interlock_agent_findings_active{detector=\"cert_expiry\"} 0\n",
            "interlock_agent_findings_active{detector=\"disk_full\"} 1\n",
            "interlock_agent_findings_current 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        m.link(&CoordinatorLink::Connected {
            url: "http://a:1".into(),
        });
        let text = m.render();
        assert!(
            text.contains("interlock_agent_observing_only 0\n"),
            "{text}"
        );
        assert!(
            text.contains("interlock_agent_coordinator_link{state=\"connected\"} 1\n"),
            "{text}"
        );
    }
}
