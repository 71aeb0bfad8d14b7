//! Shared helpers of the integration tests: where the fixtures are, and how to
//! run the real `zeroshard` binary.
#![allow(dead_code)]

pub(crate) mod cluster;
pub(crate) mod etcd;
pub(crate) mod fleet;
pub(crate) mod model_dir;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The shared fixture folder: `$ZEROSHARD_SHARED`, else `../shared` beside the
/// checkout. Panics with what is missing when it is absent.
pub(crate) fn shared() -> PathBuf {
    let dir = std::env::var_os("ZEROSHARD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        dir.join("models").is_dir() && dir.join("refs").is_dir(),
        "fixtures missing: expected {0}/models and {0}/refs (set ZEROSHARD_SHARED to the shared folder)",
        dir.display()
    );
    dir
}

/// The repository (scripts, deploy files, the Python checks).
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn model(name: &str) -> PathBuf {
    let p = shared().join("models").join(name);
    assert!(p.is_dir(), "fixture model missing: {}", p.display());
    p
}

pub(crate) fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The binary, its clusters held to the gather placement unless a test names
/// another (`--placement` overrides the variable): what `auto` picks depends on
/// the machine's measured speed and load, and tests of gather's behaviour
/// (gathered bytes, fail-over between holders) must not change with it. The
/// tests of `auto` pass `--placement auto`.
///
/// Every finished sequence is audited (`--audit-fraction 1`, overridden by the
/// flag), and a cluster that `up` started checks on drop that no audit
/// failed: honest workers never fail one anywhere in the suite.
pub(crate) fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zeroshard"));
    c.env("ZEROSHARD_PLACEMENT", "gather");
    c.env("ZEROSHARD_AUDIT_FRACTION", "1");
    c
}

/// Runs the binary with `args`; returns its output.
pub(crate) fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("spawn zeroshard")
}

/// Runs the binary, requires success, parses each stdout line as JSON.
pub(crate) fn run_json(args: &[&str]) -> Vec<Value> {
    let out = run(args);
    assert!(out.status.success(), "zeroshard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .expect("utf-8 stdout")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Runs the binary, requires failure; returns stderr.
pub(crate) fn run_err(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "zeroshard {args:?} should fail, printed {stderr}");
    stderr
}

/// Sequences running on every worker, from `status --json`.
pub(crate) fn active_sequences(status: &Value) -> u64 {
    status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["active_sequences"].as_u64().unwrap_or(0))
        .sum()
}

pub(crate) fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("array of ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The text a reference case's new tokens add after its prompt's text:
/// `full_text` less the prompt. A completion is decoded in its prompt's
/// context, so it keeps the space in front of its first word; the case's
/// `new_text` is the new tokens decoded alone, which drops it ("park." where
/// the whole text has " park.").
pub(crate) fn completion_text(case: &Value) -> &str {
    let (full, prompt) =
        (case["full_text"].as_str().expect("full_text"), case["prompt"].as_str().expect("prompt"));
    full.strip_prefix(prompt).unwrap_or_else(|| panic!("{full:?} does not start with its prompt {prompt:?}"))
}

pub(crate) fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

pub(crate) fn floats_of(v: &Value) -> Vec<f32> {
    v.as_array().expect("array of floats").iter().map(|x| x.as_f64().expect("float") as f32).collect()
}

/// The argv of a greedy request that runs to `max_new` tokens whatever it
/// samples: `prompt_flag` is `--prompt` or `--prompt-ids`. The same flags serve
/// `generate`, `query` and `launch`.
pub(crate) fn greedy<'a>(prompt_flag: &'a str, prompt: &'a str, max_new: &'a str) -> [&'a str; 7] {
    [prompt_flag, prompt, "--temperature", "0", "--ignore-eos", "--max-new-tokens", max_new]
}

/// A random-weight Llama of `spec` (`bench --write-checkpoint`) in a
/// temporary folder (kept while the first value lives), and that folder.
pub(crate) fn synthetic_checkpoint(spec: &str) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m").to_str().expect("utf-8").to_string();
    let out = run(&["bench", "--synthetic", spec, "--write-checkpoint", &dir]);
    assert!(out.status.success(), "writing {spec}: {}", String::from_utf8_lossy(&out.stderr));
    (tmp, dir)
}

/// `generate`'s greedy token ids for `ids` (comma-separated), `max_new` of them.
pub(crate) fn generated_from_ids(model_dir: &str, ids: &str, max_new: &str) -> Vec<u32> {
    let mut args = vec!["generate", "--model", model_dir, "--json"];
    args.extend(greedy("--prompt-ids", ids, max_new));
    ids_of(&run_json(&args)[0]["token_ids"])
}

/// `query --json` against a cluster with `extra` flags: the one JSON answer.
pub(crate) fn query(endpoint: &str, extra: &[&str]) -> Value {
    let mut args = vec!["query", "--endpoint", endpoint, "--json"];
    args.extend_from_slice(extra);
    run_json(&args).remove(0)
}

/// Asks `endpoint` greedy and sampled requests (top-k, top-p, a repetition
/// penalty, several seeds) under `--audit-fraction 1`, then waits for every
/// one of them to be audited: all pass, none fails, nobody is banned.
pub(crate) fn assert_audits_pass(endpoint: &str) {
    let before = status(endpoint);
    let count = |s: &Value, k: &str| s[k].as_u64().unwrap_or(0);
    let mut asked = 0;
    std::thread::scope(|s| {
        let mut runs = Vec::new();
        for (i, prompt) in ["Once upon a time", "The little dog", "Lily went to the park"].iter().enumerate()
        {
            let seed = i.to_string();
            runs.push(s.spawn(move || query(endpoint, &greedy("--prompt", prompt, "40"))));
            runs.push(s.spawn(move || {
                let sampled = [
                    "--prompt",
                    prompt,
                    "--max-new-tokens",
                    "40",
                    "--temperature",
                    "0.9",
                    "--top-k",
                    "12",
                    "--top-p",
                    "0.9",
                    "--repetition-penalty",
                    "1.3",
                    "--seed",
                    &seed,
                ];
                query(endpoint, &sampled)
            }));
        }
        asked = runs.len() as u64;
        for r in runs {
            r.join().expect("query thread");
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = status(endpoint);
        let done = count(&s, "audits_passed_total") + count(&s, "audits_failed_total")
            - count(&before, "audits_passed_total")
            - count(&before, "audits_failed_total");
        if done >= asked || std::time::Instant::now() > deadline {
            assert_eq!(count(&s, "audits_failed_total"), count(&before, "audits_failed_total"), "{s}");
            assert_eq!(count(&s, "audit_bans_total"), 0, "{s}");
            assert!(done >= asked, "{done} of {asked} sequences audited within 30 s: {s}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `status --json` of a cluster.
pub(crate) fn status(endpoint: &str) -> Value {
    run_json(&["status", "--endpoint", endpoint, "--json"]).remove(0)
}
