//! Decoder semantics: row independence, retain, budgets.

use candle_core::quantized::GgmlDType;
use specrej_core::{BackendError, Decoder, block_on_ready};

use super::*;

const PROMPT: [u32; 7] = [1, 17, 33, 5, 60, 9, 42];

/// Row `i` of a batch of 4 equals the batch-1 run of row id `i`, for `steps` steps.
/// `tolerance` 0 means bit-exact logits.
fn assert_rows_independent(model: &Arc<Model>, temperature: f32, steps: usize, tolerance: f32) {
    assert_rows_independent_n(model, 4, temperature, steps, tolerance);
}

fn assert_rows_independent_n(model: &Arc<Model>, rows: u32, temperature: f32, steps: usize, tolerance: f32) {
    let s = sampling(temperature);
    let vocab = model.config().vocab_size;
    let batch = trace(model, &PROMPT, 0..rows, &s, steps);
    for row in 0..rows {
        let alone = trace(model, &PROMPT, row..row + 1, &s, steps);
        for step in 0..steps {
            let r = row as usize;
            assert_eq!(batch.tokens[step][r], alone.tokens[step][0], "row {row}, step {step}: token");
            let in_batch = &batch.logits[step][r * vocab..(r + 1) * vocab];
            let diff = max_abs_diff(in_batch, &alone.logits[step]);
            assert!(diff <= tolerance, "row {row}, step {step}: logits differ by {diff}");
        }
    }
}

#[test]
fn rows_are_independent_q8_0_greedy_and_sampled() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    assert_rows_independent(&model, 0.0, 20, 0.0);
    assert_rows_independent(&model, 1.0, 20, 0.0);
    // Odd batch sizes straddle the kernels' 4-row tiles.
    assert_rows_independent_n(&model, 7, 1.0, 6, 0.0);
    // Width a multiple of 256: the tiled kernel without padding.
    let wide = Tiny { hidden: 256, ffn: 256, ..Tiny::default() };
    let (_dir, model) = tiny_gguf(&wide, GgmlDType::F32, WeightFormat::Q8_0);
    assert_rows_independent_n(&model, 6, 1.0, 8, 0.0);
}

#[test]
fn rows_are_independent_native_q4_1() {
    let spec = Tiny { hidden: 64, ffn: 128, ..Tiny::default() };
    let (_dir, model) = tiny_gguf(&spec, GgmlDType::Q4_1, WeightFormat::Native);
    assert_rows_independent(&model, 1.0, 20, 0.0);
}

#[test]
fn rows_are_independent_f32_within_tolerance() {
    let (_dir, model) = tiny_safetensors(&Tiny::default(), WeightFormat::F32);
    assert_rows_independent(&model, 1.0, 20, 1e-4);
}

#[test]
fn sampled_rows_differ_and_greedy_rows_agree() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let sampled = trace(&model, &PROMPT, 0..4, &sampling(1.0), 12);
    let columns: Vec<Vec<u32>> = (0..4).map(|r| sampled.tokens.iter().map(|t| t[r]).collect()).collect();
    assert!(columns.windows(2).any(|w| w[0] != w[1]), "temperature 1 rows should diverge: {columns:?}");
    let greedy = trace(&model, &PROMPT, 0..3, &sampling(0.0), 12);
    assert!(greedy.tokens.iter().all(|t| t[0] == t[1] && t[1] == t[2]));
}

/// Each kept row continues exactly as its batch-1 run does.
#[test]
fn retain_keeps_exactly_the_chosen_rows() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let s = sampling(1.0);
    let mut dec = CandleDecoder::new(model.clone(), 1 << 30);
    let mut batch = dec.prefill(&PROMPT, 0..6, &s).unwrap();
    let mut per_row: Vec<Vec<u32>> = vec![Vec::new(); 6];
    for _ in 0..5 {
        let tokens = block_on_ready(dec.step(&mut batch)).unwrap();
        for (r, t) in tokens.into_iter().enumerate() {
            per_row[r].push(t);
        }
    }
    let keep = [1usize, 3, 4];
    dec.retain(&mut batch, &keep).unwrap();
    assert_eq!(batch.row_ids(), &[1, 3, 4]);
    let mut kept: Vec<Vec<u32>> = keep.iter().map(|&k| per_row[k].clone()).collect();
    for _ in 0..10 {
        let tokens = block_on_ready(dec.step(&mut batch)).unwrap();
        assert_eq!(tokens.len(), 3);
        for (r, t) in tokens.into_iter().enumerate() {
            kept[r].push(t);
        }
    }
    for (i, &k) in keep.iter().enumerate() {
        let alone = trace(&model, &PROMPT, k as u32..k as u32 + 1, &s, 15);
        let alone: Vec<u32> = alone.tokens.iter().map(|t| t[0]).collect();
        assert_eq!(kept[i], alone, "row {k}");
    }
    // A second retain down to one row, then to none.
    dec.retain(&mut batch, &[2]).unwrap();
    assert_eq!(batch.row_ids(), &[4]);
    let next = block_on_ready(dec.step(&mut batch)).unwrap();
    let alone = trace(&model, &PROMPT, 4..5, &s, 16);
    assert_eq!(next[0], alone.tokens[15][0]);
    dec.retain(&mut batch, &[]).unwrap();
    assert_eq!(block_on_ready(dec.step(&mut batch)).unwrap(), Vec::<u32>::new());
}

#[test]
fn retain_right_after_prefill_and_row_ids_offset() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let s = sampling(1.0);
    let mut dec = CandleDecoder::new(model.clone(), 1 << 30);
    let mut batch = dec.prefill(&PROMPT, 10..14, &s).unwrap();
    dec.retain(&mut batch, &[0, 2]).unwrap();
    assert_eq!(batch.row_ids(), &[10, 12]);
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(block_on_ready(dec.step(&mut batch)).unwrap());
    }
    for (i, id) in [10u32, 12].into_iter().enumerate() {
        let alone = trace(&model, &PROMPT, id..id + 1, &s, 6);
        let a: Vec<u32> = alone.tokens.iter().map(|t| t[0]).collect();
        let b: Vec<u32> = got.iter().map(|t| t[i]).collect();
        assert_eq!(a, b, "row id {id}");
    }
}

#[test]
#[should_panic(expected = "strictly ascending")]
fn retain_rejects_unsorted_indices() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let mut dec = CandleDecoder::new(model, 1 << 30);
    let mut batch = dec.prefill(&PROMPT, 0..4, &sampling(1.0)).unwrap();
    let _ = dec.retain(&mut batch, &[2, 1]);
}

#[test]
#[should_panic(expected = "out of range")]
fn retain_rejects_out_of_range() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let mut dec = CandleDecoder::new(model, 1 << 30);
    let mut batch = dec.prefill(&PROMPT, 0..4, &sampling(1.0)).unwrap();
    let _ = dec.retain(&mut batch, &[1, 4]);
}

#[test]
fn capacity_and_out_of_memory() {
    let spec = Tiny::default();
    let (_dir, model) = tiny_gguf(&spec, GgmlDType::F32, WeightFormat::Q8_0);
    let per_token = 2 * spec.layers * spec.kv_heads * spec.head_dim() * 4;
    // Room for 4 rows × 10 positions.
    let mut dec = CandleDecoder::new(model.clone(), per_token * 40);
    assert_eq!(dec.kv_bytes_per_token(), per_token);
    assert_eq!(dec.token_capacity(), 40);
    assert_eq!(dec.max_sequence_len(), spec.context);
    assert_eq!(dec.vocab_size(), spec.vocab);
    assert_eq!(dec.eos_token_ids(), &[2]);
    assert_eq!(dec.bos_token_id(), Some(1));
    assert_eq!(dec.prefill(&PROMPT, 0..6, &sampling(1.0)).unwrap_err(), BackendError::OutOfMemory);
    let mut batch = dec.prefill(&PROMPT, 0..4, &sampling(1.0)).unwrap();
    // Steps 1..=3 fit (cache 7, 8, 9, 10); the step that needs 11 positions does not.
    for _ in 0..4 {
        block_on_ready(dec.step(&mut batch)).unwrap();
    }
    assert_eq!(batch.cached_len(), 10);
    assert_eq!(block_on_ready(dec.step(&mut batch)).unwrap_err(), BackendError::OutOfMemory);
    // The scheduler's response: drop rows and retry; the batch is still consistent.
    dec.retain(&mut batch, &[0, 3]).unwrap();
    let after = block_on_ready(dec.step(&mut batch)).unwrap();
    let alone = trace(&model, &PROMPT, 3..4, &sampling(1.0), 5);
    assert_eq!(after[1], alone.tokens[4][0]);

    // A prompt filling the budget exactly fits; the first step needs no room, the second does.
    let mut exact = CandleDecoder::new(model, per_token * 4 * PROMPT.len());
    let mut batch = exact.prefill(&PROMPT, 0..4, &sampling(1.0)).unwrap();
    block_on_ready(exact.step(&mut batch)).unwrap();
    assert_eq!(block_on_ready(exact.step(&mut batch)).unwrap_err(), BackendError::OutOfMemory);
}

#[test]
fn bad_tokens_and_context_are_errors() {
    let spec = Tiny { context: 12, ..Tiny::default() };
    let (_dir, model) = tiny_gguf(&spec, GgmlDType::F32, WeightFormat::Q8_0);
    let mut dec = CandleDecoder::new(model, 1 << 30);
    assert!(matches!(dec.prefill(&[1, 64], 0..1, &sampling(0.0)), Err(BackendError::Device(m)) if m.contains("64")));
    assert!(matches!(dec.prefill(&[1; 13], 0..1, &sampling(0.0)), Err(BackendError::Device(m)) if m.contains("context")));
    let mut batch = dec.prefill(&PROMPT, 0..2, &sampling(0.0)).unwrap();
    for _ in 0..6 {
        block_on_ready(dec.step(&mut batch)).unwrap();
    }
    assert_eq!(batch.cached_len(), 12);
    assert!(matches!(block_on_ready(dec.step(&mut batch)), Err(BackendError::Device(m)) if m.contains("context")));
}

#[test]
fn qwen2_and_tied_models_decode() {
    for spec in [
        Tiny { arch: Architecture::Qwen2, ..Tiny::default() },
        Tiny { tied: true, ..Tiny::default() },
        Tiny { arch: Architecture::Mistral, kv_heads: 4, ..Tiny::default() },
    ] {
        let (_dir, model) = tiny_gguf(&spec, GgmlDType::Q8_0, WeightFormat::Native);
        assert_eq!(model.config().tied_embeddings, spec.tied);
        assert_rows_independent(&model, 1.0, 8, 0.0);
    }
}
