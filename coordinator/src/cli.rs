//! The operator CLI: `interlock status | hosts | leases | lease … | budgets | freeze | unfreeze |
//! mode | approvals | approve | deny | audit | ping`.
//!
//! It owns the flags of the operator subcommands, the client side of the connection to the
//! coordinator replicas (bounded connect, leader redirect, the operator's identity in the
//! metadata, exit codes) and the rendering of replies as aligned tables or JSON. It holds no
//! decision logic and must not import the coordinator's `server`, `store`, `admission` or
//! `policy` modules: it speaks only the wire API of `interlock_proto`, so it behaves like any
//! other client. Rendering is pure (reply and `now` in, text out) and unit-tested here.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::builder::NonEmptyStringValueParser;
use interlock_proto::tls::TlsFiles;
use interlock_proto::v1::{
    self as pb, acquire_reply, agent_client::AgentClient, coordinator_client::CoordinatorClient,
    operator_client::OperatorClient,
};
use serde_json::{Value, json};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

/// The metadata key that carries the operator's name on every request the CLI sends.
pub const OPERATOR_METADATA_KEY: &str = "x-interlock-operator";
/// The metadata key in which a replica that does not lead names the leader.
pub const LEADER_METADATA_KEY: &str = "x-interlock-leader";
/// Where the CLI looks for the coordinator when neither flag nor environment says.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7400";

/// Per replica: a coordinator that does not accept a connection in this time is skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Per request: every operator call is a single store read or transaction, so 10 s means the
/// replica is stuck and the operator should hear about it rather than wait.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `leases --watch` redraws.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Below this age a grant time is shown as "12s ago", above it as an RFC3339 time.
const RELATIVE_TIME_LIMIT_MS: u64 = 3_600_000;

// ------------------------------------------------------------------------------------ flags

/// Flags shared by every operator subcommand: where the coordinator is, who is asking, and how
/// to print the answer.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Coordinator replicas to try in order (comma-separated URLs); a replica that does not
    /// lead redirects to the leader.
    #[arg(
        long = "coordinator",
        value_name = "URLS",
        env = "INTERLOCK_COORDINATOR",
        default_value = DEFAULT_COORDINATOR,
        value_delimiter = ',',
        value_parser = NonEmptyStringValueParser::new(),
        global = true
    )]
    pub coordinators: Vec<String>,
    /// Who you are: recorded in the audit log with every change you make (default: $USER).
    #[arg(
        long,
        value_name = "NAME",
        env = "INTERLOCK_OPERATOR",
        default_value_t = default_operator(),
        value_parser = NonEmptyStringValueParser::new(),
        global = true
    )]
    pub operator: String,
    /// The CA that signed the coordinator's certificate (PEM); with --cert and --key, the CLI
    /// speaks mutual TLS and `https://` URLs are required.
    #[arg(long, value_name = "FILE", env = "INTERLOCK_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// Your operator certificate (`interlock certs issue operator NAME`): who you are.
    #[arg(long, value_name = "FILE", env = "INTERLOCK_CERT", global = true)]
    pub cert: Option<std::path::PathBuf>,
    /// Its private key (mode 0600).
    #[arg(long, value_name = "FILE", env = "INTERLOCK_KEY", global = true)]
    pub key: Option<std::path::PathBuf>,
    /// A bearer token instead of a certificate (automation; `interlock tokens new`), sent over
    /// TLS verified with --ca. Not `--token`: that is the fencing token of `lease release`.
    #[arg(
        long = "auth-token",
        value_name = "TOKEN",
        env = "INTERLOCK_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub auth_token: Option<String>,
    /// How to print the answer.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,
}

/// How the CLI prints replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// One JSON object (per refresh with `--watch`) with the proto's field names, for scripts.
    Json,
    /// Graphviz dot, for `interlock graph` only.
    Dot,
}

/// The operator's subcommands; `run` executes one of them against the coordinator.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OperatorCommand {
    /// Leadership, store, policy, the kill switch and the state of every action class.
    Status,
    /// Registered hosts and their labels.
    Hosts,
    /// Active leases.
    Leases {
        /// Redraw every second until Ctrl-C (or until --count refreshes).
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many refreshes.
        #[arg(long, requires = "watch", value_parser = clap::value_parser!(u32).range(1..))]
        count: Option<u32>,
    },
    /// Acquire, release or revoke one lease by hand.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Fleet and per-host action budgets of every class.
    Budgets,
    /// Stop granting leases: for one class, or for everything (the kill switch) without --class.
    Freeze {
        /// The class to freeze; without it every class stops (kill switch).
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        class: Option<String>,
        /// Also end the active leases of what is frozen.
        #[arg(long)]
        revoke: bool,
        /// Why, for the audit log and for whoever lifts it.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        reason: String,
    },
    /// Lift a class freeze, the kill switch (no --class), or one host's budget block (--host).
    Unfreeze {
        /// The class to unfreeze; without it the kill switch is lifted.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        class: Option<String>,
        /// With --class: unblock this host whose host budget ran out.
        #[arg(long, requires = "class", value_parser = NonEmptyStringValueParser::new())]
        host: Option<String>,
        /// Why, for the audit log.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        reason: String,
    },
    /// Set the mode of a class.
    Mode {
        /// The class to change.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        class: String,
        /// The new mode.
        #[arg(value_enum)]
        mode: ModeArg,
    },
    /// Requests waiting for an operator's approval (assist mode).
    Approvals,
    /// Approve a pending request: admission runs again now and grants if it passes.
    Approve {
        /// The approval id (see `interlock approvals`).
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        approval_id: String,
    },
    /// Reject a pending request.
    Deny {
        /// The approval id (see `interlock approvals`).
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        approval_id: String,
        /// Why, for the audit log and the agent.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        reason: String,
    },
    /// The audit log, with a check of its hash chain.
    Audit {
        /// Only records since then: a duration ago (10m, 2h30m) or an RFC3339 UTC time
        /// (2024-05-01T12:00:00Z).
        #[arg(long, value_name = "DURATION_OR_RFC3339", value_parser = parse_since)]
        since: Option<AuditSince>,
        /// Only records of this class.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        class: Option<String>,
        /// Only records of this host.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        host: Option<String>,
        /// At most this many records (default: the coordinator's limit).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
    },
    /// Ask every coordinator replica who it is and whether it leads.
    Ping,
    /// The fleet dependency graph from the flow edges agents report (`-o dot` for Graphviz).
    Graph,
    /// The latest findings agents reported.
    Findings {
        /// Only this host's findings.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        host: Option<String>,
    },
}

/// `interlock lease …`: one lease by hand, as an agent would.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LeaseCommand {
    /// Ask for a lease to run one action on one target of one host.
    Acquire {
        /// The host that would act.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        host: String,
        /// The action class.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        class: String,
        /// What the action acts on (unit, device, path).
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        target: String,
        /// Why, recorded in the audit log (default: "acquired by hand by operator NAME").
        #[arg(long)]
        evidence: Option<String>,
        /// Report what admission would decide without granting anything.
        #[arg(long, conflicts_with = "hold")]
        dry_run: bool,
        /// Keep the lease while you work by hand: renew it every third of its TTL until
        /// Ctrl-C or SIGTERM, then release it (outcome: abandoned). Blocks automation in the
        /// scope meanwhile.
        #[arg(long)]
        hold: bool,
    },
    /// End a lease and record how the action went.
    Release {
        /// The lease id.
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        lease_id: String,
        /// The lease's fencing token.
        #[arg(long)]
        token: u64,
        /// How the action went.
        #[arg(long, value_enum, default_value_t = ReleaseOutcome::Abandoned)]
        outcome: ReleaseOutcome,
        /// Free text for the audit log.
        #[arg(long)]
        detail: Option<String>,
    },
    /// End a lease now, whoever holds it.
    Revoke {
        /// The lease id.
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        lease_id: String,
        /// Why, for the audit log.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        reason: String,
    },
}

/// How a released action went (`Outcome` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReleaseOutcome {
    /// The action ran and verification passed.
    Success,
    /// The action failed.
    Failed,
    /// The action ran but verification failed.
    VerificationFailed,
    /// Released without acting.
    Abandoned,
}

impl From<ReleaseOutcome> for pb::Outcome {
    fn from(outcome: ReleaseOutcome) -> Self {
        match outcome {
            ReleaseOutcome::Success => pb::Outcome::Success,
            ReleaseOutcome::Failed => pb::Outcome::Failed,
            ReleaseOutcome::VerificationFailed => pb::Outcome::VerificationFailed,
            ReleaseOutcome::Abandoned => pb::Outcome::Abandoned,
        }
    }
}

/// A class's mode as the CLI accepts it; the coordinator checks whether the class may have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Decide and record, never grant.
    Observe,
    /// Every grant waits for an operator's approval.
    Assist,
    /// Grant when admission passes.
    Autonomous,
}

impl ModeArg {
    fn as_str(self) -> &'static str {
        match self {
            ModeArg::Observe => "observe",
            ModeArg::Assist => "assist",
            ModeArg::Autonomous => "autonomous",
        }
    }
}

/// The start of an audit query: a duration before now, or a point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditSince {
    /// This long before now (`--since 10m`).
    Ago(Duration),
    /// This time (`--since 2024-05-01T12:00:00Z`).
    At(SystemTime),
}

impl AuditSince {
    /// Milliseconds since the Unix epoch, given the current time in the same unit.
    pub fn to_ms(self, now_ms: u64) -> u64 {
        match self {
            AuditSince::Ago(ago) => now_ms.saturating_sub(duration_ms(ago)),
            AuditSince::At(at) => system_time_ms(at),
        }
    }
}

/// A `--since` value that is neither a duration nor an RFC3339 time.
#[derive(Debug, thiserror::Error)]
#[error(
    "{value:?} is neither a duration nor an RFC3339 time; use a duration ago like 10m, 2h or \
     1h30m, or a UTC time like 2024-05-01T12:00:00Z"
)]
pub struct SinceError {
    value: String,
}

/// Parses `--since`: a humantime duration (`10m`, `2h30m`) or an RFC3339 UTC time.
pub fn parse_since(value: &str) -> Result<AuditSince, SinceError> {
    let trimmed = value.trim();
    if let Ok(ago) = humantime::parse_duration(trimmed) {
        return Ok(AuditSince::Ago(ago));
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(trimmed) {
        return Ok(AuditSince::At(at));
    }
    Err(SinceError {
        value: value.to_owned(),
    })
}

fn default_operator() -> String {
    operator_or_unknown(std::env::var("USER").ok())
}

fn operator_or_unknown(user: Option<String>) -> String {
    user.filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

// ----------------------------------------------------------------------------------- errors

/// What went wrong talking to the coordinator, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The TLS files are missing, unreadable, or incomplete.
    #[error("{0}")]
    Tls(String),
    /// No replica accepted a connection.
    #[error(
        "cannot reach the coordinator at {urls}: is `interlock serve` running? set --coordinator \
         or INTERLOCK_COORDINATOR ({causes})"
    )]
    Unreachable { urls: String, causes: String },
    /// Replicas answered, but none could serve the request (no leader, or shutting down).
    #[error(
        "no coordinator replica could serve the request ({causes}); wait a few seconds for a \
         leader to be elected and retry, or point --coordinator at the leader"
    )]
    NoLeader { causes: String },
    /// The server refused the request; its message says what to change.
    #[error("{0}")]
    Refused(String),
    /// The server did not answer in time.
    #[error(
        "the coordinator at {url} did not answer within {}: it may be overloaded or stuck; retry, \
         or check its logs ({message})",
        humantime::format_duration(REQUEST_TIMEOUT)
    )]
    Timeout { url: String, message: String },
    /// The server failed in a way the operator cannot fix by changing the request.
    #[error("the coordinator at {url} failed ({code:?}): {message}; check its logs")]
    Server {
        url: String,
        code: Code,
        message: String,
    },
    /// A `--coordinator` URL does not parse.
    #[error("{url:?} is not a coordinator URL ({cause}); use a form like {DEFAULT_COORDINATOR}")]
    BadUrl { url: String, cause: String },
    /// The operator name cannot travel in gRPC metadata.
    #[error(
        "operator name {0:?} cannot be sent in gRPC metadata; use printable ASCII in --operator \
         or INTERLOCK_OPERATOR"
    )]
    BadOperator(String),
    /// An acquire or approve reply carried no decision.
    #[error(
        "the coordinator answered without a decision; it may be a different version than this \
         CLI ({}), check with `interlock ping`", env!("CARGO_PKG_VERSION")
    )]
    NoDecision,
    /// The audit log's hash chain does not verify.
    #[error(
        "the audit hash chain is broken at {0}: records were altered or lost; keep a copy of the \
         log (`interlock audit -o json`) and investigate before trusting it"
    )]
    ChainBroken(String),
    /// Standard output is gone (for example a closed pipe).
    #[error("cannot write to standard output: {0}")]
    Stdout(#[from] std::io::Error),
}

/// Maps a server's status to the error the operator sees.
fn status_error(url: &str, status: &Status) -> CliError {
    let message = status.message().to_owned();
    match status.code() {
        // These come from validation and admission on the server and already say what to change.
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::OutOfRange
        | Code::Aborted
        | Code::ResourceExhausted => CliError::Refused(message),
        Code::DeadlineExceeded | Code::Cancelled => CliError::Timeout {
            url: url.to_owned(),
            message,
        },
        code => CliError::Server {
            url: url.to_owned(),
            code,
            message,
        },
    }
}

/// Where a replica's UNAVAILABLE answer says the leader is, as a URL (a bare `host:port` gets
/// `http://`). `None` when the key is absent, empty or not ASCII.
fn leader_hint(metadata: &MetadataMap) -> Option<String> {
    let raw = metadata.get(LEADER_METADATA_KEY)?.to_str().ok()?.trim();
    if raw.is_empty() {
        None
    } else if raw.contains("://") {
        Some(raw.to_owned())
    } else {
        Some(format!("http://{raw}"))
    }
}

/// The URL to retry at after `url` answered `status`: only for UNAVAILABLE carrying a leader
/// hint that names some other replica (a replica naming itself would loop).
fn redirect_target(url: &str, status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let leader = leader_hint(status.metadata())?;
    (leader.trim_end_matches('/') != url.trim_end_matches('/')).then_some(leader)
}

/// Renders an error with its sources (tonic's transport errors keep the cause there).
fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        // hyper and tonic wrap errors in layers that repeat the same words.
        let segment = cause.to_string();
        if segment != last {
            let _ = write!(text, ": {segment}");
            last = segment;
        }
        source = cause.source();
    }
    text
}

// ------------------------------------------------------------------------------- connection

/// The replicas to try, the operator's identity, and the channel that answered last.
struct Replicas {
    urls: Vec<String>,
    operator: AsciiMetadataValue,
    /// `Bearer <token>`, when --auth-token is given.
    token: Option<AsciiMetadataValue>,
    /// Mutual TLS, when --ca/--cert/--key are given.
    tls: Option<ClientTlsConfig>,
    /// Reused so `--watch` does not reconnect every second.
    preferred: Option<(String, Channel)>,
}

/// Why one replica could not serve a request.
enum Attempt {
    Unreachable(String),
    Unavailable(String),
}

impl Replicas {
    fn new(
        urls: &[String],
        operator: &str,
        token: Option<&str>,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Self, CliError> {
        let operator = AsciiMetadataValue::try_from(operator)
            .map_err(|_| CliError::BadOperator(operator.to_owned()))?;
        let token = token
            .map(|t| {
                AsciiMetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| CliError::Tls("the token must be printable ASCII".to_owned()))
            })
            .transpose()?;
        let urls: Vec<String> = urls
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(CliError::BadUrl {
                url: String::new(),
                cause: "no coordinator given".to_owned(),
            });
        }
        // A malformed URL is the operator's to fix; say so now rather than skip it silently.
        for url in &urls {
            endpoint(url, tls.as_ref())?;
        }
        Ok(Replicas {
            urls,
            operator,
            token,
            tls,
            preferred: None,
        })
    }

    /// Sends one request (built anew by `call` for each attempt) to the first replica that
    /// serves it: the last one that answered, then the replicas in order. A replica answering
    /// UNAVAILABLE with a leader hint is followed once to the leader. Other server errors end
    /// the call: the request reached a replica that judged it.
    async fn call<R, F, Fut>(&mut self, mut call: F) -> Result<(String, R), CliError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let mut candidates: Vec<(String, Option<Channel>)> = Vec::new();
        if let Some((url, channel)) = self.preferred.take() {
            candidates.push((url, Some(channel)));
        }
        for url in &self.urls {
            if !candidates.iter().any(|(u, _)| u == url) {
                candidates.push((url.clone(), None));
            }
        }
        let mut attempts: Vec<(String, Attempt)> = Vec::new();
        for (url, channel) in candidates {
            let channel = match channel {
                Some(channel) => channel,
                None => match connect(&url, self.tls.as_ref()).await {
                    Ok(channel) => channel,
                    Err(cause) => {
                        attempts.push((url, Attempt::Unreachable(cause)));
                        continue;
                    }
                },
            };
            let status = match call(channel.clone()).await {
                Ok(reply) => {
                    self.preferred = Some((url.clone(), channel));
                    return Ok((url, reply.into_inner()));
                }
                Err(status) if status.code() == Code::Unavailable => status,
                Err(status) => return Err(status_error(&url, &status)),
            };
            let redirect = redirect_target(&url, &status);
            attempts.push((url, Attempt::Unavailable(status.message().to_owned())));
            let Some(leader) = redirect else { continue };
            let channel = match connect(&leader, self.tls.as_ref()).await {
                Ok(channel) => channel,
                Err(cause) => {
                    attempts.push((leader, Attempt::Unreachable(cause)));
                    continue;
                }
            };
            match call(channel.clone()).await {
                Ok(reply) => {
                    self.preferred = Some((leader.clone(), channel));
                    return Ok((leader, reply.into_inner()));
                }
                Err(status) if status.code() == Code::Unavailable => {
                    attempts.push((leader, Attempt::Unavailable(status.message().to_owned())));
                }
                Err(status) => return Err(status_error(&leader, &status)),
            }
        }
        Err(exhausted(&attempts))
    }
}

/// The error after every replica failed: unreachable if none answered, else "no leader".
fn exhausted(attempts: &[(String, Attempt)]) -> CliError {
    let causes = attempts
        .iter()
        .map(|(url, attempt)| match attempt {
            Attempt::Unreachable(cause) => format!("{url}: {cause}"),
            Attempt::Unavailable(message) => format!("{url}: unavailable: {message}"),
        })
        .collect::<Vec<_>>()
        .join("; ");
    if attempts
        .iter()
        .all(|(_, a)| matches!(a, Attempt::Unreachable(_)))
    {
        let mut urls: Vec<&str> = attempts.iter().map(|(u, _)| u.as_str()).collect();
        urls.dedup();
        CliError::Unreachable {
            urls: urls.join(", "),
            causes,
        }
    } else {
        CliError::NoLeader { causes }
    }
}

/// An endpoint for one replica. The scheme must match the security: `https://` with a client
/// certificate, `http://` without (never silently plaintext when TLS was asked for).
fn endpoint(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, CliError> {
    let bad = |cause: &str| CliError::BadUrl {
        url: url.to_owned(),
        cause: cause.to_owned(),
    };
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map(|e| e.connect_timeout(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT))
        .map_err(|e| bad(&error_chain(&e)))?;
    match (url.starts_with("https://"), tls) {
        (true, Some(tls)) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| bad(&error_chain(&e))),
        (true, None) => Err(bad(
            "https:// needs your certificate: give --ca, --cert and --key (or INTERLOCK_CA, \
             INTERLOCK_CERT, INTERLOCK_KEY)",
        )),
        (false, Some(_)) => Err(bad(
            "--cert is given but the URL is not https://: use https:// so the certificate is used",
        )),
        (false, None) => Ok(endpoint),
    }
}

async fn connect(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel, String> {
    let endpoint = endpoint(url, tls).map_err(|e| e.to_string())?;
    // connect_timeout bounds the TCP connect; this also bounds the HTTP/2 handshake.
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!(
            "no connection within {}",
            humantime::format_duration(CONNECT_TIMEOUT)
        )),
    }
}

fn with_operator<T>(
    operator: &AsciiMetadataValue,
    token: Option<&AsciiMetadataValue>,
    message: T,
) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(OPERATOR_METADATA_KEY, operator.clone());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", token.clone());
    }
    request
}

/// One call through `Replicas::call`, with the operator's name attached to each attempt.
macro_rules! rpc {
    ($replicas:expr, $client:ident, $method:ident, $message:expr) => {{
        let operator = $replicas.operator.clone();
        let token = $replicas.token.clone();
        let message = $message;
        $replicas
            .call(move |channel| {
                let request = with_operator(&operator, token.as_ref(), message.clone());
                async move { $client::new(channel).$method(request).await }
            })
            .await
    }};
}

// ---------------------------------------------------------------------------------- running

/// Runs one operator command and returns the process's exit code: 0 ok; for `lease acquire`
/// and `approve` 0 granted, 3 denied, 4 pending, 5 observed; 1 for any error, which is printed
/// to stderr saying what to do. An `Err` is returned only if stderr itself cannot be written.
pub async fn run(args: &ClientArgs, cmd: OperatorCommand) -> anyhow::Result<ExitCode> {
    match execute(args, cmd).await {
        Ok(code) => Ok(code),
        Err(error) => {
            writeln!(std::io::stderr(), "interlock: {error}")?;
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The CLI's TLS config: mutual TLS from --ca/--cert/--key (all three or none), or with
/// --auth-token only --ca (the token is the credential).
fn client_tls(args: &ClientArgs) -> Result<Option<ClientTlsConfig>, CliError> {
    match (&args.ca, &args.cert, &args.key) {
        (None, None, None) if args.auth_token.is_some() => Err(CliError::Tls(
            "--auth-token is sent only over TLS: give --ca (the CA that signed the coordinator's \
             certificate) and an https:// URL"
                .to_owned(),
        )),
        (None, None, None) => Ok(None),
        (Some(ca), None, None) if args.auth_token.is_some() => {
            let pem = std::fs::read(ca)
                .map_err(|e| CliError::Tls(format!("cannot read {}: {e}", ca.display())))?;
            Ok(Some(ClientTlsConfig::new().ca_certificate(
                tonic::transport::Certificate::from_pem(pem),
            )))
        }
        (Some(_), Some(_), Some(_)) if args.auth_token.is_some() => Err(CliError::Tls(
            "give either a certificate (--cert/--key) or --auth-token, not both".to_owned(),
        )),
        (Some(ca), Some(cert), Some(key)) => TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }
        .client_config()
        .map(Some)
        .map_err(|e| CliError::Tls(e.to_string())),
        _ => Err(CliError::Tls(
            "give all of --ca, --cert and --key (or INTERLOCK_CA, INTERLOCK_CERT, INTERLOCK_KEY), \
             or none of them"
                .to_owned(),
        )),
    }
}

/// The replicas and credentials the client arguments name.
fn replicas(args: &ClientArgs) -> Result<Replicas, CliError> {
    Replicas::new(
        &args.coordinators,
        &args.operator,
        args.auth_token.as_deref(),
        client_tls(args)?,
    )
}

/// `interlock certs token --host H --ttl T`: asks the coordinator for a join token and prints
/// it (shown once; the coordinator keeps only its hash).
pub async fn join_token(args: &ClientArgs, host: &str, ttl: Duration) -> anyhow::Result<ExitCode> {
    let result = async {
        let mut replicas = replicas(args)?;
        let request = pb::CreateJoinTokenRequest {
            host_id: host.to_owned(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        };
        let (_, reply) = rpc!(replicas, OperatorClient, create_join_token, request)?;
        let value = json!({
            "host": host, "token": reply.token, "expires_at_ms": reply.expires_at_ms,
        });
        let text = format!(
            "{}\n(join token for host {host}: shown once, single use, expires in {}; enrol with \
             `interlock-agent enrol --config agent.toml --token <token>`)",
            reply.token,
            humantime::format_duration(ttl)
        );
        emit(args.output, &value, &text)?;
        Ok::<_, CliError>(())
    }
    .await;
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => {
            writeln!(std::io::stderr(), "interlock: {error}")?;
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn execute(args: &ClientArgs, cmd: OperatorCommand) -> Result<ExitCode, CliError> {
    let mut replicas = replicas(args)?;
    let format = args.output;
    match cmd {
        OperatorCommand::Status => {
            let (_, reply) = rpc!(replicas, OperatorClient, status, pb::StatusRequest {})?;
            emit(format, &status_json(&reply), &status_text(&reply))?;
        }
        OperatorCommand::Hosts => {
            let (_, reply) = rpc!(replicas, OperatorClient, hosts, pb::HostsRequest {})?;
            let now = now_ms();
            emit(format, &hosts_json(&reply), &hosts_text(&reply, now))?;
        }
        OperatorCommand::Leases { watch: false, .. } => {
            let (_, reply) = rpc!(replicas, OperatorClient, leases, pb::LeasesRequest {})?;
            let now = now_ms();
            emit(format, &leases_json(&reply), &leases_text(&reply, now))?;
        }
        OperatorCommand::Leases { watch: true, count } => {
            watch_leases(&mut replicas, format, count).await?;
        }
        OperatorCommand::Lease(lease) => return run_lease(&mut replicas, format, lease).await,
        OperatorCommand::Budgets => {
            let (_, reply) = rpc!(replicas, OperatorClient, budgets, pb::BudgetsRequest {})?;
            emit(format, &budgets_json(&reply), &budgets_text(&reply))?;
        }
        OperatorCommand::Freeze {
            class,
            revoke,
            reason,
        } => {
            let class = class.unwrap_or_default();
            let request = pb::FreezeRequest {
                class: class.clone(),
                reason,
                revoke,
            };
            let (_, reply) = rpc!(replicas, OperatorClient, freeze, request)?;
            let what = if class.is_empty() {
                "kill switch on: every class is frozen".to_owned()
            } else {
                format!("froze class {class}")
            };
            let text = if revoke {
                format!("{what}; revoked {} lease(s)\n", reply.revoked)
            } else {
                format!("{what}\n")
            };
            let json = json!({ "class": class, "revoke": revoke, "revoked": reply.revoked });
            emit(format, &json, &text)?;
        }
        OperatorCommand::Unfreeze {
            class,
            host,
            reason,
        } => {
            let class = class.unwrap_or_default();
            let host = host.unwrap_or_default();
            let request = pb::UnfreezeRequest {
                class: class.clone(),
                host: host.clone(),
                reason,
            };
            let (_, pb::UnfreezeReply {}) = rpc!(replicas, OperatorClient, unfreeze, request)?;
            let text = match (class.is_empty(), host.is_empty()) {
                (true, _) => "kill switch off\n".to_owned(),
                (false, true) => format!("unfroze class {class}\n"),
                (false, false) => format!("unblocked host {host} for class {class}\n"),
            };
            emit(format, &json!({ "class": class, "host": host }), &text)?;
        }
        OperatorCommand::Mode { class, mode } => {
            let request = pb::SetModeRequest {
                class: class.clone(),
                mode: mode.as_str().to_owned(),
            };
            let (_, reply) = rpc!(replicas, OperatorClient, set_mode, request)?;
            let text = format!(
                "class {class}: mode {} -> {}\n",
                or_dash(&reply.previous),
                mode.as_str()
            );
            let json = json!({ "class": class, "mode": mode.as_str(), "previous": reply.previous });
            emit(format, &json, &text)?;
        }
        OperatorCommand::Approvals => {
            let (_, reply) = rpc!(replicas, OperatorClient, approvals, pb::ApprovalsRequest {})?;
            let now = now_ms();
            emit(
                format,
                &approvals_json(&reply),
                &approvals_text(&reply, now),
            )?;
        }
        OperatorCommand::Approve { approval_id } => {
            let request = pb::ApproveRequest { approval_id };
            let (_, reply) = rpc!(replicas, OperatorClient, approve, request)?;
            return emit_decision(format, &reply, now_ms());
        }
        OperatorCommand::Deny {
            approval_id,
            reason,
        } => {
            let request = pb::RejectRequest {
                approval_id: approval_id.clone(),
                reason,
            };
            let (_, pb::RejectReply {}) = rpc!(replicas, OperatorClient, reject, request)?;
            let text = format!("rejected approval {approval_id}\n");
            emit(format, &json!({ "approval_id": approval_id }), &text)?;
        }
        OperatorCommand::Audit {
            since,
            class,
            host,
            limit,
        } => {
            let request = pb::AuditRequest {
                since_ms: since.map_or(0, |s| s.to_ms(now_ms())),
                class: class.unwrap_or_default(),
                host: host.unwrap_or_default(),
                limit: limit.unwrap_or(0),
            };
            let (_, reply) = rpc!(replicas, OperatorClient, audit, request)?;
            emit(format, &audit_json(&reply), &audit_text(&reply))?;
            if !reply.chain_ok {
                return Err(CliError::ChainBroken(
                    or_dash(&reply.chain_error).to_owned(),
                ));
            }
        }
        OperatorCommand::Ping => return ping(&replicas, args.output).await,
        OperatorCommand::Graph => {
            let (_, reply) = rpc!(replicas, OperatorClient, graph, pb::GraphRequest {})?;
            if format == OutputFormat::Dot {
                let mut stdout = std::io::stdout();
                write!(stdout, "{}", graph_dot(&reply))?;
                stdout.flush()?;
            } else {
                emit(format, &graph_json(&reply), &graph_text(&reply))?;
            }
        }
        OperatorCommand::Findings { host } => {
            let request = pb::FindingsRequest {
                host: host.unwrap_or_default(),
            };
            let (_, reply) = rpc!(replicas, OperatorClient, findings, request)?;
            emit(
                format,
                &findings_json(&reply),
                &findings_text(&reply, now_ms()),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_lease(
    replicas: &mut Replicas,
    format: OutputFormat,
    lease: LeaseCommand,
) -> Result<ExitCode, CliError> {
    match lease {
        LeaseCommand::Acquire {
            host,
            class,
            target,
            evidence,
            dry_run,
            hold,
        } => {
            let evidence = evidence.unwrap_or_else(|| {
                format!(
                    "acquired by hand by operator {}",
                    replicas.operator.to_str().unwrap_or("unknown")
                )
            });
            let request = pb::AcquireRequest {
                host_id: host,
                class,
                target,
                evidence,
                dry_run,
            };
            let (_, reply) = rpc!(replicas, AgentClient, acquire, request)?;
            let code = emit_decision(format, &reply, now_ms())?;
            match (&reply.outcome, hold) {
                (Some(acquire_reply::Outcome::Granted(granted)), true) => {
                    hold_lease(replicas, granted).await?;
                    Ok(code)
                }
                _ => Ok(code),
            }
        }
        LeaseCommand::Release {
            lease_id,
            token,
            outcome,
            detail,
        } => {
            let wire_outcome = pb::Outcome::from(outcome);
            let request = pb::ReleaseRequest {
                lease_id: lease_id.clone(),
                token,
                outcome: wire_outcome.into(),
                detail: detail.unwrap_or_default(),
            };
            let (_, pb::ReleaseReply {}) = rpc!(replicas, AgentClient, release, request)?;
            let outcome_name = outcome_name(wire_outcome);
            let text = format!("released lease {lease_id} token {token} ({outcome_name})\n");
            let json = json!({ "lease_id": lease_id, "token": token, "outcome": outcome_name });
            emit(format, &json, &text)?;
            Ok(ExitCode::SUCCESS)
        }
        LeaseCommand::Revoke { lease_id, reason } => {
            let request = pb::RevokeRequest {
                lease_id: lease_id.clone(),
                reason,
            };
            let (_, pb::RevokeReply {}) = rpc!(replicas, OperatorClient, revoke, request)?;
            let text = format!("revoked lease {lease_id}\n");
            emit(format, &json!({ "lease_id": lease_id }), &text)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Redraws the lease table every second until Ctrl-C or `count` refreshes. A failed refresh
/// after the first is reported and retried: watching is most useful while replicas fail over.
async fn watch_leases(
    replicas: &mut Replicas,
    format: OutputFormat,
    count: Option<u32>,
) -> Result<(), CliError> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let clear_screen = format == OutputFormat::Table && std::io::stdout().is_terminal();
    let mut refresh: u32 = 0;
    loop {
        refresh = refresh.saturating_add(1);
        let fetched = tokio::select! {
            _ = &mut ctrl_c => break,
            fetched = async { rpc!(replicas, OperatorClient, leases, pb::LeasesRequest {}) } => fetched,
        };
        match fetched {
            Ok((url, reply)) => {
                let now = now_ms();
                let mut stdout = std::io::stdout();
                match format {
                    OutputFormat::Json => writeln!(stdout, "{}", leases_json(&reply))?,
                    OutputFormat::Dot => {
                        return Err(CliError::Refused(
                            "`-o dot` is only for `interlock graph`; use `-o table` or `-o json`"
                                .into(),
                        ));
                    }
                    OutputFormat::Table => {
                        if clear_screen {
                            write!(stdout, "\x1b[2J\x1b[H")?;
                        }
                        let progress = count.map_or_else(
                            || format!("refresh {refresh}"),
                            |c| format!("refresh {refresh}/{c}"),
                        );
                        write!(
                            stdout,
                            "leases at {} from {url} ({progress}; Ctrl-C to stop)\n{}\n",
                            rfc3339(now),
                            leases_text(&reply, now)
                        )?;
                    }
                }
                stdout.flush()?;
            }
            Err(error) if refresh == 1 => return Err(error),
            Err(error) => {
                let _ = writeln!(std::io::stderr(), "interlock: refresh failed: {error}");
            }
        }
        if count.is_some_and(|c| refresh >= c) {
            break;
        }
        tokio::select! {
            _ = &mut ctrl_c => break,
            () = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
    }
    Ok(())
}

/// Pings every replica (not only the first that answers): the operator wants to see them all.
async fn ping(replicas: &Replicas, format: OutputFormat) -> Result<ExitCode, CliError> {
    let caller = replicas.operator.to_str().unwrap_or("unknown").to_owned();
    let mut rows: Vec<(String, Result<pb::PingReply, String>)> = Vec::new();
    for url in &replicas.urls {
        let answer = match connect(url, replicas.tls.as_ref()).await {
            Ok(channel) => {
                let request = with_operator(
                    &replicas.operator,
                    replicas.token.as_ref(),
                    pb::PingRequest {
                        caller: caller.clone(),
                    },
                );
                CoordinatorClient::new(channel)
                    .ping(request)
                    .await
                    .map(Response::into_inner)
                    .map_err(|status| status_error(url, &status).to_string())
            }
            Err(cause) => Err(cause),
        };
        rows.push((url.clone(), answer));
    }
    emit(format, &ping_json(&rows), &ping_text(&rows))?;
    if rows.iter().any(|(_, answer)| answer.is_ok()) {
        Ok(ExitCode::SUCCESS)
    } else {
        let attempts: Vec<(String, Attempt)> = rows
            .into_iter()
            .filter_map(|(url, answer)| answer.err().map(|e| (url, Attempt::Unreachable(e))))
            .collect();
        Err(exhausted(&attempts))
    }
}

/// Renews a granted lease until Ctrl-C or SIGTERM, then releases it. Stops (exit 1) as soon as
/// a renewal is refused: the lease is gone and the holder must stop working under it.
async fn hold_lease(replicas: &mut Replicas, granted: &pb::Granted) -> Result<(), CliError> {
    let period = Duration::from_millis((granted.ttl_ms / 3).max(200));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {
                let request = pb::RenewRequest {
                    lease_id: granted.lease_id.clone(),
                    token: granted.token,
                };
                rpc!(replicas, AgentClient, renew, request)?;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    let request = pb::ReleaseRequest {
        lease_id: granted.lease_id.clone(),
        token: granted.token,
        outcome: pb::Outcome::Abandoned as i32,
        detail: "released by `interlock lease acquire --hold`".into(),
    };
    rpc!(replicas, AgentClient, release, request)?;
    writeln!(std::io::stderr(), "released lease {}", granted.lease_id)?;
    Ok(())
}

fn emit_decision(
    format: OutputFormat,
    reply: &pb::AcquireReply,
    now_ms: u64,
) -> Result<ExitCode, CliError> {
    let decision = Decision::of_reply(reply)?;
    emit(
        format,
        &acquire_json(reply),
        &format!("{}\n", decision_line(reply, now_ms)),
    )?;
    Ok(ExitCode::from(decision.exit_code()))
}

fn emit(format: OutputFormat, json: &Value, text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout();
    match format {
        OutputFormat::Json => {
            let pretty = serde_json::to_string_pretty(json).unwrap_or_else(|_| json.to_string());
            writeln!(stdout, "{pretty}")?;
        }
        OutputFormat::Table => write!(stdout, "{text}")?,
        OutputFormat::Dot => {
            return Err(CliError::Refused(
                "`-o dot` is only for `interlock graph`; use `-o table` or `-o json`".into(),
            ));
        }
    }
    stdout.flush()?;
    Ok(())
}

fn graph_json(reply: &pb::GraphReply) -> Value {
    let edges: Vec<Value> = reply
        .edges
        .iter()
        .map(|e| {
            json!({
                "from_service": e.from_service, "from_host": e.from_host, "process": e.process,
                "to": e.to, "connects_per_s": e.connects_per_s, "failures_per_s": e.failures_per_s,
                "retransmits_per_s": e.retransmits_per_s, "bytes_per_s": e.bytes_per_s,
                "reported_at_ms": e.reported_at_ms,
            })
        })
        .collect();
    json!({ "edges": edges })
}

fn graph_text(reply: &pb::GraphReply) -> String {
    if reply.edges.is_empty() {
        return "no flow edges reported (agents report every 10 s)\n".to_owned();
    }
    let mut table = Table::new(&[
        "SERVICE",
        "HOST",
        "PROCESS",
        "REMOTE",
        "CONN/S",
        "FAIL/S",
        "RETRANS/S",
        "BYTES/S",
    ]);
    for e in &reply.edges {
        table.row(vec![
            or_dash(&e.from_service).to_owned(),
            e.from_host.clone(),
            or_dash(&e.process).to_owned(),
            e.to.clone(),
            format!("{:.2}", e.connects_per_s),
            format!("{:.2}", e.failures_per_s),
            format!("{:.2}", e.retransmits_per_s),
            format!("{:.0}", e.bytes_per_s),
        ]);
    }
    table.render()
}

/// Graphviz: one node per service (or host when it has none) and per remote endpoint; edges
/// labelled with their rates, red where connections fail.
fn graph_dot(reply: &pb::GraphReply) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = String::from("digraph interlock {\n  rankdir=LR;\n");
    for e in &reply.edges {
        let from = if e.from_service.is_empty() {
            &e.from_host
        } else {
            &e.from_service
        };
        let color = if e.failures_per_s > 0.0 {
            "red"
        } else {
            "black"
        };
        out.push_str(&format!(
            "  {} -> {} [label={}, color={color}];\n",
            quote(from),
            quote(&e.to),
            quote(&format!(
                "{} {:.1} conn/s {:.1} fail/s",
                e.process, e.connects_per_s, e.failures_per_s
            )),
        ));
    }
    out.push_str("}\n");
    out
}

fn findings_json(reply: &pb::FindingsReply) -> Value {
    let findings: Vec<Value> = reply
        .findings
        .iter()
        .map(|r| {
            let f = r.finding.clone().unwrap_or_default();
            json!({
                "host_id": r.host_id, "id": f.id, "detector": f.detector, "target": f.target,
                "summary": f.summary, "evidence_json": f.evidence_json, "since_ms": f.since_ms,
                "reported_at_ms": r.reported_at_ms,
            })
        })
        .collect();
    json!({ "findings": findings })
}

fn findings_text(reply: &pb::FindingsReply, now_ms: u64) -> String {
    if reply.findings.is_empty() {
        return "no findings reported\n".to_owned();
    }
    let mut table = Table::new(&["HOST", "DETECTOR", "TARGET", "REPORTED", "SUMMARY"]);
    for r in &reply.findings {
        let f = r.finding.clone().unwrap_or_default();
        table.row(vec![
            r.host_id.clone(),
            f.detector,
            f.target,
            when(now_ms, r.reported_at_ms),
            f.summary,
        ]);
    }
    table.render()
}

fn now_ms() -> u64 {
    system_time_ms(SystemTime::now())
}

// -------------------------------------------------------------------------------- decisions

/// The kind of answer to `lease acquire` and `approve`, which decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Granted,
    Denied,
    Pending,
    Observed,
}

impl Decision {
    /// The decision an acquire or approve reply carries; an error if it carries none.
    fn of_reply(reply: &pb::AcquireReply) -> Result<Self, CliError> {
        reply
            .outcome
            .as_ref()
            .map(Decision::of)
            .ok_or(CliError::NoDecision)
    }

    fn of(outcome: &acquire_reply::Outcome) -> Self {
        match outcome {
            acquire_reply::Outcome::Granted(_) => Decision::Granted,
            acquire_reply::Outcome::Denied(_) => Decision::Denied,
            acquire_reply::Outcome::Pending(_) => Decision::Pending,
            acquire_reply::Outcome::Observed(_) => Decision::Observed,
        }
    }

    /// Scripts branch on these; they are part of the CLI's interface.
    fn exit_code(self) -> u8 {
        match self {
            Decision::Granted => 0,
            Decision::Denied => 3,
            Decision::Pending => 4,
            Decision::Observed => 5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Decision::Granted => "granted",
            Decision::Denied => "denied",
            Decision::Pending => "pending",
            Decision::Observed => "observed",
        }
    }
}

/// One line for people: "granted lease L token 123 ttl 30s", "denied by cap: …", etc.
fn decision_line(reply: &pb::AcquireReply, now_ms: u64) -> String {
    let line = match &reply.outcome {
        None => "no decision".to_owned(),
        Some(acquire_reply::Outcome::Granted(g)) if reply.dry_run => {
            format!("would grant with ttl {}", window(g.ttl_ms))
        }
        Some(acquire_reply::Outcome::Granted(g)) => {
            let mut line = format!(
                "granted lease {} token {} ttl {}",
                g.lease_id,
                g.token,
                window(g.ttl_ms)
            );
            if !g.approver.is_empty() {
                let _ = write!(line, " (approved by {})", g.approver);
            }
            line
        }
        Some(acquire_reply::Outcome::Denied(d)) => {
            format!("denied by {}: {}", or_dash(&d.check), d.reason)
        }
        Some(acquire_reply::Outcome::Pending(p)) => format!(
            "pending approval {} (expires {}, in {})",
            or_dash(&p.approval_id),
            rfc3339(p.expires_at_ms),
            expires_in(remaining_ms(now_ms, p.expires_at_ms))
        ),
        Some(acquire_reply::Outcome::Observed(o)) if o.would_grant => {
            "observed: would grant".to_owned()
        }
        Some(acquire_reply::Outcome::Observed(o)) => {
            format!(
                "observed: would deny by {}: {}",
                or_dash(&o.check),
                o.reason
            )
        }
    };
    if reply.dry_run {
        format!("dry run (nothing was written): {line}")
    } else {
        line
    }
}

fn outcome_name(outcome: pb::Outcome) -> &'static str {
    match outcome {
        pb::Outcome::Unspecified => "unspecified",
        pb::Outcome::Success => "success",
        pb::Outcome::Failed => "failed",
        pb::Outcome::VerificationFailed => "verification_failed",
        pb::Outcome::Abandoned => "abandoned",
        pb::Outcome::Interrupted => "interrupted",
    }
}

// --------------------------------------------------------------------------- table printer

/// Aligned columns separated by two spaces; the last column is not padded.
#[derive(Debug)]
struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&'static str]) -> Self {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for line in std::iter::once(&header).chain(&self.rows) {
            for (width, cell) in widths.iter_mut().zip(line) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&header).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map_or("", String::as_str);
                if i + 1 == columns {
                    text.push_str(cell);
                } else {
                    let _ = write!(text, "{cell:<width$}  ");
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------- time helpers

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn system_time_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, duration_ms)
}

/// RFC3339 (UTC, seconds) of a `*_ms` time; "-" for 0, which the API uses for "unset".
fn rfc3339(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A `*_ms` time as JSON: `{"<name>_ms": ms, "<name>": "RFC3339" | null}` entries.
fn time_fields(object: &mut serde_json::Map<String, Value>, name: &str, ms: u64) {
    object.insert(format!("{name}_ms"), json!(ms));
    let text = if ms == 0 {
        Value::Null
    } else {
        json!(rfc3339(ms))
    };
    object.insert(name.to_owned(), text);
}

/// Signed milliseconds from `now_ms` until `at_ms` (negative when it has passed).
fn remaining_ms(now_ms: u64, at_ms: u64) -> i64 {
    let delta = i128::from(at_ms) - i128::from(now_ms);
    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX })
}

/// A coarse duration: "12s", "4m12s", "3h4m", "2d3h".
fn compact(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// Time left: "4.2s" under a minute, then "1m14s"; "expired" once it has passed.
fn expires_in(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(0) | Err(_) => "expired".to_owned(),
        Ok(ms) if ms < 60_000 => format!("{}.{}s", ms / 1000, ms % 1000 / 100),
        Ok(ms) => compact(ms),
    }
}

/// When something happened: "12s ago" within the last hour, an RFC3339 time before that.
fn when(now_ms: u64, at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".to_owned();
    }
    let age = now_ms.saturating_sub(at_ms);
    if age < RELATIVE_TIME_LIMIT_MS {
        format!("{} ago", compact(age))
    } else {
        rfc3339(at_ms)
    }
}

/// A configured length ("30s", "1h 30m"); "-" when unset.
fn window(ms: u64) -> String {
    if ms == 0 {
        "-".to_owned()
    } else {
        humantime::format_duration(Duration::from_millis(ms)).to_string()
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

// ------------------------------------------------------------------------------- rendering

fn freeze_json(freeze: &pb::FreezeInfo) -> Value {
    let pb::FreezeInfo {
        scope,
        class,
        host,
        reason,
        owner,
        since_ms,
        cause,
    } = freeze;
    let mut object = serde_json::Map::new();
    object.insert("scope".into(), json!(scope));
    object.insert("class".into(), json!(class));
    object.insert("host".into(), json!(host));
    object.insert("reason".into(), json!(reason));
    object.insert("owner".into(), json!(owner));
    time_fields(&mut object, "since", *since_ms);
    object.insert("cause".into(), json!(cause));
    Value::Object(object)
}

/// "no", or each freeze as "yes (alice)" / "host web-3 (host_budget)" / "kill switch (bob)".
fn freeze_summary(freezes: &[pb::FreezeInfo]) -> String {
    if freezes.is_empty() {
        return "no".to_owned();
    }
    freezes
        .iter()
        .map(|f| {
            let what = match f.scope.as_str() {
                "all" => "kill switch".to_owned(),
                "host" => format!("host {}", or_dash(&f.host)),
                _ => "yes".to_owned(),
            };
            let by = if f.cause.is_empty() || f.cause == "operator" {
                or_dash(&f.owner)
            } else {
                f.cause.as_str()
            };
            format!("{what} ({by})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn status_json(reply: &pb::StatusReply) -> Value {
    let classes: Vec<Value> = reply
        .classes
        .iter()
        .map(|c| {
            let scopes: Vec<Value> = c
                .scopes
                .iter()
                .map(|s| {
                    json!({
                        "service": s.service,
                        "holders": s.holders,
                        "cap": s.cap,
                        "live_hosts": s.live_hosts,
                    })
                })
                .collect();
            json!({
                "class": c.class,
                "tier": c.tier,
                "mode": c.mode,
                "freezes": c.freezes.iter().map(freeze_json).collect::<Vec<_>>(),
                "scopes": scopes,
                "fleet_budget_used": c.fleet_budget_used,
                "fleet_budget_max": c.fleet_budget_max,
                "budget_window_ms": c.budget_window_ms,
                "pending_approvals": c.pending_approvals,
                "waiting_on": c.waiting_on,
            })
        })
        .collect();
    json!({
        "leader": reply.leader,
        "leader_addr": reply.leader_addr,
        "store": reply.store,
        "policy": reply.policy,
        "kill_switch": reply.kill_switch.as_ref().map(freeze_json),
        "classes": classes,
        "live_hosts": reply.live_hosts,
        "active_leases": reply.active_leases,
        "insecure": reply.insecure,
    })
}

fn status_text(reply: &pb::StatusReply) -> String {
    let leader = match (reply.leader, reply.leader_addr.is_empty()) {
        (true, true) => "yes".to_owned(),
        (true, false) => format!("yes ({})", reply.leader_addr),
        (false, true) => "no; no leader is known".to_owned(),
        (false, false) => format!("no; the leader is {}", reply.leader_addr),
    };
    let kill_switch = match &reply.kill_switch {
        None => "off".to_owned(),
        Some(f) => format!(
            "ON since {} by {}: {}",
            rfc3339(f.since_ms),
            or_dash(&f.owner),
            f.reason
        ),
    };
    let mut out = String::new();
    let _ = writeln!(out, "leader:      {leader}");
    let _ = writeln!(out, "store:       {}", or_dash(&reply.store));
    let _ = writeln!(
        out,
        "security:    {}",
        if reply.insecure {
            "INSECURE: plaintext, self-asserted identities (--insecure)"
        } else {
            "mutual TLS, identities from certificates"
        }
    );
    let _ = writeln!(out, "policy:      {}", or_dash(&reply.policy));
    let _ = writeln!(out, "kill switch: {kill_switch}");
    let _ = writeln!(
        out,
        "fleet:       {} live host(s), {} active lease(s)",
        reply.live_hosts, reply.active_leases
    );
    out.push('\n');
    let mut table = Table::new(&[
        "CLASS",
        "TIER",
        "MODE",
        "FROZEN",
        "LEASES",
        "BUDGET",
        "PENDING",
        "WAITING ON",
    ]);
    for c in &reply.classes {
        let leases = if c.scopes.is_empty() {
            "-".to_owned()
        } else {
            c.scopes
                .iter()
                .map(|s| format!("{} {}/{}", or_dash(&s.service), s.holders, s.cap))
                .collect::<Vec<_>>()
                .join(", ")
        };
        table.row(vec![
            c.class.clone(),
            or_dash(&c.tier).to_owned(),
            or_dash(&c.mode).to_owned(),
            freeze_summary(&c.freezes),
            leases,
            format!(
                "{}/{} per {}",
                c.fleet_budget_used,
                c.fleet_budget_max,
                window(c.budget_window_ms)
            ),
            c.pending_approvals.to_string(),
            or_dash(&c.waiting_on).to_owned(),
        ]);
    }
    out.push_str(&table.render());
    out
}

fn hosts_json(reply: &pb::HostsReply) -> Value {
    let hosts: Vec<Value> = reply
        .hosts
        .iter()
        .map(|h| {
            let labels: BTreeMap<&str, &str> = h
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let mut object = serde_json::Map::new();
            object.insert("host_id".into(), json!(h.host_id));
            object.insert("labels".into(), json!(labels));
            time_fields(&mut object, "registered_at", h.registered_at_ms);
            object.insert("findings".into(), json!(h.findings));
            Value::Object(object)
        })
        .collect();
    json!({ "hosts": hosts })
}

fn hosts_text(reply: &pb::HostsReply, now_ms: u64) -> String {
    if reply.hosts.is_empty() {
        return "no registered hosts\n".to_owned();
    }
    let mut table = Table::new(&["HOST", "SERVICE", "LABELS", "REGISTERED", "FINDINGS"]);
    for h in &reply.hosts {
        let labels: BTreeMap<&str, &str> = h
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != "service")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        table.row(vec![
            h.host_id.clone(),
            h.labels
                .get("service")
                .map_or("-", |s| s.as_str())
                .to_owned(),
            or_dash(&labels).to_owned(),
            when(now_ms, h.registered_at_ms),
            h.findings.to_string(),
        ]);
    }
    table.render()
}

fn leases_json(reply: &pb::LeasesReply) -> Value {
    let leases: Vec<Value> = reply
        .leases
        .iter()
        .map(|l| {
            let mut object = serde_json::Map::new();
            object.insert("lease_id".into(), json!(l.lease_id));
            object.insert("token".into(), json!(l.token));
            object.insert("host_id".into(), json!(l.host_id));
            object.insert("class".into(), json!(l.class));
            object.insert("service".into(), json!(l.service));
            object.insert("target".into(), json!(l.target));
            time_fields(&mut object, "granted_at", l.granted_at_ms);
            object.insert("ttl_ms".into(), json!(l.ttl_ms));
            object.insert("expires_in_ms".into(), json!(l.expires_in_ms));
            object.insert("approver".into(), json!(l.approver));
            Value::Object(object)
        })
        .collect();
    json!({ "leases": leases })
}

fn leases_text(reply: &pb::LeasesReply, now_ms: u64) -> String {
    if reply.leases.is_empty() {
        return "no active leases\n".to_owned();
    }
    let mut table = Table::new(&[
        "LEASE",
        "HOLDER",
        "CLASS",
        "SERVICE",
        "TARGET",
        "TOKEN",
        "GRANTED",
        "EXPIRES IN",
    ]);
    for l in &reply.leases {
        table.row(vec![
            l.lease_id.clone(),
            l.host_id.clone(),
            l.class.clone(),
            or_dash(&l.service).to_owned(),
            or_dash(&l.target).to_owned(),
            l.token.to_string(),
            when(now_ms, l.granted_at_ms),
            expires_in(l.expires_in_ms),
        ]);
    }
    table.render()
}

fn budgets_json(reply: &pb::BudgetsReply) -> Value {
    let budgets: Vec<Value> = reply
        .budgets
        .iter()
        .map(|b| {
            let hosts: Vec<Value> = b
                .hosts
                .iter()
                .map(|h| {
                    json!({
                        "host_id": h.host_id,
                        "used": h.used,
                        "max": h.max,
                        "blocked": h.blocked,
                    })
                })
                .collect();
            json!({
                "class": b.class,
                "fleet_used": b.fleet_used,
                "fleet_max": b.fleet_max,
                "fleet_window_ms": b.fleet_window_ms,
                "host_max": b.host_max,
                "host_window_ms": b.host_window_ms,
                "hosts": hosts,
                "frozen": b.frozen,
            })
        })
        .collect();
    json!({ "budgets": budgets })
}

fn budgets_text(reply: &pb::BudgetsReply) -> String {
    if reply.budgets.is_empty() {
        return "no action classes\n".to_owned();
    }
    let mut table = Table::new(&["CLASS", "FLEET", "PER HOST", "FROZEN", "HOSTS"]);
    for b in &reply.budgets {
        let hosts: Vec<String> = b
            .hosts
            .iter()
            .filter(|h| h.used > 0 || h.blocked)
            .map(|h| {
                let blocked = if h.blocked { " blocked" } else { "" };
                format!("{} {}/{}{blocked}", h.host_id, h.used, h.max)
            })
            .collect();
        table.row(vec![
            b.class.clone(),
            format!(
                "{}/{} per {}",
                b.fleet_used,
                b.fleet_max,
                window(b.fleet_window_ms)
            ),
            format!("{} per {}", b.host_max, window(b.host_window_ms)),
            if b.frozen { "yes" } else { "no" }.to_owned(),
            if hosts.is_empty() {
                "-".to_owned()
            } else {
                hosts.join(", ")
            },
        ]);
    }
    table.render()
}

fn approvals_json(reply: &pb::ApprovalsReply) -> Value {
    let approvals: Vec<Value> = reply
        .approvals
        .iter()
        .map(|a| {
            let mut object = serde_json::Map::new();
            object.insert("approval_id".into(), json!(a.approval_id));
            object.insert("host_id".into(), json!(a.host_id));
            object.insert("class".into(), json!(a.class));
            object.insert("target".into(), json!(a.target));
            object.insert("evidence".into(), json!(a.evidence));
            time_fields(&mut object, "requested_at", a.requested_at_ms);
            time_fields(&mut object, "expires_at", a.expires_at_ms);
            Value::Object(object)
        })
        .collect();
    json!({ "approvals": approvals })
}

fn approvals_text(reply: &pb::ApprovalsReply, now_ms: u64) -> String {
    if reply.approvals.is_empty() {
        return "no pending approvals\n".to_owned();
    }
    let mut table = Table::new(&[
        "APPROVAL",
        "HOST",
        "CLASS",
        "TARGET",
        "REQUESTED",
        "EXPIRES IN",
        "EVIDENCE",
    ]);
    for a in &reply.approvals {
        table.row(vec![
            a.approval_id.clone(),
            a.host_id.clone(),
            a.class.clone(),
            or_dash(&a.target).to_owned(),
            when(now_ms, a.requested_at_ms),
            expires_in(remaining_ms(now_ms, a.expires_at_ms)),
            or_dash(&a.evidence).to_owned(),
        ]);
    }
    table.render()
}

fn acquire_json(reply: &pb::AcquireReply) -> Value {
    let mut object = serde_json::Map::new();
    let decision = reply.outcome.as_ref().map(|o| Decision::of(o).name());
    object.insert("outcome".into(), json!(decision));
    object.insert("dry_run".into(), json!(reply.dry_run));
    match &reply.outcome {
        None => {}
        Some(acquire_reply::Outcome::Granted(g)) => {
            let mut granted = serde_json::Map::new();
            granted.insert("lease_id".into(), json!(g.lease_id));
            granted.insert("token".into(), json!(g.token));
            granted.insert("ttl_ms".into(), json!(g.ttl_ms));
            granted.insert(
                "verification_window_ms".into(),
                json!(g.verification_window_ms),
            );
            time_fields(&mut granted, "granted_at", g.granted_at_ms);
            granted.insert("approver".into(), json!(g.approver));
            object.insert("granted".into(), Value::Object(granted));
        }
        Some(acquire_reply::Outcome::Denied(d)) => {
            object.insert(
                "denied".into(),
                json!({ "check": d.check, "reason": d.reason }),
            );
        }
        Some(acquire_reply::Outcome::Pending(p)) => {
            let mut pending = serde_json::Map::new();
            pending.insert("approval_id".into(), json!(p.approval_id));
            time_fields(&mut pending, "expires_at", p.expires_at_ms);
            object.insert("pending".into(), Value::Object(pending));
        }
        Some(acquire_reply::Outcome::Observed(o)) => {
            object.insert(
                "observed".into(),
                json!({ "would_grant": o.would_grant, "check": o.check, "reason": o.reason }),
            );
        }
    }
    Value::Object(object)
}

fn audit_json(reply: &pb::AuditReply) -> Value {
    let records: Vec<Value> = reply
        .records
        .iter()
        .map(|r| {
            let mut object = serde_json::Map::new();
            object.insert("seq".into(), json!(r.seq));
            time_fields(&mut object, "at", r.at_ms);
            object.insert("kind".into(), json!(r.kind));
            object.insert("owner".into(), json!(r.owner));
            object.insert("class".into(), json!(r.class));
            object.insert("host".into(), json!(r.host));
            object.insert("target".into(), json!(r.target));
            object.insert("lease_id".into(), json!(r.lease_id));
            object.insert("token".into(), json!(r.token));
            object.insert("reason".into(), json!(r.reason));
            object.insert("detail_json".into(), json!(r.detail_json));
            // The detail parsed, when it is JSON, so scripts need not decode a string in a string.
            if let Ok(detail) = serde_json::from_str::<Value>(&r.detail_json) {
                object.insert("detail".into(), detail);
            }
            object.insert("prev_hash".into(), json!(r.prev_hash));
            object.insert("hash".into(), json!(r.hash));
            Value::Object(object)
        })
        .collect();
    json!({
        "records": records,
        "chain_ok": reply.chain_ok,
        "chain_error": reply.chain_error,
    })
}

fn audit_text(reply: &pb::AuditReply) -> String {
    let mut out = if reply.records.is_empty() {
        "no audit records match\n".to_owned()
    } else {
        let mut table = Table::new(&[
            "SEQ", "TIME", "KIND", "OWNER", "CLASS", "HOST", "TARGET", "TOKEN", "REASON",
        ]);
        for r in &reply.records {
            table.row(vec![
                r.seq.to_string(),
                rfc3339(r.at_ms),
                r.kind.clone(),
                or_dash(&r.owner).to_owned(),
                or_dash(&r.class).to_owned(),
                or_dash(&r.host).to_owned(),
                or_dash(&r.target).to_owned(),
                if r.token == 0 {
                    "-".to_owned()
                } else {
                    r.token.to_string()
                },
                or_dash(&r.reason).to_owned(),
            ]);
        }
        table.render()
    };
    out.push_str(&chain_line(reply));
    out
}

fn chain_line(reply: &pb::AuditReply) -> String {
    if reply.chain_ok {
        "chain: verified\n".to_owned()
    } else {
        format!("chain: BROKEN at {}\n", or_dash(&reply.chain_error))
    }
}

fn ping_json(rows: &[(String, Result<pb::PingReply, String>)]) -> Value {
    let replicas: Vec<Value> = rows
        .iter()
        .map(|(url, answer)| match answer {
            Ok(p) => json!({
                "url": url,
                "version": p.version,
                "store": p.store,
                "caller": p.caller,
                "leader": p.leader,
                "leader_addr": p.leader_addr,
                "error": null,
            }),
            Err(error) => json!({ "url": url, "error": error }),
        })
        .collect();
    json!({ "replicas": replicas })
}

fn ping_text(rows: &[(String, Result<pb::PingReply, String>)]) -> String {
    let mut table = Table::new(&["COORDINATOR", "VERSION", "STORE", "LEADER", "ERROR"]);
    for (url, answer) in rows {
        table.row(match answer {
            Ok(p) => vec![
                url.clone(),
                p.version.clone(),
                or_dash(&p.store).to_owned(),
                match (p.leader, p.leader_addr.is_empty()) {
                    (true, _) => "yes".to_owned(),
                    (false, true) => "no (none known)".to_owned(),
                    (false, false) => format!("no ({})", p.leader_addr),
                },
                "-".to_owned(),
            ],
            Err(error) => vec![
                url.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                error.clone(),
            ],
        });
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory as _, Parser};

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: OperatorCommand,
    }

    fn reply(outcome: acquire_reply::Outcome) -> pb::AcquireReply {
        pb::AcquireReply {
            outcome: Some(outcome),
            dry_run: false,
        }
    }

    #[test]
    fn table_printer_aligns_columns_and_does_not_pad_the_last() {
        let mut table = Table::new(&["A", "LONG HEADER", "Z"]);
        table.row(vec!["wide cell".into(), "x".into(), "last".into()]);
        table.row(vec!["é".into(), "".into(), "".into()]);
        let rendered = table.render();
        assert_eq!(
            rendered,
            "A          LONG HEADER  Z\n\
             wide cell  x            last\n\
             é\n"
        );
        // Every non-empty cell of a column starts at the same character offset.
        let lines: Vec<&str> = rendered.lines().collect();
        let column_of = |line: &str, cell: &str| line.find(cell).map(|b| line[..b].chars().count());
        assert_eq!(column_of(lines[0], "LONG"), column_of(lines[1], "x"));
        assert_eq!(column_of(lines[0], "Z"), column_of(lines[1], "last"));
    }

    #[test]
    fn table_printer_fills_short_rows_with_empty_cells() {
        let mut table = Table::new(&["A", "B"]);
        table.row(vec!["1".into()]);
        table.row(vec!["22".into(), "b".into()]);
        assert_eq!(table.render(), "A   B\n1\n22  b\n");
    }

    #[test]
    fn decisions_map_to_documented_exit_codes() {
        let cases = [
            (
                acquire_reply::Outcome::Granted(pb::Granted::default()),
                Decision::Granted,
                0,
            ),
            (
                acquire_reply::Outcome::Denied(pb::Denied::default()),
                Decision::Denied,
                3,
            ),
            (
                acquire_reply::Outcome::Pending(pb::Pending::default()),
                Decision::Pending,
                4,
            ),
            (
                acquire_reply::Outcome::Observed(pb::Observed::default()),
                Decision::Observed,
                5,
            ),
        ];
        for (outcome, decision, code) in cases {
            assert_eq!(Decision::of(&outcome), decision);
            assert_eq!(decision.exit_code(), code, "{decision:?}");
        }
    }

    #[test]
    fn dry_run_exit_code_follows_the_reported_decision_and_no_decision_is_an_error() {
        let mut denied = reply(acquire_reply::Outcome::Denied(pb::Denied {
            check: "cap".into(),
            reason: "web 3/3".into(),
        }));
        denied.dry_run = true;
        let decision = Decision::of_reply(&denied).expect("a decision");
        assert_eq!(decision.exit_code(), 3);
        let none = pb::AcquireReply {
            outcome: None,
            dry_run: false,
        };
        assert!(matches!(
            Decision::of_reply(&none),
            Err(CliError::NoDecision)
        ));
    }

    #[test]
    fn decision_lines_say_what_happened() {
        let granted = reply(acquire_reply::Outcome::Granted(pb::Granted {
            lease_id: "L".into(),
            token: 123,
            ttl_ms: 30_000,
            ..Default::default()
        }));
        assert_eq!(
            decision_line(&granted, 0),
            "granted lease L token 123 ttl 30s"
        );
        let denied = reply(acquire_reply::Outcome::Denied(pb::Denied {
            check: "cap".into(),
            reason: "cap full in web: 3/3".into(),
        }));
        assert_eq!(
            decision_line(&denied, 0),
            "denied by cap: cap full in web: 3/3"
        );
        let pending = reply(acquire_reply::Outcome::Pending(pb::Pending {
            approval_id: "A".into(),
            expires_at_ms: 1_700_000_300_000,
        }));
        assert_eq!(
            decision_line(&pending, 1_700_000_000_000),
            "pending approval A (expires 2023-11-14T22:18:20Z, in 5m0s)"
        );
        let mut observed = reply(acquire_reply::Outcome::Observed(pb::Observed {
            would_grant: false,
            check: "frozen".into(),
            reason: "class frozen".into(),
        }));
        observed.dry_run = true;
        assert_eq!(
            decision_line(&observed, 0),
            "dry run (nothing was written): observed: would deny by frozen: class frozen"
        );
    }

    #[test]
    fn since_accepts_a_duration_ago() {
        let since = parse_since("10m").expect("a duration");
        assert_eq!(since, AuditSince::Ago(Duration::from_secs(600)));
        assert_eq!(since.to_ms(1_000_000), 1_000_000 - 600_000);
        // Longer ago than the epoch clamps to the start instead of wrapping.
        assert_eq!(parse_since("1h").expect("a duration").to_ms(5), 0);
    }

    #[test]
    fn since_accepts_an_rfc3339_time() {
        let since = parse_since("2024-05-01T12:00:00Z").expect("a time");
        assert_eq!(since.to_ms(0), 1_714_564_800_000);
        assert!(matches!(since, AuditSince::At(_)));
    }

    #[test]
    fn since_rejects_other_values_naming_the_accepted_forms() {
        for bad in ["yesterday", "10", "2024-13-01T00:00:00Z", ""] {
            let message = parse_since(bad).expect_err(bad).to_string();
            assert!(message.contains("10m"), "{message}");
            assert!(message.contains("2024-05-01T12:00:00Z"), "{message}");
            assert!(message.contains(&format!("{bad:?}")), "{message}");
        }
    }

    #[test]
    fn leader_hint_reads_the_leader_metadata() {
        let mut metadata = MetadataMap::new();
        assert_eq!(leader_hint(&metadata), None);
        metadata.insert(LEADER_METADATA_KEY, "http://10.0.0.2:7400".parse().unwrap());
        assert_eq!(
            leader_hint(&metadata).as_deref(),
            Some("http://10.0.0.2:7400")
        );
        metadata.insert(LEADER_METADATA_KEY, "10.0.0.3:7400".parse().unwrap());
        assert_eq!(
            leader_hint(&metadata).as_deref(),
            Some("http://10.0.0.3:7400")
        );
        metadata.insert(LEADER_METADATA_KEY, "".parse().unwrap());
        assert_eq!(leader_hint(&metadata), None);
    }

    #[test]
    fn redirect_only_on_unavailable_naming_another_replica() {
        let mut metadata = MetadataMap::new();
        metadata.insert(LEADER_METADATA_KEY, "http://b:7400".parse().unwrap());
        let not_leader = Status::with_metadata(Code::Unavailable, "not the leader", metadata);
        assert_eq!(
            redirect_target("http://a:7400", &not_leader).as_deref(),
            Some("http://b:7400")
        );
        // A replica naming itself would send the client in a circle.
        assert_eq!(redirect_target("http://b:7400/", &not_leader), None);
        let no_hint = Status::unavailable("no leader yet");
        assert_eq!(redirect_target("http://a:7400", &no_hint), None);
        let mut metadata = MetadataMap::new();
        metadata.insert(LEADER_METADATA_KEY, "http://b:7400".parse().unwrap());
        let refused = Status::with_metadata(Code::FailedPrecondition, "frozen", metadata);
        assert_eq!(redirect_target("http://a:7400", &refused), None);
    }

    #[test]
    fn exhausted_replicas_report_unreachable_or_no_leader() {
        let unreachable = exhausted(&[
            ("http://a:1".into(), Attempt::Unreachable("refused".into())),
            ("http://b:1".into(), Attempt::Unreachable("refused".into())),
        ]);
        let message = unreachable.to_string();
        assert!(
            message.starts_with("cannot reach the coordinator at http://a:1, http://b:1: is `interlock serve` running?"),
            "{message}"
        );
        assert!(message.contains("INTERLOCK_COORDINATOR"), "{message}");
        let no_leader = exhausted(&[
            ("http://a:1".into(), Attempt::Unreachable("refused".into())),
            (
                "http://b:1".into(),
                Attempt::Unavailable("not leader".into()),
            ),
        ]);
        assert!(matches!(no_leader, CliError::NoLeader { .. }));
    }

    #[test]
    fn server_refusals_are_printed_as_they_are() {
        let status = Status::failed_precondition("class disk is frozen; unfreeze it first");
        assert_eq!(
            status_error("http://a:1", &status).to_string(),
            "class disk is frozen; unfreeze it first"
        );
    }

    #[test]
    fn time_cells_are_relative_when_recent() {
        assert_eq!(when(100_000, 88_000), "12s ago");
        assert_eq!(when(10_000_000_000, 1_000), "1970-01-01T00:00:01Z");
        assert_eq!(expires_in(4_250), "4.2s");
        assert_eq!(expires_in(-5), "expired");
        assert_eq!(expires_in(74_000), "1m14s");
    }

    #[test]
    fn leases_table_has_the_documented_columns() {
        let reply = pb::LeasesReply {
            leases: vec![pb::Lease {
                lease_id: "L1".into(),
                token: 7,
                host_id: "web-1".into(),
                class: "restart".into(),
                service: "web".into(),
                target: "nginx".into(),
                granted_at_ms: 88_000,
                ttl_ms: 30_000,
                expires_in_ms: 4_200,
                approver: String::new(),
            }],
        };
        assert_eq!(
            leases_text(&reply, 100_000),
            "LEASE  HOLDER  CLASS    SERVICE  TARGET  TOKEN  GRANTED  EXPIRES IN\n\
             L1     web-1   restart  web      nginx   7      12s ago  4.2s\n"
        );
        let json = leases_json(&reply);
        assert_eq!(json["leases"][0]["granted_at_ms"], 88_000);
        assert_eq!(json["leases"][0]["granted_at"], "1970-01-01T00:01:28Z");
    }

    #[test]
    fn audit_text_ends_with_the_chain_verdict() {
        let mut reply = pb::AuditReply {
            records: Vec::new(),
            chain_ok: true,
            chain_error: String::new(),
        };
        assert!(audit_text(&reply).ends_with("chain: verified\n"));
        reply.chain_ok = false;
        reply.chain_error = "seq 42: hash mismatch".into();
        assert!(audit_text(&reply).ends_with("chain: BROKEN at seq 42: hash mismatch\n"));
    }

    #[test]
    fn the_bearer_token_flag_and_a_leases_fencing_token_do_not_collide() {
        let cli = TestCli::try_parse_from([
            "interlock",
            "--auth-token",
            "t0k",
            "lease",
            "release",
            "L1",
            "--token",
            "7",
        ])
        .expect("parse");
        assert_eq!(cli.client.auth_token.as_deref(), Some("t0k"));
        assert!(matches!(
            cli.command,
            OperatorCommand::Lease(LeaseCommand::Release { token: 7, .. })
        ));
    }

    #[test]
    fn flags_parse_and_empty_required_text_is_rejected() {
        TestCli::command().debug_assert();
        let cli = TestCli::try_parse_from([
            "interlock",
            "--coordinator",
            "http://a:1,http://b:2",
            "--operator",
            "alice",
            "lease",
            "acquire",
            "--host",
            "h",
            "--class",
            "c",
            "--target",
            "t",
            "--dry-run",
            "-o",
            "json",
        ])
        .expect("valid flags");
        assert_eq!(cli.client.coordinators, ["http://a:1", "http://b:2"]);
        assert_eq!(cli.client.output, OutputFormat::Json);
        assert!(matches!(
            cli.command,
            OperatorCommand::Lease(LeaseCommand::Acquire { dry_run: true, .. })
        ));
        assert!(TestCli::try_parse_from(["interlock", "freeze", "--reason", ""]).is_err());
        assert!(TestCli::try_parse_from(["interlock", "deny", "A"]).is_err());
        assert!(TestCli::try_parse_from(["interlock", "leases", "--count", "3"]).is_err());
        assert!(
            TestCli::try_parse_from(["interlock", "unfreeze", "--host", "h", "--reason", "r"])
                .is_err()
        );
        assert!(TestCli::try_parse_from(["interlock", "audit", "--since", "soon"]).is_err());
    }

    #[test]
    fn operator_defaults_to_user_then_unknown() {
        assert_eq!(operator_or_unknown(Some("alice".into())), "alice");
        assert_eq!(operator_or_unknown(Some(" ".into())), "unknown");
        assert_eq!(operator_or_unknown(None), "unknown");
    }
}
