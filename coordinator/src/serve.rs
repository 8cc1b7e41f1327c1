//! `interlock serve` as a library function: opens the store (etcd, or the embedded store for
//! the one-host quickstart), loads the policy, runs the engine, the gRPC server and the HTTP
//! endpoints, and shuts down in order on request.
//!
//! Shutdown (SIGTERM in the binary): stop taking gRPC requests and let in-flight ones finish,
//! then stop the engine (it completes the command in progress and resigns leadership), then
//! stop the HTTP endpoints. It holds no decision logic.

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use sha2::{Digest as _, Sha256};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    engine::{Engine, EngineConfig},
    metrics::{CoordinatorMetrics, Readiness, serve_http},
    policy::Policy,
    server,
    store::{
        Store,
        etcd::{EtcdOptions, EtcdStore},
        mem::MemStore,
    },
    tls::Security,
};

/// Which store backs the coordinator.
#[derive(Clone, Debug)]
pub enum StoreChoice {
    /// etcd endpoints (`http://127.0.0.1:2379`, …), and TLS (`https://` endpoints) with the
    /// client certificate etcd authenticates the coordinator by.
    Etcd {
        endpoints: Vec<String>,
        tls: Option<interlock_proto::tls::TlsFiles>,
    },
    /// The embedded single-node store, persisted under this directory (or in memory).
    Embedded(Option<PathBuf>),
}

/// Everything `interlock serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub store: StoreChoice,
    /// Name of the policy file, for error messages, and its text.
    pub policy_name: String,
    pub policy_text: String,
    pub prefix: String,
    /// Address clients use to reach this replica (defaults to the gRPC listener's).
    pub advertise: Option<String>,
    pub host_ttl: Duration,
    pub election_ttl: Duration,
    pub failpoint_pause_before_grant_commit: Option<Duration>,
    /// Audit records kept; older ones are deleted in chunks of 100.
    pub audit_retention: u64,
    /// Mutual TLS (identities from certificates), or `--insecure` plaintext.
    pub security: Security,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Policy(String),
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP endpoints: {0}")]
    Http(#[from] std::io::Error),
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    options: ServeOptions,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let policy = Policy::from_toml_str(&options.policy_name, &options.policy_text)
        .map_err(|e| ServeError::Policy(e.to_string()))?;
    let policy_hash = hex::encode(Sha256::digest(options.policy_text.as_bytes()));
    // etcd's certificates are checked before connecting, so an expired one is named here
    // rather than surfacing as a failed handshake.
    let etcd_not_after = match &options.store {
        StoreChoice::Etcd {
            tls: Some(files), ..
        } => crate::tls::checked_not_after(files, ["etcd_client", "etcd_ca"])
            .map_err(|e| ServeError::Store(format!("etcd TLS: {e}")))?,
        _ => Vec::new(),
    };
    let (store, kind): (Arc<dyn Store>, &'static str) = match &options.store {
        StoreChoice::Etcd { endpoints, tls } => (
            Arc::new(
                EtcdStore::connect(
                    endpoints,
                    EtcdOptions {
                        tls: tls.clone(),
                        ..EtcdOptions::default()
                    },
                )
                .await
                .map_err(|e| ServeError::Store(format!("{e} (etcd at {})", endpoints.join(","))))?,
            ),
            "etcd",
        ),
        StoreChoice::Embedded(dir) => {
            tracing::warn!(
                data_dir = ?dir,
                "using the embedded single-node store: for the one-host quickstart only; pass --etcd for a fleet"
            );
            (
                Arc::new(
                    MemStore::open(dir.as_deref())
                        .await
                        .map_err(|e| ServeError::Store(e.to_string()))?,
                ),
                "embedded",
            )
        }
    };
    let advertise = match &options.advertise {
        Some(a) => a.clone(),
        None => {
            let scheme = if options.security.is_insecure() {
                "http"
            } else {
                "https"
            };
            format!("{scheme}://{}", grpc.local_addr()?)
        }
    };
    let metrics = CoordinatorMetrics::new();
    for (name, class) in &policy.classes {
        metrics.set_budget_max(name.as_str(), class.budget.fleet.max);
    }
    if let Security::Mtls { not_after, .. } = &options.security {
        for (which, at) in not_after {
            metrics.set_cert_not_after(which, *at);
        }
    }
    for (which, at) in etcd_not_after {
        metrics.set_cert_not_after(which, at);
    }
    let engine = Engine::new(
        store,
        kind,
        EngineConfig {
            prefix: options.prefix.clone(),
            policy: Arc::new(policy),
            policy_hash,
            advertise,
            host_ttl: options.host_ttl,
            election_ttl: options.election_ttl,
            failpoint_pause_before_grant_commit: options.failpoint_pause_before_grant_commit,
            audit_retention: options.audit_retention,
        },
        metrics.clone(),
    );
    let (stop_engine, engine_shutdown) = watch::channel(false);
    let engine_task = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.run(engine_shutdown).await })
    };
    let (stop_http, mut http_shutdown) = watch::channel(false);
    let http_task = http.map(|listener| {
        let engine = engine.clone();
        let ready = move || {
            let snap = engine.snapshot();
            match (snap.leader, &snap.leader_addr) {
                (true, _) => Readiness::leader(),
                (false, Some(addr)) => Readiness::follower(addr),
                (false, None) => Readiness::not_ready("no leader elected yet"),
            }
        };
        tokio::spawn(serve_http(listener, metrics.clone(), ready, async move {
            let _ = http_shutdown.wait_for(|s| *s).await;
        }))
    });
    if options.security.is_insecure() {
        tracing::warn!(
            "serving without TLS (--insecure): every identity is self-asserted and any process \
             that reaches this port can act as any host or operator; use --ca/--cert/--key"
        );
    }
    let deny_task = match &options.security {
        Security::Mtls {
            deny: Some((path, list)),
            ..
        } => Some(tokio::spawn(crate::deny::watch_file(
            path.clone(),
            list.clone(),
            engine.clone(),
            stop_http.subscribe(),
        ))),
        _ => None,
    };
    let reload_task = match &options.security {
        Security::Mtls { tls, tokens, .. } => Some(tokio::spawn(reload_tls(
            Arc::clone(tls),
            tokens.clone(),
            metrics.clone(),
            stop_http.subscribe(),
        ))),
        Security::Insecure => None,
    };
    let grpc_result =
        server::serve_grpc(grpc, engine.clone(), options.security.clone(), shutdown).await;
    tracing::info!("gRPC stopped; stopping the engine");
    let _ = stop_engine.send(true);
    let _ = engine_task.await;
    let _ = stop_http.send(true);
    for task in [deny_task, reload_task].into_iter().flatten() {
        let _ = task.await;
    }
    if let Some(task) = http_task
        && let Ok(Err(e)) = task.await
    {
        return Err(e.into());
    }
    grpc_result?;
    Ok(())
}

/// How often the TLS files are checked for a change.
const TLS_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Re-reads the coordinator's certificate, key and CA, and the token files, when they change:
/// new connections (and every later token check) use them at once; a bad edit is logged once
/// and the files last loaded stay in use.
async fn reload_tls(
    tls: Arc<crate::tls::ReloadingTls>,
    tokens: Option<Arc<crate::tls::TokenSource>>,
    metrics: CoordinatorMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TLS_RELOAD_EVERY);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        match tls.reload_if_changed() {
            Ok(None) => {}
            Ok(Some(not_after)) => {
                for (which, at) in not_after {
                    metrics.set_cert_not_after(which, at);
                }
                tracing::info!("TLS files changed: new connections use the new certificate and CA");
            }
            Err(e) => tracing::error!(
                error = %e,
                "TLS files changed but do not load; still serving with the ones loaded before"
            ),
        }
        match tokens.as_ref().map(|t| t.reload_if_changed()) {
            None | Some(Ok(false)) => {}
            Some(Ok(true)) => tracing::info!("token files changed: the new tokens are in use"),
            Some(Err(e)) => tracing::error!(
                error = %e,
                "token files changed but do not load; the tokens loaded before stay in use"
            ),
        }
    }
}
