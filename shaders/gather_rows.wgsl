// Row gather of a K/V cache buffer: dst row j, positions 0..len = src row keep[j], same
// positions. Used to fan a prefilled row out, to keep the rows `retain` chose, and to move
// rows into a larger allocation. Source and destination may differ in their capacity.

struct Gather {
    rows: u32,      // destination rows
    len: u32,       // positions copied per row
    width: u32,     // elements per position (kv_heads * head_dim)
    src_cap: u32,   // allocated positions per source row
    dst_cap: u32,   // allocated positions per destination row
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> gather: Gather;
@group(0) @binding(1) var<storage, read> keep: array<u32>;           // [rows] source row of each destination row
@group(0) @binding(2) var<storage, read> src: array<f32>;            // [src_rows, src_cap, width] f32
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;      // [rows, dst_cap, width] f32

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
