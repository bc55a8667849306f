//! One test binary for every cross-crate test.

mod real_model;
