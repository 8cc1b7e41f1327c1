//! I8: after SIGKILL of the coordinator and of etcd, every acknowledged lease and audit record
//! reads back and the hash chain verifies.

use std::time::Duration;

use interlock_proto::v1 as pb;
use interlock_tests::{Coordinator, CoordinatorOptions, Etcd, client, fresh_prefix};

use super::policy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_and_audit_survive_sigkill_of_coordinator_and_etcd() {
    let mut etcd = Etcd::start().expect("etcd");
    let options = CoordinatorOptions::etcd(
        etcd.endpoint(),
        fresh_prefix("durability"),
        &policy("10", "autonomous", 1000, 1000, "60s"),
    );
    let mut coordinator = Coordinator::start(&options).expect("coordinator");
    coordinator.wait_leader(Duration::from_secs(10)).unwrap();
    let channel = client::channel(&coordinator.url()).await;
    super::register_hosts(&channel, "d", "web", 5).await;
    let mut agent = client::agent(&channel);
    let mut acked = Vec::new();
    for i in 0..5 {
        let got = client::acquire(&mut agent, &format!("d{i:02}"), "disk_cleanup", "/v").await;
        let client::Got::Granted {
            lease_id, token, ..
        } = got
        else {
            panic!("{got:?}")
        };
        acked.push((lease_id, token));
    }
    let before = client::operator(&channel)
        .audit(pb::AuditRequest {
            since_ms: 0,
            class: String::new(),
            host: String::new(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .records;

    coordinator.kill();
    let etcd_pid = etcd.pid();
    etcd.kill9();
    assert!(
        !std::path::Path::new(&format!("/proc/{etcd_pid}")).exists(),
        "etcd really died"
    );
    etcd.restart().expect("etcd restarts on its data");
    let coordinator = Coordinator::start(&options).expect("coordinator restarts");
    coordinator.wait_leader(Duration::from_secs(15)).unwrap();
    let channel = client::channel(&coordinator.url()).await;
    let mut op = client::operator(&channel);

    let leases = op
        .leases(pb::LeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases;
    for (id, token) in &acked {
        let found = leases.iter().find(|l| &l.lease_id == id);
        assert!(
            found.is_some_and(|l| l.token == *token),
            "acknowledged lease {id} (token {token}) lost: {leases:?}"
        );
    }
    let after = op
        .audit(pb::AuditRequest {
            since_ms: 0,
            class: String::new(),
            host: String::new(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.chain_ok, "chain: {}", after.chain_error);
    for record in &before {
        assert!(
            after
                .records
                .iter()
                .any(|r| r.seq == record.seq && r.hash == record.hash),
            "audit record {} lost",
            record.seq
        );
    }
    // The restarted leader keeps appending to the same chain.
    assert!(
        after
            .records
            .iter()
            .any(|r| r.kind == "policy_load" && r.seq > 1)
            || after.records.len() >= before.len()
    );
    let mut agent = client::agent(&channel);
    let (id, token) = &acked[0];
    client::release(&mut agent, id, *token).await;
    let last = op
        .audit(pb::AuditRequest {
            since_ms: 0,
            class: String::new(),
            host: String::new(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(last.chain_ok, "{}", last.chain_error);
    let outcome = last
        .records
        .iter()
        .find(|r| r.kind == "outcome")
        .expect("outcome recorded");
    assert_eq!(
        outcome.token, *token,
        "grant and outcome carry the same token"
    );
}
