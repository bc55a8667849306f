//! The scheduler against the deterministic fake backend.

use specrej_core::testing::{FAKE_EOS, FakeDecoder, FakeScorer};
use specrej_core::{
    Error, Event, Finish, Method, Options, Outcome, Rules, Sampling, block_on_ready, generate,
};

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
    block_on_ready(generate(decoder, scorer, PROMPT, options, &mut |_| {}))
        .expect("generation succeeds")
}

fn best_of_n(n: usize, max_new: usize) -> Outcome {
    run(
        &mut FakeDecoder::new(1 << 20),
        &mut FakeScorer::default(),
        &options(Method::BestOfN, n, max_new),
    )
}

fn sr(alpha: f32) -> Method {
    Method::SpeculativeRejection { alpha }
}

#[test]
fn every_speculative_rejection_trajectory_is_a_best_of_n_prefix() {
    let bon = best_of_n(64, 96);
    let by_row =
        |row: u32| &bon.candidates.iter().find(|c| c.row == row).expect("row in BoN").tokens;
    for alpha in [0.3, 0.5, 0.8] {
        // 64 rows × (8 + 24) tokens fit; decisions start around 24 new tokens.
        let mut decoder = FakeDecoder::new(64 * 32);
        let out = run(&mut decoder, &mut FakeScorer::default(), &options(sr(alpha), 64, 96));
        assert!(!out.trace.is_empty(), "alpha {alpha}: the budget forces decisions");
        for candidate in &out.candidates {
            assert_eq!(
                &candidate.tokens,
                by_row(candidate.row),
                "alpha {alpha} row {}",
                candidate.row
            );
        }
        for rejected in &out.rejected {
            let full = by_row(rejected.row);
            assert!(full.starts_with(&rejected.tokens), "alpha {alpha} row {}", rejected.row);
        }
        // Every row ends exactly once: as a candidate or rejected.
        let mut rows: Vec<u32> = out
            .candidates
            .iter()
            .map(|c| c.row)
            .chain(out.rejected.iter().map(|r| r.row))
            .collect();
        rows.sort_unstable();
        assert_eq!(rows, (0..64).collect::<Vec<_>>());
    }
}

#[test]
fn alpha_zero_with_room_for_everything_is_best_of_n() {
    let bon = best_of_n(16, 64);
    let out =
        run(&mut FakeDecoder::new(1 << 20), &mut FakeScorer::default(), &options(sr(0.0), 16, 64));
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
        assert!(
            d.min <= d.median && d.median <= d.max && d.threshold >= d.min && d.threshold <= d.max
        );
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
            Event::Forked { .. } => panic!("no refill in this run"),
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
            Options {
                sampling: Sampling { top_p: 0.0, ..Sampling::default() },
                ..options(sr(0.5), 4, 10)
            },
            PROMPT,
            "top_p",
        ),
        (
            Options {
                sampling: Sampling { temperature: -1.0, ..Sampling::default() },
                ..options(sr(0.5), 4, 10)
            },
            PROMPT,
            "temperature",
        ),
    ];
    for (options, prompt, expected) in cases {
        let err = block_on_ready(generate(
            &mut FakeDecoder::new(1000),
            &mut FakeScorer::default(),
            prompt,
            &options,
            &mut |_| {},
        ))
        .expect_err(expected);
        assert!(matches!(err, Error::InvalidRequest(_)));
        assert!(err.to_string().contains(expected), "{err} should mention {expected}");
    }
    let mut short = FakeDecoder::new(1000);
    short.max_sequence_len = PROMPT.len();
    let err = block_on_ready(generate(
        &mut short,
        &mut FakeScorer::default(),
        PROMPT,
        &options(sr(0.5), 4, 10),
        &mut |_| {},
    ))
    .expect_err("prompt too long");
    assert!(err.to_string().contains("context"), "{err}");
    let err = block_on_ready(generate(
        &mut FakeDecoder::new(20),
        &mut FakeScorer::default(),
        PROMPT,
        &options(Method::BestOfN, 4, 100),
        &mut |_| {},
    ))
    .expect_err("budget too small");
    assert!(err.to_string().contains("KV budget"), "{err}");
}

fn run_rules(
    capacity: usize,
    alpha: f32,
    n: usize,
    max_new: usize,
    rules: Rules,
) -> (Outcome, FakeDecoder, FakeScorer) {
    let mut decoder = FakeDecoder::new(capacity);
    let mut scorer = FakeScorer::default();
    let options = Options { rules, ..options(sr(alpha), n, max_new) };
    let out = run(&mut decoder, &mut scorer, &options);
    (out, decoder, scorer)
}

#[test]
fn a_tight_budget_with_a_small_alpha_leaves_room_between_decisions() {
    // 32 rows × (8 + 10): with α 0.1 the next decision would come after one token; the room
    // rule cuts more so that every kept row has min_new_tokens (8) more before the next.
    let (out, ..) = run_rules(32 * 18, 0.1, 32, 80, Rules::default());
    assert!(out.trace.len() >= 2);
    for pair in out.trace.windows(2) {
        assert!(pair[1].position - pair[0].position >= 8, "{:?}", out.trace);
    }
    assert!(
        out.trace[0].alpha > 0.1,
        "the first cut went beyond α to make room: {:?}",
        out.trace[0]
    );
    // The time breakdown adds up to no more than the whole.
    let s = &out.stats;
    assert!(
        s.prefill_seconds + s.step_seconds + s.reward_seconds + s.retain_seconds <= s.wall_seconds
    );
    assert!(s.step_seconds > 0.0 && s.reward_seconds > 0.0);
}

#[test]
fn paper_exact_ranks_finished_rows_and_rounds_half_to_even() {
    let mut decoder = FakeDecoder::new(24 * 22);
    decoder.eos_rate = 0.05;
    let exact = Options {
        rules: Rules { paper_exact: true, ..Rules::default() },
        ..options(sr(0.5), 24, 120)
    };
    let out = run(&mut decoder, &mut FakeScorer::default(), &exact);
    let ours = {
        let mut decoder = FakeDecoder::new(24 * 22);
        decoder.eos_rate = 0.05;
        run(&mut decoder, &mut FakeScorer::default(), &options(sr(0.5), 24, 120))
    };
    assert!(!out.trace.is_empty());
    // Finished rows take part in the ranking: some are dropped from the candidates (ours
    // keeps every finished row), and every row still ends exactly once.
    let mut rows: Vec<u32> =
        out.candidates.iter().map(|c| c.row).chain(out.rejected.iter().map(|r| r.row)).collect();
    rows.sort_unstable();
    assert_eq!(rows, (0..24).collect::<Vec<_>>());
    assert_ne!(out.trace, ours.trace, "the rules differ");
    // The first decision ranks the live rows with the finished ones: round-half-even of
    // (1 − α)·(live + finished) rows survive it in all.
    let first = &out.trace[0];
    assert!(first.kept_rows <= first.live_rows);
}

#[test]
fn the_gate_waits_for_a_stable_ranking() {
    let plain = run_rules(32 * 20, 0.5, 32, 90, Rules::default()).0;
    // A gate that always opens is plain SR with probes (the same rows, more reward calls).
    let always = Rules { probe_lag: 4, gate_tau: Some(-1.0), ..Rules::default() };
    let (open, _, scorer) = run_rules(32 * 20, 0.5, 32, 90, always);
    assert_eq!(
        open.trace.iter().map(|d| d.kept_rows).collect::<Vec<_>>()[..1],
        plain.trace.iter().map(|d| d.kept_rows).collect::<Vec<_>>()[..1]
    );
    assert!(scorer.partial_calls > plain.trace.len(), "probes were scored");
    assert!(open.trace[0].tau.is_some(), "a probe came before the first decision");
    // A gate that never opens only frees room for the lag: it keeps more rows each time.
    let never = Rules { probe_lag: 4, gate_tau: Some(2.0), ..Rules::default() };
    let (closed, ..) = run_rules(32 * 20, 0.5, 32, 90, never);
    assert!(
        closed.trace[0].kept_rows > plain.trace[0].kept_rows,
        "{:?} vs {:?}",
        closed.trace[0],
        plain.trace[0]
    );
    for pair in closed.trace.windows(2) {
        assert!(pair[1].position - pair[0].position >= 4);
    }
}

#[test]
fn adaptive_alpha_cuts_less_when_scores_drift_more_than_they_spread() {
    let plain = run_rules(32 * 20, 0.5, 32, 90, Rules::default()).0;
    // A tiny target: every ranking counts as separated: plain α.
    let (sure, ..) = run_rules(
        32 * 20,
        0.5,
        32,
        90,
        Rules { probe_lag: 4, adaptive_snr: Some(1e-9), ..Rules::default() },
    );
    assert_eq!(sure.trace[0].kept_rows, plain.trace[0].kept_rows);
    // A huge one: nothing counts as separated: α shrinks to the room the budget forces.
    let (unsure, ..) = run_rules(
        32 * 20,
        0.5,
        32,
        90,
        Rules { probe_lag: 4, adaptive_snr: Some(1e9), ..Rules::default() },
    );
    assert!(unsure.trace[0].kept_rows > plain.trace[0].kept_rows);
    assert!(unsure.trace[0].alpha < 0.5);
}

#[test]
fn refill_forks_the_kept_rows_into_the_freed_memory() {
    let rules = Rules { refill: Some(0.0), ..Rules::default() };
    let (out, decoder, scorer) = run_rules(16 * 20, 0.5, 16, 60, rules);
    let first = &out.trace[0];
    assert!(first.forked > 0, "{first:?}");
    assert_eq!(decoder.calls.forks.len(), out.trace.iter().filter(|d| d.forked > 0).count());
    assert_eq!(scorer.forked.len(), out.trace.iter().map(|d| d.forked).sum::<usize>());
    // A child starts with its parent's text at the fork, then samples its own.
    let text = |row: u32| {
        out.candidates
            .iter()
            .map(|c| (c.row, &c.tokens))
            .chain(out.rejected.iter().map(|r| (r.row, &r.tokens)))
            .find(|(r, _)| *r == row)
            .map(|(_, t)| t.clone())
    };
    let (parent, child) = scorer.forked[0];
    assert!(child >= 16, "new ids after the initial rows");
    let (p, c) = (text(parent).expect("parent"), text(child).expect("child"));
    let at = first.position;
    assert_eq!(p[..at], c[..at]);
    assert_ne!(
        p[at..].iter().take(5).collect::<Vec<_>>(),
        c[at..].iter().take(5).collect::<Vec<_>>()
    );
    // Every row ends exactly once.
    let mut rows: Vec<u32> =
        out.candidates.iter().map(|c| c.row).chain(out.rejected.iter().map(|r| r.row)).collect();
    let count = rows.len();
    rows.sort_unstable();
    rows.dedup();
    assert_eq!(rows.len(), count);
    // A backend that cannot fork is an error, not a silent no-op.
    let mut replay_rows = vec![vec![1u32; 60]; 16];
    replay_rows[0][5] = 2;
    let mut replay = specrej_core::replay::ReplayDecoder::new(
        &replay_rows,
        16 * 20,
        specrej_core::KvLayout::DENSE,
        8,
        4096,
    );
    let opts = Options { rules, ..options(sr(0.5), 16, 60) };
    let err = block_on_ready(generate(
        &mut replay,
        &mut FakeScorer::default(),
        PROMPT,
        &opts,
        &mut |_| {},
    ))
    .expect_err("no fork");
    assert!(err.to_string().contains("fork"), "{err}");
}

/// An eager scorer gets finished answers as the decoder lets go of them: the same outcome
/// (candidates, scores, rejections, decisions), in more calls, for every method.
#[test]
fn eager_scoring_changes_only_when_answers_are_scored() {
    let runs: [(Method, usize, usize, Rules); 4] = [
        (Method::BestOfN, 16, 40, Rules::default()), // two batches
        (sr(0.5), 32, 200, Rules::default()),
        (sr(0.5), 32, 200, Rules { paper_exact: true, ..Rules::default() }),
        (sr(0.7), 16, 120, Rules { refill: Some(1.0), ..Rules::default() }),
    ];
    for (method, n, max_new, rules) in runs {
        let opts = Options { rules, ..options(method, n, max_new) };
        let at_end = run(&mut FakeDecoder::new(400), &mut FakeScorer::default(), &opts);
        let mut scorer = FakeScorer { eager: true, ..FakeScorer::default() };
        let eager = run(&mut FakeDecoder::new(400), &mut scorer, &opts);
        assert_eq!(eager.candidates, at_end.candidates, "{method:?}");
        assert_eq!(eager.rejected, at_end.rejected, "{method:?}");
        assert_eq!(eager.trace, at_end.trace, "{method:?}");
        assert!(
            eager.stats.reward_calls > at_end.stats.reward_calls,
            "{method:?}: {} vs {}",
            eager.stats.reward_calls,
            at_end.stats.reward_calls
        );
    }
}
