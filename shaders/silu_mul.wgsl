// SwiGLU: g = silu(g) * u, elementwise over [n, ffn].

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
    width: u32, // ffn
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> ffn: Width;
@group(0) @binding(2) var<storage, read_write> g: array<f32>; // [n, ffn] f32: gate in, activation out
@group(0) @binding(3) var<storage, read> u: array<f32>;       // [n, ffn] f32: up

@compute @workgroup_size(64)
fn silu_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    if idx >= step.n * ffn.width {
        return;
    }
    let a = g[idx];
    g[idx] = a / (1.0 + exp(-a)) * u[idx];
}
