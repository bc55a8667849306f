//! The browser engine of the specrej demo (`web/`).
//!
//! The scheduler does not live here: the page hosts the decoder *component*
//! (`crates/specrej-component`, the file the wasmtime server runs) transpiled by jco, and
//! this crate implements that component's `engine` import in the browser. It exports one
//! wasm-bindgen class, `WebEngine`:
//!
//! - the model on WebGPU ([`specrej_wgpu`]): `prefill`, `step` (a `Promise`, since WebGPU
//!   reads back asynchronously: the page's jco build suspends the component with JSPI while
//!   it is pending), `retain`, `score` (the policy model as a judge), `release`;
//! - or the model on the CPU (`specrej_candle`, loaded from the bytes with
//!   `load_gguf_bytes`), when there is no WebGPU: the same calls, completing synchronously,
//!   plus `stepNow`/`scoreNow` for browsers without JSPI;
//! - `selfTest()`: every WGSL kernel against a host reference on the browser's adapter
//!   (`specrej_wgpu::diag`), no model needed;
//! - the text layer ([`specrej_text`]): the tokenizer built from the GGUF metadata, the chat
//!   template, the judge prompt's segments, decoding for the live view.
//!
//! `web/src/bridge.js` documents the JS side of the interface. On targets other than wasm32
//! the crate is empty, so `cargo test --workspace` builds nothing here.

#[cfg(target_arch = "wasm32")]
mod engine;
