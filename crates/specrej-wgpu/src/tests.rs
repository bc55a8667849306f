//! Kernel tests on a real adapter (lavapipe in CI), no model file needed: the matmul's
//! in-shader dequantization of every weight type against the host's, and the sampler
//! against `specrej_core::sampling::sample`. Skipped (printing why) without an adapter,
//! unless `SPECREJ_REQUIRE_GPU=1`.

use specrej_core::Sampling;

use crate::gguf::{dequantize, GgmlType};
use crate::gpu::Gpu;
use crate::shaders::Variant;

fn gpu(allow: Variant) -> Option<Gpu> {
    let instance = crate::instance();
    match pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())) {
        Ok(adapter) => Some(pollster::block_on(Gpu::open(adapter, allow)).expect("device")),
        Err(e) => {
            assert!(std::env::var("SPECREJ_REQUIRE_GPU").as_deref() != Ok("1"), "SPECREJ_REQUIRE_GPU=1 but no adapter: {e}");
            eprintln!("skipped: no WebGPU adapter ({e})");
            None
        }
    }
}

/// Deterministic pseudo-random words.
fn words(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| specrej_core::sampling::pcg_hash(seed.wrapping_mul(0x9e37_79b9) ^ i)).collect()
}

/// A finite half in about ±0.004..±2 from random bits.
fn half(bits: u32) -> u16 {
    let sign = ((bits >> 15) & 1) as u16;
    let exp = 7 + (bits >> 10) % 9; // 2^-8 .. 2^0
    (sign << 15) | ((exp as u16) << 10) | (bits & 0x3ff) as u16
}

/// `rows × in` random weights of type `ty`, as GGML bytes.
fn weights(ty: GgmlType, out: usize, inp: usize, seed: u32) -> Vec<u8> {
    let blocks = out * inp / 32;
    let r = words(seed, blocks * 40);
    let mut bytes = Vec::new();
    for b in 0..blocks {
        let w = &r[b * 40..(b + 1) * 40];
        match ty {
            GgmlType::F32 => {
                for &x in &w[..32] {
                    bytes.extend_from_slice(&((x as f32 / u32::MAX as f32) * 2.0 - 1.0).to_le_bytes());
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
            _ => unreachable!(),
        }
    }
    bytes
}

fn read_f32(gpu: &Gpu, buf: &wgpu::Buffer, n: usize) -> Vec<f32> {
    let bytes = pollster::block_on(gpu.read_back(gpu.encoder(), buf, (n * 4) as u64)).expect("read back");
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
        for (ty, id) in [(GgmlType::F32, 0), (GgmlType::F16, 1), (GgmlType::Q4_0, 2), (GgmlType::Q4_1, 3), (GgmlType::Q8_0, 8)] {
            for n in [3usize, 11] {
                let bytes = weights(ty, out, inp, id + 1);
                let host_w = dequantize(ty, &bytes).expect("host dequant");
                let x: Vec<f32> = words(99, n * inp).iter().map(|&v| (v % 2000) as f32 / 1000.0 - 1.0).collect();
                let mut padded = bytes.clone();
                padded.extend_from_slice(&[0; 4]);
                let w = gpu.storage_init("w", &padded);
                let dims = gpu.uniform("dims", &[out as u32, inp as u32, id, 0]);
                let step = step_uniform(&gpu, n as u32, n as u32, 0, 0);
                let xb = gpu.storage_init("x", bytemuck::cast_slice(&x));
                let y = gpu.storage("y", (n * out * 4) as u64).expect("y");
                let dummy = gpu.storage("dummy", 16).expect("dummy");
                for (kernel, pipeline, groups) in [("matmul", &gpu.pipelines.matmul, out as u32), ("matmul_thread", &gpu.pipelines.matmul_thread, (out as u32).div_ceil(64))] {
                    let mut enc = gpu.encoder();
                    {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        gpu.dispatch(&mut pass, pipeline, &[(0, &step), (1, &dims), (2, &w), (3, &xb), (4, &y), (7, &dummy)], groups);
                    }
                    gpu.submit(enc).expect("submit");
                    let got = read_f32(&gpu, &y, n * out);
                    for r in 0..n {
                        for o in 0..out {
                            let want: f32 = (0..inp).map(|i| host_w[o * inp + i] * x[r * inp + i]).sum();
                            let g = got[r * out + o];
                            assert!((g - want).abs() <= 1e-4 * (1.0 + want.abs()), "{kernel} {ty:?} n={n} variant={subgroups:?} [{r},{o}]: {g} vs {want}");
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
                    gpu.dispatch(&mut pass, &gpu.pipelines.embed, &[(0, &step), (1, &dims), (2, &w), (5, &tb), (6, &emb)], ((tokens.len() * inp / 8) as u32).div_ceil(64));
                }
                gpu.submit(enc).expect("submit");
                let got = read_f32(&gpu, &emb, tokens.len() * inp);
                for (i, &t) in tokens.iter().enumerate() {
                    assert_eq!(&got[i * inp..(i + 1) * inp], &host_w[t as usize * inp..(t as usize + 1) * inp], "{ty:?} embed row {t}");
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
    let mut logits: Vec<f32> = words(5, rows * vocab).iter().map(|&v| (v % 8000) as f32 / 1000.0 - 4.0).collect();
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
        let sel_stride = if top_k < vocab { top_k } else if s.top_p < 1.0 { vocab } else { 1 };
        let su = gpu.uniform(
            "sampling",
            &[s.seed as u32, (s.seed >> 32) as u32, s.temperature.to_bits(), top_k as u32, s.top_p.to_bits(), vocab as u32, sel_stride as u32, 0],
        );
        let sel = gpu.storage("sel", (rows * sel_stride * 4) as u64).expect("sel");
        for generation in 0..6u32 {
            let step = step_uniform(&gpu, rows as u32, rows as u32, vocab as u32, generation);
            let mut enc = gpu.encoder();
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                gpu.dispatch(&mut pass, &gpu.pipelines.sample, &[(0, &step), (1, &su), (2, &lb), (3, &ids), (4, &tokens), (5, &sel)], rows as u32);
            }
            let bytes = pollster::block_on(gpu.read_back(enc, &tokens, (rows * 4) as u64)).expect("read back");
            for r in 0..rows {
                let got = u32::from_le_bytes([bytes[4 * r], bytes[4 * r + 1], bytes[4 * r + 2], bytes[4 * r + 3]]);
                let want = specrej_core::sampling::sample(&logits[r * vocab..(r + 1) * vocab], &s, row_ids[r], generation);
                assert_eq!(got, want, "{s:?} row {r} position {generation}");
            }
        }
    }
}
