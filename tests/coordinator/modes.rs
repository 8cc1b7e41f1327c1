//! I4 and the kill switch: freeze denies everything; observe grants nothing but records
//! would-grants; assist waits for an approval that records the approver; red never autonomous.

use std::time::Duration;

use interlock_proto::v1 as pb;
use interlock_tests::client::{self, Got};

use super::{agent_for, fixture_granting, policy, register_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_observe_and_assist_behave_as_their_modes_say() {
    // dave is an admin, so that the red-tier refusal below is the policy's, not his role's.
    let f = fixture_granting(
        "modes",
        &policy("5", "autonomous", 1000, 1000, "5s"),
        "60s",
        &[("dave", "admin"), ("erin", "approver")],
    )
    .await;
    register_hosts(&f.coordinator, "m", "web", 2).await;
    let mut m00 = agent_for(&f.coordinator, "m00").await;
    let mut m01 = agent_for(&f.coordinator, "m01").await;
    let mut op = client::operator(&f.admin);
    let mut dave = client::operator(&f.coordinator.operator_channel("dave").await);
    let mut erin = client::operator(&f.coordinator.operator_channel("erin").await);

    // Kill switch: everything is denied, naming it.
    dave.freeze(pb::FreezeRequest {
        class: String::new(),
        reason: "incident 7".into(),
        revoke: false,
    })
    .await
    .unwrap();
    let got = client::acquire(&mut m00, "m00", "disk_cleanup", "/a").await;
    assert!(
        matches!(&got, Got::Denied { check, reason } if check == "kill_switch" && reason.contains("incident 7")),
        "{got:?}"
    );
    dave.unfreeze(pb::UnfreezeRequest {
        class: String::new(),
        host: String::new(),
        reason: "over".into(),
    })
    .await
    .unwrap();

    // Observe: a would-grant is recorded; no lease exists.
    dave.set_mode(pb::SetModeRequest {
        class: "disk_cleanup".into(),
        mode: "observe".into(),
    })
    .await
    .unwrap();
    let got = client::acquire(&mut m00, "m00", "disk_cleanup", "/a").await;
    assert_eq!(
        got,
        Got::Observed {
            would_grant: true,
            check: String::new()
        }
    );
    let leases = op
        .leases(pb::LeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert!(leases.is_empty(), "observe grants nothing: {leases:?}");

    // Assist: pending until approved; approval re-runs admission and records the approver.
    dave.set_mode(pb::SetModeRequest {
        class: "disk_cleanup".into(),
        mode: "assist".into(),
    })
    .await
    .unwrap();
    let got = client::acquire(&mut m01, "m01", "disk_cleanup", "/b").await;
    let Got::Pending { approval_id } = got else {
        panic!("assist must wait: {got:?}")
    };
    let polled = client::got(
        m01.poll_approval(pb::PollApprovalRequest {
            approval_id: approval_id.clone(),
            host_id: "m01".into(),
        })
        .await
        .unwrap()
        .into_inner(),
    );
    assert!(
        matches!(polled, Got::Pending { .. }),
        "still pending: {polled:?}"
    );
    let listed = op
        .approvals(pb::ApprovalsRequest {})
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].approval_id, approval_id);
    let approved = client::got(
        erin.approve(pb::ApproveRequest {
            approval_id: approval_id.clone(),
        })
        .await
        .unwrap()
        .into_inner(),
    );
    let Got::Granted {
        token, approver, ..
    } = approved
    else {
        panic!("approved: {approved:?}")
    };
    assert_eq!(approver, "erin");
    // The agent's poll now sees the grant with the same token.
    let polled = client::got(
        m01.poll_approval(pb::PollApprovalRequest {
            approval_id,
            host_id: "m01".into(),
        })
        .await
        .unwrap()
        .into_inner(),
    );
    assert!(
        matches!(&polled, Got::Granted { token: t, approver, .. } if *t == token && approver == "erin"),
        "{polled:?}"
    );

    // A rejected request ends denied.
    let got = client::acquire(&mut m00, "m00", "disk_cleanup", "/c").await;
    let Got::Pending { approval_id } = got else {
        panic!("{got:?}")
    };
    erin.reject(pb::RejectRequest {
        approval_id: approval_id.clone(),
        reason: "not now".into(),
    })
    .await
    .unwrap();
    let polled = client::got(
        m00.poll_approval(pb::PollApprovalRequest {
            approval_id,
            host_id: "m00".into(),
        })
        .await
        .unwrap()
        .into_inner(),
    );
    assert!(
        matches!(&polled, Got::Denied { check, .. } if check == "rejected"),
        "{polled:?}"
    );

    // Red tier can never be autonomous.
    let refused = dave
        .set_mode(pb::SetModeRequest {
            class: "node_reboot".into(),
            mode: "autonomous".into(),
        })
        .await
        .expect_err("red tier refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("red"), "{}", refused.message());

    // The audit log tells the story with owners.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let audit = client::audit(&op, None, None).await;
    let has = |kind: &str, owner: &str| {
        audit
            .records
            .iter()
            .any(|r| r.kind == kind && r.owner == owner)
    };
    assert!(has("freeze", "operator:dave"));
    assert!(has("would_grant", "policy:test@1"));
    assert!(has("pending", "policy:test@1"));
    assert!(has("approve", "operator:erin"));
    assert!(
        has("grant", "operator:erin"),
        "the grant is recorded with the approver"
    );
    assert!(has("reject", "operator:erin"));
    assert!(has("mode_change", "operator:dave"));
    let grant = audit.records.iter().find(|r| r.kind == "grant").unwrap();
    assert_eq!(grant.token, token, "the audit shows the lease's token");
    assert!(audit.chain_ok, "{}", audit.chain_error);
}
