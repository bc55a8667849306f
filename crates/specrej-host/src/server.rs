//! The HTTP server: HTTP/1.1 on `std::net` (the request reader of `specrej-http`, shared
//! with `specrej-reward`'s scorer server), a thread per connection for parsing, validating,
//! tokenizing and writing, and one engine worker that runs requests in arrival order
//! through the component.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or, with
//! `"stream": true`, server-sent events), `GET /v1/models`, `GET /health`. With
//! [`ServerConfig::static_dir`] also `GET`/`HEAD` of the files under it (the browser demo,
//! `index.html` at `/`) and of `/models/<file>.gguf` from [`ServerConfig::models_dir`]; the
//! API routes come first.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use specrej_core::{Event, KvLayout, Method, Options, Outcome, Sampling};

use crate::api::{self, ApiError, Endpoint, GenerateRequest, Prompt, RequestLimits, ResponseContext};
use crate::model::{RewardKind, Served};
use crate::runtime::{EventKinds, Limits, Observer, RunError, Runtime, World};

/// Largest request body accepted (larger: 413).
pub const MAX_BODY_BYTES: usize = 1 << 20;
const MAX_HEADER_BYTES: usize = 16 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Request limits (n, max_tokens).
    pub limits: RequestLimits,
    /// The KV budget, in cached tokens (rows × positions), shared by one request at a time.
    pub kv_budget_tokens: usize,
    /// Wall-clock limit of one request inside the component.
    pub request_timeout: Duration,
    /// Connections handled at once; more get 503.
    pub max_connections: usize,
    /// The model's id in responses and `/v1/models`.
    pub model_id: String,
    /// Serve the files under this folder too (`GET`/`HEAD`; `/` is its `index.html`).
    pub static_dir: Option<PathBuf>,
    /// With `static_dir`: serve `/models/<file>.gguf` from this folder (the demo downloads
    /// the model from there).
    pub models_dir: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: RequestLimits::default(),
            kv_budget_tokens: 1 << 15,
            request_timeout: Duration::from_secs(600),
            max_connections: 64,
            model_id: "specrej".into(),
            static_dir: None,
            models_dir: None,
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    /// The address it listens on (the real port when bound to port 0).
    pub addr: SocketAddr,
    /// The accept loop.
    pub accept: JoinHandle<()>,
    /// The world the component targets.
    pub world: World,
}

/// What the worker sends back to a connection.
enum WorkerMsg {
    /// A progress event (streaming requests only).
    Event(OwnedEvent),
    /// The end: the outcome, or an error.
    Done(Result<Outcome, ApiError>),
}

/// The parts of [`Event`] the stream needs, owned.
enum OwnedEvent {
    Prefilled { first_row: u32, rows: usize },
    Step { rows: Vec<u32>, tokens: Vec<u32> },
    Decision { position: usize, threshold: f32, rows: Vec<u32>, scores: Vec<f32>, kept: Vec<u32> },
    Finished { row: u32 },
}

/// One request for the worker.
struct Job {
    prompt: Vec<u32>,
    options: Options,
    reward: RewardKind,
    question: String,
    capacity: usize,
    stream: bool,
    reply: mpsc::Sender<WorkerMsg>,
}

/// What every connection thread shares.
struct Shared {
    served: Arc<Served>,
    config: ServerConfig,
    jobs: mpsc::Sender<Job>,
    queued: AtomicUsize,
    connections: AtomicUsize,
    counter: AtomicU64,
}

/// Binds nothing: serves `listener` with `served` through the component `component`
/// (its bytes; compiled here, so a bad file fails before the first request).
pub fn spawn(
    listener: TcpListener,
    served: Arc<Served>,
    component: Vec<u8>,
    config: ServerConfig,
) -> anyhow::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<World, String>>();
    let worker_served = Arc::clone(&served);
    let timeout = config.request_timeout;
    std::thread::Builder::new().name("specrej-engine".into()).spawn(move || {
        let runtime = match Runtime::from_bytes(&component) {
            Ok(runtime) => {
                let _ = ready_tx.send(Ok(runtime.world()));
                runtime
            }
            Err(error) => {
                let _ = ready_tx.send(Err(format!("{error:?}")));
                return;
            }
        };
        for job in queue {
            work(&runtime, &worker_served, job, timeout);
        }
    })?;
    let world = match ready_rx.recv() {
        Ok(Ok(world)) => world,
        Ok(Err(message)) => anyhow::bail!("loading the component: {message}"),
        Err(_) => anyhow::bail!("the engine thread died while loading the component"),
    };
    let shared = Arc::new(Shared {
        served,
        config,
        jobs,
        queued: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
        counter: AtomicU64::new(0),
    });
    let accept = std::thread::Builder::new().name("specrej-accept".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let shared = Arc::clone(&shared);
            if shared.connections.fetch_add(1, Ordering::SeqCst) >= shared.config.max_connections {
                shared.connections.fetch_sub(1, Ordering::SeqCst);
                let mut stream = stream;
                let error = ApiError::status(503, "server_busy", "too many connections; retry later");
                let _ = write_json(&mut stream, 503, &error.body());
                continue;
            }
            let spawned = std::thread::Builder::new().name("specrej-conn".into()).spawn({
                let shared = Arc::clone(&shared);
                move || {
                    connection(&shared, stream);
                    shared.connections.fetch_sub(1, Ordering::SeqCst);
                }
            });
            if spawned.is_err() {
                shared.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    })?;
    Ok(ServerHandle { addr, accept, world })
}

/// Runs one job on the engine thread; never panics out (a panic becomes a 500).
fn work(runtime: &Runtime, served: &Served, job: Job, timeout: Duration) {
    let reply = job.reply.clone();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let engine = served
            .engine(job.capacity, &job.reward, &job.question)
            .map_err(|e| ApiError::status(500, "server_error", format!("building the engine: {e:#}")))?;
        let events = if job.stream {
            EventKinds::PREFILLED | EventKinds::STEP | EventKinds::DECISION | EventKinds::FINISHED
        } else {
            EventKinds::empty()
        };
        let tx = job.reply.clone();
        // A streaming client that left drops the receiver: the send fails and the run stops.
        let observer: Observer =
            Box::new(move |event| own(event).is_none_or(|event| tx.send(WorkerMsg::Event(event)).is_ok()));
        let limits = Limits::for_request(job.options.n, job.options.max_new_tokens, timeout);
        let run = runtime.generate(engine, &job.prompt, &job.options, events, observer, limits);
        run.result.map_err(run_error)
    }));
    let result = result.unwrap_or_else(|_| Err(ApiError::status(500, "server_error", "the engine panicked")));
    let _ = reply.send(WorkerMsg::Done(result));
}

fn own(event: &Event<'_>) -> Option<OwnedEvent> {
    Some(match *event {
        Event::Prefilled { first_row, rows } => OwnedEvent::Prefilled { first_row, rows },
        Event::Step { rows, tokens, .. } => OwnedEvent::Step { rows: rows.to_vec(), tokens: tokens.to_vec() },
        Event::Decision { decision, rows, scores, kept } => OwnedEvent::Decision {
            position: decision.position,
            threshold: decision.threshold,
            rows: rows.to_vec(),
            scores: scores.to_vec(),
            kept: kept.to_vec(),
        },
        Event::Finished { row, .. } => OwnedEvent::Finished { row },
        Event::Forked { .. } | Event::Scored { .. } => return None,
    })
}

fn run_error(error: RunError) -> ApiError {
    match error {
        RunError::InvalidRequest(message) => ApiError::bad_request(message),
        RunError::Engine(error) => ApiError::status(500, "server_error", format!("engine error: {error}")),
        RunError::OutOfFuel => {
            ApiError::status(500, "server_error", error_text(&RunError::OutOfFuel)).with_code("component_out_of_fuel")
        }
        RunError::Timeout => ApiError::status(504, "timeout", error_text(&RunError::Timeout)).with_code("timeout"),
        other => ApiError::status(500, "server_error", error_text(&other)),
    }
}

fn error_text(error: &RunError) -> String {
    error.to_string()
}

fn write_json(stream: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    specrej_http::write_json(stream, status, &body.to_string())
}

const HTTP_LIMITS: specrej_http::Limits =
    specrej_http::Limits { max_header_bytes: MAX_HEADER_BYTES, max_body_bytes: MAX_BODY_BYTES, require_length: false };

/// Reads one request ([`specrej_http::read_request`]; only a POST has a body).
fn read_request(stream: &TcpStream) -> Result<specrej_http::Request, ApiError> {
    specrej_http::read_request(stream, &HTTP_LIMITS, |method| method == "POST").map_err(|e| match e.status {
        400 => ApiError::bad_request(e.message),
        status => ApiError::status(status, "invalid_request_error", e.message),
    })
}

/// `GET`/`HEAD` of a static file ([`specrej_http::files::serve_site`]): `/models/<file>.gguf`
/// from `models_dir`, the rest from `static_dir`. Returns false when no static folder is
/// configured.
fn serve_static(config: &ServerConfig, stream: &mut TcpStream, method: &str, path: &str) -> bool {
    let Some(root) = &config.static_dir else { return false };
    let _ = specrej_http::files::serve_site(stream, root, config.models_dir.as_deref(), method, path);
    true
}

fn connection(shared: &Shared, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let request = match read_request(&stream) {
        Ok(request) => request,
        Err(error) => {
            let _ = write_json(&mut stream, error.status, &error.body());
            return;
        }
    };
    let endpoint = match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/health") => {
            let body = json!({
                "status": "ok",
                "model": shared.config.model_id,
                "queued": shared.queued.load(Ordering::SeqCst),
            });
            let _ = write_json(&mut stream, 200, &body);
            return;
        }
        ("GET", "/v1/models") => {
            let body = json!({
                "object": "list",
                "data": [{
                    "id": shared.config.model_id, "object": "model", "created": 0, "owned_by": "specrej",
                    "specrej": { "rewards": shared.served.reward_names() },
                }],
            });
            let _ = write_json(&mut stream, 200, &body);
            return;
        }
        ("POST", "/v1/chat/completions") => Endpoint::Chat,
        ("POST", "/v1/completions") => Endpoint::Completions,
        (_, "/health" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => {
            let error = ApiError::status(405, "invalid_request_error", format!("method {} not allowed here", request.method));
            let _ = write_json(&mut stream, 405, &error.body());
            return;
        }
        (method @ ("GET" | "HEAD"), path) if serve_static(&shared.config, &mut stream, method, path) => return,
        (_, path) => {
            let error = ApiError::status(404, "not_found_error", format!("no route {path}"));
            let _ = write_json(&mut stream, 404, &error.body());
            return;
        }
    };
    if let Err(error) = generate(shared, endpoint, &request.body, &mut stream) {
        let _ = write_json(&mut stream, error.status, &error.body());
    }
}

/// The per-request KV budget, in the decoder's layout: room for all `n` rows to the end for
/// Best-of-N; `n` rows of min_new_tokens each for Speculative Rejection, so decisions fall
/// where a memory-bound device would make them; capped by the server's budget.
fn request_capacity(request: &GenerateRequest, prompt_len: usize, budget: usize, layout: KvLayout) -> Result<usize, ApiError> {
    let (len, param) = match request.method {
        Method::BestOfN => (request.max_tokens, "max_tokens"),
        Method::SpeculativeRejection { .. } => (request.min_new_tokens, "specrej.min_new_tokens"),
    };
    let one = layout.tokens(prompt_len, 1, len);
    if one > budget {
        return Err(ApiError {
            status: 413,
            message: format!(
                "one row needs {one} cached tokens (prompt {prompt_len} + {param} {len}) but the server's KV budget holds {budget}"
            ),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: Some("kv_budget_exceeded"),
        });
    }
    Ok(layout.tokens(prompt_len, request.n, len).min(budget))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn generate(shared: &Shared, endpoint: Endpoint, body: &[u8], stream: &mut TcpStream) -> Result<(), ApiError> {
    let served = &*shared.served;
    let request = api::parse_request(endpoint, body, &shared.config.limits, &served.reward_names())?;
    let (prompt, prompt_param) = match &request.prompt {
        Prompt::Chat(messages) => (served.encode_chat(messages), "messages"),
        Prompt::Text(text) => (served.encode_raw(text), "prompt"),
    };
    let prompt = prompt.map_err(|e| ApiError::invalid(prompt_param, format!("cannot tokenize the prompt: {e:#}")))?;
    let context = served.context_length();
    if prompt.is_empty() {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
    }
    if prompt.len() + request.max_tokens > context {
        let (param, message) = if prompt.len() >= context {
            (prompt_param, format!("the prompt has {} tokens; the model's context holds {context}", prompt.len()))
        } else {
            (
                "max_tokens",
                format!(
                    "prompt ({} tokens) + max_tokens ({}) exceeds the model's context length ({context})",
                    prompt.len(),
                    request.max_tokens
                ),
            )
        };
        return Err(ApiError::invalid(param, message).with_code("context_length_exceeded"));
    }
    if request.rules.refill.is_some() && !served.kv_layout().shared_prompt {
        return Err(ApiError::invalid(
            "specrej.rules.refill",
            "specrej.rules.refill forks rows, which only the CPU engine does (this server's K/V is one dense copy per row)",
        ));
    }
    // The judge reads its own question (quoting the prompt) and the answer: that must fit too.
    let overhead = served
        .judge_overhead(&request.reward, request.prompt.question())
        .map_err(|e| ApiError::invalid(prompt_param, format!("cannot build the judge's question: {e:#}")))?;
    if let Some(overhead) = overhead
        && overhead + request.max_tokens > context
    {
        let reward = request.reward.name();
        let (param, message) = if overhead >= context {
            (prompt_param, format!("the {reward} reward's question about this prompt has {overhead} tokens; the model's context holds {context}"))
        } else {
            (
                "max_tokens",
                format!(
                    "the {reward} reward reads {overhead} tokens of question + max_tokens ({}), more than the model's context length ({context})",
                    request.max_tokens
                ),
            )
        };
        return Err(ApiError::invalid(param, message).with_code("context_length_exceeded"));
    }
    let capacity = request_capacity(&request, prompt.len(), shared.config.kv_budget_tokens, served.kv_layout())?;
    let options = Options {
        method: request.method,
        n: request.n,
        max_new_tokens: request.max_tokens,
        min_new_tokens: request.min_new_tokens,
        eos: served.eos(),
        sampling: Sampling { seed: request.seed, temperature: request.temperature, top_k: request.top_k, top_p: request.top_p },
        rules: request.rules,
    };
    let (reply, answers) = mpsc::channel();
    let job = Job {
        prompt,
        options,
        reward: request.reward.clone(),
        question: request.prompt.question().to_string(),
        capacity,
        stream: request.stream,
        reply,
    };
    shared.queued.fetch_add(1, Ordering::SeqCst);
    let sent = shared.jobs.send(job);
    if sent.is_err() {
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::status(503, "server_error", "the engine worker is gone"));
    }
    let number = shared.counter.fetch_add(1, Ordering::SeqCst);
    let created = now();
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{created}-{number}"),
        Endpoint::Completions => format!("cmpl-{created}-{number}"),
    };
    let ctx = ResponseContext { id: &id, created, model: &shared.config.model_id, request: &request, kv_budget_tokens: capacity };
    let decode = |ids: &[u32]| served.decode(ids);
    if request.stream {
        let result = stream_events(&ctx, &answers, stream, &decode);
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        let _ = result; // a client that left is not an error of ours
        return Ok(());
    }
    let outcome = loop {
        match answers.recv() {
            Ok(WorkerMsg::Done(result)) => break result,
            Ok(WorkerMsg::Event(_)) => {}
            Err(_) => break Err(ApiError::status(500, "server_error", "the engine worker dropped the request")),
        }
    };
    shared.queued.fetch_sub(1, Ordering::SeqCst);
    let outcome = outcome?;
    let _ = write_json(stream, 200, &api::response_document(&ctx, &outcome, &decode));
    Ok(())
}

/// Writes one server-sent event (`event` `None`: a plain `data:` event).
fn sse(stream: &mut TcpStream, event: Option<&str>, data: &str) -> std::io::Result<()> {
    let mut text = String::new();
    if let Some(event) = event {
        text.push_str("event: ");
        text.push_str(event);
        text.push('\n');
    }
    text.push_str("data: ");
    text.push_str(data);
    text.push_str("\n\n");
    stream.write_all(text.as_bytes())?;
    stream.flush()
}

/// Follows the current leader's text as it grows.
struct Leader {
    row: Option<u32>,
    /// Its text already sent.
    sent: String,
}

/// Streams a request: `data:` chunks with the leader's new text, `event: leader` when the
/// leader changes, `event: rejected` at each decision, `event: winner` with the whole
/// response document, then `data: [DONE]`. The leader is row `first_row` of a batch until
/// the first decision, then the best-scored kept row; when it finishes, the lowest live row.
fn stream_events(
    ctx: &ResponseContext<'_>,
    answers: &mpsc::Receiver<WorkerMsg>,
    stream: &mut TcpStream,
    decode: &dyn Fn(&[u32]) -> String,
) -> std::io::Result<()> {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes())?;
    let chat = ctx.request.endpoint == Endpoint::Chat;
    let chunk = |text: Option<&str>, row: Option<u32>, finish: Option<&str>| -> String {
        let choice = if chat {
            let delta = match text {
                Some(t) => json!({ "content": t }),
                None if finish.is_none() => json!({ "role": "assistant", "content": "" }),
                None => json!({}),
            };
            json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null })
        } else {
            json!({ "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null })
        };
        json!({
            "id": ctx.id,
            "object": if chat { "chat.completion.chunk" } else { "text_completion" },
            "created": ctx.created,
            "model": ctx.model,
            "choices": [choice],
            "specrej": { "row": row },
        })
        .to_string()
    };
    if chat {
        sse(stream, None, &chunk(None, None, None))?;
    }
    let mut tokens: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut live: Vec<u32> = Vec::new();
    let mut leader = Leader { row: None, sent: String::new() };
    let switch = |leader: &mut Leader, row: u32, tokens: &HashMap<u32, Vec<u32>>, stream: &mut TcpStream| {
        leader.row = Some(row);
        leader.sent = decode(tokens.get(&row).map_or(&[][..], Vec::as_slice));
        sse(stream, Some("leader"), &json!({ "row": row, "text": leader.sent }).to_string())
    };
    loop {
        let message = match answers.recv() {
            Ok(message) => message,
            Err(_) => {
                let error = ApiError::status(500, "server_error", "the engine worker dropped the request");
                sse(stream, Some("error"), &error.body().to_string())?;
                break;
            }
        };
        match message {
            WorkerMsg::Event(OwnedEvent::Prefilled { first_row, rows }) => {
                // A new batch starts when the last one has finished: its first row leads.
                live = (first_row..first_row + rows as u32).collect();
                switch(&mut leader, first_row, &tokens, stream)?;
            }
            WorkerMsg::Event(OwnedEvent::Step { rows, tokens: sampled }) => {
                for (&row, &token) in rows.iter().zip(&sampled) {
                    tokens.entry(row).or_default().push(token);
                }
                live = rows;
                if let Some(row) = leader.row.filter(|r| live.contains(r)) {
                    let text = decode(&tokens[&row]);
                    if !text.ends_with('\u{FFFD}') && text.len() > leader.sent.len() && text.starts_with(&leader.sent) {
                        let delta = text[leader.sent.len()..].to_string();
                        leader.sent = text;
                        sse(stream, None, &chunk(Some(&delta), Some(row), None))?;
                    }
                }
            }
            WorkerMsg::Event(OwnedEvent::Decision { position, threshold, rows, scores, kept }) => {
                let rejected: Vec<Value> = rows
                    .iter()
                    .zip(&scores)
                    .filter(|(r, _)| !kept.contains(r))
                    .map(|(r, s)| json!({ "row": r, "score": if s.is_finite() { json!(s) } else { Value::Null } }))
                    .collect();
                let data = json!({
                    "position": position,
                    "threshold": if threshold.is_finite() { json!(threshold) } else { Value::Null },
                    "rejected": rejected,
                    "kept": kept,
                });
                sse(stream, Some("rejected"), &data.to_string())?;
                live.retain(|r| kept.contains(r));
                let best = rows
                    .iter()
                    .zip(&scores)
                    .filter(|(r, _)| kept.contains(r))
                    .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)))
                    .map(|(r, _)| *r);
                if let Some(best) = best
                    && leader.row != Some(best)
                {
                    switch(&mut leader, best, &tokens, stream)?;
                }
            }
            WorkerMsg::Event(OwnedEvent::Finished { row }) => {
                live.retain(|&r| r != row);
                if leader.row == Some(row)
                    && let Some(&next) = live.iter().min()
                {
                    switch(&mut leader, next, &tokens, stream)?;
                }
            }
            WorkerMsg::Done(Ok(outcome)) => {
                let document = api::response_document(ctx, &outcome, decode);
                sse(stream, Some("winner"), &document.to_string())?;
                let finish = api::finish_reason(outcome.winner().finish);
                sse(stream, None, &chunk(None, Some(outcome.winner().row), Some(finish)))?;
                break;
            }
            WorkerMsg::Done(Err(error)) => {
                sse(stream, Some("error"), &error.body().to_string())?;
                break;
            }
        }
    }
    stream.write_all(b"data: [DONE]\n\n")?;
    stream.flush()
}
