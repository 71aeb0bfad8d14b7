//! Flags of the clients: `query`, `status`, `bench-fronts`, and what they share
//! with `generate` (the prompt and the sampling), with the parsers of list values.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use zeroshard_coordinator::chat::ChatMessage;

/// How a client reaches a cluster: plaintext for grpc://; for grpcs:// the
/// CA (default: the bundle `up` left for that endpoint) and a client
/// certificate or an API key.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ClientTlsArgs {
    /// The cluster CA's certificate (PEM).
    #[arg(long, env = "ZEROSHARD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (role client).
    #[arg(long, env = "ZEROSHARD_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "ZEROSHARD_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// An API key of the cluster (sent as `authorization: Bearer KEY`).
    #[arg(long, env = "ZEROSHARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A file whose first line is the API key.
    #[arg(long, env = "ZEROSHARD_API_KEY_FILE", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct QueryArgs {
    /// The cluster, as `up` prints it: grpcs://HOST:PORT (TLS) or grpc://HOST:PORT.
    #[arg(long, env = "ZEROSHARD_ENDPOINT")]
    pub endpoint: String,
    #[command(flatten)]
    pub auth: ClientTlsArgs,
    #[command(flatten)]
    pub prompt: QueryPromptArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stream text as it is generated.
    #[arg(long)]
    pub stream: bool,
    /// Keep retrying an unavailable cluster (restarting coordinator,
    /// re-planning workers) this long, with backoff, before failing. An
    /// address where nothing answers (connection refused, no such host) gets
    /// three quick tries, unless the request reached the cluster before.
    #[arg(long, default_value_t = 30)]
    pub retry_for_secs: u64,
    /// Print one JSON object, as `generate --json` does.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The cluster, as `up` prints it: grpcs://HOST:PORT (TLS) or grpc://HOST:PORT.
    #[arg(long, env = "ZEROSHARD_ENDPOINT")]
    pub endpoint: String,
    #[command(flatten)]
    pub auth: ClientTlsArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `generate`'s prompts: one or several, decoded together in one batch.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub(crate) struct PromptArgs {
    /// Prompt text (tokenized with the tokenizer's default special tokens, e.g.
    /// BOS). Repeat it to decode several prompts together in one batch.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Prompt as comma-separated token ids, fed as is. Repeatable, like --prompt.
    #[arg(long)]
    pub prompt_ids: Vec<String>,
    /// A conversation, rendered with the model's chat template (the assistant's
    /// turn opened): a JSON array of {"role", "content"} messages, `-` to read
    /// that array from stdin, or plain text for one user message.
    #[arg(long, value_name = "MESSAGES")]
    pub chat: Option<String>,
}

/// `query`'s prompt: exactly one (a request is one sequence).
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub(crate) struct QueryPromptArgs {
    /// Prompt text (tokenized by the coordinator with the tokenizer's default
    /// special tokens, e.g. BOS). One per request.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, fed as is. One per request.
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// A conversation, rendered by the coordinator with the model's chat
    /// template: a JSON array of {"role", "content"} messages, `-` to read that
    /// array from stdin, or plain text for one user message.
    #[arg(long, value_name = "MESSAGES")]
    pub chat: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens with probability ≥ P (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Random seed: the same seed gives the same output.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Penalise tokens already present (transformers' repetition_penalty; 1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Stop when the generated text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

#[derive(Args, Debug)]
pub(crate) struct BenchFrontsArgs {
    /// The cluster's gRPC endpoint, as `up` prints it (grpc:// or grpcs://).
    #[arg(long, env = "ZEROSHARD_ENDPOINT")]
    pub endpoint: String,
    /// The same cluster's HTTP front, as `up --http-listen` prints it.
    #[arg(long)]
    pub http: String,
    /// The model id the HTTP front serves.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub auth: ClientTlsArgs,
    /// Prompt text of every request.
    #[arg(long, default_value = "Once upon a time")]
    pub prompt: String,
    /// Short (one-token) requests per front and round.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Clients sending them at once, each on its own connection.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Streamed requests per front and round for the time to first token.
    #[arg(long, default_value_t = 30)]
    pub ttft_samples: usize,
    /// Tokens of each streamed request.
    #[arg(long, default_value_t = 16)]
    pub stream_tokens: u32,
    /// Rounds, each running both fronts.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// `1,2,3` → ids, naming the bad entry.
pub(crate) fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, t)| {
            t.parse::<u32>().map_err(|_| anyhow::anyhow!("--prompt-ids: entry {i} \"{t}\" is not a token id"))
        })
        .collect()
}

/// `--chat`'s value: a JSON array of messages, `-` for that array on stdin,
/// or plain text as one user message.
pub(crate) fn parse_chat(s: &str) -> Result<Vec<ChatMessage>> {
    let text = if s == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t).context("--chat -: reading stdin")?;
        t
    } else {
        s.to_string()
    };
    if !text.trim_start().starts_with('[') {
        if s == "-" {
            bail!("--chat -: stdin is not a JSON array of {{\"role\", \"content\"}} messages");
        }
        return Ok(vec![ChatMessage { role: "user".into(), content: text }]);
    }
    let messages: Vec<ChatMessage> = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!("--chat: not a JSON array of {{\"role\", \"content\"}} messages: {e}")
    })?;
    if messages.is_empty() {
        bail!("--chat: the conversation has no messages");
    }
    Ok(messages)
}

/// `1,8,32` → sizes (each > 0).
pub(crate) fn parse_list(s: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?;
    if v.is_empty() || v.contains(&0) {
        bail!("expected comma-separated positive integers, got \"{s}\"");
    }
    Ok(v)
}
