//! The store as a trust boundary, first part: keys under the prefix that do not decode (one
//! bad `etcdctl put`) are quarantined with the safer value, and the replica still leads
//! (before, it campaigned forever). Real etcd; the garbage is written with etcd's own client.

use std::time::Duration;

use interlock_coordinator::view::Keys;
use interlock_proto::v1 as pb;
use interlock_tests::{
    Coordinator, CoordinatorOptions, Etcd,
    client::{self, Got, channel},
    fresh_prefix,
};

use super::policy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_keys_are_quarantined_with_safe_values_and_the_replica_still_leads() {
    let etcd = Etcd::start().expect("etcd");
    let prefix = fresh_prefix("quarantine");
    let root = Keys::new(&prefix).root();
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    // A mode key that would make the class autonomous if it decoded, and a corrupt freeze.
    kv.put(format!("{root}mode/disk_cleanup"), "autonomous!!", None)
        .await
        .expect("put mode");
    kv.put(format!("{root}freeze/class/node_reboot"), "{not json", None)
        .await
        .expect("put freeze");
    let options = CoordinatorOptions::etcd(
        etcd.endpoint(),
        prefix,
        &policy("5", "autonomous", 1000, 1000, "30s"),
    );
    let coordinator = Coordinator::start(&options).expect("start");
    coordinator
        .wait_leader(Duration::from_secs(15))
        .expect("a replica with undecodable keys under its prefix still leads");
    assert_eq!(coordinator.metric("interlock_quarantined_keys"), 2.0);
    let ch = channel(&coordinator.url()).await;
    let status = client::operator(&ch)
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let class = |name: &str| {
        status
            .classes
            .iter()
            .find(|c| c.class == name)
            .cloned()
            .expect("class")
    };
    // The policy says autonomous; the unreadable mode key means observe.
    assert_eq!(class("disk_cleanup").mode, "observe");
    let frozen = class("node_reboot");
    assert!(
        frozen
            .freezes
            .iter()
            .any(|f| f.reason.contains("freeze/class/node_reboot")),
        "{frozen:?}"
    );
    // And admission acts on the safe values: observe records, never grants.
    let mut agent = client::agent(&ch);
    client::register(&mut agent, "q1", "web").await;
    let got = client::acquire(&mut agent, "q1", "disk_cleanup", "/x").await;
    assert!(matches!(got, Got::Observed { .. }), "{got:?}");
}
