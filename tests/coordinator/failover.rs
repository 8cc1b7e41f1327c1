//! I5: two replicas. The survivor of a kill -9 serves within the election TTL + 1 s; a leader
//! stopped past its TTL with a request in flight cannot commit when it resumes.

use std::time::{Duration, Instant};

use interlock_proto::v1 as pb;
use interlock_tests::{ADMIN, Coordinator, CoordinatorOptions, Etcd, client, fresh_prefix};

use super::policy;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_is_replaced_and_a_stopped_one_is_fenced() {
    let etcd = Etcd::start().expect("etcd");
    let prefix = fresh_prefix("failover");
    let text = policy("1", "autonomous", 1000, 1000, "10s");
    let mut plain = CoordinatorOptions::etcd(etcd.endpoint(), prefix.clone(), &text);
    plain.election_ttl = "2s";
    // A clone shares the CA: every replica trusts the same host and operator certificates.
    let mut paused = plain.clone();
    paused.env.push((
        "INTERLOCK_FAILPOINT_PAUSE_BEFORE_GRANT_COMMIT_MS".into(),
        "4000".into(),
    ));
    let mut a = Coordinator::start(&plain).expect("replica a");
    a.wait_leader(Duration::from_secs(10)).expect("a leads");
    let b = Coordinator::start(&paused).expect("replica b");

    // kill -9 the leader: b takes over within the election TTL (2 s) + 1 s.
    a.kill();
    let killed_at = Instant::now();
    b.wait_leader(Duration::from_secs(10)).expect("b leads");
    let took = killed_at.elapsed();
    assert!(took <= Duration::from_secs(3), "failover took {took:?}");
    println!("failover after kill -9: {took:?}");
    let mut agent_b = client::agent(&b.host_channel("f1").await);
    client::register(&mut agent_b, "f1", "web").await;
    client::register(&mut client::agent(&b.host_channel("f2").await), "f2", "web").await;

    // A request in flight at b (the failpoint holds it just before its commit) ...
    let in_flight = tokio::spawn(async move {
        agent_b
            .acquire(client::acquire_request("f1", "disk_cleanup", "/x"))
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.metric("interlock_failpoint_hits_total") < 1.0 {
        assert!(Instant::now() < deadline, "failpoint never hit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... b is stopped past its TTL, and c becomes leader.
    b.signal("STOP");
    let c = Coordinator::start(&plain).expect("replica c");
    c.wait_leader(Duration::from_secs(10))
        .expect("c leads while b is stopped");
    let mut agent_c = client::agent(&c.host_channel("f2").await);
    // c serves and fills the cap of 1 with f2.
    client::register(&mut agent_c, "f2", "web").await;
    client::register(&mut client::agent(&c.host_channel("f1").await), "f1", "web").await;
    let got = client::acquire(&mut agent_c, "f2", "disk_cleanup", "/y").await;
    assert!(matches!(got, client::Got::Granted { .. }), "{got:?}");

    // b resumes: its write is attempted, fails its leadership compare, and nothing lands.
    b.signal("CONT");
    let answer = tokio::time::timeout(Duration::from_secs(15), in_flight)
        .await
        .expect("the in-flight request is answered")
        .expect("task");
    let status = answer.expect_err("the deposed leader must not grant");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.metric("interlock_fenced_writes_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "b never attempted its write; log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel_c = c.operator_channel(ADMIN).await;
    let leases = client::operator(&channel_c)
        .leases(pb::LeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(
        leases.len(),
        1,
        "the cap of 1 held across the failover: {leases:?}"
    );
    assert_eq!(leases[0].host_id, "f2");
    let audit = client::audit(&client::operator(&channel_c), None, Some("f1")).await;
    assert!(
        !audit.records.iter().any(|r| r.kind == "grant"),
        "the fenced grant left no record"
    );
    assert!(audit.chain_ok, "{}", audit.chain_error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_resigns_so_the_next_replica_leads_without_waiting_for_the_ttl() {
    let etcd = Etcd::start().expect("etcd");
    let mut options = CoordinatorOptions::etcd(
        etcd.endpoint(),
        fresh_prefix("sigterm"),
        &policy("1", "autonomous", 1000, 1000, "10s"),
    );
    // A long election TTL: a replica that merely died would hold leadership for 10 s.
    options.election_ttl = "10s";
    let mut a = Coordinator::start(&options).expect("replica a");
    a.wait_leader(Duration::from_secs(10)).expect("a leads");
    let b = Coordinator::start(&options).expect("replica b");
    let stopped_at = Instant::now();
    let status = a.terminate(Duration::from_secs(10)).expect("a exits");
    assert!(status.success(), "SIGTERM exits 0: {status}");
    assert!(a.log().contains("resigned leadership"), "{}", a.log());
    b.wait_leader(Duration::from_secs(5)).expect("b leads");
    let took = stopped_at.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "b led {took:?} after SIGTERM, before a's 10 s TTL ran out"
    );
    println!("SIGTERM handover: {took:?}");
}
