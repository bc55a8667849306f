//! Decode and prefill throughput on the default model.
//!
//! `cargo bench -p specrej-candle --bench decode [-- --formats q8_0,native,f32 --rows 1,8,32,64 --steps 32 --prompt 32]`
//!
//! The model is `$SPECREJ_MODEL`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf` at the
//! workspace root; the bench prints a message and exits if it is missing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use specrej_candle::{CandleDecoder, LoadOptions, Model, WeightFormat, load_gguf};
use specrej_core::{Decoder, Sampling, block_on_ready};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn list(name: &str, default: &str) -> Vec<String> {
    arg(name).unwrap_or_else(|| default.into()).split(',').map(str::to_owned).collect()
}

fn decode_rate(model: &Arc<Model>, prompt: &[u32], rows: u32, steps: usize) -> f64 {
    let mut dec = CandleDecoder::new(model.clone(), 4 << 30);
    let sampling = Sampling::default();
    let mut batch = dec.prefill(prompt, 0..rows, &sampling).expect("prefill");
    // Warm-up: the first step only samples, the next ones grow the cache once.
    for _ in 0..3 {
        block_on_ready(dec.step(&mut batch)).expect("step");
    }
    let start = Instant::now();
    for _ in 0..steps {
        block_on_ready(dec.step(&mut batch)).expect("step");
    }
    (rows as usize * steps) as f64 / start.elapsed().as_secs_f64()
}

fn prefill_rate(model: &Arc<Model>, prompt: &[u32], repeats: usize) -> f64 {
    let mut dec = CandleDecoder::new(model.clone(), 4 << 30);
    let sampling = Sampling::default();
    let _ = dec.prefill(prompt, 0..1, &sampling).expect("prefill"); // warm-up
    let start = Instant::now();
    for _ in 0..repeats {
        let _ = dec.prefill(prompt, 0..1, &sampling).expect("prefill");
    }
    (prompt.len() * repeats) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let path = std::env::var_os("SPECREJ_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !path.exists() {
        println!("skipping: model not found at {} (set SPECREJ_MODEL)", path.display());
        return;
    }
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(32);
    let prompt_len: usize = arg("--prompt").and_then(|s| s.parse().ok()).unwrap_or(32);
    let rows: Vec<u32> =
        list("--rows", "1,8,32,64").iter().filter_map(|s| s.parse().ok()).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model: {}  ({threads} threads; decode: {prompt_len}-token prompt, {steps} timed steps)",
        path.display()
    );
    for name in list("--formats", "q8_0,native,f32") {
        let weights = match name.as_str() {
            "native" => WeightFormat::Native,
            "q8_0" => WeightFormat::Q8_0,
            "f32" => WeightFormat::F32,
            other => {
                println!("unknown format {other:?} (native, q8_0, f32)");
                continue;
            }
        };
        let t = Instant::now();
        let model = load_gguf(&path, &LoadOptions { weights, ..Default::default() }).expect("load");
        let load_s = t.elapsed().as_secs_f64();
        // A prompt of ordinary ids (the chat template's start, then text-range ids).
        let prompt: Vec<u32> = std::iter::once(1)
            .chain((1..prompt_len).map(|i| 300 + (37 * i as u32) % 20_000))
            .collect();
        let long: Vec<u32> = (0..256).map(|i| 300 + (37 * i) % 20_000).collect();
        let mut line = format!("{name:>6}: load {load_s:.2}s | decode tok/s");
        for &r in &rows {
            line += &format!("  {r}:{:.0}", decode_rate(&model, &prompt, r, steps));
        }
        line +=
            &format!(" | prefill tok/s (256-token prompt) {:.0}", prefill_rate(&model, &long, 3));
        println!("{line}");
    }
}
