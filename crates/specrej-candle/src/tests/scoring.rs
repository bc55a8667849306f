//! Scorers: every path gives the same bits (batched, alone, chunked, incremental), and the
//! numbers agree with a direct computation on the dense reference forward.

use candle_core::quantized::GgmlDType;
use specrej_core::{Response, Scored, Scorer, block_on_ready};

use super::loading::full_logits;
use super::*;
use crate::{
    CandleDecoder, EMPTY_RESPONSE_REWARD, JudgeScorer, KvShare, LikelihoodScorer, SelfJudgeScorer,
};
use specrej_core::Decoder;
use specrej_core::likelihood::log_sum_exp;

/// −exp(mean NLL) of `response` after `prompt`, from one full causal pass of the dense
/// reference forward (candle's ops, f32 cache).
fn direct_likelihood(model: &Model, prompt: &[u32], response: &[u32]) -> f32 {
    let vocab = model.config().vocab_size;
    let all = [prompt, response].concat();
    let logits = full_logits(model, &all);
    let mut nll = 0.0f64;
    for (j, &t) in response.iter().enumerate() {
        let row = &logits[(prompt.len() + j - 1) * vocab..(prompt.len() + j) * vocab];
        nll += f64::from(log_sum_exp(row) - row[t as usize]);
    }
    -((nll / response.len() as f64).exp() as f32)
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0)
}

/// The models the scorer tests run on: (weights, K/V, whether a comparison with the
/// dense f32 reference is meaningful to 1e-4). Quantized activations turn the reference's
/// different attention rounding into visible differences, and f16 K/V is another rounding.
fn formats() -> [(WeightFormat, KvFormat, bool); 3] {
    [
        (WeightFormat::F32, KvFormat::F32, true),
        (WeightFormat::Q8_0, KvFormat::F16, false),
        (WeightFormat::Q8_0, KvFormat::F32, false),
    ]
}

/// Every path gives the same bits, whatever the weights.
fn assert_same(a: &[f32], b: &[f32], format: WeightFormat, what: &str) {
    assert_eq!(a, b, "{format:?}: {what}");
}

fn score(scorer: &mut impl Scorer, prompt: &[u32], rs: &[Response<'_>]) -> Scored {
    block_on_ready(scorer.score(prompt, rs)).unwrap()
}

#[test]
fn likelihood_matches_a_full_forward_and_every_path_agrees() {
    for (format, kv, reference) in formats() {
        let (_dir, model) = tiny_gguf_kv(&Tiny::default(), GgmlDType::F32, format, kv);
        let prompt = [1u32, 9, 33, 12];
        let responses: [&[u32]; 5] =
            [&[5, 6, 7, 8, 9, 10], &[40], &[3, 3, 3], &[], &[63, 0, 17, 2, 11, 11]];
        let rs: Vec<Response<'_>> = responses
            .iter()
            .enumerate()
            .map(|(i, t)| Response { row: i as u32, tokens: t })
            .collect();
        let mut scorer = LikelihoodScorer::new(model.clone());
        let scored = score(&mut scorer, &prompt, &rs);
        assert_eq!(scored.rewards.len(), 5);
        for (i, r) in responses.iter().enumerate() {
            let got = scored.rewards[i];
            if r.is_empty() {
                assert_eq!(got, EMPTY_RESPONSE_REWARD);
                continue;
            }
            assert!(got < 0.0 && got > EMPTY_RESPONSE_REWARD);
            if reference {
                let want = direct_likelihood(&model, &prompt, r);
                assert!(close(got, want), "{format:?} response {i}: {got} vs {want}");
            }
            // Alone, the same bits.
            let alone = score(&mut LikelihoodScorer::new(model.clone()), &prompt, &rs[i..=i]);
            assert_same(
                &alone.rewards,
                &[got],
                format,
                &format!("{format:?}/{kv:?} response {i} alone"),
            );
        }
        // The prompt once, then every response's tokens but the last.
        assert_eq!(scored.tokens_processed, 4 + 5 + 2 + 5);

        // Chunked (tiny K/V budget): the same bits.
        let per_token = model.kv_bytes_per_token();
        // Two blocks: the prompt's and one response's at a time.
        let mut small = LikelihoodScorer::with_kv_budget(model.clone(), per_token * 32);
        assert_same(
            &score(&mut small, &prompt, &rs).rewards,
            &scored.rewards,
            format,
            &format!("{format:?}/{kv:?} chunked"),
        );
        // Incremental, from scratch: the same bits.
        let mut inc = LikelihoodScorer::new(model.clone()).incremental();
        assert_same(
            &score(&mut inc, &prompt, &rs).rewards,
            &scored.rewards,
            format,
            &format!("{format:?}/{kv:?} incremental"),
        );
    }
}

#[test]
fn likelihood_edge_cases() {
    let (_dir, model) =
        tiny_gguf_kv(&Tiny::default(), GgmlDType::F32, WeightFormat::F32, KvFormat::F32);
    let mut scorer = LikelihoodScorer::new(model.clone());
    assert_eq!(block_on_ready(scorer.score(&[1, 2], &[])).unwrap(), Scored::default());
    // All responses of length ≤ 1: only the prompt runs.
    let rs = [Response { row: 0, tokens: &[7] }, Response { row: 1, tokens: &[] }];
    let s = score(&mut scorer, &[1, 2], &rs);
    assert_eq!(s.tokens_processed, 2);
    assert!(close(s.rewards[0], direct_likelihood(&model, &[1, 2], &[7])));
    // Empty prompt: BOS stands in.
    let s = score(&mut scorer, &[], &rs);
    assert!(close(s.rewards[0], direct_likelihood(&model, &[1], &[7])));
    // Out-of-vocabulary ids are errors, not panics.
    let bad = [Response { row: 0, tokens: &[64] }];
    assert!(block_on_ready(scorer.score(&[1], &bad)).is_err());
}

#[test]
fn judge_batch_equals_rows_alone() {
    for (format, kv, reference) in formats() {
        let (_dir, model) = tiny_gguf_kv(
            &Tiny { arch: Architecture::Qwen2, ..Tiny::default() },
            GgmlDType::F32,
            format,
            kv,
        );
        let before = vec![1u32, 50, 51, 52, 9];
        let after = vec![53u32, 54, 55];
        let (yes, no) = (60u32, 61u32);
        let mut judge = JudgeScorer::new(model.clone(), before.clone(), after.clone(), yes, no);
        let responses: [&[u32]; 4] = [&[5, 6, 7, 8, 9, 10, 11], &[40], &[], &[3, 3, 3]];
        let rs: Vec<Response<'_>> = responses
            .iter()
            .enumerate()
            .map(|(i, t)| Response { row: i as u32, tokens: t })
            .collect();
        // The prompt argument is ignored.
        let scored = score(&mut judge, &[63, 63, 63], &rs);
        // `before` once, then every response and `after`.
        assert_eq!(scored.tokens_processed, 5 + (7 + 3) + (1 + 3) + 3 + (3 + 3));
        let vocab = model.config().vocab_size;
        for (i, r) in rs.iter().enumerate() {
            let alone = score(&mut judge, &[], std::slice::from_ref(r));
            assert_eq!(alone.tokens_processed, (5 + r.tokens.len() + 3) as u64);
            assert_same(
                &[scored.rewards[i]],
                &alone.rewards,
                format,
                &format!("{format:?}/{kv:?} row {i}"),
            );
            if reference {
                let all = [&before[..], r.tokens, &after[..]].concat();
                let logits = full_logits(&model, &all);
                let last = &logits[(all.len() - 1) * vocab..];
                let want = last[yes as usize] - last[no as usize];
                assert!(
                    close(scored.rewards[i], want),
                    "{format:?} row {i}: {} vs direct {want}",
                    scored.rewards[i]
                );
            }
        }
    }
}

#[test]
fn judge_without_after_scores_empty_responses_from_the_prefix() {
    let (_dir, model) =
        tiny_gguf_kv(&Tiny::default(), GgmlDType::F32, WeightFormat::F32, KvFormat::F32);
    let before = vec![1u32, 50, 51];
    let mut judge = JudgeScorer::new(model.clone(), before.clone(), Vec::new(), 60, 61);
    let rs = [Response { row: 0, tokens: &[] }, Response { row: 1, tokens: &[4, 5] }];
    let s = score(&mut judge, &[], &rs);
    let vocab = model.config().vocab_size;
    let logits = full_logits(&model, &before);
    let last = &logits[2 * vocab..];
    assert!(close(s.rewards[0], last[60] - last[61]));
    assert_eq!(s.tokens_processed, 3 + 2);
}

#[test]
fn incremental_judge_equals_the_batched_judge() {
    for (format, kv, _) in formats() {
        let (_dir, model) = tiny_gguf_kv(
            &Tiny { arch: Architecture::Qwen2, ..Tiny::default() },
            GgmlDType::F32,
            format,
            kv,
        );
        let before = vec![1u32, 50, 51, 52, 9];
        let after = vec![53u32, 54, 55];
        let mut batched = JudgeScorer::new(model.clone(), before.clone(), after.clone(), 60, 61);
        let mut inc =
            JudgeScorer::new(model.clone(), before.clone(), after.clone(), 60, 61).incremental();
        let full: [&[u32]; 3] =
            [&[5, 6, 7, 8, 9, 10, 11, 12, 13], &[40, 41, 42, 43, 44, 45], &[3, 3, 3, 3, 3, 3, 3]];
        let mut total = 0;
        for len in 0..=6 {
            let rows: Vec<Response<'_>> = full
                .iter()
                .enumerate()
                .filter(|(i, _)| !(*i == 1 && len > 3))
                .map(|(i, t)| Response { row: i as u32, tokens: &t[..len] })
                .collect();
            if len == 4 {
                inc.release(&[1]);
            }
            let a = score(&mut inc, &[], &rows);
            let b = score(&mut batched, &[], &rows);
            assert_same(&a.rewards, &b.rewards, format, &format!("{format:?}/{kv:?} len {len}"));
            // Each row: its one new token plus `after` (the first call: `before` once, then each
            // row's tokens and `after`).
            let want = if len == 0 { 5 + rows.len() * 3 } else { rows.len() * (1 + 3) };
            assert_eq!(a.tokens_processed, want as u64, "len {len}");
            total += a.tokens_processed;
        }
        assert!(total < 5 + 3 * 10 * 7);
    }
}

/// Prefixes scored off each row's whole text give the bits the batched judge gives each
/// prefix, with either question, in any order, at several lengths of a row in one call; the
/// whole texts run once.
#[test]
fn prefix_judge_equals_the_batched_judge() {
    for (format, kv, _) in formats() {
        let (_dir, model) = tiny_gguf_kv(
            &Tiny { arch: Architecture::Qwen2, ..Tiny::default() },
            GgmlDType::F32,
            format,
            kv,
        );
        let before = vec![1u32, 50, 51, 52, 9];
        let (after, after_partial) = (vec![53u32, 54, 55], vec![56u32, 57]);
        let judge = || {
            JudgeScorer::new(model.clone(), before.clone(), after.clone(), 60, 61)
                .with_partial(after_partial.clone())
        };
        let mut batched = judge();
        let mut prefixes = judge();
        // Texts longer than a K/V block (16), so branches end inside and across blocks.
        let texts: Vec<Vec<u32>> = (0..3u32)
            .map(|r| (0..20 + 9 * r).map(|i| (i * 7 + r * 3) % 48 + 2).collect())
            .collect();
        let asks: [&[(u32, usize)]; 3] = [
            &[(2, 38), (0, 5), (1, 17), (0, 16), (2, 0)],
            &[(0, 20), (1, 29), (0, 5), (2, 33)],
            &[(1, 1), (1, 28)],
        ];
        let mut first = true;
        for (call, ask) in asks.iter().enumerate() {
            for partial in [false, true] {
                let items: Vec<(Response<'_>, usize)> = ask
                    .iter()
                    .map(|&(row, len)| (Response { row, tokens: &texts[row as usize] }, len))
                    .collect();
                let got = prefixes.score_prefixes(&items, partial).expect("prefixes");
                let want: Vec<f32> = items
                    .iter()
                    .map(|(r, len)| {
                        let one = [Response { row: r.row, tokens: &r.tokens[..*len] }];
                        let scored = if partial {
                            block_on_ready(batched.score_partial(&[], &one)).unwrap()
                        } else {
                            score(&mut batched, &[], &one)
                        };
                        scored.rewards[0]
                    })
                    .collect();
                assert_same(
                    &got.rewards,
                    &want,
                    format,
                    &format!("{kv:?} call {call} partial {partial}"),
                );
                // The first call runs `before` and every whole text; every call runs the question once per item.
                let question = if partial { after_partial.len() } else { after.len() };
                let texts_run: usize = if first {
                    before.len() + texts.iter().map(Vec::len).sum::<usize>()
                } else {
                    0
                };
                assert_eq!(
                    got.tokens_processed,
                    (texts_run + items.len() * question) as u64,
                    "call {call}"
                );
                first = false;
            }
        }
        // A length past the text, or one row with two texts, is an error.
        let short = [(Response { row: 0, tokens: &texts[0][..4] }, 5)];
        assert!(prefixes.score_prefixes(&short, false).is_err());
        let two = [
            (Response { row: 0, tokens: &texts[0] }, 3),
            (Response { row: 0, tokens: &texts[1] }, 3),
        ];
        assert!(prefixes.score_prefixes(&two, false).is_err());
        // A row whose text changed is run again.
        let changed = [(Response { row: 0, tokens: &texts[1] }, 10)];
        let got = prefixes.score_prefixes(&changed, false).expect("changed");
        assert_same(
            &got.rewards,
            &score(&mut batched, &[], &[Response { row: 0, tokens: &texts[1][..10] }]).rewards,
            format,
            "changed",
        );
        assert_eq!(got.tokens_processed, (texts[1].len() + after.len()) as u64);
    }
}

/// Over its budget, the bases of rows a call does not ask about go, least recently used
/// first; the rows it asks about stay whatever the budget.
#[test]
fn branches_drop_the_least_recently_used_rows() {
    let (_dir, model) =
        tiny_gguf_kv(&Tiny::default(), GgmlDType::F32, WeightFormat::F32, KvFormat::F32);
    let mut b = crate::branches::Branches::new(model.clone(), 3 * 12);
    assert_eq!(b.set_start(&[1, 2]).unwrap(), 2);
    let text: Vec<u32> = (3..13).collect();
    assert_eq!(b.hold(&[(0, &text), (1, &text)]).unwrap(), 20);
    assert_eq!(b.hold(&[(2, &text)]).unwrap(), 10);
    assert_eq!(b.held_tokens(), 36);
    assert_eq!(b.hold(&[(0, &text)]).unwrap(), 0, "held: nothing runs");
    assert_eq!(b.hold(&[(3, &text)]).unwrap(), 10);
    assert_eq!(b.held_tokens(), 36, "row 1, used least recently, went");
    assert_eq!(b.hold(&[(0, &text), (2, &text), (3, &text)]).unwrap(), 0, "rows 0, 2 and 3 stayed");
    assert_eq!(
        b.hold(&[(0, &text), (1, &text), (2, &text), (3, &text)]).unwrap(),
        10,
        "all four asked for: all four held"
    );
    assert_eq!(b.held_tokens(), 48);
    assert!(b.branch_last(&[(5, 0, &[4])], |_, _| {}).is_err(), "row 5 has no base");
    assert!(b.branch_last(&[(0, 11, &[4])], |_, _| {}).is_err(), "row 0 holds 10 ids");
    let mut seen = Vec::new();
    assert_eq!(
        b.branch_last(&[(0, 10, &[4]), (1, 0, &[4, 5])], |i, h| seen.push((i, h.len()))).unwrap(),
        3
    );
    assert_eq!(seen, vec![(0, 64), (1, 64)]);
}

#[test]
fn incremental_likelihood_equals_the_batched_likelihood() {
    for (format, kv, reference) in formats() {
        let (_dir, model) = tiny_gguf_kv(&Tiny::default(), GgmlDType::F32, format, kv);
        let prompt = [1u32, 9, 33, 12];
        let mut batched = LikelihoodScorer::new(model.clone());
        let mut inc = LikelihoodScorer::new(model.clone()).incremental();
        let full: [&[u32]; 3] =
            [&[5, 6, 7, 8, 9, 10, 11, 12, 13], &[40, 41, 42, 43, 44, 45], &[3, 3, 3, 3, 3, 3, 3]];
        let mut total = 0;
        for len in 0..=7 {
            let rows: Vec<Response<'_>> = full
                .iter()
                .enumerate()
                .filter(|(i, _)| !(*i == 1 && len > 3))
                .map(|(i, t)| Response { row: i as u32, tokens: &t[..len.min(t.len())] })
                .collect();
            if len == 4 {
                inc.release(&[1]);
            }
            let a = score(&mut inc, &prompt, &rows);
            let b = score(&mut batched, &prompt, &rows);
            assert_same(&a.rewards, &b.rewards, format, &format!("{format:?}/{kv:?} len {len}"));
            if reference {
                for (r, x) in rows.iter().zip(&a.rewards) {
                    if !r.tokens.is_empty() {
                        assert!(close(*x, direct_likelihood(&model, &prompt, r.tokens)));
                    }
                }
            }
            total += a.tokens_processed;
        }
        // A row whose tokens change (same row id, different response) is re-scored correctly.
        let other = [Response { row: 0, tokens: &[5, 6, 60, 61] }];
        let a = score(&mut inc, &prompt, &other);
        assert_same(
            &a.rewards,
            &score(&mut batched, &prompt, &other).rewards,
            format,
            "changed row",
        );
        // And a different prompt.
        let a = score(&mut inc, &[1, 2], &other);
        assert_same(
            &a.rewards,
            &score(&mut batched, &[1, 2], &other).rewards,
            format,
            "other prompt",
        );
        // Prompt once, then about 2 tokens per row per call (the new one and the one before).
        assert!(total < 4 + 3 * 2 * 8, "{total}");
    }
}

/// Steps `batch` `steps` times; returns each row's sampled tokens (the last one not yet run).
fn sample_rows(
    dec: &mut CandleDecoder,
    batch: &mut crate::CandleBatch,
    steps: usize,
) -> Vec<Vec<u32>> {
    let mut tokens = vec![Vec::new(); batch.rows()];
    for _ in 0..steps {
        let step = block_on_ready(dec.step(batch)).expect("step");
        for (t, x) in tokens.iter_mut().zip(step) {
            t.push(x);
        }
    }
    tokens
}

/// The self-judge reads the decoder's K/V of live and parked rows and gives the bits of
/// running the same input from scratch (and, in f32, the direct forward's numbers), while
/// running only what the decoder has not: the last sampled token and the question.
#[test]
fn self_judge_on_lent_kv_equals_the_self_judge_from_scratch() {
    for (format, kv, reference) in formats() {
        let (_dir, model) = tiny_gguf_kv(&Tiny::default(), GgmlDType::F32, format, kv);
        let prompt = vec![1u32, 50, 51, 52, 9];
        let after = vec![2u32, 53, 54, 55];
        let (yes, no) = (60u32, 61u32);
        let share = KvShare::new(&model);
        let mut dec = CandleDecoder::new(model.clone(), 1 << 30);
        dec.lend_kv(&share).expect("same model");
        let mut lent = SelfJudgeScorer::new(model.clone(), after.clone(), yes, no)
            .borrowing(&share)
            .expect("same model");
        let mut scratch = SelfJudgeScorer::new(model.clone(), after.clone(), yes, no);
        let mut batch = dec.prefill(&prompt, 0..4, &sampling(1.0)).expect("prefill");
        let mut tokens = sample_rows(&mut dec, &mut batch, 21); // 20 run, 1 pending per row
        // Row 1's answer ends with the end-of-turn token: `after` does not repeat it.
        tokens[1].push(2);
        let rs = |rows: &[usize], tokens: &[Vec<u32>]| -> Vec<(u32, Vec<u32>)> {
            rows.iter().map(|&r| (r as u32, tokens[r].clone())).collect()
        };
        let check = |lent: &mut SelfJudgeScorer,
                     scratch: &mut SelfJudgeScorer,
                     items: &[(u32, Vec<u32>)],
                     partial: bool,
                     run_each: u64| {
            let responses: Vec<Response<'_>> =
                items.iter().map(|(row, t)| Response { row: *row, tokens: t }).collect();
            let call = |s: &mut SelfJudgeScorer| {
                if partial {
                    block_on_ready(s.score_partial(&prompt, &responses))
                } else {
                    block_on_ready(s.score(&prompt, &responses))
                }
                .expect("score")
            };
            let (a, b) = (call(lent), call(scratch));
            assert_same(&a.rewards, &b.rewards, format, &format!("{kv:?}: lent vs scratch"));
            assert_eq!(
                a.tokens_processed,
                run_each * items.len() as u64,
                "{format:?}/{kv:?}: only the new positions ran"
            );
            // From scratch: the prompt once, then every input's answer and question.
            let tails: usize =
                items.iter().map(|(_, t)| lent.input(&prompt, t).len() - prompt.len()).sum();
            assert_eq!(b.tokens_processed, (prompt.len() + tails) as u64);
            if reference {
                let vocab = model.config().vocab_size;
                for ((_, t), got) in items.iter().zip(&a.rewards) {
                    let all = lent.input(&prompt, t);
                    let logits = full_logits(&model, &all);
                    let last = &logits[(all.len() - 1) * vocab..];
                    let want = last[yes as usize] - last[no as usize];
                    assert!(close(*got, want), "{format:?}: {got} vs direct {want}");
                }
            }
        };
        // Live rows, at a decision: the pending token and `after` run.
        check(&mut lent, &mut scratch, &rs(&[0, 2, 3], &tokens), true, 1 + 4);
        // Rows 1 and 3 let go of: parked, then judged from there (row 1 ran its last token
        // before the end-of-turn one, so the end-of-turn token and the rest of `after` run).
        dec.retain(&mut batch, &[0, 2]).expect("retain");
        assert_eq!(share.parked_rows(), 2);
        check(&mut lent, &mut scratch, &rs(&[1, 3], &tokens), false, 1 + 4);
        assert_eq!(share.parked_rows(), 0, "judged rows are dropped");
        // The batch's end parks the rest; a rejected row is released.
        drop(batch);
        assert_eq!(share.parked_rows(), 2);
        lent.release(&[0]);
        assert_eq!(share.parked_rows(), 1);
        // A row the decoder no longer holds runs from the prompt: the same bits.
        let gone = block_on_ready(lent.score(&prompt, &[Response { row: 0, tokens: &tokens[0] }]))
            .expect("score");
        let fresh =
            block_on_ready(scratch.score(&prompt, &[Response { row: 0, tokens: &tokens[0] }]))
                .expect("score");
        assert_same(&gone.rewards, &fresh.rewards, format, "a row no longer lent");
    }
}

/// Parked rows never make a step fail: when the pool runs out, the decoder drops them and
/// retries.
#[test]
fn parked_rows_give_way_to_live_ones() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::F32);
    let prompt = vec![1u32, 50, 51, 52, 9];
    // The prompt's block and two blocks of 16 own positions for each of two rows.
    let budget = CandleDecoder::budget_for(&model, prompt.len(), 2, 32);
    let share = KvShare::new(&model);
    let mut dec = CandleDecoder::new(model.clone(), budget);
    dec.lend_kv(&share).expect("same model");
    let mut batch = dec.prefill(&prompt, 0..2, &sampling(1.0)).expect("prefill");
    let alone = {
        let mut plain = CandleDecoder::new(model.clone(), budget);
        let mut b = plain.prefill(&prompt, 0..2, &sampling(1.0)).expect("prefill");
        let _ = sample_rows(&mut plain, &mut b, 20);
        plain.retain(&mut b, &[0]).expect("retain");
        sample_rows(&mut plain, &mut b, 40)
    };
    let _ = sample_rows(&mut dec, &mut batch, 20);
    dec.retain(&mut batch, &[0]).expect("retain");
    assert_eq!(share.parked_rows(), 1);
    // Row 0 grows into the memory row 1 holds while parked: the step evicts it.
    let tokens = sample_rows(&mut dec, &mut batch, 40);
    assert_eq!(share.parked_rows(), 0);
    assert_eq!(tokens, alone, "the same tokens as without the loan");
}
