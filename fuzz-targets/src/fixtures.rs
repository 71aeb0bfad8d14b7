//! What the targets load once: the stories260K config and tokenizer from the
//! shared fixture folder (`$ZEROSHARD_SHARED`, else `../shared` beside the checkout).
use std::path::PathBuf;
use std::sync::OnceLock;

use zeroshard_coordinator::tokenizer::Tokenizer;
use zeroshard_offload::ModelConfig;

pub(crate) fn shared() -> PathBuf {
    std::env::var_os("ZEROSHARD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

fn stories() -> PathBuf {
    shared().join("models/stories260K")
}

pub(crate) fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::from_model_dir(&stories())
            .unwrap_or_else(|e| panic!("{e} (set ZEROSHARD_SHARED)"))
            .expect("stories260K has a tokenizer.json")
    })
}

pub(crate) fn config() -> &'static ModelConfig {
    static C: OnceLock<ModelConfig> = OnceLock::new();
    C.get_or_init(|| {
        ModelConfig::from_dir(&stories()).unwrap_or_else(|e| panic!("{e} (set ZEROSHARD_SHARED)"))
    })
}
