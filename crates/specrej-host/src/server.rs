//! The HTTP server: tokio, hyper 1 and axum, on [`specrej_http::serve`]'s loop (a task per
//! connection, kept alive, a deadline for each request's head and one for its body).
//!
//! A generation request is parsed, validated and tokenized on its connection's task, waits
//! for its grant of the KV budget ([`Admission`]; a full queue is a 429), then runs its own
//! scheduler (the component in its own `Store`, [`Runtime::run`]) on that task. Its engine
//! calls go to the one engine thread ([`crate::batcher`]), which merges the steps of every
//! running request into one batched pass. A client that leaves drops its request's future
//! (a streaming one, its body and with it the task running the request): the request's
//! batches are dropped and their K/V goes back to the pool within the step.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or, with
//! `"stream": true`, server-sent events), `GET /v1/models`, `GET /health`, `GET /metrics`
//! (Prometheus text). With [`ServerConfig::static_dir`] also `GET`/`HEAD` of the files under
//! it (the browser demo, `index.html` at `/`) and of `/models/<file>.gguf` from
//! [`ServerConfig::models_dir`]; the API routes come first. Every request ends with one
//! JSON log line on stderr.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method as HttpMethod, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use serde_json::{Value, json};
use specrej_core::{Event, KvLayout, Method, Options, Outcome, Sampling};
use specrej_http::serve::{ConnLimits, accept_loop, read_body, shutdown_signal};
use tokio::sync::{mpsc, oneshot};

use crate::api::{
    self, ApiError, Endpoint, GenerateRequest, Prompt, RequestLimits, ResponseContext,
};
use crate::batcher::{self, Admission, EngineHandle, GrantPlan, Lease, Refusal};
use crate::model::Served;
use crate::runtime::{EventKinds, Limits, Observer, RunError, Runtime, World};

/// Largest request body accepted (larger: 413).
pub const MAX_BODY_BYTES: usize = 1 << 20;
const MAX_HEADER_BYTES: usize = 16 << 10;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Request limits (n, max_tokens).
    pub limits: RequestLimits,
    /// The KV budget, in cached tokens (rows × positions), shared by all requests: each
    /// holds a grant of it while it runs.
    pub kv_budget_tokens: usize,
    /// Wall-clock limit of one request, from its admission to its last token (504).
    pub request_timeout: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests that may wait for their KV grant; one more gets 429 with `Retry-After`.
    pub max_queued: usize,
    /// Time a client has to send a request's whole head (then the connection is closed).
    pub header_timeout: Duration,
    /// Time a client has to send a request's whole body once its head is in (else 408).
    pub body_timeout: Duration,
    /// After SIGINT/SIGTERM (or [`ServerHandle::shutdown`]), how long requests in flight
    /// get to finish.
    pub shutdown_grace: Duration,
    /// Stop on SIGINT or SIGTERM (the binary; tests stop through the handle).
    pub stop_on_signal: bool,
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
            max_connections: 256,
            max_queued: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            stop_on_signal: false,
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
    /// The world the component targets.
    pub world: World,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Waits until the server stops (on a signal, with [`ServerConfig::stop_on_signal`]).
    pub fn join(mut self) -> anyhow::Result<()> {
        match self.thread.take() {
            Some(thread) => {
                thread.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))
            }
            None => Ok(()),
        }
    }

    /// Stops accepting, lets the requests in flight finish (at most the grace) and waits.
    pub fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the request's run sends its stream.
enum RunMsg {
    /// A progress event.
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

/// What every handler shares.
struct App {
    served: Arc<Served>,
    runtime: Runtime,
    engine: EngineHandle,
    admission: Admission,
    config: ServerConfig,
    metrics: Metrics,
    counter: AtomicU64,
    started: Instant,
}

/// Binds nothing: serves `listener` with `served` through the component `component`
/// (its bytes; compiled here, so a bad file fails before the first request), on a thread
/// of its own with its own tokio runtime and the engine thread.
pub fn spawn(
    listener: TcpListener,
    served: Arc<Served>,
    component: Vec<u8>,
    config: ServerConfig,
) -> anyhow::Result<ServerHandle> {
    let runtime = Runtime::from_bytes(&component)
        .map_err(|e| anyhow::anyhow!("loading the component: {e:?}"))?;
    let world = runtime.world();
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let (engine, _engine_thread) = batcher::spawn(served.decoder(config.kv_budget_tokens))?;
    let admission = Admission::new(engine.info().token_capacity, config.max_queued);
    // Two workers: the connections and the requests' schedulers (the model has its own thread).
    let tokio =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let app = Arc::new(App {
        served,
        runtime,
        engine,
        admission,
        config,
        metrics: Metrics::default(),
        counter: AtomicU64::new(0),
        started: Instant::now(),
    });
    let thread = std::thread::Builder::new().name("specrej-server".into()).spawn(move || {
        tokio.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(e) => return eprintln!("specrej-server: {e}"),
            };
            let limits = ConnLimits {
                header_timeout: app.config.header_timeout,
                max_header_bytes: MAX_HEADER_BYTES,
                max_connections: app.config.max_connections,
                shutdown_grace: app.config.shutdown_grace,
                half_close: false,
            };
            tokio::spawn(sample_tokens(Arc::clone(&app)));
            let on_signal = app.config.stop_on_signal;
            let shutdown = async move {
                let signal = async {
                    if on_signal {
                        let name = shutdown_signal().await;
                        eprintln!("specrej-server: {name}: finishing the requests in flight, then stopping");
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                let handle = async {
                    // A dropped handle leaves the server running.
                    if stopped.await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! { () = signal => {}, () = handle => {} }
            };
            accept_loop(listener, router(Arc::clone(&app)), &limits, shutdown).await;
        });
    })?;
    Ok(ServerHandle { addr, world, stop: Some(stop), thread: Some(thread) })
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health).fallback(not_allowed))
        .route("/metrics", get(metrics).fallback(not_allowed))
        .route("/v1/models", get(models).fallback(not_allowed))
        .route("/v1/chat/completions", post(chat).fallback(not_allowed))
        .route("/v1/completions", post(completions).fallback(not_allowed))
        .fallback(fallback)
        .with_state(app)
}

/// A JSON answer.
fn json_response(status: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

fn error_response(error: &ApiError) -> Response {
    let mut answer = json_response(error.status, &error.body());
    if error.status == 429 {
        // A request in flight takes seconds: a second is a fair wait before asking again.
        answer.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    answer
}

async fn not_allowed(method: HttpMethod) -> Response {
    error_response(&ApiError::status(
        405,
        "invalid_request_error",
        format!("method {method} not allowed here"),
    ))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let body = json!({
        "status": "ok",
        "model": app.config.model_id,
        "queued": app.admission.queued(),
        "active": app.metrics.active.load(Ordering::SeqCst),
    });
    json_response(200, &body)
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let body = json!({
        "object": "list",
        "data": [{
            "id": app.config.model_id, "object": "model", "created": 0, "owned_by": "specrej",
            "specrej": { "rewards": app.served.reward_names() },
        }],
    });
    json_response(200, &body)
}

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generate(app, Endpoint::Chat, headers, body).await
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generate(app, Endpoint::Completions, headers, body).await
}

/// Static files (with [`ServerConfig::static_dir`]), else 404.
async fn fallback(State(app): State<Arc<App>>, method: HttpMethod, uri: Uri) -> Response {
    let path = uri.path();
    let Some(root) = app
        .config
        .static_dir
        .as_ref()
        .filter(|_| method == HttpMethod::GET || method == HttpMethod::HEAD)
    else {
        return error_response(&ApiError::status(
            404,
            "not_found_error",
            format!("no route {path}"),
        ));
    };
    let plain = |status: u16, text: String| {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND);
        (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"))],
            text,
        )
            .into_response()
    };
    let file = match specrej_http::files::site_answer(
        root,
        app.config.models_dir.as_deref(),
        method.as_str(),
        path,
    ) {
        specrej_http::files::Answer::File(file) => file,
        specrej_http::files::Answer::Refused(status, message) => return plain(status, message),
    };
    let opened = std::fs::File::open(&file).and_then(|f| Ok((f.metadata()?.len(), f)));
    let Ok((len, handle)) = opened else { return plain(404, "not found\n".into()) };
    let body = if method == HttpMethod::HEAD { Body::empty() } else { file_body(handle) };
    let mut answer = (StatusCode::OK, body).into_response();
    let headers = answer.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(specrej_http::files::content_type(&file)),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    answer
}

/// A file's bytes as a body, read in 256 KiB chunks on a blocking thread (the model file is
/// ~100 MB: it is never held in memory whole).
fn file_body(mut file: std::fs::File) -> Body {
    let (tx, rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        loop {
            let mut chunk = vec![0u8; 256 << 10];
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        break; // the client left
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    Body::from_stream(stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }))
}

/// A request parsed, tokenized and checked: ready to run.
struct Prepared {
    request: GenerateRequest,
    prompt: Vec<u32>,
    options: Options,
    /// Its grant of the KV budget, in cached tokens.
    capacity: usize,
}

fn prepare(app: &App, endpoint: Endpoint, body: &[u8]) -> Result<Prepared, ApiError> {
    let served = &*app.served;
    let names = served.reward_names();
    let request = api::parse_request(endpoint, body, &app.config.limits, &names)?;
    if !names.contains(&request.reward.name()) {
        let message = format!(
            "reward {:?} does not run on this server's backend; it offers {}",
            request.reward.name(),
            names.join(", ")
        );
        return Err(ApiError::invalid("specrej.reward", message));
    }
    let (prompt, prompt_param) = match &request.prompt {
        Prompt::Chat(messages) => (served.encode_chat(messages), "messages"),
        Prompt::Text(text) => (served.encode_raw(text), "prompt"),
    };
    let prompt = prompt.map_err(|e| {
        ApiError::invalid(prompt_param, format!("cannot tokenize the prompt: {e:#}"))
    })?;
    let context = served.context_length();
    if prompt.is_empty() {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
    }
    if prompt.len() + request.max_tokens > context {
        let (param, message) = if prompt.len() >= context {
            (
                prompt_param,
                format!(
                    "the prompt has {} tokens; the model's context holds {context}",
                    prompt.len()
                ),
            )
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
    let overhead =
        served.judge_overhead(&request.reward, request.prompt.question()).map_err(|e| {
            ApiError::invalid(prompt_param, format!("cannot build the judge's question: {e:#}"))
        })?;
    if let Some(overhead) = overhead
        && overhead + request.max_tokens > context
    {
        let reward = request.reward.name();
        let (param, message) = if overhead >= context {
            (
                prompt_param,
                format!(
                    "the {reward} reward's question about this prompt has {overhead} tokens; the model's context holds {context}"
                ),
            )
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
    let info = app.engine.info();
    let capacity = request_capacity(&request, prompt.len(), info.token_capacity, info.kv_layout)?;
    let options = Options {
        method: request.method,
        n: request.n,
        max_new_tokens: request.max_tokens,
        min_new_tokens: request.min_new_tokens,
        eos: served.eos(),
        sampling: Sampling {
            seed: request.seed,
            temperature: request.temperature,
            top_k: request.top_k,
            top_p: request.top_p,
        },
        rules: request.rules,
    };
    Ok(Prepared { request, prompt, options, capacity })
}

/// A request's grant of the KV budget, in the decoder's layout: room for all `n` rows to the
/// end for Best-of-N; `n` rows of min_new_tokens each for Speculative Rejection, so decisions
/// fall where a memory-bound device would make them; capped by the server's budget.
fn request_capacity(
    request: &GenerateRequest,
    prompt_len: usize,
    budget: usize,
    layout: KvLayout,
) -> Result<usize, ApiError> {
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

/// A generation request, from its body to its answer.
async fn generate(app: Arc<App>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let number = app.counter.fetch_add(1, Ordering::SeqCst);
    let created = now();
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{created}-{number}"),
        Endpoint::Completions => format!("cmpl-{created}-{number}"),
    };
    let mut log = RequestLog::new(Arc::clone(&app), id.clone(), endpoint);
    let bytes = match read_body(&headers, body, MAX_BODY_BYTES, app.config.body_timeout).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return log.refuse(ApiError::status(
                e.status(),
                "invalid_request_error",
                e.to_string(),
            ));
        }
    };
    let prepared = match prepare(&app, endpoint, &bytes) {
        Ok(prepared) => prepared,
        Err(error) => return log.refuse(error),
    };
    log.describe(&prepared);
    let grant = match app.admission.admit(prepared.capacity).await {
        Ok(grant) => grant,
        Err(Refusal::QueueFull) => {
            let error = ApiError::status(
                429,
                "rate_limit_error",
                "the server's queue is full: retry later",
            )
            .with_code("queue_full");
            return log.refuse(error);
        }
        Err(Refusal::TooLarge) => {
            let message = format!(
                "the request needs {} cached tokens; the server's KV budget holds {}",
                prepared.capacity,
                app.admission.total()
            );
            return log.refuse(
                ApiError::status(413, "invalid_request_error", message)
                    .with_code("kv_budget_exceeded"),
            );
        }
    };
    log.admitted();
    let (scorer, on_engine) =
        match app.served.scorer(&prepared.request.reward, prepared.request.prompt.question()) {
            Ok(scorer) => scorer,
            Err(e) => {
                return log.refuse(ApiError::status(
                    500,
                    "server_error",
                    format!("building the reward model: {e:#}"),
                ));
            }
        };
    let mut lease = app.engine.lease(prepared.capacity, scorer, on_engine, Some(grant));
    if prepared.request.rules.refill.is_none() {
        let plan = GrantPlan {
            rows: prepared.options.n,
            prompt_len: prepared.prompt.len(),
            max_new_tokens: prepared.options.max_new_tokens,
        };
        lease = lease.with_plan(plan);
    }
    let ctx = Context { id, created, prepared };
    if ctx.prepared.request.stream {
        return stream_response(app, ctx, lease, log);
    }
    let _active = Active::new(&app.metrics);
    let result = run(&app, &ctx.prepared, lease, EventKinds::empty(), Box::new(|_| true)).await;
    match result {
        Ok(outcome) => {
            let document =
                api::response_document(&ctx.response(&app), &outcome, &|ids: &[u32]| {
                    app.served.decode(ids)
                });
            log.done(200, Some(&outcome));
            json_response(200, &document)
        }
        Err(error) => log.refuse(error),
    }
}

/// Runs a prepared request on its lease, within the request deadline.
async fn run(
    app: &App,
    prepared: &Prepared,
    lease: Lease,
    events: EventKinds,
    observer: Observer,
) -> Result<Outcome, ApiError> {
    let timeout = app.config.request_timeout;
    let limits = Limits::for_request(prepared.options.n, prepared.options.max_new_tokens, timeout);
    let call =
        app.runtime.run(lease, &prepared.prompt, &prepared.options, events, observer, limits);
    match tokio::time::timeout(timeout, call).await {
        Ok(run) => run.result.map_err(run_error),
        Err(_) => Err(run_error(RunError::Timeout)),
    }
}

/// A request's identity and what it asked for.
struct Context {
    id: String,
    created: u64,
    prepared: Prepared,
}

impl Context {
    fn response<'a>(&'a self, app: &'a App) -> ResponseContext<'a> {
        ResponseContext {
            id: &self.id,
            created: self.created,
            model: &app.config.model_id,
            request: &self.prepared.request,
            kv_budget_tokens: self.prepared.capacity,
        }
    }
}

fn own(event: &Event<'_>) -> Option<OwnedEvent> {
    Some(match *event {
        Event::Prefilled { first_row, rows } => OwnedEvent::Prefilled { first_row, rows },
        Event::Step { rows, tokens, .. } => {
            OwnedEvent::Step { rows: rows.to_vec(), tokens: tokens.to_vec() }
        }
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
        RunError::Engine(error) => {
            ApiError::status(500, "server_error", format!("engine error: {error}"))
        }
        RunError::OutOfFuel => {
            ApiError::status(500, "server_error", RunError::OutOfFuel.to_string())
                .with_code("component_out_of_fuel")
        }
        RunError::Timeout => {
            ApiError::status(504, "timeout", RunError::Timeout.to_string()).with_code("timeout")
        }
        other => ApiError::status(500, "server_error", other.to_string()),
    }
}

/// Aborts a task when dropped (a streaming client's body gone).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Streams a request: `data:` chunks with the leader's new text, `event: leader` when the
/// leader changes, `event: rejected` at each decision, `event: winner` with the whole
/// response document, then `data: [DONE]`. The leader is row `first_row` of a batch until
/// the first decision, then the best-scored kept row; when it finishes, the lowest live row.
/// The request runs on a task of its own, aborted when the client's body is dropped.
fn stream_response(app: Arc<App>, ctx: Context, lease: Lease, log: RequestLog) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<RunMsg>();
    let ctx = Arc::new(ctx);
    let task = {
        let (app, ctx, tx) = (Arc::clone(&app), Arc::clone(&ctx), tx.clone());
        let mut log = log;
        tokio::spawn(async move {
            let _active = Active::new(&app.metrics);
            let events = EventKinds::PREFILLED
                | EventKinds::STEP
                | EventKinds::DECISION
                | EventKinds::FINISHED;
            // A client that left drops the receiver: the send fails and the run stops.
            let sender = tx.clone();
            let observer: Observer = Box::new(move |event| {
                own(event).is_none_or(|event| sender.send(RunMsg::Event(event)).is_ok())
            });
            let result = run(&app, &ctx.prepared, lease, events, observer).await;
            match &result {
                Ok(outcome) => log.done(200, Some(outcome)),
                // The observer stopped the run because the stream's receiver is gone.
                Err(_) if tx.is_closed() => drop(log),
                Err(error) => log.done(error.status, None),
            }
            let _ = tx.send(RunMsg::Done(result));
        })
    };
    drop(tx);
    let streamer = Streamer::new(app, ctx);
    let state = (rx, streamer, VecDeque::new(), false, AbortOnDrop(task));
    let events =
        stream::unfold(state, |(mut rx, mut streamer, mut queue, mut ended, guard)| async move {
            loop {
                if let Some(event) = queue.pop_front() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (rx, streamer, queue, ended, guard),
                    ));
                }
                if ended {
                    return None;
                }
                match rx.recv().await {
                    Some(message) => {
                        ended = matches!(message, RunMsg::Done(_));
                        queue.extend(streamer.on(message));
                    }
                    None => {
                        let error = ApiError::status(
                            500,
                            "server_error",
                            "the request's task ended without an answer",
                        );
                        queue.push_back(
                            SseEvent::default().event("error").data(error.body().to_string()),
                        );
                        queue.push_back(SseEvent::default().data("[DONE]"));
                        ended = true;
                    }
                }
            }
        });
    let mut answer = Sse::new(events).into_response();
    answer.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    answer
}

/// Follows the current leader's text as it grows.
struct Leader {
    row: Option<u32>,
    /// Its text already sent.
    sent: String,
}

/// Turns a request's run messages into server-sent events.
struct Streamer {
    app: Arc<App>,
    ctx: Arc<Context>,
    chat: bool,
    started: bool,
    tokens: HashMap<u32, Vec<u32>>,
    live: Vec<u32>,
    leader: Leader,
}

impl Streamer {
    fn new(app: Arc<App>, ctx: Arc<Context>) -> Self {
        let chat = ctx.prepared.request.endpoint == Endpoint::Chat;
        Self {
            app,
            ctx,
            chat,
            started: false,
            tokens: HashMap::new(),
            live: Vec::new(),
            leader: Leader { row: None, sent: String::new() },
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.app.served.decode(ids)
    }

    fn chunk(&self, text: Option<&str>, row: Option<u32>, finish: Option<&str>) -> SseEvent {
        let choice = if self.chat {
            let delta = match text {
                Some(t) => json!({ "content": t }),
                None if finish.is_none() => json!({ "role": "assistant", "content": "" }),
                None => json!({}),
            };
            json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null })
        } else {
            json!({ "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null })
        };
        let data = json!({
            "id": self.ctx.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.ctx.created,
            "model": self.app.config.model_id,
            "choices": [choice],
            "specrej": { "row": row },
        });
        SseEvent::default().data(data.to_string())
    }

    fn switch(&mut self, row: u32) -> SseEvent {
        self.leader.row = Some(row);
        self.leader.sent = self.decode(self.tokens.get(&row).map_or(&[][..], Vec::as_slice));
        SseEvent::default()
            .event("leader")
            .data(json!({ "row": row, "text": self.leader.sent }).to_string())
    }

    fn on(&mut self, message: RunMsg) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            if self.chat {
                out.push(self.chunk(None, None, None));
            }
        }
        match message {
            RunMsg::Event(OwnedEvent::Prefilled { first_row, rows }) => {
                // A new batch starts when the last one has finished: its first row leads.
                self.live = (first_row..first_row + rows as u32).collect();
                out.push(self.switch(first_row));
            }
            RunMsg::Event(OwnedEvent::Step { rows, tokens: sampled }) => {
                for (&row, &token) in rows.iter().zip(&sampled) {
                    self.tokens.entry(row).or_default().push(token);
                }
                self.live = rows;
                if let Some(row) = self.leader.row.filter(|r| self.live.contains(r)) {
                    let text = self.decode(&self.tokens[&row]);
                    if !text.ends_with('\u{FFFD}')
                        && text.len() > self.leader.sent.len()
                        && text.starts_with(&self.leader.sent)
                    {
                        let delta = text[self.leader.sent.len()..].to_string();
                        self.leader.sent = text;
                        out.push(self.chunk(Some(&delta), Some(row), None));
                    }
                }
            }
            RunMsg::Event(OwnedEvent::Decision { position, threshold, rows, scores, kept }) => {
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
                out.push(SseEvent::default().event("rejected").data(data.to_string()));
                self.live.retain(|r| kept.contains(r));
                let best = rows
                    .iter()
                    .zip(&scores)
                    .filter(|(r, _)| kept.contains(r))
                    .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)))
                    .map(|(r, _)| *r);
                if let Some(best) = best
                    && self.leader.row != Some(best)
                {
                    out.push(self.switch(best));
                }
            }
            RunMsg::Event(OwnedEvent::Finished { row }) => {
                self.live.retain(|&r| r != row);
                if self.leader.row == Some(row)
                    && let Some(&next) = self.live.iter().min()
                {
                    out.push(self.switch(next));
                }
            }
            RunMsg::Done(Ok(outcome)) => {
                let app = Arc::clone(&self.app);
                let document =
                    api::response_document(&self.ctx.response(&app), &outcome, &|ids: &[u32]| {
                        app.served.decode(ids)
                    });
                out.push(SseEvent::default().event("winner").data(document.to_string()));
                let finish = api::finish_reason(outcome.winner().finish);
                out.push(self.chunk(None, Some(outcome.winner().row), Some(finish)));
                out.push(SseEvent::default().data("[DONE]"));
            }
            RunMsg::Done(Err(error)) => {
                out.push(SseEvent::default().event("error").data(error.body().to_string()));
                out.push(SseEvent::default().data("[DONE]"));
            }
        }
        out
    }
}

// ---- observability ----

/// Upper bounds (seconds) of the request-latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 12] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// The server's own counters (the engine's are in [`batcher::EngineCounters`]).
#[derive(Debug, Default)]
struct Metrics {
    /// Requests running (admitted, not yet answered).
    active: AtomicUsize,
    /// Requests ended, by outcome label.
    ended: Mutex<HashMap<&'static str, u64>>,
    /// Decisions made by finished requests.
    decisions: AtomicU64,
    /// `[buckets + 1]` counts (the last is +Inf), the sum of seconds, per finished request.
    latency: Mutex<([u64; LATENCY_BUCKETS.len() + 1], f64)>,
    /// (when, tokens sampled so far) once a second, the last 11 samples.
    token_samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// Counts a request as active while it lives.
struct Active<'a>(&'a Metrics);

impl<'a> Active<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.active.fetch_add(1, Ordering::SeqCst);
        Self(metrics)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Samples the engine's token counter once a second (for `specrej_tokens_per_second`).
async fn sample_tokens(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let tokens = app.engine.counters().tokens.load(Ordering::Relaxed);
        let mut samples = app.metrics.token_samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples.push_back((Instant::now(), tokens));
        while samples.len() > 11 {
            samples.pop_front();
        }
    }
}

/// `GET /metrics`: Prometheus text format 0.0.4.
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = render_metrics(&app);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

fn render_metrics(app: &App) -> String {
    use std::fmt::Write as _;
    let engine = app.engine.counters();
    let info = app.engine.info();
    let m = &app.metrics;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    let bytes = |tokens: usize| tokens as u64 * info.kv_bytes_per_token as u64;
    metric(
        "specrej_queue_depth",
        "gauge",
        "Requests waiting for their KV grant.",
        app.admission.queued().to_string(),
    );
    metric(
        "specrej_requests_active",
        "gauge",
        "Requests running.",
        m.active.load(Ordering::SeqCst).to_string(),
    );
    metric(
        "specrej_batches_active",
        "gauge",
        "Batches alive on the engine.",
        engine.batches.load(Ordering::SeqCst).to_string(),
    );
    metric(
        "specrej_rows_active",
        "gauge",
        "Rows alive over all requests.",
        engine.rows.load(Ordering::SeqCst).to_string(),
    );
    metric(
        "specrej_kv_budget_bytes",
        "gauge",
        "The whole KV budget.",
        bytes(app.admission.total()).to_string(),
    );
    metric(
        "specrej_kv_granted_bytes",
        "gauge",
        "KV budget granted to running requests.",
        bytes(app.admission.granted()).to_string(),
    );
    let used = if info.merges {
        engine.kv_bytes_held.load(Ordering::Relaxed)
    } else {
        bytes(app.admission.granted())
    };
    metric(
        "specrej_kv_used_bytes",
        "gauge",
        "KV bytes held by rows (the grants where the backend does not count blocks).",
        used.to_string(),
    );
    metric(
        "specrej_kv_free_bytes",
        "gauge",
        "KV budget not held.",
        bytes(app.admission.total()).saturating_sub(used).to_string(),
    );
    metric(
        "specrej_tokens_generated_total",
        "counter",
        "Tokens sampled.",
        engine.tokens.load(Ordering::Relaxed).to_string(),
    );
    let rate = {
        let samples = m.token_samples.lock().unwrap_or_else(PoisonError::into_inner);
        match (samples.front(), samples.back()) {
            (Some(first), Some(last)) if last.0 > first.0 => {
                (last.1 - first.1) as f64 / (last.0 - first.0).as_secs_f64()
            }
            _ => 0.0,
        }
    };
    metric(
        "specrej_tokens_per_second",
        "gauge",
        "Tokens sampled per second over the last 10 s.",
        format!("{rate:.3}"),
    );
    metric(
        "specrej_step_rounds_total",
        "counter",
        "Engine step rounds (one batched pass each on the CPU).",
        engine.rounds.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "specrej_batch_steps_total",
        "counter",
        "Request batches stepped (a round of k requests counts k).",
        engine.batch_steps.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "specrej_widest_round_batches",
        "gauge",
        "The most request batches one round has stepped together.",
        engine.widest_round.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "specrej_decisions_total",
        "counter",
        "Speculative Rejection decisions of finished requests.",
        m.decisions.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "specrej_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        format!("{:.3}", app.started.elapsed().as_secs_f64()),
    );
    let _ = writeln!(
        out,
        "# HELP specrej_engine_seconds_total Seconds the engine thread spent, by kind of work.\n# TYPE specrej_engine_seconds_total counter"
    );
    for (kind, nanos) in batcher::JOB_KINDS.iter().zip(&engine.busy_nanos) {
        let _ = writeln!(
            out,
            "specrej_engine_seconds_total{{job=\"{kind}\"}} {:.6}",
            nanos.load(Ordering::Relaxed) as f64 * 1e-9
        );
    }
    let _ = writeln!(
        out,
        "# HELP specrej_requests_total Requests ended, by outcome.\n# TYPE specrej_requests_total counter"
    );
    let ended = m.ended.lock().unwrap_or_else(PoisonError::into_inner);
    let mut labels: Vec<_> = ended.iter().collect();
    labels.sort();
    for (label, count) in labels {
        let _ = writeln!(out, "specrej_requests_total{{outcome=\"{label}\"}} {count}");
    }
    let (counts, sum) = *m.latency.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = writeln!(
        out,
        "# HELP specrej_request_duration_seconds Seconds from a request's body to its answer.\n# TYPE specrej_request_duration_seconds histogram"
    );
    let mut cumulative = 0;
    for (bound, count) in LATENCY_BUCKETS.iter().zip(&counts) {
        cumulative += count;
        let _ =
            writeln!(out, "specrej_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += counts[LATENCY_BUCKETS.len()];
    let _ = writeln!(out, "specrej_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(
        out,
        "specrej_request_duration_seconds_sum {sum:.6}\nspecrej_request_duration_seconds_count {cumulative}"
    );
    out
}

/// One JSON line on stderr per request, written when it ends (answered, refused, or its
/// client gone), and the request's part of [`Metrics`].
struct RequestLog {
    app: Arc<App>,
    id: String,
    endpoint: Endpoint,
    start: Instant,
    admitted: Option<Instant>,
    fields: Value,
    ended: bool,
}

impl RequestLog {
    fn new(app: Arc<App>, id: String, endpoint: Endpoint) -> Self {
        Self {
            app,
            id,
            endpoint,
            start: Instant::now(),
            admitted: None,
            fields: json!({}),
            ended: false,
        }
    }

    fn describe(&mut self, prepared: &Prepared) {
        let r = &prepared.request;
        self.fields = json!({
            "method": api::method_name(r.method),
            "n": r.n,
            "max_tokens": r.max_tokens,
            "reward": r.reward.name(),
            "seed": r.seed,
            "stream": r.stream,
            "prompt_tokens": prepared.prompt.len(),
            "kv_grant_tokens": prepared.capacity,
        });
    }

    fn admitted(&mut self) {
        self.admitted = Some(Instant::now());
    }

    fn refuse(&mut self, error: ApiError) -> Response {
        self.end(error.status, None, Some(&error.message));
        error_response(&error)
    }

    fn done(&mut self, status: u16, outcome: Option<&Outcome>) {
        self.end(status, outcome, None);
    }

    fn end(&mut self, status: u16, outcome: Option<&Outcome>, error: Option<&str>) {
        if self.ended {
            return;
        }
        self.ended = true;
        let seconds = self.start.elapsed().as_secs_f64();
        let label = match status {
            0 => "client_gone",
            200..=299 => "ok",
            429 => "queue_full",
            504 => "timeout",
            400..=499 => "client_error",
            _ => "server_error",
        };
        let m = &self.app.metrics;
        *m.ended.lock().unwrap_or_else(PoisonError::into_inner).entry(label).or_default() += 1;
        if self.admitted.is_some() {
            let mut latency = m.latency.lock().unwrap_or_else(PoisonError::into_inner);
            let bucket =
                LATENCY_BUCKETS.iter().position(|&b| seconds <= b).unwrap_or(LATENCY_BUCKETS.len());
            latency.0[bucket] += 1;
            latency.1 += seconds;
        }
        let mut line = json!({
            "ts": now(),
            "id": self.id,
            "endpoint": match self.endpoint { Endpoint::Chat => "chat", Endpoint::Completions => "completions" },
            "status": status,
            "outcome": label,
            "seconds": (seconds * 1e3).round() / 1e3,
            "queue_seconds": self.admitted.map(|a| ((a - self.start).as_secs_f64() * 1e3).round() / 1e3),
        });
        if let (Value::Object(line), Value::Object(fields)) = (&mut line, &self.fields) {
            line.extend(fields.clone());
            if let Some(outcome) = outcome {
                m.decisions.fetch_add(outcome.trace.len() as u64, Ordering::Relaxed);
                line.insert("completion_tokens".into(), json!(outcome.stats.tokens_generated));
                line.insert("decisions".into(), json!(outcome.trace.len()));
                line.insert("winner_row".into(), json!(outcome.winner().row));
            }
            if let Some(error) = error {
                line.insert("error".into(), json!(error));
            }
        }
        eprintln!("{line}");
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        // Dropped unanswered: the client left (hyper dropped the request's future).
        self.end(0, None, Some("the client left before the answer"));
    }
}
