//! The scheduler against the deterministic fake backend.

use specrej_core::testing::{FakeDecoder, FakeScorer, FAKE_EOS};
use specrej_core::{block_on_ready, generate, Error, Event, Finish, Method, Options, Outcome, Rules, Sampling};

const PROMPT: &[u32] = &[3, 1, 4, 1, 5, 9, 2, 6];

fn options(method: Method, n: usize, max_new_tokens: usize) -> Options {
    Options {
        method,
        n,
        max_new_tokens,
        min_new_tokens: 8,
        eos: vec![FAKE_EOS],
        sampling: Sampling { seed: 11, temperature: 1.0, top_k: 0, top_p: 1.0 },
        rules: Rules::default(),
    }
}

fn run(decoder: &mut FakeDecoder, scorer: &mut FakeScorer, options: &Options) -> Outcome {
    block_on_ready(generate(decoder, scorer, PROMPT, options, &mut |_| {})).expect("generation succeeds")
}

fn best_of_n(n: usize, max_new: usize) -> Outcome {
    run(&mut FakeDecoder::new(1 << 20), &mut FakeScorer::default(), &options(Method::BestOfN, n, max_new))
}

fn sr(alpha: f32) -> Method {
    Method::SpeculativeRejection { alpha }
}

#[test]
fn every_speculative_rejection_trajectory_is_a_best_of_n_prefix() {
    let bon = best_of_n(64, 96);
    let by_row = |row: u32| &bon.candidates.iter().find(|c| c.row == row).expect("row in BoN").tokens;
    for alpha in [0.3, 0.5, 0.8] {
        // 64 rows × (8 + 24) tokens fit; decisions start around 24 new tokens.
        let mut decoder = FakeDecoder::new(64 * 32);
        let out = run(&mut decoder, &mut FakeScorer::default(), &options(sr(alpha), 64, 96));
        assert!(!out.trace.is_empty(), "alpha {alpha}: the budget forces decisions");
        for candidate in &out.candidates {
            assert_eq!(&candidate.tokens, by_row(candidate.row), "alpha {alpha} row {}", candidate.row);
        }
        for rejected in &out.rejected {
            let full = by_row(rejected.row);
            assert!(full.starts_with(&rejected.tokens), "alpha {alpha} row {}", rejected.row);
        }
        // Every row ends exactly once: as a candidate or rejected.
        let mut rows: Vec<u32> = out.candidates.iter().map(|c| c.row).chain(out.rejected.iter().map(|r| r.row)).collect();
        rows.sort_unstable();
        assert_eq!(rows, (0..64).collect::<Vec<_>>());
    }
}

#[test]
fn alpha_zero_with_room_for_everything_is_best_of_n() {
    let bon = best_of_n(16, 64);
    let out = run(&mut FakeDecoder::new(1 << 20), &mut FakeScorer::default(), &options(sr(0.0), 16, 64));
    assert!(out.trace.is_empty());
    assert_eq!(out.candidates, bon.candidates);
    assert_eq!(out.stats.tokens_generated, bon.stats.tokens_generated);
}

#[test]
fn candidates_are_scored_ranked_and_include_early_eos_rows() {
    let mut decoder = FakeDecoder::new(32 * 24);
    decoder.eos_rate = 0.05;
    let out = run(&mut decoder, &mut FakeScorer::default(), &options(sr(0.5), 32, 200));
    assert!(out.candidates.iter().any(|c| c.finish == Finish::Eos));
    let first_decision = out.trace.first().expect("a decision").position;
    assert!(
        out.candidates.iter().any(|c| c.finish == Finish::Eos && c.tokens.len() <= first_decision),
        "a row that ended before the first decision stays a candidate"
    );
    for c in &out.candidates {
        assert_eq!(c.score, FakeScorer::reward(&c.tokens));
        if c.finish == Finish::Eos {
            assert_eq!(c.tokens.last(), Some(&FAKE_EOS));
        }
    }
    assert!(out.candidates.windows(2).all(|w| w[0].score >= w[1].score), "best first");
    let best = out.candidates.iter().map(|c| c.score).fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(out.winner().score, best);
}

#[test]
fn the_trace_describes_each_decision() {
    let capacity = 40 * 20;
    let mut decoder = FakeDecoder::new(capacity);
    decoder.eos_rate = 0.0;
    let mut scorer = FakeScorer::default();
    let out = run(&mut decoder, &mut scorer, &options(sr(0.5), 40, 120));
    assert_eq!(out.stats.initial_rows, 40);
    assert!(out.trace.len() >= 2);
    let mut live = 40;
    for d in &out.trace {
        assert!(!d.early);
        assert_eq!(d.live_rows, live);
        assert_eq!(d.kept_rows, ((d.live_rows as f32 * 0.5).round() as usize).max(1));
        assert!(d.min <= d.median && d.median <= d.max && d.threshold >= d.min && d.threshold <= d.max);
        // The decision happens when the next step would overflow the budget.
        assert!(d.live_rows * (PROMPT.len() + d.position) > capacity);
        live = d.kept_rows;
    }
    assert!(decoder.calls.peak_tokens <= capacity, "never more cached than the budget");
    assert_eq!(out.stats.reward_calls, out.trace.len() + 1);
    let mut released = scorer.released.clone();
    released.sort_unstable();
    let mut rejected: Vec<u32> = out.rejected.iter().map(|r| r.row).collect();
    rejected.sort_unstable();
    assert_eq!(released, rejected, "the scorer is told about every rejected row");
    assert_eq!(out.rejected.len(), 40 - out.candidates.len());
}

#[test]
fn out_of_memory_triggers_an_early_decision() {
    let mut decoder = FakeDecoder::new(1 << 20); // claims plenty …
    decoder.real_capacity = Some(600); // … but has less
    decoder.eos_rate = 0.0;
    let out = run(&mut decoder, &mut FakeScorer::default(), &options(sr(0.5), 32, 60));
    assert!(decoder.calls.out_of_memory > 0);
    assert!(out.trace.iter().any(|d| d.early));
    assert!(out.trace.iter().all(|d| d.kept_rows < d.live_rows));
    assert!(!out.candidates.is_empty());
}

#[test]
fn out_of_memory_with_alpha_zero_still_makes_progress() {
    let mut decoder = FakeDecoder::new(1 << 20);
    decoder.real_capacity = Some(300);
    decoder.eos_rate = 0.0;
    let out = run(&mut decoder, &mut FakeScorer::default(), &options(sr(0.0), 16, 60));
    assert!(out.trace.iter().all(|d| d.early && d.kept_rows == d.live_rows - 1));
    // One row of 8 + 60 tokens fits in 300: it runs to the end.
    assert!(out.candidates.iter().any(|c| c.finish == Finish::Length && c.tokens.len() == 60));
}

#[test]
fn a_row_that_no_longer_fits_ends_with_capacity() {
    let mut decoder = FakeDecoder::new(20); // prompt 8 + at most 12 cached new tokens for one row
    decoder.eos_rate = 0.0;
    let out = run(&mut decoder, &mut FakeScorer::default(), &options(sr(0.5), 4, 100));
    assert_eq!(out.candidates.len(), 1);
    assert_eq!(out.candidates[0].finish, Finish::Capacity);
    assert_eq!(out.candidates[0].tokens.len(), 13, "12 cached + the last sampled token");
}

#[test]
fn best_of_n_beyond_the_budget_runs_in_batches_with_global_row_ids() {
    let whole = best_of_n(8, 40);
    let mut decoder = FakeDecoder::new(3 * (PROMPT.len() + 40));
    let out = run(&mut decoder, &mut FakeScorer::default(), &options(Method::BestOfN, 8, 40));
    assert_eq!(decoder.calls.prefills, vec![0..3, 3..6, 6..8]);
    assert_eq!(out.stats.batches, 3);
    assert_eq!(out.candidates, whole.candidates);
}

#[test]
fn seeds_change_the_text_and_runs_repeat() {
    let a = best_of_n(4, 30);
    let b = best_of_n(4, 30);
    assert_eq!(a, Outcome { stats: a.stats.clone(), ..b.clone() });
    let mut other = options(Method::BestOfN, 4, 30);
    other.sampling.seed = 12;
    let c = run(&mut FakeDecoder::new(1 << 20), &mut FakeScorer::default(), &other);
    assert_ne!(a.candidates, c.candidates);
}

#[test]
fn events_follow_the_run() {
    let mut decoder = FakeDecoder::new(16 * 20);
    let mut steps = 0;
    let mut decisions = 0;
    let mut finished = 0;
    let mut scored = 0;
    let out = block_on_ready(generate(
        &mut decoder,
        &mut FakeScorer::default(),
        PROMPT,
        &options(sr(0.5), 16, 50),
        &mut |event| match event {
            Event::Step { rows, tokens, .. } => {
                assert_eq!(rows.len(), tokens.len());
                steps += 1;
            }
            Event::Decision { rows, scores, kept, decision } => {
                assert_eq!(rows.len(), scores.len());
                assert_eq!(kept.len(), decision.kept_rows);
                decisions += 1;
            }
            Event::Finished { .. } => finished += 1,
            Event::Scored { candidates } => scored = candidates.len(),
            Event::Prefilled { rows, .. } => assert_eq!(*rows, 16),
        },
    ))
    .expect("runs");
    assert_eq!(steps, out.stats.steps);
    assert_eq!(decisions, out.trace.len());
    assert_eq!(finished, out.candidates.len());
    assert_eq!(scored, out.candidates.len());
}

#[test]
fn bad_requests_are_named() {
    let cases: Vec<(Options, &[u32], &str)> = vec![
        (options(sr(0.5), 0, 10), PROMPT, "n must be at least 1"),
        (options(sr(1.0), 4, 10), PROMPT, "alpha must be in [0, 1)"),
        (options(sr(-0.1), 4, 10), PROMPT, "alpha must be in [0, 1)"),
        (options(sr(f32::NAN), 4, 10), PROMPT, "alpha must be in [0, 1)"),
        (options(sr(0.5), 4, 10), &[], "the prompt is empty"),
        (options(sr(0.5), 4, 0), PROMPT, "max_new_tokens must be at least 1"),
        (
            Options { sampling: Sampling { top_p: 0.0, ..Sampling::default() }, ..options(sr(0.5), 4, 10) },
            PROMPT,
            "top_p",
        ),
        (
            Options { sampling: Sampling { temperature: -1.0, ..Sampling::default() }, ..options(sr(0.5), 4, 10) },
            PROMPT,
            "temperature",
        ),
    ];
    for (options, prompt, expected) in cases {
        let err = block_on_ready(generate(&mut FakeDecoder::new(1000), &mut FakeScorer::default(), prompt, &options, &mut |_| {}))
            .expect_err(expected);
        assert!(matches!(err, Error::InvalidRequest(_)));
        assert!(err.to_string().contains(expected), "{err} should mention {expected}");
    }
    let mut short = FakeDecoder::new(1000);
    short.max_sequence_len = PROMPT.len();
    let err = block_on_ready(generate(&mut short, &mut FakeScorer::default(), PROMPT, &options(sr(0.5), 4, 10), &mut |_| {}))
        .expect_err("prompt too long");
    assert!(err.to_string().contains("context"), "{err}");
    let err = block_on_ready(generate(&mut FakeDecoder::new(20), &mut FakeScorer::default(), PROMPT, &options(Method::BestOfN, 4, 100), &mut |_| {}))
        .expect_err("budget too small");
    assert!(err.to_string().contains("KV budget"), "{err}");
}
