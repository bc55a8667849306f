// Attention of this pass's queries over the dense per-row K/V cache, with a causal mask:
// activation row i = r * t + s (cache row r, position pos + s) attends to positions
// 0..=pos+s of cache row r. Decode is t = 1; prefill and scoring passes have t > 1.
// Grouped-query: query head h reads kv head h / (heads / kv_heads).
//
// One workgroup per (row, head). Keys are visited in chunks of 64 positions with a running
// max and sum (online softmax), so no score buffer is needed at any length.
//
// The cache element type kv_t is f32 here and f16 in the f16kv variant (adapters with
// shader-f16); cached keys and values are widened to f32, and all arithmetic is f32.

alias kv_t = f32; //-f16kv
//+f16kv alias kv_t = f16;

struct Step {
    n: u32,            // activation rows in the trunk: rows * t
    rows: u32,         // cache rows
    t: u32,            // new positions per row
    pos: u32,          // cached positions before this pass
    cap: u32,          // allocated positions per cache row
    m: u32,            // rows through the output head
    logit_stride: u32, // sampling: elements between rows of logits
    gen: u32,          // sampling: tokens each row generated so far
}

struct Attn {
    heads: u32,    // query heads
    kv_heads: u32, // key/value heads
    head_dim: u32, // width of a head (a multiple of 4, at most 256)
    scale: f32,    // 1 / sqrt(head_dim)
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> attn: Attn;
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;        // [n, heads, head_dim] f32
@group(0) @binding(3) var<storage, read> cache_k: array<vec4<kv_t>>; // [rows, cap, kv_heads, head_dim] f32|f16
@group(0) @binding(4) var<storage, read> cache_v: array<kv_t>;       // [rows, cap, kv_heads, head_dim] f32|f16
@group(0) @binding(5) var<storage, read_write> out: array<f32>;      // [n, heads, head_dim] f32

const WG: u32 = 64u;
const NEG: f32 = -3.0e38;
var<workgroup> sc: array<f32, 64>;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn attention(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let item = wid.x + wid.y * nwg.x;
    if item >= step.n * attn.heads {
        return;
    }
    let i = item / attn.heads;
    let h = item % attn.heads;
    let r = i / step.t;
    let len = step.pos + i % step.t + 1u;
    let g = h / (attn.heads / attn.kv_heads);
    let hd = attn.head_dim;
    let hd4 = hd / 4u;
    let width = attn.kv_heads * hd;
    let q_base = (i * attn.heads + h) * hd4;

    var run_max = NEG;
    var run_sum = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0); // dims lid, lid + 64, lid + 128, lid + 192
    for (var c0 = 0u; c0 < len; c0 += WG) {
        let j = c0 + lid;
        var score = NEG;
        if j < len {
            let k_base = ((r * step.cap + j) * attn.kv_heads + g) * hd4;
            var d = 0.0;
            for (var e = 0u; e < hd4; e++) {
                d += dot(q[q_base + e], vec4<f32>(cache_k[k_base + e]));
            }
            score = d * attn.scale;
        }
        red[lid] = score;
        workgroupBarrier();
        for (var k = WG / 2u; k > 0u; k >>= 1u) {
            if lid < k {
                red[lid] = max(red[lid], red[lid + k]);
            }
            workgroupBarrier();
        }
        let new_max = max(run_max, red[0]);
        workgroupBarrier();
        var p = 0.0;
        if j < len {
            p = exp(score - new_max);
        }
        sc[lid] = p;
        red[lid] = p;
        workgroupBarrier();
        for (var k = WG / 2u; k > 0u; k >>= 1u) {
            if lid < k {
                red[lid] += red[lid + k];
            }
            workgroupBarrier();
        }
        let correction = exp(run_max - new_max);
        run_sum = run_sum * correction + red[0];
        let count = min(WG, len - c0);
        for (var c = 0u; c < 4u; c++) {
            let d = lid + c * WG;
            if d < hd {
                var a = acc[c] * correction;
                for (var jj = 0u; jj < count; jj++) {
                    a += sc[jj] * f32(cache_v[(r * step.cap + c0 + jj) * width + g * hd + d]);
                }
                acc[c] = a;
            }
        }
        run_max = new_max;
        workgroupBarrier();
    }
    let inv = 1.0 / run_sum;
    for (var c = 0u; c < 4u; c++) {
        let d = lid + c * WG;
        if d < hd {
            out[(i * attn.heads + h) * hd + d] = acc[c] * inv;
        }
    }
}
