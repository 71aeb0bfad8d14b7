//! [`TextStream`]: token ids in, text out as it becomes final, with stop
//! strings held back and cut. One per sequence, for `generate` and for the
//! cluster's streams alike.
use crate::error::{CoordinatorError, Result};
use crate::tokenizer::{IncrementalDecoder, StopMatcher, Tokenizer};

/// Token ids → streamed text, with stop strings held back and cut.
pub struct TextStream<'t> {
    decoder: Option<IncrementalDecoder<'t>>,
    stops: StopMatcher,
    stopped: bool,
    /// All text emitted so far.
    pub text: String,
}

/// Text that became final after one token.
pub struct TextDelta {
    pub text: String,
    /// A stop string matched: the sequence must end.
    pub stopped: bool,
}

impl<'t> TextStream<'t> {
    /// A stream of the text that follows `prompt`: decoded in the prompt's
    /// context, so the completion keeps the space in front of its first
    /// word and prompt text + completion text is the text of all the tokens
    /// (a SentencePiece decoder drops that space from a sequence's first
    /// token). The prompt is decoded once, here.
    pub fn new(tokenizer: Option<&'t Tokenizer>, prompt: &[u32], stop: &[String]) -> Result<Self> {
        if tokenizer.is_none() && !stop.is_empty() {
            return Err(CoordinatorError::InvalidRequest(
                "stop strings need a tokenizer.json in the model folder".into(),
            ));
        }
        Ok(Self {
            decoder: tokenizer.map(|t| t.decoder_with_context(prompt)).transpose()?,
            stops: StopMatcher::new(stop.to_vec()),
            stopped: false,
            text: String::new(),
        })
    }

    pub fn push(&mut self, token: u32) -> Result<TextDelta> {
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(TextDelta { text: String::new(), stopped: false });
        };
        if self.stopped {
            return Ok(TextDelta { text: String::new(), stopped: true });
        }
        let raw = dec.push(token)?;
        let (text, stopped) = self.stops.push(&raw);
        self.stopped = stopped;
        self.text.push_str(&text);
        Ok(TextDelta { text, stopped })
    }

    /// The text still held back at the end of the sequence.
    pub fn finish(&mut self) -> Result<String> {
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(String::new());
        };
        if self.stopped {
            return Ok(String::new());
        }
        let raw = dec.finish()?;
        let (mut text, stopped) = self.stops.push(&raw);
        self.stopped = stopped;
        if !stopped {
            text.push_str(&self.stops.flush());
        }
        self.text.push_str(&text);
        Ok(text)
    }
}
