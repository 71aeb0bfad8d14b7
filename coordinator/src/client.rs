//! The client side of `Inference` (`zeroshard query`, `zeroshard status`).
use std::time::Duration;

use tonic::transport::Channel;
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::inference_client::InferenceClient;

use crate::error::{CoordinatorError, Result};
use crate::request::{GenerateOutput, GenerateRequest};

/// `grpc://host:port` (as `up` prints it) or `http://host:port` → a channel.
pub async fn connect(endpoint: &str) -> Result<InferenceClient<Channel>> {
    let uri =
        endpoint.strip_prefix("grpc://").map_or_else(|| endpoint.to_string(), |r| format!("http://{r}"));
    let ch = zeroshard_proto::transport::endpoint(&uri)
        .map_err(|e| CoordinatorError::InvalidRequest(format!("--endpoint {endpoint}: {e}")))?
        .connect()
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("cannot reach {endpoint}: {e}")))?;
    Ok(InferenceClient::new(ch))
}

fn status_err(s: tonic::Status) -> CoordinatorError {
    match s.code() {
        tonic::Code::InvalidArgument => CoordinatorError::InvalidRequest(s.message().to_string()),
        code => CoordinatorError::Unavailable(format!("{code:?}: {}", s.message())),
    }
}

/// Runs one request; with `stream`, calls `on_text` with each piece of text as
/// it arrives. UNAVAILABLE is retried with backoff for up to `retry_for` (a
/// coordinator restarting, workers re-planning). A
/// stream that broke after some text is sent again and its first bytes, which
/// were printed already, are skipped (generation is deterministic for a given
/// seed, so the retry produces the same text).
pub async fn query(
    endpoint: &str,
    req: &GenerateRequest,
    stream: bool,
    retry_for: Duration,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput> {
    let msg = pb::GenerateRequest::from(req);
    let mut delay = Duration::from_millis(200);
    let started = std::time::Instant::now();
    // Bytes of text already handed to `on_text` by earlier attempts.
    let mut printed = 0usize;
    loop {
        let result = async {
            let mut client = connect(endpoint).await?;
            if !stream {
                return client.generate(msg.clone()).await.map(|r| r.into_inner().into()).map_err(status_err);
            }
            let mut s = client.generate_stream(msg.clone()).await.map_err(status_err)?.into_inner();
            let mut out = pb::GenerateResponse::default();
            while let Some(c) = s.message().await.map_err(status_err)? {
                if !c.prompt_token_ids.is_empty() {
                    out.prompt_token_ids = c.prompt_token_ids;
                }
                let before = out.text.len();
                out.text.push_str(&c.text);
                if out.text.len() > printed {
                    let from = printed.max(before);
                    if let Some(new) = out.text.get(from..) {
                        on_text(new);
                    }
                    printed = out.text.len();
                }
                out.token_ids.extend(c.token_ids);
                if c.finish_reason != 0 {
                    out.finish_reason = c.finish_reason;
                    out.timings = c.timings;
                }
            }
            Ok(out.into())
        }
        .await;
        match result {
            Err(CoordinatorError::Unavailable(m)) if started.elapsed() < retry_for => {
                tracing::warn!("{m}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// The cluster's status.
pub async fn status(endpoint: &str) -> Result<pb::ClusterStatusResponse> {
    let mut client = connect(endpoint).await?;
    client.cluster_status(pb::ClusterStatusRequest {}).await.map(|r| r.into_inner()).map_err(status_err)
}
