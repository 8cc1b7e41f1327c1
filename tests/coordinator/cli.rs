//! The operator CLI against a real coordinator: exit codes, JSON output, dry runs that change
//! nothing, and errors that say what to do.

use std::process::{Command, Output};

use interlock_tests::coordinator::binary;

use super::{fixture, policy, register_hosts};

fn interlock(url: &str, args: &[&str]) -> Output {
    Command::new(binary("interlock"))
        .args(["--coordinator", url, "--operator", "alice"])
        .args(args)
        .output()
        .expect("run interlock")
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

fn audit_len(url: &str) -> usize {
    let out = interlock(url, &["-o", "json", "audit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)["records"].as_array().expect("records").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_decisions_by_exit_code_and_dry_runs_change_nothing() {
    let f = fixture("cli", &policy("2", "autonomous", 1000, 1000, "30s"), "60s").await;
    register_hosts(&f.channel, "k", "web", 1).await;
    let url = f.coordinator.url();

    let status = json(&interlock(&url, &["-o", "json", "status"]));
    assert_eq!(status["leader"], true);
    assert_eq!(status["store"], "etcd");

    let out = interlock(
        &url,
        &[
            "freeze",
            "--class",
            "disk_cleanup",
            "--reason",
            "maintenance",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A dry run names the check that would deny, exits 3, and writes nothing.
    let before = audit_len(&url);
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
    let out = interlock(&url, &dry);
    assert_eq!(out.status.code(), Some(3), "denied exits 3");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("frozen"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(audit_len(&url), before, "a dry run changes nothing");

    let out = interlock(
        &url,
        &["unfreeze", "--class", "disk_cleanup", "--reason", "done"],
    );
    assert!(out.status.success());
    let mut with_json = vec!["-o", "json"];
    with_json.extend(acquire);
    let out = interlock(&url, &with_json);
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
    let leases = json(&interlock(&url, &["-o", "json", "leases"]));
    let listed = leases["leases"].as_array().expect("leases");
    assert!(listed.iter().any(|l| l["lease_id"] == lease.as_str()
        && l["token"].as_u64().map(|t| t.to_string()).as_ref() == Some(&token)));
    let out = interlock(
        &url,
        &[
            "lease",
            "release",
            &lease,
            "--token",
            &token,
            "--outcome",
            "success",
        ],
    );
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
    let first = lease_of(&interlock(&url, &with_json));
    let mut second_target = with_json.clone();
    *second_target.last_mut().unwrap() = "/u";
    let second = lease_of(&interlock(&url, &second_target));
    let out = interlock(&url, &["lease", "revoke", &first, "--reason", "manual fix"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = |url: &str| -> Vec<String> {
        json(&interlock(url, &["-o", "json", "leases"]))["leases"]
            .as_array()
            .expect("leases")
            .iter()
            .map(|l| l["lease_id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        live(&url),
        vec![second.clone()],
        "the revoked lease is gone"
    );
    let out = interlock(
        &url,
        &[
            "-o",
            "json",
            "freeze",
            "--class",
            "disk_cleanup",
            "--revoke",
            "--reason",
            "incident",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        live(&url).is_empty(),
        "freeze --revoke ended the remaining lease"
    );
    let audit = json(&interlock(
        &url,
        &["-o", "json", "audit", "--class", "disk_cleanup"],
    ));
    let revokes: Vec<&serde_json::Value> = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["kind"] == "revoke")
        .collect();
    assert_eq!(revokes.len(), 2, "both revocations audited");
    assert!(revokes.iter().all(|r| r["owner"] == "operator:alice"));
    let out = interlock(
        &url,
        &["unfreeze", "--class", "disk_cleanup", "--reason", "over"],
    );
    assert!(out.status.success());

    let out = interlock(&url, &["mode", "--class", "disk_cleanup", "observe"]);
    assert!(out.status.success());
    assert_eq!(
        interlock(&url, &acquire).status.code(),
        Some(5),
        "observed exits 5"
    );
    let out = interlock(&url, &["mode", "--class", "disk_cleanup", "assist"]);
    assert!(out.status.success());
    assert_eq!(
        interlock(&url, &acquire).status.code(),
        Some(4),
        "pending exits 4"
    );

    let out = interlock(&url, &["mode", "--class", "node_reboot", "autonomous"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("red"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = interlock("http://127.0.0.1:1", &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the coordinator") && stderr.contains("INTERLOCK_COORDINATOR"),
        "{stderr}"
    );
}
