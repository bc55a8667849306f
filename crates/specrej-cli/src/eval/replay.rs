//! Replaying policies over a recorded Best-of-N run: rewards on demand (memoised), the
//! reward model's compute counted as the live incremental scorer would count it, and a run's
//! wall time priced by the calibration.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use specrej_candle::{JudgeScorer, Model, SelfJudgeScorer, reused_positions};
use specrej_core::likelihood;
use specrej_core::replay::{Call, ReplayDecoder};
use specrej_core::{
    BackendError, KvLayout, Method, Options, Outcome, Response, Rules, Scored, Scorer,
    block_on_ready,
};

use super::cost::{Calibration, Cost};
use super::record::Recording;

/// The rewards `bench paper` evaluates.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum RewardName {
    /// The policy as a judge: logit(Yes) − logit(No).
    Judge,
    /// The same judge, asked at decisions whether an unfinished answer is on track.
    PartialJudge,
    /// −perplexity of the answer under the policy (the paper's self-reward setting).
    Likelihood,
    /// The policy asked after its own answer, in the same conversation (reads the
    /// decoder's K/V live: a call runs each row's question and last sampled token).
    SelfJudge,
}

impl RewardName {
    pub fn label(self) -> &'static str {
        match self {
            RewardName::Judge => "judge",
            RewardName::PartialJudge => "partial-judge",
            RewardName::Likelihood => "likelihood",
            RewardName::SelfJudge => "self-judge",
        }
    }

    /// The calibration's key for this reward's calls: the self-judge's calls are the judge's
    /// kind (the policy's forward over new positions after a cached context), priced by the
    /// same fit on what they run.
    pub fn cost_key(self) -> &'static str {
        match self {
            RewardName::Judge | RewardName::PartialJudge | RewardName::SelfJudge => "judge",
            RewardName::Likelihood => "likelihood",
        }
    }
}

/// The judge's prompt segments (the partial one for decisions, where used).
#[derive(Clone, Debug)]
pub struct JudgeText {
    pub before: Vec<u32>,
    pub after: Vec<u32>,
    pub after_partial: Vec<u32>,
    pub yes: u32,
    pub no: u32,
}

/// One prompt's rewards, for any row and any prefix of it: from the recording's NLLs
/// (likelihood, exact and free) or from the judge (computed once per (row, length, prompt),
/// batched, memoised; each row's whole text run once, see [`JudgeScorer::score_prefixes`]).
pub struct Rewards<'r> {
    rec: &'r Recording,
    name: RewardName,
    judge: Option<(JudgeScorer, JudgeText)>,
    /// `(row, length, partial prompt)` → reward.
    memo: HashMap<(u32, usize, bool), f32>,
    /// Reward-model tokens the memo really ran (what computing this table cost).
    pub computed_tokens: u64,
}

impl<'r> Rewards<'r> {
    pub fn likelihood(rec: &'r Recording) -> Self {
        Self {
            rec,
            name: RewardName::Likelihood,
            judge: None,
            memo: HashMap::new(),
            computed_tokens: 0,
        }
    }

    /// The self-judge: a judge whose `before` is the policy's `prompt` and which asks `after`
    /// at decisions too (`after[0]` ends the assistant's turn: see [`Rewards::get`]).
    pub fn self_judge(
        rec: &'r Recording,
        model: &Arc<Model>,
        prompt: &[u32],
        after: Vec<u32>,
        yes: u32,
        no: u32,
    ) -> Self {
        let text =
            JudgeText { before: prompt.to_vec(), after_partial: after.clone(), after, yes, no };
        let scorer = JudgeScorer::new(
            Arc::clone(model),
            text.before.clone(),
            text.after.clone(),
            text.yes,
            text.no,
        );
        Self {
            rec,
            name: RewardName::SelfJudge,
            judge: Some((scorer, text)),
            memo: HashMap::new(),
            computed_tokens: 0,
        }
    }

    pub fn judge(rec: &'r Recording, model: &Arc<Model>, text: JudgeText, partial: bool) -> Self {
        let scorer = JudgeScorer::new(
            Arc::clone(model),
            text.before.clone(),
            text.after.clone(),
            text.yes,
            text.no,
        )
        .with_partial(text.after_partial.clone());
        let name = if partial { RewardName::PartialJudge } else { RewardName::Judge };
        Self { rec, name, judge: Some((scorer, text)), memo: HashMap::new(), computed_tokens: 0 }
    }

    pub fn name(&self) -> RewardName {
        self.name
    }

    /// A judge table serves `judge` and `partial-judge` alike (one memo, one cache):
    /// which decisions ask is set here.
    pub fn set_name(&mut self, name: RewardName) {
        let judges = [RewardName::Judge, RewardName::PartialJudge];
        if judges.contains(&self.name) && judges.contains(&name) {
            self.name = name;
        }
    }

    /// Rewards of `(row, length)` prefixes; `partial`: as scored at a decision.
    pub fn get(&mut self, items: &[(u32, usize)], partial: bool) -> Result<Vec<f32>, BackendError> {
        let partial_prompt = partial && self.name == RewardName::PartialJudge;
        if self.name == RewardName::Likelihood {
            return Ok(items
                .iter()
                .map(|&(row, len)| {
                    let nll = &self.rec.nll[row as usize][..len];
                    likelihood::reward(nll.iter().map(|&x| f64::from(x)).sum(), len)
                })
                .collect());
        }
        let missing: Vec<(u32, usize)> = {
            let mut m: Vec<(u32, usize)> = items
                .iter()
                .copied()
                .filter(|&(row, len)| !self.memo.contains_key(&(row, len, partial_prompt)))
                .collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if !missing.is_empty() {
            let Some((scorer, text)) = self.judge.as_mut() else {
                return Err(BackendError::device("rewards: no judge"));
            };
            // The self-judge reads an answer that ends the assistant's turn (its EOS) without
            // that token: its question starts with it.
            let self_judge = self.name == RewardName::SelfJudge;
            let rows = &self.rec.rows;
            let asked = |row: u32, len: usize| {
                let prefix = &rows[row as usize][..len];
                if self_judge { SelfJudgeScorer::answer(prefix, &text.after).len() } else { len }
            };
            // Each row's whole text is run once and kept; a prefix then runs only the question.
            let asks: Vec<(Response<'_>, usize)> = missing
                .iter()
                .map(|&(row, len)| (Response { row, tokens: &rows[row as usize] }, asked(row, len)))
                .collect();
            let scored = scorer.score_prefixes(&asks, partial_prompt)?;
            self.computed_tokens += scored.tokens_processed;
            for (&(row, len), reward) in missing.iter().zip(scored.rewards) {
                self.memo.insert((row, len, partial_prompt), reward);
            }
        }
        Ok(items.iter().map(|&(row, len)| self.memo[&(row, len, partial_prompt)]).collect())
    }

    /// Every row's final reward (its whole text).
    pub fn finals(&mut self) -> Result<Vec<f32>, BackendError> {
        let items: Vec<(u32, usize)> =
            self.rec.rows.iter().enumerate().map(|(i, r)| (i as u32, r.len())).collect();
        self.get(&items, false)
    }

    fn judge_text(&self) -> Option<&JudgeText> {
        self.judge.as_ref().map(|(_, t)| t)
    }
}

/// How the decision scores of a replayed run are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The reward model's.
    Real,
    /// Random numbers (the floor): a hash of the row and the position.
    Random,
    /// Each row's final reward (the ceiling).
    Oracle,
}

/// The compute a live incremental scorer would spend: the ids each row's cache holds,
/// updated by the rule [`IncrementalRows`](specrej_candle::IncrementalRows) follows.
struct Shadow {
    name: RewardName,
    prefix: Option<Vec<u32>>,
    rows: HashMap<u32, Vec<u32>>,
}

impl Shadow {
    fn new(name: RewardName) -> Self {
        Self { name, prefix: None, rows: HashMap::new() }
    }

    /// What one call runs, as the live scorer would run it.
    fn call(
        &mut self,
        prompt: &[u32],
        judge: Option<&JudgeText>,
        responses: &[Response<'_>],
        partial: bool,
    ) -> Cost {
        if let (RewardName::SelfJudge, Some(j)) = (self.name, judge) {
            return self_judge_cost(prompt, &j.after, responses);
        }
        let (prefix, back): (Vec<u32>, usize) = match (self.name, judge) {
            (RewardName::Likelihood, _) => (prompt.to_vec(), 1),
            (_, Some(j)) => (j.before.clone(), 0),
            (_, None) => return Cost::default(),
        };
        let (mut tokens, mut pairs, mut rows) = (0u64, 0u64, 0u64);
        if self.name == RewardName::Likelihood
            && self.prefix.as_deref().is_some_and(|p| p != prompt)
        {
            self.rows.clear(); // the live scorer drops its caches on a new prompt
        }
        if self.prefix.as_deref() != Some(&prefix[..]) {
            tokens += prefix.len() as u64;
            pairs += (1..=prefix.len() as u64).sum::<u64>();
            rows += 1;
            self.prefix = Some(prefix.clone());
        }
        for r in responses {
            let ids: Vec<u32> = match (self.name, judge) {
                (RewardName::Likelihood, _) if r.tokens.is_empty() => continue,
                (RewardName::Likelihood, _) => [prompt, &r.tokens[..r.tokens.len() - 1]].concat(),
                (name, Some(j)) => {
                    let after = if partial && name == RewardName::PartialJudge {
                        &j.after_partial
                    } else {
                        &j.after
                    };
                    [&j.before[..], r.tokens, &after[..]].concat()
                }
                (_, None) => continue,
            };
            let keep = reused_positions(
                self.rows.get(&r.row).map(Vec::as_slice),
                Some(&prefix),
                &ids,
                back,
            );
            tokens += (ids.len() - keep) as u64;
            pairs += (keep as u64 + 1..=ids.len() as u64).sum::<u64>();
            rows += 1;
            self.rows.insert(r.row, ids);
        }
        Cost { tokens, rows, pairs }
    }
}

/// What the live self-judge runs on lent K/V: per row, what the decoder has not run (its
/// last sampled token, unless that ends the turn, which the question starts with) and the
/// question, each new position attending to everything before it.
fn self_judge_cost(prompt: &[u32], after: &[u32], responses: &[Response<'_>]) -> Cost {
    let mut cost = Cost::default();
    for r in responses {
        let answer = SelfJudgeScorer::answer(r.tokens, after).len();
        // The decoder ran every sampled token but the last.
        let ran = answer.min(r.tokens.len().saturating_sub(1));
        let (keep, total) =
            ((prompt.len() + ran) as u64, (prompt.len() + answer + after.len()) as u64);
        cost.tokens += total - keep;
        cost.pairs += (keep + 1..=total).sum::<u64>();
        cost.rows += 1;
    }
    cost
}

/// The reward model of a replayed run: rewards from [`Rewards`], decision scores as `mode`
/// says, compute as a live incremental scorer's.
struct ReplayScorer<'a, 'r> {
    rewards: &'a mut Rewards<'r>,
    finals: &'a [f32],
    mode: Mode,
    seed: u64,
    shadow: Shadow,
    /// What each call ran.
    calls: Vec<Cost>,
}

impl ReplayScorer<'_, '_> {
    fn run(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
        partial: bool,
    ) -> Result<Scored, BackendError> {
        let items: Vec<(u32, usize)> = responses.iter().map(|r| (r.row, r.tokens.len())).collect();
        let rewards = match (partial, self.mode) {
            (false, _) | (true, Mode::Real) => self.rewards.get(&items, partial)?,
            (true, Mode::Random) => items
                .iter()
                .map(|&(row, len)| {
                    specrej_core::sampling::uniform(
                        specrej_core::sampling::row_key(self.seed, row, len as u32),
                        0x5eed,
                    )
                })
                .collect(),
            (true, Mode::Oracle) => {
                items.iter().map(|&(row, _)| self.finals[row as usize]).collect()
            }
        };
        let judge = self.rewards.judge_text().cloned();
        let cost = self.shadow.call(prompt, judge.as_ref(), responses, partial);
        self.calls.push(cost);
        Ok(Scored { rewards, tokens_processed: cost.tokens })
    }
}

impl Scorer for ReplayScorer<'_, '_> {
    async fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        self.run(prompt, responses, false)
    }

    async fn score_partial(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        self.run(prompt, responses, true)
    }

    fn fork(&mut self, children: &[(u32, u32)]) {
        for &(parent, child) in children {
            if let Some(ids) = self.shadow.rows.get(&parent).cloned() {
                self.shadow.rows.insert(child, ids);
            }
        }
    }

    fn release(&mut self, rows: &[u32]) {
        for r in rows {
            self.shadow.rows.remove(r);
        }
    }

    /// As the live self-judge: finished answers as they finish.
    fn eager(&self) -> bool {
        self.shadow.name == RewardName::SelfJudge
    }
}

/// The memory a replayed run gets: the budget, in the live decoder's layout.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub capacity: usize,
    pub layout: KvLayout,
    pub kv_bytes_per_token: usize,
    pub max_sequence_len: usize,
}

/// A replayed run's outcome and its priced cost.
pub struct Replayed {
    pub outcome: Outcome,
    /// Modelled seconds: prefill, steps, reward.
    pub seconds: [f64; 3],
}

/// Replays `options` over `rec` under `memory`, with `mode` decision scores.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per kind of run; a struct would only rename them"
)]
pub fn replay(
    rec: &Recording,
    rewards: &mut Rewards<'_>,
    finals: &[f32],
    prompt: &[u32],
    options: &Options,
    memory: Memory,
    mode: Mode,
    calibration: &Calibration,
) -> Result<Replayed> {
    let mut decoder = ReplayDecoder::new(
        &rec.rows,
        memory.capacity,
        memory.layout,
        memory.kv_bytes_per_token,
        memory.max_sequence_len,
    );
    let name = rewards.name();
    let mut scorer = ReplayScorer {
        rewards,
        finals,
        mode,
        seed: options.sampling.seed ^ 0x7a9d,
        shadow: Shadow::new(name),
        calls: Vec::new(),
    };
    let outcome = block_on_ready(specrej_core::generate(
        &mut decoder,
        &mut scorer,
        prompt,
        options,
        &mut |_| {},
    ))?;
    let mut seconds = [0.0; 3];
    for call in &decoder.calls {
        match *call {
            Call::Prefill { prompt, .. } => seconds[0] += calibration.prefill_seconds(prompt),
            Call::Step { rows, generated } => {
                seconds[1] += calibration.step_seconds(rows, generated)
            }
            Call::Retain { .. } => {}
        }
    }
    for &cost in &scorer.calls {
        seconds[2] += calibration.reward_seconds(name.cost_key(), cost);
    }
    Ok(Replayed { outcome, seconds })
}

/// What a live incremental `name` scorer runs on a sequence of calls (the calibration fits
/// its costs against this). Releases are not seen: give every call rows it has not used.
pub fn live_cost(
    name: RewardName,
    judge: Option<JudgeText>,
) -> impl FnMut(&[u32], &[Response<'_>]) -> Cost {
    let mut shadow = Shadow::new(name);
    move |prompt, responses| shadow.call(prompt, judge.as_ref(), responses, true)
}

/// The options of a Speculative Rejection replay.
pub fn sr_options(base: &Options, alpha: f32, n: usize, rules: Rules) -> Options {
    Options { method: Method::SpeculativeRejection { alpha }, n, rules, ..base.clone() }
}
