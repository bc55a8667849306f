//! Tiny GGUF files generated in memory: a good one parses, and every rule a file can break
//! gives its own error, naming the key or the tensor.

#![allow(clippy::unwrap_used, reason = "tests: a failed unwrap is a failed test, with its message")]

use crate::*;

const HIDDEN: usize = 64;
const VOCAB: usize = 8;

/// Metadata key/value pairs, in file order.
type Kv = Vec<(&'static str, GgufValue)>;

/// The metadata of a 1-layer llama: hidden 64, 4 heads / 2 KV heads (head_dim 16), FFN 128.
fn llama_kv() -> Kv {
    vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.embedding_length", GgufValue::U32(HIDDEN as u32)),
        ("llama.attention.head_count", GgufValue::U32(4)),
        ("llama.attention.head_count_kv", GgufValue::U32(2)),
        ("llama.feed_forward_length", GgufValue::U32(128)),
        ("llama.context_length", GgufValue::U32(256)),
        ("llama.rope.freq_base", GgufValue::F32(10_000.0)),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.eot_token_id", GgufValue::U32(3)),
    ]
}

/// `kv` with `key` set to `value` (added if absent; removed if `value` is `None`).
fn with(mut kv: Kv, key: &'static str, value: Option<GgufValue>) -> Kv {
    kv.retain(|(k, _)| *k != key);
    if let Some(v) = value {
        kv.push((key, v));
    }
    kv
}

/// A file with `kv` and two tensors: the embedding `[VOCAB, HIDDEN]` (F32) and a Q8_0 norm.
fn file(kv: &[(&str, GgufValue)]) -> Vec<u8> {
    let embd = vec![0u8; VOCAB * HIDDEN * 4]; // [VOCAB, HIDDEN] f32
    let norm = vec![0u8; HIDDEN / 32 * 34]; // [HIDDEN] Q8_0: 2 blocks of 34 bytes
    write_gguf(
        kv,
        &[
            ("output_norm.weight", &[HIDDEN], GgmlType::Q8_0, &norm),
            ("token_embd.weight", &[VOCAB, HIDDEN], GgmlType::F32, &embd),
        ],
    )
}

/// Raw tensor infos after `kv`: (name, dims innermost first, type id, offset), then the
/// padding to the alignment and `data` zero bytes.
fn raw(kv: &[(&str, GgufValue)], infos: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((infos.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (key, value) in kv {
        write::string(&mut out, key);
        out.extend((value.ty() as u32).to_le_bytes());
        write::payload(&mut out, value);
    }
    for (name, dims, ty, offset) in infos {
        write::string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    out.resize(out.len().next_multiple_of(32) + data, 0);
    out
}

fn tensor_problem(bytes: &[u8]) -> (String, TensorProblem) {
    match GgufFile::from_bytes(bytes) {
        Err(GgufError::Tensor { name, problem }) => (name, problem),
        other => panic!("expected a tensor error, got {other:?}"),
    }
}

fn config_error(kv: &[(&str, GgufValue)]) -> (String, String) {
    match GgufFile::from_bytes(&file(kv)).unwrap().model_config() {
        Err(GgufError::Config { key, reason }) => (key, reason),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn a_good_file_parses() {
    let bytes = file(&llama_kv());
    let f = GgufFile::from_bytes(&bytes).unwrap();
    let t = &f.tensors;
    assert_eq!((t.len(), t.alignment()), (2, 32));
    assert!(t.data_start().is_multiple_of(32) && t.data_start() >= f.metadata.metadata_end);
    let norm = t.get("output_norm.weight").unwrap();
    assert_eq!(
        (norm.shape.as_slice(), norm.ggml_type, norm.offset, norm.size),
        (&[HIDDEN][..], GgmlType::Q8_0, 0, 68)
    );
    let embd = t.get("token_embd.weight").unwrap();
    assert_eq!(
        (embd.shape.as_slice(), embd.ggml_type, embd.offset),
        (&[VOCAB, HIDDEN][..], GgmlType::F32, 96)
    );
    assert_eq!(
        (embd.start, embd.size, embd.elements()),
        (t.data_start() + 96, (VOCAB * HIDDEN * 4) as u64, (VOCAB * HIDDEN) as u64)
    );
    assert_eq!(embd.byte_range().end, bytes.len());
    assert_eq!(
        t.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["output_norm.weight", "token_embd.weight"]
    );

    let c = f.model_config().unwrap();
    let want = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        layers: 1,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        ffn_size: 128,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        context_length: 256,
        bos_token_id: Some(1),
        eos_token_ids: vec![2, 3],
        rope_interleaved: true,
        tied_embeddings: true,
    };
    assert_eq!(c, want);
    assert_eq!((c.group_size(), c.kv_bytes_per_token()), (2, 2 * 2 * 16 * 4));

    // The same through a reader of unknown length, and from a file on disk.
    let streamed = GgufFile::read_limited(&bytes[..], None).unwrap();
    assert_eq!(streamed, f);
    let path = std::env::temp_dir().join(format!("specrej-gguf-test-{}.gguf", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let from_disk = GgufFile::from_path(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(from_disk.unwrap(), f);

    // qwen2: rotate-half RoPE; an output matrix: untied; an explicit alignment is honoured.
    let renamed: Vec<(String, GgufValue)> = llama_kv()
        .into_iter()
        .map(|(k, v)| match k {
            "general.architecture" => (k.to_string(), GgufValue::String("qwen2".into())),
            _ => (k.replace("llama.", "qwen2."), v),
        })
        .collect();
    let mut kv: Vec<(&str, GgufValue)> =
        renamed.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    kv.push(("general.alignment", GgufValue::U32(64)));
    let out = vec![0u8; VOCAB * HIDDEN * 4];
    let bytes = write_gguf(
        &kv,
        &[
            ("token_embd.weight", &[VOCAB, HIDDEN], GgmlType::F32, &out),
            ("output.weight", &[VOCAB, HIDDEN], GgmlType::F32, &out),
        ],
    );
    let f = GgufFile::from_bytes(&bytes).unwrap();
    assert_eq!(f.tensors.alignment(), 64);
    assert!(f.tensors.data_start().is_multiple_of(64));
    let c = f.model_config().unwrap();
    assert_eq!(
        (c.architecture, c.rope_interleaved, c.tied_embeddings),
        (Architecture::Qwen2, false, false)
    );
}

#[test]
fn types_table_is_in_order() {
    for (i, ty) in GgmlType::all().enumerate() {
        assert_eq!(ty as usize, i, "{ty}");
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
    }
    assert_eq!(GgmlType::all().count(), 32);
    for (ty, id, name, block, bytes) in [
        (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
        (GgmlType::Q4K, 12, "Q4_K", 256, 144),
        (GgmlType::Bf16, 30, "BF16", 1, 2),
    ] {
        assert_eq!(
            (ty.id(), ty.name(), ty.block_elements(), ty.block_bytes()),
            (id, name, block, bytes)
        );
    }
    for removed in [4, 5, 31, 32, 33, 36, 37, 38, 40, u32::MAX] {
        assert_eq!(GgmlType::from_id(removed), None, "{removed}");
    }
}

#[test]
fn bad_alignments_are_errors() {
    for (value, shown) in [
        (GgufValue::U32(0), "0"),
        (GgufValue::U32(3), "3"),
        (GgufValue::U32(4), "4"),
        (GgufValue::U32(24), "24"),
        (GgufValue::U64(64), "64 (a U64, not a U32)"),
        (GgufValue::String("32".into()), "\"32\" (a String, not a U32)"),
    ] {
        let bytes = file(&with(llama_kv(), "general.alignment", Some(value)));
        let e = GgufFile::from_bytes(&bytes).unwrap_err();
        assert!(matches!(&e, GgufError::BadAlignment(s) if s == shown), "{shown}: {e}");
        assert!(e.to_string().contains("general.alignment"), "{e}");
        // The metadata reader alone applies the same rule.
        assert!(matches!(GgufMetadata::from_bytes(&bytes), Err(GgufError::BadAlignment(_))));
    }
    for good in [8u32, 16, 32, 4096] {
        let bytes = file(&with(llama_kv(), "general.alignment", Some(GgufValue::U32(good))));
        assert_eq!(GgufFile::from_bytes(&bytes).unwrap().tensors.alignment(), u64::from(good));
    }
}

#[test]
fn a_tensor_past_the_end_is_named() {
    let bytes = file(&llama_kv());
    let (name, problem) = tensor_problem(&bytes[..bytes.len() - 1]);
    assert_eq!(name, "token_embd.weight");
    assert!(
        matches!(problem, TensorProblem::PastEnd { end, len, .. } if end == bytes.len() as u64 && len == end - 1),
        "{problem}"
    );
    let e = GgufFile::from_bytes(&bytes[..bytes.len() - 1]).unwrap_err().to_string();
    assert!(e.contains("\"token_embd.weight\"") && e.contains("past the end"), "{e}");
    // Without a known length the table cannot know (and says nothing).
    assert!(GgufFile::read_limited(&bytes[..bytes.len() - 1], None).is_ok());
    // An offset far past the end, and one that overflows.
    let kv = llama_kv();
    let (_, problem) = tensor_problem(&raw(&kv, &[("a", &[8], 0, 1 << 40)], 32));
    assert!(matches!(problem, TensorProblem::PastEnd { .. }), "{problem}");
    let (_, problem) = tensor_problem(&raw(&kv, &[("a", &[8], 0, u64::MAX - 31)], 32));
    assert_eq!(problem, TensorProblem::Overflow(u64::MAX - 31));
}

#[test]
fn every_truncation_is_an_error_never_a_panic() {
    let bytes = file(&llama_kv());
    let metadata_end = GgufMetadata::from_bytes(&bytes).unwrap().metadata_end as usize;
    for len in 0..bytes.len() {
        assert!(GgufFile::from_bytes(&bytes[..len]).is_err(), "{len} bytes parsed");
        // Without a known length only the header and the infos can be found missing.
        assert!(
            len >= metadata_end || GgufFile::read_limited(&bytes[..len], None).is_err(),
            "{len} bytes parsed unlimited"
        );
    }
}

#[test]
fn a_misaligned_offset_is_named() {
    let kv = llama_kv();
    let (name, problem) = tensor_problem(&raw(&kv, &[("a", &[8], 0, 0), ("b", &[8], 0, 40)], 96));
    assert_eq!(
        (name.as_str(), problem),
        ("b", TensorProblem::Misaligned { offset: 40, alignment: 32 })
    );
    let kv = with(llama_kv(), "general.alignment", Some(GgufValue::U32(8)));
    assert!(GgufFile::from_bytes(&raw(&kv, &[("a", &[8], 0, 0), ("b", &[8], 0, 40)], 96)).is_ok());
}

#[test]
fn a_duplicate_name_is_an_error() {
    let e = GgufFile::from_bytes(&raw(&llama_kv(), &[("a", &[8], 0, 0), ("a", &[8], 0, 32)], 64))
        .unwrap_err();
    assert!(matches!(&e, GgufError::DuplicateTensor(n) if n == "a"), "{e}");
    assert_eq!(e.to_string(), "corrupt GGUF: tensor \"a\" appears twice");
}

#[test]
fn absurd_dimensions_and_types_are_named() {
    let kv = llama_kv();
    let cases: [(&[u64], u32, TensorProblem); 7] = [
        (&[], 0, TensorProblem::DimCount(0)),
        (&[1, 1, 1, 1, 1], 0, TensorProblem::DimCount(5)),
        (&[1 << 50], 0, TensorProblem::TooLarge(vec![1 << 50])),
        (&[1 << 32, 1 << 32], 0, TensorProblem::TooLarge(vec![1 << 32, 1 << 32])),
        (&[0, u64::MAX], 0, TensorProblem::TooLarge(vec![0, u64::MAX])),
        (&[8], 4, TensorProblem::UnknownType(4)),
        (&[33, 2], 8, TensorProblem::PartialBlock { row: 33, block: 32, ty: GgmlType::Q8_0 }),
    ];
    for (dims, ty, want) in cases {
        let (name, problem) =
            tensor_problem(&raw(&kv, &[("blk.0.attn_q.weight", dims, ty, 0)], 64));
        assert_eq!(name, "blk.0.attn_q.weight");
        assert_eq!(problem, want, "{dims:?}");
    }
    // A dimension count of 2^32 - 1 is refused before anything is allocated for it.
    let mut bytes = raw(&kv, &[("x", &[8], 0, 0)], 32);
    let at = bytes.windows(9).position(|w| w == b"\x01\x00\x00\x00\x00\x00\x00\x00x").unwrap() + 9;
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(tensor_problem(&bytes), ("x".into(), TensorProblem::DimCount(u32::MAX)));
    // A zero dimension is an empty tensor, which is valid.
    let f = GgufFile::from_bytes(&raw(&kv, &[("empty", &[0, 4], 0, 0)], 0)).unwrap();
    assert_eq!(f.tensors.get("empty").unwrap().size, 0);
}

#[test]
fn a_tensor_count_beyond_the_file_is_an_error() {
    let mut bytes = file(&llama_kv());
    bytes[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let e = GgufFile::from_bytes(&bytes).unwrap_err();
    assert!(matches!(&e, GgufError::TooLong { what, .. } if what == "tensor count"), "{e}");
    // Unlimited: the reader goes on into the data (zeros: a nameless tensor of 0 dimensions),
    // allocating only for what it read.
    let e = GgufFile::read_limited(&bytes[..], None).unwrap_err();
    assert!(matches!(&e, GgufError::Tensor { problem: TensorProblem::DimCount(0), .. }), "{e}");
}

#[test]
fn real_models_validate() {
    let base = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 128_256,
        hidden_size: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ffn_size: 14_336,
        rope_theta: 500_000.0,
        rms_norm_eps: 1e-5,
        context_length: 131_072,
        bos_token_id: Some(128_000),
        eos_token_ids: vec![128_001, 128_009],
        rope_interleaved: true,
        tied_embeddings: false,
    };
    let llama3_70b =
        ModelConfig { hidden_size: 8192, layers: 80, heads: 64, ffn_size: 28_672, ..base.clone() };
    let llama31_405b = ModelConfig {
        hidden_size: 16_384,
        layers: 126,
        heads: 128,
        ffn_size: 53_248,
        ..base.clone()
    };
    let smollm2_135m = ModelConfig {
        vocab_size: 49_152,
        hidden_size: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ffn_size: 1536,
        context_length: 8192,
        ..base.clone()
    };
    let qwen25_7b = ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 152_064,
        hidden_size: 3584,
        layers: 28,
        heads: 28,
        kv_heads: 4,
        ffn_size: 18_944,
        rope_interleaved: false,
        ..base.clone()
    };
    let mistral_nemo = ModelConfig {
        vocab_size: 131_072,
        hidden_size: 5120,
        layers: 40,
        ffn_size: 14_336,
        context_length: 1_024_000,
        ..base.clone()
    };
    for c in [base, llama3_70b, llama31_405b, smollm2_135m, qwen25_7b, mistral_nemo] {
        c.validate().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

#[test]
fn bad_configs_name_their_key() {
    let kv = llama_kv;
    let u = |v: u32| Some(GgufValue::U32(v));
    // head_dim not given and 5 heads do not divide 64.
    let (key, reason) = config_error(&with(
        with(kv(), "llama.attention.head_count", u(5)),
        "llama.attention.head_count_kv",
        u(5),
    ));
    assert_eq!(key, "llama.attention.key_length");
    assert!(reason.contains("5 heads do not divide the embedding length 64"), "{reason}");
    // ...unless the file says: head_dim 12, 5 heads (60 wide, not the hidden width) is fine.
    let ok = with(
        with(with(kv(), "llama.attention.head_count", u(5)), "llama.attention.head_count_kv", u(5)),
        "llama.attention.key_length",
        u(12),
    );
    assert_eq!(GgufFile::from_bytes(&file(&ok)).unwrap().model_config().unwrap().head_dim, 12);
    let cases: Vec<(Kv, &str, &str)> = vec![
        (
            with(kv(), "llama.attention.head_count_kv", u(3)),
            "llama.attention.head_count_kv",
            "4 query heads are not a multiple of 3 kv heads",
        ),
        (
            with(kv(), "llama.attention.head_count_kv", u(0)),
            "llama.attention.head_count_kv",
            "must be positive",
        ),
        (with(kv(), "llama.context_length", u(0)), "llama.context_length", "must be positive"),
        (
            with(kv(), "llama.context_length", u((1 << 24) + 1)),
            "llama.context_length",
            "16777217 is implausibly large (at most 16777216)",
        ),
        (
            with(kv(), "llama.context_length", Some(GgufValue::I32(-1))),
            "llama.context_length",
            "not a non-negative integer",
        ),
        (
            with(kv(), "llama.attention.head_count", u(0)),
            "llama.attention.head_count",
            "must be positive",
        ),
        (
            with(kv(), "llama.block_count", u(1 << 20)),
            "llama.block_count",
            "1048576 is implausibly large (at most 1024)",
        ),
        (with(kv(), "llama.feed_forward_length", None), "llama.feed_forward_length", "missing"),
        (with(kv(), "llama.embedding_length", None), "llama.embedding_length", "missing"),
        (
            with(kv(), "llama.attention.key_length", u(15)),
            "llama.attention.key_length",
            "15 is odd; RoPE needs pairs",
        ),
        (
            with(kv(), "llama.attention.key_length", u(8192)),
            "llama.attention.key_length",
            "8192 is implausibly large (at most 4096)",
        ),
        (
            with(
                with(kv(), "llama.attention.head_count", u(1024)),
                "llama.attention.key_length",
                u(128),
            ),
            "llama.attention.head_count",
            "1024 heads of 128 (131072 wide) is implausibly large (at most 65536)",
        ),
        (
            with(kv(), "llama.attention.value_length", u(8)),
            "llama.attention.value_length",
            "differs from key_length (unsupported)",
        ),
        (
            with(kv(), "llama.rope.dimension_count", u(8)),
            "llama.rope.dimension_count",
            "partial rotary embeddings are not supported",
        ),
        (
            with(kv(), "llama.rope.freq_base", Some(GgufValue::F32(-1.0))),
            "llama.rope.freq_base",
            "-1 is not a positive number",
        ),
        (
            with(kv(), "llama.rope.freq_base", Some(GgufValue::String("big".into()))),
            "llama.rope.freq_base",
            "not a number",
        ),
        (
            with(kv(), "llama.attention.layer_norm_rms_epsilon", Some(GgufValue::F32(f32::NAN))),
            "llama.attention.layer_norm_rms_epsilon",
            "NaN is not a non-negative number",
        ),
        (with(kv(), "general.architecture", None), "general.architecture", "missing"),
        (with(kv(), "general.architecture", u(1)), "general.architecture", "not a string"),
    ];
    for (kv, want_key, want_reason) in cases {
        let (key, reason) = config_error(&kv);
        assert_eq!((key.as_str(), reason.as_str()), (want_key, want_reason));
    }
    // The largest context a file may declare, and a real 128k one, load.
    for ctx in [1 << 24, 131_072] {
        let f = GgufFile::from_bytes(&file(&with(kv(), "llama.context_length", u(ctx)))).unwrap();
        assert_eq!(f.model_config().unwrap().context_length, ctx as usize);
    }
    // Integers where floats are expected are read as numbers.
    let f = GgufFile::from_bytes(&file(&with(kv(), "llama.rope.freq_base", u(500_000)))).unwrap();
    assert_eq!(f.model_config().unwrap().rope_theta, 500_000.0);
}

#[test]
fn architecture_and_tensors_are_checked() {
    let e = GgufFile::from_bytes(&file(&with(
        llama_kv(),
        "general.architecture",
        Some(GgufValue::String("gpt2".into())),
    )))
    .unwrap()
    .model_config()
    .unwrap_err();
    assert!(matches!(&e, GgufError::UnsupportedArchitecture(a) if a == "gpt2"), "{e}");
    // No embedding: nothing says how large the vocabulary is.
    let norm = vec![0u8; HIDDEN * 4];
    let bytes = write_gguf(&llama_kv(), &[("output_norm.weight", &[HIDDEN], GgmlType::F32, &norm)]);
    let e = GgufFile::from_bytes(&bytes).unwrap().model_config().unwrap_err();
    assert!(matches!(&e, GgufError::MissingTensor(n) if n == "token_embd.weight"), "{e}");
    // An embedding narrower than the hidden width.
    let embd = vec![0u8; VOCAB * 32 * 4];
    let bytes =
        write_gguf(&llama_kv(), &[("token_embd.weight", &[VOCAB, 32], GgmlType::F32, &embd)]);
    let e = GgufFile::from_bytes(&bytes).unwrap().model_config().unwrap_err();
    assert_eq!(e.to_string(), "tensor \"token_embd.weight\" has shape [8, 32], expected [8, 64]");
}

#[test]
fn validate_reports_fields() {
    let c = GgufFile::from_bytes(&file(&llama_kv())).unwrap().model_config().unwrap();
    let e = ModelConfig { kv_heads: 3, ..c.clone() }.validate().unwrap_err();
    assert_eq!(e.field, "kv_heads");
    assert_eq!(
        ModelConfig::gguf_key(Architecture::Mistral, e.field),
        "mistral.attention.head_count_kv"
    );
    assert_eq!(
        ModelConfig::gguf_key(Architecture::Llama, "context_length"),
        "llama.context_length"
    );
    assert_eq!(
        ModelConfig { vocab_size: 0, ..c.clone() }.validate().unwrap_err().field,
        "vocab_size"
    );
    assert_eq!(ModelConfig::derived_head_dim(64, 5), None);
    assert_eq!(ModelConfig::derived_head_dim(64, 4), Some(16));
    assert_eq!(ModelConfig::derived_head_dim(64, 0), None);
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn the_default_model_parses_and_validates() {
    let path = std::env::var_os("SPECREJ_MODEL").expect("SPECREJ_MODEL is unset");
    let f = GgufFile::from_path(&path).unwrap();
    let c = f.model_config().unwrap();
    // SmolLM2-135M-Instruct: 30 layers of 9 heads (3 KV heads) of 64, tied embeddings.
    assert_eq!(
        (c.architecture, c.hidden_size, c.layers, c.heads, c.kv_heads, c.head_dim),
        (Architecture::Llama, 576, 30, 9, 3, 64)
    );
    assert_eq!((c.vocab_size, c.ffn_size, c.tied_embeddings), (49_152, 1536, true));
    assert_eq!(f.tensors.len(), 2 + 9 * 30);
    let len = std::fs::metadata(&path).unwrap().len();
    let end = f.tensors.iter().map(|t| t.start + t.size).max().unwrap();
    assert!(end <= len && len - end < f.tensors.alignment(), "data ends at {end} of {len}");
}
