//! One test binary for every cross-crate test.

mod conformance;
mod real_model;
