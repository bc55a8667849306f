//! What the server serves: the real model (specrej-candle weights, specrej-text tokenizer
//! and chat template) or the fake backend of `specrej_core::testing` (no model file;
//! for tests and smoke runs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use specrej_candle::{CandleDecoder, JudgeScorer, LikelihoodScorer, LoadOptions, Model, WeightFormat};
use specrej_core::testing::{FakeDecoder, FakeScorer, FAKE_EOS};
use specrej_text::{Message, ModelText};

use crate::runtime::{Engine, Pair};

/// The default model's file name (`cargo xtask fetch-model` puts it in `models/`).
pub use specrej_text::DEFAULT_MODEL_FILE;

/// The reward model a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardKind {
    /// The policy asked whether the answer is good: logit(Yes) − logit(No).
    Judge,
    /// −perplexity of the answer under the policy.
    Likelihood,
}

impl RewardKind {
    /// The name used in the API.
    pub fn name(self) -> &'static str {
        match self {
            RewardKind::Judge => "judge",
            RewardKind::Likelihood => "likelihood",
        }
    }
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// candle on the CPU.
    Cpu,
    /// candle on an NVIDIA GPU (specrej-candle's `cuda` feature; without it, an error).
    Cuda,
}

/// The model: `--model`, else `$SPECREJ_MODEL`, else `models/<default>` here or in this
/// checkout ([`specrej_text::locate_model`], as the CLI finds it).
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    Ok(specrej_text::locate_model(explicit)?)
}

/// A loaded model: weights, tokenizer, chat template.
#[derive(Debug)]
pub struct RealModel {
    /// The weights (shared by the decoder and the reward models).
    pub weights: Arc<Model>,
    /// The tokenizer and chat template ([`ModelText::load`], as the CLI loads them).
    pub text: ModelText,
    /// The file or directory it was loaded from.
    pub path: PathBuf,
}

impl RealModel {
    /// Loads a GGUF file or a HF directory (`config.json`, `*.safetensors`, `tokenizer.json`).
    pub fn load(path: &Path, backend: BackendKind, weights: WeightFormat) -> Result<Self> {
        let device = match backend {
            BackendKind::Cpu => specrej_candle::Device::Cpu,
            BackendKind::Cuda => specrej_candle::Device::Cuda(0),
        };
        let model = specrej_candle::load(path, &LoadOptions { device, weights })
            .with_context(|| format!("loading {}", path.display()))?;
        let text = ModelText::load(path)?;
        Ok(Self { weights: model, text, path: path.to_path_buf() })
    }
}

/// The model behind the server.
#[derive(Debug)]
pub enum Served {
    /// A real model on candle.
    Real(Box<RealModel>),
    /// `specrej_core::testing::FakeDecoder` / `FakeScorer`, with a one-byte-per-token
    /// "tokenizer": byte `b` is token `1 + b % 15`, token `t` decodes to the letter `'a' + t - 1`.
    Fake,
}

/// The fake backend's context length.
const FAKE_CONTEXT: usize = 4096;

impl Served {
    /// The prompt's token ids: the chat template over `messages`, or `raw` text as is.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        match self {
            Served::Real(m) => Ok(m.text.encode_chat(messages)?),
            Served::Fake => {
                let text: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
                self.encode_raw(&text)
            }
        }
    }

    /// The token ids of `text` as is (a BOS first where the tokenizer adds one).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Served::Real(m) => Ok(m.text.encode(text)?),
            Served::Fake => Ok(text.bytes().map(|b| 1 + u32::from(b) % 15).collect()),
        }
    }

    /// Text of generated ids (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Served::Real(m) => m.text.decode(ids),
            Served::Fake => ids
                .iter()
                .filter(|&&t| t != FAKE_EOS)
                .map(|&t| char::from(b'a' + (t.min(26) as u8).saturating_sub(1)))
                .collect(),
        }
    }

    /// Tokens that end a row.
    pub fn eos(&self) -> Vec<u32> {
        match self {
            Served::Real(m) => m.text.tokenizer.eos_ids().to_vec(),
            Served::Fake => vec![FAKE_EOS],
        }
    }

    /// The model's context length.
    pub fn context_length(&self) -> usize {
        match self {
            Served::Real(m) => m.weights.config().context_length,
            Served::Fake => FAKE_CONTEXT,
        }
    }

    /// Bytes of K/V cache per cached token.
    pub fn kv_bytes_per_token(&self) -> usize {
        match self {
            Served::Real(m) => m.weights.config().kv_bytes_per_token(),
            Served::Fake => 8,
        }
    }

    /// The engine for one request: a decoder holding `capacity` cached tokens and the
    /// reward model; `question` is the user's text (the judge asks about it).
    pub fn engine(&self, capacity: usize, reward: RewardKind, question: &str) -> Result<Box<dyn Engine>> {
        match self {
            Served::Real(m) => {
                let bytes = capacity.saturating_mul(m.weights.config().kv_bytes_per_token());
                let decoder = CandleDecoder::new(Arc::clone(&m.weights), bytes);
                Ok(match reward {
                    RewardKind::Judge => {
                        let segments = specrej_text::judge_segments(&m.text.tokenizer, &m.text.template, question)?;
                        let judge = JudgeScorer::new(
                            Arc::clone(&m.weights),
                            segments.before,
                            segments.after,
                            segments.yes,
                            segments.no,
                        );
                        Box::new(Pair::new(decoder, judge))
                    }
                    RewardKind::Likelihood => {
                        Box::new(Pair::new(decoder, LikelihoodScorer::new(Arc::clone(&m.weights))))
                    }
                })
            }
            Served::Fake => {
                let mut decoder = FakeDecoder::new(capacity);
                decoder.max_sequence_len = FAKE_CONTEXT;
                Ok(Box::new(Pair::new(decoder, FakeScorer::default())))
            }
        }
    }
}
