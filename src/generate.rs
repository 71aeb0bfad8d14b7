//! `generate`: a whole model in this process, tokenizer + engine: text in,
//! streamed text out. The binary composes the two sides here (the coordinator
//! crate's tokenizer and text streams, the worker crate's engine), since
//! neither library links the other.
//!
//! ```ignore
//! let model = LocalModel::load(Path::new("models/stories260K"), Device::Auto, &GpuOptions::default(), work)?;
//! let out = model.generate(&request, false, |delta| print!("{delta}"))?;
//! ```
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Result};
use zeroshard_coordinator::chat::{ChatError, ChatTemplate};
use zeroshard_coordinator::request::{FinishReason, GenerateOutput, GenerateRequest, Prompt, Timings};
use zeroshard_coordinator::text_stream::TextStream;
use zeroshard_coordinator::tokenizer::Tokenizer;
use zeroshard_engine::engine::{Engine, Sequence};
use zeroshard_engine::local::{self, AnyEngine, Device, GpuOptions, Workload};
use zeroshard_engine::{with_engine, Backend};

/// A model loaded whole into this process.
pub(crate) struct LocalModel {
    dir: PathBuf,
    engine: AnyEngine,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    gpu_summary: Option<String>,
}

impl LocalModel {
    /// Loads `dir` (config, weights, and `tokenizer.json` when present) onto
    /// `device`, sized for `work` when that is a GPU.
    pub(crate) fn load(dir: &Path, device: Device, gpu: &GpuOptions, work: Workload) -> Result<Self> {
        let ordinal = device.resolve()?; // before reading anything: a missing GPU fails fast
        let device = ordinal.map_or(Device::Cpu, Device::Cuda);
        let (config, weights) = local::load_weights(dir)?;
        let tokenizer = Tokenizer::from_model_dir(dir)?;
        let placed = local::place(config, weights, device, gpu, work)?;
        let mut model = Self::from_parts(dir, placed.engine, tokenizer);
        model.chat_template = ChatTemplate::from_model_dir(dir)?;
        model.gpu_summary = placed.gpu_summary;
        Ok(model)
    }

    pub(crate) fn from_parts(dir: &Path, engine: AnyEngine, tokenizer: Option<Tokenizer>) -> Self {
        Self { dir: dir.to_path_buf(), engine, tokenizer, chat_template: None, gpu_summary: None }
    }

    fn need_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            anyhow!("{}: no tokenizer.json; pass --prompt-ids instead of --prompt", self.dir.display())
        })
    }

    /// Token ids of a prompt.
    pub(crate) fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Text(text) => Ok(self.need_tokenizer()?.encode_prompt(text)?),
            Prompt::Chat(messages) => {
                let template = self
                    .chat_template
                    .as_ref()
                    .ok_or_else(|| anyhow::Error::new(ChatError::NoTemplate { dir: self.dir.clone() }))?;
                Ok(self.need_tokenizer()?.encode_rendered(&template.render(messages)?)?)
            }
        }
    }

    /// Generates several sequences decoded together: one forward per step serves
    /// every active sequence, and each leaves the batch when it finishes.
    /// `on_text(i, delta)` streams request `i`'s text.
    pub(crate) fn generate_batch(
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
                stream: TextStream::new(self.tokenizer.as_ref(), &prompt, &req.stop)?,
                seq: engine.new_sequence(prompt, req.params.clone())?,
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
                if let Some(why) = t.fault {
                    anyhow::bail!("sequence {i}: {why}");
                }
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
