//! Finding a model and loading its text side (tokenizer, chat template), as every front end
//! (the `specrej` CLI, `specrej-server`) does.

use std::path::{Path, PathBuf};

use crate::{ChatTemplate, Error, GgufMetadata, Message, Result, Tokenizer};

/// The default model's file name (`cargo xtask fetch-model` puts it in `models/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model to use: `explicit` (`--model`), else `$SPECREJ_MODEL`, else
/// `models/<DEFAULT_MODEL_FILE>` in the current directory or in this checkout.
pub fn locate_model(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.exists() {
            return Err(Error::Model(format!("model file {} does not exist", path.display())));
        }
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("SPECREJ_MODEL") {
        let path = PathBuf::from(path);
        if !path.exists() {
            return Err(Error::Model(format!(
                "SPECREJ_MODEL points to {}, which does not exist",
                path.display()
            )));
        }
        return Ok(path);
    }
    let checkout =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(DEFAULT_MODEL_FILE);
    let here = Path::new("models").join(DEFAULT_MODEL_FILE);
    for path in [here, checkout] {
        if path.exists() {
            return Ok(path);
        }
    }
    Err(Error::Model(format!(
        "no model given and the default model ({DEFAULT_MODEL_FILE}) is not in models/: \
         run `cargo xtask fetch-model`, or pass --model PATH"
    )))
}

/// Wraps `error` with what was being done (and to which file).
fn within(context: impl Into<String>) -> impl FnOnce(Error) -> Error {
    move |error| Error::Context { context: context.into(), error: Box::new(error) }
}

/// The text side of a model: tokenizer and chat template.
#[derive(Debug)]
pub struct ModelText {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template.
    pub template: ChatTemplate,
    /// The GGUF metadata, for a GGUF file (`None` for a safetensors directory).
    pub metadata: Option<GgufMetadata>,
}

impl ModelText {
    /// From a GGUF file's metadata, or from a HF directory's `tokenizer.json` and
    /// `tokenizer_config.json` (chat template; ChatML when it has none).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            let mut tokenizer = Tokenizer::from_tokenizer_json_file(&json)
                .map_err(within(format!("reading {}", json.display())))?;
            let config_path = path.join("tokenizer_config.json");
            let template = if config_path.exists() {
                let config = std::fs::read(&config_path)
                    .map_err(|e| within(format!("reading {}", config_path.display()))(e.into()))?;
                tokenizer = tokenizer
                    .with_tokenizer_config(&config)
                    .map_err(within(config_path.display().to_string()))?;
                ChatTemplate::from_tokenizer_config(&config)
                    .map_err(within(format!("chat template in {}", config_path.display())))?
            } else {
                ChatTemplate::chatml()
            };
            return Ok(Self { tokenizer, template, metadata: None });
        }
        let metadata = GgufMetadata::from_path(path)
            .map_err(|e| within(format!("reading {}", path.display()))(e.into()))?;
        let tokenizer = Tokenizer::from_gguf(&metadata)
            .map_err(within(format!("tokenizer of {}", path.display())))?;
        let template = ChatTemplate::from_gguf(&metadata)
            .map_err(within(format!("chat template of {}", path.display())))?;
        Ok(Self { tokenizer, template, metadata: Some(metadata) })
    }

    /// The token ids of `text` as is, with a BOS first where the tokenizer adds one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text, false)?;
        if let Some(bos) = self.tokenizer.bos().filter(|_| self.tokenizer.adds_bos())
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The token ids of `messages` in the chat template, ready for the assistant's turn.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text =
            self.template.render(messages, true).map_err(within("rendering the chat template"))?;
        self.encode(&text)
    }

    /// The prompt's token ids: the chat template around `user` (and `system`), or the raw
    /// text when `raw`.
    pub fn prompt(&self, user: &str, system: Option<&str>, raw: bool) -> Result<Vec<u32>> {
        if user.trim().is_empty() {
            return Err(Error::Model("the prompt is empty".into()));
        }
        if raw {
            return self.encode(user);
        }
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(Message::system(system));
        }
        messages.push(Message::user(user));
        self.encode_chat(&messages)
    }

    /// Text of generated ids (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_else(|e| format!("<undecodable: {e}>"))
    }
}
