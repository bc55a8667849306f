//! The component path against the native path on the same request: the cost of running the
//! scheduler as a WebAssembly component in wasmtime.
//!
//! ```text
//! cargo run --release -p specrej-host --example overhead -- [--n 16] [--alpha 0.5] \
//!     [--max-new-tokens 64] [--seed 1] [--repeats 3] [--model PATH] [--component PATH]
//! ```
//!
//! Loads the model once (Q8_0 on the CPU, as `specrej generate` does), then runs the same
//! request — the chat template around the prompt, the judge reward, the CLI's sampling
//! defaults and its `auto` KV budget — natively (`specrej_core::generate` over
//! `CandleDecoder` and `JudgeScorer`, what the CLI runs) and through the component
//! (`Runtime::generate` over the same two), alternating, after one warm-up run of each.
//! Checks that both give the same outcome (candidates, rejected rows, decisions, stats),
//! and prints wall times, their ratio, the fuel the guest spent and the time spent inside
//! host calls (the rest is the guest and the boundary).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use specrej_candle::{CandleDecoder, JudgeScorer, WeightFormat};
use specrej_core::{
    BackendError, Method, Options, Outcome, Response, Sampling, Scored, block_on_ready, generate,
};
use specrej_host::runtime::{AnyBatch, Engine, EventKinds, Limits, Pair, Runtime};
use specrej_host::{BackendKind, RealModel, model};
use specrej_text::Message;

/// The component against the native scheduler on one request.
#[derive(Debug, Parser)]
struct Args {
    /// The user's prompt (the chat template applies).
    #[arg(long, default_value = "Give three tips for staying healthy.")]
    prompt: String,
    /// Rows (Speculative Rejection: the initial rows).
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Fraction rejected at each decision; `--bon` for Best-of-N instead.
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// Best-of-N instead of Speculative Rejection.
    #[arg(long)]
    bon: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Room every initial row has before the first decision (the CLI's default).
    #[arg(long, default_value_t = 32)]
    min_new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timed runs of each path (after one warm-up run each).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Report every progress event (as a streaming request does) on both paths.
    #[arg(long)]
    events: bool,
    /// GGUF model (default: as the CLI finds it).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The decoder component (default: target/specrej-decoder.component.wasm in this checkout).
    #[arg(long)]
    component: Option<PathBuf>,
}

/// An [`Engine`] that adds up the time spent in its calls.
struct Timed<E> {
    inner: E,
    spent: Arc<Mutex<Duration>>,
}

impl<E> Timed<E> {
    fn time<T>(&mut self, f: impl FnOnce(&mut E) -> T) -> T {
        let start = Instant::now();
        let out = f(&mut self.inner);
        *self.spent.lock().unwrap_or_else(PoisonError::into_inner) += start.elapsed();
        out
    }
}

impl<E: Engine> Engine for Timed<E> {
    fn token_capacity(&self) -> usize {
        self.inner.token_capacity()
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }
    fn kv_layout(&self) -> specrej_core::KvLayout {
        self.inner.kv_layout()
    }
    fn max_sequence_len(&self) -> usize {
        self.inner.max_sequence_len()
    }
    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<AnyBatch, BackendError> {
        self.time(|e| e.prefill(prompt, rows, sampling))
    }
    fn step(&mut self, batch: &mut AnyBatch) -> Result<Vec<u32>, BackendError> {
        self.time(|e| e.step(batch))
    }
    fn retain(&mut self, batch: &mut AnyBatch, keep: &[usize]) -> Result<(), BackendError> {
        self.time(|e| e.retain(batch, keep))
    }
    fn fork(
        &mut self,
        batch: &mut AnyBatch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        self.time(|e| e.fork(batch, children))
    }
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        self.time(|e| e.score(prompt, responses))
    }
    fn release(&mut self, rows: &[u32]) {
        self.time(|e| e.release(rows));
    }
    fn forked(&mut self, children: &[(u32, u32)]) {
        self.time(|e| e.forked(children));
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let path = model::locate(args.model.as_deref())?;
    let component = args.component.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/specrej-decoder.component.wasm")
    });
    let model = RealModel::load(&path, BackendKind::Cpu, WeightFormat::Q8_0)?;
    let compile = Instant::now();
    let runtime =
        Runtime::from_file(&component).map_err(|e| anyhow::anyhow!("{e:?}")).with_context(
            || format!("{} (build it with `cargo xtask component`)", component.display()),
        )?;
    let compile = compile.elapsed();

    let prompt = model.text.encode_chat(&[Message::user(&args.prompt)])?;
    let method =
        if args.bon { Method::BestOfN } else { Method::SpeculativeRejection { alpha: args.alpha } };
    let options = Options {
        method,
        n: args.n,
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        eos: model.text.tokenizer.eos_ids().to_vec(),
        // The CLI's defaults.
        sampling: Sampling { seed: args.seed, temperature: 1.0, top_k: 50, top_p: 1.0 },
        rules: Default::default(),
    };
    // The CLI's `auto` budget.
    let per_row = match method {
        Method::BestOfN => args.max_new_tokens,
        Method::SpeculativeRejection { .. } => args.min_new_tokens.min(args.max_new_tokens),
    };
    let capacity = args.n * (prompt.len() + per_row);
    let bytes = capacity * model.weights.kv_bytes_per_token();
    let segments =
        specrej_text::judge_segments(&model.text.tokenizer, &model.text.template, &args.prompt)?;
    let decoder = || CandleDecoder::new(Arc::clone(&model.weights), bytes);
    let judge = || {
        JudgeScorer::new(
            Arc::clone(&model.weights),
            segments.before.clone(),
            segments.after.clone(),
            segments.yes,
            segments.no,
        )
    };

    let native = || -> Result<(Outcome, f64)> {
        let start = Instant::now();
        let outcome =
            block_on_ready(generate(&mut decoder(), &mut judge(), &prompt, &options, &mut |_| {}))?;
        Ok((outcome, start.elapsed().as_secs_f64()))
    };
    let events = if args.events { EventKinds::all() } else { EventKinds::empty() };
    let limits = Limits::for_request(args.n, args.max_new_tokens, Duration::from_secs(3600));
    let wasm = || -> Result<(Outcome, f64, u64, f64)> {
        let spent = Arc::new(Mutex::new(Duration::ZERO));
        let engine =
            Box::new(Timed { inner: Pair::new(decoder(), judge()), spent: Arc::clone(&spent) });
        let start = Instant::now();
        // The observer does nothing, as natively; the guest still sends every event asked for.
        let run = runtime.generate(engine, &prompt, &options, events, Box::new(|_| true), limits);
        let wall = start.elapsed().as_secs_f64();
        let outcome = run.result.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((
            outcome,
            wall,
            run.fuel_used,
            spent.lock().unwrap_or_else(PoisonError::into_inner).as_secs_f64(),
        ))
    };

    eprintln!(
        "model {}, prompt {} tokens, {:?} n={} max_new_tokens={} min_new_tokens={} seed={}, KV budget {capacity} tokens; \
         component {} compiled in {:.2} s",
        path.display(),
        prompt.len(),
        method,
        args.n,
        args.max_new_tokens,
        args.min_new_tokens,
        args.seed,
        component.display(),
        compile.as_secs_f64()
    );
    let (mut expected, warm_native) = native()?;
    let (mut got, warm_wasm, _, _) = wasm()?;
    eprintln!("warm-up: native {warm_native:.3} s, component {warm_wasm:.3} s");
    expected.stats.wall_seconds = 0.0;
    got.stats.wall_seconds = 0.0;
    if got != expected {
        bail!("the component's outcome differs from the native one");
    }
    let (mut natives, mut wasms, mut hosts, mut fuels) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.repeats {
        let (mut a, native_s) = native()?;
        let (mut b, wasm_s, fuel, host_s) = wasm()?;
        a.stats.wall_seconds = 0.0;
        b.stats.wall_seconds = 0.0;
        if a != expected || b != expected {
            bail!("run {i}: the outcome changed between runs");
        }
        eprintln!(
            "run {i}: native {native_s:.3} s, component {wasm_s:.3} s (ratio {:.4}; host calls {host_s:.3} s, \
             guest + boundary {:.1} ms; fuel {fuel})",
            wasm_s / native_s,
            (wasm_s - host_s) * 1e3
        );
        natives.push(native_s);
        wasms.push(wasm_s);
        hosts.push(host_s);
        fuels.push(fuel);
    }
    let winner = expected.winner();
    let (native_s, wasm_s, host_s) = (median(natives), median(wasms.clone()), median(hosts));
    println!(
        "same outcome: yes (winner row {}, score {:.4}, {} tokens, {} decisions, {} tokens generated)",
        winner.row,
        winner.score,
        winner.tokens.len(),
        expected.trace.len(),
        expected.stats.tokens_generated
    );
    println!("winner: {:?}", model.text.decode(&winner.tokens));
    println!(
        "median of {}: native {native_s:.3} s, component {wasm_s:.3} s, ratio {:.4} (overhead {:+.2}%); \
         guest + boundary {:.1} ms; fuel {} ({} per generated token)",
        args.repeats,
        wasm_s / native_s,
        (wasm_s / native_s - 1.0) * 100.0,
        (wasm_s - host_s) * 1e3,
        fuels[0],
        fuels[0] / expected.stats.tokens_generated.max(1) as u64
    );
    Ok(())
}
