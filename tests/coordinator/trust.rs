//! Identity from certificates (I9), against a real etcd and a coordinator serving mutual TLS
//! with certificates made by the real `interlock certs` CLI: the impersonation matrix (every
//! case refused, counted and audited with the identity presented), the allowed cases in the
//! same run, and audit owners that equal the certificate's identity whatever a header claims.

use std::{path::Path, process::Command, time::Duration};

use interlock_coordinator::{
    certs::{self, Validity},
    identity::Identity,
};
use interlock_proto::{tls::TlsFiles, v1 as pb};
use interlock_tests::{
    CertDir, Coordinator, CoordinatorOptions, Etcd,
    client::{self, Got},
    coordinator::{binary, certs_cli},
    fresh_prefix,
};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig},
};

use super::policy;

/// A CA in `dir` and certificates for these hosts and operators, through the real CLI.
fn issue_all(dir: &Path, hosts: &[&str], operators: &[(&str, &str)]) {
    let d = dir.to_str().expect("utf-8 path");
    certs_cli(&["init", d]);
    for host in hosts {
        certs_cli(&["issue", "host", host, "--dir", d]);
    }
    for (name, role) in operators {
        certs_cli(&["issue", "operator", name, "--dir", d, "--role", role]);
    }
}

/// A real etcd and a leading coordinator serving mutual TLS with the certificates in `dir`.
fn start_mtls(test: &str, dir: &Path, policy: &str, args: Vec<String>) -> (Etcd, Coordinator) {
    let etcd = Etcd::start().expect("etcd");
    let mut options = CoordinatorOptions::etcd(etcd.endpoint(), fresh_prefix(test), policy);
    // The test's own CA, made through the CLI; its policy has its own [access] section, which
    // the harness leaves as it is.
    options.tls = Some(CertDir::existing(dir));
    options.args = args;
    let coordinator = Coordinator::start(&options).expect("start coordinator");
    coordinator
        .wait_leader(Duration::from_secs(10))
        .expect("leads");
    (etcd, coordinator)
}

fn files(dir: &Path, sub: &str, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(sub).join(format!("{name}.pem")),
        key: dir.join(sub).join(format!("{name}.key")),
    }
}

use client::tls_channel_with as connect;

async fn channel_as(url: &str, files: &TlsFiles) -> Channel {
    client::tls_channel(url, files)
        .await
        .unwrap_or_else(|e| panic!("connect as {}: {e:?}", files.cert.display()))
}

/// Asserts a call was refused as PERMISSION_DENIED, naming `needle`.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, needle: &str) {
    match r {
        Err(s) if s.code() == Code::PermissionDenied => {
            assert!(s.message().contains(needle), "{what}: {}", s.message());
        }
        other => panic!("{what}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

fn set_mode(mode: &str) -> pb::SetModeRequest {
    pb::SetModeRequest {
        class: "disk_cleanup".into(),
        mode: mode.into(),
    }
}

fn acquire(host: &str, class: &str, target: &str) -> pb::AcquireRequest {
    client::acquire_request(host, class, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_come_from_certificates_and_every_impersonation_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let d = dir.to_str().expect("utf-8 path");
    issue_all(
        &dir,
        &["web-1", "web-2"],
        &[
            ("vic", "viewer"),
            ("erin", "approver"),
            ("carol", "operator"),
            ("ada", "admin"),
        ],
    );
    // Keys are written 0600; a second issue never overwrites one.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("hosts/web-1.key"))
            .expect("key")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let again = Command::new(binary("interlock"))
        .args(["certs", "issue", "host", "web-1", "--dir", d])
        .output()
        .expect("run");
    assert!(!again.status.success(), "a key must never be overwritten");
    // Another CA, and an expired certificate from the right CA.
    let other = tmp.path().join("other");
    certs_cli(&["init", other.to_str().expect("utf-8")]);
    certs_cli(&[
        "issue",
        "operator",
        "ada",
        "--dir",
        other.to_str().expect("utf-8"),
    ]);
    let now = i64::try_from(interlock_tests::agent::unix_ms() / 1000).expect("time");
    let expired_dir = tmp.path().join("expired");
    std::fs::create_dir_all(&expired_dir).expect("mkdir");
    for f in ["ca.pem", "ca.key", "trust-domain"] {
        std::fs::copy(dir.join(f), expired_dir.join(f)).expect("copy");
    }
    certs::issue(
        &expired_dir,
        &Identity::Operator("ada".into()),
        Validity::from_unix(now - 10 * 86_400, now - 86_400).expect("validity"),
    )
    .expect("issue expired");

    let access = "\n[access.operators]\nvic = \"viewer\"\nerin = \"approver\"\ncarol = \"operator\"\nada = \"admin\"\n";
    let text = policy("5", "assist", 1000, 1000, "30s") + access;
    let (_etcd, coordinator) = start_mtls("trust", &dir, &text, Vec::new());
    let url = coordinator.url();

    let web1 = channel_as(&url, &files(&dir, "hosts", "web-1")).await;
    let web2 = channel_as(&url, &files(&dir, "hosts", "web-2")).await;
    let op = |name: &str| files(&dir, "operators", name);
    let vic = channel_as(&url, &op("vic")).await;
    let erin = channel_as(&url, &op("erin")).await;
    let carol = channel_as(&url, &op("carol")).await;
    let ada = channel_as(&url, &op("ada")).await;
    let mut a1 = client::agent(&web1);
    let mut a2 = client::agent(&web2);
    client::register(&mut a1, "web-1", "api").await;
    client::register(&mut a2, "web-2", "api").await;
    // Even with its own key, a live host cannot move itself to another scope.
    let moved = a2
        .register(pb::RegisterRequest {
            host_id: "web-2".into(),
            labels: [("service".to_owned(), "db".to_owned())].into(),
        })
        .await
        .expect_err("a live host cannot change service");
    assert_eq!(moved.code(), Code::FailedPrecondition, "{moved:?}");
    assert!(moved.message().contains("cannot move"), "{moved:?}");
    // The allowed case first: ada (admin) makes disk_cleanup autonomous.
    let mut o_ada = client::operator(&ada);
    o_ada
        .set_mode(set_mode("autonomous"))
        .await
        .expect("an admin may switch to autonomous");

    // --- hosts act only for themselves ---------------------------------------------------
    refused(
        "web-2 acquiring as web-1",
        a2.acquire(acquire("web-1", "disk_cleanup", "/var/log"))
            .await,
        "cannot act for host web-1",
    );
    let granted = client::got(
        a1.acquire(acquire("web-1", "disk_cleanup", "/var/log"))
            .await
            .expect("web-1 acquires for itself")
            .into_inner(),
    );
    let Got::Granted {
        lease_id, token, ..
    } = granted
    else {
        panic!("expected a grant, got {granted:?}");
    };
    refused(
        "web-2 renewing web-1's lease",
        a2.renew(pb::RenewRequest {
            lease_id: lease_id.clone(),
            token,
        })
        .await,
        "cannot act for host web-1",
    );
    refused(
        "web-2 releasing web-1's lease",
        a2.release(pb::ReleaseRequest {
            lease_id: lease_id.clone(),
            token,
            outcome: pb::Outcome::Failed as i32,
            detail: "forged".into(),
        })
        .await,
        "cannot act for host web-1",
    );
    refused(
        "web-2 reporting an outcome for web-1",
        a2.report_outcome(pb::ReportOutcomeRequest {
            host_id: "web-1".into(),
            lease_id: lease_id.clone(),
            token,
            class: "disk_cleanup".into(),
            target: "/var/log".into(),
            outcome: pb::Outcome::Success as i32,
            detail: "forged".into(),
        })
        .await,
        "cannot act for host web-1",
    );
    a1.renew(pb::RenewRequest {
        lease_id: lease_id.clone(),
        token,
    })
    .await
    .expect("the holder renews its own lease");

    // An approval web-1 waits on (node_reboot is assist-only).
    let pending = client::got(
        a1.acquire(acquire("web-1", "node_reboot", "kernel"))
            .await
            .expect("acquire node_reboot")
            .into_inner(),
    );
    let Got::Pending { approval_id } = pending else {
        panic!("expected pending, got {pending:?}");
    };
    let poll = |id: &str| pb::PollApprovalRequest {
        approval_id: id.to_owned(),
        host_id: String::new(),
    };
    refused(
        "web-2 polling web-1's approval",
        a2.poll_approval(poll(&approval_id)).await,
        "cannot act for host web-1",
    );
    a1.poll_approval(poll(&approval_id))
        .await
        .expect("the requester polls its own approval");

    // --- the kinds never cross -------------------------------------------------------------
    refused(
        "an agent certificate on the operator API",
        client::operator(&web1).status(pb::StatusRequest {}).await,
        "agent's certificate",
    );
    refused(
        "an operator certificate on the agent API",
        client::agent(&ada)
            .acquire(acquire("web-1", "disk_cleanup", "/tmp"))
            .await,
        "operator's certificate",
    );

    // --- roles ----------------------------------------------------------------------------
    let mut o_vic = client::operator(&vic);
    o_vic
        .status(pb::StatusRequest {})
        .await
        .expect("a viewer reads");
    refused(
        "a viewer freezing",
        o_vic
            .freeze(pb::FreezeRequest {
                class: String::new(),
                reason: "x".into(),
                revoke: false,
            })
            .await,
        "it needs operator",
    );
    refused(
        "a viewer approving",
        o_vic
            .approve(pb::ApproveRequest {
                approval_id: approval_id.clone(),
            })
            .await,
        "it needs approver",
    );
    refused(
        "a viewer changing a mode",
        o_vic.set_mode(set_mode("observe")).await,
        "it needs operator",
    );
    let mut o_erin = client::operator(&erin);
    refused(
        "an approver switching to autonomous",
        o_erin.set_mode(set_mode("autonomous")).await,
        "it needs admin",
    );
    let mut o_carol = client::operator(&carol);
    refused(
        "an operator switching to autonomous",
        o_carol.set_mode(set_mode("autonomous")).await,
        "it needs admin",
    );

    // --- allowed, with owners from the certificate, whatever the header says ---------------
    let mut approve = Request::new(pb::ApproveRequest {
        approval_id: approval_id.clone(),
    });
    approve
        .metadata_mut()
        .insert("x-interlock-operator", "mallory".parse().expect("ascii"));
    o_erin.approve(approve).await.expect("an approver approves");
    let mut freeze = Request::new(pb::FreezeRequest {
        class: "disk_cleanup".into(),
        reason: "maintenance".into(),
        revoke: false,
    });
    freeze
        .metadata_mut()
        .insert("x-interlock-operator", "mallory".parse().expect("ascii"));
    o_carol.freeze(freeze).await.expect("an operator freezes");
    o_carol
        .unfreeze(pb::UnfreezeRequest {
            class: "disk_cleanup".into(),
            host: String::new(),
            reason: "done".into(),
        })
        .await
        .expect("an operator unfreezes");
    a1.release(pb::ReleaseRequest {
        lease_id: lease_id.clone(),
        token,
        outcome: pb::Outcome::Success as i32,
        detail: String::new(),
    })
    .await
    .expect("the holder releases");

    // --- handshakes that must fail ---------------------------------------------------------
    let ca = Certificate::from_pem(std::fs::read(dir.join("ca.pem")).expect("ca"));
    let anonymous = ClientTlsConfig::new().ca_certificate(ca.clone());
    let no_cert = match connect(&url, anonymous).await {
        Ok(ch) => client::operator(&ch)
            .status(pb::StatusRequest {})
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(format!("{e:?}"))),
    };
    assert!(
        no_cert.is_err(),
        "a caller without a client certificate must not be served"
    );
    let foreign = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: other.join("operators/ada.pem"),
        key: other.join("operators/ada.key"),
    };
    let expired = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: expired_dir.join("operators/ada.pem"),
        key: expired_dir.join("operators/ada.key"),
    };
    for (what, f) in [("another CA", foreign), ("an expired certificate", expired)] {
        let result = match connect(&url, f.client_config().expect("tls")).await {
            Ok(ch) => client::operator(&ch)
                .status(pb::StatusRequest {})
                .await
                .map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(format!("{e:?}"))),
        };
        assert!(result.is_err(), "{what} must not be served");
    }

    // --- what the audit says -----------------------------------------------------------------
    let audit = client::audit(&o_vic, None, None).await;
    assert!(audit.chain_ok, "{}", audit.chain_error);
    let owners = |kind: &str| -> Vec<String> {
        audit
            .records
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.owner.clone())
            .collect()
    };
    assert_eq!(owners("approve"), vec!["operator:erin"]);
    assert_eq!(owners("freeze"), vec!["operator:carol"]);
    assert_eq!(owners("unfreeze"), vec!["operator:carol"]);
    assert_eq!(owners("mode_change"), vec!["operator:ada"]);
    assert!(
        owners("outcome").iter().all(|o| o == "host:web-1"),
        "{:?}",
        owners("outcome")
    );
    assert!(!owners("outcome").is_empty());
    // The autonomous grant is the policy's; the approved one is its approver's.
    assert_eq!(owners("grant"), vec!["policy:test@1", "operator:erin"]);
    assert!(
        audit.records.iter().all(|r| !r.owner.contains("mallory")),
        "a header set an owner"
    );
    let refusals: Vec<(&str, &str)> = audit
        .records
        .iter()
        .filter(|r| r.kind == "refused")
        .map(|r| (r.owner.as_str(), r.reason.as_str()))
        .collect();
    // Every refused call above that reached the handlers, audited with the identity presented.
    let by = |who: &str| refusals.iter().filter(|(o, _)| *o == who).count();
    assert_eq!(by("host:web-2"), 5, "{refusals:?}");
    assert_eq!(by("host:web-1"), 1, "{refusals:?}");
    assert_eq!(by("operator:ada"), 1, "{refusals:?}");
    assert_eq!(by("operator:vic"), 3, "{refusals:?}");
    assert_eq!(by("operator:erin"), 1, "{refusals:?}");
    assert_eq!(by("operator:carol"), 1, "{refusals:?}");
    // The coordinator's certificate expiry is a metric (90 days from `certs init`).
    let not_after = coordinator.metric("interlock_cert_not_after_seconds{cert=\"coordinator\"}");
    assert!(not_after > (now + 80 * 86_400) as f64, "{not_after}");
    let counted = coordinator.metric("interlock_identity_refusals_total");
    assert!(counted >= 12.0, "refusals counted: {counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_put_on_the_deny_list_is_refused_without_a_restart_and_loses_its_leases() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    issue_all(&dir, &["web-1", "web-2"], &[("vic", "viewer")]);
    let deny = tmp.path().join("deny");
    std::fs::write(&deny, "# nobody yet\n").expect("deny file");
    let text =
        policy("5", "autonomous", 1000, 1000, "30s") + "\n[access.operators]\nvic = \"viewer\"\n";
    let args = vec!["--deny-file".into(), deny.display().to_string()];
    let (_etcd, coordinator) = start_mtls("deny", &dir, &text, args);
    let url = coordinator.url();
    let web1 = channel_as(&url, &files(&dir, "hosts", "web-1")).await;
    let web2 = channel_as(&url, &files(&dir, "hosts", "web-2")).await;
    let mut a1 = client::agent(&web1);
    let mut a2 = client::agent(&web2);
    client::register(&mut a1, "web-1", "api").await;
    client::register(&mut a2, "web-2", "api").await;
    let Got::Granted { lease_id, .. } =
        client::acquire(&mut a1, "web-1", "disk_cleanup", "/a").await
    else {
        panic!("web-1 is granted before it is denied");
    };

    // Deny web-1 by editing the file the coordinator was started with.
    std::fs::write(&deny, "host:web-1\n").expect("deny web-1");
    let edited = std::time::Instant::now();
    let mut refused_after = None;
    while edited.elapsed() < Duration::from_secs(20) {
        let r = a1
            .heartbeat(pb::HeartbeatRequest {
                host_id: "web-1".into(),
            })
            .await;
        if let Err(s) = &r
            && s.code() == Code::PermissionDenied
        {
            assert!(s.message().contains("deny list"), "{}", s.message());
            refused_after = Some(edited.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused_after = refused_after.expect("a denied host must be refused without a restart");
    eprintln!("deny list: web-1 refused {refused_after:?} after the file changed");
    // Its lease is revoked and audited with the deny list as the owner; web-2 still works.
    let vic = channel_as(&url, &files(&dir, "operators", "vic")).await;
    let o = client::operator(&vic);
    let mut revoked = None;
    let started = std::time::Instant::now();
    while revoked.is_none() && started.elapsed() < Duration::from_secs(20) {
        let audit = client::audit(&o, None, None).await;
        revoked = audit
            .records
            .into_iter()
            .find(|r| r.kind == "revoke" && r.lease_id == lease_id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let revoked = revoked.expect("the denied host's lease is revoked");
    assert!(revoked.owner.starts_with("deny-list:"), "{revoked:?}");
    assert!(matches!(
        client::acquire(&mut a2, "web-2", "disk_cleanup", "/b").await,
        Got::Granted { .. }
    ));
    // A broken edit keeps the list in force rather than un-denying anyone.
    std::fs::write(&deny, "host:\n").expect("broken deny file");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = a1
        .heartbeat(pb::HeartbeatRequest {
            host_id: "web-1".into(),
        })
        .await;
    assert_eq!(r.expect_err("still denied").code(), Code::PermissionDenied);
}
