//! Scorers against direct computations.

use candle_core::quantized::GgmlDType;
use specrej_core::{Response, Scorer, block_on_ready};

use super::loading::full_logits;
use super::*;
use specrej_core::likelihood::log_sum_exp;
use crate::{EMPTY_RESPONSE_REWARD, JudgeScorer, LikelihoodScorer};

/// −exp(mean NLL) of `response` after `prompt`, from one full causal pass.
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

#[test]
fn likelihood_matches_a_full_forward() {
    for format in [WeightFormat::Q8_0, WeightFormat::F32] {
        let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, format);
        let prompt = [1u32, 9, 33, 12];
        let responses: [&[u32]; 5] = [&[5, 6, 7, 8, 9, 10], &[40], &[3, 3, 3], &[], &[63, 0, 17, 2, 11, 11]];
        let rs: Vec<Response<'_>> =
            responses.iter().enumerate().map(|(i, t)| Response { row: i as u32, tokens: t }).collect();
        let mut scorer = LikelihoodScorer::new(model.clone());
        let scored = block_on_ready(scorer.score(&prompt, &rs)).unwrap();
        assert_eq!(scored.rewards.len(), 5);
        for (i, r) in responses.iter().enumerate() {
            let got = scored.rewards[i];
            if r.is_empty() {
                assert_eq!(got, EMPTY_RESPONSE_REWARD);
                continue;
            }
            let want = direct_likelihood(&model, &prompt, r);
            assert!(close(got, want), "{format:?} response {i}: {got} vs {want}");
            assert!(got < 0.0 && got > EMPTY_RESPONSE_REWARD);
        }
        // Prompt once, then 5 rows × (longest response − 1) padded positions.
        assert_eq!(scored.tokens_processed, 4 + 5 * 5);

        // Chunked (tiny K/V budget): same rewards.
        let per_token = model.config().kv_bytes_per_token();
        let mut small = LikelihoodScorer::with_kv_budget(model.clone(), per_token * 20);
        let chunked = block_on_ready(small.score(&prompt, &rs)).unwrap();
        for (a, b) in chunked.rewards.iter().zip(&scored.rewards) {
            assert!(close(*a, *b), "chunked {a} vs {b}");
        }
    }
}

#[test]
fn likelihood_edge_cases() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let mut scorer = LikelihoodScorer::new(model.clone());
    assert_eq!(block_on_ready(scorer.score(&[1, 2], &[])).unwrap(), specrej_core::Scored::default());
    // All responses of length ≤ 1: only the prompt runs.
    let rs = [Response { row: 0, tokens: &[7] }, Response { row: 1, tokens: &[] }];
    let s = block_on_ready(scorer.score(&[1, 2], &rs)).unwrap();
    assert_eq!(s.tokens_processed, 2);
    assert!(close(s.rewards[0], direct_likelihood(&model, &[1, 2], &[7])));
    // Empty prompt: BOS stands in.
    let s = block_on_ready(scorer.score(&[], &rs)).unwrap();
    assert!(close(s.rewards[0], direct_likelihood(&model, &[1], &[7])));
    // Out-of-vocabulary ids are errors, not panics.
    let bad = [Response { row: 0, tokens: &[64] }];
    assert!(block_on_ready(scorer.score(&[1], &bad)).is_err());
}

#[test]
fn judge_batch_equals_rows_alone() {
    for format in [WeightFormat::Q8_0, WeightFormat::F32] {
        let (_dir, model) = tiny_gguf(&Tiny { arch: Architecture::Qwen2, ..Tiny::default() }, GgmlDType::F32, format);
        let before = vec![1u32, 50, 51, 52, 9];
        let after = vec![53u32, 54, 55];
        let (yes, no) = (60u32, 61u32);
        let mut judge = JudgeScorer::new(model.clone(), before.clone(), after.clone(), yes, no);
        let responses: [&[u32]; 4] = [&[5, 6, 7, 8, 9, 10, 11], &[40], &[], &[3, 3, 3]];
        let rs: Vec<Response<'_>> =
            responses.iter().enumerate().map(|(i, t)| Response { row: i as u32, tokens: t }).collect();
        // The prompt argument is ignored.
        let scored = block_on_ready(judge.score(&[63, 63, 63], &rs)).unwrap();
        assert_eq!(scored.tokens_processed, 5 + 4 * (7 + 3));
        let vocab = model.config().vocab_size;
        for (i, r) in rs.iter().enumerate() {
            let alone = block_on_ready(judge.score(&[], std::slice::from_ref(r))).unwrap();
            assert_eq!(alone.tokens_processed, (5 + r.tokens.len() + 3) as u64);
            assert!(close(scored.rewards[i], alone.rewards[0]), "{format:?} row {i}: {} vs {}", scored.rewards[i], alone.rewards[0]);
            // And against a plain forward of the whole sequence.
            let all = [&before[..], r.tokens, &after[..]].concat();
            let logits = full_logits(&model, &all);
            let last = &logits[(all.len() - 1) * vocab..];
            let want = last[yes as usize] - last[no as usize];
            assert!(close(scored.rewards[i], want), "{format:?} row {i}: {} vs direct {want}", scored.rewards[i]);
        }
    }
}

#[test]
fn judge_without_after_scores_empty_responses_from_the_prefix() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let before = vec![1u32, 50, 51];
    let mut judge = JudgeScorer::new(model.clone(), before.clone(), Vec::new(), 60, 61);
    let rs = [Response { row: 0, tokens: &[] }, Response { row: 1, tokens: &[4, 5] }];
    let s = block_on_ready(judge.score(&[], &rs)).unwrap();
    let vocab = model.config().vocab_size;
    let logits = full_logits(&model, &before);
    let last = &logits[2 * vocab..];
    assert!(close(s.rewards[0], last[60] - last[61]));
    assert_eq!(s.tokens_processed, 3 + 2 * 2);
}

#[test]
fn incremental_judge_equals_the_batched_judge() {
    let (_dir, model) = tiny_gguf(&Tiny { arch: Architecture::Qwen2, ..Tiny::default() }, GgmlDType::F32, WeightFormat::F32);
    let before = vec![1u32, 50, 51, 52, 9];
    let after = vec![53u32, 54, 55];
    let mut batched = JudgeScorer::new(model.clone(), before.clone(), after.clone(), 60, 61);
    let mut inc = JudgeScorer::new(model.clone(), before.clone(), after.clone(), 60, 61).incremental();
    let full: [&[u32]; 3] = [&[5, 6, 7, 8, 9, 10, 11, 12, 13], &[40, 41, 42, 43, 44, 45], &[3, 3, 3, 3, 3, 3, 3]];
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
        let a = block_on_ready(inc.score(&[], &rows)).unwrap();
        let b = block_on_ready(batched.score(&[], &rows)).unwrap();
        for (x, y) in a.rewards.iter().zip(&b.rewards) {
            assert!(close(*x, *y), "len {len}: {x} vs {y}");
        }
        // Each row: its one new token plus `after` (the first call: `before` once, then each
        // row's tokens and `after`).
        let want = if len == 0 { 5 + rows.len() * 3 } else { rows.len() * (1 + 3) };
        assert_eq!(a.tokens_processed, want as u64, "len {len}");
        total += a.tokens_processed;
    }
    assert!(total < 5 + 3 * 10 * 7);
}

#[test]
fn incremental_likelihood_equals_the_batched_likelihood() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::F32);
    let prompt = [1u32, 9, 33, 12];
    let mut batched = LikelihoodScorer::new(model.clone());
    let mut inc = LikelihoodScorer::new(model.clone()).incremental();
    let full: [&[u32]; 3] = [&[5, 6, 7, 8, 9, 10, 11, 12, 13], &[40, 41, 42, 43, 44, 45], &[3, 3, 3, 3, 3, 3, 3]];
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
        let a = block_on_ready(inc.score(&prompt, &rows)).unwrap();
        let b = block_on_ready(batched.score(&prompt, &rows)).unwrap();
        for (r, (x, y)) in rows.iter().zip(a.rewards.iter().zip(&b.rewards)) {
            assert!(close(*x, *y), "len {len}: {x} vs {y}");
            if !r.tokens.is_empty() {
                assert!(close(*x, direct_likelihood(&model, &prompt, r.tokens)));
            }
        }
        total += a.tokens_processed;
    }
    // A row whose tokens change (same row id, different response) is re-scored correctly.
    let other = [Response { row: 0, tokens: &[5, 6, 60, 61] }];
    let a = block_on_ready(inc.score(&prompt, &other)).unwrap();
    assert!(close(a.rewards[0], direct_likelihood(&model, &prompt, &[5, 6, 60, 61])));
    // And a different prompt.
    let a = block_on_ready(inc.score(&[1, 2], &other)).unwrap();
    assert!(close(a.rewards[0], direct_likelihood(&model, &[1, 2], &[5, 6, 60, 61])));
    // Prompt once, then about 2 tokens per row per call (the new one and the one before).
    assert!(total < 4 + 3 * 2 * 8, "{total}");
}
