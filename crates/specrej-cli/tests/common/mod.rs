//! Running the `specrej` binary from the integration tests.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `specrej args…` without `$SPECREJ_MODEL`, so only `--model` picks a model, and with
/// `RUST_BACKTRACE=1`, as users often have it, so an error that drags a backtrace along shows.
pub fn specrej(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_specrej"))
        .args(args)
        .env_remove("SPECREJ_MODEL")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Fails with exit code 1, one `error:` line naming `needle`, and no panic or backtrace.
pub fn fails_with(args: &[&str], needle: &str) {
    let output = specrej(args);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line expected, got {err}");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("specrej-cli-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
