//! Tests on tiny random models written to a temporary directory, plus (ignored) tests on
//! the real default model.
#![allow(clippy::unwrap_used, reason = "tests: a failed unwrap is a failed test")]

mod cuda;
mod decoding;
mod loading;
mod real_model;
mod scoring;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device as CDevice, Tensor};
use specrej_core::{Decoder, Sampling, block_on_ready};

use crate::{Architecture, CandleDecoder, KvFormat, LoadOptions, Model, WeightFormat};

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("specrej-candle-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Shape of a tiny test model.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tiny {
    pub arch: Architecture,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
    pub tied: bool,
    pub seed: u64,
}

impl Default for Tiny {
    fn default() -> Self {
        Self {
            arch: Architecture::Llama,
            vocab: 64,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 96,
            context: 256,
            tied: false,
            seed: 1,
        }
    }
}

/// Deterministic uniform numbers (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn tensor(&mut self, shape: &[usize], scale: f32, offset: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * self.next_f32()).collect();
        Tensor::from_vec(data, shape, &CDevice::Cpu).unwrap()
    }
}

impl Tiny {
    pub(crate) fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Random weights under Hugging Face names.
    pub(crate) fn weights(&self) -> HashMap<String, Tensor> {
        let mut rng = Rng(self.seed);
        let (h, hd, f) = (self.hidden, self.head_dim(), self.ffn);
        let lin = |rng: &mut Rng, out: usize, inp: usize| {
            rng.tensor(&[out, inp], 1.5 / (inp as f32).sqrt(), 0.0)
        };
        let mut w = HashMap::new();
        w.insert("model.embed_tokens.weight".to_string(), rng.tensor(&[self.vocab, h], 1.0, 0.0));
        for i in 0..self.layers {
            let p = format!("model.layers.{i}.");
            w.insert(format!("{p}input_layernorm.weight"), rng.tensor(&[h], 0.2, 1.0));
            w.insert(format!("{p}self_attn.q_proj.weight"), lin(&mut rng, self.heads * hd, h));
            w.insert(format!("{p}self_attn.k_proj.weight"), lin(&mut rng, self.kv_heads * hd, h));
            w.insert(format!("{p}self_attn.v_proj.weight"), lin(&mut rng, self.kv_heads * hd, h));
            w.insert(format!("{p}self_attn.o_proj.weight"), lin(&mut rng, h, self.heads * hd));
            if self.arch == Architecture::Qwen2 {
                w.insert(
                    format!("{p}self_attn.q_proj.bias"),
                    rng.tensor(&[self.heads * hd], 0.3, 0.0),
                );
                w.insert(
                    format!("{p}self_attn.k_proj.bias"),
                    rng.tensor(&[self.kv_heads * hd], 0.3, 0.0),
                );
                w.insert(
                    format!("{p}self_attn.v_proj.bias"),
                    rng.tensor(&[self.kv_heads * hd], 0.3, 0.0),
                );
            }
            w.insert(format!("{p}post_attention_layernorm.weight"), rng.tensor(&[h], 0.2, 1.0));
            w.insert(format!("{p}mlp.gate_proj.weight"), lin(&mut rng, f, h));
            w.insert(format!("{p}mlp.up_proj.weight"), lin(&mut rng, f, h));
            w.insert(format!("{p}mlp.down_proj.weight"), lin(&mut rng, h, f));
        }
        w.insert("model.norm.weight".to_string(), rng.tensor(&[h], 0.2, 1.0));
        if !self.tied {
            w.insert("lm_head.weight".to_string(), lin(&mut rng, self.vocab, h));
        }
        w
    }

    pub(crate) fn hf_config(&self) -> serde_json::Value {
        let arch = match self.arch {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        };
        serde_json::json!({
            "architectures": [arch],
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.context,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
        })
    }

    /// Writes `config.json` + safetensors (in `shards` files) into `dir`.
    pub(crate) fn write_safetensors(&self, dir: &Path, shards: usize) {
        std::fs::write(dir.join("config.json"), self.hf_config().to_string()).unwrap();
        let weights = self.weights();
        if shards <= 1 {
            candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
            return;
        }
        let mut names: Vec<&String> = weights.keys().collect();
        names.sort();
        let mut map = serde_json::Map::new();
        for s in 0..shards {
            let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
            let part: HashMap<String, Tensor> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| i % shards == s)
                .map(|(_, n)| {
                    map.insert((*n).clone(), serde_json::Value::String(file.clone()));
                    ((*n).clone(), weights[*n].clone())
                })
                .collect();
            candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }

    /// GGUF metadata entries for this model under architecture name `arch`.
    pub(crate) fn gguf_metadata(&self, arch: &str) -> Vec<(String, Value)> {
        let tokens: Vec<Value> = (0..self.vocab).map(|i| Value::String(format!("t{i}"))).collect();
        vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (format!("{arch}.block_count"), Value::U32(self.layers as u32)),
            (format!("{arch}.embedding_length"), Value::U32(self.hidden as u32)),
            (format!("{arch}.attention.head_count"), Value::U32(self.heads as u32)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(self.kv_heads as u32)),
            (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
            (format!("{arch}.context_length"), Value::U32(self.context as u32)),
            (format!("{arch}.feed_forward_length"), Value::U32(self.ffn as u32)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ]
    }

    /// The weights under GGUF names, Q/K permuted as llama.cpp's converter does for
    /// llama-style architectures.
    pub(crate) fn gguf_tensors(&self, dtype: GgmlDType) -> Vec<(String, QTensor)> {
        let weights = self.weights();
        let hd = self.head_dim();
        let permute = self.arch != Architecture::Qwen2;
        let mut out = Vec::new();
        let mut names: Vec<&String> = weights.keys().collect();
        names.sort();
        for name in names {
            let t = &weights[name];
            let gguf_name = hf_to_gguf(name);
            let t = if permute
                && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight"))
            {
                let (rows, cols) = t.dims2().unwrap();
                let n_head = rows / hd;
                t.reshape((n_head, 2, hd / 2, cols))
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
            let quantize = t.rank() == 2 && t.dims()[1] % dtype.block_size() == 0;
            let q = QTensor::quantize(&t, if quantize { dtype } else { GgmlDType::F32 }).unwrap();
            out.push((gguf_name, q));
        }
        out
    }

    /// Writes a GGUF file with matrices stored as `dtype` (norms and biases as F32).
    pub(crate) fn write_gguf(&self, path: &Path, dtype: GgmlDType) {
        let arch = self.arch.to_string();
        write_gguf_parts(path, &self.gguf_metadata(&arch), &self.gguf_tensors(dtype));
    }
}

pub(crate) fn write_gguf_parts(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) {
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md, &ts).unwrap();
}

fn hf_to_gguf(name: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    for (hf, gg) in fixed {
        if name == hf {
            return gg.to_string();
        }
    }
    let rest = name.strip_prefix("model.layers.").unwrap();
    let (layer, tail) = rest.split_once('.').unwrap();
    let tail = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unmapped tensor {other}"),
    };
    format!("blk.{layer}.{tail}")
}

/// A tiny model written as GGUF (`dtype` matrices) and loaded with `format` (f16 K/V).
pub(crate) fn tiny_gguf(
    spec: &Tiny,
    dtype: GgmlDType,
    format: WeightFormat,
) -> (TempDir, Arc<Model>) {
    tiny_gguf_kv(spec, dtype, format, KvFormat::default())
}

/// [`tiny_gguf`] with the K/V stored as `kv`.
pub(crate) fn tiny_gguf_kv(
    spec: &Tiny,
    dtype: GgmlDType,
    format: WeightFormat,
    kv: KvFormat,
) -> (TempDir, Arc<Model>) {
    let dir = TempDir::new("gguf");
    let path = dir.path().join("tiny.gguf");
    spec.write_gguf(&path, dtype);
    let model = crate::load_gguf(&path, &LoadOptions { weights: format, kv, ..Default::default() })
        .unwrap();
    (dir, model)
}

/// A tiny model written as safetensors and loaded with `format`.
pub(crate) fn tiny_safetensors(spec: &Tiny, format: WeightFormat) -> (TempDir, Arc<Model>) {
    let dir = TempDir::new("st");
    spec.write_safetensors(dir.path(), 1);
    let model =
        crate::load_safetensors(dir.path(), &LoadOptions { weights: format, ..Default::default() })
            .unwrap();
    (dir, model)
}

pub(crate) fn sampling(temperature: f32) -> Sampling {
    Sampling { seed: 11, temperature, top_k: 0, top_p: 1.0 }
}

/// Per step: the sampled tokens and the logits they were drawn from (`[rows, vocab]`).
pub(crate) struct Trace {
    pub tokens: Vec<Vec<u32>>,
    pub logits: Vec<Vec<f32>>,
}

/// Runs `steps` steps for rows `ids`, recording tokens and logits.
pub(crate) fn trace(
    model: &Arc<Model>,
    prompt: &[u32],
    ids: std::ops::Range<u32>,
    s: &Sampling,
    steps: usize,
) -> Trace {
    let mut dec = CandleDecoder::new(model.clone(), 1 << 30);
    let mut batch = dec.prefill(prompt, ids, s).unwrap();
    let mut out = Trace { tokens: Vec::new(), logits: Vec::new() };
    for _ in 0..steps {
        // The logits the step samples from, looked at first.
        out.logits.push(dec.peek_logits(&batch).unwrap());
        out.tokens.push(block_on_ready(dec.step(&mut batch)).unwrap());
    }
    out
}

pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
