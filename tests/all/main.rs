//! One test binary for every cross-crate test.

mod conformance;
mod dense;
mod dependencies;
mod gguf_rules;
mod real_model;
