//! Causal attention on the CPU over [`Seq`] caches: the one kernel every CPU forward uses
//! (prefill, decode steps, scoring), so a position's output is computed by the same
//! arithmetic whatever else is in the batch.
//!
//! Query token `m` of a sequence sits at position `pos`; it attends to positions `0..=pos`
//! of its own sequence. For every (token, query head): the scores `(Σ_d q_d k_jd) · scale`
//! summed in `d` order (K is stored transposed per block, so a block's 16 scores accumulate
//! side by side, without horizontal sums), a softmax over all `pos + 1` scores
//! ([`exp_neg`], our own polynomial, so every platform gives the same bits), then
//! `Σ_j p_j v_j` accumulated in position order. Nothing here depends on the number of sequences, on how tokens are
//! chunked into passes, or on padding (there is none). That is the batch-invariance
//! argument: see ARCHITECTURE.md.
//!
//! Sequences that share a prefix (the prompt's K/V, held once) are processed in tiles: each
//! prefix key is loaded once per tile and used by every query of the tile (the shared-prefix
//! or "cascade" formulation), then each token continues over its own positions. The tiling
//! changes which loads are shared, never the arithmetic of a (token, head).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::kv::{BLOCK, Seq, Shape};

/// Lanes of the softmax's partial sums: 8 f32 = one AVX register, so the loops vectorise.
const LANES: usize = 8;

/// Query tokens per tile.
const TILE: usize = 16;

/// `out[h][s] = Σ_d q[h][d] · kt[d·BLOCK + s]` for `N` query heads and the `BLOCK` keys of a
/// transposed K block (`kt`: `[head_dim, BLOCK]`), each head's sums in `d` order: the same
/// arithmetic as one head at a time, but each row of `kt` is loaded once for all `N` heads and
/// the `N` heads' sums are independent chains (one head alone keeps only two vector
/// accumulators busy, and waits on their latency).
#[inline]
fn block_scores<const N: usize>(q: [&[f32]; N], kt: &[f32], out: &mut [[f32; BLOCK]; N]) {
    let mut acc = [[0.0f32; BLOCK]; N];
    for (d, row) in kt.chunks_exact(BLOCK).enumerate() {
        for h in 0..N {
            let qd = q[h][d];
            for s in 0..BLOCK {
                acc[h][s] += qd * row[s];
            }
        }
    }
    *out = acc;
}

/// The scaled scores of query heads `0..group` (head `h`'s query is `q(h)`) against one K
/// block, written to `scores[at(h)..at(h) + n]`; heads go through [`block_scores`] four at a time.
#[inline]
fn score_heads<'q>(
    group: usize,
    q: &impl Fn(usize) -> &'q [f32],
    kt: &[f32],
    scale: f32,
    n: usize,
    scores: &mut [f32],
    at: &impl Fn(usize) -> usize,
) {
    fn heads<'q, const N: usize>(
        first: usize,
        q: &impl Fn(usize) -> &'q [f32],
        kt: &[f32],
        scale: f32,
        n: usize,
        scores: &mut [f32],
        at: &impl Fn(usize) -> usize,
    ) {
        let mut block = [[0.0f32; BLOCK]; N];
        block_scores(std::array::from_fn(|k| q(first + k)), kt, &mut block);
        for (k, row) in block.iter().enumerate() {
            let a = at(first + k);
            for (dst, &x) in scores[a..a + n].iter_mut().zip(row) {
                *dst = x * scale;
            }
        }
    }
    let mut h = 0;
    while h < group {
        let left = group - h;
        match left {
            1 => heads::<1>(h, q, kt, scale, n, scores, at),
            2 => heads::<2>(h, q, kt, scale, n, scores, at),
            3 => heads::<3>(h, q, kt, scale, n, scores, at),
            _ => heads::<4>(h, q, kt, scale, n, scores, at),
        }
        h += left.min(4);
    }
}

/// `acc += Σ_j p[j] · v[j]` over the rows of a V block (`v`: `[BLOCK, head_dim]`), in `j`
/// order; the same element-wise arithmetic whatever `head_dim` (64 keeps `acc` in registers).
#[inline]
fn block_values(p: &[f32], v: &[f32], acc: &mut [f32]) {
    let hd = acc.len();
    if let Ok(acc64) = <&mut [f32; 64]>::try_from(&mut *acc) {
        let mut a = *acc64;
        for (&pj, row) in p.iter().zip(v.chunks_exact(64)) {
            for d in 0..64 {
                a[d] += pj * row[d];
            }
        }
        *acc64 = a;
        return;
    }
    for (&pj, row) in p.iter().zip(v.chunks_exact(hd)) {
        for (a, x) in acc.iter_mut().zip(row) {
            *a += pj * x;
        }
    }
}

/// `e^x` for `x <= 0` (inputs below −87 give ~1e-38): range reduction by powers of two and
/// a degree-6 polynomial, relative error below 3e-7 (a few ulps). Branch-free so loops over it vectorise;
/// our own code, so the bits are the same on every platform.
#[inline]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    p * scale
}

/// In-place softmax.
pub(crate) fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = [0.0f32; LANES];
    let (x8, tail) = x.split_at_mut(x.len() - x.len() % LANES);
    for c in x8.chunks_exact_mut(LANES) {
        for i in 0..LANES {
            c[i] = exp_neg(c[i] - max);
            sum[i] += c[i];
        }
    }
    let mut total = ((sum[0] + sum[4]) + (sum[1] + sum[5])) + ((sum[2] + sum[6]) + (sum[3] + sum[7]));
    for v in tail.iter_mut() {
        *v = exp_neg(*v - max);
        total += *v;
    }
    let inv = 1.0 / total;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// The new tokens of one sequence in a pass.
#[derive(Debug)]
pub(crate) struct SeqTokens<'a> {
    /// Its cache, with this layer's K/V of the new tokens already written.
    pub seq: &'a Seq,
    /// Position of its first new token (the cache length before the pass).
    pub start: usize,
    /// New tokens.
    pub tokens: usize,
    /// Row of its first new token in the pass's `[tokens, heads * head_dim]` buffers.
    pub row: usize,
}

/// A tile: query tokens `first..first + count` of sequence `member` … consecutive members
/// that use the same prefix (same `Arc`, same shared length).
struct Tile {
    /// `(sequence index, first new token, token count)`.
    parts: Vec<(usize, usize, usize)>,
    /// Prefix positions shared by every part.
    shared: usize,
}

fn same_prefix(a: &Seq, b: &Seq) -> bool {
    a.shared_len() == b.shared_len()
        && match (a.prefix(), b.prefix()) {
            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
            (None, None) => true,
            _ => false,
        }
}

fn tiles(seqs: &[SeqTokens<'_>]) -> Vec<Tile> {
    let mut out: Vec<Tile> = Vec::new();
    let mut open: Option<(Tile, usize)> = None; // tile being filled, its token count
    for (i, s) in seqs.iter().enumerate() {
        let mut first = 0;
        while first < s.tokens {
            let fits = open.as_ref().is_some_and(|(t, n)| {
                *n < TILE && t.parts.last().is_some_and(|&(j, _, _)| same_prefix(seqs[j].seq, s.seq))
            });
            if !fits {
                out.extend(open.take().map(|(t, _)| t));
                open = Some((Tile { parts: Vec::new(), shared: s.seq.shared_len() }, 0));
            }
            let Some((tile, n)) = open.as_mut() else { unreachable!("a tile was just opened") };
            let count = (TILE - *n).min(s.tokens - first);
            tile.parts.push((i, first, count));
            *n += count;
            first += count;
        }
    }
    out.extend(open.map(|(t, _)| t));
    out
}

/// Calls `f(first position, count, block)` for the blocks covering positions `from..to` of
/// `seq`, in position order: `block` is the whole `(layer, kv, head)` run as f32 (K
/// `[head_dim, BLOCK]`, V `[BLOCK, head_dim]`), of which slots `0..count` are the positions
/// from `first` on (runs start on a block boundary: prefixes and own positions both do).
fn for_blocks(
    seq: &Seq,
    shape: &Shape,
    (layer, kv, head): (usize, usize, usize),
    from: usize,
    to: usize,
    buf: &mut [f32],
    mut f: impl FnMut(usize, usize, &[f32]),
) {
    let base = shape.run(layer, kv, head);
    let mut pos = from;
    while pos < to {
        let s = seq.slot(pos);
        debug_assert_eq!(s.slot, 0, "runs start on a block boundary");
        let n = (BLOCK - s.slot).min(to - pos);
        if pos + n < to {
            let next = seq.slot(pos + n);
            next.block.data.prefetch(base, BLOCK * shape.head_dim);
        }
        s.block.data.load(base, buf);
        f(pos, n, buf);
        pos += n;
    }
}

thread_local! {
    /// Per-thread scratch: scores, accumulators, converted K/V runs.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Attention of every new token of `seqs` for `layer`.
///
/// * `q`: `[tokens, heads * head_dim]` f32, RoPE applied, not scaled; row `seqs[i].row + m`
///   is token `m` of sequence `i`.
///
/// Returns `[tokens, heads * head_dim]` f32.
pub(crate) fn attend(
    shape: &Shape,
    layer: usize,
    heads: usize,
    seqs: &[SeqTokens<'_>],
    q: &[f32],
    scale: f32,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let kv_heads = shape.kv_heads;
    let group = heads / kv_heads;
    let width = heads * hd;
    let total: usize = seqs.iter().map(|s| s.tokens).sum();
    let out: Vec<AtomicU32> = (0..total * width).map(|_| AtomicU32::new(0)).collect();
    let tiles = tiles(seqs);
    let work = |items: std::ops::Range<usize>| {
        SCRATCH.with(|scratch| {
            let (scores, acc, buf) = &mut *scratch.borrow_mut();
            buf.resize(BLOCK * hd, 0.0); // one (layer, kv, head) block run
            for item in items {
                let (tile, g) = (&tiles[item / kv_heads], item % kv_heads);
                tile_head(shape, layer, g, group, seqs, tile, q, scale, width, scores, acc, buf, &out);
            }
        });
    };
    let items = tiles.len() * kv_heads;
    let cost: usize = seqs.iter().map(|s| s.tokens * (s.start + s.tokens)).sum::<usize>() * heads * hd;
    if cost < 1 << 15 {
        work(0..items); // too small to be worth waking the pool
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, work);
    }
    // The pool has joined: every element was written exactly once.
    out.into_iter().map(|a| f32::from_bits(a.into_inner())).collect()
}

/// One tile, one kv head (and its `group` query heads).
#[allow(clippy::too_many_arguments)] // one private call site; the arguments are the kernel's state
fn tile_head(
    shape: &Shape,
    layer: usize,
    g: usize,
    group: usize,
    seqs: &[SeqTokens<'_>],
    tile: &Tile,
    q: &[f32],
    scale: f32,
    width: usize,
    scores: &mut Vec<f32>,
    acc: &mut Vec<f32>,
    buf: &mut [f32],
    out: &[AtomicU32],
) {
    let hd = shape.head_dim;
    // Query tokens of the tile: (sequence, position, row in q/out, offset of its scores).
    let mut members: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(TILE);
    let mut offset = 0;
    for &(i, first, count) in &tile.parts {
        let s = &seqs[i];
        for m in first..first + count {
            let pos = s.start + m;
            members.push((i, pos, s.row + m, offset));
            // Scores rounded up to whole blocks: a block's scores are computed together.
            offset += group * (pos + 1).next_multiple_of(BLOCK);
        }
    }
    scores.resize(offset, 0.0);
    acc.clear();
    acc.resize(members.len() * group * hd, 0.0);
    let qh = |row: usize, h: usize| {
        let at = row * width + (g * group + h) * hd;
        &q[at..at + hd]
    };
    // A member's scores for head h start at `off + h · stride(pos)`.
    let stride = |pos: usize| (pos + 1).next_multiple_of(BLOCK);
    let shared = tile.shared;
    // Scores against the shared prefix: each key block converted once for the whole tile.
    if shared > 0 {
        let first = seqs[members[0].0].seq;
        for_blocks(first, shape, (layer, 0, g), 0, shared, buf, |p0, n, kt| {
            for &(_, pos, row, off) in &members {
                score_heads(group, &|h| qh(row, h), kt, scale, n, scores, &|h| off + h * stride(pos) + p0);
            }
        });
    }
    // Scores against each token's own positions, then its softmax.
    for &(i, pos, row, off) in &members {
        for_blocks(seqs[i].seq, shape, (layer, 0, g), shared, pos + 1, buf, |p0, n, kt| {
            score_heads(group, &|h| qh(row, h), kt, scale, n, scores, &|h| off + h * stride(pos) + p0);
        });
        for h in 0..group {
            let at = off + h * stride(pos);
            softmax(&mut scores[at..at + pos + 1]);
        }
    }
    // Values: the shared prefix for the whole tile, then each token's own, in position order.
    if shared > 0 {
        let first = seqs[members[0].0].seq;
        for_blocks(first, shape, (layer, 1, g), 0, shared, buf, |p0, n, v| {
            for (m, &(_, pos, _, off)) in members.iter().enumerate() {
                for h in 0..group {
                    let a = (m * group + h) * hd;
                    let at = off + h * stride(pos) + p0;
                    block_values(&scores[at..at + n], v, &mut acc[a..a + hd]);
                }
            }
        });
    }
    for (m, &(i, pos, row, off)) in members.iter().enumerate() {
        for_blocks(seqs[i].seq, shape, (layer, 1, g), shared, pos + 1, buf, |p0, n, v| {
            for h in 0..group {
                let a = (m * group + h) * hd;
                let at = off + h * stride(pos) + p0;
                block_values(&scores[at..at + n], v, &mut acc[a..a + hd]);
            }
        });
        let dst = row * width + g * group * hd;
        for (o, &a) in out[dst..dst + group * hd].iter().zip(&acc[m * group * hd..(m + 1) * group * hd]) {
            o.store(a.to_bits(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvPool;

    #[test]
    fn exp_neg_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_neg(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(f32::NEG_INFINITY) < 1e-37);
    }

    /// Deterministic numbers in [-1, 1).
    fn numbers(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| (specrej_core::sampling::uniform(seed, i) - 0.5) * 2.0).collect()
    }

    /// The textbook formula in f64 for one (token, head).
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f64> {
        let s: Vec<f64> = keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * f64::from(scale)).collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let z: f64 = e.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (p, v) in e.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += p / z * f64::from(*x);
            }
        }
        out
    }

    /// Sequences on a shared prefix, new tokens in several passes and groupings: every
    /// output agrees with the f64 formula, and bit for bit with every other grouping.
    #[test]
    fn attention_is_exact_and_independent_of_grouping() {
        let shape = Shape { layers: 1, kv_heads: 2, head_dim: 16 };
        let heads = 4;
        let pool = KvPool::new(shape, crate::kv::KvFormat::F32, 1000);
        let kv_at = |seq: u32, pos: usize| (numbers(32, seq * 1000 + pos as u32), numbers(32, seq * 1000 + 500 + pos as u32));
        // The prefix: 21 positions (not a multiple of BLOCK).
        let mut prefix = Seq::new();
        prefix.reserve(21, &pool).expect("reserve");
        for pos in 0..21 {
            let (k, v) = kv_at(0, pos);
            prefix.write(&shape, 0, pos, &k, &v);
        }
        prefix.advance(21);
        let prefix = Arc::new(prefix);
        // Three sequences with 1, 5 and 40 new tokens after the prefix.
        let lens = [1usize, 5, 40];
        let mut seqs: Vec<Seq> = lens.iter().map(|_| Seq::on_prefix(&prefix, 21)).collect();
        for (i, (s, &n)) in seqs.iter_mut().zip(&lens).enumerate() {
            s.reserve(n, &pool).expect("reserve");
            for pos in 21..21 + n {
                let (k, v) = kv_at(i as u32 + 1, pos);
                s.write(&shape, 0, pos, &k, &v);
            }
        }
        let qs: Vec<Vec<f32>> = lens.iter().enumerate().map(|(i, &n)| numbers(n * heads * 16, 9000 + i as u32)).collect();
        let scale = 0.25;
        // All three sequences in one pass.
        let all = {
            let mut row = 0;
            let parts: Vec<SeqTokens<'_>> = seqs
                .iter()
                .zip(&lens)
                .map(|(s, &n)| {
                    let p = SeqTokens { seq: s, start: 21, tokens: n, row };
                    row += n;
                    p
                })
                .collect();
            attend(&shape, 0, heads, &parts, &qs.concat(), scale)
        };
        let width = heads * 16;
        let mut row = 0;
        for (i, &n) in lens.iter().enumerate() {
            // The sequence alone, and its tokens one pass per token.
            let alone = attend(&shape, 0, heads, &[SeqTokens { seq: &seqs[i], start: 21, tokens: n, row: 0 }], &qs[i], scale);
            assert_eq!(alone, all[row * width..(row + n) * width], "sequence {i} alone");
            for m in 0..n {
                let one = attend(
                    &shape,
                    0,
                    heads,
                    &[SeqTokens { seq: &seqs[i], start: 21 + m, tokens: 1, row: 0 }],
                    &qs[i][m * width..(m + 1) * width],
                    scale,
                );
                assert_eq!(one, alone[m * width..(m + 1) * width], "sequence {i} token {m} alone");
                // Against the formula.
                let pos = 21 + m;
                for h in 0..heads {
                    let g = h / (heads / 2);
                    let keys: Vec<Vec<f32>> = (0..=pos)
                        .map(|p| {
                            let (k, _) = if p < 21 { kv_at(0, p) } else { kv_at(i as u32 + 1, p) };
                            k[g * 16..(g + 1) * 16].to_vec()
                        })
                        .collect();
                    let values: Vec<Vec<f32>> = (0..=pos)
                        .map(|p| {
                            let (_, v) = if p < 21 { kv_at(0, p) } else { kv_at(i as u32 + 1, p) };
                            v[g * 16..(g + 1) * 16].to_vec()
                        })
                        .collect();
                    let want = reference(&qs[i][m * width + h * 16..m * width + (h + 1) * 16], &keys, &values, scale);
                    for (d, w) in want.iter().enumerate() {
                        let got = f64::from(one[h * 16 + d]);
                        assert!((got - w).abs() < 1e-5, "seq {i} token {m} head {h} dim {d}: {got} vs {w}");
                    }
                }
            }
            row += n;
        }
    }
}
