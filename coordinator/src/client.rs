//! The client side of `Inference` (`zeroshard query`, `zeroshard status`,
//! the benchmarks): domain requests in, domain answers and errors out.
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::inference_client::InferenceClient;
use zeroshard_security::{Address, TlsPaths};

use crate::error::{CoordinatorError, Result};
use crate::request::{GenerateOutput, GenerateRequest};
use crate::status::ClusterStatus;
use zeroshard_security::bundle::client_security;

/// How a client proves itself: TLS credentials (`None`: plaintext, or the
/// bundle `up` left for the endpoint) and an API key.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    pub tls: Option<TlsPaths>,
    pub api_key: Option<String>,
}

/// Adds `authorization: Bearer KEY` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = InferenceClient<InterceptedService<Channel, Bearer>>;

/// `grpc://host:port` / `grpcs://host:port` (as `up` prints them) or
/// `http(s)://host:port` → a client. A scheme that does not match what the
/// server speaks is named in the error.
pub async fn connect(endpoint: &str, auth: &ClientAuth) -> Result<Client> {
    let invalid = |e: String| CoordinatorError::InvalidRequest(format!("--endpoint {endpoint}: {e}"));
    if !endpoint.contains("://") {
        return Err(CoordinatorError::InvalidRequest(format!(
            "--endpoint {endpoint} has no scheme: write grpcs://{endpoint} (TLS, as `up` serves by default) \
             or grpc://{endpoint} (plaintext)"
        )));
    }
    let addr = Address::parse(endpoint).map_err(|e| invalid(e.to_string()))?;
    let security = client_security(&addr, auth.tls.clone())
        .map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?;
    let bearer = match &auth.api_key {
        Some(k) => Some(
            format!("Bearer {k}")
                .parse()
                .map_err(|_| invalid("the API key is not printable ASCII".into()))?,
        ),
        None => None,
    };
    let ch = security
        .dial(&addr.uri())
        .map_err(|e| invalid(e.to_string()))?
        .connect()
        .await
        .map_err(|e| connect_error(endpoint, &addr, &e))?;
    Ok(InferenceClient::with_interceptor(ch, Bearer(bearer)))
}

/// A failed connection, in words: refused, no such host, or spoken to in the
/// wrong scheme.
fn connect_error(endpoint: &str, addr: &Address, e: &tonic::transport::Error) -> CoordinatorError {
    if let Some(cause) = unreachable_cause(e, &addr.host) {
        return CoordinatorError::Unreachable(format!("cannot reach {endpoint}: {cause}"));
    }
    let chain = zeroshard_security::tls::error_chain(e);
    let lower = chain.to_lowercase();
    if addr.tls && (lower.contains("corrupt message") || lower.contains("invalidcontenttype")) {
        return CoordinatorError::InvalidRequest(format!(
            "{endpoint} does not speak TLS (a plaintext server): use grpc://{}",
            addr.authority()
        ));
    }
    if addr.tls && lower.contains("certificate") {
        return CoordinatorError::InvalidRequest(format!("{endpoint}: TLS handshake failed: {chain}"));
    }
    if !addr.tls {
        return CoordinatorError::Unavailable(format!(
            "cannot reach {endpoint} ({chain}); if the cluster serves TLS (as `up` does by default), use grpcs://{}",
            addr.authority()
        ));
    }
    CoordinatorError::Unavailable(format!("cannot reach {endpoint}: {chain}"))
}

/// "connection refused" or "no such host HOST (…)" when `e`'s source chain
/// says nothing answers at the address: an [`std::io::Error`] of kind
/// `ConnectionRefused`, or a failed name lookup (hyper's "dns error", whose
/// innermost cause is the resolver's own words).
fn unreachable_cause(e: &(dyn std::error::Error + 'static), host: &str) -> Option<String> {
    let mut dns = false;
    let mut innermost = e.to_string();
    let mut link = Some(e);
    while let Some(err) = link {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return Some("connection refused".into());
        }
        dns |= err.to_string().starts_with("dns error");
        innermost = err.to_string();
        link = err.source();
    }
    dns.then(|| format!("no such host {host} ({innermost})"))
}

/// Runs `req` once on `client`: with `stream`, through `GenerateStream`,
/// calling `on_chunk(token_ids, text)` for each chunk as it arrives.
pub async fn generate(
    client: &mut Client,
    req: &GenerateRequest,
    stream: bool,
    mut on_chunk: impl FnMut(&[u32], &str),
) -> Result<GenerateOutput> {
    let msg = pb::GenerateRequest::from(req);
    if !stream {
        return Ok(client.generate(msg).await?.into_inner().into());
    }
    let mut s = client.generate_stream(msg).await?.into_inner();
    let mut out = pb::GenerateResponse::default();
    while let Some(c) = s.message().await? {
        on_chunk(&c.token_ids, &c.text);
        if !c.prompt_token_ids.is_empty() {
            out.prompt_token_ids = c.prompt_token_ids;
        }
        out.text.push_str(&c.text);
        out.token_ids.extend(c.token_ids);
        if c.finish_reason != 0 {
            out.finish_reason = c.finish_reason;
            out.timings = c.timings;
        }
    }
    Ok(out.into())
}

/// Retries at an address where nothing answers (connection refused, no such
/// host) before `query` gives up, unless an earlier try of the same request
/// connected (then the coordinator is restarting: retried for `retry_for`).
const QUICK_RETRIES: u32 = 2;

/// Runs one request; with `stream`, calls `on_text` with each piece of text as
/// it arrives. UNAVAILABLE is retried with backoff for up to `retry_for` (a
/// coordinator restarting, workers re-planning); an address where nothing
/// answers only `QUICK_RETRIES` times, unless the request reached it before. A
/// stream that broke after some text is sent again and its first bytes, which
/// were printed already, are skipped (generation is deterministic for a given
/// seed, so the retry produces the same text).
pub async fn query(
    endpoint: &str,
    auth: &ClientAuth,
    req: &GenerateRequest,
    stream: bool,
    retry_for: Duration,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput> {
    let mut delay = Duration::from_millis(200);
    let started = std::time::Instant::now();
    // Bytes of text already handed to `on_text` by earlier attempts.
    let mut printed = 0usize;
    // Whether an attempt connected: only then is a refused connection a
    // coordinator restarting (retried for `retry_for`); before, nothing
    // listens there, and a few quick tries are enough.
    let mut reached = false;
    let mut unreachable_tries = 0;
    loop {
        let result = async {
            let mut client = connect(endpoint, auth).await?;
            reached = true;
            // Bytes of text this attempt has received.
            let mut received = 0usize;
            generate(&mut client, req, stream, |_, text| {
                let before = received;
                received += text.len();
                if received > printed {
                    let from = printed.max(before) - before;
                    if let Some(new) = text.get(from..) {
                        on_text(new);
                    }
                    printed = received;
                }
            })
            .await
        }
        .await;
        let result = match result {
            Err(CoordinatorError::Unavailable(m)) => {
                Err(wrong_scheme(endpoint).await.unwrap_or(CoordinatorError::Unavailable(m)))
            }
            other => other,
        };
        let in_time = started.elapsed() < retry_for;
        match result {
            Err(CoordinatorError::Unavailable(m)) if in_time => {
                tracing::warn!("{m}; retrying in {delay:?}");
            }
            Err(CoordinatorError::Unreachable(m))
                if in_time && (reached || unreachable_tries < QUICK_RETRIES) =>
            {
                unreachable_tries += 1;
                tracing::warn!("{m}; retrying in {delay:?}");
            }
            Err(CoordinatorError::Unreachable(m)) if in_time => {
                return Err(CoordinatorError::Unreachable(format!(
                    "{m}; gave up after {} tries in {:.1} s (nothing answers there)",
                    unreachable_tries + 1,
                    started.elapsed().as_secs_f64()
                )))
            }
            other => return other,
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The cluster's status.
pub async fn status(endpoint: &str, auth: &ClientAuth) -> Result<ClusterStatus> {
    let mut client = connect(endpoint, auth).await?;
    match client.cluster_status(pb::ClusterStatusRequest {}).await {
        Ok(r) => Ok(r.into_inner().into()),
        Err(s) => Err(wrong_scheme(endpoint).await.unwrap_or_else(|| s.into())),
    }
}

/// When `endpoint` is plaintext (`grpc://`) but the server there does not
/// answer HTTP/2's connection preface with its SETTINGS (a TLS server closes
/// or answers with an alert): the error that says so.
async fn wrong_scheme(endpoint: &str) -> Option<CoordinatorError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = Address::parse(endpoint).ok().filter(|a| !a.tls)?;
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr.authority()).await.ok()?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.ok()?;
        let mut head = [0u8; 5];
        let n = s.read(&mut head).await.ok()?;
        // A SETTINGS frame: 3 bytes of length, then type 4.
        Some(n >= 4 && head[3] == 4)
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Some(false)) => Some(CoordinatorError::InvalidRequest(format!(
            "{endpoint} does not speak plaintext gRPC (it serves TLS, as `up` does by default): use grpcs://{}",
            addr.authority()
        ))),
        _ => None,
    }
}
