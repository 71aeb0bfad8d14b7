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
//! let leaf = Ca::load(dir)?.issue(Role::Worker, "worker-0", &["10.0.0.7".into()])?;
//! leaf.write(dir, "worker-0")?;                     // worker-0.pem, worker-0.key
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
    #[error("{path} exists; refusing to overwrite it")]
    Exists { path: PathBuf },
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
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        for p in [&cert, &key] {
            if p.exists() {
                return Err(CertError::Exists { path: p.clone() });
            }
        }
        write_private(&key, self.key.as_bytes())?;
        write_private(&cert, self.cert.as_bytes())?;
        Ok((cert, key))
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
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }
}

/// The SANs a member on this machine needs when no `--san` is given.
pub fn loopback_sans() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}
