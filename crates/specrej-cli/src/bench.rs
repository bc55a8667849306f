//! `specrej bench`: engine measurements.

use crate::backend::{BackendArg, Policy};
use crate::generate::WeightsArg;
use crate::model::{self, Text};
use crate::reward::RewardArgs;
use anyhow::{Result, bail};
use serde::Serialize;
use specrej_candle::CandleDecoder;
use specrej_core::{Decoder, Method, Options, Sampling, Stats};
use specrej_wgpu::WgpuDecoder;
use std::path::PathBuf;
use std::time::Instant;

/// The Best-of-N workload's question (one AlpacaFarm-style instruction, chat template applied).
const BON_PROMPT: &str = "Give me three tips for keeping houseplants alive in a dark apartment.";
/// Retains timed per row count, each dropping the first row (the costliest for a dense cache).
const RETAINS: usize = 4;

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Batched decode tokens/s (all rows together), a retain's cost beside a step, prefill
    /// tokens/s, and a Best-of-N generation workload with its time split.
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
    /// Prompt lengths for the prefill measurement (one row each).
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    prefill_tokens: Vec<usize>,
    /// Cached tokens per row when decode is timed, one measurement per value: a 16-token
    /// prompt, then untimed steps until every row holds this many (its own), so attention
    /// over a context counts.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    context: Vec<usize>,
    /// Weight formats to compare on candle (cpu, cuda); wgpu always runs the file's own format.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "native,q8-0")]
    weights: Vec<WeightsArg>,
    /// Best-of-N generation workload: the row counts (n) to run, each one request through
    /// the scheduler (T = 1, top-k 50, EOS honoured, then the reward), time split into
    /// prefill / decode / reward / retain. `--bon 0` skips it.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    bon: Vec<usize>,
    /// The Best-of-N workload's new tokens per row at most.
    #[arg(long, default_value_t = 256)]
    bon_tokens: usize,
    #[command(flatten)]
    reward: RewardArgs,
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
    /// Bytes of K/V one cached token takes.
    kv_bytes_per_token: usize,
    prefill: Vec<Prefill>,
}

#[derive(Debug, Serialize)]
struct Prefill {
    tokens: usize,
    tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    engine: String,
    /// Tokens each row held when the timed steps began.
    context: usize,
    rows: usize,
    decode_tokens_per_second: f64,
    /// Mean seconds of one timed step (all rows).
    step_seconds: f64,
    /// Mean seconds of one retain that drops the first row (`null` for 1 row).
    retain_seconds: Option<f64>,
}

/// One Best-of-N request, as the scheduler ran it.
#[derive(Debug, Serialize)]
struct BonRun {
    engine: String,
    n: usize,
    /// Decode tokens/s: tokens sampled over the seconds in steps and retains.
    decode_tokens_per_second: f64,
    /// Largest K/V held at once over `n`: the bytes one row really held.
    kv_bytes_per_row: f64,
    stats: Stats,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    steps: usize,
    engines: Vec<Engine>,
    decode: Vec<Row>,
    /// The Best-of-N workload's prompt (token ids, chat template applied), its EOS ids and
    /// new-token cap and the reward, so another engine can run the same request.
    bon_prompt: Vec<u32>,
    bon_eos: Vec<u32>,
    bon_tokens: usize,
    bon_reward: String,
    bon: Vec<BonRun>,
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
    if args.steps == 0 || args.prefill_tokens.is_empty() || args.prefill_tokens.contains(&0) {
        bail!("--steps and --prefill-tokens must be at least 1");
    }
    let bon: Vec<usize> = args.bon.iter().copied().filter(|&n| n > 0).collect();
    if let Some(&n) = bon.iter().find(|&&n| n > specrej_core::MAX_ROWS) {
        bail!("--bon {n} is more rows than one request may have ({})", specrej_core::MAX_ROWS);
    }
    if !bon.is_empty() && args.bon_tokens == 0 {
        bail!("--bon-tokens must be at least 1");
    }
    args.reward.check()?;
    if args.context.is_empty() || args.context.iter().any(|&c| c < 16) {
        bail!("--context must list lengths of at least 16 (the decode prompt's length)");
    }
    if args.backends.is_empty() {
        bail!("--backends must name at least one backend (cpu, cuda, wgpu)");
    }
    let path = model::locate(args.model.as_deref())?;
    let text = Text::load(&path)?;
    let mut sentence = text
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog while the band plays on. ", false)?;
    if sentence.is_empty() {
        sentence.push(0);
    }
    let prompts = Prompts {
        long: args
            .prefill_tokens
            .iter()
            .map(|&n| sentence.iter().copied().cycle().take(n).collect())
            .collect(),
        short: sentence.iter().copied().cycle().take(16).collect(),
    };
    let bon_prompt = text.prompt(BON_PROMPT, None, false)?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut report = Report {
        model: path.display().to_string(),
        steps: args.steps,
        engines: Vec::new(),
        decode: Vec::new(),
        bon_prompt: bon_prompt.clone(),
        bon_eos: text.tokenizer.eos_ids().to_vec(),
        bon_tokens: args.bon_tokens,
        bon_reward: args.reward.describe(),
        bon: Vec::new(),
    };
    let reward = if bon.is_empty() {
        None
    } else {
        Some(args.reward.load(args.backends[0].candle_device())?)
    };

    for &backend in &args.backends {
        let formats = if backend == BackendArg::Wgpu {
            vec![WeightsArg::Native]
        } else {
            args.weights.clone()
        };
        for format in formats {
            let name = format!(
                "{}/{}",
                format!("{backend:?}").to_lowercase(),
                format!("{format:?}").to_lowercase()
            );
            let policy = Policy::load(&path, backend, format, args.adapter.as_deref())?;
            let device = match (&policy, backend) {
                (Policy::Wgpu(model), _) => model.adapter().to_string(),
                (Policy::Candle(_), BackendArg::Cuda) => "CUDA device 0".to_string(),
                (Policy::Candle(_), _) => format!("{threads} threads"),
            };
            // Progress goes to stderr in every mode (`--json` owns stdout only).
            eprintln!("{name}: {device}");
            let max_rows = args.rows.iter().copied().max().unwrap_or(1);
            // Room for the prompts plus the warm-up and timed steps, in every row, in the
            // backend's layout.
            let layout = policy.kv_layout();
            let own = args.steps + 4 + (args.context.iter().max().unwrap_or(&16) - 16);
            let longest = prompts.long.iter().map(Vec::len).max().unwrap_or(1);
            let tokens = layout.tokens(longest, 1, own).max(layout.tokens(
                prompts.short.len(),
                max_rows,
                own,
            ));
            let kv_bytes = tokens * policy.kv_bytes_per_token();
            let mut sink = |what: &str| eprintln!("{name}: {what}");
            let (prefill, decode) = match &policy {
                Policy::Candle(model) => measure(
                    &mut CandleDecoder::new(model.clone(), kv_bytes),
                    &prompts,
                    &args.rows,
                    args.steps,
                    &args.context,
                    &mut sink,
                )?,
                Policy::Wgpu(model) => measure(
                    &mut WgpuDecoder::new(model.clone(), kv_bytes),
                    &prompts,
                    &args.rows,
                    args.steps,
                    &args.context,
                    &mut sink,
                )?,
            };
            report.engines.push(Engine {
                name: name.clone(),
                device,
                kv_bytes_per_token: policy.kv_bytes_per_token(),
                prefill: prompts
                    .long
                    .iter()
                    .zip(prefill)
                    .map(|(p, tokens_per_second)| Prefill { tokens: p.len(), tokens_per_second })
                    .collect(),
            });
            report.decode.extend(decode.into_iter().map(|mut row| {
                row.engine = name.clone();
                row
            }));
            if let Some(reward) = &reward {
                for &n in &bon {
                    let stats = best_of_n(&policy, reward, &text, &bon_prompt, n, args.bon_tokens)?;
                    let run = BonRun {
                        engine: name.clone(),
                        n,
                        decode_tokens_per_second: stats.tokens_generated as f64
                            / (stats.step_seconds + stats.retain_seconds).max(f64::MIN_POSITIVE),
                        kv_bytes_per_row: stats.peak_kv_bytes as f64 / n as f64,
                        stats,
                    };
                    sink(&format!(
                        "Best-of-{n}: {} tokens, decode {:.1} tokens/s · {}",
                        run.stats.tokens_generated,
                        run.decode_tokens_per_second,
                        crate::generate::time_breakdown(&run.stats)
                    ));
                    report.bon.push(run);
                }
            }
        }
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, &args.rows);
    }
    Ok(())
}

/// One Best-of-N request of `n` rows through the scheduler, T = 1 / top-k 50, with a fresh
/// decoder whose budget holds all `n` rows to the end (one batch) and a fresh scorer.
fn best_of_n(
    policy: &Policy,
    reward: &crate::reward::RewardSource,
    text: &Text,
    prompt: &[u32],
    n: usize,
    max_new_tokens: usize,
) -> Result<Stats> {
    let options = Options {
        method: Method::BestOfN,
        n,
        max_new_tokens,
        min_new_tokens: 1,
        eos: text.tokenizer.eos_ids().to_vec(),
        sampling: Sampling { seed: 1, temperature: 1.0, top_k: 50, top_p: 1.0 },
        rules: Default::default(),
    };
    let layout = policy.kv_layout();
    let kv_bytes = layout.tokens(prompt.len(), n, max_new_tokens + 1) * policy.kv_bytes_per_token();
    let mut scorer = reward.scorer(policy, text, BON_PROMPT)?;
    let outcome = policy.generate(kv_bytes, &mut scorer, prompt, &options, &mut |_| {})?;
    Ok(outcome.stats)
}

struct Prompts {
    /// The prefill measurement's prompts, one per length.
    long: Vec<Vec<u32>>,
    /// The decode measurement's prompt, shared by every row.
    short: Vec<u32>,
}

/// Prefill tokens/s of one row per `long` prompt (after an untimed warm-up prefill), then per
/// context and row count: decode tokens/s (all rows together) after untimed steps that bring
/// every row to the context (the 16-token prompt and tokens of its own), and the mean time of [`RETAINS`] retains that each
/// drop the first row. Every step is awaited to the end (sampled ids read back), so GPU work
/// is not left queued.
fn measure<D: Decoder>(
    decoder: &mut D,
    prompts: &Prompts,
    rows: &[usize],
    steps: usize,
    contexts: &[usize],
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<f64>, Vec<Row>)> {
    let sampling = Sampling { seed: 1, ..Sampling::default() };
    drop(decoder.prefill(&prompts.short, 0..1, &sampling)?);
    let mut prefill = Vec::new();
    for long in &prompts.long {
        let start = Instant::now();
        let mut batch = decoder.prefill(long, 0..1, &sampling)?;
        pollster::block_on(decoder.step(&mut batch))?;
        let tps = long.len() as f64 / start.elapsed().as_secs_f64();
        progress(&format!("prefill {tps:.1} tokens/s ({} tokens)", long.len()));
        prefill.push(tps);
    }

    let mut decode = Vec::new();
    for (&context, &n) in contexts.iter().flat_map(|c| rows.iter().map(move |n| (c, n))) {
        let warm = context - prompts.short.len();
        let mut batch = decoder.prefill(&prompts.short, 0..n as u32, &sampling)?;
        for _ in 0..2 + warm {
            pollster::block_on(decoder.step(&mut batch))?;
        }
        let start = Instant::now();
        for _ in 0..steps {
            pollster::block_on(decoder.step(&mut batch))?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let tps = (n * steps) as f64 / elapsed;
        let retain_seconds = (n > RETAINS).then(|| {
            let mut total = 0.0;
            for live in (n - RETAINS + 1..=n).rev() {
                let keep: Vec<usize> = (1..live).collect();
                let start = Instant::now();
                decoder.retain(&mut batch, &keep)?;
                total += start.elapsed().as_secs_f64();
            }
            anyhow::Ok(total / RETAINS as f64)
        });
        let retain_seconds = retain_seconds.transpose()?;
        let step_seconds = elapsed / steps as f64;
        let retain = retain_seconds.map_or(String::new(), |r| {
            format!(" · retain {:.1} µs ({:.2}% of a step)", r * 1e6, 100.0 * r / step_seconds)
        });
        progress(&format!("{n:>3} rows at {context} tokens: {tps:>8.1} tokens/s{retain}"));
        decode.push(Row {
            engine: String::new(),
            context,
            rows: n,
            decode_tokens_per_second: tps,
            step_seconds,
            retain_seconds,
        });
    }
    Ok((prefill, decode))
}

fn print_table(report: &Report, rows: &[usize]) {
    let lengths: Vec<usize> =
        report.engines.first().map_or(Vec::new(), |e| e.prefill.iter().map(|p| p.tokens).collect());
    println!("model {} · prefill tokens/s (one row)", report.model);
    println!(
        "| engine | device | K/V bytes/token | {} |",
        lengths.iter().map(|l| format!("{l} tokens")).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|---|---|{}", "---|".repeat(lengths.len()));
    for engine in &report.engines {
        let cells: Vec<String> =
            engine.prefill.iter().map(|p| format!("{:.1}", p.tokens_per_second)).collect();
        println!(
            "| {} | {} | {} | {} |",
            engine.name,
            engine.device,
            engine.kv_bytes_per_token,
            cells.join(" | ")
        );
    }
    let contexts: Vec<usize> = report.decode.iter().fold(Vec::new(), |mut seen, r| {
        if !seen.contains(&r.context) {
            seen.push(r.context);
        }
        seen
    });
    for context in contexts {
        println!();
        println!(
            "decode tokens/s (all rows together), {} timed steps at {context} cached tokens per row; a retain that drops the first row, as a share of one step",
            report.steps
        );
        println!(
            "| engine | {} |",
            rows.iter().map(|r| format!("{r} rows")).collect::<Vec<_>>().join(" | ")
        );
        println!("|---|{}", "---|".repeat(rows.len()));
        let get = |engine: &str, n: usize| {
            report.decode.iter().find(|r| r.engine == engine && r.rows == n && r.context == context)
        };
        for engine in &report.engines {
            let cells: Vec<String> = rows
                .iter()
                .map(|&n| {
                    get(&engine.name, n)
                        .map_or("n/a".into(), |r| format!("{:.1}", r.decode_tokens_per_second))
                })
                .collect();
            println!("| {} | {} |", engine.name, cells.join(" | "));
            let retains: Vec<String> = rows
                .iter()
                .map(|&n| match get(&engine.name, n) {
                    Some(Row { retain_seconds: Some(r), step_seconds, .. }) => {
                        format!("{:.1} µs ({:.2}%)", r * 1e6, 100.0 * r / step_seconds)
                    }
                    _ => "n/a".into(),
                })
                .collect();
            println!("| {} retain | {} |", engine.name, retains.join(" | "));
        }
        // Ratios against the first engine, measured in this run.
        if let Some(base) = report.engines.first() {
            for engine in report.engines.iter().skip(1) {
                let ratios: Vec<String> = rows
                    .iter()
                    .map(|&n| match (get(&engine.name, n), get(&base.name, n)) {
                        (Some(a), Some(b)) if b.decode_tokens_per_second > 0.0 => {
                            format!(
                                "{:.2}×",
                                a.decode_tokens_per_second / b.decode_tokens_per_second
                            )
                        }
                        _ => "n/a".to_string(),
                    })
                    .collect();
                println!("| {} ÷ {} | {} |", engine.name, base.name, ratios.join(" | "));
            }
        }
    }
    if !report.bon.is_empty() {
        println!();
        println!(
            "Best-of-N, {} new tokens at most, T = 1 / top-k 50, EOS honoured, reward {}; decode tokens/s = tokens ÷ (steps + retains)",
            report.bon_tokens, report.bon_reward
        );
        println!(
            "| engine | n | tokens | decode tok/s | wall s | prefill | steps | reward | retain | K/V per row |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for run in &report.bon {
            let s = &run.stats;
            let share = |t: f64| {
                format!("{t:.2} s ({:.1}%)", 100.0 * t / s.wall_seconds.max(f64::MIN_POSITIVE))
            };
            println!(
                "| {} | {} | {} | {:.1} | {:.2} | {} | {} | {} | {} | {:.2} MB |",
                run.engine,
                run.n,
                s.tokens_generated,
                run.decode_tokens_per_second,
                s.wall_seconds,
                share(s.prefill_seconds),
                share(s.step_seconds),
                share(s.reward_seconds),
                share(s.retain_seconds),
                run.kv_bytes_per_row / 1e6
            );
        }
    }
}
