//! Text ↔ token ids for a checkpoint's `tokenizer.json`, and streaming output.
//!
//! - [`Tokenizer`]: wraps the Hugging Face `tokenizers` crate; encodes with the
//!   checkpoint's special tokens (BOS where its post-processor adds one).
//! - [`IncrementalDecoder`]: turns ids, one at a time, into text deltas whose
//!   concatenation is exactly `decode(all ids, false)`.
//! - [`StopMatcher`]: cuts the stream at the first stop string, never letting
//!   any part of it out.
//!
//! ```no_run
//! # fn main() -> Result<(), zeroshard_coordinator::tokenizer::TokenizerError> {
//! use std::path::Path;
//! use zeroshard_coordinator::tokenizer::{StopMatcher, Tokenizer};
//!
//! let tokenizer = Tokenizer::from_file(Path::new("model/tokenizer.json"))?;
//! let prompt = tokenizer.encode("Once upon a time")?;
//! let mut decoder = tokenizer.decoder_with_context(&prompt)?;
//! let mut stops = StopMatcher::new(vec!["The end".to_string()]);
//! for id in [261, 378] {
//!     let (text, stopped) = stops.push(&decoder.push(id)?);
//!     print!("{text}");
//!     if stopped {
//!         return Ok(());
//!     }
//! }
//! let (text, _) = stops.push(&decoder.finish()?);
//! print!("{text}{}", stops.flush());
//! # Ok(())
//! # }
//! ```
use std::fmt;
use std::path::{Path, PathBuf};

use zeroshard_offload::model_file;

/// Tokens of context [`Tokenizer::pieces`] decodes a token after: enough for
/// a SentencePiece decoder to keep the space in front of a word.
pub const PIECE_CONTEXT: usize = 4;

/// What went wrong; every message names the tokenizer file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {}: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("tokenizer {}: cannot encode text: {reason}", path.display())]
    Encode { path: PathBuf, reason: String },
    #[error("tokenizer {}: cannot decode ids: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    /// A prompt text that encodes to no token (empty text, with a tokenizer
    /// that adds no BOS).
    #[error("the prompt is empty after tokenization")]
    EmptyPrompt,
}

/// The replacement character a decoder emits for bytes that are not (yet)
/// valid UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

/// A checkpoint's tokenizer, loaded from its `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`; the error names the path and the reason. The
    /// file is read as any model file is ([`model_file::read`]: a regular
    /// file inside its folder, of bounded size).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let load_err = |reason: String| TokenizerError::Load { path: path.to_path_buf(), reason };
        let name =
            path.file_name().and_then(|n| n.to_str()).ok_or_else(|| load_err("not a file name".into()))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let bytes = model_file::read_limited(dir, name, model_file::TOKENIZER_LIMIT_BYTES)
            .map_err(|e| load_err(e.to_string()))?;
        Self::from_bytes(path, &bytes)
    }

    /// `dir/tokenizer.json` if the folder has one (anything by that name that
    /// is not a regular file inside the folder is refused, not skipped).
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, TokenizerError> {
        if !model_file::exists(dir, "tokenizer.json") {
            return Ok(None);
        }
        Self::from_file(&dir.join("tokenizer.json")).map(Some)
    }

    /// A tokenizer from the bytes of a `tokenizer.json`; `path` names it in
    /// messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), reason: one_line(&*e) })?;
        Ok(Self { inner, path: path.to_path_buf() })
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes `text` with the tokenizer's default special tokens (BOS where
    /// the post-processor adds it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode { path: self.path.clone(), reason: one_line(&*e) })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`Self::encode`] of a prompt, which must give at least one token:
    /// empty text is a prompt when the tokenizer adds BOS (generation starts
    /// from it), and refused when it adds nothing.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let ids = self.encode(text)?;
        if ids.is_empty() {
            return Err(TokenizerError::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Encodes text a chat template rendered: no special tokens added (the
    /// template wrote them), as transformers' `apply_chat_template` does; it
    /// must give at least one token.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let ids = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode { path: self.path.clone(), reason: one_line(&*e) })?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(TokenizerError::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Decodes `ids` to text. Ids outside the vocabulary are skipped, as the
    /// `tokenizers` crate does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode { path: self.path.clone(), reason: one_line(&*e) })
    }

    /// The text each of `ids` would add after the tokens `before` (of which
    /// only the last [`PIECE_CONTEXT`] are decoded, once for all of them):
    /// how a log-probability listing shows a token and its alternatives,
    /// the space in front of a word included. Special tokens add nothing; a
    /// token whose text changes what came before (part of a character)
    /// shows as its own decoding.
    pub fn pieces(&self, before: &[u32], ids: impl IntoIterator<Item = u32>) -> Vec<String> {
        let context = &before[before.len().saturating_sub(PIECE_CONTEXT)..];
        let prefix = self.decode(context, true);
        let mut with = context.to_vec();
        ids.into_iter()
            .map(|id| {
                with.truncate(context.len());
                with.push(id);
                match (&prefix, self.decode(&with, true)) {
                    (Ok(a), Ok(b)) if b.starts_with(a.as_str()) => b[a.len()..].to_string(),
                    _ => self.decode(&[id], true).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token` (e.g. `"</s>"`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A streaming decoder starting from an empty sequence.
    pub fn decoder(&self) -> IncrementalDecoder<'_> {
        IncrementalDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            stable_end: 0,
            prefix_text: String::new(),
            text: String::new(),
        }
    }

    /// A streaming decoder that continues after `context` (usually the
    /// prompt) without emitting it. Decoding in context keeps the space in
    /// front of the first generated word, which a SentencePiece decoder strips
    /// from the first token of a sequence. The deltas are what
    /// `decode(context + generated, false)` adds after the context's text; a
    /// context ending in an incomplete character has that character emitted
    /// as part of the output, once it is resolved.
    pub fn decoder_with_context(&self, context: &[u32]) -> Result<IncrementalDecoder<'_>, TokenizerError> {
        let mut decoder = self.decoder();
        decoder.ids.extend_from_slice(context);
        // A context whose text is whole (no character left incomplete) is
        // final as it is, even where it ends in a byte-fallback run (a
        // chat template's "\n"): its text was the client's and is not
        // repeated. Should the next tokens extend that run, the text is held
        // back until the run decodes as an extension of it again.
        let whole = self.decode(context, false)?;
        if !whole.ends_with(REPLACEMENT) {
            decoder.read_offset = context.len();
            decoder.stable_end = context.len();
            decoder.prefix_text = whole;
            return Ok(decoder);
        }
        decoder.stable_end = context.iter().rposition(|&id| self.ends_byte_run(id)).map_or(0, |i| i + 1);
        // The context's text up to the read offset must be final: step back
        // over a tail that still decodes to an incomplete character.
        let mut read_offset = decoder.stable_end;
        let mut prefix_text = self.decode(&context[..read_offset], false)?;
        while read_offset > 0 && prefix_text.ends_with(REPLACEMENT) {
            read_offset = context[..read_offset - 1]
                .iter()
                .rposition(|&id| self.ends_byte_run(id))
                .map_or(0, |i| i + 1);
            prefix_text = self.decode(&context[..read_offset], false)?;
        }
        decoder.read_offset = read_offset;
        decoder.stable_end = decoder.stable_end.max(read_offset);
        decoder.prefix_text = prefix_text;
        Ok(decoder)
    }

    /// True when `id` is a known token that is not a byte-fallback token
    /// (`<0xAB>`), so it closes any run of byte tokens before it. The
    /// `ByteFallback` decoder turns a whole run into text at once, as UTF-8
    /// if the run is valid and one U+FFFD per byte if not: the text of a run
    /// is final only once a token that is not a byte ends it. Unknown ids are
    /// skipped by `decode` and so close nothing.
    fn ends_byte_run(&self, id: u32) -> bool {
        match self.inner.id_to_token(id) {
            Some(token) => !is_byte_fallback_token(&token),
            None => false,
        }
    }
}

/// Mirrors the test in the `tokenizers` crate's `ByteFallback` decoder.
fn is_byte_fallback_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && u8::from_str_radix(&token[3..5], 16).is_ok()
}

/// An error message on one line.
fn one_line(error: &(dyn std::error::Error + Send + Sync)) -> String {
    error.to_string().lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Streaming detokenization: push ids one at a time and get the text that
/// became final. The concatenation of every delta and [`finish`] is exactly
/// `decode(all ids, false)`.
///
/// Each step decodes a window `ids[prefix_offset..]` and emits what it adds
/// beyond the text of `ids[prefix_offset..read_offset]`, as
/// text-generation-inference does, so decoders that treat the first token
/// specially (the Llama decoders strip its leading space) behave as in a full
/// decode. Text is held back while it could still change: while the window
/// ends in U+FFFD (an incomplete UTF-8 character of a byte-level tokenizer)
/// and while the sequence ends in a run of byte-fallback tokens (see
/// [`Tokenizer`]'s `ends_byte_run`). Offsets only ever move to such stable
/// points, which makes the window's text a true suffix of the full decode.
///
/// [`finish`]: IncrementalDecoder::finish
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Every id pushed (after the context, if any).
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
    /// End of the ids whose text can no longer change (after the last token
    /// that closes a byte-fallback run).
    stable_end: usize,
    /// `decode(ids[prefix_offset..read_offset])`.
    prefix_text: String,
    /// Everything emitted so far.
    text: String,
}

impl IncrementalDecoder<'_> {
    /// Adds `id`; returns the text that became final (often empty while a
    /// multi-token character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        if self.tokenizer.ends_byte_run(id) {
            self.stable_end = self.ids.len();
        }
        if self.stable_end <= self.read_offset {
            return Ok(String::new());
        }
        let window = self.tokenizer.decode(&self.ids[self.prefix_offset..self.stable_end], false)?;
        if window.ends_with(REPLACEMENT) || window.len() <= self.prefix_text.len() {
            return Ok(String::new());
        }
        let Some(delta) = window.strip_prefix(self.prefix_text.as_str()) else {
            // Not seen with the decoders in use; widening the window until it
            // agrees again keeps the output exact.
            tracing::debug!(
                path = %self.tokenizer.path.display(),
                "decode window does not extend its prefix; holding text back"
            );
            return Ok(String::new());
        };
        let delta = delta.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.stable_end;
        self.prefix_text = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// Ends the stream: returns the text still held back (an incomplete
    /// character comes out as U+FFFD, as in a full decode). Calling it again
    /// returns an empty string.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let end = self.ids.len();
        if end <= self.read_offset {
            return Ok(String::new());
        }
        let window = self.tokenizer.decode(&self.ids[self.prefix_offset..end], false)?;
        let delta = match window.strip_prefix(self.prefix_text.as_str()) {
            Some(delta) => delta.to_string(),
            None => {
                tracing::warn!(
                    path = %self.tokenizer.path.display(),
                    "decode window does not extend its prefix at the end of the stream"
                );
                window
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = end;
        self.stable_end = end;
        self.prefix_text = self.tokenizer.decode(&self.ids[self.prefix_offset..end], false)?;
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Stop strings: feed text deltas; reports when a stop string appears anywhere
/// in the text (also across delta boundaries). Text that could be the start of
/// a stop string is held back, so the emitted text never contains any part of
/// the stop string that matched.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Longest stop string, in bytes.
    max_len: usize,
    /// Held-back text: a suffix that is a proper prefix of some stop string.
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self { stops, max_len, pending: String::new(), stopped: false }
    }

    /// Returns (text safe to emit now, stopped). Once stopped, the text
    /// before the earliest match has been returned and every later call
    /// returns `("", true)`.
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.push_str(delta);
        // A match cannot start in text already emitted: that text was not
        // the start of any stop string.
        let first_match = self.stops.iter().filter_map(|stop| self.pending.find(stop.as_str())).min();
        if let Some(start) = first_match {
            self.pending.truncate(start);
            self.stopped = true;
            return (std::mem::take(&mut self.pending), true);
        }
        let hold = self.held_suffix_start();
        let rest = self.pending.split_off(hold);
        (std::mem::replace(&mut self.pending, rest), false)
    }

    /// The held-back text, at the end of a stream that did not stop.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Whether a stop string has matched.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Start of the longest suffix of `pending` that is a proper prefix of a
    /// stop string (`pending.len()` when there is none).
    fn held_suffix_start(&self) -> usize {
        let earliest = self.pending.len().saturating_sub(self.max_len);
        self.pending
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let suffix = &self.pending[i..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(self.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared folder: `$ZEROSHARD_SHARED`, else `../../shared` from this crate.
    fn shared_dir() -> PathBuf {
        std::env::var_os("ZEROSHARD_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
    }

    fn load(model: &str) -> Tokenizer {
        let path = shared_dir().join("models").join(model).join("tokenizer.json");
        assert!(
            path.is_file(),
            "test fixture {} is missing (set ZEROSHARD_SHARED to the shared folder)",
            path.display()
        );
        Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    fn stories() -> Tokenizer {
        load("stories260K")
    }

    fn gpt2() -> Tokenizer {
        load("tiny-random-gpt2")
    }

    #[test]
    fn an_empty_prompt_is_bos_or_refused() {
        // stories260K adds BOS (id 1): generation starts from it.
        assert_eq!(stories().encode_prompt("").expect("BOS alone"), vec![1]);
        // GPT-2 adds nothing: no token to start from.
        assert!(matches!(gpt2().encode_prompt(""), Err(TokenizerError::EmptyPrompt)));
    }

    /// splitmix64: enough randomness for picking ids.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Streams `ids` and checks the deltas against a full decode; returns the deltas.
    fn assert_streams_exactly(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut decoder = tokenizer.decoder();
        let mut deltas = Vec::new();
        for &id in ids {
            deltas.push(decoder.push(id).expect("push"));
        }
        deltas.push(decoder.finish().expect("finish"));
        let expected = tokenizer.decode(ids, false).expect("decode");
        assert_eq!(deltas.concat(), expected, "ids {ids:?}, deltas {deltas:?}");
        assert_eq!(decoder.text(), expected);
        assert_eq!(decoder.finish().expect("second finish"), "");
        deltas
    }

    #[test]
    fn encodes_like_the_reference() {
        let tokenizer = stories();
        assert_eq!(tokenizer.encode("Once upon a time").expect("encode"), vec![1, 403, 407, 261, 378]);
        assert_eq!(
            tokenizer.encode("Mia said, \"Look at the bird!\"\nThe bird").expect("encode"),
            vec![
                1, 392, 417, 412, 336, 432, 313, 438, 347, 433, 261, 413, 265, 268, 315, 418, 443, 436, 13,
                434, 260, 268, 315, 418
            ]
        );
        assert_eq!(tokenizer.vocab_size(), 512);
        assert_eq!(tokenizer.token_to_id("</s>"), Some(2));
    }

    #[test]
    fn decodes_like_the_reference() {
        let tokenizer = stories();
        let ids = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317];
        assert_eq!(tokenizer.decode(&ids, false).expect("decode"), DECODED_REFERENCE);
        assert_eq!(
            tokenizer.decode(&[1, 403, 407, 261, 378], false).expect("decode"),
            "<s> Once upon a time"
        );
        assert_eq!(tokenizer.decode(&[1, 403, 407, 261, 378], true).expect("decode"), "Once upon a time");
    }
    /// The brief expected more text; these ten ids decode to this.
    const DECODED_REFERENCE: &str = ", there was a little girl named Lily";

    #[test]
    fn gpt2_round_trips() {
        let tokenizer = gpt2();
        let text = "Hello world, café ☕ naïve!";
        let ids = tokenizer.encode(text).expect("encode");
        assert_eq!(tokenizer.decode(&ids, false).expect("decode"), text);
        assert_eq!(tokenizer.vocab_size(), 1000);
        // This tiny vocabulary lacks some byte symbols, and without an unknown
        // token the model drops them silently: 🦀 comes back damaged.
        let ids = tokenizer.encode("🦀").expect("encode");
        assert_eq!(tokenizer.decode(&ids, false).expect("decode"), "\u{FFFD}".repeat(3));
    }

    #[test]
    fn load_error_names_the_path() {
        let path = Path::new("/nonexistent/zeroshard/tokenizer.json");
        let message = Tokenizer::from_file(path).expect_err("missing file").to_string();
        assert!(message.contains("/nonexistent/zeroshard/tokenizer.json"), "{message}");
        assert!(!message.contains('\n'), "{message}");

        let dir = std::env::temp_dir().join(format!("zeroshard-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let bad = dir.join("tokenizer.json");
        std::fs::write(&bad, "{\"model\": 3}").expect("write");
        let message = Tokenizer::from_file(&bad).expect_err("bad json").to_string();
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert!(message.contains(&bad.display().to_string()), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn model_dir_tokenizer_must_be_a_regular_file_inside_the_folder() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(Tokenizer::from_model_dir(dir.path()).expect("absent is fine").is_none());
        let path = dir.path().join("tokenizer.json");
        let c = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("cstr");
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let message = Tokenizer::from_model_dir(dir.path()).expect_err("a FIFO").to_string();
        assert!(message.contains("a FIFO, not a regular file"), "{message}");
        std::fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink("/etc/hostname", &path).expect("symlink");
        let message = Tokenizer::from_model_dir(dir.path()).expect_err("outside").to_string();
        assert!(message.contains("outside the model folder"), "{message}");
    }

    #[test]
    fn streams_the_reference_ids() {
        let tokenizer = stories();
        let ids = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317];
        let deltas = assert_streams_exactly(&tokenizer, &ids);
        // Every token here is final as soon as it arrives.
        assert!(deltas[..ids.len()].iter().all(|d| !d.is_empty()), "{deltas:?}");
        assert_streams_exactly(&tokenizer, &[1, 403, 407, 261, 378]);
    }

    #[test]
    fn streams_multi_byte_characters() {
        // stories260K spells everything outside its 512 tokens with byte
        // fallback, so the emoji and CJK arrive as runs of 3–4 byte tokens.
        let text = "Lily said: é, naïve café 🦀 日本語 😀😀!";
        let tokenizer = stories();
        let ids = tokenizer.encode(text).expect("encode");
        let deltas = assert_streams_exactly(&tokenizer, &ids);
        assert_eq!(deltas.concat(), format!("<s> {text}"));
        assert!(deltas.iter().all(|d| !d.contains(REPLACEMENT)), "{deltas:?}");
        // A run of byte tokens comes out with the token that closes it.
        assert!(deltas.contains(&"🦀 ".to_string()), "{deltas:?}");

        // Byte-level BPE: "é" and "☕" are split over tokens at byte level.
        let text = "é, naïve café ☕ and ☕☕!";
        let tokenizer = gpt2();
        let ids = tokenizer.encode(text).expect("encode");
        let deltas = assert_streams_exactly(&tokenizer, &ids);
        assert_eq!(deltas.concat(), text);
        assert!(deltas.iter().all(|d| !d.contains(REPLACEMENT)), "{deltas:?}");
        assert!(deltas.iter().any(|d| d.is_empty()), "a character spans tokens: {deltas:?}");
    }

    #[test]
    fn byte_fallback_run_is_held_until_it_ends() {
        let tokenizer = stories();
        let byte = |b: u8| tokenizer.token_to_id(&format!("<0x{b:02X}>")).expect("byte token");
        let the = tokenizer.encode("the").expect("encode")[1..].to_vec();
        // "é" then a lone 0xFF: the whole run decodes to three U+FFFD, so the
        // "é" must not have been emitted early.
        let mut ids = the.clone();
        ids.extend([byte(0xC3), byte(0xA9), byte(0xFF)]);
        ids.extend(&the);
        assert_streams_exactly(&tokenizer, &ids);
        let mut decoder = tokenizer.decoder();
        let mut out = String::new();
        for &id in &ids[..the.len() + 2] {
            out += &decoder.push(id).expect("push");
        }
        assert_eq!(out, "the", "a byte run is not final before it ends");
    }

    #[test]
    fn streams_random_ids_exactly() {
        let mut rng = Rng(2024);
        for tokenizer in [stories(), gpt2()] {
            let vocab = tokenizer.vocab_size();
            for _ in 0..400 {
                let len = 1 + rng.below(40);
                let ids: Vec<u32> = (0..len).map(|_| rng.below(vocab) as u32).collect();
                assert_streams_exactly(&tokenizer, &ids);
            }
        }
    }

    #[test]
    fn streams_random_byte_tokens_exactly() {
        // Mostly byte-fallback tokens, so runs form, resolve and break.
        let tokenizer = stories();
        let bytes: Vec<u32> = (0..=255u8)
            .map(|b| tokenizer.token_to_id(&format!("<0x{b:02X}>")).expect("byte token"))
            .collect();
        let utf8 = "é😀日".as_bytes();
        let mut rng = Rng(7);
        for _ in 0..400 {
            let len = 1 + rng.below(30);
            let ids: Vec<u32> = (0..len)
                .map(|_| match rng.below(4) {
                    0 => rng.below(tokenizer.vocab_size()) as u32,
                    1 => bytes[rng.below(256)],
                    _ => bytes[utf8[rng.below(utf8.len())] as usize],
                })
                .collect();
            assert_streams_exactly(&tokenizer, &ids);
        }
    }

    #[test]
    fn context_keeps_the_leading_space() {
        let tokenizer = stories();
        let prompt = tokenizer.encode("Once upon a time").expect("encode");
        let generated = tokenizer.encode(" there was a girl named Lily.").expect("encode");
        let generated = &generated[1..]; // without BOS
        let mut decoder = tokenizer.decoder_with_context(&prompt).expect("decoder");
        let mut out = String::new();
        for &id in generated {
            out += &decoder.push(id).expect("push");
        }
        out += &decoder.finish().expect("finish");
        let all: Vec<u32> = prompt.iter().chain(generated).copied().collect();
        let full = tokenizer.decode(&all, false).expect("decode");
        let prompt_text = tokenizer.decode(&prompt, false).expect("decode");
        assert_eq!(out, full[prompt_text.len()..]);
        assert!(out.starts_with(' '), "{out:?}");

        // Without context the first token loses its space.
        let mut plain = tokenizer.decoder();
        assert!(!plain.push(generated[0]).expect("push").starts_with(' '));
    }

    #[test]
    fn context_ending_mid_character_emits_the_character() {
        let tokenizer = stories();
        // A crab and newlines: characters spelled in byte-fallback tokens.
        let ids = tokenizer.encode("a 🦀 crab\nsaid\n\n hi").expect("encode");
        for split in 1..ids.len() {
            let mut decoder = tokenizer.decoder_with_context(&ids[..split]).expect("decoder");
            let mut out = String::new();
            for &id in &ids[split..] {
                out += &decoder.push(id).expect("push");
            }
            out += &decoder.finish().expect("finish");
            let full = tokenizer.decode(&ids, false).expect("decode");
            assert!(full.ends_with(&out), "split {split}: {out:?} vs {full:?}");
            assert!(!out.contains(REPLACEMENT), "split {split}: {out:?}");
            // A context with whole characters: its text + the output is the whole text.
            let before = tokenizer.decode(&ids[..split], false).expect("decode");
            if !before.ends_with(REPLACEMENT) {
                assert_eq!(before + &out, full, "split {split}");
            }
        }
    }

    fn run_stops(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for delta in deltas {
            let (text, stopped) = matcher.push(delta);
            out += &text;
            if stopped {
                return (out, true);
            }
        }
        out += &matcher.flush();
        (out, false)
    }

    #[test]
    fn stop_split_across_deltas() {
        let mut matcher = StopMatcher::new(vec!["The end".to_string()]);
        assert_eq!(matcher.push("and they lived. Th"), ("and they lived. ".to_string(), false));
        assert_eq!(matcher.push("e e"), (String::new(), false));
        assert_eq!(matcher.push("nd!"), (String::new(), true));
        assert!(matcher.stopped());
        assert_eq!(matcher.push("more"), (String::new(), true));
        assert_eq!(matcher.flush(), "");
    }

    #[test]
    fn held_text_is_released_when_the_match_fails() {
        let mut matcher = StopMatcher::new(vec!["The end".to_string()]);
        assert_eq!(matcher.push("The e"), (String::new(), false));
        assert_eq!(matcher.push("nchanted"), ("The enchanted".to_string(), false));
        assert_eq!(matcher.push(" Th"), (" ".to_string(), false));
        assert_eq!(matcher.flush(), "Th");
    }

    #[test]
    fn multiple_stops_earliest_wins() {
        assert_eq!(
            run_stops(&["\n\n", "bird", "at the"], &["Look a", "t the bi", "rd\n\nok"]),
            ("Look ".to_string(), true)
        );
        assert_eq!(run_stops(&["xyz", "b"], &["aaa", "ab"]), ("aaaa".to_string(), true));
        // Overlapping candidates: "aab" must be found after the "aa" prefix.
        assert_eq!(run_stops(&["aab"], &["xa", "a", "ab"]), ("xa".to_string(), true));
    }

    #[test]
    fn stop_at_the_very_start() {
        assert_eq!(run_stops(&["Hello"], &["Hello world"]), (String::new(), true));
        assert_eq!(run_stops(&["Hello"], &["He", "llo"]), (String::new(), true));
    }

    #[test]
    fn no_stop_passes_everything_through() {
        let deltas = ["Once", " upon", " a", " time", " 🦀", "!"];
        assert_eq!(run_stops(&["The end", "🦀🦀"], &deltas), (deltas.concat(), false));
        assert_eq!(run_stops(&[], &deltas), (deltas.concat(), false));
        assert_eq!(run_stops(&[""], &deltas), (deltas.concat(), false));
        let mut matcher = StopMatcher::new(vec!["end".to_string()]);
        assert_eq!(matcher.push("a dog"), ("a dog".to_string(), false));
        assert_eq!(matcher.push(" we"), (" w".to_string(), false));
    }

    #[test]
    fn stop_matcher_keeps_utf8_boundaries() {
        // The stop shares a first byte with the text's characters.
        assert_eq!(run_stops(&["日本語"], &["日本", "人", "日", "本語です"]), ("日本人".to_string(), true));
    }
}
