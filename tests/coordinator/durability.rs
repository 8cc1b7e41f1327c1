//! I8: after SIGKILL of the coordinator and of etcd, every acknowledged lease and audit record
//! reads back and the hash chain verifies.

use std::time::Duration;

use interlock_proto::v1 as pb;
use interlock_tests::{ADMIN, Coordinator, CoordinatorOptions, Etcd, client, fresh_prefix};

use super::agent_for;

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
    let hosts = super::register_hosts(&coordinator, "d", "web", 5).await;
    let mut acked = Vec::new();
    for host in &hosts {
        let mut agent = agent_for(&coordinator, host).await;
        let got = client::acquire(&mut agent, host, "disk_cleanup", "/v").await;
        let client::Got::Granted {
            lease_id, token, ..
        } = got
        else {
            panic!("{got:?}")
        };
        acked.push((lease_id, token));
    }
    let before = client::audit(
        &client::operator(&coordinator.operator_channel(ADMIN).await),
        None,
        None,
    )
    .await
    .records;

    coordinator.kill();
    let etcd_pid = etcd.pid();
    etcd.kill9();
    assert!(
        !std::path::Path::new(&format!("/proc/{etcd_pid}")).exists(),
        "etcd really died"
    );
    etcd.restart().expect("etcd restarts on its data");
    // The same options, so the same CA: the hosts' certificates are still trusted.
    let coordinator = Coordinator::start(&options).expect("coordinator restarts");
    coordinator.wait_leader(Duration::from_secs(15)).unwrap();
    let mut op = client::operator(&coordinator.operator_channel(ADMIN).await);

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
    let after = client::audit(&op, None, None).await;
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
    let mut agent = agent_for(&coordinator, &hosts[0]).await;
    let (id, token) = &acked[0];
    client::release(&mut agent, id, *token).await;
    let last = client::audit(&op, None, None).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_retention_keeps_the_newest_records_and_the_chain_verifies() {
    let etcd = Etcd::start().expect("etcd");
    let mut options = CoordinatorOptions::etcd(
        etcd.endpoint(),
        fresh_prefix("retention"),
        &policy("10", "autonomous", 100_000, 100_000, "60s"),
    );
    options.audit_retention = Some(100);
    let coordinator = Coordinator::start(&options).expect("coordinator");
    coordinator.wait_leader(Duration::from_secs(10)).unwrap();
    super::register_hosts(&coordinator, "r", "web", 1).await;
    let mut agent = agent_for(&coordinator, "r00").await;
    // 250 grants and 250 outcomes: 501 records with the policy load.
    for i in 0..250 {
        let got = client::acquire(&mut agent, "r00", "disk_cleanup", &format!("/{i}")).await;
        let client::Got::Granted {
            lease_id, token, ..
        } = got
        else {
            panic!("{got:?}")
        };
        client::release(&mut agent, &lease_id, token).await;
    }
    let admin = coordinator.operator_channel(ADMIN).await;
    let audit = client::audit(&client::operator(&admin), None, None).await;
    let first = audit.records.first().expect("records").seq;
    let last = audit.records.last().expect("records").seq;
    assert_eq!(last, 501, "every record was written");
    assert!(first > 1, "old records were trimmed");
    // Trimming runs after each batch, a chunk of 100 at a time (a trim that failed under load
    // is retried after the next batch), so the retained count stays within two chunks.
    assert!(
        (100..=300).contains(&audit.records.len()),
        "kept between the retention and two chunks more: {}",
        audit.records.len()
    );
    assert_eq!(
        u64::try_from(audit.records.len()).unwrap(),
        last - first + 1,
        "no gaps"
    );
    assert!(
        audit.chain_ok,
        "the retained chain verifies: {}",
        audit.chain_error
    );
}
