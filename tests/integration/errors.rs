//! Bad input through the real binary: each case exits non-zero with one line
//! naming the file, key or value at fault.

use std::time::{Duration, Instant};

use crate::common::model_dir::*;
use crate::common::*;
use serde_json::Value;

#[test]
fn missing_model_folder_and_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let done = expect_error(dir.path(), &[], &["config.json"]);
    assert_eq!(done.stderr.matches("os error 2").count(), 1, "the OS error once: {}", done.stderr);
    let dir = copy_model();
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    expect_error(dir.path(), &[], &["model.safetensors"]);
}

#[test]
fn truncated_safetensors() {
    let dir = copy_model();
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).expect("truncate");
    expect_error(dir.path(), &[], &["model.safetensors", "beyond", "truncated"]);
}

#[test]
fn header_naming_a_tensor_beyond_the_file() {
    let dir = copy_model();
    let p = dir.path().join("model.safetensors");
    let (mut header, data) = read_st(&p);
    let end = data.len();
    header.insert(
        "extra.weight".into(),
        serde_json::json!({"dtype": "F32", "shape": [16], "data_offsets": [end, end + 64]}),
    );
    write_st(&p, &header, &data);
    expect_error(dir.path(), &[], &["model.safetensors", "`extra.weight`", "beyond"]);
}

#[test]
fn wrong_shape() {
    let dir = copy_model();
    let p = dir.path().join("model.safetensors");
    let (mut header, data) = read_st(&p);
    let name = "model.layers.0.mlp.gate_proj.weight";
    header.get_mut(name).expect("tensor")["shape"] = serde_json::json!([64, 172]);
    write_st(&p, &header, &data);
    expect_error(dir.path(), &[], &[name, "[64, 172]", "[172, 64]"]);
}

#[test]
fn unknown_dtype() {
    let dir = copy_model();
    let p = dir.path().join("model.safetensors");
    let (mut header, data) = read_st(&p);
    // Same byte size: F32 [64] → I32 [64].
    header.get_mut("model.norm.weight").expect("tensor")["dtype"] = Value::from("I32");
    write_st(&p, &header, &data);
    expect_error(dir.path(), &[], &["`model.norm.weight`", "I32"]);
}

#[test]
fn unknown_architecture_and_unsupported_values() {
    let dir = copy_model();
    let cfg_path = dir.path().join("config.json");
    let original = read_json(&cfg_path);
    let cases = [
        ("architectures", serde_json::json!(["FalconForCausalLM"]), "FalconForCausalLM"),
        ("hidden_act", serde_json::json!("relu"), "relu"),
        ("rope_parameters", serde_json::json!({"rope_type": "yarn", "factor": 2.0}), "yarn"),
    ];
    for (key, value, needle) in cases {
        let mut cfg = original.clone();
        cfg[key] = value;
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).expect("json")).expect("write");
        expect_error(dir.path(), &[], &["config.json", key, needle]);
    }
}

#[test]
fn prompt_longer_than_max_positions() {
    let dir = copy_model();
    let cfg_path = dir.path().join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["max_position_embeddings"] = Value::from(8);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).expect("json")).expect("write");
    let ids = ids_arg(&(1..=9).collect::<Vec<u32>>());
    expect_error(dir.path(), &["--prompt-ids", &ids], &["9 tokens", "max_position_embeddings 8"]);
    // Exactly 8 fits, and generation stops at the last position.
    let ids = ids_arg(&(1..=7).collect::<Vec<u32>>());
    let out = &run_json(&[
        "generate",
        "--model",
        dir.path().to_str().expect("p"),
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        "10",
        "--ignore-eos",
        "--json",
    ])[0];
    assert_eq!(out["finish_reason"], "length");
    assert_eq!(
        ids_of(&out["token_ids"]).len(),
        2,
        "positions 7 and 8 are the last two this model can produce"
    );
}

#[test]
fn prompt_ids_out_of_vocabulary_and_malformed() {
    let dir = model("stories260K");
    expect_error(&dir, &["--prompt-ids", "1,2,512"], &["512", "index 2", "vocab_size 512"]);
    expect_error(&dir, &["--prompt-ids", "1,x"], &["--prompt-ids", "\"x\""]);
}

#[test]
fn a_gguf_folder_says_it_is_gguf() {
    let dir = model("stories260K-gguf");
    let done = expect_error(
        &dir,
        &[],
        &[
            "holds a GGUF file (stories260K.gguf)",
            "zeroshard reads Hugging Face folders (config.json + *.safetensors)",
        ],
    );
    assert!(!done.stderr.contains("os error"), "{}", done.stderr);
}

#[test]
fn an_empty_prompt_without_bos_is_refused_after_tokenization() {
    // GPT-2's tokenizer adds no BOS: "" is no token at all.
    expect_error(&model("tiny-random-gpt2"), &["--prompt", ""], &["the prompt is empty after tokenization"]);
}

#[test]
fn negative_sampling_values_reach_their_check() {
    let dir = model("stories260K");
    // `--flag -1`, not only `--flag=-1`: clap must not take -1 for a flag.
    // Named by the flag the user typed, not the field behind it.
    expect_error(&dir, &["--temperature", "-1"], &["--temperature must be finite and >= 0, got -1"]);
    expect_error(&dir, &["--top-p", "-0.5"], &["--top-p must be in (0, 1], got -0.5"]);
    expect_error(
        &dir,
        &["--repetition-penalty", "-2"],
        &["--repetition-penalty must be finite and > 0, got -2"],
    );
    let err = run_err(&["generate", "--model", dir.to_str().expect("p"), "--prompt", "Hi", "--top-k", "-1"]);
    assert!(err.contains("invalid value '-1' for '--top-k"), "{err}");
}

/// The help text of one option: from its line to the next option's.
fn option_help(help: &str, option: &str) -> String {
    let start = help.find(&format!("  {option} ")).unwrap_or_else(|| panic!("{option} in help: {help}"));
    let rest = &help[start + option.len() + 2..];
    let end = rest.find("\n      --").unwrap_or(rest.len());
    rest[..end].to_string()
}

#[test]
fn query_takes_one_prompt_and_its_help_says_so() {
    let help = String::from_utf8(run(&["query", "--help"]).stdout).expect("utf-8");
    for option in ["--prompt", "--prompt-ids"] {
        let text = option_help(&help, option);
        assert!(text.contains("One per request"), "{option}: {text}");
        assert!(!text.contains("several") && !text.contains("Repeat"), "{option}: {text}");
    }
    let err = run_err(&["query", "--endpoint", "grpc://127.0.0.1:1", "--prompt", "a", "--prompt", "b"]);
    assert!(err.contains("'--prompt <PROMPT>' cannot be used multiple times"), "{err}");
    // `generate` still takes several.
    let help = String::from_utf8(run(&["generate", "--help"]).stdout).expect("utf-8");
    assert!(option_help(&help, "--prompt").contains("Repeat it to decode several prompts"), "{help}");
}

/// The last line of `stderr`, which must be the one `error: …` line.
fn error_line(stderr: &str) -> &str {
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    last
}

#[test]
fn an_endpoint_without_a_scheme_is_refused_at_once() {
    for command in ["query", "status"] {
        let start = Instant::now();
        let mut args = vec![command, "--endpoint", "127.0.0.1:50051"];
        if command == "query" {
            args.extend(["--prompt", "Hi"]);
        }
        let err = run_err(&args);
        assert!(start.elapsed() < Duration::from_secs(5), "{command} took {:?}", start.elapsed());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let line = error_line(&err);
        assert!(line.contains("no scheme"), "{line}");
        assert!(
            line.contains("grpcs://127.0.0.1:50051") && line.contains("grpc://127.0.0.1:50051"),
            "{line}"
        );
    }
}

#[test]
fn a_closed_port_is_connection_refused_within_a_second_or_two() {
    let endpoint = format!("grpc://127.0.0.1:{}", crate::common::etcd::free_port());
    let start = Instant::now();
    let err = run_err(&["query", "--endpoint", &endpoint, "--prompt", "Hi", "--retry-for-secs", "30"]);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "retried a closed port for {took:?}: {err}");
    let line = error_line(&err);
    assert!(line.contains(&format!("cannot reach {endpoint}: connection refused")), "{line}");
    assert!(line.contains("gave up after 3 tries"), "{line}");
    assert!(!line.contains("transport error"), "{line}");
    // `status` does not retry at all.
    let line = run_err(&["status", "--endpoint", &endpoint]);
    assert!(error_line(&line).contains("connection refused"), "{line}");
}

#[test]
fn an_unknown_host_is_named() {
    let err = run_err(&[
        "query",
        "--endpoint",
        "grpc://no-such-host.invalid:50051",
        "--prompt",
        "Hi",
        "--retry-for-secs",
        "30",
    ]);
    let line = error_line(&err);
    assert!(line.contains("no such host no-such-host.invalid"), "{line}");
}

#[test]
fn logs_to_a_pipe_carry_no_colour() {
    // A query retrying a closed port logs a warning per try, here to a pipe.
    let endpoint = format!("grpc://127.0.0.1:{}", crate::common::etcd::free_port());
    let out = bin()
        .args(["query", "--endpoint", &endpoint, "--prompt", "Hi"])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .output()
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARN") && stderr.contains("retrying"), "{stderr}");
    assert!(!stderr.contains("\x1b["), "ANSI escapes in piped logs: {stderr:?}");
}
