//! `specrej generate`.

use crate::budget::KvBudget;
use crate::model::{self, Text};
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use crate::backend::{BackendArg, Policy};
use crate::reward::RewardArgs;
use specrej_candle::WeightFormat;
use specrej_core::{
    Candidate, Decision, Event, Finish, Method, Options, Outcome, Sampling, Stats,
};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// Speculative Rejection.
    Sr,
    /// Best-of-N.
    Bon,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The user's message (the chat template is applied unless --raw).
    prompt: String,
    /// sr: Speculative Rejection; bon: Best-of-N.
    #[arg(long, value_enum, default_value = "sr")]
    method: MethodArg,
    /// Best-of-N: number of answers. Speculative Rejection: the most rows to start with.
    #[arg(long, short, default_value_t = 16)]
    n: usize,
    /// Speculative Rejection: fraction of rows rejected at each decision, in [0, 1).
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// New tokens per answer at most.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Speculative Rejection: tokens every row generates before the first decision
    /// (sets the initial batch with the KV budget).
    #[arg(long, default_value_t = 32)]
    min_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling noise (a row's text depends only on seed, row id and prompt).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    reward: RewardArgs,
    /// GGUF model file, or a HF directory (config.json, *.safetensors, tokenizer.json)
    /// (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    model: Option<PathBuf>,
    /// KV cache budget: bytes (2GiB, 512MB) or tokens (20000tok). `auto`: Best-of-N gets
    /// room for all n rows; Speculative Rejection gets n rows × (prompt + --min-new-tokens),
    /// so decisions fall where a memory-bound device would make them.
    #[arg(long, default_value = "auto")]
    kv_budget: KvBudget,
    /// How weights are held in memory: as stored, or converted at load.
    #[arg(long, value_enum, default_value = "q8-0")]
    weights: WeightsArg,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// --backend wgpu: the adapter, by index or by a part of its name (`specrej adapters`).
    #[arg(long)]
    adapter: Option<String>,
    /// A system message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Use the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Print every candidate, not only the winner.
    #[arg(long)]
    candidates: bool,
    /// Print the whole result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsArg {
    /// As stored in the file (e.g. Q4_1).
    Native,
    /// Requantized to Q8_0 at load.
    Q8_0,
    /// Dequantized to f32 at load.
    F32,
}

impl From<WeightsArg> for WeightFormat {
    fn from(value: WeightsArg) -> Self {
        match value {
            WeightsArg::Native => WeightFormat::Native,
            WeightsArg::Q8_0 => WeightFormat::Q8_0,
            WeightsArg::F32 => WeightFormat::F32,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    // Check what needs no model first, so bad flags fail fast.
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    if !(0.0..1.0).contains(&args.alpha) {
        bail!("--alpha must be in [0, 1), got {}", args.alpha);
    }
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    args.reward.check()?;
    let path = model::locate(args.model.as_deref())?;
    let reward = args.reward.load(args.backend.candle_device())?;
    let policy = Policy::load(&path, args.backend, args.weights, args.adapter.as_deref())?;
    let text = Text::load(&path)?;
    let prompt = text.prompt(&args.prompt, args.system.as_deref(), args.raw)?;

    let method = match args.method {
        MethodArg::Sr => Method::SpeculativeRejection { alpha: args.alpha },
        MethodArg::Bon => Method::BestOfN,
    };
    let options = Options {
        method,
        n: args.n,
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        eos: text.tokenizer.eos_ids().to_vec(),
        sampling: Sampling { seed: args.seed, temperature: args.temperature, top_k: args.top_k, top_p: args.top_p },
        rules: Default::default(),
    };
    let auto_len = match method {
        Method::BestOfN => args.max_new_tokens,
        Method::SpeculativeRejection { .. } => args.min_new_tokens.min(args.max_new_tokens),
    };
    let bytes_per_token = policy.kv_bytes_per_token();
    let mut wanted = args.n * (prompt.len() + auto_len);
    if let Some(limit) = policy.auto_limit_bytes(args.backend)? {
        // On a GPU `auto` is also bounded by the memory free on the device (after the weights
        // and the reward model loaded): the initial batch fills the card, as in the paper.
        wanted = wanted.min(limit / bytes_per_token.max(1));
    }
    let capacity = args.kv_budget.tokens(bytes_per_token, wanted);
    let mut reward = reward.scorer(&policy, &text, &args.prompt)?;

    let progress = progress_bar(args.json, options.max_new_tokens as u64);
    let mut decisions = 0usize;
    let mut live = 0usize;
    let outcome = policy.generate(
        capacity.saturating_mul(bytes_per_token),
        &mut reward,
        &prompt,
        &options,
        &mut |event| match event {
            Event::Prefilled { rows, .. } => live = *rows,
            Event::Step { position, rows, .. } => {
                live = rows.len();
                progress.set_position(*position as u64 + 1);
                progress.set_message(format!("rows {live:>3} · decisions {decisions}"));
            }
            Event::Decision { decision, .. } => {
                decisions += 1;
                progress.set_message(format!("rows {:>3} · decisions {decisions}", decision.kept_rows));
            }
            Event::Finished { .. } | Event::Scored { .. } => {}
        },
    );
    progress.finish_and_clear();
    let outcome = outcome?;

    if args.json {
        let report = Report::new(&text, &args, &outcome, prompt.len(), capacity);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&text, &args, &outcome);
    }
    Ok(())
}

fn progress_bar(hidden: bool, len: u64) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] token {pos}/{len} · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn finish_name(finish: Finish) -> &'static str {
    match finish {
        Finish::Eos => "eos",
        Finish::Length => "length",
        Finish::Capacity => "kv budget",
    }
}

fn print_human(text: &Text, args: &Args, outcome: &Outcome) {
    let s = &outcome.stats;
    let method = match args.method {
        MethodArg::Sr => format!("Speculative Rejection (alpha {})", args.alpha),
        MethodArg::Bon => "Best-of-N".to_string(),
    };
    let winner = outcome.winner();
    println!(
        "{method}: {} rows to start, {} candidates, reward: {} ({} re-scoring)",
        s.initial_rows,
        outcome.candidates.len(),
        args.reward.describe(),
        format!("{:?}", args.reward.rescore).to_lowercase()
    );
    println!();
    println!("── winner: row {}, reward {:.3}, {} tokens, ended by {} ──", winner.row, winner.score, winner.tokens.len(), finish_name(winner.finish));
    println!("{}", text.decode(&winner.tokens).trim());
    println!();
    if !outcome.trace.is_empty() {
        println!("rejection trace:");
        println!("  {:>8} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9}", "position", "live", "kept", "min", "median", "max", "cut");
        for d in &outcome.trace {
            println!(
                "  {:>8} {:>6} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3}{}",
                d.position, d.live_rows, d.kept_rows, d.min, d.median, d.max, d.threshold,
                if d.early { "  (out of memory)" } else { "" }
            );
        }
        println!();
    }
    if args.candidates {
        for c in &outcome.candidates {
            println!("── row {} · reward {:.3} · {} tokens · {} ──", c.row, c.score, c.tokens.len(), finish_name(c.finish));
            println!("{}", text.decode(&c.tokens).trim());
        }
        println!();
    }
    let tps = if s.wall_seconds > 0.0 { s.tokens_generated as f64 / s.wall_seconds } else { 0.0 };
    println!(
        "{} tokens generated in {} steps, {:.1} s ({tps:.1} tokens/s); reward model: {} calls, {} tokens; \
         peak KV {:.1} MB of a {}-token budget",
        s.tokens_generated, s.steps, s.wall_seconds, s.reward_calls, s.reward_tokens,
        s.peak_kv_bytes as f64 / 1e6, s.token_capacity
    );
}

/// The `--json` document.
#[derive(Debug, Serialize)]
struct Report<'a> {
    prompt: &'a str,
    prompt_tokens: usize,
    method: Method,
    reward: String,
    kv_budget_tokens: usize,
    winner: TextCandidate,
    candidates: Vec<TextCandidate>,
    rejected: Vec<TextCandidate>,
    trace: &'a [Decision],
    stats: &'a Stats,
}

#[derive(Debug, Serialize)]
struct TextCandidate {
    row: u32,
    score: f32,
    finish: Option<Finish>,
    text: String,
    tokens: Vec<u32>,
}

impl TextCandidate {
    fn new(text: &Text, c: &Candidate) -> Self {
        Self { row: c.row, score: c.score, finish: Some(c.finish), text: text.decode(&c.tokens), tokens: c.tokens.clone() }
    }
}

impl<'a> Report<'a> {
    fn new(text: &Text, args: &'a Args, outcome: &'a Outcome, prompt_tokens: usize, capacity: usize) -> Self {
        let method = match args.method {
            MethodArg::Sr => Method::SpeculativeRejection { alpha: args.alpha },
            MethodArg::Bon => Method::BestOfN,
        };
        Self {
            prompt: &args.prompt,
            prompt_tokens,
            method,
            reward: args.reward.describe(),
            kv_budget_tokens: capacity,
            winner: TextCandidate::new(text, outcome.winner()),
            candidates: outcome.candidates.iter().map(|c| TextCandidate::new(text, c)).collect(),
            rejected: outcome
                .rejected
                .iter()
                .map(|r| TextCandidate { row: r.row, score: r.score, finish: None, text: text.decode(&r.tokens), tokens: r.tokens.clone() })
                .collect(),
            trace: &outcome.trace,
            stats: &outcome.stats,
        }
    }
}
