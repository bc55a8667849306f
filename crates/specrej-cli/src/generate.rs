//! `specrej generate`.

use crate::backend::{BackendArg, Policy};
use crate::budget::KvBudget;
use crate::model::{self, Text};
use crate::reward::RewardArgs;
use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use specrej_candle::WeightFormat;
use specrej_core::{
    Candidate, Decision, Event, Finish, Method, Options, Outcome, Rules, Sampling, Stats,
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
    /// Best-of-N: number of answers (default 16). Speculative Rejection: the most rows to
    /// start with (default: as many as fit the KV budget).
    #[arg(long, short)]
    n: Option<usize>,
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
    /// KV cache budget: bytes (2GiB, 512MB) or tokens (20000tok). `auto`: a share of the
    /// memory the device has free (25% of available RAM on the CPU, 45% of a GPU's free
    /// memory; the report says which). Speculative Rejection starts with as many rows as
    /// fit it; Best-of-N runs in as many sequential batches as it needs.
    #[arg(long, default_value = "auto")]
    kv_budget: KvBudget,
    /// How weights are held in memory: as stored, or converted at load.
    #[arg(long, value_enum, default_value = "q8-0")]
    weights: WeightsArg,
    /// How the CPU's K/V cache stores K and V (f16 halves the memory per token; arithmetic
    /// is f32 either way).
    #[arg(long, value_enum, default_value = "f16")]
    kv: KvArg,
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
    #[command(flatten)]
    rules: RulesArgs,
}

/// Speculative Rejection's decision rules (`specrej_core::Rules`).
#[derive(Debug, Clone, clap::Args)]
pub struct RulesArgs {
    /// The reference code's rules: finished rows ranked with the live ones, Python's rounding,
    /// no room kept between decisions.
    #[arg(long)]
    paper_exact: bool,
    /// Score the live rows this many tokens before each decision too (for --gate-tau and
    /// --adaptive-snr).
    #[arg(long, default_value_t = 16)]
    probe_lag: usize,
    /// The rank-stability gate: cut at α only once the Kendall τ between the probe's and the
    /// decision's scores reaches this; until then free room for --probe-lag tokens only.
    #[arg(long)]
    gate_tau: Option<f32>,
    /// Adaptive α: cut at α · min(1, spread / (drift · this)), spread = the scores' standard
    /// deviation, drift = their median change since the probe.
    #[arg(long)]
    adaptive_snr: Option<f32>,
    /// Refill freed memory with forks of the kept rows: 0 copies the best round robin, λ > 0
    /// draws parents with probability ∝ exp(score / λ) (CPU backend).
    #[arg(long, value_name = "λ")]
    refill: Option<f32>,
}

impl RulesArgs {
    /// The rules, or what is wrong with the flags.
    pub fn rules(&self) -> Result<Rules> {
        let probing = self.gate_tau.is_some() || self.adaptive_snr.is_some();
        if probing && self.probe_lag == 0 {
            bail!("--probe-lag must be at least 1 with --gate-tau or --adaptive-snr");
        }
        if let Some(tau) = self.gate_tau
            && !(-1.0..=1.0).contains(&tau)
        {
            bail!("--gate-tau must be in [-1, 1], got {tau}");
        }
        if let Some(snr) = self.adaptive_snr
            && !(snr.is_finite() && snr > 0.0)
        {
            bail!("--adaptive-snr must be a positive number, got {snr}");
        }
        if let Some(lambda) = self.refill
            && !(lambda.is_finite() && lambda >= 0.0)
        {
            bail!("--refill must be 0 or a positive temperature, got {lambda}");
        }
        if self.paper_exact && (probing || self.refill.is_some()) {
            bail!(
                "--paper-exact is the reference code's rules: it does not combine with --gate-tau, --adaptive-snr or --refill"
            );
        }
        Ok(Rules {
            paper_exact: self.paper_exact,
            probe_lag: if probing { self.probe_lag } else { 0 },
            gate_tau: self.gate_tau,
            adaptive_snr: self.adaptive_snr,
            refill: self.refill,
        })
    }
}

/// `--kv`: candle's CPU K/V storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvArg {
    F16,
    F32,
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

/// Best-of-N's `--n` when none is given.
const DEFAULT_BON_N: usize = 16;

/// A run's KV budget and the rule that set it.
#[derive(Clone, Debug, Serialize)]
struct Budget {
    bytes: u64,
    tokens: usize,
    rule: String,
}

pub fn run(args: Args) -> Result<()> {
    // Check what needs no model first, so bad flags fail fast.
    if args.n == Some(0) {
        bail!("--n must be at least 1");
    }
    if let Some(n) = args.n
        && n > specrej_core::MAX_ROWS
    {
        bail!("--n {n} is more rows than one request may have ({})", specrej_core::MAX_ROWS);
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
    let rules = args.rules.rules()?;
    if rules.refill.is_some() && args.backend != BackendArg::Cpu {
        bail!("--refill forks rows, which only the CPU backend does");
    }
    let path = model::locate(args.model.as_deref())?;
    let reward = args.reward.load(args.backend.candle_device())?;
    let kv = match args.kv {
        KvArg::F16 => specrej_candle::KvFormat::F16,
        KvArg::F32 => specrej_candle::KvFormat::F32,
    };
    let policy =
        Policy::load_with_kv(&path, args.backend, args.weights, kv, args.adapter.as_deref())?;
    let text = Text::load(&path)?;
    let prompt = text.prompt(&args.prompt, args.system.as_deref(), args.raw)?;

    let method = match args.method {
        MethodArg::Sr => Method::SpeculativeRejection { alpha: args.alpha },
        MethodArg::Bon => Method::BestOfN,
    };
    let n = match (method, args.n) {
        (_, Some(n)) => n,
        (Method::BestOfN, None) => DEFAULT_BON_N,
        // No cap: as many rows as the budget holds.
        (Method::SpeculativeRejection { .. }, None) => specrej_core::MAX_ROWS,
    };
    let options = Options {
        method,
        n,
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        eos: text.tokenizer.eos_ids().to_vec(),
        sampling: Sampling {
            seed: args.seed,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        rules,
    };
    let context = policy.context_length();
    if let Some(overhead) = reward.judge_overhead(&text, &args.prompt, prompt.len())? {
        // The scheduler stops rows at the context; the judge must still read the longest.
        let longest = args.max_new_tokens.min(context.saturating_sub(prompt.len()));
        if overhead >= context {
            bail!(
                "the prompt is too long for the judge: its question about it has {overhead} tokens; the model's context holds {context}"
            );
        }
        if overhead + longest > context {
            bail!(
                "--max-new-tokens {}: the judge reads {overhead} tokens of question + answers of up to {longest} tokens, \
                 more than the model's context ({context}); use at most {}",
                args.max_new_tokens,
                context.saturating_sub(overhead)
            );
        }
    }
    let mut reward = reward.scorer(&policy, &text, &args.prompt)?;
    let bytes_per_token = policy.kv_bytes_per_token();
    let budget = match args.kv_budget {
        KvBudget::Auto => {
            // After the reward model loaded: what is free now is what the cache may take.
            let (bytes, rule) = policy.auto_budget()?;
            Budget {
                bytes: bytes as u64,
                tokens: bytes / bytes_per_token.max(1),
                rule: format!("auto: {rule}"),
            }
        }
        KvBudget::Bytes(bytes) => Budget {
            bytes,
            tokens: usize::try_from(bytes).unwrap_or(usize::MAX) / bytes_per_token.max(1),
            rule: format!("--kv-budget {bytes} bytes"),
        },
        KvBudget::Tokens(tokens) => {
            let tokens = usize::try_from(tokens).unwrap_or(usize::MAX);
            let Some(bytes) = tokens.checked_mul(bytes_per_token) else {
                bail!("--kv-budget {tokens}tok is more memory than this machine can address");
            };
            Budget { bytes: bytes as u64, tokens, rule: format!("--kv-budget {tokens} tokens") }
        }
    };

    let progress = progress_bar(args.json, options.max_new_tokens as u64);
    let mut decisions = 0usize;
    let mut live = 0usize;
    let outcome = policy.generate(
        usize::try_from(budget.bytes).unwrap_or(usize::MAX),
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
                progress
                    .set_message(format!("rows {:>3} · decisions {decisions}", decision.kept_rows));
            }
            Event::Finished { .. } | Event::Forked { .. } | Event::Scored { .. } => {}
        },
    );
    progress.finish_and_clear();
    let outcome = outcome?;

    if args.json {
        let report = Report::new(&text, &args, &outcome, prompt.len(), &budget);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&text, &args, &outcome, &budget);
    }
    Ok(())
}

fn progress_bar(hidden: bool, len: u64) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] token {pos}/{len} · {msg}",
        )
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

fn print_human(text: &Text, args: &Args, outcome: &Outcome, budget: &Budget) {
    let s = &outcome.stats;
    let method = match args.method {
        MethodArg::Sr => format!("Speculative Rejection (alpha {})", args.alpha),
        MethodArg::Bon => "Best-of-N".to_string(),
    };
    let winner = outcome.winner();
    let start = match (args.method, args.n) {
        (MethodArg::Sr, None) => {
            format!("{} rows to start (as many as fit the KV budget)", s.initial_rows)
        }
        (MethodArg::Sr, Some(n)) => format!("{} rows to start (--n {n} caps it)", s.initial_rows),
        (MethodArg::Bon, _) if s.batches > 1 => {
            format!("{} batches of up to {} rows", s.batches, s.initial_rows)
        }
        (MethodArg::Bon, _) => format!("{} rows", s.initial_rows),
    };
    println!(
        "{method}: {start}, {} candidates, reward: {} ({} re-scoring)",
        outcome.candidates.len(),
        args.reward.describe(),
        format!("{:?}", args.reward.rescore).to_lowercase()
    );
    println!(
        "KV budget {:.1} MB = {} tokens ({})",
        budget.bytes as f64 / 1e6,
        budget.tokens,
        budget.rule
    );
    println!();
    println!(
        "── winner: row {}, reward {:.3}, {} tokens, ended by {} ──",
        winner.row,
        winner.score,
        winner.tokens.len(),
        finish_name(winner.finish)
    );
    println!("{}", text.decode(&winner.tokens).trim());
    println!();
    if !outcome.trace.is_empty() {
        println!("rejection trace:");
        println!(
            "  {:>8} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9}",
            "position", "live", "kept", "min", "median", "max", "cut"
        );
        for d in &outcome.trace {
            println!(
                "  {:>8} {:>6} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3}{}",
                d.position,
                d.live_rows,
                d.kept_rows,
                d.min,
                d.median,
                d.max,
                d.threshold,
                if d.early { "  (out of memory)" } else { "" }
            );
        }
        println!();
    }
    if args.candidates {
        for c in &outcome.candidates {
            println!(
                "── row {} · reward {:.3} · {} tokens · {} ──",
                c.row,
                c.score,
                c.tokens.len(),
                finish_name(c.finish)
            );
            println!("{}", text.decode(&c.tokens).trim());
        }
        println!();
    }
    let tps = if s.wall_seconds > 0.0 { s.tokens_generated as f64 / s.wall_seconds } else { 0.0 };
    println!(
        "{} tokens generated in {} steps, {:.1} s ({tps:.1} tokens/s); reward model: {} calls, {} tokens; \
         peak KV {:.1} MB of a {}-token budget",
        s.tokens_generated,
        s.steps,
        s.wall_seconds,
        s.reward_calls,
        s.reward_tokens,
        s.peak_kv_bytes as f64 / 1e6,
        s.token_capacity
    );
    println!("time: {}", time_breakdown(s));
}

/// `prefill 0.1 s (2%) · steps 3.9 s (80%) · reward 0.8 s (17%) · retain 0.0 s (0%) · other …`
pub fn time_breakdown(s: &Stats) -> String {
    let total = s.wall_seconds.max(f64::MIN_POSITIVE);
    let other =
        (s.wall_seconds - s.prefill_seconds - s.step_seconds - s.reward_seconds - s.retain_seconds)
            .max(0.0);
    [
        ("prefill", s.prefill_seconds),
        ("steps", s.step_seconds),
        ("reward", s.reward_seconds),
        ("retain", s.retain_seconds),
        ("other", other),
    ]
    .iter()
    .map(|(name, t)| format!("{name} {t:.2} s ({:.0}%)", 100.0 * t / total))
    .collect::<Vec<_>>()
    .join(" · ")
}

/// The `--json` document.
#[derive(Debug, Serialize)]
struct Report<'a> {
    prompt: &'a str,
    prompt_tokens: usize,
    method: Method,
    reward: String,
    kv_budget: &'a Budget,
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
        Self {
            row: c.row,
            score: c.score,
            finish: Some(c.finish),
            text: text.decode(&c.tokens),
            tokens: c.tokens.clone(),
        }
    }
}

impl<'a> Report<'a> {
    fn new(
        text: &Text,
        args: &'a Args,
        outcome: &'a Outcome,
        prompt_tokens: usize,
        budget: &'a Budget,
    ) -> Self {
        let method = match args.method {
            MethodArg::Sr => Method::SpeculativeRejection { alpha: args.alpha },
            MethodArg::Bon => Method::BestOfN,
        };
        Self {
            prompt: &args.prompt,
            prompt_tokens,
            method,
            reward: args.reward.describe(),
            kv_budget: budget,
            winner: TextCandidate::new(text, outcome.winner()),
            candidates: outcome.candidates.iter().map(|c| TextCandidate::new(text, c)).collect(),
            rejected: outcome
                .rejected
                .iter()
                .map(|r| TextCandidate {
                    row: r.row,
                    score: r.score,
                    finish: None,
                    text: text.decode(&r.tokens),
                    tokens: r.tokens.clone(),
                })
                .collect(),
            trace: &outcome.trace,
            stats: &outcome.stats,
        }
    }
}
