//! Branches off the K/V of sequences known in full: the reward of every prefix of a text
//! whose whole text is known up front (replay), each prefix's K/V read in place.
//!
//! Each row's *base* holds the K/V of `start ++ ids` for its whole `ids` (on the CPU, in
//! blocks of its own; `start`'s blocks are shared by every base until written). A *branch*
//! `(row, keep, suffix)` runs `suffix` after the first `start.len() + keep` positions of the
//! base, reading them in place ([`Seq::on_prefix`]); the base is never written. So asking
//! about a row at many lengths runs its text once plus one suffix per length, where a cache
//! brought to each length in turn ([`crate::IncrementalRows`]) re-runs the text after every
//! shorter ask.
//!
//! Exact, like the incremental caches: position `i`'s K/V depends only on ids `..=i`, and
//! the CPU kernels compute it by the same arithmetic however the ids are split into calls,
//! so a branch's hidden state equals a run of `start ++ ids[..keep] ++ suffix` from scratch.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use specrej_core::BackendError;

use crate::host::{PassError, host_vec};
use crate::kv::{KvPool, Seq};
use crate::model::{Model, device_err};

/// New tokens one forward pass runs at most (more go in several passes): bounds the
/// activations (`[tokens, ffn]` f32 is 6 MB per 1,000 tokens for SmolLM2-135M).
const PASS_TOKENS: usize = 4096;

/// Consecutive groups of items, each of at most [`PASS_TOKENS`] new tokens (an item longer
/// than that alone): the passes that run `lens`.
fn passes(lens: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < lens.len() {
        let mut end = at + 1;
        let mut tokens = lens[at];
        while end < lens.len() && tokens + lens[end] <= PASS_TOKENS {
            tokens += lens[end];
            end += 1;
        }
        out.push(at..end);
        at = end;
    }
    out
}

/// One row's base.
#[derive(Debug)]
struct Base {
    /// The ids after `start` whose K/V the base holds.
    ids: Vec<u32>,
    /// `start ++ ids`.
    seq: Arc<Seq>,
    /// When it was last asked about (for eviction).
    used: u64,
}

/// Bases of rows, branched off without being written. CPU only.
///
/// Cloning gives an *empty* set on the same model (bases are never shared).
#[derive(Debug)]
pub(crate) struct Branches {
    model: Arc<Model>,
    pool: Arc<KvPool>,
    /// The ids every base starts with, and their K/V (a sequence of its own, forked).
    start: Option<(Vec<u32>, Seq)>,
    bases: HashMap<u32, Base>,
    /// Calls so far (the clock of `Base::used`).
    clock: u64,
    /// Positions the bases may hold over all rows before the least recently used ones not
    /// asked for by the current call are dropped.
    max_tokens: usize,
}

impl Clone for Branches {
    fn clone(&self) -> Self {
        Self::new(Arc::clone(&self.model), self.max_tokens)
    }
}

impl Branches {
    pub(crate) fn new(model: Arc<Model>, max_tokens: usize) -> Self {
        let pool = KvPool::new(model.kv_shape(), model.kv_format, usize::MAX);
        Self { model, pool, start: None, bases: HashMap::new(), clock: 0, max_tokens }
    }

    /// Positions the bases hold over all rows (`start` counted once per base).
    pub(crate) fn held_tokens(&self) -> usize {
        let start = self.start.as_ref().map_or(0, |(s, _)| s.len());
        self.bases.values().map(|b| start + b.ids.len()).sum()
    }

    /// Sets the ids every base starts with and runs them, unless they already are the
    /// start (a new start drops every base). Returns the tokens run.
    pub(crate) fn set_start(&mut self, ids: &[u32]) -> Result<u64, BackendError> {
        if self.start.as_ref().is_some_and(|(s, _)| s == ids) {
            return Ok(0);
        }
        self.bases.clear();
        self.start = None;
        let mut seq = Seq::new();
        if !ids.is_empty() {
            self.model
                .forward_seqs(&mut [(&mut seq, ids)], &self.pool)
                .map_err(PassError::backend)?;
        }
        self.start = Some((ids.to_vec(), seq));
        Ok(ids.len() as u64)
    }

    /// Makes each row's base hold `start ++ ids` (rows not held, or held with other ids,
    /// are run, in passes of at most [`PASS_TOKENS`] new tokens). A row may appear only
    /// once. Returns the tokens run.
    pub(crate) fn hold(&mut self, rows: &[(u32, &[u32])]) -> Result<u64, BackendError> {
        self.clock += 1;
        let Some((start_ids, start)) = self.start.as_ref() else {
            return Err(BackendError::device("branches: no start set"));
        };
        let ctx = self.model.config.context_length;
        let mut todo: Vec<(u32, &[u32])> = Vec::new();
        for (i, &(row, ids)) in rows.iter().enumerate() {
            if rows[..i].iter().any(|&(r, _)| r == row) {
                return Err(BackendError::device(format!(
                    "branches: row {row} appears twice in one call"
                )));
            }
            if start_ids.len() + ids.len() > ctx {
                return Err(BackendError::device(format!(
                    "scoring input of {} tokens exceeds the context length {ctx}",
                    start_ids.len() + ids.len()
                )));
            }
            self.model.check_tokens(ids).map_err(BackendError::Device)?;
            match self.bases.get_mut(&row) {
                Some(b) if b.ids == ids => b.used = self.clock,
                _ => todo.push((row, ids)),
            }
        }
        // Room first: the least recently used bases of rows this call does not ask about.
        let start_len = start_ids.len();
        let incoming: usize = todo.iter().map(|(_, ids)| start_len + ids.len()).sum();
        let mut held = self.held_tokens();
        if held + incoming > self.max_tokens {
            let mut idle: Vec<(u64, u32)> = self
                .bases
                .iter()
                .filter(|(_, b)| b.used != self.clock)
                .map(|(&r, b)| (b.used, r))
                .collect();
            idle.sort_unstable();
            for (_, row) in idle {
                if held + incoming <= self.max_tokens {
                    break;
                }
                if let Some(b) = self.bases.remove(&row) {
                    held -= start_len + b.ids.len();
                }
            }
        }
        let lens: Vec<usize> = todo.iter().map(|(_, ids)| ids.len()).collect();
        for pass in passes(&lens) {
            let group = &todo[pass];
            let mut seqs: Vec<Seq> = group.iter().map(|_| start.fork()).collect();
            {
                let mut pass: Vec<(&mut Seq, &[u32])> = seqs
                    .iter_mut()
                    .zip(group)
                    .filter(|(_, (_, ids))| !ids.is_empty())
                    .map(|(s, &(_, ids))| (s, ids))
                    .collect();
                if !pass.is_empty() {
                    self.model.forward_seqs(&mut pass, &self.pool).map_err(PassError::backend)?;
                }
            }
            for (seq, &(row, ids)) in seqs.into_iter().zip(group) {
                self.bases
                    .insert(row, Base { ids: ids.to_vec(), seq: Arc::new(seq), used: self.clock });
            }
        }
        let run = lens.iter().sum::<usize>() as u64;
        Ok(run)
    }

    /// For each `(row, keep, suffix)`: `suffix` (not empty) run after the first
    /// `start.len() + keep` positions of the row's base (which must be held, with at least
    /// `keep` ids). Calls `f(i, normed)` with the final-normed hidden state of item `i`'s
    /// last position (`[hidden]` f32), in passes of at most [`PASS_TOKENS`] new tokens.
    /// Returns the tokens run.
    pub(crate) fn branch_last(
        &mut self,
        items: &[(u32, usize, &[u32])],
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<u64, BackendError> {
        let start_len = self.start.as_ref().map_or(0, |(s, _)| s.len());
        let ctx = self.model.config.context_length;
        let mut views: Vec<(Seq, &[u32])> = Vec::with_capacity(items.len());
        for &(row, keep, suffix) in items {
            let Some(base) = self.bases.get(&row) else {
                return Err(BackendError::device(format!("branches: row {row} has no base")));
            };
            if keep > base.ids.len() {
                return Err(BackendError::device(format!(
                    "branches: row {row} holds {} ids, {keep} asked for",
                    base.ids.len()
                )));
            }
            if suffix.is_empty() {
                return Err(BackendError::device("branches: empty suffix"));
            }
            if start_len + keep + suffix.len() > ctx {
                return Err(BackendError::device(format!(
                    "scoring input of {} tokens exceeds the context length {ctx}",
                    start_len + keep + suffix.len()
                )));
            }
            self.model.check_tokens(suffix).map_err(BackendError::Device)?;
            views.push((Seq::on_prefix(&base.seq, start_len + keep), suffix));
        }
        let model = Arc::clone(&self.model);
        let h = model.config.hidden_size;
        let lens: Vec<usize> = views.iter().map(|(_, ids)| ids.len()).collect();
        for pass in passes(&lens) {
            let hidden = {
                let mut run: Vec<(&mut Seq, &[u32])> =
                    views[pass.clone()].iter_mut().map(|(s, ids)| (s, *ids)).collect();
                model.forward_seqs(&mut run, &self.pool).map_err(PassError::backend)?
            }; // [Σ suffix, hidden]
            let mut picked = Vec::with_capacity(pass.len());
            let mut offset = 0u32;
            for &len in &lens[pass.clone()] {
                offset += len as u32;
                picked.push(offset - 1);
            }
            let normed = Tensor::new(picked.as_slice(), hidden.device())
                .and_then(|ids| hidden.index_select(&ids, 0))
                .and_then(|x| model.final_norm(&x))
                .and_then(|x| host_vec(&x))
                .map_err(device_err)?; // [pass.len(), hidden]
            for (k, last) in normed.chunks_exact(h).enumerate() {
                f(pass.start + k, last);
            }
            // The views' own blocks (the suffixes' K/V) go back to the pool here.
            for view in &mut views[pass] {
                view.0 = Seq::new();
            }
        }
        let run = lens.iter().sum::<usize>() as u64;
        Ok(run)
    }
}
