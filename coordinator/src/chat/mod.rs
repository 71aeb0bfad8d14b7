//! Chat prompts: the model's own Jinja chat template, rendered as
//! transformers' `apply_chat_template(messages, add_generation_prompt=True)`
//! renders it, and the text tokenized without added special tokens (the
//! template writes BOS itself where the model wants one).
//!
//! The template comes from `chat_template.jinja` in the model folder, else
//! from `chat_template` in `tokenizer_config.json` (a string, or a list of
//! named templates of which `default` is used). It is rendered with
//! `minijinja` set up as transformers sets up Jinja: `trim_blocks`,
//! `lstrip_blocks`, loop controls, Python string and dict methods
//! (`minijinja-contrib`'s pycompat), `raise_exception(message)`,
//! `strftime_now(format)`, and the tokenizer's special tokens (`bos_token`,
//! `eos_token`, `unk_token`, `pad_token`) as variables.
//!
//! A template is code from the model folder: its fuel bounds the work it does
//! ([`FUEL`]), its output is bounded ([`OUTPUT_LIMIT_BYTES`]), and where the
//! binary has said it can ([`render_in_children_of`]) it runs in a child
//! process whose memory and CPU are capped ([`sandbox`]), so a template that
//! doubles a string forty times fails its request instead of the server.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use zeroshard_offload::model_file;

pub mod sandbox;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What went wrong; messages name the file or the template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("cannot load the chat template from {}: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("the model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json in {}): send a prompt instead of messages", dir.display())]
    NoTemplate { dir: PathBuf },
    #[error("the chat template failed: {0}")]
    Render(String),
    #[error("the conversation has no messages")]
    NoMessages,
}

/// Work one rendering may do at most: far beyond any real template over a
/// conversation that fits the prompt limit, and short of a template that loops
/// forever.
const FUEL: u64 = 50_000_000;

/// The most text one rendering may write: four times the largest request
/// body, far beyond any prompt that fits a context.
pub const OUTPUT_LIMIT_BYTES: usize = 8 << 20;

/// The special tokens a template sees as variables.
const SPECIAL_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

/// The program templates are rendered in, when the binary set one.
static RENDERER: OnceLock<PathBuf> = OnceLock::new();

/// Makes every [`ChatTemplate`] loaded from now on render in children of
/// `program` (the running binary, which must answer [`sandbox::CHILD_ARG`]
/// with [`sandbox::serve`]). Without it templates render in this process,
/// bounded by fuel and output only.
pub fn render_in_children_of(program: PathBuf) {
    let _ = RENDERER.set(program);
}

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The special tokens the template sees as variables.
    tokens: Vec<(&'static str, String)>,
    source: PathBuf,
    /// Where it renders, when not in this process.
    child: Option<sandbox::Renderer>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template of the model in `dir`, `None` when it has none. A
    /// template that does not parse is an error here, at start, not at the
    /// first chat request.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, ChatError> {
        let read = |name: &str| {
            model_file::read(dir, name)
                .map_err(|e| ChatError::Load { path: dir.join(name), reason: e.to_string() })
        };
        let config = if model_file::exists(dir, "tokenizer_config.json") {
            Some(read("tokenizer_config.json")?)
        } else {
            None
        };
        let template = if model_file::exists(dir, "chat_template.jinja") {
            Some(read("chat_template.jinja")?)
        } else {
            None
        };
        Self::from_files(dir, config.as_deref(), template.as_deref())
    }

    /// [`Self::from_model_dir`] on the bytes of `tokenizer_config.json` and
    /// `chat_template.jinja` (either may be absent); `dir` names them in
    /// messages.
    pub fn from_files(
        dir: &Path,
        config: Option<&[u8]>,
        template: Option<&[u8]>,
    ) -> Result<Option<Self>, ChatError> {
        let config = match config {
            Some(bytes) => {
                let path = dir.join("tokenizer_config.json");
                let json: TokenizerConfig = serde_json::from_slice(bytes)
                    .map_err(|e| ChatError::Load { path: path.clone(), reason: e.to_string() })?;
                Some((path, json))
            }
            None => None,
        };
        let (source, text) = match template {
            Some(bytes) => {
                let path = dir.join("chat_template.jinja");
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| ChatError::Load { path: path.clone(), reason: "not UTF-8".into() })?;
                (path, text)
            }
            None => match &config {
                Some((path, json)) => match template_in_config(json) {
                    Ok(Some(t)) => (path.clone(), t),
                    Ok(None) => return Ok(None),
                    Err(reason) => return Err(ChatError::Load { path: path.clone(), reason }),
                },
                None => return Ok(None),
            },
        };
        let tokens = config.as_ref().map(|(_, json)| special_tokens(json)).unwrap_or_default();
        Self::new(source, text, tokens).map(Some)
    }

    /// A template from its text; `source` names it in messages. It renders
    /// where [`render_in_children_of`] said, if it was called.
    pub fn new(
        source: PathBuf,
        text: String,
        tokens: Vec<(&'static str, String)>,
    ) -> Result<Self, ChatError> {
        let child =
            RENDERER.get().map(|program| sandbox::Renderer::new(program.clone(), &source, &text, &tokens));
        Ok(Self { child, ..Self::in_process(source, text, tokens)? })
    }

    /// A template that renders in this process.
    fn in_process(
        source: PathBuf,
        text: String,
        tokens: Vec<(&'static str, String)>,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // What transformers sets on its Jinja environment.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", text)
            .map_err(|e| ChatError::Load { path: source.clone(), reason: describe(&e) })?;
        Ok(Self { env, tokens, source, child: None })
    }

    /// Where the template came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened
    /// (`add_generation_prompt=True`).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ChatError> {
        if messages.is_empty() {
            return Err(ChatError::NoMessages);
        }
        match &self.child {
            Some(child) => child.render(messages),
            None => self.render_here(messages),
        }
    }

    /// [`Self::render`] in this process; the output is bounded, the memory
    /// of intermediate values is not.
    fn render_here(&self, messages: &[ChatMessage]) -> Result<String, ChatError> {
        let template = self.env.get_template("chat").map_err(|e| ChatError::Render(describe(&e)))?;
        let mut ctx: Vec<(&str, Value)> =
            vec![("messages", Value::from_serialize(messages)), ("add_generation_prompt", Value::from(true))];
        ctx.extend(self.tokens.iter().map(|(k, v)| (*k, Value::from(v.as_str()))));
        let ctx: std::collections::BTreeMap<&str, Value> = ctx.into_iter().collect();
        let mut out = Bounded(Vec::new());
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => {
                String::from_utf8(out.0).map_err(|_| ChatError::Render("the output is not UTF-8".into()))
            }
            Err(e) if e.kind() == ErrorKind::WriteFailure && out.0.len() >= OUTPUT_LIMIT_BYTES => {
                Err(ChatError::Render(format!("it wrote more than {} MiB of text", OUTPUT_LIMIT_BYTES >> 20)))
            }
            Err(e) => Err(ChatError::Render(describe(&e))),
        }
    }
}

/// The fields of a `tokenizer_config.json` a chat template needs; the rest of
/// the file is skipped while parsing, not kept.
#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<Json>,
    bos_token: Option<Json>,
    eos_token: Option<Json>,
    unk_token: Option<Json>,
    pad_token: Option<Json>,
}

impl TokenizerConfig {
    fn get(&self, key: &str) -> Option<&Json> {
        match key {
            "chat_template" => self.chat_template.as_ref(),
            "bos_token" => self.bos_token.as_ref(),
            "eos_token" => self.eos_token.as_ref(),
            "unk_token" => self.unk_token.as_ref(),
            "pad_token" => self.pad_token.as_ref(),
            _ => None,
        }
    }
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of
/// `{name, template}` of which `default` is used.
fn template_in_config(json: &TokenizerConfig) -> Result<Option<String>, String> {
    match json.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(named)) => {
            let named: Vec<(&str, &str)> = named
                .iter()
                .filter_map(|t| Some((t.get("name")?.as_str()?, t.get("template")?.as_str()?)))
                .collect();
            match named.iter().find(|(n, _)| *n == "default") {
                Some((_, t)) => Ok(Some(t.to_string())),
                None => Err(format!(
                    "chat_template lists templates {:?} but none is named \"default\"",
                    named.iter().map(|(n, _)| *n).collect::<Vec<_>>()
                )),
            }
        }
        Some(other) => Err(format!("chat_template is neither text nor a list: {other}")),
    }
}

/// The special tokens a template may use: a token is a string or an
/// `AddedToken` object with `content`.
fn special_tokens(json: &TokenizerConfig) -> Vec<(&'static str, String)> {
    SPECIAL_TOKENS
        .into_iter()
        .filter_map(|k| {
            let v = json.get(k)?;
            let s = v.as_str().or_else(|| v.get("content")?.as_str())?;
            Some((k, s.to_string()))
        })
        .collect()
}

/// A writer that fails past [`OUTPUT_LIMIT_BYTES`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > OUTPUT_LIMIT_BYTES {
            self.0.resize(OUTPUT_LIMIT_BYTES, 0);
            return Err(std::io::Error::other("the chat template's output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time now, formatted by the C library.
fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    let bad = || minijinja::Error::new(ErrorKind::InvalidOperation, "strftime_now: bad format");
    let c_format = std::ffi::CString::new(format).map_err(|_| bad())?;
    let mut buf = vec![0u8; 256];
    // SAFETY: time/localtime_r write the struct we pass; strftime writes at
    // most buf.len() bytes into buf and returns how many it wrote.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad());
        }
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm)
    };
    buf.truncate(n);
    Ok(Value::from(String::from_utf8_lossy(&buf).into_owned()))
}

/// A minijinja error on one line, with the template line it points at.
fn describe(e: &minijinja::Error) -> String {
    let mut s = match e.kind() {
        // raise_exception's own message is what the template author meant to say.
        ErrorKind::InvalidOperation => e.detail().map_or_else(|| e.to_string(), str::to_string),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Vec<(&'static str, String)> {
        vec![("bos_token", "<s>".into()), ("eos_token", "</s>".into())]
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// The Zephyr template (TinyLlama-1.1B-Chat): trim_blocks and
    /// lstrip_blocks decide every newline of its output.
    const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

    #[test]
    fn zephyr_renders_as_transformers_does() {
        let t = ChatTemplate::new("t".into(), ZEPHYR.into(), tokens()).expect("parses");
        let got = t.render(&[msg("system", "You tell stories."), msg("user", "Tell me about a cat.")]);
        // What transformers 5.24 apply_chat_template(tokenize=False) gives.
        assert_eq!(
            got.expect("renders"),
            "<|system|>\nYou tell stories.</s>\n<|user|>\nTell me about a cat.</s>\n<|assistant|>\n"
        );
    }

    #[test]
    fn python_methods_raise_exception_and_strftime_work() {
        let text = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role here') }}{% endif %}\
                    {% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}{{ strftime_now('%Y')|length }}";
        let t = ChatTemplate::new("t".into(), text.into(), tokens()).expect("parses");
        assert_eq!(t.render(&[msg("user", "  hi ")]).expect("renders"), "HI4");
        let e = t.render(&[msg("system", "x")]).expect_err("raises");
        assert!(e.to_string().contains("no system role here"), "{e}");
    }

    #[test]
    fn bad_templates_and_empty_conversations_are_errors() {
        let e = ChatTemplate::new("cfg".into(), "{% for %}".into(), tokens()).expect_err("syntax");
        assert!(e.to_string().contains("cfg"), "{e}");
        let t = ChatTemplate::new("t".into(), "{% for m in messages %}{% endfor %}".into(), tokens())
            .expect("ok");
        assert!(matches!(t.render(&[]), Err(ChatError::NoMessages)));
        let forever = ChatTemplate::new(
            "t".into(),
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}".into(),
            tokens(),
        )
        .expect("parses");
        assert!(forever.render(&[msg("user", "x")]).is_err(), "fuel bounds a runaway template");
    }

    fn config(json: serde_json::Value) -> TokenizerConfig {
        serde_json::from_value(json).expect("a tokenizer config")
    }

    #[test]
    fn template_sources_in_tokenizer_config() {
        let named = config(serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}));
        assert_eq!(template_in_config(&named).expect("ok").as_deref(), Some("D"));
        let nameless = config(serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}]}));
        assert!(template_in_config(&nameless).expect_err("no default").contains("tool_use"));
        assert_eq!(
            template_in_config(&config(serde_json::json!({"added_tokens_decoder": {}}))).expect("ok"),
            None
        );
        let added = config(
            serde_json::json!({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"}),
        );
        assert_eq!(special_tokens(&added), tokens());
    }
}
