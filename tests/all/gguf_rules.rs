//! One set of GGUF rules: specrej-candle and specrej-wgpu both read a file through
//! specrej-gguf, so a file that breaks a rule is refused by both with specrej-gguf's message
//! (candle's names the file first). A limit of one backend's kernels is that backend's own,
//! reported as unsupported. No model file or GPU needed.

use specrej_text::gguf::{GgmlType, GgufValue, write_gguf};

const HIDDEN: usize = 64;
const VOCAB: usize = 8;

/// A llama header (hidden 64, 4 heads / 2 KV heads) with `changes` applied (`None` removes a
/// key), over an F32 embedding `[VOCAB, HIDDEN]`: all the rules need to see.
fn model(changes: &[(&'static str, Option<GgufValue>)]) -> Vec<u8> {
    let mut kv: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.embedding_length", GgufValue::U32(HIDDEN as u32)),
        ("llama.attention.head_count", GgufValue::U32(4)),
        ("llama.attention.head_count_kv", GgufValue::U32(2)),
        ("llama.feed_forward_length", GgufValue::U32(128)),
        ("llama.context_length", GgufValue::U32(256)),
    ];
    for (key, value) in changes {
        kv.retain(|(k, _)| k != key);
        if let Some(v) = value {
            kv.push((key, v.clone()));
        }
    }
    let embd = vec![0u8; VOCAB * HIDDEN * 4]; // [VOCAB, HIDDEN] f32
    write_gguf(&kv, &[("token_embd.weight", &[VOCAB, HIDDEN], GgmlType::F32, &embd)])
}

/// (wgpu's message, candle's message) for a file both must refuse.
fn refusals(bytes: &[u8]) -> (String, String) {
    let wgpu = specrej_wgpu::check_gguf(bytes).map(|_| ()).expect_err("wgpu accepted the file");
    let candle = specrej_candle::load_gguf_bytes(bytes, &specrej_candle::LoadOptions::default())
        .map(|_| ())
        .expect_err("candle accepted the file");
    (wgpu.to_string(), candle.to_string())
}

#[test]
fn candle_and_wgpu_refuse_bad_configs_with_one_message() {
    let u = |v: u32| Some(GgufValue::U32(v));
    let cases = [
        (
            model(&[("llama.attention.head_count_kv", u(3))]),
            "bad or missing config entry \"llama.attention.head_count_kv\": 4 query heads are not a multiple of 3 kv heads",
        ),
        (
            model(&[("llama.context_length", u((1 << 24) + 1))]),
            "bad or missing config entry \"llama.context_length\": 16777217 is implausibly large (at most 16777216)",
        ),
        (
            model(&[("llama.context_length", u(0))]),
            "bad or missing config entry \"llama.context_length\": must be positive",
        ),
        (
            model(&[("llama.attention.head_count", u(5)), ("llama.attention.head_count_kv", u(5))]),
            "bad or missing config entry \"llama.attention.key_length\": missing, and 5 heads do not divide the embedding length 64",
        ),
        (
            model(&[("llama.feed_forward_length", None)]),
            "bad or missing config entry \"llama.feed_forward_length\": missing",
        ),
        (
            model(&[("llama.embedding_length", u(32))]),
            "tensor \"token_embd.weight\" has shape [8, 64], expected [8, 32]",
        ),
    ];
    for (bytes, message) in cases {
        let (wgpu, candle) = refusals(&bytes);
        assert_eq!(wgpu, message);
        assert_eq!(candle, format!("<memory>: {message}"));
    }
}

#[test]
fn candle_and_wgpu_refuse_corrupt_tables_with_one_message() {
    let good = model(&[]);
    specrej_wgpu::check_gguf(&good).expect("the good file passes");
    let cases = [
        (model(&[("general.alignment", Some(GgufValue::U32(0)))]), "general.alignment is 0"),
        (model(&[("general.alignment", Some(GgufValue::U32(48)))]), "general.alignment is 48"),
        (good[..good.len() - 1].to_vec(), "tensor \"token_embd.weight\": data at bytes"),
    ];
    for (bytes, part) in cases {
        let (wgpu, candle) = refusals(&bytes);
        assert!(wgpu.starts_with("corrupt GGUF: ") && wgpu.contains(part), "{wgpu}");
        assert_eq!(candle, format!("<memory>: truncated or corrupt file: {wgpu}"));
    }
    let (wgpu, candle) =
        refusals(&model(&[("general.architecture", Some(GgufValue::String("gpt2".into())))]));
    for message in [wgpu, candle] {
        assert!(message.contains("unsupported architecture \"gpt2\""), "{message}");
    }
}

#[test]
fn the_wgpu_kernels_limits_are_wgpu_s_own() {
    // Heads of 512: a valid model (the shared rules allow up to 4096), wider than wgpu's
    // attention kernel. candle gets past the config and stops at the tensors this file lacks.
    let bytes = model(&[("llama.attention.key_length", Some(GgufValue::U32(512)))]);
    let wgpu =
        specrej_wgpu::check_gguf(&bytes).map(|_| ()).expect_err("wgpu accepted heads of 512");
    assert!(matches!(wgpu, specrej_wgpu::Error::Unsupported { .. }), "{wgpu}");
    assert!(
        wgpu.to_string()
            .starts_with("unsupported by the wgpu backend: \"llama.attention.key_length\""),
        "{wgpu}"
    );
    let candle = specrej_candle::load_gguf_bytes(&bytes, &specrej_candle::LoadOptions::default())
        .map(|_| ())
        .expect_err("candle loaded a model without blocks");
    assert!(matches!(candle, specrej_candle::LoadError::MissingTensor { .. }), "{candle}");
}
