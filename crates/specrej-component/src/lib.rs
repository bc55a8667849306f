//! The specrej scheduler as a WebAssembly component.
//!
//! Built for `wasm32-unknown-unknown` and encoded with `wit-component` by
//! `cargo xtask component` (see `xtask/src/component.rs`) into
//! `target/specrej-decoder.component.wasm`. It exports `specrej:decoder/decode` and imports
//! `specrej:decoder/engine` and `specrej:decoder/progress` (`wit/decoder.wit`), and nothing
//! else: no WASI, so wasmtime and (through jco) a browser host the same file.
//!
//! `decode.generate` runs [`specrej_core::generate`] over the imported engine, driven by
//! [`specrej_core::block_on_ready`]: component imports are synchronous, so every future is
//! ready on its first poll. With the `separate-reward` feature the component targets world
//! `decoder-with-reward` and scores through the `reward` import instead of `engine.score`.
//!
//! On other targets the crate is empty.

#[cfg(target_arch = "wasm32")]
mod guest;
