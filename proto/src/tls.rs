//! TLS material for the gRPC channels: reading the CA, certificate and key files named in a
//! config or on the command line, refusing a key that others can read, and the client side of
//! mutual TLS (rustls through tonic, no OpenSSL). Shared by the agent and the CLI; the server
//! side, which turns a verified certificate into an identity, is the coordinator's.

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

/// Reads a private key, refusing one that group or others can read.
pub fn read_key(path: &Path) -> Result<Vec<u8>, TlsFileError> {
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
    read_pem(path, "private key")
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
}
