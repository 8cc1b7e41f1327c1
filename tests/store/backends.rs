//! Runs the conformance suite against each backend, and the embedded store's durability tests.

use std::io::Write;
use std::sync::Arc;

use interlock_coordinator::store::mem::MemStore;
use interlock_coordinator::store::{Op, Store};

use super::conformance::{fresh_prefix, run_all};
use interlock_tests::Etcd;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_embedded_in_memory() {
    let store = MemStore::open(None).await.expect("open");
    run_all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_embedded_with_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MemStore::open(Some(dir.path())).await.expect("open");
    run_all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_etcd() {
    let etcd = Etcd::start().expect("start etcd");
    let store = etcd_store(&etcd).await;
    let status = store.status().await.expect("status");
    assert_eq!(
        (status.kind, status.endpoint.as_str()),
        ("etcd", etcd.endpoint().as_str())
    );
    run_all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_connect_to_nothing_is_unavailable_and_bounded() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let opts = interlock_coordinator::store::etcd::EtcdOptions {
        connect_timeout: std::time::Duration::from_millis(500),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let err = interlock_coordinator::store::etcd::EtcdStore::connect(
        &[format!("http://127.0.0.1:{port}")],
        opts,
    )
    .await
    .expect_err("nothing listens there");
    assert!(
        matches!(
            err,
            interlock_coordinator::store::StoreError::Unavailable(_)
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

fn put(key: &str, value: &str, lease: i64) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        lease,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_log_replays_and_drops_leased_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = fresh_prefix();
    let (plain, leased) = (format!("{p}plain"), format!("{p}leased"));
    let (plain_kv, last_rev, lease) = {
        let store = MemStore::open(Some(dir.path())).await.expect("open");
        let lease = store.lease_grant(60).await.expect("grant");
        store
            .txn(vec![], vec![put(&plain, "1", 0)], vec![])
            .await
            .expect("put");
        let last = store
            .txn(
                vec![],
                vec![put(&plain, "2", 0), put(&leased, "x", lease.0)],
                vec![],
            )
            .await
            .expect("put");
        let kv = store.get(&plain).await.expect("get").expect("plain");
        (kv, last.revision, lease)
    };
    let store = MemStore::open(Some(dir.path())).await.expect("reopen");
    assert_eq!(store.get(&plain).await.expect("get"), Some(plain_kv));
    assert_eq!(
        store.get(&leased).await.expect("get"),
        None,
        "leases do not survive restart"
    );
    assert_eq!(store.lease_time_to_live(lease).await.expect("ttl"), None);
    let status = store.status().await.expect("status");
    assert_eq!(status.kind, "embedded");
    assert_eq!(
        status.revision,
        last_rev + 1,
        "dropping leased keys is a new revision"
    );
    let next = store
        .txn(vec![], vec![put(&plain, "3", 0)], vec![])
        .await
        .expect("put");
    assert_eq!(
        next.revision,
        last_rev + 2,
        "revisions continue; tokens are never reused"
    );
    // The history survives too: a watch from the first revision replays it.
    let mut w = store.watch_prefix(&p, 1).await.expect("watch");
    let first = futures_util::StreamExt::next(&mut w)
        .await
        .expect("event")
        .expect("ok");
    assert_eq!(first.kv.value, b"1");
    drop(store);

    // A third open sees the same state (the orphan deletion was logged, not redone).
    let store = MemStore::open(Some(dir.path()))
        .await
        .expect("reopen again");
    assert_eq!(store.status().await.expect("status").revision, last_rev + 2);
    assert_eq!(
        store.get(&plain).await.expect("get").expect("plain").value,
        b"3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_log_drops_a_torn_tail_and_refuses_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rev = {
        let store = MemStore::open(Some(dir.path())).await.expect("open");
        store
            .txn(vec![], vec![put("k", "v", 0)], vec![])
            .await
            .expect("put")
            .revision
    };
    let log = dir.path().join("store.log");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("log");
    f.write_all(br#"{"rev":99,"changes":[{"op":"put","key":"torn""#)
        .expect("append torn record");
    drop(f);
    let store = MemStore::open(Some(dir.path()))
        .await
        .expect("open with torn tail");
    assert_eq!(store.status().await.expect("status").revision, rev);
    let next = store
        .txn(vec![], vec![put("k", "w", 0)], vec![])
        .await
        .expect("put after torn tail");
    assert_eq!(next.revision, rev + 1);
    drop(store);

    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("log");
    f.write_all(b"not json\n").expect("append garbage");
    drop(f);
    let err = MemStore::open(Some(dir.path()))
        .await
        .expect_err("corrupt log");
    assert!(
        err.to_string().contains("corrupt embedded store log"),
        "{err}"
    );
}

async fn etcd_store(etcd: &Etcd) -> interlock_coordinator::store::etcd::EtcdStore {
    interlock_coordinator::store::etcd::EtcdStore::connect(
        &[etcd.endpoint()],
        interlock_coordinator::store::etcd::EtcdOptions::default(),
    )
    .await
    .expect("connect to test etcd")
}
