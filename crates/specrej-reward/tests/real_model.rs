//! The default model exported as a reward model. Ignored by default:
//! `cargo xtask test` sets `SPECREJ_MODEL` and runs them with `--ignored`.
#![allow(clippy::unwrap_used, reason = "tests: a failed unwrap is a failed test")]

mod common;

use std::path::PathBuf;

use common::{TempDir, close};
use specrej_candle::{IncrementalRows, LoadOptions, WeightFormat, load_gguf};
use specrej_reward::{ExportDtype, RewardModel, RewardSession, export_judge_rm};
use specrej_text::{GgufMetadata, Tokenizer};

const REASON: &str = "needs the default model: cargo xtask test sets SPECREJ_MODEL";

fn model_path() -> PathBuf {
    PathBuf::from(std::env::var_os("SPECREJ_MODEL").expect(REASON))
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn exported_judge_rm_equals_the_gguf_judge_margin() {
    let gguf = model_path();
    let dir = TempDir::new("export");
    let report = export_judge_rm(&gguf, dir.path(), ExportDtype::F32).unwrap();
    assert_eq!(report.architecture, "LlamaForSequenceClassification");
    // f32 K/V: the two layouts sum in different orders, and f16 rounding would amplify that.
    let f32 = LoadOptions {
        weights: WeightFormat::F32,
        kv: specrej_candle::KvFormat::F32,
        ..Default::default()
    };
    let rm = RewardModel::load(dir.path(), &f32).unwrap();

    // Same tokenizer: the exported tokenizer.json encodes like the GGUF tokenizer.
    let gguf_tok = Tokenizer::from_gguf(&GgufMetadata::from_path(&gguf).unwrap()).unwrap();
    for text in
        ["Give three tips for staying healthy.", "<|im_start|>user\nHi héllo 123 ✓<|im_end|>\n"]
    {
        assert_eq!(
            rm.tokenizer().encode(text, false).unwrap(),
            gguf_tok.encode(text, false).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(rm.tokenizer().token_to_id("Yes"), Some(report.yes));

    // The RM reward equals logit(Yes) − logit(No) of the GGUF model on the same ids
    // (checks tensor names, the Q/K un-permutation and the head).
    let policy = load_gguf(&gguf, &f32).unwrap();
    let mut rows = IncrementalRows::full(policy.clone());
    for response in ["Drink water, sleep well and exercise.", "", "I don't kn"] {
        let ids = rm.chat_ids("Give three tips for staying healthy.", response).unwrap();
        let (hidden, _) = rows.last_hidden(0, &ids).unwrap();
        let logits = rows.head_logits(&hidden).unwrap();
        let want = logits[report.yes as usize] - logits[report.no as usize];
        let got = rm.score_ids(&ids).unwrap();
        assert!(close(got, want, 1e-3), "{response:?}: rm {got} vs judge {want}");
    }

    // Incremental equals full on growing partial answers.
    let answer = "1. Drink plenty of water every day. 2. Sleep seven to nine hours. 3. Move: walk, run or swim.";
    let mut inc = RewardSession::new(rm.clone(), "Give three tips for staying healthy.");
    let mut full = RewardSession::full(rm.clone(), "Give three tips for staying healthy.");
    let (mut ti, mut tf) = (0, 0);
    for cut in (7..answer.len()).step_by(13) {
        let text = &answer[..cut];
        let a = inc.score_texts(&[(0, text), (1, &answer[..cut / 2])]).unwrap();
        let b = full.score_texts(&[(0, text), (1, &answer[..cut / 2])]).unwrap();
        for (x, y) in a.rewards.iter().zip(&b.rewards) {
            assert!(close(*x, *y, 1e-3), "{text:?}: {x} vs {y}");
        }
        ti += a.tokens_processed;
        tf += b.tokens_processed;
    }
    assert!(ti * 2 < tf, "{ti} vs {tf}");

    // f16 export loads too and agrees roughly.
    let dir16 = TempDir::new("export16");
    export_judge_rm(&gguf, dir16.path(), ExportDtype::F16).unwrap();
    let rm16 = RewardModel::load(dir16.path(), &f32).unwrap();
    let (a, b) = (rm16.score_text("Hi", "Hello!").unwrap(), rm.score_text("Hi", "Hello!").unwrap());
    assert!(close(a, b, 0.05), "{a} vs {b}");
}
