//! `interlock certs`: a small CA for one Interlock installation (rcgen), and the certificates
//! it issues: the coordinator's (server and client auth), each host's and each operator's, each
//! binding its identity in a URI SAN (`identity::spiffe_uri`).
//!
//! Owns the files of a certificate directory and nothing else: keys are written 0600 and never
//! overwritten; it makes no network calls and holds no policy (roles live in the policy file).
//!
//! Layout of DIR: `ca.pem` `ca.key` `trust-domain` `coordinator.pem` `coordinator.key`
//! `hosts/<id>.pem|.key` `operators/<name>.pem|.key`, and for an etcd that authenticates its
//! clients by certificate, `etcd/server.pem|.key` and `etcd/users/<user>.pem|.key` (etcd takes
//! the user name from the certificate's common name).

use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::identity::{Identity, spiffe_uri};

/// The trust domain when `certs init` is not given one.
pub const DEFAULT_TRUST_DOMAIN: &str = "interlock";
/// Default lifetimes: the CA ten years, issued certificates 90 days.
pub const CA_DAYS: u32 = 3650;
pub const DEFAULT_DAYS: u32 = 90;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} already exists; remove it first if you mean to replace it (a CA or key is never overwritten)"
    )]
    Exists(PathBuf),
    #[error("{0} is not a certificate directory: run `interlock certs init {0}` first")]
    NoCa(PathBuf),
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertsError + '_ {
    move |source| CertsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// When a certificate is valid. `from_now(days)` starts an hour in the past, so a clock a
/// little behind the issuer's still accepts it.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    pub fn from_now(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

impl Validity {
    /// An explicit window in unix seconds (tests issue expired certificates with it).
    pub fn from_unix(not_before: i64, not_after: i64) -> Result<Self, CertsError> {
        let at = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map_err(|e| CertsError::Invalid(format!("time {t}: {e}")))
        };
        Ok(Self {
            not_before: at(not_before)?,
            not_after: at(not_after)?,
        })
    }
}

/// A server's certificate also authenticates it as a client (replicas and etcd peers).
const SERVER_USAGES: [ExtendedKeyUsagePurpose; 2] = [
    ExtendedKeyUsagePurpose::ServerAuth,
    ExtendedKeyUsagePurpose::ClientAuth,
];

/// Paths of one issued certificate and its key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates DIR with a new CA and the coordinator's certificate (DNS `localhost`, IP
/// `127.0.0.1` and `server_names`, which may be DNS names or IP addresses).
pub fn init(dir: &Path, trust_domain: &str, server_names: &[String]) -> Result<Issued, CertsError> {
    if trust_domain.is_empty()
        || !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
    {
        return Err(CertsError::Invalid(format!(
            "trust domain {trust_domain:?} must be lowercase letters, digits, '.' or '-' (e.g. \"prod.example\")"
        )));
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key_path = dir.join("ca.key");
    if ca_key_path.exists() {
        return Err(CertsError::Exists(ca_key_path));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Interlock CA ({trust_domain})"));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let validity = Validity::from_now(CA_DAYS);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.self_signed(&key)?;
    write_private(&ca_key_path, &key.serialize_pem())?;
    write_public(&dir.join("ca.pem"), &cert.pem())?;
    write_public(&dir.join("trust-domain"), &format!("{trust_domain}\n"))?;
    issue_coordinator(dir, server_names, Validity::from_now(DEFAULT_DAYS))
}

/// The trust domain `certs init` recorded in DIR.
pub fn trust_domain(dir: &Path) -> Result<String, CertsError> {
    let path = dir.join("trust-domain");
    if !path.exists() {
        return Err(CertsError::NoCa(dir.to_owned()));
    }
    Ok(fs::read_to_string(&path)
        .map_err(io(&path))?
        .trim()
        .to_owned())
}

fn issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertsError> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if !cert.exists() || !key.exists() {
        return Err(CertsError::NoCa(dir.to_owned()));
    }
    let key_pem = fs::read_to_string(&key).map_err(io(&key))?;
    let cert_pem = fs::read_to_string(&cert).map_err(io(&cert))?;
    Ok(Issuer::from_ca_cert_pem(
        &cert_pem,
        KeyPair::from_pem(&key_pem)?,
    )?)
}

/// Issues (or re-issues) the coordinator's certificate in DIR.
pub fn issue_coordinator(
    dir: &Path,
    server_names: &[String],
    validity: Validity,
) -> Result<Issued, CertsError> {
    let td = trust_domain(dir)?;
    let mut sans = server_sans(server_names)?;
    sans.push(SanType::URI(
        format!("spiffe://{td}/coordinator").as_str().try_into()?,
    ));
    let out = Issued {
        cert: dir.join("coordinator.pem"),
        key: dir.join("coordinator.key"),
    };
    sign(
        dir,
        "Interlock coordinator",
        sans,
        SERVER_USAGES.to_vec(),
        validity,
        &out,
        true,
    )?;
    Ok(out)
}

/// Issues a host's or an operator's client certificate into `hosts/` or `operators/`.
pub fn issue(dir: &Path, identity: &Identity, validity: Validity) -> Result<Issued, CertsError> {
    let td = trust_domain(dir)?;
    let uri = spiffe_uri(identity, &td);
    // Round-trip through the parser the coordinator uses, so nothing unverifiable is issued.
    crate::identity::from_uris(std::slice::from_ref(&uri), &td)
        .map_err(|e| CertsError::Invalid(e.to_string()))?;
    let (sub, name) = match identity {
        Identity::Host(h) => ("hosts", h),
        Identity::Operator(o) => ("operators", o),
    };
    let sub = dir.join(sub);
    fs::create_dir_all(&sub).map_err(io(&sub))?;
    let out = Issued {
        cert: sub.join(format!("{name}.pem")),
        key: sub.join(format!("{name}.key")),
    };
    sign(
        dir,
        &identity.to_string(),
        vec![SanType::URI(uri.as_str().try_into()?)],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        validity,
        &out,
        false,
    )?;
    Ok(out)
}

/// Issues the certificate an etcd server presents (`--cert-file`/`--key-file`; the CA is its
/// `--trusted-ca-file`): localhost, 127.0.0.1 and `server_names`.
pub fn issue_etcd_server(
    dir: &Path,
    server_names: &[String],
    validity: Validity,
) -> Result<Issued, CertsError> {
    let sans = server_sans(server_names)?;
    let sub = dir.join("etcd");
    fs::create_dir_all(&sub).map_err(io(&sub))?;
    let out = Issued {
        cert: sub.join("server.pem"),
        key: sub.join("server.key"),
    };
    sign(
        dir,
        "etcd",
        sans,
        SERVER_USAGES.to_vec(),
        validity,
        &out,
        true,
    )?;
    Ok(out)
}

/// Issues a client certificate for etcd user `user` (its common name; `--client-cert-auth`).
pub fn issue_etcd_user(dir: &Path, user: &str, validity: Validity) -> Result<Issued, CertsError> {
    if !crate::identity::valid_name(user) {
        return Err(CertsError::Invalid(format!(
            "etcd user {user:?}: use letters, digits, '.', '_' and '-' only"
        )));
    }
    let sub = dir.join("etcd").join("users");
    fs::create_dir_all(&sub).map_err(io(&sub))?;
    let out = Issued {
        cert: sub.join(format!("{user}.pem")),
        key: sub.join(format!("{user}.key")),
    };
    sign(
        dir,
        user,
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        validity,
        &out,
        false,
    )?;
    Ok(out)
}

/// Signs a host's certificate request (enrolment and renewal) with the CA. Only the request's
/// public key is used, and its signature is checked (the host holds the key); the names, the
/// usage and the lifetime are the CA's: the host's SPIFFE URI, client auth, `validity`.
pub fn sign_host_csr(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    trust_domain: &str,
    host: &str,
    csr_pem: &str,
    validity: Validity,
) -> Result<String, CertsError> {
    let identity = Identity::Host(host.to_owned());
    let uri = spiffe_uri(&identity, trust_domain);
    crate::identity::from_uris(std::slice::from_ref(&uri), trust_domain)
        .map_err(|e| CertsError::Invalid(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, KeyPair::from_pem(ca_key_pem)?)?;
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        CertsError::Invalid(format!(
            "the certificate request is not a valid PKCS#10 request signed by its key: {e}"
        ))
    })?;
    csr.params = leaf_params(
        &identity.to_string(),
        vec![SanType::URI(uri.as_str().try_into()?)],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        validity,
    )?;
    Ok(csr.signed_by(&issuer)?.pem())
}

/// The CA's key held by the coordinator (`interlock serve --ca-key`), to sign the short-lived
/// certificates of enrolling and renewing hosts.
pub struct Signer {
    ca_cert_pem: String,
    ca_key_pem: String,
    pub trust_domain: String,
    /// How long an issued host certificate lasts.
    pub lifetime: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads the CA certificate and key (the key must be 0600), checking they go together.
    pub fn load(
        ca: &Path,
        key: &Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, CertsError> {
        let ca_cert_pem = fs::read_to_string(ca).map_err(io(ca))?;
        let ca_key_pem = interlock_proto::tls::read_key(key)
            .map_err(|e| CertsError::Invalid(e.to_string()))
            .map(|b| String::from_utf8_lossy(&b).into_owned())?;
        Issuer::from_ca_cert_pem(&ca_cert_pem, KeyPair::from_pem(&ca_key_pem)?).map_err(|e| {
            CertsError::Invalid(format!(
                "{} and {} are not a CA certificate and its key: {e}",
                ca.display(),
                key.display()
            ))
        })?;
        Ok(Self {
            ca_cert_pem,
            ca_key_pem,
            trust_domain: trust_domain.to_owned(),
            lifetime,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// A certificate for `host` from its request, valid for `lifetime` from now and from a
    /// little before (a tenth of the lifetime, at most five minutes: clocks differ). Returns
    /// the PEM and its end (unix seconds).
    pub fn sign(
        &self,
        host: &str,
        csr_pem: &str,
        now_unix: i64,
    ) -> Result<(String, i64), CertsError> {
        let lifetime = i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX);
        let not_after = now_unix.saturating_add(lifetime);
        let skew = (lifetime / 10).min(300);
        let validity = Validity::from_unix(now_unix - skew, not_after)?;
        let pem = sign_host_csr(
            &self.ca_cert_pem,
            &self.ca_key_pem,
            &self.trust_domain,
            host,
            csr_pem,
            validity,
        )?;
        Ok((pem, not_after))
    }
}

/// Checks a certificate request (format and its signature) without signing anything.
pub fn check_csr(csr_pem: &str) -> Result<(), CertsError> {
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map(|_| ())
        .map_err(|e| {
            CertsError::Invalid(format!(
                "the certificate request is not a valid PKCS#10 request signed by its key: {e}"
            ))
        })
}

/// A server's names: localhost, 127.0.0.1 and each of `server_names` (DNS name or IP).
fn server_sans(server_names: &[String]) -> Result<Vec<SanType>, CertsError> {
    let local = [
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
    ];
    let named = server_names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name.as_str().try_into().map(SanType::DnsName).map_err(|_| {
                CertsError::Invalid(format!(
                    "server name {name:?} is not a DNS name or IP address"
                ))
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(local.into_iter().chain(named).collect())
}

fn sign(
    dir: &Path,
    common_name: &str,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    validity: Validity,
    out: &Issued,
    replace: bool,
) -> Result<(), CertsError> {
    if !replace && out.key.exists() {
        return Err(CertsError::Exists(out.key.clone()));
    }
    let issuer = issuer(dir)?;
    let key = KeyPair::generate()?;
    let cert = leaf_params(common_name, sans, usages, validity)?.signed_by(&key, &issuer)?;
    if replace {
        let _ = fs::remove_file(&out.key);
    }
    write_private(&out.key, &key.serialize_pem())?;
    write_public(&out.cert, &cert.pem())?;
    Ok(())
}

/// What every certificate the CA issues has: one common name, these SANs and extended key
/// usages, digital signature only, this validity, and the CA's key identifier.
fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    validity: Validity,
) -> Result<CertificateParams, CertsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = sans;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = usages;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Writes a key: created 0600, never replacing an existing file.
fn write_private(path: &Path, text: &str) -> Result<(), CertsError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertsError::Exists(path.to_owned())
            } else {
                io(path)(e)
            }
        })?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Writes a certificate (public): 0644, replacing the previous one through a rename.
fn write_public(path: &Path, text: &str) -> Result<(), CertsError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))
}
