//! The store as a trust boundary: keys under the prefix that do not decode (one bad `etcdctl
//! put`) are quarantined with the safer value, and the replica still leads (before, it
//! campaigned forever); and keys changed or deleted behind the coordinator's back, which the
//! audit's seal does not back, are refused at load the same way, audited and alerted. Real
//! etcd; the tampering is done with etcd's own client and with `etcdctl`, as a person would.

use std::{process::Command, time::Duration};

use interlock_coordinator::view::Keys;
use interlock_proto::v1 as pb;
use interlock_tests::{
    ADMIN, Coordinator, CoordinatorOptions, Etcd,
    client::{self, Got},
    fresh_prefix,
};

use super::policy;

/// Runs `etcdctl` against the test's etcd and returns its output; fails the test if it fails.
fn etcdctl(etcd: &Etcd, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .args(args)
        .output()
        .expect("etcdctl runs (cargo xtask setup installs etcd-client)");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn status(ch: &tonic::transport::Channel) -> pb::StatusReply {
    client::operator(ch)
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

fn mode_of(status: &pb::StatusReply, class: &str) -> String {
    status
        .classes
        .iter()
        .find(|c| c.class == class)
        .map(|c| c.mode.clone())
        .expect("class in status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changed_behind_the_coordinators_back_is_refused_at_load_audited_and_alerted() {
    let etcd = Etcd::start().expect("etcd");
    let prefix = fresh_prefix("seal");
    let keys = Keys::new(&prefix);
    let (url, alerts) = interlock_tests::webhook::receiver();
    let text = format!(
        "alert_webhook = \"{url}\"\n{}",
        policy("5", "assist", 1000, 1000, "30s")
    );
    // Every replica below is started on these options, so all trust one CA.
    let options =
        CoordinatorOptions::etcd(etcd.endpoint(), prefix.clone(), &text).grant("carol", "operator");
    let mut first = Coordinator::start(&options).expect("start");
    first.wait_leader(Duration::from_secs(15)).expect("leads");
    let mut carol = client::operator(&first.operator_channel("carol").await);
    carol
        .freeze(pb::FreezeRequest {
            class: String::new(),
            reason: "incident 12".into(),
            revoke: false,
        })
        .await
        .expect("freeze");
    carol
        .set_mode(pb::SetModeRequest {
            class: "disk_cleanup".into(),
            mode: "observe".into(),
        })
        .await
        .expect("mode");
    assert_eq!(
        first.metric("interlock_quarantined_keys"),
        0.0,
        "a store the coordinator wrote checks clean"
    );
    first.terminate(Duration::from_secs(10)).expect("stop");

    // Behind its back, with no coordinator running: lift the kill switch and make the class
    // autonomous. The fault is really injected: etcd says so.
    assert_eq!(etcdctl(&etcd, &["del", &keys.kill_switch()]), "1");
    assert_eq!(
        etcdctl(&etcd, &["put", &keys.mode("disk_cleanup"), "autonomous"]),
        "OK"
    );
    assert_eq!(
        etcdctl(
            &etcd,
            &["get", "--print-value-only", &keys.mode("disk_cleanup")]
        ),
        "autonomous"
    );

    let second = Coordinator::start(&options).expect("start again");
    second
        .wait_leader(Duration::from_secs(15))
        .expect("a replica that finds tampered state still leads");
    let ch = second.operator_channel(ADMIN).await;
    let st = status(&ch).await;
    let kill = st
        .kill_switch
        .clone()
        .expect("the deleted kill switch stays on");
    assert!(kill.reason.contains("not backed by the audit"), "{kill:?}");
    assert_eq!(mode_of(&st, "disk_cleanup"), "observe");
    assert_eq!(second.metric("interlock_quarantined_keys"), 2.0);
    let mut agent = client::agent(&second.host_channel("s1").await);
    client::register(&mut agent, "s1", "web").await;
    let got = client::acquire(&mut agent, "s1", "disk_cleanup", "/x").await;
    assert!(
        matches!(&got, Got::Denied { check, .. } if check == "kill_switch"),
        "{got:?}"
    );

    // Audited, naming both keys, and the chain still verifies.
    let audit = client::audit(&client::operator(&ch), None, None).await;
    assert!(audit.chain_ok, "{}", audit.chain_error);
    let record = audit
        .records
        .iter()
        .find(|r| r.kind == "quarantine")
        .expect("a quarantine record");
    for key in [keys.kill_switch(), keys.mode("disk_cleanup")] {
        assert!(record.detail_json.contains(&key), "{key}: {record:?}");
    }
    assert!(record.detail_json.contains("deleted behind"), "{record:?}");
    assert!(record.detail_json.contains("changed behind"), "{record:?}");
    // And alerted to a real receiver, naming the keys.
    let body = alerts
        .recv_timeout(Duration::from_secs(10))
        .expect("the quarantine is alerted");
    assert!(
        body.contains("store_quarantine") && body.contains(&keys.kill_switch()),
        "{body}"
    );

    // An operator who looked sets the state again through interlock; the next replica to
    // load it finds nothing to quarantine.
    let mut carol = client::operator(&second.operator_channel("carol").await);
    carol
        .unfreeze(pb::UnfreezeRequest {
            class: String::new(),
            host: String::new(),
            reason: "checked etcd's log".into(),
        })
        .await
        .expect("unfreeze");
    carol
        .set_mode(pb::SetModeRequest {
            class: "disk_cleanup".into(),
            mode: "assist".into(),
        })
        .await
        .expect("mode");
    drop(second);
    let third = Coordinator::start(&options).expect("start a third time");
    third.wait_leader(Duration::from_secs(15)).expect("leads");
    assert_eq!(third.metric("interlock_quarantined_keys"), 0.0);
    let st = status(&third.operator_channel(ADMIN).await).await;
    assert!(st.kill_switch.is_none(), "{:?}", st.kill_switch);
    assert_eq!(mode_of(&st, "disk_cleanup"), "assist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seal_outlives_the_audit_records_it_named() {
    let etcd = Etcd::start().expect("etcd");
    let mut options = CoordinatorOptions::etcd(
        etcd.endpoint(),
        fresh_prefix("reseal"),
        &policy("5", "observe", 1000, 1000, "30s"),
    )
    .grant("carol", "operator");
    options.audit_retention = Some(100);
    let first = Coordinator::start(&options).expect("start");
    first.wait_leader(Duration::from_secs(15)).expect("leads");
    let ch = first.operator_channel(ADMIN).await;
    client::operator(&first.operator_channel("carol").await)
        .set_mode(pb::SetModeRequest {
            class: "node_reboot".into(),
            mode: "observe".into(),
        })
        .await
        .expect("mode");
    // Observe-mode requests write audit records but no sealed key, so the seal keeps naming
    // an early record until trimming reaches it.
    let mut agent = client::agent(&first.host_channel("t1").await);
    client::register(&mut agent, "t1", "web").await;
    for i in 0..260 {
        let got = client::acquire(&mut agent, "t1", "disk_cleanup", &format!("/{i}")).await;
        assert!(matches!(got, Got::Observed { .. }), "{got:?}");
    }
    let audit = client::audit(&client::operator(&ch), None, None).await;
    let oldest = audit.records.first().expect("records").seq;
    assert!(
        oldest > 100,
        "trimmed past the early records: oldest {oldest}"
    );
    assert!(
        audit.records.iter().any(|r| r.kind == "reseal"),
        "the seal was written again before its record went"
    );
    assert!(audit.chain_ok, "{}", audit.chain_error);
    drop(first);
    let second = Coordinator::start(&options).expect("start again");
    second.wait_leader(Duration::from_secs(15)).expect("leads");
    assert_eq!(
        second.metric("interlock_quarantined_keys"),
        0.0,
        "{}",
        second.log()
    );
    let st = status(&second.operator_channel(ADMIN).await).await;
    assert!(st.kill_switch.is_none(), "{:?}", st.kill_switch);
    assert_eq!(mode_of(&st, "node_reboot"), "observe");
}

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
    let ch = coordinator.operator_channel(ADMIN).await;
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
    let mut agent = client::agent(&coordinator.host_channel("q1").await);
    client::register(&mut agent, "q1", "web").await;
    let got = client::acquire(&mut agent, "q1", "disk_cleanup", "/x").await;
    assert!(matches!(got, Got::Observed { .. }), "{got:?}");
}
