//! The store conformance suite: one set of checks that every [`Store`] implementation must
//! pass, run against the embedded store and a real etcd. Each check works under its own fresh
//! random key prefix, so checks never see each other's keys. Uses only the public store API.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use interlock_coordinator::store::election::{self, ElectionError};
use interlock_coordinator::store::{
    CmpOp, Compare, Kv, Op, Store, StoreError, WatchEvent, WatchEventKind, WatchStream,
};

type DynStore = Arc<dyn Store>;
/// One conformance check: gets the store and a fresh prefix.
type Check = fn(DynStore, String) -> futures_util::future::BoxFuture<'static, ()>;

/// A key prefix no other check (or earlier run against the same etcd) uses.
pub fn fresh_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "/conformance/{}-{nanos:x}-{}/",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        lease: 0,
    }
}

async fn put_one(store: &DynStore, key: &str, value: &str) -> i64 {
    let out = store
        .txn(vec![], vec![put(key, value)], vec![])
        .await
        .expect("put");
    assert!(out.succeeded);
    out.revision
}

async fn next_event(stream: &mut WatchStream, within: Duration) -> WatchEvent {
    tokio::time::timeout(within, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no watch event within {within:?}"))
        .expect("watch stream ended")
        .expect("watch error")
}

/// Runs every check, each under a fresh prefix.
pub async fn run_all(store: DynStore) {
    let checks: [(&str, Check); 14] = [
        ("prefix_ends", |s, p| Box::pin(prefix_ends(s, p))),
        ("put_get_range", |s, p| Box::pin(put_get_range(s, p))),
        ("create_revision_once", |s, p| {
            Box::pin(create_revision_once(s, p))
        }),
        ("mod_revision_compare", |s, p| {
            Box::pin(mod_revision_compare(s, p))
        }),
        ("value_compare", |s, p| Box::pin(value_compare(s, p))),
        ("failure_branch", |s, p| Box::pin(failure_branch(s, p))),
        ("delete_bumps_revision", |s, p| {
            Box::pin(delete_bumps_revision(s, p))
        }),
        ("revisions_strictly_increase", |s, p| {
            Box::pin(revisions_strictly_increase(s, p))
        }),
        ("watch_from_past_revision", |s, p| {
            Box::pin(watch_from_past_revision(s, p))
        }),
        ("lease_lifecycle", |s, p| Box::pin(lease_lifecycle(s, p))),
        ("lease_expiry", |s, p| Box::pin(lease_expiry(s, p))),
        ("prefix_isolation", |s, p| Box::pin(prefix_isolation(s, p))),
        ("election", |s, p| Box::pin(election_handover(s, p))),
        ("election_lease_lost_while_waiting", |s, p| {
            Box::pin(election_lease_lost_while_waiting(s, p))
        }),
    ];
    let kind = store.status().await.expect("status").kind;
    for (name, check) in checks {
        let started = Instant::now();
        check(Arc::clone(&store), fresh_prefix()).await;
        eprintln!("conformance[{kind}] {name}: ok in {:?}", started.elapsed());
    }
}

pub async fn put_get_range(store: DynStore, p: String) {
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let r1 = put_one(&store, &a, "1").await;
    let got = store.get(&a).await.expect("get").expect("a exists");
    assert_eq!(
        got,
        Kv {
            key: a.clone(),
            value: b"1".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            lease: 0
        }
    );
    let r2 = put_one(&store, &a, "2").await;
    assert!(r2 > r1);
    let got = store.get(&a).await.expect("get").expect("a exists");
    assert_eq!((got.create_revision, got.mod_revision), (r1, r2));
    assert_eq!(got.value, b"2");
    let r3 = put_one(&store, &b, "3").await;
    let range = store.range_prefix(&p).await.expect("range");
    assert!(range.revision >= r3);
    let keys: Vec<_> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, [a.as_str(), b.as_str()]);
    assert_eq!(range.kvs[1].mod_revision, r3);
    assert_eq!(store.get(&format!("{p}missing")).await.expect("get"), None);
    let status = store.status().await.expect("status");
    assert!(status.revision >= r3);
}

pub async fn create_revision_once(store: DynStore, p: String) {
    let key = format!("{p}slot");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = Arc::clone(&store);
            let key = key.clone();
            tokio::spawn(async move {
                let absent = Compare::CreateRevision {
                    key: key.clone(),
                    op: CmpOp::Equal,
                    rev: 0,
                };
                let out = store
                    .txn(vec![absent], vec![put(&key, &i.to_string())], vec![])
                    .await
                    .expect("txn");
                out.succeeded.then_some((i, out.revision))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(w) = t.await.expect("task") {
            winners.push(w);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner, got {winners:?}");
    let (winner, token) = winners[0];
    let kv = store.get(&key).await.expect("get").expect("slot exists");
    assert_eq!(kv.value, winner.to_string().as_bytes());
    assert_eq!((kv.create_revision, kv.mod_revision), (token, token));
    let again = store
        .txn(
            vec![Compare::CreateRevision {
                key: key.clone(),
                op: CmpOp::Equal,
                rev: 0,
            }],
            vec![put(&key, "late")],
            vec![],
        )
        .await
        .expect("txn");
    assert!(!again.succeeded);
}

pub async fn mod_revision_compare(store: DynStore, p: String) {
    let key = format!("{p}k");
    let r1 = put_one(&store, &key, "v1").await;
    let guard = |rev| Compare::ModRevision {
        key: key.clone(),
        op: CmpOp::Equal,
        rev,
    };
    let ok = store
        .txn(vec![guard(r1)], vec![put(&key, "v2")], vec![])
        .await
        .expect("txn");
    assert!(ok.succeeded);
    assert!(ok.revision > r1);
    let stale = store
        .txn(vec![guard(r1)], vec![put(&key, "v3")], vec![])
        .await
        .expect("txn");
    assert!(!stale.succeeded);
    assert_eq!(
        stale.revision, ok.revision,
        "a failed compare writes nothing"
    );
    assert_eq!(store.get(&key).await.expect("get").expect("k").value, b"v2");
    // Greater/Less on a missing key compare against 0.
    let missing = format!("{p}missing");
    let less = store
        .txn(
            vec![Compare::ModRevision {
                key: missing.clone(),
                op: CmpOp::Less,
                rev: 1,
            }],
            vec![],
            vec![],
        )
        .await
        .expect("txn");
    assert!(less.succeeded);
    let greater = store
        .txn(
            vec![Compare::ModRevision {
                key: key.clone(),
                op: CmpOp::Greater,
                rev: r1,
            }],
            vec![],
            vec![],
        )
        .await
        .expect("txn");
    assert!(greater.succeeded);
}

pub async fn value_compare(store: DynStore, p: String) {
    let key = format!("{p}k");
    put_one(&store, &key, "b").await;
    let cmp = |op, v: &str| Compare::Value {
        key: key.clone(),
        op,
        value: v.as_bytes().to_vec(),
    };
    for (op, v, want) in [
        (CmpOp::Equal, "b", true),
        (CmpOp::Equal, "a", false),
        (CmpOp::NotEqual, "a", true),
        (CmpOp::Greater, "a", true),
        (CmpOp::Less, "c", true),
        (CmpOp::Less, "a", false),
    ] {
        let out = store
            .txn(vec![cmp(op, v)], vec![], vec![])
            .await
            .expect("txn");
        assert_eq!(out.succeeded, want, "value {op:?} {v}");
    }
    let on_missing = store
        .txn(
            vec![Compare::Value {
                key: format!("{p}missing"),
                op: CmpOp::NotEqual,
                value: b"x".to_vec(),
            }],
            vec![],
            vec![],
        )
        .await
        .expect("txn");
    assert!(
        !on_missing.succeeded,
        "a value compare on a missing key fails"
    );
}

pub async fn failure_branch(store: DynStore, p: String) {
    let (k, f) = (format!("{p}k"), format!("{p}f"));
    let before = store.status().await.expect("status").revision;
    let out = store
        .txn(
            vec![Compare::CreateRevision {
                key: k.clone(),
                op: CmpOp::Greater,
                rev: 0,
            }],
            vec![put(&k, "success")],
            vec![put(&f, "failure")],
        )
        .await
        .expect("txn");
    assert!(!out.succeeded);
    assert!(out.revision > before);
    assert_eq!(store.get(&k).await.expect("get"), None);
    let kv = store
        .get(&f)
        .await
        .expect("get")
        .expect("failure branch wrote");
    assert_eq!(kv.value, b"failure");
    assert_eq!(kv.mod_revision, out.revision);
    // Two puts to one key in one branch are refused, as by etcd.
    let dup = store
        .txn(vec![], vec![put(&k, "1"), put(&k, "2")], vec![])
        .await;
    assert!(matches!(dup, Err(StoreError::Other(_))), "{dup:?}");
}

pub async fn delete_bumps_revision(store: DynStore, p: String) {
    let (a, b, c) = (format!("{p}a"), format!("{p}sub/b"), format!("{p}sub/c"));
    put_one(&store, &a, "1").await;
    put_one(&store, &b, "2").await;
    let r = put_one(&store, &c, "3").await;
    let del = store
        .txn(vec![], vec![Op::Delete { key: a.clone() }], vec![])
        .await
        .expect("delete");
    assert_eq!(del.revision, r + 1);
    assert_eq!(store.get(&a).await.expect("get"), None);
    let nothing = store
        .txn(vec![], vec![Op::Delete { key: a.clone() }], vec![])
        .await
        .expect("delete missing");
    assert_eq!(
        nothing.revision, del.revision,
        "deleting nothing writes nothing"
    );
    let prefix_del = store
        .txn(
            vec![],
            vec![Op::DeletePrefix {
                prefix: format!("{p}sub/"),
            }],
            vec![],
        )
        .await
        .expect("delete prefix");
    assert_eq!(
        prefix_del.revision,
        del.revision + 1,
        "one revision per txn"
    );
    assert!(store.range_prefix(&p).await.expect("range").kvs.is_empty());
    // Re-creating a deleted key starts a new life: fresh create_revision.
    let again = put_one(&store, &a, "again").await;
    let kv = store.get(&a).await.expect("get").expect("a");
    assert_eq!(kv.create_revision, again);
}

pub async fn revisions_strictly_increase(store: DynStore, p: String) {
    let mut last = 0;
    for i in 0..10 {
        let key = format!("{p}{}", i % 3);
        let rev = put_one(&store, &key, &i.to_string()).await;
        assert!(rev > last, "revision {rev} after {last}");
        let kv = store.get(&key).await.expect("get").expect("key");
        assert_eq!(
            kv.mod_revision, rev,
            "a put's mod_revision is the txn revision"
        );
        last = rev;
    }
}

pub async fn watch_from_past_revision(store: DynStore, p: String) {
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let r1 = put_one(&store, &a, "1").await;
    let r2 = put_one(&store, &b, "2").await;
    let mut w = store.watch_prefix(&p, r1).await.expect("watch");
    let e1 = next_event(&mut w, Duration::from_secs(2)).await;
    assert_eq!(
        (e1.kind, e1.kv.key.as_str(), e1.revision),
        (WatchEventKind::Put, a.as_str(), r1)
    );
    let e2 = next_event(&mut w, Duration::from_secs(2)).await;
    assert_eq!(
        (e2.kind, e2.kv.key.as_str(), e2.revision),
        (WatchEventKind::Put, b.as_str(), r2)
    );
    let r3 = store
        .txn(vec![], vec![Op::Delete { key: a.clone() }], vec![])
        .await
        .expect("delete")
        .revision;
    let e3 = next_event(&mut w, Duration::from_secs(2)).await;
    assert_eq!(e3.kind, WatchEventKind::Delete);
    assert_eq!(
        (e3.kv.key.as_str(), e3.kv.mod_revision, e3.revision),
        (a.as_str(), r3, r3)
    );
    // start_revision 0 means "from now on".
    let mut live = store.watch_prefix(&p, 0).await.expect("watch");
    let r4 = put_one(&store, &b, "4").await;
    let e4 = next_event(&mut live, Duration::from_secs(2)).await;
    assert_eq!(
        (e4.kv.key.as_str(), e4.revision, e4.kv.value.as_slice()),
        (b.as_str(), r4, &b"4"[..])
    );
}

pub async fn lease_lifecycle(store: DynStore, p: String) {
    let (k, plain) = (format!("{p}leased"), format!("{p}plain"));
    let lease = store.lease_grant(10).await.expect("grant");
    let ttl = store
        .lease_time_to_live(lease)
        .await
        .expect("ttl")
        .expect("alive");
    assert!((1..=10).contains(&ttl), "ttl {ttl}");
    store
        .txn(
            vec![],
            vec![
                Op::Put {
                    key: k.clone(),
                    value: b"x".to_vec(),
                    lease: lease.0,
                },
                put(&plain, "y"),
            ],
            vec![],
        )
        .await
        .expect("put with lease");
    assert_eq!(store.get(&k).await.expect("get").expect("k").lease, lease.0);
    assert_eq!(
        store.lease_keepalive(lease).await.expect("keepalive"),
        Some(10)
    );
    store.lease_revoke(lease).await.expect("revoke");
    assert_eq!(
        store.get(&k).await.expect("get"),
        None,
        "revoke deletes attached keys"
    );
    assert!(
        store.get(&plain).await.expect("get").is_some(),
        "unattached key survives"
    );
    assert_eq!(store.lease_keepalive(lease).await.expect("keepalive"), None);
    assert_eq!(store.lease_time_to_live(lease).await.expect("ttl"), None);
    store
        .lease_revoke(lease)
        .await
        .expect("revoking a gone lease is fine");
    let refused = store
        .txn(
            vec![],
            vec![Op::Put {
                key: k.clone(),
                value: b"x".to_vec(),
                lease: lease.0,
            }],
            vec![],
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::LeaseNotFound(_))),
        "{refused:?}"
    );
    // TTLs below etcd's minimum are raised to 2 s.
    let short = store.lease_grant(1).await.expect("grant");
    assert_eq!(
        store.lease_keepalive(short).await.expect("keepalive"),
        Some(2)
    );
    store.lease_revoke(short).await.expect("revoke");
}

pub async fn lease_expiry(store: DynStore, p: String) {
    let k = format!("{p}leased");
    let granted = Instant::now();
    let lease = store.lease_grant(2).await.expect("grant");
    let put_rev = store
        .txn(
            vec![],
            vec![Op::Put {
                key: k.clone(),
                value: b"x".to_vec(),
                lease: lease.0,
            }],
            vec![],
        )
        .await
        .expect("put")
        .revision;
    let mut w = store.watch_prefix(&p, put_rev + 1).await.expect("watch");
    let limit = Duration::from_millis(3500);
    let ev = next_event(&mut w, limit.saturating_sub(granted.elapsed())).await;
    assert_eq!(
        (ev.kind, ev.kv.key.as_str()),
        (WatchEventKind::Delete, k.as_str())
    );
    assert!(ev.revision > put_rev);
    assert!(
        granted.elapsed() <= limit,
        "expired after {:?}",
        granted.elapsed()
    );
    assert!(
        granted.elapsed() >= Duration::from_millis(1500),
        "expired too early: {:?}",
        granted.elapsed()
    );
    assert_eq!(store.get(&k).await.expect("get"), None);
    assert_eq!(store.lease_time_to_live(lease).await.expect("ttl"), None);
}

/// `prefix_ends` finds the first and last key under a prefix, and none of a neighbour's.
pub async fn prefix_ends(store: DynStore, p: String) {
    let (pa, pb) = (format!("{p}a/"), format!("{p}b/"));
    assert_eq!(store.prefix_ends(&pa).await.expect("ends"), (None, None));
    for i in [5u32, 1, 9, 3] {
        put_one(&store, &format!("{pa}{i:04}"), "v").await;
    }
    put_one(&store, &format!("{pb}0000"), "neighbour").await;
    put_one(&store, &format!("{p}a"), "the prefix without its slash").await;
    let (first, last) = store.prefix_ends(&pa).await.expect("ends");
    assert_eq!(first.map(|kv| kv.key), Some(format!("{pa}0001")));
    assert_eq!(last.map(|kv| kv.key), Some(format!("{pa}0009")));
    let (first, last) = store.prefix_ends(&pb).await.expect("ends");
    assert_eq!(first.map(|kv| kv.key.clone()), last.map(|kv| kv.key));
}

pub async fn prefix_isolation(store: DynStore, p: String) {
    // "x/" and "xy/" share a string prefix but not a key prefix.
    let (pa, pb) = (format!("{p}x/"), format!("{p}xy/"));
    let mut wa = store.watch_prefix(&pa, 0).await.expect("watch a");
    put_one(&store, &format!("{pb}1"), "b").await;
    let ra = put_one(&store, &format!("{pa}1"), "a").await;
    let ev = next_event(&mut wa, Duration::from_secs(2)).await;
    assert_eq!(
        (ev.kv.key, ev.revision),
        (format!("{pa}1"), ra),
        "watch on a saw b"
    );
    let a = store.range_prefix(&pa).await.expect("range a");
    assert_eq!(a.kvs.len(), 1);
    store
        .txn(
            vec![],
            vec![Op::DeletePrefix { prefix: pa.clone() }],
            vec![],
        )
        .await
        .expect("delete a");
    assert!(
        store
            .range_prefix(&pa)
            .await
            .expect("range a")
            .kvs
            .is_empty()
    );
    assert_eq!(store.range_prefix(&pb).await.expect("range b").kvs.len(), 1);
}

pub async fn election_handover(store: DynStore, p: String) {
    let election = format!("{p}leader");
    let data = format!("{p}data");
    let la = store.lease_grant(10).await.expect("grant a");
    let lb = store.lease_grant(10).await.expect("grant b");
    let a = election::campaign(&*store, &election, b"a", la)
        .await
        .expect("a campaigns");
    let leader = election::current_leader(&*store, &election)
        .await
        .expect("leader");
    assert_eq!(leader, Some((a.key.clone(), b"a".to_vec())));
    // Campaigning again with the same lease keeps the same key and place.
    let a_again = election::campaign(&*store, &election, b"a", la)
        .await
        .expect("again");
    assert_eq!(a_again, a);

    let b = election::campaign(&*store, &election, b"b", lb);
    tokio::pin!(b);
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut b)
            .await
            .is_err(),
        "b became leader while a leads"
    );
    let guarded = |leader: &election::LeaderKey| {
        let store = Arc::clone(&store);
        let data = data.clone();
        let guard = election::leader_guard(leader);
        async move {
            store
                .txn(vec![guard], vec![put(&data, "w")], vec![])
                .await
                .expect("txn")
                .succeeded
        }
    };
    assert!(guarded(&a).await, "the leader can write");
    store.lease_revoke(la).await.expect("revoke a");
    let b = tokio::time::timeout(Duration::from_secs(5), &mut b)
        .await
        .expect("b elected after a's lease ended")
        .expect("b campaign");
    assert!(b.create_revision > a.create_revision);
    let leader = election::current_leader(&*store, &election)
        .await
        .expect("leader");
    assert_eq!(leader, Some((b.key.clone(), b"b".to_vec())));
    assert!(!guarded(&a).await, "a deposed leader cannot commit");
    assert!(guarded(&b).await, "the new leader can write");

    election::resign(&*store, &b).await.expect("resign");
    assert_eq!(
        election::current_leader(&*store, &election)
            .await
            .expect("leader"),
        None
    );
    assert!(!guarded(&b).await, "a resigned leader cannot commit");
    // Campaigning on a dead lease is refused.
    let lost = election::campaign(&*store, &election, b"a", la).await;
    assert_eq!(lost, Err(ElectionError::LeaseLost(la.0)));
    store.lease_revoke(lb).await.expect("revoke b");
}

pub async fn election_lease_lost_while_waiting(store: DynStore, p: String) {
    let election = format!("{p}leader");
    let la = store.lease_grant(30).await.expect("grant a");
    let lb = store.lease_grant(2).await.expect("grant b");
    election::campaign(&*store, &election, b"a", la)
        .await
        .expect("a leads");
    // b waits behind a and never renews: its campaign must end with LeaseLost, not hang.
    let started = Instant::now();
    let lost = tokio::time::timeout(
        Duration::from_secs(6),
        election::campaign(&*store, &election, b"b", lb),
    )
    .await
    .expect("campaign noticed the lost lease");
    assert_eq!(lost, Err(ElectionError::LeaseLost(lb.0)));
    assert!(started.elapsed() >= Duration::from_millis(1500));
    store.lease_revoke(la).await.expect("revoke a");
}
