//! Turning the TLS flags into credentials: members' [`Security`] (with the
//! loopback rule for plaintext), clients' [`ClientAuth`], etcd's
//! [`EtcdCredentials`], and `zeroshard certs`.
use std::net::ToSocketAddrs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use zeroshard_coordinator::client::ClientAuth;
use zeroshard_membership::etcd::EtcdCredentials;
use zeroshard_security::certs::{loopback_sans, Ca, Pem};
use zeroshard_security::{ApiKeys, Credential, Role, Security, TlsPaths};

use crate::args::{CertsCommand, ClientTlsArgs, EtcdArgs, MemberTlsArgs};

/// Whether every address `listen` resolves to is a loopback one.
pub(crate) fn is_loopback(listen: &str) -> bool {
    listen.to_socket_addrs().is_ok_and(|mut a| a.all(|a| a.ip().is_loopback()))
}

/// A member's security: TLS with its credentials; else plaintext, which only
/// a loopback `listen` gets without `--insecure`.
pub(crate) fn member(t: &MemberTlsArgs, role: Role, listen: &str) -> Result<Security> {
    if let Some(ca) = &t.tls_ca {
        let paths = TlsPaths { ca: ca.clone(), cert: t.tls_cert.clone(), key: t.tls_key.clone() };
        return Security::load_denying(paths, Some(role), t.deny_certs.clone())
            .map_err(|e| anyhow!("--tls-cert/--deny-certs: {e}"));
    }
    if t.insecure {
        tracing::warn!(
            "--insecure: serving plaintext on {listen}; members and clients are not authenticated"
        );
    } else if !is_loopback(listen) {
        bail!(
            "--listen {listen} is not a loopback address and no TLS credentials were given: \
             pass --tls-ca, --tls-cert and --tls-key (see `zeroshard certs`), or --insecure to serve plaintext"
        );
    }
    Ok(Security::plaintext())
}

/// The coordinator's client API keys.
pub(crate) fn api_keys(file: Option<&Path>) -> Result<Option<std::sync::Arc<ApiKeys>>> {
    file.map(|f| ApiKeys::load(f).map(std::sync::Arc::new).map_err(|e| anyhow!("--api-key-file {e}")))
        .transpose()
}

/// What `query` and `status` present.
pub(crate) fn client(a: &ClientTlsArgs) -> Result<ClientAuth> {
    let tls = a.tls_ca.as_ref().map(|ca| TlsPaths {
        ca: ca.clone(),
        cert: a.tls_cert.clone(),
        key: a.tls_key.clone(),
    });
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.trim().to_string()),
        (None, Some(f)) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("--api-key-file {}", f.display()))?;
            let key = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
            Some(key.ok_or_else(|| anyhow!("--api-key-file {}: no key in it", f.display()))?.to_string())
        }
        (None, None) => None,
    };
    Ok(ClientAuth { tls, api_key })
}

/// etcd's TLS and user, from the flags.
pub(crate) fn etcd(a: &EtcdArgs) -> Result<EtcdCredentials> {
    let password = match &a.etcd_password_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("--etcd-password-file {}", f.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        None => None,
    };
    Ok(EtcdCredentials {
        ca: a.etcd_ca.clone(),
        cert: a.etcd_cert.clone(),
        key: a.etcd_key.clone(),
        user: a.etcd_user.clone(),
        password,
    })
}

fn load_ca(dir: &Path) -> Result<Ca> {
    Ca::load(dir).with_context(|| format!("--dir {} (run `zeroshard certs init` first)", dir.display()))
}

/// `zeroshard certs init|issue|renew|show`.
pub(crate) fn certs(c: CertsCommand) -> Result<()> {
    match c {
        CertsCommand::Init { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("--dir {}", dir.display()))?;
            let (cert, key) = Ca::generate()?.write(&dir)?;
            zeroshard_offload::outln!("{}\n{}", cert.display(), key.display());
        }
        CertsCommand::Issue { dir, role, name, san, force } => {
            let role: Role = role.parse().map_err(|e: String| anyhow!("--role: {e}"))?;
            let sans = if san.is_empty() && role != Role::Client { loopback_sans() } else { san };
            let leaf = load_ca(&dir)?.issue(role, &name, &sans)?;
            let (cert, key) = if force { leaf.replace(&dir, &name)? } else { leaf.write(&dir, &name)? };
            zeroshard_offload::outln!("{}\n{}", cert.display(), key.display());
        }
        CertsCommand::Renew { dir, name, san } => {
            let ca = load_ca(&dir)?;
            let old = Pem::read(&dir, &name).with_context(|| format!("--name {name}: nothing to renew"))?;
            let (cert, key) = ca.renew(&old, &san)?.replace(&dir, &name)?;
            zeroshard_offload::outln!("{}\n{}", cert.display(), key.display());
        }
        CertsCommand::Show { file } => {
            let c = Credential::of_pem_file(&file).map_err(|e| anyhow!(e))?;
            zeroshard_offload::outln!("{}\t{}\t{}", c.identity.role, c.identity.name, c.key);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_refused_off_loopback_without_insecure() {
        let none = MemberTlsArgs::default();
        assert!(member(&none, Role::Worker, "127.0.0.1:0").is_ok());
        assert!(member(&none, Role::Worker, "localhost:0").is_ok());
        let e = member(&none, Role::Coordinator, "0.0.0.0:0").expect_err("refused");
        assert!(e.to_string().contains("--insecure"), "{e}");
        let insecure = MemberTlsArgs { insecure: true, ..MemberTlsArgs::default() };
        assert!(!member(&insecure, Role::Coordinator, "0.0.0.0:0").expect("allowed").is_tls());
    }
}
