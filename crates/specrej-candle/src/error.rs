//! What can go wrong while loading a model.

use std::path::PathBuf;

/// A model could not be loaded. Every variant names the file (or directory) involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The path does not exist.
    #[error("{path}: no such file or directory")]
    Missing {
        /// The path that was asked for.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic bytes.
    #[error("{path}: not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// The first bytes found (fewer than 4 if the file is that short).
        found: Vec<u8>,
    },
    /// The file is truncated or its contents are inconsistent.
    #[error("{path}: truncated or corrupt file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the reader tripped over.
        reason: String,
    },
    /// The model architecture is not one this backend implements.
    #[error(
        "{path}: unsupported architecture {architecture:?} (supported: llama, mistral, qwen2; \
         LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
    )]
    UnsupportedArchitecture {
        /// The file declaring it.
        path: PathBuf,
        /// The architecture name as found in the file.
        architecture: String,
    },
    /// A required metadata / config entry is missing or has the wrong type or value.
    #[error("{path}: bad or missing config entry {key:?}: {reason}")]
    Config {
        /// The file (GGUF or config.json).
        path: PathBuf,
        /// The entry's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required tensor is absent.
    #[error("{path}: missing tensor {name:?}")]
    MissingTensor {
        /// The file (or directory for sharded checkpoints).
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a type this backend does not handle.
    #[error("{path}: tensor {name:?} has unsupported type {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The type as candle names it.
        dtype: String,
    },
    /// The requested device is not available.
    #[error("device unavailable: {0}")]
    Device(String),
    /// Any other failure inside candle while building the model.
    #[error("{path}: {reason}")]
    Candle {
        /// The file.
        path: PathBuf,
        /// candle's message, without the backtrace candle attaches when `RUST_BACKTRACE` is set.
        reason: String,
    },
}

impl LoadError {
    /// A candle failure while reading `path`.
    pub(crate) fn candle(path: impl Into<PathBuf>, e: &candle_core::Error) -> Self {
        LoadError::Candle { path: path.into(), reason: message(e) }
    }
}

/// candle's message for `e`, one line, without the backtrace frames candle appends to its
/// `Display` when `RUST_BACKTRACE` is set (users get the message, never a dump).
pub fn message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => message(inner),
        E::Context { inner, context } => format!("{context}: {}", message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), message(inner)),
        other => other.to_string().lines().next().unwrap_or_default().to_owned(),
    }
}
