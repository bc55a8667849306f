//! What the server serves: the real model (specrej-candle weights, specrej-text tokenizer
//! and chat template) or the fake backend of `specrej_core::testing` (no model file;
//! for tests and smoke runs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use specrej_candle::{CandleDecoder, JudgeScorer, LikelihoodScorer, LoadOptions, Model, WeightFormat};
use specrej_core::testing::{FakeDecoder, FakeScorer, FAKE_EOS};
use specrej_text::{ChatTemplate, Message, Tokenizer};

use crate::runtime::{Engine, Pair};

/// The default model's file name (`cargo xtask fetch-model` puts it in `models/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

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

/// The model: `--model`, else `$SPECREJ_MODEL`, else `models/<default>` here or in this checkout.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.exists() {
            bail!("model file {} does not exist", path.display());
        }
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("SPECREJ_MODEL") {
        let path = PathBuf::from(path);
        if !path.exists() {
            bail!("SPECREJ_MODEL points to {}, which does not exist", path.display());
        }
        return Ok(path);
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(DEFAULT_MODEL_FILE);
    let here = Path::new("models").join(DEFAULT_MODEL_FILE);
    for path in [here, checkout] {
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("no model given and the default model ({DEFAULT_MODEL_FILE}) is not in models/: run `cargo xtask fetch-model`, or pass --model PATH")
}

/// A loaded model: weights, tokenizer, chat template.
#[derive(Debug)]
pub struct RealModel {
    /// The weights (shared by the decoder and the reward models).
    pub weights: Arc<Model>,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template.
    pub template: ChatTemplate,
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
        let (tokenizer, template) = load_text(path)?;
        Ok(Self { weights: model, tokenizer, template })
    }
}

/// Tokenizer and chat template of a GGUF file or a HF directory (as the CLI loads them).
fn load_text(path: &Path) -> Result<(Tokenizer, ChatTemplate)> {
    if path.is_dir() {
        let json = path.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_tokenizer_json_file(&json).with_context(|| format!("reading {}", json.display()))?;
        let config_path = path.join("tokenizer_config.json");
        if !config_path.exists() {
            return Ok((tokenizer, ChatTemplate::chatml()));
        }
        let config = std::fs::read(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
        tokenizer = tokenizer.with_tokenizer_config(&config).with_context(|| format!("{}", config_path.display()))?;
        let template = ChatTemplate::from_tokenizer_config(&config)
            .with_context(|| format!("chat template in {}", config_path.display()))?;
        return Ok((tokenizer, template));
    }
    let metadata = specrej_text::GgufMetadata::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let tokenizer = Tokenizer::from_gguf(&metadata).with_context(|| format!("tokenizer of {}", path.display()))?;
    let template = ChatTemplate::from_gguf(&metadata).with_context(|| format!("chat template of {}", path.display()))?;
    Ok((tokenizer, template))
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
            Served::Real(m) => {
                let text = m.template.render(messages, true).context("rendering the chat template")?;
                self.encode_raw(&text)
            }
            Served::Fake => {
                let text: String = messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
                self.encode_raw(&text)
            }
        }
    }

    /// The token ids of `text` as is (a BOS first where the tokenizer adds one).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Served::Real(m) => {
                let mut ids = m.tokenizer.encode(text, false)?;
                if let Some(bos) = m.tokenizer.bos().filter(|_| m.tokenizer.adds_bos())
                    && ids.first() != Some(&bos)
                {
                    ids.insert(0, bos);
                }
                Ok(ids)
            }
            Served::Fake => Ok(text.bytes().map(|b| 1 + u32::from(b) % 15).collect()),
        }
    }

    /// Text of generated ids (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Served::Real(m) => m.tokenizer.decode(ids, true).unwrap_or_else(|e| format!("<undecodable: {e}>")),
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
            Served::Real(m) => m.tokenizer.eos_ids().to_vec(),
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
                        let segments = specrej_text::judge_segments(&m.tokenizer, &m.template, question)?;
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
