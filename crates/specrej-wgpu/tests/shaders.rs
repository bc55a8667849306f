//! Every shader in `shaders/` parses and validates with naga, in every variant, and each is
//! referenced by the crate exactly once. No GPU needed.

use std::collections::BTreeSet;
use std::path::Path;

use specrej_wgpu::shaders::{self, Variant};

fn validate(name: &str, source: &str, variant: Variant) {
    let module = naga::front::wgsl::parse_str(source).unwrap_or_else(|e| {
        panic!("{name} ({variant:?}) does not parse:\n{}", e.emit_to_string(source))
    });
    // unpack2x16float (f16 block scales read as f32) is core WebGPU; naga files it under a
    // capability because some GL targets lack it.
    let base = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    let mut caps = base;
    if variant.subgroups {
        caps |= naga::valid::Capabilities::SUBGROUP;
    }
    if variant.f16_kv {
        caps |= naga::valid::Capabilities::SHADER_FLOAT16;
    }
    let stages = if variant.subgroups {
        naga::valid::SubgroupOperationSet::all()
    } else {
        naga::valid::SubgroupOperationSet::empty()
    };
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
        // The portable variant must not use subgroup builtins or f16 anywhere.
        let code = |l: &str| l.split("//").next().unwrap_or("").to_string();
        assert!(
            !text.lines().any(|l| code(l).contains("subgroup") || code(l).contains("f16;")),
            "{name}"
        );
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
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/shaders.rs"))
        .expect("shaders.rs");
    for name in &listed {
        let needle = format!("include_str!(\"../../../shaders/{name}\")");
        assert_eq!(src.matches(&needle).count(), 1, "{name}");
    }
}

#[test]
fn the_browser_variant_enables_subgroups() {
    let sg = Variant { subgroups: true, f16_kv: false };
    let text = shaders::preprocess(shaders::MATMUL, sg, true);
    assert!(text.starts_with("enable subgroups;\n"));
    let text = shaders::preprocess(shaders::SILU_MUL, sg, true);
    assert!(!text.contains("enable"));
}

#[test]
fn the_f16_variant_stores_only_the_kv_cache_as_f16() {
    let f16 = Variant { subgroups: false, f16_kv: true };
    // The cache's writer and reader switch their element type; the gather copies words.
    for source in [shaders::KV_APPEND, shaders::ATTENTION] {
        let text = shaders::preprocess(source, f16, false);
        assert!(text.starts_with("enable f16;\n"), "{text}");
        assert!(text.contains("\nalias kv_t = f16;\n") && !text.contains("alias kv_t = f32"));
        let both = shaders::preprocess(source, Variant { subgroups: true, f16_kv: true }, true);
        assert!(both.starts_with("enable f16;\n"));
    }
    // Every other file is unchanged: no f16 arithmetic anywhere else.
    for &(name, source) in shaders::ALL {
        if !shaders::has_marker(source, "f16kv") {
            assert_eq!(
                shaders::preprocess(source, f16, false),
                shaders::preprocess(source, Variant::default(), false),
                "{name}"
            );
        }
    }
    assert_eq!(f16.kv_elem_bytes(), 2);
    assert_eq!(Variant::default().kv_elem_bytes(), 4);
}

/// WGSL has no includes, so every kernel declares the `Step` uniform itself (each file stays
/// valid on its own). The copies must agree with each other and with the eight words
/// `StepParams` writes (`src/model.rs`), member for member, at the same offsets.
#[test]
fn every_step_uniform_has_the_layout_the_host_writes() {
    const STEP: [&str; 8] = ["n", "rows", "t", "pos", "cap", "m", "logit_stride", "gen"];
    let mut seen = 0;
    for &(name, source) in shaders::ALL {
        let module = naga::front::wgsl::parse_str(source).expect("parses (checked above)");
        let Some((_, ty)) = module.types.iter().find(|(_, ty)| ty.name.as_deref() == Some("Step"))
        else {
            continue;
        };
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{name}: Step is not a struct")
        };
        let layout: Vec<(&str, u32)> =
            members.iter().map(|m| (m.name.as_deref().unwrap_or(""), m.offset)).collect();
        let want: Vec<(&str, u32)> =
            STEP.iter().zip((0..).step_by(4)).map(|(&n, o)| (n, o)).collect();
        assert_eq!(layout, want, "{name}: struct Step");
        assert_eq!(*span, 32, "{name}: struct Step is 8 words");
        for m in members {
            let inner = &module.types[m.ty].inner;
            assert!(
                matches!(inner, naga::TypeInner::Scalar(s) if *s == naga::Scalar::U32),
                "{name}: Step.{:?} is not u32",
                m.name
            );
        }
        seen += 1;
    }
    let declared =
        shaders::ALL.iter().filter(|(_, source)| source.contains("struct Step {")).count();
    assert!(seen == declared && seen >= 7, "{seen} of the {declared} declarations of Step checked");
}
