//! Bad TLS input is refused before anything starts, naming the file and what to change: a
//! readable key, a missing file, an expired server certificate, a serve without certificates
//! or `--insecure`; and the CLI never silently talks plaintext when TLS was asked for.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output},
};

use interlock_coordinator::certs::{self, Validity};
use interlock_tests::coordinator::binary;

fn interlock(args: &[&str]) -> Output {
    Command::new(binary("interlock"))
        .args(args)
        .env_remove("INTERLOCK_CA")
        .env_remove("INTERLOCK_CERT")
        .env_remove("INTERLOCK_KEY")
        .output()
        .expect("run interlock")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `interlock serve` with these TLS files on a free port; it must fail at start.
fn serve_fails(policy: &Path, tls: &[&str], needle: &str) {
    let mut args = vec![
        "serve",
        "--config",
        policy.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
    ];
    args.extend_from_slice(tls);
    let out = interlock(&args);
    assert!(!out.status.success(), "serve {tls:?} must not start");
    let err = stderr(&out);
    assert!(err.contains(needle), "serve {tls:?}: {err}");
}

#[test]
fn bad_tls_files_stop_serve_and_the_cli_before_anything_is_sent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let d = dir.to_str().expect("utf-8").to_owned();
    certs::init(&dir, "interlock", &[]).expect("init");
    let policy = tmp.path().join("policy.toml");
    std::fs::write(&policy, interlock_tests::BASIC_POLICY).expect("policy");
    let ca = format!("{d}/ca.pem");
    let cert = format!("{d}/coordinator.pem");
    let key = format!("{d}/coordinator.key");

    // No certificates and no --insecure: clap names what is missing.
    serve_fails(&policy, &[], "--ca");
    // A key others can read.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    serve_fails(
        &policy,
        &["--ca", &ca, "--cert", &cert, "--key", &key],
        &format!("chmod 600 {key}"),
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // A file that is not there.
    serve_fails(
        &policy,
        &[
            "--ca",
            &format!("{d}/nope.pem"),
            "--cert",
            &cert,
            "--key",
            &key,
        ],
        "nope.pem",
    );
    // An expired server certificate.
    let now = i64::try_from(interlock_tests::agent::unix_ms() / 1000).expect("time");
    certs::issue_coordinator(
        &dir,
        &[],
        Validity::from_unix(now - 10 * 86_400, now - 86_400).expect("validity"),
    )
    .expect("reissue");
    serve_fails(
        &policy,
        &["--ca", &ca, "--cert", &cert, "--key", &key],
        "expired",
    );
    // --insecure and certificates together is a contradiction.
    serve_fails(&policy, &["--insecure", "--ca", &ca], "cannot be used with");

    // The CLI: https:// without a certificate, a certificate with http://, half the files.
    let out = interlock(&["--coordinator", "https://127.0.0.1:1", "status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("give --ca, --cert and --key"),
        "{}",
        stderr(&out)
    );
    certs::issue(
        &dir,
        &interlock_coordinator::identity::Identity::Operator("alice".into()),
        Validity::from_now(1),
    )
    .expect("issue");
    let (op_cert, op_key) = (
        format!("{d}/operators/alice.pem"),
        format!("{d}/operators/alice.key"),
    );
    let out = interlock(&[
        "--coordinator",
        "http://127.0.0.1:1",
        "--ca",
        &ca,
        "--cert",
        &op_cert,
        "--key",
        &op_key,
        "status",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("use https://"), "{}", stderr(&out));
    let out = interlock(&[
        "--coordinator",
        "https://127.0.0.1:1",
        "--cert",
        &op_cert,
        "status",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("or none of them"), "{}", stderr(&out));

    // `certs` refuses to overwrite a CA and names the file.
    let out = interlock(&["certs", "init", &d]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ca.key already exists"),
        "{}",
        stderr(&out)
    );
    // And an unknown role is refused before anything is written.
    let out = interlock(&[
        "certs", "issue", "operator", "bob", "--dir", &d, "--role", "root",
    ]);
    assert!(!out.status.success());
    assert!(!dir.join("operators/bob.key").exists());
}
