//! Scoring with a reward model: per question, incrementally or from scratch.

use std::sync::Arc;

use specrej_candle::IncrementalRows;
use specrej_core::{BackendError, Response, Scored, Scorer};
use specrej_text::Tokenizer;

use crate::model::RewardModel;

/// The policy's `tokens` as text for the RM: special tokens skipped, and an incomplete
/// trailing UTF-8 character (decoded as U+FFFD) dropped.
pub fn detokenize(policy: &Tokenizer, tokens: &[u32]) -> Result<String, BackendError> {
    let mut text = policy
        .decode(tokens, true)
        .map_err(|e| BackendError::device(format!("policy detokenizer: {e}")))?;
    while text.ends_with('\u{FFFD}') {
        text.pop();
    }
    Ok(text)
}

/// Scores texts for one question on a [`RewardModel`], keeping RM K/V caches per row
/// between calls ([`RewardSession::new`]) or re-running everything ([`RewardSession::full`]).
#[derive(Debug, Clone)]
pub struct RewardSession {
    rm: Arc<RewardModel>,
    question: String,
    rows: IncrementalRows,
}

impl RewardSession {
    /// An incremental session: each call runs only the RM ids that changed per row.
    pub fn new(rm: Arc<RewardModel>, question: impl Into<String>) -> Self {
        let rows = IncrementalRows::new(Arc::clone(rm.trunk()));
        Self { rm, question: question.into(), rows }
    }

    /// A session that re-runs every row's whole chat at every call (the paper's code).
    pub fn full(rm: Arc<RewardModel>, question: impl Into<String>) -> Self {
        let rows = IncrementalRows::full(Arc::clone(rm.trunk()));
        Self { rm, question: question.into(), rows }
    }

    /// The question.
    pub fn question(&self) -> &str {
        &self.question
    }

    /// The reward model.
    pub fn model(&self) -> &Arc<RewardModel> {
        &self.rm
    }

    /// Whether RM caches are kept between calls.
    pub fn is_incremental(&self) -> bool {
        self.rows.is_incremental()
    }

    /// RM positions currently cached over all rows.
    pub fn cached_tokens(&self) -> usize {
        self.rows.cached_tokens()
    }

    /// One reward per `(row id, response text)`; `tokens_processed` counts the RM tokens
    /// actually run (the shared prompt prefix once, when first needed).
    pub fn score_texts(&mut self, responses: &[(u32, &str)]) -> Result<Scored, BackendError> {
        let mut processed = 0u64;
        if responses.is_empty() {
            return Ok(Scored::default());
        }
        if self.rows.is_incremental() {
            let prefix = self.rm.prefix_ids(&self.question)?;
            processed += self.rows.set_prefix(&prefix)?;
        }
        let mut rewards = Vec::with_capacity(responses.len());
        for &(row, text) in responses {
            let ids = self.rm.chat_ids(&self.question, text)?;
            let (hidden, run) = self.rows.last_hidden(row, &ids)?;
            processed += run;
            rewards.push(self.rm.head(&hidden));
        }
        Ok(Scored { rewards, tokens_processed: processed })
    }

    /// Drops the RM caches of `rows`.
    pub fn release(&mut self, rows: &[u32]) {
        self.rows.release(rows);
    }

    /// Rows `(parent, child)` were forked: each child starts with its parent's RM cache.
    pub fn fork(&mut self, children: &[(u32, u32)]) {
        self.rows.fork_rows(children);
    }
}

/// A [`Scorer`] for one question on a local [`RewardModel`] whose tokenizer may differ from
/// the policy's: the policy's ids are detokenized ([`detokenize`]) and re-tokenized by the RM.
///
/// The `prompt` argument of [`Scorer::score`] (the policy's chat-formatted prompt ids) is
/// ignored; the question text given here is what the RM sees as the user turn.
#[derive(Debug, Clone)]
pub struct RewardScorer {
    session: RewardSession,
    policy: Tokenizer,
}

impl RewardScorer {
    /// Incremental scoring (RM caches kept per surviving row between decisions).
    pub fn new(rm: Arc<RewardModel>, policy: Tokenizer, question: impl Into<String>) -> Self {
        Self { session: RewardSession::new(rm, question), policy }
    }

    /// Full re-scoring at every decision (the paper's behaviour; for comparison).
    pub fn full(rm: Arc<RewardModel>, policy: Tokenizer, question: impl Into<String>) -> Self {
        Self { session: RewardSession::full(rm, question), policy }
    }

    /// The session underneath.
    pub fn session(&self) -> &RewardSession {
        &self.session
    }

    fn score_sync(&mut self, responses: &[Response<'_>]) -> Result<Scored, BackendError> {
        let texts = responses
            .iter()
            .map(|r| detokenize(&self.policy, r.tokens))
            .collect::<Result<Vec<_>, _>>()?;
        let pairs: Vec<(u32, &str)> =
            responses.iter().zip(&texts).map(|(r, t)| (r.row, t.as_str())).collect();
        self.session.score_texts(&pairs)
    }
}

impl Scorer for RewardScorer {
    fn score(
        &mut self,
        _prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        std::future::ready(self.score_sync(responses))
    }

    fn fork(&mut self, children: &[(u32, u32)]) {
        self.session.fork(children);
    }

    fn release(&mut self, rows: &[u32]) {
        self.session.release(rows);
    }
}
