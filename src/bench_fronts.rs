//! `zeroshard bench-fronts`: the HTTP front against gRPC on the same cluster,
//! in one run: short requests per second (one token each, from several
//! clients at once, each on its own kept-alive connection) and the time to
//! the first token of a streamed request, the two fronts interleaved round
//! by round so that both see the same machine.
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use zeroshard_coordinator::client::{self, ClientAuth};
use zeroshard_coordinator::cluster_bench::grpc_request;

use crate::args::BenchFrontsArgs;

/// An HTTP/1.1 connection to the front, kept alive across requests.
struct HttpClient {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    key: Option<String>,
}

impl HttpClient {
    async fn connect(base: &str, key: Option<String>) -> Result<Self> {
        let host =
            base.strip_prefix("http://").ok_or_else(|| anyhow!("--http {base}: write http://HOST:PORT"))?;
        let host = host.trim_end_matches('/').to_string();
        let tcp = tokio::net::TcpStream::connect(&host).await.with_context(|| format!("--http {base}"))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Self { sender, host, key })
    }

    /// One completion; the time to the first event (streamed) or to the
    /// whole answer.
    async fn request(
        &mut self,
        model: &str,
        prompt: &str,
        max_tokens: u32,
        stream: bool,
    ) -> Result<Duration> {
        let body = serde_json::json!({
            "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": true, "stream": stream,
        });
        let mut req = hyper::Request::post("/v1/completions")
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(k) = &self.key {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = req.body(Full::new(Bytes::from(body.to_string())))?;
        self.sender.ready().await?;
        let started = Instant::now();
        let resp = self.sender.send_request(req).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.into_body().collect().await?.to_bytes();
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&text));
        }
        let mut body = resp.into_body();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                if first.is_none() && stream && data.windows(5).any(|w| w == b"data:") {
                    first = Some(started.elapsed());
                }
            }
        }
        Ok(first.unwrap_or_else(|| started.elapsed()))
    }
}

#[derive(Default)]
struct Figures {
    requests_per_s: Vec<f64>,
    ttft: Vec<Duration>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn quantile(v: &[Duration], q: f64) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
    ms.get(i).copied().unwrap_or(f64::NAN)
}

pub(crate) fn run(a: BenchFrontsArgs, auth: ClientAuth) -> Result<()> {
    if a.requests == 0 || a.concurrency == 0 || a.rounds == 0 || a.ttft_samples == 0 || a.stream_tokens == 0 {
        bail!("--requests, --concurrency, --rounds, --ttft-samples and --stream-tokens must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let (mut grpc, mut http) = (Figures::default(), Figures::default());
        let key = auth.api_key.clone();
        for round in 0..a.rounds {
            // Short requests: `concurrency` clients share `requests`.
            let per_client = a.requests.div_ceil(a.concurrency);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..a.concurrency {
                let mut c = client::connect(&a.endpoint, &auth).await?;
                let prompt = a.prompt.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..per_client {
                        grpc_request(&mut c, &prompt, 1, false).await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            grpc.requests_per_s.push((per_client * a.concurrency) as f64 / started.elapsed().as_secs_f64());

            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..a.concurrency {
                let mut c = HttpClient::connect(&a.http, key.clone()).await?;
                let (prompt, model) = (a.prompt.clone(), a.model.clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..per_client {
                        c.request(&model, &prompt, 1, false).await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            http.requests_per_s.push((per_client * a.concurrency) as f64 / started.elapsed().as_secs_f64());

            // Time to first token, one streamed request at a time, alternating.
            let mut g = client::connect(&a.endpoint, &auth).await?;
            let mut h = HttpClient::connect(&a.http, key.clone()).await?;
            for _ in 0..a.ttft_samples {
                grpc.ttft.push(grpc_request(&mut g, &a.prompt, a.stream_tokens, true).await?);
                http.ttft.push(h.request(&a.model, &a.prompt, a.stream_tokens, true).await?);
            }
            zeroshard_offload::errln!(
                "round {}: gRPC {:.0} req/s, HTTP {:.0} req/s",
                round + 1,
                grpc.requests_per_s.last().copied().unwrap_or(0.0),
                http.requests_per_s.last().copied().unwrap_or(0.0)
            );
        }
        zeroshard_offload::outln!(
            "{} requests of 1 token from {} clients, {} rounds; time to first token over {} streamed requests of {} tokens per front",
            a.requests,
            a.concurrency,
            a.rounds,
            a.ttft_samples * a.rounds,
            a.stream_tokens
        );
        zeroshard_offload::outln!("| front | short requests/s (median of rounds) | TTFT p50 ms | TTFT p90 ms |");
        zeroshard_offload::outln!("|---|---|---|---|");
        for (name, f) in [("gRPC", &grpc), ("HTTP (OpenAI)", &http)] {
            zeroshard_offload::outln!(
                "| {name} | {:.0} | {:.2} | {:.2} |",
                median(f.requests_per_s.clone()),
                quantile(&f.ttft, 0.5),
                quantile(&f.ttft, 0.9)
            );
        }
        let ratio = median(http.requests_per_s.clone()) / median(grpc.requests_per_s.clone());
        zeroshard_offload::outln!("HTTP/gRPC short-request throughput: {ratio:.2}");
        Ok(())
    })
}
