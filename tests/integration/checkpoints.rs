//! Hostile checkpoints through the real binary (issue 12): every number in a
//! model folder is checked before anything is sized by it, weights must be
//! finite, tensors may not share bytes, and only regular files inside the
//! folder are read. Each case ends with exit code 1 and one `error: ` line.
use crate::common;

use std::path::Path;
use std::time::Duration;

use crate::common::model_dir::*;
use crate::common::*;
use serde_json::{json, Value};

/// Peak RSS a refused config may reach: the binary's own footprint plus a
/// little (a billion layer specs would be tens of GB).
const MAX_REFUSAL_RSS_KB: i64 = 64 << 10;

#[test]
fn a_billion_layers_is_refused_in_a_few_megabytes() {
    let dir = copy_model();
    for (layers, needle) in
        [(1_000_000_000u64, "1000000000 is over the limit of 4096"), (100_000, "100000 is over")]
    {
        patch_json(dir.path(), "config.json", "num_hidden_layers", json!(layers));
        let done = expect_error(dir.path(), &[], &["config.json", "`num_hidden_layers`", needle]);
        println!(
            "num_hidden_layers {layers}: refused with peak RSS {} kB: {}",
            done.max_rss_kb,
            done.stderr.trim()
        );
        assert!(done.max_rss_kb < MAX_REFUSAL_RSS_KB, "peak RSS {} kB", done.max_rss_kb);
    }
    // Within the bound, the count is checked against the layers the checkpoint holds.
    patch_json(dir.path(), "config.json", "num_hidden_layers", json!(4000));
    let done = expect_error(
        dir.path(),
        &[],
        &["`num_hidden_layers`", "4000 layers, but the checkpoint holds 5 layers (0..=4)"],
    );
    println!("num_hidden_layers 4000: peak RSS {} kB", done.max_rss_kb);
    assert!(done.max_rss_kb < MAX_REFUSAL_RSS_KB, "peak RSS {} kB", done.max_rss_kb);
}

#[test]
fn out_of_range_config_values_are_refused() {
    let dir = copy_model();
    let original = read_json(&dir.path().join("config.json"));
    let cases: [(&str, Value, &str); 12] = [
        ("rms_norm_eps", json!(-1), "-1 must be a finite number in (0, 1]"),
        ("rms_norm_eps", json!(0), "must be a finite number in (0, 1]"),
        ("eos_token_id", json!(1_000_000_000), "1000000000 is not below the vocabulary size 512"),
        ("eos_token_id", json!(1e9), "is not a token id"),
        ("bos_token_id", json!(512), "512 is not below the vocabulary size 512"),
        ("pad_token_id", json!(4096), "4096 is not below"),
        ("vocab_size", json!(1u64 << 40), "is over the limit"),
        ("hidden_size", json!(1u64 << 40), "is over the limit"),
        ("rope_theta", json!(-10000.0), "must be a finite number in [1, 1e9]"),
        // Every rotary frequency would overflow: NaN logits, once sampled as token 0.
        ("rope_theta", json!(1e-300), "must be a finite number in [1, 1e9]"),
        ("rope_theta", json!(1e-60), "must be a finite number in [1, 1e9]"),
        // A scaling with no type was silently ignored.
        ("rope_scaling", json!({"factor": 2.0}), "no \"rope_type\""),
    ];
    for (key, value, needle) in cases {
        std::fs::write(dir.path().join("config.json"), original.to_string()).expect("reset");
        if key.starts_with("rope_") {
            patch_json(dir.path(), "config.json", "rope_parameters", Value::Null);
        }
        patch_json(dir.path(), "config.json", key, value);
        expect_error(dir.path(), &[], &["config.json", &format!("`{key}`"), needle]);
    }
    // The same ids from generation_config.json.
    std::fs::write(dir.path().join("config.json"), original.to_string()).expect("reset");
    patch_json(dir.path(), "generation_config.json", "eos_token_id", json!([2, 1_000_000_000]));
    expect_error(dir.path(), &[], &["generation_config.json", "`eos_token_id`", "1000000000 is not below"]);
}

#[test]
fn layer_norm_epsilon_is_refused_for_gpt2_and_bloom() {
    for fixture in ["fixtures/gpt2", "fixtures/bloom"] {
        let dir = copy_of(fixture);
        patch_json(dir.path(), "config.json", "layer_norm_epsilon", json!(-1));
        expect_error(
            dir.path(),
            &["--prompt-ids", "1,2,3"],
            &["config.json", "`layer_norm_epsilon`", "-1 must be a finite number in (0, 1]"],
        );
    }
}

/// Overwrites element `index` of F32 tensor `name` in `dir/model.safetensors`.
fn poke_f32(dir: &Path, name: &str, index: usize, value: f32) {
    let p = dir.join("model.safetensors");
    let (header, mut data) = read_st(&p);
    let start = header[name]["data_offsets"][0].as_u64().expect("offset") as usize + 4 * index;
    data[start..start + 4].copy_from_slice(&value.to_le_bytes());
    write_st(&p, &header, &data);
}

#[test]
fn nan_and_inf_weights_are_refused_naming_the_tensor() {
    for (value, needle) in [
        (f32::NAN, "element 3 is NaN"),
        (f32::NEG_INFINITY, "element 3 is -inf"),
        (1e6, "element 3 is 1e6 in F32, beyond f16's range"),
    ] {
        let dir = copy_model();
        poke_f32(dir.path(), "model.layers.1.mlp.up_proj.weight", 3, value);
        expect_error(dir.path(), &[], &["model.safetensors", "`model.layers.1.mlp.up_proj.weight`", needle]);
    }
    // An f16 checkpoint: exponent bits all ones.
    let dir = copy_of("stories260K-f16");
    let p = dir.path().join("model.safetensors");
    let (header, mut data) = read_st(&p);
    let name = "model.norm.weight";
    let start = header[name]["data_offsets"][0].as_u64().expect("offset") as usize + 2 * 7;
    data[start..start + 2].copy_from_slice(&0x7c01u16.to_le_bytes());
    write_st(&p, &header, &data);
    expect_error(dir.path(), &[], &["`model.norm.weight`", "element 7 is NaN"]);
}

#[test]
fn overlapping_tensors_are_refused() {
    let dir = copy_model();
    let p = dir.path().join("model.safetensors");
    let (mut header, data) = read_st(&p);
    // Two [64] F32 norms; the second is made to alias the first one's bytes.
    let first = header["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
    header.get_mut("model.layers.0.post_attention_layernorm.weight").expect("tensor")["data_offsets"] = first;
    write_st(&p, &header, &data);
    expect_error(
        dir.path(),
        &[],
        &["model.safetensors", "`model.layers.0.input_layernorm.weight` and `model.layers.0.post_attention_layernorm.weight` overlap"],
    );
}

#[test]
fn index_entries_outside_the_model_folder_are_refused() {
    let outside = tempfile::tempdir().expect("tmp");
    for (entry, needle) in [
        ("../../../../etc/passwd", "\"../../../../etc/passwd\", which is not a file inside the model folder"),
        ("/etc/passwd", "\"/etc/passwd\", which is not a file inside the model folder"),
        ("escape.safetensors", "outside the model folder"),
    ] {
        let dir = copy_of("fixtures/llama-sharded-bf16");
        let index = dir.path().join("model.safetensors.index.json");
        let mut v = read_json(&index);
        v["weight_map"]["model.norm.weight"] = Value::from(entry);
        std::fs::write(&index, v.to_string()).expect("write");
        // A symlink to a copy of a real shard outside the folder.
        let shard = outside.path().join("shard.safetensors");
        std::fs::copy(dir.path().join("model-00003-of-00003.safetensors"), &shard).expect("copy");
        std::os::unix::fs::symlink(&shard, dir.path().join("escape.safetensors")).expect("symlink");
        expect_error(dir.path(), &["--prompt-ids", "1,2,3"], &[needle]);
    }
}

#[test]
fn only_regular_files_are_opened() {
    for file in ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"] {
        let dir = copy_model();
        make_fifo(&dir.path().join(file));
        // Reading a FIFO would block forever: expect_error's deadline catches that.
        expect_error(dir.path(), &[], &[file, "is a FIFO, not a regular file"]);
    }
    let dir = copy_model();
    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    std::fs::create_dir(dir.path().join("config.json")).expect("mkdir");
    expect_error(dir.path(), &[], &["config.json", "is a directory, not a regular file"]);
}

/// `up --workers 1` on `dir`, bounded in time and memory.
fn up_on(dir: &Path) -> Finished {
    let mut cmd = bin();
    cmd.args(["up", "--listen", "127.0.0.1:0", "--model", dir.to_str().expect("path"), "--workers", "1"]);
    run_bounded(cmd, Duration::from_secs(60), 4 << 30)
}

#[test]
fn up_refuses_the_same_way() {
    let dir = copy_model();
    patch_json(dir.path(), "config.json", "num_hidden_layers", json!(1_000_000_000u64));
    let done = up_on(dir.path());
    println!("up, num_hidden_layers 1e9: peak RSS {} kB: {}", done.max_rss_kb, done.stderr.trim());
    expect_one_line(&done, &["config.json", "`num_hidden_layers`", "1000000000 is over the limit of 4096"]);

    // A NaN weight: the coordinator's digest pass reads through the same check
    // (after `up` announced its workers, so the error is the last line).
    let dir = copy_model();
    poke_f32(dir.path(), "model.layers.2.self_attn.q_proj.weight", 5, f32::NAN);
    let done = up_on(dir.path());
    assert_eq!(done.code, Some(1), "{}", done.stderr);
    let last = done.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains("`model.layers.2.self_attn.q_proj.weight`: element 5 is NaN"),
        "{}",
        done.stderr
    );

    // A FIFO tokenizer: refused by the coordinator, not skipped (and never opened blocking).
    let dir = copy_model();
    make_fifo(&dir.path().join("tokenizer.json"));
    let done = up_on(dir.path());
    expect_one_line(&done, &["tokenizer.json", "is a FIFO, not a regular file"]);
}

/// GPT-2 and BLOOM checkpoints saved from the base model (as
/// `openai-community/gpt2` and `bigscience/bloom-560m` are on the Hub) name
/// their tensors without `transformer.`: they load as transformers loads them,
/// with the references' exact tokens, alone and through a cluster.
#[test]
fn base_model_tensor_names_load_for_gpt2_and_bloom() {
    for name in ["gpt2", "bloom"] {
        let dir = copy_of(&format!("fixtures/{name}"));
        let st = dir.path().join("model.safetensors");
        let (header, data) = read_st(&st);
        let renamed: serde_json::Map<String, Value> = header
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("transformer.").map(str::to_string).unwrap_or(k), v))
            .collect();
        assert!(
            renamed.contains_key("h.0.input_layernorm.weight") || renamed.contains_key("h.0.ln_1.weight")
        );
        write_st(&st, &renamed, &data);
        let refs = read_json(&shared().join(format!("refs/arch/{name}.json")));
        let path = dir.path().to_str().expect("utf-8").to_string();
        let c = common::cluster::Cluster::up(&[
            "--model",
            &path,
            "--workers",
            "2",
            "--persistence-threshold-bytes",
            "256",
        ]);
        for p in refs["prompts"].as_array().expect("prompts") {
            let want = ids_of(&p["new_token_ids"]);
            let ids = ids_arg(&ids_of(&p["input_ids"]));
            let n = want.len().to_string();
            let args = ["--prompt-ids", &ids, "--ignore-eos", "--max-new-tokens", &n, "--json"];
            let alone = run_json(&[&["generate", "--model", &path][..], &args].concat()).remove(0);
            assert_eq!(ids_of(&alone["token_ids"]), want, "{name}/{} alone", p["name"]);
            let cluster = run_json(&[&["query", "--endpoint", &c.endpoint][..], &args].concat()).remove(0);
            assert_eq!(ids_of(&cluster["token_ids"]), want, "{name}/{} through up --workers 2", p["name"]);
        }
    }
}

/// Peak RSS a refused model-folder bomb may reach (issue 31: under ~100 MB).
const MAX_BOMB_RSS_KB: i64 = 100 << 10;

/// `len` bytes at `dir/name`, sparse: the size is what a bomb claims, the disk
/// and the test pay nothing for it.
fn sparse(dir: &Path, name: &str, len: u64) {
    let f = std::fs::File::create(dir.join(name)).expect("create");
    f.set_len(len).expect("set_len");
}

#[test]
fn model_folder_bombs_are_refused_in_one_line_under_100_mb() {
    let mut figures = Vec::new();
    let mut check = |what: &str, dir: &Path, extra: &[&str], needles: &[&str]| {
        let done = expect_error(dir, extra, needles);
        figures.push(format!("{what}: peak RSS {} kB: {}", done.max_rss_kb, done.stderr.trim()));
        assert!(done.max_rss_kb < MAX_BOMB_RSS_KB, "{what}: peak RSS {} kB", done.max_rss_kb);
    };
    // Files past their kind's limit are refused before they are read.
    for (name, len, limit, extra) in [
        ("config.json", 64 << 20, "1048576", &[][..]),
        ("config.json", 250 << 20, "1048576", &[]),
        ("tokenizer.json", 200 << 20, "67108864", &[]),
        ("tokenizer_config.json", 64 << 20, "4194304", &["--chat", "hi"]),
    ] {
        let dir = copy_model();
        sparse(dir.path(), name, len);
        check(&format!("{} MB {name}", len >> 20), dir.path(), extra, &[name, &format!("the {limit} bytes")]);
    }
    // A real (not sparse) config just past its limit, of the many small
    // values that cost a JSON tree the most.
    let dir = copy_model();
    let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
    let zeros = format!("{{\"padding\":[{}0],", "0,".repeat(600_000));
    std::fs::write(dir.path().join("config.json"), config.replacen('{', &zeros, 1)).expect("write");
    check("1.2 MB config.json of zeros", dir.path(), &[], &["config.json", "the 1048576 bytes"]);
    // An index past its limit (the single file gone, so the index is read).
    let dir = copy_model();
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    sparse(dir.path(), "model.safetensors.index.json", 40 << 20);
    check("40 MB index", dir.path(), &[], &["model.safetensors.index.json", "the 33554432 bytes"]);
    // A 92 MB safetensors header: refused on its length, before it is parsed.
    let dir = copy_model();
    let path = dir.path().join("model.safetensors");
    let mut f = std::fs::File::create(&path).expect("create");
    std::io::Write::write_all(&mut f, &(92_000_000u64).to_le_bytes()).expect("write");
    f.set_len(8 + 92_000_000 + 4096).expect("set_len");
    check("92 MB safetensors header", dir.path(), &[], &["model.safetensors", "-byte limit"]);
    // A header within the byte limit declaring more empty tensors than allowed.
    let dir = copy_model();
    {
        use std::io::Write;
        let entry = |i: usize| format!("\"t{i}\":{{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}");
        let n = 270_000;
        let len = 2 + (0..n).map(|i| entry(i).len()).sum::<usize>() + (n - 1);
        let file = std::fs::File::create(dir.path().join("model.safetensors")).expect("create");
        let mut w = std::io::BufWriter::new(file);
        w.write_all(&(len as u64).to_le_bytes()).expect("write");
        w.write_all(b"{").expect("write");
        for i in 0..n {
            w.write_all(if i == 0 { b"" } else { b"," }).expect("write");
            w.write_all(entry(i).as_bytes()).expect("write");
        }
        w.write_all(b"}").expect("write");
    }
    check("270k empty tensors", dir.path(), &[], &["model.safetensors", "more than 262144 tensors"]);
    // A chat template that doubles a string forty times (fuel: ~200
    // instructions; memory: 2^44 bytes) ends its capped renderer, not the run.
    let dir = copy_model();
    std::fs::write(dir.path().join("chat_template.jinja"), DOUBLING_TEMPLATE).expect("write");
    check("doubling chat template", dir.path(), &["--chat", "bomb"], &["chat template", "MiB of memory"]);
    for f in figures {
        println!("{f}");
    }
}

/// A chat template that doubles a 16-byte string forty times when the first
/// message says "bomb", and renders the conversation otherwise.
pub(crate) const DOUBLING_TEMPLATE: &str = "{% if messages[0].content == 'bomb' %}\
{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}\
{% endif %}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>";
