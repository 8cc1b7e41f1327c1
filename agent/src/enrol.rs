//! Enrolment and renewal of the agent's certificate.
//!
//! `interlock-agent enrol --token T` makes a new key on this host, sends a certificate request
//! with a one-time join token (`interlock certs token --host H`) over TLS (the coordinator
//! verified with `[tls] ca`, no client certificate yet) and writes the short-lived certificate
//! the coordinator signs to `[tls] cert`, the key to `[tls] key` (0600). While running, the
//! agent renews over its mutual-TLS connection once a third of the certificate's lifetime is
//! left, with a new key each time; the coordinator link picks up the new files for new
//! connections (see `report`). The key never leaves the host.
//!
//! The renewal rule ([`renewal_due`]) is pure; the rest is file and network I/O.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use interlock_proto::{tls::TlsFiles, v1 as pb};
use pb::agent_client::AgentClient;
use tonic::transport::{Certificate, ClientTlsConfig};

use crate::report::{LEADER_METADATA_KEY, connect};

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error(
        "enrolment needs [tls] in the agent's config (ca, cert, key) and an https:// coordinator"
    )]
    NoTls,
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("making the key or the certificate request: {0}")]
    Key(String),
    #[error("{0}")]
    Coordinator(String),
}

/// Whether a certificate valid from `not_before` to `not_after` (unix seconds) should be
/// renewed at `now`: once less than a third of its lifetime is left (or it has expired).
pub fn renewal_due(not_before: i64, not_after: i64, now: i64) -> bool {
    let lifetime = not_after.saturating_sub(not_before);
    lifetime <= 0 || not_after.saturating_sub(now).saturating_mul(3) < lifetime
}

/// A new key and a certificate request for it (PEM). The coordinator decides the names in
/// the certificate; the request only proves the key.
fn key_and_request() -> Result<(String, String), EnrolError> {
    let key = rcgen::KeyPair::generate().map_err(|e| EnrolError::Key(e.to_string()))?;
    let request = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| EnrolError::Key(e.to_string()))?;
    let pem = request.pem().map_err(|e| EnrolError::Key(e.to_string()))?;
    Ok((key.serialize_pem(), pem))
}

/// Writes `text` to `path` through a temporary file and a rename (a reader sees the old file
/// or the new one, never half of one), with `mode`.
fn replace(path: &Path, text: &str, mode: u32) -> Result<(), EnrolError> {
    let err = |e: std::io::Error| EnrolError::File {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Installs a signed certificate and its key: the key first, then the certificate.
fn install(files: &TlsFiles, key_pem: &str, cert_pem: &str) -> Result<(), EnrolError> {
    if let Some(dir) = files.cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| EnrolError::File {
            path: dir.to_owned(),
            message: e.to_string(),
        })?;
    }
    replace(&files.key, key_pem, 0o600)?;
    replace(&files.cert, cert_pem, 0o644)
}

/// Calls `call` on the replicas in order, following a follower's leader hint once.
async fn on_leader<F, Fut>(
    urls: &[String],
    tls: &ClientTlsConfig,
    call: F,
) -> Result<pb::CertificateReply, EnrolError>
where
    F: Fn(AgentClient<tonic::transport::Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<pb::CertificateReply>, tonic::Status>>,
{
    let mut errors = Vec::new();
    let mut queue: Vec<String> = urls.to_vec();
    let mut followed = 0;
    while let Some(url) = (!queue.is_empty()).then(|| queue.remove(0)) {
        let channel = match connect(&url, Some(tls)).await {
            Ok(c) => c,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        match call(AgentClient::new(channel)).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if let Some(leader) = status
                    .metadata()
                    .get(LEADER_METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    && followed < 2
                {
                    followed += 1;
                    queue.insert(0, leader.to_owned());
                }
                errors.push(format!("{url}: {}", status.message()));
            }
            Err(status) => {
                return Err(EnrolError::Coordinator(format!(
                    "{url}: {}",
                    status.message()
                )));
            }
        }
    }
    Err(EnrolError::Coordinator(format!(
        "no coordinator enrolled this host: {}",
        errors.join("; ")
    )))
}

/// Enrols `host` with a join token; returns the certificate's end (unix seconds).
pub async fn enrol(
    host: &str,
    urls: &[String],
    files: &TlsFiles,
    token: &str,
) -> Result<i64, EnrolError> {
    if urls.iter().any(|u| !u.starts_with("https://")) {
        return Err(EnrolError::NoTls);
    }
    let ca = std::fs::read(&files.ca).map_err(|e| EnrolError::File {
        path: files.ca.clone(),
        message: format!("{e}; copy the installation's CA certificate (ca.pem) here"),
    })?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let (key_pem, csr_pem) = key_and_request()?;
    let request = pb::EnrolRequest {
        host_id: host.to_owned(),
        token: token.trim().to_owned(),
        csr_pem,
    };
    let reply = on_leader(urls, &tls, |mut client| {
        let request = request.clone();
        async move { client.enrol(request).await }
    })
    .await?;
    install(files, &key_pem, &reply.cert_pem)?;
    Ok(reply.not_after_unix)
}

/// Renews over mutual TLS with the current files if [`renewal_due`]; `Ok(Some(not_after))`
/// when a new certificate was installed.
pub async fn renew_if_due(
    urls: &[String],
    files: &TlsFiles,
    now_unix: i64,
) -> Result<Option<i64>, EnrolError> {
    let pem = std::fs::read(&files.cert).map_err(|e| EnrolError::File {
        path: files.cert.clone(),
        message: e.to_string(),
    })?;
    let facts = interlock_proto::tls::cert_facts_pem(&pem).map_err(|e| EnrolError::File {
        path: files.cert.clone(),
        message: e.to_string(),
    })?;
    if !renewal_due(facts.not_before_unix, facts.not_after_unix, now_unix) {
        return Ok(None);
    }
    let tls = files.client_config().map_err(|e| EnrolError::File {
        path: files.cert.clone(),
        message: e.to_string(),
    })?;
    let (key_pem, csr_pem) = key_and_request()?;
    let request = pb::RenewCertificateRequest { csr_pem };
    let reply = on_leader(urls, &tls, |mut client| {
        let request = request.clone();
        async move { client.renew_certificate(request).await }
    })
    .await?;
    install(files, &key_pem, &reply.cert_pem)?;
    Ok(Some(reply.not_after_unix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_when_a_third_of_the_lifetime_is_left() {
        // (not_before, not_after, now, due)
        let cases = [
            (0, 300, 0, false),
            (0, 300, 199, false),
            (0, 300, 201, true),
            (0, 300, 300, true),
            (0, 300, 10_000, true),
            (100, 100, 50, true), // zero lifetime: renew
        ];
        for (nb, na, now, due) in cases {
            assert_eq!(renewal_due(nb, na, now), due, "{nb} {na} {now}");
        }
    }

    #[test]
    fn the_request_carries_a_fresh_key_each_time() {
        let (k1, r1) = key_and_request().expect("key");
        let (k2, r2) = key_and_request().expect("key");
        assert_ne!(k1, k2);
        assert_ne!(r1, r2);
        assert!(r1.contains("BEGIN CERTIFICATE REQUEST"), "{r1}");
    }

    #[test]
    fn files_are_replaced_whole_with_their_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("certs/host.pem"),
            key: dir.path().join("certs/host.key"),
        };
        install(&files, "KEY1", "CERT1").expect("install");
        install(&files, "KEY2", "CERT2").expect("install again");
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), "KEY2");
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), "CERT2");
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
