//! `interlock etcd-bootstrap`: turns on etcd's authentication for Interlock, once per cluster.
//!
//! It creates a role that may read and write Interlock's key prefix and nothing else, a user
//! holding only that role, the `root` user etcd requires before authentication can be enabled,
//! and then enables it. Users get no password: etcd started with `--client-cert-auth` takes
//! the user name from the client certificate's common name (`interlock certs issue etcd-user`),
//! so the coordinator authenticates with `--etcd-cert`, and root with root's certificate.
//! Every step is idempotent; running it again (with root's certificate) adds another prefix to
//! the role or just confirms the setup.
//!
//! Written over etcd-client's auth API rather than by running `etcdctl`, so that it needs no
//! other program on the machine that runs it and each step's answer is checked, not parsed.

use etcd_client::{Client, ConnectOptions, Permission, UserAddOptions};
use interlock_proto::tls::TlsFiles;

use crate::view::Keys;

/// What to set up.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    /// `https://` endpoints of the etcd cluster.
    pub endpoints: Vec<String>,
    /// The CA etcd's certificate is signed by, and a client certificate: before
    /// authentication is on, any certificate the CA signed; afterwards, root's.
    pub tls: TlsFiles,
    /// Interlock's key prefix (`--prefix` of `interlock serve`).
    pub prefix: String,
    /// The etcd user the coordinator connects as (its certificate's common name).
    pub user: String,
    pub role: String,
}

/// Runs every step; returns one line per step saying what it did.
pub async fn run(b: &Bootstrap) -> Result<Vec<String>, String> {
    if b.user == "root" || b.role == "root" {
        return Err(
            "the coordinator must not connect as etcd's root: give --user/--role another name \
             (default interlock)"
                .into(),
        );
    }
    if let Some(e) = b.endpoints.iter().find(|e| !e.starts_with("https://")) {
        return Err(format!(
            "{e} is not https://: certificate authentication needs etcd's TLS client URL"
        ));
    }
    let tls = b.tls.client_config().map_err(|e| e.to_string())?;
    let mut client = Client::connect(
        &b.endpoints,
        Some(
            ConnectOptions::new()
                .with_tls(tls)
                .with_connect_timeout(std::time::Duration::from_secs(5))
                .with_timeout(std::time::Duration::from_secs(5)),
        ),
    )
    .await
    .map_err(|e| format!("connecting to etcd at {}: {e}", b.endpoints.join(",")))?;
    let prefix = Keys::new(&b.prefix).root();
    let mut done = Vec::new();
    step(&mut done, "role root", client.role_add("root").await)?;
    step(
        &mut done,
        "user root (no password; authenticates by certificate)",
        client
            .user_add("root", "", Some(UserAddOptions::new().with_no_pwd()))
            .await,
    )?;
    step(
        &mut done,
        "user root has role root",
        client.user_grant_role("root", "root").await,
    )?;
    step(
        &mut done,
        &format!("role {}", b.role),
        client.role_add(b.role.as_str()).await,
    )?;
    step(
        &mut done,
        &format!("role {} may read and write {prefix}*", b.role),
        client
            .role_grant_permission(
                b.role.as_str(),
                Permission::read_write(prefix.as_str()).with_prefix(),
            )
            .await,
    )?;
    step(
        &mut done,
        &format!(
            "user {} (no password; authenticates by certificate)",
            b.user
        ),
        client
            .user_add(
                b.user.as_str(),
                "",
                Some(UserAddOptions::new().with_no_pwd()),
            )
            .await,
    )?;
    step(
        &mut done,
        &format!("user {} has role {}", b.user, b.role),
        client
            .user_grant_role(b.user.as_str(), b.role.as_str())
            .await,
    )?;
    step(
        &mut done,
        "authentication enabled",
        client.auth_enable().await,
    )?;
    Ok(done)
}

/// Records a step; "already exists" / "already granted" counts as done.
fn step<T>(
    done: &mut Vec<String>,
    what: &str,
    result: Result<T, etcd_client::Error>,
) -> Result<(), String> {
    match result {
        Ok(_) => {
            done.push(format!("{what}: done"));
            Ok(())
        }
        Err(e) if e.to_string().contains("already") => {
            done.push(format!("{what}: already so"));
            Ok(())
        }
        Err(e) => Err(format!(
            "{what}: {e}{}",
            if e.to_string().contains("permission denied")
                || e.to_string().contains("user name is empty")
            {
                " (authentication is already on: run this with root's certificate, \
                 `interlock certs issue etcd-user root`)"
            } else {
                ""
            }
        )),
    }
}
