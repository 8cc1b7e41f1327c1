//! TLS material for the gRPC channels: reading the CA, certificate and key files named in a
//! config or on the command line, refusing a key that others can read, and the client side of
//! mutual TLS (rustls through tonic, no OpenSSL), and the facts of a certificate (its URI SANs
//! and validity, read with x509-parser from bytes the caller read). Shared by the agent, the CLI
//! and the coordinator; the server side, which turns a verified certificate into an identity, is
//! the coordinator's.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The three files of one mutual-TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed the peer's certificate (PEM).
    pub ca: PathBuf,
    /// This side's certificate (PEM).
    pub cert: PathBuf,
    /// This side's private key (PEM); must not be readable by group or others.
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {path}: {source}; check the path")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:03o}); a private key must be 0600: run `chmod 600 {path}`"
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("{path} holds no PEM {what}; give the {what} file there")]
    NotPem { path: PathBuf, what: &'static str },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsFileError> {
    let bytes = read(path)?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") {
        return Err(TlsFileError::NotPem {
            path: path.to_owned(),
            what,
        });
    }
    Ok(bytes)
}

/// Refuses a secret file (a key, token hashes) that group or others can read.
pub fn check_private(path: &Path) -> Result<(), TlsFileError> {
    let meta = fs::metadata(path).map_err(|source| TlsFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsFileError::KeyMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads a private key, refusing one that group or others can read.
pub fn read_key(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    check_private(path)?;
    read_pem(path, "private key")
}

/// Length and modification time of each file (zero and none when it is missing): two reads of
/// the same files differ when one of them was replaced, which is when to load them again.
pub type FileStamp = Vec<(u64, Option<std::time::SystemTime>)>;

pub fn file_stamp(paths: &[&Path]) -> FileStamp {
    paths
        .iter()
        .map(|p| match fs::metadata(p) {
            Ok(m) => (m.len(), m.modified().ok()),
            Err(_) => (0, None),
        })
        .collect()
}

impl TlsFiles {
    /// The CA, this side's certificate, and its key, read and checked.
    pub fn load(&self) -> Result<(Certificate, Identity), TlsFileError> {
        let ca = Certificate::from_pem(read_pem(&self.ca, "CA certificate")?);
        let cert = read_pem(&self.cert, "certificate")?;
        let key = read_key(&self.key)?;
        Ok((ca, Identity::from_pem(cert, key)))
    }

    /// The client side of mutual TLS: trust only this CA, present this certificate.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsFileError> {
        let (ca, identity) = self.load()?;
        Ok(ClientTlsConfig::new().ca_certificate(ca).identity(identity))
    }
}

/// Why bytes are not a certificate [`cert_facts_pem`] or [`cert_facts_der`] can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertParseError {
    #[error("not PEM: {0}")]
    NotPem(String),
    #[error("not an X.509 certificate: {0}")]
    NotX509(String),
}

/// Facts of a certificate: its URI SANs and its validity (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub uris: Vec<String>,
    pub not_after_unix: i64,
    pub not_before_unix: i64,
    /// The DER SubjectPublicKeyInfo, to tell whether a key file goes with the certificate.
    pub spki_der: Vec<u8>,
}

/// Facts of a DER certificate (what rustls hands over for a peer).
pub fn cert_facts_der(der: &[u8]) -> Result<CertFacts, CertParseError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertParseError::NotX509(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push((*u).to_owned());
            }
        }
    }
    Ok(CertFacts {
        uris,
        not_after_unix: cert.validity().not_after.timestamp(),
        not_before_unix: cert.validity().not_before.timestamp(),
        spki_der: cert.public_key().raw.to_vec(),
    })
}

/// Facts of the first certificate in a PEM file's text. Pure: the caller reads the file.
pub fn cert_facts_pem(pem: &[u8]) -> Result<CertFacts, CertParseError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| CertParseError::NotPem(e.to_string()))?;
    cert_facts_der(&pem.contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_others_can_read_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("host.key");
        fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_key(&key).expect_err("0644 key");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        read_key(&key).expect("0600 key");

        let not_pem = dir.path().join("x.key");
        fs::write(&not_pem, "hello").expect("write");
        fs::set_permissions(&not_pem, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            read_key(&not_pem),
            Err(TlsFileError::NotPem { .. })
        ));
        let missing = dir.path().join("missing.key");
        let err = read_key(&missing).expect_err("missing");
        assert!(err.to_string().contains("missing.key"), "{err}");
    }

    /// A certificate made with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256
    /// -nodes -days 1 -subj /CN=t -addext subjectAltName=URI:spiffe://t/host/h`, valid from
    /// 2026-12-03 14:24:24 to 2026-12-04 14:24:24 UTC (`openssl x509 -noout -dates`).
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBijCCATGgAwIBAgIUPl9avaegVU14Vo7amkczUh7Lml8wCgYIKoZIzj0EAwIw
DDEKMAgGA1UEAwwBdDAeFw0yNjEyMDMxNDI0MjRaFw0yNjEyMDQxNDI0MjRaMAwx
CjAIBgNVBAMMAXQwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARcE0Q64zCP0gsS
JcAmmgLQzDg7tFiFiGO99aUvQOPpJ9hl6S5U32YB85lT7ndurzmVpQJhKzjfg1rR
lXNsysNgo3EwbzAdBgNVHQ4EFgQUU6Vj5X9klTqtMVWxFK9wAdjOGKwwHwYDVR0j
BBgwFoAUU6Vj5X9klTqtMVWxFK9wAdjOGKwwDwYDVR0TAQH/BAUwAwEB/zAcBgNV
HREEFTAThhFzcGlmZmU6Ly90L2hvc3QvaDAKBggqhkjOPQQDAgNHADBEAiBaQhF3
PhrB4laB1t1SRpf8FnND7Ads1jRylRM4UlsadwIgbFH1+CClbfydncfzDGcdO8YX
bxnVfochK1URf7X+Aw8=
-----END CERTIFICATE-----
";

    #[test]
    fn cert_facts_read_validity_and_uris_and_refuse_what_is_not_a_certificate() {
        let facts = cert_facts_pem(CERT.as_bytes()).expect("a certificate");
        assert_eq!(facts.uris, vec!["spiffe://t/host/h".to_owned()]);
        assert_eq!(facts.not_before_unix, 1_796_307_864);
        assert_eq!(facts.not_after_unix, 1_796_394_264);
        assert!(matches!(
            cert_facts_pem(b"hello"),
            Err(CertParseError::NotPem(_))
        ));
        let not_a_cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            cert_facts_pem(not_a_cert.as_bytes()),
            Err(CertParseError::NotX509(_))
        ));
    }
}
