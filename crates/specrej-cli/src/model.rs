//! Finding and loading the model: weights (specrej-candle), tokenizer and chat template
//! (specrej-text).

use anyhow::{bail, Context, Result};
use specrej_text::{ChatTemplate, GgufMetadata, Message, Tokenizer};
use std::path::{Path, PathBuf};

/// The default model's file name (fetched by `cargo xtask fetch-model` into `models/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model to use: `--model`, else `$SPECREJ_MODEL`, else `models/<default>` in the
/// current directory or in this checkout.
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
    bail!(
        "no model given and the default model ({DEFAULT_MODEL_FILE}) is not in models/: \
         run `cargo xtask fetch-model`, or pass --model PATH"
    )
}

/// The text side of a model: tokenizer and chat template.
#[derive(Debug)]
pub struct Text {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The GGUF metadata, for a GGUF file (`None` for a safetensors directory).
    pub metadata: Option<GgufMetadata>,
}

impl Text {
    /// From a GGUF file's metadata, or from a HF directory's `tokenizer.json` and
    /// `tokenizer_config.json` (chat template; ChatML when it has none).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            let mut tokenizer = Tokenizer::from_tokenizer_json_file(&json)
                .with_context(|| format!("reading {}", json.display()))?;
            let config_path = path.join("tokenizer_config.json");
            let template = if config_path.exists() {
                let config = std::fs::read(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
                tokenizer = tokenizer.with_tokenizer_config(&config).with_context(|| format!("{}", config_path.display()))?;
                ChatTemplate::from_tokenizer_config(&config).with_context(|| format!("chat template in {}", config_path.display()))?
            } else {
                ChatTemplate::chatml()
            };
            return Ok(Self { tokenizer, template, metadata: None });
        }
        let metadata = GgufMetadata::from_path(path).with_context(|| format!("reading {}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(&metadata).with_context(|| format!("tokenizer of {}", path.display()))?;
        let template = ChatTemplate::from_gguf(&metadata).with_context(|| format!("chat template of {}", path.display()))?;
        Ok(Self { tokenizer, template, metadata: Some(metadata) })
    }

    /// The prompt's token ids: the chat template around `user` (and `system`), or the raw
    /// text when `raw`.
    pub fn prompt(&self, user: &str, system: Option<&str>, raw: bool) -> Result<Vec<u32>> {
        if user.trim().is_empty() {
            bail!("the prompt is empty");
        }
        let text = if raw {
            user.to_string()
        } else {
            let mut messages = Vec::new();
            if let Some(system) = system {
                messages.push(Message::system(system));
            }
            messages.push(Message::user(user));
            self.template.render(&messages, true).context("rendering the chat template")?
        };
        let mut ids = self.tokenizer.encode(&text, false)?;
        if let Some(bos) = self.tokenizer.bos().filter(|_| self.tokenizer.adds_bos()) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_else(|e| format!("<undecodable: {e}>"))
    }
}

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// GGUF model file or HF safetensors directory (default: the default model in models/).
    #[arg(long)]
    model: Option<PathBuf>,
}

pub fn info(args: InfoArgs) -> Result<()> {
    let path = locate(args.model.as_deref())?;
    let text = Text::load(&path)?;
    let Some(meta) = &text.metadata else {
        let config = path.join("config.json");
        println!("directory:     {}", path.display());
        println!("config.json:\n{}", std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?);
        println!("vocabulary:    {} tokens, eos {:?}", text.tokenizer.vocab_size(), text.tokenizer.eos_ids());
        println!("chat template:\n{}", text.template.source());
        return Ok(());
    };
    let arch = meta.get_str("general.architecture").unwrap_or("?");
    println!("file:          {}", path.display());
    println!("name:          {}", meta.get_str("general.name").unwrap_or("?"));
    println!("architecture:  {arch}");
    for key in ["block_count", "embedding_length", "attention.head_count", "attention.head_count_kv", "context_length"] {
        let value = meta.get(&format!("{arch}.{key}")).map_or("?".to_string(), |v| v.to_string());
        println!("{:<14} {value}", format!("{key}:"));
    }
    println!("vocabulary:    {} tokens, eos {:?}", text.tokenizer.vocab_size(), text.tokenizer.eos_ids());
    println!("chat template:\n{}", text.template.source());
    Ok(())
}
