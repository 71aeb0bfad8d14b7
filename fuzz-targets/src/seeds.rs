//! Writes the seed corpus from the real fixtures (headers and configs only,
//! never weights): `cargo test -p zeroshard-fuzz-targets -- --ignored write_seed_corpus`.
use std::path::{Path, PathBuf};

use prost::Message;
use serde_json::{json, Map, Value};
use zeroshard_proto::v1 as pb;

use crate::fixtures::shared;

fn out(target: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    d
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(out(target).join(format!("seed-{name}")), bytes).expect("write seed");
}

fn st_file(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).expect("json");
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    b
}

/// The real header of `path` with every dimension cut to at most 2, offsets
/// recomputed, zero data: the names and dtypes of a real checkpoint in a few kB.
fn shrunk(path: &Path) -> (Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).expect("read fixture");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let mut out = Map::new();
    let mut at = 0usize;
    for (name, v) in header {
        if name == "__metadata__" {
            out.insert(name, v);
            continue;
        }
        let size = if v["dtype"] == "F32" { 4 } else { 2 };
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim").min(2) as usize)
            .collect();
        let len = shape.iter().product::<usize>() * size;
        out.insert(name, json!({"dtype": v["dtype"], "shape": shape, "data_offsets": [at, at + len]}));
        at += len;
    }
    (out, vec![0x3c; at]) // 0x3c3c: a finite f16/bf16
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand when the fixtures change"]
fn write_seed_corpus() {
    let models = shared().join("models");
    let fixtures = [
        "stories260K",
        "stories260K-f16",
        "tiny-random-gpt2",
        "fixtures/gpt2",
        "fixtures/bloom",
        "fixtures/llama-f16",
        "fixtures/llama-gqa-tied",
        "fixtures/llama-rope-scaled",
        "fixtures/qwen2",
        "fixtures/mistral",
    ];
    // safetensors: shrunk real headers, and broken variants of one.
    for f in fixtures {
        let (h, d) = shrunk(&models.join(f).join("model.safetensors"));
        put("safetensors", &f.replace('/', "-"), &st_file(&h, &d));
    }
    let sharded = models.join("fixtures/llama-sharded-bf16");
    for i in 1..=3 {
        let (h, d) = shrunk(&sharded.join(format!("model-0000{i}-of-00003.safetensors")));
        put("safetensors", &format!("sharded-{i}"), &st_file(&h, &d));
    }
    let index = std::fs::read(sharded.join("model.safetensors.index.json")).expect("index");
    put("safetensors", "index", &index);
    let mut v: Value = serde_json::from_slice(&index).expect("json");
    v["weight_map"]["model.norm.weight"] = json!("../../../../etc/passwd");
    put("safetensors", "index-escape", v.to_string().as_bytes());
    let (h, d) = shrunk(&models.join("stories260K/model.safetensors"));
    let mut overlap = h.clone();
    overlap["model.norm.weight"]["data_offsets"] = h["lm_head.weight"]["data_offsets"].clone();
    overlap["model.norm.weight"]["shape"] = h["lm_head.weight"]["shape"].clone();
    put("safetensors", "overlap", &st_file(&overlap, &d));
    let mut nan = d.clone();
    nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    put("safetensors", "nan", &st_file(&h, &nan));
    put("safetensors", "truncated", &st_file(&h, &d)[..st_file(&h, &d).len() - 3]);
    put("safetensors", "header-only", &st_file(&h, &[]));
    put("safetensors", "huge-length", &[0xff; 16]);
    put("safetensors", "empty-header", &st_file(&Map::new(), &[]));
    let mut big = Map::new();
    big.insert(
        "w".into(),
        json!({"dtype": "F32", "shape": [4611686018427387904u64, 4], "data_offsets": [0, 0]}),
    );
    put("safetensors", "overflow", &st_file(&big, &[]));

    // config: every fixture's config, with and without its generation config, and hostile edits.
    for f in fixtures.iter().chain(&["fixtures/llama-sharded-bf16"]) {
        let dir = models.join(f);
        let c = std::fs::read(dir.join("config.json")).expect("config");
        put("config", &f.replace('/', "-"), &c);
        if let Ok(g) = std::fs::read(dir.join("generation_config.json")) {
            let mut both = c.clone();
            both.push(0);
            both.extend_from_slice(&g);
            put("config", &format!("{}-with-generation", f.replace('/', "-")), &both);
        }
    }
    let base: Value =
        serde_json::from_slice(&std::fs::read(models.join("stories260K/config.json")).expect("config"))
            .expect("json");
    let edits: [(&str, &str, Value); 14] = [
        ("layers-1e9", "num_hidden_layers", json!(1_000_000_000u64)),
        ("layers-float", "num_hidden_layers", json!(5.0)),
        ("eps-negative", "rms_norm_eps", json!(-1)),
        ("eos-huge", "eos_token_id", json!(1_000_000_000u64)),
        ("eos-list", "eos_token_id", json!([2, 0, 511])),
        ("pad-negative", "pad_token_id", json!(-1)),
        ("heads-indivisible", "num_attention_heads", json!(7)),
        ("kv-heads-zero", "num_key_value_heads", json!(0)),
        ("head-dim-odd", "head_dim", json!(7)),
        ("theta-zero", "rope_theta", json!(0)),
        (
            "rope-linear",
            "rope_parameters",
            json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        ),
        (
            "rope-llama3-equal",
            "rope_parameters",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 1e4}),
        ),
        ("mistral-window", "architectures", json!(["MistralForCausalLM"])),
        ("vocab-zero", "vocab_size", json!(0)),
    ];
    for (name, key, value) in edits {
        let mut c = base.clone();
        c[key] = value;
        put("config", name, c.to_string().as_bytes());
    }
    put("config", "not-json", b"{\"architectures\": [");
    put("config", "generation-bad", b"{\"architectures\": [\"LlamaForCausalLM\"]}\0[1]");

    // request: protobuf encodings of client and worker requests.
    let sp = |t: Option<f32>, k: Option<u32>, p: Option<f32>, r: Option<f32>| pb::SamplingParams {
        max_new_tokens: Some(16),
        temperature: t,
        top_k: k,
        top_p: p,
        seed: Some(7),
        repetition_penalty: r,
        ignore_eos: false,
        logit_bias: Default::default(),
    };
    let samplings = [
        ("greedy", None),
        ("defaults", Some(pb::SamplingParams::default())),
        ("sampled", Some(sp(Some(0.8), Some(40), Some(0.95), Some(1.1)))),
        ("nan-temperature", Some(sp(Some(f32::NAN), None, None, None))),
        ("inf-temperature", Some(sp(Some(f32::INFINITY), None, None, None))),
        ("top-p-zero", Some(sp(None, None, Some(0.0), None))),
        ("penalty-negative", Some(sp(None, None, None, Some(-1.0)))),
        ("top-k-max", Some(sp(Some(1.0), Some(u32::MAX), Some(1.0), Some(1.0)))),
    ];
    for (name, sampling) in &samplings {
        let text = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text("Once upon a time".into())),
            sampling: sampling.clone(),
            stop: vec!["The end".into()],
        };
        let mut b = vec![0];
        b.extend(text.encode_to_vec());
        put("request", &format!("generate-text-{name}"), &b);
    }
    for (name, ids) in
        [("ids", vec![1, 403, 407, 261, 378]), ("ids-out-of-vocab", vec![1, 9999]), ("ids-empty", vec![])]
    {
        let r = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
            sampling: samplings[2].1.clone(),
            stop: vec![],
        };
        let mut b = vec![2];
        b.extend(r.encode_to_vec());
        put("request", &format!("generate-{name}"), &b);
    }
    for (name, sampling) in &samplings[..5] {
        let r = pb::RunSequenceRequest {
            sequence_id: 42,
            epoch: 1,
            prompt_token_ids: vec![1, 403, 407],
            sampling: sampling.clone(),
            generated_token_ids: vec![261, 378],
            score: name.starts_with('g').then_some(pb::ScoreRequest {
                from_position: 2,
                top: 5,
                tolerance: 0.01,
                sampled: false,
            }),
        };
        let mut b = vec![1];
        b.extend(r.encode_to_vec());
        put("request", &format!("run-sequence-{name}"), &b);
    }
    put("request", "garbage", &[0, 0xff, 0xff, 0xff, 0xff, 0x0f]);

    // detokenizer: reference ids, byte-fallback runs, unknown ids, stop strings.
    let ids = |v: &[u16]| v.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>();
    let story: &[u16] = &[432, 383, 286, 261, 376, 298, 315, 421, 395, 317];
    let prompt: &[u16] = &[1, 403, 407, 261, 378];
    let bytes_run: &[u16] = &[3 + 0xe6, 3 + 0x97, 3 + 0xa5, 261, 3 + 0xf0, 3 + 0x9f];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("story", [vec![0], ids(story)].concat()),
        ("prompt", [vec![0], ids(prompt)].concat()),
        ("prompt-then-story-in-context", [vec![4], ids(prompt), ids(story)].concat()),
        ("byte-run", [vec![0], ids(bytes_run)].concat()),
        ("byte-run-in-context", [vec![4], ids(bytes_run), ids(story)].concat()),
        ("unknown-ids", [vec![0], ids(&[9999, 432, 65535, 383, 600])].concat()),
        ("special", [vec![0], ids(&[0, 1, 2, 1, 2, 432])].concat()),
        ("stop-literal", [vec![1, 2 * 4], b"girl".to_vec(), ids(story)].concat()),
        ("stop-from-text", [vec![1, 2 * 6 + 1], vec![3, 0, 0, 0, 0, 0], ids(story)].concat()),
        ("two-stops", [vec![2, 2 * 3, b'a', b'b', b'c', 2 * 2 + 1, 9, 9], ids(story)].concat()),
        (
            "three-stops-utf8",
            [
                vec![7, 2 * 3],
                "日".as_bytes().to_vec(),
                vec![3, 0, 2], // one byte cut from the text; a one-byte literal
                vec![b' '],
                ids(bytes_run),
                ids(story),
            ]
            .concat(),
        ),
        ("stop-at-start", [vec![1, 2 * 2 + 1, 0, 0], ids(story)].concat()),
        ("empty", vec![]),
        ("odd-byte", [vec![0], ids(story), vec![7]].concat()),
    ];
    for (name, b) in cases {
        put("detokenizer", name, &b);
    }

    // chat_template: tokenizer_config.json (+ NUL + messages).
    let zephyr = "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}";
    let conversation = br#"[{"role":"system","content":"Be brief."},{"role":"user","content":"Once upon"},{"role":"assistant","content":"a time"},{"role":"user","content":"go on"}]"#;
    let with = |config: Value, messages: &[u8]| {
        [serde_json::to_vec(&config).expect("json"), vec![0], messages.to_vec()].concat()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zephyr", serde_json::to_vec(&json!({"chat_template": zephyr, "eos_token": "</s>"})).expect("json")),
        ("zephyr-conversation", with(json!({"chat_template": zephyr, "eos_token": {"content": "</s>", "lstrip": false}}), conversation)),
        ("named-templates", serde_json::to_vec(&json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}], "bos_token": "<s>"})).expect("json")),
        ("named-no-default", serde_json::to_vec(&json!({"chat_template": [{"name": "tool_use", "template": "T"}]})).expect("json")),
        ("no-template", serde_json::to_vec(&json!({"bos_token": "<s>", "added_tokens_decoder": {"0": {"content": "<unk>"}}})).expect("json")),
        ("raise-exception", with(json!({"chat_template": "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}ok"}), conversation)),
        ("namespace-loop", with(json!({"chat_template": "{% set ns = namespace(text='') %}{% for m in messages %}{% set ns.text = ns.text ~ m.role ~ ': ' ~ m.content ~ '\n' %}{% endfor %}{{ ns.text|trim }}"}), conversation)),
        ("python-methods", serde_json::to_vec(&json!({"chat_template": "{{ messages[0].content.strip().upper().replace('H', 'J') }}{{ strftime_now('%Y') }}"})).expect("json")),
        ("output-over-the-limit", serde_json::to_vec(&json!({"chat_template": "{% for i in range(3000) %}{{ 'x' * 4000 }}{% endfor %}"})).expect("json")),
        ("runaway-loop", serde_json::to_vec(&json!({"chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"})).expect("json")),
        ("syntax-error", serde_json::to_vec(&json!({"chat_template": "{% for m in messages %}{{ m.content "})).expect("json")),
        ("not-json", b"{\"chat_template\": ".to_vec()),
        ("template-not-text", serde_json::to_vec(&json!({"chat_template": 7})).expect("json")),
        ("bad-messages", with(json!({"chat_template": zephyr}), b"[{\"role\": 1}]")),
        ("empty-conversation", with(json!({"chat_template": zephyr}), b"[]")),
    ];
    for (name, b) in cases {
        put("chat_template", name, &b);
    }
}
