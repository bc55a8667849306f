//! Per-row K/V caches kept between scoring calls, so that re-scoring a sequence that grew
//! runs only what changed.
//!
//! Each row remembers the token ids its cache holds. Asked for the hidden state at the end
//! of new ids, it keeps the cache for the longest common prefix (LCP) of the new ids with the
//! cached ones (a *truncation*: later positions are simply overwritten), and runs the rest.
//! That is exact, not an approximation: position `i`'s K/V depends only on ids `..=i`.
//!
//! The LCP matters when the ids are a re-tokenization of text that grew: BPE merges across
//! the old end of the text, and any fixed suffix (a chat template's end-of-turn, a judge's
//! question), change the last few ids, which are then re-run.
//!
//! Rows are run one at a time (batch 1, `t` new tokens each): rows hold different lengths,
//! and the cost is in the tokens run, not in the batching.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use specrej_core::BackendError;

use crate::model::{alloc_err, device_err, nll_rows, KvCache, Model, to_host_rows};


/// One cached sequence: the ids whose K/V `cache` holds (`cache.len == ids.len()`).
#[derive(Debug)]
struct Cached {
    ids: Vec<u32>,
    cache: KvCache,
}

fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Per-row K/V caches of a model's trunk, reused across calls by longest common prefix.
///
/// Row ids are the scheduler's stable row ids; [`IncrementalRows::release`] drops rows the
/// scheduler rejected. A shared prefix ([`IncrementalRows::set_prefix`]) is run once and
/// copied into each new row's cache.
///
/// Built with [`IncrementalRows::full`], nothing is kept: every call runs every id from
/// scratch (the baseline the incremental mode is measured against).
///
/// Cloning gives an *empty* set of caches on the same model (caches are never shared).
#[derive(Debug)]
pub struct IncrementalRows {
    model: Arc<Model>,
    reuse: bool,
    prefix: Option<Cached>,
    rows: HashMap<u32, Cached>,
}

impl Clone for IncrementalRows {
    fn clone(&self) -> Self {
        Self { model: Arc::clone(&self.model), reuse: self.reuse, prefix: None, rows: HashMap::new() }
    }
}

impl IncrementalRows {
    /// Incremental caches on `model` (a full model or a trunk).
    pub fn new(model: Arc<Model>) -> Self {
        Self { model, reuse: true, prefix: None, rows: HashMap::new() }
    }

    /// No reuse: every call runs all of its ids (the paper's behaviour).
    pub fn full(model: Arc<Model>) -> Self {
        Self { reuse: false, ..Self::new(model) }
    }

    /// Whether caches are kept between calls.
    pub fn is_incremental(&self) -> bool {
        self.reuse
    }

    /// The model the caches belong to.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Rows currently cached.
    pub fn cached_rows(&self) -> usize {
        self.rows.len()
    }

    /// Positions currently cached over all rows (the shared prefix not included).
    pub fn cached_tokens(&self) -> usize {
        self.rows.values().map(|c| c.ids.len()).sum()
    }

    fn check(&self, ids: &[u32]) -> Result<(), BackendError> {
        self.model.check_tokens(ids).map_err(BackendError::Device)?;
        let ctx = self.model.config.context_length;
        if ids.len() > ctx {
            return Err(BackendError::device(format!("scoring input of {} tokens exceeds the context length {ctx}", ids.len())));
        }
        Ok(())
    }

    /// Sets the ids that new rows are likely to start with (e.g. a chat-formatted prompt)
    /// and runs them once, unless they are already the prefix. Returns the tokens run.
    /// A no-op (0) in [`IncrementalRows::full`] mode.
    pub fn set_prefix(&mut self, ids: &[u32]) -> Result<u64, BackendError> {
        if !self.reuse || self.prefix.as_ref().is_some_and(|p| p.ids == ids) {
            return Ok(0);
        }
        self.prefix = None;
        if ids.is_empty() {
            return Ok(0);
        }
        self.check(ids)?;
        let model = &*self.model;
        let mut cache = KvCache::new(model, 1, ids.len()).map_err(alloc_err)?;
        model
            .token_tensor(ids.to_vec(), 1, ids.len())
            .and_then(|t| model.forward_hidden(&t, &mut cache))
            .map_err(device_err)?;
        self.prefix = Some(Cached { ids: ids.to_vec(), cache });
        Ok(ids.len() as u64)
    }

    /// Brings `row`'s cache to exactly `ids` and returns the final-normed hidden state of
    /// the last position (`[hidden]`) and the number of tokens actually run.
    ///
    /// Reuses the row's cache (or, for a row not seen before, the shared prefix) up to the
    /// longest common prefix with `ids`, capped at `ids.len() − 1` so that the last
    /// position is always run. `ids` must not be empty.
    pub fn last_hidden(&mut self, row: u32, ids: &[u32]) -> Result<(Vec<f32>, u64), BackendError> {
        let (hidden, keep) = self.advance(row, ids, 0)?;
        let model = &*self.model;
        let t = ids.len() - keep;
        let hidden = hidden
            .narrow(1, t - 1, 1)
            .and_then(|h| h.squeeze(1)) // [1, hidden]
            .and_then(|h| model.final_norm(&h))
            .and_then(|h| to_host_rows(&h))
            .map_err(device_err)?;
        Ok((hidden, t as u64))
    }

    /// Like [`IncrementalRows::last_hidden`], but returns the final-normed hidden states of
    /// every position that was run, `[ids.len() − first, hidden]` row-major, and `first`,
    /// the first position run. At least `back + 1` positions before the end of the longest
    /// common prefix are re-run too (so that position `first` sees its old successor
    /// replaced when needed). The number of tokens run is `ids.len() − first`.
    pub fn hidden_from(&mut self, row: u32, ids: &[u32], back: usize) -> Result<(Vec<f32>, usize), BackendError> {
        let (hidden, keep) = self.advance(row, ids, back)?;
        let model = &*self.model;
        let normed = hidden
            .squeeze(0)
            .and_then(|h| model.final_norm(&h))
            .and_then(|h| to_host_rows(&h))
            .map_err(device_err)?;
        Ok((normed, keep))
    }

    /// Brings `row`'s cache to `ids`, keeping at most `lcp − back` (and at most
    /// `ids.len() − 1`) cached positions; returns the pre-norm hidden states of the positions
    /// run (`[1, t, hidden]`) and the number kept.
    fn advance(&mut self, row: u32, ids: &[u32], back: usize) -> Result<(Tensor, usize), BackendError> {
        if ids.is_empty() {
            return Err(BackendError::device("incremental scoring: empty input"));
        }
        self.check(ids)?;
        let model = Arc::clone(&self.model);
        let model = &*model;
        let ctx = model.config.context_length;
        let cap = |lcp: usize| lcp.saturating_sub(back).min(ids.len() - 1);
        let (mut cache, keep) = match (self.reuse, self.rows.remove(&row)) {
            (true, Some(mut c)) => {
                let keep = cap(lcp(&c.ids, ids));
                c.cache.len = keep;
                (c.cache, keep)
            }
            (true, None) => match &self.prefix {
                Some(p) if cap(lcp(&p.ids, ids)) > 0 => {
                    let keep = cap(lcp(&p.ids, ids));
                    let mut cache = p.cache.gather_rows(model, &[0], ids.len()).map_err(alloc_err)?;
                    cache.len = keep;
                    (cache, keep)
                }
                _ => (KvCache::new(model, 1, ids.len()).map_err(alloc_err)?, 0),
            },
            (false, _) => (KvCache::new(model, 1, ids.len()).map_err(alloc_err)?, 0),
        };
        cache.reserve(model, ids.len(), ctx).map_err(alloc_err)?;
        let run = &ids[keep..];
        let hidden = model
            .token_tensor(run.to_vec(), 1, run.len())
            .and_then(|t| model.forward_hidden(&t, &mut cache)) // [1, t, hidden]
            .map_err(device_err)?;
        if self.reuse {
            self.rows.insert(row, Cached { ids: ids.to_vec(), cache });
        }
        Ok((hidden, keep))
    }

    /// Drops the caches of `rows` (the scheduler will not ask about them again).
    pub fn release(&mut self, rows: &[u32]) {
        for r in rows {
            self.rows.remove(r);
        }
    }

    /// Drops every cache, the shared prefix included.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.prefix = None;
    }

    /// `−log p(targets[i])` under the head's distribution at each of `n` final-normed
    /// hidden states `[n, hidden]` (needs the model's head). Computed on the model's device:
    /// only the `n` values come back, not `[n, vocab]` logits.
    pub fn head_nll(&self, normed: &[f32], targets: &[u32]) -> Result<Vec<f32>, BackendError> {
        let model = &*self.model;
        let h = model.config.hidden_size;
        Tensor::from_slice(normed, (normed.len() / h, h), &model.device)
            .and_then(|h| model.head_forward(&h)) // [n, vocab]
            .and_then(|l| nll_rows(&l, targets))
            .map_err(device_err)
    }

    /// Logits `[n, vocab]` (row-major) from `n` final-normed hidden states `[n, hidden]`
    /// (needs the model's head).
    pub fn head_logits(&self, normed: &[f32]) -> Result<Vec<f32>, BackendError> {
        let model = &*self.model;
        let h = model.config.hidden_size;
        Tensor::from_slice(normed, (normed.len() / h, h), &model.device)
            .and_then(|h| model.head_forward(&h))
            .and_then(|l| to_host_rows(&l))
            .map_err(device_err)
    }
}
