// On-device sampling, one workgroup per row: the same algorithm and the same keyed noise as
// specrej_core::sampling::sample. Greedy (argmax, lowest id on ties) when temperature <= 0;
// otherwise scale by 1/T, keep the top_k best (ties by lower id), keep the smallest prefix
// whose probability reaches top_p, and pick the kept token with the largest
// logit/T + gumbel(key, token), key = row_key(seed, row id, tokens generated so far).
// The hash is bit-exact with the host's; ln() may differ from the host's in the last ulp.

struct Step {
    n: u32,            // activation rows in the trunk: rows * t
    rows: u32,         // cache rows (one sampled token each)
    t: u32,            // new positions per row
    pos: u32,          // cached positions before this pass
    cap: u32,          // allocated positions per cache row
    m: u32,            // rows through the output head
    logit_stride: u32, // elements between rows of logits (0: every row reads row 0)
    gen: u32,          // tokens each row generated so far (the noise position)
}

struct Sampling {
    seed_lo: u32,     // low 32 bits of the seed
    seed_hi: u32,     // high 32 bits of the seed
    temperature: f32, // <= 0: greedy
    top_k: u32,       // effective k in 1..=vocab
    top_p: f32,       // >= 1: no nucleus cut
    vocab: u32,       // logits per row
    sel_stride: u32,  // u32s of scratch per row in `sel`
    pad: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> smp: Sampling;
@group(0) @binding(2) var<storage, read> logits: array<f32>;        // [rows or 1, vocab] f32
@group(0) @binding(3) var<storage, read> row_ids: array<u32>;       // [rows] original row ids
@group(0) @binding(4) var<storage, read_write> tokens: array<u32>;  // [rows] sampled token ids
@group(0) @binding(5) var<storage, read_write> sel: array<u32>;     // [rows, sel_stride] scratch: candidates in order

const WG: u32 = 256u;

var<workgroup> rv: array<f32, 256>;
var<workgroup> ri: array<u32, 256>;
var<workgroup> shared_count: u32;

fn pcg_hash(input: u32) -> u32 {
    let state = input * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn row_key(row: u32, position: u32) -> u32 {
    var h = pcg_hash(smp.seed_lo);
    h = pcg_hash(h ^ smp.seed_hi);
    h = pcg_hash(h ^ row);
    return pcg_hash(h ^ position);
}

fn gumbel(key: u32, token: u32) -> f32 {
    let bits = pcg_hash(key ^ pcg_hash(token)) >> 8u;
    let u = (f32(bits) + 0.5) / 16777216.0;
    return -log(-log(u));
}

struct Best {
    v: f32,
    i: u32,
}

// a ranks before b: larger value, then lower id. NaN never ranks first.
fn before(a: Best, b: Best) -> bool {
    return a.v > b.v || (a.v == b.v && a.i < b.i);
}

fn neg_inf() -> f32 {
    // From a runtime value: Chromium (Tint) rejects -inf as a constant expression.
    var bits = 0xff800000u;
    return bitcast<f32>(bits);
}

// The best of every invocation's candidate; all invocations must call it.
fn reduce_best(lid: u32, mine: Best) -> Best {
    rv[lid] = mine.v;
    ri[lid] = mine.i;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            let other = Best(rv[lid + k], ri[lid + k]);
            if before(other, Best(rv[lid], ri[lid])) {
                rv[lid] = other.v;
                ri[lid] = other.i;
            }
        }
        workgroupBarrier();
    }
    let best = Best(rv[0], ri[0]);
    workgroupBarrier();
    return best;
}

fn reduce_sum(lid: u32, mine: f32) -> f32 {
    rv[lid] = mine;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            rv[lid] += rv[lid + k];
        }
        workgroupBarrier();
    }
    let total = rv[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    if row >= step.rows {
        return;
    }
    let base = row * step.logit_stride;
    let vocab = smp.vocab;
    let greedy = smp.temperature <= 0.0 || vocab <= 1u;
    let inv_t = select(1.0 / smp.temperature, 1.0, greedy);
    let key = row_key(row_ids[row], step.gen);

    // Greedy, or no truncation: one arg-max pass.
    if greedy || (smp.top_k >= vocab && smp.top_p >= 1.0) {
        var mine = Best(neg_inf(), 0xffffffffu);
        for (var i = lid; i < vocab; i += WG) {
            var v = logits[base + i];
            if !greedy {
                v = v * inv_t + gumbel(key, i);
            }
            if before(Best(v, i), mine) {
                mine = Best(v, i);
            }
        }
        let best = reduce_best(lid, mine);
        if lid == 0u {
            tokens[row] = select(best.i, 0u, best.i >= vocab);
        }
        return;
    }

    // Candidates in rank order (logit descending, id ascending), one arg-max pass each,
    // until top_k are taken or (top_k = vocab) the nucleus mass is reached.
    let top_k = min(smp.top_k, vocab);
    let sel_base = row * smp.sel_stride;
    let nucleus_only = top_k >= vocab;
    var total = 0.0;
    var head = 0.0;
    if nucleus_only {
        // The top logit scaled (the softmax's shift), then the total weight over the vocabulary.
        var mine = Best(neg_inf(), 0xffffffffu);
        for (var i = lid; i < vocab; i += WG) {
            if before(Best(logits[base + i], i), mine) {
                mine = Best(logits[base + i], i);
            }
        }
        head = reduce_best(lid, mine).v * inv_t;
        var part = 0.0;
        for (var i = lid; i < vocab; i += WG) {
            part += exp(logits[base + i] * inv_t - head);
        }
        total = reduce_sum(lid, part);
    }
    var prev = Best(0.0, 0u);
    var taken = 0u;
    var mass = 0.0;
    if lid == 0u {
        shared_count = 0u;
    }
    loop {
        var mine = Best(neg_inf(), 0xffffffffu);
        for (var i = lid; i < vocab; i += WG) {
            let cand = Best(logits[base + i], i);
            if (taken == 0u || before(prev, cand)) && before(cand, mine) {
                mine = cand;
            }
        }
        let best = reduce_best(lid, mine);
        prev = best;
        if lid == 0u {
            sel[sel_base + taken] = best.i;
            if nucleus_only {
                mass += exp(best.v * inv_t - head) / total;
                if mass >= smp.top_p {
                    shared_count = taken + 1u;
                }
            }
        }
        taken += 1u;
        if !nucleus_only && taken >= top_k {
            break;
        }
        let done = workgroupUniformLoad(&shared_count);
        if done != 0u || taken >= vocab {
            break;
        }
    }
    if lid != 0u {
        return;
    }
    var kept = taken;
    if !nucleus_only && smp.top_p < 1.0 {
        let first = logits[base + sel[sel_base]] * inv_t;
        var sum = 0.0;
        for (var r = 0u; r < taken; r++) {
            sum += exp(logits[base + sel[sel_base + r]] * inv_t - first);
        }
        var acc = 0.0;
        kept = 0u;
        for (var r = 0u; r < taken; r++) {
            acc += exp(logits[base + sel[sel_base + r]] * inv_t - first) / sum;
            kept += 1u;
            if acc >= smp.top_p {
                break;
            }
        }
    }
    var best = sel[sel_base];
    var best_v = neg_inf();
    for (var r = 0u; r < max(kept, 1u); r++) {
        let tok = sel[sel_base + r];
        let v = logits[base + tok] * inv_t + gumbel(key, tok);
        if v > best_v {
            best = tok;
            best_v = v;
        }
    }
    tokens[row] = best;
}
