//! [`specrej_core::Decoder`] on a [`Model`].
//!
//! On the CPU a batch is a set of [`Seq`]s over one frozen prompt sequence (its K/V held
//! once), each row holding blocks of its own from the decoder's [`KvPool`]: `retain` drops
//! rows (their blocks go back to the pool), `fork` shares blocks. On a GPU a batch is a dense
//! cache `[rows, kv_heads, cap, head_dim]` per layer and `retain` is a row gather.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use specrej_core::backend::{cap_limit, check_fits, check_fork, check_retain};
use specrej_core::sampling::sample;
use specrej_core::{BackendError, Decoder, KvLayout, Sampling};

use crate::host::{PassError, with_host};
use crate::kv::{BLOCK, KvPool, Seq};
use crate::model::{
    KvCache, Model, alloc_err, device_err, device_memory, greedy_rows, to_host_rows,
};
use crate::share::{HostRows, KvShare, lock};

/// Default K/V budget: 2 GiB.
pub const DEFAULT_KV_BUDGET_BYTES: usize = 2 << 30;

/// Share of a GPU's free memory that [`CandleDecoder::auto_budget_bytes`] gives the K/V
/// cache. Below one half because `retain` on a GPU builds the kept rows' cache before it
/// frees the old one (peak: old + new), and activations, logits and the scorer need room too.
pub const AUTO_BUDGET_FREE_FRACTION: f64 = 0.45;

/// Share of the host's available memory (`MemAvailable`) that
/// [`CandleDecoder::auto_budget_bytes`] gives the K/V cache on the CPU: the rest stays for
/// the weights, the reward model's caches, activations and everything else on the machine.
pub const AUTO_BUDGET_RAM_FRACTION: f64 = 0.25;

/// Bytes of memory the host can still give out (Linux `MemAvailable`); `None` elsewhere.
pub fn host_available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Batched lock-step decoding on a shared [`Model`].
#[derive(Debug, Clone)]
pub struct CandleDecoder {
    model: Arc<Model>,
    kv_budget_bytes: usize,
    /// The CPU's K/V blocks (every batch of this decoder draws on it).
    pool: Arc<KvPool>,
    /// Where [`CandleDecoder::record_nll`] sends each sampled token's NLL.
    nll: Option<NllSink>,
    /// Where [`CandleDecoder::lend_kv`] lends the CPU batches' K/V.
    share: Option<KvShare>,
}

/// Per sampled token: (row id, tokens the row had before it, `−log softmax(logits)[token]`
/// under the untempered distribution), exactly as [`crate::LikelihoodScorer`] computes it.
pub type NllSink = Arc<Mutex<Vec<(u32, u32, f32)>>>;

/// Where a batch's K/V lives.
#[derive(Debug)]
enum Kv {
    /// CPU: one sequence per row over the shared prompt (lendable: [`KvShare`]).
    Host(Arc<Mutex<HostRows>>),
    /// GPU: one dense cache for all rows.
    Dense(KvCache),
}

/// The state of one request: K/V, pending tokens, row ids, counters.
#[derive(Debug)]
pub struct CandleBatch {
    kv: Kv,
    /// `[rows]`: each row's id from [`Decoder::prefill`] (or a fork), kept across `retain`.
    row_ids: Vec<u32>,
    /// `[rows]`: tokens each row has generated (sampled) so far.
    generated: Vec<u32>,
    /// `[rows]`: tokens sampled by the last step but not yet run through the model.
    pending: Option<Vec<u32>>,
    /// `[vocab]` f32: the prompt's next-token logits, which every row's first token is
    /// drawn from (valid while `pending` is `None`).
    first: Arc<Vec<f32>>,
    /// Prompt length.
    prompt_len: usize,
    sampling: Sampling,
    /// Where the rows go when the batch lets go of them (CPU, [`CandleDecoder::lend_kv`]).
    share: Option<KvShare>,
}

impl Drop for CandleBatch {
    fn drop(&mut self) {
        if let (Some(share), Kv::Host(rows)) = (&self.share, &self.kv) {
            let gone = lock(rows).retain(&[], &self.row_ids);
            share.park(gone);
        }
    }
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
        match &self.kv {
            Kv::Host(rows) => lock(rows).seqs.first().map_or(self.prompt_len, Seq::len),
            Kv::Dense(cache) => cache.len,
        }
    }
}

impl CandleDecoder {
    /// A decoder whose K/V cache may use up to `kv_budget_bytes`
    /// (see [`DEFAULT_KV_BUDGET_BYTES`]).
    pub fn new(model: Arc<Model>, kv_budget_bytes: usize) -> Self {
        let shape = model.kv_shape();
        let block_bytes = shape.block_elems() * model.kv_format.bytes();
        let pool = KvPool::new(shape, model.kv_format, kv_budget_bytes / block_bytes.max(1));
        Self { model, kv_budget_bytes, pool, nll: None, share: None }
    }

    /// From now on, lends the K/V of this decoder's CPU batches through `share` (see
    /// [`KvShare`]): a scorer borrowing from it (the self-judge) reuses the rows' K/V, and
    /// rows a batch lets go of are parked there until judged, released, or their memory is
    /// needed. An error if `share` is for another model.
    pub fn lend_kv(&mut self, share: &KvShare) -> Result<(), BackendError> {
        if !share.is_for(&self.model) {
            return Err(BackendError::device("lend_kv: the share is for another model"));
        }
        self.share = Some(share.clone());
        Ok(())
    }

    /// Runs `pass`; when it runs out of blocks while rows are parked, drops them and
    /// tries once more.
    fn with_room<T>(
        &self,
        mut pass: impl FnMut() -> Result<T, PassError>,
    ) -> Result<T, BackendError> {
        match pass() {
            Err(PassError::OutOfMemory) if self.share.as_ref().is_some_and(KvShare::evict) => {
                pass().map_err(PassError::backend)
            }
            result => result.map_err(PassError::backend),
        }
    }

    /// From now on, every step also sends each sampled token's NLL to `sink` (the likelihood
    /// reward of every prefix of every row, for the price of a log-sum-exp per token: the
    /// logits are the ones a likelihood scorer would compute, bit for bit).
    pub fn record_nll(&mut self, sink: NllSink) {
        self.nll = Some(sink);
    }

    /// A K/V budget sized from the memory free on the model's device right now (so call it
    /// after loading the model and any scorer): [`AUTO_BUDGET_FREE_FRACTION`] of a CUDA
    /// device's free memory, [`AUTO_BUDGET_RAM_FRACTION`] of the host's available memory on
    /// the CPU, or [`DEFAULT_KV_BUDGET_BYTES`] where the host does not say.
    pub fn auto_budget_bytes(model: &Model) -> Result<usize, BackendError> {
        match device_memory(&model.device).map_err(device_err)? {
            Some((free, _total)) => Ok((free as f64 * AUTO_BUDGET_FREE_FRACTION) as usize),
            None => Ok(host_available_memory().map_or(DEFAULT_KV_BUDGET_BYTES, |available| {
                (available as f64 * AUTO_BUDGET_RAM_FRACTION) as usize
            })),
        }
    }

    /// The K/V layout a decoder on `model` uses (the prompt held once, blocks of 16 on the
    /// CPU; dense on a GPU).
    pub fn layout_for(model: &Model) -> KvLayout {
        if model.device.is_cpu() {
            KvLayout { shared_prompt: true, block: BLOCK }
        } else {
            KvLayout::DENSE
        }
    }

    /// The budget, in bytes, that holds exactly `rows` rows of `generated` tokens each after
    /// a `prompt`-token prompt on `model` (for tests and callers that size by rows).
    pub fn budget_for(model: &Model, prompt: usize, rows: usize, generated: usize) -> usize {
        Self::layout_for(model)
            .tokens(prompt, rows, generated)
            .saturating_mul(model.kv_bytes_per_token())
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

    /// Bytes of K/V the CPU pool holds right now, and at most since the decoder was made
    /// (0 on a GPU, whose caches are dense tensors).
    pub fn kv_bytes_held(&self) -> (u64, u64) {
        let block = self.pool.block_bytes() as u64;
        (self.pool.in_use() as u64 * block, self.pool.peak() as u64 * block)
    }

    fn on_host(&self) -> bool {
        self.model.device.is_cpu()
    }

    /// The logits `[rows, vocab]` (row-major) the next [`Decoder::step`] of `batch` will
    /// sample from, without changing `batch` (diagnostics and tests). On the CPU the rows
    /// are forked for the look (blocks shared), so it costs one step's compute.
    pub fn peek_logits(&mut self, batch: &CandleBatch) -> Result<Vec<f32>, BackendError> {
        let model = &*self.model;
        let Some(pending) = &batch.pending else {
            return Ok(batch.first.repeat(batch.rows()));
        };
        match &batch.kv {
            Kv::Host(rows) => {
                let mut forks: Vec<Seq> = lock(rows).seqs.iter().map(Seq::fork).collect();
                let hidden = self.with_room(|| {
                    let mut pass: Vec<(&mut Seq, &[u32])> =
                        forks.iter_mut().zip(pending.chunks_exact(1)).collect();
                    model.forward_seqs(&mut pass, &self.pool)
                })?;
                model.logits(&hidden).and_then(|l| to_host_rows(&l)).map_err(device_err)
            }
            Kv::Dense(cache) => {
                let rows: Vec<usize> = (0..batch.rows()).collect();
                let mut copy = cache.gather_rows(model, &rows, cache.len + 1).map_err(alloc_err)?;
                model
                    .token_tensor(pending.clone(), batch.rows(), 1)
                    .and_then(|tokens| model.forward_hidden(&tokens, &mut copy))
                    .and_then(|hidden| model.last_logits(&hidden))
                    .and_then(|l| to_host_rows(&l))
                    .map_err(device_err)
            }
        }
    }

    fn step_sync(&mut self, batch: &mut CandleBatch) -> Result<Vec<u32>, BackendError> {
        let rows = batch.rows();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let Some(pending) = batch.pending.take() else {
            // The first step draws from the prompt's logits.
            let vocab = self.model.config.vocab_size;
            let first = Arc::clone(&batch.first);
            let tokens =
                sample_rows(&first, 0, vocab, &batch.sampling, &batch.row_ids, &batch.generated);
            self.send_nll(&first, 0, vocab, &tokens, &batch.row_ids, &batch.generated);
            return Ok(record(batch, tokens));
        };
        let result = match &mut batch.kv {
            Kv::Host(_) => {
                // The CPU pass is step_batches' (one batch of one).
                batch.pending = Some(pending);
                return self
                    .step_batches(&mut [batch])
                    .pop()
                    .unwrap_or_else(|| Err(BackendError::device("no step")));
            }
            Kv::Dense(cache) => {
                self.step_dense(cache, &pending, &batch.sampling, &batch.row_ids, &batch.generated)
            }
        };
        match result {
            Ok(tokens) => Ok(record(batch, tokens)),
            Err(e) => {
                batch.pending = Some(pending); // the batch stays usable (e.g. after a retain)
                Err(e)
            }
        }
    }

    /// One [`Decoder::step`] of each of `batches` (all of this decoder), in order. On the CPU
    /// every row of every batch runs in one forward pass: a row's logits do not depend on the
    /// other rows (the batch-invariance rule), so each batch gets the tokens its own step
    /// would give it, bit for bit. On a GPU (a dense cache per batch) each batch steps alone.
    /// A failed pass fails every batch in it, each left as it was (the step can be retried).
    pub fn step_batches(
        &mut self,
        batches: &mut [&mut CandleBatch],
    ) -> Vec<Result<Vec<u32>, BackendError>> {
        let mut results: Vec<Option<Result<Vec<u32>, BackendError>>> =
            batches.iter().map(|_| None).collect();
        // `[merged batches]`: each batch's pending tokens, `[rows]`, taken out for the pass.
        let mut merged: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, batch) in batches.iter_mut().enumerate() {
            let merge = batch.rows() > 0 && matches!(batch.kv, Kv::Host(_));
            match batch.pending.take() {
                Some(pending) if merge => merged.push((i, pending)),
                pending => {
                    batch.pending = pending;
                    results[i] = Some(self.step_sync(batch));
                }
            }
        }
        if !merged.is_empty() {
            match self.step_merged(batches, &merged) {
                Ok(tokens) => {
                    for ((i, _), tokens) in merged.iter().zip(tokens) {
                        results[*i] = Some(Ok(record(batches[*i], tokens)));
                    }
                }
                Err(error) => {
                    for (i, pending) in merged {
                        batches[i].pending = Some(pending); // as it was
                        results[i] = Some(Err(error.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(BackendError::device("step_batches: a batch was not stepped"))
                })
            })
            .collect()
    }

    /// The CPU pass of a step (of [`CandleDecoder::step_batches`], and so of every CPU
    /// [`Decoder::step`]): the `pending` tokens of batches `merged[j].0` run together; each
    /// batch's rows are sampled with its own sampling, straight from the logits' storage.
    fn step_merged(
        &self,
        batches: &mut [&mut CandleBatch],
        merged: &[(usize, Vec<u32>)],
    ) -> Result<Vec<Vec<u32>>, BackendError> {
        let model = &*self.model;
        let vocab = model.config.vocab_size;
        let hidden = {
            // `[merged batches]`: each one's rows, locked for the pass, and its pending tokens.
            let mut locked = Vec::with_capacity(merged.len());
            let mut next = merged.iter().peekable();
            for (i, batch) in batches.iter().enumerate() {
                let Some((_, pending)) = next.next_if(|(j, _)| *j == i) else { continue };
                if let Kv::Host(rows) = &batch.kv {
                    locked.push((lock(rows), pending));
                }
            }
            let hidden = self.with_room(|| {
                let mut pass: Vec<(&mut Seq, &[u32])> = Vec::new();
                for (rows, pending) in locked.iter_mut() {
                    pass.extend(rows.seqs.iter_mut().zip(pending.chunks_exact(1)));
                }
                model.forward_seqs(&mut pass, &self.pool)
            })?; // [Σ rows, hidden]
            for (rows, pending) in locked.iter_mut() {
                for (run, &token) in rows.run.iter_mut().zip(pending.iter()) {
                    run.push(token);
                }
            }
            hidden
        };
        let logits = model.logits(&hidden).map_err(device_err)?; // [Σ rows, vocab]
        with_host(&logits, |l| {
            let mut offset = 0;
            merged
                .iter()
                .map(|(i, _)| {
                    let batch = &*batches[*i];
                    let rows = &l[offset * vocab..(offset + batch.rows()) * vocab];
                    offset += batch.rows();
                    let tokens = sample_rows(
                        rows,
                        vocab,
                        vocab,
                        &batch.sampling,
                        &batch.row_ids,
                        &batch.generated,
                    );
                    self.send_nll(rows, vocab, vocab, &tokens, &batch.row_ids, &batch.generated);
                    tokens
                })
                .collect()
        })
        .map_err(device_err)
    }

    /// The NLLs of `tokens` under `logits` (row `r` at `r * stride`) to the sink, if any.
    fn send_nll(
        &self,
        logits: &[f32],
        stride: usize,
        vocab: usize,
        tokens: &[u32],
        row_ids: &[u32],
        generated: &[u32],
    ) {
        let Some(sink) = &self.nll else { return };
        let out: Vec<AtomicU32> = tokens.iter().map(|_| AtomicU32::new(0)).collect();
        let one = |r: usize| {
            let row = &logits[r * stride..r * stride + vocab];
            specrej_core::likelihood::log_sum_exp(row) - row[tokens[r] as usize]
        };
        candle_core::utils::barrier_pool().execute_chunked(tokens.len(), |range| {
            for r in range {
                out[r].store(one(r).to_bits(), Ordering::Relaxed);
            }
        });
        if let Ok(mut sink) = sink.lock() {
            for (r, nll) in out.into_iter().enumerate() {
                sink.push((row_ids[r], generated[r], f32::from_bits(nll.into_inner())));
            }
        }
    }

    /// Runs each row's pending token and samples the next (GPU, dense cache).
    fn step_dense(
        &self,
        cache: &mut KvCache,
        pending: &[u32],
        sampling: &Sampling,
        row_ids: &[u32],
        generated: &[u32],
    ) -> Result<Vec<u32>, BackendError> {
        let model = &*self.model;
        let rows = pending.len();
        let new_len = cache.len + 1;
        check_fits(self, rows, new_len)?;
        cache.reserve(model, new_len, cap_limit(self, rows)).map_err(alloc_err)?;
        let len_before = cache.len;
        let result = model
            .token_tensor(pending.to_vec(), rows, 1)
            .and_then(|tokens| model.forward_hidden(&tokens, cache))
            .and_then(|hidden| model.last_logits(&hidden)); // [rows, vocab]
        let vocab = model.config.vocab_size;
        let sampled = result.and_then(|logits| {
            if sampling.temperature <= 0.0 {
                // Greedy on a device: the argmax runs there and only `rows` ids come back.
                greedy_rows(&logits)
            } else {
                // The host samples (the row-keyed noise needs 32-bit integer hashing, which
                // candle's tensor ops cannot express): the logits come back.
                to_host_rows(&logits)
                    .map(|l| sample_rows(&l, vocab, vocab, sampling, row_ids, generated))
            }
        });
        sampled.map_err(|e| {
            // A failed step may have written K/V at `len`: rewinding keeps the cache
            // consistent, so the step can be retried.
            cache.len = len_before;
            device_err(e)
        })
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

/// One token per row: row `r` draws from `logits[r * stride..r * stride + vocab]` (a
/// `stride` of 0 gives every row the same logits). Rows run in parallel on candle's
/// persistent thread pool; each row's draw depends only on its logits and its noise key.
fn sample_rows(
    logits: &[f32],
    stride: usize,
    vocab: usize,
    sampling: &Sampling,
    row_ids: &[u32],
    generated: &[u32],
) -> Vec<u32> {
    let rows = row_ids.len();
    let one = |r: usize| {
        sample(&logits[r * stride..r * stride + vocab], sampling, row_ids[r], generated[r])
    };
    if rows < 4 {
        return (0..rows).map(one).collect();
    }
    let out: Vec<AtomicU32> = (0..rows).map(|_| AtomicU32::new(0)).collect();
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        for r in range {
            out[r].store(one(r), Ordering::Relaxed);
        }
    });
    out.into_iter().map(AtomicU32::into_inner).collect()
}

impl Decoder for CandleDecoder {
    type Batch = CandleBatch;

    fn token_capacity(&self) -> usize {
        if self.on_host() {
            self.pool.capacity() * BLOCK
        } else {
            self.kv_budget_bytes / self.kv_bytes_per_token()
        }
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.model.kv_bytes_per_token()
    }

    fn kv_layout(&self) -> KvLayout {
        Self::layout_for(&self.model)
    }

    fn max_sequence_len(&self) -> usize {
        self.model.config.context_length
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        ids: Range<u32>,
        sampling: &Sampling,
    ) -> Result<CandleBatch, BackendError> {
        if ids.is_empty() {
            return Err(BackendError::device(format!(
                "prefill: the row id range must not be empty, got {ids:?}"
            )));
        }
        if prompt.is_empty() {
            return Err(BackendError::device("prefill: the prompt must not be empty"));
        }
        let rows = ids.len();
        let model = &*self.model;
        model.check_tokens(prompt).map_err(BackendError::Device)?;
        let len = prompt.len();
        if len > model.config.context_length {
            return Err(BackendError::device(format!(
                "sequence length {len} exceeds the model's context length {}",
                model.config.context_length
            )));
        }
        let (kv, first) = if self.on_host() {
            let mut prefix = Seq::new();
            let hidden =
                self.with_room(|| model.forward_seqs(&mut [(&mut prefix, prompt)], &self.pool))?; // [len, hidden]
            let first = hidden
                .narrow(0, len - 1, 1)
                .and_then(|last| model.logits(&last))
                .and_then(|l| to_host_rows(&l))
                .map_err(device_err)?;
            let prefix = Arc::new(prefix);
            let seqs = (0..rows).map(|_| Seq::on_prefix(&prefix, len)).collect();
            let rows = Arc::new(Mutex::new(HostRows::new(prompt, seqs)));
            if let Some(share) = &self.share {
                share.register(&rows);
            }
            (Kv::Host(rows), first)
        } else {
            // The budget counts the batch's cache; the transient batch-1 pass is not counted.
            check_fits(self, rows, len)?;
            let mut single = KvCache::new(model, 1, len).map_err(alloc_err)?;
            let first = model
                .token_tensor(prompt.to_vec(), 1, len)
                .and_then(|tokens| model.forward_hidden(&tokens, &mut single))
                .and_then(|hidden| model.last_logits(&hidden)) // [1, vocab]
                .and_then(|logits| to_host_rows(&logits))
                .map_err(device_err)?;
            // Room for a few steps so the first ones do not reallocate.
            let cap = (len + 64).min(cap_limit(self, rows)).max(len);
            let cache = single.gather_rows(model, &vec![0; rows], cap).map_err(alloc_err)?;
            (Kv::Dense(cache), first)
        };
        Ok(CandleBatch {
            kv,
            row_ids: ids.collect(),
            generated: vec![0; rows],
            pending: None,
            first: Arc::new(first),
            prompt_len: len,
            sampling: *sampling,
            share: self.share.clone().filter(|_| self.on_host()),
        })
    }

    fn step(
        &mut self,
        batch: &mut CandleBatch,
    ) -> impl Future<Output = Result<Vec<u32>, BackendError>> {
        std::future::ready(self.step_sync(batch))
    }

    fn retain(&mut self, batch: &mut CandleBatch, keep: &[usize]) -> Result<(), BackendError> {
        let rows = batch.rows();
        check_retain(keep, rows)?;
        if keep.len() == rows {
            return Ok(()); // strictly ascending and in range: the identity
        }
        match &mut batch.kv {
            Kv::Host(host) => {
                // Dropped rows' blocks go back to the pool (or are parked, when lent).
                let gone = lock(host).retain(keep, &batch.row_ids);
                if let Some(share) = &batch.share {
                    share.park(gone);
                }
            }
            Kv::Dense(cache) => {
                let model = &*self.model;
                let cap = cache.cap.min(cap_limit(self, keep.len().max(1))).max(cache.len);
                *cache = cache.gather_rows(model, keep, cap).map_err(alloc_err)?;
            }
        }
        batch.row_ids = keep.iter().map(|&i| batch.row_ids[i]).collect();
        batch.generated = keep.iter().map(|&i| batch.generated[i]).collect();
        if let Some(p) = &batch.pending {
            batch.pending = Some(keep.iter().map(|&i| p[i]).collect());
        }
        Ok(())
    }

    fn fork(
        &mut self,
        batch: &mut CandleBatch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        check_fork(children, batch.rows())?;
        let Kv::Host(host) = &batch.kv else {
            return Err(BackendError::device("fork: rows can be forked on the CPU only"));
        };
        let mut host = lock(host);
        for &(parent, id) in children {
            let child = host.seqs[parent].fork();
            let run = host.run[parent].clone();
            host.seqs.push(child);
            host.run.push(run);
            batch.row_ids.push(id);
            batch.generated.push(batch.generated[parent]);
            if let Some(p) = &mut batch.pending {
                p.push(p[parent]);
            }
        }
        Ok(())
    }
}
