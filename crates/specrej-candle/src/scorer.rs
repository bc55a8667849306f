//! Reward models on a shared [`Model`]: the policy's own likelihood, and an LLM judge.
//!
//! Both run the shared prefix once (batch 1) and then every response after it. On the CPU
//! the responses run in one pass ([`crate::host`]) over the prefix's K/V, held once, each at
//! its own length: no padding, and every response's reward is computed by the same
//! arithmetic as if it ran alone (or incrementally, or in another batch). On a GPU the
//! prefix's K/V is copied to every response and the responses run right-padded to a common
//! length: causal attention keeps the padding (which only ever follows a row's real tokens)
//! from influencing anything that is read.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use specrej_core::likelihood::{self, EMPTY_RESPONSE_REWARD, Targets, log_sum_exp};
use specrej_core::{BackendError, Response, Scored, Scorer};

use crate::branches::Branches;
use crate::decoder::DEFAULT_KV_BUDGET_BYTES;
use crate::host::{PassError, host_vec};
use crate::incremental::IncrementalRows;
use crate::kv::{BLOCK, KvPool, Seq};
use crate::model::{KvCache, Model, alloc_err, device_err, nll_rows, to_host_rows};

/// Positions whose logits are materialised at once (`[LOGIT_CHUNK, vocab]` f32).
const LOGIT_CHUNK: usize = 128;

/// The same on a GPU, where only NLLs come back: `[512, vocab]` f32 is 256 MB for a
/// 128k vocabulary.
const DEVICE_LOGIT_CHUNK: usize = 512;

/// A prefix run once with batch 1.
struct Prefix {
    cache: KvCache,   // 1 row, `len` = prefix length
    logits: Vec<f32>, // [vocab] f32 at the prefix's last position
}

/// Shared machinery: prefix once, then the suffixes in chunks within a K/V budget.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    pub(crate) model: Arc<Model>,
    pub(crate) kv_budget_bytes: usize,
}

/// A prefix run once on the CPU.
struct HostPrefix {
    seq: Arc<Seq>,
    logits: Vec<f32>, // [vocab] f32 at the prefix's last position
}

impl Runner {
    pub(crate) fn on_host(&self) -> bool {
        self.model.device.is_cpu()
    }

    /// The CPU pool of one scoring call.
    pub(crate) fn pool(&self) -> Arc<KvPool> {
        let shape = self.model.kv_shape();
        let block = shape.block_elems() * self.model.kv_format.bytes();
        KvPool::new(shape, self.model.kv_format, (self.kv_budget_bytes / block.max(1)).max(1))
    }

    fn host_prefix(&self, tokens: &[u32], pool: &Arc<KvPool>) -> Result<HostPrefix, BackendError> {
        let model = &*self.model;
        self.check(tokens)?;
        let mut seq = Seq::new();
        let hidden =
            model.forward_seqs(&mut [(&mut seq, tokens)], pool).map_err(PassError::backend)?; // [len, hidden]
        let logits = hidden
            .narrow(0, tokens.len() - 1, 1)
            .and_then(|last| model.logits(&last))
            .and_then(|l| to_host_rows(&l))
            .map_err(device_err)?;
        Ok(HostPrefix { seq: Arc::new(seq), logits })
    }

    /// Runs every non-empty `inputs[i]` after the prefix, in chunks of inputs whose blocks
    /// fit `pool`, and calls `f(i, normed)` per input with the final-normed hidden states
    /// of its positions (`[len, hidden]` f32, row-major; only the last when `last_only`).
    fn host_suffixes(
        &self,
        prefix: &HostPrefix,
        inputs: &[&[u32]],
        last_only: bool,
        pool: &Arc<KvPool>,
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<(), BackendError> {
        let model = &*self.model;
        let h = model.config.hidden_size;
        let todo: Vec<usize> = (0..inputs.len()).filter(|&i| !inputs[i].is_empty()).collect();
        let free = pool.capacity().saturating_sub(pool.in_use());
        let mut start = 0;
        while start < todo.len() {
            // As many inputs as fit the pool's free blocks (at least one: it may still fit).
            let mut end = start;
            let mut blocks = 0;
            while end < todo.len() {
                let need = inputs[todo[end]].len().div_ceil(BLOCK);
                if end > start && blocks + need > free {
                    break;
                }
                blocks += need;
                end += 1;
            }
            let chunk = &todo[start..end];
            let mut seqs: Vec<Seq> =
                chunk.iter().map(|_| Seq::on_prefix(&prefix.seq, prefix.seq.len())).collect();
            let hidden = {
                let mut pass: Vec<(&mut Seq, &[u32])> =
                    seqs.iter_mut().zip(chunk).map(|(s, &i)| (s, inputs[i])).collect();
                model.forward_seqs(&mut pass, pool).map_err(PassError::backend)?
            }; // [Σ len, hidden]
            let mut picked = Vec::new();
            let mut offset = 0u32;
            for &i in chunk {
                let len = inputs[i].len() as u32;
                if last_only {
                    picked.push(offset + len - 1);
                } else {
                    picked.extend(offset..offset + len);
                }
                offset += len;
            }
            let normed = Tensor::new(picked.as_slice(), hidden.device())
                .and_then(|ids| hidden.index_select(&ids, 0))
                .and_then(|x| model.final_norm(&x))
                .and_then(|x| host_vec(&x))
                .map_err(device_err)?;
            let mut at = 0;
            for &i in chunk {
                let t = if last_only { 1 } else { inputs[i].len() };
                f(i, &normed[at * h..(at + t) * h]);
                at += t;
            }
            start = end;
        }
        Ok(())
    }

    /// Logits `[n, vocab]` of final-normed hidden states `[n, hidden]`, in chunks of
    /// [`LOGIT_CHUNK`] rows: calls `f(row index, logits row)`.
    pub(crate) fn head_chunks(
        &self,
        normed: &[f32],
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<(), BackendError> {
        let model = &*self.model;
        let (h, vocab) = (model.config.hidden_size, model.config.vocab_size);
        for (c, chunk) in normed.chunks(LOGIT_CHUNK * h).enumerate() {
            let logits = Tensor::from_slice(chunk, (chunk.len() / h, h), &model.device)
                .and_then(|x| model.head_forward(&x))
                .map_err(device_err)?;
            crate::host::with_host(&logits, |l| {
                for (i, row) in l.chunks_exact(vocab).enumerate() {
                    f(c * LOGIT_CHUNK + i, row);
                }
            })
            .map_err(device_err)?;
        }
        Ok(())
    }

    pub(crate) fn check(&self, tokens: &[u32]) -> Result<(), BackendError> {
        self.model.check_tokens(tokens).map_err(BackendError::Device)
    }

    fn prefix(&self, tokens: &[u32]) -> Result<Prefix, BackendError> {
        let model = &*self.model;
        self.check(tokens)?;
        let len = tokens.len();
        if len > model.config.context_length {
            return Err(BackendError::device(format!(
                "scoring input of {len} tokens exceeds the context length {}",
                model.config.context_length
            )));
        }
        let mut cache = KvCache::new(model, 1, len).map_err(alloc_err)?;
        let logits = model
            .token_tensor(tokens.to_vec(), 1, len)
            .and_then(|t| model.forward_hidden(&t, &mut cache))
            .and_then(|h| model.last_logits(&h))
            .and_then(|l| to_host_rows(&l))
            .map_err(device_err)?;
        Ok(Prefix { cache, logits })
    }

    /// Rows per chunk so that `rows × (prefix + width)` cached tokens fit the budget.
    fn chunk_rows(&self, total_len: usize) -> usize {
        let per_token = self.model.kv_bytes_per_token();
        (self.kv_budget_bytes / per_token.max(1) / total_len.max(1)).max(1)
    }

    /// Runs `suffixes` (each at most `width` tokens, right-padded) after the prefix.
    /// Returns the hidden states `[rows, width, hidden]` f32.
    fn suffixes(
        &self,
        prefix: &Prefix,
        suffixes: &[&[u32]],
        width: usize,
    ) -> Result<Tensor, BackendError> {
        let model = &*self.model;
        let rows = suffixes.len();
        let total = prefix.cache.len + width;
        if total > model.config.context_length {
            return Err(BackendError::device(format!(
                "scoring input of {total} tokens exceeds the context length {}",
                model.config.context_length
            )));
        }
        let mut tokens = Vec::with_capacity(rows * width);
        for s in suffixes {
            tokens.extend_from_slice(s);
            // Padding: any valid id works (it is only ever attended to by later padding).
            tokens.extend(std::iter::repeat_n(0, width - s.len()));
        }
        let mut cache =
            prefix.cache.gather_rows(model, &vec![0; rows], total).map_err(alloc_err)?;
        model
            .token_tensor(tokens, rows, width)
            .and_then(|t| model.forward_hidden(&t, &mut cache)) // [rows, width, hidden]
            .map_err(device_err)
    }

    /// Logits at the given flat positions of `hidden` `[rows, width, hidden]`, streamed in
    /// chunks: calls `f(position index in `at`, logits row)`.
    fn logits_at(
        &self,
        hidden: &Tensor,
        at: &[u32],
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<(), BackendError> {
        let model = &*self.model;
        let vocab = model.config.vocab_size;
        let flat = hidden.flatten_to(1).map_err(device_err)?; // [rows*width, hidden]
        for (c, chunk) in at.chunks(LOGIT_CHUNK).enumerate() {
            let logits = Tensor::new(chunk, hidden.device())
                .and_then(|ids| flat.index_select(&ids, 0)) // [n, hidden]
                .and_then(|h| model.logits(&h)) // [n, vocab]
                .and_then(|l| to_host_rows(&l))
                .map_err(device_err)?;
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                f(c * LOGIT_CHUNK + i, row);
            }
        }
        Ok(())
    }
}

impl Runner {
    /// NLL of `targets[k]` at flat position `at[k]` of `hidden` `[rows, width, hidden]`,
    /// computed on the model's device in chunks; only the NLLs come back.
    fn nll_at(
        &self,
        hidden: &Tensor,
        at: &[u32],
        targets: &[u32],
    ) -> Result<Vec<f32>, BackendError> {
        let model = &*self.model;
        let flat = hidden.flatten_to(1).map_err(device_err)?; // [rows*width, hidden]
        let mut out = Vec::with_capacity(at.len());
        for (chunk, chunk_targets) in
            at.chunks(DEVICE_LOGIT_CHUNK).zip(targets.chunks(DEVICE_LOGIT_CHUNK))
        {
            let nll = Tensor::new(chunk, hidden.device())
                .and_then(|ids| flat.index_select(&ids, 0)) // [n, hidden]
                .and_then(|h| model.logits(&h)) // [n, vocab]
                .and_then(|l| nll_rows(&l, chunk_targets)) // [n]
                .map_err(device_err)?;
            out.extend(nll);
        }
        Ok(out)
    }
}

/// Reward = −perplexity of the response under the model given the prompt:
/// `−exp(mean NLL of the response tokens)`.
///
/// An empty response gets [`EMPTY_RESPONSE_REWARD`]; perplexities are capped at `e^60`.
/// An empty prompt is replaced by the model's BOS token (an error if it has none).
/// `tokens_processed` = prompt length (run once) + rows × padded width of the responses
/// minus their last token (which no prediction needs).
///
/// [`LikelihoodScorer::incremental`] keeps a K/V cache and the per-token NLLs per row
/// between decisions instead: a decision runs only each row's new tokens (plus one).
#[derive(Debug, Clone)]
pub struct LikelihoodScorer {
    runner: Runner,
    incremental: Option<IncrementalLikelihood>,
}

/// Per-row caches of the incremental likelihood scorer.
#[derive(Debug, Clone)]
struct IncrementalLikelihood {
    rows: IncrementalRows,
    /// Per row, indexed by absolute position `pos`: NLL of the id at `pos + 1` given `..=pos`
    /// (NaN for prompt positions). Valid for the ids the row's cache holds.
    nll: HashMap<u32, Vec<f64>>,
    prompt: Vec<u32>,
}

impl LikelihoodScorer {
    /// A scorer on `model` with the default K/V budget (2 GiB per chunk of rows).
    pub fn new(model: Arc<Model>) -> Self {
        Self::with_kv_budget(model, DEFAULT_KV_BUDGET_BYTES)
    }

    /// A scorer whose batched passes keep at most `kv_budget_bytes` of K/V at once
    /// (larger batches are scored in chunks of rows).
    pub fn with_kv_budget(model: Arc<Model>, kv_budget_bytes: usize) -> Self {
        Self { runner: Runner { model, kv_budget_bytes }, incremental: None }
    }

    /// Keeps a K/V cache and the per-token NLLs per row between calls (reused up to the
    /// longest common prefix of `prompt ++ response` with the previous call's, minus one
    /// position); rows run one at a time. `tokens_processed` counts the tokens run.
    pub fn incremental(mut self) -> Self {
        self.incremental = Some(IncrementalLikelihood {
            rows: IncrementalRows::new(Arc::clone(&self.runner.model)),
            nll: HashMap::new(),
            prompt: Vec::new(),
        });
        self
    }

    fn score_incremental(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        for r in responses {
            self.runner.check(r.tokens)?;
        }
        self.runner.check(prompt)?;
        let vocab = self.runner.model.config.vocab_size;
        let on_cpu = self.runner.on_host();
        let Some(inc) = self.incremental.as_mut() else {
            return Err(BackendError::device("likelihood: not incremental"));
        };
        if inc.prompt != prompt {
            inc.rows.clear();
            inc.nll.clear();
            inc.prompt = prompt.to_vec();
        }
        let p = prompt.len();
        let mut processed = inc.rows.set_prefix(prompt)?;
        // Token j of a response is predicted at position p − 1 + j: run all but the last.
        let inputs: Vec<(u32, Vec<u32>)> = responses
            .iter()
            .filter(|r| !r.tokens.is_empty())
            .map(|r| (r.row, [prompt, &r.tokens[..r.tokens.len() - 1]].concat()))
            .collect();
        let items: Vec<(u32, &[u32])> =
            inputs.iter().map(|(row, ids)| (*row, ids.as_slice())).collect();
        let ran = inc.rows.hidden_from_many(&items, 1)?;
        let h = self.runner.model.config.hidden_size;
        let mut by_row: HashMap<u32, f64> = HashMap::with_capacity(items.len());
        for ((row, input), ran) in items.iter().zip(ran) {
            let first = ran.first;
            processed += (input.len() - first) as u64;
            let full = |pos: usize| {
                if pos + 1 < input.len() {
                    input[pos + 1]
                } else {
                    // The response's last token, not part of the input.
                    responses
                        .iter()
                        .find(|r| r.row == *row)
                        .map_or(0, |r| r.tokens[r.tokens.len() - 1])
                }
            };
            let mut nll = inc.nll.remove(row).unwrap_or_default();
            if nll.len() < first {
                // A row new to the caches starts from the prompt's: no response NLLs to reuse.
                if first > p - 1 {
                    return Err(BackendError::device(
                        "likelihood: cached NLLs out of step with the cache",
                    ));
                }
                nll.resize(first, f64::NAN);
            }
            nll.truncate(first);
            nll.resize(input.len(), f64::NAN);
            let start = first.max(p - 1);
            let lo = (start - first) * h;
            let normed = &ran.hidden[lo..];
            if on_cpu {
                self.runner.head_chunks(normed, |i, row_logits| {
                    let pos = start + i;
                    nll[pos] = f64::from(log_sum_exp(row_logits) - row_logits[full(pos) as usize]);
                })?;
            } else {
                let positions: Vec<usize> = (start..input.len()).collect();
                for chunk in positions.chunks(DEVICE_LOGIT_CHUNK) {
                    let a = (chunk[0] - start) * h;
                    let b = (chunk[chunk.len() - 1] + 1 - start) * h;
                    let targets: Vec<u32> = chunk.iter().map(|&pos| full(pos)).collect();
                    for (x, &pos) in
                        inc.rows.head_nll(&normed[a..b], &targets)?.into_iter().zip(chunk)
                    {
                        nll[pos] = f64::from(x);
                    }
                }
            }
            let _ = vocab;
            by_row.insert(*row, nll[p - 1..].iter().sum());
            inc.nll.insert(*row, nll);
        }
        let rewards = responses
            .iter()
            .map(|r| match by_row.get(&r.row) {
                Some(&sum) => likelihood::reward(sum, r.tokens.len()),
                None => EMPTY_RESPONSE_REWARD,
            })
            .collect();
        Ok(Scored { rewards, tokens_processed: processed })
    }

    fn score_sync(
        &self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        if responses.is_empty() {
            return Ok(Scored::default());
        }
        let prompt = &*likelihood::context(prompt, self.runner.model.config.bos_token_id)?;
        for r in responses {
            self.runner.check(r.tokens)?;
        }
        if self.runner.on_host() {
            return self.score_host(prompt, responses);
        }
        let prefix = self.runner.prefix(prompt)?;
        let mut processed = prompt.len() as u64;
        // sum of NLL per response; token 0 is predicted by the prompt's last position.
        let mut nll: Vec<f64> = responses
            .iter()
            .map(|r| match r.tokens.first() {
                Some(&t) => f64::from(log_sum_exp(&prefix.logits) - prefix.logits[t as usize]),
                None => 0.0,
            })
            .collect();
        // Token j ≥ 1 is predicted at response position j − 1: run all but the last token.
        let width = responses.iter().map(|r| r.tokens.len().saturating_sub(1)).max().unwrap_or(0);
        if width > 0 {
            let chunk = self.runner.chunk_rows(prompt.len() + width);
            for (c, group) in responses.chunks(chunk).enumerate() {
                let inputs: Vec<&[u32]> =
                    group.iter().map(|r| &r.tokens[..r.tokens.len().saturating_sub(1)]).collect();
                let hidden = self.runner.suffixes(&prefix, &inputs, width)?;
                processed += (group.len() * width) as u64;
                let t = Targets::of(group, width);
                if self.runner.model.device.is_cpu() {
                    self.runner.logits_at(&hidden, &t.at, |k, row| {
                        nll[c * chunk + t.response[k]] +=
                            f64::from(log_sum_exp(row) - row[t.tokens[k] as usize]);
                    })?;
                } else {
                    for (k, x) in
                        self.runner.nll_at(&hidden, &t.at, &t.tokens)?.into_iter().enumerate()
                    {
                        nll[c * chunk + t.response[k]] += f64::from(x);
                    }
                }
            }
        }
        let rewards = responses
            .iter()
            .zip(&nll)
            .map(|(r, &sum)| likelihood::reward(sum, r.tokens.len()))
            .collect();
        Ok(Scored { rewards, tokens_processed: processed })
    }
}

impl LikelihoodScorer {
    /// The full (non-incremental) likelihood on the CPU: the context once, then every
    /// response's tokens but the last in one pass (in chunks that fit the budget).
    /// `tokens_processed` = context + Σ (response length − 1).
    fn score_host(
        &self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        let pool = self.runner.pool();
        let prefix = self.runner.host_prefix(prompt, &pool)?;
        let mut processed = prompt.len() as u64;
        let inputs: Vec<&[u32]> =
            responses.iter().map(|r| &r.tokens[..r.tokens.len().saturating_sub(1)]).collect();
        let mut nll: Vec<f64> = responses
            .iter()
            .map(|r| match r.tokens.first() {
                Some(&t) => f64::from(log_sum_exp(&prefix.logits) - prefix.logits[t as usize]),
                None => 0.0,
            })
            .collect();
        let mut failed = None;
        self.runner.host_suffixes(&prefix, &inputs, false, &pool, |i, normed| {
            processed += inputs[i].len() as u64;
            let tokens = responses[i].tokens;
            let result = self.runner.head_chunks(normed, |j, row| {
                nll[i] += f64::from(log_sum_exp(row) - row[tokens[j + 1] as usize]);
            });
            if let Err(e) = result {
                failed.get_or_insert(e);
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        let rewards = responses
            .iter()
            .zip(&nll)
            .map(|(r, &sum)| likelihood::reward(sum, r.tokens.len()))
            .collect();
        Ok(Scored { rewards, tokens_processed: processed })
    }
}

impl Scorer for LikelihoodScorer {
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        let result = match (&self.incremental, responses.is_empty(), prompt.is_empty()) {
            (None, _, _) => self.score_sync(prompt, responses),
            (Some(_), true, _) => Ok(Scored::default()),
            (Some(_), false, false) => self.score_incremental(prompt, responses),
            (Some(_), false, true) => {
                likelihood::context(prompt, self.runner.model.config.bos_token_id)
                    .and_then(|context| self.score_incremental(&context, responses))
            }
        };
        std::future::ready(result)
    }

    fn fork(&mut self, children: &[(u32, u32)]) {
        if let Some(inc) = self.incremental.as_mut() {
            inc.rows.fork_rows(children);
            for &(parent, child) in children {
                if let Some(nll) = inc.nll.get(&parent).cloned() {
                    inc.nll.insert(child, nll);
                }
            }
        }
    }

    fn release(&mut self, rows: &[u32]) {
        if let Some(inc) = self.incremental.as_mut() {
            inc.rows.release(rows);
            for r in rows {
                inc.nll.remove(r);
            }
        }
    }
}

/// An LLM judge: reward = `logit(yes) − logit(no)` at the position after
/// `before ++ response ++ after`.
///
/// `before` holds the chat-formatted judge instructions with the user's question already
/// in it, so the `prompt` argument of [`Scorer::score`] is ignored. `tokens_processed` =
/// `before.len()` (run once) + rows × padded width of `response ++ after`.
///
/// [`JudgeScorer::incremental`] keeps a K/V cache per row between decisions instead
/// ([`IncrementalRows`]): a decision then runs only each row's new tokens plus `after`
/// (and `before` once), and `tokens_processed` counts exactly those.
///
/// [`JudgeScorer::with_partial`] gives decisions ([`Scorer::score_partial`]) a question of
/// their own for unfinished answers; the final ranking keeps `after`.
#[derive(Debug, Clone)]
pub struct JudgeScorer {
    runner: Runner,
    before: Vec<u32>,
    after: Vec<u32>,
    /// The question after an unfinished answer (decisions), if it differs from `after`.
    after_partial: Option<Vec<u32>>,
    yes: u32,
    no: u32,
    incremental: Option<IncrementalRows>,
    /// Bases of whole responses, for [`JudgeScorer::score_prefixes`] on the CPU.
    branches: Option<Branches>,
}

/// Positions [`JudgeScorer::score_prefixes`] keeps cached over all rows (about 7 GB of f16
/// K/V for SmolLM2-135M) before it drops the least recently used rows.
const PREFIX_CACHE_TOKENS: usize = 320_000;

impl JudgeScorer {
    /// A judge on `model` with the default K/V budget.
    ///
    /// # Panics
    /// If `before` is empty or `yes`/`no` are outside the model's vocabulary.
    #[track_caller]
    pub fn new(model: Arc<Model>, before: Vec<u32>, after: Vec<u32>, yes: u32, no: u32) -> Self {
        let vocab = model.config.vocab_size;
        assert!(!before.is_empty(), "JudgeScorer: `before` must not be empty");
        assert!(
            (yes as usize) < vocab && (no as usize) < vocab,
            "JudgeScorer: yes ({yes}) / no ({no}) outside the vocabulary ({vocab})"
        );
        Self {
            runner: Runner { model, kv_budget_bytes: DEFAULT_KV_BUDGET_BYTES },
            before,
            after,
            after_partial: None,
            yes,
            no,
            incremental: None,
            branches: None,
        }
    }

    /// Decisions ask `after_partial` (e.g. "so far, is this answer correct and on track?")
    /// after an unfinished answer instead of `after`.
    pub fn with_partial(mut self, after_partial: Vec<u32>) -> Self {
        self.after_partial = Some(after_partial);
        self
    }

    /// Keeps a K/V cache per row between calls, reused up to the longest common prefix
    /// of `before ++ response ++ after` with what the row's cache holds; rows are run one at
    /// a time. Scores equal the batched ones to rounding with [`crate::WeightFormat::F32`];
    /// with quantized activations (Q8_0) candle's kernels differ by token count, so they
    /// agree only to that quantization's noise.
    pub fn incremental(mut self) -> Self {
        self.incremental = Some(IncrementalRows::new(Arc::clone(&self.runner.model)));
        self
    }

    fn score_incremental(
        &mut self,
        responses: &[Response<'_>],
        partial: bool,
    ) -> Result<Scored, BackendError> {
        for r in responses {
            self.runner.check(r.tokens)?;
        }
        let after =
            if partial { self.after_partial.as_ref().unwrap_or(&self.after) } else { &self.after };
        self.runner.check(after)?;
        let (before, yes, no) = (&self.before, self.yes as usize, self.no as usize);
        let Some(rows) = self.incremental.as_mut() else {
            return Err(BackendError::device("judge: not incremental"));
        };
        let mut processed = rows.set_prefix(before)?;
        let inputs: Vec<Vec<u32>> =
            responses.iter().map(|r| [&before[..], r.tokens, &after[..]].concat()).collect();
        let items: Vec<(u32, &[u32])> =
            responses.iter().zip(&inputs).map(|(r, ids)| (r.row, ids.as_slice())).collect();
        let (hidden, run) = rows.last_hidden_many(&items)?;
        processed += run;
        let logits = rows.head_logits(&hidden.concat())?; // [rows, vocab]
        let vocab = logits.len() / responses.len().max(1);
        let rewards = logits.chunks_exact(vocab.max(1)).map(|l| l[yes] - l[no]).collect();
        Ok(Scored { rewards, tokens_processed: processed })
    }

    /// Limits the K/V the batched passes keep at once (larger batches go in chunks).
    pub fn with_kv_budget(mut self, kv_budget_bytes: usize) -> Self {
        self.runner.kv_budget_bytes = kv_budget_bytes;
        self
    }

    fn score_sync(
        &self,
        responses: &[Response<'_>],
        partial: bool,
    ) -> Result<Scored, BackendError> {
        if responses.is_empty() {
            return Ok(Scored::default());
        }
        for r in responses {
            self.runner.check(r.tokens)?;
        }
        let after =
            if partial { self.after_partial.as_ref().unwrap_or(&self.after) } else { &self.after };
        self.runner.check(after)?;
        if self.runner.on_host() {
            return self.score_host(responses, after);
        }
        let prefix = self.runner.prefix(&self.before)?;
        let mut processed = self.before.len() as u64;
        let margin = |row: &[f32]| row[self.yes as usize] - row[self.no as usize];
        let inputs: Vec<Vec<u32>> =
            responses.iter().map(|r| [r.tokens, &after[..]].concat()).collect();
        let width = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let mut rewards = vec![margin(&prefix.logits); responses.len()];
        if width > 0 {
            let chunk = self.runner.chunk_rows(self.before.len() + width);
            for (c, group) in inputs.chunks(chunk).enumerate() {
                let slices: Vec<&[u32]> = group.iter().map(Vec::as_slice).collect();
                let hidden = self.runner.suffixes(&prefix, &slices, width)?;
                processed += (group.len() * width) as u64;
                let mut at = Vec::new();
                let mut owner = Vec::new();
                for (i, s) in group.iter().enumerate() {
                    if !s.is_empty() {
                        at.push((i * width + s.len() - 1) as u32);
                        owner.push(c * chunk + i);
                    }
                }
                self.runner.logits_at(&hidden, &at, |k, row| rewards[owner[k]] = margin(row))?;
            }
        }
        Ok(Scored { rewards, tokens_processed: processed })
    }
}

impl JudgeScorer {
    /// The full (non-incremental) judge on the CPU: `before` once, then every
    /// `response ++ after` in one pass (in chunks that fit the budget).
    /// `tokens_processed` = `before` + Σ (response + `after`).
    fn score_host(
        &self,
        responses: &[Response<'_>],
        after: &[u32],
    ) -> Result<Scored, BackendError> {
        let pool = self.runner.pool();
        let prefix = self.runner.host_prefix(&self.before, &pool)?;
        let margin = |row: &[f32]| row[self.yes as usize] - row[self.no as usize];
        let mut processed = self.before.len() as u64;
        let inputs: Vec<Vec<u32>> = responses.iter().map(|r| [r.tokens, after].concat()).collect();
        let slices: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let mut rewards = vec![margin(&prefix.logits); responses.len()];
        let mut last = vec![0.0f32; 0];
        let mut owners = Vec::new();
        self.runner.host_suffixes(&prefix, &slices, true, &pool, |i, normed| {
            processed += slices[i].len() as u64;
            last.extend_from_slice(normed);
            owners.push(i);
        })?;
        self.runner.head_chunks(&last, |k, row| rewards[owners[k]] = margin(row))?;
        Ok(Scored { rewards, tokens_processed: processed })
    }
}

impl JudgeScorer {
    /// Rewards of prefixes of responses whose whole texts are known up front (replay):
    /// `(response, len)` is scored as `response.tokens[..len]`, with the partial question
    /// when `partial`. A row may appear at several lengths; every row must come with the
    /// same whole text each time it appears.
    ///
    /// On the CPU each row's whole text is run once and kept ([`Branches`]); a prefix then
    /// runs only `after`, reading the text's K/V in place, so the rewards equal
    /// [`Scorer::score`] of the prefixes bit for bit, at a fraction of the work of bringing a
    /// cache to each length in turn. On a GPU the incremental caches are brought to each
    /// length (one call per length of a row). `tokens_processed` counts what really ran.
    pub fn score_prefixes(
        &mut self,
        items: &[(Response<'_>, usize)],
        partial: bool,
    ) -> Result<Scored, BackendError> {
        if items.is_empty() {
            return Ok(Scored::default());
        }
        for (r, len) in items {
            if *len > r.tokens.len() {
                return Err(BackendError::device(format!(
                    "judge: row {} has {} tokens, {len} asked for",
                    r.row,
                    r.tokens.len()
                )));
            }
        }
        // Token ids are checked where they run: once per row and per question by the branches,
        // per call by the incremental caches.
        let after = if partial {
            self.after_partial.clone().unwrap_or_else(|| self.after.clone())
        } else {
            self.after.clone()
        };
        if !self.runner.on_host() {
            return self.prefixes_by_rounds(items, partial);
        }
        // The whole texts, once per row.
        let mut rows: Vec<(u32, &[u32])> = Vec::new();
        for (r, _) in items {
            match rows.iter().find(|(row, _)| *row == r.row) {
                Some((_, t)) if *t != r.tokens => {
                    return Err(BackendError::device(format!(
                        "judge: row {} given two different texts",
                        r.row
                    )));
                }
                Some(_) => {}
                None => rows.push((r.row, r.tokens)),
            }
        }
        let model = Arc::clone(&self.runner.model);
        let branches =
            self.branches.get_or_insert_with(|| Branches::new(model, PREFIX_CACHE_TOKENS));
        let mut processed = branches.set_start(&self.before)?;
        processed += branches.hold(&rows)?;
        let asks: Vec<(u32, usize, &[u32])> =
            items.iter().map(|(r, len)| (r.row, *len, after.as_slice())).collect();
        let mut last = Vec::with_capacity(items.len() * self.runner.model.config.hidden_size);
        processed += branches.branch_last(&asks, |_, normed| last.extend_from_slice(normed))?;
        let (yes, no) = (self.yes as usize, self.no as usize);
        let mut rewards = vec![0.0f32; items.len()];
        self.runner.head_chunks(&last, |k, row| rewards[k] = row[yes] - row[no])?;
        Ok(Scored { rewards, tokens_processed: processed })
    }

    /// [`JudgeScorer::score_prefixes`] through the incremental caches: one call per length
    /// of a row, shortest first.
    fn prefixes_by_rounds(
        &mut self,
        items: &[(Response<'_>, usize)],
        partial: bool,
    ) -> Result<Scored, BackendError> {
        if self.incremental.is_none() {
            self.incremental = Some(IncrementalRows::new(Arc::clone(&self.runner.model)));
        }
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| (items[i].0.row, items[i].1));
        let mut rounds: Vec<Vec<usize>> = Vec::new();
        for i in order {
            match rounds
                .iter_mut()
                .find(|round| round.iter().all(|&j| items[j].0.row != items[i].0.row))
            {
                Some(round) => round.push(i),
                None => rounds.push(vec![i]),
            }
        }
        let mut rewards = vec![0.0f32; items.len()];
        let mut processed = 0;
        for round in rounds {
            let responses: Vec<Response<'_>> = round
                .iter()
                .map(|&i| Response {
                    row: items[i].0.row,
                    tokens: &items[i].0.tokens[..items[i].1],
                })
                .collect();
            let scored = self.score_incremental(&responses, partial)?;
            processed += scored.tokens_processed;
            for (&i, reward) in round.iter().zip(scored.rewards) {
                rewards[i] = reward;
            }
        }
        Ok(Scored { rewards, tokens_processed: processed })
    }

    fn score_any(
        &mut self,
        responses: &[Response<'_>],
        partial: bool,
    ) -> Result<Scored, BackendError> {
        if self.incremental.is_some() {
            if responses.is_empty() {
                Ok(Scored::default())
            } else {
                self.score_incremental(responses, partial)
            }
        } else {
            self.score_sync(responses, partial)
        }
    }
}

impl Scorer for JudgeScorer {
    fn score(
        &mut self,
        _prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        std::future::ready(self.score_any(responses, false))
    }

    fn score_partial(
        &mut self,
        _prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        std::future::ready(self.score_any(responses, true))
    }

    fn fork(&mut self, children: &[(u32, u32)]) {
        if let Some(inc) = self.incremental.as_mut() {
            inc.fork_rows(children);
        }
    }

    fn release(&mut self, rows: &[u32]) {
        if let Some(inc) = self.incremental.as_mut() {
            inc.release(rows);
        }
    }
}
