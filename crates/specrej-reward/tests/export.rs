//! `export_judge_rm` on a tiny GGUF written here (no model file needed): the exported RM's
//! reward equals the GGUF judge's `logit(Yes) − logit(No)`, and Q/K are un-permuted back to
//! the Hugging Face layout.
#![allow(clippy::unwrap_used, reason = "tests: a failed unwrap is a failed test")]

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use specrej_candle::{IncrementalRows, LoadOptions, WeightFormat, load_gguf};
use specrej_reward::{ExportDtype, RewardModel, export_judge_rm};
use specrej_text::{GgufMetadata, Tokenizer};

const MERGES: &[(&str, &str)] =
    &[("Y", "e"), ("Ye", "s"), ("N", "o"), (" ", "t"), ("h", "e"), (" t", "he")];

fn hf_to_gguf(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.").unwrap();
    let (layer, tail) = rest.split_once('.').unwrap();
    let tail = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unmapped {other}"),
    };
    format!("blk.{layer}.{tail}")
}

#[test]
fn exported_tiny_gguf_judge_is_the_same_model() {
    let spec = TinyRm { pad_is_im_end: false, ..TinyRm::llama() };
    let hd = spec.head_dim();
    let chars = byte_chars();
    // Vocabulary: 2 specials, 256 bytes, merges.
    let mut tokens: Vec<String> = TinyRm::specials().iter().map(|s| s.to_string()).collect();
    tokens.extend((0..256).map(|i| chars[i].to_string()));
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        let (a, b) = (a.replace(' ', "Ġ"), b.replace(' ', "Ġ"));
        tokens.push(format!("{a}{b}"));
        merges.push(format!("{a} {b}"));
    }
    let vocab = tokens.len();
    let types: Vec<Value> = (0..vocab).map(|i| Value::I32(if i < 2 { 3 } else { 1 })).collect();
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(spec.layers as u32)),
        ("llama.embedding_length".into(), Value::U32(spec.hidden as u32)),
        ("llama.attention.head_count".into(), Value::U32(spec.heads as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(spec.kv_heads as u32)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("llama.context_length".into(), Value::U32(512)),
        ("llama.feed_forward_length".into(), Value::U32(spec.ffn as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| Value::String(m.clone())).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.chat_template".into(), Value::String(CHATML.into())),
    ];
    // HF weights (vocab sized to this tokenizer), plus an lm_head; GGUF layout for Q/K.
    let mut rng = Rng(17);
    let mut weights: Vec<(String, Tensor)> = spec
        .weights()
        .into_iter()
        .filter(|(n, _, _)| n != "score.weight")
        .map(|(n, s, d)| {
            let t = Tensor::from_vec(d, s, &Device::Cpu).unwrap();
            if n == "model.embed_tokens.weight" {
                (
                    n,
                    Tensor::from_vec(
                        rng.vec(vocab * spec.hidden, 1.0, 0.0),
                        (vocab, spec.hidden),
                        &Device::Cpu,
                    )
                    .unwrap(),
                )
            } else {
                (n, t)
            }
        })
        .collect();
    weights.push((
        "lm_head.weight".into(),
        Tensor::from_vec(
            rng.vec(vocab * spec.hidden, 0.5, 0.0),
            (vocab, spec.hidden),
            &Device::Cpu,
        )
        .unwrap(),
    ));
    let mut qtensors = Vec::new();
    for (name, t) in &weights {
        let t = if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
            let (rows, cols) = t.dims2().unwrap();
            t.reshape((rows / hd, 2, hd / 2, cols))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((rows, cols))
                .unwrap()
        } else {
            t.clone()
        };
        qtensors.push((hf_to_gguf(name), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let dir = TempDir::new("tinygguf");
    let gguf = dir.path().join("tiny.gguf");
    {
        let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(&gguf).unwrap();
        gguf_file::write(&mut f, &md, &ts).unwrap();
    }

    let out = dir.path().join("rm");
    let report = export_judge_rm(&gguf, &out, ExportDtype::F32).unwrap();
    assert_eq!(report.architecture, "LlamaForSequenceClassification");
    // f32 K/V: the two layouts sum in different orders, and f16 rounding would amplify that.
    let f32 = LoadOptions {
        weights: WeightFormat::F32,
        kv: specrej_candle::KvFormat::F32,
        ..Default::default()
    };
    let rm = RewardModel::load(&out, &f32).unwrap();
    let gguf_tok = Tokenizer::from_gguf(&GgufMetadata::from_path(&gguf).unwrap()).unwrap();
    assert_eq!(Some(report.yes), gguf_tok.single_token("Yes"));
    assert_eq!(Some(report.no), gguf_tok.single_token("No"));
    let text = "<|im_start|>user\nYes or No? the theme<|im_end|>\n";
    assert_eq!(rm.tokenizer().encode(text, false).unwrap(), gguf_tok.encode(text, false).unwrap());

    // Q/K are back in the HF layout: the exported tensors equal the originals.
    let saved =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &weights {
        if name == "lm_head.weight" {
            assert!(!saved.contains_key(name));
            continue;
        }
        let diff = (saved[name].to_dtype(DType::F32).unwrap() - t)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }

    // The reward is the GGUF judge's margin on the same ids.
    let judge = load_gguf(&gguf, &f32).unwrap();
    let mut rows = IncrementalRows::full(judge);
    for response in ["", "the theme", "Yes! No."] {
        let ids = rm.chat_ids("Is it?", response).unwrap();
        let (hidden, _) = rows.last_hidden(0, &ids).unwrap();
        let logits = rows.head_logits(&hidden).unwrap();
        let want = logits[report.yes as usize] - logits[report.no as usize];
        let got = rm.score_ids(&ids).unwrap();
        // The same model, but not the same arithmetic: the HF layout orders each head's
        // dimensions differently (rotate-half RoPE), so the q·k sums run in another order,
        // and the RM's head is the difference of the judge's two rows summed in f64.
        assert!(close(got, want, 1e-5), "{response:?}: {got} vs {want}");
    }
}
