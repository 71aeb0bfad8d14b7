//! The HTTP front's connections, bounded (what `axum::serve` leaves open):
//!
//! - a request head must arrive within [`HEADER_TIMEOUT`] of the connection
//!   opening or of the previous answer (so an idle keep-alive connection is
//!   closed after that long too); a body within `BODY_TIMEOUT` (the front's
//!   middleware);
//! - at most `max` connections are open. A new one beyond that closes the
//!   oldest connection that has not sent a request yet (a half-sent head
//!   holds a descriptor and nothing else), and is itself closed only when
//!   every open connection has sent one: 1,100 connections that send half a
//!   request head and wait cost at most `max` descriptors for at most
//!   [`HEADER_TIMEOUT`], and a real client among them is served;
//! - an accept that fails (out of descriptors) backs off instead of spinning.
//!
//! On shutdown no connection is accepted; open ones finish their requests
//! (streams included) and close.
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;
use zeroshard_security::tls::AcceptBackoff;

/// How long a client has to send a whole request head.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Header fields a request may carry, and their bytes (hyper's own limits sit
/// above these, so a request past them gets the front's JSON 431).
pub(super) const MAX_HEADERS: usize = 100;
pub(super) const MAX_HEADER_BYTES: usize = 32 << 10;

/// The open connections: when each opened, whether it sent a request, and how
/// to close it.
#[derive(Default)]
struct Open {
    next: u64,
    conns: HashMap<u64, Conn>,
}

struct Conn {
    opened: Instant,
    requested: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl Open {
    /// Closes the oldest connection that has not sent a request; false when
    /// every one has.
    fn evict_one(&mut self) -> bool {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| !c.requested.load(Ordering::Relaxed))
            .min_by_key(|(_, c)| c.opened)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| self.conns.remove(&id)) {
            Some(c) => {
                c.task.abort();
                true
            }
            None => false,
        }
    }
}

/// The table, whatever a panicking holder left (every update is whole).
fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves `app` on `listener` with at most `max` connections until
/// `shutdown`, then lets the open ones finish.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    max: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_headers(4 * MAX_HEADERS)
        .max_buf_size(4 * MAX_HEADER_BYTES.max(8 << 10));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(256)
        .max_header_list_size(4 * MAX_HEADER_BYTES as u32);
    let builder = Arc::new(builder);
    let open = Arc::new(Mutex::new(Open::default()));
    // Closed (sender dropped) to tell every connection to finish.
    let (stop_tx, stop_rx) = watch::channel(());
    let mut backoff = AcceptBackoff::default();
    let mut refused_logged: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (sock, _peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => {
                    backoff.reset();
                    a
                }
                Err(e) => {
                    tokio::time::sleep(backoff.failed(&e)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = sock.set_nodelay(true);
        // Room is made, the connection numbered and registered under one lock
        // (registered before its task can end and remove itself).
        let mut o = lock(&open);
        if o.conns.len() >= max && !o.evict_one() {
            metrics::counter!("zeroshard_http_connections_refused_total").increment(1);
            if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!("HTTP front: {max} connections open, every one with a request: closing new ones (--max-http-connections)");
                refused_logged = Some(Instant::now());
            }
            continue; // `sock` is dropped: closed
        }
        o.next += 1;
        let id = o.next;
        let requested = Arc::new(AtomicBool::new(false));
        let service = {
            let (app, requested) = (app.clone(), requested.clone());
            hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
                requested.store(true, Ordering::Relaxed);
                let app = app.clone();
                async move {
                    Ok::<_, Infallible>(app.oneshot(req.map(Body::new)).await.unwrap_or_else(|e| match e {}))
                }
            })
        };
        let (builder, open_conns, mut stop) = (builder.clone(), open.clone(), stop_rx.clone());
        let task = tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(sock), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            let mut o = lock(&open_conns);
            o.conns.remove(&id);
            metrics::gauge!("zeroshard_http_connections_open").set(o.conns.len() as f64);
        });
        o.conns.insert(id, Conn { opened: Instant::now(), requested, task: task.abort_handle() });
        metrics::gauge!("zeroshard_http_connections_open").set(o.conns.len() as f64);
    }
    drop(stop_tx);
    drop(listener);
    while !lock(&open).conns.is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
