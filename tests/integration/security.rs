//! Security through the real binary: mutual TLS between members, roles per
//! RPC, client keys, etcd over TLS with a user, certificate reload, and the
//! attacks a stranger, a client or a rogue worker would try, each refused with
//! its code while the cluster's outputs stay exactly the references.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::common::cluster::{ready_line, Cluster};
use crate::common::etcd::Etcd;
use crate::common::*;
use serde_json::Value;
use tonic::Code;
use zeroshard_proto::v1 as pb;
use zeroshard_security::{Security, TlsPaths};

/// A cluster CA made with `zeroshard certs`, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = run(&["certs", "init", "--dir", dir.path().to_str().expect("utf-8")]);
        assert!(out.status.success(), "certs init: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }

    fn ca(&self) -> String {
        self.path("ca.pem")
    }

    fn issue(&self, role: &str, name: &str) {
        let dir = self.dir.path().to_str().expect("utf-8");
        let out = run(&["certs", "issue", "--dir", dir, "--role", role, "--name", name]);
        assert!(out.status.success(), "certs issue: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `--tls-ca/--tls-cert/--tls-key` for `name`.
    fn args(&self, name: &str) -> Vec<String> {
        vec![
            "--tls-ca".into(),
            self.ca(),
            "--tls-cert".into(),
            self.path(&format!("{name}.pem")),
            "--tls-key".into(),
            self.path(&format!("{name}.key")),
        ]
    }

    /// A gRPC caller holding `name`'s certificate (`None`: only the CA).
    fn paths(&self, name: Option<&str>) -> TlsPaths {
        TlsPaths {
            ca: PathBuf::from(self.ca()),
            cert: name.map(|n| PathBuf::from(self.path(&format!("{n}.pem")))),
            key: name.map(|n| PathBuf::from(self.path(&format!("{n}.key")))),
        }
    }

    /// The credentials of `name` as its own process loads them (a member:
    /// its role; talking only to the server roles that role talks to).
    fn security(&self, name: Option<&str>) -> Security {
        let any = Security::load(self.paths(name), None).expect("credentials load");
        let member = any.identity().map(|i| i.role).filter(|r| *r != zeroshard_security::Role::Client);
        Security::load(self.paths(name), member).expect("credentials load")
    }

    /// The credentials of `name` in a client that skips the server-role
    /// check (a hostile one: what the servers' own guards must stop).
    fn hostile(&self, name: Option<&str>) -> Security {
        use zeroshard_security::Role;
        Security::load_talking_to(self.paths(name), None, &[Role::Coordinator, Role::Worker])
            .expect("credentials load")
    }
}

/// Child processes killed on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(args: &[String]) -> Child {
    bin()
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn")
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// stories260K's first greedy reference case: (prompt, new token ids).
fn reference() -> (String, Vec<u32>) {
    let refs = read_json(&shared().join("refs/stories260K_greedy_sample.json"));
    let case = &refs["cases"][0];
    (case["prompt"].as_str().expect("prompt").to_string(), ids_of(&case["new_token_ids"]))
}

/// `query --json` of the reference prompt with `auth`; its new token ids.
fn query_ids(endpoint: &str, auth: &[&str]) -> Vec<u32> {
    let (prompt, want) = reference();
    let mut args = vec!["query", "--endpoint", endpoint, "--json", "--prompt", &prompt];
    args.extend(["--ignore-eos", "--max-new-tokens", "48", "--retry-for-secs", "5"]);
    args.extend_from_slice(auth);
    let out = run_json(&args).remove(0);
    let got = ids_of(&out["token_ids"]);
    assert_eq!(got, want, "query {auth:?}");
    got
}

fn query_fails(endpoint: &str, auth: &[&str]) -> String {
    let mut args = vec!["query", "--endpoint", endpoint, "--prompt", "Hi", "--retry-for-secs", "1"];
    args.extend_from_slice(auth);
    run_err(&args)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// The code a call made with `sec` to `uri` ends with (`Ok` → `Code::Ok`); a
/// connection that cannot even be made (failed handshake) → `Unavailable`.
async fn code_of<F, Fut, T>(sec: &Security, uri: &str, call: F) -> Code
where
    F: FnOnce(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let Ok(ep) = sec.dial(uri) else { return Code::InvalidArgument };
    match ep.connect().await {
        Ok(ch) => match call(ch).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
        Err(_) => Code::Unavailable,
    }
}

async fn register(sec: &Security, coord: &str, address: &str, worker_id: u64) -> Code {
    let req = pb::RegisterWorkerRequest {
        address: address.into(),
        device: "cpu".into(),
        memory_bytes: 0,
        worker_id,
    };
    code_of(
        sec,
        coord,
        |ch| async move { pb::control_client::ControlClient::new(ch).register_worker(req).await },
    )
    .await
}

async fn worker_calls(sec: &Security, worker: &str) -> Vec<(&'static str, Code)> {
    use pb::worker_client::WorkerClient;
    let bogus = pb::InstallPlanRequest { worker_id: 1, ..Default::default() };
    let mut v = vec![];
    v.push((
        "InstallPlan",
        code_of(sec, worker, |ch| async move { WorkerClient::new(ch).install_plan(bogus).await }).await,
    ));
    v.push((
        "ActivatePlan",
        code_of(sec, worker, |ch| async move {
            WorkerClient::new(ch).activate_plan(pb::ActivatePlanRequest { epoch: 1000 }).await
        })
        .await,
    ));
    v.push((
        "RunSequence",
        code_of(sec, worker, |ch| async move {
            WorkerClient::new(ch)
                .run_sequence(pb::RunSequenceRequest { sequence_id: 7, epoch: 1, ..Default::default() })
                .await
        })
        .await,
    ));
    v.push((
        "Cancel",
        code_of(sec, worker, |ch| async move {
            WorkerClient::new(ch).cancel(pb::CancelRequest { sequence_id: 1 }).await
        })
        .await,
    ));
    v.push((
        "Stats",
        code_of(
            sec,
            worker,
            |ch| async move { WorkerClient::new(ch).stats(pb::StatsRequest::default()).await },
        )
        .await,
    ));
    v
}

async fn fetch(sec: &Security, uri: &str) -> Code {
    let req = pb::FetchRangesRequest {
        epoch: 1,
        ranges: vec![pb::TensorRange { tensor: "model.norm.weight".into(), start: 0, end: 8 }],
        chunk_bytes: 0,
    };
    code_of(sec, uri, |ch| async move {
        let mut s = pb::shards_client::ShardsClient::new(ch).fetch_ranges(req).await?.into_inner();
        while s.message().await?.is_some() {}
        Ok(())
    })
    .await
}

fn status_with(endpoint: &str, auth: &[&str]) -> Value {
    let mut args = vec!["status", "--endpoint", endpoint, "--json"];
    args.extend_from_slice(auth);
    run_json(&args).remove(0)
}

/// A coordinator and two workers, each with its own certificate, clients with
/// API keys: every attack of a stranger, a client and a rogue worker is refused
/// with its code, and the cluster's answers stay the references throughout.
#[test]
fn attacks_on_a_secure_cluster_are_refused_and_outputs_stay_exact() {
    let pki = Pki::new();
    for (role, name) in [("coordinator", "coord"), ("worker", "rogue"), ("client", "alice")] {
        pki.issue(role, name);
    }
    let (_procs, endpoint, coord_uri) = secure_cluster(&pki, &[], &[("w-a", &[]), ("w-b", &[])]);
    assert_eq!(endpoint, coord_uri.replace("https://", "grpcs://"));
    let ca = pki.ca();
    let with_key = ["--tls-ca", ca.as_str(), "--api-key", "key-two"];
    query_ids(&endpoint, &with_key);
    let before = status_with(&endpoint, &with_key);
    let worker_uris: Vec<String> = before["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["address"].as_str().expect("address").to_string())
        .collect();
    assert!(worker_uris.iter().all(|u| u.starts_with("https://")), "{before}");
    let live_id = before["workers"][0]["id"].as_u64().expect("id");

    // Clients: a key or a client certificate; nothing else.
    let alice_cert = pki.path("alice.pem");
    let alice_key = pki.path("alice.key");
    query_ids(&endpoint, &["--tls-ca", &ca, "--tls-cert", &alice_cert, "--tls-key", &alice_key]);
    let e = query_fails(&endpoint, &["--tls-ca", &ca]);
    assert!(e.contains("Unauthenticated"), "{e}");
    let e = query_fails(&endpoint, &["--tls-ca", &ca, "--api-key", "key-three"]);
    assert!(e.contains("Unauthenticated") && e.contains("invalid API key"), "{e}");
    let e = query_fails(&endpoint.replace("grpcs://", "grpc://"), &[]);
    assert!(e.contains("does not speak plaintext gRPC") && e.lines().count() == 1, "{e}");
    let w_cert = pki.path("w-a.pem");
    let w_key = pki.path("w-a.key");
    let e = query_fails(&endpoint, &["--tls-ca", &ca, "--tls-cert", &w_cert, "--tls-key", &w_key]);
    assert!(e.contains("PermissionDenied"), "a worker certificate is no client's: {e}");

    // The CLI refuses a worker posing as the coordinator: no prompt, no key sent.
    let worker_endpoint = worker_uris[0].replace("https://", "grpcs://");
    let e =
        query_fails(&worker_endpoint, &["--tls-ca", &ca, "--tls-cert", &alice_cert, "--tls-key", &alice_key]);
    assert!(
        e.contains("holds the certificate of a worker `w-")
            && e.contains("not of a coordinator")
            && e.lines().count() == 1,
        "{e}"
    );
    let e = query_fails(&worker_endpoint, &["--tls-ca", &ca, "--api-key", "key-two"]);
    assert!(e.contains("not of a coordinator"), "{e}");

    // Certificates named like the two workers, from the same CA.
    let twins: Vec<Security> = ["w-a", "w-b"]
        .iter()
        .map(|name| {
            // The same name as the worker's, issued in another folder by the same CA.
            let other = pki.dir.path().join(format!("twin-{name}"));
            std::fs::create_dir(&other).expect("dir");
            for f in ["ca.pem", "ca.key"] {
                std::fs::copy(pki.dir.path().join(f), other.join(f)).expect("copy");
            }
            let o = other.to_str().expect("utf-8");
            let out = run(&["certs", "issue", "--dir", o, "--role", "worker", "--name", name]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let paths = TlsPaths {
                ca: PathBuf::from(pki.ca()),
                cert: Some(other.join(format!("{name}.pem"))),
                key: Some(other.join(format!("{name}.key"))),
            };
            Security::load(paths, Some(zeroshard_security::Role::Worker)).expect("loads")
        })
        .collect();
    let honest_client = pki.security(Some("alice"));
    let stranger = pki.hostile(None);
    let client = pki.hostile(Some("alice"));
    let rogue = pki.security(Some("rogue"));
    let peer = pki.security(Some("w-b"));
    let coordinator = pki.security(Some("coord"));
    rt().block_on(async {
        let rogue_addr = "https://127.0.0.1:9";
        // Control: workers only; a live id stays with the identity that took it.
        assert_eq!(register(&stranger, &coord_uri, rogue_addr, 0).await, Code::Unauthenticated);
        assert_eq!(register(&client, &coord_uri, rogue_addr, 0).await, Code::PermissionDenied);
        assert_eq!(register(&rogue, &coord_uri, rogue_addr, live_id).await, Code::PermissionDenied);
        // Nor a live member's address; nor a second certificate with a live
        // member's name (another key: another identity).
        assert_eq!(register(&rogue, &coord_uri, &worker_uris[0], 0).await, Code::PermissionDenied);
        for twin in &twins {
            assert_eq!(register(twin, &coord_uri, rogue_addr, live_id).await, Code::PermissionDenied);
            assert_eq!(register(twin, &coord_uri, &worker_uris[0], 0).await, Code::PermissionDenied);
        }
        for bad in ["not a url", "ftp://x:1", "http://127.0.0.1:9"] {
            assert_eq!(register(&rogue, &coord_uri, bad, 0).await, Code::InvalidArgument, "{bad}");
        }
        let keep = |sec: Security| {
            let uri = coord_uri.clone();
            async move {
                code_of(&sec, &uri, |ch| async move {
                    pb::control_client::ControlClient::new(ch)
                        .keep_alive(pb::KeepAliveRequest { worker_id: live_id })
                        .await
                })
                .await
            }
        };
        assert_eq!(keep(rogue.clone()).await, Code::PermissionDenied);
        let leave = code_of(&rogue, &coord_uri, |ch| async move {
            pb::control_client::ControlClient::new(ch)
                .leave(pb::LeaveRequest { worker_id: live_id, reason: "evil".into() })
                .await
        })
        .await;
        assert_eq!(leave, Code::PermissionDenied);
        // Plaintext towards a TLS member: no connection at all.
        assert_ne!(
            register(&Security::plaintext(), &coord_uri.replace("https", "http"), rogue_addr, 0).await,
            Code::Ok
        );
        // Worker: the coordinator only.
        for w in &worker_uris {
            assert_eq!(
                fetch(&honest_client, w).await,
                Code::Unavailable,
                "an honest client talks to no worker"
            );
            for (who, sec, want) in [
                ("stranger", &stranger, Code::Unauthenticated),
                ("client", &client, Code::PermissionDenied),
                ("worker", &peer, Code::PermissionDenied),
            ] {
                for (rpc, code) in worker_calls(sec, w).await {
                    assert_eq!(code, want, "{who} calling Worker.{rpc} on {w}");
                }
            }
            // Shards: members only.
            assert_eq!(fetch(&stranger, w).await, Code::Unauthenticated);
            assert_eq!(fetch(&client, w).await, Code::PermissionDenied);
            assert_eq!(fetch(&peer, w).await, Code::Ok, "a worker gathers from its peers");
            assert_eq!(fetch(&coordinator, w).await, Code::Ok);
        }
        assert_eq!(fetch(&client, &coord_uri).await, Code::PermissionDenied);
    });

    // Nothing changed: same epoch, same members at the same addresses, exact answers.
    let after = status_with(&endpoint, &with_key);
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    assert_eq!(after["workers"].as_array().map(Vec::len), Some(2), "{after}");
    for (a, b) in
        after["workers"].as_array().expect("workers").iter().zip(before["workers"].as_array().expect("w"))
    {
        assert_eq!((&a["id"], &a["address"]), (&b["id"], &b["address"]));
    }
    query_ids(&endpoint, &with_key);
}

/// The port a process listens on (from /proc/net/tcp and its socket inodes).
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // state 0A = LISTEN
        if f.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)) {
            u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()
        } else {
            None
        }
    })
}

/// `up` runs mTLS by default; with `--api-key-file`, its bundle holds only the
/// CA and clients need a key.
#[test]
fn up_is_secure_by_default_and_keys_gate_its_clients() {
    let keys_dir = tempfile::tempdir().expect("tmp");
    let keys = keys_dir.path().join("keys");
    std::fs::write(&keys, "k-1\n").expect("keys");
    let stories = model("stories260K").display().to_string();
    let c = Cluster::up(&[
        "--model",
        &stories,
        "--workers",
        "2",
        "--api-key-file",
        keys.to_str().expect("utf-8"),
    ]);
    assert!(c.endpoint.starts_with("grpcs://"), "{}", c.endpoint);
    query_ids(&c.endpoint, &["--api-key", "k-1"]);
    let e = query_fails(&c.endpoint, &[]);
    assert!(e.contains("Unauthenticated"), "{e}");
    let s = status_with(&c.endpoint, &["--api-key-file", keys.to_str().expect("utf-8")]);
    assert!(
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .all(|w| w["address"].as_str().is_some_and(|a| a.starts_with("https://"))),
        "{s}"
    );
}

/// The scheme says what is spoken: TLS towards a plaintext cluster, or
/// plaintext towards a TLS one, is a one-line error.
#[test]
fn schemes_must_match_the_server() {
    let stories = model("stories260K").display().to_string();
    let plain = Cluster::up(&["--model", &stories, "--workers", "1", "--insecure"]);
    assert!(plain.endpoint.starts_with("grpc://"), "{}", plain.endpoint);
    query_ids(&plain.endpoint, &[]);
    let tls = plain.endpoint.replace("grpc://", "grpcs://");
    let e = query_fails(&tls, &[]);
    assert!(e.contains("no credentials that `up` left for it"), "{e}");
    let secure = Cluster::up(&["--model", &stories, "--workers", "1"]);
    let bundle_ca = secure_bundle_ca(&secure.endpoint);
    let e = query_fails(&tls, &["--tls-ca", &bundle_ca]);
    assert!(e.contains("does not speak TLS") && e.trim().lines().count() == 1, "{e}");
    let e = query_fails(&secure.endpoint.replace("grpcs://", "grpc://"), &[]);
    assert!(e.contains("does not speak plaintext gRPC") && e.trim().lines().count() == 1, "{e}");
    // https:// is grpcs://, and finds the same bundle; so does localhost,
    // which resolves to the address `up` named the bundle by.
    query_ids(&secure.endpoint.replace("grpcs://", "https://"), &[]);
    query_ids(&secure.endpoint.replace("127.0.0.1", "localhost"), &[]);
    // Where nothing listens, that is what the one line says, scheme as written.
    let nothing = format!("grpcs://127.0.0.1:{}", crate::common::etcd::free_port());
    let e = query_fails(&nothing, &[]);
    assert!(e.contains(&format!("cannot reach {nothing}: nothing answers there")), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// The CA of the bundle `up` left for `endpoint`.
fn secure_bundle_ca(endpoint: &str) -> String {
    let authority = endpoint.trim_start_matches("grpcs://");
    let dir = zeroshard_security::bundle::bundle_dir(authority).expect("state dir");
    dir.join("ca.pem").display().to_string()
}

/// Plaintext is for loopback: a coordinator or worker asked to serve another
/// address without certificates refuses, in one line, unless `--insecure`.
#[test]
fn plaintext_off_loopback_needs_insecure() {
    let stories = model("stories260K").display().to_string();
    let e = run_err(&["coordinator", "--model", &stories, "--workers", "1", "--listen", "0.0.0.0:0"]);
    assert!(e.contains("not a loopback address") && e.contains("--insecure"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let e = run_err(&["worker", "--coordinator", "http://127.0.0.1:9", "--listen", "0.0.0.0:0"]);
    assert!(e.contains("--insecure"), "{e}");
    let help = String::from_utf8(run(&["coordinator", "--help"]).stdout).expect("utf-8");
    assert!(help.contains("[default: 127.0.0.1:50051]"), "{help}");
}

/// The leaf certificate a TLS server at `addr` presents.
async fn served_cert(ca: &Path, addr: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("cert")).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certs")[0].as_ref().to_vec()
}

/// A coordinator's certificate re-issued and signalled (SIGHUP) is served to
/// new connections at once, while a sequence streaming across the reload
/// finishes exactly.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn certificates_reload_without_dropping_sequences() {
    let pki = Pki::new();
    for (role, name) in [("coordinator", "coord"), ("client", "c")] {
        pki.issue(role, name);
    }
    let (procs, endpoint, coord_uri) = secure_cluster(&pki, &[], &[("w", &["--fault-step-delay-ms", "40"])]);
    let (worker_pid, coord_pid) = (procs.0[0].id(), procs.0[1].id());
    let addr = coord_uri.trim_start_matches("https://").to_string();
    let ca = PathBuf::from(pki.ca());
    let old = rt().block_on(served_cert(&ca, &addr));

    let (prompt, want) = reference();
    let (cert, key) = (pki.path("c.pem"), pki.path("c.key"));
    let ca_s = pki.ca();
    let mut stream = bin()
        .args(["query", "--endpoint", &endpoint, "--json", "--stream", "--prompt", &prompt])
        .args(["--ignore-eos", "--max-new-tokens", "48"])
        .args(["--tls-ca", &ca_s, "--tls-cert", &cert, "--tls-key", &key])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("query");
    std::thread::sleep(Duration::from_millis(500));
    assert!(stream.try_wait().expect("wait").is_none(), "the stream should still run (48 steps × 40 ms)");
    // The rotation recipe: `certs issue` will not overwrite; `certs renew`
    // re-signs in place; then SIGHUP.
    let dir = pki.dir.path().to_str().expect("utf-8").to_string();
    let out = run(&["certs", "issue", "--dir", &dir, "--role", "coordinator", "--name", "coord"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("certs renew") && e.lines().count() == 1, "{e}");
    let show = |f: &str| {
        let out = run(&["certs", "show", &pki.path(f)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (coord_before, w_before) = (show("coord.pem"), show("w.pem"));
    let out = run(&["certs", "renew", "--dir", &dir, "--name", "coord"]);
    assert!(out.status.success(), "certs renew: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(show("coord.pem"), coord_before, "a renewal keeps the identity (role, name, key)");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(coord_pid as i32, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = rt().block_on(served_cert(&ca, &addr));
        if now != old {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new certificate was never served");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = stream.wait_with_output().expect("query");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(ids_of(&v["token_ids"]), want, "the sequence running across the reload");
    // New connections work with the new certificate.
    query_ids(&endpoint, &["--tls-ca", &ca_s, "--tls-cert", &cert, "--tls-key", &key]);

    // A worker renewed the same way keeps its identity: its id stays its own
    // (it may register it again, at its address); a certificate re-issued
    // with --force under the same name is another identity and may not.
    let s = status_with(&endpoint, &["--tls-ca", &ca_s, "--tls-cert", &cert, "--tls-key", &key]);
    let (id, w_addr) = (
        s["workers"][0]["id"].as_u64().expect("id"),
        s["workers"][0]["address"].as_str().expect("address").to_string(),
    );
    let w_served = rt().block_on(served_cert(&ca, w_addr.trim_start_matches("https://")));
    let out = run(&["certs", "renew", "--dir", &dir, "--name", "w"]);
    assert!(out.status.success(), "certs renew: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(show("w.pem"), w_before);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(worker_pid as i32, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rt().block_on(served_cert(&ca, w_addr.trim_start_matches("https://"))) == w_served {
        assert!(std::time::Instant::now() < deadline, "the worker never served its renewed certificate");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rt().block_on(register(&pki.security(Some("w")), &coord_uri, &w_addr, id)), Code::Ok);
    let out = run(&["certs", "issue", "--dir", &dir, "--role", "worker", "--name", "w", "--force"]);
    assert!(out.status.success(), "certs issue --force: {}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(show("w.pem"), w_before, "--force makes a new key");
    assert_eq!(
        rt().block_on(register(&pki.security(Some("w")), &coord_uri, &w_addr, id)),
        Code::PermissionDenied
    );
    assert_eq!(
        rt().block_on(register(&pki.security(Some("w")), &coord_uri, &w_addr, 0)),
        Code::PermissionDenied
    );
    query_ids(&endpoint, &["--tls-ca", &ca_s, "--tls-cert", &cert, "--tls-key", &key]);
}

/// etcd over TLS with a user and password: the whole fleet reaches it that
/// way; without the password a coordinator cannot start.
#[test]
fn a_fleet_runs_on_etcd_over_tls_with_auth() {
    let pki = Pki::new();
    for (role, name) in [("coordinator", "coord"), ("worker", "w1"), ("worker", "w2"), ("worker", "etcd")] {
        pki.issue(role, name);
    }
    let etcd = Etcd::start_tls(PathBuf::from(pki.path("etcd.pem")), PathBuf::from(pki.path("etcd.key")));
    let url = etcd.client_url(0);
    assert!(url.starts_with("https://"));
    let password = "s3cret-pw";
    rt().block_on(async {
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(pki.ca()).expect("ca")));
        let opts = etcd_client::ConnectOptions::new().with_tls(tls);
        let mut c = etcd_client::Client::connect([url.clone()], Some(opts)).await.expect("etcd over TLS");
        c.user_add("root", password, None).await.expect("user");
        c.user_grant_role("root", "root").await.expect("grant");
        c.auth_enable().await.expect("auth enable");
    });
    let pw = pki.dir.path().join("etcd-password");
    std::fs::write(&pw, format!("{password}\n")).expect("password file");
    let etcd_args = |with_user: bool| {
        let mut v = vec![
            "--etcd".to_string(),
            url.clone(),
            "--etcd-ca".into(),
            pki.ca(),
            "--cluster".into(),
            "sec".into(),
        ];
        if with_user {
            v.extend([
                "--etcd-user".into(),
                "root".into(),
                "--etcd-password-file".into(),
                pw.display().to_string(),
            ]);
        }
        v
    };
    let stories = model("stories260K").display().to_string();
    // Without the user, etcd refuses the coordinator.
    let mut a: Vec<String> =
        vec!["coordinator".into(), "--model".into(), stories.clone(), "--workers".into(), "2".into()];
    a.extend(["--listen".into(), "127.0.0.1:0".into()]);
    a.extend(pki.args("coord"));
    let mut no_user = a.clone();
    no_user.extend(etcd_args(false));
    let e = run_err(&strs(&no_user));
    assert!(e.contains("etcd"), "{e}");
    let mut with_user = a;
    with_user.extend(etcd_args(true));
    let mut coord = spawn(&with_user);
    let mut procs = vec![];
    for name in ["w1", "w2"] {
        let mut w = vec!["worker".to_string()];
        w.extend(etcd_args(true));
        w.extend(pki.args(name));
        procs.push(spawn(&w));
    }
    let endpoint = ready_line(&mut coord).expect("coordinator ready");
    let _procs = Procs(std::iter::once(coord).chain(procs).collect());
    pki.issue("client", "cli");
    let (cert, key) = (pki.path("cli.pem"), pki.path("cli.key"));
    query_ids(&endpoint, &["--tls-ca", &pki.ca(), "--tls-cert", &cert, "--tls-key", &key]);
}

/// A coordinator (embedded membership, the API keys `key-one` and `key-two`) and one worker
/// per `(name, extra args)`, each with its own certificate (issued here; the
/// coordinator's `coord` must be): the processes, the client endpoint and the
/// coordinator's address for members.
fn secure_cluster(pki: &Pki, coord_extra: &[&str], workers: &[(&str, &[&str])]) -> (Procs, String, String) {
    let keys = pki.dir.path().join("keys");
    std::fs::write(&keys, "# client keys\nkey-one\nkey-two\n").expect("keys");
    let mut a: Vec<String> = vec!["coordinator".into(), "--listen".into(), "127.0.0.1:0".into()];
    a.extend(["--workers".into(), workers.len().to_string()]);
    a.extend(["--model".into(), model("stories260K").display().to_string()]);
    a.extend(coord_extra.iter().map(|s| s.to_string()));
    a.extend(["--api-key-file".into(), keys.display().to_string()]);
    a.extend(pki.args("coord"));
    let mut coord = spawn(&a);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let port = loop {
        if let Some(p) = listening_port(coord.id()) {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "coordinator never listened");
        std::thread::sleep(Duration::from_millis(50));
    };
    let coord_uri = format!("https://127.0.0.1:{port}");
    let mut procs = vec![];
    for (name, extra) in workers {
        pki.issue("worker", name);
        let mut w: Vec<String> = vec!["worker".into(), "--coordinator".into(), coord_uri.clone()];
        w.extend(pki.args(name));
        w.extend(extra.iter().map(|s| s.to_string()));
        procs.push(spawn(&w));
    }
    let endpoint = ready_line(&mut coord).expect("ready");
    procs.push(coord);
    (Procs(procs), endpoint, coord_uri)
}

/// A worker banned for serving bad blocks (every tensor partitioned, so the
/// others gather from it) cannot come back: its certificate's key registers
/// no new id, while another worker's certificate still registers.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_banned_certificate_registers_nothing_again() {
    let pki = Pki::new();
    pki.issue("coordinator", "coord");
    let (_procs, endpoint, coord_uri) = secure_cluster(
        &pki,
        &["--persistence-threshold-bytes", "0"],
        &[("w-a", &[]), ("w-b", &[]), ("liar", &["--fault-serve-corrupt"])],
    );
    let ca = pki.ca();
    let auth = ["--tls-ca", ca.as_str(), "--api-key", "key-one"];
    // Queries at once until the liar is caught (least-loaded routing puts
    // them on different workers, which gather from it).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let caught = loop {
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| query_ids(&endpoint, &auth));
            }
        });
        let st = status_with(&endpoint, &auth);
        let liars: Vec<u64> = st["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter(|w| w["rejected_blocks_total"].as_u64() > Some(0))
            .filter_map(|w| w["id"].as_u64())
            .collect();
        if st["epoch"].as_u64() >= Some(2) && !liars.is_empty() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "the liar was never banned: {st}");
    };
    rt().block_on(async {
        let liar = pki.security(Some("liar"));
        // A new id, at a new address: refused for the key, whatever it asks.
        assert_eq!(
            register(&liar, &coord_uri, "https://127.0.0.1:9", 0).await,
            Code::PermissionDenied,
            "{caught}"
        );
        let honest = pki.security(Some("w-a"));
        assert_eq!(register(&honest, &coord_uri, "https://127.0.0.1:9", 0).await, Code::Ok);
    });
}

/// Honest workers pass every audit, greedy and sampled, under the gather
/// placement (the tensor placement's groups: `tensor::`).
#[test]
fn honest_workers_pass_every_audit() {
    let c = Cluster::up(&[
        "--model",
        model("stories260K").to_str().expect("utf-8"),
        "--workers",
        "3",
        "--audit-fraction",
        "1",
    ]);
    assert_audits_pass(&c.endpoint);
}

/// A worker that computes honestly but sends every 10th token altered passes
/// every other check (its blocks match the digests, it answers on time): the
/// output audits catch it within a handful of its sequences, ban its
/// certificate's key and plan around it; answers are exact from then on and
/// no honest worker fails an audit.
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: needs --features fault-injection (scripts/test.sh)"
)]
#[test]
fn a_worker_that_alters_its_tokens_is_caught_by_the_audits_and_banned() {
    let pki = Pki::new();
    pki.issue("coordinator", "coord");
    let (_procs, endpoint, coord_uri) = secure_cluster(
        &pki,
        &["--audit-fraction", "1"],
        &[("w-a", &[]), ("w-b", &[]), ("liar", &["--fault-alter-every", "10"])],
    );
    let ca = pki.ca();
    let auth = ["--tls-ca", ca.as_str(), "--api-key", "key-one"];
    let (prompt, want) = reference();
    let ask = || {
        let mut args = vec!["query", "--endpoint", &endpoint, "--json", "--prompt", &prompt];
        args.extend(["--ignore-eos", "--max-new-tokens", "48", "--retry-for-secs", "5"]);
        args.extend_from_slice(&auth);
        ids_of(&run_json(&args).remove(0)["token_ids"])
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let (mut asked, mut wrong) = (0, 0);
    let banned = loop {
        let answers: Vec<Vec<u32>> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..3).map(|_| s.spawn(ask)).collect();
            runs.into_iter().map(|r| r.join().expect("query")).collect()
        });
        asked += answers.len();
        wrong += answers.iter().filter(|a| **a != want).count();
        let st = status_with(&endpoint, &auth);
        if st["audit_bans_total"].as_u64() >= Some(1)
            && st["epoch"].as_u64() >= Some(2)
            && st["ready"] == true
        {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the liar was never banned after {asked} queries: {st}"
        );
    };
    eprintln!("banned after {asked} queries, {wrong} of them answered wrong by the liar: {banned}");
    assert!(wrong >= 1, "the liar answered nothing: the test proves nothing");
    assert!(wrong <= 6, "{wrong} wrong answers before the ban: not within a handful");
    assert_eq!(banned["audit_bans_total"], 1, "{banned}");
    let planned =
        banned["workers"].as_array().expect("workers").iter().filter(|w| w["ready"] == true).count();
    assert_eq!(planned, 2, "the liar is planned around (registered, not ready): {banned}");
    // From now on every answer is exact and every audit passes; only the
    // liar ever failed one (late audits of its earlier sequences may still
    // come in after the ban).
    assert!(banned["audits_failed_total"].as_u64() >= Some(1), "{banned}");
    for _ in 0..4 {
        assert_eq!(ask(), want);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let st = status_with(&endpoint, &auth);
        let passed = st["audits_passed_total"].as_u64().unwrap_or(0);
        if passed >= banned["audits_passed_total"].as_u64().unwrap_or(0) + 4 {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "audits after the ban never passed: {st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for w in after["workers"].as_array().expect("workers") {
        let failed = w["audits_failed_total"].as_u64().expect("per-worker audits");
        assert_eq!(failed > 0, w["ready"] == false, "only the liar failed audits: {after}");
    }
    assert_eq!(after["audit_bans_total"], 1, "{after}");
    rt().block_on(async {
        // Its key registers nothing again; an honest key still does.
        let liar = pki.security(Some("liar"));
        assert_eq!(register(&liar, &coord_uri, "https://127.0.0.1:9", 0).await, Code::PermissionDenied);
        let honest = pki.security(Some("w-a"));
        assert_eq!(register(&honest, &coord_uri, "https://127.0.0.1:9", 0).await, Code::Ok);
    });
}

/// A worker certificate registering dead addresses as fast as it can: the
/// first burst registers, the rest is refused (RESOURCE_EXHAUSTED); none of
/// them answers a probe at its address, so none is planned: no new epoch,
/// nothing reloaded, answers exact.
#[test]
fn registrations_at_dead_addresses_are_never_planned_and_are_slowed() {
    let pki = Pki::new();
    pki.issue("coordinator", "coord");
    pki.issue("worker", "rogue");
    let (_procs, endpoint, coord_uri) = secure_cluster(&pki, &[], &[("w-a", &[]), ("w-b", &[])]);
    let ca = pki.ca();
    let auth = ["--tls-ca", ca.as_str(), "--api-key", "key-one"];
    let want = query_ids(&endpoint, &auth);
    let before = status_with(&endpoint, &auth);
    let rogue = pki.security(Some("rogue"));
    let codes: Vec<Code> = rt().block_on(async {
        let mut v = vec![];
        for _ in 0..50 {
            // A port nothing listens on.
            let port = crate::common::etcd::free_port();
            v.push(register(&rogue, &coord_uri, &format!("https://127.0.0.1:{port}"), 0).await);
        }
        v
    });
    let ok = codes.iter().filter(|c| **c == Code::Ok).count();
    let slowed = codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
    assert!((30..=34).contains(&ok) && ok + slowed == 50, "{ok} registered, {slowed} slowed: {codes:?}");
    // Past the debounce, a probe of each, and a retry.
    std::thread::sleep(Duration::from_secs(3));
    let after = status_with(&endpoint, &auth);
    assert_eq!(after["epoch"], before["epoch"], "a dead registration was planned: {after}");
    let loads = |s: &Value| -> Vec<(Value, Value)> {
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter(|w| w["loads_total"].as_u64() > Some(0))
            .map(|w| (w["id"].clone(), w["loads_total"].clone()))
            .collect()
    };
    assert_eq!(loads(&after), loads(&before), "the real workers reloaded: {after}");
    assert_eq!(query_ids(&endpoint, &auth), want);
}

/// `--deny-certs`: a key added to the list (as `certs show` prints it) is
/// refused within the reload poll on the connection it already has open
/// (PERMISSION_DENIED on its next call) and at every new handshake; the
/// cluster goes on serving.
#[test]
fn a_revoked_certificate_is_refused_on_open_connections_and_new_ones() {
    use pb::control_client::ControlClient;
    let pki = Pki::new();
    pki.issue("coordinator", "coord");
    pki.issue("worker", "rogue");
    let deny = pki.dir.path().join("deny");
    std::fs::write(&deny, "# revoked keys\n").expect("deny list");
    let deny_s = deny.display().to_string();
    let (_procs, endpoint, coord_uri) =
        secure_cluster(&pki, &["--deny-certs", &deny_s], &[("w-a", &[]), ("w-b", &[])]);
    let ca = pki.ca();
    let auth = ["--tls-ca", ca.as_str(), "--api-key", "key-one"];
    let want = query_ids(&endpoint, &auth);
    let rogue = pki.security(Some("rogue"));
    rt().block_on(async {
        let ch = rogue.dial(&coord_uri).expect("dial").connect().await.expect("connects");
        let mut open = ControlClient::new(ch);
        let req = pb::RegisterWorkerRequest {
            address: "https://127.0.0.1:9".into(),
            device: "cpu".into(),
            memory_bytes: 0,
            worker_id: 0,
        };
        let id = open.register_worker(req).await.expect("registers").into_inner().worker_id;
        let out = run(&["certs", "show", &pki.path("rogue.pem")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        std::fs::write(&deny, format!("# revoked keys\n{line}")).expect("deny list");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let refused = loop {
            match open.keep_alive(pb::KeepAliveRequest { worker_id: id }).await {
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "the revocation was never applied");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => break s,
            }
        };
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("worker `rogue`") && refused.message().contains("revoked"),
            "{refused:?}"
        );
        // A new connection does not get past the handshake: no call is answered
        // (TLS 1.3: the client learns it when the server drops the connection).
        let fresh = register(&rogue, &coord_uri, "https://127.0.0.1:9", 0).await;
        assert!(matches!(fresh, Code::Unavailable | Code::Cancelled | Code::Unknown), "{fresh:?}");
    });
    assert_eq!(query_ids(&endpoint, &auth), want);
}
