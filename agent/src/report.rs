//! The agent's side of the coordinator link: which findings still have to be reported, what a
//! failed call means for the registration, how long to wait before the next attempt, and the
//! gRPC client that finds the leader among the configured replicas.
//!
//! The decisions ([`FindingLedger`], [`Backoff`], [`after_call`], [`LinkTracker`],
//! [`redirect_target`]) are pure: no clock, no I/O. [`Replicas`] is the only code here that
//! talks to the network; wire types stop in it ([`finding_to_wire`] converts on the way out).
//! This module must not import `probes` or `pressure`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interlock_proto::tls::TlsFiles;
use interlock_proto::v1 as pb;
use interlock_proto::v1::agent_client::AgentClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::finding::Finding;

/// The metadata key in which a replica that does not lead names the leader.
pub const LEADER_METADATA_KEY: &str = "x-interlock-leader";
/// A replica that does not accept a connection in this time is skipped for this attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A call that gets no answer in this time counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

// --------------------------------------------------------------------------- link state

/// Whether the agent can talk to the coordinator. Without a link the agent observes only: it
/// keeps detecting and exposing findings locally and never acts (there is no lease to act under).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordinatorLink {
    /// Registered with the replica at `url`.
    Connected { url: String },
    /// No replica could register or heartbeat us; observing only.
    Unreachable { reason: String },
}

impl CoordinatorLink {
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Connected { .. })
    }

    /// The stable name used in logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connected { .. } => "connected",
            Self::Unreachable { .. } => "unreachable",
        }
    }
}

/// Remembers the last link state so it is logged once per change, not once per attempt.
#[derive(Debug, Default)]
pub struct LinkTracker {
    last: Option<CoordinatorLink>,
}

impl LinkTracker {
    /// Returns the new state when it differs in kind (or, when connected, in replica) from the
    /// previous one: that is the moment to log and set the metric.
    pub fn update(&mut self, link: CoordinatorLink) -> Option<CoordinatorLink> {
        let changed = match (&self.last, &link) {
            (None, _) => true,
            (
                Some(CoordinatorLink::Connected { url: a }),
                CoordinatorLink::Connected { url: b },
            ) => a != b,
            (Some(a), b) => a.name() != b.name(),
        };
        changed.then(|| {
            self.last = Some(link.clone());
            link
        })
    }
}

/// What a failed (or successful) coordinator call means for the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The coordinator does not know this host (its registration expired): register again.
    NotFound(String),
    /// No replica answered, or none could serve (no leader yet): retry later.
    Unreachable(String),
    /// The coordinator answered and refused the request; retrying the same request will not help.
    Rejected(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) => write!(f, "not registered: {m}"),
            Self::Unreachable(m) => write!(f, "coordinator unreachable: {m}"),
            Self::Rejected(m) => write!(f, "coordinator refused: {m}"),
        }
    }
}

impl std::error::Error for CallError {}

/// The next step after a call: the pure core of the link loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// All well; carry on at the normal pace.
    Continue,
    /// Register again (and re-report every current finding: the coordinator forgot us).
    Reregister,
    /// Wait out the backoff, then retry; the link is unreachable meanwhile.
    Backoff,
    /// Drop what was being sent (logged), carry on.
    Drop,
}

/// Maps the outcome of a heartbeat or report to the next step.
pub fn after_call(result: &Result<(), CallError>) -> NextStep {
    match result {
        Ok(()) => NextStep::Continue,
        Err(CallError::NotFound(_)) => NextStep::Reregister,
        Err(CallError::Unreachable(_)) => NextStep::Backoff,
        Err(CallError::Rejected(_)) => NextStep::Drop,
    }
}

/// Exponential backoff between attempts, bounded above, reset by a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt; doubles each time up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// The heartbeat interval the coordinator asked for, kept within sane bounds so a zero or a
/// huge answer cannot make the agent spin or go silent past its TTL.
pub fn heartbeat_interval(reply_interval_ms: u64, ttl_ms: u64) -> Duration {
    let asked = if reply_interval_ms > 0 {
        reply_interval_ms
    } else {
        ttl_ms / 3
    };
    Duration::from_millis(asked.clamp(200, 60_000))
}

// ---------------------------------------------------------------------------- findings

/// The findings the agent currently holds, and what the coordinator has already been told.
///
/// A finding is reported when it is new or when it changed (summary, evidence or onset) since
/// it was last reported; repeats of the same id with the same content are not re-sent.
#[derive(Debug, Default)]
pub struct FindingLedger {
    current: BTreeMap<String, Finding>,
    sent: BTreeMap<String, Finding>,
}

impl FindingLedger {
    /// Records a finding (replacing any earlier one with the same id).
    pub fn upsert(&mut self, finding: Finding) {
        self.current.insert(finding.id.clone(), finding);
    }

    /// Replaces the current findings with `findings` (those that cleared are dropped; if one
    /// comes back later it is reported again).
    pub fn set_current(&mut self, findings: Vec<Finding>) {
        self.current = findings.into_iter().map(|f| (f.id.clone(), f)).collect();
        let current = &self.current;
        self.sent.retain(|id, _| current.contains_key(id));
    }

    /// Findings not yet reported in their current form, in id order.
    pub fn pending(&self) -> Vec<Finding> {
        self.current
            .iter()
            .filter(|(id, f)| self.sent.get(*id) != Some(*f))
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// The coordinator accepted these.
    pub fn mark_sent(&mut self, findings: &[Finding]) {
        for f in findings {
            self.sent.insert(f.id.clone(), f.clone());
        }
    }

    /// The coordinator lost our registration: everything current must be reported again.
    pub fn forget_sent(&mut self) {
        self.sent.clear();
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

/// A finding as the wire carries it; `since_ms` is Unix time, computed by the caller from the
/// detector's monotonic onset.
pub fn finding_to_wire(finding: &Finding, since_unix_ms: u64) -> pb::Finding {
    let Finding {
        id,
        detector,
        target,
        summary,
        evidence,
        since: _,
    } = finding;
    let evidence_json = format!(
        "{{{}}}",
        evidence
            .iter()
            .map(|(k, v)| {
                let v = if v.is_finite() {
                    v.to_string()
                } else {
                    "null".to_owned()
                };
                format!("{k:?}:{v}")
            })
            .collect::<Vec<_>>()
            .join(",")
    );
    pb::Finding {
        id: id.clone(),
        detector: (*detector).to_owned(),
        target: target.clone(),
        summary: summary.clone(),
        evidence_json,
        since_ms: since_unix_ms,
    }
}

// ---------------------------------------------------------------------- replicas client

/// Where to retry after `url` answered with `leader` in [`LEADER_METADATA_KEY`]: only when it
/// names another replica (a bare `host:port` gets `http://`).
pub fn redirect_target(url: &str, leader: Option<&str>) -> Option<String> {
    let leader = leader?.trim();
    if leader.is_empty() {
        return None;
    }
    let leader = if leader.contains("://") {
        leader.to_owned()
    } else {
        format!("http://{leader}")
    };
    (leader.trim_end_matches('/') != url.trim_end_matches('/')).then_some(leader)
}

fn classify(url: &str, status: &Status) -> CallError {
    match status.code() {
        Code::NotFound => CallError::NotFound(status.message().to_owned()),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            CallError::Unreachable(format!("{url}: {}", status.message()))
        }
        _ => CallError::Rejected(format!("{url}: {:?}: {}", status.code(), status.message())),
    }
}

type Stamp = interlock_proto::tls::FileStamp;

fn stamp(files: &TlsFiles) -> Stamp {
    interlock_proto::tls::file_stamp(&[&files.ca, &files.cert, &files.key])
}

/// The agent's TLS identity towards the coordinator, re-read when its files change (a renewed
/// or replaced certificate is presented on the next connection, without a restart). Files
/// that do not load, or a key that does not go with the certificate (a rotation between its
/// two renames), keep the identity in use and are tried again at the next call.
#[derive(Clone, Debug)]
pub struct ClientTls {
    files: TlsFiles,
    state: Arc<Mutex<TlsState>>,
}

#[derive(Debug)]
struct TlsState {
    stamp: Stamp,
    config: ClientTlsConfig,
    /// Bumped at each reload; channels made with an older one are dropped.
    generation: u64,
    /// The last reload failure, logged once.
    failed: Option<String>,
}

/// Reads the files and checks the key is the certificate's.
fn load_tls(files: &TlsFiles) -> Result<ClientTlsConfig, String> {
    let config = files.client_config().map_err(|e| e.to_string())?;
    let cert = std::fs::read(&files.cert).map_err(|e| format!("{}: {e}", files.cert.display()))?;
    let spki = interlock_proto::tls::cert_facts_pem(&cert)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?
        .spki_der;
    let key = interlock_proto::tls::read_key(&files.key).map_err(|e| e.to_string())?;
    let key = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&key))
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != spki {
        return Err(format!(
            "{} is not the key of {}",
            files.key.display(),
            files.cert.display()
        ));
    }
    Ok(config)
}

impl ClientTls {
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let stamp = stamp(&files);
        let config = load_tls(&files)?;
        Ok(Self {
            files,
            state: Arc::new(Mutex::new(TlsState {
                stamp,
                config,
                generation: 0,
                failed: None,
            })),
        })
    }

    /// The identity for a new connection and its generation, reloaded if the files changed.
    pub fn current(&self) -> (u64, ClientTlsConfig) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.files);
        if now != state.stamp {
            match load_tls(&self.files) {
                Ok(config) => {
                    state.stamp = now;
                    state.config = config;
                    state.generation += 1;
                    state.failed = None;
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        "TLS files changed: new connections present the new certificate"
                    );
                }
                Err(e) => {
                    if state.failed.as_ref() != Some(&e) {
                        tracing::warn!(
                            error = e,
                            "TLS files changed but do not load; keeping the identity in use"
                        );
                        state.failed = Some(e);
                    }
                }
            }
        }
        (state.generation, state.config.clone())
    }
}

/// The configured coordinator replicas, with the one that last answered tried first.
#[derive(Clone, Debug)]
pub struct Replicas {
    urls: Vec<String>,
    tls: Option<ClientTls>,
    /// The replica that last answered, its channel, and the TLS generation it was made with.
    preferred: Option<(String, Channel, u64)>,
}

impl Replicas {
    pub fn new(urls: Vec<String>, tls: Option<ClientTls>) -> Self {
        Self {
            urls,
            tls,
            preferred: None,
        }
    }

    /// Calls `call` on the preferred replica, then on each configured one; a replica that does
    /// not lead and names the leader is followed once. Returns the answering URL and the reply.
    pub async fn call<R, F, Fut>(&mut self, mut call: F) -> Result<(String, R), CallError>
    where
        F: FnMut(AgentClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let (generation, tls) = match &self.tls {
            Some(t) => {
                let (g, c) = t.current();
                (g, Some(c))
            }
            None => (0, None),
        };
        let mut candidates: Vec<(String, Option<Channel>)> = Vec::new();
        // A channel made with files since replaced is dropped: the next one presents the new
        // certificate.
        if let Some((url, channel, g)) = self.preferred.take()
            && g == generation
        {
            candidates.push((url, Some(channel)));
        }
        for url in &self.urls {
            if !candidates.iter().any(|(u, _)| u == url) {
                candidates.push((url.clone(), None));
            }
        }
        let mut last = CallError::Unreachable("no coordinator replica configured".to_owned());
        for (url, channel) in candidates {
            let channel = match channel {
                Some(c) => c,
                None => match connect(&url, tls.as_ref()).await {
                    Ok(c) => c,
                    Err(e) => {
                        last = CallError::Unreachable(e);
                        continue;
                    }
                },
            };
            match call(AgentClient::new(channel.clone())).await {
                Ok(reply) => {
                    self.preferred = Some((url.clone(), channel, generation));
                    return Ok((url, reply.into_inner()));
                }
                Err(status) if status.code() == Code::Unavailable => {
                    let leader = status
                        .metadata()
                        .get(LEADER_METADATA_KEY)
                        .and_then(|v| v.to_str().ok());
                    last = classify(&url, &status);
                    let Some(leader) = redirect_target(&url, leader) else {
                        continue;
                    };
                    let Ok(channel) = connect(&leader, tls.as_ref()).await else {
                        continue;
                    };
                    match call(AgentClient::new(channel.clone())).await {
                        Ok(reply) => {
                            self.preferred = Some((leader.clone(), channel, generation));
                            return Ok((leader, reply.into_inner()));
                        }
                        Err(status) => last = classify(&leader, &status),
                    }
                }
                Err(status) => {
                    let err = classify(&url, &status);
                    if matches!(err, CallError::Unreachable(_)) {
                        last = err;
                        continue;
                    }
                    // The replica answered: keep it for next time.
                    self.preferred = Some((url, channel, generation));
                    return Err(err);
                }
            }
        }
        Err(last)
    }
}

/// Connects to one replica within [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("{url}: invalid URL: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("{url}: TLS: {}", error_chain(&e)))?;
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(format!("{url}: {}", error_chain(&e))),
        Err(_) => Err(format!("{url}: no connection within {CONNECT_TIMEOUT:?}")),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, and another key, written 0600 where `files` say.
    fn write_identity(files: &TlsFiles, cert_key: &rcgen::KeyPair, key: &rcgen::KeyPair) {
        use std::os::unix::fs::PermissionsExt as _;
        let cert = rcgen::CertificateParams::new(vec!["host".to_owned()])
            .and_then(|p| p.self_signed(cert_key))
            .expect("cert");
        std::fs::write(&files.ca, cert.pem()).expect("ca");
        std::fs::write(&files.cert, cert.pem()).expect("cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("key");
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }

    #[test]
    fn the_identity_follows_its_files_and_never_takes_a_key_of_another_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("host.pem"),
            key: dir.path().join("host.key"),
        };
        let (k1, k2) = (
            rcgen::KeyPair::generate().expect("k1"),
            rcgen::KeyPair::generate().expect("k2"),
        );
        write_identity(&files, &k1, &k2);
        let e = ClientTls::load(files.clone()).expect_err("mismatched key");
        assert!(e.contains("is not the key of"), "{e}");
        write_identity(&files, &k1, &k1);
        let tls = ClientTls::load(files.clone()).expect("load");
        assert_eq!(tls.current().0, 0);
        assert_eq!(tls.current().0, 0, "unchanged files: same generation");
        // Half a rotation (new certificate, old key): the identity in use stays.
        std::thread::sleep(Duration::from_millis(20));
        write_identity(&files, &k2, &k1);
        assert_eq!(tls.current().0, 0);
        write_identity(&files, &k2, &k2);
        assert_eq!(tls.current().0, 1, "the completed rotation is taken");
    }

    fn finding(id: &str, value: f64) -> Finding {
        Finding::new("disk_full", id, 5).evidence("used_ratio", value)
    }

    #[test]
    fn ledger_reports_new_and_changed_findings_once() {
        let mut ledger = FindingLedger::default();
        ledger.upsert(finding("/a", 0.9));
        ledger.upsert(finding("/b", 0.95));
        let pending = ledger.pending();
        assert_eq!(pending.len(), 2);
        ledger.mark_sent(&pending);
        assert!(ledger.pending().is_empty(), "nothing new, nothing sent");
        ledger.upsert(finding("/a", 0.9));
        assert!(
            ledger.pending().is_empty(),
            "an identical repeat is deduplicated"
        );
        ledger.upsert(finding("/a", 0.97));
        assert_eq!(
            ledger.pending(),
            vec![finding("/a", 0.97)],
            "a changed finding is re-sent"
        );
        ledger.mark_sent(&ledger.pending());
        ledger.forget_sent();
        assert_eq!(
            ledger.pending().len(),
            2,
            "after re-registering everything goes again"
        );
        ledger.mark_sent(&ledger.pending());
        ledger.set_current(vec![finding("/b", 0.95)]);
        assert!(ledger.pending().is_empty(), "/a cleared, /b unchanged");
        ledger.set_current(vec![finding("/a", 0.97), finding("/b", 0.95)]);
        assert_eq!(
            ledger.pending(),
            vec![finding("/a", 0.97)],
            "a new onset is reported"
        );
    }

    #[test]
    fn call_outcomes_choose_the_next_step() {
        assert_eq!(after_call(&Ok(())), NextStep::Continue);
        assert_eq!(
            after_call(&Err(CallError::NotFound("x".into()))),
            NextStep::Reregister
        );
        assert_eq!(
            after_call(&Err(CallError::Unreachable("x".into()))),
            NextStep::Backoff
        );
        assert_eq!(
            after_call(&Err(CallError::Rejected("x".into()))),
            NextStep::Drop
        );
    }

    #[test]
    fn statuses_classify_by_code() {
        assert!(matches!(
            classify("u", &Status::not_found("gone")),
            CallError::NotFound(_)
        ));
        assert!(matches!(
            classify("u", &Status::unavailable("x")),
            CallError::Unreachable(_)
        ));
        assert!(matches!(
            classify("u", &Status::invalid_argument("x")),
            CallError::Rejected(_)
        ));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[test]
    fn link_changes_are_reported_once() {
        let mut t = LinkTracker::default();
        let down = CoordinatorLink::Unreachable { reason: "a".into() };
        assert!(t.update(down.clone()).is_some());
        assert!(
            t.update(CoordinatorLink::Unreachable { reason: "b".into() })
                .is_none()
        );
        let up = CoordinatorLink::Connected {
            url: "http://x:1".into(),
        };
        assert!(t.update(up.clone()).is_some());
        assert!(t.update(up).is_none());
        assert!(
            t.update(CoordinatorLink::Connected {
                url: "http://y:1".into()
            })
            .is_some()
        );
        assert!(t.update(down).is_some());
    }

    #[test]
    fn redirects_go_only_to_another_replica() {
        assert_eq!(
            redirect_target("http://a:1", Some("b:2")),
            Some("http://b:2".into())
        );
        assert_eq!(redirect_target("http://a:1", Some("http://a:1/")), None);
        assert_eq!(redirect_target("http://a:1", Some("")), None);
        assert_eq!(redirect_target("http://a:1", None), None);
    }

    #[test]
    fn heartbeat_interval_is_bounded() {
        assert_eq!(heartbeat_interval(3000, 9000), Duration::from_secs(3));
        assert_eq!(heartbeat_interval(0, 9000), Duration::from_secs(3));
        assert_eq!(heartbeat_interval(1, 9000), Duration::from_millis(200));
    }

    #[test]
    fn evidence_is_json() {
        let f = finding("/a", 0.5).evidence("x", f64::NAN);
        let w = finding_to_wire(&f, 7);
        assert_eq!(w.evidence_json, r#"{"used_ratio":0.5,"x":null}"#);
        assert_eq!(w.id, "disk_full//a");
        assert_eq!(w.since_ms, 7);
    }
}
