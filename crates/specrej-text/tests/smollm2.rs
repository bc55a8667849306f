//! The tokenizer, chat template and judge prompt on the default model (SmolLM2-135M-Instruct).
//!
//! Reference ids come from llama.cpp (llama-cpp-python 0.3.36,
//! `Llama(path, vocab_only=True).tokenize(s.encode(), add_bos=False, special=True)`).

use specrej_text::{
    ChatTemplate, GgufMetadata, Message, Tokenizer, judge_segments, self_judge_segments,
};

const NEEDS_MODEL: &str = "needs the default model: cargo xtask test sets SPECREJ_MODEL";

fn meta() -> GgufMetadata {
    let path = std::env::var("SPECREJ_MODEL").unwrap_or_else(|_| panic!("{NEEDS_MODEL}"));
    GgufMetadata::from_path(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&meta()).expect("tokenizer")
}

const SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

/// (text, llama.cpp's ids)
const CASES: &[(&str, &[u32])] = &[
    (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520,
            9531, 198,
        ],
    ),
    ("12345", &[33, 34, 35, 36, 37]),
    ("héllo 世界 🎉", &[88, 2756, 31394, 216, 7906, 240, 178, 239, 230, 15107, 232, 227]),
    ("   leading spaces", &[256, 2899, 5600]),
    (" Hello world", &[38699, 905]),
    (
        "line one\nline two\n\n  indented\n\ttab\r\nend  ",
        &[1311, 582, 198, 1311, 827, 8866, 641, 6574, 198, 197, 15999, 201, 198, 486, 256],
    ),
    (
        "Hello, world! It's 3.14159 o'clock; don't you think?",
        &[
            19556, 28, 905, 17, 657, 506, 216, 35, 30, 33, 36, 33, 37, 41, 263, 23, 17466, 43,
            1326, 982, 346, 1510, 47,
        ],
    ),
    ("<|im_end|><|endoftext|>x<|im_start|>", &[2, 0, 104, 1]),
    (
        "def f(x):\n    return x ** 2  # square\n",
        &[1604, 275, 24, 104, 727, 472, 1003, 1792, 1903, 216, 34, 216, 907, 5222, 198],
    ),
    ("Yes", &[10539]),
    ("No", &[5230]),
    ("yes", &[10407]),
    ("no", &[4607]),
];

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn encodes_like_llama_cpp() {
    let tk = tokenizer();
    for (text, ids) in CASES {
        assert_eq!(tk.encode(text, false).expect("encode"), *ids, "{text:?}");
        // SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token = false).
        assert_eq!(tk.encode(text, true).expect("encode"), *ids, "{text:?}");
    }
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn decode_round_trips() {
    let tk = tokenizer();
    let extra = ["", " ", "\n\n\n", "a  b   c", "Ünïcödé ✓ 𝄞 👩‍👩‍👧", "tab\there", "x\u{0}y"];
    for text in CASES.iter().map(|c| c.0).chain(extra) {
        let ids = tk.encode(text, false).expect("encode");
        assert_eq!(tk.decode(&ids, false).expect("decode"), text);
    }
    let ids = tk.encode("<|im_start|>user\nhi<|im_end|>", false).expect("encode");
    assert_eq!(tk.decode(&ids, true).expect("decode"), "user\nhi");
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn special_ids_and_vocab() {
    let tk = tokenizer();
    assert_eq!(tk.bos(), Some(1));
    assert_eq!(tk.eos(), Some(2));
    // <|im_end|> (the EOS) first, then <|endoftext|>.
    assert_eq!(tk.eos_ids(), &[2, 0]);
    assert!(tk.is_eos(0) && tk.is_eos(2) && !tk.is_eos(1));
    assert_eq!(tk.pad(), Some(2));
    assert!(!tk.adds_bos());
    assert_eq!(tk.vocab_size(), 49152);
    assert_eq!(tk.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tk.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tk.token_to_id("Ġyes"), Some(9805));
    assert_eq!(tk.id_to_token(10539).as_deref(), Some("Yes"));
    assert_eq!(tk.single_token("Yes"), Some(10539));
    assert_eq!(tk.single_token("Yes no"), None);
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn stream_decoder_never_splits_characters() {
    let tk = tokenizer();
    let text = "héllo 世界 🎉 👩‍👩‍👧 done<|im_end|>";
    let ids = tk.encode(text, false).expect("encode");
    for skip_special in [false, true] {
        let mut dec = tk.stream_decoder(skip_special);
        let mut out = String::new();
        let mut pieces = 0;
        for &id in &ids {
            let piece = dec.step(&tk, id).expect("step");
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            pieces += usize::from(!piece.is_empty());
            out.push_str(&piece);
        }
        out.push_str(&dec.finish(&tk).expect("finish"));
        assert_eq!(out, tk.decode(&ids, skip_special).expect("decode"));
        // Multi-byte characters split over several tokens come out whole, in fewer pieces.
        assert!(pieces < ids.len());
    }
    // An unfinished character is held back, then flushed by finish().
    let mut dec = tk.stream_decoder(false);
    let emoji = tk.encode("🎉", false).expect("encode");
    assert!(emoji.len() > 1);
    assert_eq!(dec.step(&tk, emoji[0]).expect("step"), "");
    assert_eq!(dec.finish(&tk).expect("finish"), "\u{FFFD}");
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn chat_template_renders_smollm2_format() {
    let m = meta();
    let src = m.get_str("tokenizer.chat_template").expect("the GGUF has a template");
    assert!(src.contains("You are a helpful AI assistant named SmolLM, trained by Hugging Face"));
    let t = ChatTemplate::from_gguf(&m).expect("template");
    assert_eq!(t.bos_token(), "<|im_start|>");
    assert_eq!(t.eos_token(), "<|im_end|>");
    let s = t.render(&[Message::user("What is 2+2?")], true).expect("render");
    assert_eq!(
        s,
        format!("{SYSTEM}<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    );
    // The rendered prompt tokenizes to llama.cpp's ids (CASES[0]).
    assert_eq!(tokenizer().encode(&s, true).expect("encode"), CASES[0].1);
    let s = t
        .render(
            &[Message::system("Be brief."), Message::user("Hi"), Message::assistant("Hello!")],
            false,
        )
        .expect("render");
    assert_eq!(
        s,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    );
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn judge_segments_split_the_prompt() {
    let m = meta();
    let tk = Tokenizer::from_gguf(&m).expect("tokenizer");
    let t = ChatTemplate::from_gguf(&m).expect("template");
    let q = "What is the capital of France?";
    let j = judge_segments(&tk, &t, q).expect("judge");
    assert_eq!((j.yes, j.no), (10539, 5230), "Yes / No");
    let before = tk.decode(&j.before, false).expect("decode");
    let after = tk.decode(&j.after, false).expect("decode");
    assert_eq!(
        before,
        format!(
            "{SYSTEM}<|im_start|>user\nHere is a question and a response.\n\nQuestion: {q}\n\nResponse:\n"
        )
    );
    assert_eq!(
        after,
        "\n\nIs the response helpful, correct and well written? Answer with yes or no.<|im_end|>\n<|im_start|>assistant\n"
    );
    // A response generated after "<|im_start|>assistant\n" tokenizes the same on its own as
    // inside the whole judge prompt, so the segments can be concatenated with it.
    let response = "The capital of France is Paris.";
    let resp = tk.encode(response, false).expect("encode");
    let whole = tk.encode(&format!("{before}{response}{after}"), false).expect("encode");
    assert_eq!(whole, [j.before.clone(), resp, j.after.clone()].concat());
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn self_judge_segments_continue_the_policys_conversation() {
    let m = meta();
    let tk = Tokenizer::from_gguf(&m).expect("tokenizer");
    let t = ChatTemplate::from_gguf(&m).expect("template");
    let s = self_judge_segments(&tk, &t).expect("self-judge");
    assert_eq!((s.yes, s.no), (10539, 5230), "Yes / No");
    assert_eq!(
        tk.decode(&s.after, false).expect("decode"),
        "<|im_end|>\n<|im_start|>user\nIs your answer above helpful, correct and well written? Answer with yes or no.<|im_end|>\n<|im_start|>assistant\n"
    );
    // The end of the assistant's turn is the token the policy samples as its EOS.
    assert_eq!(s.after[0], 2, "<|im_end|>");
    // The policy's prompt, its answer and `after` tokenize as the whole conversation does.
    let q = "What is the capital of France?";
    let answer = "The capital of France is Paris.";
    let prompt =
        tk.encode(&t.render(&[Message::user(q)], true).expect("render"), false).expect("encode");
    let whole = t
        .render(
            &[
                Message::user(q),
                Message::assistant(answer),
                Message::user(specrej_text::judge::SELF_JUDGE_QUESTION),
            ],
            true,
        )
        .expect("render");
    let ids = [prompt, tk.encode(answer, false).expect("encode"), s.after.clone()].concat();
    assert_eq!(tk.encode(&whole, false).expect("encode"), ids);
}
