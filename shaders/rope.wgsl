// Rotary position embedding, in place on this pass's queries and keys.
// Row i of the pass sits at position step.pos + i % step.t. `interleaved` rotates pairs
// (2j, 2j+1) (llama.cpp's GGUF layout); otherwise (j, j + head_dim/2) (Hugging Face's).
// cos/sin come from a host-computed table so every backend rotates by the same numbers.

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

struct Rope {
    heads: u32,       // query heads
    kv_heads: u32,    // key heads
    head_dim: u32,    // width of a head
    interleaved: u32, // 1: pairs (2j, 2j+1); 0: pairs (j, j + head_dim/2)
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> rope: Rope;
@group(0) @binding(2) var<storage, read> table: array<vec2<f32>>; // [context, head_dim/2] (cos, sin)
@group(0) @binding(3) var<storage, read_write> q: array<f32>;     // [n, heads, head_dim] f32
@group(0) @binding(4) var<storage, read_write> k: array<f32>;     // [n, kv_heads, head_dim] f32

@compute @workgroup_size(64)
fn rope_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let half = rope.head_dim / 2u;
    let per_row = (rope.heads + rope.kv_heads) * half;
    if idx >= step.n * per_row {
        return;
    }
    let i = idx / per_row;
    let rest = idx % per_row;
    let head = rest / half;
    let j = rest % half;
    let cs = table[(step.pos + i % step.t) * half + j];
    var a = j;
    var b = j + half;
    if rope.interleaved != 0u {
        a = 2u * j;
        b = 2u * j + 1u;
    }
    if head < rope.heads {
        let base = (i * rope.heads + head) * rope.head_dim;
        let x0 = q[base + a];
        let x1 = q[base + b];
        q[base + a] = x0 * cs.x - x1 * cs.y;
        q[base + b] = x0 * cs.y + x1 * cs.x;
    } else {
        let base = (i * rope.kv_heads + head - rope.heads) * rope.head_dim;
        let x0 = k[base + a];
        let x1 = k[base + b];
        k[base + a] = x0 * cs.x - x1 * cs.y;
        k[base + b] = x0 * cs.y + x1 * cs.x;
    }
}
