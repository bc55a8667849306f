//! The fuzz targets, their mutations and seed corpora (the driver is `src/main.rs`,
//! `specrej-fuzz`).

pub mod mutate;
pub mod seeds;
pub mod targets;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The corpus files of a target: its seeds (`fuzz/corpus/<target>/`) and its regressions
/// (`fuzz/regressions/<target>/`: inputs that once failed).
pub fn corpus_files(target: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for folder in ["corpus", "regressions"] {
        let dir = root().join("fuzz").join(folder).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}
