//! `tokenizer_config.json` bytes and a conversation → a rendered chat prompt.
use std::path::Path;

use zeroshard_coordinator::chat::{ChatMessage, ChatTemplate, OUTPUT_LIMIT_BYTES};

/// `data` is `tokenizer_config.json`, then optionally a NUL byte and a JSON
/// list of `{role, content}` messages (else one user message). Renders in this
/// process: the fuel and output bounds hold here; memory is the renderer
/// child's to bound (run libFuzzer with `-rss_limit_mb` to flag what it caps).
pub fn chat_template(data: &[u8]) {
    let (config, messages) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(Some(template)) = ChatTemplate::from_files(Path::new("model"), Some(config), None) else {
        return;
    };
    let messages: Vec<ChatMessage> = messages
        .and_then(|m| serde_json::from_slice(m).ok())
        .unwrap_or_else(|| vec![ChatMessage { role: "user".into(), content: "Hello there".into() }]);
    match template.render(&messages) {
        Ok(text) => assert!(text.len() <= OUTPUT_LIMIT_BYTES, "{} bytes rendered", text.len()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
