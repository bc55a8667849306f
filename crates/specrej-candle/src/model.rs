//! The Llama-family forward pass with an explicit, row-selectable K/V cache.
//!
//! All live rows of a cache share one position, so there are no ragged masks: decode steps
//! attend to every cached position, multi-token passes (prefill, scoring) use a causal mask.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device as CDevice, Module, Tensor};

use crate::config::ModelConfig;
use crate::kv::KvFormat;
use crate::options::WeightFormat;

type CResult<T> = candle_core::Result<T>;

/// A dense projection `y = x Wᵀ (+ b)`.
#[derive(Debug)]
pub(crate) struct Linear {
    /// `[out, padded_in]`: quantized, or f32 (candle's `QMatMul::Tensor`).
    pub(crate) weight: QMatMul,
    /// `[out]` f32.
    pub(crate) bias: Option<Tensor>,
    /// Input width the weight expects: the model's width, or that rounded up with zero
    /// columns so candle's fast tiled Q8_0 kernels apply (they need multiples of 256).
    pub(crate) padded_in: usize,
}

impl Linear {
    /// `x`: `[n, in]` → `[n, padded_in]` (zero columns appended when the weight is padded).
    fn pad(&self, x: &Tensor) -> CResult<Tensor> {
        let width = x.dim(1)?;
        if width < self.padded_in {
            x.pad_with_zeros(1, 0, self.padded_in - width)
        } else {
            Ok(x.clone())
        }
    }

    /// `x`: `[n, in]` or `[n, padded_in]` f32 contiguous → `[n, out]` f32.
    pub(crate) fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let x = self.pad(x)?;
        let y = match &self.weight {
            QMatMul::Tensor(w) if x.device().is_cpu() => dense_rows(&x, w)?,
            weight => weight.forward(&x)?,
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> CResult<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Rows per gemm call of a dense f32 projection on the CPU.
const DENSE_TILE: usize = 16;

/// `x Wᵀ` for `x` `[n, in]` and `w` `[out, in]` (f32, CPU), as gemm calls of exactly
/// [`DENSE_TILE`] rows (the last padded with zeros): the gemm picks its kernels and its
/// split by shape, so a fixed shape makes a row's result independent of `n` and of the
/// other rows.
fn dense_rows(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let n = x.dim(0)?;
    let wt = w.t()?;
    let mut parts = Vec::with_capacity(n.div_ceil(DENSE_TILE));
    for start in (0..n).step_by(DENSE_TILE) {
        let rows = DENSE_TILE.min(n - start);
        let tile = x.narrow(0, start, rows)?;
        let tile = if rows < DENSE_TILE {
            tile.pad_with_zeros(0, 0, DENSE_TILE - rows)?
        } else {
            tile.contiguous()?
        };
        parts.push(tile.matmul(&wt)?.narrow(0, 0, rows)?); // [rows, out]
    }
    Tensor::cat(&parts, 0)
}

/// Several projections of the same input (q/k/v, gate/up). Uses candle's fused kernel
/// (one activation quantization, one parallel region) where it applies; that choice
/// depends only on the weights, never on the row count, so rows stay independent.
pub(crate) fn forward_group<const N: usize>(
    linears: [&Linear; N],
    x: &Tensor,
) -> CResult<[Tensor; N]> {
    let x = linears[0].pad(x)?; // [n, padded_in]
    let same_width = linears.iter().all(|l| l.padded_in == linears[0].padded_in);
    let quantized: Option<Vec<&QTensor>> = linears
        .iter()
        .map(|l| match &l.weight {
            QMatMul::QTensor(q) => Some(q.as_ref()),
            _ => None,
        })
        .collect();
    // x86 only: candle's aarch64 fused kernel applies to single rows only, which would make
    // a row's numerics depend on the batch size.
    if let (true, true, Some(qs)) = (cfg!(target_arch = "x86_64"), same_width, quantized)
        && let Some(outs) = QTensor::gemv_fused_shared_lhs(&qs, &x)?
        && outs.len() == N
    {
        let mut outs = outs.into_iter();
        let mut result = Vec::with_capacity(N);
        for l in linears {
            let y = outs
                .next()
                .ok_or_else(|| candle_core::Error::Msg("fused matmul: missing output".into()))?;
            result.push(l.add_bias(y)?);
        }
        return result
            .try_into()
            .map_err(|_| candle_core::Error::Msg("fused matmul: arity".into()));
    }
    let mut result = Vec::with_capacity(N);
    for l in linears {
        result.push(l.forward(&x)?);
    }
    result.try_into().map_err(|_| candle_core::Error::Msg("matmul group: arity".into()))
}

/// Token embedding table `[vocab, hidden]`: kept quantized when the file stores it so
/// (rows are dequantized on lookup), f32 otherwise.
#[derive(Debug)]
pub(crate) enum Embedding {
    Quantized(Arc<QTensor>),
    F32(Tensor),
}

impl Embedding {
    /// `ids`: `[n]` u32 → `[n, hidden]` f32.
    pub(crate) fn forward(&self, ids: &Tensor) -> CResult<Tensor> {
        match self {
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::F32(t) => t.index_select(ids, 0),
        }
    }
}

/// One transformer block.
#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor, // [hidden] f32
    pub(crate) q: Linear,         // [heads*head_dim, hidden]
    pub(crate) k: Linear,         // [kv_heads*head_dim, hidden]
    pub(crate) v: Linear,         // [kv_heads*head_dim, hidden]
    pub(crate) o: Linear,         // [hidden, heads*head_dim]
    pub(crate) ffn_norm: Tensor,  // [hidden] f32
    pub(crate) gate: Linear,      // [ffn, hidden]
    pub(crate) up: Linear,        // [ffn, hidden]
    pub(crate) down: Linear,      // [hidden, ffn]
}

/// A loaded model: weights plus hyper-parameters. Immutable; share it with [`Arc`]
/// between a decoder and scorers.
#[derive(Debug)]
pub struct Model {
    pub(crate) config: ModelConfig,
    pub(crate) format: WeightFormat,
    /// How CPU K/V caches on this model store K and V.
    pub(crate) kv_format: KvFormat,
    pub(crate) device: CDevice,
    pub(crate) embedding: Embedding,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor, // [hidden] f32
    /// `[vocab, hidden]`; `None` for a trunk loaded without its language-model head
    /// ([`crate::load_safetensors_trunk`]).
    pub(crate) head: Option<Linear>,
    /// GGUF files from llama.cpp's converter permute Q/K rows for the interleaved
    /// (GPT-J) rotation; Hugging Face checkpoints (and GGUF qwen2) use rotate-half.
    pub(crate) rope_interleaved: bool,
    /// `[head_dim/2]` f32 inverse frequencies (already divided by any llama3 scaling factors).
    pub(crate) inv_freq: Vec<f32>,
    /// `tokenizer.ggml.tokens` when the file has it.
    pub(crate) vocab: Option<Vec<String>>,
}

impl Model {
    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How the projection weights are held in memory.
    pub fn weight_format(&self) -> WeightFormat {
        self.format
    }

    /// The candle device the model runs on.
    pub fn device(&self) -> &CDevice {
        &self.device
    }

    /// How K/V caches on the CPU store K and V.
    pub fn kv_format(&self) -> KvFormat {
        self.kv_format
    }

    /// Bytes one cached token's K/V takes over all layers: in [`Model::kv_format`] on the
    /// CPU, f32 on a GPU.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        let bytes = if self.device.is_cpu() { self.kv_format.bytes() } else { 4 };
        2 * c.layers * c.kv_heads * c.head_dim * bytes
    }

    /// The token strings of a GGUF file's `tokenizer.ggml.tokens`, indexed by id.
    pub fn vocab(&self) -> Option<&[String]> {
        self.vocab.as_deref()
    }

    /// `cos`, `sin`: `[t, head_dim/2]` f32 for positions `pos..pos+t`.
    fn rope_tables(&self, pos: usize, t: usize) -> CResult<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in pos..pos + t {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
        if self.rope_interleaved {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    }

    /// Runs `tokens` (`[rows, t]` u32, one row per cache row) at the cache's position,
    /// appending their K/V. Returns the final hidden states `[rows, t, hidden]` f32, before
    /// the output norm. `t > 1` attends causally; earlier cached positions are all visible.
    ///
    /// The cache must already have room for `t` more positions ([`KvCache::reserve`]).
    pub(crate) fn forward_hidden(&self, tokens: &Tensor, cache: &mut KvCache) -> CResult<Tensor> {
        let c = &self.config;
        let (rows, t) = tokens.dims2()?;
        if rows != cache.rows {
            candle_core::bail!("forward: {rows} token rows for a cache of {} rows", cache.rows)
        }
        let pos = cache.len;
        let total = pos + t;
        if total > cache.cap {
            candle_core::bail!("forward: cache capacity {} < {total}", cache.cap)
        }
        let (heads, kv_heads, hd) = (c.heads, c.kv_heads, c.head_dim);
        let group = c.group_size();
        let (cos, sin) = self.rope_tables(pos, t)?; // [t, hd/2] f32
        let scale = 1.0 / (hd as f64).sqrt();
        // [group*t, total] f32: 0 where visible, -inf above the causal diagonal.
        let mask = if t > 1 {
            let mut m = Vec::with_capacity(group * t * total);
            for _ in 0..group {
                for s in 0..t {
                    for j in 0..total {
                        m.push(if j > pos + s { f32::NEG_INFINITY } else { 0.0 });
                    }
                }
            }
            Some(Tensor::from_vec(m, (group * t, total), &self.device)?)
        } else {
            None
        };

        let ids = tokens.flatten_all()?; // [rows*t] u32
        let mut x = self.embedding.forward(&ids)?; // [rows*t, hidden] f32
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_norm_eps)?; // [rows*t, hidden]
            // q: [rows*t, heads*hd], k and v: [rows*t, kv_heads*hd]
            let [q, k, v] = forward_group([&layer.q, &layer.k, &layer.v], &h)?;
            let q = q.reshape((rows, t, heads, hd))?.transpose(1, 2)?.contiguous()?; // [rows, heads, t, hd]
            let k = k.reshape((rows, t, kv_heads, hd))?.transpose(1, 2)?.contiguous()?; // [rows, kv_heads, t, hd]
            let v = v.reshape((rows, t, kv_heads, hd))?.transpose(1, 2)?.contiguous()?; // [rows, kv_heads, t, hd]
            let q = self.rope(&q, &cos, &sin)?;
            let k = self.rope(&k, &cos, &sin)?;
            cache.k[l].slice_set(&k, 2, pos)?;
            cache.v[l].slice_set(&v, 2, pos)?;
            let y = {
                let keys = cache.k[l].narrow(2, 0, total)?; // [rows, kv_heads, total, hd] strided view
                let values = cache.v[l].narrow(2, 0, total)?; // [rows, kv_heads, total, hd] strided view
                // Grouped-query attention without copying K/V: the `group` query heads that share
                // a kv head are stacked along the query axis.
                let q = (q * scale)?.reshape((rows, kv_heads, group * t, hd))?; // [rows, kv_heads, group*t, hd]
                let att = q.matmul(&keys.t()?)?; // [rows, kv_heads, group*t, total]
                let att = match &mask {
                    Some(m) => att.broadcast_add(m)?,
                    None => att,
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                att.matmul(&values)? // [rows, kv_heads, group*t, hd]
                    .reshape((rows, heads, t, hd))?
                    .transpose(1, 2)?
                    .reshape((rows * t, heads * hd))? // [rows*t, heads*hd]
            };
            x = (x + layer.o.forward(&y)?)?; // [rows*t, hidden]

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps)?; // [rows*t, hidden]
            let [g, u] = forward_group([&layer.gate, &layer.up], &h)?; // [rows*t, ffn] each
            let a = (g.silu()? * u)?; // [rows*t, ffn]
            x = (x + layer.down.forward(&a)?)?; // [rows*t, hidden]
        }
        cache.len = total;
        x.reshape((rows, t, c.hidden_size))
    }

    /// Output norm and projection: `hidden` `[n, hidden]` f32 → logits `[n, vocab]` f32.
    pub(crate) fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        let h = self.final_norm(hidden)?;
        self.head_forward(&h)
    }

    /// The output projection alone: final-normed `[n, hidden]` → logits `[n, vocab]`.
    pub(crate) fn head_forward(&self, normed: &Tensor) -> CResult<Tensor> {
        match &self.head {
            Some(head) => head.forward(normed),
            None => candle_core::bail!("this model was loaded as a trunk, without its output head"),
        }
    }

    /// The output RMSNorm: `[n, hidden]` f32 → `[n, hidden]` f32.
    pub(crate) fn final_norm(&self, hidden: &Tensor) -> CResult<Tensor> {
        candle_nn::ops::rms_norm(&hidden.contiguous()?, &self.norm, self.config.rms_norm_eps)
    }

    /// Whether the model has its language-model head (a trunk loaded with
    /// [`crate::load_safetensors_trunk`] has not).
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// A direct full forward of `ids` (batch 1, fresh cache): the final-normed hidden
    /// states `[ids.len() × hidden]`, row-major. On the CPU this is the same arithmetic as
    /// every other pass (so the same bits as incremental scoring); use it to build any head
    /// on top of the trunk.
    pub fn hidden_states(&self, ids: &[u32]) -> Result<Vec<f32>, specrej_core::BackendError> {
        use specrej_core::BackendError;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.check_tokens(ids).map_err(BackendError::Device)?;
        if ids.len() > self.config.context_length {
            return Err(BackendError::device(format!(
                "input of {} tokens exceeds the context length {}",
                ids.len(),
                self.config.context_length
            )));
        }
        if self.device.is_cpu() {
            let pool = crate::kv::KvPool::new(self.kv_shape(), self.kv_format, usize::MAX);
            let mut seq = crate::kv::Seq::new();
            let hidden = self
                .forward_seqs(&mut [(&mut seq, ids)], &pool)
                .map_err(crate::host::PassError::backend)?;
            return self.final_norm(&hidden).and_then(|h| to_host_rows(&h)).map_err(device_err);
        }
        let mut cache = KvCache::new(self, 1, ids.len()).map_err(alloc_err)?;
        self.token_tensor(ids.to_vec(), 1, ids.len())
            .and_then(|t| self.forward_hidden(&t, &mut cache))
            .and_then(|h| h.squeeze(0))
            .and_then(|h| self.final_norm(&h))
            .and_then(|h| to_host_rows(&h))
            .map_err(device_err)
    }

    /// Logits at the last position of `[rows, t, hidden]` hidden states → `[rows, vocab]`.
    pub(crate) fn last_logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?; // [rows, hidden]
        self.logits(&last)
    }

    /// Checks every id is inside the vocabulary.
    pub(crate) fn check_tokens(&self, tokens: &[u32]) -> Result<(), String> {
        let vocab = self.config.vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(bad) => Err(format!("token id {bad} is outside the vocabulary (size {vocab})")),
            None => Ok(()),
        }
    }

    /// A `[rows, t]` u32 token tensor on the model's device.
    pub(crate) fn token_tensor(&self, tokens: Vec<u32>, rows: usize, t: usize) -> CResult<Tensor> {
        Tensor::from_vec(tokens, (rows, t), &self.device)
    }
}

/// Why a K/V allocation failed.
#[derive(Debug)]
pub(crate) enum AllocError {
    OutOfMemory,
    Other(candle_core::Error),
}

impl From<candle_core::Error> for AllocError {
    fn from(e: candle_core::Error) -> Self {
        if is_oom(&e) { AllocError::OutOfMemory } else { AllocError::Other(e) }
    }
}

/// Whether a candle error is a device allocation failure: the host allocator's, CUDA's
/// (`CUDA_ERROR_OUT_OF_MEMORY`, "out of memory") or cuBLAS's (`CUBLAS_STATUS_ALLOC_FAILED`).
pub(crate) fn is_oom(e: &candle_core::Error) -> bool {
    let msg = crate::error::message(e).to_ascii_lowercase();
    msg.contains("out of memory") || msg.contains("out_of_memory") || msg.contains("alloc_failed")
}

/// A zero-filled `[rows, kv_heads, cap, head_dim]` f32 buffer. On the CPU the allocation
/// is fallible (`try_reserve`), so running out of memory is reported instead of aborting.
fn alloc_kv(
    rows: usize,
    kv_heads: usize,
    cap: usize,
    hd: usize,
    device: &CDevice,
) -> Result<Tensor, AllocError> {
    let n = rows
        .checked_mul(kv_heads)
        .and_then(|n| n.checked_mul(cap))
        .and_then(|n| n.checked_mul(hd))
        .ok_or(AllocError::OutOfMemory)?;
    if device.is_cpu() {
        let mut data: Vec<f32> = Vec::new();
        data.try_reserve_exact(n).map_err(|_| AllocError::OutOfMemory)?;
        data.resize(n, 0.0);
        Ok(Tensor::from_vec(data, (rows, kv_heads, cap, hd), device)?)
    } else {
        Ok(Tensor::zeros((rows, kv_heads, cap, hd), DType::F32, device)?)
    }
}

/// Per-layer K/V of a batch of rows that all sit at the same position.
#[derive(Debug)]
pub(crate) struct KvCache {
    pub(crate) k: Vec<Tensor>, // per layer: [rows, kv_heads, cap, head_dim] f32, positions >= len unused
    pub(crate) v: Vec<Tensor>, // per layer: [rows, kv_heads, cap, head_dim] f32, positions >= len unused
    pub(crate) rows: usize,
    /// Cached positions (the same for every row).
    pub(crate) len: usize,
    /// Allocated positions.
    pub(crate) cap: usize,
}

impl KvCache {
    /// An empty cache with room for `cap` positions.
    pub(crate) fn new(model: &Model, rows: usize, cap: usize) -> Result<Self, AllocError> {
        let c = &model.config;
        let mut k = Vec::with_capacity(c.layers);
        let mut v = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            k.push(alloc_kv(rows, c.kv_heads, cap, c.head_dim, &model.device)?);
            v.push(alloc_kv(rows, c.kv_heads, cap, c.head_dim, &model.device)?);
        }
        Ok(Self { k, v, rows, len: 0, cap })
    }

    /// Makes room for `needed` positions: grows to `max(needed, min(2·cap, limit))`.
    pub(crate) fn reserve(
        &mut self,
        model: &Model,
        needed: usize,
        limit: usize,
    ) -> Result<(), AllocError> {
        if needed <= self.cap {
            return Ok(());
        }
        let new_cap = needed.max(self.cap.saturating_mul(2).max(16).min(limit));
        let c = &model.config;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let grown = alloc_kv(self.rows, c.kv_heads, new_cap, c.head_dim, &model.device)?;
            // Copies the whole old buffer (contiguous) into positions 0..cap.
            grown.slice_set(buf, 2, 0)?;
            *buf = grown;
        }
        self.cap = new_cap;
        Ok(())
    }

    /// A new cache whose rows are copies of this cache's rows `source[i]`, with room for `cap`
    /// positions. Used both to fan a prefilled row out and to keep a subset of rows.
    pub(crate) fn gather_rows(
        &self,
        model: &Model,
        source: &[usize],
        cap: usize,
    ) -> Result<Self, AllocError> {
        let c = &model.config;
        let cap = cap.max(self.len);
        let mut out = Self {
            k: Vec::with_capacity(c.layers),
            v: Vec::with_capacity(c.layers),
            rows: source.len(),
            len: self.len,
            cap,
        };
        if !model.device.is_cpu() {
            // One gather kernel per buffer instead of one copy per row and buffer.
            let index = Tensor::from_vec(
                source.iter().map(|&r| r as u32).collect::<Vec<u32>>(),
                source.len(),
                &model.device,
            )?; // [n] u32
            for (bufs, out_bufs) in [(&self.k, &mut out.k), (&self.v, &mut out.v)] {
                for buf in bufs {
                    out_bufs.push(gather_indexed(buf, &index, self.len, cap, model)?);
                }
            }
            return Ok(out);
        }
        for (bufs, out_bufs) in [(&self.k, &mut out.k), (&self.v, &mut out.v)] {
            for buf in bufs {
                let dst = alloc_kv(source.len(), c.kv_heads, cap, c.head_dim, &model.device)?;
                for (i, &r) in source.iter().enumerate() {
                    // [1, kv_heads, len, hd]: only the used positions travel.
                    let src = buf.narrow(0, r, 1)?.narrow(2, 0, self.len)?.contiguous()?;
                    dst.narrow(0, i, 1)?.slice_set(&src, 2, 0)?;
                }
                out_bufs.push(dst);
            }
        }
        Ok(out)
    }
}

/// Rows `index` of one cache buffer, as a new buffer with room for `cap` positions, in a
/// few whole-tensor ops (the device path of [`KvCache::gather_rows`]).
///
/// * `buf`: `[rows, kv_heads, old_cap, hd]` f32, contiguous; positions `0..len` are used.
/// * `index`: `[n]` u32 row indices.
///
/// Returns `[n, kv_heads, cap, hd]` f32 whose positions `0..len` equal those of the rows.
pub(crate) fn gather_indexed(
    buf: &Tensor,
    index: &Tensor,
    len: usize,
    cap: usize,
    model: &Model,
) -> Result<Tensor, AllocError> {
    let (_, kv_heads, old_cap, hd) = buf.dims4()?;
    let n = index.dim(0)?;
    let picked = buf.index_select(index, 0)?; // [n, kv_heads, old_cap, hd]
    if old_cap == cap {
        return Ok(picked); // positions >= len are unused, whatever they hold
    }
    let dst = alloc_kv(n, kv_heads, cap, hd, &model.device)?; // [n, kv_heads, cap, hd]
    let used = if len == old_cap { picked } else { picked.narrow(2, 0, len)?.contiguous()? }; // [n, kv_heads, len, hd]
    dst.slice_set(&used, 2, 0)?;
    Ok(dst)
}

/// Greedy tokens of `logits` `[rows, vocab]` f32, computed where the logits are, so only
/// `rows` ids cross to the host. Equal to [`specrej_core::sampling::argmax`] of each row
/// for finite logits, ties included (the lowest index wins): the row maximum is exact, and
/// the first index holding it is found as the maximum of `vocab − index` over the
/// positions equal to it. (Rows holding NaN may differ: the host never picks a NaN.)
pub(crate) fn greedy_rows(logits: &Tensor) -> CResult<Vec<u32>> {
    let (_rows, vocab) = logits.dims2()?;
    let Ok(vocab32) = u32::try_from(vocab) else {
        candle_core::bail!("greedy sampling: vocabulary of {vocab} entries does not fit u32 ids")
    };
    let device = logits.device();
    let max = logits.max_keepdim(1)?; // [rows, 1] f32
    let is_max = logits.broadcast_eq(&max)?; // [rows, vocab] u8
    let rank = Tensor::from_vec(
        (0..vocab32).map(|i| vocab32 - i).collect::<Vec<u32>>(),
        (1, vocab),
        device,
    )?; // [1, vocab] u32
    let ranked = is_max.to_dtype(DType::U32)?.broadcast_mul(&rank)?; // [rows, vocab] u32: vocab − i where maximal, else 0
    let best = ranked.max(1)?.to_vec1::<u32>()?; // [rows]: vocab − first argmax
    Ok(best.into_iter().map(|b| vocab32 - b.min(vocab32)).collect())
}

/// `−log softmax(logits)[target]` of each row of `logits` `[n, vocab]` f32, computed where
/// the logits are, so only `n` numbers cross to the host (the device path of the likelihood
/// scorer). Agrees with the host's `log_sum_exp(row) − row[target]` to f32 rounding (the
/// host sums in f64).
pub(crate) fn nll_rows(logits: &Tensor, targets: &[u32]) -> CResult<Vec<f32>> {
    let n = logits.dim(0)?;
    if targets.len() != n {
        candle_core::bail!("nll: {} targets for {n} rows", targets.len())
    }
    let max = logits.max_keepdim(1)?; // [n, 1]
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?; // [n, 1]
    let index = Tensor::from_slice(targets, (n, 1), logits.device())?; // [n, 1] u32
    let picked = logits.contiguous()?.gather(&index, 1)?; // [n, 1]
    (lse - picked)?.flatten_all()?.to_vec1::<f32>()
}

/// Free and total bytes of memory on a CUDA device; `None` on the CPU (and on any
/// device when the crate is built without `cuda`).
pub(crate) fn device_memory(device: &CDevice) -> CResult<Option<(usize, usize)>> {
    #[cfg(feature = "cuda")]
    if let CDevice::Cuda(cuda) = device {
        let stream = cuda.cuda_stream();
        let info = stream
            .context()
            .mem_get_info()
            .map_err(|e| candle_core::Error::Msg(format!("cuda mem_get_info: {e}")))?;
        return Ok(Some(info));
    }
    let _ = device; // only a CUDA device has memory of its own to ask about
    Ok(None)
}

/// `[n, vocab]` logits tensor → host rows.
pub(crate) fn to_host_rows(logits: &Tensor) -> CResult<Vec<f32>> {
    logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// A candle error as the scheduler sees it: out-of-memory, or a device error.
pub(crate) fn device_err(e: candle_core::Error) -> specrej_core::BackendError {
    if is_oom(&e) {
        specrej_core::BackendError::OutOfMemory
    } else {
        specrej_core::BackendError::Device(crate::error::message(&e))
    }
}

/// An allocation error as the scheduler sees it.
pub(crate) fn alloc_err(e: AllocError) -> specrej_core::BackendError {
    match e {
        AllocError::OutOfMemory => specrej_core::BackendError::OutOfMemory,
        AllocError::Other(e) => device_err(e),
    }
}
