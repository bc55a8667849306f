//! What the server serves: the real model (specrej-candle weights, specrej-text tokenizer
//! and chat template) or the fake backend of `specrej_core::testing` (no model file;
//! for tests and smoke runs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use specrej_candle::{
    CandleDecoder, JudgeScorer, LikelihoodScorer, LoadOptions, Model, WeightFormat,
};
#[cfg(feature = "fake")]
use specrej_core::testing::{FAKE_EOS, FakeDecoder, FakeScorer};
use specrej_reward::{RemoteScorer, RewardModel, RewardScorer};
use specrej_text::{Message, ModelText};
use specrej_wgpu::{WgpuDecoder, WgpuJudgeScorer, WgpuLikelihoodScorer, WgpuModel};

use crate::batcher::EachAlone;
use crate::batcher::{Scorer, SharedDecoder};

/// The default model's file name (`cargo xtask fetch-model` puts it in `models/`).
pub use specrej_text::DEFAULT_MODEL_FILE;

/// The reward model a request asks for (`specrej.reward`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewardKind {
    /// The policy asked whether the answer is good: logit(Yes) − logit(No).
    Judge,
    /// The same judge, asked at decisions whether an unfinished answer is on track.
    PartialJudge,
    /// −perplexity of the answer under the policy.
    Likelihood,
    /// A reward model the server was started with ([`RealModel::add_reward`]).
    Named(String),
}

impl RewardKind {
    /// The name used in the API.
    pub fn name(&self) -> &str {
        match self {
            RewardKind::Judge => "judge",
            RewardKind::PartialJudge => "partial_judge",
            RewardKind::Likelihood => "likelihood",
            RewardKind::Named(name) => name,
        }
    }
}

/// A reward model beside the built-in two (`specrej-server --reward-model NAME=DIR`,
/// `--reward-url NAME=URL`), scored incrementally (one RM K/V cache per surviving row).
#[derive(Debug)]
pub enum ExtraReward {
    /// A Hugging Face `*ForSequenceClassification` directory, loaded ([`RewardModel::load`]).
    Model(Arc<RewardModel>),
    /// A `specrej-reward-server` at this URL (`http://host:port/path`).
    Remote(String),
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
    /// Where the weights live (reward models load there too).
    pub device: specrej_candle::Device,
    /// Reward models a request may name besides `judge` and `likelihood`.
    pub rewards: Vec<(String, ExtraReward)>,
}

impl RealModel {
    /// Loads a GGUF file or a HF directory (`config.json`, `*.safetensors`, `tokenizer.json`).
    pub fn load(path: &Path, backend: BackendKind, weights: WeightFormat) -> Result<Self> {
        let device = match backend {
            BackendKind::Cpu => specrej_candle::Device::Cpu,
            BackendKind::Cuda => specrej_candle::Device::Cuda(0),
        };
        let model =
            specrej_candle::load(path, &LoadOptions { device, weights, kv: Default::default() })
                .with_context(|| format!("loading {}", path.display()))?;
        let text = ModelText::load(path)?;
        Ok(Self { weights: model, text, path: path.to_path_buf(), device, rewards: Vec::new() })
    }

    /// Offers `reward` to requests as `"specrej": {"reward": name}`. The name must be new
    /// and not `judge` or `likelihood`.
    pub fn add_reward(&mut self, name: &str, reward: ExtraReward) -> Result<()> {
        if name.is_empty() || name.contains(char::is_whitespace) {
            anyhow::bail!("reward model name {name:?}: expected a non-empty word");
        }
        if matches!(name, "judge" | "likelihood") || self.rewards.iter().any(|(n, _)| n == name) {
            anyhow::bail!("reward model name {name:?} is already taken");
        }
        self.rewards.push((name.to_owned(), reward));
        Ok(())
    }

    /// Loads the reward-model directory `dir` on this model's device (f32, so incremental
    /// and full scoring agree to rounding) and offers it as `name`.
    pub fn load_reward(&mut self, name: &str, dir: &Path) -> Result<()> {
        let options =
            LoadOptions { device: self.device, weights: WeightFormat::F32, kv: Default::default() };
        let rm = RewardModel::load(dir, &options)
            .with_context(|| format!("loading the reward model {}", dir.display()))?;
        self.add_reward(name, ExtraReward::Model(rm))
    }
}

/// A GGUF model on wgpu (`specrej-server --backend wgpu`): the judge and the likelihood run
/// on it too.
#[derive(Debug)]
pub struct WgpuServed {
    /// The weights on the adapter.
    pub model: Arc<WgpuModel>,
    /// The tokenizer and chat template.
    pub text: ModelText,
}

impl WgpuServed {
    /// Loads the GGUF file `path` on the adapter `adapter` (a name fragment or index; default:
    /// wgpu's high-performance choice).
    pub fn load(path: &Path, adapter: Option<&str>) -> Result<Self> {
        if path.is_dir() {
            anyhow::bail!(
                "{}: --backend wgpu runs GGUF files, not safetensors directories",
                path.display()
            );
        }
        let options = specrej_wgpu::Options {
            adapter: adapter
                .map(|a| a.parse::<specrej_wgpu::AdapterChoice>().unwrap_or_else(|e| match e {})),
            ..specrej_wgpu::Options::default()
        };
        let model = WgpuModel::load_path_blocking(path, &options)
            .with_context(|| format!("loading {} on wgpu", path.display()))?;
        Ok(Self { model, text: ModelText::load(path)? })
    }
}

/// The model behind the server.
#[derive(Debug)]
pub enum Served {
    /// A real model on candle.
    Real(Box<RealModel>),
    /// A real model (GGUF) on WebGPU through wgpu.
    Wgpu(Box<WgpuServed>),
    /// `specrej_core::testing::FakeDecoder` / `FakeScorer`, with a one-byte-per-token
    /// "tokenizer": byte `b` is token `1 + b % 15`, token `t` decodes to the letter `'a' + t - 1`.
    /// Only with the `fake` feature, which the tests enable: production builds carry no double.
    #[cfg(feature = "fake")]
    Fake,
}

/// The fake backend's context length.
#[cfg(feature = "fake")]
const FAKE_CONTEXT: usize = 4096;

impl Served {
    /// The prompt's token ids: the chat template over `messages`, or `raw` text as is.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        match self {
            Served::Real(m) => Ok(m.text.encode_chat(messages)?),
            Served::Wgpu(m) => Ok(m.text.encode_chat(messages)?),
            #[cfg(feature = "fake")]
            Served::Fake => {
                let text: String =
                    messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect();
                self.encode_raw(&text)
            }
        }
    }

    /// The token ids of `text` as is (a BOS first where the tokenizer adds one).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Served::Real(m) => Ok(m.text.encode(text)?),
            Served::Wgpu(m) => Ok(m.text.encode(text)?),
            #[cfg(feature = "fake")]
            Served::Fake => Ok(text.bytes().map(|b| 1 + u32::from(b) % 15).collect()),
        }
    }

    /// Text of generated ids (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Served::Real(m) => m.text.decode(ids),
            Served::Wgpu(m) => m.text.decode(ids),
            #[cfg(feature = "fake")]
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
            Served::Wgpu(m) => m.text.tokenizer.eos_ids().to_vec(),
            #[cfg(feature = "fake")]
            Served::Fake => vec![FAKE_EOS],
        }
    }

    /// The names a request may give as `specrej.reward`.
    pub fn reward_names(&self) -> Vec<&str> {
        let mut names = vec!["judge", "partial_judge", "likelihood"];
        match self {
            Served::Real(m) => names.extend(m.rewards.iter().map(|(name, _)| name.as_str())),
            // The wgpu judge has one question (no partial one).
            Served::Wgpu(_) => names.retain(|&n| n != "partial_judge"),
            #[cfg(feature = "fake")]
            Served::Fake => {}
        }
        names
    }

    /// The model's context length.
    pub fn context_length(&self) -> usize {
        match self {
            Served::Real(m) => m.weights.config().context_length,
            Served::Wgpu(m) => m.model.config().context_length,
            #[cfg(feature = "fake")]
            Served::Fake => FAKE_CONTEXT,
        }
    }

    /// Bytes of K/V cache per cached token.
    pub fn kv_bytes_per_token(&self) -> usize {
        match self {
            Served::Real(m) => m.weights.kv_bytes_per_token(),
            Served::Wgpu(m) => m.model.kv_bytes_per_token(),
            #[cfg(feature = "fake")]
            Served::Fake => 8,
        }
    }

    /// How a request's decoder holds its K/V.
    pub fn kv_layout(&self) -> specrej_core::KvLayout {
        match self {
            Served::Real(m) => CandleDecoder::layout_for(&m.weights),
            Served::Wgpu(_) => specrej_core::KvLayout::DENSE,
            #[cfg(feature = "fake")]
            Served::Fake => specrej_core::KvLayout::DENSE,
        }
    }

    /// Tokens the judge reads besides the answer: its question (which quotes `question`) and
    /// the longest tail it asks with. `None` for rewards that read no more than the policy's
    /// own prompt and answer, or that apply their own limit (a reward model's tokenizer).
    pub fn judge_overhead(&self, reward: &RewardKind, question: &str) -> Result<Option<usize>> {
        let text = match self {
            Served::Real(m) => Some(&m.text),
            Served::Wgpu(m) => Some(&m.text),
            #[cfg(feature = "fake")]
            Served::Fake => None,
        };
        match (text, reward) {
            (Some(text), RewardKind::Judge | RewardKind::PartialJudge) => {
                let segments =
                    specrej_text::judge_segments(&text.tokenizer, &text.template, question)?;
                Ok(Some(segments.overhead(*reward == RewardKind::PartialJudge)))
            }
            _ => Ok(None),
        }
    }

    /// The server's one decoder: `capacity` cached tokens of K/V for all requests together
    /// (on the CPU one block pool; a request's step runs in the same pass as the others').
    pub fn decoder(&self, capacity: usize) -> Box<dyn SharedDecoder> {
        match self {
            Served::Real(m) => {
                let bytes = capacity.saturating_mul(m.weights.kv_bytes_per_token());
                Box::new(CandleDecoder::new(Arc::clone(&m.weights), bytes))
            }
            Served::Wgpu(m) => {
                let bytes = capacity.saturating_mul(m.model.kv_bytes_per_token());
                Box::new(EachAlone(WgpuDecoder::new(Arc::clone(&m.model), bytes)))
            }
            #[cfg(feature = "fake")]
            Served::Fake => {
                let mut decoder = FakeDecoder::new(capacity);
                decoder.max_sequence_len = FAKE_CONTEXT;
                Box::new(EachAlone(decoder))
            }
        }
    }

    /// One request's reward model; `question` is the user's text (the judge asks about it).
    /// The flag says whether it computes on the engine thread (the judge, the likelihood, a
    /// local reward model) or waits on the network (a reward server), off that thread.
    pub fn scorer(&self, reward: &RewardKind, question: &str) -> Result<(Scorer, bool)> {
        match self {
            Served::Real(m) => Ok(match reward {
                RewardKind::Judge | RewardKind::PartialJudge => {
                    let segments = specrej_text::judge_segments(
                        &m.text.tokenizer,
                        &m.text.template,
                        question,
                    )?;
                    let mut judge = JudgeScorer::new(
                        Arc::clone(&m.weights),
                        segments.before,
                        segments.after,
                        segments.yes,
                        segments.no,
                    );
                    if *reward == RewardKind::PartialJudge {
                        judge = judge.with_partial(segments.after_partial);
                    }
                    (Box::new(judge), true)
                }
                RewardKind::Likelihood => {
                    (Box::new(LikelihoodScorer::new(Arc::clone(&m.weights))), true)
                }
                RewardKind::Named(name) => {
                    let Some((_, reward)) = m.rewards.iter().find(|(n, _)| n == name) else {
                        anyhow::bail!("no reward model {name:?}");
                    };
                    let tokenizer = m.text.tokenizer.clone();
                    match reward {
                        ExtraReward::Model(rm) => {
                            (Box::new(RewardScorer::new(Arc::clone(rm), tokenizer, question)), true)
                        }
                        ExtraReward::Remote(url) => {
                            let remote = RemoteScorer::new(url, tokenizer, question)
                                .with_context(|| format!("reward server {url}"))?;
                            (Box::new(remote), false)
                        }
                    }
                }
            }),
            Served::Wgpu(m) => Ok(match reward {
                RewardKind::Judge => {
                    let s = specrej_text::judge_segments(
                        &m.text.tokenizer,
                        &m.text.template,
                        question,
                    )?;
                    (
                        Box::new(WgpuJudgeScorer::new(
                            Arc::clone(&m.model),
                            s.before,
                            s.after,
                            s.yes,
                            s.no,
                        )),
                        true,
                    )
                }
                RewardKind::Likelihood => {
                    (Box::new(WgpuLikelihoodScorer::new(Arc::clone(&m.model))), true)
                }
                other => anyhow::bail!(
                    "reward {:?} runs on the cpu and cuda backends, not on wgpu",
                    other.name()
                ),
            }),
            #[cfg(feature = "fake")]
            Served::Fake => Ok((Box::new(FakeScorer::default()), true)),
        }
    }
}
