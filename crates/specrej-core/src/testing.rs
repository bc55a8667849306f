//! A deterministic fake backend for tests and docs (`feature = "testing"`).
//!
//! The "language model" is a hash: a row's logits depend only on the prompt and the row's
//! own history, and sampling uses [`crate::sampling::sample`] with the row's original id,
//! exactly like a real backend. End-of-sequence (token 0) grows likelier with length.

use crate::backend::{BackendError, Decoder, Response, Sampling, Scored, Scorer};
use crate::sampling::{pcg_hash, sample};
use std::ops::Range;

/// The fake model's end-of-sequence token.
pub const FAKE_EOS: u32 = 0;

/// A hash "language model" with a configurable budget and a hidden real memory limit.
#[derive(Clone, Debug)]
pub struct FakeDecoder {
    /// Vocabulary size.
    pub vocab: u32,
    /// What [`Decoder::token_capacity`] claims.
    pub capacity: usize,
    /// The memory that really exists: a step that would cache more tokens than this
    /// fails with [`BackendError::OutOfMemory`]. `None`: same as `capacity`-free.
    pub real_capacity: Option<usize>,
    /// Context length.
    pub max_sequence_len: usize,
    /// How strongly EOS grows with length (0 disables EOS).
    pub eos_rate: f32,
    /// Calls seen, for assertions.
    pub calls: FakeCalls,
}

/// Counters of what the scheduler asked of a [`FakeDecoder`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeCalls {
    /// Prefills, with their row ranges.
    pub prefills: Vec<Range<u32>>,
    /// Successful steps.
    pub steps: usize,
    /// Steps refused for memory.
    pub out_of_memory: usize,
    /// Retains, with the indices kept.
    pub retains: Vec<Vec<usize>>,
    /// Forks, with their (parent index, new id) pairs.
    pub forks: Vec<Vec<(usize, u32)>>,
    /// Largest rows × cached tokens held.
    pub peak_tokens: usize,
}

/// One row of a [`FakeBatch`].
#[derive(Clone, Debug)]
struct FakeRow {
    id: u32,
    context: u32,
    generated: u32,
    pending: Option<u32>,
}

/// The fake's batch state.
#[derive(Clone, Debug)]
pub struct FakeBatch {
    rows: Vec<FakeRow>,
    cached: usize,
    sampling: Sampling,
}

impl FakeDecoder {
    /// A fake with vocabulary 16, the given claimed capacity and no hidden limit.
    pub fn new(capacity: usize) -> Self {
        Self {
            vocab: 16,
            capacity,
            real_capacity: None,
            max_sequence_len: 4096,
            eos_rate: 0.02,
            calls: FakeCalls::default(),
        }
    }

    fn logits(&self, row: &FakeRow) -> Vec<f32> {
        (0..self.vocab)
            .map(|t| {
                let h = pcg_hash(row.context ^ pcg_hash(t.wrapping_add(0x9e37)));
                let mut logit = (h >> 8) as f32 / 16_777_216.0 * 4.0 - 2.0;
                if t == FAKE_EOS {
                    logit = -4.0 + self.eos_rate * 100.0 * (row.generated as f32 / 50.0);
                    if self.eos_rate == 0.0 {
                        logit = f32::NEG_INFINITY;
                    }
                }
                logit
            })
            .collect()
    }
}

impl Decoder for FakeDecoder {
    type Batch = FakeBatch;

    fn token_capacity(&self) -> usize {
        self.capacity
    }

    fn kv_bytes_per_token(&self) -> usize {
        8
    }

    fn max_sequence_len(&self) -> usize {
        self.max_sequence_len
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<FakeBatch, BackendError> {
        if prompt.is_empty() || rows.is_empty() {
            return Err(BackendError::device("prefill: empty prompt or row range"));
        }
        let context = prompt.iter().fold(0x1234_5678u32, |h, &t| pcg_hash(h ^ t));
        self.calls.prefills.push(rows.clone());
        Ok(FakeBatch {
            rows: rows.map(|id| FakeRow { id, context, generated: 0, pending: None }).collect(),
            cached: prompt.len(),
            sampling: *sampling,
        })
    }

    async fn step(&mut self, batch: &mut FakeBatch) -> Result<Vec<u32>, BackendError> {
        let forward = batch.rows.first().is_some_and(|r| r.pending.is_some());
        let cached = batch.cached + usize::from(forward);
        let tokens_held = batch.rows.len() * cached;
        if self.real_capacity.is_some_and(|real| tokens_held > real) {
            self.calls.out_of_memory += 1;
            return Err(BackendError::OutOfMemory);
        }
        batch.cached = cached;
        self.calls.steps += 1;
        self.calls.peak_tokens = self.calls.peak_tokens.max(tokens_held);
        let mut out = Vec::with_capacity(batch.rows.len());
        for row in &mut batch.rows {
            if let Some(token) = row.pending.take() {
                row.context = pcg_hash(row.context ^ token.wrapping_mul(0x85eb_ca6b));
            }
            let token = sample(&self.logits(row), &batch.sampling, row.id, row.generated);
            row.generated += 1;
            row.pending = Some(token);
            out.push(token);
        }
        Ok(out)
    }

    fn retain(&mut self, batch: &mut FakeBatch, keep: &[usize]) -> Result<(), BackendError> {
        crate::backend::check_retain(keep, batch.rows.len())?;
        self.calls.retains.push(keep.to_vec());
        batch.rows = keep.iter().map(|&i| batch.rows[i].clone()).collect();
        Ok(())
    }

    fn fork(
        &mut self,
        batch: &mut FakeBatch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        crate::backend::check_fork(children, batch.rows.len())?;
        self.calls.forks.push(children.to_vec());
        for &(parent, id) in children {
            let row = FakeRow { id, ..batch.rows[parent].clone() };
            batch.rows.push(row);
        }
        Ok(())
    }
}

/// A reward that partial answers predict well: the mean of a per-token hash value.
#[derive(Clone, Debug, Default)]
pub struct FakeScorer {
    /// Row ids the scheduler released, in order.
    pub released: Vec<u32>,
    /// Number of calls (partial and final).
    pub calls: usize,
    /// Calls for partial answers.
    pub partial_calls: usize,
    /// Forks reported, as (parent, child) row ids.
    pub forked: Vec<(u32, u32)>,
    /// What [`Scorer::eager`] answers.
    pub eager: bool,
}

impl FakeScorer {
    /// The reward of one response.
    pub fn reward(tokens: &[u32]) -> f32 {
        if tokens.is_empty() {
            return 0.0;
        }
        let sum: f32 = tokens.iter().map(|&t| (pcg_hash(t) % 1000) as f32 / 1000.0).sum();
        sum / tokens.len() as f32
    }
}

impl Scorer for FakeScorer {
    async fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        self.calls += 1;
        Ok(Scored {
            rewards: responses.iter().map(|r| Self::reward(r.tokens)).collect(),
            tokens_processed: responses
                .iter()
                .map(|r| (prompt.len() + r.tokens.len()) as u64)
                .sum(),
        })
    }

    async fn score_partial(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        self.partial_calls += 1;
        self.score(prompt, responses).await
    }

    fn fork(&mut self, children: &[(u32, u32)]) {
        self.forked.extend_from_slice(children);
    }

    fn release(&mut self, rows: &[u32]) {
        self.released.extend_from_slice(rows);
    }

    fn eager(&self) -> bool {
        self.eager
    }
}
