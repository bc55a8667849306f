//! The CPU forward pass: any number of sequences, each extended by any number of tokens at
//! its own position, in one pass ("varlen"). Prefill (one sequence, many tokens), a decode
//! step (many sequences, one token each) and scoring (many sequences, a few tokens each) are
//! the same call.
//!
//! The projections run on the concatenated tokens `[tokens, hidden]` through candle's
//! quantized matmul, whose result for a row never depends on the other rows; RMSNorm, RoPE
//! and the SwiGLU are per token; attention is [`crate::attention::attend`]. So a token's
//! hidden state depends only on its sequence's ids, never on what else is in the pass.

use std::sync::Arc;

use candle_core::{Storage, Tensor};

use crate::attention::{SeqTokens, attend, exp_neg};
use crate::kv::{KvPool, OutOfBlocks, Seq, Shape};
use crate::model::{Model, forward_group};

type CResult<T> = candle_core::Result<T>;

/// Why a pass failed.
#[derive(Debug)]
pub(crate) enum PassError {
    /// The pool could not give the blocks the new tokens need.
    OutOfMemory,
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for PassError {
    fn from(e: candle_core::Error) -> Self {
        PassError::Candle(e)
    }
}

impl From<OutOfBlocks> for PassError {
    fn from(_: OutOfBlocks) -> Self {
        PassError::OutOfMemory
    }
}

impl PassError {
    pub(crate) fn backend(self) -> specrej_core::BackendError {
        match self {
            PassError::OutOfMemory => specrej_core::BackendError::OutOfMemory,
            PassError::Candle(e) => crate::model::device_err(e),
        }
    }
}

/// A CPU tensor's f32 contents (from its start offset), copied out.
pub(crate) fn host_vec(t: &Tensor) -> CResult<Vec<f32>> {
    with_host(t, <[f32]>::to_vec)
}

/// Runs `f` on a contiguous CPU f32 tensor's elements, without copying them.
pub(crate) fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    if !t.is_contiguous() {
        candle_core::bail!("host access: tensor is not contiguous")
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&data[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!("host access: tensor is not on the CPU"),
    }
}

/// `silu(g) · u` element-wise (`g`, `u`: `[n, ffn]` each; returns `[n * ffn]`), with our own
/// exponential ([`exp_neg`]): `silu(x) = x / (1 + e^-x)`, where for `x < 0` that is
/// `x · t / (1 + t)` with `t = e^x`, so the exponential is only ever taken of `-|x|`.
fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(&x, &y)| {
            let t = exp_neg(-x.abs());
            let num = if x < 0.0 { x * t } else { x };
            num / (1.0 + t) * y
        })
        .collect()
}

impl Model {
    /// The shape of this model's K/V blocks.
    pub(crate) fn kv_shape(&self) -> Shape {
        Shape {
            layers: self.config.layers,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// `cos`, `sin` of position `pos`: `[head_dim / 2]` each.
    fn rope_angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = pos as f32 * f;
            *c = angle.cos();
            *s = angle.sin();
        }
    }

    /// Rotates each `head_dim` chunk of `x` (one token's heads) by the angles of its position.
    fn rope_token(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        for head in x.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = if self.rope_interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }

    /// Extends each `pass[i].0` by the ids `pass[i].1` (at least one each), writing their
    /// K/V into blocks from `pool`. Returns the hidden states of every new token, before the
    /// output norm: `[Σ ids, hidden]` f32, sequence after sequence.
    ///
    /// Every sequence gets its blocks before anything runs: on [`PassError::OutOfMemory`]
    /// no sequence has changed length (some may hold spare blocks).
    pub(crate) fn forward_seqs(
        &self,
        pass: &mut [(&mut Seq, &[u32])],
        pool: &Arc<KvPool>,
    ) -> Result<Tensor, PassError> {
        let c = &self.config;
        if !self.device.is_cpu() {
            return Err(PassError::Candle(candle_core::Error::Msg(
                "forward_seqs runs on the CPU".into(),
            )));
        }
        if pass.is_empty() || pass.iter().any(|(_, ids)| ids.is_empty()) {
            return Err(PassError::Candle(candle_core::Error::Msg(
                "forward: no sequences, or a sequence without new ids".into(),
            )));
        }
        for (seq, ids) in pass.iter_mut() {
            let total = seq.len() + ids.len();
            if total > c.context_length {
                return Err(PassError::Candle(candle_core::Error::Msg(format!(
                    "sequence length {total} exceeds the context length {}",
                    c.context_length
                ))));
            }
            seq.reserve(ids.len(), pool)?;
        }
        let shape = self.kv_shape();
        let (heads, kv_heads, hd) = (c.heads, c.kv_heads, c.head_dim);
        let half = hd / 2;
        // Per token: (sequence, position) and its rotation.
        let n: usize = pass.iter().map(|(_, ids)| ids.len()).sum();
        let mut at = Vec::with_capacity(n); // [n]: (sequence index, position)
        for (i, (seq, ids)) in pass.iter().enumerate() {
            at.extend((0..ids.len()).map(|m| (i, seq.len() + m)));
        }
        let mut cos = vec![0.0f32; n * half]; // [n, hd/2]
        let mut sin = vec![0.0f32; n * half]; // [n, hd/2]
        for (t, &(_, pos)) in at.iter().enumerate() {
            self.rope_angles(
                pos,
                &mut cos[t * half..(t + 1) * half],
                &mut sin[t * half..(t + 1) * half],
            );
        }
        let ids: Vec<u32> = pass.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, n, &self.device)?; // [n] u32
        let mut x = self.embedding.forward(&ids)?; // [n, hidden] f32
        let scale = 1.0 / (hd as f32).sqrt();
        let mut k_tok = vec![0.0f32; kv_heads * hd]; // one token's roped K
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_norm_eps)?; // [n, hidden]
            let [q, k, v] = forward_group([&layer.q, &layer.k, &layer.v], &h)?; // [n, heads*hd], [n, kv*hd] ×2
            let mut q = host_vec(&q)?; // [n, heads*hd]
            for t in 0..n {
                let (c_t, s_t) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                self.rope_token(&mut q[t * heads * hd..(t + 1) * heads * hd], c_t, s_t);
            }
            with_host(&k, |k| {
                with_host(&v, |v| {
                    for (t, &(i, pos)) in at.iter().enumerate() {
                        let w = kv_heads * hd;
                        k_tok.copy_from_slice(&k[t * w..(t + 1) * w]);
                        self.rope_token(
                            &mut k_tok,
                            &cos[t * half..(t + 1) * half],
                            &sin[t * half..(t + 1) * half],
                        );
                        pass[i].0.write(&shape, l, pos, &k_tok, &v[t * w..(t + 1) * w]);
                    }
                })
            })??;
            let mut row = 0;
            let parts: Vec<SeqTokens<'_>> = pass
                .iter()
                .map(|(seq, ids)| {
                    let part = SeqTokens { seq, start: seq.len(), tokens: ids.len(), row };
                    row += ids.len();
                    part
                })
                .collect();
            let y = attend(&shape, l, heads, &parts, &q, scale); // [n, heads*hd]
            let y = Tensor::from_vec(y, (n, heads * hd), &self.device)?;
            x = (x + layer.o.forward(&y)?)?; // [n, hidden]
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps)?; // [n, hidden]
            let [g, u] = forward_group([&layer.gate, &layer.up], &h)?; // [n, ffn] each
            let a = with_host(&g, |g| with_host(&u, |u| swiglu(g, u)))??; // [n * ffn]
            let a = Tensor::from_vec(a, g.dims2()?, &self.device)?; // [n, ffn]
            x = (x + layer.down.forward(&a)?)?; // [n, hidden]
        }
        for (seq, ids) in pass.iter_mut() {
            seq.advance(ids.len());
        }
        Ok(x)
    }
}
