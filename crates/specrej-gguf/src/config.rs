//! A Llama-family model's hyper-parameters, and the one set of rules that says they are
//! usable: every backend takes them from here, so a file one backend refuses as invalid every
//! backend refuses, with the same message. (A backend's own limits, such as the WebGPU
//! kernels' head width, are that backend's checks, reported as unsupported, not invalid.)

use std::fmt;

use crate::{GgufError, GgufMetadata, GgufValue, TensorTable};

/// The longest context a model may declare: 2^24 (16M) positions, far above any real model
/// (Llama 3.1's is 128k), low enough that per-position tables stay finite.
pub const MAX_CONTEXT_LENGTH: usize = 1 << 24;

/// The context length of a GGUF file that does not declare one.
pub const DEFAULT_CONTEXT_LENGTH: usize = 4096;

/// The upper bounds of [`ModelConfig::validate`], each well above every real Llama-family
/// model (Llama 3 405B: hidden 16384, 126 layers, 128 heads of 128, FFN 53248; vocabularies
/// up to ~256k) and below what would let a corrupt header ask for absurd buffers.
const CAPS: [(&str, usize); 8] = [
    ("vocab_size", 1 << 22),
    ("hidden_size", 1 << 16),
    ("layers", 1 << 10),
    ("heads", 1 << 10),
    ("kv_heads", 1 << 10),
    ("head_dim", 1 << 12),
    ("ffn_size", 1 << 18),
    ("context_length", MAX_CONTEXT_LENGTH),
];

/// The most query heads × head width (the attention's width; Llama 3 405B's is 16384).
const MAX_ATTENTION_WIDTH: usize = 1 << 16;

/// Which member of the Llama family a model is. They share one forward pass; the differences
/// are q/k/v biases (Qwen2) and the RoPE layout of GGUF files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, TinyLlama, …
    Llama,
    /// Mistral 7B-style (sliding window ignored: all positions attend to all).
    Mistral,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// The architecture `general.architecture` names, if specrej implements it.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// The name GGUF files use (`general.architecture`, and the prefix of their keys).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// A rule of [`ModelConfig::validate`] that a config breaks: the field (a [`ModelConfig`]
/// field name) and why. Loaders turn the field into their file's key
/// ([`ModelConfig::gguf_key`] for GGUF).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The [`ModelConfig`] field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Hyper-parameters of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The family member.
    pub architecture: Architecture,
    /// Rows of the embedding / output matrix.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` for plain multi-head attention, fewer for GQA).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the SwiGLU hidden layer.
    pub ffn_size: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// Beginning-of-sequence token, if the file names one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end a response (EOS, and end-of-turn where the file names one).
    pub eos_token_ids: Vec<u32>,
    /// Whether RoPE rotates interleaved pairs (GGUF llama/mistral files, whose Q and K rows
    /// llama.cpp permuted) rather than halves (qwen2 files, Hugging Face checkpoints).
    pub rope_interleaved: bool,
    /// Whether the output projection reuses the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
}

impl ModelConfig {
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Bytes of f32 K/V cache one cached token takes over all layers (an f16 cache takes half).
    pub fn kv_bytes_per_token(&self) -> usize {
        (2 * 4usize)
            .saturating_mul(self.layers)
            .saturating_mul(self.kv_heads)
            .saturating_mul(self.head_dim)
    }

    /// The head width when the file does not give one: `hidden / heads`, if `heads` divides
    /// `hidden` (otherwise the file must say).
    pub fn derived_head_dim(hidden_size: usize, heads: usize) -> Option<usize> {
        (heads > 0 && hidden_size.is_multiple_of(heads)).then(|| hidden_size / heads)
    }

    /// Checks the numbers are a usable Llama-family model: the one set of rules every backend
    /// applies, whatever the file format.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, reason: String| Err(ConfigError { field, reason });
        let values = [
            self.vocab_size,
            self.hidden_size,
            self.layers,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.ffn_size,
            self.context_length,
        ];
        for ((field, cap), value) in CAPS.into_iter().zip(values) {
            if value == 0 {
                return bad(field, "must be positive".into());
            }
            if value > cap {
                return bad(field, format!("{value} is implausibly large (at most {cap})"));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(
                "kv_heads",
                format!(
                    "{} query heads are not a multiple of {} kv heads",
                    self.heads, self.kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("head_dim", format!("{} is odd; RoPE needs pairs", self.head_dim));
        }
        let width = self.heads * self.head_dim; // ≤ 2^10 · 2^12: no overflow
        if width > MAX_ATTENTION_WIDTH {
            return bad(
                "heads",
                format!(
                    "{} heads of {} ({width} wide) is implausibly large (at most {MAX_ATTENTION_WIDTH})",
                    self.heads, self.head_dim
                ),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", format!("{} is not a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(
                "rms_norm_eps",
                format!("{} is not a non-negative number", self.rms_norm_eps),
            );
        }
        Ok(())
    }

    /// The GGUF metadata key that holds `field` (a [`ModelConfig`] field) for `arch`.
    pub fn gguf_key(arch: Architecture, field: &str) -> String {
        let suffix = match field {
            "hidden_size" => "embedding_length",
            "layers" => "block_count",
            "heads" => "attention.head_count",
            "kv_heads" => "attention.head_count_kv",
            "head_dim" => "attention.key_length",
            "ffn_size" => "feed_forward_length",
            "rope_theta" => "rope.freq_base",
            "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
            other => other, // vocab_size, context_length
        };
        format!("{arch}.{suffix}")
    }

    /// Reads the hyper-parameters from GGUF metadata (the vocabulary size from the rows of
    /// `token_embd.weight`, tied embeddings from the absence of `output.weight`) and checks
    /// them with [`ModelConfig::validate`].
    pub fn from_gguf(meta: &GgufMetadata, tensors: &TensorTable) -> Result<Self, GgufError> {
        let config_err =
            |key: &str, reason: &str| GgufError::Config { key: key.into(), reason: reason.into() };
        let arch_name = match meta.get("general.architecture") {
            Some(GgufValue::String(s)) => s.as_str(),
            Some(_) => return Err(config_err("general.architecture", "not a string")),
            None => return Err(config_err("general.architecture", "missing")),
        };
        let architecture = Architecture::from_gguf_name(arch_name)
            .ok_or_else(|| GgufError::UnsupportedArchitecture(arch_name.into()))?;
        let key = |field: &str| Self::gguf_key(architecture, field);
        let int = |field: &str, default: Option<usize>| -> Result<usize, GgufError> {
            let key = key(field);
            match meta.get(&key) {
                Some(v) => v
                    .as_int()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| config_err(&key, "not a non-negative integer")),
                None => default.ok_or_else(|| config_err(&key, "missing")),
            }
        };
        let float = |field: &str, default: f32| -> Result<f32, GgufError> {
            let key = key(field);
            match meta.get(&key) {
                Some(v) => v
                    .as_f64()
                    .or_else(|| v.as_int().map(|x| x as f64))
                    .map(|x| x as f32)
                    .ok_or_else(|| config_err(&key, "not a number")),
                None => Ok(default),
            }
        };
        let hidden_size = int("hidden_size", None)?;
        let heads = int("heads", None)?;
        let kv_heads = int("kv_heads", Some(heads))?;
        let head_dim = match meta.get(&key("head_dim")) {
            Some(_) => int("head_dim", None)?,
            None if heads == 0 => 0, // validate() names the head count
            None => Self::derived_head_dim(hidden_size, heads).ok_or_else(|| {
                config_err(
                    &key("head_dim"),
                    &format!("missing, and {heads} heads do not divide the embedding length {hidden_size}"),
                )
            })?,
        };
        if int("attention.value_length", Some(head_dim))? != head_dim {
            return Err(config_err(
                &key("attention.value_length"),
                "differs from key_length (unsupported)",
            ));
        }
        if int("rope.dimension_count", Some(head_dim))? != head_dim {
            return Err(config_err(
                &key("rope.dimension_count"),
                "partial rotary embeddings are not supported",
            ));
        }
        let token = |k: &str| meta.get(k).and_then(GgufValue::as_u32);
        let mut eos_token_ids = Vec::new();
        for k in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = token(k)
                && !eos_token_ids.contains(&id)
            {
                eos_token_ids.push(id);
            }
        }
        let embedding = "token_embd.weight";
        let embd =
            tensors.get(embedding).ok_or_else(|| GgufError::MissingTensor(embedding.into()))?;
        if embd.shape.len() != 2 || embd.shape[1] != hidden_size {
            return Err(GgufError::ShapeMismatch {
                name: embedding.into(),
                expected: vec![embd.shape.first().copied().unwrap_or(0), hidden_size],
                found: embd.shape.clone(),
            });
        }
        let config = ModelConfig {
            architecture,
            vocab_size: embd.shape[0],
            hidden_size,
            layers: int("layers", None)?,
            heads,
            kv_heads,
            head_dim,
            ffn_size: int("ffn_size", None)?,
            rope_theta: float("rope_theta", 10_000.0)?,
            rms_norm_eps: float("rms_norm_eps", 1e-5)?,
            context_length: int("context_length", Some(DEFAULT_CONTEXT_LENGTH))?,
            bos_token_id: token("tokenizer.ggml.bos_token_id"),
            eos_token_ids,
            // llama.cpp permutes llama/mistral Q and K rows for its interleaved ("normal")
            // RoPE; qwen2 files keep Hugging Face's rotate-half ("neox") layout.
            rope_interleaved: architecture != Architecture::Qwen2,
            tied_embeddings: !tensors.contains("output.weight"),
        };
        config.validate().map_err(|e| GgufError::Config {
            key: Self::gguf_key(architecture, e.field),
            reason: e.reason,
        })?;
        Ok(config)
    }
}
