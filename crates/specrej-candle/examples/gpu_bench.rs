//! Random models of a real model's shape, and the GPU benchmark run by `scripts/gpu-check.sh`.
//!
//! ```text
//! gpu_bench write-model --shape smollm2-135m|llama3-8b --out M.gguf [--tokenizer T.gguf] [--seed N]
//! gpu_bench decode  --model M.gguf [--device cuda|cpu] [--weights q8_0|native|f32] [--rows 1,64,256]
//!                   [--steps 32] [--prompt 64] [--temperature 0] [--copy-mib 2048]
//! gpu_bench methods --model M.gguf [--device cuda|cpu] [--weights q8_0|native|f32] [--n 64] [--max-new 128]
//!                   [--alpha 0.5] [--prompt 64]
//! gpu_bench bandwidth [--device cuda|cpu] [--copy-mib 2048]
//! ```
//!
//! `write-model` writes a GGUF with random Q8_0 weights (norms f32), so a model of realistic
//! size can be made where nothing can be downloaded (the GPU machine); with `--tokenizer`
//! it copies every `tokenizer.*` entry of that GGUF, so the `specrej` CLI can run on the
//! result. Its text is noise, its speed is the real model's. `decode` measures batched
//! decode throughput; `methods` times Best-of-N against Speculative Rejection (likelihood
//! reward) on one random prompt. Both print one JSON object per measurement.
//!
//! `bandwidth` times a device-to-device copy of a `--copy-mib` buffer (the best of five,
//! bytes read plus bytes written over the seconds). `decode` measures the same first (unless
//! `--copy-mib 0`) and puts each row count's memory-bandwidth bound beside its throughput:
//! the bytes one step must move (every weight matrix once as `--weights` holds it, each row's
//! K/V read over its cached positions, the logits written and read once) over that copy
//! bandwidth. The bound ignores activations, kernel launches and the host: a ceiling, not a
//! prediction.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use specrej_candle::{
    CandleDecoder, Device, LikelihoodScorer, LoadOptions, Model, WeightFormat, load_gguf,
};
use specrej_core::{Decoder, Method, Options, Sampling, block_on_ready};

/// The hyper-parameters of a Llama-family model.
#[derive(Clone, Copy, Debug)]
struct Shape {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    context: usize,
    rope_theta: f32,
    tied: bool,
}

impl Shape {
    fn named(name: &str) -> Result<Self> {
        Ok(match name {
            // HuggingFaceTB/SmolLM2-135M-Instruct (the project's default model).
            "smollm2-135m" => Shape {
                vocab: 49152,
                hidden: 576,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                ffn: 1536,
                context: 8192,
                rope_theta: 100_000.0,
                tied: true,
            },
            // meta-llama/Meta-Llama-3-8B.
            "llama3-8b" => Shape {
                vocab: 128_256,
                hidden: 4096,
                layers: 32,
                heads: 32,
                kv_heads: 8,
                ffn: 14_336,
                context: 8192,
                rope_theta: 500_000.0,
                tied: false,
            },
            other => bail!("unknown shape {other:?} (smollm2-135m, llama3-8b)"),
        })
    }
}

/// xorshift64*: fast, deterministic bytes for weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A `[rows, cols]` Q8_0 tensor of uniform random weights with standard deviation about
/// `std` (quants uniform over the i8 range, one f16 scale per 32 weights).
fn random_q8_0(rng: &mut Rng, rows: usize, cols: usize, std: f32) -> Result<QTensor> {
    const BLOCK: usize = 32;
    if !cols.is_multiple_of(BLOCK) {
        bail!("Q8_0 needs widths that are multiples of {BLOCK}, got {cols}");
    }
    let blocks = rows * cols / BLOCK;
    // A uniform integer in −127..=127 has standard deviation ≈ 73.3.
    let scale = half::f16::from_f32(std / 73.3).to_le_bytes();
    let mut bytes = Vec::with_capacity(blocks * (2 + BLOCK)); // [blocks, 34]: f16 scale, 32 i8
    for _ in 0..blocks {
        bytes.extend_from_slice(&scale);
        for _ in 0..BLOCK / 8 {
            // i8 in −127..=127 (−128 folded onto −127: a negligible bias for a benchmark).
            bytes.extend(rng.next().to_le_bytes().map(|b| (b as i8).max(-127) as u8));
        }
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        GgmlDType::Q8_0,
        &bytes,
        vec![rows, cols],
        &candle_core::Device::Cpu,
    )?)
}

/// A `[n]` f32 tensor near 1 (a norm's weight).
fn norm(rng: &mut Rng, n: usize) -> Result<QTensor> {
    let data: Vec<f32> =
        (0..n).map(|_| 0.9 + 0.2 * (rng.next() >> 40) as f32 / (1u64 << 24) as f32).collect();
    Ok(QTensor::quantize(&Tensor::from_vec(data, n, &candle_core::Device::Cpu)?, GgmlDType::F32)?)
}

fn write_model(shape: Shape, out: &Path, tokenizer: Option<&Path>, seed: u64) -> Result<()> {
    let arch = "llama";
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("random weights (specrej gpu_bench)".into())),
        (format!("{arch}.block_count"), Value::U32(shape.layers as u32)),
        (format!("{arch}.embedding_length"), Value::U32(shape.hidden as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(shape.heads as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(shape.kv_heads as u32)),
        (format!("{arch}.rope.freq_base"), Value::F32(shape.rope_theta)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{arch}.context_length"), Value::U32(shape.context as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(shape.ffn as u32)),
    ];
    if let Some(path) = tokenizer {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut entries: Vec<(String, Value)> =
            content.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((_, Value::Array(tokens))) =
            entries.iter().find(|(k, _)| k == "tokenizer.ggml.tokens")
            && tokens.len() != shape.vocab
        {
            bail!(
                "{}: {} tokens, but the shape's vocabulary is {}",
                path.display(),
                tokens.len(),
                shape.vocab
            );
        }
        metadata.extend(entries);
    } else {
        metadata.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(1)));
        metadata.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(2)));
    }

    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (h, hd) = (shape.hidden, shape.hidden / shape.heads);
    let lin = |rng: &mut Rng, out: usize, inp: usize| {
        random_q8_0(rng, out, inp, 1.0 / (inp as f32).sqrt())
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    tensors.push(("token_embd.weight".into(), random_q8_0(&mut rng, shape.vocab, h, 1.0)?));
    tensors.push(("output_norm.weight".into(), norm(&mut rng, h)?));
    if !shape.tied {
        tensors.push(("output.weight".into(), lin(&mut rng, shape.vocab, h)?));
    }
    for i in 0..shape.layers {
        let p = format!("blk.{i}.");
        tensors.push((format!("{p}attn_norm.weight"), norm(&mut rng, h)?));
        tensors.push((format!("{p}attn_q.weight"), lin(&mut rng, shape.heads * hd, h)?));
        tensors.push((format!("{p}attn_k.weight"), lin(&mut rng, shape.kv_heads * hd, h)?));
        tensors.push((format!("{p}attn_v.weight"), lin(&mut rng, shape.kv_heads * hd, h)?));
        tensors.push((format!("{p}attn_output.weight"), lin(&mut rng, h, shape.heads * hd)?));
        tensors.push((format!("{p}ffn_norm.weight"), norm(&mut rng, h)?));
        tensors.push((format!("{p}ffn_gate.weight"), lin(&mut rng, shape.ffn, h)?));
        tensors.push((format!("{p}ffn_up.weight"), lin(&mut rng, shape.ffn, h)?));
        tensors.push((format!("{p}ffn_down.weight"), lin(&mut rng, h, shape.ffn)?));
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let partial = out.with_extension("partial");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?,
    );
    gguf_file::write(&mut file, &md, &ts)?;
    drop(file);
    std::fs::rename(&partial, out)?;
    Ok(())
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn arg_or<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    match arg(args, name) {
        Some(v) => v.parse().map_err(|_| anyhow::anyhow!("{name}: cannot parse {v:?}")),
        None => Ok(default),
    }
}

fn device(args: &[String]) -> Result<Device> {
    match arg(args, "--device").as_deref() {
        None | Some("cuda") => Ok(Device::Cuda(0)),
        Some("cpu") => Ok(Device::Cpu),
        Some(other) => bail!("--device {other}: expected cuda or cpu"),
    }
}

fn weights(args: &[String]) -> Result<WeightFormat> {
    match arg(args, "--weights").as_deref() {
        None | Some("q8_0") => Ok(WeightFormat::Q8_0),
        Some("native") => Ok(WeightFormat::Native),
        Some("f32") => Ok(WeightFormat::F32),
        Some(other) => bail!("--weights {other}: expected q8_0, native or f32"),
    }
}

fn weights_name(format: WeightFormat) -> &'static str {
    match format {
        WeightFormat::Native => "native",
        WeightFormat::Q8_0 => "q8_0",
        WeightFormat::F32 => "f32",
    }
}

fn load(args: &[String]) -> Result<(PathBuf, Arc<Model>, f64)> {
    let path = PathBuf::from(arg(args, "--model").context("--model is required")?);
    let start = Instant::now();
    let model = load_gguf(
        &path,
        &LoadOptions { device: device(args)?, weights: weights(args)?, ..Default::default() },
    )?;
    Ok((path, model, start.elapsed().as_secs_f64()))
}

/// Bytes of weights one decode step reads: every matrix of the GGUF file (the trunk's and the
/// output head; the embedding table only where it is the tied head, since a step looks up one
/// row of it per sequence) once, as `format` holds it (the file's own block type for
/// `native`, 34 bytes per 32 weights for Q8_0, 4 bytes a weight for f32), vectors (norms,
/// biases) as f32. Computed from the file's tensor table; row padding is not counted.
fn weight_bytes_per_step(path: &Path, format: WeightFormat) -> Result<u64> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .with_context(|| format!("reading {}", path.display()))?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut total = 0u64;
    for (name, info) in &content.tensor_infos {
        if name == "token_embd.weight" && !tied {
            continue;
        }
        let elems = info.shape.elem_count() as u64;
        let float = matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        total += match format {
            _ if info.shape.rank() < 2 => 4 * elems,
            WeightFormat::Native if !float => {
                elems / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64
            }
            WeightFormat::Native | WeightFormat::F32 => 4 * elems,
            WeightFormat::Q8_0 => {
                elems / GgmlDType::Q8_0.block_size() as u64 * GgmlDType::Q8_0.type_size() as u64
            }
        };
    }
    Ok(total)
}

/// Device-to-device copy bandwidth: a `mib` MiB buffer copied on `device` (a warm-up, then
/// the best of five), counting the bytes read and the bytes written.
fn copy_bandwidth(device: &candle_core::Device, mib: usize) -> Result<f64> {
    let elems = mib << 18; // f32 elements of `mib` MiB
    let source = Tensor::zeros(elems, DType::F32, device)?;
    drop(source.copy()?);
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let copy = source.copy()?;
        device.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(copy);
    }
    Ok(2.0 * (elems * 4) as f64 / best)
}

fn bandwidth(args: &[String]) -> Result<()> {
    let device = match device(args)? {
        Device::Cpu => candle_core::Device::Cpu,
        Device::Cuda(ordinal) => candle_core::Device::new_cuda(ordinal)?,
    };
    let mib: usize = arg_or(args, "--copy-mib", 2048)?;
    if mib == 0 {
        bail!("--copy-mib must be at least 1");
    }
    let bytes_per_s = copy_bandwidth(&device, mib)?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "bandwidth", "device": format!("{device:?}"), "copy_mib": mib,
            "copy_bytes_per_s": bytes_per_s, "counts": "bytes read + bytes written",
        })
    );
    Ok(())
}

/// A random prompt of `len` ids (never 0..=2, the conventional special ids).
fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    let mut rng = Rng(0x5EED);
    (0..len).map(|_| 3 + (rng.next() % (vocab as u64 - 3)) as u32).collect()
}

fn decode(args: &[String]) -> Result<()> {
    let (path, model, load_s) = load(args)?;
    let copy_mib: usize = arg_or(args, "--copy-mib", 2048)?;
    let copy_bytes_per_s =
        if copy_mib > 0 { Some(copy_bandwidth(model.device(), copy_mib)?) } else { None };
    let weight_bytes = weight_bytes_per_step(&path, model.weight_format())?;
    let steps: usize = arg_or(args, "--steps", 32)?;
    let prompt_len: usize = arg_or(args, "--prompt", 64)?;
    let temperature: f32 = arg_or(args, "--temperature", 0.0)?;
    let rows: Vec<u32> = arg(args, "--rows")
        .unwrap_or_else(|| "1,64,256".into())
        .split(',')
        .map(|r| r.trim().parse().context("--rows: a comma-separated list of counts"))
        .collect::<Result<_>>()?;
    let prompt = prompt(prompt_len, model.config().vocab_size);
    let budget = CandleDecoder::auto_budget_bytes(&model)?;
    let sampling = Sampling {
        seed: 1,
        temperature,
        top_k: if temperature > 0.0 { 50 } else { 0 },
        top_p: 1.0,
    };
    for &n in &rows {
        let mut decoder = CandleDecoder::new(Arc::clone(&model), budget);
        let start = Instant::now();
        let mut batch = decoder.prefill(&prompt, 0..n, &sampling)?;
        let prefill_s = start.elapsed().as_secs_f64();
        // Warm-up: the first step only samples; the next ones run the model.
        for _ in 0..3 {
            block_on_ready(decoder.step(&mut batch))?;
        }
        let start = Instant::now();
        for _ in 0..steps {
            block_on_ready(decoder.step(&mut batch))?;
        }
        let secs = start.elapsed().as_secs_f64();
        // The warm-up ran 2 tokens through the model (the first step only samples): the
        // timed steps attend over prompt + 3 .. prompt + 2 + steps positions.
        let cached = prompt_len as f64 + 3.0 + (steps as f64 - 1.0) / 2.0;
        let kv_bytes = n as f64 * cached * model.kv_bytes_per_token() as f64;
        let logits_bytes = 2.0 * n as f64 * model.config().vocab_size as f64 * 4.0;
        let step_bytes = weight_bytes as f64 + kv_bytes + logits_bytes;
        let tokens_per_s = (n as usize * steps) as f64 / secs;
        let bound = copy_bytes_per_s.map(|bw| n as f64 * bw / step_bytes);
        println!(
            "{}",
            serde_json::json!({
                "bench": "decode", "model": path.display().to_string(), "load_s": load_s,
                "weights": weights_name(model.weight_format()), "device": format!("{:?}", model.device()),
                "rows": n, "steps": steps, "prompt": prompt_len, "temperature": temperature,
                "mean_cached_tokens": cached,
                "prefill_s": prefill_s, "step_ms": secs * 1e3 / steps as f64,
                "tokens_per_s": tokens_per_s,
                "kv_budget_bytes": budget,
                "step_bytes": {"weights": weight_bytes, "kv_read": kv_bytes, "logits": logits_bytes, "total": step_bytes},
                "copy_bytes_per_s": copy_bytes_per_s,
                "bound_tokens_per_s": bound,
                "fraction_of_bound": bound.map(|b| tokens_per_s / b),
            })
        );
    }
    Ok(())
}

fn methods(args: &[String]) -> Result<()> {
    let (path, model, load_s) = load(args)?;
    let n: usize = arg_or(args, "--n", 64)?;
    let max_new: usize = arg_or(args, "--max-new", 128)?;
    let alpha: f32 = arg_or(args, "--alpha", 0.5)?;
    let prompt_len: usize = arg_or(args, "--prompt", 64)?;
    let prompt = prompt(prompt_len, model.config().vocab_size);
    let per_token = model.kv_bytes_per_token();
    let min_new = (max_new / 4).max(1);
    for method in [Method::BestOfN, Method::SpeculativeRejection { alpha }] {
        // As the CLI's `--kv-budget auto`: Best-of-N holds every row to the end; Speculative
        // Rejection starts with rows that fit `min_new` tokens and decides when it runs out.
        let tokens = match method {
            Method::BestOfN => n * (prompt_len + max_new),
            Method::SpeculativeRejection { .. } => n * (prompt_len + min_new),
        };
        let mut decoder = CandleDecoder::new(Arc::clone(&model), tokens * per_token);
        let mut scorer = LikelihoodScorer::new(Arc::clone(&model));
        let options = Options {
            method,
            n,
            max_new_tokens: max_new,
            min_new_tokens: min_new,
            eos: Vec::new(), // random weights: run every row to the end
            sampling: Sampling { seed: 7, ..Sampling::default() },
            rules: Default::default(),
        };
        let outcome = block_on_ready(specrej_core::generate(
            &mut decoder,
            &mut scorer,
            &prompt,
            &options,
            &mut |_| {},
        ))?;
        let s = &outcome.stats;
        println!(
            "{}",
            serde_json::json!({
                "bench": "methods", "model": path.display().to_string(), "load_s": load_s,
                "method": match method { Method::BestOfN => "bon", Method::SpeculativeRejection { .. } => "sr" },
                "n": n, "max_new": max_new, "alpha": alpha, "prompt": prompt_len,
                "wall_s": s.wall_seconds, "steps": s.steps, "tokens_generated": s.tokens_generated,
                "initial_rows": s.initial_rows, "batches": s.batches, "decisions": outcome.trace.len(),
                "reward_calls": s.reward_calls, "reward_tokens": s.reward_tokens,
                "peak_kv_bytes": s.peak_kv_bytes, "best_score": outcome.winner().score,
            })
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write-model") => {
            let shape = Shape::named(&arg(&args, "--shape").context("--shape is required")?)?;
            let out = PathBuf::from(arg(&args, "--out").context("--out is required")?);
            let tokenizer = arg(&args, "--tokenizer").map(PathBuf::from);
            let start = Instant::now();
            write_model(shape, &out, tokenizer.as_deref(), arg_or(&args, "--seed", 1)?)?;
            eprintln!("wrote {} in {:.1} s", out.display(), start.elapsed().as_secs_f64());
            Ok(())
        }
        Some("decode") => decode(&args),
        Some("methods") => methods(&args),
        Some("bandwidth") => bandwidth(&args),
        _ => bail!(
            "usage: gpu_bench <write-model | decode | methods | bandwidth> [flags] (see the source's header)"
        ),
    }
}
