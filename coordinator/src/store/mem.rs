//! [`MemStore`]: the embedded single-node store for the one-host quickstart.
//!
//! It is hand-written on purpose. etcd cannot be embedded in a Rust process, and the subset of
//! etcd the coordinator uses (prefix ranges, compare-and-swap transactions, leases, prefix
//! watches) is small enough that a `BTreeMap` with etcd's revision rules is less surface to
//! trust than a new storage dependency. It is not a test fake: it is durable (optional
//! append-only log, fsync per commit) and passes the same conformance suite as etcd.
//!
//! Semantics kept from etcd: one global revision starting at 1, bumped once per transaction
//! that changes something (a failed compare, a delete of nothing or a read-only branch do not
//! bump it); a compare on a missing key sees create/mod revision 0; a lease's attached keys are
//! deleted with a new revision when it expires or is revoked, and watchers see deletes; TTLs
//! are at least 2 s. Leases live on tokio's clock and do not survive a restart: keys attached
//! to a lease are deleted at replay, as if the lease had expired while the store was down.
//!
//! This module must not import etcd-client or anything domain-specific.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    Compare, Kv, LeaseId, Op, Range, Store, StoreError, StoreFuture, StoreResult, StoreStatus,
    TxnOutcome, WatchEvent, WatchEventKind, WatchStream, check_branch,
};

/// etcd's minimum lease TTL; shorter requests are raised to it.
const MIN_TTL_SECS: i64 = 2;
/// Events kept for watches that start in the past. Older start revisions get a "compacted"
/// error, as from etcd after compaction.
const HISTORY_LIMIT: usize = 10_000;
const LOG_FILE: &str = "store.log";

/// The embedded store. Cheap to clone; all clones share one state. Must be opened inside a
/// tokio runtime (a background task expires leases).
#[derive(Clone)]
pub struct MemStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore")
            .field("data_dir", &self.shared.data_dir)
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the expiry task when a lease with an earlier deadline may exist.
    lease_added: Arc<Notify>,
    expiry_task: std::sync::Mutex<Option<AbortHandle>>,
    data_dir: Option<PathBuf>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(mut task) = self.expiry_task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
}

struct LeaseState {
    ttl: i64,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<StoreResult<WatchEvent>>,
}

struct State {
    revision: i64,
    kvs: BTreeMap<String, Entry>,
    leases: HashMap<i64, LeaseState>,
    next_lease: i64,
    watchers: Vec<Watcher>,
    history: VecDeque<WatchEvent>,
    /// Events at or below this revision are no longer in `history`.
    compacted: i64,
    log: Option<Arc<File>>,
    /// Set when a log write failed: the file may end in a partial record, so nothing more may
    /// be appended until the store is reopened (replay drops a torn tail).
    poisoned: bool,
}

/// One resolved change, as written to the log: deletes name existing keys only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Change {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: String,
    },
}

/// One committed revision: a JSON line in `store.log`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogRecord {
    rev: i64,
    changes: Vec<Change>,
}

impl State {
    fn new(log: Option<Arc<File>>) -> Self {
        // Seed lease ids from the wall clock so ids granted before a restart are never reused
        // for new leases after it (a stale holder's keepalive must find nothing).
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(1);
        State {
            revision: 1,
            kvs: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: seed.max(1),
            watchers: Vec::new(),
            history: VecDeque::new(),
            compacted: 0,
            log,
            poisoned: false,
        }
    }

    /// Applies changes at revision `rev` to memory and returns the events; no I/O.
    fn apply(&mut self, rev: i64, changes: Vec<Change>) -> Vec<WatchEvent> {
        let mut events = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Put { key, value, lease } => {
                    let old = self.kvs.get(&key).map(|e| (e.create_revision, e.lease));
                    let create_revision = match old {
                        Some((created, old_lease)) => {
                            if old_lease != lease {
                                self.detach(&key, old_lease);
                            }
                            created
                        }
                        None => rev,
                    };
                    if let Some(l) = self.leases.get_mut(&lease) {
                        l.keys.insert(key.clone());
                    }
                    let entry = Entry {
                        value,
                        create_revision,
                        mod_revision: rev,
                        lease,
                    };
                    events.push(WatchEvent {
                        kind: WatchEventKind::Put,
                        kv: kv_of(&key, &entry),
                        revision: rev,
                    });
                    self.kvs.insert(key, entry);
                }
                Change::Delete { key } => {
                    if let Some(old) = self.kvs.remove(&key) {
                        self.detach(&key, old.lease);
                        events.push(WatchEvent {
                            kind: WatchEventKind::Delete,
                            kv: Kv {
                                key,
                                value: Vec::new(),
                                create_revision: 0,
                                mod_revision: rev,
                                lease: 0,
                            },
                            revision: rev,
                        });
                    }
                }
            }
        }
        self.revision = rev;
        events
    }

    fn detach(&mut self, key: &str, lease: i64) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.remove(key);
        }
    }

    /// Makes `changes` durable (if a log is configured), then visible. Returns the revision
    /// after the commit; an empty change set commits nothing and keeps the revision.
    async fn commit(&mut self, changes: Vec<Change>) -> StoreResult<i64> {
        if changes.is_empty() {
            return Ok(self.revision);
        }
        let rev = self.revision + 1;
        if let Some(log) = &self.log {
            if self.poisoned {
                return Err(StoreError::Other(
                    "embedded store log write failed earlier; restart the coordinator to \
                     recover from the log"
                        .to_owned(),
                ));
            }
            let record = LogRecord { rev, changes };
            let mut line = serde_json::to_vec(&record)
                .map_err(|e| StoreError::Other(format!("encoding log record: {e}")))?;
            line.push(b'\n');
            let file = Arc::clone(log);
            // fsync blocks; keep it off the async worker threads. The state lock stays held
            // across the write so log order is revision order.
            let written = tokio::task::spawn_blocking(move || {
                (&*file).write_all(&line)?;
                file.sync_data()
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.poisoned = true;
                    // The record may or may not be on disk: an ambiguous outcome.
                    return Err(StoreError::Other(format!(
                        "writing embedded store log: {e}"
                    )));
                }
                Err(e) => {
                    self.poisoned = true;
                    return Err(StoreError::Other(format!("log writer task failed: {e}")));
                }
            }
            let events = self.apply(rev, record.changes);
            self.publish(events);
        } else {
            let events = self.apply(rev, changes);
            self.publish(events);
        }
        Ok(rev)
    }

    fn publish(&mut self, events: Vec<WatchEvent>) {
        for ev in &events {
            self.watchers
                .retain(|w| !ev.kv.key.starts_with(&w.prefix) || w.tx.send(Ok(ev.clone())).is_ok());
        }
        self.history.extend(events);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted = self.compacted.max(old.revision);
            }
        }
    }

    /// Ends one lease: deletes its keys in one new revision, then forgets it.
    async fn end_lease(&mut self, id: i64) -> StoreResult<()> {
        let Some(lease) = self.leases.get(&id) else {
            return Ok(());
        };
        let changes = lease
            .keys
            .iter()
            .map(|key| Change::Delete { key: key.clone() })
            .collect();
        self.commit(changes).await?;
        self.leases.remove(&id);
        Ok(())
    }

    /// Expires every lease whose deadline has passed. Called before every operation (so
    /// results never depend on when the background task last ran) and by that task.
    async fn expire_due(&mut self, now: Instant) -> StoreResult<()> {
        let mut due: Vec<(Instant, i64)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, l)| (l.deadline, *id))
            .collect();
        due.sort();
        for (_, id) in due {
            self.end_lease(id).await?;
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }

    fn lookup(&self, key: &str) -> Option<&Entry> {
        self.kvs.get(key)
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::CreateRevision { key, op, rev } => {
                let stored = self.lookup(key).map_or(0, |e| e.create_revision);
                op.holds(&stored, rev)
            }
            Compare::ModRevision { key, op, rev } => {
                let stored = self.lookup(key).map_or(0, |e| e.mod_revision);
                op.holds(&stored, rev)
            }
            // etcd fails a value compare on a missing key whatever the operator.
            Compare::Value { key, op, value } => self
                .lookup(key)
                .is_some_and(|e| op.holds(e.value.as_slice(), value.as_slice())),
        }
    }

    fn resolve(&self, ops: Vec<Op>) -> StoreResult<Vec<Change>> {
        let mut changes = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    if lease != 0 && !self.leases.contains_key(&lease) {
                        return Err(StoreError::LeaseNotFound(lease));
                    }
                    changes.push(Change::Put { key, value, lease });
                }
                Op::Delete { key } => {
                    if self.kvs.contains_key(&key) {
                        changes.push(Change::Delete { key });
                    }
                }
                Op::DeletePrefix { prefix } => {
                    changes.extend(
                        self.kvs
                            .range(prefix.clone()..)
                            .take_while(|(k, _)| k.starts_with(&prefix))
                            .map(|(k, _)| Change::Delete { key: k.clone() }),
                    );
                }
            }
        }
        Ok(changes)
    }
}

fn kv_of(key: &str, e: &Entry) -> Kv {
    Kv {
        key: key.to_owned(),
        value: e.value.clone(),
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
        lease: e.lease,
    }
}

/// Reads the log, dropping a torn last line (a crash mid-append), and returns the records and
/// the file opened for appending.
fn read_log(dir: &Path) -> StoreResult<(Vec<LogRecord>, File)> {
    let io =
        |what: &str, e: std::io::Error| StoreError::Other(format!("{what} {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| io("creating data dir", e))?;
    let path = dir.join(LOG_FILE);
    let existed = path.exists();
    let mut bytes = if existed {
        std::fs::read(&path).map_err(|e| io("reading log in", e))?
    } else {
        Vec::new()
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        tracing::warn!(
            path = %path.display(),
            dropped_bytes = bytes.len() - complete,
            "embedded store log ends in a partial record (crash during append); dropping it"
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io("opening log in", e))?;
        f.set_len(complete as u64)
            .map_err(|e| io("truncating log in", e))?;
        f.sync_all().map_err(|e| io("syncing log in", e))?;
        bytes.truncate(complete);
    }
    let mut records = Vec::new();
    let mut last_rev = 1;
    for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let record: LogRecord = serde_json::from_slice(line).map_err(|e| {
            StoreError::Other(format!(
                "corrupt embedded store log {} at line {}: {e}; restore the data dir from a \
                 backup or move the file away to start empty",
                path.display(),
                n + 1
            ))
        })?;
        if record.rev <= last_rev {
            return Err(StoreError::Other(format!(
                "corrupt embedded store log {} at line {}: revision {} after {last_rev}",
                path.display(),
                n + 1,
                record.rev
            )));
        }
        last_rev = record.rev;
        records.push(record);
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io("opening log in", e))?;
    if !existed {
        // Make the new file's directory entry durable too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing data dir", e))?;
    }
    Ok((records, file))
}

impl MemStore {
    /// Opens the store. With a data dir, replays `store.log` from it (creating both if
    /// needed) and appends every later commit with an fsync; without one, the store lives in
    /// memory only.
    pub async fn open(data_dir: Option<&Path>) -> StoreResult<MemStore> {
        let data_dir = data_dir.map(Path::to_path_buf);
        let mut state = match &data_dir {
            None => State::new(None),
            Some(dir) => {
                let dir = dir.clone();
                let (records, file) =
                    tokio::task::spawn_blocking(move || read_log(&dir))
                        .await
                        .map_err(|e| StoreError::Other(format!("log reader task failed: {e}")))??;
                let mut state = State::new(Some(Arc::new(file)));
                for record in records {
                    let events = state.apply(record.rev, record.changes);
                    state.publish(events);
                }
                // Leases do not survive a restart: drop their keys now, with a new (logged)
                // revision, exactly as if they had expired.
                let orphans: Vec<Change> = state
                    .kvs
                    .iter()
                    .filter(|(_, e)| e.lease != 0)
                    .map(|(k, _)| Change::Delete { key: k.clone() })
                    .collect();
                state.commit(orphans).await?;
                state
            }
        };
        state.watchers.clear();
        let lease_added = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            lease_added: Arc::clone(&lease_added),
            expiry_task: std::sync::Mutex::new(None),
            data_dir,
        });
        let task = tokio::spawn(expiry_loop(Arc::downgrade(&shared), lease_added));
        if let Ok(mut slot) = shared.expiry_task.lock() {
            *slot = Some(task.abort_handle());
        }
        Ok(MemStore { shared })
    }

    /// Locks the state after expiring due leases.
    async fn state(&self) -> StoreResult<tokio::sync::MutexGuard<'_, State>> {
        let mut state = self.shared.state.lock().await;
        state.expire_due(Instant::now()).await?;
        Ok(state)
    }
}

/// Expires leases on time even when nobody calls the store, so watchers see the deletes.
async fn expiry_loop(shared: Weak<Shared>, lease_added: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = shared.state.lock().await;
            if let Err(e) = state.expire_due(Instant::now()).await {
                tracing::error!(error = %e, "embedded store could not expire leases");
            }
            state.next_deadline()
        };
        let wake = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            () = lease_added.notified() => {}
        }
    }
}

impl Store for MemStore {
    fn range_prefix<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Range> {
        Box::pin(async move {
            let state = self.state().await?;
            let kvs = state
                .kvs
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, e)| kv_of(k, e))
                .collect();
            Ok(Range {
                revision: state.revision,
                kvs,
            })
        })
    }

    fn prefix_ends<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, (Option<Kv>, Option<Kv>)> {
        Box::pin(async move {
            let state = self.state().await?;
            let first = state
                .kvs
                .range(prefix.to_owned()..)
                .next()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, e)| kv_of(k, e));
            // The last key under the prefix is the last one before the prefix's successor
            // (the prefix with its last character incremented), found without a scan.
            let last = match prefix_successor(prefix) {
                Some(end) => state.kvs.range(prefix.to_owned()..end).next_back(),
                None => state.kvs.range(prefix.to_owned()..).next_back(),
            }
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| kv_of(k, e));
            Ok((first, last))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Kv>> {
        Box::pin(async move {
            let state = self.state().await?;
            Ok(state.kvs.get(key).map(|e| kv_of(key, e)))
        })
    }

    fn txn<'a>(
        &'a self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> StoreFuture<'a, TxnOutcome> {
        Box::pin(async move {
            check_branch(&success)?;
            check_branch(&failure)?;
            let mut state = self.state().await?;
            let succeeded = compares.iter().all(|c| state.holds(c));
            let branch = if succeeded { success } else { failure };
            let changes = state.resolve(branch)?;
            let revision = state.commit(changes).await?;
            Ok(TxnOutcome {
                succeeded,
                revision,
            })
        })
    }

    fn lease_grant(&self, ttl_secs: i64) -> StoreFuture<'_, LeaseId> {
        Box::pin(async move {
            let ttl = ttl_secs.max(MIN_TTL_SECS);
            let mut state = self.state().await?;
            let id = state.next_lease;
            state.next_lease += 1;
            state.leases.insert(
                id,
                LeaseState {
                    ttl,
                    deadline: Instant::now() + Duration::from_secs(ttl as u64),
                    keys: BTreeSet::new(),
                },
            );
            self.shared.lease_added.notify_one();
            Ok(LeaseId(id))
        })
    }

    fn lease_keepalive(&self, id: LeaseId) -> StoreFuture<'_, Option<i64>> {
        Box::pin(async move {
            let mut state = self.state().await?;
            Ok(state.leases.get_mut(&id.0).map(|l| {
                l.deadline = Instant::now() + Duration::from_secs(l.ttl as u64);
                l.ttl
            }))
        })
    }

    fn lease_revoke(&self, id: LeaseId) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut state = self.state().await?;
            state.end_lease(id.0).await
        })
    }

    fn lease_time_to_live(&self, id: LeaseId) -> StoreFuture<'_, Option<i64>> {
        Box::pin(async move {
            let state = self.state().await?;
            let now = Instant::now();
            // Rounded up so a live lease never reports 0.
            Ok(state.leases.get(&id.0).map(|l| {
                let left = l.deadline.saturating_duration_since(now);
                i64::try_from(left.as_millis().div_ceil(1000)).unwrap_or(i64::MAX)
            }))
        })
    }

    fn watch_prefix<'a>(
        &'a self,
        prefix: &'a str,
        start_revision: i64,
    ) -> StoreFuture<'a, WatchStream> {
        Box::pin(async move {
            let mut state = self.state().await?;
            let start = if start_revision <= 0 {
                state.revision + 1
            } else {
                start_revision
            };
            if start <= state.compacted {
                return Err(StoreError::Other(format!(
                    "watch on {prefix:?} from revision {start}: required revision has been \
                     compacted (oldest available {})",
                    state.compacted + 1
                )));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            for ev in state
                .history
                .iter()
                .filter(|ev| ev.revision >= start && ev.kv.key.starts_with(prefix))
            {
                // The receiver is still in hand, so this cannot fail.
                let _ = tx.send(Ok(ev.clone()));
            }
            state.watchers.push(Watcher {
                prefix: prefix.to_owned(),
                tx,
            });
            Ok(WatchStream::new(UnboundedReceiverStream::new(rx)))
        })
    }

    fn status(&self) -> StoreFuture<'_, StoreStatus> {
        Box::pin(async move {
            let state = self.state().await?;
            Ok(StoreStatus {
                revision: state.revision,
                kind: "embedded",
                endpoint: self
                    .shared
                    .data_dir
                    .as_ref()
                    .map_or_else(|| "memory".to_owned(), |d| d.display().to_string()),
            })
        })
    }
}

/// The smallest string greater than every string starting with `prefix`, if there is one.
fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(c) = chars.pop() {
        if let Some(next) = char::from_u32(u32::from(c) + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}
