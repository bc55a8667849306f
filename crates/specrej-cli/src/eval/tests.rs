//! Replay against live runs on the default model: the same outcome, bit for bit.
#![allow(clippy::unwrap_used, reason = "tests: a failed unwrap is a failed test")]

use std::sync::Arc;

use specrej_candle::{
    CandleDecoder, JudgeScorer, KvShare, LikelihoodScorer, LoadOptions, SelfJudgeScorer,
};
use specrej_core::{Decoder, Method, Options, Rules, Sampling, Scorer, block_on_ready};

use super::cost::Calibration;
use super::record::record;
use super::replay::{self, Memory, Mode, RewardName, Rewards};
use super::{judge_text, outcome_difference};
use crate::model::Text;

const QUESTION: &str = "Give three tips for staying healthy.";

/// Prices nothing: these tests compare outcomes, not costs.
fn free() -> Calibration {
    Calibration {
        machine: "test".into(),
        step: vec![(1, 0.0)],
        per_row_token: 0.0,
        prefill: [0.0; 3],
        reward: Default::default(),
    }
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn replay_equals_live_runs_on_the_default_model() {
    let path = std::path::PathBuf::from(std::env::var_os("SPECREJ_MODEL").expect("SPECREJ_MODEL"));
    let model = specrej_candle::load(&path, &LoadOptions::default()).unwrap();
    let text = Text::load(&path).unwrap();
    let prompt = text.prompt(QUESTION, None, false).unwrap();
    let base = Options {
        method: Method::BestOfN,
        n: 24,
        max_new_tokens: 56,
        min_new_tokens: 8,
        eos: text.tokenizer.eos_ids().to_vec(),
        sampling: Sampling { seed: 17, ..Sampling::default() },
        rules: Rules::default(),
    };
    let rec = record(&model, &prompt, &base, 16).unwrap();
    assert_eq!(rec.missing_nll(), None, "a CPU recording has every token's NLL");
    assert_eq!(rec.batch_rows, 16, "two batches: rows do not depend on their batch");
    // Room for 24 rows × 8 new tokens (a block each): decisions every block or two.
    let bytes = CandleDecoder::budget_for(&model, prompt.len(), 24, 8);
    let probe = CandleDecoder::new(Arc::clone(&model), bytes);
    let memory = Memory {
        capacity: probe.token_capacity(),
        layout: probe.kv_layout(),
        kv_bytes_per_token: probe.kv_bytes_per_token(),
        max_sequence_len: probe.max_sequence_len(),
    };
    let judge = judge_text(&text, QUESTION).unwrap();
    let own = specrej_text::self_judge_segments(&text.tokenizer, &text.template).unwrap();
    for reward in
        [RewardName::Judge, RewardName::Likelihood, RewardName::PartialJudge, RewardName::SelfJudge]
    {
        let mut table = match reward {
            RewardName::Likelihood => Rewards::likelihood(&rec),
            RewardName::SelfJudge => {
                Rewards::self_judge(&rec, &model, &prompt, own.after.clone(), own.yes, own.no)
            }
            _ => Rewards::judge(&rec, &model, judge.clone(), reward == RewardName::PartialJudge),
        };
        let finals = table.finals().unwrap();
        // Several α and every rule set with the judge; fewer with the others (CI time).
        let policies = Rules {
            probe_lag: 4,
            gate_tau: Some(0.5),
            adaptive_snr: Some(1.0),
            ..Rules::default()
        };
        let configs: Vec<(f32, Rules)> = match reward {
            RewardName::Judge => vec![
                (0.3, Rules::default()),
                (0.5, Rules::default()),
                (0.8, Rules::default()),
                (0.5, Rules { paper_exact: true, ..Rules::default() }),
                (0.5, policies),
            ],
            RewardName::Likelihood => vec![(0.3, Rules::default()), (0.8, Rules::default())],
            RewardName::PartialJudge => vec![(0.5, policies)],
            RewardName::SelfJudge => vec![
                (0.5, Rules::default()),
                (0.5, Rules { paper_exact: true, ..Rules::default() }),
            ],
        };
        for (alpha, rules) in configs {
            let options = replay::sr_options(&base, alpha, 24, rules);
            let replayed = replay::replay(
                &rec,
                &mut table,
                &finals,
                &prompt,
                &options,
                memory,
                Mode::Real,
                &free(),
            )
            .unwrap()
            .outcome;
            assert!(
                !replayed.trace.is_empty(),
                "{reward:?} α {alpha}: the budget forces decisions"
            );
            let mut decoder = CandleDecoder::new(Arc::clone(&model), bytes);
            let live = match reward {
                RewardName::Likelihood => run(
                    &mut decoder,
                    &mut LikelihoodScorer::new(Arc::clone(&model)).incremental(),
                    &prompt,
                    &options,
                ),
                RewardName::SelfJudge => {
                    // On the decoder's K/V, under a budget that forces a decision every block or two.
                    let share = KvShare::new(&model);
                    decoder.lend_kv(&share).unwrap();
                    let mut j = SelfJudgeScorer::new(
                        Arc::clone(&model),
                        own.after.clone(),
                        own.yes,
                        own.no,
                    )
                    .borrowing(&share)
                    .unwrap();
                    run(&mut decoder, &mut j, &prompt, &options)
                }
                _ => {
                    let mut j = JudgeScorer::new(
                        Arc::clone(&model),
                        judge.before.clone(),
                        judge.after.clone(),
                        judge.yes,
                        judge.no,
                    )
                    .incremental();
                    if reward == RewardName::PartialJudge {
                        j = j.with_partial(judge.after_partial.clone());
                    }
                    run(&mut decoder, &mut j, &prompt, &options)
                }
            };
            assert_eq!(
                outcome_difference(&live, &replayed),
                None,
                "{reward:?} α {alpha} {rules:?}"
            );
            eprintln!(
                "{reward:?} α {alpha}: replay = live ({} decisions, winner row {}, {} tokens, {} RM tokens)",
                live.trace.len(),
                live.winner().row,
                live.stats.tokens_generated,
                live.stats.reward_tokens
            );
        }
        // Best-of-N in sequential batches replays too.
        let options = Options { n: 24, ..base.clone() };
        let replayed = replay::replay(
            &rec,
            &mut table,
            &finals,
            &prompt,
            &options,
            memory,
            Mode::Real,
            &free(),
        )
        .unwrap()
        .outcome;
        let bon_bytes = CandleDecoder::budget_for(&model, prompt.len(), 10, base.max_new_tokens);
        let bon_memory = Memory {
            capacity: CandleDecoder::new(Arc::clone(&model), bon_bytes).token_capacity(),
            ..memory
        };
        let replayed_small = replay::replay(
            &rec,
            &mut table,
            &finals,
            &prompt,
            &options,
            bon_memory,
            Mode::Real,
            &free(),
        )
        .unwrap()
        .outcome;
        assert_eq!(replayed_small.stats.batches, 3);
        assert_eq!(
            replayed.winner().row,
            replayed_small.winner().row,
            "batches change nothing but cost"
        );
        assert_eq!(
            replayed.winner().score,
            finals.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
    }
}

fn run<S: Scorer>(
    decoder: &mut CandleDecoder,
    scorer: &mut S,
    prompt: &[u32],
    options: &Options,
) -> specrej_core::Outcome {
    block_on_ready(specrej_core::generate(decoder, scorer, prompt, options, &mut |_| {})).unwrap()
}
