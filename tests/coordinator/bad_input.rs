//! Bad input gets a clear error that says what to change, and the coordinator keeps serving.

use std::process::Command;

use interlock_proto::v1 as pb;
use interlock_tests::{Coordinator, CoordinatorOptions, client, coordinator::binary, fresh_prefix};
use tonic::Code;

use super::{agent_for, fixture, policy, register_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_clearly_and_the_coordinator_keeps_serving() {
    let f = fixture("bad", &policy("2", "autonomous", 1000, 1000, "5s"), "60s").await;
    register_hosts(&f.coordinator, "x", "web", 1).await;
    let mut agent = agent_for(&f.coordinator, "x00").await;
    let mut op = client::operator(&f.admin);

    let cases: Vec<(pb::AcquireRequest, Code, &str)> = vec![
        (
            client::acquire_request("x00", "reboot_everything", "/t"),
            Code::NotFound,
            "the policy defines: disk_cleanup",
        ),
        (
            client::acquire_request("x00", "disk_cleanup", ""),
            Code::InvalidArgument,
            "target must not be empty",
        ),
        (
            client::acquire_request("x00", "disk_cleanup", &"t".repeat(300)),
            Code::InvalidArgument,
            "the limit is 256",
        ),
        (
            pb::AcquireRequest {
                evidence: "e".repeat(10_000),
                ..client::acquire_request("x00", "disk_cleanup", "/t")
            },
            Code::InvalidArgument,
            "evidence is 10000 bytes",
        ),
    ];
    for (request, code, says) in cases {
        let err = agent.acquire(request.clone()).await.expect_err("refused");
        assert_eq!(err.code(), code, "{request:?}: {err}");
        assert!(
            err.message().contains(says),
            "{:?} should say {says:?}",
            err.message()
        );
    }
    // A host with a certificate of its own that never registered.
    let err = agent_for(&f.coordinator, "ghost")
        .await
        .acquire(client::acquire_request("ghost", "disk_cleanup", "/t"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("must register first"), "{err}");
    let err = agent_for(&f.coordinator, "y")
        .await
        .register(pb::RegisterRequest {
            host_id: "y".into(),
            labels: Default::default(),
        })
        .await
        .expect_err("no service label");
    assert!(err.message().contains("service"), "{}", err.message());

    let got = client::acquire(&mut agent, "x00", "disk_cleanup", "/t").await;
    let client::Got::Granted {
        lease_id, token, ..
    } = got
    else {
        panic!("{got:?}")
    };
    let err = agent
        .release(pb::ReleaseRequest {
            lease_id: lease_id.clone(),
            token: token - 1,
            outcome: pb::Outcome::Success as i32,
            detail: String::new(),
        })
        .await
        .expect_err("a stale token is refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = agent
        .release(pb::ReleaseRequest {
            lease_id: lease_id.clone(),
            token,
            outcome: 0,
            detail: String::new(),
        })
        .await
        .expect_err("an unspecified outcome is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = op
        .set_mode(pb::SetModeRequest {
            class: "disk_cleanup".into(),
            mode: "yolo".into(),
        })
        .await
        .expect_err("unknown mode");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Still serving, and the lease taken above is intact.
    client::release(&mut agent, &lease_id, token).await;
    let status = op
        .status(pb::StatusRequest {})
        .await
        .expect("still serving")
        .into_inner();
    assert!(status.leader);
}

/// What only an `--insecure` coordinator has to check, because only it takes the message's
/// host id and the `x-interlock-operator` header at their word (over mutual TLS both come
/// from the certificate, whose name `certs issue` already validated): so this test runs
/// `--insecure` on purpose, on the embedded store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_coordinator_refuses_bad_host_ids_and_writes_without_an_operator() {
    let options = CoordinatorOptions::embedded(
        fresh_prefix("bad-insecure"),
        &policy("2", "autonomous", 1000, 1000, "5s"),
    )
    .insecure();
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(std::time::Duration::from_secs(10))
        .expect("leads");
    let channel = client::plaintext_channel(&coordinator.url()).await;
    let mut agent = client::agent(&channel);
    let mut op = client::operator(&channel);
    for (request, says) in [
        (
            client::acquire_request("../etc", "disk_cleanup", "/t"),
            "may only contain",
        ),
        (
            client::acquire_request("", "disk_cleanup", "/t"),
            "host_id must be",
        ),
    ] {
        let err = agent.acquire(request.clone()).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{request:?}: {err}");
        assert!(err.message().contains(says), "{err}");
    }
    // A report for an empty host id is refused; the coordinator keeps serving.
    let err = agent
        .report_flows(pb::ReportFlowsRequest {
            host_id: String::new(),
            edges: vec![],
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = op
        .freeze(pb::FreezeRequest {
            class: String::new(),
            reason: "x".into(),
            revoke: false,
        })
        .await
        .expect_err("no operator identity");
    assert_eq!(err.code(), Code::Unauthenticated);
    op.freeze(client::as_operator(
        "o",
        pb::FreezeRequest {
            class: String::new(),
            reason: "x".into(),
            revoke: false,
        },
    ))
    .await
    .expect("the header is believed when insecure");
    let status = op
        .status(pb::StatusRequest {})
        .await
        .expect("still serving")
        .into_inner();
    assert!(status.insecure, "status says the coordinator is insecure");
}

#[test]
fn a_malformed_policy_is_refused_at_start_with_every_error_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = policy("2", "autonomous", 10, 10, "1s")
        .replace(
            "tier = \"red\"\nmode = \"assist\"",
            "tier = \"red\"\nmode = \"autonomous\"",
        )
        .replace("version = 1", "version = 0");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(binary("interlock"))
        .args(["serve", "--config"])
        .arg(&path)
        // --insecure: the policy is refused before security matters, and this keeps the
        // test from needing certificates for a server that must never start.
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--insecure",
        ])
        .output()
        .expect("run interlock serve");
    assert!(!out.status.success(), "a bad policy must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for says in ["version", "lease_ttl", "node_reboot", "red"] {
        assert!(
            stderr.contains(says),
            "stderr should mention {says}:\n{stderr}"
        );
    }
}
