//! Bad input gets a clear error that says what to change, and the coordinator keeps serving.

use std::process::Command;

use interlock_proto::v1 as pb;
use interlock_tests::{client, coordinator::binary};
use tonic::Code;

use super::{fixture, policy, register_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_clearly_and_the_coordinator_keeps_serving() {
    let f = fixture("bad", &policy("2", "autonomous", 1000, 1000, "5s"), "60s").await;
    register_hosts(&f.channel, "x", "web", 1).await;
    let mut agent = client::agent(&f.channel);
    let mut op = client::operator(&f.channel);

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
            client::acquire_request("../etc", "disk_cleanup", "/t"),
            Code::InvalidArgument,
            "may only contain",
        ),
        (
            client::acquire_request("", "disk_cleanup", "/t"),
            Code::InvalidArgument,
            "host_id must be",
        ),
        (
            client::acquire_request("ghost", "disk_cleanup", "/t"),
            Code::FailedPrecondition,
            "must register first",
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
    let err = agent
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
        .freeze(pb::FreezeRequest {
            class: String::new(),
            reason: "x".into(),
            revoke: false,
        })
        .await
        .expect_err("no operator identity");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = op
        .set_mode(client::as_operator(
            "o",
            pb::SetModeRequest {
                class: "disk_cleanup".into(),
                mode: "yolo".into(),
            },
        ))
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
