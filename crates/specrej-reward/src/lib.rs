//! Real reward models for specrej.
//!
//! - [`RewardModel`]: a Hugging Face `*ForSequenceClassification` checkpoint directory
//!   (`LlamaForSequenceClassification`, `MistralForSequenceClassification`,
//!   `Qwen2ForSequenceClassification`; `num_labels` 1; `model.safetensors` or shards listed in
//!   `model.safetensors.index.json`, f32/f16/bf16; `tokenizer.json`; the chat template from
//!   `tokenizer_config.json`). The trunk is specrej-candle's Llama-family forward; the reward
//!   is `score.weight · h` (+ `score.bias` if present) where `h` is the final-normed hidden
//!   state of the last token that is not `pad_token_id` (as transformers reads it).
//! - [`RewardScorer`]: a [`specrej_core::Scorer`] on a reward model, for one question. It
//!   detokenizes the policy's ids ([`detokenize`]), formats `question` as the user turn and
//!   the partial response as the assistant turn with the RM's own chat template, re-tokenizes
//!   with the RM's tokenizer, and scores **incrementally** ([`specrej_candle::IncrementalRows`]):
//!   each surviving row keeps its RM K/V cache between decisions, truncated to the longest
//!   common prefix of the new RM ids with the cached ones, so a decision runs only the tokens
//!   that changed (new text, plus the few ids re-tokenization or the template's end-of-turn
//!   suffix changed). `release` drops the RM rows with the policy rows.
//!   [`RewardScorer::full`] re-runs everything at every decision, as the paper's code does.
//! - [`RemoteScorer`] and [`serve`]: the same over HTTP/1.1 + JSON (schema below).
//! - [`export_judge_rm`]: builds an RM directory from a policy GGUF, with
//!   `score.weight = lm_head[Yes] − lm_head[No]` (the LLM judge as a sequence classifier).
//!
//! # Partial answers cut mid-word or mid-character
//! The scheduler asks for scores of partial answers. Their text is the policy's ids decoded
//! with special tokens skipped; an incomplete trailing UTF-8 character (the policy stopped
//! between the byte tokens of one character, which decodes to U+FFFD) is dropped, and comes
//! back once the rest of its bytes are generated. A word cut in the middle is given to the RM
//! as the partial word, inside a complete chat (the template closes the assistant turn after
//! it): the RM scores the text as if the answer ended there. When the word continues, the RM
//! tokenization of its end usually changes; the LCP rule re-runs exactly those ids.
//!
//! # Weight formats
//! Load reward models with [`specrej_candle::WeightFormat::F32`] (or `Native` for
//! safetensors, which is the same) when scores must not depend on how tokens are grouped:
//! incremental and full scoring then agree to float rounding (~1e-6 relative). With the
//! Q8_0 default, candle quantizes activations with kernels chosen by the number of tokens
//! in a pass, so the same text scored in one pass or in pieces differs by Q8 noise (measured
//! ~0.05–0.1 on the exported SmolLM2 judge, whose rewards are O(1)).
//!
//! # HTTP JSON schema
//! `POST` (any path) with `Content-Type: application/json` and a `Content-Length` body of at
//! most [`MAX_BODY_BYTES`]:
//! ```json
//! {"prompt": "the user's question",
//!  "responses": ["partial answer 1", "..."],
//!  "rows": [0, 5],            // optional: stable row ids, one per response
//!  "session": "any string",   // optional: with "rows", the server keeps RM caches per row
//!  "release": [3, 4]}         // optional: rows of this session to drop (before scoring)
//! ```
//! Answer `200` with `{"rewards": [0.5, -1.25], "tokens_processed": 123}` (one reward per
//! response, in order). Errors are `4xx`/`5xx` with `{"error": "message"}`: 400 malformed
//! JSON or fields, 405 a method other than POST, 411 no `Content-Length`, 413 a body over
//! the limit, 500 the model failed. Without `session` every request is scored from scratch
//! (a pure function of its body). Sessions are held in a small LRU ([`MAX_SESSIONS`]).
//! Connections are served one at a time (the model is the bottleneck), each with a 60 s
//! read/write timeout. `specrej-reward-server RM_DIR [ADDR] [--weights f32|q8_0|native]`
//! serves a directory from the command line. [`RemoteScorer`] (on ureq) accepts
//! `Content-Length` and chunked answers of at most [`MAX_ANSWER_BYTES`], keeps connections
//! alive where the server allows, and gives a request [`CONNECT_TIMEOUT`] to connect and
//! [`REQUEST_TIMEOUT`] in all.
#![forbid(unsafe_code)]

mod error;
mod export;
mod http;
mod model;
mod scorer;

pub use error::RewardError;
pub use export::{ExportDtype, ExportReport, export_judge_rm};
pub use http::{
    CONNECT_TIMEOUT, MAX_ANSWER_BYTES, MAX_BODY_BYTES, MAX_SESSIONS, REQUEST_TIMEOUT, RemoteScorer, ScoreRequest, ScoreResponse,
    serve, spawn_server,
};
pub use model::{RewardModel, SUPPORTED_ARCHITECTURES};
pub use scorer::{RewardScorer, RewardSession, detokenize};
