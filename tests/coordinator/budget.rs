//! I3: budget exhaustion freezes the class, alerts (log, metric, audit, webhook), denies naming
//! the budget, and holds until an operator unfreezes.

use std::time::Duration;

use interlock_proto::v1 as pb;
use interlock_tests::{ADMIN, Coordinator, CoordinatorOptions, Etcd, client, fresh_prefix};

use super::policy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausting_the_fleet_budget_freezes_alerts_and_holds_until_unfreeze() {
    let etcd = Etcd::start().expect("etcd");
    let (url, alerts) = interlock_tests::webhook::receiver();
    let text = format!(
        "alert_webhook = \"{url}\"\n{}",
        policy("10", "autonomous", 3, 100, "5s")
    );
    let options = CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix("budget"), &text)
        .grant("carol", "operator");
    let coordinator = Coordinator::start(&options).expect("coordinator");
    coordinator.wait_leader(Duration::from_secs(10)).unwrap();
    super::register_hosts(&coordinator, "b", "web", 1).await;
    let mut agent = super::agent_for(&coordinator, "b00").await;
    let mut operator = client::operator(&coordinator.operator_channel(ADMIN).await);
    let mut carol = client::operator(&coordinator.operator_channel("carol").await);

    // Three grants use the fleet budget of 3 per hour.
    for i in 0..3 {
        let got = client::acquire(&mut agent, "b00", "disk_cleanup", &format!("/t{i}")).await;
        let client::Got::Granted {
            lease_id, token, ..
        } = got
        else {
            panic!("grant {i} within budget: {got:?}")
        };
        client::release(&mut agent, &lease_id, token).await;
    }
    // The fourth finds it exhausted: denied by the budget, and the class freezes.
    let got = client::acquire(&mut agent, "b00", "disk_cleanup", "/t3").await;
    match &got {
        client::Got::Denied { check, reason } => {
            assert_eq!(check, "fleet_budget");
            assert!(reason.contains("3 of 3"), "{reason}");
        }
        other => panic!("expected a budget denial, got {other:?}"),
    }
    let body = alerts
        .recv_timeout(Duration::from_secs(5))
        .expect("webhook called");
    let alert: serde_json::Value = serde_json::from_str(&body).expect("alert JSON");
    assert_eq!(alert["class"], "disk_cleanup");
    assert!(
        alert["message"].as_str().unwrap().contains("frozen"),
        "{alert}"
    );
    assert_eq!(
        coordinator.metric("interlock_alerts_total{class=\"disk_cleanup\""),
        1.0,
        "alert metric"
    );
    assert!(
        coordinator.log().contains("ALERT"),
        "ERROR log line for the page"
    );

    // Frozen: denied by the freeze, which names the budget; it stays so.
    for _ in 0..3 {
        let got = client::acquire(&mut agent, "b00", "disk_cleanup", "/t4").await;
        match &got {
            client::Got::Denied { check, reason } => {
                assert_eq!(check, "frozen");
                assert!(reason.contains("fleet budget exhausted"), "{reason}");
            }
            other => panic!("frozen class must deny, got {other:?}"),
        }
    }
    let status = operator
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let class = &status.classes[0];
    assert_eq!(class.freezes[0].cause, "fleet_budget");

    // An operator unfreezes: a fresh window, grants resume, and the audit names who.
    carol
        .unfreeze(pb::UnfreezeRequest {
            class: "disk_cleanup".into(),
            host: String::new(),
            reason: "root cause fixed".into(),
        })
        .await
        .expect("unfreeze");
    let got = client::acquire(&mut agent, "b00", "disk_cleanup", "/t5").await;
    assert!(matches!(got, client::Got::Granted { .. }), "{got:?}");
    let audit = client::audit(&operator, Some("disk_cleanup"), None).await;
    let kinds: Vec<&str> = audit.records.iter().map(|r| r.kind.as_str()).collect();
    for kind in ["deny", "freeze", "alert", "unfreeze"] {
        assert!(kinds.contains(&kind), "audit has {kind}: {kinds:?}");
    }
    let unfreeze = audit.records.iter().find(|r| r.kind == "unfreeze").unwrap();
    assert_eq!(unfreeze.owner, "operator:carol");
    assert!(audit.chain_ok, "{}", audit.chain_error);
}
