//! The whole path on the default model: text → ids → Speculative Rejection / Best-of-N → text,
//! and batch invariance: a row's logits and a response's reward depend only on its tokens.

use specrej_candle::{CandleDecoder, JudgeScorer, LikelihoodScorer, LoadOptions, Model};
use specrej_core::{
    Decoder, Method, Options, Outcome, Response, Sampling, Scorer, block_on_ready, generate,
};
use specrej_tests::default_model;
use specrej_text::{ChatTemplate, GgufMetadata, Message, Tokenizer, judge_segments};
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
    // The default weights (Q8_0) and K/V (f16): what every user runs.
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

fn run<S: Scorer>(fx: &Fixture, scorer: &mut S, options: &Options, bytes: usize) -> Outcome {
    let mut decoder = CandleDecoder::new(fx.model.clone(), bytes);
    block_on_ready(generate(&mut decoder, scorer, &fx.prompt, options, &mut |_| {}))
        .expect("generation")
}

fn judge(fx: &Fixture) -> JudgeScorer {
    let seg = judge_segments(&fx.tokenizer, &fx.template, QUESTION).expect("judge prompt");
    JudgeScorer::new(fx.model.clone(), seg.before, seg.after, seg.yes, seg.no)
}

/// Every candidate's score is what a fresh scorer gives its text alone, and the winner is
/// the best of them.
fn check_scores<S: Scorer>(fresh: impl Fn() -> S, prompt: &[u32], outcome: &Outcome) {
    for c in &outcome.candidates {
        let alone =
            block_on_ready(fresh().score(prompt, &[Response { row: c.row, tokens: &c.tokens }]))
                .expect("score");
        assert_eq!(alone.rewards[0], c.score, "row {}: the run's score is the text's score", c.row);
    }
    assert!(outcome.candidates.windows(2).all(|w| w[0].score >= w[1].score), "best first");
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn speculative_rejection_and_best_of_n_with_the_judge() {
    let fx = fixture();
    let mut scorer = judge(&fx).incremental();

    let roomy = CandleDecoder::budget_for(&fx.model, fx.prompt.len(), 8, 48);
    let bon = run(&fx, &mut judge(&fx).incremental(), &options(&fx, Method::BestOfN, 6), roomy);
    assert_eq!(bon.candidates.len(), 6);
    assert!(bon.trace.is_empty());
    check_scores(|| judge(&fx), &fx.prompt, &bon);

    // Room for 8 rows × 12 new tokens: decisions must happen.
    let bytes = CandleDecoder::budget_for(&fx.model, fx.prompt.len(), 8, 12);
    let sr =
        run(&fx, &mut scorer, &options(&fx, Method::SpeculativeRejection { alpha: 0.5 }, 8), bytes);
    assert!(!sr.trace.is_empty(), "the budget forces decisions");
    check_scores(|| judge(&fx), &fx.prompt, &sr);
    assert!(sr.stats.tokens_generated < 8 * 48, "rejection saves tokens");
    assert!(sr.stats.peak_kv_bytes <= bytes as u64);

    // Row-keyed noise: the SR survivors are Best-of-N's rows with the same ids.
    let bon8 = run(&fx, &mut judge(&fx), &options(&fx, Method::BestOfN, 8), roomy);
    for c in &sr.candidates {
        let same = bon8.candidates.iter().find(|b| b.row == c.row).expect("row in BoN");
        assert_eq!(c.tokens, same.tokens, "row {}", c.row);
        // Batch invariance: scored in SR's run and in Best-of-N's, the same text has the same reward.
        assert_eq!(c.score, same.score, "row {}", c.row);
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
    let fluent = fx
        .tokenizer
        .encode(
            "Mix flour, water, yeast and salt, knead the dough, let it rise, then bake it.",
            false,
        )
        .expect("encode");
    // The same tokens in another order: every word is still there, the sentence is not.
    let mut shuffled = fluent.clone();
    shuffled.reverse();
    let rs = [Response { row: 0, tokens: &fluent }, Response { row: 1, tokens: &shuffled }];
    let s = block_on_ready(likelihood.score(&fx.prompt, &rs)).expect("score");
    assert!(
        s.rewards[0] > s.rewards[1] * 0.5,
        "fluent {} vs reversed {}: perplexity at least halves",
        s.rewards[0],
        s.rewards[1]
    );

    // And in a run: the winner is a candidate with the best likelihood, and its score is its text's.
    let bytes = CandleDecoder::budget_for(&fx.model, fx.prompt.len(), 6, 12);
    let outcome = run(
        &fx,
        &mut LikelihoodScorer::new(fx.model.clone()).incremental(),
        &options(&fx, Method::SpeculativeRejection { alpha: 0.5 }, 6),
        bytes,
    );
    check_scores(|| LikelihoodScorer::new(fx.model.clone()), &fx.prompt, &outcome);
}

/// 64 unrelated responses (the same sentences, cut at different lengths).
fn unrelated(fx: &Fixture) -> Vec<Vec<u32>> {
    let sentences = [
        "The capital of France is Paris, a city on the Seine.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "A haiku has three lines of five, seven and five syllables.",
        "Photosynthesis turns light, water and carbon dioxide into sugar.",
    ];
    (0..64)
        .map(|i| {
            let ids = fx.tokenizer.encode(sentences[i % 4], false).expect("encode");
            ids[..(3 + i % ids.len().saturating_sub(3)).min(ids.len())].to_vec()
        })
        .collect()
}

/// The same candidate, scored alone, in a batch of 64 unrelated responses, incrementally
/// across 3 decisions and in full (the paper's re-scoring), gets the same reward bit for bit,
/// with the judge and with the likelihood, on the default weights.
#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn rewards_are_batch_invariant() {
    let fx = fixture();
    let candidate = fx
        .tokenizer
        .encode("1. Mix flour, water, yeast and salt. 2. Knead for ten minutes. 3. Let it rise for an hour. 4. Bake at 220 C.", false)
        .expect("encode");
    let others = unrelated(&fx);
    let prompt = &fx.prompt;
    let check = |name: &str,
                 full: &mut dyn FnMut(&[Response<'_>]) -> Vec<f32>,
                 inc: &mut dyn FnMut(&[Response<'_>]) -> Vec<f32>| {
        let alone = full(&[Response { row: 7, tokens: &candidate }])[0];
        let mut batch: Vec<Response<'_>> = others
            .iter()
            .enumerate()
            .map(|(i, t)| Response { row: 100 + i as u32, tokens: t })
            .collect();
        batch.insert(29, Response { row: 7, tokens: &candidate });
        let in_batch = full(&batch)[29];
        // Incrementally: the candidate's prefixes at three decisions (with the unrelated rows
        // alongside), then the whole text.
        let mut incremental = f32::NAN;
        for cut in [candidate.len() / 4, candidate.len() / 2, candidate.len()] {
            let mut rows: Vec<Response<'_>> = others[..16]
                .iter()
                .enumerate()
                .map(|(i, t)| Response { row: 100 + i as u32, tokens: t })
                .collect();
            rows.push(Response { row: 7, tokens: &candidate[..cut] });
            incremental = *inc(&rows).last().expect("a reward");
        }
        eprintln!("{name}: alone {alone}, in a batch of 65 {in_batch}, incremental {incremental}");
        assert_eq!(alone.to_bits(), in_batch.to_bits(), "{name}: alone vs in a batch of 65");
        assert_eq!(
            alone.to_bits(),
            incremental.to_bits(),
            "{name}: alone vs incremental over 3 decisions"
        );
    };
    let mut judge_full = judge(&fx);
    let mut judge_inc = judge(&fx).incremental();
    check(
        "judge",
        &mut |rs| block_on_ready(judge_full.score(prompt, rs)).expect("judge").rewards,
        &mut |rs| block_on_ready(judge_inc.score(prompt, rs)).expect("judge").rewards,
    );
    let mut lik_full = LikelihoodScorer::new(fx.model.clone());
    let mut lik_inc = LikelihoodScorer::new(fx.model.clone()).incremental();
    check(
        "likelihood",
        &mut |rs| block_on_ready(lik_full.score(prompt, rs)).expect("likelihood").rewards,
        &mut |rs| block_on_ready(lik_inc.score(prompt, rs)).expect("likelihood").rewards,
    );
}

/// A row's next-token logits are the same bits at a step with 1 row and with 64 rows.
#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn policy_logits_are_batch_invariant() {
    let fx = fixture();
    let vocab = fx.model.config().vocab_size;
    let sampling = Sampling { seed: 21, ..Sampling::default() };
    let mut wide = CandleDecoder::new(fx.model.clone(), 1 << 30);
    let mut batch = wide.prefill(&fx.prompt, 0..64, &sampling).expect("prefill");
    for _ in 0..5 {
        block_on_ready(wide.step(&mut batch)).expect("step");
    }
    let all = wide.peek_logits(&batch).expect("logits"); // [64, vocab]
    for row in [0u32, 37, 63] {
        let mut narrow = CandleDecoder::new(fx.model.clone(), 1 << 30);
        let mut one = narrow.prefill(&fx.prompt, row..row + 1, &sampling).expect("prefill");
        for _ in 0..5 {
            block_on_ready(narrow.step(&mut one)).expect("step");
        }
        let alone = narrow.peek_logits(&one).expect("logits");
        let r = row as usize;
        let same = all[r * vocab..(r + 1) * vocab]
            .iter()
            .zip(&alone)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "row {row}: logits with 64 rows differ from its logits alone");
    }
}
