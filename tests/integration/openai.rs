//! The OpenAI-compatible HTTP front through clients nobody here wrote: the
//! official `openai` Python package (in the venv `scripts/py-venv.sh` makes;
//! the test command sets `ZEROSHARD_PYTHON`) and raw HTTP, against `up
//! --http-listen`: the same text `generate` gives, streaming and not; errors
//! in OpenAI's shape; a client that leaves frees its sequence.
use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::cluster::Cluster;
use crate::common::{model, run_json};
use serde_json::Value;

const PROMPT: &str = "Once upon a time";
const TOKENS: u32 = 40;

pub(crate) fn python() -> PathBuf {
    let p = std::env::var_os("ZEROSHARD_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"));
        cache.join("zeroshard/py-venv/bin/python")
    });
    assert!(
        p.is_file(),
        "the Python venv with the openai client is missing at {} (scripts/py-venv.sh makes it; \
         scripts/test.sh runs it and sets ZEROSHARD_PYTHON)",
        p.display()
    );
    p
}

fn stories() -> String {
    model("stories260K").display().to_string()
}

/// What `generate` gives for `PROMPT`, greedy, ignoring EOS.
fn generated() -> Value {
    generated_with(&[])
}

/// [`generated`] with `extra` flags.
fn generated_with(extra: &[&str]) -> Value {
    let dir = stories();
    let n = TOKENS.to_string();
    let args =
        ["generate", "--model", &dir, "--prompt", PROMPT, "--max-new-tokens", &n, "--ignore-eos", "--json"];
    run_json(&[&args[..], extra].concat()).remove(0)
}

/// One HTTP/1.1 request on a fresh connection; (status, body).
pub(crate) fn http(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[&str],
) -> (u16, String) {
    let mut s = send(base, method, path, body, headers);
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Sends one HTTP/1.1 request (JSON unless `headers` give a Content-Type)
/// on a fresh connection, which it returns for the answer to be read.
fn send(base: &str, method: &str, path: &str, body: Option<&str>, headers: &[&str]) -> TcpStream {
    let addr = base.strip_prefix("http://").expect("http:// base");
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP front");
    let body = body.unwrap_or("");
    // JSON unless the caller says otherwise.
    let typed = headers.iter().any(|h| h.to_ascii_lowercase().starts_with("content-type:"));
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{}Content-Length: {}\r\n",
        if typed { "" } else { "Content-Type: application/json\r\n" },
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    // A server that refuses early (413) may close before the whole body is
    // sent: its answer is read all the same.
    let _ = s.write_all(req.as_bytes());
    s
}

/// Runs the binary, which must fail: (exit code, stderr).
fn fails(args: &[&str]) -> (Option<i32>, String) {
    let out = common::run(args);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).trim_end().to_string())
}

/// The JSON of a (possibly chunked) HTTP/1.1 body.
pub(crate) fn json_body(body: &str) -> Value {
    let start = body.find('{').expect("a JSON object");
    let end = body.rfind('}').expect("a JSON object");
    serde_json::from_str(&body[start..=end]).unwrap_or_else(|e| panic!("bad JSON {body:?}: {e}"))
}

#[test]
fn the_openai_client_gets_what_generate_gives() {
    let want = generated();
    let want_text = want["text"].as_str().expect("text").to_string();
    let mut c = Cluster::up(&["--model", &stories(), "--workers", "2", "--http-listen", "127.0.0.1:0"]);
    let base = c.http();
    let auth = c.http_auth();
    let out = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/openai_check.py"))
        .args([
            &base,
            "stories260K",
            PROMPT,
            &TOKENS.to_string(),
            auth.trim_start_matches("Authorization: Bearer "),
        ])
        .output()
        .expect("run the openai client");
    assert!(out.status.success(), "openai_check.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("its JSON");
    eprintln!("openai {}: {got}", got["openai_version"]);
    assert_eq!(got["models"], serde_json::json!(["stories260K"]));
    assert_eq!(got["text"], want_text.as_str(), "non-streamed completion");
    assert_eq!(got["batch_texts"], serde_json::json!([want_text, want_text]), "a list of prompts");
    assert_eq!(got["logprob_top_sizes"], serde_json::json!([2, 2, 2, 2]), "{got}");
    let pieces: Vec<&str> =
        got["logprob_tokens"].as_array().expect("tokens").iter().filter_map(Value::as_str).collect();
    assert!(want_text.starts_with(&pieces.concat()), "{pieces:?} do not begin {want_text:?}");
    assert_eq!(got["finish_reason"], "length");
    assert_eq!(got["usage"]["completion_tokens"], TOKENS);
    assert_eq!(
        got["usage"]["prompt_tokens"].as_u64(),
        Some(want["prompt_token_ids"].as_array().expect("ids").len() as u64)
    );
    assert_eq!(got["stream_text"], want_text.as_str(), "streamed completion");
    assert!(got["stream_chunks"].as_u64() > Some(1), "the stream came in one piece: {got}");
    assert_eq!(got["stream_finish_reason"], "length");
    assert_eq!(got["stream_usage"], got["usage"], "include_usage");
    // A stop string cuts the text where `generate --stop` does.
    let stopped = generated_with(&["--stop", " the"]);
    assert_eq!(got["stop_text"], stopped["text"]);
    assert_eq!(got["stop_finish_reason"], "stop");
    // Errors in OpenAI's shape, with the right status.
    assert_eq!(got["wrong_model"]["status"], 404, "{got}");
    assert_eq!(got["bad_temperature"]["status"], 400, "{got}");
    assert!(got["bad_temperature"]["message"].as_str().is_some_and(|m| m.contains("temperature")), "{got}");
    assert_eq!(got["penalty"]["status"], 400, "{got}");
}

#[test]
fn raw_http_gets_the_same_and_a_client_that_leaves_frees_its_sequence() {
    let want = generated();
    let mut c = Cluster::up(&["--model", &stories(), "--workers", "2", "--http-listen", "127.0.0.1:0"]);
    let base = c.http();
    let auth = c.http_auth();
    let (code, body) = http(&base, "GET", "/health", None, &[&auth]);
    assert_eq!(code, 200, "{body}");
    let req = format!(
        r#"{{"model":"stories260K","prompt":"{PROMPT}","max_tokens":{TOKENS},"temperature":0,"ignore_eos":true}}"#
    );
    let (code, body) = http(&base, "POST", "/v1/completions", Some(&req), &[&auth]);
    assert_eq!(code, 200, "{body}");
    let v = json_body(&body);
    assert_eq!(v["object"], "text_completion");
    // Secure by default: `up` made the key; without it, or with a body not
    // declared JSON (a browser's cross-site form post), nothing runs.
    let (code, body) = http(&base, "POST", "/v1/completions", Some(&req), &[]);
    assert_eq!(
        (code, json_body(&body)["error"]["type"].as_str()),
        (401, Some("authentication_error")),
        "{body}"
    );
    let (code, body) =
        http(&base, "POST", "/v1/completions", Some(&req), &[&auth, "Content-Type: text/plain"]);
    assert_eq!(code, 415, "{body}");
    assert!(
        json_body(&body)["error"]["message"].as_str().is_some_and(|m| m.contains("application/json")),
        "{body}"
    );
    assert_eq!(v["choices"][0]["text"], want["text"]);
    // Streamed: server-sent events, one `data:` per chunk, then `data: [DONE]`.
    let sreq = req.replace("\"temperature\":0", "\"temperature\":0,\"stream\":true");
    let (code, body) = http(&base, "POST", "/v1/completions", Some(&sreq), &[&auth]);
    assert_eq!(code, 200, "{body}");
    let mut text = String::new();
    let mut done = false;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            done = true;
            continue;
        }
        let e: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad event {line:?}: {e}"));
        text.push_str(e["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert!(done, "no [DONE]: {body}");
    assert_eq!(text, want["text"].as_str().expect("text"));
    // Bad JSON, an empty batch of prompts, no such route: 400, 400, 404, in OpenAI's shape.
    let (code, body) = http(&base, "POST", "/v1/completions", Some("{not json"), &[&auth]);
    assert_eq!(code, 400, "{body}");
    assert!(json_body(&body)["error"]["message"].is_string(), "{body}");
    let batch = r#"{"model":"stories260K","prompt":[],"max_tokens":2}"#;
    assert_eq!(http(&base, "POST", "/v1/completions", Some(batch), &[&auth]).0, 400);
    assert_eq!(http(&base, "GET", "/v1/nothing", None, &[&auth]).0, 404);
    // Refusals below the handlers are OpenAI's error JSON too: a method the
    // route does not take (405), a body over 2 MiB (413).
    let (code, body) = http(&base, "GET", "/v1/completions", None, &[&auth]);
    assert_eq!(
        (code, json_body(&body)["error"]["type"].as_str()),
        (405, Some("invalid_request_error")),
        "{body}"
    );
    let huge = format!(r#"{{"model":"stories260K","prompt":"{}"}}"#, "a".repeat(3 << 20));
    let (code, body) = http(&base, "POST", "/v1/completions", Some(&huge), &[&auth]);
    assert_eq!(code, 413, "{body}");
    assert!(
        json_body(&body)["error"]["message"].as_str().is_some_and(|m| m.contains("2097152 bytes")),
        "{body}"
    );
    // Past 100 header fields: 431, in the same shape.
    let pads: Vec<String> = (0..120).map(|i| format!("X-Pad-{i}: {i}")).collect();
    let mut headers: Vec<&str> = pads.iter().map(String::as_str).collect();
    headers.push(&auth);
    let (code, body) = http(&base, "GET", "/v1/models", None, &headers);
    assert_eq!(
        (code, json_body(&body)["error"]["type"].as_str()),
        (431, Some("invalid_request_error")),
        "{body}"
    );

    // A long stream whose client leaves after the first events: its sequence
    // is cancelled on the worker.
    let long = r#"{"model":"stories260K","prompt":"Once upon a time","max_tokens":480,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let mut s = send(&base, "POST", "/v1/completions", Some(long), &[&auth]);
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("the first events");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200"), "{}", String::from_utf8_lossy(&buf[..n]));
    drop(s);
    let left = Instant::now();
    loop {
        let s = run_json(&["status", "--endpoint", &c.endpoint, "--json"]).remove(0);
        if common::active_sequences(&s) == 0 {
            break;
        }
        assert!(left.elapsed() < Duration::from_secs(10), "the abandoned stream still runs: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("a client that left: its sequence gone {:.2} s later", left.elapsed().as_secs_f64());
}

#[test]
fn an_api_key_is_required_when_the_cluster_has_keys() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k-0123456789abcdef0123456789abcdef\n").expect("keys");
    let mut c = Cluster::up(&[
        "--model",
        &stories(),
        "--workers",
        "1",
        "--http-listen",
        "127.0.0.1:0",
        "--api-key-file",
        keys.to_str().expect("utf-8"),
    ]);
    let base = c.http();
    let (code, body) = http(&base, "GET", "/v1/models", None, &[]);
    assert_eq!(code, 401, "{body}");
    assert_eq!(json_body(&body)["error"]["type"], "authentication_error");
    assert_eq!(http(&base, "GET", "/v1/models", None, &["Authorization: Bearer wrong"]).0, 401);
    let (code, body) =
        http(&base, "GET", "/v1/models", None, &["Authorization: Bearer k-0123456789abcdef0123456789abcdef"]);
    assert_eq!(code, 200, "{body}");
}

/// `--http-open` opts out of `up`'s key (loopback only).
#[test]
fn an_open_http_front_takes_requests_without_a_key() {
    let mut c = Cluster::up(&[
        "--model",
        &stories(),
        "--workers",
        "1",
        "--http-listen",
        "127.0.0.1:0",
        "--http-open",
        "--max-queued-requests",
        "0",
    ]);
    let base = c.http();
    let (code, body) = http(&base, "GET", "/v1/models", None, &[]);
    assert_eq!(code, 200, "{body}");
    // The model's context, as vLLM lists it.
    let positions =
        common::read_json(&model("stories260K").join("config.json"))["max_position_embeddings"].clone();
    assert_eq!(json_body(&body)["data"][0]["max_model_len"], positions, "{body}");
    // No queue at all: every completion is refused at once, 429 with Retry-After.
    let req = r#"{"model":"stories260K","prompt":"Once upon a time","max_tokens":2}"#;
    let mut s = send(&base, "POST", "/v1/completions", Some(req), &[]);
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"), "{answer}");
    // Fields that would change the result and are not implemented (or not
    // understood) are refused by name.
    for (field, value) in [("suffix", r#""the end""#), ("logit_bias", r#"{"a": 100}"#)] {
        let req = format!(r#"{{"model":"stories260K","prompt":"x","max_tokens":1,"{field}":{value}}}"#);
        let (code, body) = http(&base, "POST", "/v1/completions", Some(&req), &[]);
        assert_eq!(code, 400, "{body}");
        assert!(json_body(&body)["error"]["message"].as_str().is_some_and(|m| m.contains(field)), "{body}");
    }
    let (code, err) = Cluster::up_fails_with(
        common::bin(),
        &["--model", &stories(), "--workers", "1", "--http-listen", "0.0.0.0:0", "--http-open"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--api-key-file"), "{err}");
}

#[test]
fn an_http_front_off_loopback_needs_api_keys() {
    let (code, err) = Cluster::up_fails_with(
        common::bin(),
        &["--model", &stories(), "--workers", "1", "--http-listen", "0.0.0.0:0"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--http-listen 0.0.0.0:0") && err.contains("--api-key-file"), "{err}");
}

/// The Zephyr chat template (TinyLlama-1.1B-Chat's), whose newlines depend on
/// Jinja's trim_blocks and lstrip_blocks as transformers sets them.
const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

const CHAT: &str = r#"[{"role":"system","content":"You tell short stories."},{"role":"user","content":"Tell me about a cat."},{"role":"assistant","content":"Once upon a time there was a cat."},{"role":"user","content":"And then?"}]"#;

/// stories260K with a chat template in its tokenizer_config.json, as a chat
/// model from the Hub has.
pub(crate) fn chat_model() -> tempfile::TempDir {
    let dir = common::model_dir::copy_model();
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "chat_template": ZEPHYR,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).expect("tokenizer_config.json");
    dir
}

#[test]
fn chat_matches_transformers_template_and_generate_chat_through_every_front() {
    let dir = chat_model();
    let path = dir.path().to_str().expect("utf-8").to_string();
    let n = TOKENS.to_string();
    let chat_args = ["--chat", CHAT, "--max-new-tokens", &n, "--ignore-eos", "--json"];
    let want = run_json(&[&["generate", "--model", &path][..], &chat_args].concat()).remove(0);
    let want_text = want["text"].as_str().expect("text").to_string();

    let mut c = Cluster::up(&["--model", &path, "--workers", "2", "--http-listen", "127.0.0.1:0"]);
    let base = c.http();
    let auth = c.http_auth();
    let name = dir.path().file_name().expect("name").to_str().expect("utf-8").to_string();
    let out = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/chat_check.py"))
        .args([&base, &name, &path, CHAT, &n, auth.trim_start_matches("Authorization: Bearer ")])
        .output()
        .expect("run the openai client");
    assert!(out.status.success(), "chat_check.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("its JSON");
    eprintln!("openai {}, transformers {}: {got}", got["openai_version"], got["transformers_version"]);

    // The prompt is transformers' rendering, tokenized as transformers does
    // (no BOS added: the template writes what it wants).
    assert_eq!(want["prompt_token_ids"], got["reference_ids"], "generate --chat's prompt ids");
    let ids = want["prompt_token_ids"].as_array().expect("ids").len() as u64;
    assert_eq!(got["usage"]["prompt_tokens"].as_u64(), Some(ids));
    assert_eq!(got["text"], want_text.as_str(), "non-streamed chat");
    assert_eq!(got["role"], "assistant");
    assert_eq!(got["finish_reason"], "length");
    assert_eq!(got["usage"]["completion_tokens"], TOKENS);
    assert_eq!(got["stream_text"], want_text.as_str(), "streamed chat");
    assert!(got["stream_chunks"].as_u64() > Some(1), "the stream came in one piece: {got}");
    assert_eq!(got["stream_roles"], serde_json::json!(["assistant"]), "the role comes once, first");
    assert_eq!(got["stream_finish_reason"], "length");
    assert_eq!(got["stream_usage"], got["usage"]);
    // No limit: to the end of the model's positions.
    let positions = common::read_json(&dir.path().join("config.json"))["max_position_embeddings"]
        .as_u64()
        .expect("positions");
    assert_eq!(got["unlimited_finish_reason"], "length", "{got}");
    // Every position holds a token fed to the model; the last token is sampled
    // from the last position's logits and never fed back.
    assert_eq!(got["unlimited_usage"]["total_tokens"].as_u64(), Some(positions + 1), "{got}");
    assert_eq!(got["image_part"]["status"], 400, "{got}");

    // gRPC: query --chat, rendered by the coordinator.
    let q = run_json(&[&["query", "--endpoint", &c.endpoint][..], &chat_args].concat()).remove(0);
    assert_eq!(q["prompt_token_ids"], want["prompt_token_ids"]);
    assert_eq!(q["token_ids"], want["token_ids"]);

    // curl-style raw HTTP.
    let req = format!(
        r#"{{"model":"{name}","messages":{CHAT},"max_tokens":{TOKENS},"temperature":0,"ignore_eos":true}}"#
    );
    let (code, body) = http(&base, "POST", "/v1/chat/completions", Some(&req), &[&auth]);
    assert_eq!(code, 200, "{body}");
    let v = json_body(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want_text.as_str());
    // Chat log-probabilities as OpenAI defines them: one entry per token, its
    // text and bytes, the greedy token first among its alternatives.
    let req = format!(
        r#"{{"model":"{name}","messages":{CHAT},"max_tokens":5,"temperature":0,"logprobs":true,"top_logprobs":2}}"#
    );
    let (code, body) = http(&base, "POST", "/v1/chat/completions", Some(&req), &[&auth]);
    assert_eq!(code, 200, "{body}");
    let v = json_body(&body);
    let content = v["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content");
    assert_eq!(content.len(), 5, "{v}");
    let mut text = String::new();
    for t in content {
        let token = t["token"].as_str().expect("token");
        text.push_str(token);
        assert_eq!(t["bytes"], serde_json::json!(token.as_bytes()), "{t}");
        assert!(t["logprob"].as_f64().is_some_and(|l| l <= 0.0), "{t}");
        assert_eq!(t["top_logprobs"].as_array().map(Vec::len), Some(2), "{t}");
        assert_eq!(t["top_logprobs"][0]["logprob"], t["logprob"], "{t}");
    }
    assert!(want_text.starts_with(&text), "{text:?} does not begin {want_text:?}");
    let bad = req.replace(r#""logprobs":true"#, r#""logprobs":false"#);
    assert_eq!(http(&base, "POST", "/v1/chat/completions", Some(&bad), &[&auth]).0, 400);
}

#[test]
fn chat_without_a_template_is_a_clear_error_everywhere() {
    let stories = stories();
    let (code, err) = fails(&["generate", "--model", &stories, "--chat", "hello"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no chat template") && err.lines().count() == 1, "{err}");
    let mut c = Cluster::up(&["--model", &stories, "--workers", "1", "--http-listen", "127.0.0.1:0"]);
    let base = c.http();
    let auth = c.http_auth();
    let req = r#"{"model":"stories260K","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let (code, body) = http(&base, "POST", "/v1/chat/completions", Some(req), &[&auth]);
    assert_eq!(code, 400, "{body}");
    let v = json_body(&body);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("no chat template")), "{body}");
    let (code, err) = fails(&["query", "--endpoint", &c.endpoint, "--chat", "hi"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no chat template"), "{err}");
    // A malformed --chat is the CLI's error, before any request.
    let (code, err) = fails(&["query", "--endpoint", &c.endpoint, "--chat", "[{\"role\":1}]"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--chat"), "{err}");
}

/// A template that would take 2^44 bytes fails its own request with one line;
/// the coordinator's renderer starts again and the next chat is served.
#[test]
fn a_chat_template_bomb_fails_its_request_not_the_coordinator() {
    let dir = common::model_dir::copy_model();
    std::fs::write(dir.path().join("chat_template.jinja"), crate::checkpoints::DOUBLING_TEMPLATE)
        .expect("template");
    let path = dir.path().to_str().expect("utf-8").to_string();
    let name = dir.path().file_name().expect("name").to_str().expect("utf-8").to_string();
    let mut c = Cluster::up(&["--model", &path, "--workers", "1", "--http-listen", "127.0.0.1:0"]);
    let base = c.http();
    let auth = c.http_auth();
    let chat = |content: &str| {
        let req = format!(
            r#"{{"model":"{name}","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":4,"temperature":0}}"#
        );
        http(&base, "POST", "/v1/chat/completions", Some(&req), &[&auth])
    };
    for round in 0..3 {
        let start = std::time::Instant::now();
        let (code, body) = chat("bomb");
        assert_eq!(code, 400, "round {round}: {body}");
        let message = json_body(&body)["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains("chat template") && message.contains("MiB of memory"), "{body}");
        println!("bomb refused in {:?}: {message}", start.elapsed());
        let (code, body) = chat("hello");
        assert_eq!(code, 200, "round {round}, after the bomb: {body}");
        assert_eq!(json_body(&body)["usage"]["completion_tokens"], 4, "{body}");
    }
    let (code, err) = fails(&["query", "--endpoint", &c.endpoint, "--chat", "bomb"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("MiB of memory"), "{err}");
}

/// `/metrics` parsed by prometheus_client: (families by type, samples).
fn scrape(url: &str) -> Value {
    let out = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/metrics_check.py"))
        .arg(url)
        .output()
        .expect("run the metrics parser");
    assert!(out.status.success(), "{url} does not parse: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("its JSON")
}

/// The sum of the samples named `name` whose labels include `labels`.
fn sample(m: &Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    m["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
        .map(|s| s[2].as_f64().expect("value"))
        .sum()
}

#[test]
fn metrics_parse_and_move_with_requests() {
    let mut c = Cluster::up(&["--model", &stories(), "--workers", "2", "--http-listen", "127.0.0.1:0"]);
    let base = c.http();
    let auth = c.http_auth();
    let url = format!("{base}/metrics");
    let before = scrape(&url);
    assert!(before["content_type"].as_str().is_some_and(|t| t.starts_with("text/plain")), "{before}");
    let model = [("model", "stories260K")];
    assert_eq!(sample(&before, "zeroshard_ready", &model), 1.0, "{before}");
    assert!(sample(&before, "zeroshard_epoch", &model) >= 1.0);
    assert_eq!(sample(&before, "zeroshard_workers", &model), 2.0);
    for (name, kind) in [
        ("zeroshard_worker_steps", "counter"),
        ("zeroshard_worker_gather_bytes_per_second", "gauge"),
        ("zeroshard_queue_length", "gauge"),
        ("zeroshard_workers_lost", "counter"),
    ] {
        assert_eq!(before["families"][name], kind, "{name}: {before}");
    }

    // Three requests through both fronts, one of them streamed, and one refused.
    let req = format!(
        r#"{{"model":"stories260K","prompt":"{PROMPT}","max_tokens":{TOKENS},"temperature":0,"ignore_eos":true}}"#
    );
    assert_eq!(http(&base, "POST", "/v1/completions", Some(&req), &[&auth]).0, 200);
    let sreq = req.replace("\"temperature\":0", "\"temperature\":0,\"stream\":true");
    assert_eq!(http(&base, "POST", "/v1/completions", Some(&sreq), &[&auth]).0, 200);
    let n = TOKENS.to_string();
    run_json(&[
        "query",
        "--endpoint",
        &c.endpoint,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        &n,
        "--ignore-eos",
        "--json",
    ]);
    let bad = r#"{"model":"stories260K","prompt":"x","max_tokens":1,"temperature":-1}"#;
    assert_eq!(http(&base, "POST", "/v1/completions", Some(bad), &[&auth]).0, 400);
    // Refused before it is a request: counted too, by its status.
    let unknown = r#"{"model":"no-such-model","prompt":"x","max_tokens":1}"#;
    assert_eq!(http(&base, "POST", "/v1/completions", Some(unknown), &[&auth]).0, 404);
    assert_eq!(http(&base, "POST", "/v1/completions", Some("{not json"), &[&auth]).0, 400);

    let after = scrape(&url);
    eprintln!("metrics after 4 requests: {} samples", after["samples"].as_array().map_or(0, Vec::len));
    let moved =
        |name: &str, labels: &[(&str, &str)]| sample(&after, name, labels) - sample(&before, name, labels);
    let ok = [("model", "stories260K"), ("outcome", "ok")];
    assert_eq!(moved("zeroshard_requests_total", &ok), 3.0, "{after}");
    assert_eq!(moved("zeroshard_requests_total", &[("outcome", "invalid")]), 3.0, "{after}");
    assert_eq!(moved("zeroshard_generated_tokens_total", &model), 3.0 * f64::from(TOKENS));
    assert_eq!(moved("zeroshard_time_to_first_token_seconds_count", &model), 3.0);
    assert_eq!(moved("zeroshard_inter_token_latency_seconds_count", &model), 3.0 * f64::from(TOKENS - 1));
    assert_eq!(moved("zeroshard_request_duration_seconds_count", &model), 4.0);
    assert!(moved("zeroshard_worker_steps_total", &model) >= f64::from(TOKENS), "{after}");
    assert!(sample(&after, "zeroshard_worker_gather_bytes_per_second", &model) > 0.0, "{after}");
    assert_eq!(after["families"]["zeroshard_time_to_first_token_seconds"], "histogram");
    let status = |code: &'static str| moved("zeroshard_http_responses_total", &[("status", code)]);
    assert_eq!((status("400"), status("404")), (2.0, 1.0), "{after}");
    assert!(status("200") >= 2.0, "{after}");
}

#[test]
fn a_worker_serves_its_own_metrics() {
    let port = common::etcd::free_port();
    let listen = format!("127.0.0.1:{port}");
    let fleet = common::fleet::Fleet::start_each(
        common::etcd::Etcd::start(),
        model("stories260K"),
        &["--max-active-sequences", "1"],
        &[&["--metrics-listen", &listen], &[]],
    );
    let url = format!("http://{listen}/metrics");
    // Two requests at once on workers that take one sequence each: one runs
    // on the worker with metrics, and gathers from the other.
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let endpoint = fleet.endpoint.clone();
            std::thread::spawn(move || {
                run_json(&[
                    "query",
                    "--endpoint",
                    &endpoint,
                    "--prompt",
                    PROMPT,
                    "--max-new-tokens",
                    "200",
                    "--ignore-eos",
                    "--json",
                ])
            })
        })
        .collect();
    for r in runs {
        r.join().expect("query thread");
    }
    let m = scrape(&url);
    assert_eq!(m["families"]["zeroshard_step_seconds"], "histogram", "{m}");
    assert!(sample(&m, "zeroshard_step_seconds_count", &[]) >= 1.0, "{m}");
    assert!(sample(&m, "zeroshard_gather_bytes_total", &[]) > 0.0, "{m}");
    assert!(sample(&m, "zeroshard_step_batch_size_count", &[]) >= 1.0, "{m}");
}

/// A stand-in OTLP/HTTP collector: answers every POST with an empty
/// protobuf `ExportTraceServiceResponse` and keeps the request bodies.
fn collector() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = bodies.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(conn);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    keep.lock().expect("bodies").push(body);
                    let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                    if r.get_mut().write_all(ok.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, bodies)
}

#[test]
fn spans_reach_an_otlp_collector_from_the_coordinator_and_the_workers() {
    let (url, bodies) = collector();
    let mut cmd = common::bin();
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &url);
    let c = Cluster::up_with(cmd, &["--model", &stories(), "--workers", "2"]);
    let n = TOKENS.to_string();
    run_json(&["query", "--endpoint", &c.endpoint, "--prompt", PROMPT, "--max-new-tokens", &n, "--json"]);
    // Stopping flushes what is still batched.
    assert!(c.stop().success());
    let bodies = bodies.lock().expect("bodies");
    let has = |needle: &[u8]| bodies.iter().any(|b| b.windows(needle.len()).any(|w| w == needle));
    assert!(!bodies.is_empty(), "the collector got nothing");
    assert!(has(b"zeroshard-coordinator") && has(b"request"), "no request span from the coordinator");
    assert!(has(b"zeroshard-worker") && has(b"step"), "no step span from a worker");
    eprintln!("OTLP: {} exports, {} bytes", bodies.len(), bodies.iter().map(Vec::len).sum::<usize>());
}
