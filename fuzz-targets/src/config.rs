//! `config.json` (+ `generation_config.json`) bytes → a validated config.
use std::path::Path;

use zeroshard_offload::spec::tensor_specs;
use zeroshard_offload::{
    ModelConfig, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
};

/// `data` is `config.json`, or `config.json`, a NUL byte, `generation_config.json`.
pub fn config(data: &[u8]) {
    let (config, generation) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let gen_path = Path::new("generation_config.json");
    let Ok(c) = ModelConfig::from_bytes(Path::new("config.json"), config, generation.map(|g| (gen_path, g)))
    else {
        return;
    };
    // What the rest of the code relies on once a config is accepted.
    assert!((1..=MAX_LAYERS).contains(&c.num_layers), "{c:?}");
    assert!((1..=MAX_HEADS).contains(&c.num_heads) && (1..=MAX_HEADS).contains(&c.num_kv_heads), "{c:?}");
    assert_eq!(c.num_heads % c.num_kv_heads, 0, "{c:?}");
    assert!((1..=MAX_HIDDEN).contains(&c.hidden_size), "{c:?}");
    assert!((1..=MAX_HEAD_DIM).contains(&c.head_dim), "{c:?}");
    assert!((1..=MAX_INTERMEDIATE).contains(&c.intermediate_size), "{c:?}");
    assert!((1..=MAX_VOCAB).contains(&c.vocab_size), "{c:?}");
    assert!((1..=MAX_POSITIONS).contains(&c.max_position_embeddings), "{c:?}");
    assert!(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0, "{c:?}");
    assert!(c.rope.theta.is_finite() && c.rope.theta > 0.0, "{c:?}");
    let ids = c.bos_token_id.iter().chain(&c.eos_token_ids);
    assert!(ids.into_iter().all(|&id| (id as usize) < c.vocab_size), "{c:?}");
    // The tensor list (kept to small models so each input stays fast).
    if c.num_layers <= 8 {
        for s in tensor_specs(&c) {
            let numel = s.shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
            assert!(numel.is_some_and(|n| n.checked_mul(4).is_some()), "{} {:?}", s.name, s.shape);
            assert!(s.shape.iter().all(|&d| d > 0), "{} {:?}", s.name, s.shape);
        }
    }
}
