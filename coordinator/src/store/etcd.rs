//! [`Store`] backed by a real etcd cluster through `etcd-client`.
//!
//! This file is the only place where etcd-client's protobuf-shaped types appear; they are
//! converted to the store's own types at the boundary. Every call is bounded by
//! [`EtcdOptions::request_timeout`]; a timeout maps to [`StoreError::Unavailable`], which for a
//! write is an ambiguous outcome (see the parent module).

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    CmpOp, Compare, Kv, LeaseId, Op, Range, Store, StoreError, StoreFuture, StoreResult,
    StoreStatus, TxnOutcome, WatchEvent, WatchEventKind, WatchStream,
};

/// Tuning for [`EtcdStore::connect`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Bound on every request (and on creating a watch).
    pub request_timeout: Duration,
    /// Bound on establishing the connection and the first status probe.
    pub connect_timeout: Duration,
    /// TLS to etcd: the CA that signed etcd's certificate, and the client certificate and key
    /// (with `--client-cert-auth`, etcd takes the user from the certificate's common name).
    pub tls: Option<interlock_proto::tls::TlsFiles>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(3),
            tls: None,
        }
    }
}

/// A connection to etcd. Cheap to clone (the gRPC channel is shared).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    opts: EtcdOptions,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects and probes the cluster with a status request, all within
    /// `opts.connect_timeout`, so a wrong endpoint fails here rather than at the first write.
    pub async fn connect(endpoints: &[String], opts: EtcdOptions) -> StoreResult<EtcdStore> {
        if endpoints.is_empty() {
            return Err(StoreError::Other(
                "no etcd endpoints given: pass at least one http://host:port".to_owned(),
            ));
        }
        let scheme = if opts.tls.is_some() {
            "https://"
        } else {
            "http://"
        };
        if let Some(e) = endpoints.iter().find(|e| !e.starts_with(scheme)) {
            return Err(StoreError::Other(if opts.tls.is_some() {
                format!(
                    "etcd endpoint {e} is not https:// but etcd TLS files are given; use https://"
                )
            } else {
                format!(
                    "etcd endpoint {e} is not http://; for https:// give --etcd-ca, --etcd-cert \
                     and --etcd-key"
                )
            }));
        }
        let mut connect_opts = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout(opts.request_timeout);
        if let Some(files) = &opts.tls {
            let tls = files
                .client_config()
                .map_err(|e| StoreError::Other(format!("etcd TLS: {e}")))?;
            connect_opts = connect_opts.with_tls(tls);
        }
        let connect = async {
            let mut client = Client::connect(endpoints, Some(connect_opts))
                .await
                .map_err(map_err)?;
            client.status().await.map_err(map_err)?;
            Ok::<_, StoreError>(client)
        };
        let client = tokio::time::timeout(opts.connect_timeout, connect)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "connecting to etcd at {} timed out after {:?}",
                    endpoints.join(","),
                    opts.connect_timeout
                ))
            })??;
        Ok(EtcdStore {
            client,
            opts,
            endpoints: endpoints.join(","),
        })
    }

    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(self.opts.request_timeout, fut).await {
            Ok(result) => result.map_err(map_err),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd {what} timed out after {:?}",
                self.opts.request_timeout
            ))),
        }
    }
}

/// Sorts etcd-client errors into "retry" and "other". tonic is not a direct dependency, so
/// gRPC status codes are matched by their numeric values (grpc/doc/statuscodes.md).
/// Lease-not-found is recognised from the server's message because etcd reports it as a plain
/// NotFound.
fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    const CANCELLED: i32 = 1;
    const UNKNOWN: i32 = 2;
    const DEADLINE_EXCEEDED: i32 = 4;
    const NOT_FOUND: i32 = 5;
    const RESOURCE_EXHAUSTED: i32 = 8;
    const ABORTED: i32 = 10;
    const UNAVAILABLE: i32 = 14;
    match e {
        E::TransportError(t) => StoreError::Unavailable(format!("transport: {t}")),
        E::IoError(io) => StoreError::Unavailable(format!("io: {io}")),
        E::GRpcStatus(s) => {
            let code = i32::from(s.code());
            let msg = s.message();
            match code {
                CANCELLED | DEADLINE_EXCEEDED | RESOURCE_EXHAUSTED | ABORTED | UNAVAILABLE => {
                    StoreError::Unavailable(format!("grpc {:?}: {msg}", s.code()))
                }
                NOT_FOUND if msg.contains("lease not found") => StoreError::LeaseNotFound(0),
                // etcd reports "no leader" and request timeouts as Unknown with this text.
                UNKNOWN if msg.contains("leader") || msg.contains("timed out") => {
                    StoreError::Unavailable(format!("grpc {:?}: {msg}", s.code()))
                }
                _ => StoreError::Other(format!("grpc {:?}: {msg}", s.code())),
            }
        }
        other => StoreError::Other(other.to_string()),
    }
}

fn kv_from(kv: &KeyValue) -> StoreResult<Kv> {
    let key = kv
        .key_str()
        .map_err(|e| StoreError::Other(format!("non-utf8 key in etcd: {e}")))?;
    Ok(Kv {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    })
}

fn cmp_op(op: CmpOp) -> CompareOp {
    match op {
        CmpOp::Equal => CompareOp::Equal,
        CmpOp::Greater => CompareOp::Greater,
        CmpOp::Less => CompareOp::Less,
        CmpOp::NotEqual => CompareOp::NotEqual,
    }
}

fn compare_to_etcd(c: Compare) -> EtcdCompare {
    match c {
        Compare::CreateRevision { key, op, rev } => {
            EtcdCompare::create_revision(key, cmp_op(op), rev)
        }
        Compare::ModRevision { key, op, rev } => EtcdCompare::mod_revision(key, cmp_op(op), rev),
        Compare::Value { key, op, value } => EtcdCompare::value(key, cmp_op(op), value),
    }
}

fn op_to_etcd(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            TxnOp::put(key, value, opts)
        }
        Op::Delete { key } => TxnOp::delete(key, None),
        Op::DeletePrefix { prefix } => {
            TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()))
        }
    }
}

fn lease_of(ops: &[Op]) -> Option<i64> {
    ops.iter().find_map(|op| match op {
        Op::Put { lease, .. } if *lease != 0 => Some(*lease),
        _ => None,
    })
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> StoreResult<i64> {
    h.map(|h| h.revision())
        .ok_or_else(|| StoreError::Other("etcd response without header".to_owned()))
}

impl Store for EtcdStore {
    fn range_prefix<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Range> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let resp = self
                .bounded(
                    "range",
                    kv.get(prefix, Some(GetOptions::new().with_prefix())),
                )
                .await?;
            let revision = header_revision(resp.header())?;
            let kvs = resp.kvs().iter().map(kv_from).collect::<StoreResult<_>>()?;
            Ok(Range { revision, kvs })
        })
    }

    fn prefix_ends<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, (Option<Kv>, Option<Kv>)> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let end = |order| {
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, order)
                    .with_limit(1)
            };
            let first = self
                .bounded("range", kv.get(prefix, Some(end(SortOrder::Ascend))))
                .await?;
            let last = self
                .bounded("range", kv.get(prefix, Some(end(SortOrder::Descend))))
                .await?;
            Ok((
                first.kvs().first().map(kv_from).transpose()?,
                last.kvs().first().map(kv_from).transpose()?,
            ))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Kv>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let resp = self.bounded("get", kv.get(key, None)).await?;
            resp.kvs().first().map(kv_from).transpose()
        })
    }

    fn txn<'a>(
        &'a self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> StoreFuture<'a, TxnOutcome> {
        Box::pin(async move {
            // Remember a lease id for the error message: etcd's NotFound does not name it.
            let lease = lease_of(&success).or_else(|| lease_of(&failure));
            let txn = Txn::new()
                .when(
                    compares
                        .into_iter()
                        .map(compare_to_etcd)
                        .collect::<Vec<_>>(),
                )
                .and_then(success.into_iter().map(op_to_etcd).collect::<Vec<_>>())
                .or_else(failure.into_iter().map(op_to_etcd).collect::<Vec<_>>());
            let mut kv = self.client.kv_client();
            let resp = self
                .bounded("txn", kv.txn(txn))
                .await
                .map_err(|e| match e {
                    StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease.unwrap_or(0)),
                    other => other,
                })?;
            Ok(TxnOutcome {
                succeeded: resp.succeeded(),
                revision: header_revision(resp.header())?,
            })
        })
    }

    fn lease_grant(&self, ttl_secs: i64) -> StoreFuture<'_, LeaseId> {
        Box::pin(async move {
            let mut lease = self.client.lease_client();
            let resp = self
                .bounded("lease grant", lease.grant(ttl_secs.max(2), None))
                .await?;
            Ok(LeaseId(resp.id()))
        })
    }

    fn lease_keepalive(&self, id: LeaseId) -> StoreFuture<'_, Option<i64>> {
        Box::pin(async move {
            let mut lease = self.client.lease_client();
            // etcd-client only offers a keepalive stream, and it swallows the TTL of the first
            // answer, so send a second keepalive on the same stream to learn it. Keepalives
            // are not raft writes, so this costs little.
            let once = async {
                let (mut keeper, mut stream) = match lease.keep_alive(id.0).await {
                    Ok(pair) => pair,
                    Err(etcd_client::Error::LeaseKeepAliveError(msg))
                        if msg.contains("not found") =>
                    {
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                };
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(resp) if resp.ttl() > 0 => Ok(Some(resp.ttl())),
                    _ => Ok(None),
                }
            };
            self.bounded("lease keepalive", once).await
        })
    }

    fn lease_revoke(&self, id: LeaseId) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut lease = self.client.lease_client();
            match self.bounded("lease revoke", lease.revoke(id.0)).await {
                Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn lease_time_to_live(&self, id: LeaseId) -> StoreFuture<'_, Option<i64>> {
        Box::pin(async move {
            let mut lease = self.client.lease_client();
            match self
                .bounded("lease ttl", lease.time_to_live(id.0, None))
                .await
            {
                Ok(resp) if resp.ttl() >= 0 => Ok(Some(resp.ttl())),
                Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn watch_prefix<'a>(
        &'a self,
        prefix: &'a str,
        start_revision: i64,
    ) -> StoreFuture<'a, WatchStream> {
        Box::pin(async move {
            let mut watch = self.client.watch_client();
            let mut opts = WatchOptions::new().with_prefix();
            if start_revision > 0 {
                opts = opts.with_start_revision(start_revision);
            }
            // Wait for etcd to confirm the watch, so a write made after this call returns is
            // always seen, also with start_revision 0 ("from now on").
            let create = async {
                let mut stream = watch.watch(prefix, Some(opts)).await?;
                loop {
                    match stream.message().await? {
                        Some(resp) if resp.canceled() => {
                            return Err(etcd_client::Error::WatchError(format!(
                                "watch on {prefix:?} from revision {start_revision} refused: \
                                 {} (compacted to {})",
                                resp.cancel_reason(),
                                resp.compact_revision()
                            )));
                        }
                        Some(resp) if resp.created() => return Ok(stream),
                        Some(_) => continue,
                        None => {
                            return Err(etcd_client::Error::WatchError(
                                "watch stream closed before creation".to_owned(),
                            ));
                        }
                    }
                }
            };
            let mut stream = self.bounded("watch", create).await?;
            let (tx, rx) = mpsc::channel::<StoreResult<WatchEvent>>(256);
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        // The consumer dropped the stream: end the task, which drops the gRPC
                        // stream and so cancels the watch on the server.
                        () = tx.closed() => return,
                        msg = stream.message() => msg,
                    };
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(map_err(e))).await;
                            return;
                        }
                    };
                    if resp.canceled() {
                        let reason = if resp.compact_revision() > 0 {
                            format!(
                                "watch on {prefix:?} cancelled: revision {start_revision} was \
                                 compacted (oldest available {})",
                                resp.compact_revision()
                            )
                        } else {
                            format!("watch on {prefix:?} cancelled: {}", resp.cancel_reason())
                        };
                        let _ = tx.send(Err(StoreError::Other(reason))).await;
                        return;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let item = kv_from(kv).map(|kv| WatchEvent {
                            kind: match ev.event_type() {
                                EventType::Put => WatchEventKind::Put,
                                EventType::Delete => WatchEventKind::Delete,
                            },
                            revision: kv.mod_revision,
                            kv,
                        });
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(WatchStream::new(ReceiverStream::new(rx)))
        })
    }

    fn status(&self) -> StoreFuture<'_, StoreStatus> {
        Box::pin(async move {
            let mut m = self.client.maintenance_client();
            let resp = self.bounded("status", m.status()).await?;
            Ok(StoreStatus {
                revision: header_revision(resp.header())?,
                kind: "etcd",
                endpoint: self.endpoints.clone(),
            })
        })
    }
}
