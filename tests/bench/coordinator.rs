//! `cargo xtask bench coordinator`: lease round trips through the coordinator against etcd's
//! own lock as the baseline, on one real single-node etcd started here, plus a contended cap.
//!
//! Both sides run in this process, alternating run by run, so they share the machine's
//! conditions. Prints a table for people and, as its last line, the same figures as JSON.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use etcd_client::{Client, LockOptions};
use interlock_tests::{
    Coordinator, CoordinatorOptions, Etcd,
    client::{self, Got, HeldInterval, max_overlap},
    fresh_prefix,
};
use tonic::transport::Channel;

const CONCURRENCY: [usize; 3] = [1, 16, 64];
const CONTENDED_CLIENTS: usize = 64;
const CONTENDED_CAP: usize = 3;

const POLICY: &str = r#"
name = "bench"
version = 1

[classes.bench]
tier = "green"
mode = "autonomous"
trigger = "benchmark"
false_positives = ["none"]
reversible = true
time_to_reverse = "1s"
cap = 1
lease_ttl = "10s"
verification_window = "10s"
[classes.bench.budget]
fleet = { max = 1000000000, window = "1h" }
host = { max = 1000000000, window = "1h" }

[classes.contended]
tier = "green"
mode = "autonomous"
trigger = "benchmark"
false_positives = ["none"]
reversible = true
time_to_reverse = "1s"
cap = 3
lease_ttl = "10s"
verification_window = "10s"
[classes.contended.budget]
fleet = { max = 1000000000, window = "1h" }
host = { max = 1000000000, window = "1h" }
"#;

/// Figures of one timed run.
#[derive(Clone, Debug)]
struct Run {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "a rank within a slice's length, rounded on purpose"
)]
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn summarize(mut latencies: Vec<Duration>, elapsed: Duration) -> Run {
    latencies.sort_unstable();
    Run {
        ops_per_s: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
    }
}

/// Median and spread (min, max) of a series.
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}

/// `n` clients, each on its own scope, acquire+release in a loop for `duration`; client `i`
/// is host `<prefix><i>` on `channels[i % len]`.
async fn coordinator_run(
    channels: &[Channel],
    prefix: &str,
    n: usize,
    duration: Duration,
) -> anyhow::Result<Run> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut agent = client::agent(&channels[i % channels.len()]);
        let host = format!("{prefix}{i:02}");
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match client::acquire(&mut agent, &host, "bench", "/t").await {
                    Got::Granted {
                        lease_id, token, ..
                    } => {
                        client::release(&mut agent, &lease_id, token).await;
                        latencies.push(t0.elapsed());
                    }
                    other => panic!("uncontended scope denied: {other:?}"),
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("client task")?);
    }
    Ok(summarize(all, start.elapsed()))
}

/// Hosts `t00..t63`, each with its own certificate and its own connection, against two
/// coordinators on the same etcd (different prefixes): one serving mutual TLS, one plaintext.
/// Alternating run by run; returns per concurrency (mTLS runs, plaintext runs).
async fn mtls_vs_plaintext(
    etcd: &Etcd,
    runs: usize,
    duration: Duration,
) -> anyhow::Result<BTreeMap<usize, (Vec<Run>, Vec<Run>)>> {
    use interlock_coordinator::{
        certs::{self, Validity},
        identity::Identity,
    };
    let hosts = *CONCURRENCY.iter().max().expect("concurrency levels");
    let dir = tempfile::tempdir()?;
    let certs_dir = dir.path().join("certs");
    certs::init(&certs_dir, certs::DEFAULT_TRUST_DOMAIN, &[])?;
    let mut files = Vec::new();
    for i in 0..hosts {
        let issued = certs::issue(
            &certs_dir,
            &Identity::Host(format!("t{i:02}")),
            Validity::from_now(1),
        )?;
        files.push(interlock_proto::tls::TlsFiles {
            ca: certs_dir.join("ca.pem"),
            cert: issued.cert,
            key: issued.key,
        });
    }
    let mut tls_options =
        CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix("bench-tls"), POLICY);
    tls_options.host_ttl = "300s";
    tls_options.tls = Some(interlock_tests::CertDir::existing(&certs_dir));
    // The plaintext side of the comparison: --insecure is what this part measures against.
    let mut plain_options =
        CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix("bench-plain"), POLICY).insecure();
    plain_options.host_ttl = "300s";
    let tls_coordinator = Coordinator::start(&tls_options)?;
    let plain_coordinator = Coordinator::start(&plain_options)?;
    tls_coordinator.wait_leader(Duration::from_secs(10))?;
    plain_coordinator.wait_leader(Duration::from_secs(10))?;
    let (mut tls_channels, mut plain_channels) = (Vec::new(), Vec::new());
    for (i, f) in files.iter().enumerate() {
        let t = client::tls_channel(&tls_coordinator.url(), f).await?;
        let p = client::plaintext_channel(&plain_coordinator.url()).await;
        let host = format!("t{i:02}");
        client::register(&mut client::agent(&t), &host, &format!("svc{i:02}")).await;
        client::register(&mut client::agent(&p), &host, &format!("svc{i:02}")).await;
        tls_channels.push(t);
        plain_channels.push(p);
    }
    let mut results: BTreeMap<usize, (Vec<Run>, Vec<Run>)> = BTreeMap::new();
    for &n in &CONCURRENCY {
        for run in 0..runs {
            let (t, p) = if run % 2 == 0 {
                let t = coordinator_run(&tls_channels, "t", n, duration).await?;
                let p = coordinator_run(&plain_channels, "t", n, duration).await?;
                (t, p)
            } else {
                let p = coordinator_run(&plain_channels, "t", n, duration).await?;
                let t = coordinator_run(&tls_channels, "t", n, duration).await?;
                (t, p)
            };
            eprintln!(
                "  n={n:>2} run {run}: mTLS {:>7.0}/s p99 {:>6.2} ms | plaintext {:>7.0}/s p99 {:>6.2} ms",
                t.ops_per_s, t.p99_ms, p.ops_per_s, p.p99_ms
            );
            let entry = results.entry(n).or_default();
            entry.0.push(t);
            entry.1.push(p);
        }
    }
    Ok(results)
}

/// The baseline: etcd's own lock/unlock on `n` distinct names, each client with its session
/// lease granted once (as etcd's concurrency package does).
async fn etcd_lock_run(endpoint: &str, n: usize, duration: Duration) -> anyhow::Result<Run> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut client = Client::connect([endpoint], None).await?;
        tasks.push(tokio::spawn(async move {
            let lease = client.lease_grant(60, None).await.expect("lease").id();
            let name = format!("/bench-lock/{i}");
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let locked = client
                    .lock(name.as_str(), Some(LockOptions::new().with_lease(lease)))
                    .await
                    .expect("lock");
                client.unlock(locked.key()).await.expect("unlock");
                latencies.push(t0.elapsed());
            }
            let _ = client.lease_revoke(lease).await;
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("client task")?);
    }
    Ok(summarize(all, start.elapsed()))
}

struct Contended {
    grants_per_s: f64,
    p99_wait_ms: f64,
    max_holders: usize,
    denials: u64,
}

/// 64 clients on one scope with cap 3: each wants the lease, retries on denial, holds it
/// briefly and releases. The cap is checked on the client-side history.
async fn contended_run(channels: &[Channel], duration: Duration) -> anyhow::Result<Contended> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for i in 0..CONTENDED_CLIENTS {
        let mut agent = client::agent(&channels[i % channels.len()]);
        let host = format!("c{i:02}");
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut waits = Vec::new();
            let mut denials = 0u64;
            'outer: while Instant::now() < deadline {
                let want = Instant::now();
                loop {
                    if Instant::now() >= deadline {
                        break 'outer;
                    }
                    let sent = Instant::now();
                    match client::acquire(&mut agent, &host, "contended", "/t").await {
                        Got::Granted {
                            lease_id, token, ..
                        } => {
                            let acquired = Instant::now();
                            waits.push(acquired - want);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            let released = Instant::now();
                            client::release(&mut agent, &lease_id, token).await;
                            held.push(HeldInterval {
                                client: i,
                                token,
                                acquire_sent: sent,
                                acquired,
                                released,
                            });
                            break;
                        }
                        Got::Denied { .. } => {
                            denials += 1;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            (held, waits, denials)
        }));
    }
    let mut history = Vec::new();
    let mut waits = Vec::new();
    let mut denials = 0;
    for t in tasks {
        let (h, w, d) = t.await.context("client task")?;
        history.extend(h);
        waits.extend(w);
        denials += d;
    }
    let elapsed = start.elapsed();
    waits.sort_unstable();
    Ok(Contended {
        grants_per_s: history.len() as f64 / elapsed.as_secs_f64(),
        p99_wait_ms: percentile(&waits, 99.0),
        max_holders: max_overlap(&history),
        denials,
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("INTERLOCK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(5);
    let seconds: f64 = std::env::var("INTERLOCK_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let duration = Duration::from_secs_f64(seconds);

    let etcd = Etcd::start()?;
    // Plaintext on purpose: the baseline (etcd's own lock) is plaintext, 128 hosts share four
    // HTTP/2 connections as in the runs this bench has always reported, and the mTLS cost is
    // measured separately, side by side with plaintext, in the TLS part below.
    let mut options =
        CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix("bench"), POLICY).insecure();
    options.host_ttl = "300s";
    let coordinator = Coordinator::start(&options)?;
    coordinator.wait_leader(Duration::from_secs(10))?;
    // A few HTTP/2 connections, as a fleet of agents would have many.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(client::plaintext_channel(&coordinator.url()).await);
    }
    let mut agent = client::agent(&channels[0]);
    for i in 0..64 {
        client::register(&mut agent, &format!("u{i:02}"), &format!("svc{i:02}")).await;
        client::register(&mut agent, &format!("c{i:02}"), "shared").await;
    }

    eprintln!("bench coordinator: {runs} alternating runs of {seconds} s per side and concurrency");
    let mut results: BTreeMap<usize, (Vec<Run>, Vec<Run>)> = BTreeMap::new();
    for &n in &CONCURRENCY {
        for run in 0..runs {
            // Alternate which side goes first so neither always runs on a warmer machine.
            let (c, e) = if run % 2 == 0 {
                let c = coordinator_run(&channels, "u", n, duration).await?;
                let e = etcd_lock_run(&etcd.endpoint(), n, duration).await?;
                (c, e)
            } else {
                let e = etcd_lock_run(&etcd.endpoint(), n, duration).await?;
                let c = coordinator_run(&channels, "u", n, duration).await?;
                (c, e)
            };
            eprintln!(
                "  n={n:>2} run {run}: coordinator {:>7.0}/s p99 {:>6.2} ms | etcd lock {:>7.0}/s p99 {:>6.2} ms",
                c.ops_per_s, c.p99_ms, e.ops_per_s, e.p99_ms
            );
            let entry = results.entry(n).or_default();
            entry.0.push(c);
            entry.1.push(e);
        }
    }
    let mut contended = Vec::new();
    for run in 0..runs {
        let c = contended_run(&channels, duration).await?;
        eprintln!(
            "  contended run {run}: {:.0} grants/s, p99 wait {:.1} ms, max holders {}, {} denials",
            c.grants_per_s, c.p99_wait_ms, c.max_holders, c.denials
        );
        contended.push(c);
    }

    let tls = mtls_vs_plaintext(&etcd, runs, duration).await?;

    println!();
    println!(
        "Coordinator acquire+release vs etcd lock/unlock (median [min-max] of {runs} runs, {seconds} s each)"
    );
    println!(
        "{:>3}  {:>24}  {:>24}  {:>24}  {:>24}  {:>18}  {:>18}",
        "n",
        "coordinator ops/s",
        "etcd lock ops/s",
        "coordinator p99 ms",
        "etcd lock p99 ms",
        "p99 ratio",
        "throughput ratio"
    );
    let fmt =
        |(m, lo, hi): (f64, f64, f64), prec: usize| format!("{m:.prec$} [{lo:.prec$}-{hi:.prec$}]");
    let mut json_rows = Vec::new();
    for (n, (c, e)) in &results {
        let c_ops = stats(&c.iter().map(|r| r.ops_per_s).collect::<Vec<_>>());
        let e_ops = stats(&e.iter().map(|r| r.ops_per_s).collect::<Vec<_>>());
        let c_p50 = stats(&c.iter().map(|r| r.p50_ms).collect::<Vec<_>>());
        let e_p50 = stats(&e.iter().map(|r| r.p50_ms).collect::<Vec<_>>());
        let c_p99 = stats(&c.iter().map(|r| r.p99_ms).collect::<Vec<_>>());
        let e_p99 = stats(&e.iter().map(|r| r.p99_ms).collect::<Vec<_>>());
        let p99_ratio = stats(
            &c.iter()
                .zip(e)
                .map(|(a, b)| a.p99_ms / b.p99_ms)
                .collect::<Vec<_>>(),
        );
        let ops_ratio = stats(
            &c.iter()
                .zip(e)
                .map(|(a, b)| a.ops_per_s / b.ops_per_s)
                .collect::<Vec<_>>(),
        );
        println!(
            "{n:>3}  {:>24}  {:>24}  {:>24}  {:>24}  {:>18}  {:>18}",
            fmt(c_ops, 0),
            fmt(e_ops, 0),
            fmt(c_p99, 2),
            fmt(e_p99, 2),
            fmt(p99_ratio, 2),
            fmt(ops_ratio, 2)
        );
        json_rows.push(serde_json::json!({
            "clients": n,
            "coordinator": {"grants_per_s": c_ops.0, "grants_per_s_min": c_ops.1, "grants_per_s_max": c_ops.2,
                            "p50_ms": c_p50.0, "p99_ms": c_p99.0, "p99_ms_min": c_p99.1, "p99_ms_max": c_p99.2},
            "etcd_lock": {"ops_per_s": e_ops.0, "ops_per_s_min": e_ops.1, "ops_per_s_max": e_ops.2,
                          "p50_ms": e_p50.0, "p99_ms": e_p99.0, "p99_ms_min": e_p99.1, "p99_ms_max": e_p99.2},
            "p99_ratio": p99_ratio.0, "p99_ratio_min": p99_ratio.1, "p99_ratio_max": p99_ratio.2,
            "throughput_ratio": ops_ratio.0,
        }));
    }
    let g = stats(&contended.iter().map(|c| c.grants_per_s).collect::<Vec<_>>());
    let w = stats(&contended.iter().map(|c| c.p99_wait_ms).collect::<Vec<_>>());
    let max_holders = contended.iter().map(|c| c.max_holders).max().unwrap_or(0);
    let cap_held = max_holders <= CONTENDED_CAP;
    println!();
    println!(
        "Contended: {CONTENDED_CLIENTS} clients, one scope, cap {CONTENDED_CAP}: {} grants/s, p99 wait {} ms, max holders seen {max_holders} ({})",
        fmt(g, 0),
        fmt(w, 1),
        if cap_held { "cap held" } else { "CAP VIOLATED" }
    );
    println!();
    println!(
        "Mutual TLS vs plaintext, acquire+release, one connection per host (median [min-max] of {runs} runs)"
    );
    println!(
        "{:>3}  {:>24}  {:>24}  {:>24}  {:>24}  {:>18}",
        "n",
        "mTLS grants/s",
        "plaintext grants/s",
        "mTLS p99 ms",
        "plaintext p99 ms",
        "mTLS/plain grants"
    );
    let mut tls_rows = Vec::new();
    for (n, (t, p)) in &tls {
        let t_ops = stats(&t.iter().map(|r| r.ops_per_s).collect::<Vec<_>>());
        let p_ops = stats(&p.iter().map(|r| r.ops_per_s).collect::<Vec<_>>());
        let t_p99 = stats(&t.iter().map(|r| r.p99_ms).collect::<Vec<_>>());
        let p_p99 = stats(&p.iter().map(|r| r.p99_ms).collect::<Vec<_>>());
        let ratio = stats(
            &t.iter()
                .zip(p)
                .map(|(a, b)| a.ops_per_s / b.ops_per_s)
                .collect::<Vec<_>>(),
        );
        println!(
            "{n:>3}  {:>24}  {:>24}  {:>24}  {:>24}  {:>18}",
            fmt(t_ops, 0),
            fmt(p_ops, 0),
            fmt(t_p99, 2),
            fmt(p_p99, 2),
            fmt(ratio, 2)
        );
        tls_rows.push(serde_json::json!({
            "clients": n,
            "mtls_grants_per_s": t_ops.0, "plaintext_grants_per_s": p_ops.0,
            "mtls_p99_ms": t_p99.0, "plaintext_p99_ms": p_p99.0,
            "ratio": ratio.0, "ratio_min": ratio.1, "ratio_max": ratio.2,
        }));
    }
    let json = serde_json::json!({
        "benchmark": "coordinator",
        "mtls_vs_plaintext": tls_rows,
        "runs": runs,
        "seconds_per_run": seconds,
        "uncontended": json_rows,
        "contended": {
            "clients": CONTENDED_CLIENTS, "cap": CONTENDED_CAP,
            "grants_per_s": g.0, "grants_per_s_min": g.1, "grants_per_s_max": g.2,
            "p99_wait_ms": w.0, "p99_wait_ms_min": w.1, "p99_wait_ms_max": w.2,
            "max_holders": max_holders, "cap_held": cap_held,
            "denials": contended.iter().map(|c| c.denials).sum::<u64>(),
        },
    });
    println!("{json}");
    drop(coordinator);
    drop(etcd);
    if !cap_held {
        anyhow::bail!("the cap was violated under contention");
    }
    Ok(())
}
