//! The HTTP server on 127.0.0.1, port 0: the fake backend (always) and the default model
//! (ignored without `SPECREJ_MODEL`).

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{events, get, head, post, raw};
use serde_json::{Value, json};
use specrej_host::api::RequestLimits;
use specrej_host::{BackendKind, RealModel, Served, ServerConfig};

const CHAT: &str = "/v1/chat/completions";

fn start(served: Served, config: ServerConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let handle = specrej_host::spawn(listener, Arc::new(served), common::component_bytes(), config)
        .expect("server starts");
    handle.addr
}

/// The static files the fake server serves: (name, content type, body).
const STATIC_FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", "<!doctype html><title>demo</title>"),
    ("src/app.js", "text/javascript; charset=utf-8", "export const x = 1;"),
    ("pkg/engine.wasm", "application/wasm", "\0asm-not-really"),
    ("build.json", "application/json", "{\"model\":\"models/tiny.gguf\"}"),
    ("style.css", "text/css; charset=utf-8", "body{}"),
    ("logo.svg", "image/svg+xml", "<svg/>"),
    ("icon.png", "image/png", "PNG-ish"),
];

/// A folder with [`STATIC_FILES`], a `models/` folder with `tiny.gguf` beside it, and a
/// secret outside both.
fn static_fixture() -> (PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("specrej-host-static-{}", std::process::id()));
    let (site, models) = (base.join("site"), base.join("models"));
    for (name, _, body) in STATIC_FILES {
        let path = site.join(name);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, body).expect("write");
    }
    std::fs::create_dir_all(&models).expect("mkdir");
    std::fs::write(models.join("tiny.gguf"), "GGUF0123456789").expect("write");
    std::fs::write(models.join("notes.txt"), "not a model").expect("write");
    std::fs::write(base.join("secret.gguf"), "secret").expect("write");
    (site, models)
}

/// One fake server for the whole binary (serving [`static_fixture`] too).
fn fake_server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (site, models) = static_fixture();
        let config = ServerConfig {
            limits: RequestLimits { max_n: 32, max_tokens: 512, default_max_tokens: 24 },
            kv_budget_tokens: 2000,
            request_timeout: Duration::from_secs(60),
            model_id: "specrej-fake".into(),
            static_dir: Some(site),
            models_dir: Some(models),
            ..ServerConfig::default()
        };
        start(Served::Fake, config)
    })
}

fn chat_body(extra: Value) -> String {
    let mut body =
        json!({ "model": "x", "messages": [{ "role": "user", "content": "hello there" }] });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body.to_string()
}

#[test]
fn health_and_models() {
    let addr = fake_server();
    let health = get(addr, "/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    let models = get(addr, "/v1/models");
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "specrej-fake");
    assert_eq!(get(addr, "/nowhere").status, 404);
    assert_eq!(get(addr, CHAT).status, 405);
}

#[test]
fn static_files_with_their_content_types() {
    let addr = fake_server();
    for (name, kind, body) in STATIC_FILES {
        let answer = get(addr, &format!("/{name}"));
        assert_eq!(answer.status, 200, "{name}: {}", answer.body);
        assert!(
            answer.headers.contains(&format!("content-type: {kind}")),
            "{name}: {}",
            answer.headers
        );
        assert!(
            answer.headers.contains(&format!("content-length: {}", body.len())),
            "{name}: {}",
            answer.headers
        );
        assert_eq!(answer.body, *body, "{name}");
    }
    // `/` is index.html; a query string is ignored; HEAD sends the head only.
    assert_eq!(get(addr, "/").body, STATIC_FILES[0].2);
    assert_eq!(get(addr, "/src/app.js?v=3").body, STATIC_FILES[1].2);
    let answer = head(addr, "/pkg/engine.wasm");
    assert_eq!(answer.status, 200);
    assert!(answer.headers.contains("content-type: application/wasm"), "{}", answer.headers);
    assert!(
        answer.headers.contains(&format!("content-length: {}", STATIC_FILES[2].2.len())),
        "{}",
        answer.headers
    );
    assert!(answer.body.is_empty(), "HEAD has no body: {:?}", answer.body);
    // The model, from the models folder, with its length (the page's progress bar).
    let model = get(addr, "/models/tiny.gguf");
    assert_eq!((model.status, model.body.as_str()), (200, "GGUF0123456789"));
    assert!(
        model.headers.contains("content-length: 14")
            && model.headers.contains("application/octet-stream"),
        "{}",
        model.headers
    );
    // The API keeps its routes.
    assert_eq!(get(addr, "/health").json()["status"], "ok");
    assert_eq!(get(addr, "/v1/models").json()["data"][0]["id"], "specrej-fake");
    assert_eq!(get(addr, CHAT).status, 405);
    assert_eq!(post(addr, "/index.html", "{}").status, 404);
}

#[test]
fn static_files_refuse_traversal_and_answer_404_for_missing_ones() {
    let addr = fake_server();
    for path in ["/missing.js", "/src/", "/models/missing.gguf"] {
        assert_eq!(get(addr, path).status, 404, "{path}");
    }
    for path in [
        "/../secret.gguf",
        "/src/../../secret.gguf",
        "/%2e%2e/secret.gguf",
        "/src/%2e%2e/%2e%2e/secret.gguf",
        "/%2e%2e%2fsecret.gguf",
        "/models/../secret.gguf",
        "/models/%2e%2e%2fsecret.gguf",
        "/models/..%5csecret.gguf",
        "/models/notes.txt",
        "/a%00b",
        "/%zz",
    ] {
        let answer = get(addr, path);
        assert!((400..500).contains(&answer.status), "{path} → {}", answer.status);
        assert!(
            !answer.body.contains("secret") || answer.body.contains(path),
            "{path} leaks: {}",
            answer.body
        );
    }
    // Still serving.
    assert_eq!(get(addr, "/").status, 200);
}

#[test]
fn best_of_n_returns_every_choice_best_first() {
    let addr = fake_server();
    let answer = post(addr, CHAT, &chat_body(json!({ "n": 4, "max_tokens": 12, "seed": 2 })));
    assert_eq!(answer.status, 200, "{}", answer.body);
    let doc = answer.json();
    assert_eq!(doc["object"], "chat.completion");
    let choices = doc["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4);
    let scores: Vec<f64> =
        choices.iter().map(|c| c["specrej"]["score"].as_f64().expect("score")).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["role"], "assistant");
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().expect("finish_reason")));
    }
    let usage = &doc["usage"];
    assert!(usage["prompt_tokens"].as_u64().expect("prompt_tokens") > 0);
    assert!(usage["completion_tokens"].as_u64().expect("completion_tokens") > 0);
    assert!(usage["reward_tokens"].as_u64().expect("reward_tokens") > 0);
    assert_eq!(usage["rejection_trace"], json!([]));
    assert_eq!(doc["specrej"]["method"], "best_of_n");

    // Same seed, same answer; the winner only when asked.
    let again = post(
        addr,
        CHAT,
        &chat_body(
            json!({ "n": 4, "max_tokens": 12, "seed": 2, "specrej": { "return_candidates": false } }),
        ),
    );
    let again = again.json();
    assert_eq!(again["choices"].as_array().expect("choices").len(), 1);
    assert_eq!(again["choices"][0]["message"], doc["choices"][0]["message"]);
}

#[test]
fn speculative_rejection_reports_its_trace() {
    let addr = fake_server();
    let body = chat_body(json!({
        "max_tokens": 40,
        "specrej": { "method": "speculative_rejection", "n": 8, "alpha": 0.5, "min_new_tokens": 4 }
    }));
    let answer = post(addr, CHAT, &body);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let doc = answer.json();
    let trace = doc["usage"]["rejection_trace"].as_array().expect("trace");
    assert!(!trace.is_empty(), "a decision happens: {doc}");
    assert!(!doc["usage"]["rejected"].as_array().expect("rejected").is_empty());
    assert_eq!(doc["specrej"]["method"], "speculative_rejection");
    assert_eq!(doc["specrej"]["alpha"], 0.5);
}

#[test]
fn completions_endpoint() {
    let addr = fake_server();
    let answer = post(
        addr,
        "/v1/completions",
        &json!({ "prompt": "once upon a time", "n": 2, "max_tokens": 8 }).to_string(),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let doc = answer.json();
    assert_eq!(doc["object"], "text_completion");
    assert_eq!(doc["choices"].as_array().expect("choices").len(), 2);
    assert!(doc["choices"][0]["text"].is_string());
}

#[test]
fn bad_requests_get_400_naming_the_field() {
    let addr = fake_server();
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("{not json".into(), 400, None),
        ("[1, 2]".into(), 400, None),
        (json!({ "messages": "hi" }).to_string(), 400, Some("messages")),
        (json!({ "messages": [] }).to_string(), 400, Some("messages")),
        (
            json!({ "messages": [{ "role": "user", "content": "   " }] }).to_string(),
            400,
            Some("messages"),
        ),
        (chat_body(json!({ "n": 0 })), 400, Some("n")),
        (chat_body(json!({ "n": -3 })), 400, Some("n")),
        (chat_body(json!({ "n": 2.5 })), 400, Some("n")),
        (chat_body(json!({ "n": 1000 })), 400, Some("n")),
        (chat_body(json!({ "max_tokens": -1 })), 400, Some("max_tokens")),
        (chat_body(json!({ "temperature": "warm" })), 400, Some("temperature")),
        (chat_body(json!({ "top_p": 0 })), 400, Some("top_p")),
        (chat_body(json!({ "stream": "yes" })), 400, Some("stream")),
        (chat_body(json!({ "specrej": { "alpha": 1.0 } })), 400, Some("specrej.alpha")),
        (chat_body(json!({ "specrej": { "alpha": -0.5 } })), 400, Some("specrej.alpha")),
        (chat_body(json!({ "specrej": { "method": "beam" } })), 400, Some("specrej.method")),
        (chat_body(json!({ "specrej": { "reward": 3 } })), 400, Some("specrej.reward")),
        (chat_body(json!({ "specrej": { "surprise": true } })), 400, Some("specrej.surprise")),
        (chat_body(json!({ "specrej": [] })), 400, Some("specrej")),
        // The context holds 4096 tokens.
        (
            chat_body(
                json!({ "max_tokens": 500, "messages": [{ "role": "user", "content": "x".repeat(3700) }] }),
            ),
            400,
            Some("max_tokens"),
        ),
        // One row of prompt (~1600 tokens) + 512 new ones does not fit the 2000-token KV budget.
        (
            chat_body(
                json!({ "max_tokens": 512, "messages": [{ "role": "user", "content": "y".repeat(1600) }] }),
            ),
            413,
            Some("max_tokens"),
        ),
    ];
    for (body, status, param) in cases {
        let answer = post(addr, CHAT, &body);
        assert_eq!(answer.status, status, "{body} → {}", answer.body);
        let doc = answer.json();
        let error = &doc["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", answer.body);
        assert!(error["type"].is_string(), "{}", answer.body);
        assert_eq!(error["param"].as_str(), param, "{body} → {}", answer.body);
    }
    let completion = post(addr, "/v1/completions", &json!({ "prompt": "" }).to_string());
    assert_eq!(
        (completion.status, completion.json()["error"]["param"].as_str()),
        (400, Some("prompt"))
    );
    // A body over the limit, and a request line that is not HTTP.
    let big = format!("POST {CHAT} HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 10 << 20);
    assert_eq!(raw(addr, big.as_bytes()).status, 413);
    assert_eq!(raw(addr, b"HELLO\r\n\r\n").status, 400);
    // The server is still fine.
    assert_eq!(post(addr, CHAT, &chat_body(json!({ "max_tokens": 4 }))).status, 200);
}

#[test]
fn concurrent_requests_are_all_answered() {
    let addr = fake_server();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let body = chat_body(json!({ "n": 3, "max_tokens": 16, "seed": i }));
                let answer = post(addr, CHAT, &body);
                assert_eq!(answer.status, 200, "{}", answer.body);
                answer.json()["choices"].as_array().expect("choices").len()
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().expect("request thread"), 3);
    }
}

#[test]
fn streaming_sends_tokens_rejections_and_the_winner() {
    let addr = fake_server();
    let body = chat_body(json!({
        "stream": true, "max_tokens": 30, "seed": 4,
        "specrej": { "method": "speculative_rejection", "n": 6, "alpha": 0.5, "min_new_tokens": 4 }
    }));
    let answer = post(addr, CHAT, &body);
    assert_eq!(answer.status, 200);
    assert!(answer.headers.contains("content-type: text/event-stream"), "{}", answer.headers);
    let events = events(&answer.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"), "{names:?}");
    assert!(names.contains(&"leader"), "{names:?}");
    assert!(names.contains(&"rejected"), "{names:?}");
    let chunks: Vec<Value> = events
        .iter()
        .filter(|(n, d)| n == "message" && d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert!(chunks.len() > 2, "token chunks arrive: {names:?}");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!streamed.is_empty());
    let rejected: Value =
        serde_json::from_str(&events.iter().find(|(n, _)| n == "rejected").expect("rejected").1)
            .expect("JSON");
    assert!(!rejected["rejected"].as_array().expect("rows").is_empty());
    let winner: Value =
        serde_json::from_str(&events.iter().find(|(n, _)| n == "winner").expect("winner").1)
            .expect("JSON");
    assert_eq!(winner["object"], "chat.completion");
    assert!(!winner["usage"]["rejection_trace"].as_array().expect("trace").is_empty());
    // The stream's winner is the non-streamed answer.
    let plain = post(addr, CHAT, &body.replace("\"stream\":true", "\"stream\":false")).json();
    assert_eq!(plain["choices"], winner["choices"]);
}

fn real_server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let path = common::default_model();
        let model =
            RealModel::load(Path::new(&path), BackendKind::Cpu, specrej_candle::WeightFormat::Q8_0)
                .expect("model");
        let config = ServerConfig { model_id: "smollm2".into(), ..ServerConfig::default() };
        start(Served::Real(Box::new(model)), config)
    })
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn real_model_chat_completion_and_stream() {
    let addr = real_server();
    let body = json!({
        "messages": [{ "role": "user", "content": "Name a fruit." }],
        "n": 3, "max_tokens": 12, "seed": 1,
    });
    let answer = post(addr, CHAT, &body.to_string());
    assert_eq!(answer.status, 200, "{}", answer.body);
    let doc = answer.json();
    assert_eq!(doc["choices"].as_array().expect("choices").len(), 3);
    let text = doc["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(text.chars().any(char::is_alphabetic), "{text:?}");
    assert!(doc["usage"]["reward_tokens"].as_u64().expect("reward tokens") > 0);
    // The time breakdown, measured by the host around each import.
    let usage = &doc["usage"];
    let seconds = |k: &str| usage[k].as_f64().unwrap_or_else(|| panic!("usage.{k}"));
    assert!(
        seconds("step_seconds") > 0.0
            && seconds("reward_seconds") > 0.0
            && seconds("prefill_seconds") > 0.0,
        "{usage}"
    );
    assert!(
        seconds("step_seconds")
            + seconds("reward_seconds")
            + seconds("prefill_seconds")
            + seconds("retain_seconds")
            <= seconds("wall_seconds")
    );

    // 4 rows with room for 6 tokens each, in blocks of 16: a decision after 16 tokens.
    let body = json!({
        "messages": [{ "role": "user", "content": "Give three tips for staying healthy." }],
        "stream": true, "max_tokens": 24, "seed": 2,
        "specrej": { "method": "speculative_rejection", "n": 4, "alpha": 0.5, "min_new_tokens": 6, "reward": "likelihood" },
    });
    let answer = post(addr, CHAT, &body.to_string());
    assert_eq!(answer.status, 200);
    let events = events(&answer.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"rejected") && names.contains(&"winner"), "{names:?}");
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"));

    let completion = json!({ "prompt": "The capital of France is", "max_tokens": 6, "n": 2, "specrej": { "reward": "likelihood" } });
    let answer = post(addr, "/v1/completions", &completion.to_string());
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["choices"].as_array().expect("choices").len(), 2);
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn a_judge_question_over_the_context_is_a_400() {
    let addr = real_server();
    // A prompt and max_tokens that fill the context exactly: the policy's side fits, but the
    // judge's question quotes the prompt and adds its own words, so the judge's input does not.
    let text =
        specrej_text::ModelText::load(Path::new(&common::default_model())).expect("model text");
    let long = "word ".repeat(7000);
    let prompt =
        text.encode_chat(&[specrej_text::Message::user(long.as_str())]).expect("encode").len();
    let judge =
        specrej_text::judge_segments(&text.tokenizer, &text.template, &long).expect("judge");
    let context = 8192;
    let max_tokens = context - prompt;
    assert!(
        judge.before.len() + judge.after.len() > prompt,
        "the judge's question is longer than the prompt"
    );
    let body = json!({ "messages": [{ "role": "user", "content": long }], "n": 2, "max_tokens": max_tokens, "seed": 1 });
    let answer = post(addr, CHAT, &body.to_string());
    assert_eq!(answer.status, 400, "{}", answer.body);
    let error = &answer.json()["error"];
    assert_eq!(error["code"], "context_length_exceeded", "{error}");
    assert_eq!(error["param"], "max_tokens", "{error}");
    assert!(error["message"].as_str().expect("message").contains("judge"), "{error}");
}

/// Removes a folder when dropped, so a failing test leaves no ~270 MB export behind.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn real_model_with_a_reward_model_directory_and_a_reward_server() {
    let path = common::default_model();
    // The default model's judge as a Hugging Face reward-model directory (f16, ~270 MB).
    let rm_dir =
        TempDir(std::env::temp_dir().join(format!("specrej-host-rm-{}", std::process::id())));
    specrej_reward::export_judge_rm(&path, &rm_dir.0, specrej_reward::ExportDtype::F16)
        .expect("export");
    let mut model = RealModel::load(&path, BackendKind::Cpu, specrej_candle::WeightFormat::Q8_0)
        .expect("model");
    model.load_reward("rm", &rm_dir.0).expect("reward model");
    // The same reward model behind specrej-reward's server.
    let options = specrej_candle::LoadOptions {
        weights: specrej_candle::WeightFormat::F32,
        ..Default::default()
    };
    let rm = specrej_reward::RewardModel::load(&rm_dir.0, &options).expect("reward model");
    let (rm_addr, _rm_server) =
        specrej_reward::spawn_server("127.0.0.1:0", rm).expect("reward server");
    model
        .add_reward("remote", specrej_host::ExtraReward::Remote(format!("http://{rm_addr}/score")))
        .expect("remote");
    for taken in ["judge", "rm", ""] {
        let again = specrej_host::ExtraReward::Remote("http://127.0.0.1:1/".into());
        assert!(model.add_reward(taken, again).is_err(), "{taken:?}");
    }
    let addr = start(
        Served::Real(Box::new(model)),
        ServerConfig { model_id: "smollm2".into(), ..ServerConfig::default() },
    );

    let models = get(addr, "/v1/models").json();
    assert_eq!(
        models["data"][0]["specrej"]["rewards"],
        json!(["judge", "partial_judge", "likelihood", "rm", "remote"])
    );

    let ask = |reward: &str| {
        // A decision after one 16-token block per row.
        let body = json!({
            "messages": [{ "role": "user", "content": "Give three tips for staying healthy." }],
            "max_tokens": 24, "seed": 3,
            "specrej": { "method": "speculative_rejection", "n": 4, "alpha": 0.5, "min_new_tokens": 4, "reward": reward },
        });
        let answer = post(addr, CHAT, &body.to_string());
        assert_eq!(answer.status, 200, "{reward}: {}", answer.body);
        answer.json()
    };
    let local = ask("rm");
    assert_eq!(local["specrej"]["reward"], "rm");
    assert!(local["usage"]["reward_tokens"].as_u64().expect("reward tokens") > 0);
    assert!(
        !local["usage"]["rejection_trace"].as_array().expect("trace").is_empty(),
        "SR made a decision"
    );
    let remote = ask("remote");
    assert_eq!(remote["specrej"]["winner_row"], local["specrej"]["winner_row"]);
    assert_eq!(
        remote["choices"][0]["message"]["content"],
        local["choices"][0]["message"]["content"]
    );
    assert_eq!(
        remote["usage"]["reward_tokens"], local["usage"]["reward_tokens"],
        "both score incrementally"
    );

    let unknown = post(addr, CHAT, &json!({ "messages": [{ "role": "user", "content": "hi" }], "specrej": { "reward": "nope" } }).to_string());
    assert_eq!(unknown.status, 400);
    let error = &unknown.json()["error"];
    assert_eq!(error["param"], "specrej.reward");
    assert!(
        error["message"].as_str().expect("message").contains(r#""rm", "remote"), got "nope""#),
        "{error}"
    );
}

/// Milliseconds at quantile `q` of sorted `values`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Request `i` of the load test: (a key naming what it asks for, the body, streamed?).
/// Best-of-N and Speculative Rejection alternate, n runs 4-16, every fourth is streamed.
fn load_request(i: usize) -> (String, String, bool) {
    let seed = i % 5;
    let stream = (i + 1).is_multiple_of(4);
    let n = 4 + 4 * (i / 2 % 4);
    let (key, specrej) = if i.is_multiple_of(2) {
        (format!("bon n={n} seed={seed}"), json!({ "method": "best_of_n", "n": n }))
    } else {
        (
            format!("sr n={n} seed={seed}"),
            json!({ "method": "speculative_rejection", "n": n, "alpha": 0.5, "min_new_tokens": 4 }),
        )
    };
    let body = json!({
        "messages": [{ "role": "user", "content": "Name a fruit." }],
        "max_tokens": 8, "seed": seed, "stream": stream, "specrej": specrej,
    });
    (key, body.to_string(), stream)
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn load_64_requests_from_16_clients_are_all_answered_and_batched_together() {
    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 4;
    let addr = real_server();
    // (key, winner text, id, latency in ms) of every answer.
    type Answer = (String, String, String, f64);
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let answers = Arc::clone(&answers);
            std::thread::spawn(move || {
                for k in 0..PER_CLIENT {
                    let (key, body, stream) = load_request(client * PER_CLIENT + k);
                    let sent = Instant::now();
                    let answer = post(addr, CHAT, &body);
                    let ms = sent.elapsed().as_secs_f64() * 1e3;
                    assert_eq!(answer.status, 200, "{body} → {}", answer.body);
                    let doc = if stream {
                        assert!(answer.headers.contains("text/event-stream"), "{}", answer.headers);
                        let events = events(&answer.body);
                        assert_eq!(
                            events.last().map(|(_, d)| d.as_str()),
                            Some("[DONE]"),
                            "{body}"
                        );
                        let winner =
                            events.iter().find(|(n, _)| n == "winner").expect("a winner event");
                        serde_json::from_str::<Value>(&winner.1).expect("winner JSON")
                    } else {
                        answer.json()
                    };
                    assert_eq!(doc["object"], "chat.completion", "{doc}");
                    let choices = doc["choices"].as_array().expect("choices");
                    assert!(!choices.is_empty(), "{doc}");
                    let text =
                        choices[0]["message"]["content"].as_str().expect("content").to_string();
                    assert!(
                        doc["usage"]["completion_tokens"].as_u64().expect("usage") > 0,
                        "{doc}"
                    );
                    let id = doc["id"].as_str().expect("id").to_string();
                    answers.lock().expect("lock").push((key, text, id, ms));
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client thread");
    }
    let wall = started.elapsed().as_secs_f64();
    let answers = answers.lock().expect("lock");
    assert_eq!(answers.len(), CLIENTS * PER_CLIENT, "every request is answered");
    // Identical seeded requests (streamed or not) get identical winners.
    let mut winners: HashMap<&str, &str> = HashMap::new();
    for (key, text, _, _) in answers.iter() {
        let first = *winners.entry(key).or_insert(text);
        assert_eq!(first, text, "{key}: identical requests, different winners");
    }
    let mut ids: Vec<&str> = answers.iter().map(|a| a.2.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), answers.len(), "every answer has its own id");
    let mut latencies: Vec<f64> = answers.iter().map(|a| a.3).collect();
    latencies.sort_by(f64::total_cmp);
    eprintln!(
        "load: {} requests from {CLIENTS} clients ({} distinct) in {wall:.2} s: {:.2} requests/s, \
         latency p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        answers.len(),
        winners.len(),
        answers.len() as f64 / wall,
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.95),
        latencies.last().copied().unwrap_or(0.0),
    );
    // The engine merged the steps of several requests into one pass.
    assert!(metric(addr, "specrej_widest_round_batches") >= 2.0, "{}", get(addr, "/metrics").body);
    // A request alone gets the answer it got among the others.
    let (key, body, _) = load_request(1);
    let alone = post(addr, CHAT, &body).json();
    assert_eq!(
        alone["choices"][0]["message"]["content"].as_str(),
        Some(winners[key.as_str()]),
        "{key} alone"
    );
}

/// The value of an unlabelled metric in `/metrics`.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = get(addr, "/metrics").body;
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("{name} in {text}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

/// Polls `done` every 10 ms until it holds or `limit` passes; whether it held.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

#[test]
fn metrics_and_health_describe_the_engine() {
    let addr = fake_server();
    assert_eq!(
        post(addr, CHAT, &chat_body(json!({ "max_tokens": 6, "specrej": { "n": 3 } }))).status,
        200
    );
    let answer = get(addr, "/metrics");
    assert_eq!(answer.status, 200);
    assert!(
        answer.headers.contains("content-type: text/plain; version=0.0.4"),
        "{}",
        answer.headers
    );
    for name in [
        "specrej_queue_depth",
        "specrej_requests_active",
        "specrej_rows_active",
        "specrej_kv_used_bytes",
        "specrej_kv_free_bytes",
        "specrej_tokens_per_second",
        "specrej_decisions_total",
        "specrej_request_duration_seconds_count",
    ] {
        assert!(
            answer.body.contains(&format!("# TYPE {}", name.trim_end_matches("_count"))),
            "{name}: {}",
            answer.body
        );
    }
    assert!(metric(addr, "specrej_tokens_generated_total") >= 18.0, "{}", answer.body);
    assert!(metric(addr, "specrej_request_duration_seconds_count") >= 1.0, "{}", answer.body);
    assert!(answer.body.contains("specrej_requests_total{outcome=\"ok\"}"), "{}", answer.body);
    assert_eq!(post(addr, "/metrics", "{}").status, 405);
    let health = get(addr, "/health").json();
    assert_eq!(
        (health["status"].as_str(), health["queued"].is_u64()),
        (Some("ok"), true),
        "{health}"
    );
}

/// A fake server of its own with short deadlines.
fn strict_fake_server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let config = ServerConfig {
            limits: RequestLimits { max_n: 32, max_tokens: 512, default_max_tokens: 24 },
            kv_budget_tokens: 4000,
            header_timeout: Duration::from_secs(3),
            body_timeout: Duration::from_secs(1),
            model_id: "specrej-fake".into(),
            ..ServerConfig::default()
        };
        start(Served::Fake, config)
    })
}

#[test]
fn slow_clients_do_not_delay_a_normal_request() {
    use std::io::{Read, Write};
    let addr = strict_fake_server();
    let body = chat_body(json!({ "max_tokens": 8 }));
    let sent = Instant::now();
    assert_eq!(post(addr, CHAT, &body).status, 200);
    let normal = sent.elapsed();
    // 100 connections that trickle their heads, a byte at a time.
    let mut slow: Vec<std::net::TcpStream> = (0..100)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .expect("write");
            s
        })
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = Arc::clone(&stop);
        let mut streams: Vec<_> = slow.iter().map(|s| s.try_clone().expect("clone")).collect();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &mut streams {
                    let _ = s.write_all(b"a");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let sent = Instant::now();
    let answer = post(addr, CHAT, &body);
    let during = sent.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.body);
    // Not held up until the slow heads' deadline (3 s) frees their connections.
    assert!(
        during < normal + Duration::from_secs(1),
        "{during:?} among slow clients vs {normal:?} alone"
    );
    // The head deadline is for the whole head, however it trickles: the connections close.
    let closed = slow.iter_mut().all(|s| {
        s.set_read_timeout(Some(Duration::from_secs(6))).expect("timeout");
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => true, // the server closed it
            Err(e) => {
                !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
            }
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickle.join().expect("trickle");
    assert!(closed, "the slow connections were closed by the header deadline");
}

#[test]
fn chunked_oversized_and_slow_bodies() {
    use std::io::{Read, Write};
    let addr = strict_fake_server();
    // A chunked body is read like any other.
    let body = chat_body(json!({ "max_tokens": 4 }));
    let (a, b) = body.split_at(body.len() / 2);
    let chunked = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let answer = raw(addr, chunked.as_bytes());
    assert_eq!(answer.status, 200, "{}", answer.body);
    // A chunked body over the limit is a 413, found while reading.
    let big = "x".repeat(specrej_host::server::MAX_BODY_BYTES + 1);
    let chunked = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let answer = raw(addr, chunked.as_bytes());
    assert_eq!(
        (answer.status, answer.json()["error"]["type"].as_str()),
        (413, Some("invalid_request_error")),
        "{}",
        answer.body
    );
    // A body that stops coming: 408 once the body deadline passes, with a JSON error.
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"mess").as_bytes()).expect("write");
    let sent = Instant::now();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\""), "{text}");
    assert!(sent.elapsed() < Duration::from_secs(5), "{:?}", sent.elapsed());
    // Garbage on the socket: a 400, and the server goes on.
    assert_eq!(
        raw(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n").status,
        400
    );
    assert_eq!(post(addr, CHAT, &chat_body(json!({ "max_tokens": 4 }))).status, 200);
}

/// A real-model server (of its own: the tests below watch its metrics) whose KV budget
/// holds one request of [`held_request`] at a time, and a queue of one.
fn tight_real_server() -> SocketAddr {
    tight_real_handle().addr
}

fn tight_real_handle() -> specrej_host::ServerHandle {
    let path = common::default_model();
    let model =
        RealModel::load(Path::new(&path), BackendKind::Cpu, specrej_candle::WeightFormat::Q8_0)
            .expect("model");
    let config = ServerConfig {
        model_id: "smollm2".into(),
        kv_budget_tokens: 640,
        max_queued: 1,
        ..ServerConfig::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    specrej_host::spawn(
        listener,
        Arc::new(Served::Real(Box::new(model))),
        common::component_bytes(),
        config,
    )
    .expect("server starts")
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn shutdown_lets_the_request_in_flight_finish_and_stops_accepting() {
    let server = tight_real_handle();
    let addr = server.addr;
    let running = std::thread::spawn(move || post(addr, CHAT, &held_request(false)));
    assert!(
        eventually(Duration::from_secs(30), || metric(addr, "specrej_requests_active") == 1.0),
        "it runs"
    );
    server.shutdown();
    let answer = running.join().expect("request thread");
    assert_eq!(answer.status, 200, "the request in flight is answered: {}", answer.body);
    assert!(std::net::TcpStream::connect(addr).is_err(), "no longer accepting");
}

/// Rows of [`held_request`].
const HELD_ROWS: usize = 8;

/// A Best-of-N request that takes [`tight_real_server`]'s whole KV budget for a few seconds
/// (48 + 8 × 48 cached tokens of 640).
fn held_request(stream: bool) -> String {
    json!({
        "messages": [{ "role": "user", "content": "Write a long story about a fox." }],
        "max_tokens": 48, "seed": 1, "stream": stream,
        "specrej": { "method": "best_of_n", "n": HELD_ROWS, "reward": "likelihood" },
    })
    .to_string()
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn a_full_queue_is_a_429_with_retry_after_and_the_queued_request_runs_next() {
    let addr = tight_real_server();
    let first = std::thread::spawn(move || post(addr, CHAT, &held_request(false)));
    assert!(
        eventually(Duration::from_secs(30), || metric(addr, "specrej_requests_active") == 1.0),
        "the first runs"
    );
    let second = std::thread::spawn(move || post(addr, CHAT, &held_request(false)));
    assert!(
        eventually(Duration::from_secs(30), || metric(addr, "specrej_queue_depth") == 1.0),
        "the second waits"
    );
    let third = post(addr, CHAT, &held_request(false));
    assert_eq!(third.status, 429, "{}", third.body);
    assert!(third.headers.contains("retry-after: 1"), "{}", third.headers);
    assert_eq!(third.json()["error"]["code"], "queue_full");
    let (first, second) = (first.join().expect("first"), second.join().expect("second"));
    assert_eq!((first.status, second.status), (200, 200), "{} / {}", first.body, second.body);
    // Identical seeded requests, one run alone and one after it: the same answer.
    assert_eq!(first.json()["choices"][0]["message"], second.json()["choices"][0]["message"]);
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn a_client_that_leaves_frees_its_rows() {
    use std::io::{Read, Write};
    let addr = tight_real_server();
    for stream in [false, true] {
        let gone_before = get(addr, "/metrics")
            .body
            .lines()
            .find(|l| l.contains("outcome=\"client_gone\""))
            .map(str::to_owned);
        let body = held_request(stream);
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let head = format!(
            "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(body.as_bytes()).expect("write");
        if stream {
            // The stream has started.
            let mut buf = [0u8; 64];
            s.read_exact(&mut buf).expect("the stream's first bytes");
        }
        assert!(
            eventually(Duration::from_secs(30), || metric(addr, "specrej_rows_active")
                == HELD_ROWS as f64),
            "its rows run"
        );
        drop(s);
        let left = Instant::now();
        assert!(
            eventually(Duration::from_secs(10), || metric(addr, "specrej_rows_active") == 0.0
                && metric(addr, "specrej_batches_active") == 0.0
                && metric(addr, "specrej_requests_active") == 0.0),
            "stream {stream}: the rows stay after the client left: {}",
            get(addr, "/metrics").body
        );
        eprintln!("stream {stream}: rows freed {:?} after the client left", left.elapsed());
        let gone_after = get(addr, "/metrics")
            .body
            .lines()
            .find(|l| l.contains("outcome=\"client_gone\""))
            .map(str::to_owned);
        assert_ne!(gone_before, gone_after, "counted as client_gone");
        assert_eq!(metric(addr, "specrej_kv_used_bytes"), 0.0, "every block is back in the pool");
    }
    // The server serves the next request as usual.
    assert_eq!(post(addr, CHAT, &held_request(false)).status, 200);
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn the_server_runs_on_wgpu_too() {
    if specrej_wgpu::adapters_blocking().is_empty() {
        specrej_core::gpu_missing(
            "wgpu",
            "no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)",
        );
        return;
    }
    let model =
        specrej_host::WgpuServed::load(&common::default_model(), None).expect("the model on wgpu");
    let addr = start(
        Served::Wgpu(Box::new(model)),
        ServerConfig { model_id: "smollm2".into(), ..ServerConfig::default() },
    );
    let models = get(addr, "/v1/models").json();
    assert_eq!(models["data"][0]["specrej"]["rewards"], json!(["judge", "likelihood"]), "{models}");
    // Two requests at once: the engine thread steps them one after the other (dense caches).
    let ask = |method: &'static str| {
        std::thread::spawn(move || {
            let body = json!({
                "messages": [{ "role": "user", "content": "Name a fruit." }],
                "max_tokens": 6, "seed": 2, "temperature": 0,
                "specrej": { "method": method, "n": 2, "min_new_tokens": 2, "reward": "likelihood" },
            });
            post(addr, CHAT, &body.to_string())
        })
    };
    for (method, answer) in
        [("best_of_n", ask("best_of_n")), ("speculative_rejection", ask("speculative_rejection"))]
    {
        let answer = answer.join().expect("request thread");
        assert_eq!(answer.status, 200, "{method}: {}", answer.body);
        let doc = answer.json();
        assert_eq!(doc["specrej"]["method"], method);
        assert!(doc["usage"]["completion_tokens"].as_u64().expect("tokens") > 0, "{doc}");
    }
    let partial = json!({ "messages": [{ "role": "user", "content": "Hi" }], "specrej": { "reward": "partial_judge" } });
    let answer = post(addr, CHAT, &partial.to_string());
    assert_eq!(
        (answer.status, answer.json()["error"]["param"].as_str()),
        (400, Some("specrej.reward")),
        "{}",
        answer.body
    );
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn a_decision_frees_memory_that_a_queued_request_takes_at_once() {
    // The budget is one request's grant (48 + 8 × 16 = 176 tokens). The first request's
    // decision keeps 1 row of 8, which can use 48 + 64 at most: the 64 above go back at once,
    // enough for the second request (48 + 16), which then runs beside the first.
    let path = common::default_model();
    let model =
        RealModel::load(Path::new(&path), BackendKind::Cpu, specrej_candle::WeightFormat::Q8_0)
            .expect("model");
    let config = ServerConfig {
        model_id: "smollm2".into(),
        kv_budget_tokens: 176,
        ..ServerConfig::default()
    };
    let addr = start(Served::Real(Box::new(model)), config);
    let ask = |specrej: Value, max_tokens: usize| {
        let body = json!({
            "messages": [{ "role": "user", "content": "Name a fruit." }],
            "max_tokens": max_tokens, "seed": 4, "specrej": specrej,
        });
        std::thread::spawn(move || post(addr, CHAT, &body.to_string()))
    };
    let sr = json!({ "method": "speculative_rejection", "n": 8, "alpha": 0.9, "min_new_tokens": 16, "reward": "likelihood" });
    let first = ask(sr, 64);
    assert!(
        eventually(Duration::from_secs(30), || metric(addr, "specrej_requests_active") == 1.0),
        "the first runs"
    );
    let second = ask(json!({ "method": "best_of_n", "n": 1, "reward": "likelihood" }), 16);
    assert!(
        eventually(Duration::from_secs(30), || metric(addr, "specrej_queue_depth") == 1.0),
        "the second waits"
    );
    assert!(
        eventually(Duration::from_secs(60), || metric(addr, "specrej_requests_active") == 2.0),
        "after the decision both run: {}",
        get(addr, "/metrics").body
    );
    let (first, second) = (first.join().expect("first"), second.join().expect("second"));
    assert_eq!((first.status, second.status), (200, 200), "{} / {}", first.body, second.body);
    let trace = &first.json()["usage"]["rejection_trace"];
    assert_eq!(trace[0]["kept_rows"], 1, "{trace}");
}
