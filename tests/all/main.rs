//! One test binary for every cross-crate test.

mod conformance;
mod dense;
mod real_model;
