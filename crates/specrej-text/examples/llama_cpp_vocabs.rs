//! Cross-check against llama.cpp's tokenizer test vectors (`models/ggml-vocab-*.gguf` with their
//! `.inp`/`.out` files, from a llama.cpp source tree; not shipped here).
//!
//! llama.cpp ships no `.inp`/`.out` for baichuan, gpt-neox and aquila; we made them from
//! llama-bpe's `.inp` with llama-cpp-python 0.3.36 (`tokenize(s, add_bos=False, special=False)`).
//! Vocabularies without them are skipped.
//!
//! A manual check (the vocabularies are not shipped, so it is no test):
//! `cargo run -p specrej-text --example llama_cpp_vocabs -- /path/to/llama.cpp/models`.
//! Exits non-zero when any vocabulary differs.

use specrej_text::{GgufMetadata, Tokenizer};

/// Vocabularies expected to match llama.cpp exactly.
const EXACT: &[&str] = &[
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "starcoder",
    "refact",
    "command-r",
    "falcon",
    "mpt",
    "deepseek-coder",
    "deepseek-llm",
    "llama-spm",
    "phi-3",
    "baichuan",
    "gpt-neox",
    "aquila",
];

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: llama_cpp_vocabs <llama.cpp/models folder>");
        std::process::exit(2);
    };
    let mut failures = Vec::new();
    for name in EXACT {
        let base = format!("{dir}/ggml-vocab-{name}.gguf");
        let (Ok(inp), Ok(out)) = (
            std::fs::read_to_string(format!("{base}.inp")),
            std::fs::read_to_string(format!("{base}.out")),
        ) else {
            println!("{name}: skipped (no .inp/.out)");
            continue;
        };
        let meta = GgufMetadata::from_path(&base).expect("gguf");
        let tk = match Tokenizer::from_gguf(&meta) {
            Ok(tk) => tk,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let inputs: Vec<&str> = inp
            .strip_suffix("\n__ggml_vocab_test__\n")
            .expect("format")
            .split("\n__ggml_vocab_test__\n")
            .collect();
        let outputs: Vec<Vec<u32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse().expect("id")).collect())
            .collect();
        assert_eq!(inputs.len(), outputs.len(), "{name}");
        let mut bad = 0;
        for (text, want) in inputs.iter().zip(&outputs) {
            let got = tk.encode(text, false).expect("encode");
            if &got != want {
                bad += 1;
                println!("{name}: {text:?}\n  want {want:?}\n  got  {got:?}");
            }
        }
        println!("{name}: {}/{} match", inputs.len() - bad, inputs.len());
        if bad > 0 {
            failures.push(format!("{name}: {bad} of {} differ", inputs.len()));
        }
    }
    if !failures.is_empty() {
        eprintln!("{failures:#?}");
        std::process::exit(1);
    }
}
