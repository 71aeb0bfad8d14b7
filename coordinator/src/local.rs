//! A whole model on this node: tokenizer + engine, text in, streamed text out.
//!
//! ```ignore
//! let model = LocalModel::load(Path::new("models/stories260K"), Device::Auto, &GpuOptions::default(), work)?;
//! let out = model.generate(&request, |delta| print!("{delta}"))?;
//! ```
//!
//! The engine runs on the CPU or, with `--device cuda[:N]` (or `auto` where CUDA
//! is present), on a GPU ([`AnyEngine`]); [`Device::resolve`] probes for CUDA
//! before anything calls into it.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use zeroshard_offload::{Checkpoint, ModelConfig};
use zeroshard_worker::cpu::CpuBackend;
use zeroshard_worker::cuda::{self, CudaBackend, CudaProbe};
use zeroshard_worker::engine::{Engine, FinishReason, GenerationParams, Sequence};
use zeroshard_worker::placement::{place_on_gpu, GpuPlacement};
use zeroshard_worker::weights::HostWeights;
use zeroshard_worker::Backend;

use crate::error::{CoordinatorError, Result};
use crate::tokenizer::{StopMatcher, Tokenizer};

/// Where the engine computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA when present, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device \"{s}\" (expected auto, cpu, cuda or cuda:N)")),
        }
    }
}

impl Device {
    /// The CUDA device to use (`None`: the CPU). `auto` takes device 0 when the
    /// driver and a device are there; `cuda[:N]` without them is an error naming why.
    pub fn resolve(self) -> Result<Option<usize>> {
        match (self, cuda::probe()) {
            (Self::Cpu, _) | (Self::Auto, CudaProbe::Unavailable(_)) => Ok(None),
            (Self::Auto, CudaProbe::Devices(_)) => Ok(Some(0)),
            (Self::Cuda(n), CudaProbe::Devices(count)) if n < count => Ok(Some(n)),
            (Self::Cuda(n), CudaProbe::Devices(count)) => Err(CoordinatorError::Unavailable(format!(
                "--device cuda:{n}: this machine has {count} CUDA device(s), cuda:0..cuda:{}",
                count - 1
            ))),
            (Self::Cuda(n), CudaProbe::Unavailable(why)) => Err(CoordinatorError::Unavailable(format!(
                "--device cuda:{n}: CUDA is not available here: {why}; use --device cpu or auto"
            ))),
        }
    }
}

/// GPU placement settings (`--gpu-memory`, `--max-live-bytes`, `--prefetch-layers`).
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Device bytes to use in all (default: 90% of what is free).
    pub gpu_memory: Option<u64>,
    /// Device bytes of resident layers at most (default: all that fit).
    pub max_live_bytes: Option<u64>,
    /// Layers copied ahead of the one computing.
    pub prefetch_layers: usize,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self { gpu_memory: None, max_live_bytes: None, prefetch_layers: 2 }
    }
}

/// What a run will ask of the KV cache and activations (sizes the device memory).
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Sequences decoded together.
    pub seqs: usize,
    /// Tokens per sequence, prompt and generated.
    pub tokens_per_seq: usize,
    /// Rows of the largest step (all prompts prefilled together).
    pub max_rows: usize,
}

/// The engine on the device it was placed on.
pub enum AnyEngine {
    Cpu(Engine<CpuBackend>),
    Cuda(Engine<CudaBackend>),
}

/// Runs `$body` with `$e` bound to the engine, whatever its backend.
macro_rules! with_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            AnyEngine::Cpu($e) => $body,
            AnyEngine::Cuda($e) => $body,
        }
    };
}

impl AnyEngine {
    pub fn config(&self) -> &ModelConfig {
        with_engine!(self, e => e.config())
    }

    pub fn backend_name(&self) -> String {
        with_engine!(self, e => e.backend().name())
    }

    /// Host bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        with_engine!(self, e => e.weights().bytes())
    }
}

/// Where a model was placed: the engine, and for a GPU how (one line) and the
/// bytes streamed host → device per step.
pub struct Placed {
    pub engine: AnyEngine,
    pub gpu_summary: Option<String>,
    pub streamed_bytes_per_step: u64,
}

/// Builds the engine for `weights` on `device`, sizing device memory for `work`.
pub fn place(
    config: ModelConfig,
    mut weights: HostWeights,
    device: Device,
    gpu: &GpuOptions,
    work: Workload,
) -> Result<Placed> {
    let Some(ordinal) = device.resolve()? else {
        let engine = AnyEngine::Cpu(Engine::new(CpuBackend::new(), config, weights));
        return Ok(Placed { engine, gpu_summary: None, streamed_bytes_per_step: 0 });
    };
    let p = GpuPlacement {
        gpu_memory: gpu.gpu_memory,
        max_live_bytes: gpu.max_live_bytes,
        prefetch_layers: gpu.prefetch_layers,
        kv_tokens: work.seqs * work.tokens_per_seq.min(config.max_position_embeddings),
        max_rows: work.max_rows,
        max_seqs: work.seqs,
    };
    let placed = place_on_gpu(ordinal, &config, &mut weights, &p)?;
    tracing::info!("cuda:{ordinal}: {}", placed.summary);
    Ok(Placed {
        gpu_summary: Some(placed.summary),
        streamed_bytes_per_step: placed.streamed_bytes_per_step,
        engine: AnyEngine::Cuda(Engine::new(placed.backend, config, weights)),
    })
}

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Text, tokenized with the tokenizer's default special tokens.
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: GenerationParams,
    /// Generation stops when the text contains one of these; it is not returned.
    pub stop: Vec<String>,
}

/// Wall-clock figures of one generation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The result of one generation (the `--json` output of `generate`).
#[derive(Clone, Debug, Serialize)]
pub struct GenerateOutput {
    pub prompt_token_ids: Vec<u32>,
    /// New tokens only.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: &'static str,
    pub timings: Timings,
    /// Next-token logits after the prompt, when asked for.
    #[serde(skip)]
    pub prompt_logits: Option<Vec<f32>>,
}

/// Config and weights of a model folder.
pub fn load_weights(dir: &Path) -> Result<(ModelConfig, HostWeights)> {
    let config = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let weights = HostWeights::load(&ckpt, &config)?;
    Ok((config, weights))
}

/// A model loaded whole into this process.
pub struct LocalModel {
    dir: PathBuf,
    engine: AnyEngine,
    tokenizer: Option<Tokenizer>,
    gpu_summary: Option<String>,
}

impl LocalModel {
    /// Loads `dir` (config, weights, and `tokenizer.json` when present) onto
    /// `device`, sized for `work` when that is a GPU.
    pub fn load(dir: &Path, device: Device, gpu: &GpuOptions, work: Workload) -> Result<Self> {
        let ordinal = device.resolve()?; // before reading anything: a missing GPU fails fast
        let device = ordinal.map_or(Device::Cpu, Device::Cuda);
        let (config, weights) = load_weights(dir)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() { Some(Tokenizer::from_file(&tok_path)?) } else { None };
        let placed = place(config, weights, device, gpu, work)?;
        let mut model = Self::from_parts(dir, placed.engine, tokenizer);
        model.gpu_summary = placed.gpu_summary;
        Ok(model)
    }

    pub fn from_parts(dir: &Path, engine: AnyEngine, tokenizer: Option<Tokenizer>) -> Self {
        Self { dir: dir.to_path_buf(), engine, tokenizer, gpu_summary: None }
    }

    pub fn engine(&self) -> &AnyEngine {
        &self.engine
    }

    pub fn into_engine(self) -> AnyEngine {
        self.engine
    }

    /// How the model sits on the GPU, when it runs on one.
    pub fn gpu_summary(&self) -> Option<&str> {
        self.gpu_summary.as_deref()
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    fn need_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            CoordinatorError::InvalidRequest(format!(
                "{}: no tokenizer.json; pass --prompt-ids instead of --prompt",
                self.dir.display()
            ))
        })
    }

    /// Token ids of a prompt.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Text(text) => Ok(self.need_tokenizer()?.encode(text)?),
        }
    }

    /// Generates one sequence, calling `on_text` with each piece of text as it
    /// becomes final. With `keep_logits`, the output carries the logits after
    /// the prompt.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        keep_logits: bool,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerateOutput> {
        let mut outs = self.generate_batch(std::slice::from_ref(req), keep_logits, |_, t| on_text(t))?;
        Ok(outs.remove(0))
    }

    /// Generates several sequences decoded together: one forward per step serves
    /// every active sequence, and each leaves the batch when it finishes.
    /// `on_text(i, delta)` streams request `i`'s text.
    pub fn generate_batch(
        &self,
        reqs: &[GenerateRequest],
        keep_logits: bool,
        on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<GenerateOutput>> {
        with_engine!(&self.engine, e => self.generate_batch_on(e, reqs, keep_logits, on_text))
    }

    fn generate_batch_on<B: Backend>(
        &self,
        engine: &Engine<B>,
        reqs: &[GenerateRequest],
        keep_logits: bool,
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<GenerateOutput>> {
        struct Active<'t, B: Backend> {
            seq: Sequence<B>,
            stream: TextStream<'t>,
            timings: Timings,
            logits: Option<Vec<f32>>,
            prefilled: bool,
        }
        let mut all = Vec::with_capacity(reqs.len());
        for req in reqs {
            let prompt = self.encode(&req.prompt)?;
            all.push(Active {
                timings: Timings { prompt_tokens: prompt.len(), ..Timings::default() },
                seq: engine.new_sequence(prompt, req.params.clone())?,
                stream: TextStream::new(self.tokenizer.as_ref(), &req.stop)?,
                logits: None,
                prefilled: false,
            });
        }
        let start = Instant::now();
        loop {
            let (idx, mut active): (Vec<usize>, Vec<&mut Sequence<B>>) = all
                .iter_mut()
                .enumerate()
                .filter(|(_, a)| a.seq.finished().is_none())
                .map(|(i, a)| (i, &mut a.seq))
                .unzip();
            if active.is_empty() {
                break;
            }
            let want_logits = keep_logits && active.iter().any(|s| s.generated().is_empty());
            let (tokens, logits) = engine.step_with_logits(&mut active, want_logits)?;
            let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
            for ((i, t), l) in
                idx.into_iter().zip(tokens).zip(logits.into_iter().map(Some).chain(std::iter::repeat(None)))
            {
                let a = &mut all[i];
                if !a.prefilled {
                    a.prefilled = true;
                    a.timings.prefill_ms = elapsed_ms;
                    a.logits = l;
                }
                let delta = a.stream.push(t.token)?;
                if !delta.text.is_empty() {
                    on_text(i, &delta.text);
                }
                if delta.stopped {
                    a.seq.finish(FinishReason::Stop);
                }
                if a.seq.finished().is_some() {
                    let tail = a.stream.finish()?;
                    if !tail.is_empty() {
                        on_text(i, &tail);
                    }
                    a.timings.decode_ms = elapsed_ms - a.timings.prefill_ms;
                }
            }
        }
        Ok(all
            .into_iter()
            .map(|a| {
                let mut t = a.timings;
                t.generated_tokens = a.seq.generated().len();
                t.prefill_tokens_per_s = t.prompt_tokens as f64 / (t.prefill_ms / 1e3);
                if t.generated_tokens > 1 {
                    t.decode_tokens_per_s = (t.generated_tokens - 1) as f64 / (t.decode_ms / 1e3);
                }
                GenerateOutput {
                    prompt_token_ids: a.seq.prompt().to_vec(),
                    token_ids: a.seq.generated().to_vec(),
                    text: a.stream.text,
                    finish_reason: a.seq.finished().unwrap_or(FinishReason::Length).as_str(),
                    timings: t,
                    prompt_logits: a.logits,
                }
            })
            .collect())
    }
}

/// Token ids → streamed text, with stop strings held back and cut.
pub struct TextStream<'t> {
    decoder: Option<crate::tokenizer::IncrementalDecoder<'t>>,
    stops: StopMatcher,
    stopped: bool,
    /// All text emitted so far.
    pub text: String,
}

/// Text that became final after one token.
pub struct TextDelta {
    pub text: String,
    /// A stop string matched: the sequence must end.
    pub stopped: bool,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: Option<&'t Tokenizer>, stop: &[String]) -> Result<Self> {
        if tokenizer.is_none() && !stop.is_empty() {
            return Err(CoordinatorError::InvalidRequest(
                "stop strings need a tokenizer.json in the model folder".into(),
            ));
        }
        Ok(Self {
            decoder: tokenizer.map(Tokenizer::decoder),
            stops: StopMatcher::new(stop.to_vec()),
            stopped: false,
            text: String::new(),
        })
    }

    pub fn push(&mut self, token: u32) -> Result<TextDelta> {
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(TextDelta { text: String::new(), stopped: false });
        };
        if self.stopped {
            return Ok(TextDelta { text: String::new(), stopped: true });
        }
        let raw = dec.push(token)?;
        let (text, stopped) = self.stops.push(&raw);
        self.stopped = stopped;
        self.text.push_str(&text);
        Ok(TextDelta { text, stopped })
    }

    /// The text still held back at the end of the sequence.
    pub fn finish(&mut self) -> Result<String> {
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(String::new());
        };
        if self.stopped {
            return Ok(String::new());
        }
        let raw = dec.finish()?;
        let (mut text, stopped) = self.stops.push(&raw);
        self.stopped = stopped;
        if !stopped {
            text.push_str(&self.stops.flush());
        }
        self.text.push_str(&text);
        Ok(text)
    }
}
