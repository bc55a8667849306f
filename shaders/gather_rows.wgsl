// Row gather of a K/V cache buffer: dst row j, positions 0..len = src row keep[j], same
// positions. Used to fan a prefilled row out, to keep the rows `retain` chose, and to move
// rows into a larger allocation (and for the logits `retain` keeps). Source and destination
// may differ in their capacity.
//
// A bit copy of 32-bit words, whatever the element type: width counts words per position,
// so an f16 cache (the f16kv variant) is copied as pairs of halves. kv_heads * head_dim is a
// multiple of 4, so a position always holds a whole number of words.

struct Gather {
    rows: u32,      // destination rows
    len: u32,       // positions copied per row
    width: u32,     // 32-bit words per position (kv_heads * head_dim * bytes per element / 4)
    src_cap: u32,   // allocated positions per source row
    dst_cap: u32,   // allocated positions per destination row
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> gather: Gather;
@group(0) @binding(1) var<storage, read> keep: array<u32>;           // [rows] source row of each destination row
@group(0) @binding(2) var<storage, read> src: array<u32>;            // [src_rows, src_cap, width] u32 (f32, or 2 × f16)
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;      // [rows, dst_cap, width] u32 (f32, or 2 × f16)

@compute @workgroup_size(64)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let per_row = gather.len * gather.width;
    if idx >= gather.rows * per_row {
        return;
    }
    let j = idx / per_row;
    let e = idx % per_row;
    dst[j * gather.dst_cap * gather.width + e] = src[keep[j] * gather.src_cap * gather.width + e];
}
