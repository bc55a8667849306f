//! The wasmtime host of the specrej component and its HTTP server.
//!
//! - [`runtime`]: loads the component (`cargo xtask component` builds it), implements its
//!   `engine` and `progress` imports over any [`runtime::Engine`] (a `specrej_core`
//!   decoder and scorer), and calls `decode.generate` with fuel and time limits. Components
//!   of world `decoder-with-reward` (`cargo xtask component-with-reward`) run too: their
//!   `reward` import is backed by any [`runtime::HostReward`] (every `specrej_core::Scorer`).
//! - [`model`]: the served model: specrej-candle weights with the specrej-text tokenizer and
//!   chat template, or the fake backend; the rewards a request may pick (`judge`,
//!   `likelihood`, and specrej-reward models or reward servers the server was started with).
//! - [`api`]: the OpenAI-compatible request and response documents.
//! - [`batcher`]: the engine thread, the one owner of the decoder and its K/V; it merges
//!   the steps of all running requests into one batched pass, and hands out the KV budget.
//! - [`server`]: HTTP on tokio, hyper and axum: `/v1/chat/completions`, `/v1/completions`,
//!   `/v1/models`, `/health`, `/metrics`; server-sent events; optionally the static files
//!   of the browser demo (`--static DIR`, what `cargo xtask serve` passes).

pub mod api;
pub mod batcher;
pub mod model;
pub mod runtime;
pub mod server;

pub use model::{BackendKind, ExtraReward, RealModel, RewardKind, Served, WgpuServed};
pub use runtime::{Engine, EventKinds, HostReward, Limits, Pair, Run, RunError, Runtime, World};
pub use server::{ServerConfig, ServerHandle, spawn};
