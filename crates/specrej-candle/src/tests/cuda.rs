//! The device paths: their CPU-checkable parts always, and CUDA against the CPU where a
//! CUDA device is present.
//!
//! The CUDA tests are `#[ignore]`d (no CI machine has a GPU), and `cargo xtask test` leaves
//! them so; `scripts/gpu-check.sh` runs them with `--include-ignored` on a GPU machine. Run
//! without a CUDA device (or without the `cuda` feature) they record a skip
//! ([`specrej_core::skipped`]) and pass, unless `SPECREJ_REQUIRE_GPU` names cuda (or is `1`),
//! which makes a missing device a failure.

use candle_core::quantized::GgmlDType;
use candle_core::{Device as CDevice, Tensor};
use specrej_core::sampling::argmax;
use specrej_core::{BackendError, Decoder, Method, Options, block_on_ready};

use super::loading::full_logits;
use super::*;
use crate::model::{KvCache, gather_indexed, greedy_rows};
use crate::{Device, LikelihoodScorer};

const PROMPT: [u32; 9] = [1, 17, 33, 5, 60, 9, 42, 250, 511];

const CUDA_IGNORED: &str =
    "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored";

/// Whether to run a CUDA test: a device is there. Without one the test is a recorded skip
/// ([`specrej_core::skipped`]), or fails when `SPECREJ_REQUIRE_GPU` requires CUDA.
fn cuda_present(test: &str) -> bool {
    match CDevice::new_cuda(0) {
        Ok(_) => true,
        Err(e) => {
            specrej_core::gpu_missing(
                "cuda",
                &format!("{test}: {CUDA_IGNORED}: no CUDA device: {e}"),
            );
            false
        }
    }
}

/// A model wide enough for candle's CUDA quantized kernels to take their real paths
/// (vocabulary 512, hidden 256, grouped-query attention 8/2).
fn mid() -> Tiny {
    Tiny {
        vocab: 512,
        hidden: 256,
        layers: 2,
        heads: 8,
        kv_heads: 2,
        ffn: 512,
        context: 512,
        ..Tiny::default()
    }
}

/// The same GGUF file loaded on the CPU and on CUDA device 0.
fn cpu_and_cuda(
    spec: &Tiny,
    dtype: GgmlDType,
    format: WeightFormat,
) -> (TempDir, Arc<Model>, Arc<Model>) {
    let dir = TempDir::new("cuda");
    let path = dir.path().join("m.gguf");
    spec.write_gguf(&path, dtype);
    let cpu = crate::load_gguf(
        &path,
        // f32 K/V, as on the GPU.
        &LoadOptions { device: Device::Cpu, weights: format, kv: KvFormat::F32 },
    )
    .unwrap();
    let cuda = crate::load_gguf(
        &path,
        &LoadOptions { device: Device::Cuda(0), weights: format, ..Default::default() },
    )
    .unwrap();
    (dir, cpu, cuda)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

// ---------------------------------------------------------------------------------------
// Device code paths, checked on the CPU.

#[test]
fn greedy_rows_is_the_host_argmax_ties_included() {
    let vocab = 7;
    let rows: Vec<Vec<f32>> = vec![
        vec![0.1, 0.5, -2.0, 0.5, 0.0, 0.2, 0.5], // a three-way tie: the lowest index wins
        vec![9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  // the first
        vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0],  // the last
        vec![f32::NEG_INFINITY; 7],               // nothing finite: 0, as the host says
        vec![-5.0, -4.0, -3.5, -3.5, -9.0, f32::NEG_INFINITY, -3.6],
    ];
    let flat: Vec<f32> = rows.concat();
    let t = Tensor::from_vec(flat, (rows.len(), vocab), &CDevice::Cpu).unwrap();
    let expected: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
    assert_eq!(greedy_rows(&t).unwrap(), expected);
    // And on real logits.
    let (_dir, model) = tiny_gguf(&mid(), GgmlDType::F32, WeightFormat::Q8_0);
    let logits = full_logits(&model, &PROMPT); // [t, vocab]
    let v = model.config().vocab_size;
    let t = Tensor::from_slice(&logits, (PROMPT.len(), v), &CDevice::Cpu).unwrap();
    let expected: Vec<u32> = logits.chunks_exact(v).map(argmax).collect();
    assert_eq!(greedy_rows(&t).unwrap(), expected);
}

#[test]
fn gather_indexed_equals_the_row_by_row_gather() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let mut cache = KvCache::new(&model, 4, 12).unwrap();
    let t = model.token_tensor((0..4 * 5).map(|i| (i * 7 % 60) as u32).collect(), 4, 5).unwrap();
    model.forward_hidden(&t, &mut cache).unwrap(); // len 5 of cap 12
    let source = [3usize, 0, 3];
    let index = Tensor::new(&[3u32, 0, 3], &CDevice::Cpu).unwrap();
    for cap in [12, 20, 5] {
        let reference = cache.gather_rows(&model, &source, cap).unwrap(); // the CPU path
        for (l, buf) in cache.k.iter().chain(&cache.v).enumerate() {
            let got = gather_indexed(buf, &index, cache.len, cap, &model).unwrap();
            let want =
                if l < cache.k.len() { &reference.k[l] } else { &reference.v[l - cache.k.len()] };
            assert_eq!(got.dims(), want.dims(), "cap {cap}");
            let used = |x: &Tensor| {
                x.narrow(2, 0, cache.len).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert_eq!(used(&got), used(want), "cap {cap}, buffer {l}");
        }
    }
}

#[test]
fn nll_rows_is_the_host_formula() {
    let (_dir, model) = tiny_gguf(&mid(), GgmlDType::F32, WeightFormat::Q8_0);
    let logits = full_logits(&model, &PROMPT); // [t, vocab]
    let v = model.config().vocab_size;
    let targets: Vec<u32> = PROMPT.iter().map(|&t| (t * 3 + 1) % v as u32).collect();
    let t = Tensor::from_slice(&logits, (PROMPT.len(), v), &CDevice::Cpu).unwrap();
    let got = crate::model::nll_rows(&t, &targets).unwrap();
    for ((row, &target), g) in logits.chunks_exact(v).zip(&targets).zip(got) {
        let want = specrej_core::likelihood::log_sum_exp(row) - row[target as usize];
        assert!((g - want).abs() <= 1e-4 * want.abs().max(1.0), "{g} vs {want}");
    }
}

#[test]
fn auto_budget_on_the_cpu_is_a_share_of_available_memory() {
    let (_dir, model) = tiny_gguf(&Tiny::default(), GgmlDType::F32, WeightFormat::Q8_0);
    let auto = CandleDecoder::auto_budget_bytes(&model).unwrap();
    match crate::host_available_memory() {
        Some(available) => {
            assert!(available > 0);
            let want = (available as f64 * crate::AUTO_BUDGET_RAM_FRACTION) as usize;
            // Memory moves while the test runs: within 5% of a fresh reading.
            assert!(auto.abs_diff(want) <= want / 20, "{auto} vs {want}");
        }
        None => assert_eq!(auto, crate::DEFAULT_KV_BUDGET_BYTES),
    }
}

#[test]
fn cuda_oom_messages_are_recognised() {
    use crate::model::is_oom;
    let msg = |m: &str| candle_core::Error::Msg(m.into());
    assert!(is_oom(&msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")));
    assert!(is_oom(&msg("cublas error: CUBLAS_STATUS_ALLOC_FAILED")));
    assert!(!is_oom(&msg("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")")));
}

// ---------------------------------------------------------------------------------------
// CUDA against the CPU.

/// Full-sequence logits on CUDA agree with the CPU's, per weight format.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_logits_match_cpu() {
    if !cuda_present("cuda_logits_match_cpu") {
        return;
    }
    // (file type, format, relative tolerance): quantized activations round differently
    // on the two devices (q8_1 blocks on CUDA, q8_0 on the CPU); f32 only reorders sums.
    let cases = [
        (GgmlDType::F32, WeightFormat::F32, 1e-3f32),
        (GgmlDType::F32, WeightFormat::Q8_0, 3e-2),
        (GgmlDType::Q8_0, WeightFormat::Native, 3e-2),
        (GgmlDType::Q4_1, WeightFormat::Native, 3e-2),
    ];
    for (dtype, format, tolerance) in cases {
        for spec in
            [Tiny::default(), mid(), Tiny { arch: Architecture::Qwen2, tied: true, ..mid() }]
        {
            let (_dir, cpu, cuda) = cpu_and_cuda(&spec, dtype, format);
            let tokens: Vec<u32> = PROMPT.iter().map(|&t| t % spec.vocab as u32).collect();
            let a = full_logits(&cpu, &tokens);
            let b = full_logits(&cuda, &tokens);
            let diff = max_abs_diff(&a, &b);
            let scale = max_abs(&a).max(1.0);
            eprintln!(
                "cuda_logits_match_cpu {dtype:?}/{format:?} vocab {}: max |Δ| {diff:.3e} (scale {scale:.2})",
                spec.vocab
            );
            assert!(
                diff <= tolerance * scale,
                "{dtype:?}/{format:?}: logits differ by {diff} (scale {scale})"
            );
        }
    }
}

/// Greedy decoding on CUDA (argmax on the device) gives the CPU's tokens, and the device
/// argmax equals the host argmax of the very same logits.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_greedy_tokens_match_cpu() {
    if !cuda_present("cuda_greedy_tokens_match_cpu") {
        return;
    }
    let (_dir, cpu, cuda) = cpu_and_cuda(&mid(), GgmlDType::F32, WeightFormat::F32);
    let s = sampling(0.0);
    let tokens = |model: &Arc<Model>| -> Vec<Vec<u32>> {
        let mut dec = CandleDecoder::new(model.clone(), 1 << 28);
        let mut batch = dec.prefill(&PROMPT, 0..5, &s).unwrap();
        (0..24).map(|_| block_on_ready(dec.step(&mut batch)).unwrap()).collect()
    };
    assert_eq!(tokens(&cuda), tokens(&cpu));

    let logits = {
        let mut cache = KvCache::new(&cuda, 1, PROMPT.len()).unwrap();
        let t = cuda.token_tensor(PROMPT.to_vec(), 1, PROMPT.len()).unwrap();
        let hidden = cuda.forward_hidden(&t, &mut cache).unwrap();
        cuda.logits(&hidden.squeeze(0).unwrap()).unwrap() // [t, vocab] on the device
    };
    let host = crate::model::to_host_rows(&logits).unwrap();
    let expected: Vec<u32> = host.chunks_exact(cuda.config().vocab_size).map(argmax).collect();
    assert_eq!(greedy_rows(&logits).unwrap(), expected);
}

/// Sampled rows on CUDA: retain keeps exactly the chosen rows (each continues as it would
/// have in the full batch), and the tokens are the CPU's.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_retain_keeps_the_chosen_rows() {
    if !cuda_present("cuda_retain_keeps_the_chosen_rows") {
        return;
    }
    let (_dir, cpu, cuda) = cpu_and_cuda(&mid(), GgmlDType::F32, WeightFormat::F32);
    let s = sampling(1.0);
    let keep = [1usize, 4, 5];
    // Rows 0..6 for 6 steps, then (optionally) only `keep` for 10 more.
    let run = |model: &Arc<Model>, retain: bool| -> Vec<Vec<u32>> {
        let mut dec = CandleDecoder::new(model.clone(), 1 << 28);
        let mut batch = dec.prefill(&PROMPT, 0..6, &s).unwrap();
        let mut per_row = vec![Vec::new(); 6];
        for step in 0..16 {
            if step == 6 && retain {
                dec.retain(&mut batch, &keep).unwrap();
                assert_eq!(batch.row_ids(), &[1, 4, 5]);
            }
            let tokens = block_on_ready(dec.step(&mut batch)).unwrap();
            let ids = batch.row_ids().to_vec();
            for (t, id) in tokens.into_iter().zip(ids) {
                per_row[id as usize].push(t);
            }
        }
        per_row
    };
    let full = run(&cuda, false);
    let kept = run(&cuda, true);
    for &k in &keep {
        assert_eq!(kept[k], full[k], "row {k} after retain");
    }
    assert_eq!(full, run(&cpu, false), "CUDA tokens differ from the CPU's");
}

/// A whole Speculative Rejection run (and Best-of-N) with the likelihood reward on CUDA:
/// it decides, and picks the CPU's winner.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_speculative_rejection_runs() {
    if !cuda_present("cuda_speculative_rejection_runs") {
        return;
    }
    let (_dir, cpu, cuda) = cpu_and_cuda(&mid(), GgmlDType::F32, WeightFormat::F32);
    let per_token = cuda.kv_bytes_per_token();
    let run = |model: &Arc<Model>, method: Method| {
        // Room for 16 rows × (prompt + 8 tokens): Speculative Rejection must decide.
        let mut dec = CandleDecoder::new(model.clone(), 16 * (PROMPT.len() + 8) * per_token);
        let mut scorer = LikelihoodScorer::new(model.clone());
        let options = Options {
            method,
            n: 16,
            max_new_tokens: 32,
            min_new_tokens: 8,
            eos: vec![2],
            sampling: Sampling { seed: 3, temperature: 1.0, top_k: 50, top_p: 0.95 },
            rules: specrej_core::Rules::default(),
        };
        block_on_ready(specrej_core::generate(
            &mut dec,
            &mut scorer,
            &PROMPT,
            &options,
            &mut |_| {},
        ))
        .unwrap()
    };
    let sr = run(&cuda, Method::SpeculativeRejection { alpha: 0.5 });
    assert!(!sr.trace.is_empty(), "no decision was made");
    assert!(!sr.candidates.is_empty());
    let on_cpu = run(&cpu, Method::SpeculativeRejection { alpha: 0.5 });
    assert_eq!(sr.winner().tokens, on_cpu.winner().tokens, "CUDA and CPU pick different winners");
    let bon = run(&cuda, Method::BestOfN);
    assert_eq!(bon.candidates.len(), 16);
}

/// The likelihood reward on CUDA (NLLs computed on the device), batched and incremental,
/// agrees with the CPU's.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_likelihood_matches_cpu() {
    use specrej_core::{Response, Scorer};
    if !cuda_present("cuda_likelihood_matches_cpu") {
        return;
    }
    let (_dir, cpu, cuda) = cpu_and_cuda(&mid(), GgmlDType::F32, WeightFormat::F32);
    let a: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 512).collect();
    let b: Vec<u32> = (0..25).map(|i| (i * 91 + 5) % 512).collect();
    let responses = [
        Response { row: 0, tokens: &a },
        Response { row: 1, tokens: &b },
        Response { row: 2, tokens: &a[..1] },
        Response { row: 3, tokens: &[] },
    ];
    let score = |model: &Arc<Model>, incremental: bool| {
        let mut scorer = LikelihoodScorer::new(model.clone());
        if incremental {
            scorer = scorer.incremental();
        }
        block_on_ready(scorer.score(&PROMPT, &responses)).unwrap().rewards
    };
    for incremental in [false, true] {
        let (x, y) = (score(&cpu, incremental), score(&cuda, incremental));
        eprintln!("cuda_likelihood_matches_cpu (incremental {incremental}): cpu {x:?} cuda {y:?}");
        for (p, q) in x.iter().zip(&y) {
            assert!(
                (p - q).abs() <= 1e-3 * p.abs().max(1.0),
                "incremental {incremental}: {p} vs {q}"
            );
        }
    }
}

/// Running out of device memory is `BackendError::OutOfMemory`, never a panic; the auto
/// budget comes from the device's free memory.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn cuda_out_of_memory_is_reported() {
    if !cuda_present("cuda_out_of_memory_is_reported") {
        return;
    }
    let (_dir, _cpu, cuda) = cpu_and_cuda(&mid(), GgmlDType::F32, WeightFormat::Q8_0);
    let (free, total) = crate::model::device_memory(&cuda.device).unwrap().unwrap();
    assert!(0 < free && free <= total, "free {free} of {total}");
    let auto = CandleDecoder::auto_budget_bytes(&cuda).unwrap();
    assert!(auto > 0 && auto < free, "auto budget {auto} of {free} free");
    // A budget far beyond the device: the allocation itself fails.
    let rows =
        u32::try_from(4 * total / (PROMPT.len() * cuda.kv_bytes_per_token())).unwrap_or(u32::MAX);
    let mut dec = CandleDecoder::new(cuda.clone(), usize::MAX / 2);
    match dec.prefill(&PROMPT, 0..rows, &sampling(0.0)) {
        Err(BackendError::OutOfMemory) => {}
        other => panic!("expected OutOfMemory for {rows} rows, got {:?}", other.map(|b| b.rows())),
    }
    // The device is still usable.
    let mut dec = CandleDecoder::new(cuda.clone(), 1 << 26);
    let mut batch = dec.prefill(&PROMPT, 0..2, &sampling(0.0)).unwrap();
    block_on_ready(dec.step(&mut batch)).unwrap();
    block_on_ready(dec.step(&mut batch)).unwrap();
}
