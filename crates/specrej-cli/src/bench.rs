//! `specrej bench`: engine measurements.

use crate::backend::{BackendArg, Policy};
use crate::generate::WeightsArg;
use crate::model::{self, Text};
use anyhow::{bail, Result};
use serde::Serialize;
use specrej_candle::CandleDecoder;
use specrej_core::{Decoder, Sampling};
use specrej_wgpu::WgpuDecoder;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Batched decode tokens/s (all rows together) and prefill tokens/s.
    Throughput(ThroughputArgs),
    /// The paper's evaluation: Best-of-N ladder vs Speculative Rejection at several α over a
    /// prompt set (default: 100 AlpacaFarm prompts); improvement score, relative compute,
    /// speedup, partial/final reward correlation; JSON, markdown and SVG into --out.
    Paper(crate::eval::PaperArgs),
}

#[derive(Debug, clap::Args)]
pub struct ThroughputArgs {
    /// GGUF model file (default: the default model in models/).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backends to measure, in one run (`cpu,wgpu` puts WebGPU beside candle-cpu).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu")]
    backends: Vec<BackendArg>,
    /// --backends wgpu: the adapter, by index or by a part of its name (`specrej adapters`).
    #[arg(long)]
    adapter: Option<String>,
    /// Row counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    rows: Vec<usize>,
    /// Timed decode steps per row count (after 2 warm-up steps).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prefill_tokens: usize,
    /// Cached tokens per row when decode is timed: a 16-token prompt, then untimed steps
    /// until every row holds this many (its own), so attention over a context counts.
    #[arg(long, default_value_t = 16)]
    context: usize,
    /// Weight formats to compare on candle (cpu, cuda); wgpu always runs the file's own format.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "native,q8-0")]
    weights: Vec<WeightsArg>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// One measured configuration: a backend and the weights it ran.
#[derive(Debug, Serialize)]
struct Engine {
    /// e.g. `cpu/native`, `cpu/q8_0`, `wgpu/native`.
    name: String,
    /// What ran it: the thread count on the CPU, the adapter on wgpu, the device on CUDA.
    device: String,
    prefill_tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    engine: String,
    rows: usize,
    decode_tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    steps: usize,
    context: usize,
    engines: Vec<Engine>,
    decode: Vec<Row>,
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Throughput(args) => throughput(args),
        Bench::Paper(args) => crate::eval::run(args),
    }
}

fn throughput(args: ThroughputArgs) -> Result<()> {
    if args.rows.is_empty() || args.rows.contains(&0) {
        bail!("--rows must list row counts of at least 1");
    }
    if args.steps == 0 || args.prefill_tokens == 0 {
        bail!("--steps and --prefill-tokens must be at least 1");
    }
    if args.context < 16 {
        bail!("--context must be at least 16 (the decode prompt's length)");
    }
    if args.backends.is_empty() {
        bail!("--backends must name at least one backend (cpu, cuda, wgpu)");
    }
    let path = model::locate(args.model.as_deref())?;
    let text = Text::load(&path)?;
    let mut sentence = text.tokenizer.encode("The quick brown fox jumps over the lazy dog while the band plays on. ", false)?;
    if sentence.is_empty() {
        sentence.push(0);
    }
    let prompts = Prompts {
        long: sentence.iter().copied().cycle().take(args.prefill_tokens).collect(),
        short: sentence.iter().copied().cycle().take(16).collect(),
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut report =
        Report { model: path.display().to_string(), steps: args.steps, context: args.context, engines: Vec::new(), decode: Vec::new() };

    for &backend in &args.backends {
        let formats = if backend == BackendArg::Wgpu { vec![WeightsArg::Native] } else { args.weights.clone() };
        for format in formats {
            let name = format!("{}/{}", format!("{backend:?}").to_lowercase(), format!("{format:?}").to_lowercase());
            let policy = Policy::load(&path, backend, format, args.adapter.as_deref())?;
            let device = match (&policy, backend) {
                (Policy::Wgpu(model), _) => model.adapter().to_string(),
                (Policy::Candle(_), BackendArg::Cuda) => "CUDA device 0".to_string(),
                (Policy::Candle(_), _) => format!("{threads} threads"),
            };
            if !args.json {
                eprintln!("{name}: {device}");
            }
            let max_rows = args.rows.iter().copied().max().unwrap_or(1);
            // Room for the prompts plus the warm-up and timed steps, in every row, in the
            // backend's layout.
            let layout = match &policy {
                Policy::Candle(model) => CandleDecoder::layout_for(model),
                Policy::Wgpu(_) => specrej_core::KvLayout::DENSE,
            };
            let own = args.steps + 4 + (args.context - 16);
            let tokens = layout.tokens(prompts.long.len(), 1, own).max(layout.tokens(prompts.short.len(), max_rows, own));
            let kv_bytes = tokens * policy.kv_bytes_per_token();
            let mut sink = |what: &str| {
                if !args.json {
                    eprintln!("{name}: {what}");
                }
            };
            let (prefill, decode) = match &policy {
                Policy::Candle(model) => measure(
                    &mut CandleDecoder::new(model.clone(), kv_bytes),
                    &prompts,
                    &args.rows,
                    args.steps,
                    args.context - 16,
                    &mut sink,
                )?,
                Policy::Wgpu(model) => measure(
                    &mut WgpuDecoder::new(model.clone(), kv_bytes),
                    &prompts,
                    &args.rows,
                    args.steps,
                    args.context - 16,
                    &mut sink,
                )?,
            };
            report.engines.push(Engine { name: name.clone(), device, prefill_tokens_per_second: prefill });
            report.decode.extend(
                decode.into_iter().map(|(rows, tps)| Row { engine: name.clone(), rows, decode_tokens_per_second: tps }),
            );
        }
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, &args.rows);
    }
    Ok(())
}

struct Prompts {
    /// The prefill measurement's prompt.
    long: Vec<u32>,
    /// The decode measurement's prompt, shared by every row.
    short: Vec<u32>,
}

/// Prefill tokens/s of one `long` row, then decode tokens/s (all rows together) per row
/// count, after `warm` untimed steps (so each row caches the prompt and `warm` tokens).
/// Every step is awaited to the end (sampled ids read back), so GPU work is not left queued.
fn measure<D: Decoder>(
    decoder: &mut D,
    prompts: &Prompts,
    rows: &[usize],
    steps: usize,
    warm: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<(f64, Vec<(usize, f64)>)> {
    let sampling = Sampling { seed: 1, ..Sampling::default() };
    let start = Instant::now();
    let mut batch = decoder.prefill(&prompts.long, 0..1, &sampling)?;
    pollster::block_on(decoder.step(&mut batch))?;
    let prefill = prompts.long.len() as f64 / start.elapsed().as_secs_f64();
    drop(batch);
    progress(&format!("prefill {prefill:.1} tokens/s ({} tokens)", prompts.long.len()));

    let mut decode = Vec::new();
    for &n in rows {
        let mut batch = decoder.prefill(&prompts.short, 0..n as u32, &sampling)?;
        for _ in 0..2 + warm {
            pollster::block_on(decoder.step(&mut batch))?;
        }
        let start = Instant::now();
        for _ in 0..steps {
            pollster::block_on(decoder.step(&mut batch))?;
        }
        let tps = (n * steps) as f64 / start.elapsed().as_secs_f64();
        progress(&format!("{n:>3} rows: {tps:>8.1} tokens/s"));
        decode.push((n, tps));
    }
    Ok((prefill, decode))
}

fn print_table(report: &Report, rows: &[usize]) {
    println!("model {} · {} timed steps at {} cached tokens per row · decode tokens/s (all rows together)", report.model, report.steps, report.context);
    println!("| engine | device | prefill tok/s | {} |", rows.iter().map(|r| format!("{r} rows")).collect::<Vec<_>>().join(" | "));
    println!("|---|---|---|{}", "---|".repeat(rows.len()));
    for engine in &report.engines {
        let cells: Vec<String> = report
            .decode
            .iter()
            .filter(|r| r.engine == engine.name)
            .map(|r| format!("{:.1}", r.decode_tokens_per_second))
            .collect();
        println!("| {} | {} | {:.1} | {} |", engine.name, engine.device, engine.prefill_tokens_per_second, cells.join(" | "));
    }
    // Ratios against the first engine, measured in this run.
    if let Some(base) = report.engines.first() {
        for engine in report.engines.iter().skip(1) {
            let ratios: Vec<String> = rows
                .iter()
                .map(|&n| {
                    let get = |e: &str| {
                        report.decode.iter().find(|r| r.engine == e && r.rows == n).map(|r| r.decode_tokens_per_second)
                    };
                    match (get(&engine.name), get(&base.name)) {
                        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                        _ => "n/a".to_string(),
                    }
                })
                .collect();
            println!("| {} ÷ {} | | | {} |", engine.name, base.name, ratios.join(" | "));
        }
    }
}
