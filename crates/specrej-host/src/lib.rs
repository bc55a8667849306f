//! The wasmtime host of the specrej component and its HTTP server.
//!
//! - [`runtime`]: loads the component (`cargo xtask component` builds it), implements its
//!   `engine` and `progress` imports over any [`runtime::Engine`] (a `specrej_core`
//!   decoder and scorer), and calls `decode.generate` with fuel and time limits.
//! - [`model`]: the served model: specrej-candle weights with the specrej-text tokenizer and
//!   chat template, or the fake backend.
//! - [`api`]: the OpenAI-compatible request and response documents.
//! - [`server`]: HTTP on `std::net`: `/v1/chat/completions`, `/v1/completions`,
//!   `/v1/models`, `/health`; one engine worker; server-sent events.

pub mod api;
pub mod model;
pub mod runtime;
pub mod server;

pub use model::{BackendKind, RealModel, RewardKind, Served};
pub use runtime::{Engine, EventKinds, Limits, Pair, Run, RunError, Runtime};
pub use server::{spawn, ServerConfig, ServerHandle};
