//! [`specrej_core::Decoder`] on a [`WgpuModel`].

use std::ops::Range;
use std::sync::Arc;

use specrej_core::backend::{cap_limit, check_fits};
use specrej_core::{BackendError, Decoder, Sampling};

use crate::model::{Cache, StepParams, WgpuModel, Work};

/// Default K/V budget: 1 GiB.
pub const DEFAULT_KV_BUDGET_BYTES: usize = 1 << 30;

/// Batched lock-step decoding on a shared [`WgpuModel`].
#[derive(Debug)]
pub struct WgpuDecoder {
    model: Arc<WgpuModel>,
    kv_budget_bytes: usize,
    work: Option<Work>,
}

/// The device state of one request.
#[derive(Debug)]
pub struct WgpuBatch {
    cache: Cache,
    /// `[rows]` original row ids, on the host.
    row_ids: Vec<u32>,
    /// `[rows]` u32 original row ids (the sampler's noise key).
    row_ids_buf: wgpu::Buffer,
    /// Tokens every row generated so far.
    generated: u32,
    /// `[rows]` u32: the last sampled tokens, fed to the next forward.
    tokens: wgpu::Buffer,
    /// Host copy of `tokens` while they are pending (not yet run through the model).
    pending: Option<Vec<u32>>,
    /// `[rows, vocab]` f32: the distribution the next sample draws from.
    logits: wgpu::Buffer,
    /// Elements between rows of `logits` while they are current (0: row 0 serves every row,
    /// right after prefill); `None` when the pending tokens still have to be run.
    logit_stride: Option<u32>,
    /// `Sampling` uniform.
    sampling_u: wgpu::Buffer,
    /// `[rows, sel_stride]` u32 sampler scratch.
    sel: wgpu::Buffer,
}

impl WgpuBatch {
    /// Live rows.
    pub fn rows(&self) -> usize {
        self.row_ids.len()
    }

    /// The original id of each live row.
    pub fn row_ids(&self) -> &[u32] {
        &self.row_ids
    }

    /// Cached positions per row.
    pub fn cached_len(&self) -> usize {
        self.cache.len
    }
}

impl WgpuDecoder {
    /// A decoder whose K/V cache may use up to `kv_budget_bytes` (also bounded by what the
    /// adapter can bind in one buffer; see [`Decoder::token_capacity`]).
    pub fn new(model: Arc<WgpuModel>, kv_budget_bytes: usize) -> Self {
        Self { model, kv_budget_bytes, work: None }
    }

    /// The shared model.
    pub fn model(&self) -> &Arc<WgpuModel> {
        &self.model
    }

    /// The model's vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    /// End-of-sequence ids from the model file (may be empty).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.model.config.eos_token_ids
    }

    /// Beginning-of-sequence id from the model file, if any.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.model.config.bos_token_id
    }

    fn sampling_words(&self, s: &Sampling) -> ([u32; 8], usize) {
        let vocab = self.vocab_size();
        let top_k = if s.top_k == 0 { vocab } else { s.top_k.min(vocab) };
        let sel_stride = if top_k < vocab {
            top_k
        } else if s.top_p < 1.0 {
            vocab
        } else {
            1
        };
        let words = [
            s.seed as u32,
            (s.seed >> 32) as u32,
            s.temperature.to_bits(),
            top_k as u32,
            s.top_p.to_bits(),
            vocab as u32,
            sel_stride as u32,
            0,
        ];
        (words, sel_stride)
    }

    /// Encodes the forward of the pending tokens (if the logits are not current), growing the
    /// cache first. Leaves `[rows, vocab]` logits in `batch.logits`.
    fn encode_pending(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        batch: &mut WgpuBatch,
    ) -> Result<(), BackendError> {
        if batch.logit_stride.is_some() {
            return Ok(());
        }
        let model = self.model.clone();
        let rows = batch.rows();
        let new_len = batch.cache.len + 1;
        check_fits(self, rows, new_len)?;
        if new_len > batch.cache.cap {
            let limit = cap_limit(self, rows);
            let cap = new_len.max(batch.cache.cap.saturating_mul(2).max(16).min(limit));
            let identity: Vec<u32> = (0..rows as u32).collect();
            let grown = model.gather(encoder, &batch.cache, &identity, cap)?;
            batch.cache = grown;
        }
        model.ensure_work(&mut self.work, rows, rows)?;
        let Some(work) = self.work.as_ref() else {
            return Err(BackendError::device("scratch missing"));
        };
        let vocab = model.config.vocab_size as u32;
        let p = StepParams {
            n: rows as u32,
            rows: rows as u32,
            t: 1,
            pos: batch.cache.len as u32,
            cap: batch.cache.cap as u32,
            m: rows as u32,
            logit_stride: vocab,
            generation: batch.generated,
        };
        model.set_step(work, &p);
        let identity: Vec<u32> = (0..rows as u32).collect();
        model.gpu.queue.write_buffer(&work.head_rows, 0, bytemuck::cast_slice(&identity));
        model.encode_trunk(encoder, work, &batch.cache, &batch.tokens, &p);
        model.encode_head(encoder, work, &batch.logits, &p);
        batch.cache.len = new_len;
        batch.logit_stride = Some(vocab);
        batch.pending = None;
        Ok(())
    }

    async fn step_async(&mut self, batch: &mut WgpuBatch) -> Result<Vec<u32>, BackendError> {
        let rows = batch.rows();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let model = self.model.clone();
        let gpu = &model.gpu;
        gpu.check()?;
        let mut encoder = gpu.encoder();
        let forward = batch.logit_stride.is_none();
        self.encode_pending(&mut encoder, batch)?;
        let Some(work) = self.work.as_ref() else {
            return Err(BackendError::device("scratch missing"));
        };
        if !forward {
            // No forward in this submission: the sampler alone reads the Step uniform.
            let p = StepParams {
                n: rows as u32,
                rows: rows as u32,
                t: 1,
                pos: batch.cache.len as u32,
                cap: batch.cache.cap as u32,
                m: rows as u32,
                logit_stride: batch.logit_stride.unwrap_or(0),
                generation: batch.generated,
            };
            model.set_step(work, &p);
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            gpu.dispatch(
                &mut pass,
                &gpu.pipelines.sample,
                &[
                    (0, &work.step),
                    (1, &batch.sampling_u),
                    (2, &batch.logits),
                    (3, &batch.row_ids_buf),
                    (4, &batch.tokens),
                    (5, &batch.sel),
                ],
                rows as u32,
            );
        }
        let bytes = gpu.read_back(encoder, &batch.tokens, (rows * 4) as u64).await?;
        let tokens: Vec<u32> = bytes
            .chunks_exact(4)
            .take(rows)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        batch.generated += 1;
        batch.logit_stride = None;
        batch.pending = Some(tokens.clone());
        Ok(tokens)
    }

    /// The distribution the next step samples from, `[rows, vocab]` f32 (tests and
    /// diagnostics: runs the pending tokens through the model if needed).
    #[doc(hidden)]
    pub async fn peek_logits(&mut self, batch: &mut WgpuBatch) -> Result<Vec<f32>, BackendError> {
        let model = self.model.clone();
        let mut encoder = model.gpu.encoder();
        self.encode_pending(&mut encoder, batch)?;
        let rows = batch.rows();
        let vocab = model.config.vocab_size;
        let stride = batch.logit_stride.unwrap_or(0) as usize;
        let bytes =
            model.gpu.read_back(encoder, &batch.logits, (rows.max(1) * vocab * 4) as u64).await?;
        let all: Vec<f32> =
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok((0..rows).flat_map(|r| all[r * stride..r * stride + vocab].iter().copied()).collect())
    }
}

impl Decoder for WgpuDecoder {
    type Batch = WgpuBatch;

    fn token_capacity(&self) -> usize {
        let budget = self.kv_budget_bytes / self.kv_bytes_per_token().max(1);
        budget.min(self.model.max_cached_tokens_per_buffer())
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.model.kv_bytes_per_token()
    }

    fn max_sequence_len(&self) -> usize {
        self.model.config.context_length
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        ids: Range<u32>,
        sampling: &Sampling,
    ) -> Result<WgpuBatch, BackendError> {
        // Contract violations are errors here, not panics: in the browser a panic aborts the
        // whole wasm module (and with it the page's engine).
        if ids.is_empty() || prompt.is_empty() {
            return Err(BackendError::device(format!(
                "prefill: empty prompt ({} tokens) or row id range {ids:?}",
                prompt.len()
            )));
        }
        let rows = ids.len();
        let model = self.model.clone();
        model.check_tokens(prompt)?;
        let len = prompt.len();
        check_fits(self, rows, len)?;
        let gpu = &model.gpu;
        gpu.check()?;
        let vocab = model.config.vocab_size;
        model.ensure_work(&mut self.work, len, 1)?;
        let Some(work) = self.work.as_ref() else {
            return Err(BackendError::device("scratch missing"));
        };
        let single = model.cache(1, len)?;
        // Sizes in u64: usize is 32 bits on wasm32.
        let logits = gpu.storage("logits", rows as u64 * vocab as u64 * 4)?;
        let p = StepParams {
            n: len as u32,
            rows: 1,
            t: len as u32,
            pos: 0,
            cap: len as u32,
            m: 1,
            logit_stride: 0,
            generation: 0,
        };
        model.set_step(work, &p);
        gpu.queue.write_buffer(&work.tokens, 0, bytemuck::cast_slice(prompt));
        gpu.queue.write_buffer(&work.head_rows, 0, bytemuck::cast_slice(&[len as u32 - 1]));
        let mut encoder = gpu.encoder();
        model.encode_trunk(&mut encoder, work, &single, &work.tokens, &p);
        model.encode_head(&mut encoder, work, &logits, &p);
        let mut single = single;
        single.len = len;
        let cap = (len + 64).min(cap_limit(self, rows)).max(len);
        let cache = model.gather(&mut encoder, &single, &vec![0; rows], cap)?;
        let row_ids: Vec<u32> = ids.collect();
        let (words, sel_stride) = self.sampling_words(sampling);
        let batch = WgpuBatch {
            cache,
            row_ids_buf: gpu.storage_init("row ids", bytemuck::cast_slice(&row_ids)),
            row_ids,
            generated: 0,
            tokens: gpu.storage("sampled", rows as u64 * 4)?,
            pending: None,
            logits,
            logit_stride: Some(0),
            sampling_u: gpu.uniform("sampling", &words),
            sel: gpu.storage("sampler scratch", rows as u64 * sel_stride as u64 * 4)?,
        };
        gpu.submit(encoder)?;
        drop(single);
        Ok(batch)
    }

    fn step(
        &mut self,
        batch: &mut WgpuBatch,
    ) -> impl Future<Output = Result<Vec<u32>, BackendError>> {
        self.step_async(batch)
    }

    fn retain(&mut self, batch: &mut WgpuBatch, keep: &[usize]) -> Result<(), BackendError> {
        let rows = batch.rows();
        specrej_core::backend::check_retain(keep, rows)?;
        if keep.len() == rows {
            return Ok(());
        }
        let model = self.model.clone();
        let gpu = &model.gpu;
        let keep32: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
        let cap = batch.cache.cap.min(cap_limit(self, keep.len().max(1))).max(batch.cache.len);
        let mut encoder = gpu.encoder();
        let cache = model.gather(&mut encoder, &batch.cache, &keep32, cap)?;
        let vocab = model.config.vocab_size;
        if batch.logit_stride == Some(vocab as u32) {
            // Logits already computed for every row (after peek_logits): gather them too.
            let logits = gpu.storage("logits", (keep.len().max(1) * vocab * 4) as u64)?;
            let params =
                gpu.uniform("gather logits", &[keep.len() as u32, 1, vocab as u32, 1, 1, 0, 0, 0]);
            let keep_buf = gpu.storage_init("keep", bytemuck::cast_slice(&keep32));
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            let groups = ((keep.len() * vocab) as u32).div_ceil(64);
            gpu.dispatch(
                &mut pass,
                &gpu.pipelines.gather,
                &[(0, &params), (1, &keep_buf), (2, &batch.logits), (3, &logits)],
                groups,
            );
            drop(pass);
            batch.logits = logits;
        }
        gpu.submit(encoder)?;
        batch.cache = cache;
        batch.row_ids = keep.iter().map(|&i| batch.row_ids[i]).collect();
        batch.row_ids_buf = gpu.storage_init("row ids", bytemuck::cast_slice(&batch.row_ids));
        if let Some(p) = &batch.pending {
            let kept: Vec<u32> = keep.iter().map(|&i| p[i]).collect();
            gpu.queue.write_buffer(&batch.tokens, 0, bytemuck::cast_slice(&kept));
            batch.pending = Some(kept);
        }
        gpu.check()
    }
}
