//! The harness starts a real etcd that etcd-client can use, and stops it on drop.

use etcd_client::Client;
use interlock_tests::{Etcd, fresh_prefix};

#[tokio::test]
async fn etcd_started_by_the_harness_stores_and_returns_a_key() {
    let etcd = Etcd::start().expect("start etcd");
    let mut client = Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect to etcd");
    let key = format!("{}/hello", fresh_prefix("etcd_harness"));
    client.put(key.as_str(), "world", None).await.expect("put");
    let got = client.get(key.as_str(), None).await.expect("get");
    let kv = got.kvs().first().expect("the key we wrote is there");
    assert_eq!(kv.value(), b"world");
}

#[test]
fn dropping_the_handle_stops_etcd() {
    let etcd = Etcd::start().expect("start etcd");
    let pid = etcd.pid();
    let proc_dir = format!("/proc/{pid}");
    assert!(std::path::Path::new(&proc_dir).exists(), "etcd is running");
    drop(etcd);
    // The child was waited for, so its pid is gone (not even a zombie).
    assert!(
        !std::path::Path::new(&proc_dir).exists(),
        "etcd pid {pid} still exists after drop"
    );
}
