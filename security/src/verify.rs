//! Both sides of a handshake check more than the chain. A certificate whose
//! key is on the revocation list (`--deny-certs`) is refused either way
//! ([`Revoking`] on servers). And on the client side, after the chain and the name are verified
//! against the cluster CA, the server's certificate must also carry a role
//! this process talks to ([`server_roles`]). A worker certificate can then
//! never pose as the coordinator to a client (which would hand it prompts and
//! API keys), nor a client certificate serve anything at all.
use std::collections::BTreeSet;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls;

use crate::auth::{Credential, Identity, KeyId, Role};

/// Why `leaf` is refused by the revocation list `denied`, if it is.
fn revoked(denied: &BTreeSet<KeyId>, leaf: &CertificateDer<'_>) -> Option<String> {
    let key = KeyId::of_cert(leaf.as_ref())?;
    if !denied.contains(&key) {
        return None;
    }
    let who = Credential::of_cert(leaf.as_ref()).map_or_else(|| format!("key {key}"), |c| c.to_string());
    Some(format!("certificate ({who}) is revoked (--deny-certs)"))
}

/// The server side: the cluster CA's client verifier, after the revocation
/// list (a revoked member cannot even complete a handshake).
#[derive(Debug)]
pub(crate) struct Revoking {
    chain: Arc<dyn ClientCertVerifier>,
    denied: Arc<BTreeSet<KeyId>>,
}

impl Revoking {
    pub(crate) fn new(chain: Arc<dyn ClientCertVerifier>, denied: Arc<BTreeSet<KeyId>>) -> Self {
        Self { chain, denied }
    }
}

impl ClientCertVerifier for Revoking {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(why) = revoked(&self.denied, end_entity) {
            tracing::warn!("refused a handshake: the client's {why}");
            return Err(rustls::Error::General(format!("the client's {why}")));
        }
        self.chain.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The server roles a process of role `me` connects to: clients (no role, or
/// `client`) only to the coordinator; the coordinator only to workers; workers
/// to peers and to the coordinator (`--pull`, `Control`).
pub fn server_roles(me: Option<Role>) -> &'static [Role] {
    match me {
        None | Some(Role::Client) => &[Role::Coordinator],
        Some(Role::Coordinator) => &[Role::Worker],
        Some(Role::Worker) => &[Role::Worker, Role::Coordinator],
    }
}

/// The cluster CA's verifier, then the role check.
#[derive(Debug)]
pub(crate) struct ServerRoles {
    chain: Arc<WebPkiServerVerifier>,
    allow: &'static [Role],
    /// Keys refused whatever their role (`--deny-certs`).
    denied: Arc<BTreeSet<KeyId>>,
}

impl ServerRoles {
    pub(crate) fn new(
        roots: Arc<rustls::RootCertStore>,
        provider: Arc<CryptoProvider>,
        allow: &'static [Role],
        denied: Arc<BTreeSet<KeyId>>,
    ) -> Result<Self, String> {
        let chain = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| format!("server verifier: {e}"))?;
        Ok(Self { chain, allow, denied })
    }

    /// Why `leaf`'s role is refused, or `None` when it is one this process talks to.
    fn refused(&self, leaf: &CertificateDer<'_>) -> Option<String> {
        if let Some(why) = revoked(&self.denied, leaf) {
            return Some(format!("the server's {why}: refusing to talk to it"));
        }
        let allowed = || self.allow.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or ");
        match Identity::from_cert(leaf.as_ref()) {
            Some(id) if self.allow.contains(&id.role) => None,
            Some(id) => Some(format!(
                "the server holds the certificate of a {id}, not of a {}: refusing to talk to it",
                allowed()
            )),
            None => Some("the server's certificate carries no zeroshard role: refusing to talk to it".into()),
        }
    }
}

impl ServerCertVerifier for ServerRoles {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        match self.refused(end_entity) {
            None => Ok(verified),
            Some(why) => Err(rustls::Error::General(why)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
