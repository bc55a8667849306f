//! Loaders: GGUF and safetensors agree; bad files give the right errors.

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;

use super::*;
use crate::LoadError;
use crate::model::KvCache;

/// Logits `[t, vocab]` at every position of `tokens`, from one causal pass.
pub(crate) fn full_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(model, 1, tokens.len()).unwrap();
    let t = model.token_tensor(tokens.to_vec(), 1, tokens.len()).unwrap();
    let hidden = model.forward_hidden(&t, &mut cache).unwrap(); // [1, t, hidden]
    let logits = model.logits(&hidden.squeeze(0).unwrap()).unwrap();
    crate::model::to_host_rows(&logits).unwrap()
}

const TOKENS: [u32; 9] = [1, 5, 63, 20, 20, 7, 41, 2, 30];

#[test]
fn gguf_and_safetensors_agree() {
    for spec in [
        Tiny::default(),
        Tiny { arch: Architecture::Qwen2, ..Tiny::default() },
        Tiny { tied: true, seed: 3, ..Tiny::default() },
    ] {
        let (_d1, st) = tiny_safetensors(&spec, WeightFormat::F32);
        let (_d2, gg) = tiny_gguf(&spec, GgmlDType::F32, WeightFormat::F32);
        assert_eq!(st.config().vocab_size, spec.vocab);
        assert_eq!(gg.config().head_dim, spec.head_dim());
        assert_eq!(st.config().kv_heads, gg.config().kv_heads);
        assert_eq!(st.config().tied_embeddings, spec.tied);
        let a = full_logits(&st, &TOKENS);
        let b = full_logits(&gg, &TOKENS);
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-4, "{:?}: gguf vs safetensors logits differ by {diff}", spec.arch);
        // Same weights through Q8_0 on both sides: equal up to quantisation of the
        // permuted vs unpermuted rows (blocks run along the input dim, so identical).
        let (_d3, stq) = tiny_safetensors(&spec, WeightFormat::Q8_0);
        let (_d4, ggq) = tiny_gguf(&spec, GgmlDType::F32, WeightFormat::Q8_0);
        let diff = max_abs_diff(&full_logits(&stq, &TOKENS), &full_logits(&ggq, &TOKENS));
        assert!(diff < 1e-3, "{:?}: q8_0 gguf vs safetensors differ by {diff}", spec.arch);
        // And Q8_0 stays close to f32 (relative to the logits' range).
        let diff = max_abs_diff(&full_logits(&stq, &TOKENS), &a);
        let range = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(
            diff < 0.05 * range,
            "{:?}: q8_0 vs f32 differ by {diff} (logits up to {range})",
            spec.arch
        );
    }
}

#[test]
fn sharded_and_half_precision_safetensors_load() {
    let spec = Tiny::default();
    let (_d1, single) = tiny_safetensors(&spec, WeightFormat::F32);
    let dir = TempDir::new("shards");
    spec.write_safetensors(dir.path(), 3);
    let sharded = crate::load_safetensors(
        dir.path(),
        &LoadOptions { weights: WeightFormat::F32, ..Default::default() },
    )
    .unwrap();
    assert_eq!(full_logits(&single, &TOKENS), full_logits(&sharded, &TOKENS));

    // bf16 storage: loads, and stays close to the f32 model.
    let dir = TempDir::new("bf16");
    std::fs::write(dir.path().join("config.json"), spec.hf_config().to_string()).unwrap();
    let half: HashMap<String, Tensor> = spec
        .weights()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(candle_core::DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, dir.path().join("model.safetensors")).unwrap();
    let bf16 = crate::load(
        dir.path(),
        &LoadOptions { weights: WeightFormat::Native, ..Default::default() },
    )
    .unwrap();
    let diff = max_abs_diff(&full_logits(&single, &TOKENS), &full_logits(&bf16, &TOKENS));
    assert!(diff < 0.2, "bf16 vs f32 differ by {diff}");
}

#[test]
fn gguf_metadata_is_read() {
    let spec = Tiny::default();
    let (_dir, model) = tiny_gguf(&spec, GgmlDType::Q8_0, WeightFormat::Native);
    let c = model.config();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!((c.layers, c.heads, c.kv_heads, c.hidden_size, c.ffn_size), (2, 4, 2, 64, 96));
    assert_eq!(c.context_length, 256);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(model.vocab().unwrap()[5], "t5");
    assert_eq!(model.weight_format(), WeightFormat::Native);
}

fn gguf_err(path: &Path) -> LoadError {
    crate::load_gguf(path, &LoadOptions::default()).unwrap_err()
}

#[test]
fn bad_gguf_files_give_the_right_errors() {
    let spec = Tiny::default();
    let dir = TempDir::new("bad");
    let good = dir.path().join("good.gguf");
    spec.write_gguf(&good, GgmlDType::Q8_0);
    let bytes = std::fs::read(&good).unwrap();

    let missing = dir.path().join("nope.gguf");
    assert!(matches!(gguf_err(&missing), LoadError::Missing { path } if path == missing));

    let text = dir.path().join("text.gguf");
    std::fs::write(&text, b"hello, this is not a model").unwrap();
    let e = gguf_err(&text);
    assert!(matches!(&e, LoadError::NotGguf { found, .. } if found == b"hell"), "{e}");
    assert!(e.to_string().contains("text.gguf"), "{e}");

    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(gguf_err(&empty), LoadError::NotGguf { .. }));

    // Truncated in the header, and in the tensor data.
    for (name, len) in
        [("head.gguf", 40), ("half.gguf", bytes.len() / 2), ("tail.gguf", bytes.len() - 10)]
    {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes[..len]).unwrap();
        let e = gguf_err(&p);
        assert!(matches!(e, LoadError::Corrupt { .. }), "{name}: {e}");
    }

    // An alignment of 0 (candle's own reader divides by it and panics): refused by
    // specrej-gguf's rules before candle reads the file, here and in memory (wasm32's path).
    let p = dir.path().join("align0.gguf");
    let mut md = spec.gguf_metadata("llama");
    md.push(("general.alignment".into(), Value::U32(0)));
    write_gguf_parts(&p, &md, &spec.gguf_tensors(GgmlDType::Q8_0));
    let e = gguf_err(&p);
    assert!(
        matches!(&e, LoadError::Corrupt { reason, .. } if reason.contains("general.alignment")),
        "{e}"
    );
    let in_memory = crate::load_gguf_bytes(&std::fs::read(&p).unwrap(), &LoadOptions::default())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(&in_memory, LoadError::Corrupt { .. }), "{in_memory}");

    // Unsupported architecture, named in the message.
    let p = dir.path().join("gpt2.gguf");
    let mut md = spec.gguf_metadata("gpt2");
    md.retain(|(k, _)| !k.starts_with("llama."));
    write_gguf_parts(&p, &md, &spec.gguf_tensors(GgmlDType::Q8_0));
    let e = gguf_err(&p);
    assert!(
        matches!(&e, LoadError::UnsupportedArchitecture { architecture, .. } if architecture == "gpt2"),
        "{e}"
    );
    assert!(e.to_string().contains("gpt2"));

    // Missing tensor, named.
    let p = dir.path().join("missing-tensor.gguf");
    let mut tensors = spec.gguf_tensors(GgmlDType::Q8_0);
    tensors.retain(|(n, _)| n != "blk.1.ffn_down.weight");
    write_gguf_parts(&p, &spec.gguf_metadata("llama"), &tensors);
    let e = gguf_err(&p);
    assert!(
        matches!(&e, LoadError::MissingTensor { name, .. } if name == "blk.1.ffn_down.weight"),
        "{e}"
    );

    // Shape mismatch: metadata says a wider FFN than the tensors have.
    let p = dir.path().join("shape.gguf");
    let mut md = spec.gguf_metadata("llama");
    for (k, v) in &mut md {
        if k == "llama.feed_forward_length" {
            *v = Value::U32(128);
        }
    }
    write_gguf_parts(&p, &md, &spec.gguf_tensors(GgmlDType::Q8_0));
    let e = gguf_err(&p);
    assert!(
        matches!(&e, LoadError::ShapeMismatch { name, .. } if name == "blk.0.ffn_gate.weight"),
        "{e}"
    );

    // Missing / nonsensical metadata.
    let p = dir.path().join("no-heads.gguf");
    let mut md = spec.gguf_metadata("llama");
    md.retain(|(k, _)| k != "llama.attention.head_count");
    write_gguf_parts(&p, &md, &spec.gguf_tensors(GgmlDType::Q8_0));
    assert!(
        matches!(gguf_err(&p), LoadError::Config { key, .. } if key == "llama.attention.head_count")
    );
    let p = dir.path().join("bad-gqa.gguf");
    let mut md = spec.gguf_metadata("llama");
    for (k, v) in &mut md {
        if k == "llama.attention.head_count_kv" {
            *v = Value::U32(3);
        }
    }
    write_gguf_parts(&p, &md, &spec.gguf_tensors(GgmlDType::Q8_0));
    assert!(matches!(gguf_err(&p), LoadError::Config { .. }));

    // Garbage after a valid magic.
    let p = dir.path().join("garbage.gguf");
    let mut garbage = b"GGUF".to_vec();
    garbage.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    std::fs::write(&p, &garbage).unwrap();
    assert!(matches!(gguf_err(&p), LoadError::Corrupt { .. }));
}

#[test]
fn bad_safetensors_checkpoints_give_the_right_errors() {
    let spec = Tiny::default();
    let opts = LoadOptions::default();
    let missing = std::env::temp_dir().join("specrej-candle-definitely-missing-dir");
    assert!(matches!(crate::load_safetensors(&missing, &opts), Err(LoadError::Missing { .. })));

    let dir = TempDir::new("badst");
    // No config.json.
    assert!(
        matches!(crate::load_safetensors(dir.path(), &opts), Err(LoadError::Missing { path }) if path.ends_with("config.json"))
    );
    // Unsupported architecture.
    let mut config = spec.hf_config();
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = crate::load_safetensors(dir.path(), &opts).unwrap_err();
    assert!(
        matches!(&e, LoadError::UnsupportedArchitecture { architecture, .. } if architecture == "GPT2LMHeadModel"),
        "{e}"
    );
    // Invalid JSON.
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    assert!(matches!(crate::load_safetensors(dir.path(), &opts), Err(LoadError::Corrupt { .. })));
    // Valid config, no weights.
    std::fs::write(dir.path().join("config.json"), spec.hf_config().to_string()).unwrap();
    assert!(
        matches!(crate::load_safetensors(dir.path(), &opts), Err(LoadError::Missing { path }) if path.ends_with("model.safetensors"))
    );
    // Corrupt weights.
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();
    assert!(matches!(crate::load_safetensors(dir.path(), &opts), Err(LoadError::Corrupt { .. })));
    // Missing tensor.
    let mut weights = spec.weights();
    weights.remove("model.layers.0.mlp.up_proj.weight");
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    let e = crate::load_safetensors(dir.path(), &opts).unwrap_err();
    assert!(
        matches!(&e, LoadError::MissingTensor { name, .. } if name == "model.layers.0.mlp.up_proj.weight"),
        "{e}"
    );
    // Shape mismatch.
    let mut weights = spec.weights();
    weights.insert(
        "model.norm.weight".into(),
        Tensor::zeros(7, candle_core::DType::F32, &CDevice::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    let e = crate::load_safetensors(dir.path(), &opts).unwrap_err();
    assert!(
        matches!(&e, LoadError::ShapeMismatch { name, .. } if name == "model.norm.weight"),
        "{e}"
    );
}

#[test]
fn cuda_without_the_feature_is_a_runtime_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let spec = Tiny::default();
    let dir = TempDir::new("cuda");
    let p = dir.path().join("m.gguf");
    spec.write_gguf(&p, GgmlDType::Q8_0);
    let e =
        crate::load_gguf(&p, &LoadOptions { device: crate::Device::Cuda(0), ..Default::default() })
            .unwrap_err();
    assert!(matches!(&e, LoadError::Device(m) if m.contains("built without cuda")), "{e}");
}
