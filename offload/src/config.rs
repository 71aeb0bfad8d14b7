//! `config.json` + `generation_config.json` → [`ModelConfig`].
//!
//! The raw serde structs accept whatever Hugging Face writes; [`ModelConfig::from_json`]
//! validates them once and refuses, naming the key, anything the engine would
//! compute differently from `transformers`. GPT-2 and BLOOM name their keys
//! differently (`n_embd`, `n_head`, `layer_norm_epsilon`, …): their raw structs
//! live in [`gpt2`] and [`bloom`] and map onto the same [`ModelConfig`].
mod bloom;
mod bounds;
mod fused;
mod gpt2;

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

pub use self::bounds::{
    MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
};
use crate::error::{OffloadError, Result};
use crate::model_file;

/// The model families the engine computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    /// `GPT2LMHeadModel`: learned positions, LayerNorm, GELU (tanh) MLP, fused
    /// Conv1D `c_attn`.
    Gpt2,
    /// `BloomForCausalLM`: ALiBi, LayerNorm (also after the embedding), GELU
    /// (tanh) MLP, fused per-head `query_key_value`.
    Bloom,
}

/// The normalisation a family uses (its epsilon is [`ModelConfig::rms_norm_eps`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// `x / rms(x) * w` (Llama RMSNorm).
    Rms,
    /// `(x - mean) / std * w + b` (`torch.nn.LayerNorm`).
    Layer,
}

/// The MLP's nonlinearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu,
    /// `proj(gelu(fc(x)))`, GELU's tanh approximation (`gelu_new`, BLOOM's
    /// `bloom_gelu_forward`).
    GeluTanh,
}

/// How a family tells the attention where each token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionEncoding {
    /// Rotary embeddings on q and k ([`ModelConfig::rope`]).
    Rope,
    /// A learned table `[max_position_embeddings, hidden]` added to the embeddings.
    Learned,
    /// A per-head linear bias on the attention scores (ALiBi).
    Alibi,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Gpt2 => "GPT2LMHeadModel",
            Self::Bloom => "BloomForCausalLM",
        }
    }

    pub fn norm(self) -> Norm {
        match self {
            Self::Llama | Self::Mistral | Self::Qwen2 => Norm::Rms,
            Self::Gpt2 | Self::Bloom => Norm::Layer,
        }
    }

    pub fn activation(self) -> Activation {
        match self {
            Self::Llama | Self::Mistral | Self::Qwen2 => Activation::SwiGlu,
            Self::Gpt2 | Self::Bloom => Activation::GeluTanh,
        }
    }

    pub fn position_encoding(self) -> PositionEncoding {
        match self {
            Self::Llama | Self::Mistral | Self::Qwen2 => PositionEncoding::Rope,
            Self::Gpt2 => PositionEncoding::Learned,
            Self::Bloom => PositionEncoding::Alibi,
        }
    }

    /// The config key the engine's position limit comes from, for error messages.
    pub fn max_positions_key(self) -> &'static str {
        match self {
            Self::Llama | Self::Mistral | Self::Qwen2 => "max_position_embeddings",
            Self::Gpt2 => "n_positions",
            Self::Bloom => "position bound", // BLOOM has none; see BLOOM_MAX_POSITIONS
        }
    }
}

const SUPPORTED_ARCHITECTURES: &str =
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, BloomForCausalLM";

/// How RoPE frequencies are scaled (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// `linear`: positions divided by `factor`.
    Linear {
        factor: f64,
    },
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
///
/// The family's norm, activation and position encoding follow from
/// `architecture` ([`Architecture::norm`], …). Fields that a family does not use
/// hold neutral values (GPT-2 and BLOOM: `rope` default, no sliding window).
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
    /// Positions the model computes (GPT-2: `n_positions`; BLOOM has no limit of its
    /// own: [`BLOOM_MAX_POSITIONS`]). Longer prompts are refused; generation stops at
    /// the last position.
    pub max_position_embeddings: usize,
    /// Epsilon of every norm: `rms_norm_eps` (Llama family) or `layer_norm_epsilon`
    /// (GPT-2, BLOOM). The field keeps its first family's name.
    pub rms_norm_eps: f32,
    /// RoPE settings (Llama family only).
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v projections (always on for GPT-2 and BLOOM).
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

/// BLOOM's position limit. ALiBi has no table to run off the end of and transformers
/// imposes no limit, so this only bounds a sequence's length (its KV cache is what
/// runs out first); positions stay exact in the f32 bias (< 2^24).
pub const BLOOM_MAX_POSITIONS: usize = 1 << 20;

/// The keys every family shares.
#[derive(Deserialize, Default)]
struct RawCommon {
    architectures: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

/// The Llama family's keys.
#[derive(Deserialize, Default)]
struct RawConfig {
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
}

#[derive(Deserialize, Default)]
struct RawGenerationConfig {
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

pub(crate) struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    /// `config` as the raw serde struct `T`.
    pub(crate) fn raw<T: for<'de> Deserialize<'de>>(&self, config: &Value) -> Result<T> {
        serde_json::from_value(config.clone())
            .map_err(|e| OffloadError::Json { path: self.path.to_path_buf(), message: e.to_string() })
    }

    pub(crate) fn err(&self, key: &str, message: impl Into<String>) -> OffloadError {
        OffloadError::Config { path: self.path.to_path_buf(), key: key.to_string(), message: message.into() }
    }

    /// A required count in `1..=max` (the `MAX_*` bounds of [`bounds`]).
    pub(crate) fn req(&self, v: Option<usize>, key: &str, max: usize) -> Result<usize> {
        match v {
            None => Err(self.err(key, "missing")),
            Some(0) => Err(self.err(key, "must be > 0")),
            Some(n) if n > max => Err(self.err(key, format!("{n} is over the limit of {max}"))),
            Some(n) => Ok(n),
        }
    }

    /// The first of `keys` present (HF aliases such as `n_embd` / `hidden_size`);
    /// refuses two that disagree.
    pub(crate) fn alias<T: PartialEq + std::fmt::Display + Copy>(
        &self,
        values: &[(&str, Option<T>)],
    ) -> Result<(String, Option<T>)> {
        let mut found: Option<(&str, T)> = None;
        for (key, v) in values {
            match (found, v) {
                (None, Some(v)) => found = Some((key, *v)),
                (Some((first, a)), Some(b)) if a != *b => {
                    return Err(self.err(key, format!("{b} disagrees with `{first}` {a}")))
                }
                _ => {}
            }
        }
        Ok(match found {
            Some((k, v)) => (k.to_string(), Some(v)),
            None => (values[0].0.to_string(), None),
        })
    }

    /// `hidden / heads`, refusing a `heads` that does not divide `hidden`.
    pub(crate) fn head_dim(&self, hidden: usize, heads: usize, heads_key: &str) -> Result<usize> {
        let head_dim = hidden / heads;
        if head_dim * heads != hidden {
            return Err(self.err(heads_key, format!("{heads} does not divide the hidden size {hidden}")));
        }
        Ok(head_dim)
    }

    fn f64_of(&self, obj: &serde_json::Map<String, Value>, prefix: &str, key: &str) -> Result<f64> {
        obj.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.err(&format!("{prefix}.{key}"), "missing or not a number"))
    }

    /// A token id or a list of them, each below `vocab`.
    fn ids(&self, v: &Option<Value>, key: &str, vocab: usize) -> Result<Vec<u32>> {
        let one = |x: &Value| {
            let id = x
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.err(key, format!("{x} is not a token id")))?;
            if id as usize >= vocab {
                return Err(self.err(key, format!("{id} is not below the vocabulary size {vocab}")));
            }
            Ok(id)
        };
        match v {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(x) => Ok(vec![one(x)?]),
        }
    }
}

/// The first `*.gguf` file in `dir` (by name), if any.
fn gguf_file(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
        .collect();
    names.sort();
    names.into_iter().next()
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes)
        .map_err(|e| OffloadError::Json { path: path.to_path_buf(), message: e.to_string() })
}

impl ModelConfig {
    /// A model of the given shape with plain settings — `head_dim = hidden /
    /// heads`, 2048 positions, ε 1e-5, RoPE θ 10000 unscaled, untied head, no
    /// biases, BOS 1, EOS 2 — for synthetic models and tests; change the rest
    /// with struct update syntax.
    pub fn synthetic(
        architecture: Architecture,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        ffn: usize,
        vocab: usize,
    ) -> Self {
        Self {
            architecture,
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hidden / heads.max(1),
            intermediate_size: ffn,
            vocab_size: vocab,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-5,
            rope: RopeConfig { theta: 10000.0, scaling: RopeScaling::None },
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// Reads `dir/config.json` and, if present, `dir/generation_config.json`
    /// (each through [`model_file::read`]: a regular file inside the folder).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        const CONFIG: &str = "config.json";
        const GENERATION: &str = "generation_config.json";
        if !model_file::exists(dir, CONFIG) {
            if let Some(file) = gguf_file(dir) {
                return Err(OffloadError::Gguf { dir: dir.to_path_buf(), file });
            }
        }
        let config = model_file::read(dir, CONFIG)?;
        let generation =
            if model_file::exists(dir, GENERATION) { Some(model_file::read(dir, GENERATION)?) } else { None };
        let gen_path = dir.join(GENERATION);
        Self::from_bytes(&dir.join(CONFIG), &config, generation.as_deref().map(|g| (gen_path.as_path(), g)))
    }

    /// [`Self::from_json`] of the bytes of `config.json` (and
    /// `generation_config.json`); the paths are only used in messages.
    pub fn from_bytes(path: &Path, config: &[u8], generation: Option<(&Path, &[u8])>) -> Result<Self> {
        let config = parse_json(path, config)?;
        let generation = match generation {
            Some((gpath, bytes)) => Some((gpath, parse_json(gpath, bytes)?)),
            None => None,
        };
        Self::from_json(path, &config, generation.as_ref().map(|(p, v)| (*p, v)))
    }

    /// Validates a parsed `config.json` (and generation config). `path` is only
    /// used in error messages.
    pub fn from_json(path: &Path, config: &Value, generation: Option<(&Path, &Value)>) -> Result<Self> {
        let cx = Ctx { path };
        let raw: RawCommon = cx.raw(config)?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .ok_or_else(|| cx.err("architectures", "missing"))?;
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            "GPT2LMHeadModel" => Architecture::Gpt2,
            "BloomForCausalLM" => Architecture::Bloom,
            other => {
                return Err(cx.err(
                    "architectures",
                    format!("\"{other}\" is not supported (supported: {SUPPORTED_ARCHITECTURES})"),
                ))
            }
        };
        let mut cfg = match architecture {
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => {
                llama_family(&cx, &cx.raw(config)?, architecture)?
            }
            Architecture::Gpt2 => gpt2::parse(&cx, config)?,
            Architecture::Bloom => bloom::parse(&cx, config)?,
        };
        let vocab = cfg.vocab_size;
        let mut bos = cx.ids(&raw.bos_token_id, "bos_token_id", vocab)?;
        let mut eos = cx.ids(&raw.eos_token_id, "eos_token_id", vocab)?;
        cx.pad_id(&raw.pad_token_id, vocab)?;
        if let Some((gpath, gval)) = generation {
            let gcx = Ctx { path: gpath };
            let graw: RawGenerationConfig = gcx.raw(gval)?;
            if graw.bos_token_id.is_some() {
                bos = gcx.ids(&graw.bos_token_id, "bos_token_id", vocab)?;
            }
            if graw.eos_token_id.is_some() {
                eos = gcx.ids(&graw.eos_token_id, "eos_token_id", vocab)?;
            }
            gcx.pad_id(&graw.pad_token_id, vocab)?;
        }
        cfg.bos_token_id = bos.first().copied();
        cfg.eos_token_ids = eos;
        Ok(cfg)
    }

    /// Elements of the q projection output (`num_heads * head_dim`).
    /// Whether `degree` tensor-parallel workers can split this model (each
    /// computes whole KV-head groups, a slice of the MLP and of the
    /// vocabulary); the error is one line naming the numbers.
    pub fn check_tensor_degree(&self, degree: usize) -> std::result::Result<(), String> {
        if degree == 0 {
            return Err("a tensor-parallel degree must be at least 1".into());
        }
        if !matches!(self.architecture, Architecture::Llama | Architecture::Mistral | Architecture::Qwen2) {
            return Err(format!(
                "the tensor placement splits Llama-family models (Llama, Mistral, Qwen2); this is {:?}: \
                 use --placement gather",
                self.architecture
            ));
        }
        if !self.num_kv_heads.is_multiple_of(degree) {
            return Err(format!(
                "{degree} tensor-parallel workers do not divide the model's {} KV heads \
                 (each worker computes whole KV-head groups): use a divisor of {}",
                self.num_kv_heads, self.num_kv_heads
            ));
        }
        if self.intermediate_size < degree || self.vocab_size < degree {
            return Err(format!(
                "{degree} tensor-parallel workers for an MLP of {} rows and a vocabulary of {}",
                self.intermediate_size, self.vocab_size
            ));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Elements of the k (and v) projection output (`num_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The Llama family's keys → [`ModelConfig`] (token ids are filled in by the caller).
fn llama_family(cx: &Ctx, raw: &RawConfig, architecture: Architecture) -> Result<ModelConfig> {
    let hidden_size = cx.req(raw.hidden_size, "hidden_size", MAX_HIDDEN)?;
    let num_layers = cx.req(raw.num_hidden_layers, "num_hidden_layers", MAX_LAYERS)?;
    let num_heads = cx.req(raw.num_attention_heads, "num_attention_heads", MAX_HEADS)?;
    let num_kv_heads =
        cx.req(Some(raw.num_key_value_heads.unwrap_or(num_heads)), "num_key_value_heads", MAX_HEADS)?;
    if num_heads % num_kv_heads != 0 {
        return Err(cx.err(
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
        ));
    }
    let head_dim = match raw.head_dim {
        Some(d) => cx.req(Some(d), "head_dim", MAX_HEAD_DIM)?,
        None if hidden_size % num_heads == 0 => {
            cx.req(Some(hidden_size / num_heads), "head_dim", MAX_HEAD_DIM)?
        }
        None => {
            return Err(cx.err(
                "head_dim",
                format!(
                "missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
            ),
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
    let rope = parse_rope(cx, raw)?;
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
        _ => (false, false, false), // Mistral; other families never come here
    };
    Ok(ModelConfig {
        architecture,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: cx.req(raw.intermediate_size, "intermediate_size", MAX_INTERMEDIATE)?,
        vocab_size: cx.req(raw.vocab_size, "vocab_size", MAX_VOCAB)?,
        max_position_embeddings: cx.req(
            raw.max_position_embeddings,
            "max_position_embeddings",
            MAX_POSITIONS,
        )?,
        rms_norm_eps: cx.eps(raw.rms_norm_eps.unwrap_or(1e-6), "rms_norm_eps")?,
        rope,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        qkv_bias,
        o_bias,
        mlp_bias,
        sliding_window,
        bos_token_id: None,
        eos_token_ids: vec![],
    })
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
    if !(theta.is_finite() && (1.0..=bounds::MAX_ROPE_THETA).contains(&theta)) {
        return Err(cx.err(
            "rope_theta",
            format!(
                "{theta} must be a finite number in [1, {:e}] (real models use 1e4 to 1e7; below 1 the \
                 rotary frequencies overflow)",
                bounds::MAX_ROPE_THETA
            ),
        ));
    }
    let Some(p) = params else {
        return Ok(RopeConfig { theta, scaling: RopeScaling::None });
    };
    let named = p.get("rope_type").or_else(|| p.get("type"));
    if named.is_none() && p.keys().any(|k| k != "rope_theta" && k != "partial_rotary_factor") {
        // A scaling with no type would be silently ignored: refuse it.
        let keys: Vec<&str> = p.keys().map(String::as_str).collect();
        return Err(cx.err(
            prefix,
            format!("has {keys:?} but no \"rope_type\" (or \"type\"): which scaling is meant is unknown"),
        ));
    }
    let rope_type = named.and_then(Value::as_str).unwrap_or("default");
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: cx.f64_of(&p, prefix, "factor")? },
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
    bounds::check_rope_scaling(cx, prefix, &scaling)?;
    Ok(RopeConfig { theta, scaling })
}

#[cfg(test)]
mod tests;
