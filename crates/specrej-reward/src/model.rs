//! Loading a Hugging Face sequence-classification reward model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use specrej_candle::{LoadError, LoadOptions, Model, load_safetensors_trunk};
use specrej_core::BackendError;
use specrej_text::{ChatTemplate, Message, Tokenizer};

use crate::error::RewardError;

/// The `architectures` a reward model directory may name.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForSequenceClassification",
    "MistralForSequenceClassification",
    "Qwen2ForSequenceClassification",
];

/// Marks where the response goes when rendering the RM's chat; never in a question.
const PLACEHOLDER: &str = "\u{1}specrej-rm-response\u{1}";

/// A loaded reward model: trunk, score head, tokenizer and chat template. Immutable; share
/// it with [`Arc`] between scorers (each scorer keeps its own caches).
#[derive(Debug)]
pub struct RewardModel {
    dir: PathBuf,
    trunk: Arc<Model>,
    /// `score.weight` `[hidden]`.
    score: Vec<f32>,
    bias: f32,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    pad: Option<u32>,
}

fn read(path: &Path) -> Result<Vec<u8>, RewardError> {
    std::fs::read(path).map_err(|source| RewardError::Io { path: path.to_path_buf(), source })
}

impl RewardModel {
    /// Loads a reward model directory (see the crate docs for what it must hold).
    /// `tokenizer_config.json` is optional: without it (or without a `chat_template` in it)
    /// the chat is formatted as ChatML.
    pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Arc<Self>, RewardError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(RewardError::Load(LoadError::Missing { path: dir }));
        }
        let config_path = dir.join("config.json");
        let config: serde_json::Value =
            serde_json::from_slice(&read(&config_path)?).map_err(|e| RewardError::Config {
                path: config_path.clone(),
                key: "(file)".into(),
                reason: format!("invalid JSON: {e}"),
            })?;
        let config_err = |key: &str, reason: String| RewardError::Config {
            path: config_path.clone(),
            key: key.into(),
            reason,
        };
        let arch = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or_else(|| config_err("architectures", "missing".into()))?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(RewardError::UnsupportedArchitecture {
                path: config_path,
                found: arch.to_string(),
            });
        }
        // transformers writes id2label rather than num_labels; its default is 2 labels.
        let num_labels =
            match (config.get("num_labels"), config.get("id2label").and_then(|m| m.as_object())) {
                (Some(n), _) => n
                    .as_u64()
                    .ok_or_else(|| config_err("num_labels", format!("{n} is not a count")))?,
                (None, Some(map)) => map.len() as u64,
                (None, None) => 2,
            };
        if num_labels != 1 {
            return Err(config_err(
                "num_labels",
                format!(
                    "a reward model has exactly 1 label (a scalar reward); this one has {num_labels}"
                ),
            ));
        }
        let pad =
            config.get("pad_token_id").and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok());

        let (trunk, extras) =
            load_safetensors_trunk(&dir, options, &["score.weight", "score.bias"])?;
        let hidden = trunk.config().hidden_size;
        let weight = extras
            .get("score.weight")
            .ok_or_else(|| RewardError::MissingScoreHead { path: dir.clone() })?;
        let dims = weight.dims().to_vec();
        if dims != [1, hidden] && dims != [hidden] {
            return Err(LoadError::ShapeMismatch {
                path: dir,
                name: "score.weight".into(),
                expected: vec![1, hidden],
                found: dims,
            }
            .into());
        }
        let score = weight
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| RewardError::Other(format!("{}: score.weight: {e}", dir.display())))?;
        let bias = match extras.get("score.bias") {
            None => 0.0,
            Some(b) => {
                let v = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| {
                    RewardError::Other(format!("{}: score.bias: {e}", dir.display()))
                })?;
                match v.as_slice() {
                    [x] => *x,
                    _ => {
                        return Err(LoadError::ShapeMismatch {
                            path: dir,
                            name: "score.bias".into(),
                            expected: vec![1],
                            found: b.dims().to_vec(),
                        }
                        .into());
                    }
                }
            }
        };

        let tok_path = dir.join("tokenizer.json");
        let text_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RewardError::Text { path: path.clone(), source }
        };
        let mut tokenizer =
            Tokenizer::from_tokenizer_json(&read(&tok_path)?).map_err(text_err(&tok_path))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let template = if cfg_path.exists() {
            let bytes = read(&cfg_path)?;
            tokenizer = tokenizer.with_tokenizer_config(&bytes).map_err(text_err(&cfg_path))?;
            ChatTemplate::from_tokenizer_config(&bytes).map_err(text_err(&cfg_path))?
        } else {
            ChatTemplate::chatml()
        };
        let vocab = trunk.config().vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(RewardError::Other(format!(
                "{}: tokenizer.json has {} tokens but the model's embedding has {vocab} rows",
                dir.display(),
                tokenizer.vocab_size()
            )));
        }
        Ok(Arc::new(Self { dir, trunk, score, bias, tokenizer, template, pad }))
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trunk (no language-model head).
    pub fn trunk(&self) -> &Arc<Model> {
        &self.trunk
    }

    /// The RM's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The RM's chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// `pad_token_id` from `config.json`, if any: the reward is read at the last other token.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, BackendError> {
        let mut ids = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| BackendError::device(format!("reward model tokenizer: {e}")))?;
        if let Some(bos) = self.tokenizer.bos().filter(|_| self.tokenizer.adds_bos())
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    fn render(&self, question: &str, response: &str) -> Result<String, BackendError> {
        self.template
            .render(&[Message::user(question), Message::assistant(response)], false)
            .map_err(|e| BackendError::device(format!("reward model chat template: {e}")))
    }

    /// The RM's token ids for the chat `user: question`, `assistant: response` (rendered
    /// with the RM's template, no generation prompt; BOS added if the tokenizer adds one),
    /// cut after the last non-pad token (later ids cannot change the reward).
    pub fn chat_ids(&self, question: &str, response: &str) -> Result<Vec<u32>, BackendError> {
        let mut ids = self.encode(&self.render(question, response)?)?;
        if let Some(pad) = self.pad
            && let Some(last) = ids.iter().rposition(|&t| t != pad)
        {
            ids.truncate(last + 1);
        }
        if ids.is_empty() {
            return Err(BackendError::device("reward model: the chat renders to no tokens"));
        }
        Ok(ids)
    }

    /// The RM's ids of the chat up to where the response starts (shared by every row).
    pub fn prefix_ids(&self, question: &str) -> Result<Vec<u32>, BackendError> {
        if question.contains(PLACEHOLDER) {
            return Ok(Vec::new());
        }
        let rendered = self.render(question, PLACEHOLDER)?;
        match rendered.split_once(PLACEHOLDER) {
            Some((before, _)) => self.encode(before),
            None => Ok(Vec::new()),
        }
    }

    /// The reward from a final-normed hidden state `[hidden]`.
    pub fn head(&self, normed: &[f32]) -> f32 {
        let dot: f64 =
            self.score.iter().zip(normed).map(|(&w, &h)| f64::from(w) * f64::from(h)).sum();
        dot as f32 + self.bias
    }

    /// The reward of RM ids by one direct full forward (no caches): the reference.
    pub fn score_ids(&self, ids: &[u32]) -> Result<f32, BackendError> {
        let hidden = self.trunk.hidden_states(ids)?;
        let h = self.trunk.config().hidden_size;
        let last = hidden
            .len()
            .checked_sub(h)
            .ok_or_else(|| BackendError::device("reward model: empty input"))?;
        Ok(self.head(&hidden[last..]))
    }

    /// The reward of one (question, response) text pair by a direct full forward.
    pub fn score_text(&self, question: &str, response: &str) -> Result<f32, BackendError> {
        self.score_ids(&self.chat_ids(question, response)?)
    }
}
