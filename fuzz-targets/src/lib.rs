//! The bodies of zeroshard's fuzz targets, in one place that builds on stable:
//! `fuzz/` (cargo-fuzz, libFuzzer) calls them with generated inputs, and this
//! crate's tests call them with every file of the committed seed corpus
//! (`fuzz/corpus/<target>/`), so the harness cannot rot.
//!
//! Each target takes arbitrary bytes and must return without panicking, and
//! checks what the code under test promises beyond "no panic" (an accepted
//! safetensors header lies inside the file without overlaps, a streamed
//! decode equals the full decode, …):
//! - [`safetensors`]: the safetensors header and shard index parsers;
//! - [`config`]: `config.json` (+ `generation_config.json`) parsing and validation;
//! - [`request`]: a `GenerateRequest` / `RunSequenceRequest` decoded by prost,
//!   converted and validated as the coordinator and the worker do;
//! - [`detokenizer`]: token ids and stop strings through the incremental decoder,
//!   the stop matcher and `TextStream`, with the stories260K tokenizer;
//! - [`chat_template`]: `tokenizer_config.json` parsing and the chat template
//!   renderer (fuel and output bounds) over a conversation.
//!
//! ```no_run
//! zeroshard_fuzz_targets::run("config", br#"{"architectures": ["LlamaForCausalLM"]}"#);
//! ```
mod chat_template;
mod config;
mod detokenizer;
mod fixtures;
mod request;
mod safetensors;

pub use chat_template::chat_template;
pub use config::config;
pub use detokenizer::detokenizer;
pub use request::request;
pub use safetensors::safetensors;

/// A fuzz target: arbitrary bytes in, a panic on any finding.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus folder and cargo-fuzz binary.
pub const TARGETS: [(&str, Target); 5] = [
    ("safetensors", safetensors),
    ("config", config),
    ("request", request),
    ("detokenizer", detokenizer),
    ("chat_template", chat_template),
];

/// Runs target `name` on `data`; panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    let (_, f) = TARGETS.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no fuzz target {name}"));
    f(data)
}

#[cfg(test)]
mod seeds;
#[cfg(test)]
mod tests;
