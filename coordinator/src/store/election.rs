//! Leader election on the [`Store`] primitives, following etcd's `concurrency` election:
//! each candidate puts `<prefix>/<lease hex>` attached to its own lease; the key with the
//! lowest `create_revision` leads. A leader proves leadership in storage, not in memory: every
//! leader write includes [`leader_guard`], so a deposed leader (lease expired, key deleted,
//! someone else elected) cannot commit even if it still believes it leads.
//!
//! Works with any [`Store`] (etcd or embedded). Must not import a concrete backend.

use std::time::Duration;

use futures_util::StreamExt;

use super::{CmpOp, Compare, LeaseId, Op, Store, StoreError, WatchEventKind};

/// How long one wait for the predecessor's deletion lasts before the candidate re-checks
/// that its own key and lease still exist. Bounds how late a lost lease is noticed.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Proof of leadership: the candidate's key and the revision that created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub key: String,
    pub create_revision: i64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ElectionError {
    /// The candidate's lease expired or was revoked (its key is gone) before it was elected.
    #[error("lease {0:x} lost while campaigning: grant a new lease and campaign again")]
    LeaseLost(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn candidates_prefix(election_prefix: &str) -> String {
    format!("{}/", election_prefix.trim_end_matches('/'))
}

/// Becomes leader of `election_prefix`, waiting as long as it takes while the lease lives.
/// Re-campaigning with the same lease reuses the existing key (and its place in line) and
/// updates its value. Returns [`ElectionError::LeaseLost`] if the lease ends first.
pub async fn campaign<S: Store + ?Sized>(
    store: &S,
    election_prefix: &str,
    candidate_value: &[u8],
    lease_id: LeaseId,
) -> Result<LeaderKey, ElectionError> {
    let prefix = candidates_prefix(election_prefix);
    let key = format!("{prefix}{:x}", lease_id.0);
    let put = Op::Put {
        key: key.clone(),
        value: candidate_value.to_vec(),
        lease: lease_id.0,
    };
    let absent = Compare::CreateRevision {
        key: key.clone(),
        op: CmpOp::Equal,
        rev: 0,
    };
    let create_revision = match store.txn(vec![absent], vec![put.clone()], vec![]).await {
        Ok(outcome) if outcome.succeeded => outcome.revision,
        Ok(_) => {
            let Some(existing) = store.get(&key).await? else {
                // It existed a moment ago and is gone now: only lease loss deletes it.
                return Err(ElectionError::LeaseLost(lease_id.0));
            };
            if existing.value != candidate_value {
                let same = Compare::CreateRevision {
                    key: key.clone(),
                    op: CmpOp::Equal,
                    rev: existing.create_revision,
                };
                let updated = store.txn(vec![same], vec![put], vec![]).await?;
                if !updated.succeeded {
                    return Err(ElectionError::LeaseLost(lease_id.0));
                }
            }
            existing.create_revision
        }
        Err(StoreError::LeaseNotFound(_)) => return Err(ElectionError::LeaseLost(lease_id.0)),
        Err(e) => return Err(e.into()),
    };
    let me = LeaderKey {
        key,
        create_revision,
    };
    wait_for_turn(store, &prefix, &me, lease_id).await?;
    Ok(me)
}

/// Waits until no candidate key was created before ours.
async fn wait_for_turn<S: Store + ?Sized>(
    store: &S,
    prefix: &str,
    me: &LeaderKey,
    lease_id: LeaseId,
) -> Result<(), ElectionError> {
    loop {
        let range = store.range_prefix(prefix).await?;
        if !range.kvs.iter().any(|kv| kv.key == me.key) {
            return Err(ElectionError::LeaseLost(lease_id.0));
        }
        // Wait on the closest older candidate only (not the leader), so one deletion wakes
        // one waiter instead of the whole queue.
        let Some(predecessor) = range
            .kvs
            .iter()
            .filter(|kv| kv.create_revision < me.create_revision)
            .max_by_key(|kv| kv.create_revision)
        else {
            return Ok(());
        };
        let mut events = store
            .watch_prefix(&predecessor.key, range.revision + 1)
            .await?;
        let deleted = async {
            while let Some(ev) = events.next().await {
                let ev = ev?;
                // A prefix watch on the key also sees longer keys; match exactly.
                if ev.kind == WatchEventKind::Delete && ev.kv.key == predecessor.key {
                    return Ok(());
                }
            }
            Err(StoreError::Unavailable(
                "election watch ended; re-reading candidates".to_owned(),
            ))
        };
        match tokio::time::timeout(RECHECK_INTERVAL, deleted).await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(StoreError::Unavailable(_))) => {}
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}

/// The compare every leader write must include: the leader key still exists with the
/// revision that created it. After resignation, lease loss or re-election under a new key,
/// it fails, so a deposed leader cannot commit.
pub fn leader_guard(leader: &LeaderKey) -> Compare {
    Compare::CreateRevision {
        key: leader.key.clone(),
        op: CmpOp::Equal,
        rev: leader.create_revision,
    }
}

/// The current leader's key and value, if any candidate exists.
pub async fn current_leader<S: Store + ?Sized>(
    store: &S,
    election_prefix: &str,
) -> Result<Option<(String, Vec<u8>)>, StoreError> {
    let range = store
        .range_prefix(&candidates_prefix(election_prefix))
        .await?;
    Ok(range
        .kvs
        .into_iter()
        .min_by_key(|kv| kv.create_revision)
        .map(|kv| (kv.key, kv.value)))
}

/// Gives up leadership (or candidacy) by deleting the key, only if it is still ours. The lease
/// stays granted; the caller revokes it if it is done with it.
pub async fn resign<S: Store + ?Sized>(store: &S, leader: &LeaderKey) -> Result<(), StoreError> {
    store
        .txn(
            vec![leader_guard(leader)],
            vec![Op::Delete {
                key: leader.key.clone(),
            }],
            vec![],
        )
        .await?;
    Ok(())
}
