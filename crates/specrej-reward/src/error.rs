//! What can go wrong with a reward model.

use std::path::PathBuf;

/// A reward model could not be loaded, exported or reached. Messages name the file or URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RewardError {
    /// The trunk (or the checkpoint as a whole) failed to load.
    #[error(transparent)]
    Load(#[from] specrej_candle::LoadError),
    /// `config.json` names an architecture that is not a supported sequence classifier.
    #[error("{path}: unsupported reward model architecture {found:?} (supported: {})", crate::SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// What it names.
        found: String,
    },
    /// A config entry is missing or wrong (e.g. `num_labels` other than 1).
    #[error("{path}: bad or missing config entry {key:?}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The entry.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint has no `score.weight` (not a sequence classifier, or a broken export).
    #[error("{path}: missing the reward head tensor \"score.weight\"")]
    MissingScoreHead {
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// The tokenizer or chat template failed to load.
    #[error("{path}: {source}")]
    Text {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: specrej_text::Error,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else, with a message.
    #[error("{0}")]
    Other(String),
}
