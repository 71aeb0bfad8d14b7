//! An OpenAI answer made from the chunks of a [`Job`]'s requests: one choice
//! per prompt (`index` in the order of the prompts), as one JSON object or as
//! server-sent events, each choice with the log-probabilities it was asked
//! for. The requests run side by side, each admitted as its own.
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{SelectAll, Stream, StreamExt};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::http::{error, error_response, http_status};
use super::openai::Job;
use super::Coordinator;
use crate::error::Result;
use crate::request::{Chunk, End, FinishReason, TokenScore};
use crate::tokenizer::Tokenizer;

/// OpenAI's name of how an answer ended (`None`: it goes on).
fn finish_reason(end: &Option<End>) -> Option<&'static str> {
    end.as_ref().map(|e| match e.finish {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    })
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The two response shapes: text completions and chat completions.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Completion,
    Chat,
}

impl Shape {
    pub(super) fn id_prefix(self) -> &'static str {
        match self {
            Shape::Completion => "cmpl",
            Shape::Chat => "chatcmpl",
        }
    }

    fn object(self, streamed: bool) -> &'static str {
        match (self, streamed) {
            (Shape::Completion, _) => "text_completion",
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One choice of the whole answer.
    fn choice(self, index: usize, text: String, finish: &str, logprobs: Value) -> Value {
        match self {
            Shape::Completion => {
                json!({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
            }
            Shape::Chat => json!({"index": index, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish, "logprobs": logprobs}),
        }
    }

    /// One streamed choice: a delta of text, its finish reason on the last.
    /// The first chat delta also carries the role.
    fn delta(self, index: usize, text: &str, finish: Option<&str>, first: bool, logprobs: Value) -> Value {
        match self {
            Shape::Completion => {
                json!({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
            }
            Shape::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if text.is_empty() && finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs})
            }
        }
    }

    /// Rated tokens as this shape lists them: completions' four parallel
    /// lists, or chat's `content` entries.
    fn logprobs(self, rated: &[Rated]) -> Value {
        match self {
            Shape::Completion => json!({
                "tokens": rated.iter().map(|r| r.piece.as_str()).collect::<Vec<_>>(),
                "token_logprobs": rated.iter().map(|r| r.logprob).collect::<Vec<_>>(),
                "top_logprobs": rated.iter().map(|r| r.logprob.map(|_| {
                    // Alternatives with the same text keep the best.
                    let mut top = serde_json::Map::new();
                    for (piece, lp) in &r.top {
                        top.entry(piece.clone()).or_insert(json!(lp));
                    }
                    top
                })).collect::<Vec<_>>(),
                "text_offset": rated.iter().map(|r| r.offset).collect::<Vec<_>>(),
            }),
            Shape::Chat => {
                let entry =
                    |piece: &str, lp: f32| json!({"token": piece, "logprob": lp, "bytes": piece.as_bytes()});
                json!({"content": rated.iter().map(|r| {
                    let mut e = entry(&r.piece, r.logprob.unwrap_or(f32::NAN));
                    e["top_logprobs"] = r.top.iter().map(|(p, lp)| entry(p, *lp)).collect();
                    e
                }).collect::<Vec<_>>(), "refusal": null})
            }
        }
    }
}

/// What every message of one answer repeats.
pub(super) struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Head {
    fn message(&self, shape: Shape, streamed: bool, choices: Vec<Value>) -> Value {
        json!({"id": self.id, "object": shape.object(streamed), "created": self.created,
               "model": self.model, "choices": choices})
    }
}

/// One token as a log-probability listing shows it.
struct Rated {
    /// Its text (the text it adds after the tokens before it).
    piece: String,
    /// `None` for a prompt's first token, which nothing rates.
    logprob: Option<f32>,
    /// The most likely alternatives at its position, best first.
    top: Vec<(String, f32)>,
    /// Where its text starts in the choice's text.
    offset: usize,
}

/// How the answer shows each choice, the same for all of them.
#[derive(Clone)]
struct Showing {
    shape: Shape,
    tokenizer: Option<Arc<Tokenizer>>,
    echo: bool,
    logprobs: bool,
}

impl Showing {
    /// The text each of `ids` would add after `before`.
    fn pieces(&self, before: &[u32], ids: impl IntoIterator<Item = u32>) -> Vec<String> {
        match &self.tokenizer {
            Some(t) => t.pieces(before, ids),
            None => ids.into_iter().map(|id| format!("token_id:{id}")).collect(),
        }
    }
}

/// One choice as its chunks arrive.
struct Choice {
    index: usize,
    /// Every token so far, prompt first: what each new token's text follows.
    ids: Vec<u32>,
    /// Where the next rated token's text starts.
    offset: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish: Option<&'static str>,
    /// An event of this choice went out (a chat stream's first carries the role).
    opened: bool,
}

impl Choice {
    fn new(index: usize) -> Self {
        Self {
            index,
            ids: vec![],
            offset: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            finish: None,
            opened: false,
        }
    }

    /// Takes `c` in: the text it adds to the choice (the prompt's first, when
    /// echoed) and its rated tokens.
    fn take(&mut self, show: &Showing, c: Chunk) -> (String, Vec<Rated>) {
        self.finish = self.finish.or(finish_reason(&c.end));
        self.completion_tokens += c.token_ids.len();
        let mut text = String::new();
        let mut shown: Vec<(u32, Option<&TokenScore>)> = Vec::new();
        let mut scores = c.scores.iter();
        if !c.prompt_token_ids.is_empty() {
            self.prompt_tokens = c.prompt_token_ids.len();
            if show.echo {
                if let Some(t) = &show.tokenizer {
                    text = t.decode(&c.prompt_token_ids, true).unwrap_or_default();
                }
                // Nothing rates the first token; the worker rated the others.
                let mut rated = |i: usize| if i == 0 || !show.logprobs { None } else { scores.next() };
                shown.extend(c.prompt_token_ids.iter().enumerate().map(|(i, &id)| (id, rated(i))));
            } else {
                self.ids.extend_from_slice(&c.prompt_token_ids);
            }
        }
        shown.extend(c.token_ids.iter().map(|&id| (id, scores.next())));
        text.push_str(&c.text);
        if !show.logprobs {
            self.ids.extend(shown.iter().map(|s| s.0));
            return (text, vec![]);
        }
        let mut rated = Vec::with_capacity(shown.len());
        for (id, score) in shown {
            // The token first, then its alternatives, after the same context.
            let alternatives = score.map_or(&[][..], |s| &s.top[..]);
            let mut pieces =
                show.pieces(&self.ids, std::iter::once(id).chain(alternatives.iter().map(|t| t.0)));
            let top = pieces.split_off(1).into_iter().zip(alternatives.iter().map(|t| t.1)).collect();
            let piece = pieces.pop().unwrap_or_default();
            let offset = self.offset;
            self.offset += piece.len();
            self.ids.push(id);
            rated.push(Rated { piece, logprob: score.map(|s| s.logprob), top, offset });
        }
        (text, rated)
    }
}

/// The chunks of every request of a job, each tagged with its choice's index.
type Merged = SelectAll<Pin<Box<dyn Stream<Item = (usize, Result<Chunk>)> + Send>>>;

/// Runs `job` through the cluster and answers in `shape`: one JSON object,
/// or server-sent events.
pub(super) async fn answer(
    coord: &Coordinator,
    shape: Shape,
    head: Head,
    job: Job,
    stream: bool,
    usage_too: bool,
) -> Response {
    let show = Showing {
        shape,
        tokenizer: coord.model().tokenizer.clone(),
        echo: job.echo,
        logprobs: job.logprobs.is_some(),
    };
    let mut choices: Vec<Choice> = (0..job.requests.len()).map(Choice::new).collect();
    let mut merged: Merged = SelectAll::new();
    for (i, req) in job.requests.into_iter().enumerate() {
        let rx = super::generate::start(coord, Ok(req));
        merged.push(Box::pin(ReceiverStream::new(rx).map(move |c| (i, c))));
    }
    if !stream {
        let mut texts = vec![String::new(); choices.len()];
        let mut rated: Vec<Vec<Rated>> = choices.iter().map(|_| vec![]).collect();
        while let Some((i, chunk)) = merged.next().await {
            // An error fails the whole answer; dropping the others cancels them.
            let c = match chunk {
                Ok(c) => c,
                Err(e) => return error_response(&e),
            };
            let (text, r) = choices[i].take(&show, c);
            texts[i].push_str(&text);
            rated[i].extend(r);
        }
        let mut out = Vec::with_capacity(choices.len());
        for ((c, text), rated) in choices.iter().zip(texts).zip(&rated) {
            let Some(finish) = c.finish else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "a sequence ended without a finish reason".into(),
                );
            };
            let logprobs = if show.logprobs { shape.logprobs(rated) } else { Value::Null };
            out.push(shape.choice(c.index, text, finish, logprobs));
        }
        let (prompt, completion) = totals(&choices);
        let mut body = head.message(shape, false, out);
        body["usage"] = usage(prompt, completion);
        return Json(body).into_response();
    }
    // Streaming: the first message decides the HTTP status (an error before
    // any token is a plain error response); after it, events.
    let first = match merged.next().await {
        Some((_, Err(e))) => return error_response(&e),
        Some(first) => first,
        None => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the sequence ended at once".into(),
            )
        }
    };
    let events =
        Events { show, head, pending: Some(first), merged, choices, usage: usage_too, phase: Phase::Chunks };
    // The events are made from the chunks as the body is polled: no task or
    // channel of their own. Dropping the body (the client left) drops the
    // receivers, which cancels the sequences.
    let events = futures::stream::unfold(events, |mut e| async move {
        let event = e.next_event().await?;
        Some((Ok::<_, Infallible>(event), e))
    });
    Sse::new(events).into_response()
}

/// Prompt and completion tokens of all choices.
fn totals(choices: &[Choice]) -> (usize, usize) {
    choices.iter().fold((0, 0), |(p, c), ch| (p + ch.prompt_tokens, c + ch.completion_tokens))
}

/// Where a streamed answer is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Chunks,
    Usage,
    Done,
    Over,
}

/// The events of a streamed answer: one per chunk that shows something, each
/// choice's last with its finish reason, the usage when asked, then
/// `[DONE]`; an error ends them.
struct Events {
    show: Showing,
    head: Head,
    /// The first chunk, read before the stream began.
    pending: Option<(usize, Result<Chunk>)>,
    merged: Merged,
    choices: Vec<Choice>,
    usage: bool,
    phase: Phase,
}

impl Events {
    /// The next event; `None` when the answer is over.
    async fn next_event(&mut self) -> Option<Event> {
        let shape = self.show.shape;
        loop {
            match self.phase {
                Phase::Chunks => {}
                Phase::Usage => {
                    self.phase = Phase::Done;
                    if self.usage {
                        let (prompt, completion) = totals(&self.choices);
                        let mut data = self.head.message(shape, true, vec![]);
                        data["usage"] = usage(prompt, completion);
                        return Some(Event::default().data(data.to_string()));
                    }
                    continue;
                }
                Phase::Done => {
                    self.phase = Phase::Over;
                    return Some(Event::default().data("[DONE]"));
                }
                Phase::Over => return None,
            }
            let (i, chunk) = match self.pending.take() {
                Some(c) => c,
                None => match self.merged.next().await {
                    Some(c) => c,
                    None => {
                        self.phase = Phase::Usage;
                        continue;
                    }
                },
            };
            match chunk {
                Ok(c) => {
                    let choice = &mut self.choices[i];
                    let ends = c.end.is_some();
                    let (text, rated) = choice.take(&self.show, c);
                    let finish = if ends { choice.finish } else { None };
                    // The first chat event opens the assistant's message even
                    // before any text.
                    let opens = shape == Shape::Chat && !choice.opened;
                    if !text.is_empty() || finish.is_some() || opens || !rated.is_empty() {
                        let logprobs = if rated.is_empty() { Value::Null } else { shape.logprobs(&rated) };
                        let delta = shape.delta(choice.index, &text, finish, !choice.opened, logprobs);
                        choice.opened = true;
                        let data = self.head.message(shape, true, vec![delta]);
                        return Some(Event::default().data(data.to_string()));
                    }
                }
                Err(e) => {
                    self.phase = Phase::Over;
                    let (_, kind) = http_status(&e);
                    let data = json!({"error": {"message": e.to_string(), "type": kind, "param": null, "code": null}});
                    return Some(Event::default().data(data.to_string()));
                }
            }
        }
    }
}
