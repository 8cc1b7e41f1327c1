//! The server side of mutual TLS: the coordinator's TLS config from its files (checked at start,
//! so a wrong path, a readable key or an expired certificate stops it before it serves), and the
//! verified identity of a caller, read from the URI SAN of the certificate rustls has already
//! verified against the CA (`identity` decides what that identity may do).
//!
//! It reads files and asks `interlock_proto::tls` for a certificate's facts (x509-parser); it
//! holds no authorization rules.

use std::time::{SystemTime, UNIX_EPOCH};

use interlock_proto::tls::{CertFacts, TlsFileError, TlsFiles, cert_facts_der, cert_facts_pem};
use tonic::transport::ServerTlsConfig;

use crate::identity::{self, Identity, IdentityError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] TlsFileError),
    #[error("{path}: {message}")]
    Certificate { path: String, message: String },
}

/// What the coordinator serves with: TLS with client certificates from one CA and trust
/// domain, or (`--insecure`) plaintext with self-asserted identities.
#[derive(Debug, Clone)]
pub enum Security {
    Mtls {
        config: ServerTlsConfig,
        trust_domain: String,
        /// `--deny-file`, re-read on change (`deny`); the policy's `[access] deny` also applies.
        deny: Option<(std::path::PathBuf, crate::deny::DenyList)>,
        /// `(which, not_after unix seconds)` of the coordinator's certificate and the CA.
        not_after: Vec<(&'static str, i64)>,
    },
    Insecure,
}

impl Security {
    pub fn is_insecure(&self) -> bool {
        matches!(self, Security::Insecure)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Refuses a certificate outside its validity, naming the file and the fix.
pub fn check_validity(path: &str, facts: &CertFacts, now_unix: i64) -> Result<(), TlsError> {
    if now_unix > facts.not_after_unix {
        return Err(TlsError::Certificate {
            path: path.to_owned(),
            message: format!(
                "the certificate expired {} s ago; issue a new one (`interlock certs issue …`)",
                now_unix - facts.not_after_unix
            ),
        });
    }
    if now_unix < facts.not_before_unix {
        return Err(TlsError::Certificate {
            path: path.to_owned(),
            message: "the certificate is not valid yet; check this host's clock".to_owned(),
        });
    }
    Ok(())
}

/// Reads the certificate and the CA of `files`, refuses either outside its validity (naming
/// the file), and returns `(name, not_after)` for each, named `names[0]` and `names[1]`, for the
/// expiry metric.
pub fn checked_not_after(
    files: &TlsFiles,
    names: [&'static str; 2],
) -> Result<Vec<(&'static str, i64)>, TlsError> {
    let mut not_after = Vec::new();
    for (which, path) in names.into_iter().zip([&files.cert, &files.ca]) {
        let pem = std::fs::read(path).map_err(|source| TlsFileError::Read {
            path: path.clone(),
            source,
        })?;
        let shown = path.display().to_string();
        let facts = cert_facts_pem(&pem).map_err(|e| TlsError::Certificate {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        check_validity(&shown, &facts, unix_now())?;
        not_after.push((which, facts.not_after_unix));
    }
    Ok(not_after)
}

/// The coordinator's mutual-TLS config from its files, all checked now.
pub fn server_security(files: &TlsFiles, trust_domain: &str) -> Result<Security, TlsError> {
    let (ca, identity) = files.load()?;
    let not_after = checked_not_after(files, ["coordinator", "ca"])?;
    let config = ServerTlsConfig::new().identity(identity).client_ca_root(ca);
    Ok(Security::Mtls {
        config,
        trust_domain: trust_domain.to_owned(),
        deny: None,
        not_after,
    })
}

/// The verified caller of a request over mutual TLS. rustls has checked the chain against the
/// CA (and its validity) during the handshake; this reads the identity it binds.
pub fn peer_identity<T>(
    request: &tonic::Request<T>,
    trust_domain: &str,
) -> Result<Identity, IdentityError> {
    let Some(certs) = request.peer_certs() else {
        return Err(IdentityError::NoUri);
    };
    let Some(leaf) = certs.first() else {
        return Err(IdentityError::NoUri);
    };
    let facts = cert_facts_der(leaf.as_ref())
        .map_err(|e| IdentityError::Unparsable(e.to_string(), trust_domain.to_owned()))?;
    identity::from_uris(&facts.uris, trust_domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_checked_with_the_file_named() {
        let facts = CertFacts {
            uris: vec![],
            not_before_unix: 100,
            not_after_unix: 200,
        };
        assert!(check_validity("c.pem", &facts, 150).is_ok());
        let e = check_validity("c.pem", &facts, 260).expect_err("expired");
        assert!(e.to_string().contains("c.pem"), "{e}");
        assert!(e.to_string().contains("expired 60 s ago"), "{e}");
        assert!(check_validity("c.pem", &facts, 50).is_err());
    }
}
