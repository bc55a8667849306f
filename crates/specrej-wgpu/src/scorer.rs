//! Reward models on a shared [`WgpuModel`]: the policy's own likelihood, and an LLM judge,
//! computed like specrej-candle's (batch-1 prefix, fanned out, right-padded suffixes under a
//! causal mask). Only one f32 per scored position comes back (plus the prefix's logits).

use std::sync::Arc;

use specrej_core::likelihood::{self, Targets, log_sum_exp};
use specrej_core::{BackendError, Response, Scored, Scorer};

use crate::decoder::DEFAULT_KV_BUDGET_BYTES;
use crate::model::{Cache, StepParams, WgpuModel, Work};

/// Positions whose logits are materialised at once (`[LOGIT_CHUNK, vocab]` f32).
const LOGIT_CHUNK: usize = 128;

/// What the head's logits are reduced to.
#[derive(Clone, Copy)]
enum Reduce<'a> {
    /// `logits[yes] - logits[no]`.
    Margin { yes: u32, no: u32 },
    /// `-log softmax(logits)[target]`, one target per read position.
    Nll { targets: &'a [u32] },
}

#[derive(Debug)]
struct Runner {
    model: Arc<WgpuModel>,
    kv_budget_bytes: usize,
    work: Option<Work>,
}

impl Runner {
    fn new(model: Arc<WgpuModel>, kv_budget_bytes: usize) -> Self {
        Self { model, kv_budget_bytes, work: None }
    }

    fn check_len(&self, len: usize) -> Result<(), BackendError> {
        let ctx = self.model.config.context_length;
        if len > ctx {
            return Err(BackendError::device(format!(
                "scoring input of {len} tokens exceeds the context length {ctx}"
            )));
        }
        Ok(())
    }

    /// Runs `tokens` with batch 1; returns the cache (room for `extra` more positions) and the
    /// logits `[vocab]` at the last position.
    async fn prefix(
        &mut self,
        tokens: &[u32],
        extra: usize,
    ) -> Result<(Cache, Vec<f32>), BackendError> {
        let model = self.model.clone();
        model.check_tokens(tokens)?;
        let len = tokens.len();
        self.check_len(len + extra)?;
        let gpu = &model.gpu;
        model.ensure_work(&mut self.work, len, 1)?;
        let Some(work) = self.work.as_ref() else {
            return Err(BackendError::device("scratch missing"));
        };
        let mut cache = model.cache(1, len + extra)?;
        let vocab = model.config.vocab_size;
        let logits = gpu.storage("prefix logits", (vocab * 4) as u64)?;
        let p = StepParams {
            n: len as u32,
            rows: 1,
            t: len as u32,
            pos: 0,
            cap: cache.cap as u32,
            m: 1,
            logit_stride: 0,
            generation: 0,
        };
        model.set_step(work, &p);
        gpu.queue.write_buffer(&work.tokens, 0, bytemuck::cast_slice(tokens));
        gpu.queue.write_buffer(&work.head_rows, 0, bytemuck::cast_slice(&[len as u32 - 1]));
        let mut encoder = gpu.encoder();
        model.encode_trunk(&mut encoder, work, &cache, &work.tokens, &p);
        model.encode_head(&mut encoder, work, &logits, &p);
        cache.len = len;
        let bytes = gpu.read_back(encoder, &logits, (vocab * 4) as u64).await?;
        Ok((
            cache,
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ))
    }

    /// Rows per chunk so that `rows × total_len` cached tokens fit the budget.
    fn chunk_rows(&self, total_len: usize) -> usize {
        let per_token = self.model.kv_bytes_per_token().max(1);
        let by_budget = self.kv_budget_bytes / per_token / total_len.max(1);
        let by_binding = self.model.max_cached_tokens_per_buffer() / total_len.max(1);
        by_budget.min(by_binding).max(1)
    }

    /// Runs `suffixes` (each at most `width` tokens, right-padded) after `prefix`, then reduces
    /// the logits at the flat positions `at` (`row * width + j`) to one f32 each.
    async fn suffixes(
        &mut self,
        prefix: &Cache,
        suffixes: &[&[u32]],
        width: usize,
        at: &[u32],
        reduce: Reduce<'_>,
    ) -> Result<Vec<f32>, BackendError> {
        let model = self.model.clone();
        let gpu = &model.gpu;
        let rows = suffixes.len();
        let total = prefix.len + width;
        self.check_len(total)?;
        let n = rows * width;
        let mut tokens = Vec::with_capacity(n);
        for s in suffixes {
            model.check_tokens(s)?;
            tokens.extend_from_slice(s);
            // Padding only ever follows a row's real tokens, so causal attention hides it.
            tokens.extend(std::iter::repeat_n(0, width - s.len()));
        }
        let chunk = LOGIT_CHUNK.min(at.len()).max(1);
        model.ensure_work(&mut self.work, n, chunk)?;
        let Some(work) = self.work.as_ref() else {
            return Err(BackendError::device("scratch missing"));
        };
        let mut encoder = gpu.encoder();
        let cache = model.gather(&mut encoder, prefix, &vec![0; rows], total)?;
        let p = StepParams {
            n: n as u32,
            rows: rows as u32,
            t: width as u32,
            pos: prefix.len as u32,
            cap: cache.cap as u32,
            m: 0,
            logit_stride: 0,
            generation: 0,
        };
        model.set_step(work, &p);
        gpu.queue.write_buffer(&work.tokens, 0, bytemuck::cast_slice(&tokens));
        model.encode_trunk(&mut encoder, work, &cache, &work.tokens, &p);
        gpu.submit(encoder)?;
        let vocab = model.config.vocab_size;
        let logits = gpu.storage("logits", (chunk * vocab * 4) as u64)?;
        let out = gpu.storage("rewards", (chunk * 4) as u64)?;
        let mut result = Vec::with_capacity(at.len());
        for (c, positions) in at.chunks(chunk).enumerate() {
            let m = positions.len();
            let hp = StepParams { m: m as u32, ..p };
            model.set_step(work, &hp);
            gpu.queue.write_buffer(&work.head_rows, 0, bytemuck::cast_slice(positions));
            let mut encoder = gpu.encoder();
            model.encode_head(&mut encoder, work, &logits, &hp);
            let (yes, no, targets) = match reduce {
                Reduce::Margin { yes, no } => (yes, no, None),
                Reduce::Nll { targets } => (0, 0, Some(&targets[c * chunk..c * chunk + m])),
            };
            let params = gpu.uniform("reduce", &[m as u32, vocab as u32, yes, no]);
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
                match targets {
                    Some(t) => {
                        let tb = gpu.storage_init("targets", bytemuck::cast_slice(t));
                        gpu.dispatch(
                            &mut pass,
                            &gpu.pipelines.nll,
                            &[(0, &params), (1, &logits), (2, &tb), (3, &out)],
                            m as u32,
                        );
                    }
                    None => {
                        gpu.dispatch(
                            &mut pass,
                            &gpu.pipelines.margin,
                            &[(0, &params), (1, &logits), (3, &out)],
                            (m as u32).div_ceil(64),
                        );
                    }
                }
            }
            let bytes = gpu.read_back(encoder, &out, (m * 4) as u64).await?;
            result.extend(
                bytes.chunks_exact(4).take(m).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(result)
    }
}

/// Reward = −perplexity of the response given the prompt, `−exp(mean NLL)`, as
/// specrej-candle's `LikelihoodScorer` (non-incremental) computes it, on the device.
#[derive(Debug)]
pub struct WgpuLikelihoodScorer {
    runner: Runner,
}

impl WgpuLikelihoodScorer {
    /// A scorer on `model` with the default K/V budget.
    pub fn new(model: Arc<WgpuModel>) -> Self {
        Self::with_kv_budget(model, DEFAULT_KV_BUDGET_BYTES)
    }

    /// A scorer whose batched passes keep at most `kv_budget_bytes` of K/V at once.
    pub fn with_kv_budget(model: Arc<WgpuModel>, kv_budget_bytes: usize) -> Self {
        Self { runner: Runner::new(model, kv_budget_bytes) }
    }

    async fn score_async(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        if responses.is_empty() {
            return Ok(Scored::default());
        }
        let prompt = &*likelihood::context(prompt, self.runner.model.config.bos_token_id)?;
        for r in responses {
            self.runner.model.check_tokens(r.tokens)?;
        }
        let width = responses.iter().map(|r| r.tokens.len().saturating_sub(1)).max().unwrap_or(0);
        let (prefix, logits) = self.runner.prefix(prompt, width).await?;
        let mut processed = prompt.len() as u64;
        let lse = log_sum_exp(&logits);
        let mut nll: Vec<f64> = responses
            .iter()
            .map(|r| r.tokens.first().map_or(0.0, |&t| f64::from(lse - logits[t as usize])))
            .collect();
        if width > 0 {
            let chunk = self.runner.chunk_rows(prompt.len() + width);
            for (c, group) in responses.chunks(chunk).enumerate() {
                let inputs: Vec<&[u32]> =
                    group.iter().map(|r| &r.tokens[..r.tokens.len().saturating_sub(1)]).collect();
                let t = Targets::of(group, width);
                let values = self
                    .runner
                    .suffixes(&prefix, &inputs, width, &t.at, Reduce::Nll { targets: &t.tokens })
                    .await?;
                processed += (group.len() * width) as u64;
                for (k, v) in values.into_iter().enumerate() {
                    nll[c * chunk + t.response[k]] += f64::from(v);
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

impl Scorer for WgpuLikelihoodScorer {
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        self.score_async(prompt, responses)
    }
}

/// An LLM judge: reward = `logit(yes) − logit(no)` at the position after
/// `before ++ response ++ after`, as specrej-candle's `JudgeScorer` (non-incremental).
/// The `prompt` argument of [`Scorer::score`] is ignored (`before` holds the question).
#[derive(Debug)]
pub struct WgpuJudgeScorer {
    runner: Runner,
    before: Vec<u32>,
    after: Vec<u32>,
    yes: u32,
    no: u32,
}

impl WgpuJudgeScorer {
    /// A judge on `model` with the default K/V budget.
    ///
    /// # Panics
    /// If `before` is empty or `yes`/`no` are outside the model's vocabulary.
    #[track_caller]
    pub fn new(
        model: Arc<WgpuModel>,
        before: Vec<u32>,
        after: Vec<u32>,
        yes: u32,
        no: u32,
    ) -> Self {
        let vocab = model.config.vocab_size;
        assert!(!before.is_empty(), "WgpuJudgeScorer: `before` must not be empty");
        assert!(
            (yes as usize) < vocab && (no as usize) < vocab,
            "WgpuJudgeScorer: yes ({yes}) / no ({no}) outside the vocabulary ({vocab})"
        );
        Self { runner: Runner::new(model, DEFAULT_KV_BUDGET_BYTES), before, after, yes, no }
    }

    /// Limits the K/V the batched passes keep at once (larger batches go in chunks).
    pub fn with_kv_budget(mut self, kv_budget_bytes: usize) -> Self {
        self.runner.kv_budget_bytes = kv_budget_bytes;
        self
    }

    async fn score_async(&mut self, responses: &[Response<'_>]) -> Result<Scored, BackendError> {
        if responses.is_empty() {
            return Ok(Scored::default());
        }
        self.runner.model.check_tokens(&self.after)?;
        let inputs: Vec<Vec<u32>> =
            responses.iter().map(|r| [r.tokens, &self.after[..]].concat()).collect();
        let width = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let (prefix, logits) = self.runner.prefix(&self.before, width).await?;
        let mut processed = self.before.len() as u64;
        let margin = logits[self.yes as usize] - logits[self.no as usize];
        let mut rewards = vec![margin; responses.len()];
        if width > 0 {
            let chunk = self.runner.chunk_rows(self.before.len() + width);
            for (c, group) in inputs.chunks(chunk).enumerate() {
                let slices: Vec<&[u32]> = group.iter().map(Vec::as_slice).collect();
                let mut at = Vec::new();
                let mut owner = Vec::new();
                for (i, s) in group.iter().enumerate() {
                    if !s.is_empty() {
                        at.push((i * width + s.len() - 1) as u32);
                        owner.push(c * chunk + i);
                    }
                }
                let values = self
                    .runner
                    .suffixes(
                        &prefix,
                        &slices,
                        width,
                        &at,
                        Reduce::Margin { yes: self.yes, no: self.no },
                    )
                    .await?;
                processed += (group.len() * width) as u64;
                for (k, v) in values.into_iter().enumerate() {
                    rewards[owner[k]] = v;
                }
            }
        }
        Ok(Scored { rewards, tokens_processed: processed })
    }
}

impl Scorer for WgpuJudgeScorer {
    fn score(
        &mut self,
        _prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        self.score_async(responses)
    }
}
