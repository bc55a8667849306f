//! The reward model over HTTP/1.1 + JSON: a blocking server ([`serve`]) and a client
//! [`Scorer`] ([`RemoteScorer`]). Hand-written on `std::net` (one request per connection,
//! `Connection: close`); the schema is in the crate docs.

use std::collections::VecDeque;
use std::io::{Read, Write};
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

/// `http://host:port/path` → (`host:port`, `/path`).
fn parse_url(url: &str) -> Result<(String, String), RewardError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| RewardError::Other(format!("{url}: only http:// URLs are supported")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(RewardError::Other(format!("{url}: no host")));
    }
    let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    Ok((authority, path.to_string()))
}

/// POSTs `body` to `url`; returns (status, body).
fn post(authority: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP status line"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// A [`Scorer`] that asks a remote reward model server ([`serve`]) over HTTP.
///
/// Sends the question text and the detokenized responses ([`detokenize`]) with their row ids
/// under a per-scorer session name, so the server scores incrementally; `release` tells
/// the server to drop rows (best effort: errors are ignored).
#[derive(Debug, Clone)]
pub struct RemoteScorer {
    url: String,
    authority: String,
    path: String,
    policy: Tokenizer,
    question: String,
    session: Option<String>,
    pending_release: Vec<u32>,
}

impl RemoteScorer {
    /// A scorer posting to `url` (`http://host:port/path`) with a fresh session name.
    pub fn new(url: &str, policy: Tokenizer, question: impl Into<String>) -> Result<Self, RewardError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let (authority, path) = parse_url(url)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let session = format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        Ok(Self { url: url.to_string(), authority, path, policy, question: question.into(), session: Some(session), pending_release: Vec::new() })
    }

    /// Stateless requests: the server re-scores everything at every call.
    pub fn stateless(mut self) -> Self {
        self.session = None;
        self
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
        let (status, answer) = post(&self.authority, &self.path, &body)
            .map_err(|e| BackendError::device(format!("reward server {}: {e}", self.url)))?;
        if status != 200 {
            let msg = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
            return Err(BackendError::device(format!("reward server {}: HTTP {status}: {msg}", self.url)));
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
