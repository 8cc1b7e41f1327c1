//! Late outcomes (`ReportOutcome`): an agent whose lease ended before it could release it
//! (stopped past its TTL, revoked, restarted mid-action) still gets its outcome into the audit,
//! but only for a grant it really received, with the grant's class and target, and only once.

use interlock_proto::v1 as pb;
use interlock_tests::client::{self, Got};
use tonic::Code;

use super::{agent_for, fixture_granting, policy, register_hosts};

fn late(host: &str, lease_id: &str, token: u64) -> pb::ReportOutcomeRequest {
    pb::ReportOutcomeRequest {
        host_id: host.to_owned(),
        lease_id: lease_id.to_owned(),
        token,
        // Deliberately not the grant's: the coordinator takes class and target from the grant.
        class: "node_reboot".to_owned(),
        target: "/elsewhere".to_owned(),
        outcome: pb::Outcome::Abandoned as i32,
        detail: "stopped past the deadline".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_outcomes_are_recorded_once_and_only_for_real_grants() {
    let f = fixture_granting(
        "late-outcome",
        &policy("2", "autonomous", 100, 100, "30s"),
        "60s",
        &[("alice", "operator")],
    )
    .await;
    let hosts = register_hosts(&f.coordinator, "late-", "web", 2).await;
    let mut agent = agent_for(&f.coordinator, &hosts[0]).await;
    // The other host, with its own certificate: its claim on the first host's lease reaches
    // the engine (which refuses it) instead of the certificate check.
    let other = agent_for(&f.coordinator, &hosts[1]).await;
    let operator = client::operator(&f.admin);
    let mut alice = client::operator(&f.coordinator.operator_channel("alice").await);
    let Got::Granted {
        lease_id, token, ..
    } = client::acquire(&mut agent, &hosts[0], "disk_cleanup", "/var/log").await
    else {
        panic!("expected a grant");
    };

    // While the lease is live, a late outcome is refused: release it instead.
    let live = agent
        .report_outcome(late(&hosts[0], &lease_id, token))
        .await
        .expect_err("the lease is live");
    assert_eq!(live.code(), Code::FailedPrecondition, "{live}");

    // The lease ends without the agent's outcome (an operator revokes it).
    alice
        .revoke(pb::RevokeRequest {
            lease_id: lease_id.clone(),
            reason: "test".to_owned(),
        })
        .await
        .expect("revoke");

    // No such grant, another host's lease, a wrong token: refused, nothing written.
    let before = client::audit(&operator, None, None).await.records.len();
    for (client, host, lease, tok) in [
        (&agent, hosts[0].as_str(), "no-such-lease", token),
        (&other, hosts[1].as_str(), lease_id.as_str(), token),
        (&agent, hosts[0].as_str(), lease_id.as_str(), token + 1),
    ] {
        let e = client
            .clone()
            .report_outcome(late(host, lease, tok))
            .await
            .expect_err("a forged late outcome");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    }
    assert_eq!(
        client::audit(&operator, None, None).await.records.len(),
        before
    );

    // The holder's late outcome is recorded with the grant's class and target; a repeat (a
    // retry whose first answer was lost) is accepted and not recorded twice.
    for _ in 0..2 {
        agent
            .report_outcome(late(&hosts[0], &lease_id, token))
            .await
            .expect("late outcome");
    }
    let audit = client::audit(&operator, None, None).await;
    assert!(audit.chain_ok, "{}", audit.chain_error);
    let outcomes: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.kind == "outcome" && r.lease_id == lease_id)
        .collect();
    assert_eq!(outcomes.len(), 1, "{outcomes:#?}");
    let o = outcomes[0];
    assert_eq!(o.token, token);
    assert_eq!(o.class, "disk_cleanup");
    assert_eq!(o.target, "/var/log");
    assert_eq!(o.owner, format!("host:{}", hosts[0]));
    assert!(o.detail_json.contains("\"late\":true"), "{}", o.detail_json);
}
