//! Speculative Rejection on the default model with the judge exported as a reward model
//! (`export_judge_rm`), scored incrementally and by full re-scoring at every decision.
//!
//! ```text
//! cargo run -p specrej-reward --example incremental_vs_full -- [GGUF] [RM_DIR] [N] [MAX_NEW_TOKENS] [ROOM]
//! ```
//! With `JUDGE=1` in the environment, compares specrej-candle's `JudgeScorer` (batched,
//! re-running every row at every decision) with `JudgeScorer::incremental` instead.
//!
//! The policy's K/V budget holds `N × (prompt + ROOM)` tokens (ROOM defaults to 40), so
//! decisions come at about ROOM, 2·ROOM, 4·ROOM new tokens. The RM runs with f32 weights, as
//! the checkpoint stores them (on the CPU incremental and full scores agree bit for bit in
//! every weight format; see the crate docs).
//! GGUF defaults to `$SPECREJ_MODEL` or `models/SmolLM2-135M-Instruct.Q4_1.gguf`; RM_DIR
//! (default `target/smollm2-judge-rm`) is created by exporting the GGUF if it holds no
//! `config.json`.
#![allow(clippy::unwrap_used, reason = "a tool: a failed unwrap ends it with its message")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use specrej_candle::{CandleDecoder, DEFAULT_KV_BUDGET_BYTES, LoadOptions, load_gguf};
use specrej_core::scheduler::{Method, Options};
use specrej_core::{BackendError, Response, Sampling, Scored, Scorer, block_on_ready};
use specrej_reward::{ExportDtype, RewardModel, RewardScorer, export_judge_rm};
use specrej_text::{ChatTemplate, GgufMetadata, Message, Tokenizer};

const QUESTION: &str = "Give three tips for staying healthy.";

/// Times the scorer's calls.
struct Timed<S> {
    inner: S,
    seconds: f64,
}

impl<S: Scorer> Scorer for Timed<S> {
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        let t = Instant::now();
        let r = block_on_ready(self.inner.score(prompt, responses));
        self.seconds += t.elapsed().as_secs_f64();
        std::future::ready(r)
    }
    fn release(&mut self, rows: &[u32]) {
        self.inner.release(rows);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gguf = args
        .first()
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("SPECREJ_MODEL").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let rm_dir =
        args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/smollm2-judge-rm"));
    let n: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let max_new: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(128);
    let room: usize = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(40);
    if !rm_dir.join("config.json").exists() {
        let t = Instant::now();
        let r = export_judge_rm(&gguf, &rm_dir, ExportDtype::F32).unwrap();
        eprintln!(
            "exported {} ({} tensors) in {:.1}s",
            r.dir.display(),
            r.tensors,
            t.elapsed().as_secs_f64()
        );
    }
    let meta = GgufMetadata::from_path(&gguf).unwrap();
    let tokenizer = Tokenizer::from_gguf(&meta).unwrap();
    let template = ChatTemplate::from_gguf(&meta).unwrap();
    let prompt_text = template.render(&[Message::user(QUESTION)], true).unwrap();
    let prompt = tokenizer.encode(&prompt_text, false).unwrap();
    let policy = load_gguf(&gguf, &LoadOptions::default()).unwrap();
    let rm_options =
        LoadOptions { weights: specrej_candle::WeightFormat::F32, ..Default::default() };
    let rm = RewardModel::load(&rm_dir, &rm_options).unwrap();
    let options = Options {
        method: Method::SpeculativeRejection { alpha: 0.5 },
        n,
        max_new_tokens: max_new,
        min_new_tokens: room.min(32),
        eos: tokenizer.eos_ids().to_vec(),
        sampling: Sampling { seed: 1, ..Sampling::default() },
        rules: Default::default(),
    };
    // A KV budget for the policy that forces decisions: room for n rows × (prompt + room).
    let budget = policy.kv_bytes_per_token() * n * (prompt.len() + room);
    let mut winners = Vec::new();
    let judge = std::env::var_os("JUDGE").is_some();
    for incremental in [false, true] {
        let mut decoder =
            CandleDecoder::new(Arc::clone(&policy), budget.min(DEFAULT_KV_BUDGET_BYTES));
        let start = Instant::now();
        let (outcome, rm_seconds) = if judge {
            let seg = specrej_text::judge_segments(&tokenizer, &template, QUESTION).unwrap();
            let j = specrej_candle::JudgeScorer::new(
                Arc::clone(&policy),
                seg.before,
                seg.after,
                seg.yes,
                seg.no,
            );
            let mut scorer =
                Timed { inner: if incremental { j.incremental() } else { j }, seconds: 0.0 };
            let o = block_on_ready(specrej_core::scheduler::generate(
                &mut decoder,
                &mut scorer,
                &prompt,
                &options,
                &mut |_| {},
            ));
            (o.unwrap(), scorer.seconds)
        } else {
            let inner = if incremental {
                RewardScorer::new(rm.clone(), tokenizer.clone(), QUESTION)
            } else {
                RewardScorer::full(rm.clone(), tokenizer.clone(), QUESTION)
            };
            let mut scorer = Timed { inner, seconds: 0.0 };
            let o = block_on_ready(specrej_core::scheduler::generate(
                &mut decoder,
                &mut scorer,
                &prompt,
                &options,
                &mut |_| {},
            ));
            (o.unwrap(), scorer.seconds)
        };
        let wall = start.elapsed().as_secs_f64();
        let s = &outcome.stats;
        println!(
            "{:<12} wall {:>6.2}s  RM time {:>6.2}s  reward calls {:>2}  RM tokens {:>6}  policy tokens generated {:>5}  steps {:>3}  initial rows {}  best row {} score {:.4}",
            if incremental { "incremental" } else { "full" },
            wall,
            rm_seconds,
            s.reward_calls,
            s.reward_tokens,
            s.tokens_generated,
            s.steps,
            s.initial_rows,
            outcome.candidates[0].row,
            outcome.candidates[0].score
        );
        winners.push((
            outcome.candidates[0].row,
            outcome.candidates[0].score,
            wall,
            s.reward_tokens,
        ));
    }
    println!("same winner: {}", winners[0].0 == winners[1].0);
}
