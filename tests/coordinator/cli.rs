//! The operator CLI against a real coordinator: exit codes, JSON output, dry runs that change
//! nothing, and errors that say what to do.

//!
//! Over mutual TLS like every other test: operator commands present alice's certificate
//! (INTERLOCK_CA/CERT/KEY), `lease acquire/release` the host's, since the agent API acts only
//! for the host of the certificate.

use std::process::{Command, Output};

use interlock_tests::{Coordinator, coordinator::binary};

use super::{fixture_granting, policy, register_hosts};

fn run(mut cli: Command, args: &[&str]) -> Output {
    cli.args(args).output().expect("run interlock")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn audit_len(coordinator: &Coordinator) -> usize {
    let out = run(coordinator.cli("alice"), &["-o", "json", "audit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)["records"].as_array().expect("records").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_decisions_by_exit_code_and_dry_runs_change_nothing() {
    // alice is an admin, so that the red-tier refusal below is the policy's, not her role's.
    let f = fixture_granting(
        "cli",
        &policy("2", "autonomous", 1000, 1000, "30s"),
        "60s",
        &[("alice", "admin")],
    )
    .await;
    register_hosts(&f.coordinator, "k", "web", 1).await;
    let c = &f.coordinator;
    let interlock = |args: &[&str]| run(c.cli("alice"), args);
    let as_k00 = |args: &[&str]| run(c.host_cli("k00"), args);

    let status = json(&interlock(&["-o", "json", "status"]));
    assert_eq!(status["leader"], true);
    assert_eq!(status["store"], "etcd");

    let out = interlock(&[
        "freeze",
        "--class",
        "disk_cleanup",
        "--reason",
        "maintenance",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A dry run names the check that would deny, exits 3, and writes nothing.
    let before = audit_len(c);
    let acquire = [
        "lease",
        "acquire",
        "--host",
        "k00",
        "--class",
        "disk_cleanup",
        "--target",
        "/t",
    ];
    let mut dry: Vec<&str> = acquire.to_vec();
    dry.push("--dry-run");
    let out = as_k00(&dry);
    assert_eq!(out.status.code(), Some(3), "denied exits 3");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("frozen"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(audit_len(c), before, "a dry run changes nothing");

    let out = interlock(&["unfreeze", "--class", "disk_cleanup", "--reason", "done"]);
    assert!(out.status.success());
    let mut with_json = vec!["-o", "json"];
    with_json.extend(acquire);
    let out = as_k00(&with_json);
    assert_eq!(out.status.code(), Some(0), "granted exits 0");
    let granted = json(&out);
    let lease = granted["granted"]["lease_id"]
        .as_str()
        .expect("lease id")
        .to_owned();
    let token = granted["granted"]["token"]
        .as_u64()
        .expect("token")
        .to_string();
    let leases = json(&interlock(&["-o", "json", "leases"]));
    let listed = leases["leases"].as_array().expect("leases");
    assert!(listed.iter().any(|l| l["lease_id"] == lease.as_str()
        && l["token"].as_u64().map(|t| t.to_string()).as_ref() == Some(&token)));
    let out = as_k00(&[
        "lease",
        "release",
        &lease,
        "--token",
        &token,
        "--outcome",
        "success",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An operator revokes one lease by id, then freezes the class ending the others.
    let lease_of = |out: &Output| -> String {
        json(out)["granted"]["lease_id"]
            .as_str()
            .expect("granted")
            .to_owned()
    };
    let first = lease_of(&as_k00(&with_json));
    let mut second_target = with_json.clone();
    *second_target.last_mut().unwrap() = "/u";
    let second = lease_of(&as_k00(&second_target));
    let out = interlock(&["lease", "revoke", &first, "--reason", "manual fix"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = || -> Vec<String> {
        json(&interlock(&["-o", "json", "leases"]))["leases"]
            .as_array()
            .expect("leases")
            .iter()
            .map(|l| l["lease_id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(live(), vec![second.clone()], "the revoked lease is gone");
    let out = interlock(&[
        "-o",
        "json",
        "freeze",
        "--class",
        "disk_cleanup",
        "--revoke",
        "--reason",
        "incident",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        live().is_empty(),
        "freeze --revoke ended the remaining lease"
    );
    let audit = json(&interlock(&[
        "-o",
        "json",
        "audit",
        "--class",
        "disk_cleanup",
    ]));
    let revokes: Vec<&serde_json::Value> = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["kind"] == "revoke")
        .collect();
    assert_eq!(revokes.len(), 2, "both revocations audited");
    assert!(revokes.iter().all(|r| r["owner"] == "operator:alice"));
    let out = interlock(&["unfreeze", "--class", "disk_cleanup", "--reason", "over"]);
    assert!(out.status.success());

    let out = interlock(&["mode", "--class", "disk_cleanup", "observe"]);
    assert!(out.status.success());
    assert_eq!(as_k00(&acquire).status.code(), Some(5), "observed exits 5");
    let out = interlock(&["mode", "--class", "disk_cleanup", "assist"]);
    assert!(out.status.success());
    assert_eq!(as_k00(&acquire).status.code(), Some(4), "pending exits 4");

    let out = interlock(&["mode", "--class", "node_reboot", "autonomous"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("red"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let alice = c.operator_files("alice");
    let out = Command::new(binary("interlock"))
        .args(["--coordinator", "https://127.0.0.1:1", "status"])
        .env("INTERLOCK_CA", &alice.ca)
        .env("INTERLOCK_CERT", &alice.cert)
        .env("INTERLOCK_KEY", &alice.key)
        .output()
        .expect("run interlock");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the coordinator") && stderr.contains("INTERLOCK_COORDINATOR"),
        "{stderr}"
    );
}
