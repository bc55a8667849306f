//! Reward models on tiny random HF checkpoints: loading, scoring against a naive reference,
//! incremental vs full re-scoring, different tokenizers, bad directories, HTTP.
#![allow(clippy::unwrap_used, reason = "tests: a failed unwrap is a failed test")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::DType;
use common::*;
use specrej_candle::{LoadOptions, WeightFormat};
use specrej_core::scheduler::{Method, Options};
use specrej_core::testing::FakeDecoder;
use specrej_core::{Response, Sampling, Scorer, block_on_ready};
use specrej_reward::{
    RemoteScorer, RewardError, RewardModel, RewardScorer, RewardSession, ServerLimits, detokenize,
    spawn_server, spawn_server_with,
};

const F32: LoadOptions = LoadOptions {
    device: specrej_candle::Device::Cpu,
    weights: WeightFormat::F32,
    kv: specrej_candle::KvFormat::F32,
};
const QUESTION: &str = "What is the best way to learn?";

fn tiny(spec: &TinyRm, dtype: DType) -> (TempDir, Arc<RewardModel>) {
    let dir = TempDir::new("rm");
    spec.write(dir.path(), dtype);
    let rm = RewardModel::load(dir.path(), &F32).unwrap();
    (dir, rm)
}

const TEXTS: &[&str] = &[
    "",
    "Read the book, then write.",
    "The answer is reading and writing every day; then teaching others what you learned.",
    "héllo wörld ✓",
    "the the the",
];

#[test]
fn scores_match_a_naive_reference_forward() {
    for spec in [TinyRm::llama(), TinyRm::qwen2()] {
        let (_dir, rm) = tiny(&spec, DType::F32);
        assert_eq!(rm.trunk().config().vocab_size, spec.vocab());
        assert!(!rm.trunk().has_head());
        for text in TEXTS {
            let ids = rm.chat_ids(QUESTION, text).unwrap();
            let want = spec.reference_reward(&ids);
            let direct = rm.score_ids(&ids).unwrap();
            assert!(
                close(direct, want, 1e-4),
                "{} {text:?}: {direct} vs reference {want}",
                spec.arch
            );
            let mut full = RewardSession::full(rm.clone(), QUESTION);
            let s = full.score_texts(&[(0, text)]).unwrap();
            assert!(close(s.rewards[0], want, 1e-4), "{}: {} vs {want}", spec.arch, s.rewards[0]);
            assert_eq!(s.tokens_processed, ids.len() as u64);
        }
    }
}

#[test]
fn the_rm_sees_its_own_chat_template_and_tokenizer() {
    let (_dir, rm) = tiny(&TinyRm::llama(), DType::F32);
    let ids = rm.chat_ids("Hi?", "see the end").unwrap();
    let text = rm.tokenizer().decode(&ids, false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nsee the end<|im_end|>\n"
    );
    let prefix = rm.prefix_ids("Hi?").unwrap();
    assert_eq!(&ids[..prefix.len()], &prefix[..]);
    // " the" merges into one RM token.
    assert!(ids.contains(&rm.tokenizer().token_to_id("Ġthe").unwrap()));
}

#[test]
fn loads_sharded_and_half_precision_checkpoints() {
    let spec = TinyRm::qwen2();
    let (_d, reference) = tiny(&spec, DType::F32);
    for dtype in [DType::F16, DType::BF16] {
        let dir = TempDir::new("shards");
        spec.write_sharded(dir.path(), dtype, 3);
        let rm = RewardModel::load(dir.path(), &F32).unwrap();
        for text in TEXTS {
            let (a, b) = (
                rm.score_text(QUESTION, text).unwrap(),
                reference.score_text(QUESTION, text).unwrap(),
            );
            assert!(close(a, b, 0.05), "{dtype:?} {text:?}: {a} vs {b}");
        }
    }
    // The default weight format (Q8_0) loads and agrees roughly.
    let dir = TempDir::new("q8");
    spec.write(dir.path(), DType::F32);
    let rm = RewardModel::load(dir.path(), &LoadOptions::default()).unwrap();
    let (a, b) = (
        rm.score_text(QUESTION, TEXTS[2]).unwrap(),
        reference.score_text(QUESTION, TEXTS[2]).unwrap(),
    );
    assert!(close(a, b, 0.1), "q8_0 {a} vs {b}");
}

/// Growing partial answers per row (cut mid-word, a row that changes its mind, releases).
fn decisions() -> Vec<Vec<(u32, String)>> {
    let full = [
        "The answer is reading and writing every day, then teaching.",
        "Learn by doing: start small, and share what you learn with others.",
        "Practice, practice, practice. There is no shortcut at all.",
        "héllo wörld ✓ then the rest",
    ];
    let mut out = Vec::new();
    for cut in [5usize, 9, 17, 18, 30, 44, 60, 90] {
        let mut d = Vec::new();
        for (row, text) in full.iter().enumerate() {
            if row == 1 && cut > 30 {
                continue; // released after the 5th decision
            }
            let chars: String = text.chars().take(cut).collect();
            d.push((row as u32 * 3, chars));
        }
        out.push(d);
    }
    out
}

/// Incremental, full and direct scoring give the same bits, in every weight format: on the
/// CPU a reward depends only on the text, never on how its tokens were split into passes.
#[test]
fn incremental_scoring_equals_full_rescoring_and_runs_fewer_tokens() {
    let q8 = LoadOptions { weights: WeightFormat::Q8_0, ..F32 };
    for (spec, options) in [
        (TinyRm::llama(), F32),
        (TinyRm::qwen2(), F32),
        (TinyRm::llama(), q8),
        (TinyRm::qwen2(), q8),
    ] {
        let dir = TempDir::new("rm");
        spec.write(dir.path(), DType::F32);
        let rm = RewardModel::load(dir.path(), &options).unwrap();
        let mut inc = RewardSession::new(rm.clone(), QUESTION);
        let mut full = RewardSession::full(rm.clone(), QUESTION);
        let (mut inc_tokens, mut full_tokens) = (0, 0);
        let mut last_rows: Vec<u32> = Vec::new();
        for d in decisions() {
            let rows: Vec<u32> = d.iter().map(|(r, _)| *r).collect();
            let gone: Vec<u32> = last_rows.iter().copied().filter(|r| !rows.contains(r)).collect();
            inc.release(&gone);
            last_rows = rows;
            let pairs: Vec<(u32, &str)> = d.iter().map(|(r, t)| (*r, t.as_str())).collect();
            let a = inc.score_texts(&pairs).unwrap();
            let b = full.score_texts(&pairs).unwrap();
            for (i, (x, y)) in a.rewards.iter().zip(&b.rewards).enumerate() {
                let what = format!("{} {:?} row {i} {:?}", spec.arch, options.weights, pairs[i].1);
                assert_eq!(x.to_bits(), y.to_bits(), "{what}: incremental {x} vs full {y}");
                let direct = rm.score_text(QUESTION, pairs[i].1).unwrap();
                assert_eq!(
                    x.to_bits(),
                    direct.to_bits(),
                    "{what}: incremental {x} vs direct {direct}"
                );
            }
            // Full re-scoring runs every RM token of every row.
            let all: u64 =
                pairs.iter().map(|(_, t)| rm.chat_ids(QUESTION, t).unwrap().len() as u64).sum();
            assert_eq!(b.tokens_processed, all);
            inc_tokens += a.tokens_processed;
            full_tokens += b.tokens_processed;
        }
        assert!(
            inc_tokens * 3 < full_tokens,
            "{}: incremental {inc_tokens} vs full {full_tokens}",
            spec.arch
        );
        // Released rows are gone: 3 rows of the last decision remain cached.
        assert_eq!(
            inc.cached_tokens(),
            decisions()
                .last()
                .unwrap()
                .iter()
                .map(|(_, t)| rm.chat_ids(QUESTION, t).unwrap().len())
                .sum::<usize>()
        );
    }
}

#[test]
fn incremental_tokens_are_counted_exactly() {
    let (_dir, rm) = tiny(&TinyRm::llama(), DType::F32);
    let mut inc = RewardSession::new(rm.clone(), QUESTION);
    let prefix = rm.prefix_ids(QUESTION).unwrap();
    let a = rm.chat_ids(QUESTION, "the cat").unwrap();
    let s = inc.score_texts(&[(0, "the cat")]).unwrap();
    // The shared prefix once, then the row's own ids.
    assert_eq!(s.tokens_processed, (prefix.len() + a.len() - prefix.len()) as u64);
    let b = rm.chat_ids(QUESTION, "the cats and").unwrap();
    let lcp = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(lcp < a.len(), "the end-of-turn suffix changes");
    let s = inc.score_texts(&[(0, "the cats and")]).unwrap();
    assert_eq!(s.tokens_processed, (b.len() - lcp) as u64);
    // Same text again: only the last position is re-run.
    let s = inc.score_texts(&[(0, "the cats and")]).unwrap();
    assert_eq!(s.tokens_processed, 1);
    // A second row starts from the shared prefix.
    let s = inc.score_texts(&[(1, "the cat")]).unwrap();
    assert_eq!(s.tokens_processed, (a.len() - prefix.len()) as u64);
}

#[test]
fn scorer_retokenizes_the_policy_tokens() {
    let (_dir, rm) = tiny(&TinyRm::llama(), DType::F32);
    let policy = policy_tokenizer();
    let texts = ["Read the book, then write.", "héllo", "the hero"];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| policy.encode(t, false).unwrap()).collect();
    // The policy's ids are not the RM's.
    assert_ne!(ids[0], rm.tokenizer().encode(texts[0], false).unwrap());
    // Cut inside "é" (two bytes, two byte tokens in this policy vocabulary).
    let e_cut: Vec<u32> = policy
        .encode("h", false)
        .unwrap()
        .into_iter()
        .chain([policy.encode("é", false).unwrap()[0]])
        .collect();
    assert_eq!(detokenize(&policy, &e_cut).unwrap(), "h");
    // With EOS (special, skipped).
    let with_eos: Vec<u32> = ids[2].iter().copied().chain([0]).collect();
    assert_eq!(detokenize(&policy, &with_eos).unwrap(), "the hero");

    let mut scorer = RewardScorer::new(rm.clone(), policy.clone(), QUESTION);
    let mut full = RewardScorer::full(rm.clone(), policy.clone(), QUESTION);
    let rs = [
        Response { row: 0, tokens: &ids[0] },
        Response { row: 1, tokens: &e_cut },
        Response { row: 2, tokens: &with_eos },
    ];
    let a = block_on_ready(scorer.score(&[9, 9], &rs)).unwrap();
    let b = block_on_ready(full.score(&[], &rs)).unwrap();
    let want = [texts[0], "h", "the hero"].map(|t| rm.score_text(QUESTION, t).unwrap());
    for (i, w) in want.iter().enumerate() {
        assert!(close(a.rewards[i], *w, 1e-4) && close(b.rewards[i], *w, 1e-4));
    }
    scorer.release(&[0, 1]);
    assert_eq!(scorer.session().cached_tokens(), rm.chat_ids(QUESTION, "the hero").unwrap().len());
}

/// The scheduler with a fake policy (random byte tokens, some invalid UTF-8): incremental
/// and full scoring pick the same rows and winner; incremental runs far fewer RM tokens.
#[test]
fn speculative_rejection_with_incremental_and_full_rm_agree() {
    let (_dir, rm) = tiny(&TinyRm::qwen2(), DType::F32);
    let policy = policy_tokenizer();
    let options = Options {
        method: Method::SpeculativeRejection { alpha: 0.5 },
        n: 8,
        max_new_tokens: 48,
        min_new_tokens: 8,
        eos: vec![0],
        sampling: Sampling { seed: 3, ..Sampling::default() },
        rules: Default::default(),
    };
    let run = |scorer: &mut RewardScorer| {
        let mut decoder = FakeDecoder::new(8 * 24);
        decoder.vocab = 257;
        block_on_ready(specrej_core::scheduler::generate(
            &mut decoder,
            scorer,
            &[1, 2, 3],
            &options,
            &mut |_| {},
        ))
        .unwrap()
    };
    let inc = run(&mut RewardScorer::new(rm.clone(), policy.clone(), QUESTION));
    let full = run(&mut RewardScorer::full(rm.clone(), policy.clone(), QUESTION));
    assert!(inc.stats.reward_calls >= 2, "{:?}", inc.stats);
    assert_eq!(inc.candidates.len(), full.candidates.len());
    for (a, b) in inc.candidates.iter().zip(&full.candidates) {
        assert_eq!(a.row, b.row);
        assert!(close(a.score, b.score, 1e-4), "{} vs {}", a.score, b.score);
    }
    assert!(
        inc.stats.reward_tokens * 2 < full.stats.reward_tokens,
        "{} vs {}",
        inc.stats.reward_tokens,
        full.stats.reward_tokens
    );
}

fn load_err(dir: &TempDir) -> String {
    match RewardModel::load(dir.path(), &F32) {
        Ok(_) => panic!("{} loaded", dir.path().display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_directories_give_clear_errors() {
    let spec = TinyRm::llama();
    // Missing directory.
    assert!(
        RewardModel::load("/nonexistent/rm", &F32)
            .unwrap_err()
            .to_string()
            .contains("no such file")
    );
    // Wrong architecture.
    for arch in ["LlamaForCausalLM", "GPT2ForSequenceClassification"] {
        let dir = TempDir::new("arch");
        spec.write(dir.path(), DType::F32);
        let mut c = spec.config();
        c["architectures"] = serde_json::json!([arch]);
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains(arch)
                && e.contains("LlamaForSequenceClassification")
                && e.contains("Qwen2ForSequenceClassification"),
            "{e}"
        );
    }
    // num_labels != 1 (explicitly, via id2label, and by default).
    for (key, value) in [
        ("num_labels", serde_json::json!(2)),
        ("id2label", serde_json::json!({"0": "a", "1": "b"})),
    ] {
        let dir = TempDir::new("labels");
        spec.write(dir.path(), DType::F32);
        let mut c = spec.config();
        c[key] = value;
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(e.contains("num_labels") && e.contains('2'), "{e}");
    }
    let dir = TempDir::new("nolabels");
    spec.write(dir.path(), DType::F32);
    let mut c = spec.config();
    c.as_object_mut().unwrap().remove("id2label");
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    assert!(load_err(&dir).contains("num_labels"));
    // Missing score head, wrong shapes.
    let write_with =
        |edit: &dyn Fn(&mut std::collections::HashMap<String, candle_core::Tensor>)| {
            let dir = TempDir::new("score");
            spec.write(dir.path(), DType::F32);
            let mut t = spec.tensors(DType::F32);
            edit(&mut t);
            candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
            dir
        };
    let dir = write_with(&|t| {
        t.remove("score.weight");
    });
    assert!(load_err(&dir).contains("score.weight"), "{}", load_err(&dir));
    let h = spec.hidden;
    for shape in [vec![2, h], vec![1, h + 1]] {
        let dir = write_with(&|t| {
            let n: usize = shape.iter().product();
            t.insert(
                "score.weight".into(),
                candle_core::Tensor::zeros(n, DType::F32, &candle_core::Device::Cpu)
                    .unwrap()
                    .reshape(shape.clone())
                    .unwrap(),
            );
        });
        let e = load_err(&dir);
        assert!(e.contains("score.weight") && e.contains("shape"), "{e}");
    }
    // A trunk tensor of the wrong shape.
    let dir = write_with(&|t| {
        t.insert(
            "model.layers.0.mlp.up_proj.weight".into(),
            candle_core::Tensor::zeros((7, h), DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&dir);
    assert!(e.contains("up_proj") && e.contains("shape"), "{e}");
    // Corrupt and truncated safetensors.
    let dir = TempDir::new("corrupt");
    spec.write(dir.path(), DType::F32);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
    // Missing tokenizer, bad config JSON.
    let dir = TempDir::new("notok");
    spec.write(dir.path(), DType::F32);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert!(load_err(&dir).contains("tokenizer.json"));
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert!(load_err(&dir).contains("config.json"));
    let _: Option<RewardError> = None;
}

fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn remote_scores_equal_local_scores_and_bad_requests_get_4xx() {
    let (_dir, rm) = tiny(&TinyRm::llama(), DType::F32);
    let (addr, _server) = spawn_server("127.0.0.1:0", rm.clone()).unwrap();
    let url = format!("http://{addr}/score");
    let policy = policy_tokenizer();
    let mut remote = RemoteScorer::new(&url, policy.clone(), QUESTION).unwrap();
    let mut local = RewardScorer::new(rm.clone(), policy.clone(), QUESTION);
    let mut stateless = RemoteScorer::new(&url, policy.clone(), QUESTION).unwrap().stateless();
    for d in decisions() {
        let ids: Vec<(u32, Vec<u32>)> =
            d.iter().map(|(r, t)| (*r, policy.encode(t, false).unwrap())).collect();
        let rs: Vec<Response<'_>> =
            ids.iter().map(|(r, t)| Response { row: *r, tokens: t }).collect();
        let a = block_on_ready(remote.score(&[], &rs)).unwrap();
        let b = block_on_ready(local.score(&[], &rs)).unwrap();
        let c = block_on_ready(stateless.score(&[], &rs)).unwrap();
        assert_eq!(a.rewards, b.rewards, "same model, same caches: bit-identical");
        assert_eq!(a.tokens_processed, b.tokens_processed);
        for (x, y) in c.rewards.iter().zip(&b.rewards) {
            assert!(close(*x, *y, 1e-4));
        }
        assert!(c.tokens_processed >= a.tokens_processed);
    }
    // Bad requests: 4xx with a JSON message; the server keeps serving.
    let (s, body) = raw_http(addr, b"GET /score HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(s, 405, "{body}");
    assert!(body.contains("error"));
    let (s, body) = raw_http(addr, b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"prompt\"");
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("JSON"), "{body}");
    let (s, _) = raw_http(addr, b"POST / HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"responses\": 3}");
    assert_eq!(s, 400);
    let (s, _) = raw_http(addr, b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n{}");
    assert_eq!(s, 413);
    // No Content-Length and not chunked: an empty body, which is not a scoring request.
    let (s, body) = raw_http(addr, b"POST / HTTP/1.1\r\n\r\n");
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("JSON"), "{body}");
    // A chunked body is read whole.
    let (s, answer) = raw_http(
        addr,
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"prompt\": \"q\", \r\n13\r\n\"responses\": [\"b\"]}\r\n0\r\n\r\n",
    );
    assert_eq!(s, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["rewards"][0].as_f64().unwrap() as f32, rm.score_text("q", "b").unwrap());
    let (s, _) = raw_http(addr, b"\x00\x01garbage\r\n\r\n");
    assert_eq!(s, 400);
    let body = br#"{"prompt": "q", "responses": ["a", "b"], "rows": [1]}"#;
    let req = post_bytes(body);
    assert_eq!(raw_http(addr, &req).0, 400);
    let body = br#"{"prompt": "q", "responses": ["a", "b"]}"#;
    let req = post_bytes(body);
    let (s, answer) = raw_http(addr, &req);
    assert_eq!(s, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let want = rm.score_text("q", "b").unwrap();
    assert!(close(v["rewards"][1].as_f64().unwrap() as f32, want, 1e-5));
    // A client pointed at nothing fails cleanly.
    let mut nowhere = RemoteScorer::new("http://127.0.0.1:9/", policy.clone(), QUESTION).unwrap();
    assert!(block_on_ready(nowhere.score(&[], &[Response { row: 0, tokens: &[5] }])).is_err());
    assert!(RemoteScorer::new("https://example.com/", policy, QUESTION).is_err());
}

/// A POST of `body` as raw bytes.
fn post_bytes(body: &[u8]) -> Vec<u8> {
    [format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body].concat()
}

#[test]
fn slow_clients_do_not_hold_up_others() {
    let (_dir, rm) = tiny(&TinyRm::llama(), DType::F32);
    // Deadlines longer than the client's read timeout below: only concurrency can pass.
    let limits =
        ServerLimits { header_timeout: Duration::from_secs(300), ..ServerLimits::default() };
    let server = spawn_server_with("127.0.0.1:0", rm, limits).unwrap();
    let addr = server.addr();
    // 100 connections that have sent half a request head and then nothing.
    let tricklers: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST / HTTP/1.1\r\nContent-Le").unwrap();
            s
        })
        .collect();
    // A normal request is answered while they wait (the old server, one connection at a
    // time, answered it only after every trickler's read timeout).
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    client.write_all(&post_bytes(br#"{"prompt": "q", "responses": ["a"]}"#)).unwrap();
    let mut answer = [0u8; 12];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200", "{:?}", String::from_utf8_lossy(&answer));
    drop(tricklers);
    server.shutdown();
}

#[test]
fn slow_heads_and_bodies_meet_deadlines_and_bodies_have_a_limit() {
    let (_dir, rm) = tiny(&TinyRm::llama(), DType::F32);
    let limits = ServerLimits {
        header_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(500),
        max_body_bytes: 100,
        ..ServerLimits::default()
    };
    let server = spawn_server_with("127.0.0.1:0", rm, limits).unwrap();
    let addr = server.addr();
    // A head that never ends: the connection is closed at the head deadline (a read sees
    // the end or a reset, not its own 30 s timeout).
    let mut head = TcpStream::connect(addr).unwrap();
    head.write_all(b"POST / HTTP/1.1\r\nContent-Le").unwrap();
    head.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    if let Err(e) = head.read_to_end(&mut Vec::new()) {
        assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "never disconnected: {e}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    // A body that stops arriving gets 408 at the body deadline, as JSON.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    slow.write_all(b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"prompt\": ").unwrap();
    let mut out = String::new();
    let _ = slow.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("did not arrive within"), "{out}");
    // Over the body limit: 413 for a declared length, and for a chunked body while reading it.
    let (s, body) = raw_http(addr, &post_bytes(&[b' '; 101]));
    assert_eq!(s, 413, "{body}");
    let mut chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"28\r\n");
        chunked.extend_from_slice(&[b' '; 40]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (s, body) = raw_http(addr, &chunked);
    assert_eq!(s, 413, "{body}");
    assert!(body.contains("over 100 bytes"), "{body}");
    server.shutdown();
}

#[test]
fn shutdown_lets_the_request_in_flight_finish_then_stops() {
    let (_dir, rm) = tiny(&TinyRm::llama(), DType::F32);
    let server = spawn_server_with("127.0.0.1:0", rm.clone(), ServerLimits::default()).unwrap();
    let addr = server.addr();
    // Keep-alive: two requests on one connection.
    let body = br#"{"prompt": "q", "responses": ["a"]}"#;
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    for _ in 0..2 {
        conn.write_all(&post_bytes(body)).unwrap();
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        // The rest of the answer: up to the end of its JSON body.
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"}") {
            conn.read_exact(&mut byte).unwrap();
            buf.push(byte[0]);
        }
    }
    // A request half sent when the shutdown starts is still answered.
    let mut in_flight = TcpStream::connect(addr).unwrap();
    in_flight.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = post_bytes(body);
    let (first, rest) = req.split_at(req.len() - 5);
    in_flight.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stopper = std::thread::spawn(move || server.shutdown());
    std::thread::sleep(Duration::from_millis(200));
    in_flight.write_all(rest).unwrap();
    let mut out = String::new();
    let _ = in_flight.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    stopper.join().unwrap();
    // Then nothing listens.
    assert!(TcpStream::connect(addr).is_err(), "still accepting after shutdown");
}
