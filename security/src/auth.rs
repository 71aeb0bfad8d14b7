//! Who may call what: members' roles read from their certificates, clients'
//! API keys, and the [`Guard`] every service is wrapped in.
//!
//! | service | callers |
//! |---|---|
//! | `Worker` (InstallPlan, ActivatePlan, RunSequence, Cancel, Stats) | the coordinator |
//! | `Shards` (FetchRanges) | the coordinator and workers |
//! | `Control` (RegisterWorker, KeepAlive, Leave) | workers |
//! | `Inference` | a client certificate, or an API key (`authorization: Bearer …`) |
//!
//! A caller of the wrong role gets PERMISSION_DENIED; one with no credential
//! (or a wrong key) UNAUTHENTICATED. Without TLS (`--insecure`, or loopback
//! without certificates) members are not authenticated; API keys still are.
//!
//! ```ignore
//! let guard = Guard::members(&security, "Worker", &[Role::Coordinator]);
//! router.add_service(WorkerServer::with_interceptor(svc, guard));
//! // in a handler: request.extensions().get::<Caller>()
//! ```
use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// A cluster member's or client's role, as its certificate states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Worker,
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Client => "client",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "coordinator" => Ok(Role::Coordinator),
            "worker" => Ok(Role::Worker),
            "client" => Ok(Role::Client),
            _ => Err(format!("unknown role `{s}` (coordinator, worker or client)")),
        }
    }
}

const URI_PREFIX: &str = "spiffe://zeroshard/";

/// A certificate's role and name (`spiffe://zeroshard/<role>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// `None` when `name` is empty or has characters other than letters,
    /// digits, `-`, `_` and `.`.
    pub fn new(role: Role, name: &str) -> Option<Self> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        ok.then(|| Self { role, name: name.to_string() })
    }

    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.name)
    }

    pub fn from_uri(uri: &str) -> Option<Self> {
        let (role, name) = uri.strip_prefix(URI_PREFIX)?.split_once('/')?;
        Self::new(role.parse().ok()?, name)
    }

    /// The identity a DER certificate carries in its SAN URIs (its chain is
    /// verified by the TLS handshake, not here).
    pub fn from_cert(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Self::from_uri(u),
            _ => None,
        })
    }
}

/// What a member's identity is bound to: the SHA-256 of its certificate's
/// public key (SubjectPublicKeyInfo, DER). A renewed certificate keeps it
/// (`certs renew` re-signs the same key); another certificate with the same
/// name does not. Written `sha256:<64 hex>`, as
/// `openssl x509 -in C.pem -pubkey -noout | openssl pkey -pubin -outform der | sha256sum` prints it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    /// The key of a DER certificate.
    pub fn of_cert(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
        Some(Self(digest.as_ref().try_into().ok()?))
    }

    /// `sha256:<64 hex>`, or the 64 hex digits alone.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A member as its certificate proves it: role and name, and the key the
/// name is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Credential {
    pub identity: Identity,
    pub key: KeyId,
}

impl Credential {
    pub fn of_cert(der: &[u8]) -> Option<Self> {
        Some(Self { identity: Identity::from_cert(der)?, key: KeyId::of_cert(der)? })
    }

    /// The credential of the first certificate in a PEM file.
    pub fn of_pem_file(path: &Path) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_file(path)
            .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
        Self::of_cert(der.as_ref()).ok_or_else(|| format!("{}: carries no zeroshard role", path.display()))
    }
}

impl std::fmt::Display for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (key {})", self.identity, self.key)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} `{}`", self.role, self.name)
    }
}

/// Who made a call, as the [`Guard`] established it (a request extension).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A verified certificate of an allowed role.
    Member(Credential),
    /// A client holding API key number `n` (0-based, file order).
    ApiKey(usize),
    /// No TLS on this server: nobody is authenticated.
    Anonymous,
}

impl Caller {
    /// The caller's certificate name, when it presented one.
    pub fn identity(&self) -> Option<&Identity> {
        self.credential().map(|c| &c.identity)
    }

    /// The caller's certificate, when it presented one.
    pub fn credential(&self) -> Option<&Credential> {
        match self {
            Caller::Member(c) => Some(c),
            _ => None,
        }
    }
}

/// Client API keys (`--api-key-file`: one key per line; blank lines and lines
/// starting with `#` are skipped). Only their BLAKE3 digests are kept, and a
/// presented key is compared with every one in constant time.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys(Vec<[u8; 32]>);

impl ApiKeys {
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|k| *blake3::hash(k.as_bytes()).as_bytes())
                .collect(),
        )
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let keys = Self::parse(&text);
        if keys.0.is_empty() {
            return Err(format!("{}: no API keys in it", path.display()));
        }
        Ok(keys)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The index of the key `presented` is, checking every key in constant time.
    pub fn check(&self, presented: &str) -> Option<usize> {
        let h = blake3::hash(presented.as_bytes());
        let mut found = None;
        for (i, k) in self.0.iter().enumerate() {
            // blake3::Hash's equality is constant-time.
            if blake3::Hash::from_bytes(*k) == h {
                found = Some(i);
            }
        }
        found
    }
}

/// The interceptor in front of one service: establishes the [`Caller`] or
/// refuses the call.
#[derive(Clone)]
pub struct Guard {
    service: &'static str,
    /// The server runs TLS (certificates are the members' credential).
    tls: bool,
    allow: &'static [Role],
    /// Clients may present one of these instead of a certificate.
    keys: Option<Arc<ApiKeys>>,
    /// Whose revocation list a member's key is checked against on every call.
    revocations: Option<crate::Security>,
}

impl Guard {
    /// A service only members of `allow` may call.
    pub fn members(tls: bool, service: &'static str, allow: &'static [Role]) -> Self {
        Self { service, tls, allow, keys: None, revocations: None }
    }

    /// Refuses every call of a member whose key `security`'s revocation list
    /// holds (`--deny-certs`), on connections opened before it was revoked too.
    pub fn revoking(mut self, security: &crate::Security) -> Self {
        self.revocations = Some(security.clone());
        self
    }

    /// The client API: a client certificate, or one of `keys` when given.
    pub fn clients(tls: bool, service: &'static str, keys: Option<Arc<ApiKeys>>) -> Self {
        Self { service, tls, allow: &[Role::Client], keys: keys.filter(|k| !k.is_empty()), revocations: None }
    }

    fn allowed(&self) -> String {
        let roles: Vec<&str> = self.allow.iter().map(|r| r.as_str()).collect();
        roles.join(" or ")
    }

    /// Who `req` comes from, or why it is refused.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let presented = req.peer_certs().and_then(|c| c.first().map(|d| Credential::of_cert(d.as_ref())));
        let refused = match &presented {
            Some(Some(c)) if self.revocations.as_ref().is_some_and(|s| s.is_revoked(&c.key)) => {
                return Err(Status::permission_denied(format!(
                    "{}: {c} is revoked (--deny-certs)",
                    self.service
                )))
            }
            Some(Some(c)) if self.allow.contains(&c.identity.role) => return Ok(Caller::Member(c.clone())),
            Some(Some(Credential { identity: id, .. })) => Some(format!(
                "{}: a {id} certificate may not call it (it takes {})",
                self.service,
                self.allowed()
            )),
            Some(None) => {
                Some(format!("{}: the certificate presented carries no zeroshard role", self.service))
            }
            None => None,
        };
        if let Some(keys) = &self.keys {
            let bearer = req.metadata().get("authorization").map(|v| v.to_str().unwrap_or(""));
            return match bearer {
                Some(v) => match v.strip_prefix("Bearer ").and_then(|k| keys.check(k.trim())) {
                    Some(i) => Ok(Caller::ApiKey(i)),
                    None => Err(Status::unauthenticated(format!("{}: invalid API key", self.service))),
                },
                None if refused.is_some() => Err(Status::permission_denied(refused.unwrap_or_default())),
                None => Err(Status::unauthenticated(format!(
                    "{}: this cluster needs an API key (--api-key-file, sent as `authorization: Bearer KEY`){}",
                    self.service,
                    if self.tls { " or a client certificate" } else { "" }
                ))),
            };
        }
        if let Some(m) = refused {
            return Err(Status::permission_denied(m));
        }
        if !self.tls {
            return Ok(Caller::Anonymous);
        }
        Err(Status::unauthenticated(format!(
            "{}: needs a {} certificate of this cluster",
            self.service,
            self.allowed()
        )))
    }
}

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.caller(&req)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller a [`Guard`] let through (`Anonymous` when the service has none).
pub fn caller_of<T>(req: &Request<T>) -> Caller {
    req.extensions().get::<Caller>().cloned().unwrap_or(Caller::Anonymous)
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject;

    use super::*;

    #[test]
    fn identities_round_trip_through_uris() {
        let id = Identity::new(Role::Worker, "worker-3").expect("valid");
        assert_eq!(id.uri(), "spiffe://zeroshard/worker/worker-3");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        assert_eq!(Identity::from_uri("spiffe://zeroshard/admin/x"), None);
        assert_eq!(Identity::new(Role::Client, "a/b"), None);
        assert_eq!(Identity::new(Role::Client, ""), None);
    }

    #[test]
    fn api_keys_match_only_listed_keys() {
        let keys = ApiKeys::parse("# comment\n\n alpha \nbeta\n");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.check("alpha"), Some(0));
        assert_eq!(keys.check("beta"), Some(1));
        assert_eq!(keys.check("gamma"), None);
        assert_eq!(keys.check("alph"), None);
    }

    #[test]
    fn guards_refuse_anonymous_calls_under_tls_and_check_keys() {
        let req = Request::new(());
        let worker_svc = Guard::members(true, "Worker", &[Role::Coordinator]);
        assert_eq!(worker_svc.caller(&req).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        let open = Guard::members(false, "Worker", &[Role::Coordinator]);
        assert_eq!(open.caller(&req).ok(), Some(Caller::Anonymous));
        let keys = Some(Arc::new(ApiKeys::parse("k1\nk2")));
        let clients = Guard::clients(false, "Inference", keys);
        assert_eq!(clients.caller(&req).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        let mut with_key = Request::new(());
        with_key.metadata_mut().insert("authorization", "Bearer k2".parse().expect("ascii"));
        assert_eq!(clients.caller(&with_key).ok(), Some(Caller::ApiKey(1)));
        let mut wrong = Request::new(());
        wrong.metadata_mut().insert("authorization", "Bearer k3".parse().expect("ascii"));
        assert_eq!(clients.caller(&wrong).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
    }

    #[test]
    fn issued_certificates_carry_their_role() {
        let ca = crate::certs::Ca::generate().expect("ca");
        let leaf = ca.issue(Role::Worker, "w1", &crate::certs::loopback_sans()).expect("leaf");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("pem");
        assert_eq!(Identity::from_cert(der.as_ref()), Identity::new(Role::Worker, "w1"));
        let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("pem");
        assert_eq!(Identity::from_cert(ca_der.as_ref()), None);
    }

    #[test]
    fn a_renewed_certificate_keeps_its_key_and_a_reissued_one_does_not() {
        let ca = crate::certs::Ca::generate().expect("ca");
        let key_of = |pem: &str| {
            let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
            KeyId::of_cert(der.as_ref()).expect("key")
        };
        let first = ca.issue(Role::Worker, "w1", &crate::certs::loopback_sans()).expect("leaf");
        let renewed = ca.renew(&first, &[]).expect("renewed");
        let again = ca.issue(Role::Worker, "w1", &crate::certs::loopback_sans()).expect("leaf");
        assert_ne!(first.cert, renewed.cert, "a renewal is a new certificate");
        assert_eq!(renewed.key, first.key);
        assert_eq!(key_of(&renewed.cert), key_of(&first.cert));
        assert_ne!(key_of(&again.cert), key_of(&first.cert), "same name, another key: another identity");
        let k = key_of(&first.cert);
        assert_eq!(KeyId::parse(&k.to_string()), Some(k));
        assert_eq!(KeyId::parse(k.to_string().trim_start_matches("sha256:")), Some(k));
        assert_eq!(KeyId::parse("sha256:12"), None);
        let der = rustls_pki_types::CertificateDer::from_pem_slice(renewed.cert.as_bytes()).expect("pem");
        assert_eq!(Identity::from_cert(der.as_ref()), Identity::new(Role::Worker, "w1"));
    }
}
