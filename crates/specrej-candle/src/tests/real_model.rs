//! Tests on the default model (SmolLM2-135M-Instruct Q4_1). Ignored by default:
//! `cargo xtask test` sets `SPECREJ_MODEL` and runs them with `--ignored`.

use std::collections::HashMap;

use specrej_core::{Decoder, Response, Scorer, block_on_ready};

use super::*;
use crate::{LikelihoodScorer, load_gguf};

const REASON: &str = "needs the default model: cargo xtask test sets SPECREJ_MODEL";

fn model_path() -> PathBuf {
    PathBuf::from(std::env::var_os("SPECREJ_MODEL").expect(REASON))
}

fn load(format: WeightFormat) -> Arc<Model> {
    load_gguf(model_path(), &LoadOptions { weights: format, ..Default::default() }).unwrap()
}

/// Crude GPT-2-style word lookup in the GGUF vocabulary (`Ġ` = leading space, `Ċ` = newline).
struct Vocab(HashMap<String, u32>, Vec<String>);

impl Vocab {
    fn new(model: &Model) -> Self {
        let tokens = model.vocab().expect("tokenizer.ggml.tokens").to_vec();
        Self(tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect(), tokens)
    }
    /// Greedy longest-match tokenization of byte-level text (not exact BPE, but valid ids).
    fn encode(&self, text: &str) -> Vec<u32> {
        let chars: Vec<char> = text
            .chars()
            .map(|c| match c {
                ' ' => 'Ġ',
                '\n' => 'Ċ',
                c => c,
            })
            .collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let (len, id) = (1..=(chars.len() - i).min(24))
                .rev()
                .find_map(|n| {
                    self.0.get(&chars[i..i + n].iter().collect::<String>()).map(|&id| (n, id))
                })
                .unwrap_or_else(|| panic!("cannot encode {:?}", chars[i]));
            out.push(id);
            i += len;
        }
        out
    }
    fn text(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| self.1[i as usize].replace('Ġ', " ").replace('Ċ', "\n")).collect()
    }
}

/// `<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n`
fn chat_prompt(v: &Vocab) -> Vec<u32> {
    let mut p = vec![1];
    p.extend(v.encode("user\nWhat is the capital of France?"));
    p.push(2);
    p.extend(v.encode("\n"));
    p.push(1);
    p.extend(v.encode("assistant\n"));
    p
}

fn generate(
    model: &Arc<Model>,
    prompt: &[u32],
    ids: std::ops::Range<u32>,
    s: &Sampling,
    steps: usize,
) -> Vec<Vec<u32>> {
    let mut dec = CandleDecoder::new(model.clone(), 1 << 30);
    let mut batch = dec.prefill(prompt, ids.clone(), s).unwrap();
    let mut rows = vec![Vec::new(); ids.len()];
    for _ in 0..steps {
        for (r, t) in block_on_ready(dec.step(&mut batch)).unwrap().into_iter().enumerate() {
            rows[r].push(t);
        }
    }
    rows
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn real_model_rows_are_independent() {
    let model = load(WeightFormat::default());
    let v = Vocab::new(&model);
    let prompt = chat_prompt(&v);
    let greedy = Sampling { temperature: 0.0, ..Sampling::default() };
    let batch = generate(&model, &prompt, 0..8, &greedy, 64);
    let alone = generate(&model, &prompt, 5..6, &greedy, 64);
    assert_eq!(batch[5], alone[0]);
    // Sampled rows diverge, and still each equals its run alone.
    let sampled = Sampling::default();
    let batch = generate(&model, &prompt, 0..8, &sampled, 32);
    for row in [0u32, 6] {
        let alone = generate(&model, &prompt, row..row + 1, &sampled, 32);
        assert_eq!(batch[row as usize], alone[0], "row {row}");
    }
    assert!(batch.windows(2).any(|w| w[0] != w[1]));
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn real_model_greedy_answer_is_coherent() {
    for format in [WeightFormat::default(), WeightFormat::Native] {
        let model = load(format);
        let c = model.config();
        assert_eq!(c.architecture, Architecture::Llama);
        assert!(!c.eos_token_ids.is_empty(), "EOS id missing from the metadata");
        assert!(c.tied_embeddings);
        let v = Vocab::new(&model);
        assert_eq!(v.1[1], "<|im_start|>");
        assert_eq!(v.1[2], "<|im_end|>");
        let prompt = chat_prompt(&v);
        let out = generate(
            &model,
            &prompt,
            0..1,
            &Sampling { temperature: 0.0, ..Sampling::default() },
            24,
        )
        .remove(0);
        let end = out.iter().position(|t| c.eos_token_ids.contains(t)).unwrap_or(out.len());
        let text = v.text(&out[..end]);
        eprintln!("{format:?}: {text:?}");
        assert!(out.windows(2).any(|w| w[0] != w[1]), "degenerate output {out:?}");
        assert!(text.contains("Paris"), "{format:?}: unexpected answer {text:?}");
    }
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn real_model_likelihood_prefers_sense() {
    let model = load(WeightFormat::default());
    let v = Vocab::new(&model);
    let prompt = chat_prompt(&v);
    let good = v.encode("The capital of France is Paris.");
    let bad = v.encode("France the of is capital the?");
    let mut scorer = LikelihoodScorer::new(model);
    let rs = [Response { row: 0, tokens: &good }, Response { row: 1, tokens: &bad }];
    let s = block_on_ready(scorer.score(&prompt, &rs)).unwrap();
    assert!(s.rewards[0] > s.rewards[1], "{:?}", s.rewards);
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn loading_from_bytes_gives_the_same_logits_as_loading_from_the_path() {
    let bytes = std::fs::read(model_path()).unwrap();
    for format in [WeightFormat::default(), WeightFormat::Native] {
        let options = LoadOptions { weights: format, ..Default::default() };
        let from_path = load_gguf(model_path(), &options).unwrap();
        let from_bytes = crate::load_gguf_bytes(&bytes, &options).unwrap();
        assert_eq!(from_path.config(), from_bytes.config());
        assert_eq!(from_path.vocab(), from_bytes.vocab());
        let prompt = chat_prompt(&Vocab::new(&from_path));
        let logits = |model: &Arc<Model>| {
            let mut dec = CandleDecoder::new(model.clone(), 1 << 30);
            let batch = dec.prefill(&prompt, 0..1, &Sampling::default()).unwrap();
            dec.peek_logits(&batch).unwrap()
        };
        let (a, b) = (logits(&from_path), logits(&from_bytes));
        assert_eq!(a.len(), from_path.config().vocab_size);
        assert_eq!(a, b, "{format:?}: logits differ");
    }
    // Not a GGUF file: the same error as from a path, naming the buffer.
    let err = crate::load_gguf_bytes(b"nope, not gguf", &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, crate::LoadError::NotGguf { .. }), "{err}");
    assert!(err.to_string().contains("<memory>"), "{err}");
}
