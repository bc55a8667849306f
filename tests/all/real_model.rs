//! The whole path on the default model: text → ids → Speculative Rejection / Best-of-N → text.

use specrej_candle::{CandleDecoder, JudgeScorer, LikelihoodScorer, LoadOptions, Model};
use specrej_core::{block_on_ready, generate, Method, Options, Outcome, Sampling, Scorer};
use specrej_tests::default_model;
use specrej_text::{judge_segments, ChatTemplate, GgufMetadata, Message, Tokenizer};
use std::sync::Arc;

const QUESTION: &str = "Describe, step by step, how to bake a loaf of bread at home.";

struct Fixture {
    model: Arc<Model>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prompt: Vec<u32>,
}

fn fixture() -> Fixture {
    let path = default_model();
    let meta = GgufMetadata::from_path(&path).expect("metadata");
    let tokenizer = Tokenizer::from_gguf(&meta).expect("tokenizer");
    let template = ChatTemplate::from_gguf(&meta).expect("template");
    let text = template.render(&[Message::user(QUESTION)], true).expect("render");
    let prompt = tokenizer.encode(&text, false).expect("encode");
    let model = specrej_candle::load(&path, &LoadOptions::default()).expect("model");
    Fixture { model, tokenizer, template, prompt }
}

fn options(fx: &Fixture, method: Method, n: usize) -> Options {
    Options {
        method,
        n,
        max_new_tokens: 48,
        min_new_tokens: 12,
        eos: fx.tokenizer.eos_ids().to_vec(),
        sampling: Sampling { seed: 3, ..Sampling::default() },
        rules: Default::default(),
    }
}

fn run<S: Scorer>(fx: &Fixture, scorer: &mut S, options: &Options, capacity: usize) -> Outcome {
    let bytes = capacity * fx.model.config().kv_bytes_per_token();
    let mut decoder = CandleDecoder::new(fx.model.clone(), bytes);
    block_on_ready(generate(&mut decoder, scorer, &fx.prompt, options, &mut |_| {})).expect("generation")
}

fn check_winner(fx: &Fixture, outcome: &Outcome) {
    let best = outcome.candidates.iter().map(|c| c.score).fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(outcome.winner().score, best, "the winner is the argmax of its candidates");
    assert!(outcome.candidates.iter().all(|c| c.score.is_finite()));
    let text = fx.tokenizer.decode(&outcome.winner().tokens, true).expect("decode");
    assert!(text.trim().chars().filter(|c| c.is_alphabetic()).count() >= 3, "winner text is empty: {text:?}");
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn speculative_rejection_and_best_of_n_with_the_judge() {
    let fx = fixture();
    let seg = judge_segments(&fx.tokenizer, &fx.template, QUESTION).expect("judge prompt");
    let mut judge = JudgeScorer::new(fx.model.clone(), seg.before, seg.after, seg.yes, seg.no);

    let bon = run(&fx, &mut judge, &options(&fx, Method::BestOfN, 6), 1 << 20);
    assert_eq!(bon.candidates.len(), 6);
    assert!(bon.trace.is_empty());
    check_winner(&fx, &bon);

    // Room for 8 rows × (prompt + 12): decisions must happen.
    let capacity = 8 * (fx.prompt.len() + 12);
    let sr = run(&fx, &mut judge, &options(&fx, Method::SpeculativeRejection { alpha: 0.5 }, 8), capacity);
    assert!(!sr.trace.is_empty(), "the budget forces decisions");
    check_winner(&fx, &sr);
    assert!(sr.stats.tokens_generated < 8 * 48, "rejection saves tokens");
    assert!(sr.stats.peak_kv_bytes <= (capacity * fx.model.config().kv_bytes_per_token()) as u64);

    // Row-keyed noise: the SR survivors are Best-of-N's rows with the same ids.
    let bon8 = run(&fx, &mut judge, &options(&fx, Method::BestOfN, 8), 1 << 20);
    for c in &sr.candidates {
        let same = bon8.candidates.iter().find(|b| b.row == c.row).expect("row in BoN");
        assert_eq!(c.tokens, same.tokens, "row {}", c.row);
    }
    for r in &sr.rejected {
        let same = bon8.candidates.iter().find(|b| b.row == r.row).expect("row in BoN");
        assert!(same.tokens.starts_with(&r.tokens), "row {}", r.row);
    }
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn likelihood_reward_prefers_fluent_text() {
    let fx = fixture();
    let mut likelihood = LikelihoodScorer::new(fx.model.clone());
    let outcome = run(&fx, &mut likelihood, &options(&fx, Method::SpeculativeRejection { alpha: 0.5 }, 6), 6 * (fx.prompt.len() + 12));
    check_winner(&fx, &outcome);
    assert!(outcome.candidates.iter().all(|c| c.score < 0.0), "−perplexity is negative");
}
