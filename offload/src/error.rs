//! The crate's one error type.
use std::path::PathBuf;

/// Everything that can go wrong turning a model folder into host tensors. Each
/// message is one line naming the file and key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A folder without `config.json` that holds a GGUF file instead.
    #[error(
        "{dir} holds a GGUF file ({file}); zeroshard reads Hugging Face folders (config.json + *.safetensors)"
    )]
    Gguf { dir: PathBuf, file: String },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    /// A config key is missing, malformed or has a value zeroshard does not support.
    #[error("{path}: key `{key}`: {message}")]
    Config { path: PathBuf, key: String, message: String },
    /// The safetensors file itself is malformed (header, offsets, truncation).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}, supported: F32, F16, BF16")]
    UnsupportedDType { path: PathBuf, tensor: String, dtype: String },
    #[error("tensor `{tensor}` not found in the checkpoint at {path}")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    /// A weight that is NaN or infinite in the f16 the model computes with (a
    /// NaN or Inf in the file, or an f32 beyond f16's range).
    #[error("{path}: tensor `{tensor}`: element {index} is {value}; weights must be finite f16 values")]
    NonFinite { path: PathBuf, tensor: String, index: usize, value: String },
    #[error("tensor `{tensor}`: element range {start}..{end} is outside its {len} elements")]
    Range { tensor: String, start: usize, end: usize, len: usize },
    /// A checkpoint file that is no longer what was opened and validated.
    #[error("{path} changed while in use: {what}; restart with the new checkpoint (a checkpoint is replaced by writing new files and renaming them, never rewritten in place)")]
    Changed { path: PathBuf, what: String },
    /// The device staging ring was used beyond its depth or slot size.
    #[error("staging: {0}")]
    Staging(String),
    /// A request (prompt, sampling values, synthetic spec) that cannot run as given.
    #[error("{0}")]
    InvalidRequest(String),
    /// Bytes that do not match the checkpoint's block digests.
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    /// `--gpu-memory` cannot hold what the model needs.
    #[error("{0}")]
    GpuMemory(String),
}

pub type Result<T> = std::result::Result<T, OffloadError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> OffloadError {
    let path = path.into();
    move |source| OffloadError::Io { path, source }
}
