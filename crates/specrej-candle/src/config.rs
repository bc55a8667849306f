//! Model hyper-parameters: [`specrej_gguf::ModelConfig`], whose rules
//! ([`ModelConfig::validate`]: the same caps and checks as every other backend) decide what a
//! usable model is. specrej-gguf reads them from GGUF metadata; `load.rs` reads a Hugging Face
//! `config.json` into the same type and applies the same rules.

pub use specrej_gguf::{Architecture, ModelConfig};

/// The `config.json` key that holds a [`ModelConfig`] field, for error messages.
pub(crate) fn hf_key(field: &str) -> &str {
    match field {
        "layers" => "num_hidden_layers",
        "heads" => "num_attention_heads",
        "kv_heads" => "num_key_value_heads",
        "ffn_size" => "intermediate_size",
        "context_length" => "max_position_embeddings",
        other => other, // vocab_size, hidden_size, head_dim, rope_theta, rms_norm_eps
    }
}
