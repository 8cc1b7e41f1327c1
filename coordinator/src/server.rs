//! The gRPC server: binds the Coordinator, Agent and Operator services to a listener and runs
//! until shutdown.
//!
//! Owns the tonic plumbing only: it converts wire types to engine calls at the boundary, maps
//! engine errors to status codes (with the leader's address for clients to retry there), and
//! must not hold decision logic.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use interlock_proto::v1 as pb;
use pb::{
    agent_server::{Agent, AgentServer},
    coordinator_server::{Coordinator, CoordinatorServer},
    operator_server::{Operator, OperatorServer},
};
use tokio::net::TcpListener;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status, metadata::MetadataValue};

use crate::{
    admission::{FreezeRecord, UnixMillis, effective_cap},
    engine::{AcquireInput, AcquireOutcome, Engine, EngineError, GrantInfo, LateOutcome, Outcome},
    identity::{Identity, OperatorAction, Refusal},
    policy::Mode,
    telemetry::{FleetTelemetry, FlowEdge, MAX_EDGES_PER_HOST, ReportedFinding},
    tls::{Security, peer_identity},
    view::Scope,
};

/// Metadata key carrying the operator's identity on operator calls.
pub const OPERATOR_HEADER: &str = "x-interlock-operator";
/// Metadata key carrying the leader's address on a follower's UNAVAILABLE answer.
pub const LEADER_HEADER: &str = "x-interlock-leader";

fn status(err: EngineError) -> Status {
    match err {
        EngineError::NotLeader { ref leader } => {
            let mut s = Status::unavailable(err.to_string());
            if let Some(addr) = leader
                && let Ok(v) = MetadataValue::try_from(addr.as_str())
            {
                s.metadata_mut().insert(LEADER_HEADER, v);
            }
            s
        }
        EngineError::Invalid(m) => Status::invalid_argument(m),
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::FailedPrecondition(m) => Status::failed_precondition(m),
        EngineError::Unavailable(m) => Status::unavailable(m),
        EngineError::Refused(m) => Status::permission_denied(m),
    }
}

fn operator<T>(req: &Request<T>) -> Result<String, Status> {
    let name = req
        .metadata()
        .get(OPERATOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_owned();
    if name.is_empty() {
        return Err(Status::unauthenticated(
            "no operator identity: pass --operator NAME or set INTERLOCK_OPERATOR",
        ));
    }
    Ok(name)
}

fn opt(s: String) -> Option<String> {
    if s.trim().is_empty() { None } else { Some(s) }
}

fn acquire_reply(outcome: AcquireOutcome) -> pb::AcquireReply {
    use pb::acquire_reply::Outcome as O;
    let (outcome, dry_run) = match outcome {
        AcquireOutcome::DryRun(inner) => (*inner, true),
        other => (other, false),
    };
    let outcome = match outcome {
        AcquireOutcome::Granted(GrantInfo {
            lease_id,
            token,
            ttl_ms,
            verification_window_ms,
            granted_at,
            approver,
        }) => O::Granted(pb::Granted {
            lease_id,
            token,
            ttl_ms,
            verification_window_ms,
            granted_at_ms: granted_at.0,
            approver: approver.unwrap_or_default(),
        }),
        AcquireOutcome::Denied { check, reason } => O::Denied(pb::Denied { check, reason }),
        AcquireOutcome::Pending {
            approval_id,
            expires_at,
        } => O::Pending(pb::Pending {
            approval_id,
            expires_at_ms: expires_at.0,
        }),
        AcquireOutcome::Observed {
            would_grant,
            check,
            reason,
        } => O::Observed(pb::Observed {
            would_grant,
            check,
            reason,
        }),
        AcquireOutcome::DryRun(_) => unreachable!("dry runs are not nested"),
    };
    pb::AcquireReply {
        outcome: Some(outcome),
        dry_run,
    }
}

fn freeze_info(scope: &str, class: &str, host: &str, r: &FreezeRecord) -> pb::FreezeInfo {
    pb::FreezeInfo {
        scope: scope.into(),
        class: class.into(),
        host: host.into(),
        reason: r.reason.clone(),
        owner: r.owner.clone(),
        since_ms: r.since.0,
        cause: serde_json::to_value(r.cause)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    }
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(u64::MAX)
}

#[derive(Debug, Clone)]
struct Services {
    engine: Engine,
    telemetry: Arc<Mutex<FleetTelemetry>>,
    security: Arc<Security>,
}

impl Services {
    /// The verified identity of the caller (`None` on an `--insecure` coordinator, where
    /// nobody is verified).
    async fn identity<T>(&self, request: &Request<T>) -> Result<Option<Identity>, Status> {
        match &*self.security {
            Security::Insecure => Ok(None),
            Security::Mtls {
                trust_domain,
                deny,
                tokens,
                ..
            } => match peer_identity(request, trust_domain) {
                // No client certificate at all: a bearer token may stand in for an operator's.
                Err(_) if request.peer_certs().is_none() && bearer(request).is_some() => {
                    let id = tokens
                        .as_ref()
                        .and_then(|t| bearer(request).and_then(|b| t.identify(b)));
                    let Some(id) = id else {
                        let refusal = Refusal {
                            check: "no_identity",
                            reason: "the bearer token is not one this coordinator accepts \
                                     (--token-file); ask for a token or use a certificate"
                                .into(),
                        };
                        return Err(self.refuse("unverified-token".to_owned(), refusal).await);
                    };
                    if let Some(refusal) = deny.as_ref().and_then(|(_, list)| list.refusal(&id)) {
                        return Err(self.refuse(id.to_string(), refusal).await);
                    }
                    Ok(Some(id))
                }
                Ok(id) => {
                    if let Some(refusal) = deny.as_ref().and_then(|(_, list)| list.refusal(&id)) {
                        return Err(self.refuse(id.to_string(), refusal).await);
                    }
                    Ok(Some(id))
                }
                Err(e) => {
                    let refusal = Refusal {
                        check: "no_identity",
                        reason: e.to_string(),
                    };
                    Err(self.refuse("unverified".to_owned(), refusal).await)
                }
            },
        }
    }

    /// Counts, logs and audits a refusal, and returns the status to answer with.
    async fn refuse(&self, owner: String, refusal: Refusal) -> Status {
        let Refusal { reason, check } = refusal;
        self.engine.metrics().identity_refused(check);
        tracing::warn!(
            caller = owner,
            check,
            reason,
            "call refused because of its caller's identity"
        );
        // Audited when this replica leads (a follower answers with the leader's address for
        // everything else anyway); a failed audit write does not turn a refusal into a grant.
        if let Err(e) = self.engine.refused(owner, check, reason.clone()).await {
            tracing::debug!(error = %e, "refusal not audited");
        }
        Status::permission_denied(reason)
    }

    /// The host an agent call acts for: the certificate's host, which must be the one the
    /// message names (if it names one). Insecure: the message's word.
    async fn host_for<T>(&self, request: &Request<T>, claimed: &str) -> Result<String, Status> {
        match self.identity(request).await? {
            None => Ok(claimed.to_owned()),
            Some(id) => match self.engine.policy().access.authorize_host(&id, claimed) {
                Ok(host) => Ok(host),
                Err(r) => Err(self.refuse(id.to_string(), r).await),
            },
        }
    }

    /// For calls on an existing lease or approval: the caller must be the host that holds it.
    async fn holder_only<T>(
        &self,
        request: &Request<T>,
        holder: Option<String>,
    ) -> Result<(), Status> {
        let Some(id) = self.identity(request).await? else {
            return Ok(());
        };
        // An unknown lease or approval: the host check passes on the caller's own id, and the
        // engine answers NotFound as before.
        let claimed = holder.unwrap_or_default();
        match self.engine.policy().access.authorize_host(&id, &claimed) {
            Ok(_) => Ok(()),
            Err(r) => Err(self.refuse(id.to_string(), r).await),
        }
    }

    /// The operator an operator call acts as, allowed by its role. Insecure: the header.
    async fn operator_for<T>(
        &self,
        request: &Request<T>,
        action: OperatorAction,
    ) -> Result<String, Status> {
        match self.identity(request).await? {
            // Reads never needed a name; writes keep the self-asserted header when insecure.
            None if action == OperatorAction::Read => Ok(String::new()),
            None => operator(request),
            Some(id) => match self.engine.policy().access.authorize_operator(&id, action) {
                Ok(name) if name == crate::identity::BREAK_GLASS => {
                    // Every use is audited and alerted before it acts; if that cannot be
                    // recorded, the break-glass call does not go ahead.
                    self.engine
                        .break_glass(action.describe())
                        .await
                        .map_err(status)?;
                    Ok(name)
                }
                Ok(name) => Ok(name),
                Err(r) => Err(self.refuse(id.to_string(), r).await),
            },
        }
    }
}

/// How long a join token lives unless the operator says otherwise, and at most.
const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
const JOIN_TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 86_400);

fn now_unix() -> i64 {
    i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX)
}

impl Services {
    /// The CA's key, or why hosts cannot enrol here.
    fn signer(&self) -> Result<Arc<crate::certs::Signer>, Status> {
        match &*self.security {
            Security::Mtls {
                signer: Some(s), ..
            } => Ok(Arc::clone(s)),
            Security::Mtls { .. } => Err(Status::failed_precondition(
                "this coordinator does not sign certificates: start interlock serve with \
                 --ca-key (the CA's key) to enrol hosts with join tokens",
            )),
            Security::Insecure => Err(Status::failed_precondition(
                "enrolment needs TLS: this coordinator serves --insecure",
            )),
        }
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn check_reporter(host_id: &str) -> Result<(), Status> {
    if host_id.is_empty() || host_id.len() > 256 {
        return Err(Status::invalid_argument(
            "host_id must be 1 to 256 bytes: set host_id in the agent's config",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl Coordinator for Services {
    async fn ping(
        &self,
        request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingReply>, Status> {
        let verified = self.identity(&request).await?;
        let pb::PingRequest { caller } = request.into_inner();
        // Over mutual TLS the caller is who the certificate says, whatever the message claims.
        let caller = verified.map_or(caller, |id| id.to_string());
        if caller.len() > 256 {
            return Err(Status::invalid_argument(
                "caller is longer than 256 bytes; send a host id or operator name",
            ));
        }
        let snap = self.engine.snapshot();
        Ok(Response::new(pb::PingReply {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store: self.engine.store_kind().to_owned(),
            caller,
            leader: snap.leader,
            leader_addr: snap.leader_addr.clone().unwrap_or_default(),
        }))
    }
}

#[tonic::async_trait]
impl Agent for Services {
    async fn enrol(
        &self,
        request: Request<pb::EnrolRequest>,
    ) -> Result<Response<pb::CertificateReply>, Status> {
        let signer = self.signer()?;
        if request.peer_certs().is_some() {
            return Err(Status::failed_precondition(
                "this connection already presents a certificate: renew with RenewCertificate",
            ));
        }
        let pb::EnrolRequest {
            host_id,
            token,
            csr_pem,
        } = request.into_inner();
        if !crate::identity::valid_name(&host_id) {
            return Err(Status::invalid_argument(
                "host_id must be 1-253 bytes of letters, digits, '.', '_', '-'",
            ));
        }
        crate::certs::check_csr(&csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Used up (and audited) before anything is signed; a refusal is counted and audited.
        if let Err(e) = self
            .engine
            .consume_join_token(host_id.clone(), crate::tokens::hash(&token))
            .await
        {
            return Err(match e {
                EngineError::Refused(reason) => {
                    let refusal = Refusal {
                        check: "join_token",
                        reason,
                    };
                    self.refuse(format!("enrolling:{host_id}"), refusal).await
                }
                other => status(other),
            });
        }
        let (cert_pem, not_after_unix) = signer
            .sign(&host_id, &csr_pem, now_unix())
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(
            host = host_id,
            not_after_unix,
            "host enrolled with a join token"
        );
        Ok(Response::new(pb::CertificateReply {
            cert_pem,
            ca_pem: signer.ca_pem().to_owned(),
            not_after_unix,
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::CertificateReply>, Status> {
        let signer = self.signer()?;
        // The host is the one of the certificate presented, never a field of the request.
        let host = self.host_for(&request, "").await?;
        let csr_pem = request.into_inner().csr_pem;
        crate::certs::check_csr(&csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (cert_pem, not_after_unix) = signer
            .sign(&host, &csr_pem, now_unix())
            .map_err(|e| Status::internal(e.to_string()))?;
        self.engine
            .certificate_renewed(host.clone(), not_after_unix)
            .await
            .map_err(status)?;
        tracing::info!(host, not_after_unix, "host certificate renewed");
        Ok(Response::new(pb::CertificateReply {
            cert_pem,
            ca_pem: signer.ca_pem().to_owned(),
            not_after_unix,
        }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let claimed = request.get_ref().host_id.clone();
        let host = self.host_for(&request, &claimed).await?;
        let pb::RegisterRequest { host_id: _, labels } = request.into_inner();
        let host_id = host;
        let ttl = self
            .engine
            .register(host_id, labels.into_iter().collect())
            .await
            .map_err(status)?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        Ok(Response::new(pb::RegisterReply {
            ttl_ms,
            heartbeat_interval_ms: ttl_ms / 3,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let claimed = request.get_ref().host_id.clone();
        let host_id = self.host_for(&request, &claimed).await?;
        let ttl = self.engine.heartbeat(&host_id).await.map_err(status)?;
        Ok(Response::new(pb::HeartbeatReply {
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireReply>, Status> {
        let claimed = request.get_ref().host_id.clone();
        let host_id = self.host_for(&request, &claimed).await?;
        let pb::AcquireRequest {
            host_id: _,
            class,
            target,
            evidence,
            dry_run,
        } = request.into_inner();
        let outcome = self
            .engine
            .acquire(AcquireInput {
                host: host_id,
                class,
                target,
                evidence,
                dry_run,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(acquire_reply(outcome)))
    }

    async fn poll_approval(
        &self,
        request: Request<pb::PollApprovalRequest>,
    ) -> Result<Response<pb::AcquireReply>, Status> {
        let holder = self
            .engine
            .snapshot()
            .view
            .approvals
            .get(&request.get_ref().approval_id)
            .map(|(a, _)| a.host.clone());
        self.holder_only(&request, holder).await?;
        let pb::PollApprovalRequest {
            approval_id,
            host_id: _,
        } = request.into_inner();
        let outcome = self
            .engine
            .poll_approval(&approval_id)
            .await
            .map_err(status)?;
        Ok(Response::new(acquire_reply(outcome)))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewReply>, Status> {
        let holder = self.lease_holder(&request.get_ref().lease_id);
        self.holder_only(&request, holder).await?;
        let pb::RenewRequest { lease_id, token } = request.into_inner();
        let ttl_ms = self.engine.renew(&lease_id, token).await.map_err(status)?;
        Ok(Response::new(pb::RenewReply { ttl_ms }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseReply>, Status> {
        let holder = self.lease_holder(&request.get_ref().lease_id);
        self.holder_only(&request, holder).await?;
        let pb::ReleaseRequest {
            lease_id,
            token,
            outcome,
            detail,
        } = request.into_inner();
        let outcome = outcome_from_wire(outcome)?;
        self.engine
            .release(lease_id, token, outcome, detail)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReleaseReply {}))
    }

    async fn report_outcome(
        &self,
        request: Request<pb::ReportOutcomeRequest>,
    ) -> Result<Response<pb::ReleaseReply>, Status> {
        let claimed = request.get_ref().host_id.clone();
        let host_id = self.host_for(&request, &claimed).await?;
        let pb::ReportOutcomeRequest {
            host_id: _,
            lease_id,
            token,
            class,
            target,
            outcome,
            detail,
        } = request.into_inner();
        let outcome = outcome_from_wire(outcome)?;
        self.engine
            .late_outcome(LateOutcome {
                host: host_id,
                lease_id,
                token,
                class,
                target,
                outcome,
                detail,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReleaseReply {}))
    }

    async fn report_findings(
        &self,
        request: Request<pb::ReportFindingsRequest>,
    ) -> Result<Response<pb::ReportReply>, Status> {
        let claimed = request.get_ref().host_id.clone();
        let host_id = self.host_for(&request, &claimed).await?;
        let pb::ReportFindingsRequest {
            host_id: _,
            findings,
        } = request.into_inner();
        check_reporter(&host_id)?;
        self.require_leader(&self.engine.snapshot()).await?;
        if findings.len() > 1000 {
            return Err(Status::invalid_argument("at most 1000 findings per report"));
        }
        tracing::info!(
            host = host_id,
            findings = findings.len(),
            "findings reported"
        );
        let accepted = u32::try_from(findings.len()).unwrap_or(u32::MAX);
        let findings = findings
            .into_iter()
            .map(|f| {
                let pb::Finding {
                    id,
                    detector,
                    target,
                    summary,
                    evidence_json,
                    since_ms,
                } = f;
                ReportedFinding {
                    id,
                    detector,
                    target,
                    summary,
                    evidence_json,
                    since_ms,
                }
            })
            .collect();
        self.telemetry()
            .record_findings(&host_id, findings, now_ms());
        Ok(Response::new(pb::ReportReply { accepted }))
    }

    async fn report_flows(
        &self,
        request: Request<pb::ReportFlowsRequest>,
    ) -> Result<Response<pb::ReportReply>, Status> {
        let claimed = request.get_ref().host_id.clone();
        let host_id = self.host_for(&request, &claimed).await?;
        let pb::ReportFlowsRequest { host_id: _, edges } = request.into_inner();
        check_reporter(&host_id)?;
        self.require_leader(&self.engine.snapshot()).await?;
        if edges.len() > MAX_EDGES_PER_HOST {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_EDGES_PER_HOST} flow edges per report"
            )));
        }
        tracing::debug!(host = host_id, edges = edges.len(), "flow edges reported");
        let accepted = u32::try_from(edges.len()).unwrap_or(u32::MAX);
        let edges = edges
            .into_iter()
            .map(|e| {
                let pb::FlowEdge {
                    local_service,
                    process,
                    remote,
                    connects_per_s,
                    failures_per_s,
                    retransmits_per_s,
                    bytes_per_s,
                } = e;
                FlowEdge {
                    local_service,
                    process,
                    remote,
                    connects_per_s,
                    failures_per_s,
                    retransmits_per_s,
                    bytes_per_s,
                }
            })
            .collect();
        self.telemetry().record_flows(&host_id, edges, now_ms());
        Ok(Response::new(pb::ReportReply { accepted }))
    }
}

#[tonic::async_trait]
impl Operator for Services {
    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenReply>, Status> {
        self.signer()?;
        let operator = self
            .operator_for(&request, OperatorAction::IssueJoinToken)
            .await?;
        let pb::CreateJoinTokenRequest { host_id, ttl_ms } = request.into_inner();
        if !crate::identity::valid_name(&host_id) {
            return Err(Status::invalid_argument(
                "host_id must be 1-253 bytes of letters, digits, '.', '_', '-'",
            ));
        }
        let ttl = match ttl_ms {
            0 => JOIN_TOKEN_TTL,
            ms => Duration::from_millis(ms),
        };
        if ttl > JOIN_TOKEN_TTL_MAX {
            return Err(Status::invalid_argument(format!(
                "a join token lives at most {}; give a shorter --ttl",
                humantime::format_duration(JOIN_TOKEN_TTL_MAX)
            )));
        }
        let token = crate::tokens::new_token().map_err(|e| Status::internal(e.to_string()))?;
        let expires = self
            .engine
            .create_join_token(host_id, crate::tokens::hash(&token), ttl, operator)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateJoinTokenReply {
            token,
            expires_at_ms: expires.0,
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.operator_for(&request, OperatorAction::Read).await?;
        let snap = self.engine.snapshot();
        let view = &snap.view;
        let policy = self.engine.policy();
        let now = UnixMillis(now_ms());
        let mut services: BTreeMap<String, u32> = BTreeMap::new();
        for h in view.hosts.values() {
            if let Some(s) = h.record.service() {
                *services.entry(s.to_owned()).or_default() += 1;
            }
        }
        let mut classes = Vec::new();
        for (name, class) in &policy.classes {
            let name = name.as_str();
            let mode = view.modes.get(name).copied().unwrap_or(class.mode);
            let mut freezes = Vec::new();
            if let Some(r) = view.class_freezes.get(name) {
                freezes.push(freeze_info("class", name, "", r));
            }
            for ((c, h), r) in &view.host_blocks {
                if c == name {
                    freezes.push(freeze_info("host", c, h, r));
                }
            }
            let mut scopes = Vec::new();
            let mut full = Vec::new();
            let mut serviced: BTreeMap<String, u32> = services.clone();
            for l in view.leases.values().filter(|l| l.record.class == name) {
                serviced.entry(l.record.service.clone()).or_default();
            }
            for (service, live) in &serviced {
                let scope = Scope {
                    class: name.to_owned(),
                    service: service.clone(),
                };
                let holders = u32::try_from(view.held_slots(&scope).len()).unwrap_or(u32::MAX);
                let cap = effective_cap(&class.cap, *live);
                if holders >= cap {
                    full.push(format!("cap full in {service}: {holders}/{cap}"));
                }
                scopes.push(pb::ScopeStatus {
                    service: service.clone(),
                    holders,
                    cap,
                    live_hosts: *live,
                });
            }
            let budget = view.budget(name);
            let used = budget.fleet_used(&class.budget.fleet, now);
            let pending = view
                .approvals
                .values()
                .filter(|(a, _)| a.class == name && a.state == crate::view::ApprovalState::Pending)
                .count();
            let waiting_on = if let Some(r) = &view.kill_switch {
                format!("kill switch: {}", r.reason)
            } else if let Some(r) = view.class_freezes.get(name) {
                format!("frozen: {}", r.reason)
            } else if mode == Mode::Observe {
                "observe mode: recording only".to_owned()
            } else if used >= class.budget.fleet.max {
                format!("fleet budget used: {used}/{}", class.budget.fleet.max)
            } else if !full.is_empty() {
                full.join("; ")
            } else if pending > 0 {
                format!("{pending} approval(s) pending")
            } else {
                "ready".to_owned()
            };
            classes.push(pb::ClassStatus {
                class: name.to_owned(),
                tier: class.tier.to_string(),
                mode: mode.to_string(),
                freezes,
                scopes,
                fleet_budget_used: used,
                fleet_budget_max: class.budget.fleet.max,
                budget_window_ms: u64::try_from(class.budget.fleet.window.as_millis())
                    .unwrap_or(u64::MAX),
                pending_approvals: u32::try_from(pending).unwrap_or(u32::MAX),
                waiting_on,
            });
        }
        Ok(Response::new(pb::StatusReply {
            leader: snap.leader,
            leader_addr: match &snap.leader_addr {
                Some(a) => a.clone(),
                None => self.engine.leader_addr().await.unwrap_or_default(),
            },
            store: self.engine.store_kind().to_owned(),
            policy: policy.owner(),
            kill_switch: view
                .kill_switch
                .as_ref()
                .map(|r| freeze_info("all", "", "", r)),
            classes,
            live_hosts: u32::try_from(view.hosts.len()).unwrap_or(u32::MAX),
            active_leases: u32::try_from(view.leases.len()).unwrap_or(u32::MAX),
            insecure: self.security.is_insecure(),
        }))
    }

    async fn hosts(
        &self,
        request: Request<pb::HostsRequest>,
    ) -> Result<Response<pb::HostsReply>, Status> {
        self.operator_for(&request, OperatorAction::Read).await?;
        let snap = self.engine.snapshot();
        self.require_leader(&snap).await?;
        let hosts = snap
            .view
            .hosts
            .iter()
            .map(|(id, h)| pb::Host {
                host_id: id.clone(),
                labels: h.record.labels.clone().into_iter().collect(),
                registered_at_ms: h.record.registered_at.0,
                findings: u32::try_from(self.telemetry().finding_count(id)).unwrap_or(u32::MAX),
            })
            .collect();
        Ok(Response::new(pb::HostsReply { hosts }))
    }

    async fn leases(
        &self,
        request: Request<pb::LeasesRequest>,
    ) -> Result<Response<pb::LeasesReply>, Status> {
        self.operator_for(&request, OperatorAction::Read).await?;
        let snap = self.engine.snapshot();
        self.require_leader(&snap).await?;
        // Time left comes from the store lease itself (renewals included), asked for all
        // leases at once; if the store does not answer, the TTL from the grant is shown.
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let left = futures_util::future::join_all(
            snap.view
                .leases
                .values()
                .map(|l| self.engine.store_lease_left(l.store_lease)),
        )
        .await;
        let leases = snap
            .view
            .leases
            .values()
            .zip(left)
            .map(|(l, left)| {
                let from_grant =
                    i64::try_from(l.record.granted_at.0.saturating_add(l.record.ttl_ms))
                        .unwrap_or(i64::MAX)
                        - now;
                pb::Lease {
                    lease_id: l.record.lease_id.clone(),
                    token: l.token,
                    host_id: l.record.host.clone(),
                    class: l.record.class.clone(),
                    service: l.record.service.clone(),
                    target: l.record.target.clone(),
                    granted_at_ms: l.record.granted_at.0,
                    ttl_ms: l.record.ttl_ms,
                    expires_in_ms: left.unwrap_or(from_grant),
                    approver: l.record.approver.clone().unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::LeasesReply { leases }))
    }

    async fn budgets(
        &self,
        request: Request<pb::BudgetsRequest>,
    ) -> Result<Response<pb::BudgetsReply>, Status> {
        self.operator_for(&request, OperatorAction::Read).await?;
        let snap = self.engine.snapshot();
        self.require_leader(&snap).await?;
        let now = UnixMillis(now_ms());
        let policy = self.engine.policy();
        let budgets = policy
            .classes
            .iter()
            .map(|(name, class)| {
                let name = name.as_str();
                let state = snap.view.budget(name);
                let hosts = state
                    .hosts
                    .keys()
                    .map(|h| pb::HostBudget {
                        host_id: h.0.clone(),
                        used: state.host_used(h, &class.budget.host, now),
                        max: class.budget.host.max,
                        blocked: snap
                            .view
                            .host_blocks
                            .contains_key(&(name.to_owned(), h.0.clone())),
                    })
                    .collect();
                pb::Budget {
                    class: name.to_owned(),
                    fleet_used: state.fleet_used(&class.budget.fleet, now),
                    fleet_max: class.budget.fleet.max,
                    fleet_window_ms: u64::try_from(class.budget.fleet.window.as_millis())
                        .unwrap_or(u64::MAX),
                    host_max: class.budget.host.max,
                    host_window_ms: u64::try_from(class.budget.host.window.as_millis())
                        .unwrap_or(u64::MAX),
                    hosts,
                    frozen: snap.view.class_freezes.contains_key(name),
                }
            })
            .collect();
        Ok(Response::new(pb::BudgetsReply { budgets }))
    }

    async fn freeze(
        &self,
        request: Request<pb::FreezeRequest>,
    ) -> Result<Response<pb::FreezeReply>, Status> {
        let op = self.operator_for(&request, OperatorAction::Freeze).await?;
        let pb::FreezeRequest {
            class,
            reason,
            revoke,
        } = request.into_inner();
        let revoked = self
            .engine
            .freeze(opt(class), reason, revoke, op)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::FreezeReply { revoked }))
    }

    async fn unfreeze(
        &self,
        request: Request<pb::UnfreezeRequest>,
    ) -> Result<Response<pb::UnfreezeReply>, Status> {
        let op = self
            .operator_for(&request, OperatorAction::Unfreeze)
            .await?;
        let pb::UnfreezeRequest {
            class,
            host,
            reason,
        } = request.into_inner();
        self.engine
            .unfreeze(opt(class), opt(host), reason, op)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UnfreezeReply {}))
    }

    async fn set_mode(
        &self,
        request: Request<pb::SetModeRequest>,
    ) -> Result<Response<pb::SetModeReply>, Status> {
        // The role needed depends on the mode asked for; an unparsable mode is the engine's
        // to refuse with its own message, so it is checked as the strictest.
        let wanted = request
            .get_ref()
            .mode
            .parse::<Mode>()
            .unwrap_or(Mode::Autonomous);
        let op = self
            .operator_for(&request, OperatorAction::SetMode(wanted))
            .await?;
        let pb::SetModeRequest { class, mode } = request.into_inner();
        let previous = self
            .engine
            .set_mode(class, &mode, op)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetModeReply {
            previous: previous.to_string(),
        }))
    }

    async fn approvals(
        &self,
        request: Request<pb::ApprovalsRequest>,
    ) -> Result<Response<pb::ApprovalsReply>, Status> {
        self.operator_for(&request, OperatorAction::Read).await?;
        let snap = self.engine.snapshot();
        self.require_leader(&snap).await?;
        let approvals = snap
            .view
            .approvals
            .values()
            .filter(|(a, _)| a.state == crate::view::ApprovalState::Pending)
            .map(|(a, _)| pb::Approval {
                approval_id: a.id.clone(),
                host_id: a.host.clone(),
                class: a.class.clone(),
                target: a.target.clone(),
                evidence: a.evidence.clone(),
                requested_at_ms: a.requested_at.0,
                expires_at_ms: a.expires_at.0,
            })
            .collect();
        Ok(Response::new(pb::ApprovalsReply { approvals }))
    }

    async fn approve(
        &self,
        request: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::AcquireReply>, Status> {
        let op = self.operator_for(&request, OperatorAction::Approve).await?;
        let pb::ApproveRequest { approval_id } = request.into_inner();
        let outcome = self.engine.approve(approval_id, op).await.map_err(status)?;
        Ok(Response::new(acquire_reply(outcome)))
    }

    async fn reject(
        &self,
        request: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::RejectReply>, Status> {
        let op = self.operator_for(&request, OperatorAction::Reject).await?;
        let pb::RejectRequest {
            approval_id,
            reason,
        } = request.into_inner();
        self.engine
            .reject(approval_id, reason, op)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RejectReply {}))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeReply>, Status> {
        let op = self.operator_for(&request, OperatorAction::Revoke).await?;
        let pb::RevokeRequest { lease_id, reason } = request.into_inner();
        self.engine
            .revoke(lease_id, reason, op)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RevokeReply {}))
    }

    async fn graph(
        &self,
        request: Request<pb::GraphRequest>,
    ) -> Result<Response<pb::GraphReply>, Status> {
        self.operator_for(&request, OperatorAction::Read).await?;
        self.require_leader(&self.engine.snapshot()).await?;
        Ok(Response::new(self.graph_reply()))
    }

    async fn findings(
        &self,
        request: Request<pb::FindingsRequest>,
    ) -> Result<Response<pb::FindingsReply>, Status> {
        self.operator_for(&request, OperatorAction::Read).await?;
        let pb::FindingsRequest { host } = request.into_inner();
        self.require_leader(&self.engine.snapshot()).await?;
        let host = opt(host);
        let findings = self
            .telemetry()
            .findings(now_ms(), host.as_deref())
            .into_iter()
            .map(|(host_id, f, at)| pb::ReportedFinding {
                host_id,
                finding: Some(pb::Finding {
                    id: f.id,
                    detector: f.detector,
                    target: f.target,
                    summary: f.summary,
                    evidence_json: f.evidence_json,
                    since_ms: f.since_ms,
                }),
                reported_at_ms: at,
            })
            .collect();
        Ok(Response::new(pb::FindingsReply { findings }))
    }

    async fn audit(
        &self,
        request: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditReply>, Status> {
        self.operator_for(&request, OperatorAction::Read).await?;
        let pb::AuditRequest {
            since_ms,
            class,
            host,
            limit,
        } = request.into_inner();
        let class = opt(class);
        let host = opt(host);
        let (records, chain) = self
            .engine
            .audit(
                UnixMillis(since_ms),
                class.as_deref(),
                host.as_deref(),
                usize::try_from(limit).unwrap_or(usize::MAX),
            )
            .await
            .map_err(status)?;
        let records = records
            .into_iter()
            .map(|r| pb::AuditRecord {
                seq: r.seq,
                at_ms: r.at.0,
                kind: r.kind.as_str().to_owned(),
                owner: r.owner,
                class: r.class.unwrap_or_default(),
                host: r.host.unwrap_or_default(),
                target: r.target.unwrap_or_default(),
                lease_id: r.lease_id.unwrap_or_default(),
                token: r.token.unwrap_or_default(),
                reason: r.reason.unwrap_or_default(),
                detail_json: r.detail.to_string(),
                prev_hash: r.prev_hash,
                hash: r.hash,
            })
            .collect();
        Ok(Response::new(pb::AuditReply {
            records,
            chain_ok: chain.is_ok(),
            chain_error: chain.err().map(|e| e.to_string()).unwrap_or_default(),
        }))
    }
}

impl Services {
    fn lease_holder(&self, lease_id: &str) -> Option<String> {
        self.engine
            .snapshot()
            .view
            .leases
            .get(lease_id)
            .map(|l| l.record.host.clone())
    }

    fn telemetry(&self) -> std::sync::MutexGuard<'_, FleetTelemetry> {
        // The telemetry is a cache of reports: a panic while holding the lock cannot leave it
        // inconsistent in a way that matters, so a poisoned lock is used as is.
        self.telemetry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn graph_reply(&self) -> pb::GraphReply {
        let snap = self.engine.snapshot();
        let service_of = |host: &str| {
            snap.view
                .hosts
                .get(host)
                .and_then(|h| h.record.service().map(str::to_owned))
        };
        let edges = self
            .telemetry()
            .graph(now_ms(), service_of)
            .into_iter()
            .map(|g| pb::GraphEdge {
                from_service: g.from_service,
                from_host: g.from_host,
                process: g.edge.process,
                to: g.edge.remote,
                connects_per_s: g.edge.connects_per_s,
                failures_per_s: g.edge.failures_per_s,
                retransmits_per_s: g.edge.retransmits_per_s,
                bytes_per_s: g.edge.bytes_per_s,
                reported_at_ms: g.reported_at_ms,
            })
            .collect();
        pb::GraphReply { edges }
    }

    async fn require_leader(&self, snap: &crate::engine::Snapshot) -> Result<(), Status> {
        if snap.leader {
            Ok(())
        } else {
            Err(status(EngineError::NotLeader {
                leader: self.engine.leader_addr().await,
            }))
        }
    }
}

/// Serves the coordinator APIs on `listener` until `shutdown` resolves, then stops accepting,
/// drains in-flight requests and returns.
pub async fn serve_grpc(
    listener: TcpListener,
    engine: Engine,
    security: Security,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tracing::info!(addr = ?listener.local_addr().ok(), store = engine.store_kind(), tls = !security.is_insecure(), "coordinator serving gRPC");
    let tls = match &security {
        Security::Mtls { tls, .. } => Some(Arc::clone(tls)),
        Security::Insecure => None,
    };
    let metrics = engine.metrics().clone();
    let services = Services {
        engine,
        telemetry: Arc::new(Mutex::new(FleetTelemetry::default())),
        security: Arc::new(security),
    };
    let router = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .add_service(CoordinatorServer::new(services.clone()))
        .add_service(AgentServer::new(services.clone()))
        .add_service(OperatorServer::new(services));
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, tls, metrics), shutdown)
                .await
        }
        None => {
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                conn.inspect(|stream| {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                })
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
}

/// Longest a TLS handshake may take; a client that connects and says nothing is dropped.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);
/// Peer addresses whose failed handshake has been logged (each is logged once, all counted).
const LOGGED_PEERS_MAX: usize = 1024;

/// Accepted connections after their TLS handshake, with the config current at accept time
/// (so rotated files apply to new connections). Handshakes run concurrently and bounded in
/// time, so a slow client holds up nobody; a failure is counted and logged once per peer
/// address. Ends when the server stops taking connections.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<crate::tls::ReloadingTls>,
    metrics: crate::metrics::CoordinatorMetrics,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let logged = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: say so, and keep serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let (tx, metrics, logged) = (tx.clone(), metrics.clone(), Arc::clone(&logged));
            tokio::spawn(async move {
                let failure =
                    match tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let _ = tx.send(Ok(tls_stream)).await;
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("no handshake within {HANDSHAKE_WITHIN:?}"),
                    };
                metrics.tls_handshake_failed();
                let first = {
                    let mut seen = logged.lock().unwrap_or_else(|p| p.into_inner());
                    seen.len() < LOGGED_PEERS_MAX && seen.insert(peer.ip())
                };
                if first {
                    tracing::warn!(
                        peer = %peer,
                        error = failure,
                        "TLS handshake failed (a certificate from another CA, expired, or not \
                         TLS); later failures from this address are only counted"
                    );
                } else {
                    tracing::debug!(peer = %peer, error = failure, "TLS handshake failed");
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// An outcome off the wire; unspecified or unknown values are refused.
fn outcome_from_wire(outcome: i32) -> Result<Outcome, Status> {
    match pb::Outcome::try_from(outcome) {
        Ok(pb::Outcome::Success) => Ok(Outcome::Success),
        Ok(pb::Outcome::Failed) => Ok(Outcome::Failed),
        Ok(pb::Outcome::VerificationFailed) => Ok(Outcome::VerificationFailed),
        Ok(pb::Outcome::Abandoned) => Ok(Outcome::Abandoned),
        Ok(pb::Outcome::Interrupted) => Ok(Outcome::Interrupted),
        Ok(pb::Outcome::Unspecified) | Err(_) => Err(Status::invalid_argument(
            "outcome must be success, failed, verification_failed, abandoned or interrupted",
        )),
    }
}
