//! Reward models on a shared [`Model`]: the policy's own likelihood, and an LLM judge.
//!
//! Both run the shared prefix once (batch 1), fan its K/V out to the responses, and run
//! the responses right-padded to a common length: causal attention keeps the padding
//! (which only ever follows a row's real tokens) from influencing anything that is read.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use specrej_core::likelihood::{self, EMPTY_RESPONSE_REWARD, Targets, log_sum_exp};
use specrej_core::{BackendError, Response, Scored, Scorer};

use crate::decoder::DEFAULT_KV_BUDGET_BYTES;
use crate::incremental::IncrementalRows;
use crate::model::{alloc_err, device_err, KvCache, Model, nll_rows, to_host_rows};

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

/// Shared machinery: prefix once, then padded suffix chunks within a K/V budget.
#[derive(Debug, Clone)]
struct Runner {
    model: Arc<Model>,
    kv_budget_bytes: usize,
}

impl Runner {
    fn check(&self, tokens: &[u32]) -> Result<(), BackendError> {
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
        let per_token = self.model.config.kv_bytes_per_token();
        (self.kv_budget_bytes / per_token.max(1) / total_len.max(1)).max(1)
    }

    /// Runs `suffixes` (each at most `width` tokens, right-padded) after the prefix.
    /// Returns the hidden states `[rows, width, hidden]` f32.
    fn suffixes(&self, prefix: &Prefix, suffixes: &[&[u32]], width: usize) -> Result<Tensor, BackendError> {
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
        let mut cache = prefix.cache.gather_rows(model, &vec![0; rows], total).map_err(alloc_err)?;
        model
            .token_tensor(tokens, rows, width)
            .and_then(|t| model.forward_hidden(&t, &mut cache)) // [rows, width, hidden]
            .map_err(device_err)
    }

    /// Logits at the given flat positions of `hidden` `[rows, width, hidden]`, streamed in
    /// chunks: calls `f(position index in `at`, logits row)`.
    fn logits_at(&self, hidden: &Tensor, at: &[u32], mut f: impl FnMut(usize, &[f32])) -> Result<(), BackendError> {
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
    fn nll_at(&self, hidden: &Tensor, at: &[u32], targets: &[u32]) -> Result<Vec<f32>, BackendError> {
        let model = &*self.model;
        let flat = hidden.flatten_to(1).map_err(device_err)?; // [rows*width, hidden]
        let mut out = Vec::with_capacity(at.len());
        for (chunk, chunk_targets) in at.chunks(DEVICE_LOGIT_CHUNK).zip(targets.chunks(DEVICE_LOGIT_CHUNK)) {
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

    fn score_incremental(&mut self, prompt: &[u32], responses: &[Response<'_>]) -> Result<Scored, BackendError> {
        for r in responses {
            self.runner.check(r.tokens)?;
        }
        self.runner.check(prompt)?;
        let vocab = self.runner.model.config.vocab_size;
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
        let mut rewards = Vec::with_capacity(responses.len());
        for r in responses {
            let m = r.tokens.len();
            if m == 0 {
                rewards.push(EMPTY_RESPONSE_REWARD);
                continue;
            }
            let full = [prompt, r.tokens].concat();
            let input = &full[..p + m - 1];
            let (normed, first) = inc.rows.hidden_from(r.row, input, 1)?;
            processed += (input.len() - first) as u64;
            let mut nll = inc.nll.remove(&r.row).unwrap_or_default();
            if nll.len() < first {
                // A row new to the caches starts from the prompt's: no response NLLs to reuse.
                if first > p - 1 {
                    return Err(BackendError::device("likelihood: cached NLLs out of step with the cache"));
                }
                nll.resize(first, f64::NAN);
            }
            nll.truncate(first);
            nll.resize(input.len(), f64::NAN);
            let h = self.runner.model.config.hidden_size;
            let start = first.max(p - 1);
            let positions: Vec<usize> = (start..input.len()).collect();
            let on_cpu = self.runner.model.device.is_cpu();
            for chunk in positions.chunks(if on_cpu { LOGIT_CHUNK } else { DEVICE_LOGIT_CHUNK }) {
                let lo = (chunk[0] - first) * h;
                let hi = (chunk[chunk.len() - 1] + 1 - first) * h;
                if on_cpu {
                    let logits = inc.rows.head_logits(&normed[lo..hi])?;
                    for (row, &pos) in logits.chunks_exact(vocab).zip(chunk) {
                        nll[pos] = f64::from(log_sum_exp(row) - row[full[pos + 1] as usize]);
                    }
                } else {
                    let targets: Vec<u32> = chunk.iter().map(|&pos| full[pos + 1]).collect();
                    for (x, &pos) in inc.rows.head_nll(&normed[lo..hi], &targets)?.into_iter().zip(chunk) {
                        nll[pos] = f64::from(x);
                    }
                }
            }
            rewards.push(likelihood::reward(nll[p - 1..].iter().sum(), m));
            inc.nll.insert(r.row, nll);
        }
        Ok(Scored { rewards, tokens_processed: processed })
    }

    fn score_sync(&self, prompt: &[u32], responses: &[Response<'_>]) -> Result<Scored, BackendError> {
        if responses.is_empty() {
            return Ok(Scored::default());
        }
        let prompt = &*likelihood::context(prompt, self.runner.model.config.bos_token_id)?;
        for r in responses {
            self.runner.check(r.tokens)?;
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
                        nll[c * chunk + t.response[k]] += f64::from(log_sum_exp(row) - row[t.tokens[k] as usize]);
                    })?;
                } else {
                    for (k, x) in self.runner.nll_at(&hidden, &t.at, &t.tokens)?.into_iter().enumerate() {
                        nll[c * chunk + t.response[k]] += f64::from(x);
                    }
                }
            }
        }
        let rewards = responses.iter().zip(&nll).map(|(r, &sum)| likelihood::reward(sum, r.tokens.len())).collect();
        Ok(Scored { rewards, tokens_processed: processed })
    }
}

impl Scorer for LikelihoodScorer {
    fn score(&mut self, prompt: &[u32], responses: &[Response<'_>]) -> impl Future<Output = Result<Scored, BackendError>> {
        let result = match (&self.incremental, responses.is_empty(), prompt.is_empty()) {
            (None, _, _) => self.score_sync(prompt, responses),
            (Some(_), true, _) => Ok(Scored::default()),
            (Some(_), false, false) => self.score_incremental(prompt, responses),
            (Some(_), false, true) => likelihood::context(prompt, self.runner.model.config.bos_token_id)
                .and_then(|context| self.score_incremental(&context, responses)),
        };
        std::future::ready(result)
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
#[derive(Debug, Clone)]
pub struct JudgeScorer {
    runner: Runner,
    before: Vec<u32>,
    after: Vec<u32>,
    yes: u32,
    no: u32,
    incremental: Option<IncrementalRows>,
}

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
        Self { runner: Runner { model, kv_budget_bytes: DEFAULT_KV_BUDGET_BYTES }, before, after, yes, no, incremental: None }
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

    fn score_incremental(&mut self, responses: &[Response<'_>]) -> Result<Scored, BackendError> {
        for r in responses {
            self.runner.check(r.tokens)?;
        }
        self.runner.check(&self.after)?;
        let (before, after, yes, no) = (&self.before, &self.after, self.yes as usize, self.no as usize);
        let Some(rows) = self.incremental.as_mut() else {
            return Err(BackendError::device("judge: not incremental"));
        };
        let mut processed = rows.set_prefix(before)?;
        let mut rewards = Vec::with_capacity(responses.len());
        for r in responses {
            let ids = [&before[..], r.tokens, &after[..]].concat();
            let (hidden, run) = rows.last_hidden(r.row, &ids)?;
            processed += run;
            let logits = rows.head_logits(&hidden)?;
            rewards.push(logits[yes] - logits[no]);
        }
        Ok(Scored { rewards, tokens_processed: processed })
    }

    /// Limits the K/V the batched passes keep at once (larger batches go in chunks).
    pub fn with_kv_budget(mut self, kv_budget_bytes: usize) -> Self {
        self.runner.kv_budget_bytes = kv_budget_bytes;
        self
    }

    fn score_sync(&self, responses: &[Response<'_>]) -> Result<Scored, BackendError> {
        if responses.is_empty() {
            return Ok(Scored::default());
        }
        for r in responses {
            self.runner.check(r.tokens)?;
        }
        self.runner.check(&self.after)?;
        let prefix = self.runner.prefix(&self.before)?;
        let mut processed = self.before.len() as u64;
        let margin = |row: &[f32]| row[self.yes as usize] - row[self.no as usize];
        let inputs: Vec<Vec<u32>> = responses.iter().map(|r| [r.tokens, &self.after[..]].concat()).collect();
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

impl Scorer for JudgeScorer {
    fn score(&mut self, _prompt: &[u32], responses: &[Response<'_>]) -> impl Future<Output = Result<Scored, BackendError>> {
        let result = if self.incremental.is_some() {
            if responses.is_empty() { Ok(Scored::default()) } else { self.score_incremental(responses) }
        } else {
            self.score_sync(responses)
        };
        std::future::ready(result)
    }

    fn release(&mut self, rows: &[u32]) {
        if let Some(inc) = self.incremental.as_mut() {
            inc.release(rows);
        }
    }
}
