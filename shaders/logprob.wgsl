// Reward reductions over rows of logits, so scorers read back one f32 per row:
// `nll`: -log softmax(logits[i])[target[i]] (one workgroup per row);
// `margin`: logits[i, yes] - logits[i, no] (one invocation per row).

struct Reduce {
    rows: u32,  // rows of logits
    vocab: u32, // logits per row
    yes: u32,   // margin: the token whose logit counts positively
    no: u32,    // margin: the token whose logit counts negatively
}

@group(0) @binding(0) var<uniform> params: Reduce;
@group(0) @binding(1) var<storage, read> logits: array<f32>;      // [rows, vocab] f32
@group(0) @binding(2) var<storage, read> targets: array<u32>;     // nll: [rows] token ids
@group(0) @binding(3) var<storage, read_write> out: array<f32>;   // [rows] f32

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn nll(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x + wid.y * nwg.x;
    if i >= params.rows {
        return;
    }
    let base = i * params.vocab;
    var mx = -3.0e38;
    for (var j = lid; j < params.vocab; j += WG) {
        mx = max(mx, logits[base + j]);
    }
    red[lid] = mx;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            red[lid] = max(red[lid], red[lid + k]);
        }
        workgroupBarrier();
    }
    let top = red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var j = lid; j < params.vocab; j += WG) {
        s += exp(logits[base + j] - top);
    }
    red[lid] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        out[i] = top + log(red[0]) - logits[base + min(targets[i], params.vocab - 1u)];
    }
}

@compute @workgroup_size(64)
fn margin(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= params.rows {
        return;
    }
    out[i] = logits[i * params.vocab + params.yes] - logits[i * params.vocab + params.no];
}
