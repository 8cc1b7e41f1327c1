//! The coordinator's engine: leadership, the admission actor and every store write.
//!
//! One replica leads (election on the store). While it leads, a single actor task owns the
//! [`View`] and the audit chain head and processes every mutation in order; consecutive lease
//! requests are admitted together and committed in one transaction (group commit), at most one
//! grant per scope per transaction so that tokens stay strictly increasing per scope. Every
//! write is a transaction guarded by the leadership key's revision (I5), carries the audit
//! records of what it changes (I8), and for grants also requires the chosen slot to be absent
//! (I1 as a storage precondition). Reads (status, leases, renewals) use the snapshot the actor
//! publishes after each commit.
//!
//! Decisions come from the pure `admission` core; this module only gathers inputs, reads the
//! clock, and persists. It must not contain admission rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    admission::{
        self, AdmissionRequest, BudgetState, Decision, Effect, FreezeCause, FreezeRecord,
        FreezeState, HostId, ScopeOccupancy, UnixMillis, WouldBe,
    },
    alert,
    audit::{AuditChain, AuditDraft, AuditKind, AuditRecord, ChainError, verify_chain},
    metrics::CoordinatorMetrics,
    policy::{ClassPolicy, Mode, Policy, check_mode_change},
    seal::{self, Seal},
    store::{
        CmpOp, Compare, LeaseId, Op, Store, StoreError, WatchEventKind,
        election::{self, LeaderKey},
    },
    view::{
        ApprovalRecord, ApprovalState, HostEntry, HostRecord, Keys, LeaseEntry, LeaseRecord,
        Removed, Scope, Undecodable, View,
    },
};

/// Most commands taken from the queue at once; a batch of grants costs about two operations
/// each, which keeps one transaction well under etcd's default `--max-txn-ops` of 128.
const MAX_BATCH: usize = 48;
/// Leases revoked per transaction by `freeze --revoke` (two operations each).
const REVOKE_CHUNK: usize = 40;
/// Audit records deleted per transaction when trimming to the retention.
const AUDIT_TRIM_CHUNK: u64 = 100;
/// Longest accepted host id, label, class name or target.
pub const MAX_FIELD: usize = 256;
/// Longest accepted evidence text.
pub const MAX_EVIDENCE: usize = 4096;

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Every key lives under this prefix.
    pub prefix: String,
    pub policy: Arc<Policy>,
    /// Hash of the policy file's text, recorded with the policy load.
    pub policy_hash: String,
    /// Address other replicas and clients should use to reach this one.
    pub advertise: String,
    /// How long a host registration lives without heartbeats.
    pub host_ttl: Duration,
    /// TTL of the leadership lease; a dead leader is replaced within about this long.
    pub election_ttl: Duration,
    /// Audit records kept (the oldest beyond this are deleted, in chunks).
    pub audit_retention: u64,
    /// Test-only pause before committing a batch that grants (proves I5 under SIGSTOP).
    pub failpoint_pause_before_grant_commit: Option<Duration>,
}

/// Why an engine call failed; the gRPC layer maps each to a status code.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    #[error("this replica is not the leader{}", leader.as_ref().map(|l| format!("; the leader is at {l}")).unwrap_or_else(|| "; no leader is elected yet, retry shortly".into()))]
    NotLeader { leader: Option<String> },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// Refused because of the credential presented (a join token unknown, used or expired).
    #[error("{0}")]
    Refused(String),
}

/// A join token as stored under `join/<hash>` (attached to a store lease that ends it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct JoinTokenRecord {
    host: String,
    expires_at_ms: u64,
    /// The audit record that made it: a join key the audit does not back is no token.
    audit_seq: u64,
}

/// Why a join token cannot enrol a host. Unknown, used, expired and not backed by the audit
/// read the same to the caller: a guesser learns nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum JoinRefusal {
    #[error(
        "the join token is unknown, used or expired: ask an operator for a new one \
         (`interlock certs token --host HOST`)"
    )]
    Unknown,
    #[error(
        "the join token is unknown, used or expired: ask an operator for a new one \
         (`interlock certs token --host HOST`)"
    )]
    NotBacked,
    #[error("the join token is for host {0}, not the host enrolling")]
    OtherHost(String),
}

/// Whether the stored join token (if any), made by audit record `made` (if it exists), may
/// enrol `host` at `now`.
fn join_token_verdict(
    host: &str,
    token_hash: &str,
    record: Option<&JoinTokenRecord>,
    made: Option<&AuditRecord>,
    now: UnixMillis,
) -> Result<(), JoinRefusal> {
    let record = record.ok_or(JoinRefusal::Unknown)?;
    if record.expires_at_ms <= now.0 {
        return Err(JoinRefusal::Unknown);
    }
    if record.host != host {
        return Err(JoinRefusal::OtherHost(record.host.clone()));
    }
    let backed = made.is_some_and(|r| {
        r.seq == record.audit_seq
            && r.kind == AuditKind::JoinToken
            && r.host.as_deref() == Some(host)
            && r.detail["token_hash"] == token_hash
            && r.computed_hash() == r.hash
    });
    if backed {
        Ok(())
    } else {
        Err(JoinRefusal::NotBacked)
    }
}

/// A lease request as the agent (or `interlock lease acquire`) sends it.
#[derive(Clone, Debug)]
pub struct AcquireInput {
    pub host: String,
    pub class: String,
    pub target: String,
    pub evidence: String,
    pub dry_run: bool,
}

/// A granted lease as returned to its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantInfo {
    pub lease_id: String,
    pub token: u64,
    pub ttl_ms: u64,
    pub verification_window_ms: u64,
    pub granted_at: UnixMillis,
    pub approver: Option<String>,
}

/// The answer to a lease request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcquireOutcome {
    Granted(GrantInfo),
    Denied {
        check: String,
        reason: String,
    },
    Pending {
        approval_id: String,
        expires_at: UnixMillis,
    },
    Observed {
        would_grant: bool,
        check: String,
        reason: String,
    },
    /// Dry run: what admission would decide now; nothing was written.
    DryRun(Box<AcquireOutcome>),
}

/// How an action ended, as the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failed,
    VerificationFailed,
    Abandoned,
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::VerificationFailed => "verification_failed",
            Outcome::Abandoned => "abandoned",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// What readers see: the view as of the last commit, and who leads.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub view: View,
    pub leader: bool,
    pub leader_addr: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Cmd {
    Acquire {
        input: AcquireInput,
        pre_lease: Option<LeaseId>,
        reply: Reply<AcquireOutcome>,
    },
    Register {
        host: String,
        labels: BTreeMap<String, String>,
        reply: Reply<Duration>,
    },
    Release {
        lease_id: String,
        token: u64,
        outcome: Outcome,
        detail: String,
        reply: Reply<()>,
    },
    Revoke {
        lease_id: String,
        reason: String,
        /// The audit owner (`operator:<name>`, or `deny-list:<file>`).
        owner: String,
        reply: Reply<()>,
    },
    Freeze {
        class: Option<String>,
        reason: String,
        revoke: bool,
        operator: String,
        reply: Reply<u32>,
    },
    Unfreeze {
        class: Option<String>,
        host: Option<String>,
        reason: String,
        operator: String,
        reply: Reply<()>,
    },
    SetMode {
        class: String,
        mode: Mode,
        operator: String,
        reply: Reply<Mode>,
    },
    Approve {
        id: String,
        operator: String,
        reply: Reply<AcquireOutcome>,
    },
    Reject {
        id: String,
        reason: String,
        operator: String,
        reply: Reply<()>,
    },
    LateOutcome {
        late: LateOutcome,
        reply: Reply<()>,
    },
    /// A call refused because of its caller's identity, to be audited.
    Refused {
        owner: String,
        check: String,
        reason: String,
        reply: Reply<()>,
    },
    /// Stores a join token's hash for `host`, expiring after `ttl`.
    CreateJoinToken {
        host: String,
        token_hash: String,
        ttl: Duration,
        operator: String,
        reply: Reply<UnixMillis>,
    },
    /// Uses up a join token for `host`: `Ok(Err(why))` when it is not a valid token for it.
    ConsumeJoinToken {
        host: String,
        token_hash: String,
        reply: Reply<Result<(), String>>,
    },
    /// An audit-only record (a certificate renewal).
    Record {
        draft: AuditDraft,
        reply: Reply<()>,
    },
    /// The break-glass credential is about to be used for `what`: audit and alert first.
    BreakGlass {
        what: String,
        reply: Reply<()>,
    },
    /// A key under the prefix was deleted (a lease ran out, a host stopped heartbeating).
    Deleted {
        key: String,
        revision: i64,
    },
    /// The watch broke: re-read everything.
    Resync,
}

/// The outcome of an action whose lease had already ended when the agent reported it.
#[derive(Clone, Debug)]
pub struct LateOutcome {
    pub host: String,
    pub lease_id: String,
    pub token: u64,
    pub class: String,
    pub target: String,
    pub outcome: Outcome,
    pub detail: String,
}

/// The coordinator engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("prefix", &self.inner.cfg.prefix)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<dyn Store>,
    cfg: EngineConfig,
    keys: Keys,
    metrics: CoordinatorMetrics,
    commands: std::sync::Mutex<Option<mpsc::Sender<Cmd>>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    store_kind: &'static str,
}

fn now_ms() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    UnixMillis(u64::try_from(ms).unwrap_or(u64::MAX))
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ttl_secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs().max(2)).unwrap_or(i64::MAX)
}

/// Host ids, services and label values end up in keys: keep them to a safe alphabet.
fn check_name(what: &str, value: &str) -> Result<(), EngineError> {
    if value.is_empty() || value.len() > MAX_FIELD {
        return Err(EngineError::Invalid(format!(
            "{what} must be 1 to {MAX_FIELD} bytes long (got {})",
            value.len()
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(EngineError::Invalid(format!(
            "{what} {value:?} may only contain letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

fn check_text(what: &str, value: &str, max: usize) -> Result<(), EngineError> {
    if value.trim().is_empty() {
        return Err(EngineError::Invalid(format!("{what} must not be empty")));
    }
    if value.len() > max {
        return Err(EngineError::Invalid(format!(
            "{what} is {} bytes; the limit is {max}",
            value.len()
        )));
    }
    Ok(())
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        store_kind: &'static str,
        cfg: EngineConfig,
        metrics: CoordinatorMetrics,
    ) -> Self {
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        Self {
            inner: Arc::new(Inner {
                keys: Keys::new(&cfg.prefix),
                store,
                cfg,
                metrics,
                commands: std::sync::Mutex::new(None),
                snapshot,
                store_kind,
            }),
        }
    }

    pub fn store_kind(&self) -> &'static str {
        self.inner.store_kind
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.cfg.policy
    }

    pub fn metrics(&self) -> &CoordinatorMetrics {
        &self.inner.metrics
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.borrow().clone()
    }

    /// Campaigns, leads, and campaigns again after losing leadership, until `shutdown`.
    /// On shutdown it finishes the command in progress, resigns and returns.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let stopping = *shutdown.borrow();
            if stopping {
                return;
            }
            match self.term(shutdown.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "leadership term ended; campaigning again");
                    self.inner.metrics.set_leader(false);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One term: campaign, load, serve commands until leadership is lost or shutdown.
    /// `Ok` means shutdown was requested.
    async fn term(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
        let inner = &self.inner;
        let store = inner.store.clone();
        let lease = store
            .lease_grant(ttl_secs(inner.cfg.election_ttl))
            .await
            .map_err(|e| format!("granting the election lease: {e}"))?;
        let (lost_tx, mut lost) = watch::channel(false);
        let keepalive = tokio::spawn(keep_alive(
            store.clone(),
            lease,
            inner.cfg.election_ttl,
            lost_tx,
        ));
        let _stop_keepalive = AbortOnDrop(keepalive);
        self.publish_follower().await;
        let election = inner.keys.election();
        let leader = tokio::select! {
            r = election::campaign(store.as_ref(), &election, inner.cfg.advertise.as_bytes(), lease) => r.map_err(|e| e.to_string())?,
            _ = flag_set(&mut lost) => return Err("election lease lost while campaigning".into()),
            _ = flag_set(&mut shutdown) => {
                let _ = store.lease_revoke(lease).await;
                return Ok(());
            }
        };
        tracing::info!(
            key = leader.key,
            revision = leader.create_revision,
            "elected leader"
        );
        let (tx, rx) = mpsc::channel(1024);
        let mut actor = match Actor::start(inner.clone(), leader.clone()).await {
            Ok(actor) => actor,
            Err(e) => {
                let _ = election::resign(store.as_ref(), &leader).await;
                let _ = store.lease_revoke(lease).await;
                return Err(e);
            }
        };
        *inner.commands.lock().expect("commands lock") = Some(tx.clone());
        inner.metrics.set_leader(true);
        let watcher = tokio::spawn(watch_deletes(
            store.clone(),
            inner.keys.root(),
            actor.loaded_revision,
            tx,
        ));
        let _stop_watcher = AbortOnDrop(watcher);
        let result = actor.serve(rx, &mut lost, &mut shutdown).await;
        *inner.commands.lock().expect("commands lock") = None;
        inner.metrics.set_leader(false);
        match result {
            Ok(()) => {
                let _ = election::resign(store.as_ref(), &leader).await;
                let _ = store.lease_revoke(lease).await;
                tracing::info!("resigned leadership");
                Ok(())
            }
            Err(e) => {
                let _ = store.lease_revoke(lease).await;
                Err(e)
            }
        }
    }

    async fn publish_follower(&self) {
        let leader_addr =
            election::current_leader(self.inner.store.as_ref(), &self.inner.keys.election())
                .await
                .ok()
                .flatten()
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
        self.inner.snapshot.send_replace(Arc::new(Snapshot {
            view: View::default(),
            leader: false,
            leader_addr,
        }));
    }

    /// The current leader's advertised address, read from the store.
    pub async fn leader_addr(&self) -> Option<String> {
        election::current_leader(self.inner.store.as_ref(), &self.inner.keys.election())
            .await
            .ok()
            .flatten()
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
    }

    async fn send<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, EngineError> {
        let sender = self.inner.commands.lock().expect("commands lock").clone();
        let Some(sender) = sender else {
            return Err(EngineError::NotLeader {
                leader: self.leader_addr().await,
            });
        };
        let (reply, answer) = oneshot::channel();
        if sender.send(make(reply)).await.is_err() {
            return Err(EngineError::NotLeader {
                leader: self.leader_addr().await,
            });
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(EngineError::Unavailable(
                "leadership ended before the request was decided; retry".into(),
            )),
        }
    }

    fn class(&self, name: &str) -> Result<&ClassPolicy, EngineError> {
        self.inner.cfg.policy.class(name).ok_or_else(|| {
            let known: Vec<&str> = self
                .inner
                .cfg
                .policy
                .classes
                .keys()
                .map(|c| c.as_str())
                .collect();
            EngineError::NotFound(format!(
                "unknown action class {name:?}; the policy defines: {}",
                known.join(", ")
            ))
        })
    }

    pub async fn register(
        &self,
        host: String,
        labels: BTreeMap<String, String>,
    ) -> Result<Duration, EngineError> {
        check_name("host_id", &host)?;
        let Some(service) = labels.get("service") else {
            return Err(EngineError::Invalid(
                "labels must include `service` (the scope caps count over); set it in the agent's config".into(),
            ));
        };
        check_name("label service", service)?;
        if labels.len() > 32 {
            return Err(EngineError::Invalid("at most 32 labels".into()));
        }
        for (k, v) in &labels {
            check_name("label name", k)?;
            if v.len() > MAX_FIELD {
                return Err(EngineError::Invalid(format!(
                    "label {k} is longer than {MAX_FIELD} bytes"
                )));
            }
        }
        self.send(|reply| Cmd::Register {
            host,
            labels,
            reply,
        })
        .await
    }

    /// Renews a host registration; `NotFound` means it expired and the agent registers again.
    pub async fn heartbeat(&self, host: &str) -> Result<Duration, EngineError> {
        let snap = self.snapshot();
        self.require_leader(&snap).await?;
        let entry = snap.view.hosts.get(host).ok_or_else(|| {
            EngineError::NotFound(format!(
                "host {host} is not registered (or its registration expired); register again"
            ))
        })?;
        match self
            .inner
            .store
            .lease_keepalive(LeaseId(entry.store_lease))
            .await
        {
            Ok(Some(_)) => Ok(self.inner.cfg.host_ttl),
            Ok(None) => Err(EngineError::NotFound(format!(
                "host {host}'s registration expired; register again"
            ))),
            Err(e) => Err(EngineError::Unavailable(format!("store: {e}"))),
        }
    }

    async fn require_leader(&self, snap: &Snapshot) -> Result<(), EngineError> {
        if snap.leader {
            Ok(())
        } else {
            Err(EngineError::NotLeader {
                leader: self.leader_addr().await,
            })
        }
    }

    pub async fn acquire(&self, input: AcquireInput) -> Result<AcquireOutcome, EngineError> {
        check_name("host_id", &input.host)?;
        check_text("target", &input.target, MAX_FIELD)?;
        if input.evidence.len() > MAX_EVIDENCE {
            return Err(EngineError::Invalid(format!(
                "evidence is {} bytes; the limit is {MAX_EVIDENCE}",
                input.evidence.len()
            )));
        }
        let class = self.class(&input.class)?.clone();
        // Grant the store lease before queueing when a grant is likely, so that the actor does
        // not serialise lease grants; an unused one is revoked after the decision.
        let snap = self.snapshot();
        let likely_grant = !input.dry_run
            && snap.leader
            && snap.view.kill_switch.is_none()
            && !snap.view.class_freezes.contains_key(&input.class)
            && snap
                .view
                .modes
                .get(&input.class)
                .copied()
                .unwrap_or(class.mode)
                == Mode::Autonomous;
        let pre_lease = if likely_grant {
            match self
                .inner
                .store
                .lease_grant(ttl_secs(class.lease_ttl))
                .await
            {
                Ok(id) => Some(id),
                Err(e) => return Err(EngineError::Unavailable(format!("store: {e}"))),
            }
        } else {
            None
        };
        let result = self
            .send(|reply| Cmd::Acquire {
                input,
                pre_lease,
                reply,
            })
            .await;
        if let (Some(lease), Err(_)) = (pre_lease, &result) {
            let store = self.inner.store.clone();
            tokio::spawn(async move { store.lease_revoke(lease).await });
        }
        result
    }

    /// Milliseconds left on a store lease (whole seconds, as etcd reports them), or `None` if
    /// the store does not answer; a lease that is gone reports 0.
    pub async fn store_lease_left(&self, store_lease: i64) -> Option<i64> {
        match self
            .inner
            .store
            .lease_time_to_live(LeaseId(store_lease))
            .await
        {
            Ok(Some(secs)) => Some(secs.saturating_mul(1000)),
            Ok(None) => Some(0),
            Err(_) => None,
        }
    }

    /// Answers a pending request's poll from the snapshot.
    pub async fn poll_approval(&self, id: &str) -> Result<AcquireOutcome, EngineError> {
        let snap = self.snapshot();
        self.require_leader(&snap).await?;
        let Some((record, _)) = snap.view.approvals.get(id) else {
            return Ok(AcquireOutcome::Denied {
                check: "expired".into(),
                reason: format!(
                    "approval {id} is unknown or expired without a decision; ask again if still needed"
                ),
            });
        };
        Ok(match &record.state {
            ApprovalState::Pending => AcquireOutcome::Pending {
                approval_id: record.id.clone(),
                expires_at: record.expires_at,
            },
            ApprovalState::Granted {
                lease_id,
                ttl_ms,
                verification_window_ms,
                granted_at,
                approver,
            } => match snap.view.leases.get(lease_id) {
                Some(lease) => AcquireOutcome::Granted(GrantInfo {
                    lease_id: lease_id.clone(),
                    token: lease.token,
                    ttl_ms: *ttl_ms,
                    verification_window_ms: *verification_window_ms,
                    granted_at: *granted_at,
                    approver: Some(approver.clone()),
                }),
                None => AcquireOutcome::Denied {
                    check: "expired".into(),
                    reason: format!("the lease granted on approval ({lease_id}) has already ended"),
                },
            },
            ApprovalState::Denied { check, reason } => AcquireOutcome::Denied {
                check: check.clone(),
                reason: reason.clone(),
            },
            ApprovalState::Rejected { by, reason } => AcquireOutcome::Denied {
                check: "rejected".into(),
                reason: format!("rejected by {by}: {reason}"),
            },
        })
    }

    /// Renews a lease: its holder must present the token it was granted.
    pub async fn renew(&self, lease_id: &str, token: u64) -> Result<u64, EngineError> {
        let snap = self.snapshot();
        self.require_leader(&snap).await?;
        let entry = snap.view.leases.get(lease_id).ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "lease {lease_id} is not live (released, revoked or expired): stop acting"
            ))
        })?;
        if entry.token != token {
            return Err(EngineError::FailedPrecondition(format!(
                "lease {lease_id} is held under token {}, not {token}: stop acting",
                entry.token
            )));
        }
        match self
            .inner
            .store
            .lease_keepalive(LeaseId(entry.store_lease))
            .await
        {
            Ok(Some(_)) => Ok(entry.record.ttl_ms),
            Ok(None) => Err(EngineError::FailedPrecondition(format!(
                "lease {lease_id} expired: stop acting"
            ))),
            Err(e) => Err(EngineError::Unavailable(format!("store: {e}"))),
        }
    }

    pub async fn release(
        &self,
        lease_id: String,
        token: u64,
        outcome: Outcome,
        detail: String,
    ) -> Result<(), EngineError> {
        if detail.len() > MAX_EVIDENCE {
            return Err(EngineError::Invalid(format!(
                "detail is longer than {MAX_EVIDENCE} bytes"
            )));
        }
        self.send(|reply| Cmd::Release {
            lease_id,
            token,
            outcome,
            detail,
            reply,
        })
        .await
    }

    /// Audits the outcome of an action whose lease already ended; refused while it is live.
    pub async fn late_outcome(&self, late: LateOutcome) -> Result<(), EngineError> {
        check_text("detail", &late.detail, MAX_EVIDENCE)?;
        for (field, value) in [
            ("host_id", &late.host),
            ("lease_id", &late.lease_id),
            ("class", &late.class),
            ("target", &late.target),
        ] {
            if value.is_empty() || value.len() > 253 {
                return Err(EngineError::Invalid(format!("{field} must be 1-253 bytes")));
            }
        }
        if late.token == 0 {
            return Err(EngineError::Invalid(
                "token must be the lease's fencing token (> 0)".into(),
            ));
        }
        self.send(|reply| Cmd::LateOutcome { late, reply }).await
    }

    /// Audits a call refused because of who made it; `owner` is the identity presented.
    pub async fn refused(
        &self,
        owner: String,
        check: &str,
        reason: String,
    ) -> Result<(), EngineError> {
        let check = check.to_owned();
        self.send(|reply| Cmd::Refused {
            owner,
            check,
            reason,
            reply,
        })
        .await
    }

    /// Makes a join token for `host` (the caller generated it; only its hash is stored),
    /// audited as owned by the operator. Returns when it expires.
    pub async fn create_join_token(
        &self,
        host: String,
        token_hash: String,
        ttl: Duration,
        operator: String,
    ) -> Result<UnixMillis, EngineError> {
        check_operator(&operator)?;
        self.send(|reply| Cmd::CreateJoinToken {
            host,
            token_hash,
            ttl,
            operator,
            reply,
        })
        .await
    }

    /// Uses up a join token for `host` (single use: deleted in the transaction that audits the
    /// enrolment). `Err(Refused)` when the token is unknown, used, expired, for another host,
    /// or not backed by the audit.
    pub async fn consume_join_token(
        &self,
        host: String,
        token_hash: String,
    ) -> Result<(), EngineError> {
        self.send(|reply| Cmd::ConsumeJoinToken {
            host,
            token_hash,
            reply,
        })
        .await?
        .map_err(EngineError::Refused)
    }

    /// Audits a host's certificate renewal.
    pub async fn certificate_renewed(
        &self,
        host: String,
        not_after_unix: i64,
    ) -> Result<(), EngineError> {
        let mut draft = AuditDraft::new(AuditKind::CertRenewed, format!("host:{host}"));
        draft.host = Some(host);
        draft.detail = json!({ "not_after_unix": not_after_unix });
        self.send(|reply| Cmd::Record { draft, reply }).await
    }

    /// Audits and alerts a use of the break-glass credential; the call goes ahead only if
    /// this succeeds.
    pub async fn break_glass(&self, what: String) -> Result<(), EngineError> {
        self.send(|reply| Cmd::BreakGlass { what, reply }).await
    }

    pub async fn revoke(
        &self,
        lease_id: String,
        reason: String,
        operator: String,
    ) -> Result<(), EngineError> {
        check_operator(&operator)?;
        self.revoke_as(lease_id, reason, format!("operator:{operator}"))
            .await
    }

    /// Revokes a lease on behalf of something other than an operator's command (the deny
    /// list), audited with `owner` as given.
    pub async fn revoke_as(
        &self,
        lease_id: String,
        reason: String,
        owner: String,
    ) -> Result<(), EngineError> {
        check_text("reason", &reason, MAX_EVIDENCE)?;
        self.send(|reply| Cmd::Revoke {
            lease_id,
            reason,
            owner,
            reply,
        })
        .await
    }

    pub async fn freeze(
        &self,
        class: Option<String>,
        reason: String,
        revoke: bool,
        operator: String,
    ) -> Result<u32, EngineError> {
        check_text("reason", &reason, MAX_EVIDENCE)?;
        check_operator(&operator)?;
        if let Some(c) = &class {
            self.class(c)?;
        }
        self.send(|reply| Cmd::Freeze {
            class,
            reason,
            revoke,
            operator,
            reply,
        })
        .await
    }

    pub async fn unfreeze(
        &self,
        class: Option<String>,
        host: Option<String>,
        reason: String,
        operator: String,
    ) -> Result<(), EngineError> {
        check_text("reason", &reason, MAX_EVIDENCE)?;
        check_operator(&operator)?;
        if let Some(c) = &class {
            self.class(c)?;
        }
        if host.is_some() && class.is_none() {
            return Err(EngineError::Invalid(
                "--host unblocks one host for one class: give --class too".into(),
            ));
        }
        self.send(|reply| Cmd::Unfreeze {
            class,
            host,
            reason,
            operator,
            reply,
        })
        .await
    }

    pub async fn set_mode(
        &self,
        class: String,
        mode: &str,
        operator: String,
    ) -> Result<Mode, EngineError> {
        check_operator(&operator)?;
        let policy = self.class(&class)?;
        let mode: Mode = mode
            .parse()
            .map_err(|e| EngineError::Invalid(format!("{e}")))?;
        check_mode_change(policy, mode)
            .map_err(|e| EngineError::FailedPrecondition(e.to_string()))?;
        self.send(|reply| Cmd::SetMode {
            class,
            mode,
            operator,
            reply,
        })
        .await
    }

    pub async fn approve(
        &self,
        id: String,
        operator: String,
    ) -> Result<AcquireOutcome, EngineError> {
        check_operator(&operator)?;
        self.send(|reply| Cmd::Approve {
            id,
            operator,
            reply,
        })
        .await
    }

    pub async fn reject(
        &self,
        id: String,
        reason: String,
        operator: String,
    ) -> Result<(), EngineError> {
        check_text("reason", &reason, MAX_EVIDENCE)?;
        check_operator(&operator)?;
        self.send(|reply| Cmd::Reject {
            id,
            reason,
            operator,
            reply,
        })
        .await
    }

    /// Audit records (newest last), filtered, and whether the retained chain verifies.
    pub async fn audit(
        &self,
        since: UnixMillis,
        class: Option<&str>,
        host: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Result<(), ChainError>), EngineError> {
        let range = self
            .inner
            .store
            .range_prefix(&self.inner.keys.audit())
            .await
            .map_err(|e| EngineError::Unavailable(format!("store: {e}")))?;
        let mut records = Vec::with_capacity(range.kvs.len());
        let mut integrity: Result<(), ChainError> = Ok(());
        for kv in &range.kvs {
            match serde_json::from_slice::<AuditRecord>(&kv.value) {
                Ok(mut record) => {
                    // Records are written once: an edit through the store shows as a new
                    // mod_revision even if the editor recomputed the hashes.
                    if kv.mod_revision != kv.create_revision && integrity.is_ok() {
                        integrity = Err(ChainError::Altered { seq: record.seq });
                    }
                    // A grant's token is the revision of the transaction that wrote it (and
                    // this record), known only after commit: fill it in from the key.
                    if record.kind == AuditKind::Grant && record.token.is_none() {
                        record.token = u64::try_from(kv.create_revision).ok();
                        records.push((record, true));
                    } else {
                        records.push((record, false));
                    }
                }
                Err(_) => {
                    if integrity.is_ok() {
                        integrity = Err(ChainError::Altered { seq: 0 });
                    }
                }
            }
        }
        let sealed: Vec<AuditRecord> = records
            .iter()
            .map(|(r, filled)| {
                let mut r = r.clone();
                if *filled {
                    r.token = None;
                }
                r
            })
            .collect();
        let chain = integrity.and(verify_chain(&sealed));
        let mut out: Vec<AuditRecord> = records
            .into_iter()
            .map(|(r, _)| r)
            .filter(|r| r.at >= since)
            .filter(|r| class.is_none_or(|c| r.class.as_deref() == Some(c)))
            .filter(|r| host.is_none_or(|h| r.host.as_deref() == Some(h)))
            .collect();
        if limit > 0 && out.len() > limit {
            out.drain(..out.len() - limit);
        }
        Ok((out, chain))
    }
}

fn check_operator(operator: &str) -> Result<(), EngineError> {
    if operator.trim().is_empty() || operator.len() > MAX_FIELD {
        return Err(EngineError::Invalid(
            "operator identity missing: pass --operator NAME or set INTERLOCK_OPERATOR".into(),
        ));
    }
    Ok(())
}

/// Resolves once the flag is set (or its sender is gone); holds no borrow across awaits.
async fn flag_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps the election lease alive; reports loss when the store says it is gone or when no
/// keepalive has succeeded for a whole TTL (then etcd may already have expired it).
async fn keep_alive(
    store: Arc<dyn Store>,
    lease: LeaseId,
    ttl: Duration,
    lost: watch::Sender<bool>,
) {
    let period = ttl / 4;
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match store.lease_keepalive(lease).await {
            Ok(Some(_)) => last_ok = Instant::now(),
            Ok(None) => {
                let _ = lost.send(true);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "election keepalive failed");
                if last_ok.elapsed() >= ttl {
                    let _ = lost.send(true);
                    return;
                }
            }
        }
    }
}

/// Forwards deletions under the prefix to the actor. When the watch breaks it resumes from
/// the last revision it saw; if that is no longer possible (compacted) it asks the actor to
/// re-read everything and watches from then on.
async fn watch_deletes(store: Arc<dyn Store>, root: String, from: i64, tx: mpsc::Sender<Cmd>) {
    use futures_util::StreamExt as _;
    let mut start = from + 1;
    loop {
        let mut stream = match store.watch_prefix(&root, start).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "watch failed; resyncing");
                if tx.send(Cmd::Resync).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                start = 0;
                continue;
            }
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(ev) => {
                    start = ev.revision + 1;
                    if ev.kind == WatchEventKind::Delete
                        && tx
                            .send(Cmd::Deleted {
                                key: ev.kv.key,
                                revision: ev.revision,
                            })
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch cancelled; resuming");
                    break;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Why a commit did not happen.
enum CommitError {
    /// A compare other than leadership failed: the view was stale. Resync and retry.
    Conflict,
    /// The leadership compare failed: this replica was deposed (I5). End the term.
    Deposed,
    /// The store did not answer, and reading back showed the write did not land.
    Unavailable(String),
}

struct Committed {
    revision: i64,
}

/// What one admitted request will become once its transaction commits.
enum Plan {
    Grant {
        record: LeaseRecord,
        store_lease: LeaseId,
        approval: Option<ApprovalRecord>,
    },
    Deny {
        check: String,
        reason: String,
        approval: Option<ApprovalRecord>,
    },
    Pending(ApprovalRecord, LeaseId),
    Observed {
        would_grant: bool,
        check: String,
        reason: String,
    },
}

/// One command of a group-committed batch.
enum Item {
    Acquire {
        input: AcquireInput,
        pre_lease: Option<LeaseId>,
        reply: Reply<AcquireOutcome>,
    },
    Release {
        lease_id: String,
        token: u64,
        outcome: Outcome,
        detail: String,
        reply: Reply<()>,
    },
}

impl Item {
    fn fail(self, err: EngineError) {
        match self {
            Item::Acquire { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Item::Release { reply, .. } => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

/// A batch item decided and waiting for its transaction.
enum Planned {
    Acquire {
        input: AcquireInput,
        plan: Box<Plan>,
        pre_lease: Option<LeaseId>,
        reply: Reply<AcquireOutcome>,
    },
    Release {
        entry: LeaseEntry,
        label: &'static str,
        item: Item,
    },
}

/// Changes decided earlier in the same batch, seen by later requests in it.
#[derive(Default)]
struct Overlay {
    released: BTreeSet<String>,
    budgets: BTreeMap<String, BudgetState>,
    granted_scopes: BTreeSet<Scope>,
    held: BTreeSet<(String, String, String)>,
    class_freezes: BTreeMap<String, FreezeRecord>,
    host_blocks: BTreeMap<(String, String), FreezeRecord>,
}

/// A transaction under construction.
#[derive(Default)]
struct TxnBuilder {
    compares: Vec<Compare>,
    ops: Vec<Op>,
    drafts: Vec<AuditDraft>,
    alerts: Vec<admission::Alert>,
    grants: usize,
    /// Write the state seal even if no sealed key changed (its audit record is being trimmed).
    reseal: bool,
}

struct Actor {
    inner: Arc<Inner>,
    leader: LeaderKey,
    view: View,
    chain: AuditChain,
    /// Sequence number of the oldest retained audit record.
    audit_oldest: u64,
    loaded_revision: i64,
    /// The sealed safety state as the audit backs it, and the audit record the stored seal
    /// names (see `seal`).
    seal: Seal,
    seal_seq: u64,
    /// The keys the last quarantine record of this term named.
    quarantine_recorded: Vec<String>,
}

impl Actor {
    async fn start(inner: Arc<Inner>, leader: LeaderKey) -> Result<Self, String> {
        let mut actor = Self {
            inner,
            leader,
            view: View::default(),
            chain: AuditChain::genesis(),
            audit_oldest: 1,
            loaded_revision: 0,
            seal: Seal::default(),
            seal_seq: 0,
            quarantine_recorded: Vec::new(),
        };
        let quarantined = actor.reload().await?;
        actor.record_quarantine(quarantined).await?;
        actor.record_policy_load().await?;
        Ok(actor)
    }

    /// Reads the store again mid-term (after a conflict, or when asked), auditing keys it
    /// would not trust that were not already audited this term.
    async fn resync(&mut self) -> Result<(), String> {
        let bad = self.reload().await?;
        self.record_quarantine(bad).await
    }

    /// Audits and alerts the keys a load would not trust, one record naming each, so that a
    /// change made behind the coordinator's back is in the audit and in front of a human.
    async fn record_quarantine(&mut self, bad: Vec<Undecodable>) -> Result<(), String> {
        let named: Vec<String> = bad.iter().map(|b| b.key.clone()).collect();
        if bad.is_empty() || named == self.quarantine_recorded {
            return Ok(());
        }
        let keys: Vec<_> = bad
            .iter()
            .map(|b| json!({"key": b.key, "problem": b.error, "kept": b.kept}))
            .collect();
        let names: Vec<&str> = bad.iter().map(|b| b.key.as_str()).collect();
        let message = format!(
            "{} key(s) under the prefix quarantined with the safer value (undecodable or not \
             backed by the audit): {}; check who wrote them (etcd's own audit), then set the \
             state again through interlock",
            bad.len(),
            names.join(", ")
        );
        let mut d = AuditDraft::new(
            AuditKind::Quarantine,
            format!("replica:{}", self.inner.cfg.advertise),
        );
        d.reason = Some(message.clone());
        d.detail = json!({ "keys": keys });
        let mut tx = TxnBuilder::default();
        tx.drafts.push(d);
        match self.commit(tx, now_ms()).await {
            Ok(_) => {}
            Err(CommitError::Deposed) => return Err("deposed while auditing a quarantine".into()),
            Err(CommitError::Conflict) => {
                return Err("conflict while auditing a quarantine".into());
            }
            Err(CommitError::Unavailable(e)) => return Err(e),
        }
        self.quarantine_recorded = named;
        self.page("store_quarantine", &message, json!({ "keys": names }));
        Ok(())
    }

    /// An alert that is not about one class: logged, counted and sent to the webhook, with
    /// `extra`'s fields added to the body.
    fn page(&self, kind: &str, message: &str, extra: serde_json::Value) {
        tracing::error!(kind, "ALERT: {message}");
        self.inner.metrics.alert("", kind);
        if let Some(url) = self.inner.cfg.policy.alert_webhook.clone() {
            let mut body = json!({
                "class": null, "host": null, "message": message, "kind": kind,
                "policy": self.inner.cfg.policy.owner(),
            });
            if let (Some(b), serde_json::Value::Object(more)) = (body.as_object_mut(), extra) {
                b.extend(more);
            }
            tokio::spawn(async move {
                if let Err(e) = alert::post_json(&url, &body).await {
                    tracing::error!(url, error = %e, "alert webhook failed");
                }
            });
        }
    }

    /// Reads the state under the prefix and the audit chain's ends (not the whole audit log,
    /// which can hold many records). The parts are read one after another; that is safe
    /// because only the leader writes (and it is not writing now) and expiries only delete,
    /// which the watch, started from the oldest read's revision, replays.
    async fn reload(&mut self) -> Result<Vec<Undecodable>, String> {
        let keys = &self.inner.keys;
        let store = &self.inner.store;
        let mut state_kvs = Vec::new();
        let mut revision = i64::MAX;
        for prefix in keys.state_prefixes() {
            let range = store
                .range_prefix(&prefix)
                .await
                .map_err(|e| format!("loading state: {e}"))?;
            revision = revision.min(range.revision);
            state_kvs.extend(range.kvs);
        }
        let (first, last) = store
            .prefix_ends(&keys.audit())
            .await
            .map_err(|e| format!("loading the audit head: {e}"))?;
        // The seal, and the audit record it names, to tell the keys the audit backs.
        let seal_kv = store
            .get(&keys.seal())
            .await
            .map_err(|e| format!("loading the state seal: {e}"))?;
        let seal_record = match seal_kv.as_ref().map(|kv| seal::parse(&kv.value)) {
            Some(Ok(v)) => store
                .get(&keys.audit_record(v.audit_seq))
                .await
                .map_err(|e| format!("loading the seal's audit record: {e}"))?
                .and_then(|kv| serde_json::from_slice::<AuditRecord>(&kv.value).ok()),
            _ => None,
        };
        let checked = seal::check(
            keys,
            &seal::Stored {
                value: seal_kv.as_ref().map(|kv| kv.value.as_slice()),
                record: seal_record.as_ref(),
                audit_empty: first.is_none(),
            },
            &state_kvs,
        );
        // One bad write must not stop every replica from leading, nor lift a safety stop:
        // each undecodable or unbacked key is quarantined (the view keeps the safer value in
        // its place) and reported.
        let (view, bad) = View::load_checked(keys, &state_kvs, &checked.unbacked);
        for b in &bad {
            tracing::error!(
                key = b.key,
                error = b.error,
                kept = b.kept,
                "undecodable key in the store quarantined; an operator must repair or delete it"
            );
        }
        self.inner.metrics.set_quarantined_keys(bad.len());
        self.audit_oldest = match &first {
            Some(kv) => serde_json::from_slice::<AuditRecord>(&kv.value)
                .map(|r| r.seq)
                .unwrap_or(1),
            None => 1,
        };
        self.chain = match last {
            Some(kv) => {
                let last: AuditRecord = serde_json::from_slice(&kv.value)
                    .map_err(|e| format!("last audit record {} is undecodable: {e}", kv.key))?;
                AuditChain::resume(&last).map_err(|e| format!("audit chain head: {e}"))?
            }
            None => AuditChain::genesis(),
        };
        self.view = view;
        self.seal = checked.attested;
        self.seal_seq = seal_record.map_or(0, |r| r.seq);
        self.loaded_revision = revision;
        self.publish();
        Ok(bad)
    }

    /// Bounded retention: once more than `audit_retention` + one chunk of records exist,
    /// deletes the oldest chunk (one guarded transaction). The chain still verifies: its first
    /// retained record may link to anything.
    async fn trim_audit(&mut self) -> Result<(), String> {
        let retention = self.inner.cfg.audit_retention.max(AUDIT_TRIM_CHUNK);
        let newest = self.chain.next_seq().saturating_sub(1);
        if newest
            < self
                .audit_oldest
                .saturating_add(retention + AUDIT_TRIM_CHUNK)
        {
            return Ok(());
        }
        let mut tx = TxnBuilder::default();
        let end = self.audit_oldest + AUDIT_TRIM_CHUNK;
        for seq in self.audit_oldest..end {
            tx.ops.push(Op::Delete {
                key: self.inner.keys.audit_record(seq),
            });
        }
        // The seal must keep naming a record that exists: if this chunk holds it, the same
        // transaction writes the seal again, backed by a new record.
        if self.seal_seq < end {
            tx.reseal = true;
            let mut d = AuditDraft::new(
                AuditKind::Reseal,
                format!("replica:{}", self.inner.cfg.advertise),
            );
            d.detail = json!({"trimmed_before": end, "previous_seal_record": self.seal_seq});
            tx.drafts.push(d);
        }
        match self.commit(tx, now_ms()).await {
            Ok(_) => {
                self.audit_oldest = end;
                Ok(())
            }
            Err(CommitError::Deposed) => Err("deposed while trimming the audit log".into()),
            Err(CommitError::Conflict) => {
                tracing::warn!("trimming the audit log conflicted; will retry");
                Ok(())
            }
            Err(CommitError::Unavailable(e)) => {
                tracing::warn!(error = %e, "trimming the audit log failed; will retry");
                Ok(())
            }
        }
    }

    fn publish(&self) {
        self.inner.snapshot.send_replace(Arc::new(Snapshot {
            view: self.view.clone(),
            leader: true,
            leader_addr: Some(self.inner.cfg.advertise.clone()),
        }));
        let mut per_class: BTreeMap<&str, u32> = BTreeMap::new();
        for c in self.inner.cfg.policy.classes.keys() {
            per_class.insert(c.as_str(), 0);
        }
        for l in self.view.leases.values() {
            *per_class.entry(l.record.class.as_str()).or_default() += 1;
        }
        let now = now_ms();
        for (class, n) in per_class {
            self.inner.metrics.set_active_leases(class, n);
            if let Some(policy) = self.inner.cfg.policy.class(class) {
                let used = self
                    .view
                    .budget(class)
                    .fleet_used(&policy.budget.fleet, now);
                self.inner.metrics.set_fleet_budget_used(class, used);
            }
            let frozen = self.view.class_freezes.contains_key(class);
            self.inner.metrics.set_frozen(class, frozen);
        }
        self.inner
            .metrics
            .set_kill_switch(self.view.kill_switch.is_some());
    }

    async fn record_policy_load(&mut self) -> Result<(), String> {
        let policy = &self.inner.cfg.policy;
        let marker = format!("{}#{}", policy.owner(), self.inner.cfg.policy_hash);
        if self.view.policy_loaded.as_deref() == Some(marker.as_str()) {
            return Ok(());
        }
        let mut tx = TxnBuilder::default();
        tx.ops.push(Op::Put {
            key: self.inner.keys.policy(),
            value: marker.clone().into_bytes(),
            lease: 0,
        });
        let mut draft = AuditDraft::new(AuditKind::PolicyLoad, policy.owner());
        draft.detail = json!({
            "hash": self.inner.cfg.policy_hash,
            "classes": policy.classes.keys().map(|c| c.as_str()).collect::<Vec<_>>(),
            "replica": self.inner.cfg.advertise,
        });
        tx.drafts.push(draft);
        match self.commit(tx, now_ms()).await {
            Ok(_) => {
                self.view.policy_loaded = Some(marker);
                Ok(())
            }
            Err(CommitError::Deposed) => Err("deposed while recording the policy load".into()),
            Err(CommitError::Conflict) => Err("conflict while recording the policy load".into()),
            Err(CommitError::Unavailable(e)) => Err(e),
        }
    }

    /// Processes commands until leadership is lost (`Err`) or shutdown (`Ok`).
    async fn serve(
        &mut self,
        mut rx: mpsc::Receiver<Cmd>,
        lost: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        loop {
            let first = tokio::select! {
                biased;
                _ = flag_set(shutdown) => return Ok(()),
                _ = flag_set(lost) => return Err("leadership lease lost".into()),
                cmd = rx.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => return Ok(()),
                },
            };
            let mut queue = vec![first];
            while queue.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => queue.push(cmd),
                    Err(_) => break,
                }
            }
            // Consecutive acquires and releases form one batch (group commit); anything else
            // runs alone, in order.
            let mut batch = Vec::new();
            for cmd in queue {
                match cmd {
                    Cmd::Acquire {
                        input,
                        pre_lease,
                        reply,
                    } => batch.push(Item::Acquire {
                        input,
                        pre_lease,
                        reply,
                    }),
                    Cmd::Release {
                        lease_id,
                        token,
                        outcome,
                        detail,
                        reply,
                    } => batch.push(Item::Release {
                        lease_id,
                        token,
                        outcome,
                        detail,
                        reply,
                    }),
                    other => {
                        if !batch.is_empty() {
                            self.batch(std::mem::take(&mut batch)).await?;
                        }
                        self.handle(other).await?;
                    }
                }
            }
            if !batch.is_empty() {
                self.batch(batch).await?;
            }
            self.trim_audit().await?;
            self.publish();
        }
    }

    /// Commits `tx` with the leadership guard and its audit records, or says why not.
    async fn commit(&mut self, tx: TxnBuilder, now: UnixMillis) -> Result<Committed, CommitError> {
        let TxnBuilder {
            mut compares,
            mut ops,
            mut drafts,
            alerts: _,
            grants,
            reseal,
        } = tx;
        compares.insert(0, election::leader_guard(&self.leader));
        // Every write of a sealed key rewrites the seal, backed by this transaction's first
        // audit record (every write that changes safety state carries one).
        let mut seal = self.seal.clone();
        let sealing = seal.apply(&self.inner.keys, &ops) || reseal;
        if sealing {
            if drafts.is_empty() {
                drafts.push(AuditDraft::new(
                    AuditKind::Reseal,
                    format!("replica:{}", self.inner.cfg.advertise),
                ));
            }
            drafts[0].seal = Some(seal.digest());
        }
        let mut chain = self.chain.clone();
        let records: Vec<AuditRecord> = drafts.into_iter().map(|d| chain.append(d, now)).collect();
        if sealing {
            ops.push(Op::Put {
                key: self.inner.keys.seal(),
                value: seal.value(&records[0]),
                lease: 0,
            });
        }
        let sealed = sealing.then(|| (seal, records[0].seq));
        for r in &records {
            ops.push(Op::Put {
                key: self.inner.keys.audit_record(r.seq),
                value: serde_json::to_vec(r).expect("audit records serialise"),
                lease: 0,
            });
        }
        if grants > 0
            && let Some(pause) = self.inner.cfg.failpoint_pause_before_grant_commit
        {
            self.inner
                .metrics
                .failpoint_hit("pause_before_grant_commit");
            tracing::warn!(?pause, "failpoint pause_before_grant_commit hit");
            tokio::time::sleep(pause).await;
        }
        let started = Instant::now();
        let result = self.inner.store.txn(compares, ops, vec![]).await;
        self.inner.metrics.observe_store("txn", started.elapsed());
        match result {
            Ok(outcome) if outcome.succeeded => {
                self.chain = chain;
                if let Some((seal, seq)) = sealed {
                    self.seal = seal;
                    self.seal_seq = seq;
                }
                Ok(Committed {
                    revision: outcome.revision,
                })
            }
            Ok(_) => {
                if self.still_leader().await {
                    Err(CommitError::Conflict)
                } else {
                    self.inner.metrics.fenced_write();
                    tracing::error!(
                        leader_key = self.leader.key,
                        "write refused: this replica is no longer the leader (fenced)"
                    );
                    Err(CommitError::Deposed)
                }
            }
            Err(e) => {
                // Ambiguous: the write may have landed. Settle it by reading back the first
                // audit record it carried (every write that matters carries one).
                if let Some(first) = records.first()
                    && let Ok(Some(kv)) = self
                        .inner
                        .store
                        .get(&self.inner.keys.audit_record(first.seq))
                        .await
                    && serde_json::from_slice::<AuditRecord>(&kv.value)
                        .is_ok_and(|r| r.hash == first.hash)
                {
                    self.chain = chain;
                    if let Some((seal, seq)) = sealed {
                        self.seal = seal;
                        self.seal_seq = seq;
                    }
                    return Ok(Committed {
                        revision: kv.mod_revision,
                    });
                }
                Err(CommitError::Unavailable(format!("store: {e}")))
            }
        }
    }

    async fn still_leader(&self) -> bool {
        matches!(
            self.inner.store.get(&self.leader.key).await,
            Ok(Some(kv)) if kv.create_revision == self.leader.create_revision
        )
    }

    /// Maps a commit failure to the reply for the callers, and to the term's fate.
    fn commit_failure(&self, err: &CommitError) -> (EngineError, Option<String>) {
        match err {
            CommitError::Deposed => (
                EngineError::NotLeader { leader: None },
                Some("deposed: a write failed its leadership compare".into()),
            ),
            CommitError::Conflict => (
                EngineError::Unavailable("the store changed under the request; retry".into()),
                None,
            ),
            CommitError::Unavailable(e) => (EngineError::Unavailable(e.clone()), None),
        }
    }

    /// Decides a run of lease requests and releases and commits them in one transaction.
    async fn batch(&mut self, items: Vec<Item>) -> Result<(), String> {
        let mut pending = items;
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            let now = now_ms();
            let mut overlay = Overlay::default();
            let mut tx = TxnBuilder::default();
            let mut plans: Vec<Planned> = Vec::new();
            let mut deferred = Vec::new();
            for item in pending {
                match item {
                    Item::Release {
                        lease_id,
                        token,
                        outcome,
                        detail,
                        reply,
                    } => {
                        if !overlay.released.insert(lease_id.clone()) {
                            let _ = reply.send(Err(EngineError::FailedPrecondition(format!(
                                "lease {lease_id} is already being released"
                            ))));
                            continue;
                        }
                        match self.end_lease_txn(
                            &lease_id,
                            Some(token),
                            EndKind::Release(outcome, detail.clone()),
                            &mut tx,
                        ) {
                            Ok((entry, label)) => plans.push(Planned::Release {
                                entry,
                                label,
                                item: Item::Release {
                                    lease_id,
                                    token,
                                    outcome,
                                    detail,
                                    reply,
                                },
                            }),
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Item::Acquire {
                        input,
                        pre_lease,
                        reply,
                    } => {
                        if !input.dry_run
                            && let Some(scope) = self.scope_of(&input)
                            && overlay.granted_scopes.contains(&scope)
                        {
                            // One grant per scope per transaction keeps tokens strictly
                            // increasing per scope.
                            deferred.push(Item::Acquire {
                                input,
                                pre_lease,
                                reply,
                            });
                            continue;
                        }
                        match self
                            .decide(&input, None, now, &mut overlay, &mut tx, pre_lease)
                            .await
                        {
                            Ok(Some(plan)) => plans.push(Planned::Acquire {
                                input,
                                plan: Box::new(plan),
                                pre_lease,
                                reply,
                            }),
                            Ok(None) => {
                                // Dry run: answered without writing.
                                let outcome = self.dry_run(&input, now);
                                let _ = reply.send(outcome);
                                release_unused(&self.inner.store, pre_lease);
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                                release_unused(&self.inner.store, pre_lease);
                            }
                        }
                    }
                }
            }
            self.batch_metrics(plans.len());
            if !plans.is_empty() {
                self.put_budgets(&overlay, &mut tx);
                let alerts = std::mem::take(&mut tx.alerts);
                match self.commit(tx, now).await {
                    Ok(Committed { revision }) => {
                        self.apply_overlay(overlay);
                        for planned in plans {
                            match planned {
                                Planned::Acquire {
                                    input,
                                    plan,
                                    pre_lease,
                                    reply,
                                } => {
                                    let outcome =
                                        self.apply_plan(&input.class, *plan, revision, pre_lease);
                                    let _ = reply.send(Ok(outcome));
                                }
                                Planned::Release { entry, label, item } => {
                                    self.lease_ended(&entry, label);
                                    if let Item::Release { reply, .. } = item {
                                        let _ = reply.send(Ok(()));
                                    }
                                }
                            }
                        }
                        self.send_alerts(alerts);
                    }
                    Err(CommitError::Conflict) if attempts < 3 => {
                        tracing::warn!("batch conflicted with the store; resyncing and retrying");
                        self.resync().await?;
                        // Everything is decided again on the fresh view; store leases this
                        // attempt took on its own are revoked (the plan did not commit).
                        let mut retry: Vec<Item> = Vec::new();
                        for planned in plans {
                            match planned {
                                Planned::Acquire {
                                    input,
                                    plan,
                                    pre_lease,
                                    reply,
                                } => {
                                    self.discard_plan(&plan, pre_lease);
                                    retry.push(Item::Acquire {
                                        input,
                                        pre_lease,
                                        reply,
                                    });
                                }
                                Planned::Release { item, .. } => retry.push(item),
                            }
                        }
                        retry.extend(deferred);
                        pending = retry;
                        continue;
                    }
                    Err(err) => {
                        let (reply_err, fatal) = self.commit_failure(&err);
                        for planned in plans {
                            match planned {
                                Planned::Acquire {
                                    plan,
                                    pre_lease,
                                    reply,
                                    ..
                                } => {
                                    self.discard_plan(&plan, pre_lease);
                                    release_unused(&self.inner.store, pre_lease);
                                    let _ = reply.send(Err(reply_err.clone()));
                                }
                                Planned::Release { item, .. } => item.fail(reply_err.clone()),
                            }
                        }
                        if let Some(fatal) = fatal {
                            for item in deferred {
                                if let Item::Acquire { pre_lease, .. } = &item {
                                    release_unused(&self.inner.store, *pre_lease);
                                }
                                item.fail(reply_err.clone());
                            }
                            return Err(fatal);
                        }
                    }
                }
            }
            pending = deferred;
        }
        Ok(())
    }

    fn batch_metrics(&self, n: usize) {
        if n > 0 {
            self.inner
                .metrics
                .observe_admission_batch(u32::try_from(n).unwrap_or(u32::MAX));
        }
    }

    fn scope_of(&self, input: &AcquireInput) -> Option<Scope> {
        let host = self.view.hosts.get(&input.host)?;
        Some(Scope {
            class: input.class.clone(),
            service: host.record.service()?.to_owned(),
        })
    }

    /// What a dry run reports: the same admission, no writes, no effects.
    fn dry_run(
        &self,
        input: &AcquireInput,
        now: UnixMillis,
    ) -> Result<AcquireOutcome, EngineError> {
        let overlay = Overlay::default();
        let (admission, _, _) = self.admit(input, now, &overlay, false)?;
        let outcome = match admission.decision {
            Decision::Grant { .. } => AcquireOutcome::Granted(GrantInfo {
                lease_id: String::new(),
                token: 0,
                ttl_ms: 0,
                verification_window_ms: 0,
                granted_at: now,
                approver: None,
            }),
            Decision::Deny(reason) => AcquireOutcome::Denied {
                check: reason.check_name().into(),
                reason: reason.to_string(),
            },
            Decision::Pending => AcquireOutcome::Pending {
                approval_id: String::new(),
                expires_at: now.plus(self.inner.cfg.policy.approval_ttl),
            },
            Decision::Observed { would } => observed(would),
        };
        Ok(AcquireOutcome::DryRun(Box::new(outcome)))
    }

    /// Runs the pure admission core on the view plus what this batch already decided.
    fn admit(
        &self,
        input: &AcquireInput,
        now: UnixMillis,
        overlay: &Overlay,
        approved: bool,
    ) -> Result<(admission::Admission, Scope, ClassPolicy), EngineError> {
        let policy = &self.inner.cfg.policy;
        let class = policy
            .class(&input.class)
            .ok_or_else(|| {
                EngineError::NotFound(format!("unknown action class {:?}", input.class))
            })?
            .clone();
        let host = self.view.hosts.get(&input.host).ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "host {} is not registered (or its registration expired): the agent must register first",
                input.host
            ))
        })?;
        let service = host
            .record
            .service()
            .ok_or_else(|| {
                EngineError::FailedPrecondition(format!("host {} has no service label", input.host))
            })?
            .to_owned();
        let scope = Scope {
            class: input.class.clone(),
            service: service.clone(),
        };
        let budget = overlay
            .budgets
            .get(&input.class)
            .cloned()
            .unwrap_or_else(|| self.view.budget(&input.class));
        let mode = self
            .view
            .modes
            .get(&input.class)
            .copied()
            .unwrap_or(class.mode);
        let class_freeze = overlay
            .class_freezes
            .get(&input.class)
            .or_else(|| self.view.class_freezes.get(&input.class));
        let block_key = (input.class.clone(), input.host.clone());
        let host_block = overlay
            .host_blocks
            .get(&block_key)
            .or_else(|| self.view.host_blocks.get(&block_key));
        let holders = u32::try_from(self.view.held_slots(&scope).len()).unwrap_or(u32::MAX);
        let already_held = self.view.holds(&input.host, &input.class, &input.target)
            || overlay.held.contains(&(
                input.host.clone(),
                input.class.clone(),
                input.target.clone(),
            ));
        let owner = policy.owner();
        let host_id = HostId(input.host.clone());
        let admission = admission::admit(&AdmissionRequest {
            now,
            class: &class,
            policy_owner: &owner,
            mode,
            freeze: FreezeState {
                kill_switch: self.view.kill_switch.as_ref(),
                class: class_freeze,
                host: host_block,
            },
            budget: &budget,
            host: &host_id,
            scope: ScopeOccupancy {
                holders,
                live_hosts: self.view.live_hosts(&service),
            },
            already_held,
            approved,
        });
        Ok((admission, scope, class))
    }

    /// Decides one request and adds its writes to `tx`. `None` for a dry run.
    async fn decide(
        &mut self,
        input: &AcquireInput,
        approval: Option<(&ApprovalRecord, &str)>,
        now: UnixMillis,
        overlay: &mut Overlay,
        tx: &mut TxnBuilder,
        pre_lease: Option<LeaseId>,
    ) -> Result<Option<Plan>, EngineError> {
        let (admission, scope, class) = self.admit(input, now, overlay, approval.is_some())?;
        if input.dry_run {
            return Ok(None);
        }
        let policy_owner = self.inner.cfg.policy.owner();
        let owner = approval
            .map(|(_, op)| format!("operator:{op}"))
            .unwrap_or_else(|| policy_owner.clone());
        let keys = &self.inner.keys;
        let base = |kind| {
            let mut d = AuditDraft::new(kind, owner.clone());
            d.class = Some(input.class.clone());
            d.host = Some(input.host.clone());
            d.target = Some(input.target.clone());
            d
        };
        let approval_record = approval.map(|(a, _)| a.clone());
        let verification_window = class.safety_case.verification_window.unwrap_or_default();
        match admission.decision {
            Decision::Grant { cap, holders_after } => {
                let store_lease = match pre_lease {
                    Some(l) => l,
                    None => self
                        .inner
                        .store
                        .lease_grant(ttl_secs(class.lease_ttl))
                        .await
                        .map_err(|e| EngineError::Unavailable(format!("store: {e}")))?,
                };
                let slot = self.view.free_slot(&scope);
                let lease_id = format!("{:x}", store_lease.0);
                let record = LeaseRecord {
                    lease_id: lease_id.clone(),
                    host: input.host.clone(),
                    class: input.class.clone(),
                    service: scope.service.clone(),
                    target: input.target.clone(),
                    slot,
                    granted_at: now,
                    ttl_ms: duration_ms(class.lease_ttl),
                    verification_window_ms: duration_ms(verification_window),
                    approver: approval.map(|(_, op)| op.to_owned()),
                };
                let slot_key = keys.slot(&scope, slot);
                tx.compares.push(Compare::CreateRevision {
                    key: slot_key.clone(),
                    op: CmpOp::Equal,
                    rev: 0,
                });
                tx.ops.push(Op::Put {
                    key: slot_key,
                    value: serde_json::to_vec(&record).expect("lease records serialise"),
                    lease: store_lease.0,
                });
                let mut budget = overlay
                    .budgets
                    .get(&input.class)
                    .cloned()
                    .unwrap_or_else(|| self.view.budget(&input.class));
                budget.record_grant(&HostId(input.host.clone()), now, &class);
                overlay.budgets.insert(input.class.clone(), budget);
                overlay.granted_scopes.insert(scope.clone());
                overlay.held.insert((
                    input.host.clone(),
                    input.class.clone(),
                    input.target.clone(),
                ));
                if let Some((a, op)) = approval {
                    let mut d = base(AuditKind::Approve);
                    d.reason = Some(format!("approved by {op}"));
                    d.detail = json!({"approval_id": a.id});
                    tx.drafts.push(d);
                }
                let mut d = base(AuditKind::Grant);
                d.lease_id = Some(lease_id.clone());
                d.detail = json!({
                    "cap": cap, "holders_after": holders_after, "slot": slot,
                    "service": scope.service, "ttl_ms": record.ttl_ms,
                    "evidence": input.evidence, "approver": record.approver,
                });
                tx.drafts.push(d);
                tx.grants += 1;
                let approval = approval_record.map(|mut a| {
                    a.state = ApprovalState::Granted {
                        lease_id: lease_id.clone(),
                        ttl_ms: record.ttl_ms,
                        verification_window_ms: record.verification_window_ms,
                        granted_at: now,
                        approver: record.approver.clone().unwrap_or_default(),
                    };
                    a
                });
                Ok(Some(Plan::Grant {
                    record,
                    store_lease,
                    approval,
                }))
            }
            Decision::Deny(reason) => {
                let check = reason.check_name().to_owned();
                let text = reason.to_string();
                let mut d = base(AuditKind::Deny);
                d.reason = Some(text.clone());
                d.detail = json!({"check": check, "evidence": input.evidence});
                tx.drafts.push(d);
                for effect in admission.effects {
                    self.effect(effect, &input.class, overlay, tx, &policy_owner);
                }
                let approval = approval_record.map(|mut a| {
                    a.state = ApprovalState::Denied {
                        check: check.clone(),
                        reason: text.clone(),
                    };
                    a
                });
                Ok(Some(Plan::Deny {
                    check,
                    reason: text,
                    approval,
                }))
            }
            Decision::Pending => {
                let ttl = self.inner.cfg.policy.approval_ttl;
                let lease = self
                    .inner
                    .store
                    .lease_grant(ttl_secs(ttl))
                    .await
                    .map_err(|e| EngineError::Unavailable(format!("store: {e}")))?;
                let record = ApprovalRecord {
                    id: format!("{:x}", lease.0),
                    host: input.host.clone(),
                    class: input.class.clone(),
                    service: scope.service.clone(),
                    target: input.target.clone(),
                    evidence: input.evidence.clone(),
                    requested_at: now,
                    expires_at: now.plus(ttl),
                    state: ApprovalState::Pending,
                };
                tx.ops.push(Op::Put {
                    key: keys.approval(&record.id),
                    value: serde_json::to_vec(&record).expect("approvals serialise"),
                    lease: lease.0,
                });
                let mut d = base(AuditKind::Pending);
                d.detail = json!({"approval_id": record.id, "evidence": input.evidence});
                tx.drafts.push(d);
                Ok(Some(Plan::Pending(record, lease)))
            }
            Decision::Observed { would } => {
                let (kind, would_grant, check, reason) = match &would {
                    WouldBe::Grant { cap, holders_after } => (
                        AuditKind::WouldGrant,
                        true,
                        String::new(),
                        format!("would grant: cap {cap}, {holders_after} holders after"),
                    ),
                    WouldBe::Deny(r) => (
                        AuditKind::WouldDeny,
                        false,
                        r.check_name().to_owned(),
                        r.to_string(),
                    ),
                };
                let mut d = base(kind);
                d.reason = Some(reason.clone());
                d.detail = json!({"check": check, "evidence": input.evidence});
                tx.drafts.push(d);
                Ok(Some(Plan::Observed {
                    would_grant,
                    check,
                    reason,
                }))
            }
        }
    }

    /// Persists a budget-exhaustion effect in the same transaction as the denial.
    fn effect(
        &self,
        effect: Effect,
        class: &str,
        overlay: &mut Overlay,
        tx: &mut TxnBuilder,
        owner: &str,
    ) {
        let keys = &self.inner.keys;
        match effect {
            Effect::FreezeClass(record) => {
                if overlay.class_freezes.contains_key(class)
                    || self.view.class_freezes.contains_key(class)
                {
                    return;
                }
                tx.ops.push(Op::Put {
                    key: keys.class_freeze(class),
                    value: serde_json::to_vec(&record).expect("freeze records serialise"),
                    lease: 0,
                });
                let mut d = AuditDraft::new(AuditKind::Freeze, owner);
                d.class = Some(class.to_owned());
                d.reason = Some(record.reason.clone());
                d.detail = json!({"cause": "fleet_budget"});
                tx.drafts.push(d);
                overlay.class_freezes.insert(class.to_owned(), record);
            }
            Effect::BlockHost { host, record } => {
                let k = (class.to_owned(), host.0.clone());
                if overlay.host_blocks.contains_key(&k) || self.view.host_blocks.contains_key(&k) {
                    return;
                }
                tx.ops.push(Op::Put {
                    key: keys.host_block(class, &host.0),
                    value: serde_json::to_vec(&record).expect("freeze records serialise"),
                    lease: 0,
                });
                let mut d = AuditDraft::new(AuditKind::Freeze, owner);
                d.class = Some(class.to_owned());
                d.host = Some(host.0.clone());
                d.reason = Some(record.reason.clone());
                d.detail = json!({"cause": "host_budget"});
                tx.drafts.push(d);
                overlay.host_blocks.insert(k, record);
            }
            Effect::Alert(alert) => {
                let mut d = AuditDraft::new(AuditKind::Alert, owner);
                d.class = Some(alert.class.clone());
                d.host = alert.host.as_ref().map(|h| h.0.clone());
                d.reason = Some(alert.message.clone());
                tx.drafts.push(d);
                tx.alerts.push(alert);
            }
        }
    }

    fn put_budgets(&self, overlay: &Overlay, tx: &mut TxnBuilder) {
        for (class, state) in &overlay.budgets {
            tx.ops.push(Op::Put {
                key: self.inner.keys.budget(class),
                value: serde_json::to_vec(state).expect("budgets serialise"),
                lease: 0,
            });
        }
    }

    fn apply_overlay(&mut self, overlay: Overlay) {
        let Overlay {
            released: _,
            budgets,
            granted_scopes: _,
            held: _,
            class_freezes,
            host_blocks,
        } = overlay;
        self.view.budgets.extend(budgets);
        self.view.class_freezes.extend(class_freezes);
        self.view.host_blocks.extend(host_blocks);
    }

    /// Updates the view after a commit and builds the caller's answer.
    fn apply_plan(
        &mut self,
        class: &str,
        plan: Plan,
        revision: i64,
        pre_lease: Option<LeaseId>,
    ) -> AcquireOutcome {
        let token = u64::try_from(revision).unwrap_or(0);
        match plan {
            Plan::Grant {
                record,
                store_lease,
                approval,
            } => {
                let info = GrantInfo {
                    lease_id: record.lease_id.clone(),
                    token,
                    ttl_ms: record.ttl_ms,
                    verification_window_ms: record.verification_window_ms,
                    granted_at: record.granted_at,
                    approver: record.approver.clone(),
                };
                self.inner.metrics.grant(&record.class);
                if let Some(a) = approval {
                    self.store_approval(a);
                }
                self.view.leases.insert(
                    record.lease_id.clone(),
                    LeaseEntry {
                        record,
                        token,
                        store_lease: store_lease.0,
                    },
                );
                if pre_lease.is_some_and(|p| p != store_lease) {
                    release_unused(&self.inner.store, pre_lease);
                }
                AcquireOutcome::Granted(info)
            }
            Plan::Deny {
                check,
                reason,
                approval,
            } => {
                release_unused(&self.inner.store, pre_lease);
                self.inner.metrics.deny_by_check(class, &check);
                if let Some(a) = approval {
                    self.store_approval(a);
                }
                AcquireOutcome::Denied { check, reason }
            }
            Plan::Pending(record, _) => {
                release_unused(&self.inner.store, pre_lease);
                self.inner.metrics.pending(&record.class);
                let outcome = AcquireOutcome::Pending {
                    approval_id: record.id.clone(),
                    expires_at: record.expires_at,
                };
                self.store_approval(record);
                outcome
            }
            Plan::Observed {
                would_grant,
                check,
                reason,
            } => {
                release_unused(&self.inner.store, pre_lease);
                if would_grant {
                    self.inner.metrics.would_grant(class);
                }
                AcquireOutcome::Observed {
                    would_grant,
                    check,
                    reason,
                }
            }
        }
    }

    fn store_approval(&mut self, record: ApprovalRecord) {
        let lease = self
            .view
            .approvals
            .get(&record.id)
            .map(|(_, l)| *l)
            .or_else(|| i64::from_str_radix(&record.id, 16).ok())
            .unwrap_or(0);
        self.view
            .approvals
            .insert(record.id.clone(), (record, lease));
    }

    /// A plan that did not commit: give back the store leases it took on its own.
    fn discard_plan(&self, plan: &Plan, pre_lease: Option<LeaseId>) {
        match plan {
            Plan::Grant { store_lease, .. } if Some(*store_lease) != pre_lease => {
                release_unused(&self.inner.store, Some(*store_lease));
            }
            Plan::Pending(_, lease) => release_unused(&self.inner.store, Some(*lease)),
            _ => {}
        }
    }

    fn send_alerts(&self, alerts: Vec<admission::Alert>) {
        for a in alerts {
            tracing::error!(class = a.class, host = ?a.host.as_ref().map(|h| &h.0), "ALERT: {}", a.message);
            self.inner.metrics.alert(
                &a.class,
                if a.host.is_some() {
                    "host_budget"
                } else {
                    "fleet_budget"
                },
            );
            if let Some(url) = self.inner.cfg.policy.alert_webhook.clone() {
                let body = json!({
                    "class": a.class, "host": a.host.map(|h| h.0), "message": a.message,
                    "policy": self.inner.cfg.policy.owner(),
                });
                tokio::spawn(async move {
                    if let Err(e) = alert::post_json(&url, &body).await {
                        tracing::error!(url, error = %e, "alert webhook failed");
                    }
                });
            }
        }
    }

    /// Runs one non-acquire command.
    async fn handle(&mut self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Acquire { .. } => unreachable!("acquires are batched"),
            Cmd::Register {
                host,
                labels,
                reply,
            } => {
                let r = self.register(host, labels).await;
                self.finish(r, reply)
            }
            Cmd::Release { .. } => unreachable!("releases are batched"),
            Cmd::Revoke {
                lease_id,
                reason,
                owner,
                reply,
            } => {
                let r = self
                    .end_lease(&lease_id, None, EndKind::Revoke { reason, owner })
                    .await;
                self.finish(r, reply)
            }
            Cmd::Freeze {
                class,
                reason,
                revoke,
                operator,
                reply,
            } => {
                let r = self.freeze(class, reason, revoke, operator).await;
                self.finish(r, reply)
            }
            Cmd::Unfreeze {
                class,
                host,
                reason,
                operator,
                reply,
            } => {
                let r = self.unfreeze(class, host, reason, operator).await;
                self.finish(r, reply)
            }
            Cmd::SetMode {
                class,
                mode,
                operator,
                reply,
            } => {
                let r = self.set_mode(class, mode, operator).await;
                self.finish(r, reply)
            }
            Cmd::Approve {
                id,
                operator,
                reply,
            } => {
                let r = self.approve(id, operator).await;
                self.finish(r, reply)
            }
            Cmd::Reject {
                id,
                reason,
                operator,
                reply,
            } => {
                let r = self.reject(id, reason, operator).await;
                self.finish(r, reply)
            }
            Cmd::LateOutcome { late, reply } => {
                let r = self.late_outcome(late).await;
                self.finish(r, reply)
            }
            Cmd::CreateJoinToken {
                host,
                token_hash,
                ttl,
                operator,
                reply,
            } => {
                let r = self
                    .create_join_token(host, token_hash, ttl, operator)
                    .await;
                self.finish(r, reply)
            }
            Cmd::ConsumeJoinToken {
                host,
                token_hash,
                reply,
            } => {
                let r = self.consume_join_token(host, token_hash).await;
                self.finish(r, reply)
            }
            Cmd::Record { draft, reply } => {
                let mut tx = TxnBuilder::default();
                tx.drafts.push(draft);
                let r = self.commit_or(tx, now_ms()).await.map(|_| ());
                self.finish(r, reply)
            }
            Cmd::BreakGlass { what, reply } => {
                let mut tx = TxnBuilder::default();
                let owner = format!("operator:{}", crate::identity::BREAK_GLASS);
                let mut d = AuditDraft::new(AuditKind::BreakGlass, owner);
                let message = format!(
                    "the break-glass credential was used to {what}; find out who and why, and \
                     replace the credential (`interlock tokens break-glass`)"
                );
                d.reason = Some(message.clone());
                d.detail = json!({"action": what});
                tx.drafts.push(d);
                let r = self.commit_or(tx, now_ms()).await.map(|_| ());
                if r.is_ok() {
                    self.page("break_glass", &message, json!({"action": what}));
                }
                self.finish(r, reply)
            }
            Cmd::Refused {
                owner,
                check,
                reason,
                reply,
            } => {
                let mut tx = TxnBuilder::default();
                let mut d = AuditDraft::new(AuditKind::Refused, owner);
                d.reason = Some(reason);
                d.detail = json!({"check": check});
                tx.drafts.push(d);
                let r = self.commit_or(tx, now_ms()).await.map(|_| ());
                self.finish(r, reply)
            }
            Cmd::Deleted { key, revision } => self.deleted(&key, revision).await,
            Cmd::Resync => self.resync().await,
        }
    }

    async fn late_outcome(&mut self, late: LateOutcome) -> Result<(), Result<EngineError, String>> {
        if self.view.leases.contains_key(&late.lease_id) {
            return Err(Ok(EngineError::FailedPrecondition(format!(
                "lease {} is still live: release it with its outcome instead",
                late.lease_id
            ))));
        }
        // Only for a grant this host really received (found in the retained audit), with the
        // grant's class and target; a second report of the same lease's outcome (a release
        // whose answer was lost, then retried as late) is accepted and not recorded twice.
        let range = self
            .inner
            .store
            .range_prefix(&self.inner.keys.audit())
            .await
            .map_err(|e| Ok(EngineError::Unavailable(format!("store: {e}"))))?;
        let mut grant = None;
        let mut reported = false;
        for kv in &range.kvs {
            let Ok(r) = serde_json::from_slice::<AuditRecord>(&kv.value) else {
                continue;
            };
            if r.lease_id.as_deref() != Some(late.lease_id.as_str()) {
                continue;
            }
            match r.kind {
                // A grant's token is its transaction's revision (see `audit`).
                AuditKind::Grant => {
                    let token = r.token.or(u64::try_from(kv.create_revision).ok());
                    if token == Some(late.token) && r.host.as_deref() == Some(late.host.as_str()) {
                        grant = Some(r);
                    }
                }
                AuditKind::Outcome => reported = true,
                _ => {}
            }
        }
        let Some(grant) = grant else {
            return Err(Ok(EngineError::FailedPrecondition(format!(
                "no grant of lease {} under token {} to host {} in the audit: nothing to report on",
                late.lease_id, late.token, late.host
            ))));
        };
        if reported {
            return Ok(());
        }
        let late = LateOutcome {
            class: grant.class.unwrap_or(late.class),
            target: grant.target.unwrap_or(late.target),
            ..late
        };
        let mut d = AuditDraft::new(AuditKind::Outcome, format!("host:{}", late.host));
        d.class = Some(late.class);
        d.host = Some(late.host);
        d.target = Some(late.target);
        d.lease_id = Some(late.lease_id);
        d.token = Some(late.token);
        d.reason = Some(late.outcome.as_str().to_owned());
        d.detail = json!({
            "outcome": late.outcome.as_str(),
            "detail": late.detail,
            "late": true,
        });
        let mut tx = TxnBuilder::default();
        tx.drafts.push(d);
        self.commit_or(tx, now_ms()).await?;
        Ok(())
    }

    /// Sends the answer; a deposition ends the term.
    fn finish<T>(
        &self,
        result: Result<T, Result<EngineError, String>>,
        reply: Reply<T>,
    ) -> Result<(), String> {
        match result {
            Ok(v) => {
                let _ = reply.send(Ok(v));
                Ok(())
            }
            Err(Ok(e)) => {
                let _ = reply.send(Err(e));
                Ok(())
            }
            Err(Err(fatal)) => {
                let _ = reply.send(Err(EngineError::NotLeader { leader: None }));
                Err(fatal)
            }
        }
    }

    /// Commits, mapping failures to "answer with this error" (`Err(Ok)`) or "end the term"
    /// (`Err(Err)`).
    async fn commit_or(
        &mut self,
        tx: TxnBuilder,
        now: UnixMillis,
    ) -> Result<i64, Result<EngineError, String>> {
        match self.commit(tx, now).await {
            Ok(c) => Ok(c.revision),
            Err(e) => {
                let (err, fatal) = self.commit_failure(&e);
                if matches!(e, CommitError::Conflict) {
                    let _ = self.resync().await;
                }
                match fatal {
                    Some(f) => Err(Err(f)),
                    None => Err(Ok(err)),
                }
            }
        }
    }

    async fn register(
        &mut self,
        host: String,
        labels: BTreeMap<String, String>,
    ) -> Result<Duration, Result<EngineError, String>> {
        crate::view::check_reregistration(
            &host,
            self.view.hosts.get(&host).map(|h| &h.record),
            &labels,
        )
        .map_err(|m| Ok(EngineError::FailedPrecondition(m)))?;
        let ttl = self.inner.cfg.host_ttl;
        let lease = self
            .inner
            .store
            .lease_grant(ttl_secs(ttl))
            .await
            .map_err(|e| Ok(EngineError::Unavailable(format!("store: {e}"))))?;
        let record = HostRecord {
            labels,
            registered_at: now_ms(),
        };
        let mut tx = TxnBuilder::default();
        tx.ops.push(Op::Put {
            key: self.inner.keys.host(&host),
            value: serde_json::to_vec(&record).expect("host records serialise"),
            lease: lease.0,
        });
        let previous = self.view.hosts.get(&host).map(|h| h.store_lease);
        match self.commit_or(tx, now_ms()).await {
            Ok(revision) => {
                if let Some(old) = previous.filter(|o| *o != lease.0) {
                    release_unused(&self.inner.store, Some(LeaseId(old)));
                }
                self.view.hosts.insert(
                    host,
                    HostEntry {
                        record,
                        store_lease: lease.0,
                        revision,
                    },
                );
                self.host_metrics();
                Ok(ttl)
            }
            Err(e) => {
                release_unused(&self.inner.store, Some(lease));
                Err(e)
            }
        }
    }

    fn host_metrics(&self) {
        let mut services: BTreeMap<&str, u32> = BTreeMap::new();
        for h in self.view.hosts.values() {
            if let Some(s) = h.record.service() {
                *services.entry(s).or_default() += 1;
            }
        }
        for (s, n) in services {
            self.inner.metrics.set_live_hosts(s, n);
        }
    }

    /// Adds the writes that end a lease to `tx`: the slot's deletion, guarded by the token
    /// it was granted under, and the audit record. Returns the lease and its outcome label.
    fn end_lease_txn(
        &self,
        lease_id: &str,
        token: Option<u64>,
        kind: EndKind,
        tx: &mut TxnBuilder,
    ) -> Result<(LeaseEntry, &'static str), EngineError> {
        let entry = self.view.leases.get(lease_id).cloned().ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "lease {lease_id} is not live (already released, revoked or expired)"
            ))
        })?;
        if let Some(token) = token
            && token != entry.token
        {
            return Err(EngineError::FailedPrecondition(format!(
                "lease {lease_id} is held under token {}, not {token}",
                entry.token
            )));
        }
        let scope = Scope {
            class: entry.record.class.clone(),
            service: entry.record.service.clone(),
        };
        let slot_key = self.inner.keys.slot(&scope, entry.record.slot);
        tx.compares.push(Compare::ModRevision {
            key: slot_key.clone(),
            op: CmpOp::Equal,
            rev: i64::try_from(entry.token).unwrap_or(i64::MAX),
        });
        tx.ops.push(Op::Delete { key: slot_key });
        let (label, mut d) = match kind {
            EndKind::Release(outcome, detail) => {
                let mut d =
                    AuditDraft::new(AuditKind::Outcome, format!("host:{}", entry.record.host));
                d.reason = Some(outcome.as_str().to_owned());
                d.detail = json!({"outcome": outcome.as_str(), "detail": detail});
                (outcome.as_str(), d)
            }
            EndKind::Revoke { reason, owner } => {
                let mut d = AuditDraft::new(AuditKind::Revoke, owner);
                d.reason = Some(reason);
                ("revoked", d)
            }
        };
        d.class = Some(entry.record.class.clone());
        d.host = Some(entry.record.host.clone());
        d.target = Some(entry.record.target.clone());
        d.lease_id = Some(lease_id.to_owned());
        d.token = Some(entry.token);
        tx.drafts.push(d);
        Ok((entry, label))
    }

    /// After an ending committed: forget the lease and give its store lease back.
    fn lease_ended(&mut self, entry: &LeaseEntry, label: &str) {
        self.view.leases.remove(&entry.record.lease_id);
        self.inner.metrics.outcome(&entry.record.class, label);
        release_unused(&self.inner.store, Some(LeaseId(entry.store_lease)));
    }

    async fn end_lease(
        &mut self,
        lease_id: &str,
        token: Option<u64>,
        kind: EndKind,
    ) -> Result<(), Result<EngineError, String>> {
        let mut tx = TxnBuilder::default();
        let (entry, label) = self
            .end_lease_txn(lease_id, token, kind, &mut tx)
            .map_err(Ok)?;
        self.commit_or(tx, now_ms()).await?;
        self.lease_ended(&entry, label);
        Ok(())
    }

    async fn freeze(
        &mut self,
        class: Option<String>,
        reason: String,
        revoke: bool,
        operator: String,
    ) -> Result<u32, Result<EngineError, String>> {
        let now = now_ms();
        let owner = format!("operator:{operator}");
        let record = FreezeRecord {
            reason: reason.clone(),
            owner: owner.clone(),
            since: now,
            cause: FreezeCause::Operator,
        };
        let key = match &class {
            Some(c) => self.inner.keys.class_freeze(c),
            None => self.inner.keys.kill_switch(),
        };
        let mut tx = TxnBuilder::default();
        tx.ops.push(Op::Put {
            key,
            value: serde_json::to_vec(&record).expect("freeze records serialise"),
            lease: 0,
        });
        let mut d = AuditDraft::new(AuditKind::Freeze, owner.clone());
        d.class = class.clone();
        d.reason = Some(reason.clone());
        d.detail =
            json!({"scope": if class.is_some() { "class" } else { "all" }, "revoke": revoke});
        tx.drafts.push(d);
        self.commit_or(tx, now).await?;
        match &class {
            Some(c) => {
                self.view.class_freezes.insert(c.clone(), record);
            }
            None => self.view.kill_switch = Some(record),
        }
        self.publish();
        let mut revoked = 0u32;
        if revoke {
            let victims: Vec<String> = self
                .view
                .leases
                .values()
                .filter(|l| class.as_ref().is_none_or(|c| &l.record.class == c))
                .map(|l| l.record.lease_id.clone())
                .collect();
            for chunk in victims.chunks(REVOKE_CHUNK) {
                let mut tx = TxnBuilder::default();
                let mut ended = Vec::new();
                for id in chunk {
                    let kind = EndKind::Revoke {
                        reason: format!("freeze --revoke: {reason}"),
                        owner: format!("operator:{operator}"),
                    };
                    if let Ok(ending) = self.end_lease_txn(id, None, kind, &mut tx) {
                        ended.push(ending);
                    }
                }
                self.commit_or(tx, now_ms()).await?;
                for (entry, label) in ended {
                    self.lease_ended(&entry, label);
                    revoked += 1;
                }
            }
        }
        Ok(revoked)
    }

    async fn unfreeze(
        &mut self,
        class: Option<String>,
        host: Option<String>,
        reason: String,
        operator: String,
    ) -> Result<(), Result<EngineError, String>> {
        let now = now_ms();
        let keys = &self.inner.keys;
        let mut tx = TxnBuilder::default();
        let mut d = AuditDraft::new(AuditKind::Unfreeze, format!("operator:{operator}"));
        d.reason = Some(reason);
        d.class = class.clone();
        d.host = host.clone();
        let mut budget_after = None;
        match (&class, &host) {
            (None, _) => {
                if self.view.kill_switch.is_none() {
                    return Err(Ok(EngineError::FailedPrecondition(
                        "the kill switch is not on; to unfreeze a class give --class".into(),
                    )));
                }
                tx.ops.push(Op::Delete {
                    key: keys.kill_switch(),
                });
                d.detail = json!({"scope": "all"});
            }
            (Some(c), None) => {
                if !self.view.class_freezes.contains_key(c) {
                    return Err(Ok(EngineError::FailedPrecondition(format!(
                        "class {c} is not frozen"
                    ))));
                }
                tx.ops.push(Op::Delete {
                    key: keys.class_freeze(c),
                });
                // Unfreezing starts a fresh budget window (DESIGN: budget).
                let mut budget = self.view.budget(c);
                budget.reset(now);
                tx.ops.push(Op::Put {
                    key: keys.budget(c),
                    value: serde_json::to_vec(&budget).expect("budgets serialise"),
                    lease: 0,
                });
                d.detail = json!({"scope": "class", "budget_window_start": now.0});
                budget_after = Some((c.clone(), budget));
            }
            (Some(c), Some(h)) => {
                if !self.view.host_blocks.contains_key(&(c.clone(), h.clone())) {
                    return Err(Ok(EngineError::FailedPrecondition(format!(
                        "host {h} is not blocked for class {c}"
                    ))));
                }
                tx.ops.push(Op::Delete {
                    key: keys.host_block(c, h),
                });
                let mut budget = self.view.budget(c);
                budget.reset_host(&HostId(h.clone()));
                tx.ops.push(Op::Put {
                    key: keys.budget(c),
                    value: serde_json::to_vec(&budget).expect("budgets serialise"),
                    lease: 0,
                });
                d.detail = json!({"scope": "host"});
                budget_after = Some((c.clone(), budget));
            }
        }
        tx.drafts.push(d);
        self.commit_or(tx, now).await?;
        match (class, host) {
            (None, _) => self.view.kill_switch = None,
            (Some(c), None) => {
                self.view.class_freezes.remove(&c);
            }
            (Some(c), Some(h)) => {
                self.view.host_blocks.remove(&(c, h));
            }
        }
        if let Some((c, b)) = budget_after {
            self.view.budgets.insert(c, b);
        }
        Ok(())
    }

    async fn set_mode(
        &mut self,
        class: String,
        mode: Mode,
        operator: String,
    ) -> Result<Mode, Result<EngineError, String>> {
        let previous = self
            .view
            .modes
            .get(&class)
            .copied()
            .or_else(|| self.inner.cfg.policy.class(&class).map(|c| c.mode))
            .unwrap_or(Mode::Observe);
        let mut tx = TxnBuilder::default();
        tx.ops.push(Op::Put {
            key: self.inner.keys.mode(&class),
            value: mode.as_str().as_bytes().to_vec(),
            lease: 0,
        });
        let mut d = AuditDraft::new(AuditKind::ModeChange, format!("operator:{operator}"));
        d.class = Some(class.clone());
        d.reason = Some(format!("{previous} -> {mode}"));
        tx.drafts.push(d);
        self.commit_or(tx, now_ms()).await?;
        self.view.modes.insert(class, mode);
        Ok(previous)
    }

    async fn approve(
        &mut self,
        id: String,
        operator: String,
    ) -> Result<AcquireOutcome, Result<EngineError, String>> {
        let (record, lease) = self.pending_approval(&id)?;
        let input = AcquireInput {
            host: record.host.clone(),
            class: record.class.clone(),
            target: record.target.clone(),
            evidence: record.evidence.clone(),
            dry_run: false,
        };
        let now = now_ms();
        let mut overlay = Overlay::default();
        let mut tx = TxnBuilder::default();
        let plan = match self
            .decide(
                &input,
                Some((&record, &operator)),
                now,
                &mut overlay,
                &mut tx,
                None,
            )
            .await
        {
            Ok(Some(plan)) => plan,
            Ok(None) => unreachable!("approvals are never dry runs"),
            Err(e) => return Err(Ok(e)),
        };
        // The approval key keeps its own lease, so a resolved approval stays readable by the
        // agent's poll until it would have expired.
        let resolved = match &plan {
            Plan::Grant { approval, .. } | Plan::Deny { approval, .. } => approval.clone(),
            _ => None,
        };
        if let Some(a) = &resolved {
            tx.ops.push(Op::Put {
                key: self.inner.keys.approval(&a.id),
                value: serde_json::to_vec(a).expect("approvals serialise"),
                lease,
            });
        }
        self.put_budgets(&overlay, &mut tx);
        let alerts = std::mem::take(&mut tx.alerts);
        match self.commit_or(tx, now).await {
            Ok(revision) => {
                self.apply_overlay(overlay);
                let outcome = self.apply_plan(&input.class, plan, revision, None);
                self.send_alerts(alerts);
                Ok(outcome)
            }
            Err(e) => {
                self.discard_plan(&plan, None);
                Err(e)
            }
        }
    }

    fn pending_approval(
        &self,
        id: &str,
    ) -> Result<(ApprovalRecord, i64), Result<EngineError, String>> {
        let (record, lease) = self.view.approvals.get(id).cloned().ok_or_else(|| {
            Ok(EngineError::NotFound(format!(
                "no approval {id}: it expired or never existed; `interlock approvals` lists pending ones"
            )))
        })?;
        if record.state != ApprovalState::Pending {
            return Err(Ok(EngineError::FailedPrecondition(format!(
                "approval {id} was already decided ({:?})",
                record.state
            ))));
        }
        Ok((record, lease))
    }

    async fn reject(
        &mut self,
        id: String,
        reason: String,
        operator: String,
    ) -> Result<(), Result<EngineError, String>> {
        let (mut record, lease) = self.pending_approval(&id)?;
        record.state = ApprovalState::Rejected {
            by: operator.clone(),
            reason: reason.clone(),
        };
        let mut tx = TxnBuilder::default();
        tx.ops.push(Op::Put {
            key: self.inner.keys.approval(&id),
            value: serde_json::to_vec(&record).expect("approvals serialise"),
            lease,
        });
        let mut d = AuditDraft::new(AuditKind::Reject, format!("operator:{operator}"));
        d.class = Some(record.class.clone());
        d.host = Some(record.host.clone());
        d.target = Some(record.target.clone());
        d.reason = Some(reason);
        d.detail = json!({"approval_id": id});
        tx.drafts.push(d);
        self.commit_or(tx, now_ms()).await?;
        self.view.approvals.insert(id, (record, lease));
        Ok(())
    }

    async fn create_join_token(
        &mut self,
        host: String,
        token_hash: String,
        ttl: Duration,
        operator: String,
    ) -> Result<UnixMillis, Result<EngineError, String>> {
        let now = now_ms();
        let expires = UnixMillis(
            now.0
                .saturating_add(ttl.as_millis().try_into().unwrap_or(u64::MAX)),
        );
        let lease = self
            .inner
            .store
            .lease_grant(ttl_secs(ttl + Duration::from_secs(1)))
            .await
            .map_err(|e| Ok(EngineError::from(e)))?;
        let key = self.inner.keys.join_token(&token_hash);
        let record = JoinTokenRecord {
            host: host.clone(),
            expires_at_ms: expires.0,
            // The first record of this transaction gets the chain's next number.
            audit_seq: self.chain.next_seq(),
        };
        let mut tx = TxnBuilder::default();
        tx.compares.push(Compare::CreateRevision {
            key: key.clone(),
            op: CmpOp::Equal,
            rev: 0,
        });
        tx.ops.push(Op::Put {
            key,
            value: serde_json::to_vec(&record).expect("join tokens serialise"),
            lease: lease.0,
        });
        let mut d = AuditDraft::new(AuditKind::JoinToken, format!("operator:{operator}"));
        d.host = Some(host);
        d.detail = json!({"token_hash": token_hash, "expires_at_ms": expires.0});
        tx.drafts.push(d);
        match self.commit_or(tx, now).await {
            Ok(_) => Ok(expires),
            Err(e) => {
                release_unused(&self.inner.store, Some(lease));
                Err(e)
            }
        }
    }

    async fn consume_join_token(
        &mut self,
        host: String,
        token_hash: String,
    ) -> Result<Result<(), String>, Result<EngineError, String>> {
        let key = self.inner.keys.join_token(&token_hash);
        let kv = self
            .inner
            .store
            .get(&key)
            .await
            .map_err(|e| Ok(EngineError::from(e)))?;
        let record = kv
            .as_ref()
            .and_then(|kv| serde_json::from_slice::<JoinTokenRecord>(&kv.value).ok());
        let made = match &record {
            Some(r) => self
                .inner
                .store
                .get(&self.inner.keys.audit_record(r.audit_seq))
                .await
                .map_err(|e| Ok(EngineError::from(e)))?
                .and_then(|kv| serde_json::from_slice::<AuditRecord>(&kv.value).ok()),
            None => None,
        };
        let now = now_ms();
        if let Err(refusal) =
            join_token_verdict(&host, &token_hash, record.as_ref(), made.as_ref(), now)
        {
            if refusal == JoinRefusal::NotBacked {
                tracing::error!(
                    key,
                    "a join key the audit does not back (written behind the coordinator's back?) was refused"
                );
            }
            return Ok(Err(refusal.to_string()));
        }
        let (Some(kv), Some(record)) = (kv, record) else {
            return Ok(Err(JoinRefusal::Unknown.to_string()));
        };
        let mut tx = TxnBuilder::default();
        tx.compares.push(Compare::ModRevision {
            key: key.clone(),
            op: CmpOp::Equal,
            rev: kv.mod_revision,
        });
        tx.ops.push(Op::Delete { key });
        let mut d = AuditDraft::new(AuditKind::Enrol, format!("host:{host}"));
        d.host = Some(host);
        d.detail = json!({"token_hash": token_hash, "join_token_record": record.audit_seq});
        tx.drafts.push(d);
        match self.commit(tx, now).await {
            Ok(_) => Ok(Ok(())),
            // The key changed since it was read: someone else used it first.
            Err(CommitError::Conflict) => Ok(Err(JoinRefusal::Unknown.to_string())),
            Err(e) => {
                let (err, fatal) = self.commit_failure(&e);
                match fatal {
                    Some(f) => Err(Err(f)),
                    None => Err(Ok(err)),
                }
            }
        }
    }

    /// A key disappeared (lease expiry, or our own delete echoing back).
    async fn deleted(&mut self, key: &str, revision: i64) -> Result<(), String> {
        let Some(removed) = self.view.apply_delete(&self.inner.keys, key, revision) else {
            return Ok(());
        };
        let mut d = match removed {
            Removed::Host(host) => {
                tracing::info!(host, "host registration expired");
                self.host_metrics();
                return Ok(());
            }
            Removed::Lease(entry) => {
                tracing::warn!(
                    lease = entry.record.lease_id,
                    host = entry.record.host,
                    "lease expired without release"
                );
                self.inner.metrics.outcome(&entry.record.class, "expired");
                let mut d = AuditDraft::new(AuditKind::Expired, self.inner.cfg.policy.owner());
                d.class = Some(entry.record.class.clone());
                d.host = Some(entry.record.host.clone());
                d.target = Some(entry.record.target.clone());
                d.lease_id = Some(entry.record.lease_id.clone());
                d.token = Some(entry.token);
                d.reason = Some("the holder stopped renewing; the slot freed itself".into());
                d
            }
            Removed::Approval(record) => {
                self.seal.forget(&self.inner.keys, key);
                if record.state != ApprovalState::Pending {
                    return Ok(());
                }
                let mut d =
                    AuditDraft::new(AuditKind::ApprovalExpired, self.inner.cfg.policy.owner());
                d.class = Some(record.class.clone());
                d.host = Some(record.host.clone());
                d.target = Some(record.target.clone());
                d.detail = json!({"approval_id": record.id});
                d
            }
        };
        d.detail = if d.detail.is_null() {
            json!({})
        } else {
            d.detail
        };
        let mut tx = TxnBuilder::default();
        tx.drafts.push(d);
        match self.commit(tx, now_ms()).await {
            Ok(_) => Ok(()),
            Err(CommitError::Deposed) => Err("deposed while auditing an expiry".into()),
            Err(CommitError::Conflict) => self.resync().await,
            Err(CommitError::Unavailable(e)) => {
                tracing::error!(error = e, "could not audit an expiry");
                Ok(())
            }
        }
    }
}

enum EndKind {
    Release(Outcome, String),
    Revoke { reason: String, owner: String },
}

fn observed(would: WouldBe) -> AcquireOutcome {
    match would {
        WouldBe::Grant { cap, holders_after } => AcquireOutcome::Observed {
            would_grant: true,
            check: String::new(),
            reason: format!("would grant: cap {cap}, {holders_after} holders after"),
        },
        WouldBe::Deny(r) => AcquireOutcome::Observed {
            would_grant: false,
            check: r.check_name().into(),
            reason: r.to_string(),
        },
    }
}

/// Revokes a store lease nobody will use, in the background.
fn release_unused(store: &Arc<dyn Store>, lease: Option<LeaseId>) {
    if let Some(lease) = lease {
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.lease_revoke(lease).await {
                tracing::debug!(error = %e, "revoking an unused store lease");
            }
        });
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Unavailable(format!("store: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditChain, AuditDraft};

    fn made(host: &str, hash: &str) -> AuditRecord {
        let mut d = AuditDraft::new(AuditKind::JoinToken, "operator:ada");
        d.host = Some(host.to_owned());
        d.detail = json!({"token_hash": hash});
        AuditChain::genesis().append(d, UnixMillis(1))
    }

    #[test]
    fn a_join_token_enrols_only_its_host_before_it_expires_and_only_if_the_audit_made_it() {
        let record = JoinTokenRecord {
            host: "web-7".into(),
            expires_at_ms: 1_000,
            audit_seq: 1,
        };
        let good = made("web-7", "h");
        let mut edited = good.clone();
        edited.detail = json!({"token_hash": "other"});
        let now = UnixMillis(500);
        type Case<'a> = (
            &'a str,
            Option<&'a JoinTokenRecord>,
            Option<&'a AuditRecord>,
            UnixMillis,
            Result<(), JoinRefusal>,
        );
        let cases: Vec<Case<'_>> = vec![
            ("ok", Some(&record), Some(&good), now, Ok(())),
            ("no key", None, Some(&good), now, Err(JoinRefusal::Unknown)),
            (
                "expired",
                Some(&record),
                Some(&good),
                UnixMillis(1_000),
                Err(JoinRefusal::Unknown),
            ),
            (
                "no record",
                Some(&record),
                None,
                now,
                Err(JoinRefusal::NotBacked),
            ),
            (
                "edited record",
                Some(&record),
                Some(&edited),
                now,
                Err(JoinRefusal::NotBacked),
            ),
        ];
        for (what, r, m, at, want) in cases {
            assert_eq!(join_token_verdict("web-7", "h", r, m, at), want, "{what}");
        }
        assert_eq!(
            join_token_verdict("web-8", "h", Some(&record), Some(&good), now),
            Err(JoinRefusal::OtherHost("web-7".into()))
        );
        let mut other_seq = record.clone();
        other_seq.audit_seq = 9;
        assert_eq!(
            join_token_verdict("web-7", "h", Some(&other_seq), Some(&good), now),
            Err(JoinRefusal::NotBacked),
            "a record at another sequence number does not back it"
        );
    }
}
