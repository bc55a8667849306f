// Appends this pass's keys and values to the cache: activation row i = r * t + s goes to
// cache row r, position step.pos + s. The cache element type kv_t is f32 here and f16 in the
// f16kv variant (adapters with shader-f16): the f32 activations are rounded to it.

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

struct Width {
    width: u32, // kv_heads * head_dim
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> kv: Width;
@group(0) @binding(2) var<storage, read> k: array<f32>;               // [n, kv_heads * head_dim] f32
@group(0) @binding(3) var<storage, read> v: array<f32>;               // [n, kv_heads * head_dim] f32
@group(0) @binding(4) var<storage, read_write> cache_k: array<kv_t>;  // [rows, cap, kv_heads, head_dim] f32|f16
@group(0) @binding(5) var<storage, read_write> cache_v: array<kv_t>;  // [rows, cap, kv_heads, head_dim] f32|f16

@compute @workgroup_size(64)
fn kv_append(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    if idx >= step.n * kv.width {
        return;
    }
    let i = idx / kv.width;
    let e = idx % kv.width;
    let r = i / step.t;
    let s = i % step.t;
    let dst = (r * step.cap + step.pos + s) * kv.width + e;
    cache_k[dst] = kv_t(k[idx]);
    cache_v[dst] = kv_t(v[idx]);
}
