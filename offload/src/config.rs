//! `config.json` + `generation_config.json` → [`ModelConfig`].
//!
//! The raw serde structs accept whatever Hugging Face writes; [`ModelConfig::from_json`]
//! validates them once and refuses, naming the key, anything the engine would
//! compute differently from `transformers`.
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{io_err, OffloadError, Result};

/// The model families the engine computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How RoPE frequencies are scaled (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// `linear`: positions divided by `factor`.
    Linear { factor: f64 },
    /// `llama3`: low frequencies divided by `factor`, a smooth band between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The validated runtime configuration of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Biases on gate/up/down projections.
    pub mlp_bias: bool,
    /// Attend only to the last `sliding_window` positions (Mistral), if set.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these (config, overridden by generation_config).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize, Default)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

#[derive(Deserialize, Default)]
struct RawGenerationConfig {
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> OffloadError {
        OffloadError::Config {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn req(&self, v: Option<usize>, key: &str) -> Result<usize> {
        match v {
            None => Err(self.err(key, "missing")),
            Some(0) => Err(self.err(key, "must be > 0")),
            Some(n) => Ok(n),
        }
    }

    fn f64_of(&self, obj: &serde_json::Map<String, Value>, prefix: &str, key: &str) -> Result<f64> {
        obj.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.err(&format!("{prefix}.{key}"), "missing or not a number"))
    }

    /// A token id or a list of them.
    fn ids(&self, v: &Option<Value>, key: &str) -> Result<Vec<u32>> {
        let one = |x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.err(key, format!("{x} is not a token id")))
        };
        match v {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(x) => Ok(vec![one(x)?]),
        }
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| OffloadError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl ModelConfig {
    /// Reads `dir/config.json` and, if present, `dir/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let raw: Value = read_json(&path)?;
        let gen_path = dir.join("generation_config.json");
        let gen = if gen_path.is_file() {
            Some(read_json::<Value>(&gen_path)?)
        } else {
            None
        };
        Self::from_json(&path, &raw, gen.as_ref().map(|g| (gen_path.as_path(), g)))
    }

    /// Validates a parsed `config.json` (and generation config). `path` is only
    /// used in error messages.
    pub fn from_json(path: &Path, config: &Value, generation: Option<(&Path, &Value)>) -> Result<Self> {
        let cx = Ctx { path };
        let raw: RawConfig = serde_json::from_value(config.clone()).map_err(|e| OffloadError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .ok_or_else(|| cx.err("architectures", "missing"))?;
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            other => {
                return Err(cx.err(
                    "architectures",
                    format!(
                        "\"{other}\" is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
                    ),
                ))
            }
        };
        let hidden_size = cx.req(raw.hidden_size, "hidden_size")?;
        let num_layers = cx.req(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = cx.req(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = cx.req(Some(raw.num_key_value_heads.unwrap_or(num_heads)), "num_key_value_heads")?;
        if num_heads % num_kv_heads != 0 {
            return Err(cx.err(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => cx.req(Some(d), "head_dim")?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(cx.err(
                    "head_dim",
                    format!("missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(cx.err("head_dim", format!("{head_dim} is odd; RoPE needs an even head_dim")));
        }
        let act = raw.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            return Err(cx.err("hidden_act", format!("\"{act}\" is not supported (supported: silu)")));
        }
        if let Some(f) = raw.partial_rotary_factor {
            if f != 1.0 {
                return Err(cx.err("partial_rotary_factor", format!("{f} is not supported (only 1.0)")));
            }
        }
        let rope = parse_rope(&cx, &raw)?;
        let sliding_window = match architecture {
            Architecture::Mistral => match &raw.sliding_window {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .filter(|w| *w > 0)
                        .ok_or_else(|| cx.err("sliding_window", format!("{v} is not a positive integer")))?
                        as usize,
                ),
            },
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => {
                return Err(cx.err("use_sliding_window", "true is not supported"));
            }
            _ => None,
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            Architecture::Llama => (attention_bias, attention_bias, raw.mlp_bias.unwrap_or(false)),
            Architecture::Mistral => (false, false, false),
            Architecture::Qwen2 => (true, false, false),
        };
        let mut bos = cx.ids(&raw.bos_token_id, "bos_token_id")?;
        let mut eos = cx.ids(&raw.eos_token_id, "eos_token_id")?;
        if let Some((gpath, gval)) = generation {
            let gcx = Ctx { path: gpath };
            let graw: RawGenerationConfig = serde_json::from_value(gval.clone()).map_err(|e| OffloadError::Json {
                path: gpath.to_path_buf(),
                message: e.to_string(),
            })?;
            if graw.bos_token_id.is_some() {
                bos = gcx.ids(&graw.bos_token_id, "bos_token_id")?;
            }
            if graw.eos_token_id.is_some() {
                eos = gcx.ids(&graw.eos_token_id, "eos_token_id")?;
            }
        }
        let cfg = Self {
            architecture,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: cx.req(raw.intermediate_size, "intermediate_size")?,
            vocab_size: cx.req(raw.vocab_size, "vocab_size")?,
            max_position_embeddings: cx.req(raw.max_position_embeddings, "max_position_embeddings")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: bos.first().copied(),
            eos_token_ids: eos,
        };
        Ok(cfg)
    }

    /// Elements of the q projection output (`num_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Elements of the k (and v) projection output (`num_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Reads RoPE settings from `rope_parameters` (transformers ≥ 5) or the older
/// `rope_theta` + `rope_scaling` keys.
fn parse_rope(cx: &Ctx, raw: &RawConfig) -> Result<RopeConfig> {
    let (params, prefix) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(Value::Object(p)), _) => (Some(p.clone()), "rope_parameters"),
        (Some(Value::Null) | None, Some(Value::Object(s))) => (Some(s.clone()), "rope_scaling"),
        (Some(Value::Null) | None, Some(Value::Null) | None) => (None, "rope_scaling"),
        (Some(v), _) => return Err(cx.err("rope_parameters", format!("{v} is not an object"))),
        (_, Some(v)) => return Err(cx.err("rope_scaling", format!("{v} is not an object"))),
    };
    let theta = params
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(raw.rope_theta)
        .unwrap_or(10000.0);
    if theta <= 0.0 {
        return Err(cx.err("rope_theta", format!("{theta} must be > 0")));
    }
    let Some(p) = params else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let rope_type = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: cx.f64_of(&p, prefix, "factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: cx.f64_of(&p, prefix, "factor")?,
            low_freq_factor: cx.f64_of(&p, prefix, "low_freq_factor")?,
            high_freq_factor: cx.f64_of(&p, prefix, "high_freq_factor")?,
            original_max_position_embeddings: cx.f64_of(&p, prefix, "original_max_position_embeddings")?,
        },
        other => {
            return Err(cx.err(
                &format!("{prefix}.rope_type"),
                format!("\"{other}\" is not supported (supported: default, linear, llama3)"),
            ))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

#[cfg(test)]
mod tests {
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
            (json!({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0}}), "rope_parameters.rope_type"),
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
            let err = parse(&v).err().expect("must refuse").to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
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
}
