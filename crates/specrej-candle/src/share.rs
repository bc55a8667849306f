//! K/V a CPU decoder lends to a scorer on the same model: the self-judge asks its question
//! right after the policy's own conversation, so the prompt's and the answer's K/V are the
//! decoder's, already computed.
//!
//! Reuse is by content, never by trust: every lent sequence carries the ids its K/V holds,
//! and a scorer reuses a sequence only up to the longest common prefix of those ids with
//! its own input. By batch invariance (ARCHITECTURE.md) a position's K/V depends only on
//! the ids up to it, bit for bit, so a reused position holds exactly what the scorer would
//! have computed: a reward is the same whether its K/V was lent, partly lent or computed
//! from scratch (tested).
//!
//! What is lent:
//! * the live rows of every CPU batch of the decoder (its [`HostRows`], shared with the
//!   scorer through a mutex; the scorer forks a row, so a later write on either side copies
//!   the shared block: the decoder's row never changes);
//! * rows a batch let go of (`retain`, or the batch's end) are *parked* instead of freed,
//!   so finished answers can be judged without re-reading them. Parked rows stay counted by
//!   the decoder's pool; when the decoder needs their memory (a pass runs out of blocks) it
//!   drops them all first and retries, and a scorer drops them once judged or rejected. So
//!   parking never makes a pass fail that would have run without it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::kv::Seq;
use crate::model::Model;

/// The rows of one CPU batch: each row's K/V and the ids it holds.
#[derive(Debug)]
pub(crate) struct HostRows {
    /// The prompt's ids (the positions every row shares).
    pub(crate) prompt: Arc<[u32]>,
    /// `[rows]`: each row's cache (the prompt, then its own positions).
    pub(crate) seqs: Vec<Seq>,
    /// `[rows]`: the ids of each row's own positions already in its cache, in order
    /// (`seqs[r].len() == prompt.len() + run[r].len()`).
    pub(crate) run: Vec<Vec<u32>>,
}

impl HostRows {
    pub(crate) fn new(prompt: &[u32], seqs: Vec<Seq>) -> Self {
        let run = vec![Vec::new(); seqs.len()];
        Self { prompt: Arc::from(prompt), seqs, run }
    }

    /// Keeps rows `keep` (strictly ascending) and hands back the others, as rows to
    /// [`KvShare::park`] (`row_ids[i]` naming row `i`); dropping them returns their blocks to
    /// the pool. No K/V is copied or allocated.
    pub(crate) fn retain(&mut self, keep: &[usize], row_ids: &[u32]) -> Vec<Parked> {
        let seqs = std::mem::take(&mut self.seqs);
        let run = std::mem::take(&mut self.run);
        let mut next = keep.iter().peekable();
        let mut gone = Vec::with_capacity(seqs.len() - keep.len().min(seqs.len()));
        for (i, (seq, run)) in seqs.into_iter().zip(run).enumerate() {
            if next.next_if(|&&k| k == i).is_some() {
                self.seqs.push(seq);
                self.run.push(run);
            } else {
                gone.push(Parked { row: row_ids[i], prompt: Arc::clone(&self.prompt), run, seq });
            }
        }
        gone
    }
}

/// Locks `rows`, ignoring poisoning: a panic elsewhere leaves the rows as they were (every
/// change to them is a plain move or push).
pub(crate) fn lock(rows: &Mutex<HostRows>) -> MutexGuard<'_, HostRows> {
    rows.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A row a batch let go of, kept until a scorer has judged it or the memory is needed.
#[derive(Debug)]
pub(crate) struct Parked {
    row: u32,
    prompt: Arc<[u32]>,
    run: Vec<u32>,
    seq: Seq,
}

#[derive(Debug, Default)]
struct Lent {
    /// Live batches' rows (dropped batches leave dead entries, swept on registration).
    batches: Vec<Weak<Mutex<HostRows>>>,
    /// Rows let go of, oldest first.
    parked: VecDeque<Parked>,
}

/// A decoder's K/V, lent to scorers on the same model ([`crate::CandleDecoder::lend_kv`],
/// [`crate::SelfJudgeScorer::borrowing`]). Cloning gives another handle to the same loan.
#[derive(Debug, Clone)]
pub struct KvShare {
    model: Arc<Model>,
    lent: Arc<Mutex<Lent>>,
}

/// A borrowed sequence: a fork of a lent row cut to the positions reused.
pub(crate) struct Borrowed {
    pub(crate) seq: Seq,
    /// Positions reused (`seq.len()`).
    pub(crate) reused: usize,
}

/// Length of the common prefix of `a ++ b` and `want`.
fn common(a: &[u32], b: &[u32], want: &[u32]) -> usize {
    a.iter().chain(b).zip(want).take_while(|(x, y)| x == y).count()
}

impl KvShare {
    /// A loan of K/V computed by `model` (a decoder and a scorer must both be on it).
    pub fn new(model: &Arc<Model>) -> Self {
        Self { model: Arc::clone(model), lent: Arc::default() }
    }

    /// Whether `model` is the model this loan is for (the same loaded weights).
    pub(crate) fn is_for(&self, model: &Arc<Model>) -> bool {
        Arc::ptr_eq(&self.model, model)
    }

    fn lent(&self) -> MutexGuard<'_, Lent> {
        self.lent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lends a new batch's rows.
    pub(crate) fn register(&self, rows: &Arc<Mutex<HostRows>>) {
        let mut lent = self.lent();
        lent.batches.retain(|w| w.strong_count() > 0);
        lent.batches.push(Arc::downgrade(rows));
    }

    /// Keeps rows their batch let go of ([`HostRows::retain`]). Call it with the batch's
    /// rows unlocked: [`KvShare::borrow`] locks the loan, then the batches.
    pub(crate) fn park(&self, rows: Vec<Parked>) {
        self.lent().parked.extend(rows);
    }

    /// Drops every parked row (their blocks go back to the decoder's pool); whether there
    /// were any.
    pub(crate) fn evict(&self) -> bool {
        let parked = std::mem::take(&mut self.lent().parked);
        !parked.is_empty()
    }

    /// Drops the parked rows with these ids (judged, or rejected).
    pub(crate) fn release(&self, rows: &[u32]) {
        self.lent().parked.retain(|p| !rows.contains(&p.row));
    }

    /// Parked rows right now.
    pub fn parked_rows(&self) -> usize {
        self.lent().parked.len()
    }

    /// The lent sequence sharing the longest prefix with `want` (at most `limit` positions),
    /// forked and cut to that prefix; `None` when nothing lent shares a position with it.
    pub(crate) fn borrow(&self, want: &[u32], limit: usize) -> Option<Borrowed> {
        let limit = limit.min(want.len());
        let mut lent = self.lent();
        let mut best: Option<(usize, Seq)> = None;
        let mut consider = |prompt: &[u32], run: &[u32], seq: &Seq| {
            let n = common(prompt, run, want).min(limit).min(seq.len());
            if n > 0 && best.as_ref().is_none_or(|(m, _)| n > *m) {
                let mut fork = seq.fork();
                fork.truncate(n);
                best = Some((n, fork));
            }
        };
        for p in &lent.parked {
            consider(&p.prompt, &p.run, &p.seq);
        }
        lent.batches.retain(|w| w.strong_count() > 0);
        for batch in lent.batches.iter().filter_map(Weak::upgrade) {
            let rows = lock(&batch);
            for (seq, run) in rows.seqs.iter().zip(&rows.run) {
                consider(&rows.prompt, run, seq);
            }
        }
        best.map(|(reused, seq)| Borrowed { seq, reused })
    }
}
