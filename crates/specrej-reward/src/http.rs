//! The reward model over HTTP/1.1 + JSON: a server ([`serve`], [`spawn_server`]: tokio,
//! hyper and axum) and a client [`Scorer`] ([`RemoteScorer`], on ureq); the schema is in the
//! crate docs.

use std::collections::VecDeque;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use serde::{Deserialize, Serialize};
use specrej_core::{BackendError, Response, Scored, Scorer};
use specrej_http::serve::{ConnLimits, accept_loop, read_body, shutdown_signal};
use specrej_text::Tokenizer;
use tokio::sync::{Semaphore, oneshot};

use crate::error::RewardError;
use crate::model::RewardModel;
use crate::scorer::{RewardSession, detokenize};

/// Largest request body the server accepts (larger: 413).
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Sessions (RM caches of one client's request) the server keeps, least recently used dropped.
pub const MAX_SESSIONS: usize = 8;
/// Largest request head (request line and headers) the server reads (larger: 431).
const MAX_HEADER_BYTES: usize = 16 << 10;

/// What the server allows its clients ([`ServerLimits::default`] is what [`serve`] and
/// [`spawn_server`] use).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Time a client has to send a request's head, counted from its first byte (or, on a
    /// kept-alive connection, from the end of the previous answer); then the connection
    /// is closed. A deadline for the whole head, not for each read.
    pub header_timeout: Duration,
    /// Time a client has to send a request's whole body once its head is in (else 408).
    pub body_timeout: Duration,
    /// Largest request body (else 413): [`MAX_BODY_BYTES`] by default.
    pub max_body_bytes: usize,
    /// Requests with their bodies read that may wait for the model while it scores another
    /// one; one more gets 429 with `Retry-After`.
    pub max_queued: usize,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// After the shutdown signal, how long requests in flight get to finish before their
    /// connections are dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_body_bytes: MAX_BODY_BYTES,
            max_queued: 64,
            max_connections: 256,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// The JSON body of a scoring request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    /// The user's question.
    pub prompt: String,
    /// The (partial) answers to score.
    #[serde(default)]
    pub responses: Vec<String>,
    /// Stable row ids, one per response (needed for incremental sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<u32>>,
    /// A client-chosen session name: with `rows`, the server keeps RM caches between requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Rows of `session` to drop before scoring.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release: Vec<u32>,
}

/// The JSON body of a successful answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreResponse {
    /// One reward per response, in order.
    pub rewards: Vec<f32>,
    /// RM tokens run for this request.
    #[serde(default)]
    pub tokens_processed: u64,
}

/// An answer that is not a 200: its status and message (sent as `{"error": message}`).
#[derive(Debug)]
struct HttpError(StatusCode, String);

/// A JSON answer.
fn json(status: StatusCode, body: String) -> HttpResponse {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body)
        .into_response()
}

impl IntoResponse for HttpError {
    fn into_response(self) -> HttpResponse {
        let mut answer = json(self.0, serde_json::json!({ "error": self.1 }).to_string());
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            // A queued request takes about one scoring call: a second is a fair wait.
            answer.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        answer
    }
}

/// The model and a few incremental sessions: one request at a time holds it.
struct Server {
    rm: Arc<RewardModel>,
    /// (session name, session), most recently used last.
    sessions: VecDeque<(String, RewardSession)>,
}

impl Server {
    fn handle(&mut self, body: &[u8]) -> Result<ScoreResponse, HttpError> {
        let bad = |m: String| HttpError(StatusCode::BAD_REQUEST, m);
        let req: ScoreRequest = serde_json::from_slice(body)
            .map_err(|e| bad(format!("invalid scoring request JSON: {e}")))?;
        if let Some(rows) = &req.rows
            && rows.len() != req.responses.len()
        {
            return Err(bad(format!("{} rows for {} responses", rows.len(), req.responses.len())));
        }
        let rows: Vec<u32> = match &req.rows {
            Some(r) => r.clone(),
            None => (0..req.responses.len() as u32).collect(),
        };
        let pairs: Vec<(u32, &str)> =
            rows.iter().copied().zip(req.responses.iter().map(String::as_str)).collect();
        let model_err = |e: BackendError| {
            HttpError(StatusCode::INTERNAL_SERVER_ERROR, format!("reward model: {e}"))
        };
        let scored = match (&req.session, &req.rows) {
            (Some(name), Some(_)) => {
                let pos =
                    self.sessions.iter().position(|(n, s)| n == name && s.question() == req.prompt);
                let mut session = match pos.and_then(|p| self.sessions.remove(p)) {
                    Some((_, s)) => s,
                    None => RewardSession::new(Arc::clone(&self.rm), req.prompt.clone()),
                };
                session.release(&req.release);
                let result = session.score_texts(&pairs);
                self.sessions.retain(|(n, _)| n != name);
                self.sessions.push_back((name.clone(), session));
                while self.sessions.len() > MAX_SESSIONS {
                    self.sessions.pop_front();
                }
                result.map_err(model_err)?
            }
            _ => RewardSession::full(Arc::clone(&self.rm), req.prompt.clone())
                .score_texts(&pairs)
                .map_err(model_err)?,
        };
        Ok(ScoreResponse { rewards: scored.rewards, tokens_processed: scored.tokens_processed })
    }
}

/// What every request handler shares.
struct Shared {
    server: Mutex<Server>,
    /// Permits to wait for the model: `max_queued` + the one being scored.
    queue: Arc<Semaphore>,
    limits: ServerLimits,
}

/// The one handler (any path): POST a JSON [`ScoreRequest`], get a [`ScoreResponse`].
async fn score(
    State(shared): State<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    match score_inner(shared, method, &headers, body).await {
        Ok(answer) => match serde_json::to_string(&answer) {
            Ok(body) => json(StatusCode::OK, body),
            Err(e) => HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        },
        Err(e) => e.into_response(),
    }
}

async fn score_inner(
    shared: Arc<Shared>,
    method: Method,
    headers: &HeaderMap,
    body: Body,
) -> Result<ScoreResponse, HttpError> {
    if method != Method::POST {
        return Err(HttpError(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed: POST a JSON scoring request"),
        ));
    }
    let bytes = read_body(headers, body, shared.limits.max_body_bytes, shared.limits.body_timeout)
        .await
        .map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            HttpError(status, e.to_string())
        })?;
    let Ok(permit) = Arc::clone(&shared.queue).try_acquire_owned() else {
        return Err(HttpError(
            StatusCode::TOO_MANY_REQUESTS,
            "the reward model's queue is full: retry later".into(),
        ));
    };
    // The model is CPU (or GPU) bound: it runs on a blocking thread, one request at a time.
    let job = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        shared.server.lock().unwrap_or_else(PoisonError::into_inner).handle(&bytes)
    });
    match job.await {
        Ok(result) => result,
        Err(e) => Err(HttpError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reward model: the scoring task failed: {e}"),
        )),
    }
}

/// The connection rules of [`ServerLimits`].
fn conn_limits(limits: &ServerLimits) -> ConnLimits {
    ConnLimits {
        header_timeout: limits.header_timeout,
        max_header_bytes: MAX_HEADER_BYTES,
        max_connections: limits.max_connections,
        shutdown_grace: limits.shutdown_grace,
        half_close: true,
    }
}

/// Runs the server on a runtime of its own until `shutdown` resolves.
fn run(
    listener: TcpListener,
    rm: Arc<RewardModel>,
    limits: &ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    // Two workers for the connections; the model runs on the blocking pool.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let shared = Arc::new(Shared {
            server: Mutex::new(Server { rm, sessions: VecDeque::new() }),
            queue: Arc::new(Semaphore::new(limits.max_queued + 1)),
            limits: limits.clone(),
        });
        let app = axum::Router::new().fallback(score).with_state(shared);
        accept_loop(listener, app, &conn_limits(limits), shutdown).await;
        Ok(())
    })
}

/// Serves `rm` on `listener` until SIGINT or SIGTERM, then lets requests in flight finish
/// (at most [`ServerLimits::shutdown_grace`]). Connections are served concurrently, kept
/// alive, and the model scores one request at a time. Every bad request gets a 4xx JSON
/// error; nothing panics on input.
pub fn serve(listener: TcpListener, rm: Arc<RewardModel>) -> std::io::Result<()> {
    run(listener, rm, &ServerLimits::default(), async {
        let stop = shutdown_signal().await;
        eprintln!("{stop}: finishing the requests in flight, then stopping");
    })
}

/// A server running on a thread of its own ([`spawn_server_with`]).
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets the requests in flight finish (at most the limits' grace) and
    /// waits for the server's thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Binds `addr` (e.g. `"127.0.0.1:0"`) and serves `rm` with `limits` on a thread of its own
/// until [`RunningServer::shutdown`] (or drop).
pub fn spawn_server_with(
    addr: impl ToSocketAddrs,
    rm: Arc<RewardModel>,
    limits: ServerLimits,
) -> std::io::Result<RunningServer> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let thread =
        std::thread::Builder::new().name("specrej-reward-server".into()).spawn(move || {
            let _ = run(listener, rm, &limits, async {
                let _ = stopped.await;
            });
        })?;
    Ok(RunningServer { addr: local, stop: Some(stop), thread: Some(thread) })
}

/// Binds `addr` (e.g. `"127.0.0.1:0"`) and serves `rm` on a background thread for the rest
/// of the process; returns the bound address.
pub fn spawn_server(
    addr: impl ToSocketAddrs,
    rm: Arc<RewardModel>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let handle =
        std::thread::Builder::new().name("specrej-reward-server".into()).spawn(move || {
            let _ = run(listener, rm, &ServerLimits::default(), std::future::pending());
        })?;
    Ok((local, handle))
}

/// How long [`RemoteScorer`] waits for the TCP connection to the server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default total time [`RemoteScorer`] gives one request, from connecting to the last
/// byte of the answer ([`RemoteScorer::with_timeout`] changes it): the hand-written client
/// waited up to 600 s for an answer, and a large batch on a CPU reward model can take minutes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest answer body [`RemoteScorer`] reads (larger: an error, found while reading).
pub const MAX_ANSWER_BYTES: usize = MAX_BODY_BYTES;

/// Checks a reward server URL: `http://HOST[:PORT][/PATH]`, HOST a name, an IPv4 address or
/// a bracketed IPv6 address (`[::1]`), PORT 1-65535 (default 80).
fn parse_url(url: &str) -> Result<ureq::http::Uri, RewardError> {
    let bad = |why: &str| {
        RewardError::Other(format!(
            "reward server URL {url:?}: {why} (expected http://HOST:PORT/PATH)"
        ))
    };
    let uri: ureq::http::Uri = url.parse().map_err(|e| bad(&format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("https is not supported (plain http only, no TLS)")),
        Some(other) => return Err(bad(&format!("scheme {other:?} is not supported, only http"))),
        None => return Err(bad("no http:// scheme")),
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info is not supported"));
    }
    if authority.host().is_empty() || authority.host() == "[]" {
        return Err(bad("no host"));
    }
    // What follows the host (`host()` keeps an IPv6 address's brackets): nothing or `:PORT`.
    let after_host = authority.as_str().get(authority.host().len()..).unwrap_or_default();
    if !after_host.is_empty() {
        let port = after_host.strip_prefix(':').unwrap_or(after_host);
        if !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(bad(&format!("bad port {port:?} (1-65535)")));
        }
    }
    Ok(uri)
}

/// Checks a reward server URL as [`RemoteScorer::new`] does (`http://HOST[:PORT][/PATH]`),
/// so a front end can refuse a bad flag before it loads anything.
pub fn check_url(url: &str) -> Result<(), RewardError> {
    parse_url(url).map(drop)
}

/// One line: ureq's error in words, with what was being done.
fn describe(e: &ureq::Error, timeout: Duration) -> String {
    let text = match e {
        ureq::Error::Timeout(ureq::Timeout::Connect) => {
            format!("could not connect within {CONNECT_TIMEOUT:?}")
        }
        ureq::Error::Timeout(which) => {
            format!("no complete answer within {timeout:?} ({which} timeout)")
        }
        ureq::Error::HostNotFound => "host not found".to_string(),
        ureq::Error::ConnectionFailed => "could not connect".to_string(),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("could not connect: {io}")
        }
        ureq::Error::Io(io) => format!("I/O error: {io}"),
        ureq::Error::BodyExceedsLimit(limit) => format!("answer body larger than {limit} bytes"),
        ureq::Error::Protocol(p) => format!("malformed HTTP answer: {p}"),
        other => other.to_string(),
    };
    text.replace(['\r', '\n'], " ")
}

/// A [`Scorer`] that asks a remote reward model server ([`serve`]) over HTTP.
///
/// Sends the question text and the detokenized responses ([`detokenize`]) with their row ids
/// under a per-scorer session name, so the server scores incrementally; `release` tells
/// the server to drop rows (best effort: errors are ignored).
///
/// The client is a [`ureq::Agent`] of its own (clones share it): plain HTTP/1.1, connections
/// kept alive and reused when the server allows, chunked answers decoded, at most
/// [`CONNECT_TIMEOUT`] to connect and [`REQUEST_TIMEOUT`] (or [`RemoteScorer::with_timeout`])
/// per request, answers over [`MAX_ANSWER_BYTES`] refused, no redirects followed, proxy
/// environment variables ignored.
#[derive(Debug, Clone)]
pub struct RemoteScorer {
    url: String,
    uri: ureq::http::Uri,
    agent: ureq::Agent,
    timeout: Duration,
    policy: Tokenizer,
    question: String,
    session: Option<String>,
    pending_release: Vec<u32>,
}

/// The agent of one [`RemoteScorer`].
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(timeout))
        // Non-2xx answers are read (their JSON error is the message), not turned into errors.
        .http_status_as_error(false)
        // A 3xx is answered as the error it is for a POST.
        .max_redirects(0)
        // The server is named by the URL alone, as with the std::net client.
        .proxy(None)
        .build()
        .new_agent()
}

impl RemoteScorer {
    /// A scorer posting to `url` (`http://host:port/path`, `http://[::1]:port/path`; port 80
    /// by default) with a fresh session name. Any other URL is an error naming it.
    pub fn new(
        url: &str,
        policy: Tokenizer,
        question: impl Into<String>,
    ) -> Result<Self, RewardError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let uri = parse_url(url)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let session =
            format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        Ok(Self {
            url: url.to_string(),
            uri,
            agent: agent(REQUEST_TIMEOUT),
            timeout: REQUEST_TIMEOUT,
            policy,
            question: question.into(),
            session: Some(session),
            pending_release: Vec::new(),
        })
    }

    /// Stateless requests: the server re-scores everything at every call.
    pub fn stateless(mut self) -> Self {
        self.session = None;
        self
    }

    /// The total time one request may take, connecting included (default [`REQUEST_TIMEOUT`]).
    /// A new agent: connections kept so far are dropped.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.agent = agent(timeout);
        self
    }

    /// POSTs `body`; returns (status, answer body), the body at most [`MAX_ANSWER_BYTES`].
    fn post(&self, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let fail = |e: ureq::Error| describe(&e, self.timeout);
        let mut answer = self
            .agent
            .post(self.uri.clone())
            .content_type("application/json")
            .send(body)
            .map_err(fail)?;
        let status = answer.status().as_u16();
        let cap = MAX_ANSWER_BYTES as u64;
        if let Some(n) = answer.body().content_length()
            && n > cap
        {
            return Err(format!("HTTP {status} answer of {n} bytes, over the {cap}-byte limit"));
        }
        let bytes =
            answer.body_mut().with_config().limit(cap).read_to_vec().map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => {
                    format!("HTTP {status} answer body over the {cap}-byte limit")
                }
                e => format!("HTTP {status} answer body: {}", fail(e)),
            })?;
        Ok((status, bytes))
    }

    /// Scores texts directly (no detokenization): one request.
    pub fn score_texts(&mut self, responses: &[(u32, &str)]) -> Result<Scored, BackendError> {
        let req = ScoreRequest {
            prompt: self.question.clone(),
            responses: responses.iter().map(|(_, t)| (*t).to_string()).collect(),
            rows: self.session.as_ref().map(|_| responses.iter().map(|(r, _)| *r).collect()),
            session: self.session.clone(),
            release: std::mem::take(&mut self.pending_release),
        };
        let body = serde_json::to_vec(&req).map_err(BackendError::device)?;
        let (status, answer) = self
            .post(&body)
            .map_err(|e| BackendError::device(format!("reward server {}: {e}", self.url)))?;
        if !(200..300).contains(&status) {
            let msg = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
            let msg = msg.replace(['\r', '\n'], " ");
            return Err(BackendError::device(format!(
                "reward server {}: HTTP {status}: {}",
                self.url,
                msg.trim()
            )));
        }
        let resp: ScoreResponse = serde_json::from_slice(&answer).map_err(|e| {
            BackendError::device(format!("reward server {}: bad answer: {e}", self.url))
        })?;
        if resp.rewards.len() != responses.len() {
            return Err(BackendError::device(format!(
                "reward server {}: {} rewards for {} responses",
                self.url,
                resp.rewards.len(),
                responses.len()
            )));
        }
        Ok(Scored { rewards: resp.rewards, tokens_processed: resp.tokens_processed })
    }

    fn score_sync(&mut self, responses: &[Response<'_>]) -> Result<Scored, BackendError> {
        let texts = responses
            .iter()
            .map(|r| detokenize(&self.policy, r.tokens))
            .collect::<Result<Vec<_>, _>>()?;
        let pairs: Vec<(u32, &str)> =
            responses.iter().zip(&texts).map(|(r, t)| (r.row, t.as_str())).collect();
        self.score_texts(&pairs)
    }
}

impl Scorer for RemoteScorer {
    fn score(
        &mut self,
        _prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        std::future::ready(self.score_sync(responses))
    }

    /// Sent with the next request (no extra round trip).
    fn release(&mut self, rows: &[u32]) {
        if self.session.is_some() {
            self.pending_release.extend_from_slice(rows);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests: a panic is the failure report")]
mod tests {
    use super::parse_url;

    /// (host, port, path and query) a URL parses to.
    fn parts(url: &str) -> (String, u16, String) {
        let uri = parse_url(url).unwrap();
        let authority = uri.authority().unwrap();
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        (authority.host().to_string(), authority.port_u16().unwrap_or(80), path)
    }

    #[test]
    fn check_url_is_the_scorers_rule() {
        assert!(super::check_url("http://[::1]:8123/score").is_ok());
        let e = super::check_url("ftp://host/score").unwrap_err().to_string();
        assert!(e.contains("scheme \"ftp\" is not supported"), "{e}");
    }

    #[test]
    fn urls_parse_to_host_port_and_path() {
        let s = String::from;
        assert_eq!(parts("http://[::1]:8123/score"), (s("[::1]"), 8123, s("/score")));
        assert_eq!(parts("http://[::1]/score"), (s("[::1]"), 80, s("/score")));
        assert_eq!(parts("http://127.0.0.1:9/"), (s("127.0.0.1"), 9, s("/")));
        assert_eq!(
            parts("http://localhost:8080/v1/score?x=1"),
            (s("localhost"), 8080, s("/v1/score?x=1"))
        );
        assert_eq!(parts("http://example.com"), (s("example.com"), 80, s("/")));
        let e = parse_url("https://example.com/").unwrap_err().to_string();
        assert_eq!(
            e,
            "reward server URL \"https://example.com/\": https is not supported (plain http only, no TLS) (expected http://HOST:PORT/PATH)"
        );
    }
}
