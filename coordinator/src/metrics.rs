//! The coordinator's Prometheus metrics and its plain HTTP endpoints.
//!
//! This module owns the metric registry, the name of every coordinator metric (the `pub const`s
//! below, spelled as they appear in the exposition) and one method per event that moves a
//! metric, so callers never spell a metric or label name. It also owns the small HTTP server for
//! `GET /metrics`, `GET /healthz` and `GET /readyz`.
//!
//! It holds no decision logic and must not import the store, the gRPC layer or the server: the
//! caller reports events and answers readiness through a closure. From the domain it imports only
//! [`DenyReason`], so that a denial's `check` label is always the check's stable name.
//!
//! The exposition is the OpenMetrics text format (what `prometheus-client` encodes), served with
//! the OpenMetrics content type; Prometheus negotiates and parses it natively.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::admission::DenyReason;

/// Leases granted, by action class.
pub const GRANTS_TOTAL: &str = "interlock_grants_total";
/// Requests denied, by action class and the check that refused them.
pub const DENIALS_TOTAL: &str = "interlock_denials_total";
/// Observe-mode requests that would have been granted, by action class.
pub const WOULD_GRANTS_TOTAL: &str = "interlock_would_grants_total";
/// Assist-mode requests left pending for an operator, by action class.
pub const PENDING_TOTAL: &str = "interlock_pending_total";
/// Outcomes reported by agents, by action class and outcome.
pub const OUTCOMES_TOTAL: &str = "interlock_outcomes_total";
/// Live leases, by action class.
pub const ACTIVE_LEASES: &str = "interlock_active_leases";
/// Grants counted against a budget in its current window, by action class and scope.
pub const BUDGET_USED: &str = "interlock_budget_used";
/// The fleet budget's maximum grants per window, by action class.
pub const BUDGET_MAX: &str = "interlock_budget_max";
/// 1 while an action class is frozen; `class="*"` is the fleet kill switch.
pub const FROZEN: &str = "interlock_frozen";
/// 1 while this replica is the leader.
pub const LEADER: &str = "interlock_leader";
/// Writes refused because this replica had lost leadership (the fencing compare failed).
pub const FENCED_WRITES_TOTAL: &str = "interlock_fenced_writes_total";
/// Alerts sent to humans, by action class and kind.
pub const ALERTS_TOTAL: &str = "interlock_alerts_total";
/// Latency of store requests, by operation.
pub const STORE_REQUEST_SECONDS: &str = "interlock_store_request_seconds";
/// Requests admitted together in one admission batch.
pub const ADMISSION_BATCH_SIZE: &str = "interlock_admission_batch_size";
/// Hosts with a live registration, by service.
pub const LIVE_HOSTS: &str = "interlock_live_hosts";
/// Test failpoints reached, by failpoint name; fault tests watch it to know a pause has begun.
pub const FAILPOINT_HITS_TOTAL: &str = "interlock_failpoint_hits_total";
/// Calls refused because of who made them, by the check (`no_identity`, `other_host`, `role`,
/// `wrong_kind`, `denied`).
pub const IDENTITY_REFUSALS_TOTAL: &str = "interlock_identity_refusals_total";
/// TLS handshakes that failed (no certificate from the CA, an expired one, not TLS at all).
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "interlock_tls_handshake_failures_total";
/// When a certificate this coordinator serves with stops being valid (unix seconds), by
/// certificate (`coordinator`, `ca`): alert on `interlock_cert_not_after_seconds - time()`.
pub const CERT_NOT_AFTER: &str = "interlock_cert_not_after_seconds";
/// Keys under the prefix that did not decode at the last load and were quarantined (the view
/// holds the safer value in their place); anything but 0 needs an operator.
pub const QUARANTINED_KEYS: &str = "interlock_quarantined_keys";

/// The `class` label value of the fleet-wide kill switch in [`FROZEN`].
pub const KILL_SWITCH_CLASS: &str = "*";

/// The content type of [`CoordinatorMetrics::render`]'s output.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Store latency buckets: 0.1 ms to 1 s in 1-2.5-5 steps, since a healthy etcd answers in a
/// millisecond or two and anything near a second is an outage worth seeing on its own.
const STORE_SECONDS_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    class: String,
    check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    class: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    class: String,
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    class: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOpLabels {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailpointLabels {
    name: String,
}

fn class(class: &str) -> ClassLabels {
    ClassLabels {
        class: class.to_owned(),
    }
}

fn store_histogram() -> Histogram {
    Histogram::new(STORE_SECONDS_BUCKETS)
}

fn batch_histogram() -> Histogram {
    // 1, 2, 4, … 512 requests.
    Histogram::new(exponential_buckets(1.0, 2.0, 10))
}

/// `prometheus-client` appends `_total` to counter names itself, so counters are registered
/// under their name without it and appear in the exposition exactly as the constant says.
fn counter_family_name(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

struct Metrics {
    registry: Registry,
    grants: Family<ClassLabels, Counter>,
    denials: Family<DenialLabels, Counter>,
    would_grants: Family<ClassLabels, Counter>,
    pending: Family<ClassLabels, Counter>,
    outcomes: Family<OutcomeLabels, Counter>,
    active_leases: Family<ClassLabels, Gauge>,
    budget_used: Family<BudgetLabels, Gauge>,
    budget_max: Family<ClassLabels, Gauge>,
    frozen: Family<ClassLabels, Gauge>,
    leader: Gauge,
    fenced_writes: Counter,
    alerts: Family<AlertLabels, Counter>,
    store_request_seconds: Family<StoreOpLabels, Histogram, fn() -> Histogram>,
    admission_batch_size: Histogram,
    live_hosts: Family<ServiceLabels, Gauge>,
    failpoint_hits: Family<FailpointLabels, Counter>,
    identity_refusals: Family<CheckLabels, Counter>,
    tls_handshake_failures: Counter,
    cert_not_after: Family<CertLabels, Gauge>,
    quarantined_keys: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    cert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: String,
}

/// Every coordinator metric and the registry that exposes them. Cloning is cheap and every clone
/// moves the same metrics.
#[derive(Clone)]
pub struct CoordinatorMetrics {
    inner: Arc<Metrics>,
}

impl fmt::Debug for CoordinatorMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The registry's own Debug prints every metric; a handle need not.
        f.debug_struct("CoordinatorMetrics").finish_non_exhaustive()
    }
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordinatorMetrics {
    /// A fresh registry with every coordinator metric registered and at zero.
    pub fn new() -> CoordinatorMetrics {
        let mut registry = Registry::default();
        let metrics = Metrics {
            grants: Family::default(),
            denials: Family::default(),
            would_grants: Family::default(),
            pending: Family::default(),
            outcomes: Family::default(),
            active_leases: Family::default(),
            budget_used: Family::default(),
            budget_max: Family::default(),
            frozen: Family::default(),
            leader: Gauge::default(),
            fenced_writes: Counter::default(),
            alerts: Family::default(),
            store_request_seconds: Family::new_with_constructor(store_histogram),
            admission_batch_size: batch_histogram(),
            live_hosts: Family::default(),
            failpoint_hits: Family::default(),
            identity_refusals: Family::default(),
            tls_handshake_failures: Counter::default(),
            cert_not_after: Family::default(),
            quarantined_keys: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            counter_family_name(GRANTS_TOTAL),
            "Leases granted, by action class",
            metrics.grants.clone(),
        );
        registry.register(
            counter_family_name(DENIALS_TOTAL),
            "Requests denied, by action class and the check that refused them",
            metrics.denials.clone(),
        );
        registry.register(
            counter_family_name(WOULD_GRANTS_TOTAL),
            "Observe-mode requests that would have been granted, by action class",
            metrics.would_grants.clone(),
        );
        registry.register(
            counter_family_name(PENDING_TOTAL),
            "Assist-mode requests left pending for an operator, by action class",
            metrics.pending.clone(),
        );
        registry.register(
            counter_family_name(OUTCOMES_TOTAL),
            "Action outcomes reported by agents, by action class and outcome",
            metrics.outcomes.clone(),
        );
        registry.register(
            ACTIVE_LEASES,
            "Live leases, by action class",
            metrics.active_leases.clone(),
        );
        registry.register(
            BUDGET_USED,
            "Grants counted against a budget in its current window, by action class and scope",
            metrics.budget_used.clone(),
        );
        registry.register(
            BUDGET_MAX,
            "Maximum grants per window of the fleet budget, by action class",
            metrics.budget_max.clone(),
        );
        registry.register(
            FROZEN,
            "1 while an action class is frozen; class=\"*\" is the fleet kill switch",
            metrics.frozen.clone(),
        );
        registry.register(
            LEADER,
            "1 while this replica is the leader",
            metrics.leader.clone(),
        );
        registry.register(
            counter_family_name(FENCED_WRITES_TOTAL),
            "Writes refused because this replica had lost leadership",
            metrics.fenced_writes.clone(),
        );
        registry.register(
            counter_family_name(ALERTS_TOTAL),
            "Alerts sent to humans, by action class and kind",
            metrics.alerts.clone(),
        );
        registry.register(
            STORE_REQUEST_SECONDS,
            "Latency of store requests in seconds, by operation",
            metrics.store_request_seconds.clone(),
        );
        registry.register(
            ADMISSION_BATCH_SIZE,
            "Requests admitted together in one admission batch",
            metrics.admission_batch_size.clone(),
        );
        registry.register(
            LIVE_HOSTS,
            "Hosts with a live registration, by service",
            metrics.live_hosts.clone(),
        );
        registry.register(
            counter_family_name(FAILPOINT_HITS_TOTAL),
            "Test failpoints reached, by failpoint name",
            metrics.failpoint_hits.clone(),
        );
        registry.register(
            counter_family_name(IDENTITY_REFUSALS_TOTAL),
            "Calls refused because of the caller's verified identity, by the check that refused",
            metrics.identity_refusals.clone(),
        );
        registry.register(
            counter_family_name(TLS_HANDSHAKE_FAILURES_TOTAL),
            "TLS handshakes that failed (each peer address is logged once)",
            metrics.tls_handshake_failures.clone(),
        );
        registry.register(
            CERT_NOT_AFTER,
            "When each certificate the coordinator serves with expires, in unix seconds",
            metrics.cert_not_after.clone(),
        );
        registry.register(
            QUARANTINED_KEYS,
            "Undecodable keys quarantined at the last load (the safer value is used instead)",
            metrics.quarantined_keys.clone(),
        );
        CoordinatorMetrics {
            inner: Arc::new(Metrics {
                registry,
                ..metrics
            }),
        }
    }

    /// A lease was granted for `class`.
    pub fn grant(&self, class_name: &str) {
        self.inner.grants.get_or_create(&class(class_name)).inc();
    }

    /// A request for `class` was denied; the `check` label is the reason's stable check name.
    pub fn deny(&self, class: &str, reason: &DenyReason) {
        self.deny_by_check(class, reason.check_name());
    }

    /// A request for `class` was denied by the check named `check` (a
    /// [`DenyReason::check_name`]); for callers that hold only the name, e.g. from the wire.
    pub fn deny_by_check(&self, class: &str, check: &str) {
        self.inner
            .denials
            .get_or_create(&DenialLabels {
                class: class.to_owned(),
                check: check.to_owned(),
            })
            .inc();
    }

    /// An observe-mode request for `class` would have been granted.
    pub fn would_grant(&self, class_name: &str) {
        self.inner
            .would_grants
            .get_or_create(&class(class_name))
            .inc();
    }

    /// An assist-mode request for `class` is waiting for an operator.
    pub fn pending(&self, class_name: &str) {
        self.inner.pending.get_or_create(&class(class_name)).inc();
    }

    /// An agent reported `outcome` (e.g. "success", "failed", "rolled_back") for `class`.
    pub fn outcome(&self, class: &str, outcome: &str) {
        self.inner
            .outcomes
            .get_or_create(&OutcomeLabels {
                class: class.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// `class` now has `n` live leases.
    pub fn set_active_leases(&self, class_name: &str, n: u32) {
        self.inner
            .active_leases
            .get_or_create(&class(class_name))
            .set(i64::from(n));
    }

    /// `class` has used `used` grants of its fleet budget in the current window. Host budgets
    /// are not exported: a label per host would grow without bound.
    pub fn set_fleet_budget_used(&self, class: &str, used: u32) {
        self.inner
            .budget_used
            .get_or_create(&BudgetLabels {
                class: class.to_owned(),
                scope: "fleet".to_owned(),
            })
            .set(i64::from(used));
    }

    /// `class`'s fleet budget allows `max` grants per window.
    pub fn set_budget_max(&self, class_name: &str, max: u32) {
        self.inner
            .budget_max
            .get_or_create(&class(class_name))
            .set(i64::from(max));
    }

    /// `class` was frozen (`true`) or unfrozen (`false`).
    pub fn set_frozen(&self, class_name: &str, frozen: bool) {
        self.inner
            .frozen
            .get_or_create(&class(class_name))
            .set(i64::from(frozen));
    }

    /// The fleet kill switch was turned on (`true`) or off (`false`).
    pub fn set_kill_switch(&self, on: bool) {
        self.set_frozen(KILL_SWITCH_CLASS, on);
    }

    /// This replica became leader (`true`) or stopped being leader (`false`).
    pub fn set_leader(&self, leader: bool) {
        self.inner.leader.set(i64::from(leader));
    }

    /// A write was refused because this replica had lost leadership.
    pub fn fenced_write(&self) {
        self.inner.fenced_writes.inc();
    }

    /// An alert of `kind` (e.g. "budget_exhausted", "class_frozen") was sent for `class`.
    pub fn alert(&self, class: &str, kind: &str) {
        self.inner
            .alerts
            .get_or_create(&AlertLabels {
                class: class.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// A store request of operation `op` (e.g. "range", "txn", "lease_grant") took `elapsed`.
    pub fn observe_store(&self, op: &str, elapsed: Duration) {
        self.inner
            .store_request_seconds
            .get_or_create(&StoreOpLabels { op: op.to_owned() })
            .observe(elapsed.as_secs_f64());
    }

    /// One admission batch decided `size` requests together.
    pub fn observe_admission_batch(&self, size: u32) {
        self.inner.admission_batch_size.observe(f64::from(size));
    }

    /// `service` now has `n` hosts with a live registration.
    pub fn set_live_hosts(&self, service: &str, n: u32) {
        self.inner
            .live_hosts
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(i64::from(n));
    }

    /// The test failpoint `name` was reached (only configured failpoints are ever hit).
    pub fn set_quarantined_keys(&self, n: usize) {
        self.inner
            .quarantined_keys
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_cert_not_after(&self, cert: &str, unix_seconds: i64) {
        self.inner
            .cert_not_after
            .get_or_create(&CertLabels {
                cert: cert.to_owned(),
            })
            .set(unix_seconds);
    }

    pub fn tls_handshake_failed(&self) {
        self.inner.tls_handshake_failures.inc();
    }

    pub fn identity_refused(&self, check: &str) {
        self.inner
            .identity_refusals
            .get_or_create(&CheckLabels {
                check: check.to_owned(),
            })
            .inc();
    }

    pub fn failpoint_hit(&self, name: &str) {
        self.inner
            .failpoint_hits
            .get_or_create(&FailpointLabels {
                name: name.to_owned(),
            })
            .inc();
    }

    /// Every metric in the OpenMetrics text format ([`METRICS_CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail, and every label value is a plain string, so an
        // error here would be a bug in the encoder; it is reported inside the exposition rather
        // than by panicking a scrape.
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
        {
            tracing::error!(%error, "metrics encoding failed");
            out.push_str("# encoding failed\n");
        }
        out
    }
}

/// Whether this replica should receive traffic, as `GET /readyz` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Why: "leader", "follower, leader at X", or what is missing ("store unreachable").
    pub detail: String,
}

impl Readiness {
    /// Ready, as the leader.
    pub fn leader() -> Readiness {
        Readiness {
            ready: true,
            detail: "leader".to_owned(),
        }
    }

    /// Ready, as a follower of the leader reachable at `leader_address`.
    pub fn follower(leader_address: &str) -> Readiness {
        Readiness {
            ready: true,
            detail: format!("follower, leader at {leader_address}"),
        }
    }

    /// Not ready, for `reason` (e.g. "store unreachable", "no leader elected yet").
    pub fn not_ready(reason: impl Into<String>) -> Readiness {
        Readiness {
            ready: false,
            detail: reason.into(),
        }
    }
}

type ReadinessProbe = Arc<dyn Fn() -> Readiness + Send + Sync>;

#[derive(Clone)]
struct HttpState {
    metrics: CoordinatorMetrics,
    ready: ReadinessProbe,
}

/// Serves `GET /metrics`, `GET /healthz` and `GET /readyz` on `listener` until `shutdown`
/// completes, then finishes the requests in flight and returns.
///
/// `ready` is called on every `/readyz` request, so it must be cheap (read a watch channel or an
/// atomic, not the store).
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: CoordinatorMetrics,
    ready: impl Fn() -> Readiness + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = HttpState {
        metrics,
        ready: Arc::new(ready),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
}

async fn healthz_handler() -> &'static str {
    "ok\n"
}

async fn readyz_handler(State(state): State<HttpState>) -> (StatusCode, String) {
    let Readiness { ready, detail } = (state.ready)();
    if ready {
        (StatusCode::OK, format!("ready: {detail}\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {detail}\n"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{FreezeCause, FreezeRecord, UnixMillis};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[test]
    fn render_shows_an_incremented_counter_with_its_labels() {
        let metrics = CoordinatorMetrics::new();
        metrics.grant("disk_cleanup");
        metrics.grant("disk_cleanup");
        metrics.fenced_write();
        metrics.set_kill_switch(true);
        metrics.observe_store("txn", Duration::from_micros(300));
        let text = metrics.render();
        assert!(
            text.contains("interlock_grants_total{class=\"disk_cleanup\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("interlock_fenced_writes_total 1\n"), "{text}");
        assert!(text.contains("interlock_frozen{class=\"*\"} 1\n"), "{text}");
        assert!(
            text.contains("interlock_store_request_seconds_bucket{le=\"0.0005\",op=\"txn\"} 1\n"),
            "{text}"
        );
        // A clone moves the same metrics.
        metrics.clone().grant("disk_cleanup");
        assert!(
            metrics
                .render()
                .contains("interlock_grants_total{class=\"disk_cleanup\"} 3\n")
        );
    }

    #[test]
    fn every_event_moves_its_named_metric() {
        let metrics = CoordinatorMetrics::new();
        metrics.grant("c");
        metrics.deny_by_check("c", "cap");
        metrics.would_grant("c");
        metrics.pending("c");
        metrics.outcome("c", "success");
        metrics.set_active_leases("c", 1);
        metrics.set_fleet_budget_used("c", 1);
        metrics.set_budget_max("c", 1);
        metrics.set_frozen("c", true);
        metrics.set_leader(true);
        metrics.fenced_write();
        metrics.alert("c", "class_frozen");
        metrics.observe_store("range", Duration::from_millis(1));
        metrics.observe_admission_batch(1);
        metrics.set_live_hosts("web", 1);
        metrics.failpoint_hit("pause");
        let text = metrics.render();
        // Each metric has a sample at 1 (histograms: their `_count`).
        for (name, sample) in [
            (GRANTS_TOTAL, "{class=\"c\"} 1"),
            (DENIALS_TOTAL, "{class=\"c\",check=\"cap\"} 1"),
            (WOULD_GRANTS_TOTAL, "{class=\"c\"} 1"),
            (PENDING_TOTAL, "{class=\"c\"} 1"),
            (OUTCOMES_TOTAL, "{class=\"c\",outcome=\"success\"} 1"),
            (ACTIVE_LEASES, "{class=\"c\"} 1"),
            (BUDGET_USED, "{class=\"c\",scope=\"fleet\"} 1"),
            (BUDGET_MAX, "{class=\"c\"} 1"),
            (FROZEN, "{class=\"c\"} 1"),
            (LEADER, " 1"),
            (FENCED_WRITES_TOTAL, " 1"),
            (ALERTS_TOTAL, "{class=\"c\",kind=\"class_frozen\"} 1"),
            (STORE_REQUEST_SECONDS, "_count{op=\"range\"} 1"),
            (ADMISSION_BATCH_SIZE, "_count 1"),
            (LIVE_HOSTS, "{service=\"web\"} 1"),
            (FAILPOINT_HITS_TOTAL, "{name=\"pause\"} 1"),
        ] {
            let line = format!("\n{name}{sample}\n");
            assert!(text.contains(&line), "no {line:?} in:\n{text}");
        }
    }

    #[test]
    fn a_denial_is_labelled_by_its_check() {
        let metrics = CoordinatorMetrics::new();
        metrics.deny(
            "disk_cleanup",
            &DenyReason::CapFull {
                holders: 2,
                cap: 2,
                live_hosts: 10,
            },
        );
        metrics.deny(
            "disk_cleanup",
            &DenyReason::ClassFrozen {
                record: FreezeRecord {
                    reason: "test".to_owned(),
                    owner: "operator".to_owned(),
                    since: UnixMillis(0),
                    cause: FreezeCause::Operator,
                },
            },
        );
        let text = metrics.render();
        assert!(
            text.contains("interlock_denials_total{class=\"disk_cleanup\",check=\"cap\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("interlock_denials_total{class=\"disk_cleanup\",check=\"frozen\"} 1\n"),
            "{text}"
        );
    }

    /// Sends a bare HTTP/1.0 GET and returns (status code, headers, body).
    async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end in {response:?}"));
        let status_line = head.lines().next().unwrap();
        assert!(status_line.starts_with("HTTP/1."), "{status_line}");
        let code = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        (code, head.to_owned(), body.to_owned())
    }

    async fn start(
        ready: impl Fn() -> Readiness + Send + Sync + 'static,
    ) -> (
        std::net::SocketAddr,
        CoordinatorMetrics,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = CoordinatorMetrics::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(listener, metrics.clone(), ready, async {
            let _ = stopped.await;
        }));
        (addr, metrics, stop, server)
    }

    #[tokio::test]
    async fn http_endpoints_answer_and_shut_down() {
        let (addr, metrics, stop, server) = start(|| Readiness::follower("10.0.0.1:7400")).await;
        metrics.grant("disk_cleanup");
        metrics.set_leader(false);

        let (code, head, body) = http_get(addr, "/metrics").await;
        assert_eq!(code, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(
            body.contains("interlock_grants_total{class=\"disk_cleanup\"} 1\n"),
            "{body}"
        );
        assert!(body.contains("interlock_leader 0\n"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");

        let (code, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((code, body.as_str()), (200, "ok\n"));

        let (code, _, body) = http_get(addr, "/readyz").await;
        assert_eq!(
            (code, body.as_str()),
            (200, "ready: follower, leader at 10.0.0.1:7400\n")
        );

        let (code, _, _) = http_get(addr, "/nothing").await;
        assert_eq!(code, 404);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn readyz_reports_leader_and_not_ready() {
        let (addr, _, stop, server) = start(Readiness::leader).await;
        let (code, _, body) = http_get(addr, "/readyz").await;
        assert_eq!((code, body.as_str()), (200, "ready: leader\n"));
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();

        let (addr, _, stop, server) = start(|| Readiness::not_ready("store unreachable")).await;
        let (code, _, body) = http_get(addr, "/readyz").await;
        assert_eq!(
            (code, body.as_str()),
            (503, "not ready: store unreachable\n")
        );
        // Health is about the process, not the store.
        let (code, _, body) = http_get(addr, "/healthz").await;
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
