//! The reward model over HTTP/1.1 + JSON: a blocking server ([`serve`], on specrej-http:
//! one request per connection, `Connection: close`) and a client [`Scorer`]
//! ([`RemoteScorer`], on ureq); the schema is in the crate docs.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use specrej_core::{BackendError, Response, Scored, Scorer};
use specrej_text::Tokenizer;

use crate::error::RewardError;
use crate::model::RewardModel;
use crate::scorer::{RewardSession, detokenize};

/// Largest request body the server accepts (larger: 413).
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Sessions (RM caches of one client's request) the server keeps, least recently used dropped.
pub const MAX_SESSIONS: usize = 8;
const MAX_HEADER_BYTES: usize = 16 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

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

struct HttpError(u16, String);

impl From<specrej_http::HttpError> for HttpError {
    fn from(e: specrej_http::HttpError) -> Self {
        HttpError(e.status, e.message)
    }
}

const LIMITS: specrej_http::Limits =
    specrej_http::Limits { max_header_bytes: MAX_HEADER_BYTES, max_body_bytes: MAX_BODY_BYTES, require_length: true };

/// Reads one request ([`specrej_http::read_request`]): its body, or 405 for anything but POST.
fn read_request(stream: &TcpStream) -> Result<Vec<u8>, HttpError> {
    let request = specrej_http::read_request(stream, &LIMITS, |method| method == "POST")?;
    if request.method != "POST" {
        return Err(HttpError(405, format!("method {} not allowed: POST a JSON scoring request", request.method)));
    }
    Ok(request.body)
}

/// The server's state: the model and a few incremental sessions.
struct Server {
    rm: Arc<RewardModel>,
    /// (session name, question, session), most recently used last.
    sessions: VecDeque<(String, RewardSession)>,
}

impl Server {
    fn handle(&mut self, body: &[u8]) -> Result<ScoreResponse, HttpError> {
        let req: ScoreRequest =
            serde_json::from_slice(body).map_err(|e| HttpError(400, format!("invalid scoring request JSON: {e}")))?;
        if let Some(rows) = &req.rows
            && rows.len() != req.responses.len()
        {
            return Err(HttpError(400, format!("{} rows for {} responses", rows.len(), req.responses.len())));
        }
        let rows: Vec<u32> = match &req.rows {
            Some(r) => r.clone(),
            None => (0..req.responses.len() as u32).collect(),
        };
        let pairs: Vec<(u32, &str)> = rows.iter().copied().zip(req.responses.iter().map(String::as_str)).collect();
        let model_err = |e: BackendError| HttpError(500, format!("reward model: {e}"));
        let scored = match (&req.session, &req.rows) {
            (Some(name), Some(_)) => {
                let pos = self.sessions.iter().position(|(n, s)| n == name && s.question() == req.prompt);
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
            _ => RewardSession::full(Arc::clone(&self.rm), req.prompt.clone()).score_texts(&pairs).map_err(model_err)?,
        };
        Ok(ScoreResponse { rewards: scored.rewards, tokens_processed: scored.tokens_processed })
    }

    fn connection(&mut self, mut stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let result = read_request(&stream).and_then(|body| self.handle(&body));
        let _ = match result {
            Ok(resp) => match serde_json::to_string(&resp) {
                Ok(json) => specrej_http::write_json(&mut stream, 200, &json),
                Err(e) => specrej_http::write_json(&mut stream, 500, &serde_json::json!({ "error": e.to_string() }).to_string()),
            },
            Err(HttpError(status, message)) => {
                specrej_http::write_json(&mut stream, status, &serde_json::json!({ "error": message }).to_string())
            }
        };
    }
}

/// Serves `rm` on `listener` until the listener fails, one connection at a time (the model
/// is the bottleneck). Every bad request gets a 4xx JSON error; nothing panics on input.
pub fn serve(listener: TcpListener, rm: Arc<RewardModel>) -> std::io::Result<()> {
    let mut server = Server { rm, sessions: VecDeque::new() };
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => server.connection(stream),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Binds `addr` (e.g. `"127.0.0.1:0"`) and serves `rm` on a background thread; returns the
/// bound address.
pub fn spawn_server(addr: impl ToSocketAddrs, rm: Arc<RewardModel>) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let handle = std::thread::spawn(move || {
        let _ = serve(listener, rm);
    });
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
    let bad = |why: &str| RewardError::Other(format!("reward server URL {url:?}: {why} (expected http://HOST:PORT/PATH)"));
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

/// One line: ureq's error in words, with what was being done.
fn describe(e: &ureq::Error, timeout: Duration) -> String {
    let text = match e {
        ureq::Error::Timeout(ureq::Timeout::Connect) => format!("could not connect within {CONNECT_TIMEOUT:?}"),
        ureq::Error::Timeout(which) => format!("no complete answer within {timeout:?} ({which} timeout)"),
        ureq::Error::HostNotFound => "host not found".to_string(),
        ureq::Error::ConnectionFailed => "could not connect".to_string(),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => format!("could not connect: {io}"),
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
    pub fn new(url: &str, policy: Tokenizer, question: impl Into<String>) -> Result<Self, RewardError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let uri = parse_url(url)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let session = format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
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
        let mut answer =
            self.agent.post(self.uri.clone()).content_type("application/json").send(body).map_err(fail)?;
        let status = answer.status().as_u16();
        let cap = MAX_ANSWER_BYTES as u64;
        if let Some(n) = answer.body().content_length()
            && n > cap
        {
            return Err(format!("HTTP {status} answer of {n} bytes, over the {cap}-byte limit"));
        }
        let bytes = answer.body_mut().with_config().limit(cap).read_to_vec().map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => format!("HTTP {status} answer body over the {cap}-byte limit"),
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
        let (status, answer) =
            self.post(&body).map_err(|e| BackendError::device(format!("reward server {}: {e}", self.url)))?;
        if !(200..300).contains(&status) {
            let msg = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
            let msg = msg.replace(['\r', '\n'], " ");
            return Err(BackendError::device(format!("reward server {}: HTTP {status}: {}", self.url, msg.trim())));
        }
        let resp: ScoreResponse = serde_json::from_slice(&answer)
            .map_err(|e| BackendError::device(format!("reward server {}: bad answer: {e}", self.url)))?;
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
        let texts = responses.iter().map(|r| detokenize(&self.policy, r.tokens)).collect::<Result<Vec<_>, _>>()?;
        let pairs: Vec<(u32, &str)> = responses.iter().zip(&texts).map(|(r, t)| (r.row, t.as_str())).collect();
        self.score_texts(&pairs)
    }
}

impl Scorer for RemoteScorer {
    fn score(&mut self, _prompt: &[u32], responses: &[Response<'_>]) -> impl Future<Output = Result<Scored, BackendError>> {
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
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
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
    fn urls_parse_to_host_port_and_path() {
        let s = String::from;
        assert_eq!(parts("http://[::1]:8123/score"), (s("[::1]"), 8123, s("/score")));
        assert_eq!(parts("http://[::1]/score"), (s("[::1]"), 80, s("/score")));
        assert_eq!(parts("http://127.0.0.1:9/"), (s("127.0.0.1"), 9, s("/")));
        assert_eq!(parts("http://localhost:8080/v1/score?x=1"), (s("localhost"), 8080, s("/v1/score?x=1")));
        assert_eq!(parts("http://example.com"), (s("example.com"), 80, s("/")));
        let e = parse_url("https://example.com/").unwrap_err().to_string();
        assert_eq!(
            e,
            "reward server URL \"https://example.com/\": https is not supported (plain http only, no TLS) (expected http://HOST:PORT/PATH)"
        );
    }
}
