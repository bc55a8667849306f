//! The candle backend of specrej: a Llama-family forward pass (Llama, SmolLM2, Mistral,
//! Qwen2) with an explicit, row-selectable K/V cache, implementing
//! [`specrej_core::Decoder`] and two [`specrej_core::Scorer`]s.
//!
//! ```no_run
//! use std::sync::Arc;
//! use specrej_candle::{load, CandleDecoder, LikelihoodScorer, LoadOptions, DEFAULT_KV_BUDGET_BYTES};
//!
//! let model = load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &LoadOptions::default())?;
//! let decoder = CandleDecoder::new(Arc::clone(&model), DEFAULT_KV_BUDGET_BYTES);
//! let scorer = LikelihoodScorer::new(model);
//! # Ok::<(), specrej_candle::LoadError>(())
//! ```
//!
//! # Trunks and incremental scoring
//! [`load_safetensors_trunk`] loads a Hugging Face checkpoint without its language-model
//! head (e.g. the trunk of a `*ForSequenceClassification` reward model, whose extra tensors
//! such as `score.weight` it hands back). [`Model::hidden_states`] is a direct full forward
//! returning final-normed hidden states; [`IncrementalRows`] keeps one K/V cache per row
//! between scoring calls and reuses it up to the longest common prefix with the new ids, so
//! re-scoring a grown sequence runs only what changed. [`JudgeScorer::incremental`] uses it.
//!
//! # Batch invariance
//! On the CPU a token's logits (and so a row's samples and a response's reward) depend only
//! on the ids before it, bit for bit: never on the batch size, the other rows, how the ids
//! were split into passes (prefill, steps, incremental scoring), or padding (there is none).
//! Every CPU pass is [`crate::host`]'s varlen forward, in which every per-token computation
//! is fixed: the projections through candle's quantized matmul, whose per-row arithmetic
//! does not depend on the row count (dense f32 weights through gemm calls of a fixed shape,
//! for the same reason), RMSNorm, RoPE and the SwiGLU per token, and one attention kernel
//! ([`crate::attention`]) with a fixed summation order. Tests check it on tiny models and
//! on the default model.
//!
//! On CUDA (feature `cuda`, [`Device::Cuda`]) the dense forward runs on candle's CUDA
//! kernels (cuBLAS, its quantized matmuls), which pick kernels by shape: rows agree there
//! only to rounding.
//!
//! # Memory
//! On the CPU every decoder and scorer owns a pool of K/V blocks (16 positions of every
//! layer, f16 by default: [`KvFormat`]) within its byte budget: a batch's prompt is held once
//! and shared by its rows, each row holds blocks of its own, `retain` drops rows' blocks back
//! into the pool without copying or allocating anything, and forked rows share their
//! parent's blocks (copied on write). Running past the budget, or a failed allocation, is
//! [`specrej_core::BackendError::OutOfMemory`], so the scheduler can decide early. On a GPU
//! the cache is f32, `[rows, kv_heads, capacity, head_dim]` per layer, grown by doubling;
//! [`CandleDecoder::auto_budget_bytes`] sizes a budget from its free memory.
//!
//! # Sampling on a device
//! Greedy steps on a GPU take the argmax there, so only the sampled ids cross to the host.
//! Sampling with temperature reads the logits back and samples on the host
//! ([`specrej_core::sampling`]): its noise is a 32-bit integer hash, which candle's tensor
//! ops cannot express.
// The one exception, a prefetch hint, is allowed where it is (`kv.rs`), with its reason.
#![deny(unsafe_code)]

mod attention;
mod branches;
mod config;
mod decoder;
mod error;
mod host;
mod incremental;
mod kv;
mod load;
mod model;
mod options;
mod scorer;
mod self_judge;
mod share;

#[cfg(test)]
mod tests;

pub use config::{Architecture, ModelConfig};
pub use decoder::{
    AUTO_BUDGET_FREE_FRACTION, AUTO_BUDGET_RAM_FRACTION, CandleBatch, CandleDecoder,
    DEFAULT_KV_BUDGET_BYTES, NllSink, host_available_memory,
};
pub use error::{LoadError, message as candle_message};
pub use incremental::{IncrementalRows, Ran, reused_positions};
pub use kv::KvFormat;
pub use load::{load, load_gguf, load_gguf_bytes, load_safetensors, load_safetensors_trunk};
pub use model::Model;
pub use options::{Device, LoadOptions, WeightFormat};
pub use scorer::{JudgeScorer, LikelihoodScorer};
pub use self_judge::SelfJudgeScorer;
pub use share::KvShare;
pub use specrej_core::likelihood::EMPTY_RESPONSE_REWARD;
