//! gRPC clients for tests, with a client-side history of what each call saw and when.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use interlock_proto::v1::{
    self as pb, acquire_reply::Outcome, agent_client::AgentClient, operator_client::OperatorClient,
};
use tonic::{Request, transport::Channel};

/// Connects to a coordinator over mutual TLS presenting `identity` (a host's or an operator's
/// certificate), retrying briefly while it starts. Most tests get theirs from
/// `Coordinator::operator_channel` / `host_channel`, which issue the certificate.
pub async fn channel(url: &str, identity: &interlock_proto::tls::TlsFiles) -> Channel {
    let tls = identity
        .client_config()
        .unwrap_or_else(|e| panic!("TLS files {}: {e}", identity.cert.display()));
    let endpoint = Channel::from_shared(url.to_owned())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(1))
        .tls_config(tls)
        .unwrap_or_else(|e| panic!("TLS config for {url}: {e}"));
    connect_retrying(url, endpoint).await
}

/// A plaintext channel, for the tests of an `--insecure` coordinator only.
pub async fn plaintext_channel(url: &str) -> Channel {
    let endpoint = Channel::from_shared(url.to_owned())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(1));
    connect_retrying(url, endpoint).await
}

async fn connect_retrying(url: &str, endpoint: tonic::transport::Endpoint) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match endpoint.connect().await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "coordinator not up yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e:?}"),
        }
    }
}

/// A mutual-TLS channel presenting `files` (a host's or an operator's certificate).
pub async fn tls_channel(
    url: &str,
    files: &interlock_proto::tls::TlsFiles,
) -> Result<Channel, tonic::transport::Error> {
    let tls = files
        .client_config()
        .unwrap_or_else(|e| panic!("TLS files {}: {e}", files.cert.display()));
    tls_channel_with(url, tls).await
}

/// A TLS channel with a hand-made client config (tests of what must not be served).
pub async fn tls_channel_with(
    url: &str,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(url.to_owned())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await
}

pub fn agent(channel: &Channel) -> AgentClient<Channel> {
    AgentClient::new(channel.clone())
}

pub fn operator(channel: &Channel) -> OperatorClient<Channel> {
    OperatorClient::new(channel.clone())
}

/// An operator request carrying a self-asserted identity in the `x-interlock-operator` header:
/// what an `--insecure` coordinator believes. Over mutual TLS the certificate decides and the
/// header is ignored; use `Coordinator::operator_channel(name)` there.
pub fn as_operator<T>(name: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        "x-interlock-operator",
        name.parse().expect("ascii operator"),
    );
    r
}

/// How long a test client keeps retrying an UNAVAILABLE answer: the coordinator steps down
/// when it cannot renew its leadership (as it must), and on a loaded machine a new term takes
/// a moment. Real agents retry the same way.
const RETRY_UNAVAILABLE_FOR: Duration = Duration::from_secs(15);

/// Calls `call` until it answers anything but UNAVAILABLE, bounded in time. UNAVAILABLE from
/// the coordinator means "not done" (a deposed or stepping-down leader commits nothing), so
/// retrying is safe.
pub async fn retry_unavailable<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + RETRY_UNAVAILABLE_FOR;
    loop {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Registers `host` in `service`.
pub async fn register(agent: &mut AgentClient<Channel>, host: &str, service: &str) {
    let labels = HashMap::from([("service".to_owned(), service.to_owned())]);
    retry_unavailable(|| {
        let mut agent = agent.clone();
        let request = pb::RegisterRequest {
            host_id: host.to_owned(),
            labels: labels.clone(),
        };
        async move { agent.register(request).await }
    })
    .await
    .unwrap_or_else(|e| panic!("register {host}: {e}"));
}

pub fn acquire_request(host: &str, class: &str, target: &str) -> pb::AcquireRequest {
    pb::AcquireRequest {
        host_id: host.to_owned(),
        class: class.to_owned(),
        target: target.to_owned(),
        evidence: "test".to_owned(),
        dry_run: false,
    }
}

/// The decision in an acquire reply, flattened for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Got {
    Granted {
        lease_id: String,
        token: u64,
        approver: String,
    },
    Denied {
        check: String,
        reason: String,
    },
    Pending {
        approval_id: String,
    },
    Observed {
        would_grant: bool,
        check: String,
    },
}

pub fn got(reply: pb::AcquireReply) -> Got {
    match reply.outcome.expect("an outcome") {
        Outcome::Granted(g) => Got::Granted {
            lease_id: g.lease_id,
            token: g.token,
            approver: g.approver,
        },
        Outcome::Denied(d) => Got::Denied {
            check: d.check,
            reason: d.reason,
        },
        Outcome::Pending(p) => Got::Pending {
            approval_id: p.approval_id,
        },
        Outcome::Observed(o) => Got::Observed {
            would_grant: o.would_grant,
            check: o.check,
        },
    }
}

pub async fn acquire(
    agent: &mut AgentClient<Channel>,
    host: &str,
    class: &str,
    target: &str,
) -> Got {
    let reply = retry_unavailable(|| {
        let mut agent = agent.clone();
        let request = acquire_request(host, class, target);
        async move { agent.acquire(request).await }
    })
    .await
    .unwrap_or_else(|e| panic!("acquire for {host}: {e}"));
    got(reply.into_inner())
}

pub async fn release(agent: &mut AgentClient<Channel>, lease_id: &str, token: u64) {
    retry_unavailable(|| {
        let mut agent = agent.clone();
        let request = pb::ReleaseRequest {
            lease_id: lease_id.to_owned(),
            token,
            outcome: pb::Outcome::Success as i32,
            detail: String::new(),
        };
        async move { agent.release(request).await }
    })
    .await
    .unwrap_or_else(|e| panic!("release {lease_id}: {e}"));
}

/// The whole audit log (optionally filtered by class and host), with its chain verdict.
pub async fn audit(
    operator: &OperatorClient<Channel>,
    class: Option<&str>,
    host: Option<&str>,
) -> pb::AuditReply {
    operator
        .clone()
        .audit(pb::AuditRequest {
            since_ms: 0,
            class: class.unwrap_or_default().to_owned(),
            host: host.unwrap_or_default().to_owned(),
            limit: 0,
        })
        .await
        .expect("audit")
        .into_inner()
}

/// One lease as a client saw it: `[acquired, released]` is when it certainly held it (after
/// the grant's answer arrived, before the release was sent).
#[derive(Clone, Debug)]
pub struct HeldInterval {
    pub client: usize,
    pub token: u64,
    pub acquire_sent: Instant,
    pub acquired: Instant,
    pub released: Instant,
}

/// The largest number of intervals that certainly overlapped at one instant.
pub fn max_overlap(history: &[HeldInterval]) -> usize {
    let mut events: Vec<(Instant, i32)> = Vec::with_capacity(history.len() * 2);
    for h in history {
        events.push((h.acquired, 1));
        events.push((h.released, -1));
    }
    // At equal instants, count releases first: touching intervals do not overlap.
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in events {
        cur += d;
        max = max.max(cur);
    }
    usize::try_from(max).unwrap_or(0)
}

/// Pairs of grants whose order the clients observed (one was answered before the other was
/// asked for) but whose tokens do not increase in that order.
pub fn token_order_violations(history: &[HeldInterval]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<&HeldInterval> = history.iter().collect();
    sorted.sort_by_key(|h| h.acquired);
    let mut bad = Vec::new();
    for (i, a) in sorted.iter().enumerate() {
        for b in &sorted[i + 1..] {
            if b.acquire_sent > a.acquired && b.token <= a.token {
                bad.push((a.token, b.token));
            }
        }
    }
    bad
}
