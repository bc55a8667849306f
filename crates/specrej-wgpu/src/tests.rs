//! Kernel tests on a real adapter (lavapipe in CI), no model file needed: the matmul's
//! in-shader dequantization of every weight type against the host's, and the sampler
//! against `specrej_core::sampling::sample`. Skipped (printing why) without an adapter,
//! unless `SPECREJ_REQUIRE_GPU` requires wgpu (`wgpu` or `1`).

use specrej_core::Sampling;

use crate::diag::AttentionShape;
use crate::gguf::{GgmlType, dequantize};
use crate::gpu::Gpu;
use crate::shaders::Variant;

fn gpu(allow: Variant) -> Option<Gpu> {
    let instance = crate::instance();
    match pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())) {
        Ok(adapter) => Some(pollster::block_on(Gpu::open(adapter, allow)).expect("device")),
        Err(e) => {
            specrej_core::gpu_missing("wgpu", &format!("no WebGPU adapter ({e})"));
            None
        }
    }
}

// The inputs are diag's, so the native tests and the browser self-check use the same data.
use crate::diag::{weights, words};

fn read_f32(gpu: &Gpu, buf: &wgpu::Buffer, n: usize) -> Vec<f32> {
    let bytes =
        pollster::block_on(gpu.read_back(gpu.encoder(), buf, (n * 4) as u64)).expect("read back");
    bytes.chunks_exact(4).take(n).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn step_uniform(gpu: &Gpu, n: u32, rows: u32, logit_stride: u32, generation: u32) -> wgpu::Buffer {
    gpu.uniform("step", &[n, rows, 1, 0, 1, n, logit_stride, generation])
}

#[test]
fn matmul_dequantizes_every_type_like_the_host() {
    for allow in Variant::ALL {
        let Some(gpu) = gpu(allow) else { return };
        let subgroups = gpu.variant;
        let (out, inp) = (7, 96);
        for (ty, id) in [
            (GgmlType::F32, 0),
            (GgmlType::F16, 1),
            (GgmlType::Q4_0, 2),
            (GgmlType::Q4_1, 3),
            (GgmlType::Q8_0, 8),
        ] {
            for n in [3usize, 11] {
                let bytes = weights(ty, out, inp, id + 1);
                let host_w = dequantize(ty, &bytes).expect("host dequant");
                let x: Vec<f32> =
                    words(99, n * inp).iter().map(|&v| (v % 2000) as f32 / 1000.0 - 1.0).collect();
                let mut padded = bytes.clone();
                padded.extend_from_slice(&[0; 4]);
                let w = gpu.storage_init("w", &padded);
                let dims = gpu.uniform("dims", &[out as u32, inp as u32, id, 0]);
                let step = step_uniform(&gpu, n as u32, n as u32, 0, 0);
                let xb = gpu.storage_init("x", bytemuck::cast_slice(&x));
                let y = gpu.storage("y", (n * out * 4) as u64).expect("y");
                let dummy = gpu.storage("dummy", 16).expect("dummy");
                for (kernel, pipeline, groups) in [
                    ("matmul", &gpu.pipelines.matmul, out as u32),
                    ("matmul_thread", &gpu.pipelines.matmul_thread, (out as u32).div_ceil(64)),
                ] {
                    let mut enc = gpu.encoder();
                    {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        gpu.dispatch(
                            &mut pass,
                            pipeline,
                            &[(0, &step), (1, &dims), (2, &w), (3, &xb), (4, &y), (7, &dummy)],
                            groups,
                        );
                    }
                    gpu.submit(enc).expect("submit");
                    let got = read_f32(&gpu, &y, n * out);
                    for r in 0..n {
                        for o in 0..out {
                            let want: f32 =
                                (0..inp).map(|i| host_w[o * inp + i] * x[r * inp + i]).sum();
                            let g = got[r * out + o];
                            assert!(
                                (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{kernel} {ty:?} n={n} variant={subgroups:?} [{r},{o}]: {g} vs {want}"
                            );
                        }
                    }
                }

                // The embedding lookup dequantizes whole rows.
                let tokens: Vec<u32> = vec![2, 0, 6, 2];
                let tb = gpu.storage_init("tokens", bytemuck::cast_slice(&tokens));
                let emb = gpu.storage("emb", (tokens.len() * inp * 4) as u64).expect("emb");
                let step = step_uniform(&gpu, tokens.len() as u32, 1, 0, 0);
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
                gpu.submit(enc).expect("submit");
                let got = read_f32(&gpu, &emb, tokens.len() * inp);
                for (i, &t) in tokens.iter().enumerate() {
                    assert_eq!(
                        &got[i * inp..(i + 1) * inp],
                        &host_w[t as usize * inp..(t as usize + 1) * inp],
                        "{ty:?} embed row {t}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_sampler_matches_the_host_sampler() {
    let Some(gpu) = gpu(Variant::default()) else { return };
    let (rows, vocab) = (3usize, 1000usize);
    // Logits in [-4, 4) with a few exact ties.
    let mut logits: Vec<f32> =
        words(5, rows * vocab).iter().map(|&v| (v % 8000) as f32 / 1000.0 - 4.0).collect();
    logits[17] = 4.5;
    logits[400] = 4.5;
    let row_ids = [0u32, 7, 123_456];
    let configs = [
        Sampling { seed: 1, temperature: 0.0, top_k: 50, top_p: 1.0 },
        Sampling { seed: 2, temperature: 1.0, top_k: 0, top_p: 1.0 },
        Sampling { seed: 3, temperature: 0.7, top_k: 50, top_p: 1.0 },
        Sampling { seed: 4, temperature: 1.0, top_k: 0, top_p: 0.9 },
        Sampling { seed: (5 << 32) | 9, temperature: 1.3, top_k: 20, top_p: 0.8 },
        Sampling { seed: 6, temperature: 1.0, top_k: 1, top_p: 1.0 },
    ];
    let lb = gpu.storage_init("logits", bytemuck::cast_slice(&logits));
    let ids = gpu.storage_init("row ids", bytemuck::cast_slice(&row_ids));
    let tokens = gpu.storage("tokens", (rows * 4) as u64).expect("tokens");
    for s in configs {
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
        let sel = gpu.storage("sel", (rows * sel_stride * 4) as u64).expect("sel");
        for generation in 0..6u32 {
            let step = step_uniform(&gpu, rows as u32, rows as u32, vocab as u32, generation);
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
            let bytes = pollster::block_on(gpu.read_back(enc, &tokens, (rows * 4) as u64))
                .expect("read back");
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
                assert_eq!(got, want, "{s:?} row {r} position {generation}");
            }
        }
    }
}

/// Attention shape of the K/V tests: `rows` cache rows × `t` fresh positions each (a prefill
/// pass, causal), grouped-query heads.
const ROWS: usize = 3;
const T: usize = 5;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const CAP: usize = 7;

/// The host's attention ([`crate::diag::host_attention`]) at this file's shape, from position 0.
fn host_attention(q: &[f32], kc: &[f32], vc: &[f32]) -> Vec<f32> {
    let shape = AttentionShape {
        rows: ROWS,
        t: T,
        pos: 0,
        heads: HEADS,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        cap: CAP,
    };
    crate::diag::host_attention(shape, 1.0 / (HEAD_DIM as f32).sqrt(), q, kc, vc)
}

/// `kv_append` of fresh K/V, then `attention`, on `gpu`'s variant: (attention output, the
/// cache's K and V buffers).
fn append_and_attend(
    gpu: &Gpu,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, wgpu::Buffer, wgpu::Buffer) {
    let (n, width) = (ROWS * T, KV_HEADS * HEAD_DIM);
    let cache_bytes = (ROWS * CAP * width * gpu.variant.kv_elem_bytes()) as u64;
    let cache_k = gpu.storage("cache k", cache_bytes).expect("cache k");
    let cache_v = gpu.storage("cache v", cache_bytes).expect("cache v");
    let step = gpu.uniform("step", &[n as u32, ROWS as u32, T as u32, 0, CAP as u32, 0, 0, 0]);
    let kv_u = gpu.uniform("kv width", &[width as u32, 0, 0, 0]);
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let attn_u = gpu
        .uniform("attention", &[HEADS as u32, KV_HEADS as u32, HEAD_DIM as u32, scale.to_bits()]);
    let (qb, kb, vb) = (
        gpu.storage_init("q", bytemuck::cast_slice(q)),
        gpu.storage_init("k", bytemuck::cast_slice(k)),
        gpu.storage_init("v", bytemuck::cast_slice(v)),
    );
    let out = gpu.storage("out", (n * HEADS * HEAD_DIM * 4) as u64).expect("out");
    let mut enc = gpu.encoder();
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        let pl = &gpu.pipelines;
        gpu.dispatch(
            &mut pass,
            &pl.kv_append,
            &[(0, &step), (1, &kv_u), (2, &kb), (3, &vb), (4, &cache_k), (5, &cache_v)],
            ((n * width) as u32).div_ceil(64),
        );
        gpu.dispatch(
            &mut pass,
            &pl.attention,
            &[(0, &step), (1, &attn_u), (2, &qb), (3, &cache_k), (4, &cache_v), (5, &out)],
            (n * HEADS) as u32,
        );
    }
    gpu.submit(enc).expect("submit");
    (read_f32(gpu, &out, n * HEADS * HEAD_DIM), cache_k, cache_v)
}

/// The cache's elements as f32 (f16 bits widened in the f16 variant).
fn read_cache(gpu: &Gpu, buf: &wgpu::Buffer) -> Vec<f32> {
    let count = ROWS * CAP * KV_HEADS * HEAD_DIM;
    if gpu.variant.f16_kv {
        let bytes = pollster::block_on(gpu.read_back(gpu.encoder(), buf, (count * 2) as u64))
            .expect("read back");
        bytes
            .chunks_exact(2)
            .map(|b| crate::gguf::f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect()
    } else {
        read_f32(gpu, buf, count)
    }
}

#[test]
fn the_f16_kv_cache_matches_the_f32_cache_within_rounding() {
    let (n, width) = (ROWS * T, KV_HEADS * HEAD_DIM);
    let signed = |seed, count| {
        words(seed, count).iter().map(|&x| (x % 20001) as f32 / 10000.0 - 1.0).collect::<Vec<f32>>()
    };
    let (q, k, v) =
        (signed(21, n * HEADS * HEAD_DIM), signed(22, n * width), signed(23, n * width));
    // The cache as the host lays it out: activation row r * T + s at cache row r, position s.
    let mut kc = vec![0.0; ROWS * CAP * width];
    let mut vc = kc.clone();
    for i in 0..n {
        let dst = ((i / T) * CAP + i % T) * width;
        kc[dst..dst + width].copy_from_slice(&k[i * width..(i + 1) * width]);
        vc[dst..dst + width].copy_from_slice(&v[i * width..(i + 1) * width]);
    }
    let exact = host_attention(&q, &kc, &vc);
    let mut outputs = Vec::new();
    for f16_kv in [false, true] {
        let Some(gpu) = gpu(Variant { subgroups: false, f16_kv }) else { return };
        if gpu.variant.f16_kv != f16_kv {
            specrej_core::gpu_missing("wgpu", "the f16 K/V case: the adapter lacks shader-f16");
            continue;
        }
        let (out, cache_k, cache_v) = append_and_attend(&gpu, &q, &k, &v);
        let (gk, gv) = (read_cache(&gpu, &cache_k), read_cache(&gpu, &cache_v));
        // kv_append put every element in its place, rounded to the cache type (f16: one of
        // the two nearest halves, relative step 2^-10 at most; f32: exact).
        let ulp = if f16_kv { 1.0 / 1024.0 } else { 0.0 };
        for (got, want) in gk.iter().zip(&kc).chain(gv.iter().zip(&vc)) {
            assert!(
                (got - want).abs() <= ulp * want.abs() + 1e-7,
                "f16_kv={f16_kv}: cached {got} for {want}"
            );
        }
        // Attention over what is cached is f32 arithmetic: the host's on the same values.
        let want = host_attention(&q, &gk, &gv);
        for (j, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5, "f16_kv={f16_kv} out[{j}]: {g} vs {w}");
        }
        // gather_rows copies the cache bit for bit, whatever its element type: keep rows 2, 0
        // into a larger allocation.
        let keep = [2u32, 0];
        let words_per_pos = (width * gpu.variant.kv_elem_bytes() / 4) as u32;
        let dst_cap = CAP + 4;
        let dst = gpu
            .storage("dst", (keep.len() * dst_cap * width * gpu.variant.kv_elem_bytes()) as u64)
            .expect("dst");
        let params = gpu.uniform(
            "gather",
            &[keep.len() as u32, T as u32, words_per_pos, CAP as u32, dst_cap as u32, 0, 0, 0],
        );
        let keep_buf = gpu.storage_init("keep", bytemuck::cast_slice(&keep));
        let mut enc = gpu.encoder();
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            gpu.dispatch(
                &mut pass,
                &gpu.pipelines.gather,
                &[(0, &params), (1, &keep_buf), (2, &cache_k), (3, &dst)],
                (keep.len() as u32 * T as u32 * words_per_pos).div_ceil(64),
            );
        }
        gpu.submit(enc).expect("submit");
        let row_bytes = |cap: usize| cap * width * gpu.variant.kv_elem_bytes();
        let src_bytes = pollster::block_on(gpu.read_back(
            gpu.encoder(),
            &cache_k,
            (ROWS * row_bytes(CAP)) as u64,
        ))
        .expect("read back");
        let dst_bytes = pollster::block_on(gpu.read_back(
            gpu.encoder(),
            &dst,
            (keep.len() * row_bytes(dst_cap)) as u64,
        ))
        .expect("read back");
        let used = T * width * gpu.variant.kv_elem_bytes();
        for (j, &r) in keep.iter().enumerate() {
            let r = r as usize;
            assert_eq!(
                &dst_bytes[j * row_bytes(dst_cap)..][..used],
                &src_bytes[r * row_bytes(CAP)..][..used],
                "f16_kv={f16_kv} gathered row {j}"
            );
        }
        drop(cache_v);
        outputs.push(out);
    }
    // And the f16 cache stays close to exact attention (inputs in [-1, 1], head_dim 8).
    for out in &outputs {
        let worst = out.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 4e-3, "max |Δ| {worst} against exact attention");
    }
}
