//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use std::fmt;

/// Which member of the Llama family a model is. They share one forward pass; the
/// differences are q/k/v biases (Qwen2) and the RoPE layout of GGUF files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, TinyLlama, …
    Llama,
    /// Mistral 7B-style (sliding window ignored: all positions attend to all).
    Mistral,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        })
    }
}

/// Hyper-parameters of a loaded model.
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
    /// Whether the output projection reuses the token embedding.
    pub tied_embeddings: bool,
}

impl ModelConfig {
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Checks the numbers are usable; `Err((key, reason))` otherwise.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("ffn_size", self.ffn_size),
            ("context_length", self.context_length),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key, "must be positive".into()));
            }
        }
        // Generous sanity caps so a corrupt header cannot make us allocate absurd buffers.
        let caps = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("layers", self.layers, 1 << 10),
            ("heads", self.heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 12),
            ("ffn_size", self.ffn_size, 1 << 18),
        ];
        for (key, value, cap) in caps {
            if value > cap {
                return Err((key, format!("{value} is implausibly large (cap {cap})")));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err((
                "kv_heads",
                format!("{} query heads are not a multiple of {} kv heads", self.heads, self.kv_heads),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(("head_dim", format!("{} is odd; RoPE needs pairs", self.head_dim)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(("rope_theta", format!("{} is not a positive number", self.rope_theta)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(("rms_norm_eps", format!("{} is not a non-negative number", self.rms_norm_eps)));
        }
        Ok(())
    }
}
