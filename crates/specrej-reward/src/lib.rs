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
//! Every weight format scores the same text to the same bits on the CPU, however its tokens
//! are grouped: scoring runs specrej-candle's one varlen forward, whose per-row arithmetic
//! does not depend on how many tokens share a pass, so incremental and full scoring agree
//! exactly (tests on tiny checkpoints in f32 and Q8_0). Q8_0, the default, quantizes the
//! weights to 8 bits; `F32` (or `Native` for safetensors, which is the same) keeps them as
//! stored, so only F32 matches the checkpoint's transformers scores to rounding. On a GPU the
//! dense forward is used, and incremental and full scores agree only to rounding.
//!
//! # HTTP JSON schema
//! `POST` (any path) with `Content-Type: application/json` and a body (`Content-Length` or
//! chunked) of at most [`MAX_BODY_BYTES`]:
//! ```json
//! {"prompt": "the user's question",
//!  "responses": ["partial answer 1", "..."],
//!  "rows": [0, 5],            // optional: stable row ids, one per response
//!  "session": "any string",   // optional: with "rows", the server keeps RM caches per row
//!  "release": [3, 4]}         // optional: rows of this session to drop (before scoring)
//! ```
//! Answer `200` with `{"rewards": [0.5, -1.25], "tokens_processed": 123}` (one reward per
//! response, in order). Errors are `4xx`/`5xx` with `{"error": "message"}`: 400 malformed
//! JSON or fields, 405 a method other than POST, 408 a body slower than
//! [`ServerLimits::body_timeout`], 413 a body over the limit, 429 (with `Retry-After`) when
//! [`ServerLimits::max_queued`] requests already wait for the model, 500 the model failed;
//! hyper itself answers a malformed request head with 400 and an oversized one with 431, and
//! closes a connection whose head takes longer than [`ServerLimits::header_timeout`]. Without
//! `session` every request is scored from scratch (a pure function of its body). Sessions
//! are held in a small LRU ([`MAX_SESSIONS`]).
//!
//! The server ([`serve`], [`spawn_server`], [`spawn_server_with`]) runs on tokio, hyper and
//! axum: each connection is a task (HTTP/1.1, kept alive), the model scores one request at a
//! time on a blocking thread, and [`serve`] stops on SIGINT or SIGTERM after the requests in
//! flight finish. `specrej-reward-server RM_DIR [ADDR] [--weights f32|q8_0|native]` serves a
//! directory from the command line. [`RemoteScorer`] (on ureq) accepts `Content-Length` and
//! chunked answers of at most [`MAX_ANSWER_BYTES`], keeps connections alive where the server
//! allows, and gives a request [`CONNECT_TIMEOUT`] to connect and [`REQUEST_TIMEOUT`] in all.
#![forbid(unsafe_code)]

mod error;
mod export;
mod http;
mod model;
mod scorer;

pub use error::RewardError;
pub use export::{ExportDtype, ExportReport, export_judge_rm};
pub use http::{
    CONNECT_TIMEOUT, MAX_ANSWER_BYTES, MAX_BODY_BYTES, MAX_SESSIONS, REQUEST_TIMEOUT, RemoteScorer,
    RunningServer, ScoreRequest, ScoreResponse, ServerLimits, check_url, serve, spawn_server,
    spawn_server_with,
};
pub use model::{RewardModel, SUPPORTED_ARCHITECTURES};
pub use scorer::{RewardScorer, RewardSession, detokenize};
