//! Every shader in `shaders/` parses and validates with naga, in every variant, and each is
//! referenced by the crate exactly once. No GPU needed.

use std::collections::BTreeSet;
use std::path::Path;

use specrej_wgpu::shaders::{self, Variant};

fn validate(name: &str, source: &str, variant: Variant) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name} ({variant:?}) does not parse:\n{}", e.emit_to_string(source)));
    // unpack2x16float (f16 block scales read as f32) is core WebGPU; naga files it under a
    // capability because some GL targets lack it.
    let base = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    let mut caps = base;
    if variant.subgroups {
        caps |= naga::valid::Capabilities::SUBGROUP;
    }
    let stages = if variant.subgroups { naga::valid::SubgroupOperationSet::all() } else { naga::valid::SubgroupOperationSet::empty() };
    let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
    validator.subgroup_stages(naga::valid::ShaderStages::COMPUTE).subgroup_operations(stages);
    if let Err(e) = validator.validate(&module) {
        panic!("{name} ({variant:?}) does not validate:\n{}", e.emit_to_string(source));
    }
}

#[test]
fn every_shader_and_variant_validates() {
    for &(name, source) in shaders::ALL {
        for variant in Variant::ALL {
            let text = shaders::preprocess(source, variant, false);
            validate(name, &text, variant);
        }
    }
}

#[test]
fn the_portable_variant_is_the_file_on_disk() {
    for &(name, source) in shaders::ALL {
        let text = shaders::preprocess(source, Variant::default(), false);
        assert_eq!(text.trim_end(), source.trim_end(), "{name}");
        // The portable variant must not use subgroup builtins anywhere.
        let code = |l: &str| l.split("//").next().unwrap_or("").to_string();
        assert!(!text.lines().any(|l| code(l).contains("subgroup") || code(l).contains("f16;")), "{name}");
    }
}

#[test]
fn every_file_is_referenced_once() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    let listed: Vec<&str> = shaders::ALL.iter().map(|(n, _)| *n).collect();
    let listed_set: BTreeSet<String> = listed.iter().map(|s| s.to_string()).collect();
    assert_eq!(listed.len(), listed_set.len(), "a shader is listed twice");
    assert_eq!(on_disk, listed_set, "shaders/ and shaders.rs disagree");
    // Exactly one include_str! per file in the crate's sources.
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/shaders.rs")).expect("shaders.rs");
    for name in &listed {
        let needle = format!("include_str!(\"../../../shaders/{name}\")");
        assert_eq!(src.matches(&needle).count(), 1, "{name}");
    }
}

#[test]
fn the_browser_variant_enables_subgroups() {
    let text = shaders::preprocess(shaders::MATMUL, Variant { subgroups: true }, true);
    assert!(text.starts_with("enable subgroups;\n"));
    let text = shaders::preprocess(shaders::SILU_MUL, Variant { subgroups: true }, true);
    assert!(!text.contains("enable"));
}
