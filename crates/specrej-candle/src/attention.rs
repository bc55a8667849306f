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

use crate::kv::{BLOCK, Data, Seq, Shape};

/// Lanes of the softmax's partial sums: [`BLOCK`] f32, so a block of scores is one chunk.
const LANES: usize = BLOCK;

/// Query tokens per tile.
const TILE: usize = 16;

/// Most query vectors (token, head) one call of the score kernel takes: that many
/// independent accumulator chains (4 tokens × the 3 heads of a SmolLM2 group), each K row
/// loaded once for all of them.
const MAX_QUERIES: usize = 12;

/// Most f32 vectors of 16 the value kernel accumulates in registers (heads × `head_dim / 16`).
const MAX_VALUE_ACC: usize = 12;

/// Whether the AVX-512 kernels run. They give the same bits as the portable code: both are
/// the same fused multiply-adds in the same order, the f16 → f32 conversion is exact.
fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The portable score kernel: `out[i][s] = Σ_d q[i][d] · kt[d·BLOCK + s]` for the query
/// vectors `q` (`[head_dim]` each) and a transposed K block `kt` (`[head_dim, BLOCK]` f32), each
/// sum one chain of fused multiply-adds in `d` order from 0 (the arithmetic of every path).
#[inline]
fn scores_portable<const N: usize>(q: &[&[f32]; N], kt: &[f32], out: &mut [[f32; BLOCK]; N]) {
    let mut acc = [[0.0f32; BLOCK]; N];
    for (d, row) in kt.chunks_exact(BLOCK).enumerate() {
        for i in 0..N {
            let qd = q[i][d];
            for s in 0..BLOCK {
                acc[i][s] = qd.mul_add(row[s], acc[i][s]);
            }
        }
    }
    *out = acc;
}

/// The portable value kernel: `acc[i·hd..(i+1)·hd] += Σ_j p[i][j] · v[j]` over the first
/// `n` rows of a V block (`v`: `[BLOCK, head_dim]` f32), one fused multiply-add per element
/// in `j` order (the arithmetic of every path).
#[inline]
fn values_portable(p: &[&[f32]], n: usize, v: &[f32], acc: &mut [f32]) {
    let hd = acc.len() / p.len();
    for (pi, a) in p.iter().zip(acc.chunks_exact_mut(hd)) {
        for (&pj, row) in pi[..n].iter().zip(v.chunks_exact(hd)) {
            for (x, &y) in a.iter_mut().zip(row) {
                *x = pj.mul_add(y, *x);
            }
        }
    }
}

/// AVX-512 kernels reading K and V as stored (f16 converted in registers, no copy).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::{
        __m512, _mm256_loadu_si256, _mm512_cvtph_ps, _mm512_fmadd_ps, _mm512_loadu_ps,
        _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };

    use half::f16;

    use super::BLOCK;

    /// A stored element type, read 16 at a time.
    pub(super) trait Elem: Copy {
        /// `s[at..at + 16]` as f32 (exact).
        fn load16(s: &[Self], at: usize) -> __m512;
    }

    impl Elem for f16 {
        #[inline(always)]
        fn load16(s: &[f16], at: usize) -> __m512 {
            let s = &s[at..at + 16];
            // In bounds: `s` is 16 halves (32 bytes), read unaligned. The caller's
            // `#[target_feature]` function has AVX-512F (every kernel below is one).
            #[allow(
                unsafe_code,
                reason = "a target_feature intrinsic and an unaligned load of a checked slice"
            )]
            unsafe {
                _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().cast()))
            }
        }
    }

    impl Elem for f32 {
        #[inline(always)]
        fn load16(s: &[f32], at: usize) -> __m512 {
            let s = &s[at..at + 16];
            #[allow(
                unsafe_code,
                reason = "a target_feature intrinsic and an unaligned load of a checked slice"
            )]
            unsafe {
                _mm512_loadu_ps(s.as_ptr())
            }
        }
    }

    #[inline(always)]
    fn store16(dst: &mut [f32; 16], x: __m512) {
        #[allow(
            unsafe_code,
            reason = "a target_feature intrinsic and an unaligned store into a 16-element array"
        )]
        unsafe {
            _mm512_storeu_ps(dst.as_mut_ptr(), x);
        }
    }

    /// [`super::scores_portable`] for `B` K blocks at once (`kt[b]`: `[head_dim, BLOCK]`):
    /// `N·B` independent chains.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop, reason = "indices into several register arrays at once")]
    pub(super) fn scores<T: Elem, const N: usize, const B: usize>(
        q: &[&[f32]; N],
        kt: &[&[T]; B],
        hd: usize,
        out: &mut [[[f32; BLOCK]; B]; N],
    ) {
        let q: [&[f32]; N] = std::array::from_fn(|i| &q[i][..hd]);
        let kt: [&[T]; B] = std::array::from_fn(|b| &kt[b][..hd * BLOCK]);
        let mut acc = [[_mm512_setzero_ps(); B]; N];
        for d in 0..hd {
            let k: [__m512; B] = std::array::from_fn(|b| T::load16(kt[b], d * BLOCK));
            for i in 0..N {
                let qd = _mm512_set1_ps(q[i][d]);
                for b in 0..B {
                    acc[i][b] = _mm512_fmadd_ps(qd, k[b], acc[i][b]);
                }
            }
        }
        for i in 0..N {
            for b in 0..B {
                store16(&mut out[i][b], acc[i][b]);
            }
        }
    }

    /// [`super::values_portable`] for `N` query heads and `head_dim = 16·W`, the
    /// accumulators in registers.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop, reason = "indices into several register arrays at once")]
    pub(super) fn values<T: Elem, const N: usize, const W: usize>(
        p: &[&[f32]; N],
        n: usize,
        v: &[T],
        acc: &mut [f32],
    ) {
        let hd = 16 * W;
        let v = &v[..n * hd];
        let p: [&[f32]; N] = std::array::from_fn(|i| &p[i][..n]);
        let acc: &mut [f32] = &mut acc[..N * hd];
        let mut a = [[_mm512_setzero_ps(); W]; N];
        for i in 0..N {
            for w in 0..W {
                a[i][w] = f32::load16(acc, i * hd + 16 * w);
            }
        }
        for j in 0..n {
            let row: [__m512; W] = std::array::from_fn(|w| T::load16(v, j * hd + 16 * w));
            for i in 0..N {
                let pj = _mm512_set1_ps(p[i][j]);
                for w in 0..W {
                    a[i][w] = _mm512_fmadd_ps(pj, row[w], a[i][w]);
                }
            }
        }
        for (i, chunk) in acc.chunks_exact_mut(hd).enumerate() {
            for (w, dst) in chunk.chunks_exact_mut(16).enumerate() {
                let dst: &mut [f32; 16] = dst.try_into().expect("16 lanes");
                store16(dst, a[i][w]);
            }
        }
    }
}

/// `e^x` for `x <= 0` (inputs below −87 give ~1e-38): range reduction by powers of two and
/// a degree-6 polynomial (fused multiply-adds), relative error below 3e-7 (a few ulps).
/// Branch-free so loops over it vectorise; our own code, so the bits are the same on every
/// platform.
#[inline]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    let x = x.max(-87.0);
    let t = x.mul_add(LOG2E, ROUND); // 1.5 · 2^23 + n, n an integer in [-126, 0]
    let n = t - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // 2^n, with n read from `t`'s low mantissa bits (integer arithmetic, so it vectorises).
    let scale = f32::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    p * scale
}

/// In-place softmax of `x[..len]`; `x.len()` is `len` rounded up to a multiple of [`LANES`]
/// (the elements past `len` are scratch). The sum is [`LANES`] partial sums in chunk order,
/// then halved pairwise: a fixed order whatever the length.
pub(crate) fn softmax(x: &mut [f32], len: usize) {
    debug_assert!(x.len() >= len && x.len().is_multiple_of(LANES));
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let (whole, tail) = x[..len].split_at(len - len % LANES);
    for chunk in whole.chunks_exact(LANES) {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max =
        tail.iter().copied().fold(lanes.into_iter().fold(f32::NEG_INFINITY, f32::max), f32::max);
    let mut sum = [0.0f32; LANES];
    for (c, chunk) in x.chunks_exact_mut(LANES).enumerate() {
        let chunk: &mut [f32; LANES] = chunk.try_into().expect("LANES elements");
        let live = len.saturating_sub(c * LANES).min(LANES);
        let mut e = [0.0f32; LANES];
        for i in 0..LANES {
            e[i] = exp_neg(chunk[i] - max);
        }
        for i in 0..LANES {
            // Lanes past `len` add nothing (0.0 added to a sum of positives changes no bit).
            let e_i = if i < live { e[i] } else { 0.0 };
            chunk[i] = e_i;
            sum[i] += e_i;
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            sum[i] += sum[i + width];
        }
        width /= 2;
    }
    let inv = 1.0 / sum[0];
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
                *n < TILE
                    && t.parts.last().is_some_and(|&(j, _, _)| same_prefix(seqs[j].seq, s.seq))
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

thread_local! {
    /// Per-thread scratch: scores, accumulators, K/V runs converted to f32 (portable path).
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
    attend_with(shape, layer, heads, seqs, q, scale, use_avx512())
}

/// [`attend`] with the AVX-512 kernels on or off (the same bits either way).
fn attend_with(
    shape: &Shape,
    layer: usize,
    heads: usize,
    seqs: &[SeqTokens<'_>],
    q: &[f32],
    scale: f32,
    avx512: bool,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let kv_heads = shape.kv_heads;
    let group = heads / kv_heads;
    let width = heads * hd;
    let total: usize = seqs.iter().map(|s| s.tokens).sum();
    let out: Vec<AtomicU32> = (0..total * width).map(|_| AtomicU32::new(0)).collect(); // [tokens, heads * hd]
    let tiles = tiles(seqs);
    let items = tiles.len() * kv_heads;
    let ctx = Ctx { shape, layer, group, hd, q, width, scale, avx512 };
    let work = |range: std::ops::Range<usize>| {
        SCRATCH.with(|scratch| {
            let (scores, acc, buf) = &mut *scratch.borrow_mut();
            buf.resize(BLOCK * hd, 0.0); // [BLOCK * head_dim]: one (layer, kv, head) run as f32
            for item in range {
                // Last tiles first: in a prefill they attend to the most positions, and the
                // pool's threads take items in order, so the long ones do not come last.
                let item = items - 1 - item;
                let (tile, g) = (&tiles[item / kv_heads], item % kv_heads);
                tile_head(&ctx, g, seqs, tile, scores, acc, buf, &out);
            }
        });
    };
    let cost: usize =
        seqs.iter().map(|s| s.tokens * (s.start + s.tokens)).sum::<usize>() * heads * hd;
    if cost < 1 << 15 {
        work(0..items); // too small to be worth waking the pool
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, work);
    }
    // The pool has joined: every element was written exactly once.
    out.into_iter().map(|a| f32::from_bits(a.into_inner())).collect()
}

/// What every tile of one [`attend`] call shares.
struct Ctx<'a> {
    shape: &'a Shape,
    layer: usize,
    /// Query heads per kv head.
    group: usize,
    hd: usize,
    /// `[tokens, heads * head_dim]`.
    q: &'a [f32],
    /// `heads * head_dim`.
    width: usize,
    scale: f32,
    avx512: bool,
}

/// One query token of a tile.
#[derive(Clone, Copy)]
struct Member {
    /// Index into the pass's sequences.
    seq: usize,
    /// Its position.
    pos: usize,
    /// Its row in `q` and the output.
    row: usize,
    /// Where its scores start in the tile's score buffer: head `h`'s at `off + h · stride`.
    off: usize,
    /// Scores per head: `pos + 1` rounded up to whole blocks.
    stride: usize,
}

/// Asks the CPU to bring `data[at..at + n]` into its L2 cache (a hint): a run needed soon,
/// but after the runs [`Data::prefetch`] brings into L1 now.
fn prefetch_l2(data: &Data, at: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (ptr, bytes) = match data {
            Data::F16(d) => (d[at..at + n].as_ptr().cast::<i8>(), n * 2),
            Data::F32(d) => (d[at..at + n].as_ptr().cast::<i8>(), n * 4),
        };
        for line in (0..bytes).step_by(64) {
            // A prefetch reads nothing into the program, cannot fault and changes no memory;
            // `ptr + line` stays inside the slice just bounds-checked. `unsafe` only because
            // it is a `#[target_feature]` intrinsic (SSE, which every x86_64 CPU has).
            #[allow(unsafe_code, reason = "a prefetch hint; see above")]
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(
                    ptr.wrapping_add(line),
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at, n);
}

/// A `(layer, kv, head)` run of the block holding `pos` (a block boundary) of `seq`.
fn run_of(seq: &Seq, at: usize, pos: usize) -> (&Data, usize) {
    let s = seq.slot(pos);
    debug_assert_eq!(s.slot, 0, "runs start on a block boundary");
    (&s.block.data, at)
}

/// A run as f32: the stored slice itself, or converted into `buf` (`[BLOCK * head_dim]`).
fn as_f32<'a>(data: &'a Data, at: usize, buf: &'a mut [f32]) -> &'a [f32] {
    match data {
        Data::F32(d) => &d[at..at + buf.len()],
        Data::F16(_) => {
            data.load(at, buf);
            buf
        }
    }
}

impl Ctx<'_> {
    /// Query vector of (member, head `h` of kv head `g`'s group): `[head_dim]`.
    fn query(&self, m: &Member, g: usize, h: usize) -> &[f32] {
        let at = m.row * self.width + (g * self.group + h) * self.hd;
        &self.q[at..at + self.hd]
    }

    /// Scores of `users` (every head of kv head `g`'s group) against the K runs `blocks`
    /// (one, or two consecutive ones, starting at position `p0`), scaled, written to
    /// `scores[off + h · stride + p0 ..][..BLOCK]` (and the next `BLOCK` for a second block).
    fn score_blocks(
        &self,
        g: usize,
        users: &[Member],
        blocks: &[(&Data, usize)],
        p0: usize,
        scores: &mut [f32],
        buf: &mut [f32],
    ) {
        let mut qs: [&[f32]; MAX_QUERIES] = [&[]; MAX_QUERIES];
        let mut dst = [(0usize, 0usize); MAX_QUERIES]; // (first score, end of the head's scores)
        let mut pending =
            users.iter().flat_map(|m| (0..self.group).map(move |h| (m, h))).peekable();
        while pending.peek().is_some() {
            let mut n = 0;
            for (m, h) in pending.by_ref().take(MAX_QUERIES) {
                qs[n] = self.query(m, g, h);
                dst[n] = (m.off + h * m.stride + p0, m.off + (h + 1) * m.stride);
                n += 1;
            }
            let mut out = [[[0.0f32; BLOCK]; 2]; MAX_QUERIES];
            self.score_chunk(&qs[..n], blocks, &mut out, buf);
            for (&(first, end), o) in dst[..n].iter().zip(&out) {
                for (b, block) in o[..blocks.len()].iter().enumerate() {
                    // A block past a prefix that ends inside a block may reach past the
                    // head's scores: those slots are not positions of this token.
                    let at = first + b * BLOCK;
                    let lanes = BLOCK.min(end.saturating_sub(at));
                    for (s, &x) in scores[at..at + lanes].iter_mut().zip(block) {
                        *s = x * self.scale;
                    }
                }
            }
        }
    }

    /// Unscaled scores of up to [`MAX_QUERIES`] query vectors against one or two K runs.
    fn score_chunk(
        &self,
        qs: &[&[f32]],
        blocks: &[(&Data, usize)],
        out: &mut [[[f32; BLOCK]; 2]; MAX_QUERIES],
        buf: &mut [f32],
    ) {
        let hd = self.hd;
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            macro_rules! dispatch {
                ($t:ty, $runs:expr, $b:literal) => {{
                    let runs: [&[$t]; $b] = $runs;
                    macro_rules! arm {
                        ($n:literal) => {{
                            let q: &[&[f32]; $n] = qs.try_into().expect("query count");
                            let mut o = [[[0.0f32; BLOCK]; $b]; $n];
                            // AVX-512F was detected at run time (`use_avx512`).
                            #[allow(unsafe_code, reason = "calling a target_feature function after run-time detection")]
                            unsafe {
                                avx512::scores::<$t, $n, $b>(q, &runs, hd, &mut o)
                            };
                            for (dst, src) in out.iter_mut().zip(&o) {
                                dst[..$b].copy_from_slice(src);
                            }
                        }};
                    }
                    match qs.len() {
                        1 => arm!(1),
                        2 => arm!(2),
                        3 => arm!(3),
                        4 => arm!(4),
                        5 => arm!(5),
                        6 => arm!(6),
                        7 => arm!(7),
                        8 => arm!(8),
                        9 => arm!(9),
                        10 => arm!(10),
                        11 => arm!(11),
                        _ => arm!(12),
                    }
                }};
            }
            let len = BLOCK * hd;
            match blocks {
                [(Data::F16(a), x)] => dispatch!(half::f16, [&a[*x..*x + len]], 1),
                [(Data::F32(a), x)] => dispatch!(f32, [&a[*x..*x + len]], 1),
                [(Data::F16(a), x), (Data::F16(b), y)] => {
                    dispatch!(half::f16, [&a[*x..*x + len], &b[*y..*y + len]], 2)
                }
                [(Data::F32(a), x), (Data::F32(b), y)] => {
                    dispatch!(f32, [&a[*x..*x + len], &b[*y..*y + len]], 2)
                }
                _ => {
                    for (b, &(data, at)) in blocks.iter().enumerate() {
                        let mut one = [[[0.0f32; BLOCK]; 2]; MAX_QUERIES];
                        self.score_chunk(qs, &[(data, at)], &mut one, buf);
                        for (dst, src) in out.iter_mut().zip(&one) {
                            dst[b] = src[0];
                        }
                    }
                }
            }
            return;
        }
        for (b, &(data, at)) in blocks.iter().enumerate() {
            let kt = as_f32(data, at, buf);
            for (chunk, out) in qs.chunks(4).zip(out.chunks_mut(4)) {
                let mut o = [[0.0f32; BLOCK]; 4];
                match chunk.len() {
                    1 => scores_portable::<1>(
                        chunk.try_into().expect("1"),
                        kt,
                        (&mut o[..1]).try_into().expect("1"),
                    ),
                    2 => scores_portable::<2>(
                        chunk.try_into().expect("2"),
                        kt,
                        (&mut o[..2]).try_into().expect("2"),
                    ),
                    3 => scores_portable::<3>(
                        chunk.try_into().expect("3"),
                        kt,
                        (&mut o[..3]).try_into().expect("3"),
                    ),
                    _ => scores_portable::<4>(chunk.try_into().expect("4"), kt, &mut o),
                }
                for (dst, src) in out.iter_mut().zip(&o) {
                    dst[b] = *src;
                }
            }
        }
    }

    /// `acc[(m·group + h)·hd ..][..hd] += Σ_j p_j v_j` over the first `n` rows of the V run
    /// `(data, at)` (positions `p0..p0 + n`) for each of `users` (the tile's members
    /// `first..`) and each head of the group.
    #[allow(clippy::too_many_arguments, reason = "private; the arguments are the kernel's state")]
    fn value_block(
        &self,
        users: &[Member],
        first: usize,
        (data, at): (&Data, usize),
        p0: usize,
        n: usize,
        scores: &[f32],
        acc: &mut [f32],
        buf: &mut [f32],
    ) {
        let (hd, group) = (self.hd, self.group);
        #[cfg(target_arch = "x86_64")]
        if self.avx512 && hd % 16 == 0 && hd / 16 <= 8 {
            for (k, m) in users.iter().enumerate() {
                let a = &mut acc[(first + k) * group * hd..(first + k + 1) * group * hd];
                let p = |h: usize| &scores[m.off + h * m.stride + p0..][..n];
                self.values_avx512(data, at, n, &p, a);
            }
            return;
        }
        let v = as_f32(data, at, buf);
        for (k, m) in users.iter().enumerate() {
            let a = &mut acc[(first + k) * group * hd..(first + k + 1) * group * hd];
            for (h, a) in a.chunks_exact_mut(hd).enumerate() {
                values_portable(&[&scores[m.off + h * m.stride + p0..][..n]], n, v, a);
            }
        }
    }

    /// [`values_portable`] for every head of one member on AVX-512 (`head_dim` = 16·W,
    /// W ≤ 8): heads in chunks whose accumulators fit in registers.
    #[cfg(target_arch = "x86_64")]
    fn values_avx512<'s>(
        &self,
        data: &Data,
        at: usize,
        n: usize,
        p: &impl Fn(usize) -> &'s [f32],
        acc: &mut [f32],
    ) {
        let hd = self.hd;
        let w = hd / 16;
        let per = (MAX_VALUE_ACC / w).clamp(1, 3);
        let mut h = 0;
        while h < self.group {
            let count = per.min(self.group - h);
            let a = &mut acc[h * hd..(h + count) * hd];
            macro_rules! go {
                ($t:ty, $v:expr, $n:literal, $w:literal) => {{
                    let ps: [&[f32]; $n] = std::array::from_fn(|i| p(h + i));
                    // AVX-512F was detected at run time (`use_avx512`).
                    #[allow(
                        unsafe_code,
                        reason = "calling a target_feature function after run-time detection"
                    )]
                    unsafe {
                        avx512::values::<$t, $n, $w>(&ps, n, $v, a)
                    }
                }};
            }
            macro_rules! by_count {
                ($t:ty, $v:expr, $w:literal) => {
                    match count {
                        1 => go!($t, $v, 1, $w),
                        2 => go!($t, $v, 2, $w),
                        _ => go!($t, $v, 3, $w),
                    }
                };
            }
            macro_rules! by_width {
                ($t:ty, $v:expr) => {
                    match w {
                        1 => by_count!($t, $v, 1),
                        2 => by_count!($t, $v, 2),
                        3 => by_count!($t, $v, 3),
                        4 => by_count!($t, $v, 4),
                        5 => by_count!($t, $v, 5),
                        6 => by_count!($t, $v, 6),
                        7 => by_count!($t, $v, 7),
                        _ => by_count!($t, $v, 8),
                    }
                };
            }
            match data {
                Data::F16(d) => by_width!(half::f16, &d[at..at + BLOCK * hd]),
                Data::F32(d) => by_width!(f32, &d[at..at + BLOCK * hd]),
            }
            h += count;
        }
    }
}

/// One tile, one kv head `g` (and its `group` query heads).
#[allow(
    clippy::too_many_arguments,
    reason = "one private call site; the arguments are the kernel's state"
)]
fn tile_head(
    ctx: &Ctx<'_>,
    g: usize,
    seqs: &[SeqTokens<'_>],
    tile: &Tile,
    scores: &mut Vec<f32>,
    acc: &mut Vec<f32>,
    buf: &mut [f32],
    out: &[AtomicU32],
) {
    let (hd, group, shape, layer) = (ctx.hd, ctx.group, ctx.shape, ctx.layer);
    let k_run = shape.run(layer, 0, g);
    let v_run = shape.run(layer, 1, g);
    let run_len = BLOCK * hd;
    // Query tokens of the tile, part after part, each part's in position order.
    let mut members: Vec<Member> = Vec::with_capacity(TILE);
    let mut parts: Vec<(usize, usize)> = Vec::with_capacity(tile.parts.len()); // members first..end of each part
    let mut offset = 0;
    for &(i, first, count) in &tile.parts {
        let s = &seqs[i];
        let start = members.len();
        for m in first..first + count {
            let pos = s.start + m;
            // Scores rounded up to whole blocks: a block's scores are computed together.
            let stride = (pos + 1).next_multiple_of(BLOCK);
            members.push(Member { seq: i, pos, row: s.row + m, off: offset, stride });
            offset += group * stride;
        }
        parts.push((start, members.len()));
    }
    scores.resize(offset, 0.0); // per member and head: [stride] scores, then probabilities
    acc.clear();
    acc.resize(members.len() * group * hd, 0.0); // [members, group, head_dim]
    let shared = tile.shared;
    let prefix_seq = seqs[members[0].seq].seq;
    let prefetch = |seq: &Seq, at: usize, pos: usize, end: usize| {
        if pos < end {
            seq.slot(pos).block.data.prefetch(at, run_len);
        }
    };
    // Scores against the shared prefix: each K block read once for the whole tile.
    for p0 in (0..shared).step_by(BLOCK) {
        prefetch(prefix_seq, k_run, p0 + 2 * BLOCK, shared);
        ctx.score_blocks(g, &members, &[run_of(prefix_seq, k_run, p0)], p0, scores, buf);
    }
    // Scores against each part's own positions: a block read once for the part's tokens
    // that see it (a suffix of the part, positions ascending).
    for &(start, end) in &parts {
        let seq = seqs[members[start].seq].seq;
        let last = members[end - 1].pos + 1;
        let mut p0 = shared;
        let mut users = start;
        while p0 < last {
            while members[users].pos < p0 {
                users += 1;
            }
            let who = &members[users..end];
            prefetch(seq, k_run, p0 + 2 * BLOCK, last);
            prefetch(seq, k_run, p0 + 3 * BLOCK, last);
            // The values of these blocks follow once the scores are done: into L2 meanwhile.
            for b in [p0, p0 + BLOCK] {
                if b < last {
                    prefetch_l2(&seq.slot(b).block.data, v_run, run_len);
                }
            }
            // One token alone over two blocks: pair them, for twice the independent chains.
            if ctx.avx512 && who.len() == 1 && p0 + BLOCK <= who[0].pos {
                ctx.score_blocks(
                    g,
                    who,
                    &[run_of(seq, k_run, p0), run_of(seq, k_run, p0 + BLOCK)],
                    p0,
                    scores,
                    buf,
                );
                p0 += 2 * BLOCK;
            } else {
                ctx.score_blocks(g, who, &[run_of(seq, k_run, p0)], p0, scores, buf);
                p0 += BLOCK;
            }
        }
    }
    for m in &members {
        for h in 0..group {
            let at = m.off + h * m.stride;
            softmax(&mut scores[at..at + m.stride], m.pos + 1);
        }
    }
    // Values: the shared prefix for the whole tile, then each part's own, in position order.
    for p0 in (0..shared).step_by(BLOCK) {
        prefetch(prefix_seq, v_run, p0 + 2 * BLOCK, shared);
        let n = BLOCK.min(shared - p0);
        ctx.value_block(&members, 0, run_of(prefix_seq, v_run, p0), p0, n, scores, acc, buf);
    }
    for &(start, end) in &parts {
        let seq = seqs[members[start].seq].seq;
        let last = members[end - 1].pos + 1;
        let mut users = start;
        prefetch(seq, v_run, shared, last);
        prefetch(seq, v_run, shared + BLOCK, last);
        for p0 in (shared..last).step_by(BLOCK) {
            prefetch(seq, v_run, p0 + 2 * BLOCK, last);
            while members[users].pos < p0 {
                users += 1;
            }
            // Tokens that see only part of this block (the last ones of a prefill) take
            // their own `n`; the rest the whole block.
            for k in users..end {
                let n = BLOCK.min(members[k].pos + 1 - p0);
                ctx.value_block(
                    &members[k..k + 1],
                    k,
                    run_of(seq, v_run, p0),
                    p0,
                    n,
                    scores,
                    acc,
                    buf,
                );
            }
        }
    }
    for (m, member) in members.iter().enumerate() {
        let dst = member.row * ctx.width + g * group * hd;
        for (o, &a) in
            out[dst..dst + group * hd].iter().zip(&acc[m * group * hd..(m + 1) * group * hd])
        {
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
        let s: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter().zip(k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()
                    * f64::from(scale)
            })
            .collect();
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
    /// On both storage formats, with the AVX-512 kernels (where the CPU has them) and
    /// without; both give the same bits.
    #[test]
    fn attention_is_exact_and_independent_of_grouping() {
        for format in [crate::kv::KvFormat::F32, crate::kv::KvFormat::F16] {
            for head_dim in [16, 64] {
                let portable = exact_and_independent_of_grouping(format, false, head_dim);
                if use_avx512() {
                    let simd = exact_and_independent_of_grouping(format, true, head_dim);
                    let same = portable.len() == simd.len()
                        && portable.iter().zip(&simd).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{format:?}, head_dim {head_dim}: AVX-512 and portable differ");
                }
            }
        }
    }

    /// The test for one format, kernel choice and `head_dim`, returning the all-in-one pass's
    /// output. Keys and values are zero past their first 16 elements, so the formula needs
    /// only those.
    fn exact_and_independent_of_grouping(
        format: crate::kv::KvFormat,
        avx512: bool,
        head_dim: usize,
    ) -> Vec<f32> {
        let attend = |shape: &Shape, layer, heads, seqs: &[SeqTokens<'_>], q: &[f32], scale| {
            attend_with(shape, layer, heads, seqs, q, scale, avx512)
        };
        let shape = Shape { layers: 1, kv_heads: 2, head_dim };
        let heads = 4;
        let pool = KvPool::new(shape, format, 1000);
        // As stored: rounded to f16 where the pool stores f16. Per kv head, `head_dim` values
        // of which the first 16 are numbers and the rest zero.
        let stored = |x: Vec<f32>| -> Vec<f32> {
            let x: Vec<f32> = match format {
                crate::kv::KvFormat::F32 => x,
                crate::kv::KvFormat::F16 => {
                    x.into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect()
                }
            };
            x.chunks(16)
                .flat_map(|c| c.iter().copied().chain(std::iter::repeat_n(0.0, head_dim - 16)))
                .collect()
        };
        let kv_at = |seq: u32, pos: usize| {
            (
                stored(numbers(32, seq * 1000 + pos as u32)),
                stored(numbers(32, seq * 1000 + 500 + pos as u32)),
            )
        };
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
        let qs: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                numbers(n * heads * 16, 9000 + i as u32)
                    .chunks(16)
                    .flat_map(|c| c.iter().copied().chain(std::iter::repeat_n(0.5, head_dim - 16)))
                    .collect()
            })
            .collect();
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
        let width = heads * head_dim;
        let mut row = 0;
        for (i, &n) in lens.iter().enumerate() {
            // The sequence alone, and its tokens one pass per token.
            let alone = attend(
                &shape,
                0,
                heads,
                &[SeqTokens { seq: &seqs[i], start: 21, tokens: n, row: 0 }],
                &qs[i],
                scale,
            );
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
                            k[g * head_dim..g * head_dim + 16].to_vec()
                        })
                        .collect();
                    let values: Vec<Vec<f32>> = (0..=pos)
                        .map(|p| {
                            let (_, v) = if p < 21 { kv_at(0, p) } else { kv_at(i as u32 + 1, p) };
                            v[g * head_dim..g * head_dim + 16].to_vec()
                        })
                        .collect();
                    let want = reference(
                        &qs[i][m * width + h * head_dim..m * width + h * head_dim + 16],
                        &keys,
                        &values,
                        scale,
                    );
                    for (d, w) in want.iter().enumerate() {
                        let got = f64::from(one[h * head_dim + d]);
                        assert!(
                            (got - w).abs() < 1e-5,
                            "seq {i} token {m} head {h} dim {d}: {got} vs {w}"
                        );
                    }
                }
            }
            row += n;
        }
        all
    }
}
