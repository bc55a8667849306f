//! K/V memory on the CPU: one pool per decoder or scorer that every sequence's blocks come
//! from and go back to, and sequences that share a frozen prefix (the prompt) instead of
//! copying it.
//!
//! * A [`Block`] holds [`BLOCK`] positions of every layer's K and V:
//!   `[layers, 2 (K, V), kv_heads, …]`, each head's K transposed (`[head_dim, BLOCK]`, so
//!   attention computes a block's scores without horizontal sums) and its V as is
//!   (`[BLOCK, head_dim]`) as f16 (the default) or f32
//!   ([`KvFormat`]). Its memory is counted by its [`KvPool`] from allocation to
//!   drop, so the pool's count is what is really held.
//! * A [`Seq`] is one sequence's cache: optionally the first `shared_len` positions of a
//!   frozen prefix sequence (the prompt, computed once, held by `Arc`), then its own blocks.
//!   Forking a sequence shares its full blocks; the first write into a shared block copies
//!   it (copy on write). Dropping a sequence returns its blocks: rejection frees memory in
//!   place, without allocating or copying anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;

/// Positions per block.
pub(crate) const BLOCK: usize = 16;

/// How a pool's blocks store K and V; arithmetic is f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvFormat {
    /// Half precision: half the bytes per token (the default).
    #[default]
    F16,
    /// Single precision.
    F32,
}

impl KvFormat {
    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            KvFormat::F16 => 2,
            KvFormat::F32 => 4,
        }
    }
}

/// A block's elements.
#[derive(Debug, Clone)]
pub(crate) enum Data {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Data {
    /// `dst = self[at..at + dst.len()]` as f32.
    #[inline]
    pub(crate) fn load(&self, at: usize, dst: &mut [f32]) {
        match self {
            Data::F16(d) => {
                use half::slice::HalfFloatSliceExt;
                d[at..at + dst.len()].convert_to_f32_slice(dst);
            }
            Data::F32(d) => dst.copy_from_slice(&d[at..at + dst.len()]),
        }
    }

    /// Asks the CPU to start loading elements `at..at + n` into its cache (a hint: attention
    /// walks blocks that lie anywhere in memory, and the hardware prefetcher does not follow
    /// it from one block to the next; measured +20–40% decode tokens/s at 64 rows × 512
    /// cached tokens).
    #[inline]
    pub(crate) fn prefetch(&self, at: usize, n: usize) {
        let (ptr, bytes) = match self {
            Data::F16(d) => (d[at..at + n].as_ptr().cast::<i8>(), n * 2),
            Data::F32(d) => (d[at..at + n].as_ptr().cast::<i8>(), n * 4),
        };
        #[cfg(target_arch = "x86_64")]
        for line in (0..bytes).step_by(64) {
            // `_mm_prefetch` is a hint: it reads nothing into the program, cannot fault and
            // changes no memory, and `ptr + line` stays inside the slice just bounds-checked.
            // It is `unsafe` only because it is a `#[target_feature]` intrinsic (SSE, which
            // every x86_64 CPU has).
            #[allow(unsafe_code, reason = "a prefetch hint; see above")]
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    ptr.wrapping_add(line),
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (ptr, bytes);
    }

    /// `self[at + i·stride] = src[i]`, rounded to the stored type.
    #[inline]
    pub(crate) fn store_strided(&mut self, at: usize, stride: usize, src: &[f32]) {
        match self {
            Data::F16(d) => {
                for (i, &x) in src.iter().enumerate() {
                    d[at + i * stride] = f16::from_f32(x);
                }
            }
            Data::F32(d) => {
                for (i, &x) in src.iter().enumerate() {
                    d[at + i * stride] = x;
                }
            }
        }
    }

    /// `self[at..at + src.len()] = src`, rounded to the stored type.
    #[inline]
    pub(crate) fn store(&mut self, at: usize, src: &[f32]) {
        match self {
            Data::F16(d) => {
                use half::slice::HalfFloatSliceExt;
                d[at..at + src.len()].convert_from_f32_slice(src);
            }
            Data::F32(d) => d[at..at + src.len()].copy_from_slice(src),
        }
    }
}

/// The shape of every block of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Shape {
    /// Elements of one block.
    pub(crate) fn block_elems(&self) -> usize {
        self.layers * 2 * self.kv_heads * BLOCK * self.head_dim
    }

    /// Offset of `(layer, kv, head)`'s run inside a block: K `[head_dim, BLOCK]`, V
    /// `[BLOCK, head_dim]`.
    #[inline]
    pub(crate) fn run(&self, layer: usize, kv: usize, head: usize) -> usize {
        ((layer * 2 + kv) * self.kv_heads + head) * BLOCK * self.head_dim
    }
}

/// Counts the blocks of one owner (a decoder, a scorer) against a budget.
#[derive(Debug)]
pub(crate) struct KvPool {
    shape: Shape,
    format: KvFormat,
    capacity: usize,
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

/// Why a block could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfBlocks;

impl KvPool {
    /// A pool of at most `capacity` blocks of `shape`, stored as `format`.
    pub(crate) fn new(shape: Shape, format: KvFormat, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            shape,
            format,
            capacity,
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }

    #[cfg(test)]
    pub(crate) fn shape(&self) -> Shape {
        self.shape
    }

    /// Bytes of one block.
    pub(crate) fn block_bytes(&self) -> usize {
        self.shape.block_elems() * self.format.bytes()
    }

    /// Blocks the budget allows.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held right now.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Most blocks held at once since the pool was made.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Reserves one block's worth of the budget.
    fn take(&self) -> Result<(), OutOfBlocks> {
        let mut current = self.in_use.load(Ordering::Relaxed);
        loop {
            if current >= self.capacity {
                return Err(OutOfBlocks);
            }
            match self.in_use.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(current + 1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => current = now,
            }
        }
    }

    fn give_back(&self) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`BLOCK`] positions of every layer's K and V. Counted by its pool while it lives.
#[derive(Debug)]
pub(crate) struct Block {
    /// `[layers, 2, kv_heads, BLOCK, head_dim]`.
    pub(crate) data: Data,
    pool: Arc<KvPool>,
}

impl Block {
    /// A zeroed block from `pool`; [`OutOfBlocks`] past its budget or when the host
    /// cannot allocate.
    pub(crate) fn new(pool: &Arc<KvPool>) -> Result<Self, OutOfBlocks> {
        pool.take()?;
        let n = pool.shape.block_elems();
        fn zeroed<T: Clone + Default>(n: usize) -> Option<Vec<T>> {
            let mut data = Vec::new();
            data.try_reserve_exact(n).ok()?;
            data.resize(n, T::default());
            Some(data)
        }
        let data = match pool.format {
            KvFormat::F16 => zeroed(n).map(Data::F16),
            KvFormat::F32 => zeroed(n).map(Data::F32),
        };
        match data {
            Some(data) => Ok(Self { data, pool: Arc::clone(pool) }),
            None => {
                pool.give_back();
                Err(OutOfBlocks)
            }
        }
    }

    /// A copy of `self` (for copy on write), counted by `pool`.
    fn duplicate(&self, pool: &Arc<KvPool>) -> Result<Self, OutOfBlocks> {
        pool.take()?;
        Ok(Self { data: self.data.clone(), pool: Arc::clone(pool) })
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.pool.give_back();
    }
}

/// One sequence's K/V: a prefix shared with other sequences, then blocks of its own.
#[derive(Debug)]
pub(crate) struct Seq {
    /// A frozen sequence (itself without a shared part) and how many of its positions this
    /// sequence starts with.
    shared: Option<(Arc<Seq>, usize)>,
    /// Positions `shared_len..len`, [`BLOCK`] per block from slot 0 of `blocks[0]`.
    blocks: Vec<Arc<Block>>,
    len: usize,
}

/// Where one position's K and V are: a block and a slot in it.
#[derive(Clone, Copy)]
pub(crate) struct Slot<'a> {
    pub(crate) block: &'a Block,
    pub(crate) slot: usize,
}

impl Default for Seq {
    fn default() -> Self {
        Self::new()
    }
}

impl Seq {
    /// An empty sequence of its own.
    pub(crate) fn new() -> Self {
        Self { shared: None, blocks: Vec::new(), len: 0 }
    }

    /// A sequence that starts with the first `len` positions of `prefix` (which must not
    /// itself share a prefix; `len` is capped at its length).
    pub(crate) fn on_prefix(prefix: &Arc<Seq>, len: usize) -> Self {
        debug_assert!(prefix.shared.is_none(), "prefixes do not nest");
        let len = len.min(prefix.len);
        if len == 0 {
            return Self::new();
        }
        Self { shared: Some((Arc::clone(prefix), len)), blocks: Vec::new(), len }
    }

    /// Cached positions.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Positions taken from the shared prefix.
    pub(crate) fn shared_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |(_, n)| *n)
    }

    /// The shared prefix, if any.
    pub(crate) fn prefix(&self) -> Option<&Arc<Seq>> {
        self.shared.as_ref().map(|(p, _)| p)
    }

    /// Blocks this sequence holds of its own (shared by forks or not).
    #[cfg(test)]
    pub(crate) fn own_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Where position `pos` (< `len`) is stored.
    #[inline]
    pub(crate) fn slot(&self, pos: usize) -> Slot<'_> {
        let shared = self.shared_len();
        if pos < shared {
            let (prefix, _) = self.shared.as_ref().expect("shared_len > 0 implies a prefix");
            return prefix.slot(pos);
        }
        let i = pos - shared;
        Slot { block: &self.blocks[i / BLOCK], slot: i % BLOCK }
    }

    /// Makes room for positions up to `len + extra`: allocates blocks from `pool` and
    /// unshares the one the next write goes to (its copy comes from `pool` too, whichever
    /// pool the shared block was drawn from: a scorer extending a decoder's row never draws on
    /// the decoder's budget). On failure nothing is left half-done that matters (extra blocks
    /// are simply kept for later).
    pub(crate) fn reserve(&mut self, extra: usize, pool: &Arc<KvPool>) -> Result<(), OutOfBlocks> {
        let own_after = self.len + extra - self.shared_len();
        let needed = own_after.div_ceil(BLOCK);
        // The block holding position `len` (if it exists) will be written: it must be ours alone.
        let first_written = (self.len - self.shared_len()) / BLOCK;
        if extra > 0
            && first_written < self.blocks.len()
            && Arc::get_mut(&mut self.blocks[first_written]).is_none()
        {
            let copy = self.blocks[first_written].duplicate(pool)?;
            self.blocks[first_written] = Arc::new(copy);
        }
        while self.blocks.len() < needed {
            self.blocks.push(Arc::new(Block::new(pool)?));
        }
        Ok(())
    }

    /// Writes K and V (`[kv_heads, head_dim]` f32 each) of `layer` at position `pos`
    /// (`shared_len <= pos < len + reserved`). The block must be unshared ([`Seq::reserve`]).
    pub(crate) fn write(&mut self, shape: &Shape, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let i = pos - self.shared_len();
        let (b, slot) = (i / BLOCK, i % BLOCK);
        let block =
            Arc::get_mut(&mut self.blocks[b]).expect("write into a shared block: reserve first");
        let hd = shape.head_dim;
        for head in 0..shape.kv_heads {
            let h = head * hd..(head + 1) * hd;
            block.data.store_strided(shape.run(layer, 0, head) + slot, BLOCK, &k[h.clone()]);
            block.data.store(shape.run(layer, 1, head) + slot * hd, &v[h]);
        }
    }

    /// Marks `n` more positions as written.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Keeps the first `len` positions (no-op if it holds fewer) and returns the blocks
    /// no longer needed.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if len <= self.shared_len() {
            self.blocks.clear();
            match &mut self.shared {
                Some((_, n)) if len > 0 => *n = len,
                _ => self.shared = None,
            }
        } else {
            self.blocks.truncate((len - self.shared_len()).div_ceil(BLOCK));
        }
        self.len = len;
    }

    /// A sequence with the same positions, sharing this one's blocks (copy on write).
    pub(crate) fn fork(&self) -> Self {
        Self { shared: self.shared.clone(), blocks: self.blocks.clone(), len: self.len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(capacity: usize) -> Arc<KvPool> {
        KvPool::new(Shape { layers: 2, kv_heads: 1, head_dim: 2 }, KvFormat::F32, capacity)
    }

    fn fill(seq: &mut Seq, pool: &Arc<KvPool>, n: usize, base: f32) {
        seq.reserve(n, pool).expect("reserve");
        let shape = pool.shape();
        for i in 0..n {
            let pos = seq.len() + i;
            for layer in 0..2 {
                let x = base + pos as f32 + layer as f32 * 0.5;
                seq.write(&shape, layer, pos, &[x, x], &[-x, -x]);
            }
        }
        seq.advance(n);
    }

    /// Element 0 of K at `pos` (K is stored transposed: element `d` of slot `s` at `d·BLOCK + s`).
    fn key(seq: &Seq, shape: &Shape, layer: usize, pos: usize) -> f32 {
        let s = seq.slot(pos);
        let mut out = [0.0f32];
        s.block.data.load(shape.run(layer, 0, 0) + s.slot, &mut out);
        out[0]
    }

    #[test]
    fn blocks_are_counted_and_returned() {
        let pool = pool(4);
        let mut a = Seq::new();
        fill(&mut a, &pool, BLOCK + 1, 0.0);
        assert_eq!(pool.in_use(), 2);
        let prefix = Arc::new(a);
        let mut b = Seq::on_prefix(&prefix, BLOCK + 1);
        fill(&mut b, &pool, 3, 100.0);
        assert_eq!(pool.in_use(), 3);
        let shape = pool.shape();
        assert_eq!(key(&b, &shape, 1, 3), 3.5);
        assert_eq!(key(&b, &shape, 0, BLOCK + 2), 100.0 + (BLOCK + 2) as f32);
        // Past the budget: an error, and nothing is counted for it.
        let mut c = Seq::on_prefix(&prefix, 2);
        assert_eq!(c.reserve(2 * BLOCK + 1, &pool), Err(OutOfBlocks));
        drop(c);
        assert_eq!(pool.in_use(), 3);
        drop(b);
        assert_eq!(pool.in_use(), 2);
        assert_eq!(pool.peak(), 4);
        drop(prefix);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn forks_share_until_written() {
        let pool = pool(8);
        let mut a = Seq::new();
        fill(&mut a, &pool, 5, 0.0);
        let mut b = a.fork();
        assert_eq!(pool.in_use(), 1);
        fill(&mut b, &pool, 1, 50.0);
        assert_eq!(pool.in_use(), 2, "the shared partial block was copied");
        let shape = pool.shape();
        assert_eq!(key(&a, &shape, 0, 4), 4.0);
        assert_eq!(key(&b, &shape, 0, 4), 4.0);
        assert_eq!(key(&b, &shape, 0, 5), 55.0);
        fill(&mut a, &pool, 1, 10.0);
        assert_eq!(key(&a, &shape, 0, 5), 15.0);
        assert_eq!(key(&b, &shape, 0, 5), 55.0);
    }

    #[test]
    fn truncation_drops_blocks_and_prefix_use() {
        let pool = pool(8);
        let mut p = Seq::new();
        fill(&mut p, &pool, 10, 0.0);
        let prefix = Arc::new(p);
        let mut s = Seq::on_prefix(&prefix, 10);
        fill(&mut s, &pool, 2 * BLOCK, 0.0);
        assert_eq!(pool.in_use(), 3);
        s.truncate(12);
        assert_eq!((s.len(), s.own_blocks(), pool.in_use()), (12, 1, 2));
        s.truncate(4);
        assert_eq!((s.len(), s.shared_len(), s.own_blocks()), (4, 4, 0));
        fill(&mut s, &pool, 1, 70.0);
        assert_eq!(key(&s, &pool.shape(), 0, 4), 74.0);
        assert_eq!(key(&prefix, &pool.shape(), 0, 4), 4.0);
        s.truncate(0);
        assert!(s.prefix().is_none());
    }
}
