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
//! # Row independence
//! A row's logits do not depend on which other rows share its batch: every row of a
//! batch sits at the same position, the prompt runs once with batch 1 and its cache is
//! copied to every row, and every per-row computation (quantized matmul with per-row
//! activation quantization, RMSNorm, RoPE, single-query attention over the cache) is the
//! same whatever the batch size. With [`WeightFormat::Q8_0`] (the default) and
//! [`WeightFormat::Native`] on Q4/Q5/Q8 files this holds bit for bit (tested). With
//! [`WeightFormat::F32`] the dense gemm picks different kernels for different row counts:
//! logits then agree to rounding (tested to 1e-4 absolute; ~7e-7 observed), and greedy
//! tokens agree unless two candidates tie to that precision.
//!
//! On CUDA (feature `cuda`, [`Device::Cuda`]) the same forward runs on candle's CUDA
//! kernels (cuBLAS, its quantized matmuls); the row-by-row bit-exactness above is a CPU
//! property: CUDA picks kernels by row count, so rows agree only to rounding there.
//!
//! # Memory
//! The K/V cache is f32, `[rows, kv_heads, capacity, head_dim]` per layer, grown by
//! doubling within the decoder's byte budget; running past the budget, or a failed device
//! allocation, is reported as [`specrej_core::BackendError::OutOfMemory`] so the scheduler
//! can decide early. [`CandleDecoder::auto_budget_bytes`] sizes a budget from the GPU's free
//! memory.
//!
//! # Sampling on a device
//! Greedy steps on a GPU take the argmax there, so only the sampled ids cross to the host.
//! Sampling with temperature reads the logits back and samples on the host
//! ([`specrej_core::sampling`]): its noise is a 32-bit integer hash, which candle's tensor
//! ops cannot express.
#![forbid(unsafe_code)]

mod attention;
mod config;
mod decoder;
mod error;
mod incremental;
mod load;
mod model;
mod options;
mod scorer;

#[cfg(test)]
mod tests;

pub use config::{Architecture, ModelConfig};
pub use decoder::{AUTO_BUDGET_FREE_FRACTION, CandleBatch, CandleDecoder, DEFAULT_KV_BUDGET_BYTES};
pub use error::LoadError;
pub use incremental::IncrementalRows;
pub use load::{load, load_gguf, load_gguf_bytes, load_safetensors, load_safetensors_trunk};
pub use model::Model;
pub use options::{Device, LoadOptions, WeightFormat};
pub use scorer::{JudgeScorer, LikelihoodScorer};
pub use specrej_core::likelihood::EMPTY_RESPONSE_REWARD;
