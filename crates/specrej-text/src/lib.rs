//! The text layer of specrej: turns text into token ids and back.
//!
//! - [`gguf`]: a minimal, pure-Rust GGUF metadata reader ([`GgufMetadata`]).
//! - [`Tokenizer`]: built from GGUF metadata ([`Tokenizer::from_gguf`]) or a HF
//!   `tokenizer.json` ([`Tokenizer::from_tokenizer_json`]); encode, decode, and streaming decode
//!   ([`StreamDecoder`]).
//! - [`ChatTemplate`]: renders a model's Jinja chat template (HF semantics) with minijinja.
//! - [`judge_segments`]: the token segments of an LLM-as-judge prompt.
//! - [`self_judge_segments`]: the ids after the policy's own answer that ask it whether the answer is good.
//! - [`locate_model`] and [`ModelText`]: finding the model file and loading its tokenizer
//!   and chat template, shared by the front ends (`specrej`, `specrej-server`).

pub mod chat;
/// The GGUF metadata reader (the `specrej-gguf` crate), re-exported.
pub use specrej_gguf as gguf;
pub mod judge;
pub mod model;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use gguf::{GgufError, GgufMetadata, GgufType, GgufValue};
pub use judge::{JudgeSegments, SelfJudgeSegments, judge_segments, self_judge_segments};
pub use model::{DEFAULT_MODEL_FILE, ModelText, locate_model};
pub use tokenizer::{StreamDecoder, Tokenizer};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading GGUF metadata failed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A required GGUF metadata key is missing.
    #[error("GGUF metadata lacks {0:?}")]
    MissingKey(String),
    /// A GGUF metadata key has the wrong type or an invalid value.
    #[error("GGUF metadata {key:?}: {problem}")]
    BadKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer kind this crate cannot build.
    #[error(
        "unsupported tokenizer.ggml.model {0:?} (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece)"
    )]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not know.
    #[error("unsupported tokenizer.ggml.pre {0:?} (supported: {supported})", supported = tokenizer::SUPPORTED_PRE.join(", "))]
    UnsupportedPre(String),
    /// An error from the `tokenizers` crate.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to compile or render.
    #[error("chat template: {0:#}")]
    Template(#[from] minijinja::Error),
    /// Bad JSON (tokenizer_config.json).
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// I/O error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The judge prompt could not be built.
    #[error("judge prompt: {0}")]
    Judge(String),
    /// No model file, or an unusable prompt; the message says which.
    #[error("{0}")]
    Model(String),
    /// An error while doing `context` (which names the file).
    #[error("{context}: {error}")]
    Context {
        /// What was being done.
        context: String,
        /// What went wrong.
        error: Box<Error>,
    },
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
