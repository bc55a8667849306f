//! `specrej bench`: engine measurements.

use crate::generate::WeightsArg;
use crate::model::{self, Text};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use specrej_candle::{CandleDecoder, Device, LoadOptions};
use specrej_core::{block_on_ready, Decoder, Sampling};
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
    /// Row counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    rows: Vec<usize>,
    /// Timed decode steps per row count (after 2 warm-up steps).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prefill_tokens: usize,
    /// Weight formats to compare.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "native,q8-0")]
    weights: Vec<WeightsArg>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    weights: String,
    rows: usize,
    decode_tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: usize,
    prefill: Vec<(String, f64)>,
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
    let path = model::locate(args.model.as_deref())?;
    let text = Text::load(&path)?;
    let mut sentence = text.tokenizer.encode("The quick brown fox jumps over the lazy dog while the band plays on. ", false)?;
    if sentence.is_empty() {
        sentence.push(0);
    }
    let long: Vec<u32> = sentence.iter().copied().cycle().take(args.prefill_tokens).collect();
    let short: Vec<u32> = sentence.iter().copied().cycle().take(16).collect();
    let sampling = Sampling { seed: 1, ..Sampling::default() };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut report = Report { model: path.display().to_string(), threads, prefill: Vec::new(), decode: Vec::new() };

    for &format in &args.weights {
        let name = format!("{format:?}").to_lowercase();
        let weights = specrej_candle::load(&path, &LoadOptions { device: Device::Cpu, weights: format.into() })
            .with_context(|| format!("loading {}", path.display()))?;
        let max_rows = args.rows.iter().copied().max().unwrap_or(1);
        let tokens = max_rows * (long.len() + args.steps + 4);
        let mut decoder = CandleDecoder::new(weights.clone(), tokens * weights.config().kv_bytes_per_token());

        let start = Instant::now();
        let mut batch = decoder.prefill(&long, 0..1, &sampling)?;
        block_on_ready(decoder.step(&mut batch))?;
        let prefill = long.len() as f64 / start.elapsed().as_secs_f64();
        report.prefill.push((name.clone(), prefill));
        if !args.json {
            eprintln!("{name}: prefill {prefill:.1} tokens/s ({} tokens)", long.len());
        }

        for &rows in &args.rows {
            let mut batch = decoder.prefill(&short, 0..rows as u32, &sampling)?;
            for _ in 0..2 {
                block_on_ready(decoder.step(&mut batch))?;
            }
            let start = Instant::now();
            for _ in 0..args.steps {
                block_on_ready(decoder.step(&mut batch))?;
            }
            let tps = (rows * args.steps) as f64 / start.elapsed().as_secs_f64();
            if !args.json {
                eprintln!("{name}: {rows:>3} rows: {tps:>7.1} tokens/s");
            }
            report.decode.push(Row { weights: name.clone(), rows, decode_tokens_per_second: tps });
        }
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("model {} · {threads} threads · {} timed steps", report.model, args.steps);
        println!("| weights | prefill tok/s | {} |", args.rows.iter().map(|r| format!("{r} rows")).collect::<Vec<_>>().join(" | "));
        println!("|---|---|{}", "---|".repeat(args.rows.len()));
        for (name, prefill) in &report.prefill {
            let cells: Vec<String> = report
                .decode
                .iter()
                .filter(|r| &r.weights == name)
                .map(|r| format!("{:.1}", r.decode_tokens_per_second))
                .collect();
            println!("| {name} | {prefill:.1} | {} |", cells.join(" | "));
        }
    }
    Ok(())
}
