//! Finding and loading the model: weights (specrej-candle), tokenizer and chat template
//! (specrej-text).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The text side of a model (tokenizer, chat template, GGUF metadata): specrej-text's, shared
/// with `specrej-server`.
pub use specrej_text::ModelText as Text;

/// The model to use: `--model`, else `$SPECREJ_MODEL`, else `models/<default>` in the
/// current directory or in this checkout ([`specrej_text::locate_model`]).
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    Ok(specrej_text::locate_model(explicit)?)
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
        println!(
            "config.json:\n{}",
            std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?
        );
        println!(
            "vocabulary:    {} tokens, eos {:?}",
            text.tokenizer.vocab_size(),
            text.tokenizer.eos_ids()
        );
        println!("chat template:\n{}", text.template.source());
        return Ok(());
    };
    let arch = meta.get_str("general.architecture").unwrap_or("?");
    println!("file:          {}", path.display());
    println!("name:          {}", meta.get_str("general.name").unwrap_or("?"));
    println!("architecture:  {arch}");
    for key in [
        "block_count",
        "embedding_length",
        "attention.head_count",
        "attention.head_count_kv",
        "context_length",
    ] {
        let value = meta.get(&format!("{arch}.{key}")).map_or("?".to_string(), |v| v.to_string());
        println!("{:<14} {value}", format!("{key}:"));
    }
    println!(
        "vocabulary:    {} tokens, eos {:?}",
        text.tokenizer.vocab_size(),
        text.tokenizer.eos_ids()
    );
    println!("chat template:\n{}", text.template.source());
    Ok(())
}
