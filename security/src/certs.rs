//! A cluster's certificate authority and its members' certificates
//! (`zeroshard certs init` / `zeroshard certs issue`).
//!
//! Every leaf carries its [`Role`] and name in a SAN URI,
//! `spiffe://zeroshard/<role>/<name>`, which the servers read after the TLS
//! handshake has verified the chain ([`crate::auth`]). Coordinator and worker
//! certificates serve and connect (server and client auth); client
//! certificates only connect, so a client cannot pose as a member's server.
//!
//! ```ignore
//! let ca = Ca::generate()?;
//! ca.write(dir)?;                                   // ca.pem, ca.key (0600)
//! let leaf = Ca::load(dir)?.issue(Role::Worker, "worker-1", &["10.0.0.7".into()])?;
//! leaf.write(dir, "worker-1")?;                     // worker-1.pem, worker-1.key
//! ```
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::auth::{Identity, Role};

/// Leaf certificates are valid this long (rotate with `certs issue` and SIGHUP).
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// The CA is valid this long.
pub const CA_VALIDITY_DAYS: i64 = 3650;

/// Why a certificate could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(
        "{path} exists; refusing to overwrite it (`certs renew` re-signs its key, keeping the \
         holder's identity; `certs issue --force` makes a new key: a new identity)"
    )]
    Exists { path: PathBuf },
    #[error("{0}")]
    NotRenewable(String),
    #[error("invalid name `{0}`: use letters, digits, '-', '_' and '.'")]
    InvalidName(String),
    #[error("invalid --san `{0}`: not a DNS name or IP address")]
    InvalidSan(String),
}

type Result<T> = std::result::Result<T, CertError>;

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Pem {
    /// Writes `<dir>/<name>.pem` and `<dir>/<name>.key` (owner-only), refusing
    /// to overwrite; returns both paths.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        let (cert, key) = Self::paths(dir, name);
        for p in [&cert, &key] {
            if p.exists() {
                return Err(CertError::Exists { path: p.clone() });
            }
        }
        write_private(&key, self.key.as_bytes())?;
        write_private(&cert, self.cert.as_bytes())?;
        Ok((cert, key))
    }

    /// Replaces `<dir>/<name>.pem` and `.key` (each written beside, then
    /// renamed over the old one: a member reloading meanwhile reads the old
    /// file or the new, never half of one); key first, so a reload that sees
    /// the new certificate finds its key.
    pub fn replace(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        let (cert, key) = Self::paths(dir, name);
        for (path, bytes) in [(&key, &self.key), (&cert, &self.cert)] {
            let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
            let _ = fs::remove_file(&tmp);
            write_private(&tmp, bytes.as_bytes())?;
            fs::rename(&tmp, path).map_err(|source| CertError::Io { path: path.clone(), source })?;
        }
        Ok((cert, key))
    }

    /// The certificate and key `write` made in `dir` for `name`.
    pub fn read(dir: &Path, name: &str) -> Result<Self> {
        let (cert, key) = Self::paths(dir, name);
        let read = |path: PathBuf| fs::read_to_string(&path).map_err(|source| CertError::Io { path, source });
        Ok(Self { cert: read(cert)?, key: read(key)? })
    }

    fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
    }
}

/// Creates `path` with mode 0600 and writes `bytes`.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(bytes).map_err(io)
}

/// A cluster's certificate authority.
pub struct Ca {
    pem: Pem,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA (ECDSA P-256).
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "zeroshard cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        let pem = Pem { cert: cert.pem(), key: key.serialize_pem() };
        Ok(Self { pem, issuer: Issuer::new(params, key) })
    }

    /// The CA of `dir` (`ca.pem`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| CertError::Io { path, source })
        };
        let pem = Pem { cert: read("ca.pem")?, key: read("ca.key")? };
        let key = KeyPair::from_pem(&pem.key)?;
        let issuer = Issuer::from_ca_cert_pem(&pem.cert, key)?;
        Ok(Self { pem, issuer })
    }

    /// Writes `ca.pem` and `ca.key` (owner-only) into `dir`, refusing to overwrite.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        self.pem.write(dir, "ca")
    }

    pub fn cert_pem(&self) -> &str {
        &self.pem.cert
    }

    /// A leaf for `role` named `name`, valid for the DNS names and IP
    /// addresses `sans` (a member's server needs the names peers dial it by).
    pub fn issue(&self, role: Role, name: &str, sans: &[String]) -> Result<Pem> {
        self.sign(role, name, sans, KeyPair::generate()?)
    }

    /// `old` signed again for another [`LEAF_VALIDITY_DAYS`]: the same key,
    /// role and name (so the same identity, [`crate::auth::KeyId`]), and
    /// `sans`, or the old certificate's when none are given.
    pub fn renew(&self, old: &Pem, sans: &[String]) -> Result<Pem> {
        use rustls_pki_types::pem::PemObject;
        let not = |why: &str| CertError::NotRenewable(why.to_string());
        let der = rustls_pki_types::CertificateDer::from_pem_slice(old.cert.as_bytes())
            .map_err(|e| not(&format!("not a PEM certificate: {e}")))?;
        let id = Identity::from_cert(der.as_ref())
            .ok_or_else(|| not("the certificate carries no zeroshard role"))?;
        let sans = if sans.is_empty() { dns_and_ip_sans(der.as_ref()) } else { sans.to_vec() };
        let key = KeyPair::from_pem(&old.key)?;
        self.sign(id.role, &id.name, &sans, key)
    }

    fn sign(&self, role: Role, name: &str, sans: &[String], key: KeyPair) -> Result<Pem> {
        let id = Identity::new(role, name).ok_or_else(|| CertError::InvalidName(name.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for s in sans {
            let san = match s.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(s.clone().try_into().map_err(|_| CertError::InvalidSan(s.clone()))?)
                }
            };
            params.subject_alt_names.push(san);
        }
        let uri = id.uri().try_into().map_err(|_| CertError::InvalidName(name.to_string()))?;
        params.subject_alt_names.push(SanType::URI(uri));
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::Coordinator | Role::Worker => {
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }
}

/// The DNS names and IP addresses a DER certificate is valid for.
fn dns_and_ip_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The SANs a member on this machine needs when no `--san` is given.
pub fn loopback_sans() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}
