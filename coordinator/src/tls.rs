//! The server side of mutual TLS: the coordinator's TLS config from its files (checked at start,
//! so a wrong path, a readable key or an expired certificate stops it before it serves), and the
//! verified identity of a caller, read from the URI SAN of the certificate rustls has already
//! verified against the CA (`identity` decides what that identity may do).
//!
//! It reads files and asks `interlock_proto::tls` for a certificate's facts (x509-parser); it
//! holds no authorization rules.
//!
//! The rustls config is built here rather than through tonic's `ServerTlsConfig` for two
//! reasons tonic does not cover: the files are re-read when they change (a renewed certificate
//! or a new CA bundle takes effect for new connections without a restart), and a client may
//! connect without a certificate (to enrol with a join token, or as automation with a bearer
//! token); every handler then finds no certificate identity and refuses unless it has
//! another verified credential.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use interlock_proto::tls::{CertFacts, TlsFileError, TlsFiles, cert_facts_der, cert_facts_pem};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

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
        tls: Arc<ReloadingTls>,
        /// Bearer tokens (`--token-file`, `--break-glass-file`), re-read on change.
        tokens: Option<Arc<TokenSource>>,
        /// The CA's key (`--ca-key`), when hosts may enrol with join tokens and renew.
        signer: Option<Arc<crate::certs::Signer>>,
        trust_domain: String,
        /// `--deny-file`, re-read on change (`deny`); the policy's `[access] deny` also applies.
        deny: Option<(std::path::PathBuf, crate::deny::DenyList)>,
        /// `(which, not_after unix seconds)` of the coordinator's certificate and the CA.
        not_after: Expiries,
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
pub fn checked_not_after(files: &TlsFiles, names: [&'static str; 2]) -> Result<Expiries, TlsError> {
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
    let (tls, not_after) = ReloadingTls::load(files)?;
    Ok(Security::Mtls {
        tls: Arc::new(tls),
        tokens: None,
        signer: None,
        trust_domain: trust_domain.to_owned(),
        deny: None,
        not_after,
    })
}

/// `(which certificate, not_after unix seconds)`, for the expiry metric.
pub type Expiries = Vec<(&'static str, i64)>;

type Stamp = interlock_proto::tls::FileStamp;

fn stamp(files: &TlsFiles) -> Stamp {
    stamp_of(&[&files.ca, &files.cert, &files.key])
}

fn stamp_of(paths: &[&std::path::Path]) -> Stamp {
    interlock_proto::tls::file_stamp(paths)
}

/// The server's rustls config, rebuilt from its files when they change.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The stamp of the files last tried, loaded or not (a bad edit is reported once).
    tried: Mutex<Stamp>,
}

impl ReloadingTls {
    /// Loads and checks the files (validity included); returns the expiry of the certificate
    /// and the CA for the metric.
    pub fn load(files: &TlsFiles) -> Result<(Self, Expiries), TlsError> {
        let before = stamp(files);
        let (config, not_after) = build(files)?;
        Ok((
            Self {
                files: files.clone(),
                current: RwLock::new(Arc::new(config)),
                tried: Mutex::new(before),
            },
            not_after,
        ))
    }

    /// The config new connections are accepted with.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .map(|c| Arc::clone(&c))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    /// Rebuilds the config if the files changed since last tried: `Ok(Some(expiries))` when a
    /// new config is in use, `Ok(None)` when nothing changed, `Err` (once per change) when the
    /// new files do not load; the config in use is then kept.
    pub fn reload_if_changed(&self) -> Result<Option<Expiries>, TlsError> {
        let now = stamp(&self.files);
        {
            let mut tried = self.tried.lock().unwrap_or_else(|p| p.into_inner());
            if *tried == now {
                return Ok(None);
            }
            *tried = now;
        }
        let (config, not_after) = build(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(Some(not_after))
    }
}

/// The token file and the break-glass file, re-read when they change (a removed line is a
/// revoked token within a second); a bad edit keeps the tokens loaded before.
#[derive(Debug)]
pub struct TokenSource {
    token_file: Option<std::path::PathBuf>,
    break_glass: Option<std::path::PathBuf>,
    current: RwLock<crate::tokens::Tokens>,
    tried: Mutex<Stamp>,
}

impl TokenSource {
    pub fn load(
        token_file: Option<std::path::PathBuf>,
        break_glass: Option<std::path::PathBuf>,
    ) -> Result<Self, String> {
        let source = Self {
            token_file,
            break_glass,
            current: RwLock::new(crate::tokens::Tokens::default()),
            tried: Mutex::new(Vec::new()),
        };
        source.reload_if_changed()?;
        Ok(source)
    }

    fn paths(&self) -> Vec<&std::path::Path> {
        [&self.token_file, &self.break_glass]
            .into_iter()
            .flatten()
            .map(|p| p.as_path())
            .collect()
    }

    fn read(&self) -> Result<crate::tokens::Tokens, String> {
        let read = |p: &std::path::Path| {
            interlock_proto::tls::check_private(p).map_err(|e| e.to_string())?;
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
        };
        let mut tokens = match &self.token_file {
            Some(p) => crate::tokens::Tokens::parse(&read(p)?)
                .map_err(|lines| format!("{}: {}", p.display(), lines.join("; ")))?,
            None => crate::tokens::Tokens::default(),
        };
        if let Some(p) = &self.break_glass {
            tokens = tokens
                .with_break_glass(&read(p)?)
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(tokens)
    }

    /// `Ok(true)` when new tokens are in use; `Err` once per change that does not load.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = stamp_of(&self.paths());
        {
            let mut tried = self.tried.lock().unwrap_or_else(|p| p.into_inner());
            if *tried == now {
                return Ok(false);
            }
            *tried = now;
        }
        let tokens = self.read()?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = tokens;
        Ok(true)
    }

    pub fn identify(&self, token: &str) -> Option<Identity> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .identify(token)
    }
}

fn tls_err(path: &std::path::Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::Certificate {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The rustls server config: this certificate, clients verified against the CA when they
/// present a certificate (and allowed to present none), HTTP/2 by ALPN as tonic expects.
fn build(files: &TlsFiles) -> Result<(ServerConfig, Expiries), TlsError> {
    // `load` refuses a readable key and a file that is not PEM, naming it.
    files.load()?;
    let not_after = checked_not_after(files, ["coordinator", "ca"])?;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| TlsFileError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let ca_pem = read(&files.ca)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.map_err(|e| tls_err(&files.ca, format!("not a PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| tls_err(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls_err(&files.ca, e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&files.cert, format!("not a PEM certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| tls_err(&files.key, format!("not a PEM private key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&files.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            tls_err(
                &files.key,
                format!("does not go with {}: {e}", files.cert.display()),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, not_after))
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
            spki_der: Vec::new(),
        };
        assert!(check_validity("c.pem", &facts, 150).is_ok());
        let e = check_validity("c.pem", &facts, 260).expect_err("expired");
        assert!(e.to_string().contains("c.pem"), "{e}");
        assert!(e.to_string().contains("expired 60 s ago"), "{e}");
        assert!(check_validity("c.pem", &facts, 50).is_err());
    }
}
