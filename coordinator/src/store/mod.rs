//! The coordinator's storage port: a small key-value interface at the level of etcd
//! primitives (ranges, compare-and-swap transactions, leases, watches), with two
//! implementations: [`etcd::EtcdStore`] for production and [`mem::MemStore`], a single-node
//! embedded store for the one-host quickstart. [`election`] builds leader election on top.
//!
//! This module owns only storage mechanics. It must not import anything domain-specific
//! (leases of repair actions, caps, budgets, policy): those live in the pure cores and are
//! encoded into keys and values by the caller.
//!
//! # Fencing
//!
//! Every write is a [`Store::txn`]. The revision it returns ([`TxnOutcome::revision`]) is the
//! store revision after the transaction, which for a successful transaction that wrote
//! anything equals the `mod_revision` of every key it put. Revisions strictly increase across
//! the whole store, so callers use this revision as the fencing token: a later holder always
//! gets a larger one, and a protected write names the revision that proves ownership in a
//! [`Compare`] so a stale holder cannot commit.
//!
//! # Ambiguous outcomes
//!
//! An error returned after a request was sent (typically [`StoreError::Unavailable`] from a
//! timeout or a dropped connection) does not mean the write failed: it may have committed.
//! Callers resolve such an outcome by reading the key they wrote (and comparing its
//! `mod_revision` or value), never by assuming failure.

pub mod election;
pub mod etcd;
pub mod mem;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;

/// A key-value pair as stored, with etcd's revision metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created this key (since its last deletion); 0 when absent.
    pub create_revision: i64,
    /// Revision of the last put (or, in a delete event, of the deletion).
    pub mod_revision: i64,
    /// Lease the key is attached to; 0 means none.
    pub lease: i64,
}

/// The result of a range read: every key under a prefix, and the store revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub revision: i64,
    pub kvs: Vec<Kv>,
}

/// How a [`Compare`] relates the stored target to the given operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Equal,
    Greater,
    Less,
    NotEqual,
}

impl CmpOp {
    /// Applies the comparison as etcd does: `stored <op> operand`.
    pub fn holds<T: Ord + ?Sized>(self, stored: &T, operand: &T) -> bool {
        match self {
            CmpOp::Equal => stored == operand,
            CmpOp::Greater => stored > operand,
            CmpOp::Less => stored < operand,
            CmpOp::NotEqual => stored != operand,
        }
    }
}

/// A transaction guard. On a missing key, `create_revision` and `mod_revision` are 0 (so
/// `CreateRevision{op: Equal, rev: 0}` means "the key does not exist"), and a `Value` compare
/// fails whatever its operator, as in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    CreateRevision {
        key: String,
        op: CmpOp,
        rev: i64,
    },
    ModRevision {
        key: String,
        op: CmpOp,
        rev: i64,
    },
    Value {
        key: String,
        op: CmpOp,
        value: Vec<u8>,
    },
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Puts `value`; `lease` 0 means not attached to a lease (and detaches a previous one).
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
}

/// The outcome of [`Store::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether all compares held (and the success branch ran).
    pub succeeded: bool,
    /// Store revision after the transaction (etcd's header revision). If the branch that ran
    /// wrote anything, every key it put has this `mod_revision`; callers use it as the
    /// fencing token.
    pub revision: i64,
}

/// An etcd lease id. Keys attached to a lease are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv` carries the key and the revision of the
/// deletion as `mod_revision`; its other fields are empty/0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    pub kv: Kv,
    /// Store revision of the change (equal to `kv.mod_revision`).
    pub revision: i64,
}

/// Health and identity of the backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    pub revision: i64,
    /// `"etcd"` or `"embedded"`.
    pub kind: &'static str,
    /// Endpoints (etcd) or data directory (embedded), for operators.
    pub endpoint: String,
}

/// The one error type of the storage port.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time. The caller retries; if the
    /// request was a write it may have committed (see the module docs on ambiguous outcomes).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The lease does not exist (expired, revoked or never granted): a put attached to it was
    /// refused. Whatever the caller held under that lease is gone.
    #[error("lease {0:x} not found")]
    LeaseNotFound(i64),
    /// Anything else: invalid requests, a cancelled watch, a broken local log.
    #[error("store error: {0}")]
    Other(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The boxed future every [`Store`] method returns, so the trait stays dyn-compatible and one
/// binary can pick a backend at runtime (`Arc<dyn Store>`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>;

/// Watch events for one prefix, in revision order. An `Err` item means the watch was cancelled
/// (for example its start revision was compacted) and no further events follow; the stream
/// also ends (`None`) when the store goes away. Either way the caller re-reads and re-watches.
pub struct WatchStream {
    inner: Pin<Box<dyn Stream<Item = StoreResult<WatchEvent>> + Send>>,
}

impl WatchStream {
    pub fn new(inner: impl Stream<Item = StoreResult<WatchEvent>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(inner),
        }
    }
}

impl Stream for WatchStream {
    type Item = StoreResult<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

/// The storage port. Semantics are etcd's for the subset exposed here; both implementations
/// pass the same conformance suite.
pub trait Store: Send + Sync {
    /// Every key starting with `prefix`, sorted by key, and the revision of the read.
    fn range_prefix<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Range>;

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Kv>>;

    /// The first and the last key under `prefix` (in key order), without reading the rest:
    /// how the coordinator finds its audit chain's head and tail among many records.
    fn prefix_ends<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, (Option<Kv>, Option<Kv>)>;

    /// Atomically: if every compare holds, apply `success`, else apply `failure`. The returned
    /// revision is the fencing token (see the module docs). Two puts to one key, or a put to a
    /// key a delete in the same branch covers, are refused as in etcd.
    fn txn<'a>(
        &'a self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> StoreFuture<'a, TxnOutcome>;

    /// Grants a lease; TTLs below 2 s are raised to 2 s (etcd's minimum).
    fn lease_grant(&self, ttl_secs: i64) -> StoreFuture<'_, LeaseId>;

    /// Renews the lease once; returns its TTL, or `None` when it no longer exists.
    fn lease_keepalive(&self, id: LeaseId) -> StoreFuture<'_, Option<i64>>;

    /// Revokes the lease and deletes every key attached to it. Revoking a lease that no longer
    /// exists succeeds (the outcome the caller wanted already holds).
    fn lease_revoke(&self, id: LeaseId) -> StoreFuture<'_, ()>;

    /// Remaining TTL in whole seconds, or `None` when the lease no longer exists.
    fn lease_time_to_live(&self, id: LeaseId) -> StoreFuture<'_, Option<i64>>;

    /// Watches every key starting with `prefix`, from `start_revision` (0 = from now on).
    /// Lease expiry of an attached key shows as a delete event.
    fn watch_prefix<'a>(
        &'a self,
        prefix: &'a str,
        start_revision: i64,
    ) -> StoreFuture<'a, WatchStream>;

    fn status(&self) -> StoreFuture<'_, StoreStatus>;
}

/// Validates a transaction branch the way etcd does: no key may be written twice.
pub(crate) fn check_branch(ops: &[Op]) -> StoreResult<()> {
    let mut puts: Vec<&str> = Vec::new();
    for op in ops {
        if let Op::Put { key, .. } = op {
            if puts.contains(&key.as_str()) {
                return Err(StoreError::Other(format!(
                    "duplicate key given in txn request: {key:?}"
                )));
            }
            puts.push(key);
        }
    }
    for op in ops {
        let overlaps = match op {
            Op::Put { .. } => false,
            Op::Delete { key } => puts.contains(&key.as_str()),
            Op::DeletePrefix { prefix } => puts.iter().any(|k| k.starts_with(prefix.as_str())),
        };
        if overlaps {
            return Err(StoreError::Other(
                "duplicate key given in txn request: a put and a delete cover the same key"
                    .to_owned(),
            ));
        }
    }
    Ok(())
}
