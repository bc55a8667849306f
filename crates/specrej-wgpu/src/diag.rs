//! Kernel self-check on whatever adapter is at hand, native or in the browser: every kernel of
//! the forward at the default model's shapes (and a few small ones) against a host reference.
//! The browser demo runs it from `WebEngine.selfTest()`, which is how compiler differences
//! between naga (native wgpu) and the browser's WGSL compiler show up; `cargo test` runs it
//! natively (`tests.rs`). Not part of the stable API.

use specrej_core::Sampling;

use crate::gguf::{GgmlType, dequantize};
use crate::gpu::Gpu;
use crate::shaders::Variant;

/// One kernel check: what was run and the worst relative error (or a failure message).
#[derive(Clone, Debug)]
pub struct Check {
    /// Kernel and case, e.g. "matmul_thread Q4_1 576x576 n=1".
    pub name: String,
    /// Worst |got − want| / (1 + |want|) over the output (0 for exact checks).
    pub error: f32,
    /// Whether `error` is within the kernel's tolerance (and nothing failed).
    pub ok: bool,
    /// What went wrong, if anything, beyond the error size (first mismatch, device error).
    pub detail: String,
}

/// The adapter the checks ran on, and their results.
#[derive(Clone, Debug)]
pub struct Report {
    /// `AdapterInfo` of the device (name, backend, type).
    pub adapter: crate::AdapterInfo,
    /// Whether the matmul ran its per-output (CPU adapter) kernel.
    pub thread_matmul: bool,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "adapter: {} (per-output matmul: {})", self.adapter, self.thread_matmul)?;
        for c in &self.checks {
            writeln!(
                f,
                "{} {}: max rel err {:.3e}{}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.error,
                if c.detail.is_empty() { String::new() } else { format!(" ({})", c.detail) }
            )?;
        }
        Ok(())
    }
}

/// Deterministic pseudo-random words.
pub(crate) fn words(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| specrej_core::sampling::pcg_hash(seed.wrapping_mul(0x9e37_79b9) ^ i))
        .collect()
}

/// Values in [-1, 1).
fn signed(seed: u32, n: usize) -> Vec<f32> {
    words(seed, n).iter().map(|&v| (v % 20000) as f32 / 10000.0 - 1.0).collect()
}

/// A finite half in about ±0.004..±2 from random bits.
fn half(bits: u32) -> u16 {
    let sign = ((bits >> 15) & 1) as u16;
    let exp = 7 + (bits >> 10) % 9; // 2^-8 .. 2^0
    (sign << 15) | ((exp as u16) << 10) | (bits & 0x3ff) as u16
}

/// `out × in` random weights of type `ty`, as GGML bytes.
pub(crate) fn weights(ty: GgmlType, out: usize, inp: usize, seed: u32) -> Vec<u8> {
    let blocks = out * inp / 32;
    let r = words(seed, blocks * 40);
    let mut bytes = Vec::new();
    for b in 0..blocks {
        let w = &r[b * 40..(b + 1) * 40];
        match ty {
            GgmlType::F32 => {
                for &x in &w[..32] {
                    bytes.extend_from_slice(
                        &((x as f32 / u32::MAX as f32) * 2.0 - 1.0).to_le_bytes(),
                    );
                }
            }
            GgmlType::F16 => {
                for &x in &w[..32] {
                    bytes.extend_from_slice(&half(x).to_le_bytes());
                }
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                bytes.extend_from_slice(&(half(w[0]) & 0x7fff).to_le_bytes());
                if ty == GgmlType::Q4_1 {
                    bytes.extend_from_slice(&half(w[1]).to_le_bytes());
                }
                let n = if ty == GgmlType::Q8_0 { 32 } else { 16 };
                bytes.extend(w[2..2 + n].iter().map(|&x| x as u8));
            }
            _ => unreachable!("weights: unsupported test type"),
        }
    }
    bytes
}

async fn read_f32(gpu: &Gpu, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>, String> {
    let bytes =
        gpu.read_back(gpu.encoder(), buf, (n * 4) as u64).await.map_err(|e| e.to_string())?;
    Ok(bytes
        .chunks_exact(4)
        .take(n)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn compare(name: String, got: &[f32], want: &[f32], tolerance: f32) -> Check {
    compare_scaled(name, got, want, &[], tolerance)
}

/// [`compare`] with the error of element i relative to `1 + scale[i]` (a sum of |terms|, so
/// that rounding in long sums of large terms is not mistaken for a wrong kernel).
fn compare_scaled(name: String, got: &[f32], want: &[f32], scale: &[f32], tolerance: f32) -> Check {
    let mut error = 0.0f32;
    let mut detail = String::new();
    if got.len() != want.len() {
        detail = format!("{} values back, {} expected", got.len(), want.len());
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs() / (1.0 + scale.get(i).copied().unwrap_or(w.abs()));
        // NaN counts as the worst.
        let e = if e.is_nan() { f32::INFINITY } else { e };
        if e > error {
            error = e;
            if error > tolerance && detail.is_empty() {
                detail = format!("first bad [{i}]: {g} vs {w}");
            }
        }
    }
    Check { name, error, ok: error <= tolerance && detail.is_empty(), detail }
}

fn failed(name: String, e: impl std::fmt::Display) -> Check {
    Check { name, error: f32::INFINITY, ok: false, detail: e.to_string() }
}

/// The `Step` uniform: n, rows, t, pos, cap, m, logit_stride, generation.
#[allow(clippy::too_many_arguments, reason = "one argument per word of the uniform, in its order")]
fn step_words(
    n: u32,
    rows: u32,
    t: u32,
    pos: u32,
    cap: u32,
    m: u32,
    logit_stride: u32,
    generation: u32,
) -> [u32; 8] {
    [n, rows, t, pos, cap, m, logit_stride, generation]
}

/// Runs every check on the default adapter (`allow`: the variants permitted).
pub async fn run(options: &crate::Options) -> Result<Report, crate::Error> {
    let instance = crate::instance();
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        })
        .await
        .map_err(|e| crate::Error::NoAdapter { hint: format!(": {e}") })?;
    let allow = Variant { subgroups: options.subgroups, ..Variant::default() };
    let gpu = Gpu::open(adapter, allow).await?;
    let checks = run_on(&gpu).await;
    let adapter =
        crate::AdapterInfo::from_parts(0, gpu.info.clone(), gpu.device.features(), &gpu.limits);
    Ok(Report { adapter, thread_matmul: gpu.thread_matmul, checks })
}

/// Every check on `gpu`.
pub(crate) async fn run_on(gpu: &Gpu) -> Vec<Check> {
    let mut checks = Vec::new();
    // The default model's shapes (SmolLM2-135M): hidden 576, 9 heads of 64, 3 K/V heads,
    // FFN 1536; and a small odd one.
    for &(out, inp, n) in &[
        (7usize, 96usize, 3usize),
        (7, 96, 11),
        (576, 576, 1),
        (1536, 576, 7),
        (576, 1536, 1),
        (576, 576, 37),
    ] {
        for (ty, id) in [
            (GgmlType::F32, 0u32),
            (GgmlType::F16, 1),
            (GgmlType::Q4_0, 2),
            (GgmlType::Q4_1, 3),
            (GgmlType::Q8_0, 8),
        ] {
            if out > 7 && !matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
                continue;
            }
            checks.extend(matmul(gpu, ty, id, out, inp, n).await);
        }
    }
    checks.push(embed(gpu).await);
    checks.push(rmsnorm(gpu, 576, 3, false).await);
    checks.push(rmsnorm(gpu, 576, 2, true).await);
    checks.push(rope(gpu, 9, 3, 64, 5, 7).await);
    checks.push(silu(gpu, 1536, 2).await);
    // Prefill-like (t = 5 positions from 0) and decode-like (t = 1 at position 6).
    checks.push(attention(gpu, 2, 5, 0, 9, 3, 64, 12).await);
    checks.push(attention(gpu, 3, 1, 6, 9, 3, 64, 8).await);
    checks.push(attention(gpu, 1, 37, 0, 9, 3, 64, 53).await);
    checks.push(attention(gpu, 2, 1, 70, 9, 3, 64, 80).await);
    checks.push(sample(gpu, 49152).await);
    checks
}

async fn matmul(gpu: &Gpu, ty: GgmlType, id: u32, out: usize, inp: usize, n: usize) -> Vec<Check> {
    let bytes = weights(ty, out, inp, id + 1);
    let Some(host_w) = dequantize(ty, &bytes) else {
        return vec![failed(format!("matmul {ty:?}"), "host dequantization")];
    };
    let x = signed(99, n * inp);
    let bias = signed(7, out);
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0; 4]);
    let w = gpu.storage_init("w", &padded);
    // flags: bit 2 adds the bias.
    let dims = gpu.uniform("dims", &[out as u32, inp as u32, id, 4]);
    let step = gpu.uniform("step", &step_words(n as u32, n as u32, 1, 0, 1, n as u32, 0, 0));
    let xb = gpu.storage_init("x", bytemuck::cast_slice(&x));
    let bb = gpu.storage_init("bias", bytemuck::cast_slice(&bias));
    let want: Vec<f32> = (0..n * out)
        .map(|k| {
            let (r, o) = (k / out, k % out);
            (0..inp).map(|i| host_w[o * inp + i] * x[r * inp + i]).sum::<f32>() + bias[o]
        })
        .collect();
    let scale: Vec<f32> = (0..n * out)
        .map(|k| {
            let (r, o) = (k / out, k % out);
            (0..inp).map(|i| (host_w[o * inp + i] * x[r * inp + i]).abs()).sum::<f32>()
                + bias[o].abs()
        })
        .collect();
    let mut checks = Vec::new();
    for (kernel, pipeline, groups) in [
        ("matmul", &gpu.pipelines.matmul, out as u32),
        ("matmul_thread", &gpu.pipelines.matmul_thread, (out as u32).div_ceil(64)),
    ] {
        let name = format!("{kernel} {ty:?} {out}x{inp} n={n}");
        let y = match gpu.storage("y", (n * out * 4) as u64) {
            Ok(y) => y,
            Err(e) => {
                checks.push(failed(name, e));
                continue;
            }
        };
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            gpu.dispatch(
                &mut pass,
                pipeline,
                &[(0, &step), (1, &dims), (2, &w), (3, &xb), (4, &y), (7, &bb)],
                groups,
            );
        }
        if let Err(e) = gpu.submit(enc) {
            checks.push(failed(name, e));
            continue;
        }
        match read_f32(gpu, &y, n * out).await {
            Ok(got) => checks.push(compare_scaled(name, &got, &want, &scale, 1e-5)),
            Err(e) => checks.push(failed(name, e)),
        }
    }
    checks
}

async fn embed(gpu: &Gpu) -> Check {
    let (vocab, inp) = (50usize, 576usize);
    let name = format!("embed Q8_0 {vocab}x{inp}");
    let bytes = weights(GgmlType::Q8_0, vocab, inp, 3);
    let Some(host_w) = dequantize(GgmlType::Q8_0, &bytes) else {
        return failed(name, "host dequantization");
    };
    let mut padded = bytes;
    padded.extend_from_slice(&[0; 4]);
    let w = gpu.storage_init("w", &padded);
    let dims = gpu.uniform("dims", &[vocab as u32, inp as u32, 8, 0]);
    let tokens: Vec<u32> = vec![2, 0, 49, 17, 2];
    let tb = gpu.storage_init("tokens", bytemuck::cast_slice(&tokens));
    let emb = match gpu.storage("emb", (tokens.len() * inp * 4) as u64) {
        Ok(b) => b,
        Err(e) => return failed(name, e),
    };
    let step = gpu
        .uniform("step", &step_words(tokens.len() as u32, 1, tokens.len() as u32, 0, 1, 1, 0, 0));
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        gpu.dispatch(
            &mut pass,
            &gpu.pipelines.embed,
            &[(0, &step), (1, &dims), (2, &w), (5, &tb), (6, &emb)],
            ((tokens.len() * inp / 8) as u32).div_ceil(64),
        );
    }
    if let Err(e) = gpu.submit(enc) {
        return failed(name, e);
    }
    let want: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| host_w[t as usize * inp..(t as usize + 1) * inp].iter().copied())
        .collect();
    match read_f32(gpu, &emb, tokens.len() * inp).await {
        Ok(got) => compare(name, &got, &want, 0.0),
        Err(e) => failed(name, e),
    }
}

async fn rmsnorm(gpu: &Gpu, dim: usize, rows: usize, indexed: bool) -> Check {
    let name = format!("rmsnorm dim={dim} rows={rows}{}", if indexed { " indexed" } else { "" });
    let x = signed(11, rows * dim);
    let weight = signed(12, dim);
    let eps = 1e-5f32;
    // Indexed: output row i reads input row src[i] (the head's last positions).
    let src: Vec<u32> = if indexed { (0..rows as u32).rev().collect() } else { vec![0; 4] };
    let m = if indexed { rows } else { 0 };
    let norm = gpu.uniform("norm", &[dim as u32, u32::from(indexed), eps.to_bits(), 0]);
    let step = gpu.uniform(
        "step",
        &step_words(if indexed { 0 } else { rows as u32 }, 1, 1, 0, 1, m as u32, 0, 0),
    );
    let (xb, wb, sb) = (
        gpu.storage_init("x", bytemuck::cast_slice(&x)),
        gpu.storage_init("w", bytemuck::cast_slice(&weight)),
        gpu.storage_init("src", bytemuck::cast_slice(&src)),
    );
    let y = match gpu.storage("y", (rows * dim * 4) as u64) {
        Ok(b) => b,
        Err(e) => return failed(name, e),
    };
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        gpu.dispatch(
            &mut pass,
            &gpu.pipelines.rmsnorm,
            &[(0, &step), (1, &norm), (2, &xb), (3, &wb), (4, &sb), (5, &y)],
            rows as u32,
        );
    }
    if let Err(e) = gpu.submit(enc) {
        return failed(name, e);
    }
    let mut want = Vec::with_capacity(rows * dim);
    for (i, &picked) in src.iter().chain(std::iter::repeat(&0)).take(rows).enumerate() {
        let s = if indexed { picked as usize } else { i };
        let row = &x[s * dim..(s + 1) * dim];
        let scale = (row.iter().map(|v| v * v).sum::<f32>() / dim as f32 + eps).sqrt();
        want.extend(row.iter().zip(&weight).map(|(v, w)| v / scale * w));
    }
    match read_f32(gpu, &y, rows * dim).await {
        Ok(got) => compare(name, &got, &want, 1e-5),
        Err(e) => failed(name, e),
    }
}

async fn rope(gpu: &Gpu, heads: usize, kv_heads: usize, hd: usize, t: usize, pos: usize) -> Check {
    let name = format!("rope heads={heads}/{kv_heads} head_dim={hd} t={t} pos={pos}");
    let half = hd / 2;
    let context = pos + t + 1;
    let table: Vec<f32> = (0..context)
        .flat_map(|p| {
            (0..half).flat_map(move |j| {
                let angle = p as f32 * (1.0 / 10000f32.powf(2.0 * j as f32 / hd as f32));
                [angle.cos(), angle.sin()]
            })
        })
        .collect();
    let q = signed(31, t * heads * hd);
    let k = signed(32, t * kv_heads * hd);
    let rope_u = gpu.uniform("rope", &[heads as u32, kv_heads as u32, hd as u32, 0]);
    let step = gpu.uniform("step", &step_words(t as u32, 1, t as u32, pos as u32, 1, 1, 0, 0));
    let (tb, qb, kb) = (
        gpu.storage_init("table", bytemuck::cast_slice(&table)),
        gpu.storage_init("q", bytemuck::cast_slice(&q)),
        gpu.storage_init("k", bytemuck::cast_slice(&k)),
    );
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        gpu.dispatch(
            &mut pass,
            &gpu.pipelines.rope,
            &[(0, &step), (1, &rope_u), (2, &tb), (3, &qb), (4, &kb)],
            ((t * (heads + kv_heads) * half) as u32).div_ceil(64),
        );
    }
    if let Err(e) = gpu.submit(enc) {
        return failed(name, e);
    }
    let rotate = |v: &[f32], nh: usize| -> Vec<f32> {
        let mut out = v.to_vec();
        for i in 0..t {
            for h in 0..nh {
                let base = (i * nh + h) * hd;
                for j in 0..half {
                    let (c, s) =
                        (table[((pos + i) * half + j) * 2], table[((pos + i) * half + j) * 2 + 1]);
                    let (x0, x1) = (v[base + j], v[base + j + half]);
                    out[base + j] = x0 * c - x1 * s;
                    out[base + j + half] = x0 * s + x1 * c;
                }
            }
        }
        out
    };
    let mut want = rotate(&q, heads);
    want.extend(rotate(&k, kv_heads));
    let got = match (read_f32(gpu, &qb, q.len()).await, read_f32(gpu, &kb, k.len()).await) {
        (Ok(mut a), Ok(b)) => {
            a.extend(b);
            a
        }
        (Err(e), _) | (_, Err(e)) => return failed(name, e),
    };
    compare(name, &got, &want, 1e-5)
}

async fn silu(gpu: &Gpu, width: usize, n: usize) -> Check {
    let name = format!("silu_mul width={width} n={n}");
    let g: Vec<f32> = signed(41, n * width).iter().map(|v| v * 12.0).collect();
    let u = signed(42, n * width);
    let ffn = gpu.uniform("ffn", &[width as u32, 0, 0, 0]);
    let step = gpu.uniform("step", &step_words(n as u32, n as u32, 1, 0, 1, n as u32, 0, 0));
    let (gb, ub) = (
        gpu.storage_init("g", bytemuck::cast_slice(&g)),
        gpu.storage_init("u", bytemuck::cast_slice(&u)),
    );
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        gpu.dispatch(
            &mut pass,
            &gpu.pipelines.silu_mul,
            &[(0, &step), (1, &ffn), (2, &gb), (3, &ub)],
            ((n * width) as u32).div_ceil(64),
        );
    }
    if let Err(e) = gpu.submit(enc) {
        return failed(name, e);
    }
    let want: Vec<f32> = g.iter().zip(&u).map(|(a, b)| a / (1.0 + (-a).exp()) * b).collect();
    match read_f32(gpu, &gb, g.len()).await {
        Ok(got) => compare(name, &got, &want, 1e-5),
        Err(e) => failed(name, e),
    }
}

/// The shape of an attention case ([`host_attention`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionShape {
    /// Cache rows.
    pub(crate) rows: usize,
    /// New positions per row.
    pub(crate) t: usize,
    /// Cached positions before this pass.
    pub(crate) pos: usize,
    /// Query heads.
    pub(crate) heads: usize,
    /// Key/value heads.
    pub(crate) kv_heads: usize,
    /// Width of a head.
    pub(crate) head_dim: usize,
    /// Allocated positions per cache row.
    pub(crate) cap: usize,
}

/// The host's attention, what `attention.wgsl` computes: `q` `[rows * t, heads, head_dim]`
/// over the cache `kc`/`vc` `[rows, cap, kv_heads, head_dim]` f32, activation row
/// `r * t + s` attending to positions `0..=pos + s` of cache row `r`, scores times `scale`.
pub(crate) fn host_attention(
    shape: AttentionShape,
    scale: f32,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
) -> Vec<f32> {
    let AttentionShape { rows, t, pos, heads, kv_heads, head_dim: hd, cap } = shape;
    let width = kv_heads * hd;
    let mut out = vec![0.0f32; rows * t * heads * hd]; // [rows * t, heads, head_dim] f32
    for i in 0..rows * t {
        let (r, len) = (i / t, pos + i % t + 1);
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let qh = &q[(i * heads + h) * hd..][..hd];
            let at = |j: usize| (r * cap + j) * width + g * hd;
            let scores: Vec<f32> = (0..len)
                .map(|j| qh.iter().zip(&kc[at(j)..][..hd]).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            let max = scores.iter().copied().fold(f32::MIN, f32::max);
            let p: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = p.iter().sum();
            for d in 0..hd {
                out[(i * heads + h) * hd + d] =
                    (0..len).map(|j| p[j] * vc[at(j) + d]).sum::<f32>() / sum;
            }
        }
    }
    out
}

/// `kv_append` of `rows × t` fresh positions at `pos` into a cache that already holds
/// positions `0..pos`, then `attention` over it.
#[allow(clippy::too_many_arguments, reason = "the case's shape, one argument per dimension")]
async fn attention(
    gpu: &Gpu,
    rows: usize,
    t: usize,
    pos: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    cap: usize,
) -> Check {
    let name = format!(
        "kv_append+attention rows={rows} t={t} pos={pos} heads={heads}/{kv_heads} head_dim={hd}"
    );
    if gpu.variant.f16_kv {
        return Check { name, error: 0.0, ok: true, detail: "skipped: f16 K/V cache".into() };
    }
    let n = rows * t;
    let width = kv_heads * hd;
    let q = signed(51, n * heads * hd);
    let k = signed(52, n * width);
    let v = signed(53, n * width);
    // The cache's earlier positions, as if appended before.
    let mut kc = signed(54, rows * cap * width);
    let mut vc = signed(55, rows * cap * width);
    let (ckb, cvb) = (
        gpu.storage_init("cache k", bytemuck::cast_slice(&kc)),
        gpu.storage_init("cache v", bytemuck::cast_slice(&vc)),
    );
    for i in 0..n {
        let dst = ((i / t) * cap + pos + i % t) * width;
        kc[dst..dst + width].copy_from_slice(&k[i * width..(i + 1) * width]);
        vc[dst..dst + width].copy_from_slice(&v[i * width..(i + 1) * width]);
    }
    let step = gpu.uniform(
        "step",
        &step_words(n as u32, rows as u32, t as u32, pos as u32, cap as u32, 0, 0, 0),
    );
    let kv_u = gpu.uniform("kv width", &[width as u32, 0, 0, 0]);
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let attn_u =
        gpu.uniform("attention", &[heads as u32, kv_heads as u32, hd as u32, scale.to_bits()]);
    let (qb, kb, vb) = (
        gpu.storage_init("q", bytemuck::cast_slice(&q)),
        gpu.storage_init("k", bytemuck::cast_slice(&k)),
        gpu.storage_init("v", bytemuck::cast_slice(&v)),
    );
    let out = match gpu.storage("out", (n * heads * hd * 4) as u64) {
        Ok(b) => b,
        Err(e) => return failed(name, e),
    };
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        let pl = &gpu.pipelines;
        gpu.dispatch(
            &mut pass,
            &pl.kv_append,
            &[(0, &step), (1, &kv_u), (2, &kb), (3, &vb), (4, &ckb), (5, &cvb)],
            ((n * width) as u32).div_ceil(64),
        );
        gpu.dispatch(
            &mut pass,
            &pl.attention,
            &[(0, &step), (1, &attn_u), (2, &qb), (3, &ckb), (4, &cvb), (5, &out)],
            (n * heads) as u32,
        );
    }
    if let Err(e) = gpu.submit(enc) {
        return failed(name, e);
    }
    let shape = AttentionShape { rows, t, pos, heads, kv_heads, head_dim: hd, cap };
    let want = host_attention(shape, scale, &q, &kc, &vc);
    let mut check = match read_f32(gpu, &out, want.len()).await {
        Ok(got) => compare(name.clone(), &got, &want, 1e-5),
        Err(e) => return failed(name, e),
    };
    // The appended K/V landed where the host put them.
    match read_f32(gpu, &ckb, kc.len()).await {
        Ok(got) if got == kc => {}
        Ok(_) => {
            check.ok = false;
            check.detail = "kv_append wrote K to the wrong place".into();
        }
        Err(e) => return failed(name, e),
    }
    check
}

async fn sample(gpu: &Gpu, vocab: usize) -> Check {
    let rows = 2usize;
    let name = format!("sample greedy + top-k vocab={vocab}");
    let mut logits: Vec<f32> =
        words(5, rows * vocab).iter().map(|&v| (v % 8000) as f32 / 1000.0 - 4.0).collect();
    logits[vocab + 30_000] = 9.0;
    let row_ids = [3u32, 11];
    let lb = gpu.storage_init("logits", bytemuck::cast_slice(&logits));
    let ids = gpu.storage_init("row ids", bytemuck::cast_slice(&row_ids));
    let tokens = match gpu.storage("tokens", (rows * 4) as u64) {
        Ok(b) => b,
        Err(e) => return failed(name, e),
    };
    let mut bad = Vec::new();
    for s in [
        Sampling { seed: 1, temperature: 0.0, top_k: 0, top_p: 1.0 },
        Sampling { seed: 3, temperature: 0.8, top_k: 40, top_p: 0.95 },
    ] {
        let top_k = if s.top_k == 0 { vocab } else { s.top_k.min(vocab) };
        let sel_stride = if top_k < vocab {
            top_k
        } else if s.top_p < 1.0 {
            vocab
        } else {
            1
        };
        let su = gpu.uniform(
            "sampling",
            &[
                s.seed as u32,
                (s.seed >> 32) as u32,
                s.temperature.to_bits(),
                top_k as u32,
                s.top_p.to_bits(),
                vocab as u32,
                sel_stride as u32,
                0,
            ],
        );
        let sel = match gpu.storage("sel", (rows * sel_stride * 4) as u64) {
            Ok(b) => b,
            Err(e) => return failed(name, e),
        };
        for generation in 0..2u32 {
            let step = gpu.uniform(
                "step",
                &step_words(
                    rows as u32,
                    rows as u32,
                    1,
                    0,
                    1,
                    rows as u32,
                    vocab as u32,
                    generation,
                ),
            );
            let mut enc = gpu.encoder();
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                gpu.dispatch(
                    &mut pass,
                    &gpu.pipelines.sample,
                    &[(0, &step), (1, &su), (2, &lb), (3, &ids), (4, &tokens), (5, &sel)],
                    rows as u32,
                );
            }
            let bytes = match gpu.read_back(enc, &tokens, (rows * 4) as u64).await {
                Ok(b) => b,
                Err(e) => return failed(name, e),
            };
            for r in 0..rows {
                let got = u32::from_le_bytes([
                    bytes[4 * r],
                    bytes[4 * r + 1],
                    bytes[4 * r + 2],
                    bytes[4 * r + 3],
                ]);
                let want = specrej_core::sampling::sample(
                    &logits[r * vocab..(r + 1) * vocab],
                    &s,
                    row_ids[r],
                    generation,
                );
                if got != want {
                    bad.push(format!(
                        "T={} row {r} gen {generation}: {got} vs {want}",
                        s.temperature
                    ));
                }
            }
        }
    }
    Check {
        name,
        error: if bad.is_empty() { 0.0 } else { 1.0 },
        ok: bad.is_empty(),
        detail: bad.join("; "),
    }
}

#[cfg(test)]
mod tests {
    /// Every kernel at the default model's shapes on the native adapter (lavapipe in CI);
    /// skipped without one unless `SPECREJ_REQUIRE_GPU` requires wgpu. The browser runs the same checks
    /// (`WebEngine.selfTest`, the e2e test).
    #[test]
    fn every_kernel_matches_the_host_reference() {
        for subgroups in [false, true] {
            match pollster::block_on(super::run(&crate::Options {
                subgroups,
                ..crate::Options::default()
            })) {
                Ok(report) => assert!(report.ok(), "{report}"),
                Err(crate::Error::NoAdapter { hint }) => {
                    specrej_core::gpu_missing("wgpu", &format!("no WebGPU adapter{hint}"));
                    return;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
