//! etcd as a trust boundary: TLS on etcd's client URL, client certificates required, and
//! etcd's own authentication turned on by `interlock etcd-bootstrap`, with certificates made by
//! the real `interlock certs` CLI. The coordinator leads and grants under a role that may only
//! touch its prefix; a client with a certificate but without the role cannot write there; the
//! store conformance suite passes against this etcd as the coordinator's user.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
    time::Duration,
};

use interlock_coordinator::store::etcd::{EtcdOptions, EtcdStore};
use interlock_proto::tls::TlsFiles;
use interlock_tests::{
    Coordinator, CoordinatorOptions, Etcd, EtcdTls, client, coordinator::binary, fresh_prefix,
};

use super::conformance::run_all;

fn interlock(args: &[&str]) -> Output {
    Command::new(binary("interlock"))
        .args(args)
        .output()
        .expect("run interlock")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(cert, key)` of etcd user `user` under `dir`.
fn user(dir: &Path, user: &str) -> (PathBuf, PathBuf) {
    let users = dir.join("etcd").join("users");
    (
        users.join(format!("{user}.pem")),
        users.join(format!("{user}.key")),
    )
}

fn bootstrap(etcd: &Etcd, dir: &Path, prefix: &str) -> String {
    let (cert, key) = user(dir, "root");
    let ca = dir.join("ca.pem");
    ok(
        interlock(&[
            "etcd-bootstrap",
            "--etcd",
            &etcd.endpoint(),
            "--etcd-ca",
            ca.to_str().expect("utf-8"),
            "--etcd-cert",
            cert.to_str().expect("utf-8"),
            "--etcd-key",
            key.to_str().expect("utf-8"),
            "--prefix",
            prefix,
        ]),
        "etcd-bootstrap",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_works_under_a_prefix_only_etcd_role_and_others_cannot_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let d = dir.to_str().expect("utf-8");
    ok(interlock(&["certs", "init", d]), "certs init");
    ok(
        interlock(&["certs", "issue", "etcd-server", "--dir", d]),
        "etcd server certificate",
    );
    for u in ["root", "interlock", "mallory"] {
        ok(
            interlock(&["certs", "issue", "etcd-user", u, "--dir", d]),
            "etcd user certificate",
        );
    }
    let etcd = Etcd::start_tls(EtcdTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("etcd").join("server.pem"),
        key: dir.join("etcd").join("server.key"),
    })
    .expect("etcd with TLS and client certificates");

    // The coordinators' prefixes and the conformance suite's, one role for both.
    let first = bootstrap(&etcd, &dir, "/interlock-test");
    assert!(
        first.contains("authentication enabled: done"),
        "bootstrap enables auth: {first}"
    );
    let second = bootstrap(&etcd, &dir, "/conformance");
    assert!(
        second.contains("user interlock (no password; authenticates by certificate): already so"),
        "a second run is idempotent (now as root, auth on): {second}"
    );

    // mallory has a certificate from the same CA and a user, but not the role.
    let (root_cert, root_key) = user(&dir, "root");
    let added = etcd
        .etcdctl(
            &root_cert,
            &root_key,
            &["user", "add", "mallory", "--no-password"],
        )
        .expect("etcdctl");
    ok(added, "add user mallory as root");
    let (m_cert, m_key) = user(&dir, "mallory");
    let forged = etcd
        .etcdctl(
            &m_cert,
            &m_key,
            &["put", "/interlock-test/x/freeze/all", "{}"],
        )
        .expect("etcdctl");
    assert!(!forged.status.success(), "mallory must not write");
    assert!(
        String::from_utf8_lossy(&forged.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&forged.stderr)
    );
    // And the coordinator's user may not write outside its prefixes.
    let (i_cert, i_key) = user(&dir, "interlock");
    let outside = etcd
        .etcdctl(&i_cert, &i_key, &["put", "/elsewhere", "x"])
        .expect("etcdctl");
    assert!(!outside.status.success(), "the role covers the prefix only");
    assert!(
        String::from_utf8_lossy(&outside.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&outside.stderr)
    );

    // The coordinator leads, grants and audits as user interlock.
    let mut options = CoordinatorOptions::etcd(
        etcd.endpoint(),
        fresh_prefix("etcd-auth"),
        interlock_tests::BASIC_POLICY,
    );
    options.args = [
        "--etcd-ca".into(),
        dir.join("ca.pem").display().to_string(),
        "--etcd-cert".into(),
        i_cert.display().to_string(),
        "--etcd-key".into(),
        i_key.display().to_string(),
    ]
    .to_vec();
    let coordinator = Coordinator::start(&options).expect("coordinator on authenticated etcd");
    coordinator
        .wait_leader(Duration::from_secs(15))
        .expect("leads under its role");
    let mut agent = client::agent(&coordinator.host_channel("e1").await);
    client::register(&mut agent, "e1", "web").await;
    let got = client::acquire(&mut agent, "e1", "disk_cleanup", "/var/log").await;
    let client::Got::Granted {
        lease_id, token, ..
    } = got
    else {
        panic!("{got:?}")
    };
    client::release(&mut agent, &lease_id, token).await;
    let admin = coordinator.operator_channel(interlock_tests::ADMIN).await;
    let audit = client::audit(&client::operator(&admin), None, None).await;
    assert!(audit.chain_ok, "{}", audit.chain_error);
    assert!(audit.records.iter().any(|r| r.kind == "grant"));
    let pem = std::fs::read(&i_cert).expect("read cert");
    let not_after = interlock_proto::tls::cert_facts_pem(&pem)
        .expect("parse")
        .not_after_unix;
    assert_eq!(
        coordinator.metric("interlock_cert_not_after_seconds{cert=\"etcd_client\"}"),
        not_after as f64,
        "etcd's client certificate expiry is a metric"
    );

    // A coordinator given mallory's certificate cannot lead: it cannot write the prefix.
    let mut as_mallory = options.clone();
    as_mallory.args[3] = m_cert.display().to_string();
    as_mallory.args[5] = m_key.display().to_string();
    let refused = Coordinator::start(&as_mallory).expect("serves, but cannot lead");
    assert!(
        refused.wait_leader(Duration::from_secs(5)).is_err(),
        "a coordinator without the role must not lead"
    );
    assert!(
        refused.log().contains("permission denied"),
        "etcd's refusal is in its log: {}",
        refused.log()
    );
    // https:// without etcd TLS files is refused at start, naming the flags.
    let mut no_tls = options.clone();
    no_tls.args.clear();
    let err = Coordinator::start(&no_tls).expect_err("https without TLS files");
    assert!(err.to_string().contains("--etcd-ca"), "{err:#}");

    // The conformance suite, as the coordinator's user, on this etcd.
    let store = EtcdStore::connect(
        &[etcd.endpoint()],
        EtcdOptions {
            tls: Some(TlsFiles {
                ca: dir.join("ca.pem"),
                cert: i_cert.clone(),
                key: i_key.clone(),
            }),
            ..EtcdOptions::default()
        },
    )
    .await
    .expect("connect as interlock");
    run_all(Arc::new(store)).await;
}
