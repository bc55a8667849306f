//! Per-row K/V caches kept between scoring calls, so that re-scoring a sequence that grew
//! runs only what changed.
//!
//! Each row remembers the token ids its cache holds. Asked for the hidden state at the end
//! of new ids, it keeps the cache for the longest common prefix (LCP) of the new ids with the
//! cached ones (a *truncation*: later positions are simply overwritten), and runs the rest.
//! That is exact, not an approximation: position `i`'s K/V depends only on ids `..=i`, and
//! on the CPU it is computed by the same arithmetic however the ids are split into calls.
//!
//! The LCP matters when the ids are a re-tokenization of text that grew: BPE merges across
//! the old end of the text, and any fixed suffix (a chat template's end-of-turn, a judge's
//! question), change the last few ids, which are then re-run.
//!
//! On the CPU all rows of a call run in one pass ([`crate::host`]): their new tokens side by
//! side, each at its own position, over one shared prefix held once. On a GPU rows run one
//! at a time (batch 1) over dense caches.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use specrej_core::BackendError;

use crate::host::{PassError, host_vec};
use crate::kv::{KvPool, Seq};
use crate::model::{KvCache, Model, alloc_err, device_err, nll_rows, to_host_rows};

/// One row's cache.
#[derive(Debug)]
enum Cache {
    Host(Seq),
    Dense(KvCache),
}

/// One cached sequence: the ids whose K/V `cache` holds.
#[derive(Debug)]
struct Cached {
    ids: Vec<u32>,
    cache: Cache,
}

fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// How many positions of `ids` a row's cache can keep: of the ids it holds (`cached`), or,
/// for a row without a cache, of the shared `prefix`: the longest common prefix, minus
/// `back`, and at most `ids.len() − 1` (the last position is always run). The rule
/// [`IncrementalRows`] follows; what a call runs is `ids.len()` minus this, so callers can
/// count a call's cost without running it.
pub fn reused_positions(
    cached: Option<&[u32]>,
    prefix: Option<&[u32]>,
    ids: &[u32],
    back: usize,
) -> usize {
    let cap = |lcp: usize| lcp.saturating_sub(back).min(ids.len().saturating_sub(1));
    match (cached, prefix) {
        (Some(old), _) => cap(lcp(old, ids)),
        (None, Some(p)) => cap(lcp(p, ids)),
        (None, None) => 0,
    }
}

/// Per-row K/V caches of a model's trunk, reused across calls by longest common prefix.
///
/// Row ids are the scheduler's stable row ids; [`IncrementalRows::release`] drops rows the
/// scheduler rejected. A shared prefix ([`IncrementalRows::set_prefix`]) is run once; on the
/// CPU new rows read it in place, on a GPU it is copied into each new row's cache.
///
/// Built with [`IncrementalRows::full`], nothing is kept: every call runs every id from
/// scratch (the baseline the incremental mode is measured against).
///
/// Cloning gives an *empty* set of caches on the same model (caches are never shared).
#[derive(Debug)]
pub struct IncrementalRows {
    model: Arc<Model>,
    reuse: bool,
    /// The CPU caches' blocks.
    pool: Arc<KvPool>,
    prefix: Option<(Vec<u32>, Prefix)>,
    rows: HashMap<u32, Cached>,
}

/// A shared prefix's K/V.
#[derive(Debug)]
enum Prefix {
    Host(Arc<Seq>),
    Dense(KvCache),
}

impl Clone for IncrementalRows {
    fn clone(&self) -> Self {
        Self::with_reuse(Arc::clone(&self.model), self.reuse)
    }
}

/// What one row of a batched call ran: the final-normed hidden states of the positions
/// run (`[t, hidden]` row-major) and the first position run.
#[derive(Debug, Clone, PartialEq)]
pub struct Ran {
    /// `[t, hidden]` f32, row-major: positions `first..ids.len()`.
    pub hidden: Vec<f32>,
    /// First position run (the cached positions before it were reused).
    pub first: usize,
}

impl IncrementalRows {
    /// Incremental caches on `model` (a full model or a trunk).
    pub fn new(model: Arc<Model>) -> Self {
        Self::with_reuse(model, true)
    }

    /// No reuse: every call runs all of its ids (the paper's behaviour).
    pub fn full(model: Arc<Model>) -> Self {
        Self::with_reuse(model, false)
    }

    fn with_reuse(model: Arc<Model>, reuse: bool) -> Self {
        // The caches live as long as their rows; allocation failure is the only limit.
        let pool = KvPool::new(model.kv_shape(), model.kv_format, usize::MAX);
        Self { model, reuse, pool, prefix: None, rows: HashMap::new() }
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

    /// Bytes of K/V the CPU caches hold right now, the shared prefix included (0 on a GPU).
    pub fn kv_bytes_held(&self) -> u64 {
        self.pool.in_use() as u64 * self.pool.block_bytes() as u64
    }

    fn on_host(&self) -> bool {
        self.model.device.is_cpu()
    }

    fn check(&self, ids: &[u32]) -> Result<(), BackendError> {
        self.model.check_tokens(ids).map_err(BackendError::Device)?;
        let ctx = self.model.config.context_length;
        if ids.len() > ctx {
            return Err(BackendError::device(format!(
                "scoring input of {} tokens exceeds the context length {ctx}",
                ids.len()
            )));
        }
        Ok(())
    }

    /// Sets the ids that new rows are likely to start with (e.g. a chat-formatted prompt)
    /// and runs them once, unless they are already the prefix. Returns the tokens run.
    /// A no-op (0) in [`IncrementalRows::full`] mode.
    pub fn set_prefix(&mut self, ids: &[u32]) -> Result<u64, BackendError> {
        if !self.reuse || self.prefix.as_ref().is_some_and(|(p, _)| p == ids) {
            return Ok(0);
        }
        self.prefix = None;
        if ids.is_empty() {
            return Ok(0);
        }
        self.check(ids)?;
        let model = &*self.model;
        let prefix = if self.on_host() {
            let mut seq = Seq::new();
            model.forward_seqs(&mut [(&mut seq, ids)], &self.pool).map_err(PassError::backend)?;
            Prefix::Host(Arc::new(seq))
        } else {
            let mut cache = KvCache::new(model, 1, ids.len()).map_err(alloc_err)?;
            model
                .token_tensor(ids.to_vec(), 1, ids.len())
                .and_then(|t| model.forward_hidden(&t, &mut cache))
                .map_err(device_err)?;
            Prefix::Dense(cache)
        };
        self.prefix = Some((ids.to_vec(), prefix));
        Ok(ids.len() as u64)
    }

    /// Brings `row`'s cache to exactly `ids` and returns the final-normed hidden state of
    /// the last position (`[hidden]`) and the number of tokens actually run.
    ///
    /// Reuses the row's cache (or, for a row not seen before, the shared prefix) up to the
    /// longest common prefix with `ids`, capped at `ids.len() − 1` so that the last
    /// position is always run. `ids` must not be empty.
    pub fn last_hidden(&mut self, row: u32, ids: &[u32]) -> Result<(Vec<f32>, u64), BackendError> {
        let (mut hidden, run) = self.last_hidden_many(&[(row, ids)])?;
        Ok((hidden.swap_remove(0), run))
    }

    /// [`IncrementalRows::last_hidden`] for many rows at once (on the CPU, one pass):
    /// the final-normed last hidden state of each, and the tokens run over all of them.
    /// A row may appear only once.
    pub fn last_hidden_many(
        &mut self,
        items: &[(u32, &[u32])],
    ) -> Result<(Vec<Vec<f32>>, u64), BackendError> {
        let h = self.model.config.hidden_size;
        let ran = self.run_many(items, 0, true)?;
        let run: u64 =
            items.iter().zip(&ran).map(|((_, ids), r)| (ids.len() - r.first) as u64).sum();
        let last = ran.into_iter().map(|r| r.hidden[r.hidden.len() - h..].to_vec()).collect();
        Ok((last, run))
    }

    /// Like [`IncrementalRows::last_hidden`], but returns the final-normed hidden states of
    /// every position that was run, `[ids.len() − first, hidden]` row-major, and `first`,
    /// the first position run. At least `back + 1` positions before the end of the longest
    /// common prefix are re-run too (so that position `first` sees its old successor
    /// replaced when needed). The number of tokens run is `ids.len() − first`.
    pub fn hidden_from(
        &mut self,
        row: u32,
        ids: &[u32],
        back: usize,
    ) -> Result<(Vec<f32>, usize), BackendError> {
        let mut ran = self.hidden_from_many(&[(row, ids)], back)?;
        let r = ran.swap_remove(0);
        Ok((r.hidden, r.first))
    }

    /// [`IncrementalRows::hidden_from`] for many rows at once (on the CPU, one pass).
    pub fn hidden_from_many(
        &mut self,
        items: &[(u32, &[u32])],
        back: usize,
    ) -> Result<Vec<Ran>, BackendError> {
        self.run_many(items, back, false)
    }

    /// Brings each row's cache to its ids, keeping at most `lcp − back` (and at most
    /// `ids.len() − 1`) cached positions, and returns the final-normed hidden states of the
    /// positions run (all of them, or only the last when `last_only`, as `[1, hidden]`)
    /// with the first position run.
    fn run_many(
        &mut self,
        items: &[(u32, &[u32])],
        back: usize,
        last_only: bool,
    ) -> Result<Vec<Ran>, BackendError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        for (_, ids) in items {
            if ids.is_empty() {
                return Err(BackendError::device("incremental scoring: empty input"));
            }
            self.check(ids)?;
        }
        for (i, (row, _)) in items.iter().enumerate() {
            if items[..i].iter().any(|(r, _)| r == row) {
                return Err(BackendError::device(format!(
                    "incremental scoring: row {row} appears twice in one call"
                )));
            }
        }
        if !self.on_host() {
            let mut out = Vec::with_capacity(items.len());
            for &(row, ids) in items {
                out.push(self.advance_dense(row, ids, back, last_only)?);
            }
            return Ok(out);
        }
        // Each row's sequence, cut back to what it can keep.
        let mut seqs: Vec<(Seq, usize)> = Vec::with_capacity(items.len());
        for &(row, ids) in items {
            let reused = if self.reuse { self.rows.remove(&row) } else { None };
            let (seq, keep) = match reused {
                Some(Cached { ids: old, cache: Cache::Host(mut seq) }) => {
                    let keep = reused_positions(Some(&old), None, ids, back);
                    seq.truncate(keep);
                    (seq, keep)
                }
                _ => match &self.prefix {
                    Some((p_ids, Prefix::Host(p))) if self.reuse => {
                        let keep = reused_positions(None, Some(p_ids), ids, back);
                        (if keep > 0 { Seq::on_prefix(p, keep) } else { Seq::new() }, keep)
                    }
                    _ => (Seq::new(), 0),
                },
            };
            seqs.push((seq, keep));
        }
        let model = Arc::clone(&self.model);
        let h = model.config.hidden_size;
        let hidden = {
            let mut pass: Vec<(&mut Seq, &[u32])> = seqs
                .iter_mut()
                .zip(items)
                .map(|((seq, keep), (_, ids))| (seq, &ids[*keep..]))
                .collect();
            model.forward_seqs(&mut pass, &self.pool).map_err(PassError::backend)?
        }; // [Σ t, hidden]
        // Final norm of the positions asked for.
        let mut picked = Vec::new(); // flat token indices
        let mut offset = 0;
        for ((_, keep), (_, ids)) in seqs.iter().zip(items) {
            let t = ids.len() - keep;
            if last_only {
                picked.push((offset + t - 1) as u32);
            } else {
                picked.extend((offset..offset + t).map(|i| i as u32));
            }
            offset += t;
        }
        let normed = Tensor::new(picked.as_slice(), hidden.device())
            .and_then(|ids| hidden.index_select(&ids, 0))
            .and_then(|h| model.final_norm(&h))
            .and_then(|h| host_vec(&h))
            .map_err(device_err)?;
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for ((seq, keep), &(row, ids)) in seqs.into_iter().zip(items) {
            let t = if last_only { 1 } else { ids.len() - keep };
            out.push(Ran { hidden: normed[at * h..(at + t) * h].to_vec(), first: keep });
            at += t;
            if self.reuse {
                self.rows.insert(row, Cached { ids: ids.to_vec(), cache: Cache::Host(seq) });
            }
        }
        Ok(out)
    }

    /// One row on a GPU: batch 1 over a dense cache.
    fn advance_dense(
        &mut self,
        row: u32,
        ids: &[u32],
        back: usize,
        last_only: bool,
    ) -> Result<Ran, BackendError> {
        let model = Arc::clone(&self.model);
        let model = &*model;
        let ctx = model.config.context_length;
        let reused = if self.reuse { self.rows.remove(&row) } else { None };
        let (mut cache, keep) = match reused {
            Some(Cached { ids: old, cache: Cache::Dense(mut c) }) => {
                let keep = reused_positions(Some(&old), None, ids, back);
                c.len = keep;
                (c, keep)
            }
            _ => match &self.prefix {
                Some((p_ids, Prefix::Dense(p)))
                    if self.reuse && reused_positions(None, Some(p_ids), ids, back) > 0 =>
                {
                    let keep = reused_positions(None, Some(p_ids), ids, back);
                    let mut cache = p.gather_rows(model, &[0], ids.len()).map_err(alloc_err)?;
                    cache.len = keep;
                    (cache, keep)
                }
                _ => (KvCache::new(model, 1, ids.len()).map_err(alloc_err)?, 0),
            },
        };
        cache.reserve(model, ids.len(), ctx).map_err(alloc_err)?;
        let run = &ids[keep..];
        let hidden = model
            .token_tensor(run.to_vec(), 1, run.len())
            .and_then(|t| model.forward_hidden(&t, &mut cache)) // [1, t, hidden]
            .and_then(|h| h.squeeze(0))
            .and_then(|h| if last_only { h.narrow(0, run.len() - 1, 1) } else { Ok(h) })
            .and_then(|h| model.final_norm(&h))
            .and_then(|h| to_host_rows(&h))
            .map_err(device_err)?;
        if self.reuse {
            self.rows.insert(row, Cached { ids: ids.to_vec(), cache: Cache::Dense(cache) });
        }
        Ok(Ran { hidden, first: keep })
    }

    /// Rows `(parent, child)` were forked: each child starts with its parent's cache (on the
    /// CPU its blocks are shared until written). Parents without a cache are skipped.
    pub fn fork_rows(&mut self, children: &[(u32, u32)]) {
        if !self.reuse {
            return;
        }
        for &(parent, child) in children {
            let Some(cached) = self.rows.get(&parent) else { continue };
            let copy = match &cached.cache {
                Cache::Host(seq) => Some(Cache::Host(seq.fork())),
                Cache::Dense(cache) => {
                    let rows: Vec<usize> = vec![0];
                    cache.gather_rows(&self.model, &rows, cache.cap).ok().map(|mut c| {
                        c.len = cache.len;
                        Cache::Dense(c)
                    })
                }
            };
            if let Some(cache) = copy {
                let ids = cached.ids.clone();
                self.rows.insert(child, Cached { ids, cache });
            }
        }
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
