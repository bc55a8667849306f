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

fn assert_rows_independent_n(
    model: &Arc<Model>,
    rows: u32,
    temperature: f32,
    steps: usize,
    tolerance: f32,
) {
    let s = sampling(temperature);
    let vocab = model.config().vocab_size;
    let batch = trace(model, &PROMPT, 0..rows, &s, steps);
    for row in 0..rows {
        let alone = trace(model, &PROMPT, row..row + 1, &s, steps);
        for step in 0..steps {
            let r = row as usize;
            assert_eq!(
                batch.tokens[step][r], alone.tokens[step][0],
                "row {row}, step {step}: token"
            );
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
fn rows_are_independent_f32_bit_for_bit() {
    let (_dir, model) = tiny_safetensors(&Tiny::default(), WeightFormat::F32);
    assert_rows_independent(&model, 1.0, 20, 0.0);
    assert_rows_independent_n(&model, 19, 1.0, 4, 0.0);
}

#[test]
fn sampled_rows_differ_and_greedy_rows_agree() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let sampled = trace(&model, &PROMPT, 0..4, &sampling(1.0), 12);
    let columns: Vec<Vec<u32>> =
        (0..4).map(|r| sampled.tokens.iter().map(|t| t[r]).collect()).collect();
    assert!(
        columns.windows(2).any(|w| w[0] != w[1]),
        "temperature 1 rows should diverge: {columns:?}"
    );
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
fn retain_and_fork_reject_bad_indices() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let mut dec = CandleDecoder::new(model, 1 << 30);
    let mut batch = dec.prefill(&PROMPT, 0..4, &sampling(1.0)).unwrap();
    let err = dec.retain(&mut batch, &[2, 1]).unwrap_err();
    assert!(err.to_string().contains("strictly ascending"), "{err}");
    let err = dec.retain(&mut batch, &[1, 4]).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    let err = dec.fork(&mut batch, &[(4, 9)]).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    // Nothing changed.
    assert_eq!(batch.row_ids(), &[0, 1, 2, 3]);
}

/// A forked row shares its parent's past (and blocks) and samples its own future: its
/// logits are those of the model after the parent's text, its tokens its own id's draws.
#[test]
fn forked_rows_share_the_past_and_sample_their_own_future() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let mut dec = CandleDecoder::new(model.clone(), 1 << 30);
    let s = sampling(1.0);
    let mut batch = dec.prefill(&PROMPT, 0..2, &s).unwrap();
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); 2];
    for _ in 0..20 {
        for (r, t) in block_on_ready(dec.step(&mut batch)).unwrap().into_iter().enumerate() {
            rows[r].push(t);
        }
    }
    let held = dec.kv_bytes_held().0;
    dec.fork(&mut batch, &[(1, 7), (1, 8)]).unwrap();
    assert_eq!(dec.kv_bytes_held().0, held, "a fork shares its parent's blocks");
    assert_eq!(batch.row_ids(), &[0, 1, 7, 8]);
    rows.push(rows[1].clone());
    rows.push(rows[1].clone());
    let vocab = model.config().vocab_size;
    let mut logits = Vec::new();
    for _ in 0..10 {
        logits.push(dec.peek_logits(&batch).unwrap());
        for (r, t) in block_on_ready(dec.step(&mut batch)).unwrap().into_iter().enumerate() {
            rows[r].push(t);
        }
    }
    assert_ne!(rows[2][20..], rows[1][20..], "the children sample with their own noise");
    assert_ne!(rows[2][20..], rows[3][20..]);
    for k in 0..10 {
        // Child 7 (row index 2) after the parent's 20 tokens and its own k: the model's next-token
        // logits for that text, computed afresh by a prefill, and id 7's draw from them.
        let text = [&PROMPT[..], &rows[2][..20 + k]].concat();
        let mut fresh = CandleDecoder::new(model.clone(), 1 << 30);
        let single = fresh.prefill(&text, 7..8, &s).unwrap();
        let want = fresh.peek_logits(&single).unwrap();
        assert_eq!(
            &logits[k][2 * vocab..3 * vocab],
            &want[..],
            "step {k}: a prefill and the decode agree bit for bit"
        );
        let token = specrej_core::sampling::sample(&want, &s, 7, (20 + k) as u32);
        assert_eq!(rows[2][20 + k], token, "step {k}");
    }
}

#[test]
fn capacity_and_out_of_memory() {
    let spec = Tiny::default();
    let (_dir, model) = tiny_gguf(&spec, GgmlDType::F32, WeightFormat::Q8_0);
    let per_token = 2 * spec.layers * spec.kv_heads * spec.head_dim() * 2; // f16 K/V
    // Five blocks of 16 positions: the prompt's, and one per row for 4 rows.
    let mut dec = CandleDecoder::new(model.clone(), per_token * 16 * 5);
    assert_eq!(dec.kv_bytes_per_token(), per_token);
    assert_eq!(dec.token_capacity(), 80);
    assert_eq!(dec.kv_layout(), specrej_core::KvLayout { shared_prompt: true, block: 16 });
    assert_eq!(dec.max_sequence_len(), spec.context);
    assert_eq!(dec.vocab_size(), spec.vocab);
    assert_eq!(dec.eos_token_ids(), &[2]);
    assert_eq!(dec.bos_token_id(), Some(1));
    // Six rows: the prompt is held once, so prefill fits; the first step that caches a token
    // per row does not.
    let mut six = dec.prefill(&PROMPT, 0..6, &sampling(1.0)).unwrap();
    block_on_ready(dec.step(&mut six)).unwrap();
    assert_eq!(block_on_ready(dec.step(&mut six)).unwrap_err(), BackendError::OutOfMemory);
    drop(six);
    assert_eq!(dec.kv_bytes_held().0, 0, "a dropped batch gives its blocks back");
    let mut batch = dec.prefill(&PROMPT, 0..4, &sampling(1.0)).unwrap();
    // 17 steps fit: the first caches nothing, the next 16 one position per row each.
    for _ in 0..17 {
        block_on_ready(dec.step(&mut batch)).unwrap();
    }
    assert_eq!(batch.cached_len(), PROMPT.len() + 16);
    assert_eq!(dec.kv_bytes_held().0 as usize, per_token * 16 * 5);
    assert_eq!(block_on_ready(dec.step(&mut batch)).unwrap_err(), BackendError::OutOfMemory);
    // The scheduler's response: drop rows and retry; the batch is still consistent.
    dec.retain(&mut batch, &[0, 3]).unwrap();
    assert_eq!(dec.kv_bytes_held().0 as usize, per_token * 16 * 3, "retain frees in place");
    let after = block_on_ready(dec.step(&mut batch)).unwrap();
    let alone = trace(&model, &PROMPT, 3..4, &sampling(1.0), 18);
    assert_eq!(after[1], alone.tokens[17][0]);
    assert_eq!(dec.kv_bytes_held().1 as usize, per_token * 16 * 5, "the peak");

    // A prompt filling the budget exactly fits; the first step needs no room, the second does.
    let mut exact = CandleDecoder::new(model, per_token * 16);
    let mut batch = exact.prefill(&PROMPT, 0..4, &sampling(1.0)).unwrap();
    block_on_ready(exact.step(&mut batch)).unwrap();
    assert_eq!(block_on_ready(exact.step(&mut batch)).unwrap_err(), BackendError::OutOfMemory);
}

#[test]
fn bad_tokens_and_context_are_errors() {
    let spec = Tiny { context: 12, ..Tiny::default() };
    let (_dir, model) = tiny_gguf(&spec, GgmlDType::F32, WeightFormat::Q8_0);
    let mut dec = CandleDecoder::new(model, 1 << 30);
    assert!(
        matches!(dec.prefill(&[1, 64], 0..1, &sampling(0.0)), Err(BackendError::Device(m)) if m.contains("64"))
    );
    assert!(
        matches!(dec.prefill(&[1; 13], 0..1, &sampling(0.0)), Err(BackendError::Device(m)) if m.contains("context"))
    );
    let mut batch = dec.prefill(&PROMPT, 0..2, &sampling(0.0)).unwrap();
    for _ in 0..6 {
        block_on_ready(dec.step(&mut batch)).unwrap();
    }
    assert_eq!(batch.cached_len(), 12);
    assert!(
        matches!(block_on_ready(dec.step(&mut batch)), Err(BackendError::Device(m)) if m.contains("context"))
    );
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
