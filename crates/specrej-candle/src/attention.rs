//! Single-position attention over the K/V cache on the CPU, read in place.
//!
//! candle's gemm packs the whole K (or V) block on every call, which for one query per
//! row makes attention cost several times the cache's size in memory traffic. This kernel
//! streams each row's K and V once per kv head, serving all query heads of the group.
//! The arithmetic of a row never depends on the other rows, so rows stay independent.

use std::sync::atomic::{AtomicU32, Ordering};

use candle_core::{Storage, Tensor};

type CResult<T> = candle_core::Result<T>;

/// Lanes of the partial sums: 8 f32 = one AVX register, so the loops vectorise.
const LANES: usize = 8;

/// `Σ a·b` with a fixed summation order (8 interleaved partial sums).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (a8, a_tail) = a.split_at(a.len() - a.len() % LANES);
    let (b8, b_tail) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(LANES).zip(b8.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

/// `acc += p · v`.
#[inline]
fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += p * x;
    }
}

/// In-place softmax.
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Runs `f` on the f32 contents of a CPU tensor (from its start offset).
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>()?;
            Ok(f(&data[layout.start_offset()..]))
        }
        _ => candle_core::bail!("cpu attention: tensor is not on the CPU"),
    }
}

/// Attention of one new position per row.
///
/// * `q`: `[rows, heads, 1, head_dim]` f32, contiguous, RoPE applied (not yet scaled).
/// * `keys`, `values`: the cache buffers `[rows, kv_heads, cap, head_dim]` f32, contiguous,
///   with the new position already written; positions `0..len` are attended.
///
/// Returns `[rows, heads * head_dim]` f32.
pub(crate) fn decode_attention(q: &Tensor, keys: &Tensor, values: &Tensor, len: usize, scale: f32) -> CResult<Tensor> {
    let (rows, heads, t, hd) = q.dims4()?;
    let (k_rows, kv_heads, cap, k_hd) = keys.dims4()?;
    if t != 1 || k_rows != rows || k_hd != hd || values.dims() != keys.dims() || len > cap || heads % kv_heads != 0 {
        candle_core::bail!("cpu attention: bad shapes q {:?} k {:?} v {:?} len {len}", q.dims(), keys.dims(), values.dims())
    }
    if !q.is_contiguous() || !keys.is_contiguous() || !values.is_contiguous() {
        candle_core::bail!("cpu attention: inputs must be contiguous")
    }
    let group = heads / kv_heads;
    let out: Vec<AtomicU32> = (0..rows * heads * hd).map(|_| AtomicU32::new(0)).collect();
    with_cpu_f32(q, |q| {
        with_cpu_f32(keys, |k| {
            with_cpu_f32(values, |v| {
                let work = |items: std::ops::Range<usize>| {
                    let mut scores = vec![0.0f32; group * len]; // [group, len]
                    let mut acc = vec![0.0f32; group * hd]; // [group, hd]
                    for item in items {
                        let (r, g) = (item / kv_heads, item % kv_heads);
                        let base = (r * kv_heads + g) * cap * hd;
                        let k_rg = &k[base..base + len * hd]; // [len, hd]
                        let v_rg = &v[base..base + len * hd]; // [len, hd]
                        let q0 = (r * heads + g * group) * hd;
                        let q_g = &q[q0..q0 + group * hd]; // [group, hd]
                        for (j, kj) in k_rg.chunks_exact(hd).enumerate() {
                            for (h, qh) in q_g.chunks_exact(hd).enumerate() {
                                scores[h * len + j] = dot(qh, kj) * scale;
                            }
                        }
                        for s in scores.chunks_exact_mut(len) {
                            softmax(s);
                        }
                        acc.fill(0.0);
                        for (j, vj) in v_rg.chunks_exact(hd).enumerate() {
                            for (h, acc_h) in acc.chunks_exact_mut(hd).enumerate() {
                                axpy(acc_h, scores[h * len + j], vj);
                            }
                        }
                        for (o, &a) in out[q0..q0 + group * hd].iter().zip(&acc) {
                            o.store(a.to_bits(), Ordering::Relaxed);
                        }
                    }
                };
                let items = rows * kv_heads;
                if items * len * hd < 1 << 14 {
                    work(0..items); // too small to be worth waking the pool
                } else {
                    candle_core::utils::barrier_pool().execute_chunked(items, work);
                }
            })
        })
    })???;
    // The pool has joined: every element was written exactly once.
    let out: Vec<f32> = out.into_iter().map(|a| f32::from_bits(a.into_inner())).collect();
    Tensor::from_vec(out, (rows, heads * hd), q.device())
}
