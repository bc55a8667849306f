// Quantized matrix product y = x · Wᵀ (optionally y += x · Wᵀ), and the embedding lookup.
//
// W is read straight from the GGUF bytes: row-major [out, in], each row a run of 32-element
// blocks of type F32 (0), F16 (1), Q4_0 (2), Q4_1 (3) or Q8_0 (8) (GGML's block layouts),
// dequantized here. A workgroup computes one output feature for every activation row,
// TILE rows per pass over the weight row, so each weight is read once per TILE rows.
//
// Variants (text preprocessing at load, see specrej-wgpu's shaders.rs): lines starting with
// `//+subgroups ` are uncommented and lines ending in `//-subgroups` are dropped when the
// adapter offers subgroups. The file as it is on disk is the portable fallback. (f16 block
// scales are read with unpack2x16float, core WGSL: no shader-f16 needed.)

struct Step {
    n: u32,            // activation rows in the trunk: rows * t
    rows: u32,         // cache rows
    t: u32,            // new positions per row
    pos: u32,          // cached positions before this pass
    cap: u32,          // allocated positions per cache row
    m: u32,            // rows through the output head (final norm, logits, sampling)
    logit_stride: u32, // sampling: elements between rows of logits (0: every row reads row 0)
    gen: u32,          // sampling: tokens each row generated so far (the noise position)
}

struct Weight {
    out_dim: u32, // rows of W
    in_dim: u32,  // columns of W (a multiple of 32)
    wtype: u32,   // 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0
    flags: u32,   // bit 0: accumulate into y; bit 1: the head (step.m rows, not step.n); bit 2: add bias
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> wt: Weight;
@group(0) @binding(2) var<storage, read> w: array<u32>;             // [out, in] GGML blocks, 4-byte padded
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;       // [n, in] f32
@group(0) @binding(4) var<storage, read_write> y: array<f32>;       // [n, out] f32
@group(0) @binding(5) var<storage, read> tokens: array<u32>;        // embed: [n] token ids
@group(0) @binding(6) var<storage, read_write> emb: array<vec4<f32>>; // embed: [n, in] f32
@group(0) @binding(7) var<storage, read> bias: array<f32>;          // [out] f32 (read when flags bit 2)

const WG: u32 = 64u;
const TILE: u32 = 8u;

var<workgroup> partial: array<f32, 512>; // [TILE, WG]

// Bytes of one 32-element block.
fn block_bytes(t: u32) -> u32 {
    switch t {
        case 0u: { return 128u; }
        case 1u: { return 64u; }
        case 2u: { return 18u; }
        case 3u: { return 20u; }
        default: { return 34u; }
    }
}

// Four bytes at any even byte offset (blocks of 18 and 34 bytes leave words unaligned).
fn read_u32(byte: u32) -> u32 {
    let i = byte >> 2u;
    let s = (byte & 3u) * 8u;
    if s == 0u {
        return w[i];
    }
    return (w[i] >> s) | (w[i + 1u] << (32u - s));
}

// The f16 at an even byte offset, as f32.
fn read_f16(byte: u32) -> f32 {
    let word = w[byte >> 2u];
    let half = select(word & 0xffffu, word >> 16u, (byte & 2u) != 0u);
    return unpack2x16float(half).x;
}

fn nibbles(q: u32, shift: u32) -> vec4<f32> {
    return vec4<f32>(
        f32((q >> shift) & 0xfu),
        f32((q >> (shift + 8u)) & 0xfu),
        f32((q >> (shift + 16u)) & 0xfu),
        f32((q >> (shift + 24u)) & 0xfu),
    );
}

fn bytes_i8(q: u32) -> vec4<f32> {
    let v = bitcast<vec4<i32>>(vec4<u32>(q << 24u, q << 16u, q << 8u, q)) >> vec4<u32>(24u);
    return vec4<f32>(v);
}

// Unit `p` (0..4) of the block at byte `base`: elements 4p..4p+3 and 16+4p..16+4p+3.
struct Unit {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn dequant(t: u32, base: u32, p: u32) -> Unit {
    switch t {
        case 0u: {
            let i = base / 4u + 4u * p;
            let lo = vec4<f32>(bitcast<f32>(w[i]), bitcast<f32>(w[i + 1u]), bitcast<f32>(w[i + 2u]), bitcast<f32>(w[i + 3u]));
            let j = i + 16u;
            let hi = vec4<f32>(bitcast<f32>(w[j]), bitcast<f32>(w[j + 1u]), bitcast<f32>(w[j + 2u]), bitcast<f32>(w[j + 3u]));
            return Unit(lo, hi);
        }
        case 1u: {
            let i = base / 4u + 2u * p;
            let lo = vec4<f32>(unpack2x16float(w[i]), unpack2x16float(w[i + 1u]));
            let hi = vec4<f32>(unpack2x16float(w[i + 8u]), unpack2x16float(w[i + 9u]));
            return Unit(lo, hi);
        }
        case 2u: {
            let d = read_f16(base);
            let q = read_u32(base + 2u + 4u * p);
            return Unit((nibbles(q, 0u) - 8.0) * d, (nibbles(q, 4u) - 8.0) * d);
        }
        case 3u: {
            let d = read_f16(base);
            let m = read_f16(base + 2u);
            let q = w[(base + 4u) / 4u + p];
            return Unit(nibbles(q, 0u) * d + m, nibbles(q, 4u) * d + m);
        }
        default: {
            let d = read_f16(base);
            let lo = read_u32(base + 2u + 4u * p);
            let hi = read_u32(base + 18u + 4u * p);
            return Unit(bytes_i8(lo) * d, bytes_i8(hi) * d);
        }
    }
}

@compute @workgroup_size(64)
fn matmul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
//+subgroups     @builtin(subgroup_invocation_id) sg_lane: u32,
) {
    let o = wid.x + wid.y * nwg.x;
    if o >= wt.out_dim {
        return;
    }
    let n = select(step.n, step.m, (wt.flags & 2u) != 0u);
    let accumulate = (wt.flags & 1u) != 0u;
    let units = wt.in_dim / 8u;
    let bb = block_bytes(wt.wtype);
    let row = o * (wt.in_dim / 32u) * bb;
    let x_row = wt.in_dim / 4u;
    for (var r0 = 0u; r0 < n; r0 += TILE) {
        // Zeroed by stores, every tile: Chromium's WGSL compiler (Tint, seen on SwiftShader)
        // zeroes a loop-local `var` without initializer once, not at each iteration.
        var acc: array<f32, 8>;
        for (var j = 0u; j < TILE; j++) {
            acc[j] = 0.0;
        }
        for (var u = lid; u < units; u += WG) {
            let b = u / 4u;
            let p = u % 4u;
            let q = dequant(wt.wtype, row + b * bb, p);
            let xi = b * 8u + p;
            for (var j = 0u; j < TILE; j++) {
                let r = r0 + j;
                if r < n {
                    let xb = r * x_row + xi;
                    acc[j] += dot(q.lo, x[xb]) + dot(q.hi, x[xb + 4u]);
                }
            }
        }
        for (var j = 0u; j < TILE; j++) { //-subgroups
            partial[j * WG + lid] = acc[j]; //-subgroups
        } //-subgroups
        workgroupBarrier(); //-subgroups
        for (var s = WG / 2u; s > 0u; s >>= 1u) { //-subgroups
            if lid < s { //-subgroups
                for (var j = 0u; j < TILE; j++) { //-subgroups
                    partial[j * WG + lid] += partial[j * WG + lid + s]; //-subgroups
                } //-subgroups
            } //-subgroups
            workgroupBarrier(); //-subgroups
        } //-subgroups
//+subgroups         // Lane 0 of each subgroup holds its sum; no assumption on how lanes map to `lid`.
//+subgroups         for (var j = 0u; j < TILE; j++) {
//+subgroups             let total = subgroupAdd(acc[j]);
//+subgroups             partial[j * WG + lid] = select(0.0, total, sg_lane == 0u);
//+subgroups         }
//+subgroups         workgroupBarrier();
//+subgroups         if lid < TILE {
//+subgroups             var sum = 0.0;
//+subgroups             for (var g = 0u; g < WG; g++) {
//+subgroups                 sum += partial[lid * WG + g];
//+subgroups             }
//+subgroups             partial[lid * WG] = sum;
//+subgroups         }
//+subgroups         workgroupBarrier();
        if lid < TILE && r0 + lid < n {
            var v = partial[lid * WG];
            if (wt.flags & 4u) != 0u {
                v += bias[o];
            }
            let yi = (r0 + lid) * wt.out_dim + o;
            if accumulate {
                y[yi] += v;
            } else {
                y[yi] = v;
            }
        }
        workgroupBarrier();
    }
}

// Embedding lookup: emb[i] = dequantized row tokens[i] of the table W [vocab, in].
// One invocation per 8-element unit; dispatched over n * in / 8 invocations (2-D when large).
@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let units = wt.in_dim / 8u;
    if idx >= step.n * units {
        return;
    }
    let i = idx / units;
    let u = idx % units;
    let b = u / 4u;
    let p = u % 4u;
    let bb = block_bytes(wt.wtype);
    let token = min(tokens[i], wt.out_dim - 1u);
    let q = dequant(wt.wtype, token * (wt.in_dim / 32u) * bb + b * bb, p);
    let xb = i * (wt.in_dim / 4u) + b * 8u + p;
    emb[xb] = q.lo;
    emb[xb + 4u] = q.hi;
}

// The same product with one invocation per output feature and no workgroup memory or
// barriers: what CPU adapters (lavapipe, SwiftShader) run fastest, where barriers cost a
// context switch per invocation. Dispatched over out_dim invocations (2-D when large).
@compute @workgroup_size(64)
fn matmul_thread(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = gid.x + gid.y * nwg.x * 64u;
    if o >= wt.out_dim {
        return;
    }
    let n = select(step.n, step.m, (wt.flags & 2u) != 0u);
    let units = wt.in_dim / 8u;
    let bb = block_bytes(wt.wtype);
    let row = o * (wt.in_dim / 32u) * bb;
    let x_row = wt.in_dim / 4u;
    for (var r0 = 0u; r0 < n; r0 += TILE) {
        // Zeroed by stores, every tile: Chromium's WGSL compiler (Tint, seen on SwiftShader)
        // zeroes a loop-local `var` without initializer once, not at each iteration.
        var acc: array<f32, 8>;
        for (var j = 0u; j < TILE; j++) {
            acc[j] = 0.0;
        }
        for (var u = 0u; u < units; u++) {
            let b = u / 4u;
            let p = u % 4u;
            let q = dequant(wt.wtype, row + b * bb, p);
            let xi = b * 8u + p;
            for (var j = 0u; j < TILE; j++) {
                let r = r0 + j;
                if r < n {
                    let xb = r * x_row + xi;
                    acc[j] += dot(q.lo, x[xb]) + dot(q.hi, x[xb + 4u]);
                }
            }
        }
        for (var j = 0u; j < TILE; j++) {
            if r0 + j < n {
                var v = acc[j];
                if (wt.flags & 4u) != 0u {
                    v += bias[o];
                }
                let yi = (r0 + j) * wt.out_dim + o;
                if (wt.flags & 1u) != 0u {
                    y[yi] += v;
                } else {
                    y[yi] = v;
                }
            }
        }
    }
}
