//! [`Security`]: a process's TLS credentials (or none), used for every server
//! it runs and every channel it opens.
//!
//! - Servers accept connections through their own TLS acceptor, built from the
//!   credentials of the moment: [`Security::reload`] (on SIGHUP or when a file
//!   changes, see [`Security::spawn_reloader`]) swaps them for new connections;
//!   connections already open, and the sequences running over them, go on.
//! - Client certificates are asked for, verified against the cluster CA, but
//!   optional at the handshake: each service's [`crate::auth::Guard`] decides.
//! - Channels verify the server against the cluster CA, check that its
//!   certificate's role is one this process talks to ([`crate::verify`]), and
//!   present this process's certificate. An `https://` address without credentials, or an
//!   `http://` one with them, is an error, never a silent downgrade.
//!
//! ```ignore
//! let sec = Security::load(TlsPaths { ca, cert: Some(cert), key: Some(key) }, Some(Role::Worker))?;
//! sec.spawn_reloader();
//! sec.serve(router, listener, shutdown).await?;
//! let ch = sec.dial("https://10.0.0.5:7001")?.connect().await?;
//! ```
use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Router;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{Identity, KeyId, Role};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once on a server; a new connection past it
/// ends the oldest.
const MAX_HANDSHAKES: usize = 256;
/// How often credential files are checked for changes.
const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Why credentials could not be loaded or an address cannot be dialled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Address(String),
}

type Result<T> = std::result::Result<T, TlsError>;

/// The files of a process's credentials: the cluster CA, and this process's
/// certificate and key (a client may have none and use an API key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsPaths {
    fn files(&self) -> Vec<&Path> {
        let mut v = vec![self.ca.as_path()];
        v.extend(self.cert.as_deref());
        v.extend(self.key.as_deref());
        v
    }
}

/// Credentials as loaded at one moment.
struct Loaded {
    /// `None` for a client without a certificate.
    server: Option<Arc<rustls::ServerConfig>>,
    /// What every channel and socket this process opens presents, and how it
    /// verifies the server (the cluster CA, then [`crate::verify::ServerRoles`]).
    socket_client: Arc<rustls::ClientConfig>,
    identity: Option<Identity>,
    /// Keys refused at every handshake and call (`--deny-certs`).
    denied: Arc<BTreeSet<KeyId>>,
    /// (modified time, length) of every file, to notice changes.
    stamp: Vec<Option<(SystemTime, u64)>>,
}

struct Tls {
    paths: TlsPaths,
    expect: Option<Role>,
    /// The server roles its channels accept.
    talks_to: &'static [Role],
    /// The revocation list (`--deny-certs`), reloaded with the credentials.
    deny: Option<PathBuf>,
    loaded: RwLock<Loaded>,
}

/// A process's transport security: TLS with these credentials, or plaintext
/// (the default).
#[derive(Clone, Default)]
pub struct Security(Option<Arc<Tls>>);

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Security(plaintext)"),
            Some(t) => write!(f, "Security(tls, {:?})", t.paths),
        }
    }
}

/// ring's suites with AES-128-GCM first: it encrypts and decrypts the bulk of
/// a gather (hundreds of MB a step) in 10 AES rounds to AES-256's 14, at a
/// security level (128 bits) past any attack on these links' lifetimes. The
/// servers choose by this order ([`rustls::ServerConfig::ignore_client_order`]).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256.suite());
    Arc::new(p)
}

/// Bytes a bulk channel's socket is read in at most ([`Buffered`]).
const BULK_READ_BUFFER: usize = 256 << 10;

/// Connects a bulk channel: TLS over a buffered TCP stream.
type BulkConnector = tower::util::BoxCloneSyncService<
    tonic::codegen::http::Uri,
    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<Buffered>>,
    std::io::Error,
>;

/// A TCP stream under TLS, read through a [`BULK_READ_BUFFER`]-byte buffer:
/// rustls reads at most 4 KiB at a time, which unbuffered is one system call
/// each (~50,000 a step for a 200 MB gather). Writes go straight through.
type Buffered = tokio::io::BufReader<TcpStream>;

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| TlsError::File { path: path.to_path_buf(), message: e.to_string() })
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |message: String| TlsError::File { path: path.to_path_buf(), message };
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
    if v.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(v)
}

/// The keys a `--deny-certs` file lists: one `sha256:<64 hex>` (or the 64
/// hex digits) per line, as `zeroshard certs show` prints it; blank lines and
/// `#` comments skipped.
fn read_deny_list(path: &Path) -> Result<Arc<BTreeSet<KeyId>>> {
    let text = String::from_utf8(read(path)?)
        .map_err(|_| TlsError::File { path: path.to_path_buf(), message: "not UTF-8 text".into() })?;
    let mut keys = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        // `certs show` prints `role\tname\tkey`: the key is the last field.
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(field) = line.split_whitespace().last() else { continue };
        let key = KeyId::parse(field).ok_or_else(|| TlsError::File {
            path: path.to_path_buf(),
            message: format!(
                "line {}: `{field}` is not a key (sha256:<64 hex digits>, as `zeroshard certs show` prints)",
                i + 1
            ),
        })?;
        keys.insert(key);
    }
    Ok(Arc::new(keys))
}

fn load(
    paths: &TlsPaths,
    expect: Option<Role>,
    talks_to: &'static [Role],
    deny: Option<&Path>,
) -> Result<Loaded> {
    let denied = match deny {
        Some(p) => read_deny_list(p)?,
        None => Arc::default(),
    };
    let ca_pem = read(&paths.ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&paths.ca, &ca_pem)? {
        roots.add(c).map_err(|e| TlsError::File { path: paths.ca.clone(), message: e.to_string() })?;
    }
    let roots = Arc::new(roots);
    let server_roles = crate::verify::ServerRoles::new(roots.clone(), provider(), talks_to, denied.clone())
        .map_err(TlsError::Config)?;
    let socket_builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(server_roles));
    let mut socket_client = None;
    let (server, identity) = match (&paths.cert, &paths.key) {
        (Some(cert_path), Some(key_path)) => {
            let cert_pem = read(cert_path)?;
            let key_pem = read(key_path)?;
            let chain = certs(cert_path, &cert_pem)?;
            let identity = Identity::from_cert(chain[0].as_ref());
            match (expect, &identity) {
                (Some(want), Some(id)) if id.role != want => {
                    return Err(TlsError::File {
                        path: cert_path.clone(),
                        message: format!(
                            "is the certificate of a {id}; this process needs a {want} certificate"
                        ),
                    })
                }
                (Some(want), None) => {
                    return Err(TlsError::File {
                        path: cert_path.clone(),
                        message: format!(
                            "carries no zeroshard role; issue one with `zeroshard certs issue --role {want}`"
                        ),
                    })
                }
                _ => {}
            }
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
                path: key_path.clone(),
                message: format!("not a PEM private key: {e}"),
            })?;
            let chain_verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
            let verifier = Arc::new(crate::verify::Revoking::new(chain_verifier, denied.clone()));
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .map_err(|e| TlsError::File {
                    path: cert_path.clone(),
                    message: format!("does not go with {}: {e}", key_path.display()),
                })?;
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            cfg.ignore_client_order = true;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
                path: key_path.clone(),
                message: format!("not a PEM private key: {e}"),
            })?;
            socket_client = Some(
                socket_builder
                    .clone()
                    .with_client_auth_cert(certs(cert_path, &cert_pem)?, key)
                    .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
            );
            (Some(Arc::new(cfg)), identity)
        }
        (None, None) if expect.is_none() => (None, None),
        (None, None) => {
            return Err(TlsError::Config(format!(
                "a {} needs --tls-cert and --tls-key",
                expect.unwrap_or(Role::Client)
            )))
        }
        _ => return Err(TlsError::Config("--tls-cert and --tls-key go together".into())),
    };
    let stamp = paths.files().into_iter().chain(deny).map(stamp).collect();
    let socket_client = Arc::new(socket_client.unwrap_or_else(|| socket_builder.with_no_client_auth()));
    Ok(Loaded { server, socket_client, identity, denied, stamp })
}

impl Security {
    /// No TLS.
    pub fn plaintext() -> Self {
        Self(None)
    }

    /// TLS with the credentials of `paths`; `expect` is the role this
    /// process's certificate must carry (`None`: a client, certificate optional).
    pub fn load(paths: TlsPaths, expect: Option<Role>) -> Result<Self> {
        Self::load_talking_to(paths, expect, crate::verify::server_roles(expect))
    }

    /// [`Self::load`], talking to servers of the roles `talks_to` instead of
    /// those of [`crate::verify::server_roles`] (what a test posing as a
    /// hostile client does, to reach the servers' own checks).
    pub fn load_talking_to(paths: TlsPaths, expect: Option<Role>, talks_to: &'static [Role]) -> Result<Self> {
        Self::build(paths, expect, talks_to, None)
    }

    /// [`Self::load`] with a revocation list (`--deny-certs`): a certificate
    /// whose key it lists fails the handshake, as a client or a server, and
    /// every call on a connection it opened before is refused
    /// ([`crate::Guard::revoking`]). Reloaded with the credentials.
    pub fn load_denying(paths: TlsPaths, expect: Option<Role>, deny: Option<PathBuf>) -> Result<Self> {
        Self::build(paths, expect, crate::verify::server_roles(expect), deny)
    }

    fn build(
        paths: TlsPaths,
        expect: Option<Role>,
        talks_to: &'static [Role],
        deny: Option<PathBuf>,
    ) -> Result<Self> {
        let loaded = load(&paths, expect, talks_to, deny.as_deref())?;
        Ok(Self(Some(Arc::new(Tls { paths, expect, talks_to, deny, loaded: RwLock::new(loaded) }))))
    }

    /// Whether `key` is on the revocation list now.
    pub fn is_revoked(&self, key: &KeyId) -> bool {
        self.0
            .as_ref()
            .is_some_and(|t| t.loaded.read().unwrap_or_else(|p| p.into_inner()).denied.contains(key))
    }

    pub fn is_tls(&self) -> bool {
        self.0.is_some()
    }

    /// `https` or `http`: the scheme of this process's addresses.
    pub fn scheme(&self) -> &'static str {
        if self.is_tls() {
            "https"
        } else {
            "http"
        }
    }

    /// The role and name of this process's certificate.
    pub fn identity(&self) -> Option<Identity> {
        let t = self.0.as_ref()?;
        t.loaded.read().unwrap_or_else(|p| p.into_inner()).identity.clone()
    }

    pub fn paths(&self) -> Option<&TlsPaths> {
        self.0.as_ref().map(|t| &t.paths)
    }

    /// Reads the credential files again when they changed (or `force`);
    /// on error the credentials in use stay. Returns whether they were replaced.
    pub fn reload(&self, force: bool) -> Result<bool> {
        let Some(t) = &self.0 else { return Ok(false) };
        let now: Vec<_> = t.paths.files().into_iter().chain(t.deny.as_deref()).map(stamp).collect();
        if !force && t.loaded.read().unwrap_or_else(|p| p.into_inner()).stamp == now {
            return Ok(false);
        }
        let fresh = load(&t.paths, t.expect, t.talks_to, t.deny.as_deref())?;
        *t.loaded.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(true)
    }

    /// Reloads the credentials on SIGHUP and when a file changes (checked every
    /// 2 s), logging what happened. No-op without TLS.
    pub fn spawn_reloader(&self) {
        if !self.is_tls() {
            return;
        }
        let sec = self.clone();
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                let forced = tokio::select! {
                    _ = tokio::time::sleep(RELOAD_POLL) => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                match sec.reload(forced) {
                    Ok(true) => tracing::info!("TLS credentials reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!("TLS credentials not reloaded (the previous ones stay in use): {e}")
                    }
                }
            }
        });
    }

    fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let t = self.0.as_ref()?;
        t.loaded.read().unwrap_or_else(|p| p.into_inner()).server.clone()
    }

    /// A channel to a member or cluster address (`http(s)://host:port`), with
    /// the bulk-transfer settings of [`zeroshard_proto::transport::endpoint`]
    /// and, under TLS, this process's credentials; the server must hold a
    /// certificate of the cluster CA of a role this process talks to
    /// ([`crate::verify::server_roles`]). Under TLS the records are read
    /// through a [`BULK_READ_BUFFER`]-byte buffer: rustls asks the socket for
    /// at most 4 KiB at a time, which unbuffered is a system call per 4 KiB
    /// (~50,000 a step for a 200 MB gather).
    pub fn dial(&self, uri: &str) -> Result<Dial> {
        let addr = Address::parse(uri)?;
        let Some(t) = self.0.as_ref() else {
            if addr.tls {
                return Err(TlsError::Address(format!(
                    "{uri} speaks TLS but no TLS credentials were given (--tls-ca, and --tls-cert/--tls-key for a member)"
                )));
            }
            let ep = zeroshard_proto::transport::endpoint(&addr.uri())
                .map_err(|e| TlsError::Address(format!("{uri}: {e}")))?;
            return Ok(Dial { ep, connector: None });
        };
        if !addr.tls {
            return Err(TlsError::Address(format!(
                "{uri} is plaintext but this process runs TLS: use https:// (or grpcs://), or --insecure on every member"
            )));
        }
        let mut cfg = (*t.loaded.read().unwrap_or_else(|p| p.into_inner()).socket_client).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let connect = tower::service_fn(move |to: tonic::codegen::http::Uri| {
            let connector = connector.clone();
            async move {
                let host = to.host().unwrap_or_default();
                let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
                let port = to.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((bare.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let name = rustls_pki_types::ServerName::try_from(bare)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                Ok(hyper_util::rt::TokioIo::new(
                    connector.connect(name, Buffered::with_capacity(BULK_READ_BUFFER, tcp)).await?,
                ))
            }
        });
        let ep = zeroshard_proto::transport::endpoint(&format!("http://{}", addr.authority()))
            .map_err(|e| TlsError::Address(format!("{uri}: {e}")))?;
        Ok(Dial { ep, connector: Some(tower::util::BoxCloneSyncService::new(connect)) })
    }

    /// [`Self::dial`], connected now.
    pub async fn bulk_channel(&self, uri: &str) -> Result<Channel> {
        self.dial(uri)?.connect().await.map_err(|e| TlsError::Address(format!("{uri}: {}", error_chain(&e))))
    }

    /// [`Self::dial`], connecting on first use.
    pub fn bulk_channel_lazy(&self, uri: &str) -> Result<Channel> {
        Ok(self.dial(uri)?.connect_lazy())
    }

    /// A blocking byte stream to a member's socket at `host:port` (the tensor
    /// placement's data plane): TLS verified against the cluster CA, with this
    /// process's certificate, or plain TCP when this process runs plaintext.
    /// `TCP_NODELAY`; reads time out after `read_timeout`.
    pub fn connect_socket(&self, host: &str, port: u16, read_timeout: Duration) -> Result<Box<dyn Socket>> {
        let failed = |e: &dyn std::fmt::Display| TlsError::Address(format!("{host}:{port}: {e}"));
        // A host as written in an address keeps IPv6 brackets; the socket and
        // the certificate name want it without.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let sock = std::net::TcpStream::connect((bare, port)).map_err(|e| failed(&e))?;
        sock.set_nodelay(true).map_err(|e| failed(&e))?;
        sock.set_read_timeout(Some(read_timeout)).map_err(|e| failed(&e))?;
        let Some(t) = self.0.as_ref() else { return Ok(Box::new(sock)) };
        let cfg = t.loaded.read().unwrap_or_else(|p| p.into_inner()).socket_client.clone();
        let name = rustls_pki_types::ServerName::try_from(bare.to_string()).map_err(|e| failed(&e))?;
        let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| failed(&e))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        // Complete the handshake now, so a bad certificate fails here.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).map_err(|e| failed(&e))?;
        }
        Ok(Box::new(tls))
    }

    /// Accepts one blocking connection on `listener` (the other end of
    /// [`Self::connect_socket`]) within `patience`, and the identity its
    /// certificate carries (`None` under plaintext, or without a certificate).
    pub fn accept_socket(
        &self,
        listener: &std::net::TcpListener,
        patience: Duration,
        read_timeout: Duration,
    ) -> Result<(Box<dyn Socket>, Option<Identity>)> {
        let failed =
            |e: &dyn std::fmt::Display| TlsError::Config(format!("accepting a member's socket: {e}"));
        listener.set_nonblocking(true).map_err(|e| failed(&e))?;
        let started = std::time::Instant::now();
        let sock = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && started.elapsed() < patience => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(failed(&e)),
            }
        };
        sock.set_nonblocking(false).map_err(|e| failed(&e))?;
        sock.set_nodelay(true).map_err(|e| failed(&e))?;
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| failed(&e))?;
        let Some(cfg) = self.server_config() else { return Ok((Box::new(sock), None)) };
        let conn = rustls::ServerConnection::new(cfg).map_err(|e| failed(&e))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).map_err(|e| failed(&e))?;
        }
        tls.sock.set_read_timeout(Some(read_timeout)).map_err(|e| failed(&e))?;
        let identity = tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| Identity::from_cert(c.as_ref()));
        Ok((Box::new(tls), identity))
    }

    /// Serves `router` on `listener` until `shutdown`, over TLS when configured.
    pub async fn serve(
        &self,
        router: Router,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::result::Result<(), tonic::transport::Error> {
        if self.server_config().is_none() {
            return router
                .serve_with_incoming_shutdown(zeroshard_proto::transport::incoming(listener), shutdown)
                .await;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsStream<TcpStream>>>(64);
        let sec = self.clone();
        tokio::spawn(async move {
            let mut backoff = AcceptBackoff::default();
            // Handshakes in progress, oldest first: past MAX_HANDSHAKES a new
            // connection ends the oldest (half-open ones cannot hold the port).
            let mut pending: std::collections::VecDeque<tokio::task::AbortHandle> = Default::default();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = tx.closed() => break,
                };
                let (sock, peer) = match accepted {
                    Ok(a) => {
                        backoff.reset();
                        a
                    }
                    Err(e) => {
                        tokio::time::sleep(backoff.failed(&e)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let Some(cfg) = sec.server_config() else { break };
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                let tx = tx.clone();
                pending.retain(|h| !h.is_finished());
                if pending.len() >= MAX_HANDSHAKES {
                    if let Some(oldest) = pending.pop_front() {
                        oldest.abort();
                    }
                }
                let handshake = tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send(Ok(s)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake from {peer} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake from {peer} timed out"),
                    }
                });
                pending.push_back(handshake.abort_handle());
            }
        });
        router.serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown).await
    }
}

/// What a failing `accept` (out of file descriptors, most often) does: wait
/// longer each time in a row (10 ms doubling to 1 s), and log the first
/// failure and then at most one line every 10 s with how many there were.
#[derive(Default)]
pub struct AcceptBackoff {
    wait: Duration,
    failed: u64,
    logged: Option<std::time::Instant>,
}

impl AcceptBackoff {
    /// An accept failed with `e`: how long to wait before the next.
    pub fn failed(&mut self, e: &std::io::Error) -> Duration {
        self.failed += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!("accept: {e} ({} failures in a row; backing off)", self.failed);
            self.logged = Some(std::time::Instant::now());
        }
        self.wait = (self.wait * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        self.wait
    }

    /// An accept succeeded.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// A channel not connected yet ([`Security::dial`]).
pub struct Dial {
    ep: Endpoint,
    /// Under TLS: the endpoint is plain `http` and this speaks TLS under it.
    connector: Option<BulkConnector>,
}

impl Dial {
    pub async fn connect(self) -> std::result::Result<Channel, tonic::transport::Error> {
        match self.connector {
            None => self.ep.connect().await,
            Some(c) => self.ep.connect_with_connector(c).await,
        }
    }

    pub fn connect_lazy(self) -> Channel {
        match self.connector {
            None => self.ep.connect_lazy(),
            Some(c) => self.ep.connect_with_connector_lazy(c),
        }
    }
}

/// `e` and its sources on one line, joined by `: `, outermost first; a source
/// whose text an outer message already carries is not repeated (a refused
/// server role is a source three levels down). The CLI's one-line errors and
/// the client's connection errors are written with it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut chain = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !chain.contains(&s_text) {
            chain = format!("{chain}: {s_text}");
        }
        source = s.source();
    }
    chain
}

/// A blocking byte stream between members ([`Security::connect_socket`]).
pub trait Socket: std::io::Read + std::io::Write + Send {
    /// Changes how long a read may wait.
    fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()>;
    /// Whether a read would find bytes (or the end) now, without waiting:
    /// lets a caller that expects an answer within microseconds poll for it
    /// instead of sleeping in the kernel and paying a wake-up.
    fn readable(&mut self) -> std::io::Result<bool>;
}

/// Whether `fd` has bytes to read, or its end, now.
fn fd_readable(fd: std::os::fd::RawFd) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, a zero timeout.
    match unsafe { libc::poll(&mut p, 1, 0) } {
        n if n < 0 => Err(std::io::Error::last_os_error()),
        0 => Ok(false),
        _ => Ok(p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0),
    }
}

impl Socket for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, Some(timeout))
    }

    fn readable(&mut self) -> std::io::Result<bool> {
        fd_readable(std::os::fd::AsRawFd::as_raw_fd(self))
    }
}

impl<C, D> Socket for rustls::StreamOwned<C, std::net::TcpStream>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>> + Send,
    D: rustls::SideData,
{
    fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(timeout))
    }

    fn readable(&mut self) -> std::io::Result<bool> {
        let state = self
            .conn
            .process_new_packets()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(state.plaintext_bytes_to_read() > 0
            || state.peer_has_closed()
            || fd_readable(std::os::fd::AsRawFd::as_raw_fd(&self.sock))?)
    }
}

/// A member or cluster address: `http://`, `https://`, or as `up` prints
/// them, `grpc://` (plaintext) and `grpcs://` (TLS), then `host:port` and
/// nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub tls: bool,
    /// Host as written (brackets kept for IPv6).
    pub host: String,
    pub port: u16,
}

impl Address {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            TlsError::Address(format!(
                "`{s}` is not a member address ({why}): expected https://HOST:PORT or http://HOST:PORT"
            ))
        };
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://").or_else(|| s.strip_prefix("grpcs://")) {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://").or_else(|| s.strip_prefix("grpc://")) {
            (false, r)
        } else {
            return Err(bad("no http:// or https:// scheme"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        let host_ok = if let Some(h) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            h.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty()
                && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        };
        if !host_ok || port == 0 {
            return Err(bad("bad host or port"));
        }
        Ok(Self { tls, host: host.to_string(), port })
    }

    /// `https://host:port` or `http://host:port`.
    pub fn uri(&self) -> String {
        format!("{}://{}:{}", if self.tls { "https" } else { "http" }, self.host, self.port)
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn is_loopback(&self) -> bool {
        let h = self.host.trim_start_matches('[').trim_end_matches(']');
        h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_accept_backs_off_to_a_second_and_starts_again_after_a_success() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::from_raw_os_error(libc_emfile());
        let waits: Vec<Duration> = (0..10).map(|_| b.failed(&e)).collect();
        assert_eq!(waits[0], Duration::from_millis(10));
        assert_eq!(waits[1], Duration::from_millis(20));
        assert_eq!(waits[9], Duration::from_secs(1), "{waits:?}");
        b.reset();
        assert_eq!(b.failed(&e), Duration::from_millis(10));
    }

    /// EMFILE ("Too many open files") on Linux.
    fn libc_emfile() -> i32 {
        24
    }

    #[test]
    fn addresses_parse_strictly() {
        let a = Address::parse("grpcs://127.0.0.1:50051").expect("valid");
        assert!(a.tls && a.is_loopback());
        assert_eq!(a.uri(), "https://127.0.0.1:50051");
        assert_eq!(Address::parse("http://[::1]:7").expect("v6").authority(), "[::1]:7");
        for bad in [
            "not a url",
            "ftp://x:1",
            "http://x",
            "http://:80",
            "http://a b:1",
            "https://h:0",
            "http://h:1/p",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad} accepted");
        }
    }

    /// Both ends of one blocking socket under `sec` on loopback.
    fn socket_pair(sec: &Security) -> (Box<dyn Socket>, Box<dyn Socket>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepting = {
            let sec = sec.clone();
            std::thread::spawn(move || {
                sec.accept_socket(&listener, Duration::from_secs(10), Duration::from_secs(10))
            })
        };
        let client = sec.connect_socket("127.0.0.1", port, Duration::from_secs(10)).expect("connects");
        let (server, _) = accepting.join().expect("accept thread").expect("accepts");
        (client, server)
    }

    /// Polls `s` until a read would not wait, for at most 5 s.
    fn becomes_readable(s: &mut dyn Socket) -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            if s.readable().expect("poll") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn sockets_say_when_a_read_would_not_wait() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = crate::certs::Ca::generate().expect("ca");
        ca.write(dir.path()).expect("write");
        let leaf = ca.issue(Role::Worker, "w", &crate::certs::loopback_sans()).expect("leaf");
        let (cert, key) = leaf.write(dir.path(), "w").expect("write");
        let paths = TlsPaths { ca: dir.path().join("ca.pem"), cert: Some(cert), key: Some(key) };
        for sec in [Security::plaintext(), Security::load(paths, Some(Role::Worker)).expect("loads")] {
            let (mut client, mut server) = socket_pair(&sec);
            assert!(!server.readable().expect("poll"), "nothing was sent yet");
            let send = |from: &mut Box<dyn Socket>, to: &mut Box<dyn Socket>| {
                from.write_all(&[7u8; 3000]).and_then(|()| from.flush()).expect("write");
                assert!(becomes_readable(to.as_mut()), "3000 bytes sent, never readable");
                let mut got = [0u8; 3000];
                to.read_exact(&mut got).expect("read");
                assert_eq!(got, [7u8; 3000]);
            };
            send(&mut client, &mut server);
            send(&mut server, &mut client);
            assert!(!server.readable().expect("poll"), "everything sent was read");
            drop(client);
            assert!(becomes_readable(server.as_mut()), "the peer's close is something to read");
        }
    }

    /// Whether `from` completes a handshake with a server holding `to`'s
    /// certificate: the client's error, or the server's when only it refused.
    fn handshake(from: &Security, to: &Security) -> std::result::Result<(), String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = to.clone();
        let accepting = std::thread::spawn(move || {
            server.accept_socket(&listener, Duration::from_secs(10), Duration::from_secs(10)).map(drop)
        });
        let r = from.connect_socket("127.0.0.1", port, Duration::from_secs(10)).map(drop);
        let served = accepting.join().expect("accept thread");
        r.map_err(|e| e.to_string())?;
        served.map_err(|e| e.to_string())
    }

    #[test]
    fn a_revoked_key_fails_every_handshake_once_the_list_is_reloaded() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = crate::certs::Ca::generate().expect("ca");
        ca.write(dir.path()).expect("write");
        let paths = |role: Role, name: &str| {
            let leaf = ca.issue(role, name, &crate::certs::loopback_sans()).expect("leaf");
            let (cert, key) = leaf.write(dir.path(), name).expect("write");
            TlsPaths { ca: dir.path().join("ca.pem"), cert: Some(cert), key: Some(key) }
        };
        let deny = dir.path().join("deny");
        std::fs::write(&deny, "# revoked keys\n").expect("write");
        let coordinator = Security::load_denying(
            paths(Role::Coordinator, "c"),
            Some(Role::Coordinator),
            Some(deny.clone()),
        )
        .expect("loads");
        let rogue_paths = paths(Role::Worker, "rogue");
        let rogue = Security::load(rogue_paths.clone(), Some(Role::Worker)).expect("loads");
        let honest = Security::load(paths(Role::Worker, "w"), Some(Role::Worker)).expect("loads");
        let worker_side =
            Security::load_denying(paths(Role::Worker, "w2"), Some(Role::Worker), Some(deny.clone()))
                .expect("loads");
        handshake(&rogue, &coordinator).expect("not revoked yet");
        let key =
            crate::Credential::of_pem_file(rogue_paths.cert.as_deref().expect("cert")).expect("key").key;
        // The line `certs show` prints.
        std::fs::write(&deny, format!("# revoked keys\nworker\trogue\t{key}  # lost laptop\n"))
            .expect("write");
        assert!(coordinator.reload(true).expect("reloads"));
        assert!(worker_side.reload(true).expect("reloads"));
        assert!(coordinator.is_revoked(&key));
        let e = handshake(&rogue, &coordinator).expect_err("a revoked client");
        assert!(e.contains("revoked") || e.contains("alert"), "{e}");
        let e = handshake(&worker_side, &rogue).expect_err("a revoked server");
        assert!(e.contains("worker `rogue`") && e.contains("is revoked (--deny-certs)"), "{e}");
        handshake(&honest, &coordinator).expect("others are unaffected");
        // A bad list is refused whole, naming the line; the one in use stays.
        std::fs::write(&deny, format!("{key}\nnot-a-key\n")).expect("write");
        let e = coordinator.reload(true).expect_err("bad line");
        assert!(e.to_string().contains("line 2") && e.to_string().contains("not-a-key"), "{e}");
        assert!(coordinator.is_revoked(&key));
    }

    #[test]
    fn every_client_side_checks_the_servers_role() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = crate::certs::Ca::generate().expect("ca");
        ca.write(dir.path()).expect("write");
        let load = |role: Role, name: &str, expect: Option<Role>| {
            let leaf = ca.issue(role, name, &crate::certs::loopback_sans()).expect("leaf");
            let (cert, key) = leaf.write(dir.path(), name).expect("write");
            let paths = TlsPaths { ca: dir.path().join("ca.pem"), cert: Some(cert), key: Some(key) };
            Security::load(paths, expect).expect("loads")
        };
        let coordinator = load(Role::Coordinator, "c", Some(Role::Coordinator));
        let worker = load(Role::Worker, "w", Some(Role::Worker));
        let peer = load(Role::Worker, "w2", Some(Role::Worker));
        let client = load(Role::Client, "alice", None);
        let bare = Security::load(TlsPaths { ca: dir.path().join("ca.pem"), cert: None, key: None }, None)
            .expect("loads");
        let talk = handshake;
        for c in [&client, &bare] {
            let e = talk(c, &worker).expect_err("a client talked to a worker as if it were the coordinator");
            assert!(e.contains("holds the certificate of a worker `w`, not of a coordinator"), "{e}");
            talk(c, &coordinator).expect("a client talks to the coordinator");
        }
        talk(&coordinator, &worker).expect("the coordinator talks to workers");
        let e = talk(&coordinator, &coordinator).expect_err("the coordinator talks only to workers");
        assert!(e.contains("not of a worker"), "{e}");
        talk(&worker, &peer).expect("a worker talks to its peers");
        talk(&worker, &coordinator).expect("a worker talks to the coordinator");
        let e = talk(&worker, &client).expect_err("a client certificate serves nothing");
        assert!(e.contains("certificate"), "{e}");
    }

    #[test]
    fn scheme_mismatches_are_errors() {
        let plain = Security::plaintext();
        assert!(plain.dial("https://127.0.0.1:1").is_err());
        assert!(plain.dial("http://127.0.0.1:1").is_ok());
        let dir = tempfile::tempdir().expect("tmp");
        let ca = crate::certs::Ca::generate().expect("ca");
        ca.write(dir.path()).expect("write");
        let leaf = ca.issue(Role::Worker, "w", &crate::certs::loopback_sans()).expect("leaf");
        let (cert, key) = leaf.write(dir.path(), "w").expect("write");
        let paths = TlsPaths { ca: dir.path().join("ca.pem"), cert: Some(cert.clone()), key: Some(key) };
        let sec = Security::load(paths.clone(), Some(Role::Worker)).expect("loads");
        assert_eq!(sec.identity().map(|i| i.name), Some("w".to_string()));
        assert!(sec.dial("http://127.0.0.1:1").is_err());
        assert!(sec.dial("https://127.0.0.1:1").is_ok());
        let e = Security::load(paths, Some(Role::Coordinator)).expect_err("wrong role");
        assert!(e.to_string().contains("needs a coordinator certificate"), "{e}");
    }
}
