//! One test binary for every cross-crate test.

mod conformance;
mod dense;
mod dependencies;
mod real_model;
