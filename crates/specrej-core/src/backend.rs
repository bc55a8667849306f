//! The whole backend surface: what the scheduler needs from a device, and nothing more.
//!
//! The trait is at the level the scheduler thinks in (prefill / step / retain / score),
//! not a tensor library. Logits never cross it: per step only `rows` token ids come back,
//! per decision only `rows` rewards.

use std::fmt;
use std::future::Future;
use std::ops::Range;

/// How each row turns its logits into a token. Plain data; backends interpret it with
/// [`crate::sampling::sample`] (CPU) or an equivalent kernel (GPU).
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Sampling {
    /// Keys the noise together with the row id and the position.
    pub seed: u64,
    /// `0.0` means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; `0` means no cut.
    pub top_k: usize,
    /// Nucleus: keep the smallest set of tokens whose probability reaches `top_p`; `1.0` means no cut.
    pub top_p: f32,
}

impl Default for Sampling {
    /// The paper's defaults: T = 1.0, top-k = 50, top-p = 1.0.
    fn default() -> Self {
        Self { seed: 0, temperature: 1.0, top_k: 50, top_p: 1.0 }
    }
}

/// What a backend can report. The scheduler acts on [`BackendError::OutOfMemory`]
/// (an early decision) and forwards the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendError {
    /// The device could not hold the batch: the scheduler rejects rows and retries.
    OutOfMemory,
    /// Anything else, with a message naming what went wrong.
    Device(String),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::OutOfMemory => f.write_str("the backend ran out of memory"),
            BackendError::Device(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for BackendError {}

impl BackendError {
    /// A [`BackendError::Device`] from anything displayable.
    pub fn device(message: impl fmt::Display) -> Self {
        BackendError::Device(message.to_string())
    }
}

/// How a backend holds a batch's K/V, so the scheduler can tell in advance when the next
/// step will not fit ([`Decoder::token_capacity`] counts the same units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KvLayout {
    /// The prompt's K/V is held once per batch, shared by every row; otherwise every row
    /// holds its own copy.
    pub shared_prompt: bool,
    /// Positions are allocated in blocks of this many (1: exactly as many as cached).
    pub block: usize,
}

impl KvLayout {
    /// One dense copy per row, allocated exactly.
    pub const DENSE: KvLayout = KvLayout { shared_prompt: false, block: 1 };

    fn round(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block.max(1)).saturating_mul(self.block.max(1))
    }

    /// Cached-token units held by `rows` rows that each cache a `prompt`-token prompt and
    /// `generated` tokens of their own. Saturates instead of overflowing.
    pub fn tokens(&self, prompt: usize, rows: usize, generated: usize) -> usize {
        if self.shared_prompt {
            self.round(prompt).saturating_add(rows.saturating_mul(self.round(generated)))
        } else {
            rows.saturating_mul(self.round(prompt.saturating_add(generated)))
        }
    }

    /// The most rows (at most `cap`) whose K/V fit `capacity` with `generated` tokens each.
    pub fn max_rows(&self, capacity: usize, prompt: usize, generated: usize, cap: usize) -> usize {
        let (fixed, per_row) = if self.shared_prompt {
            (self.round(prompt), self.round(generated))
        } else {
            (0, self.round(prompt.saturating_add(generated)))
        };
        if fixed > capacity {
            return 0;
        }
        if per_row == 0 {
            return cap;
        }
        ((capacity - fixed) / per_row).min(cap)
    }
}

/// Lock-step batched decoding of one prompt.
///
/// All live rows share one position. A row's tokens depend only on
/// (prompt, [`Sampling::seed`], the row's original id), never on which other rows are alive.
///
/// Only [`Decoder::step`] reads device memory back, so only it returns a future:
/// CPU backends return ready futures, WebGPU ones await a buffer map.
pub trait Decoder {
    /// Device-resident state of one request: the K/V cache
    /// `[layers, rows, len, kv_heads, head_dim]`, the pending logits or tokens, the
    /// original row ids `[rows]`, and the shared position.
    type Batch;

    /// Cached tokens (rows × positions, prompt included) that fit at once.
    fn token_capacity(&self) -> usize;

    /// Bytes of K/V cache one cached token takes (for the peak-memory report).
    fn kv_bytes_per_token(&self) -> usize;

    /// How batches hold their K/V ([`KvLayout::DENSE`] unless the backend says otherwise).
    fn kv_layout(&self) -> KvLayout {
        KvLayout::DENSE
    }

    /// Longest sequence (prompt + generated) the model supports.
    fn max_sequence_len(&self) -> usize;

    /// Runs `prompt` once and fans it out to one row per id in `rows` (ids key the
    /// sampling noise; Best-of-N beyond the budget runs `0..k`, then `k..2k`, …).
    /// Reads nothing back. Contract: `rows` non-empty, `prompt` non-empty.
    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<Self::Batch, BackendError>;

    /// Advances every live row by one token: feeds the previous step's tokens (if any)
    /// through the model, then samples one token per row with the noise keyed by
    /// (seed, row id, number of tokens the row generated before). Resolves to the
    /// sampled tokens, in row order.
    ///
    /// After `k` steps each row's cache holds `prompt.len() + k - 1` tokens; the next step
    /// makes it `prompt.len() + k`.
    fn step(
        &mut self,
        batch: &mut Self::Batch,
    ) -> impl Future<Output = Result<Vec<u32>, BackendError>>;

    /// Keeps the rows at positions `keep` (strictly ascending indices into the current
    /// rows), in that order, and releases the rest. Reads nothing back.
    fn retain(&mut self, batch: &mut Self::Batch, keep: &[usize]) -> Result<(), BackendError>;

    /// Appends one row per `(parent, id)`: row `id` continues from the current row at index
    /// `parent` (its tokens so far, its K/V, shared where the backend can) and from then on
    /// samples with its own noise, keyed by `id`. Reads nothing back.
    ///
    /// The default says the backend cannot (policies that refill memory need it).
    fn fork(
        &mut self,
        batch: &mut Self::Batch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        let _ = (batch, children);
        Err(BackendError::device("this backend cannot fork rows"))
    }
}

/// The check a backend makes before it grows a cache to `rows` rows of `len` positions:
/// `len` must fit the model's context (else a device error naming both), and `rows × len`
/// the token capacity (else [`BackendError::OutOfMemory`], which the scheduler answers with
/// a decision).
pub fn check_fits<D: Decoder + ?Sized>(
    decoder: &D,
    rows: usize,
    len: usize,
) -> Result<(), BackendError> {
    if len > decoder.max_sequence_len() {
        return Err(BackendError::device(format!(
            "sequence length {len} exceeds the model's context length {}",
            decoder.max_sequence_len()
        )));
    }
    if rows.saturating_mul(len) > decoder.token_capacity() {
        return Err(BackendError::OutOfMemory);
    }
    Ok(())
}

/// The contract of [`Decoder::retain`]: `keep` strictly ascending and every index below
/// `rows`; otherwise a device error naming the first offence.
pub fn check_retain(keep: &[usize], rows: usize) -> Result<(), BackendError> {
    if let Some(w) = keep.windows(2).find(|w| w[0] >= w[1]) {
        return Err(BackendError::device(format!(
            "retain: indices must be strictly ascending, got {} before {}",
            w[0], w[1]
        )));
    }
    if let Some(&last) = keep.last()
        && last >= rows
    {
        return Err(BackendError::device(format!(
            "retain: index {last} out of range for {rows} rows"
        )));
    }
    Ok(())
}

/// The contract of [`Decoder::fork`]: every parent index below `rows`.
pub fn check_fork(children: &[(usize, u32)], rows: usize) -> Result<(), BackendError> {
    match children.iter().find(|(parent, _)| *parent >= rows) {
        Some((parent, id)) => Err(BackendError::device(format!(
            "fork: parent index {parent} (for row {id}) out of range for {rows} rows"
        ))),
        None => Ok(()),
    }
}

/// Most positions per row a cache of `rows` rows may allocate: the token capacity shared
/// out, and at most the model's context.
pub fn cap_limit<D: Decoder + ?Sized>(decoder: &D, rows: usize) -> usize {
    (decoder.token_capacity() / rows.max(1)).min(decoder.max_sequence_len())
}

/// One partial or finished response handed to a [`Scorer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response<'a> {
    /// The row's original id (stable for the whole request).
    pub row: u32,
    /// Generated token ids so far, in the policy's vocabulary.
    pub tokens: &'a [u32],
}

/// Rewards for a batch of responses, plus what they cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scored {
    /// One reward per response, in order; higher is better.
    pub rewards: Vec<f32>,
    /// Tokens the reward model processed to produce them.
    pub tokens_processed: u64,
}

/// A reward model. Takes the policy's token ids; re-tokenizing, if the reward model's
/// vocabulary differs, is the implementation's business.
pub trait Scorer {
    /// One reward per response, for `prompt ++ response`.
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>>;

    /// Rewards for partial responses at a decision. The default is [`Scorer::score`]; a
    /// scorer may judge unfinished answers differently (e.g. "is it on track so far?").
    fn score_partial(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        self.score(prompt, responses)
    }

    /// Rows `(parent, child)` were forked: each child's text starts as its parent's (an
    /// incremental scorer may copy the parent's state). The default does nothing.
    fn fork(&mut self, children: &[(u32, u32)]) {
        let _ = children;
    }

    /// The scheduler will never ask about these rows again (they were rejected):
    /// an incremental scorer may drop their state. The default keeps nothing, so does nothing.
    fn release(&mut self, rows: &[u32]) {
        let _ = rows;
    }

    /// Whether finished answers are scored as soon as the decoder has let go of their rows,
    /// instead of all together at the end. A scorer that reads the decoder's memory of an
    /// answer (the self-judge) says yes: that memory may soon be needed for other rows.
    /// Rewards are the same either way; only the calls are grouped differently. The default
    /// is no.
    fn eager(&self) -> bool {
        false
    }
}
