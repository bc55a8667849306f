//! Tiny reward models in Hugging Face format, written to temporary directories, and a
//! naive reference forward to check them against.
#![allow(
    dead_code,
    clippy::unwrap_used,
    reason = "tests: each binary uses a different subset, and a failed unwrap is a failed test"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("specrej-reward-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GPT-2's byte → printable character map.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> =
        (u32::from('!')..=u32::from('~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// A byte-level BPE `tokenizer.json`: `specials` first (ids 0..), then the 256 byte tokens
/// (in `rotate`d order), then one token per merge.
pub fn tokenizer_json(specials: &[&str], merges: &[(&str, &str)], rotate: usize) -> String {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    let mut id = 0u32;
    let mut added = Vec::new();
    for s in specials {
        vocab.insert((*s).into(), id.into());
        added.push(
            serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
        );
        id += 1;
    }
    for i in 0..256 {
        let c = chars[(i + rotate) % 256];
        vocab.insert(c.to_string(), id.into());
        id += 1;
    }
    let mut merge_list = Vec::new();
    for (a, b) in merges {
        let (a, b) = (a.replace(' ', "Ġ"), b.replace(' ', "Ġ"));
        vocab.insert(format!("{a}{b}"), id.into());
        id += 1;
        merge_list.push(format!("{a} {b}"));
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merge_list}
    })
    .to_string()
}

pub const RM_MERGES: &[(&str, &str)] = &[
    ("h", "e"),
    (" ", "t"),
    (" t", "he"),
    ("i", "n"),
    (" ", "a"),
    ("e", "r"),
    ("o", "n"),
    (" ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("e", "s"),
    (" ", "w"),
    ("in", "g"),
    (" a", "n"),
    (" an", "d"),
    (" ", "c"),
];
pub const POLICY_MERGES: &[(&str, &str)] =
    &[(" ", "t"), ("h", "e"), ("e", "r"), ("o", "u"), (" ", "h"), (" h", "e")];

pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The policy's tokenizer for tests: EOS `<|endoftext|>` at id 0 (the fake decoder's EOS),
/// the byte tokens at 1..=256, then a few merges; its ids differ from the RM's.
pub fn policy_tokenizer() -> specrej_text::Tokenizer {
    let json = tokenizer_json(&["<|endoftext|>"], POLICY_MERGES, 7);
    specrej_text::Tokenizer::from_tokenizer_json(json.as_bytes()).unwrap()
}

/// Deterministic uniform numbers in [-1, 1) (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next_f32()).collect()
    }
}

/// A tiny sequence-classification RM.
#[derive(Clone, Debug)]
pub struct TinyRm {
    pub arch: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub bias: bool,
    pub pad_is_im_end: bool,
    pub seed: u64,
}

impl TinyRm {
    pub fn llama() -> Self {
        Self {
            arch: "LlamaForSequenceClassification",
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 96,
            bias: false,
            pad_is_im_end: true,
            seed: 3,
        }
    }
    pub fn qwen2() -> Self {
        Self {
            arch: "Qwen2ForSequenceClassification",
            bias: true,
            pad_is_im_end: false,
            seed: 5,
            ..Self::llama()
        }
    }
    pub fn specials() -> [&'static str; 2] {
        ["<|im_start|>", "<|im_end|>"]
    }
    pub fn vocab(&self) -> usize {
        2 + 256 + RM_MERGES.len()
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Weights as (name, shape, data).
    pub fn weights(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut rng = Rng(self.seed);
        let (h, hd, f, v) = (self.hidden, self.head_dim(), self.ffn, self.vocab());
        let mut w = Vec::new();
        let lin = |w: &mut Vec<_>, rng: &mut Rng, name: String, out: usize, inp: usize| {
            w.push((name, vec![out, inp], rng.vec(out * inp, 1.5 / (inp as f32).sqrt(), 0.0)));
        };
        w.push(("model.embed_tokens.weight".into(), vec![v, h], rng.vec(v * h, 1.0, 0.0)));
        for i in 0..self.layers {
            let p = format!("model.layers.{i}.");
            w.push((format!("{p}input_layernorm.weight"), vec![h], rng.vec(h, 0.2, 1.0)));
            lin(&mut w, &mut rng, format!("{p}self_attn.q_proj.weight"), self.heads * hd, h);
            lin(&mut w, &mut rng, format!("{p}self_attn.k_proj.weight"), self.kv_heads * hd, h);
            lin(&mut w, &mut rng, format!("{p}self_attn.v_proj.weight"), self.kv_heads * hd, h);
            lin(&mut w, &mut rng, format!("{p}self_attn.o_proj.weight"), h, self.heads * hd);
            if self.bias {
                w.push((
                    format!("{p}self_attn.q_proj.bias"),
                    vec![self.heads * hd],
                    rng.vec(self.heads * hd, 0.3, 0.0),
                ));
                w.push((
                    format!("{p}self_attn.k_proj.bias"),
                    vec![self.kv_heads * hd],
                    rng.vec(self.kv_heads * hd, 0.3, 0.0),
                ));
                w.push((
                    format!("{p}self_attn.v_proj.bias"),
                    vec![self.kv_heads * hd],
                    rng.vec(self.kv_heads * hd, 0.3, 0.0),
                ));
            }
            w.push((format!("{p}post_attention_layernorm.weight"), vec![h], rng.vec(h, 0.2, 1.0)));
            lin(&mut w, &mut rng, format!("{p}mlp.gate_proj.weight"), f, h);
            lin(&mut w, &mut rng, format!("{p}mlp.up_proj.weight"), f, h);
            lin(&mut w, &mut rng, format!("{p}mlp.down_proj.weight"), h, f);
        }
        w.push(("model.norm.weight".into(), vec![h], rng.vec(h, 0.2, 1.0)));
        w.push(("score.weight".into(), vec![1, h], rng.vec(h, 1.0, 0.0)));
        w
    }

    pub fn config(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": [self.arch],
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 512,
            "vocab_size": self.vocab(),
            "id2label": {"0": "LABEL_0"},
        });
        if self.pad_is_im_end {
            c["pad_token_id"] = 1.into();
        }
        c
    }

    pub fn tensors(&self, dtype: DType) -> HashMap<String, Tensor> {
        self.weights()
            .into_iter()
            .map(|(n, s, d)| {
                (n, Tensor::from_vec(d, s, &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
            })
            .collect()
    }

    /// Writes a complete RM directory (single safetensors file).
    pub fn write(&self, dir: &Path, dtype: DType) {
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        candle_core::safetensors::save(&self.tensors(dtype), dir.join("model.safetensors"))
            .unwrap();
        self.write_tokenizer(dir);
    }

    pub fn write_tokenizer(&self, dir: &Path) {
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json(&Self::specials(), RM_MERGES, 0))
            .unwrap();
        let cfg = serde_json::json!({"chat_template": CHATML, "bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }

    /// Writes the weights in `shards` files with an index.
    pub fn write_sharded(&self, dir: &Path, dtype: DType, shards: usize) {
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        self.write_tokenizer(dir);
        let tensors = self.tensors(dtype);
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut map = serde_json::Map::new();
        for s in 0..shards {
            let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
            let part: HashMap<String, Tensor> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| i % shards == s)
                .map(|(_, n)| {
                    map.insert((*n).clone(), file.clone().into());
                    ((*n).clone(), tensors[*n].clone())
                })
                .collect();
            candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }

    /// The reward of `ids` by a naive f64 forward written from the HF definitions.
    pub fn reference_reward(&self, ids: &[u32]) -> f32 {
        let w: HashMap<String, Vec<f32>> =
            self.weights().into_iter().map(|(n, _, d)| (n, d)).collect();
        let g = |n: &str| -> Vec<f64> { w[n].iter().map(|&x| f64::from(x)).collect() };
        let (h, hd, f) = (self.hidden, self.head_dim(), self.ffn);
        let eps = 1e-5f64;
        let t = ids.len();
        let rms = |x: &[f64], wt: &[f64]| -> Vec<f64> {
            let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
            let r = 1.0 / (ms + eps).sqrt();
            x.iter().zip(wt).map(|(v, w)| v * r * w).collect()
        };
        let matvec = |m: &[f64], x: &[f64], out: usize| -> Vec<f64> {
            (0..out)
                .map(|o| m[o * x.len()..(o + 1) * x.len()].iter().zip(x).map(|(a, b)| a * b).sum())
                .collect()
        };
        let emb = g("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> =
            ids.iter().map(|&i| emb[i as usize * h..(i as usize + 1) * h].to_vec()).collect();
        let rope = |v: &mut [f64], pos: usize| {
            let half = hd / 2;
            for i in 0..half {
                let freq = 10000f64.powf(-(2.0 * i as f64) / hd as f64);
                let (s, c) = (pos as f64 * freq).sin_cos();
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        };
        for l in 0..self.layers {
            let p = format!("model.layers.{l}.");
            let (wq, wk, wv, wo) = (
                g(&format!("{p}self_attn.q_proj.weight")),
                g(&format!("{p}self_attn.k_proj.weight")),
                g(&format!("{p}self_attn.v_proj.weight")),
                g(&format!("{p}self_attn.o_proj.weight")),
            );
            let bias = |n: &str, len: usize| {
                if self.bias { g(&format!("{p}self_attn.{n}_proj.bias")) } else { vec![0.0; len] }
            };
            let (bq, bk, bv) = (
                bias("q", self.heads * hd),
                bias("k", self.kv_heads * hd),
                bias("v", self.kv_heads * hd),
            );
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let n = rms(x, &g(&format!("{p}input_layernorm.weight")));
                let mut q: Vec<f64> =
                    matvec(&wq, &n, self.heads * hd).iter().zip(&bq).map(|(a, b)| a + b).collect();
                let mut k: Vec<f64> = matvec(&wk, &n, self.kv_heads * hd)
                    .iter()
                    .zip(&bk)
                    .map(|(a, b)| a + b)
                    .collect();
                let v: Vec<f64> = matvec(&wv, &n, self.kv_heads * hd)
                    .iter()
                    .zip(&bv)
                    .map(|(a, b)| a + b)
                    .collect();
                for hh in 0..self.heads {
                    rope(&mut q[hh * hd..(hh + 1) * hd], pos);
                }
                for hh in 0..self.kv_heads {
                    rope(&mut k[hh * hd..(hh + 1) * hd], pos);
                }
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            let group = self.heads / self.kv_heads;
            for pos in 0..t {
                let mut att_out = vec![0.0; self.heads * hd];
                for hh in 0..self.heads {
                    let kvh = hh / group;
                    let q = &qs[pos][hh * hd..(hh + 1) * hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|j| {
                            q.iter()
                                .zip(&ks[j][kvh * hd..(kvh + 1) * hd])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for d in 0..hd {
                            att_out[hh * hd + d] += ej / z * vs[j][kvh * hd + d];
                        }
                    }
                }
                let o = matvec(&wo, &att_out, h);
                for d in 0..h {
                    xs[pos][d] += o[d];
                }
            }
            for x in xs.iter_mut() {
                let n = rms(x, &g(&format!("{p}post_attention_layernorm.weight")));
                let gate = matvec(&g(&format!("{p}mlp.gate_proj.weight")), &n, f);
                let up = matvec(&g(&format!("{p}mlp.up_proj.weight")), &n, f);
                let a: Vec<f64> =
                    gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let d = matvec(&g(&format!("{p}mlp.down_proj.weight")), &a, h);
                for k in 0..h {
                    x[k] += d[k];
                }
            }
        }
        let last = rms(&xs[t - 1], &g("model.norm.weight"));
        last.iter().zip(g("score.weight")).map(|(a, b)| a * b).sum::<f64>() as f32
    }
}

pub fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1.0)
}
