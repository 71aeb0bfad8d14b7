//! Flags of the one-process commands: `generate` and `bench`.
use std::path::PathBuf;

use clap::Args;

use super::{ModelArg, PlacementArgs, PromptArgs, SamplingArgs, WorkerTuning};

#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (one line per prompt) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Write the next-token logits after the prompt to FILE as a JSON array
    /// (an array of arrays when several prompts are given).
    #[arg(long, value_name = "FILE")]
    pub logits_out: Option<PathBuf>,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub source: ModelOrShape,
    /// Write the `--synthetic` model as a checkpoint folder (config.json,
    /// model.safetensors) here and exit: the same weights `bench --synthetic` computes
    /// with, for another engine to load.
    #[arg(long, value_name = "DIR", requires = "synthetic")]
    pub write_checkpoint: Option<PathBuf>,
    /// Comma-separated batch sizes.
    #[arg(long, default_value = "1,8,32")]
    pub batch: String,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Decode steps measured after the prefill.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Run a local cluster of N worker processes and measure it (0 = this process alone).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Cluster: tensors below this many bytes are replicated on every worker.
    #[arg(long, default_value_t = 65536)]
    pub persistence_threshold_bytes: u64,
    /// Cluster: what moves between the workers.
    #[command(flatten)]
    pub placement_choice: super::PlacementChoice,
    #[command(flatten)]
    pub tuning: WorkerTuning,
    /// Cluster: plaintext between members instead of mTLS (to measure what TLS costs).
    #[arg(long)]
    pub insecure: bool,
    /// Also print the figures as one JSON object (last line).
    #[arg(long)]
    pub json: bool,
}

/// A model folder, or only a shape (`bench`, `plan`): exactly one of them.
#[derive(Args, Debug)]
pub(crate) struct ModelOrShape {
    /// Hugging Face model folder (or a Hub id org/name[@revision]).
    #[arg(long, conflicts_with = "synthetic")]
    pub model: Option<PathBuf>,
    /// A random-weight model of this shape instead, e.g.
    /// `llama:hidden=1024,layers=16,heads=16,kv_heads=4,ffn=2816,vocab=32000`.
    #[arg(long)]
    pub synthetic: Option<String>,
}
