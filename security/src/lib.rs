//! Who may talk to whom: every connection of the cluster is TLS with the
//! cluster's certificates (or plaintext where a user asked for it), and every
//! service sits behind a [`Guard`] that checks the caller's role before it does
//! anything.
//!
//! - [`tls`]: [`Security`] (the credentials of one process: CA, certificate,
//!   key, reloaded on SIGHUP), [`Address`] (`grpc://` or `grpcs://`), the
//!   server and channel builders over `zeroshard_proto::transport`'s settings,
//!   and the blocking [`Socket`]s of the tensor placement's groups.
//! - [`auth`]: [`Role`] (coordinator, worker, client) read from a peer's
//!   certificate, [`Identity`], [`Caller`], the [`Guard`] interceptor, and the
//!   HTTP front's [`ApiKeys`].
//! - [`certs`]: the cluster CA and the certificates it issues (`certs init`,
//!   `certs issue`, and `up`'s throw-away CA).
//! - [`bundle`]: credentials on this machine: the CA and certificates `up`
//!   makes for its members, and the client bundles `query` and `status` find
//!   by endpoint.
//!
//! ```ignore
//! let paths = TlsPaths { ca: dir.join("ca.pem"), cert: Some(dir.join("worker.pem")), key: Some(dir.join("worker.key")) };
//! let sec = Security::load(paths, Some(Role::Worker))?;
//! let channel = sec.dial(&Address::parse("grpcs://10.0.0.1:50051")?.uri())?.connect().await?;
//! ```
pub mod auth;
pub mod bundle;
pub mod certs;
pub mod tls;
pub mod verify;

pub use auth::{ApiKeys, Caller, Credential, Guard, Identity, KeyId, Role};
pub use tls::{Address, Security, Socket, TlsError, TlsPaths};
