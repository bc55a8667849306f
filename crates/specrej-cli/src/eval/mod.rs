//! `specrej bench paper`: the paper's evaluation (Sun et al. 2024, Figure 3 and the
//! partial/final reward correlation) over a prompt set.
//!
//! Per prompt (seed = `--seed` + prompt index): one Best-of-N run at the largest N of the
//! ladder, from which every smaller N is derived (rows 0..N of that run are exactly the rows
//! a Best-of-N-N run would sample: noise is keyed by (seed, row id, position)); one
//! Speculative Rejection run per α; and the correlation of partial with final rewards over
//! the largest Best-of-N's rows. Results go to `--out`/results.json after each prompt (a
//! rerun with the same settings skips the prompts already there), then report.md and two SVGs.

mod math;
mod prompts;
mod report;

use crate::backend::Policy;
use crate::generate::WeightsArg;
use crate::reward::{Reward, RewardArgs, RewardSource};
use crate::model::{self, Text};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use specrej_candle::{CandleDecoder, LoadOptions, Model};
use specrej_core::{
    block_on_ready, Candidate, Decision, Event, Finish, Method, Options, Outcome, Response, Sampling, Scorer, Stats,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct PaperArgs {
    /// Prompt file: a JSON array of strings or of objects with "prompt"/"instruction", or
    /// JSON Lines (default: the 100 AlpacaFarm prompts of the paper).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Use only the first K prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// Best-of-N ladder; the smallest N is the reference. Only the largest is run; smaller N
    /// are its first N rows.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
    bon: Vec<usize>,
    /// Speculative Rejection rejection rates.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.3,0.5,0.7,0.9")]
    alphas: Vec<f32>,
    /// Speculative Rejection: the initial batch (default: the largest Best-of-N).
    #[arg(long)]
    sr_n: Option<usize>,
    /// Speculative Rejection: the KV budget in cached tokens (default: sr-n × (prompt +
    /// --min-new-tokens), as `specrej generate --kv-budget auto`).
    #[arg(long)]
    kv_budget_tokens: Option<usize>,
    /// Speculative Rejection: tokens every row generates before the first decision.
    #[arg(long, default_value_t = 32)]
    min_new_tokens: usize,
    /// New tokens per answer at most.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    reward: RewardArgs,
    /// Base seed; prompt i uses seed + i for every method.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// GGUF model file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    model: Option<PathBuf>,
    /// How weights are held in memory.
    #[arg(long, value_enum, default_value = "q8-0")]
    weights: WeightsArg,
    /// Output folder (results.json, report.md, improvement_vs_compute.svg, correlation.svg).
    #[arg(long, default_value = "bench-results/paper")]
    out: PathBuf,
}

/// Everything that decides a prompt's results; a result file is reused only for equal settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub model: String,
    pub weights: String,
    pub reward: String,
    /// `incremental` or `full` re-scoring at decisions.
    pub rescore: String,
    pub bon: Vec<usize>,
    pub alphas: Vec<f32>,
    pub sr_n: usize,
    /// `None`: sr-n × (prompt + min-new-tokens) per prompt.
    pub kv_budget_tokens: Option<usize>,
    pub min_new_tokens: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub sampling: String,
}

/// results.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResultFile {
    pub settings: Settings,
    pub prompts: Vec<PromptResult>,
}

/// One prompt's runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptResult {
    pub index: usize,
    pub prompt: String,
    pub prompt_tokens: usize,
    pub seed: u64,
    /// The largest Best-of-N.
    pub bon: Run,
    /// One run per α, in `--alphas` order.
    pub sr: Vec<Run>,
    /// Partial vs final reward over the largest Best-of-N's rows.
    pub correlation: Vec<Correlation>,
}

/// One `specrej_core::generate` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    /// `None` for Best-of-N.
    pub alpha: Option<f32>,
    pub n: usize,
    pub kv_budget_tokens: usize,
    /// Every candidate, by row id.
    pub candidates: Vec<Row>,
    pub rejected: usize,
    pub trace: Vec<Decision>,
    pub stats: Stats,
    pub winner: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub row: u32,
    pub reward: f32,
    pub tokens: usize,
    pub finish: Finish,
}

/// Partial rewards at one position against final rewards, over the rows still generating there.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Correlation {
    pub position: usize,
    /// "sr-alpha-0.5" (a decision of that run) or "fixed".
    pub source: String,
    pub rows: usize,
    pub pearson: Option<f64>,
    pub kendall: Option<f64>,
}

pub fn run(args: PaperArgs) -> Result<()> {
    // Flags first, so mistakes fail before the model loads.
    let mut ladder = args.bon.clone();
    ladder.sort_unstable();
    ladder.dedup();
    if ladder.is_empty() || ladder[0] == 0 {
        bail!("--bon must list Best-of-N sizes of at least 1");
    }
    if ladder.len() < 2 {
        bail!("--bon needs at least two sizes (the smallest is the reference)");
    }
    if args.alphas.iter().any(|a| !(0.0..1.0).contains(a)) {
        bail!("--alphas must lie in [0, 1)");
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if args.limit == Some(0) || args.sr_n == Some(0) || args.kv_budget_tokens == Some(0) {
        bail!("--limit, --sr-n and --kv-budget-tokens must be at least 1");
    }
    args.reward.check()?;
    let prompts = match &args.prompts {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            prompts::parse(&text, &path.display().to_string())?
        }
        None => prompts::parse(prompts::ALPACA_FARM_100, "the AlpacaFarm prompts")?,
    };
    let count = args.limit.unwrap_or(prompts.len()).min(prompts.len());
    let largest = *ladder.last().unwrap_or(&1);
    let sampling = Sampling::default();
    let settings = Settings {
        model: String::new(),
        weights: format!("{:?}", args.weights).to_lowercase(),
        reward: args.reward.describe(),
        rescore: format!("{:?}", args.reward.rescore).to_lowercase(),
        bon: ladder.clone(),
        alphas: args.alphas.clone(),
        sr_n: args.sr_n.unwrap_or(largest),
        kv_budget_tokens: args.kv_budget_tokens,
        min_new_tokens: args.min_new_tokens,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        sampling: format!("temperature {} top-k {} top-p {}", sampling.temperature, sampling.top_k, sampling.top_p),
    };

    let path = model::locate(args.model.as_deref())?;
    let settings = Settings {
        model: path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
        ..settings
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let results_path = args.out.join("results.json");
    let mut file = load_results(&results_path, &settings)?;

    let todo: Vec<usize> =
        (0..count).filter(|&i| !file.prompts.iter().any(|p| p.index == i && p.prompt == prompts[i])).collect();
    if todo.len() < count {
        eprintln!("{} of {count} prompts already in {}: skipping them", count - todo.len(), results_path.display());
    }
    if !todo.is_empty() {
        let weights = specrej_candle::load(
            &path,
            &LoadOptions { device: specrej_candle::Device::Cpu, weights: args.weights.into(), kv: Default::default() },
        )
        .with_context(|| format!("loading {}", path.display()))?;
        let text = Text::load(&path)?;
        let source = args.reward.load(specrej_candle::Device::Cpu)?;
        let units_per_prompt = 2 + settings.alphas.len() as u64;
        let progress = ProgressBar::new(todo.len() as u64 * units_per_prompt);
        progress.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} runs · ETA {eta_precise} · {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        // Warm up (first-touch costs of weights and kernels) so the first prompt's Best-of-N
        // is not charged for them.
        progress.set_message("warming up");
        let warm = text.prompt("Hello", None, false)?;
        let mut warm_reward = source.scorer(&Policy::Candle(weights.clone()), &text, "Hello")?;
        let warm_options = Options {
            method: Method::BestOfN,
            n: 2,
            max_new_tokens: 4,
            min_new_tokens: 4,
            eos: Vec::new(),
            sampling: Sampling::default(),
            rules: Default::default(),
        };
        let bytes = weights.config().kv_bytes_per_token() * 2 * (warm.len() + 4);
        block_on_ready(specrej_core::generate(
            &mut CandleDecoder::new(weights.clone(), bytes),
            &mut warm_reward,
            &warm,
            &warm_options,
            &mut |_| {},
        ))?;
        let started = std::time::Instant::now();
        for (k, &index) in todo.iter().enumerate() {
            let label = format!("prompt {}/{} (#{index})", k + 1, todo.len());
            let result = run_prompt(&weights, &text, &source, &settings, index, &prompts[index], &progress, &label)
                .with_context(|| format!("prompt #{index}"))?;
            file.prompts.retain(|p| p.index != index);
            file.prompts.push(result);
            file.prompts.sort_by_key(|p| p.index);
            save_results(&results_path, &file)?;
            write_reports(&args.out, &file, &prompts[..count])?;
            if progress.is_hidden() {
                // No terminal: one line per prompt instead of the bar.
                let elapsed = started.elapsed().as_secs_f64();
                let eta = elapsed / (k + 1) as f64 * (todo.len() - k - 1) as f64;
                eprintln!("{label} done · {elapsed:.0} s elapsed · ETA {eta:.0} s");
            }
        }
        progress.finish_and_clear();
    }
    let markdown = write_reports(&args.out, &file, &prompts[..count])?;
    println!("{markdown}");
    eprintln!("wrote {}, report.md, improvement_vs_compute.svg, correlation.svg", results_path.display());
    Ok(())
}

fn load_results(path: &Path, settings: &Settings) -> Result<ResultFile> {
    let fresh = ResultFile { settings: settings.clone(), prompts: Vec::new() };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(fresh);
    };
    match serde_json::from_str::<ResultFile>(&text) {
        Ok(file) if file.settings == *settings => Ok(file),
        Ok(_) | Err(_) => {
            let old = path.with_extension("json.old");
            eprintln!("{} holds other settings (or is unreadable): moving it to {}", path.display(), old.display());
            std::fs::rename(path, &old).with_context(|| format!("moving {}", path.display()))?;
            Ok(fresh)
        }
    }
}

fn save_results(path: &Path, file: &ResultFile) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(file)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes report.md and the SVGs for the selected prompts; returns the markdown.
fn write_reports(out: &Path, file: &ResultFile, selected: &[String]) -> Result<String> {
    let results: Vec<&PromptResult> =
        file.prompts.iter().filter(|p| selected.get(p.index) == Some(&p.prompt)).collect();
    let analysis = report::analyze(&file.settings, &results);
    let markdown = report::markdown(&file.settings, &analysis);
    std::fs::write(out.join("report.md"), &markdown).context("writing report.md")?;
    std::fs::write(out.join("improvement_vs_compute.svg"), report::improvement_svg(&analysis))
        .context("writing improvement_vs_compute.svg")?;
    std::fs::write(out.join("correlation.svg"), report::correlation_svg(&analysis))
        .context("writing correlation.svg")?;
    Ok(markdown)
}

#[allow(clippy::too_many_arguments)] // Private helper with two call sites; the arguments are the run.
fn generate_one(
    weights: &Arc<Model>,
    reward: &mut Reward,
    prompt: &[u32],
    options: &Options,
    capacity: usize,
    progress: &ProgressBar,
    label: &str,
) -> Result<Outcome> {
    let bytes_per_token = weights.config().kv_bytes_per_token();
    let mut decoder = CandleDecoder::new(weights.clone(), capacity.saturating_mul(bytes_per_token));
    let name = match options.method {
        Method::BestOfN => format!("bon-{}", options.n),
        Method::SpeculativeRejection { alpha } => format!("sr α={alpha}"),
    };
    let outcome = block_on_ready(specrej_core::generate(&mut decoder, reward, prompt, options, &mut |event| {
        if let Event::Step { position, rows, .. } = event
            && position % 8 == 0
        {
            progress.set_message(format!("{label} · {name} · token {position} · {} rows", rows.len()));
        }
    }))?;
    progress.inc(1);
    Ok(outcome)
}

fn summarize_run(text: &Text, alpha: Option<f32>, n: usize, capacity: usize, outcome: &Outcome) -> Run {
    let mut candidates: Vec<Row> = outcome
        .candidates
        .iter()
        .map(|c: &Candidate| Row { row: c.row, reward: c.score, tokens: c.tokens.len(), finish: c.finish })
        .collect();
    candidates.sort_by_key(|r| r.row);
    Run {
        alpha,
        n,
        kv_budget_tokens: capacity,
        candidates,
        rejected: outcome.rejected.len(),
        trace: outcome.trace.clone(),
        stats: outcome.stats.clone(),
        winner: text.decode(&outcome.winner().tokens),
    }
}

#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
fn run_prompt(
    weights: &Arc<Model>,
    text: &Text,
    reward: &RewardSource,
    settings: &Settings,
    index: usize,
    user: &str,
    progress: &ProgressBar,
    label: &str,
) -> Result<PromptResult> {
    let prompt = text.prompt(user, None, false)?;
    let policy = Policy::Candle(weights.clone());
    let seed = settings.seed + index as u64;
    let base = Options {
        method: Method::BestOfN,
        n: *settings.bon.last().unwrap_or(&1),
        max_new_tokens: settings.max_new_tokens,
        min_new_tokens: settings.min_new_tokens,
        eos: text.tokenizer.eos_ids().to_vec(),
        sampling: Sampling { seed, ..Sampling::default() },
        rules: Default::default(),
    };

    // The largest Best-of-N, room for every row.
    let bon_capacity = base.n * (prompt.len() + base.max_new_tokens);
    let bon_outcome = generate_one(weights, &mut reward.scorer(&policy, text, user)?, &prompt, &base, bon_capacity, progress, label)?;
    let bon = summarize_run(text, None, base.n, bon_capacity, &bon_outcome);

    // Speculative Rejection at every α, same seed, same rows to start with.
    let sr_capacity = settings
        .kv_budget_tokens
        .unwrap_or(settings.sr_n * (prompt.len() + settings.min_new_tokens.min(settings.max_new_tokens)));
    let mut sr = Vec::new();
    for &alpha in &settings.alphas {
        let options = Options { method: Method::SpeculativeRejection { alpha }, n: settings.sr_n, ..base.clone() };
        let outcome = generate_one(weights, &mut reward.scorer(&policy, text, user)?, &prompt, &options, sr_capacity, progress, label)?;
        sr.push(summarize_run(text, Some(alpha), settings.sr_n, sr_capacity, &outcome));
    }

    // Correlation: positions of the decisions of the α closest to 0.5, else fixed ones.
    let (positions, source) = match sr
        .iter()
        .filter(|r| !r.trace.is_empty())
        .min_by(|a, b| (a.alpha.unwrap_or(0.0) - 0.5).abs().total_cmp(&(b.alpha.unwrap_or(0.0) - 0.5).abs()))
    {
        Some(run) => {
            let mut p: Vec<usize> = run.trace.iter().map(|d| d.position).collect();
            p.dedup();
            (p, format!("sr-alpha-{}", run.alpha.unwrap_or(0.0)))
        }
        None => {
            let mut p: Vec<usize> = [16, 32, 64].into_iter().filter(|&p| p < settings.max_new_tokens).collect();
            if p.is_empty() {
                p = [settings.max_new_tokens / 4, settings.max_new_tokens / 2].into_iter().filter(|&p| p > 0).collect();
                p.dedup();
            }
            (p, "fixed".to_string())
        }
    };
    progress.set_message(format!("{label} · correlation at {positions:?}"));
    let mut rows: Vec<&Candidate> = bon_outcome.candidates.iter().collect();
    rows.sort_by_key(|c| c.row);
    let mut correlation = Vec::new();
    for &position in &positions {
        let alive: Vec<&Candidate> = rows.iter().copied().filter(|c| c.tokens.len() > position).collect();
        let responses: Vec<Response<'_>> =
            alive.iter().map(|c| Response { row: c.row, tokens: &c.tokens[..position] }).collect();
        let (pearson, kendall) = if alive.len() >= 3 {
            let partial = block_on_ready(reward.scorer(&policy, text, user)?.score(&prompt, &responses))?;
            let x: Vec<f64> = partial.rewards.iter().map(|&r| f64::from(r)).collect();
            let y: Vec<f64> = alive.iter().map(|c| f64::from(c.score)).collect();
            (math::pearson(&x, &y), math::kendall_tau_b(&x, &y))
        } else {
            (None, None)
        };
        correlation.push(Correlation { position, source: source.clone(), rows: alive.len(), pearson, kendall });
    }
    progress.inc(1);
    Ok(PromptResult { index, prompt: user.to_string(), prompt_tokens: prompt.len(), seed, bon, sr, correlation })
}
