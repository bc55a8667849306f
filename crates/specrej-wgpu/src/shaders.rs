//! The WGSL sources, one `include_str!` per file of the top-level `shaders/` folder, and the
//! text preprocessing that makes their variants.
//!
//! The files live outside the crate because nothing is published (cargo#13309 would matter
//! otherwise). A file on disk is always valid WGSL and is the portable variant. Markers:
//! a line starting with `//+subgroups ` is uncommented, and a line ending in `//-subgroups`
//! is dropped, in the variant for adapters with subgroup operations; `//+f16kv ` and
//! `//-f16kv` likewise in the variant that stores the K/V cache as f16 (adapters with
//! `shader-f16`), which also gets `enable f16;` prepended. The f16 switch is one line per
//! file, `alias kv_t = f32; //-f16kv` / `//+f16kv alias kv_t = f16;`, and only the K/V cache
//! buffers are `kv_t`: arithmetic stays f32. No other templating.

/// Matrix products on quantized weights, and the embedding lookup (`matmul`, `embed`).
pub const MATMUL: &str = include_str!("../../../shaders/matmul.wgsl");
/// RMSNorm (`rmsnorm`).
pub const RMSNORM: &str = include_str!("../../../shaders/rmsnorm.wgsl");
/// Rotary embedding (`rope_main`).
pub const ROPE: &str = include_str!("../../../shaders/rope.wgsl");
/// K/V append (`kv_append`).
pub const KV_APPEND: &str = include_str!("../../../shaders/kv_append.wgsl");
/// Attention over the cache (`attention`).
pub const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
/// SwiGLU (`silu_mul`).
pub const SILU_MUL: &str = include_str!("../../../shaders/silu_mul.wgsl");
/// Row gather of cache buffers (`gather_rows`).
pub const GATHER_ROWS: &str = include_str!("../../../shaders/gather_rows.wgsl");
/// On-device sampling (`sample`).
pub const SAMPLE: &str = include_str!("../../../shaders/sample.wgsl");
/// Reward reductions (`nll`, `margin`).
pub const LOGPROB: &str = include_str!("../../../shaders/logprob.wgsl");

/// Every shader: (file name, source).
pub const ALL: &[(&str, &str)] = &[
    ("matmul.wgsl", MATMUL),
    ("rmsnorm.wgsl", RMSNORM),
    ("rope.wgsl", ROPE),
    ("kv_append.wgsl", KV_APPEND),
    ("attention.wgsl", ATTENTION),
    ("silu_mul.wgsl", SILU_MUL),
    ("gather_rows.wgsl", GATHER_ROWS),
    ("sample.wgsl", SAMPLE),
    ("logprob.wgsl", LOGPROB),
];

/// Which optional device features a variant uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Variant {
    /// Subgroup operations (`subgroupAdd`, `subgroup_invocation_id`): markers `//+subgroups `
    /// and `//-subgroups`.
    pub subgroups: bool,
    /// `shader-f16`: the K/V cache is stored as f16 (`kv_t = f16`; read into f32 for the
    /// arithmetic), markers `//+f16kv ` and `//-f16kv`, and `enable f16;` prepended.
    pub f16_kv: bool,
}

impl Variant {
    /// Every variant a shader may be built in (the naga test validates each).
    pub const ALL: [Variant; 4] = [
        Variant { subgroups: false, f16_kv: false },
        Variant { subgroups: true, f16_kv: false },
        Variant { subgroups: false, f16_kv: true },
        Variant { subgroups: true, f16_kv: true },
    ];

    /// The marker names this variant switches on.
    fn features(self) -> impl Iterator<Item = &'static str> {
        [("subgroups", self.subgroups), ("f16kv", self.f16_kv)]
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| n)
    }

    /// Bytes of one K/V cache element: 2 (f16) or 4 (f32).
    pub fn kv_elem_bytes(self) -> usize {
        if self.f16_kv { 2 } else { 4 }
    }
}

/// Whether `source` has lines that differ with `feature` (a marker name) on.
pub fn has_marker(source: &str, feature: &str) -> bool {
    let add = format!("//+{feature} ");
    let drop = format!("//-{feature}");
    source.lines().any(|l| l.starts_with(&add) || l.trim_end().ends_with(&drop))
}

/// The source of `variant`: marker lines applied, everything else unchanged.
///
/// `browser_directive`: prepend `enable subgroups;` to a subgroup variant. The browser's
/// WGSL compiler requires it; naga (native wgpu) rejects it and needs only the device feature.
/// An f16 variant of a file with `f16kv` markers always gets `enable f16;` (every WGSL
/// compiler, naga included, requires it before `f16` may be named).
pub fn preprocess(source: &str, variant: Variant, browser_directive: bool) -> String {
    let mut out = String::with_capacity(source.len() + 32);
    if variant.f16_kv && has_marker(source, "f16kv") {
        out.push_str("enable f16;\n");
    }
    if variant.subgroups && browser_directive && has_marker(source, "subgroups") {
        out.push_str("enable subgroups;\n");
    }
    'lines: for line in source.lines() {
        for feature in variant.features() {
            if line.trim_end().ends_with(&format!("//-{feature}")) {
                continue 'lines;
            }
            if let Some(rest) = line.strip_prefix(&format!("//+{feature} ")) {
                out.push_str(rest);
                out.push('\n');
                continue 'lines;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
