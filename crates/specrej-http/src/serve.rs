//! The serving loop both specrej servers run (feature `server`): tokio, hyper 1 and an axum
//! router. Each connection is a task: HTTP/1.1, kept alive, with a deadline for each
//! request's whole head; a bounded number of connections at once (the rest wait in the
//! listen backlog); graceful shutdown. And the request-body rule: one deadline and one size
//! limit for the whole body, `Content-Length` or chunked.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

/// What a connection may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time a client has to send a request's head, counted from its first byte (or, on a
    /// kept-alive connection, from the end of the previous answer); then the connection
    /// is closed. A deadline for the whole head, not for each read.
    pub header_timeout: Duration,
    /// The request line and headers together (more: 431).
    pub max_header_bytes: usize,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// After the shutdown signal, how long requests in flight get to finish before their
    /// connections are dropped.
    pub shutdown_grace: Duration,
    /// Whether a client may shut its side down and still get the answer. Without it, an
    /// end of input while a request is in flight closes the connection, which drops the
    /// request's handler: the way a server notices that its client left.
    pub half_close: bool,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in flight
/// finish for `limits.shutdown_grace`.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: &ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&connections).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: wait, as the connections in flight end.
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_header_size(limits.max_header_bytes)
            .half_close(limits.half_close)
            .keep_alive(true);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A connection's I/O errors (a client gone, a malformed request hyper answered) end only it.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await;
}

/// The first of SIGINT (Ctrl-C) and SIGTERM, by name.
pub async fn shutdown_signal() -> &'static str {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                s = interrupt => s,
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => interrupt.await,
        }
    }
    #[cfg(not(unix))]
    interrupt.await
}

/// Why a request body was not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Over the limit, declared or found while reading (413).
    TooLarge(usize),
    /// Not all there within the deadline (408).
    Timeout(Duration),
    /// The connection broke or the framing was wrong (400).
    Broken(String),
}

impl BodyError {
    /// The HTTP status it answers with.
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge(_) => 413,
            BodyError::Timeout(_) => 408,
            BodyError::Broken(_) => 400,
        }
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(limit) => write!(f, "request body over {limit} bytes"),
            BodyError::Timeout(deadline) => {
                write!(f, "the request body did not arrive within {deadline:?}")
            }
            BodyError::Broken(why) => write!(f, "reading the request body: {why}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Reads a whole request body, `Content-Length` or chunked, of at most `limit` bytes within
/// `deadline`. A declared length over the limit is refused before a byte of the body is read.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, BodyError> {
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(BodyError::TooLarge(limit));
    }
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(BodyError::Timeout(deadline)),
        Ok(Err(e)) if is_length_limit(&e) => Err(BodyError::TooLarge(limit)),
        Ok(Err(e)) => Err(BodyError::Broken(e.to_string())),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// Whether a body error is [`axum::body::to_bytes`]'s length limit.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}
