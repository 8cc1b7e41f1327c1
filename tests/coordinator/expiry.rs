//! A holder that stops renewing frees its slot by itself within TTL + 1 s, whether it was
//! stopped (SIGSTOP) or killed (SIGKILL): no manual unlock.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use interlock_proto::v1 as pb;
use interlock_tests::{Coordinator, client};

use super::{agent_for, fixture, policy, register_hosts};

/// Starts `interlock lease acquire --hold` as `host` (a real process that renews its lease,
/// presenting the host's certificate) and returns it once it printed its grant.
fn holder(coordinator: &Coordinator, host: &str) -> (Child, String) {
    let mut child = coordinator
        .host_cli(host)
        .args(["-o", "json"])
        .args([
            "lease",
            "acquire",
            "--host",
            host,
            "--class",
            "disk_cleanup",
        ])
        .args(["--target", "/var/log", "--hold"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the holder");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut json = String::new();
    for _ in 0..100 {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        json.push_str(&line);
        if line.starts_with('}') {
            break;
        }
    }
    let v: serde_json::Value = serde_json::from_str(&json).expect("grant JSON");
    let lease = v["granted"]["lease_id"]
        .as_str()
        .expect("granted")
        .to_owned();
    (child, lease)
}

fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim().chars().next()
}

async fn lease_ids(channel: &tonic::transport::Channel) -> Vec<String> {
    client::operator(channel)
        .leases(pb::LeasesRequest {})
        .await
        .expect("leases")
        .into_inner()
        .leases
        .into_iter()
        .map(|l| l.lease_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_or_killed_holder_frees_its_slot_within_ttl_plus_one_second() {
    let ttl = Duration::from_secs(2);
    let f = fixture(
        "expiry",
        &policy("1", "autonomous", 1000, 1000, "2s"),
        "60s",
    )
    .await;
    register_hosts(&f.coordinator, "e", "web", 2).await;

    for (host, signal) in [("e00", "STOP"), ("e01", "KILL")] {
        let (mut child, lease) = holder(&f.coordinator, host);
        // Renewals keep it alive well past its TTL.
        tokio::time::sleep(ttl * 2).await;
        assert!(
            lease_ids(&f.admin).await.contains(&lease),
            "renewed lease is live"
        );
        // `interlock leases` shows the time left on the renewed store lease, not the TTL
        // counted from the grant (which ran out a TTL ago).
        let listed = client::operator(&f.admin)
            .leases(pb::LeasesRequest {})
            .await
            .expect("leases")
            .into_inner()
            .leases;
        let left = listed
            .iter()
            .find(|l| l.lease_id == lease)
            .unwrap()
            .expires_in_ms;
        assert!(
            (1..=2_000).contains(&left),
            "time left {left} ms on a renewed 2 s lease"
        );
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let stopped_at = Instant::now();
        if signal == "STOP" {
            // Signal delivery is asynchronous: on a loaded machine the holder may still read
            // as running for a moment. Bounded wait for the stop to take effect.
            let deadline = Instant::now() + Duration::from_secs(2);
            while process_state(child.id()) != Some('T') && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(
                process_state(child.id()),
                Some('T'),
                "the holder is really stopped"
            );
        }
        let freed = loop {
            if !lease_ids(&f.admin).await.contains(&lease) {
                break stopped_at.elapsed();
            }
            assert!(
                stopped_at.elapsed() < Duration::from_secs(10),
                "lease never expired"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        // The last renewal may have happened up to a third of the TTL before the stop.
        assert!(
            freed <= ttl + Duration::from_secs(1),
            "freed after {freed:?}"
        );
        println!("holder {signal}: slot freed {freed:?} after the fault");
        // The slot is really free: another host gets it.
        let other = if host == "e00" { "e01" } else { "e00" };
        let mut agent = agent_for(&f.coordinator, other).await;
        let got = client::acquire(&mut agent, other, "disk_cleanup", "/tmp").await;
        let client::Got::Granted {
            lease_id, token, ..
        } = got
        else {
            panic!("the freed slot is grantable: {got:?}")
        };
        client::release(&mut agent, &lease_id, token).await;
        let _ = Command::new("kill")
            .args(["-CONT", &child.id().to_string()])
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }
    // The audit log says the leases ran out.
    let audit = client::audit(&client::operator(&f.admin), None, None).await;
    let expired = audit.records.iter().filter(|r| r.kind == "expired").count();
    assert!(expired >= 1, "expiry audited");
    assert!(audit.chain_ok, "{}", audit.chain_error);
}
