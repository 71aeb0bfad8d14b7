//! `--model org/name[@revision]` through the real binary, offline, against a
//! Hugging Face hub cache built in a temp dir from the stories260K fixture
//! (files in `blobs/`, the snapshot's entries symlinks to them, as the Hub
//! client lays them out), and downloads from a mock Hub endpoint on loopback
//! (the real Hub is not reachable from the tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::cluster::Cluster;
use crate::common::*;
use serde_json::Value;

/// The commit the fake cache's `main` and `v1` point at.
const HASH: &str = "5f0c4c5a0d8e3b7a1c2e9f8d7c6b5a4f3e2d1c0b";

/// `<cache>/models--acme--stories` with `refs/main` and `refs/v1` → [`HASH`],
/// and `snapshots/HASH/*` symlinked into `blobs/`.
fn hub_cache(cache: &Path) {
    let repo = cache.join("models--acme--stories");
    let snapshot = repo.join("snapshots").join(HASH);
    for dir in [repo.join("refs"), repo.join("blobs"), snapshot.clone()] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    for name in ["main", "v1"] {
        std::fs::write(repo.join("refs").join(name), HASH).expect("write ref");
    }
    for (n, entry) in std::fs::read_dir(model("stories260K")).expect("fixture").flatten().enumerate() {
        let blob = format!("{n:040x}");
        std::fs::copy(entry.path(), repo.join("blobs").join(&blob)).expect("copy blob");
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(entry.file_name()))
            .expect("symlink");
    }
}

/// The binary with the Hub variables of this process cleared, offline.
fn offline() -> Command {
    let mut cmd = bin();
    for var in ["HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT", "HF_TOKEN", "XDG_CACHE_HOME"] {
        cmd.env_remove(var);
    }
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd
}

fn output(mut cmd: Command, args: &[&str]) -> Output {
    cmd.args(args).output().expect("spawn zeroshard")
}

const GENERATE: &[&str] = &["--prompt", "Once upon a time", "--max-new-tokens", "16", "--json"];

/// `generate --model MODEL --json`'s one object.
fn generate(cmd: Command, model: &str) -> Value {
    let out = output(cmd, &[&["generate", "--model", model], GENERATE].concat());
    assert!(out.status.success(), "generate --model {model}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn generate_from_the_hub_cache_matches_the_folder() {
    let folder = generate(bin(), path(&model("stories260K")));
    assert_eq!(ids_of(&folder["token_ids"]).len(), 16, "{folder}");
    let cache = tempfile::tempdir().expect("tmp");
    hub_cache(cache.path());
    for id in ["acme/stories", &format!("acme/stories@{HASH}"), "acme/stories@v1"] {
        let mut cmd = offline();
        cmd.env("HF_HUB_CACHE", cache.path());
        let hub = generate(cmd, id);
        assert_eq!(hub["token_ids"], folder["token_ids"], "{id}");
        assert_eq!(hub["text"], folder["text"], "{id}");
    }
    // HF_HOME without HF_HUB_CACHE: the cache is $HF_HOME/hub.
    let home = tempfile::tempdir().expect("tmp");
    hub_cache(&home.path().join("hub"));
    let mut cmd = offline();
    cmd.env("HF_HOME", home.path());
    assert_eq!(generate(cmd, "acme/stories")["token_ids"], folder["token_ids"]);
}

#[test]
fn a_folder_spelled_like_an_id_is_a_folder() {
    let cwd = tempfile::tempdir().expect("tmp");
    let folder: PathBuf = cwd.path().join("acme/stories");
    std::fs::create_dir_all(&folder).expect("mkdir");
    for entry in std::fs::read_dir(model("stories260K")).expect("fixture").flatten() {
        std::fs::copy(entry.path(), folder.join(entry.file_name())).expect("copy");
    }
    let empty = tempfile::tempdir().expect("tmp");
    let mut cmd = offline();
    cmd.env("HF_HUB_CACHE", empty.path()).current_dir(cwd.path());
    let out = generate(cmd, "acme/stories");
    assert_eq!(out["token_ids"], generate(bin(), path(&model("stories260K")))["token_ids"]);
}

#[test]
fn a_missing_id_offline_is_one_line_naming_it_and_the_cache() {
    let cache = tempfile::tempdir().expect("tmp");
    hub_cache(cache.path());
    let cache_path = path(cache.path());
    let cases: [&[&str]; 4] = [
        &["generate", "--model", "acme/nothing", "--prompt", "Hi"],
        &["generate", "--model", "acme/stories@v2", "--prompt", "Hi"],
        &["up", "--model", "acme/nothing", "--listen", "127.0.0.1:0"],
        &["worker", "--model", "acme/nothing", "--coordinator", "http://127.0.0.1:1"],
    ];
    for args in cases {
        let mut cmd = offline();
        cmd.env("HF_HUB_CACHE", cache.path());
        let out = output(cmd, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: one line: {stderr}");
        let id = args[2];
        for needle in [id.split('@').next().expect("repo"), cache_path, "HF_HUB_OFFLINE"] {
            assert!(stderr.contains(needle), "{args:?}: {needle} missing from {stderr}");
        }
    }
    // Not shaped like an id (and not a folder): today's error, naming the path.
    let mut cmd = offline();
    cmd.env("HF_HUB_CACHE", cache.path());
    let out = output(cmd, &["generate", "--model", "no/such/folder", "--prompt", "Hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no/such/folder/config.json") && !stderr.contains("hub cache"), "{stderr}");
}

#[test]
fn up_from_the_hub_cache_serves_the_folder_tokens() {
    let folder = generate(bin(), path(&model("stories260K")));
    let cache = tempfile::tempdir().expect("tmp");
    hub_cache(cache.path());
    let mut cmd = offline();
    cmd.env("HF_HUB_CACHE", cache.path());
    // The workers `up` starts are given no --model: they read the snapshot
    // path the coordinator resolved and sends them.
    let mut c =
        Cluster::up_with(cmd, &["--model", "acme/stories", "--workers", "2", "--http-listen", "127.0.0.1:0"]);
    let out = run_json(&[&["query", "--endpoint", &c.endpoint], GENERATE].concat()).remove(0);
    assert_eq!(out["token_ids"], folder["token_ids"]);
    assert_eq!(out["text"], folder["text"]);
    let status = run_json(&["status", "--endpoint", &c.endpoint, "--json"]).remove(0);
    let served = status["model"].as_str().expect("model");
    assert!(served.ends_with(&format!("models--acme--stories/snapshots/{HASH}")), "{status}");
    // HTTP clients name the model by its Hub id.
    let base = c.http();
    let auth = c.http_auth();
    let addr = base.strip_prefix("http://").expect("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    std::io::Write::write_all(
        &mut s,
        format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("send");
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).expect("read");
    assert!(body.contains(r#""id":"acme/stories""#), "{body}");
    assert!(c.stop().success());
}

/// A Hub endpoint on 127.0.0.1 for one repository (`acme/stories` at [`HASH`]),
/// answering the model API and `resolve/` with byte ranges as hf-hub's
/// client calls them, and only with `Authorization: Bearer <token>` (a gated
/// model). Counts the requests it is sent.
mod mock_hub {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::HASH;

    pub(crate) struct MockHub {
        pub endpoint: String,
        requests: Arc<AtomicUsize>,
    }

    impl MockHub {
        pub(crate) fn start(files: Vec<(String, Vec<u8>)>, token: &'static str) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
            let requests = Arc::new(AtomicUsize::new(0));
            let count = requests.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = serve(stream, &files, token);
                }
            });
            Self { endpoint, requests }
        }

        pub(crate) fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    fn serve(mut stream: TcpStream, files: &[(String, Vec<u8>)], token: &str) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (mut range, mut auth) = (None, None);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.trim().split_once(": ") {
                match name.to_ascii_lowercase().as_str() {
                    "range" => range = value.strip_prefix("bytes=").map(str::to_string),
                    "authorization" => auth = Some(value.to_string()),
                    _ => {}
                }
            }
        }
        let respond = |stream: &mut TcpStream, status: &str, headers: &[String], body: &[u8]| {
            let mut head =
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
            for h in headers {
                head.push_str(h);
                head.push_str("\r\n");
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes())?;
            stream.write_all(body)
        };
        if auth.as_deref() != Some(&format!("Bearer {token}")) {
            return respond(
                &mut stream,
                "401 Unauthorized",
                &[],
                b"Access to model acme/stories is restricted.",
            );
        }
        if path == "/api/models/acme/stories/revision/main" {
            let siblings: Vec<_> = files.iter().map(|(n, _)| serde_json::json!({ "rfilename": n })).collect();
            let body = serde_json::json!({ "sha": HASH, "siblings": siblings }).to_string();
            return respond(
                &mut stream,
                "200 OK",
                &["Content-Type: application/json".into()],
                body.as_bytes(),
            );
        }
        let prefix = format!("/acme/stories/resolve/{HASH}/");
        let found = path.strip_prefix(&prefix).and_then(|name| files.iter().position(|(n, _)| n == name));
        let Some(i) = found else {
            return respond(&mut stream, "404 Not Found", &[], b"Entry not found");
        };
        let bytes = &files[i].1;
        let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
            Some((a, b)) => (a.parse().unwrap_or(0), b.parse().map_or(bytes.len(), |e: usize| e + 1)),
            None => (0, bytes.len()),
        };
        let headers = [
            format!("Content-Range: bytes {start}-{}/{}", end.saturating_sub(1), bytes.len()),
            format!("ETag: \"{:040x}\"", i + 1),
            format!("X-Repo-Commit: {HASH}"),
        ];
        respond(&mut stream, "206 Partial Content", &headers, &bytes[start..end])
    }
}

/// The fixture's files, named as in its folder.
fn files_of(fixture: &str) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(model(fixture))
        .expect("fixture")
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).expect("read")))
        .collect()
}

/// The binary against `hub` with `cache`, the network allowed (no proxy, no
/// token file), and `HF_TOKEN` if given.
fn online(hub: &mock_hub::MockHub, cache: &Path, token: Option<&str>) -> Command {
    let mut cmd = offline();
    cmd.env_remove("HF_HUB_OFFLINE").env("HF_HUB_CACHE", cache).env("HF_ENDPOINT", &hub.endpoint);
    cmd.env("HF_TOKEN_PATH", cache.join("no-token"));
    for proxy in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
        cmd.env_remove(proxy);
    }
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t);
    }
    cmd
}

/// The names in `snapshot`, each checked to be a symlink into `../../blobs`.
fn snapshot_names(snapshot: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(snapshot)
        .expect("snapshot")
        .flatten()
        .map(|e| {
            let link = std::fs::read_link(e.path()).expect("a symlink into blobs/");
            assert!(link.starts_with("../../blobs"), "{}", link.display());
            e.file_name().to_string_lossy().to_string()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn downloads_what_is_missing_from_the_endpoint_with_the_token() {
    let mut files = files_of("stories260K");
    files.push(("consolidated.safetensors".into(), b"not fetched".to_vec()));
    let hub = mock_hub::MockHub::start(files, "hf_test");
    let cache = tempfile::tempdir().expect("tmp");
    // A gated model without a token: one line that says what to set.
    let out = output(
        online(&hub, cache.path(), None),
        &[&["generate", "--model", "acme/stories"], GENERATE].concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("HTTP 401") && stderr.contains("HF_TOKEN"), "{stderr}");

    let folder = generate(bin(), path(&model("stories260K")));
    let with_token = || online(&hub, cache.path(), Some("hf_test"));
    assert_eq!(generate(with_token(), "acme/stories")["token_ids"], folder["token_ids"]);
    let repo = cache.path().join("models--acme--stories");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).expect("ref"), HASH);
    assert!(!repo.join("refs").join(HASH).exists(), "no ref named after the commit");
    let want = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    assert_eq!(snapshot_names(&repo.join("snapshots").join(HASH)), want);
    // Complete now: the next run, offline or not, asks the endpoint nothing.
    let asked = hub.requests();
    assert_eq!(generate(with_token(), "acme/stories")["token_ids"], folder["token_ids"]);
    let mut cmd = offline();
    cmd.env("HF_HUB_CACHE", cache.path());
    assert_eq!(generate(cmd, "acme/stories")["token_ids"], folder["token_ids"]);
    assert_eq!(hub.requests(), asked);
}

#[test]
fn downloads_a_sharded_checkpoint_by_its_index_and_completes_a_partial_one() {
    let fixture = "fixtures/llama-sharded-bf16";
    let hub = mock_hub::MockHub::start(files_of(fixture), "hf_test");
    let cache = tempfile::tempdir().expect("tmp");
    let folder = generate(bin(), path(&model(fixture)));
    let with_token = || online(&hub, cache.path(), Some("hf_test"));
    assert_eq!(generate(with_token(), "acme/stories")["token_ids"], folder["token_ids"]);
    let snapshot = cache.path().join("models--acme--stories/snapshots").join(HASH);
    let mut want: Vec<String> = files_of(fixture).into_iter().map(|(n, _)| n).collect();
    want.sort();
    assert_eq!(snapshot_names(&snapshot), want);
    // A shard gone from the snapshot: offline names it; online fetches it again.
    std::fs::remove_file(snapshot.join("model-00002-of-00003.safetensors")).expect("rm");
    let mut cmd = offline();
    cmd.env("HF_HUB_CACHE", cache.path());
    let out = output(cmd, &[&["generate", "--model", "acme/stories"], GENERATE].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("lacks model-00002-of-00003.safetensors"), "{stderr}");
    assert_eq!(generate(with_token(), "acme/stories")["token_ids"], folder["token_ids"]);
    assert_eq!(snapshot_names(&snapshot), want);
}
