//! The engine against Hugging Face transformers' reference outputs, through the
//! real binary: greedy tokens exact, last-position logits within 1% of scale.

use crate::common::*;

const FAMILY: &[&str] =
    &["llama-gqa-tied", "llama-rope-scaled", "llama-sharded-bf16", "llama-f16", "mistral", "qwen2"];

#[test]
fn stories260k_greedy_matches_transformers() {
    let refs = read_json(&shared().join("refs/stories260K_greedy_sample.json"));
    let cases = refs["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for model_name in ["stories260K", "stories260K-f16"] {
        let dir = model(model_name);
        for case in cases {
            let prompt = case["prompt"].as_str().expect("prompt");
            let out = &run_json(&[
                "generate",
                "--model",
                dir.to_str().expect("path"),
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--ignore-eos",
                "--max-new-tokens",
                "48",
                "--json",
            ])[0];
            let name = case["name"].as_str().unwrap_or("?");
            assert_eq!(
                ids_of(&out["prompt_token_ids"]),
                ids_of(&case["input_ids"]),
                "{model_name}/{name}: prompt ids"
            );
            assert_eq!(
                ids_of(&out["token_ids"]),
                ids_of(&case["new_token_ids"]),
                "{model_name}/{name}: tokens"
            );
            assert_eq!(out["text"], crate::common::completion_text(case), "{model_name}/{name}: text");
            assert_eq!(out["finish_reason"], "length");
        }
    }
}

/// Checks one prompt of an architecture ref file; returns the max logit error
/// relative to the reference's largest magnitude.
fn check_prompt(model_name: &str, p: &serde_json::Value) -> f32 {
    let dir = model(&format!("fixtures/{model_name}"));
    let tmp = tempfile::NamedTempFile::new().expect("tmp");
    let want = ids_of(&p["new_token_ids"]);
    let out = &run_json(&[
        "generate",
        "--model",
        dir.to_str().expect("path"),
        "--prompt-ids",
        &ids_arg(&ids_of(&p["input_ids"])),
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-new-tokens",
        &want.len().to_string(),
        "--json",
        "--logits-out",
        tmp.path().to_str().expect("path"),
    ])[0];
    let name = p["name"].as_str().unwrap_or("?");
    assert_eq!(ids_of(&out["token_ids"]), want, "{model_name}/{name}: greedy tokens");
    let got = floats_of(&read_json(tmp.path()));
    let reference = floats_of(&p["last_logits"]);
    assert_eq!(got.len(), reference.len(), "{model_name}/{name}: vocab");
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got.iter().zip(&reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 0.01 * scale, "{model_name}/{name}: logits off by {err} (scale {scale})");
    err / scale
}

#[test]
fn every_architecture_fixture_matches_transformers() {
    for name in FAMILY {
        let refs = read_json(&shared().join(format!("refs/arch/{name}.json")));
        for p in refs["prompts"].as_array().expect("prompts") {
            let rel = check_prompt(name, p);
            eprintln!("{name}/{}: tokens exact, logits err/scale {rel:.5}", p["name"]);
        }
    }
}

#[test]
fn a_batch_of_different_lengths_equals_each_prompt_alone() {
    let dir = model("fixtures/llama-gqa-tied");
    let dir = dir.to_str().expect("path");
    let prompts: Vec<Vec<u32>> =
        vec![vec![5, 9], vec![100, 200, 300, 400, 17], (3..20).collect(), (40..80).collect()];
    let mut args = vec![
        "generate",
        "--model",
        dir,
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-new-tokens",
        "16",
        "--json",
    ];
    let id_args: Vec<String> = prompts.iter().map(|p| ids_arg(p)).collect();
    for a in &id_args {
        args.extend(["--prompt-ids", a.as_str()]);
    }
    let batched = run_json(&args);
    assert_eq!(batched.len(), prompts.len());
    for (p, b) in id_args.iter().zip(&batched) {
        let alone = &run_json(&[
            "generate",
            "--model",
            dir,
            "--prompt-ids",
            p,
            "--temperature",
            "0",
            "--ignore-eos",
            "--max-new-tokens",
            "16",
            "--json",
        ])[0];
        assert_eq!(alone["token_ids"], b["token_ids"], "prompt {p}");
        assert_eq!(ids_of(&b["token_ids"]).len(), 16);
    }
}

#[test]
fn eos_off_runs_to_length_and_stop_strings_cut_the_text() {
    let dir = model("stories260K");
    let dir = dir.to_str().expect("path");
    // The reference run without --ignore-eos: the model never emits EOS (id 2) in
    // 48 tokens here, so the output is the same and ends by length.
    let out = &run_json(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "48",
        "--json",
    ])[0];
    assert_eq!(out["finish_reason"], "length");
    let full = out["text"].as_str().expect("text").to_string();
    let out = &run_json(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "48",
        "--json",
        "--stop",
        "Lily",
    ])[0];
    assert_eq!(out["finish_reason"], "stop");
    let cut = out["text"].as_str().expect("text");
    assert_eq!(cut, &full[..full.find("Lily").expect("Lily in the story")]);
}

#[test]
fn tiny_random_gpt2_generates_with_its_own_tokenizer() {
    let dir = model("tiny-random-gpt2");
    let out = &run_json(&[
        "generate",
        "--model",
        dir.to_str().expect("path"),
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ])[0];
    // Byte-level BPE, no BOS: the prompt's ids come from its tokenizer.json.
    assert_eq!(ids_of(&out["prompt_token_ids"]), vec![47, 78, 298, 578, 200, 196, 582]);
    assert_eq!(ids_of(&out["token_ids"]).len(), 8);
    assert!(!out["text"].as_str().expect("text").is_empty());
}

#[test]
fn a_position_beyond_gpt2_n_positions_is_refused() {
    let dir = model("fixtures/gpt2");
    let n_positions = read_json(&dir.join("config.json"))["n_positions"].as_u64().expect("n_positions");
    let ids = ids_arg(&vec![5u32; n_positions as usize + 1]);
    let out = run(&["generate", "--model", dir.to_str().expect("path"), "--prompt-ids", &ids]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("n_positions") && err.contains(&n_positions.to_string()), "{err}");
}
