//! The scheduler: prefill → step → (decide → retain) → … → score → argmax.
//!
//! One `async fn` serves every host: CPU backends return ready futures (drive them with
//! [`crate::block_on_ready`]), WebGPU ones are awaited by the browser's executor.

use crate::backend::{BackendError, Decoder, KvLayout, Response, Sampling, Scored, Scorer};
use crate::select;
use std::fmt;

/// Which algorithm to run.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case", tag = "method"))]
pub enum Method {
    /// N rows to the end (in as many sequential batches as the KV budget needs), then argmax.
    BestOfN,
    /// Start with as many rows as fit; at each decision token drop the lowest `alpha` fraction.
    SpeculativeRejection {
        /// Rejection rate in `[0, 1)`.
        alpha: f32,
    },
}

/// What to generate and how.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// The algorithm.
    pub method: Method,
    /// Best-of-N: the number of rows. Speculative Rejection: the cap on the initial rows.
    pub n: usize,
    /// New tokens per row at most.
    pub max_new_tokens: usize,
    /// Speculative Rejection: the initial batch leaves every row room for at least this
    /// many new tokens before the first decision.
    pub min_new_tokens: usize,
    /// Tokens that end a row (the token itself is kept in the row's text).
    pub eos: Vec<u32>,
    /// Sampling parameters and seed.
    pub sampling: Sampling,
    /// Speculative Rejection's decision rules.
    pub rules: Rules,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            method: Method::SpeculativeRejection { alpha: 0.5 },
            n: 32,
            max_new_tokens: 256,
            min_new_tokens: 32,
            eos: Vec::new(),
            sampling: Sampling::default(),
            rules: Rules::default(),
        }
    }
}

/// How Speculative Rejection decides.
///
/// Ours (the default): at a decision only the live rows are ranked; the best
/// `max(1, round_half_away((1 − α)·live))` are kept, and never more than leave every kept
/// row room for `min_new_tokens` more tokens in the budget (so a tight budget with a small
/// α cannot turn every step into a decision); rows that finished stay candidates whatever
/// their score.
///
/// `paper_exact`: the reference code's rules (Sun et al.'s `perform_speculative_rejection`):
/// finished rows are ranked together with the live ones (scored with their whole text), the
/// best `round_half_even((1 − α)·(finished + live))` are kept (possibly none), a row that
/// finished is dropped if it falls below the first cut after it finished, and no room is
/// reserved between decisions.
///
/// Policies beyond the paper (each off by default; they apply to our rules, not to
/// `paper_exact`):
/// * `probe_lag`: the live rows are also scored `probe_lag` tokens before each decision the
///   budget forces (the *probe*), so a decision can compare two rankings of the same rows;
/// * `gate_tau` (the rank-stability gate): until the Kendall τ between the probe's and the
///   decision's scores reaches `gate_tau`, a decision only frees room for `probe_lag` more
///   tokens (it keeps as many rows as fit that long), and the next decision compares again;
///   once τ has reached it, decisions cut at α as usual;
/// * `adaptive_snr` (adaptive α): a decision cuts at `α · min(1, snr / adaptive_snr)`, where
///   `snr` is the spread of the scores (their standard deviation) over their drift since the
///   probe (the median |Δ score|): indistinguishable rows are cut less;
/// * `refill`: after a cut, the freed memory (room for `min_new_tokens` more per row) is
///   filled with forks of the kept rows, new rows that continue a kept row's text with noise
///   of their own (ids from the initial batch size up); with `Some(0.0)` the parents are the
///   kept rows best first, round robin, with `Some(λ)` they are drawn with probability
///   ∝ exp(score / λ). Needs a backend that can [`Decoder::fork`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct Rules {
    /// The reference implementation's ranking and rounding instead of ours.
    pub paper_exact: bool,
    /// Tokens before each budget decision at which the live rows are scored too (0: never).
    pub probe_lag: usize,
    /// The rank-stability gate's Kendall τ (needs `probe_lag`).
    pub gate_tau: Option<f32>,
    /// Adaptive α: the spread-over-drift ratio at which the full α applies (needs `probe_lag`).
    pub adaptive_snr: Option<f32>,
    /// Fill freed memory with forks of the kept rows; the value is the resampling temperature.
    pub refill: Option<f32>,
}

/// Why a row stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Finish {
    /// It sampled an end-of-sequence token.
    Eos,
    /// It reached `max_new_tokens` or the model's context length.
    Length,
    /// The KV budget could not hold even this one row any longer.
    Capacity,
}

/// A finished row: a candidate for the final argmax.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Candidate {
    /// The row's id (stable for the request; keys its sampling noise).
    pub row: u32,
    /// Generated tokens (an EOS token, if any, is the last).
    pub tokens: Vec<u32>,
    /// The reward model's score of the whole response.
    pub score: f32,
    /// Why it stopped.
    pub finish: Finish,
}

/// A row dropped at a decision, with the partial score that sank it.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Rejected {
    /// The row's id.
    pub row: u32,
    /// Tokens it had generated when dropped.
    pub tokens: Vec<u32>,
    /// Its partial score at that decision.
    pub score: f32,
}

/// One decision of Speculative Rejection.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Decision {
    /// Tokens every live row had generated at the decision.
    pub position: usize,
    /// Rows alive before the decision.
    pub live_rows: usize,
    /// Rows kept.
    pub kept_rows: usize,
    /// Lowest partial score.
    pub min: f32,
    /// Median partial score.
    pub median: f32,
    /// Highest partial score.
    pub max: f32,
    /// Lowest score among the kept rows (the cut line).
    pub threshold: f32,
    /// Forced by an out-of-memory report from the backend rather than by the budget.
    pub early: bool,
    /// Kendall τ between the probe's scores and these, over the rows in both (`None` without
    /// a probe, or with fewer than two rows in both).
    pub tau: Option<f32>,
    /// The rejection rate this decision applied (α, or less: adaptive α, the gate, the room).
    pub alpha: f32,
    /// Rows forked from the kept ones (refill).
    pub forked: usize,
}

/// What a run cost. Times are 0 where the platform has no clock (a host may fill them in).
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
pub struct Stats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens run through the model (once per batch).
    pub prefill_tokens: usize,
    /// Tokens sampled over all rows.
    pub tokens_generated: usize,
    /// Batched decoding steps.
    pub steps: usize,
    /// Rows at the start of the first batch.
    pub initial_rows: usize,
    /// Sequential batches (more than one only for Best-of-N beyond the budget).
    pub batches: usize,
    /// Calls to the reward model.
    pub reward_calls: usize,
    /// Tokens the reward model processed.
    pub reward_tokens: u64,
    /// The backend's token capacity.
    pub token_capacity: usize,
    /// Largest K/V cache held at once, in bytes.
    pub peak_kv_bytes: u64,
    /// Wall time of the whole run, in seconds.
    pub wall_seconds: f64,
    /// Seconds in [`Decoder::prefill`].
    pub prefill_seconds: f64,
    /// Seconds in [`Decoder::step`].
    pub step_seconds: f64,
    /// Seconds in the reward model (decisions and the final scoring).
    pub reward_seconds: f64,
    /// Seconds in [`Decoder::retain`] (decisions and rows that finished).
    pub retain_seconds: f64,
}

/// The result of a run.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Outcome {
    /// Every finished row, best first (ties: lower row id first). Never empty.
    pub candidates: Vec<Candidate>,
    /// Rows dropped at decisions, in the order they were dropped.
    pub rejected: Vec<Rejected>,
    /// One entry per decision.
    pub trace: Vec<Decision>,
    /// Costs.
    pub stats: Stats,
}

impl Outcome {
    /// The best candidate.
    pub fn winner(&self) -> &Candidate {
        &self.candidates[0]
    }
}

/// What the scheduler reports while it runs (progress bars, streaming, the web demo).
#[derive(Debug)]
pub enum Event<'a> {
    /// A batch was prefilled with rows `first_row..first_row + rows`.
    Prefilled { first_row: u32, rows: usize },
    /// Every live row sampled one token; `rows[i]` sampled `tokens[i]`.
    Step { position: usize, rows: &'a [u32], tokens: &'a [u32] },
    /// A decision: `rows[i]` scored `scores[i]`; `kept` lists the surviving row ids.
    Decision { decision: &'a Decision, rows: &'a [u32], scores: &'a [f32], kept: &'a [u32] },
    /// A row finished and became a candidate (not yet scored).
    Finished { row: u32, finish: Finish },
    /// Refill: new rows `(parent, child)` continue their parents' text.
    Forked { children: &'a [(u32, u32)] },
    /// All candidates were scored.
    Scored { candidates: &'a [Candidate] },
}

/// Why a run failed.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// The request itself is wrong; the message names what.
    InvalidRequest(String),
    /// The backend or the reward model failed.
    Backend(BackendError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidRequest(message) => write!(f, "invalid request: {message}"),
            Error::Backend(error) => write!(f, "backend error: {error}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<BackendError> for Error {
    fn from(error: BackendError) -> Self {
        Error::Backend(error)
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidRequest(message.into())
}

/// The most rows one request may have (Best-of-N's `n`, Speculative Rejection's initial
/// batch): row ids are `u32`, and far fewer than this fit any real memory.
pub const MAX_ROWS: usize = 1 << 24;

/// Checks `options` against `prompt` and the model; the message names what is wrong.
pub fn validate(prompt: &[u32], options: &Options, max_sequence_len: usize) -> Result<(), Error> {
    if prompt.is_empty() {
        return Err(invalid("the prompt is empty"));
    }
    if options.n == 0 {
        return Err(invalid("n must be at least 1"));
    }
    if options.n > MAX_ROWS {
        return Err(invalid(format!(
            "n is {}; a request may have at most {MAX_ROWS} rows",
            options.n
        )));
    }
    if options.max_new_tokens == 0 {
        return Err(invalid("max_new_tokens must be at least 1"));
    }
    if let Method::SpeculativeRejection { alpha } = options.method
        && !(0.0..1.0).contains(&alpha)
    {
        return Err(invalid(format!("alpha must be in [0, 1), got {alpha}")));
    }
    let s = &options.sampling;
    if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
        return Err(invalid(format!("temperature must be finite and >= 0, got {}", s.temperature)));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(invalid(format!("top_p must be in (0, 1], got {}", s.top_p)));
    }
    if prompt.len() >= max_sequence_len {
        return Err(invalid(format!(
            "the prompt has {} tokens; the model's context holds {max_sequence_len}",
            prompt.len()
        )));
    }
    Ok(())
}

/// Runs `options.method` on `prompt` and returns every candidate, best first.
pub async fn generate<D: Decoder, S: Scorer>(
    decoder: &mut D,
    scorer: &mut S,
    prompt: &[u32],
    options: &Options,
    observer: &mut dyn FnMut(&Event<'_>),
) -> Result<Outcome, Error> {
    let clock = Clock::start();
    validate(prompt, options, decoder.max_sequence_len())?;
    let max_new = options.max_new_tokens.min(decoder.max_sequence_len() - prompt.len());
    let capacity = decoder.token_capacity();
    let layout = decoder.kv_layout();
    let mut run = Run {
        prompt,
        options,
        max_new,
        capacity,
        layout,
        kv_bytes_per_token: decoder.kv_bytes_per_token() as u64,
        candidates: Vec::new(),
        ranked: Vec::new(),
        rejected: Vec::new(),
        trace: Vec::new(),
        stats: Stats { prompt_tokens: prompt.len(), token_capacity: capacity, ..Stats::default() },
        probe: None,
        gate_open: false,
        next_row: 0,
    };

    match options.method {
        Method::BestOfN => {
            let chunk = layout.max_rows(capacity, prompt.len(), max_new, options.n);
            if chunk == 0 {
                return Err(invalid(format!(
                    "one row needs {} cached tokens (prompt {} + max_new_tokens {max_new}) \
                     but the KV budget holds {capacity}: raise the KV budget or lower max_new_tokens",
                    layout.tokens(prompt.len(), 1, max_new),
                    prompt.len()
                )));
            }
            run.stats.initial_rows = chunk;
            let mut first = 0;
            while first < options.n {
                let rows = chunk.min(options.n - first);
                run.batch(decoder, scorer, first as u32, rows, None, observer).await?;
                first += rows;
            }
        }
        Method::SpeculativeRejection { alpha } => {
            let room = options.min_new_tokens.min(max_new).max(1);
            let rows = layout.max_rows(capacity, prompt.len(), room, options.n);
            if rows == 0 {
                return Err(invalid(format!(
                    "the KV budget ({capacity} tokens) cannot hold the prompt ({} tokens) plus {room} new tokens",
                    prompt.len(),
                )));
            }
            run.stats.initial_rows = rows;
            run.next_row = rows as u32;
            run.batch(decoder, scorer, 0, rows, Some(alpha), observer).await?;
        }
    }

    // Score every candidate not scored yet at once, and rank them.
    run.score_finished(scorer).await?;
    run.candidates.sort_by(|a, b| {
        select::rank_key(b.score).total_cmp(&select::rank_key(a.score)).then(a.row.cmp(&b.row))
    });
    observer(&Event::Scored { candidates: &run.candidates });
    run.stats.wall_seconds = clock.seconds();
    Ok(Outcome {
        candidates: run.candidates,
        rejected: run.rejected,
        trace: run.trace,
        stats: run.stats,
    })
}

/// Mutable state of one run.
struct Run<'p> {
    prompt: &'p [u32],
    options: &'p Options,
    max_new: usize,
    capacity: usize,
    layout: KvLayout,
    kv_bytes_per_token: u64,
    candidates: Vec<Candidate>,
    /// `paper_exact`: finished rows that still take part in rankings, as (row id, whether it
    /// has survived a ranking yet).
    ranked: Vec<(u32, bool)>,
    rejected: Vec<Rejected>,
    trace: Vec<Decision>,
    stats: Stats,
    /// The probe: where the live rows were scored before the coming decision, and their scores.
    probe: Option<(usize, Vec<(u32, f32)>)>,
    /// The rank-stability gate has opened.
    gate_open: bool,
    /// The id the next forked row gets.
    next_row: u32,
}

/// A live row on the host side: its id and its text so far.
struct Live {
    row: u32,
    tokens: Vec<u32>,
}

/// Scores `responses` (partial ones at a decision, whole ones otherwise), checks the
/// answer's length and counts the cost into `stats`.
async fn score<S: Scorer>(
    scorer: &mut S,
    prompt: &[u32],
    responses: &[Response<'_>],
    partial: bool,
    stats: &mut Stats,
) -> Result<Vec<f32>, Error> {
    if responses.is_empty() {
        return Ok(Vec::new());
    }
    let clock = Clock::start();
    let result = if partial {
        scorer.score_partial(prompt, responses).await
    } else {
        scorer.score(prompt, responses).await
    };
    stats.reward_seconds += clock.seconds();
    let Scored { rewards, tokens_processed } = result?;
    if rewards.len() != responses.len() {
        return Err(Error::Backend(BackendError::device(format!(
            "the reward model returned {} scores for {} responses",
            rewards.len(),
            responses.len()
        ))));
    }
    stats.reward_calls += 1;
    stats.reward_tokens += tokens_processed;
    Ok(rewards)
}

/// `round((1 − α)·n)` as Python rounds (half to even), at least 0.
fn keep_paper(n: usize, alpha: f32) -> usize {
    let x = (1.0 - f64::from(alpha)) * n as f64;
    let floor = x.floor();
    let diff = x - floor;
    let rounded =
        if diff > 0.5 || (diff == 0.5 && floor % 2.0 != 0.0) { floor + 1.0 } else { floor };
    (rounded.max(0.0) as usize).min(n)
}

impl Run<'_> {
    /// Runs rows `first_row..first_row + rows` to the end. With `alpha`, decisions
    /// happen whenever the next step would not fit the budget (or the backend runs out
    /// of memory); without, the batch must fit as it is.
    async fn batch<D: Decoder, S: Scorer>(
        &mut self,
        decoder: &mut D,
        scorer: &mut S,
        first_row: u32,
        rows: usize,
        alpha: Option<f32>,
        observer: &mut dyn FnMut(&Event<'_>),
    ) -> Result<(), Error> {
        let clock = Clock::start();
        let prefilled = decoder.prefill(
            self.prompt,
            first_row..first_row + rows as u32,
            &self.options.sampling,
        );
        self.stats.prefill_seconds += clock.seconds();
        let mut batch = prefilled?;
        self.stats.batches += 1;
        self.stats.prefill_tokens += self.prompt.len();
        observer(&Event::Prefilled { first_row, rows });
        let mut live: Vec<Live> =
            (0..rows as u32).map(|i| Live { row: first_row + i, tokens: Vec::new() }).collect();
        let mut generated = 0usize;

        while !live.is_empty() {
            if generated == self.max_new {
                for row in live.drain(..) {
                    self.finish(row, Finish::Length, observer);
                }
                break;
            }
            // After the next step every row caches the prompt and `generated` tokens of its own.
            let next_len = self.prompt.len() + generated;
            if alpha.is_some() && self.wants_probe(live.len(), generated) {
                let responses: Vec<Response<'_>> =
                    live.iter().map(|l| Response { row: l.row, tokens: &l.tokens }).collect();
                let scores = score(scorer, self.prompt, &responses, true, &mut self.stats).await?;
                drop(responses);
                self.probe =
                    Some((generated, live.iter().zip(scores).map(|(l, s)| (l.row, s)).collect()));
            }
            if let Some(alpha) = alpha
                && self.layout.tokens(self.prompt.len(), live.len(), generated) > self.capacity
            {
                self.decide(
                    decoder, scorer, &mut batch, &mut live, alpha, generated, false, observer,
                )
                .await?;
                continue;
            }
            let clock = Clock::start();
            let stepped = decoder.step(&mut batch).await;
            self.stats.step_seconds += clock.seconds();
            let tokens = match stepped {
                Ok(tokens) => tokens,
                Err(BackendError::OutOfMemory) if alpha.is_some() => {
                    let alpha = alpha.unwrap_or_default();
                    self.decide(
                        decoder, scorer, &mut batch, &mut live, alpha, generated, true, observer,
                    )
                    .await?;
                    continue;
                }
                Err(BackendError::OutOfMemory) => {
                    return Err(Error::Backend(BackendError::device(format!(
                        "out of memory with {} rows at {next_len} cached tokens each; \
                         lower n or the KV budget (Best-of-N cannot drop rows)",
                        live.len()
                    ))));
                }
                Err(error) => return Err(error.into()),
            };
            if tokens.len() != live.len() {
                return Err(Error::Backend(BackendError::device(format!(
                    "the backend returned {} tokens for {} rows",
                    tokens.len(),
                    live.len()
                ))));
            }
            generated += 1;
            self.stats.steps += 1;
            self.stats.tokens_generated += tokens.len();
            self.stats.peak_kv_bytes = self.stats.peak_kv_bytes.max(
                self.layout.tokens(self.prompt.len(), live.len(), generated - 1) as u64
                    * self.kv_bytes_per_token,
            );
            let ids: Vec<u32> = live.iter().map(|l| l.row).collect();
            observer(&Event::Step { position: generated - 1, rows: &ids, tokens: &tokens });

            let mut keep = Vec::with_capacity(live.len());
            let mut still = Vec::with_capacity(live.len());
            for (index, (mut row, token)) in live.drain(..).zip(tokens).enumerate() {
                row.tokens.push(token);
                if self.options.eos.contains(&token) {
                    self.finish(row, Finish::Eos, observer);
                } else {
                    keep.push(index);
                    still.push(row);
                }
            }
            let finished_some = keep.len() != ids.len();
            live = still;
            if finished_some && !live.is_empty() {
                self.retain(decoder, &mut batch, &keep)?;
                if scorer.eager() {
                    self.score_finished(scorer).await?;
                }
            }
        }
        drop(batch); // the decoder lets go of the last rows
        if scorer.eager() {
            self.score_finished(scorer).await?;
        }
        Ok(())
    }

    /// Scores every candidate not scored yet (whole answers).
    async fn score_finished<S: Scorer>(&mut self, scorer: &mut S) -> Result<(), Error> {
        let unscored: Vec<usize> =
            (0..self.candidates.len()).filter(|&i| self.candidates[i].score.is_nan()).collect();
        self.score_candidates(scorer, &unscored).await
    }

    /// Scores candidates `indices` (whole answers) in one call.
    async fn score_candidates<S: Scorer>(
        &mut self,
        scorer: &mut S,
        indices: &[usize],
    ) -> Result<(), Error> {
        let responses: Vec<Response<'_>> = indices
            .iter()
            .map(|&i| Response { row: self.candidates[i].row, tokens: &self.candidates[i].tokens })
            .collect();
        let scored = score(scorer, self.prompt, &responses, false, &mut self.stats).await?;
        drop(responses);
        for (&i, score) in indices.iter().zip(scored) {
            self.candidates[i].score = score;
        }
        Ok(())
    }

    /// Whether to probe now: a probing policy is on, and the budget will force a decision
    /// exactly `probe_lag` steps from now (if no row finishes before).
    fn wants_probe(&self, rows: usize, generated: usize) -> bool {
        let rules = &self.options.rules;
        let lag = rules.probe_lag;
        if rules.paper_exact
            || lag == 0
            || (rules.gate_tau.is_none() && rules.adaptive_snr.is_none())
        {
            return false;
        }
        if rules.gate_tau.is_some() && rules.adaptive_snr.is_none() && self.gate_open {
            return false;
        }
        if self.probe.as_ref().is_some_and(|(at, _)| *at == generated) {
            return false; // scored here already (a gated decision keeps its scores)
        }
        let at = generated + lag;
        at < self.max_new
            && self.layout.tokens(self.prompt.len(), rows, at) > self.capacity
            && self.layout.tokens(self.prompt.len(), rows, at - 1) <= self.capacity
    }

    fn retain<D: Decoder>(
        &mut self,
        decoder: &mut D,
        batch: &mut D::Batch,
        keep: &[usize],
    ) -> Result<(), Error> {
        let clock = Clock::start();
        let result = decoder.retain(batch, keep);
        self.stats.retain_seconds += clock.seconds();
        Ok(result?)
    }

    fn finish(&mut self, row: Live, finish: Finish, observer: &mut dyn FnMut(&Event<'_>)) {
        observer(&Event::Finished { row: row.row, finish });
        if self.options.rules.paper_exact && finish != Finish::Capacity {
            self.ranked.push((row.row, false));
        }
        self.candidates.push(Candidate {
            row: row.row,
            tokens: row.tokens,
            score: f32::NAN,
            finish,
        });
    }

    /// Scores the live rows, keeps the best, drops the rest (backend and scorer state), and
    /// with `refill` fills the freed memory with forks of the kept rows.
    /// `generated`: tokens every live row holds.
    #[allow(
        clippy::too_many_arguments,
        reason = "one private call site pair; a struct would only rename them"
    )]
    async fn decide<D: Decoder, S: Scorer>(
        &mut self,
        decoder: &mut D,
        scorer: &mut S,
        batch: &mut D::Batch,
        live: &mut Vec<Live>,
        alpha: f32,
        generated: usize,
        early: bool,
        observer: &mut dyn FnMut(&Event<'_>),
    ) -> Result<(), Error> {
        let responses: Vec<Response<'_>> =
            live.iter().map(|l| Response { row: l.row, tokens: &l.tokens }).collect();
        let scores = score(scorer, self.prompt, &responses, true, &mut self.stats).await?;
        drop(responses);
        let rules = self.options.rules;
        let prompt = self.prompt.len();
        let n = live.len();
        // The probe's scores and these, for the rows in both.
        let (before, now): (Vec<f32>, Vec<f32>) = match &self.probe {
            Some((_, probe)) => live
                .iter()
                .zip(&scores)
                .filter_map(|(l, &s)| {
                    probe.iter().find(|(row, _)| *row == l.row).map(|&(_, p)| (p, s))
                })
                .unzip(),
            None => (Vec::new(), Vec::new()),
        };
        self.probe = None;
        let tau = select::kendall_tau(&before, &now);
        // Rows the next step fits (it caches `generated` tokens per row).
        let fit = self.layout.max_rows(self.capacity, prompt, generated, n);
        // Rows that fit `steps` more steps (or to the end).
        let (layout, capacity, max_new) = (self.layout, self.capacity, self.max_new);
        let room = |steps: usize| {
            let last = (generated + steps.max(1)).min(max_new) - 1;
            layout.max_rows(capacity, prompt, last, n).max(fit.min(1))
        };
        let mut keep = if rules.paper_exact {
            self.keep_paper_exact(scorer, &scores, alpha).await?.min(fit)
        } else {
            let mut alpha = alpha;
            if let Some(target) = rules.adaptive_snr
                && before.len() >= 2
            {
                // Cut less when the rows' scores spread less than they drift.
                let snr = select::spread_over_drift(&before, &now);
                alpha *= (snr / target).clamp(0.0, 1.0);
            }
            let mut keep = select::keep_count(n, alpha).min(room(self.options.min_new_tokens));
            if let Some(min_tau) = rules.gate_tau
                && !self.gate_open
            {
                if tau.is_some_and(|t| t >= min_tau) {
                    self.gate_open = true;
                } else {
                    // Not stable yet: free room for `probe_lag` more tokens only, and compare
                    // these scores with the next decision's.
                    keep = keep.max(room(rules.probe_lag));
                    self.probe = Some((
                        generated,
                        live.iter().zip(&scores).map(|(l, &s)| (l.row, s)).collect(),
                    ));
                }
            }
            keep
        };
        if early {
            // The backend could not hold these rows: drop at least one.
            keep = keep.min(n - 1);
        }
        let applied = if n == 0 { 0.0 } else { 1.0 - keep as f32 / n as f32 };
        if keep == 0 && !rules.paper_exact {
            // Not even one row fits any more: the best one ends here, the rest are rejected.
            let best = select::top_indices(&scores, 1)[0];
            self.record(live, &scores, &[best], early, (tau, applied, 0), observer);
            self.reject(scorer, live, &scores, Some(best));
            let kept = live.swap_remove(best);
            live.clear();
            self.finish(kept, Finish::Capacity, observer);
            return Ok(());
        }
        let indices = select::top_indices(&scores, keep);
        // Refill: forks of the kept rows into the freed memory.
        let children = match rules.refill {
            Some(temperature) if !early && !rules.paper_exact && !indices.is_empty() => {
                let slots = room(self.options.min_new_tokens).saturating_sub(indices.len());
                let kept_scores: Vec<f32> = indices.iter().map(|&i| scores[i]).collect();
                let key = crate::sampling::row_key(
                    self.options.sampling.seed,
                    u32::MAX,
                    self.trace.len() as u32,
                );
                select::parents(&kept_scores, slots, temperature, key)
                    .into_iter()
                    .map(|parent| {
                        let id = self.next_row;
                        self.next_row += 1;
                        (parent, id)
                    })
                    .collect::<Vec<(usize, u32)>>()
            }
            _ => Vec::new(),
        };
        self.record(live, &scores, &indices, early, (tau, applied, children.len()), observer);
        if !indices.is_empty() {
            self.retain(decoder, batch, &indices)?;
        }
        let mut kept = Vec::with_capacity(indices.len() + children.len());
        let mut dropped = Vec::new();
        let mut dropped_scores = Vec::new();
        let mut next = indices.iter().peekable();
        for (i, row) in live.drain(..).enumerate() {
            if next.peek() == Some(&&i) {
                next.next();
                kept.push(row);
            } else {
                dropped_scores.push(scores[i]);
                dropped.push(row);
            }
        }
        self.reject(scorer, &dropped, &dropped_scores, None);
        if !children.is_empty() {
            let clock = Clock::start();
            let forked = decoder.fork(batch, &children);
            self.stats.retain_seconds += clock.seconds();
            forked?;
            let pairs: Vec<(u32, u32)> =
                children.iter().map(|&(parent, id)| (kept[parent].row, id)).collect();
            scorer.fork(&pairs);
            for &(parent, id) in &children {
                let tokens = kept[parent].tokens.clone();
                kept.push(Live { row: id, tokens });
            }
            observer(&Event::Forked { children: &pairs });
        }
        *live = kept;
        Ok(())
    }

    /// `paper_exact`: ranks the finished rows still in the running (scoring the new ones)
    /// with the live rows' `scores`; drops the finished rows below the cut (a new one leaves
    /// the candidates, one that survived a ranking before stays a candidate but leaves the
    /// rankings) and returns how many live rows make the cut.
    async fn keep_paper_exact<S: Scorer>(
        &mut self,
        scorer: &mut S,
        scores: &[f32],
        alpha: f32,
    ) -> Result<usize, Error> {
        let index_of =
            |candidates: &[Candidate], row: u32| candidates.iter().position(|c| c.row == row);
        let fresh: Vec<usize> = self
            .ranked
            .iter()
            .filter_map(|&(row, _)| index_of(&self.candidates, row))
            .filter(|&i| self.candidates[i].score.is_nan())
            .collect();
        self.score_candidates(scorer, &fresh).await?;
        // The reference sorts finished rows first, then the live ones, by score (stable).
        let finished: Vec<(u32, bool, f32)> = self
            .ranked
            .iter()
            .filter_map(|&(row, settled)| {
                index_of(&self.candidates, row).map(|i| (row, settled, self.candidates[i].score))
            })
            .collect();
        let mut order: Vec<(f32, usize)> =
            finished.iter().map(|f| f.2).chain(scores.iter().copied()).zip(0..).collect();
        order.sort_by(|a, b| select::rank_key(b.0).total_cmp(&select::rank_key(a.0)));
        let keep_amount = keep_paper(order.len(), alpha);
        let kept: Vec<usize> = order[..keep_amount].iter().map(|&(_, i)| i).collect();
        let mut still = Vec::new();
        for (i, &(row, settled, s)) in finished.iter().enumerate() {
            if kept.contains(&i) {
                still.push((row, true));
            } else if !settled {
                // Cut at its first ranking: it leaves the candidates.
                if let Some(at) = index_of(&self.candidates, row) {
                    let c = self.candidates.remove(at);
                    self.rejected.push(Rejected { row, tokens: c.tokens, score: s });
                    scorer.release(&[row]);
                }
            }
        }
        self.ranked = still;
        Ok(kept.iter().filter(|&&i| i >= finished.len()).count())
    }

    /// Reports and records a decision; `(tau, alpha, forked)` as in [`Decision`].
    fn record(
        &mut self,
        live: &[Live],
        scores: &[f32],
        kept: &[usize],
        early: bool,
        (tau, alpha, forked): (Option<f32>, f32, usize),
        observer: &mut dyn FnMut(&Event<'_>),
    ) {
        let (min, median, max) = select::summary(scores);
        let threshold =
            kept.iter().map(|&i| select::rank_key(scores[i])).fold(f32::INFINITY, f32::min);
        let decision = Decision {
            position: live.first().map_or(0, |l| l.tokens.len()),
            live_rows: live.len(),
            kept_rows: kept.len(),
            min,
            median,
            max,
            threshold,
            early,
            tau,
            alpha,
            forked,
        };
        let rows: Vec<u32> = live.iter().map(|l| l.row).collect();
        let kept_ids: Vec<u32> = kept.iter().map(|&i| live[i].row).collect();
        observer(&Event::Decision { decision: &decision, rows: &rows, scores, kept: &kept_ids });
        self.trace.push(decision);
    }

    /// Records `rows` (minus `skip`) as rejected and tells the scorer to forget them.
    fn reject<S: Scorer>(
        &mut self,
        scorer: &mut S,
        rows: &[Live],
        scores: &[f32],
        skip: Option<usize>,
    ) {
        let mut ids = Vec::with_capacity(rows.len());
        for (i, (row, &score)) in rows.iter().zip(scores).enumerate() {
            if Some(i) == skip {
                continue;
            }
            ids.push(row.row);
            self.rejected.push(Rejected { row: row.row, tokens: row.tokens.clone(), score });
        }
        scorer.release(&ids);
    }
}

/// Wall clock where the platform has one (not on `wasm32-unknown-unknown`, where
/// `Instant::now` panics; the browser host measures time itself).
struct Clock {
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    start: std::time::Instant,
}

impl Clock {
    fn start() -> Self {
        Self {
            #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
            start: std::time::Instant::now(),
        }
    }

    fn seconds(&self) -> f64 {
        #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
        return self.start.elapsed().as_secs_f64();
        #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
        return 0.0;
    }
}
