//! Unit tests of config parsing and validation.
use super::*;
use serde_json::json;

fn base() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128,
        "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "eos_token_id": 2, "bos_token_id": 1
    })
}

fn parse(v: &Value) -> Result<ModelConfig> {
    ModelConfig::from_json(Path::new("config.json"), v, None)
}

#[test]
fn derives_head_dim_and_defaults() {
    let c = parse(&base()).expect("valid");
    assert_eq!((c.head_dim, c.kv_dim(), c.q_dim()), (8, 16, 64));
    assert_eq!(c.rope.scaling, RopeScaling::None);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert!(!c.qkv_bias);
}

#[test]
fn old_and_new_rope_keys_agree() {
    let mut old = base();
    old["rope_theta"] = json!(500000.0);
    old["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256});
    let mut new = base();
    new.as_object_mut().expect("obj").remove("rope_theta");
    new["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256});
    let (a, b) = (parse(&old).expect("old"), parse(&new).expect("new"));
    assert_eq!(a.rope, b.rope);
    assert_eq!(a.rope.theta, 500000.0);
}

#[test]
fn refuses_unsupported_values_naming_the_key() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"architectures": ["FalconForCausalLM"]}), "architectures"),
        (json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "rope_scaling.rope_type"),
        (
            json!({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0}}),
            "rope_parameters.rope_type",
        ),
        (json!({"hidden_act": "gelu"}), "hidden_act"),
        (json!({"num_key_value_heads": 3}), "num_key_value_heads"),
        (json!({"hidden_size": null}), "hidden_size"),
        (json!({"eos_token_id": "x"}), "eos_token_id"),
        (json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "rope_scaling.low_freq_factor"),
    ];
    for (patch, key) in cases {
        let mut v = base();
        for (k, val) in patch.as_object().expect("obj") {
            v[k] = val.clone();
        }
        let err = parse(&v).expect_err("must refuse").to_string();
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
    }
}

fn gpt2() -> Value {
    // The gpt2 fixture's config, plus the Llama keys tiny-random-gpt2 carries and
    // GPT-2 ignores.
    json!({
        "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new", "n_embd": 64,
        "n_head": 4, "n_layer": 2, "n_positions": 128, "n_inner": null, "vocab_size": 1000,
        "layer_norm_epsilon": 1e-5, "scale_attn_weights": true, "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false, "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 0,
        "intermediate_size": 37, "hidden_act": "gelu"
    })
}

fn bloom() -> Value {
    json!({
        "architectures": ["BloomForCausalLM"], "hidden_size": 64, "n_head": 4, "n_layer": 2,
        "vocab_size": 512, "layer_norm_epsilon": 1e-5, "apply_residual_connection_post_layernorm": false,
        "pretraining_tp": 1, "slow_but_exact": false, "bos_token_id": 1, "eos_token_id": 2
    })
}

fn patched(mut v: Value, patch: Value) -> Value {
    for (k, val) in patch.as_object().expect("obj") {
        v[k] = val.clone();
    }
    v
}

#[test]
fn gpt2_keys_map_onto_the_runtime_config() {
    let c = parse(&gpt2()).expect("gpt2");
    assert_eq!(c.architecture, Architecture::Gpt2);
    assert_eq!((c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim), (64, 2, 4, 4, 16));
    // n_inner null → 4 · n_embd (not the ignored intermediate_size 37).
    assert_eq!((c.intermediate_size, c.max_position_embeddings, c.vocab_size), (256, 128, 1000));
    assert_eq!((c.rms_norm_eps, c.tie_word_embeddings, c.eos_token_ids.clone()), (1e-5, true, vec![0]));
    assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
    let a = c.architecture;
    assert_eq!(
        (a.norm(), a.activation(), a.position_encoding()),
        (Norm::Layer, Activation::GeluTanh, PositionEncoding::Learned)
    );
    // Explicit n_inner; HF's attribute-map names for the same keys.
    let c = parse(&patched(gpt2(), json!({"n_inner": 100}))).expect("n_inner");
    assert_eq!(c.intermediate_size, 100);
    let mut aliased = gpt2();
    for (old, new) in [
        ("n_embd", "hidden_size"),
        ("n_head", "num_attention_heads"),
        ("n_positions", "max_position_embeddings"),
    ] {
        let v = aliased.as_object_mut().expect("obj").remove(old).expect("key");
        aliased[new] = v;
    }
    assert_eq!(parse(&aliased).expect("aliases"), parse(&gpt2()).expect("gpt2"));
}

#[test]
fn bloom_keys_map_onto_the_runtime_config() {
    let c = parse(&bloom()).expect("bloom");
    assert_eq!(c.architecture, Architecture::Bloom);
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.head_dim, c.intermediate_size),
        (64, 2, 4, 16, 256)
    );
    assert_eq!((c.max_position_embeddings, c.tie_word_embeddings), (BLOOM_MAX_POSITIONS, true));
    assert_eq!(c.architecture.position_encoding(), PositionEncoding::Alibi);
    // bloom-560m's spelling: n_embed, num_attention_heads.
    let mut old = bloom();
    let o = old.as_object_mut().expect("obj");
    let (h, n) = (o.remove("hidden_size").expect("h"), o.remove("n_head").expect("n"));
    o.insert("n_embed".into(), h);
    o.insert("num_attention_heads".into(), n);
    assert_eq!(parse(&old).expect("n_embed"), c);
}

#[test]
fn gpt2_and_bloom_refuse_what_they_do_not_compute_naming_the_key() {
    let cases: Vec<(Value, Value, &str)> = vec![
        (gpt2(), json!({"activation_function": "relu"}), "activation_function"),
        (gpt2(), json!({"scale_attn_weights": false}), "scale_attn_weights"),
        (gpt2(), json!({"scale_attn_by_inverse_layer_idx": true}), "scale_attn_by_inverse_layer_idx"),
        (gpt2(), json!({"reorder_and_upcast_attn": true}), "reorder_and_upcast_attn"),
        (gpt2(), json!({"n_head": 5}), "n_head"),
        (gpt2(), json!({"n_positions": null}), "n_positions"),
        (gpt2(), json!({"n_embd": null}), "n_embd"),
        (gpt2(), json!({"hidden_size": 32}), "hidden_size"),
        (gpt2(), json!({"layer_norm_epsilon": -1.0}), "layer_norm_epsilon"),
        (
            bloom(),
            json!({"apply_residual_connection_post_layernorm": true}),
            "apply_residual_connection_post_layernorm",
        ),
        (bloom(), json!({"n_head": 3}), "n_head"),
        (bloom(), json!({"n_layer": 0}), "n_layer"),
    ];
    for (base, patch, key) in cases {
        let err = parse(&patched(base, patch.clone())).expect_err("must refuse").to_string();
        assert!(err.contains(&format!("`{key}`")), "{patch}: {err}");
    }
    // Llama keys a GPT-2 config may carry do not matter to it.
    assert!(parse(&patched(gpt2(), json!({"hidden_act": "relu", "rope_theta": 1.0}))).is_ok());
}

#[test]
fn generation_config_overrides_eos_list() {
    let gen = json!({"eos_token_id": [2, 7]});
    let c = ModelConfig::from_json(Path::new("config.json"), &base(), Some((Path::new("g.json"), &gen)))
        .expect("valid");
    assert_eq!(c.eos_token_ids, vec![2, 7]);
}

#[test]
fn family_biases() {
    let mut q = base();
    q["architectures"] = json!(["Qwen2ForCausalLM"]);
    let c = parse(&q).expect("qwen2");
    assert!(c.qkv_bias && !c.o_bias);
    let mut m = base();
    m["architectures"] = json!(["MistralForCausalLM"]);
    m["head_dim"] = json!(32);
    m["sliding_window"] = json!(4096);
    let c = parse(&m).expect("mistral");
    assert_eq!((c.head_dim, c.sliding_window), (32, Some(4096)));
}

#[test]
fn refuses_values_out_of_range_naming_the_key() {
    let cases: Vec<(Value, Value, &str, &str)> = vec![
        (
            base(),
            json!({"num_hidden_layers": 1_000_000_000u64}),
            "num_hidden_layers",
            "over the limit of 4096",
        ),
        (base(), json!({"num_hidden_layers": 100_000}), "num_hidden_layers", "over the limit"),
        (
            base(),
            json!({"num_attention_heads": 1 << 20, "num_key_value_heads": 1}),
            "num_attention_heads",
            "over",
        ),
        (base(), json!({"hidden_size": 1u64 << 40}), "hidden_size", "over"),
        (base(), json!({"head_dim": 1 << 16}), "head_dim", "over"),
        (base(), json!({"intermediate_size": 1u64 << 40}), "intermediate_size", "over"),
        (base(), json!({"vocab_size": 1u64 << 40}), "vocab_size", "over"),
        (base(), json!({"vocab_size": 0}), "vocab_size", "> 0"),
        (base(), json!({"max_position_embeddings": 1u64 << 40}), "max_position_embeddings", "over"),
        (base(), json!({"rms_norm_eps": -1}), "rms_norm_eps", "(0, 1]"),
        (base(), json!({"rms_norm_eps": 0.0}), "rms_norm_eps", "(0, 1]"),
        (base(), json!({"rms_norm_eps": 1e-300}), "rms_norm_eps", "(0, 1]"),
        (base(), json!({"rms_norm_eps": 1e300}), "rms_norm_eps", "(0, 1]"),
        (base(), json!({"rope_theta": 0}), "rope_theta", "[1, 1e9]"),
        (base(), json!({"rope_theta": -5.0}), "rope_theta", "[1, 1e9]"),
        (base(), json!({"rope_theta": 1e-300}), "rope_theta", "overflow"),
        (base(), json!({"rope_theta": 1e-60}), "rope_theta", "[1, 1e9]"),
        (base(), json!({"rope_theta": 1e30}), "rope_theta", "[1, 1e9]"),
        (base(), json!({"rope_scaling": {"factor": 2.0}}), "rope_scaling", "no \"rope_type\""),
        (
            base(),
            json!({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}),
            "rope_scaling.factor",
            "[1,",
        ),
        (
            base(),
            json!({"rope_scaling": {"rope_type": "linear", "factor": 1e300}}),
            "rope_scaling.factor",
            "[1,",
        ),
        (
            base(),
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
            "rope_scaling.high_freq_factor",
            "greater than low_freq_factor",
        ),
        (
            base(),
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 0.5}}),
            "rope_scaling.original_max_position_embeddings",
            "whole number",
        ),
        (base(), json!({"eos_token_id": 1_000_000_000}), "eos_token_id", "not below the vocabulary size 512"),
        (base(), json!({"eos_token_id": [2, 512]}), "eos_token_id", "512 is not below"),
        (base(), json!({"eos_token_id": 1e9}), "eos_token_id", "not a token id"),
        (base(), json!({"bos_token_id": 600}), "bos_token_id", "600 is not below"),
        (base(), json!({"pad_token_id": 512}), "pad_token_id", "512 is not below"),
        (base(), json!({"pad_token_id": "x"}), "pad_token_id", "not a token id"),
        (gpt2(), json!({"layer_norm_epsilon": f64::MIN_POSITIVE}), "layer_norm_epsilon", "(0, 1]"),
        (gpt2(), json!({"n_layer": 1_000_000_000}), "n_layer", "over"),
        (gpt2(), json!({"n_positions": 1u64 << 40}), "n_positions", "over"),
        (gpt2(), json!({"n_inner": 1u64 << 40}), "n_inner", "over"),
        (bloom(), json!({"layer_norm_epsilon": -1.0}), "layer_norm_epsilon", "(0, 1]"),
        (bloom(), json!({"n_embed": 1u64 << 40, "hidden_size": null}), "n_embed", "over"),
        (bloom(), json!({"vocab_size": 1u64 << 40}), "vocab_size", "over"),
    ];
    for (base, patch, key, needle) in cases {
        let err = parse(&patched(base, patch.clone())).expect_err("must refuse").to_string();
        assert!(err.contains(&format!("`{key}`")) && err.contains(needle), "{patch}: {err}");
    }
    // Null or negative pad ids mean "no padding".
    assert!(parse(&patched(base(), json!({"pad_token_id": -1}))).is_ok());
    assert!(parse(&patched(base(), json!({"pad_token_id": null}))).is_ok());
}

#[test]
fn generation_config_ids_are_checked_against_the_vocabulary() {
    let p = Path::new("config.json");
    let g = Path::new("generation_config.json");
    for (gen, key) in [
        (json!({"eos_token_id": 1_000_000_000}), "eos_token_id"),
        (json!({"bos_token_id": [512]}), "bos_token_id"),
        (json!({"pad_token_id": 99999}), "pad_token_id"),
    ] {
        let err = ModelConfig::from_json(p, &base(), Some((g, &gen))).expect_err("must refuse").to_string();
        assert!(err.starts_with("generation_config.json: key `") && err.contains(key), "{err}");
    }
}

#[test]
fn from_bytes_matches_from_json_and_names_the_file_on_bad_json() {
    let bytes = serde_json::to_vec(&base()).expect("json");
    let p = Path::new("config.json");
    assert_eq!(ModelConfig::from_bytes(p, &bytes, None).expect("valid"), parse(&base()).expect("valid"));
    let err = ModelConfig::from_bytes(p, b"{", None).expect_err("bad json").to_string();
    assert!(err.starts_with("config.json: invalid JSON"), "{err}");
    let err = ModelConfig::from_bytes(p, &bytes, Some((Path::new("g.json"), b"[")))
        .expect_err("bad json")
        .to_string();
    assert!(err.starts_with("g.json: invalid JSON"), "{err}");
}
