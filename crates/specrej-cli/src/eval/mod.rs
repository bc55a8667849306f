//! `specrej bench paper`: Speculative Rejection against Best-of-N (Sun et al. 2024, Figure 3
//! and the partial/final reward correlation) over a prompt set, by exact replay.
//!
//! Per prompt (seed = `--seed` + prompt index):
//! 1. **Record** one Best-of-N run of the largest N to every row's end, live: the tokens, each
//!    token's NLL under the policy, what it cost ([`record`]).
//! 2. **Reward** every row, per reward: the judge scores whole answers (and, on demand, any
//!    prefix: memoised); the likelihood comes from the NLLs, exactly.
//! 3. **Replay** every method through the real scheduler over the recording
//!    ([`specrej_core::replay`]): each Best-of-N size of the ladder, and every policy at every
//!    α, all under the same KV budget in bytes (the memory-bound mode: Best-of-N runs in as
//!    many sequential batches as it needs, Speculative Rejection starts with as many rows as
//!    fit). Row-keyed noise and batch invariance make this exact: a replayed run samples,
//!    scores, keeps and spends what the live run would (a test checks it on the real model,
//!    and `--check-live` on the first prompt). Compute is counted as a live run counts it:
//!    generated tokens, the reward model's tokens as its incremental scorer would run them,
//!    and wall time priced by a calibration of this machine ([`cost`]).
//!
//! `--backend cuda` runs the recording, the judge and the calibration on the GPU (judge
//! rewards only); the replays then model the GPU's dense K/V under the same byte budget. The
//! batch invariance that makes a CPU replay exact is not established on a GPU (`--check-live`
//! reports whether the first prompt's live run equals its replay): there a replay is the
//! policy run over the recorded tokens, which a live run could differ from by rounding.
//!
//! Results go to `--out`/results.json after each prompt (a rerun with the same settings
//! resumes, skipping the prompts there), then report.md (tables with bootstrap confidence
//! intervals) and SVGs. Recordings are kept in `--out`/recordings/ (large; not needed to
//! read the results, only to replay new policies without regenerating).

mod cost;
mod math;
mod prompts;
mod record;
mod replay;
mod report;
#[cfg(test)]
mod tests;

use crate::backend::BackendArg;
use crate::budget::KvBudget;
use crate::generate::WeightsArg;
use crate::model::{self, Text};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use specrej_candle::{
    CandleDecoder, JudgeScorer, KvShare, LikelihoodScorer, LoadOptions, Model, SelfJudgeScorer,
};
use specrej_core::{Decoder, Method, Options, Outcome, Rules, Sampling, block_on_ready};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub use replay::RewardName;

/// Pruning policies `bench paper` compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Speculative Rejection with our rules (the scheduler's default).
    Paper,
    /// The reference code's rules (finished rows ranked too, Python's rounding).
    PaperExact,
    /// Random decision scores at the same α and decision points: the floor.
    Random,
    /// Each row's final reward as its decision score: the ceiling.
    Oracle,
    /// The rank-stability gate.
    Gate,
    /// Adaptive α.
    Adaptive,
}

impl PolicyName {
    fn label(self) -> &'static str {
        match self {
            PolicyName::Paper => "paper",
            PolicyName::PaperExact => "paper-exact",
            PolicyName::Random => "random",
            PolicyName::Oracle => "oracle",
            PolicyName::Gate => "gate",
            PolicyName::Adaptive => "adaptive",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct PaperArgs {
    /// Prompt file: a JSON array of strings or of objects with "prompt"/"instruction", or
    /// JSON Lines (default: the 100 AlpacaFarm prompts of the paper).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Use only the first K prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// Best-of-N ladder; the smallest N is the reference, the largest is recorded.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64,128,256,512")]
    bon: Vec<usize>,
    /// Speculative Rejection rejection rates.
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.7,0.9")]
    alphas: Vec<f32>,
    /// Policies, each at every α.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "paper,paper-exact,random,oracle,gate,adaptive"
    )]
    policies: Vec<PolicyName>,
    /// Rewards, each evaluated on the same recordings.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "judge,likelihood")]
    rewards: Vec<RewardName>,
    /// Speculative Rejection's most initial rows (default: the largest Best-of-N, the rows
    /// the recording holds).
    #[arg(long)]
    sr_n: Option<usize>,
    /// The KV budget every method gets (bytes like 256MB, or tokens like 20000tok).
    #[arg(long, default_value = "256MB")]
    kv_budget: KvBudget,
    /// Speculative Rejection: room for this many new tokens per row before the first decision
    /// (and between decisions).
    #[arg(long, default_value_t = 32)]
    min_new_tokens: usize,
    /// New tokens per answer at most.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Gate and adaptive α: tokens between the probe and the decision.
    #[arg(long, default_value_t = 16)]
    probe_lag: usize,
    /// The gate opens at this Kendall τ between the probe's and the decision's scores.
    #[arg(long, default_value_t = 0.4)]
    gate_tau: f32,
    /// Adaptive α: the spread-over-drift ratio at which the full α applies.
    #[arg(long, default_value_t = 1.0)]
    adaptive_snr: f32,
    /// Base seed; prompt i uses seed + i for every method.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// GGUF model file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    model: Option<PathBuf>,
    /// How weights are held in memory.
    #[arg(long, value_enum, default_value = "q8-0")]
    weights: WeightsArg,
    /// Where the recording, the judge and the calibration run: candle on the CPU, or on CUDA
    /// (a build with `--features cuda`). On CUDA the K/V layout the replays model is the
    /// GPU's (dense, f32, the prompt held once per row), and only the judge rewards are
    /// available (the GPU's decode step computes no per-token NLLs, the likelihood's source).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Rows per batch of the recording run (memory: about 23 KB per row and token).
    #[arg(long, default_value_t = 256)]
    record_rows: usize,
    /// Bootstrap resamples for the confidence intervals.
    #[arg(long, default_value_t = 2000)]
    bootstrap: usize,
    /// Also run plain Speculative Rejection (α 0.5) live on the first new prompt, per reward,
    /// and report whether its outcome equals the replay's.
    #[arg(long)]
    check_live: bool,
    /// The machine's costs: read from this JSON file if it exists, else measured (a few
    /// minutes) and written there. Default: measured once per results file.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Output folder (results.json, report.md, SVGs, recordings/).
    #[arg(long, default_value = "bench-results/paper")]
    out: PathBuf,
}

/// Everything that decides a prompt's results; a result file is reused only for equal settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub model: String,
    /// Where it ran: `cpu` or `cuda` (results files from before this field are the CPU's).
    #[serde(default = "cpu")]
    pub backend: String,
    pub weights: String,
    pub kv_format: String,
    pub bon: Vec<usize>,
    pub alphas: Vec<f32>,
    pub policies: Vec<PolicyName>,
    pub rewards: Vec<RewardName>,
    pub sr_n: usize,
    pub kv_budget_bytes: u64,
    pub min_new_tokens: usize,
    pub max_new_tokens: usize,
    pub probe_lag: usize,
    pub gate_tau: f32,
    pub adaptive_snr: f32,
    pub seed: u64,
    pub sampling: String,
}

fn cpu() -> String {
    "cpu".into()
}

/// results.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResultFile {
    pub settings: Settings,
    pub calibration: Option<cost::Calibration>,
    pub prompts: Vec<PromptResult>,
}

/// One prompt's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptResult {
    pub index: usize,
    pub prompt: String,
    pub prompt_tokens: usize,
    pub seed: u64,
    /// The recorded Best-of-N run: rows, tokens, measured and modelled seconds.
    pub recording: RecordingSummary,
    pub rewards: Vec<RewardResult>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordingSummary {
    pub rows: usize,
    pub batch_rows: usize,
    pub tokens_generated: usize,
    /// The live run's measured wall time (its reward was free).
    pub wall_seconds: f64,
    /// The same run priced by the calibration (steps and prefills).
    pub modelled_seconds: f64,
}

/// One reward's results on one prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RewardResult {
    pub reward: RewardName,
    /// Row id → its length and final reward.
    pub lengths: Vec<usize>,
    pub finals: Vec<f32>,
    pub runs: Vec<RunResult>,
    pub correlation: Vec<Correlation>,
    /// Reward-model tokens the replays' memo really ran (the cost of the evaluation itself).
    pub memo_tokens: u64,
    pub live_check: Option<LiveCheck>,
}

/// One replayed run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    /// `bon-64`, `paper α=0.5`, …
    pub label: String,
    pub policy: Option<PolicyName>,
    pub alpha: Option<f32>,
    pub n: usize,
    /// The winner's final reward.
    pub best: f32,
    pub winner_row: u32,
    pub initial_rows: usize,
    pub batches: usize,
    pub steps: usize,
    pub tokens_generated: usize,
    pub reward_tokens: u64,
    pub reward_calls: usize,
    /// Per decision: (position, rows before, rows kept).
    pub decisions: Vec<(usize, usize, usize)>,
    /// Modelled seconds: prefill, decoding steps, reward model.
    pub seconds: [f64; 3],
}

impl RunResult {
    pub fn wall(&self) -> f64 {
        self.seconds.iter().sum()
    }

    pub fn tokens(&self) -> f64 {
        self.tokens_generated as f64 + self.reward_tokens as f64
    }
}

/// Partial against final reward at one position, over the rows still generating there.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Correlation {
    pub position: usize,
    pub rows: usize,
    pub pearson: Option<f64>,
    pub kendall: Option<f64>,
    /// The judge only: τ with the question for unfinished answers at the position.
    #[serde(default)]
    pub kendall_partial_prompt: Option<f64>,
}

/// A live run beside its replay.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveCheck {
    pub label: String,
    /// Candidates, rejected rows, trace and compute counts all equal.
    pub equal: bool,
    /// What differed first, if anything.
    pub difference: Option<String>,
    pub live_wall_seconds: f64,
    pub modelled_seconds: f64,
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
    if *ladder.last().unwrap_or(&0) > specrej_core::MAX_ROWS {
        bail!("--bon: at most {} rows", specrej_core::MAX_ROWS);
    }
    if args.alphas.is_empty() || args.alphas.iter().any(|a| !(0.0..1.0).contains(a)) {
        bail!("--alphas must list rejection rates in [0, 1)");
    }
    if args.max_new_tokens == 0 || args.min_new_tokens == 0 {
        bail!("--max-new-tokens and --min-new-tokens must be at least 1");
    }
    if args.limit == Some(0) || args.sr_n == Some(0) || args.record_rows == 0 {
        bail!("--limit, --sr-n and --record-rows must be at least 1");
    }
    if args.rewards.is_empty() || args.policies.is_empty() {
        bail!("--rewards and --policies must name at least one each");
    }
    if args.probe_lag == 0
        && args.policies.iter().any(|p| matches!(p, PolicyName::Gate | PolicyName::Adaptive))
    {
        bail!("--probe-lag must be at least 1 for the gate and adaptive α");
    }
    if args.backend == BackendArg::Wgpu {
        bail!("--backend wgpu: bench paper runs on candle (cpu or cuda)");
    }
    if args.backend == BackendArg::Cuda
        && let Some(r) =
            args.rewards.iter().find(|r| !matches!(r, RewardName::Judge | RewardName::PartialJudge))
    {
        bail!(
            "--backend cuda --rewards {}: on CUDA only the judge rewards can be evaluated (judge, partial-judge): the GPU's \
             decode step records no per-token NLLs (the likelihood's source) and the self-judge reads the CPU's K/V",
            r.label()
        );
    }
    let largest = *ladder.last().unwrap_or(&1);
    if args.sr_n.is_some_and(|n| n > largest) {
        bail!(
            "--sr-n {} exceeds the rows the recording holds (the largest --bon, {largest})",
            args.sr_n.unwrap_or(0)
        );
    }
    let prompts = match &args.prompts {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            prompts::parse(&text, &path.display().to_string())?
        }
        None => prompts::parse(prompts::ALPACA_FARM_100, "the AlpacaFarm prompts")?,
    };
    let count = args.limit.unwrap_or(prompts.len()).min(prompts.len());
    let path = model::locate(args.model.as_deref())?;
    let options = LoadOptions {
        device: args.backend.candle_device(),
        weights: args.weights.into(),
        ..Default::default()
    };
    let weights = specrej_candle::load(&path, &options)
        .with_context(|| format!("loading {}", path.display()))?;
    let kv_budget_bytes = match args.kv_budget {
        KvBudget::Auto => bail!(
            "--kv-budget auto: bench paper needs a fixed budget both methods share (e.g. 256MB)"
        ),
        KvBudget::Bytes(b) => b,
        KvBudget::Tokens(t) => t.saturating_mul(weights.kv_bytes_per_token() as u64),
    };
    let sampling = Sampling::default();
    let settings = Settings {
        model: path
            .file_name()
            .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
        backend: format!("{:?}", args.backend).to_lowercase(),
        weights: format!("{:?}", args.weights).to_lowercase(),
        // A GPU's caches are f32 whatever the CPU's format (`Model::kv_bytes_per_token`).
        kv_format: if weights.device().is_cpu() {
            format!("{:?}", weights.kv_format()).to_lowercase()
        } else {
            "f32".into()
        },
        bon: ladder.clone(),
        alphas: args.alphas.clone(),
        policies: args.policies.clone(),
        rewards: args.rewards.clone(),
        sr_n: args.sr_n.unwrap_or(largest),
        kv_budget_bytes,
        min_new_tokens: args.min_new_tokens,
        max_new_tokens: args.max_new_tokens,
        probe_lag: args.probe_lag,
        gate_tau: args.gate_tau,
        adaptive_snr: args.adaptive_snr,
        seed: args.seed,
        sampling: format!(
            "temperature {} top-k {} top-p {}",
            sampling.temperature, sampling.top_k, sampling.top_p
        ),
    };
    std::fs::create_dir_all(args.out.join("recordings"))
        .with_context(|| format!("creating {}", args.out.display()))?;
    let results_path = args.out.join("results.json");
    let mut file = load_results(&results_path, &settings)?;
    let todo: Vec<usize> = (0..count)
        .filter(|&i| !file.prompts.iter().any(|p| p.index == i && p.prompt == prompts[i]))
        .collect();
    if todo.len() < count {
        eprintln!(
            "{} of {count} prompts already in {}: skipping them",
            count - todo.len(),
            results_path.display()
        );
    }
    if !todo.is_empty() {
        let text = Text::load(&path)?;
        let from_file = match &args.calibration {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Some(
                    serde_json::from_str::<cost::Calibration>(&text)
                        .with_context(|| format!("{}: not a calibration", path.display()))?,
                )
            }
            _ => None,
        };
        let calibration = match (file.calibration.clone(), from_file) {
            (Some(c), _) => c,
            (None, Some(c)) => {
                file.calibration = Some(c.clone());
                c
            }
            (None, None) => {
                let mut c = calibrate(&weights, &text, &settings)?;
                if !weights.device().is_cpu() {
                    c.machine = format!("CUDA device 0; host {}", c.machine);
                }
                if let Some(path) = &args.calibration {
                    std::fs::write(path, serde_json::to_string_pretty(&c)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                file.calibration = Some(c.clone());
                save_results(&results_path, &file)?;
                c
            }
        };
        let started = Instant::now();
        for (k, &index) in todo.iter().enumerate() {
            let label = format!("prompt {}/{} (#{index})", k + 1, todo.len());
            let check = args.check_live && k == 0;
            let result = run_prompt(
                &weights,
                &text,
                &settings,
                &calibration,
                index,
                &prompts[index],
                &args.out,
                args.record_rows,
                check,
                &label,
            )
            .with_context(|| format!("prompt #{index}"))?;
            file.prompts.retain(|p| p.index != index);
            file.prompts.push(result);
            file.prompts.sort_by_key(|p| p.index);
            save_results(&results_path, &file)?;
            write_reports(&args.out, &file, &prompts[..count], args.bootstrap)?;
            let elapsed = started.elapsed().as_secs_f64();
            let eta = elapsed / (k + 1) as f64 * (todo.len() - k - 1) as f64;
            eprintln!("{label} done · {elapsed:.0} s elapsed · ETA {eta:.0} s");
        }
    }
    let markdown = write_reports(&args.out, &file, &prompts[..count], args.bootstrap)?;
    println!("{markdown}");
    eprintln!("wrote {}, report.md and the SVGs", results_path.display());
    Ok(())
}

fn load_results(path: &Path, settings: &Settings) -> Result<ResultFile> {
    let fresh = ResultFile { settings: settings.clone(), calibration: None, prompts: Vec::new() };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(fresh);
    };
    match serde_json::from_str::<ResultFile>(&text) {
        Ok(file) if file.settings == *settings => Ok(file),
        Ok(_) | Err(_) => {
            let old = path.with_extension("json.old");
            eprintln!(
                "{} holds other settings (or is unreadable): moving it to {}",
                path.display(),
                old.display()
            );
            std::fs::rename(path, &old).with_context(|| format!("moving {}", path.display()))?;
            Ok(fresh)
        }
    }
}

fn save_results(path: &Path, file: &ResultFile) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(file)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes report.md and the SVGs for the selected prompts; returns the markdown.
fn write_reports(
    out: &Path,
    file: &ResultFile,
    selected: &[String],
    bootstrap: usize,
) -> Result<String> {
    let results: Vec<&PromptResult> =
        file.prompts.iter().filter(|p| selected.get(p.index) == Some(&p.prompt)).collect();
    let analyses: Vec<report::Analysis> = file
        .settings
        .rewards
        .iter()
        .map(|&r| report::analyze(&file.settings, &results, r, bootstrap))
        .collect();
    let markdown = report::markdown(&file.settings, file.calibration.as_ref(), &results, &analyses);
    std::fs::write(out.join("report.md"), &markdown).context("writing report.md")?;
    for a in &analyses {
        let name = a.reward.label();
        std::fs::write(
            out.join(format!("improvement_vs_compute-{name}.svg")),
            report::improvement_svg(a),
        )
        .context("writing the improvement plot")?;
        std::fs::write(out.join(format!("correlation-{name}.svg")), report::correlation_svg(a))
            .context("writing the correlation plot")?;
    }
    Ok(markdown)
}

/// The judge's segments for `question`.
fn judge_text(text: &Text, question: &str) -> Result<replay::JudgeText> {
    let s = specrej_text::judge_segments(&text.tokenizer, &text.template, question)?;
    Ok(replay::JudgeText {
        before: s.before,
        after: s.after,
        after_partial: s.after_partial,
        yes: s.yes,
        no: s.no,
    })
}

/// Measures this machine (see [`cost`]).
fn calibrate(weights: &Arc<Model>, text: &Text, settings: &Settings) -> Result<cost::Calibration> {
    let mut say = |m: &str| eprintln!("{m}");
    let question = "Give three tips for staying healthy.";
    let prompt = text.prompt(question, None, false)?;
    let most = settings.sr_n.max(*settings.bon.last().unwrap_or(&1));
    let mut rows: Vec<usize> = [1usize, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        .into_iter()
        .filter(|&r| r < most)
        .collect();
    rows.push(most);
    let mut c = cost::decoder(weights, &prompt, &rows, settings.max_new_tokens.min(384), &mut say)?;
    // A plausible answer to grow the reward calls on.
    let answer = text.tokenizer.encode(
        &"1. Drink plenty of water every day and keep a bottle with you. 2. Sleep seven to nine hours, at regular times. \
          3. Move every day: walk, run, swim or dance, whatever you enjoy. "
            .repeat(4),
        false,
    )?;
    for reward in &settings.rewards {
        let key = reward.cost_key();
        if c.reward.contains_key(key) {
            continue;
        }
        let judge = judge_text(text, question)?;
        let fit = match reward {
            RewardName::Likelihood => {
                let mut shadow = replay::live_cost(*reward, None);
                cost::reward(
                    LikelihoodScorer::new(Arc::clone(weights)).incremental(),
                    &prompt,
                    &answer,
                    &mut |r| shadow(&prompt, r),
                )?
            }
            // The self-judge's calls are priced by the judge's fit (`RewardName::cost_key`).
            RewardName::Judge | RewardName::PartialJudge | RewardName::SelfJudge => {
                let scorer = JudgeScorer::new(
                    Arc::clone(weights),
                    judge.before.clone(),
                    judge.after.clone(),
                    judge.yes,
                    judge.no,
                )
                .with_partial(judge.after_partial.clone())
                .incremental();
                let mut shadow = replay::live_cost(RewardName::Judge, Some(judge));
                cost::reward(scorer, &prompt, &answer, &mut |r| shadow(&prompt, r))?
            }
        };
        say(&format!(
            "calibration: a {key} call costs {:.1} ms + {:.2} ms per token + {:.2} ms per row + {:.3} µs per attended position",
            fit[0] * 1e3,
            fit[1] * 1e3,
            fit[2] * 1e3,
            fit[3] * 1e6
        ));
        c.reward.insert(key.to_string(), fit);
    }
    Ok(c)
}

#[allow(clippy::too_many_arguments, reason = "one call site; the arguments are the run")]
fn run_prompt(
    weights: &Arc<Model>,
    text: &Text,
    settings: &Settings,
    calibration: &cost::Calibration,
    index: usize,
    user: &str,
    out: &Path,
    record_rows: usize,
    check_live: bool,
    label: &str,
) -> Result<PromptResult> {
    let prompt = text.prompt(user, None, false)?;
    let seed = settings.seed + index as u64;
    let needs_nll = settings.rewards.contains(&RewardName::Likelihood);
    let largest = *settings.bon.last().unwrap_or(&1);
    let base = Options {
        method: Method::BestOfN,
        n: largest,
        max_new_tokens: settings.max_new_tokens,
        min_new_tokens: settings.min_new_tokens,
        eos: text.tokenizer.eos_ids().to_vec(),
        sampling: Sampling { seed, ..Sampling::default() },
        rules: Rules::default(),
    };
    // 1. The recording (reused from recordings/ when it is there and matches).
    let rec_path = out.join("recordings").join(format!("prompt-{index}.json"));
    let recording = match std::fs::read_to_string(&rec_path)
        .ok()
        .and_then(|t| serde_json::from_str::<(u64, usize, record::Recording)>(&t).ok())
    {
        Some((s, n, rec))
            if s == seed
                && n == largest
                && rec.rows.iter().all(|r| r.len() <= settings.max_new_tokens)
                && !(needs_nll && rec.missing_nll().is_some()) =>
        {
            rec
        }
        _ => {
            eprintln!(
                "{label}: recording Best-of-{largest} ({} new tokens at most)",
                settings.max_new_tokens
            );
            let rec = record::record(weights, &prompt, &base, record_rows)?;
            if needs_nll && let Some(row) = rec.missing_nll() {
                bail!("recording: row {row} is missing token NLLs");
            }
            std::fs::write(&rec_path, serde_json::to_string(&(seed, largest, &rec))?)
                .with_context(|| format!("writing {}", rec_path.display()))?;
            rec
        }
    };
    let modelled = {
        // The recording as the calibration prices it: its batches' prefills and steps.
        let batches = recording.rows.chunks(recording.batch_rows);
        let mut s = 0.0;
        for rows in batches {
            s += calibration.prefill_seconds(prompt.len());
            let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
            for g in 0..longest {
                let live = rows.iter().filter(|r| r.len() > g).count();
                s += calibration.step_seconds(live, g);
            }
        }
        s
    };
    let summary = RecordingSummary {
        rows: recording.rows.len(),
        batch_rows: recording.batch_rows,
        tokens_generated: recording.stats.tokens_generated,
        wall_seconds: recording.stats.wall_seconds,
        modelled_seconds: modelled,
    };
    let decoder = CandleDecoder::new(
        Arc::clone(weights),
        usize::try_from(settings.kv_budget_bytes).unwrap_or(usize::MAX),
    );
    let memory = replay::Memory {
        capacity: decoder.token_capacity(),
        layout: decoder.kv_layout(),
        kv_bytes_per_token: decoder.kv_bytes_per_token(),
        max_sequence_len: decoder.max_sequence_len(),
    };
    let mut rewards = Vec::new();
    // One judge table for `judge` and `partial-judge`: the same final rewards and caches.
    let mut judge_table: Option<replay::Rewards<'_>> = None;
    let mut likelihood_table: Option<replay::Rewards<'_>> = None;
    let mut self_judge_table: Option<replay::Rewards<'_>> = None;
    for &reward in &settings.rewards {
        eprintln!("{label}: {} rewards and replays", reward.label());
        let slot = match reward {
            RewardName::Likelihood => &mut likelihood_table,
            RewardName::Judge | RewardName::PartialJudge => &mut judge_table,
            RewardName::SelfJudge => &mut self_judge_table,
        };
        if slot.is_none() {
            *slot = Some(match reward {
                RewardName::Likelihood => replay::Rewards::likelihood(&recording),
                RewardName::SelfJudge => {
                    let s = specrej_text::self_judge_segments(&text.tokenizer, &text.template)?;
                    replay::Rewards::self_judge(&recording, weights, &prompt, s.after, s.yes, s.no)
                }
                _ => replay::Rewards::judge(&recording, weights, judge_text(text, user)?, false),
            });
        }
        let Some(table) = slot.as_mut() else { unreachable!("just filled") };
        table.set_name(reward);
        let memo_before = table.computed_tokens;
        let finals = table.finals()?;
        let mut runs = Vec::new();
        let run_one = |table: &mut replay::Rewards<'_>, options: &Options, mode: replay::Mode| {
            replay::replay(&recording, table, &finals, &prompt, options, memory, mode, calibration)
        };
        for &n in &settings.bon {
            let options = Options { n, ..base.clone() };
            let r = run_one(table, &options, replay::Mode::Real)?;
            runs.push(summarize(format!("bon-{n}"), None, None, n, &r));
        }
        let mut replayed_paper_half = None;
        for &policy in &settings.policies {
            for &alpha in &settings.alphas {
                let rules = match policy {
                    PolicyName::Paper | PolicyName::Random | PolicyName::Oracle => Rules::default(),
                    PolicyName::PaperExact => Rules { paper_exact: true, ..Rules::default() },
                    PolicyName::Gate => Rules {
                        probe_lag: settings.probe_lag,
                        gate_tau: Some(settings.gate_tau),
                        ..Rules::default()
                    },
                    PolicyName::Adaptive => Rules {
                        probe_lag: settings.probe_lag,
                        adaptive_snr: Some(settings.adaptive_snr),
                        ..Rules::default()
                    },
                };
                let mode = match policy {
                    PolicyName::Random => replay::Mode::Random,
                    PolicyName::Oracle => replay::Mode::Oracle,
                    _ => replay::Mode::Real,
                };
                let options = replay::sr_options(&base, alpha, settings.sr_n, rules);
                let r = run_one(table, &options, mode)?;
                if policy == PolicyName::Paper && (alpha - 0.5).abs() < 1e-6 {
                    replayed_paper_half =
                        Some((options.clone(), r.outcome.clone(), r.seconds.iter().sum::<f64>()));
                }
                runs.push(summarize(
                    format!("{} α={alpha}", policy.label()),
                    Some(policy),
                    Some(alpha),
                    settings.sr_n,
                    &r,
                ));
            }
        }
        let correlation =
            correlations(table, &recording, &finals, reward, settings.max_new_tokens)?;
        let live_check = match (check_live, replayed_paper_half) {
            (true, Some((options, replayed, modelled))) => {
                eprintln!(
                    "{label}: {} live run of paper α=0.5 to compare with its replay",
                    reward.label()
                );
                Some(live_check(
                    weights,
                    text,
                    user,
                    &prompt,
                    reward,
                    &options,
                    &replayed,
                    modelled,
                    settings.kv_budget_bytes,
                )?)
            }
            _ => None,
        };
        rewards.push(RewardResult {
            reward,
            lengths: recording.rows.iter().map(Vec::len).collect(),
            finals,
            runs,
            correlation,
            memo_tokens: table.computed_tokens - memo_before,
            live_check,
        });
    }
    Ok(PromptResult {
        index,
        prompt: user.to_string(),
        prompt_tokens: prompt.len(),
        seed,
        recording: summary,
        rewards,
    })
}

fn summarize(
    label: String,
    policy: Option<PolicyName>,
    alpha: Option<f32>,
    n: usize,
    r: &replay::Replayed,
) -> RunResult {
    let o = &r.outcome;
    let winner = o.winner();
    RunResult {
        label,
        policy,
        alpha,
        n,
        best: winner.score,
        winner_row: winner.row,
        initial_rows: o.stats.initial_rows,
        batches: o.stats.batches,
        steps: o.stats.steps,
        tokens_generated: o.stats.tokens_generated,
        reward_tokens: o.stats.reward_tokens,
        reward_calls: o.stats.reward_calls,
        decisions: o.trace.iter().map(|d| (d.position, d.live_rows, d.kept_rows)).collect(),
        seconds: r.seconds,
    }
}

/// Partial against final reward at fixed positions, over the rows alive there (the judge:
/// the first 128 rows; the likelihood: all, it is free).
fn correlations(
    table: &mut replay::Rewards<'_>,
    rec: &record::Recording,
    finals: &[f32],
    reward: RewardName,
    max_new: usize,
) -> Result<Vec<Correlation>> {
    let limit =
        if reward == RewardName::Likelihood { rec.rows.len() } else { rec.rows.len().min(128) };
    let mut out = Vec::new();
    for position in [16usize, 32, 64, 128, 256] {
        if position >= max_new {
            break;
        }
        let alive: Vec<u32> =
            (0..limit as u32).filter(|&r| rec.rows[r as usize].len() > position).collect();
        let y: Vec<f64> = alive.iter().map(|&r| f64::from(finals[r as usize])).collect();
        let items: Vec<(u32, usize)> = alive.iter().map(|&r| (r, position)).collect();
        let partial_at = |table: &mut replay::Rewards<'_>| -> Result<Vec<f64>> {
            Ok(table.get(&items, true)?.into_iter().map(f64::from).collect())
        };
        let (pearson, kendall, kendall_partial_prompt) = if alive.len() >= 3 {
            let x = partial_at(table)?;
            let other = if reward == RewardName::Judge {
                // The same rows and positions, asked the question for unfinished answers.
                table.set_name(RewardName::PartialJudge);
                let x = partial_at(table);
                table.set_name(RewardName::Judge);
                specrej_core::select::kendall_tau_b(&x?, &y)
            } else {
                None
            };
            (math::pearson(&x, &y), specrej_core::select::kendall_tau_b(&x, &y), other)
        } else {
            (None, None, None)
        };
        out.push(Correlation {
            position,
            rows: alive.len(),
            pearson,
            kendall,
            kendall_partial_prompt,
        });
    }
    Ok(out)
}

/// Runs `options` live (the real decoder under the budget, the real incremental scorer) and
/// compares it with its replay.
#[allow(clippy::too_many_arguments, reason = "one call site")]
fn live_check(
    weights: &Arc<Model>,
    text: &Text,
    user: &str,
    prompt: &[u32],
    reward: RewardName,
    options: &Options,
    replayed: &Outcome,
    modelled: f64,
    budget: u64,
) -> Result<LiveCheck> {
    let mut decoder =
        CandleDecoder::new(Arc::clone(weights), usize::try_from(budget).unwrap_or(usize::MAX));
    let outcome = match reward {
        RewardName::Likelihood => {
            let mut scorer = LikelihoodScorer::new(Arc::clone(weights)).incremental();
            block_on_ready(specrej_core::generate(
                &mut decoder,
                &mut scorer,
                prompt,
                options,
                &mut |_| {},
            ))?
        }
        RewardName::Judge | RewardName::PartialJudge => {
            let j = judge_text(text, user)?;
            let mut scorer =
                JudgeScorer::new(Arc::clone(weights), j.before, j.after, j.yes, j.no).incremental();
            if reward == RewardName::PartialJudge {
                scorer = scorer.with_partial(j.after_partial);
            }
            block_on_ready(specrej_core::generate(
                &mut decoder,
                &mut scorer,
                prompt,
                options,
                &mut |_| {},
            ))?
        }
        RewardName::SelfJudge => {
            let s = specrej_text::self_judge_segments(&text.tokenizer, &text.template)?;
            let share = KvShare::new(weights);
            decoder.lend_kv(&share)?;
            let mut scorer = SelfJudgeScorer::new(Arc::clone(weights), s.after, s.yes, s.no)
                .borrowing(&share)?;
            block_on_ready(specrej_core::generate(
                &mut decoder,
                &mut scorer,
                prompt,
                options,
                &mut |_| {},
            ))?
        }
    };
    let difference = outcome_difference(&outcome, replayed);
    Ok(LiveCheck {
        label: format!("paper α=0.5 ({})", reward.label()),
        equal: difference.is_none(),
        difference,
        live_wall_seconds: outcome.stats.wall_seconds,
        modelled_seconds: modelled,
    })
}

/// The first thing two outcomes disagree on (times aside), or `None`.
pub fn outcome_difference(a: &Outcome, b: &Outcome) -> Option<String> {
    if a.candidates != b.candidates {
        return Some(format!("candidates: {} vs {}", a.candidates.len(), b.candidates.len()));
    }
    if a.rejected != b.rejected {
        return Some("rejected rows".into());
    }
    if a.trace != b.trace {
        return Some("decision trace".into());
    }
    let (s, t) = (&a.stats, &b.stats);
    let counts = |s: &specrej_core::Stats| {
        (
            s.tokens_generated,
            s.steps,
            s.reward_calls,
            s.reward_tokens,
            s.initial_rows,
            s.batches,
            s.peak_kv_bytes,
        )
    };
    if counts(s) != counts(t) {
        return Some(format!("counts: {:?} vs {:?}", counts(s), counts(t)));
    }
    None
}
