//! Cross-crate tests live in `all/`; this library only holds shared helpers.

use std::path::PathBuf;

/// The default model's path from `SPECREJ_MODEL` (set by `cargo xtask test`).
///
/// # Panics
/// When the variable is unset or the file is missing: tests that call this are
/// `#[ignore]`d in a plain `cargo test`.
pub fn default_model() -> PathBuf {
    let path = std::env::var_os("SPECREJ_MODEL")
        .map(PathBuf::from)
        .expect("SPECREJ_MODEL is unset: run `cargo xtask test`, which fetches the default model");
    assert!(path.exists(), "SPECREJ_MODEL points to {}, which does not exist", path.display());
    path
}
