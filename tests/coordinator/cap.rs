//! I1: caps hold under contention, and % caps follow the live host count.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use interlock_proto::v1 as pb;
use interlock_tests::client::{self, Got, HeldInterval, max_overlap, token_order_violations};

use super::{agent_for, fixture, policy, register_hosts};

/// A small deterministic generator for hold and back-off times (xorshift); the point is
/// variety, not quality.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_acquirers_never_see_more_than_three_holders() {
    let f = fixture(
        "cap64",
        &policy("3", "autonomous", 1_000_000, 1_000_000, "5s"),
        "60s",
    )
    .await;
    let hosts = register_hosts(&f.coordinator, "h", "web", 64).await;
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut tasks = Vec::new();
    for (i, host) in hosts.into_iter().enumerate() {
        let mut agent = agent_for(&f.coordinator, &host).await;
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
            let mut held = Vec::new();
            let mut denials: BTreeMap<String, u32> = BTreeMap::new();
            // Bounded in time and in rounds.
            for _round in 0..10_000 {
                if Instant::now() > deadline {
                    break;
                }
                let sent = Instant::now();
                let got = client::acquire(&mut agent, &host, "disk_cleanup", "/var/log").await;
                let answered = Instant::now();
                match got {
                    Got::Granted {
                        lease_id, token, ..
                    } => {
                        // Holds long against the round trip, so that the cap is visibly full.
                        tokio::time::sleep(Duration::from_millis(20 + next(&mut rng) % 40)).await;
                        let released = Instant::now();
                        client::release(&mut agent, &lease_id, token).await;
                        held.push(HeldInterval {
                            client: i,
                            token,
                            acquire_sent: sent,
                            acquired: answered,
                            released,
                        });
                    }
                    Got::Denied { check, .. } => {
                        *denials.entry(check).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(next(&mut rng) % 5)).await;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            (held, denials)
        }));
    }
    let mut history = Vec::new();
    let mut denials: BTreeMap<String, u32> = BTreeMap::new();
    for t in tasks {
        let (held, d) = t.await.expect("client task");
        history.extend(held);
        for (k, v) in d {
            *denials.entry(k).or_default() += v;
        }
    }
    let overlap = max_overlap(&history);
    assert!(overlap <= 3, "{overlap} holders at once with a cap of 3");
    assert_eq!(overlap, 3, "the run must fill the cap to test it");
    assert!(
        denials.get("cap").copied().unwrap_or(0) > 0,
        "the run must see cap denials: {denials:?}"
    );
    assert_eq!(
        denials.keys().collect::<Vec<_>>(),
        vec!["cap"],
        "only the cap denies here"
    );
    let violations = token_order_violations(&history);
    assert!(
        violations.is_empty(),
        "tokens not increasing: {violations:?}"
    );
    let mut tokens: Vec<u64> = history.iter().map(|h| h.token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), history.len(), "every grant has its own token");
    println!(
        "cap64: {} grants, {} cap denials, max holders {overlap}",
        history.len(),
        denials["cap"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_percent_cap_shrinks_as_hosts_die() {
    // 10% of 20 live hosts = 2; hosts that stop heartbeating vanish after the 2 s host TTL.
    let f = fixture(
        "pctcap",
        &policy("\"10%\"", "autonomous", 1000, 1000, "30s"),
        "2s",
    )
    .await;
    let hosts = register_hosts(&f.coordinator, "p", "web", 20).await;
    // Each host's own client: a host heartbeats and acquires only for itself.
    let mut agents = Vec::with_capacity(hosts.len());
    for h in &hosts {
        agents.push(agent_for(&f.coordinator, h).await);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(Vec::<String>::new());
    let beating = {
        let hosts = hosts.clone();
        let mut agents = agents.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                let dead = stop_rx.borrow().clone();
                for (h, agent) in hosts.iter().zip(agents.iter_mut()) {
                    if dead.contains(h) {
                        continue;
                    }
                    let _ = agent
                        .heartbeat(pb::HeartbeatRequest { host_id: h.clone() })
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let mut operator = client::operator(&f.admin);
    let a = client::acquire(&mut agents[0], &hosts[0], "disk_cleanup", "/a").await;
    let b = client::acquire(&mut agents[1], &hosts[1], "disk_cleanup", "/b").await;
    let c = client::acquire(&mut agents[2], &hosts[2], "disk_cleanup", "/c").await;
    assert!(matches!(a, Got::Granted { .. }), "{a:?}");
    assert!(matches!(b, Got::Granted { .. }), "{b:?}");
    match &c {
        Got::Denied { check, reason } => {
            assert_eq!(check, "cap");
            assert!(
                reason.contains("cap is 2") && reason.contains("20 live hosts"),
                "{reason}"
            );
        }
        other => panic!("third holder must be denied, got {other:?}"),
    }
    // Eleven hosts die (stop heartbeating): 9 live, 10% of 9 rounds down to 0, minimum 1.
    let dead: Vec<String> = hosts[9..].to_vec();
    stop_tx.send(dead).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let scope = loop {
        let status = operator
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        let class = status
            .classes
            .iter()
            .find(|c| c.class == "disk_cleanup")
            .unwrap();
        let web = class
            .scopes
            .iter()
            .find(|s| s.service == "web")
            .unwrap()
            .clone();
        if web.live_hosts == 9 || Instant::now() > deadline {
            break web;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(scope.live_hosts, 9, "eleven hosts expired");
    assert_eq!(
        scope.cap, 1,
        "10% of 9 hosts rounds down, to the minimum of 1"
    );
    assert_eq!(scope.holders, 2, "existing holders keep their leases");
    let (
        Got::Granted {
            lease_id: la,
            token: ta,
            ..
        },
        Got::Granted {
            lease_id: lb,
            token: tb,
            ..
        },
    ) = (a, b)
    else {
        unreachable!()
    };
    // Two holders, cap 1: nothing new until holders fall below the cap.
    let d = client::acquire(&mut agents[3], &hosts[3], "disk_cleanup", "/d").await;
    assert!(
        matches!(&d, Got::Denied { check, .. } if check == "cap"),
        "{d:?}"
    );
    client::release(&mut agents[0], &la, ta).await;
    let e = client::acquire(&mut agents[3], &hosts[3], "disk_cleanup", "/d").await;
    assert!(
        matches!(&e, Got::Denied { check, .. } if check == "cap"),
        "1 holder, cap 1: {e:?}"
    );
    client::release(&mut agents[1], &lb, tb).await;
    let g = client::acquire(&mut agents[3], &hosts[3], "disk_cleanup", "/d").await;
    assert!(
        matches!(g, Got::Granted { .. }),
        "below the cap again: {g:?}"
    );
    beating.abort();
}
