//! [`specrej_core::Decoder`] on a [`Model`].

use std::ops::Range;
use std::sync::Arc;

use specrej_core::sampling::sample;
use specrej_core::backend::{cap_limit, check_fits};
use specrej_core::{BackendError, Decoder, Sampling};

use crate::model::{alloc_err, device_err, device_memory, greedy_rows, KvCache, Model, to_host_rows};

/// Default K/V budget: 2 GiB.
pub const DEFAULT_KV_BUDGET_BYTES: usize = 2 << 30;

/// Share of a GPU's free memory that [`CandleDecoder::auto_budget_bytes`] gives the K/V
/// cache. Below one half because `retain` builds the kept rows' cache before it frees the
/// old one (peak: old + new), and activations, logits and the scorer need room too.
pub const AUTO_BUDGET_FREE_FRACTION: f64 = 0.45;

/// Batched lock-step decoding on a shared [`Model`].
#[derive(Debug, Clone)]
pub struct CandleDecoder {
    model: Arc<Model>,
    kv_budget_bytes: usize,
}

/// The state of one request: K/V cache, pending tokens or logits, row ids, counters.
#[derive(Debug)]
pub struct CandleBatch {
    cache: KvCache,
    /// `[rows]`: each row's id from [`Decoder::prefill`], kept across `retain`.
    row_ids: Vec<u32>,
    /// `[rows]`: tokens each row has generated (sampled) so far.
    generated: Vec<u32>,
    /// `[rows]`: tokens sampled by the last step but not yet run through the model.
    pending: Option<Vec<u32>>,
    /// `[rows, vocab]` f32 on the host: the distribution the next sample draws from
    /// (valid while `pending` is `None`; empty after a greedy step on a device, whose
    /// logits never leave it).
    logits: Vec<f32>,
    sampling: Sampling,
}

impl CandleBatch {
    /// Live rows.
    pub fn rows(&self) -> usize {
        self.row_ids.len()
    }

    /// The original id of each live row.
    pub fn row_ids(&self) -> &[u32] {
        &self.row_ids
    }

    /// Cached positions per row (prompt plus generated tokens already run).
    pub fn cached_len(&self) -> usize {
        self.cache.len
    }

    /// `[rows, vocab]` logits the next sample draws from (tests, diagnostics).
    #[cfg(test)]
    pub(crate) fn logits(&self) -> &[f32] {
        &self.logits
    }
}


impl CandleDecoder {
    /// A decoder whose K/V cache may use up to `kv_budget_bytes`
    /// (see [`DEFAULT_KV_BUDGET_BYTES`]).
    pub fn new(model: Arc<Model>, kv_budget_bytes: usize) -> Self {
        Self { model, kv_budget_bytes }
    }

    /// A K/V budget sized from the memory free on the model's device right now:
    /// [`AUTO_BUDGET_FREE_FRACTION`] of it on a CUDA device (so call it after loading the
    /// model and any scorer), [`DEFAULT_KV_BUDGET_BYTES`] on the CPU.
    pub fn auto_budget_bytes(model: &Model) -> Result<usize, BackendError> {
        match device_memory(&model.device).map_err(device_err)? {
            Some((free, _total)) => Ok((free as f64 * AUTO_BUDGET_FREE_FRACTION) as usize),
            None => Ok(DEFAULT_KV_BUDGET_BYTES),
        }
    }

    /// The shared model.
    pub fn model(&self) -> &Arc<Model> {
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

    fn step_sync(&mut self, batch: &mut CandleBatch) -> Result<Vec<u32>, BackendError> {
        let model = &*self.model;
        let vocab = model.config.vocab_size;
        let rows = batch.rows();
        if rows == 0 {
            return Ok(Vec::new());
        }
        if let Some(pending) = batch.pending.take() {
            let new_len = batch.cache.len + 1;
            let fits = check_fits(self, rows, new_len).and_then(|()| {
                batch.cache.reserve(model, new_len, cap_limit(self, rows)).map_err(alloc_err)
            });
            if let Err(e) = fits {
                batch.pending = Some(pending); // the batch stays usable (e.g. after a retain)
                return Err(e);
            }
            let len_before = batch.cache.len;
            let result = model
                .token_tensor(pending.clone(), rows, 1)
                .and_then(|tokens| model.forward_hidden(&tokens, &mut batch.cache))
                .and_then(|hidden| model.last_logits(&hidden)); // [rows, vocab]
            let sampled = match result {
                // Greedy on a device: the argmax runs there and only `rows` ids come back.
                Ok(logits) if !model.device.is_cpu() && batch.sampling.temperature <= 0.0 => greedy_rows(&logits).map(Some),
                // Otherwise the host samples (the row-keyed noise needs 32-bit integer hashing,
                // which candle's tensor ops cannot express): the logits come back.
                Ok(logits) => to_host_rows(&logits).map(|l| {
                    batch.logits = l;
                    None
                }),
                Err(e) => Err(e),
            };
            match sampled {
                Ok(Some(tokens)) => {
                    batch.logits.clear(); // not read back: nothing for `retain` to keep either
                    return Ok(record(batch, tokens));
                }
                Ok(None) => {}
                Err(e) => {
                    // A failed step may have written K/V at `len` (and, if only sampling
                    // failed, advanced it): rewinding keeps the cache consistent, so the step
                    // can be retried.
                    batch.cache.len = len_before;
                    batch.pending = Some(pending);
                    return Err(device_err(e));
                }
            }
        }
        let tokens = sample_rows(&batch.logits, vocab, &batch.sampling, &batch.row_ids, &batch.generated);
        Ok(record(batch, tokens))
    }
}

/// Records `tokens` as the rows' next tokens (run by the next step) and returns them.
fn record(batch: &mut CandleBatch, tokens: Vec<u32>) -> Vec<u32> {
    for g in &mut batch.generated {
        *g += 1;
    }
    batch.pending = Some(tokens.clone());
    tokens
}

/// One token per row from `logits` `[rows, vocab]`, split over two threads for large batches.
fn sample_rows(logits: &[f32], vocab: usize, sampling: &Sampling, row_ids: &[u32], generated: &[u32]) -> Vec<u32> {
    let rows = row_ids.len();
    let one = |r: usize| sample(&logits[r * vocab..(r + 1) * vocab], sampling, row_ids[r], generated[r]);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    if rows < 8 || threads < 2 || sampling.temperature <= 0.0 {
        return (0..rows).map(one).collect();
    }
    let chunk = rows.div_ceil(threads);
    let mut out = vec![0u32; rows];
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            let one = &one;
            s.spawn(move || {
                for (i, slot) in part.iter_mut().enumerate() {
                    *slot = one(c * chunk + i);
                }
            });
        }
    });
    out
}

impl Decoder for CandleDecoder {
    type Batch = CandleBatch;

    fn token_capacity(&self) -> usize {
        self.kv_budget_bytes / self.kv_bytes_per_token()
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.model.config.kv_bytes_per_token()
    }

    fn max_sequence_len(&self) -> usize {
        self.model.config.context_length
    }

    #[track_caller]
    fn prefill(&mut self, prompt: &[u32], ids: Range<u32>, sampling: &Sampling) -> Result<CandleBatch, BackendError> {
        assert!(!ids.is_empty(), "prefill: the row id range must not be empty, got {ids:?}");
        let rows = ids.len();
        assert!(!prompt.is_empty(), "prefill: the prompt must not be empty");
        let model = &*self.model;
        model.check_tokens(prompt).map_err(BackendError::Device)?;
        let len = prompt.len();
        // The budget counts the batch's cache; the transient batch-1 pass is not counted.
        check_fits(self, rows, len)?;
        let mut single = KvCache::new(model, 1, len).map_err(alloc_err)?;
        let logits = model
            .token_tensor(prompt.to_vec(), 1, len)
            .and_then(|tokens| model.forward_hidden(&tokens, &mut single))
            .and_then(|hidden| model.last_logits(&hidden)) // [1, vocab]
            .and_then(|logits| to_host_rows(&logits))
            .map_err(device_err)?;
        // Room for a few steps so the first ones do not reallocate.
        let cap = (len + 64).min(cap_limit(self, rows)).max(len);
        let cache = single.gather_rows(model, &vec![0; rows], cap).map_err(alloc_err)?;
        drop(single);
        Ok(CandleBatch {
            cache,
            row_ids: ids.collect(),
            generated: vec![0; rows],
            pending: None,
            logits: logits.repeat(rows),
            sampling: *sampling,
        })
    }

    fn step(&mut self, batch: &mut CandleBatch) -> impl Future<Output = Result<Vec<u32>, BackendError>> {
        std::future::ready(self.step_sync(batch))
    }

    #[track_caller]
    fn retain(&mut self, batch: &mut CandleBatch, keep: &[usize]) -> Result<(), BackendError> {
        let rows = batch.rows();
        assert!(
            keep.windows(2).all(|w| w[0] < w[1]),
            "retain: indices must be strictly ascending, got {keep:?}"
        );
        if let Some(&last) = keep.last() {
            assert!(last < rows, "retain: index {last} out of range for {rows} rows");
        }
        if keep.len() == rows {
            return Ok(()); // strictly ascending and in range: the identity
        }
        let model = &*self.model;
        let cap = batch.cache.cap.min(cap_limit(self, keep.len().max(1))).max(batch.cache.len);
        batch.cache = batch.cache.gather_rows(model, keep, cap).map_err(alloc_err)?;
        let vocab = model.config.vocab_size;
        batch.row_ids = keep.iter().map(|&i| batch.row_ids[i]).collect();
        batch.generated = keep.iter().map(|&i| batch.generated[i]).collect();
        if let Some(p) = &batch.pending {
            batch.pending = Some(keep.iter().map(|&i| p[i]).collect());
        }
        // The logits are read only while nothing is pending (right after prefill); a greedy
        // step on a device keeps none at all.
        if batch.logits.len() == rows * vocab {
            let mut logits = Vec::with_capacity(keep.len() * vocab);
            for &i in keep {
                logits.extend_from_slice(&batch.logits[i * vocab..(i + 1) * vocab]);
            }
            batch.logits = logits;
        } else {
            batch.logits.clear();
        }
        Ok(())
    }
}
