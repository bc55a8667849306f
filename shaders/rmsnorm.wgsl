// RMSNorm of activation rows: y[i] = x[src(i)] / sqrt(mean(x[src(i)]²) + eps) * weight.
// One workgroup per output row. With `indexed`, output row i reads input row src[i]
// (the output head picks each sequence's last position); otherwise src(i) = i.
//
// Variants: lines starting with `//+subgroups ` are uncommented and lines ending in
// `//-subgroups` dropped when the adapter offers subgroups.

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

struct Norm {
    dim: u32,     // width of a row
    indexed: u32, // 1: output rows are step.m rows picked by src; 0: step.n rows, in place order
    eps: f32,     // added to the mean square
    pad: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> norm: Norm;
@group(0) @binding(2) var<storage, read> x: array<f32>;         // [*, dim] f32
@group(0) @binding(3) var<storage, read> weight: array<f32>;    // [dim] f32
@group(0) @binding(4) var<storage, read> src: array<u32>;       // [m] input row of each output row
@group(0) @binding(5) var<storage, read_write> y: array<f32>;   // [n or m, dim] f32

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn rmsnorm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
//+subgroups     @builtin(subgroup_invocation_id) sg_lane: u32,
) {
    let i = wid.x + wid.y * nwg.x;
    let count = select(step.n, step.m, norm.indexed != 0u);
    if i >= count {
        return;
    }
    var s = i;
    if norm.indexed != 0u {
        s = src[i];
    }
    let base = s * norm.dim;
    var acc = 0.0;
    for (var d = lid; d < norm.dim; d += WG) {
        let v = x[base + d];
        acc += v * v;
    }
    red[lid] = acc; //-subgroups
//+subgroups     let total = subgroupAdd(acc);
//+subgroups     red[lid] = select(0.0, total, sg_lane == 0u);
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    let scale = sqrt(red[0] / f32(norm.dim) + norm.eps);
    let out = i * norm.dim;
    for (var d = lid; d < norm.dim; d += WG) {
        y[out + d] = x[base + d] / scale * weight[d];
    }
}
