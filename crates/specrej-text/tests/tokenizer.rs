//! Tokenizers built from small hand-written GGUF vocabularies (no model file needed).

mod common;

use common::{W, byte_level_char, gguf};
use specrej_text::{ChatTemplate, Error, GgufMetadata, Tokenizer, judge_segments};

/// Byte-level BPE vocabulary: 3 control tokens, 1 user-defined, the 256 bytes, then merges.
fn bpe_vocab() -> (Vec<String>, Vec<i32>, Vec<&'static str>) {
    let mut tokens: Vec<String> =
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"].map(String::from).to_vec();
    let mut types = vec![3, 3, 3, 4];
    for b in 0..=255u8 {
        tokens.push(byte_level_char(b).to_string());
        types.push(1);
    }
    let merged = ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "12", "Ye", "Yes", "No"];
    for m in merged {
        tokens.push(m.to_owned());
        types.push(1);
    }
    let merges = vec!["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "1 2", "Y e", "Ye s", "N o"];
    (tokens, types, merges)
}

fn bpe_gguf(pre: &str, extra: &[(&str, W)]) -> GgufMetadata {
    let (tokens, types, merges) = bpe_vocab();
    let mut kv = vec![
        ("tokenizer.ggml.model", W::str("gpt2")),
        ("tokenizer.ggml.pre", W::str(pre)),
        ("tokenizer.ggml.tokens", W::strs(&tokens)),
        ("tokenizer.ggml.token_type", W::i32s(types)),
        ("tokenizer.ggml.merges", W::strs(merges)),
        ("tokenizer.ggml.bos_token_id", W::U32(1)),
        ("tokenizer.ggml.eos_token_id", W::U32(2)),
        ("tokenizer.ggml.padding_token_id", W::U32(2)),
    ];
    // Extra keys replace the defaults.
    kv.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    kv.extend(extra.iter().cloned());
    GgufMetadata::from_bytes(&gguf(3, 0, &kv)).expect("valid gguf")
}

fn id(tk: &Tokenizer, s: &str) -> u32 {
    tk.token_to_id(s).unwrap_or_else(|| panic!("{s:?} in vocab"))
}

#[test]
fn byte_level_bpe_from_gguf() {
    let tk = Tokenizer::from_gguf(&bpe_gguf("smollm", &[])).expect("tokenizer");
    assert_eq!(tk.vocab_size(), 4 + 256 + 10);
    let hello = id(&tk, "hello");
    let wo = id(&tk, "Ġwo");
    let r = id(&tk, "r");
    let l = id(&tk, "l");
    let d = id(&tk, "d");
    assert_eq!(tk.encode("hello world", false).expect("encode"), [hello, wo, r, l, d]);
    // Control and user-defined tokens in the text are single ids.
    let ids = tk.encode("<|im_start|>hello<tool><|im_end|>", false).expect("encode");
    assert_eq!(ids, [1, hello, 3, 2]);
    assert_eq!(tk.decode(&ids, false).expect("decode"), "<|im_start|>hello<tool><|im_end|>");
    // Skipping special tokens drops control tokens but keeps user-defined ones.
    assert_eq!(tk.decode(&ids, true).expect("decode"), "hello<tool>");
    assert_eq!(tk.bos(), Some(1));
    assert_eq!(tk.eos(), Some(2));
    assert_eq!(tk.pad(), Some(2));
    assert_eq!(tk.eos_ids(), &[2, 0]);
    assert!(!tk.adds_bos());
    assert_eq!(tk.encode("hello", true).expect("encode"), [hello]);
}

#[test]
fn pre_tokenizer_follows_tokenizer_ggml_pre() {
    // smollm (and starcoder, ...) split digits one by one: the "1 2" merge never applies.
    let tk = Tokenizer::from_gguf(&bpe_gguf("smollm", &[])).expect("tokenizer");
    assert_eq!(tk.encode("12", false).expect("encode"), [id(&tk, "1"), id(&tk, "2")]);
    // gpt-2 keeps digit runs together.
    let tk = Tokenizer::from_gguf(&bpe_gguf("gpt-2", &[])).expect("tokenizer");
    assert_eq!(tk.encode("12", false).expect("encode"), [id(&tk, "12")]);
    // No leading space is added (the bug candle's TokenizerFromGguf has with SmolLM2).
    let tk = Tokenizer::from_gguf(&bpe_gguf("smollm", &[])).expect("tokenizer");
    assert_eq!(tk.encode("hello", false).expect("encode"), [id(&tk, "hello")]);
}

#[test]
fn round_trips_arbitrary_text() {
    for pre in ["smollm", "gpt-2", "llama-bpe", "qwen2", "default"] {
        let tk = Tokenizer::from_gguf(&bpe_gguf(pre, &[])).expect("tokenizer");
        for text in
            ["", "hello world", "  x\n\n\ty ", "héllo 世界 🎉", "a1b22c333 don't", "\u{0}\u{7f}"]
        {
            let ids = tk.encode(text, false).expect("encode");
            assert_eq!(tk.decode(&ids, false).expect("decode"), text, "{pre}: {text:?}");
        }
    }
}

#[test]
fn special_ids_from_metadata() {
    let tk = Tokenizer::from_gguf(&bpe_gguf(
        "gpt-2",
        &[
            ("tokenizer.ggml.eot_token_id", W::U32(3)),
            ("tokenizer.ggml.add_bos_token", W::Bool(true)),
        ],
    ))
    .expect("tokenizer");
    assert_eq!(tk.eos_ids(), &[2, 3, 0]);
    assert!(tk.adds_bos());
    let hello = id(&tk, "hello");
    assert_eq!(tk.encode("hello", true).expect("encode"), [1, hello]);
    assert_eq!(tk.encode("<|im_start|>hello", true).expect("encode"), [1, hello]);
    assert_eq!(tk.encode("hello", false).expect("encode"), [hello]);
}

#[test]
fn errors_name_the_problem() {
    let meta = |kv: &[(&str, W)]| GgufMetadata::from_bytes(&gguf(3, 0, kv)).expect("gguf");
    let err = Tokenizer::from_gguf(&meta(&[])).expect_err("no model");
    assert!(matches!(err, Error::MissingKey(ref k) if k == "tokenizer.ggml.model"), "{err}");

    let err = Tokenizer::from_gguf(&meta(&[
        ("tokenizer.ggml.model", W::str("bert")),
        ("tokenizer.ggml.tokens", W::strs(["a"])),
    ]))
    .expect_err("bert");
    assert!(matches!(err, Error::UnsupportedModel(ref m) if m == "bert"), "{err}");
    assert!(err.to_string().contains("\"bert\""), "{err}");

    let err = Tokenizer::from_gguf(&bpe_gguf("nonesuch", &[])).expect_err("pre");
    assert!(matches!(err, Error::UnsupportedPre(ref p) if p == "nonesuch"), "{err}");
    assert!(err.to_string().contains("smollm"), "lists the supported ones: {err}");

    let err = Tokenizer::from_gguf(&meta(&[
        ("tokenizer.ggml.model", W::str("gpt2")),
        ("tokenizer.ggml.tokens", W::strs(["a"])),
    ]))
    .expect_err("no merges");
    assert!(matches!(err, Error::MissingKey(ref k) if k == "tokenizer.ggml.merges"), "{err}");

    let err =
        Tokenizer::from_gguf(&bpe_gguf("gpt-2", &[("tokenizer.ggml.bos_token_id", W::U32(99999))]))
            .expect_err("bos out of range");
    assert!(err.to_string().contains("bos_token_id"), "{err}");
}

#[test]
fn stream_decoder_holds_back_partial_characters() {
    let tk = Tokenizer::from_gguf(&bpe_gguf("smollm", &[])).expect("tokenizer");
    let ids = tk.encode("hé世!", false).expect("encode");
    // No merges for these bytes: h, é = 2 byte tokens, 世 = 3, !.
    assert_eq!(ids.len(), 7);
    let mut dec = tk.stream_decoder(false);
    let pieces: Vec<String> = ids.iter().map(|&i| dec.step(&tk, i).expect("step")).collect();
    assert_eq!(pieces, ["h", "", "é", "", "", "世", "!"]);
    assert_eq!(dec.finish(&tk).expect("finish"), "");
}

#[test]
fn tokenizer_json_round_trip_and_config() {
    let tk = Tokenizer::from_gguf(&bpe_gguf("smollm", &[])).expect("tokenizer");
    let json = tk.inner().to_string(false).expect("serialize");
    let tj = Tokenizer::from_tokenizer_json(json.as_bytes()).expect("from json");
    for text in ["hello world", "<|im_start|>hello<|im_end|>", "12 héllo"] {
        assert_eq!(
            tj.encode(text, false).expect("encode"),
            tk.encode(text, false).expect("encode")
        );
    }
    assert_eq!(tj.eos_ids(), &[2, 0]);
    assert_eq!(tj.bos(), None);
    let tj = tj
        .with_tokenizer_config(
            br#"{"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>", "add_bos_token": true}"#,
        )
        .expect("config");
    assert_eq!(tj.bos(), Some(1));
    assert_eq!(tj.eos(), Some(0));
    assert_eq!(tj.eos_ids(), &[0, 2]);
    assert_eq!(tj.encode("hello", true).expect("encode"), [1, id(&tj, "hello")]);
    assert!(Tokenizer::from_tokenizer_json(b"{not json").is_err());
}

/// A SentencePiece (`llama`) vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then pieces.
fn spm_gguf() -> GgufMetadata {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("ll", -3.0),
        ("he", -4.0),
        ("hell", -5.0),
        ("hello", -6.0),
        ("▁hello", -7.0),
        ("▁w", -8.0),
    ];
    for (p, s) in pieces {
        tokens.push(p.to_owned());
        types.push(1);
        scores.push(s);
    }
    let kv = [
        ("tokenizer.ggml.model", W::str("llama")),
        ("tokenizer.ggml.tokens", W::strs(&tokens)),
        ("tokenizer.ggml.token_type", W::i32s(types)),
        ("tokenizer.ggml.scores", W::f32s(scores)),
        ("tokenizer.ggml.bos_token_id", W::U32(1)),
        ("tokenizer.ggml.eos_token_id", W::U32(2)),
        ("tokenizer.ggml.unknown_token_id", W::U32(0)),
    ];
    GgufMetadata::from_bytes(&gguf(3, 0, &kv)).expect("gguf")
}

#[test]
fn sentencepiece_best_effort() {
    let tk = Tokenizer::from_gguf(&spm_gguf()).expect("tokenizer");
    let ids = tk.encode("hello who", false).expect("encode");
    let h = id(&tk, "h");
    let o = id(&tk, "o");
    assert_eq!(ids, [id(&tk, "▁hello"), id(&tk, "▁w"), h, o]);
    // Characters outside the vocabulary fall back to byte tokens.
    let ids = tk.encode("hé", false).expect("encode");
    assert_eq!(ids, [id(&tk, "▁"), h, id(&tk, "<0xC3>"), id(&tk, "<0xA9>")]);
    for text in ["hello who", "hé 世界", "  two spaces"] {
        let ids = tk.encode(text, false).expect("encode");
        assert_eq!(tk.decode(&ids, false).expect("decode"), text);
    }
    // SentencePiece models add BOS by default.
    assert!(tk.adds_bos());
    assert_eq!(tk.encode("hello", true).expect("encode")[0], 1);
    assert_eq!(tk.eos_ids(), &[2]);
}

#[test]
fn judge_segments_on_a_small_vocab() {
    let tk = Tokenizer::from_gguf(&bpe_gguf("smollm", &[])).expect("tokenizer");
    let t = ChatTemplate::chatml();
    let j = judge_segments(&tk, &t, "hello?").expect("judge");
    assert_eq!((j.yes, j.no), (id(&tk, "Yes"), id(&tk, "No")));
    let before = tk.decode(&j.before, false).expect("decode");
    let after = tk.decode(&j.after, false).expect("decode");
    assert_eq!(
        before,
        "<|im_start|>user\nHere is a question and a response.\n\nQuestion: hello?\n\nResponse:\n"
    );
    assert_eq!(
        after,
        "\n\nIs the response helpful, correct and well written? Answer with yes or no.<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(j.before[0], 1);
    assert_eq!(j.after[j.after.len() - 1], id(&tk, "Ċ"));

    // A template that drops the user message cannot be split.
    let t = ChatTemplate::new("{{ 'nothing' }}", "", "").expect("template");
    let err = judge_segments(&tk, &t, "q").expect_err("no placeholder");
    assert!(matches!(err, Error::Judge(_)), "{err}");
}

#[test]
fn types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<ChatTemplate>();
    check::<specrej_text::StreamDecoder>();
    check::<GgufMetadata>();
    check::<Error>();
}
