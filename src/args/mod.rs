//! Command-line arguments (clap derive; the doc comments are the help text),
//! one file per kind of command: [`member`] (`up`, `coordinator`, `worker`),
//! [`client`] (`query`, `status`, `bench-fronts`), [`local`] (`generate`,
//! `bench`), [`ops`] (`launch`, `certs`, `cuda`). Groups of flags that several
//! commands take are declared once and flattened into each.
mod client;
mod local;
mod member;
mod ops;

pub(crate) use client::*;
pub(crate) use local::*;
pub(crate) use member::*;
pub(crate) use ops::*;

use clap::{Parser, Subcommand};

/// Serve large language models from workers that each hold a slice of every weight.
#[derive(Parser, Debug)]
#[command(name = "zeroshard", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Export tracing spans (one per request, one per worker step) over
    /// OTLP/HTTP (protobuf) to this collector, e.g. http://127.0.0.1:4318
    /// (`/v1/traces` is added when the URL has no path). Workers started by
    /// `up` inherit OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// More log lines, with the module each comes from: `-v` every step of
    /// startup and membership (INFO; `up` and its workers otherwise log
    /// warnings and the placement it chose), `-vv` debug. RUST_LOG, when set,
    /// decides instead.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Generate text from a Hugging Face model folder on this machine.
    Generate(GenerateArgs),
    /// Measure prefill and decode throughput per batch size.
    Bench(BenchArgs),
    /// Start a coordinator and N worker processes on this machine.
    Up(UpArgs),
    /// Run a coordinator alone (workers join with `zeroshard worker`).
    Coordinator(CoordinatorArgs),
    /// Run a worker that joins a coordinator.
    Worker(WorkerArgs),
    /// Send one request to a cluster (same flags and --json output as generate).
    Query(QueryArgs),
    /// Measure the HTTP front against gRPC on one cluster: short requests per
    /// second and time to first token, interleaved.
    BenchFronts(BenchFrontsArgs),
    /// Print a cluster's epoch and workers.
    Status(StatusArgs),
    /// Make a cluster CA and its members' certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// What CUDA this machine offers (`info`), and compiling every kernel with
    /// the NVRTC on the library path (`kernels`: no GPU needed).
    #[command(subcommand)]
    Cuda(CudaCommand),
    /// Predict each placement for a model over N workers (bytes moved, memory
    /// per worker, prefill and decode tok/s) and say which it would choose.
    Plan(PlanArgs),
    /// Become this task's cluster member under a launcher (srun): rank 0 the
    /// coordinator, the others workers; settings from ZEROSHARD_* variables.
    Launch(LaunchArgs),
}

/// The checkpoint a command loads, declared once for `generate`, `up` and
/// `coordinator` (a worker's `--model` and `bench`'s are optional, with their
/// own meaning).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ModelArg {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a Hub id
    /// org/name[@revision]: from the hub cache, downloaded unless HF_HUB_OFFLINE=1.
    /// In a cluster the coordinator reads it; workers map it too unless --pull.
    #[arg(long, env = "ZEROSHARD_MODEL")]
    pub model: std::path::PathBuf,
}
