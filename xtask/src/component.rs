//! `cargo xtask component`: builds `specrej-component` for `wasm32-unknown-unknown` and
//! encodes it with `wit-component` into a component (no WASI imports), so wasmtime
//! (`specrej-server`) and, through jco, a browser can host the same file.
//!
//! Also included by path from `crates/specrej-host/tests/` (one build recipe for both).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The component `build_component` writes, relative to the workspace root.
pub const COMPONENT_FILE: &str = "target/specrej-decoder.component.wasm";
/// World `decoder-with-reward` (rewards through the separate `reward` import).
pub const COMPONENT_WITH_REWARD_FILE: &str = "target/specrej-decoder-with-reward.component.wasm";
/// Its own target directory: a build started from inside `cargo test` must not wait on
/// the outer cargo's lock, and the wasm artefacts stay apart from the native ones.
const GUEST_TARGET_DIR: &str = "target/component";
const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// The only interfaces the component may import.
const ALLOWED_IMPORTS: &[&str] = &["specrej:decoder/"];

/// Builds world `decoder` into [`COMPONENT_FILE`] and returns its path.
pub fn build_component(root: &Path) -> Result<PathBuf> {
    build(root, &[], COMPONENT_FILE)
}

/// Builds world `decoder-with-reward` into [`COMPONENT_WITH_REWARD_FILE`].
pub fn build_component_with_reward(root: &Path) -> Result<PathBuf> {
    build(root, &["separate-reward"], COMPONENT_WITH_REWARD_FILE)
}

fn build(root: &Path, features: &[&str], out: &str) -> Result<PathBuf> {
    let target_dir = root.join(GUEST_TARGET_DIR);
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(root)
        .args(["build", "--release", "--quiet", "-p", "specrej-component", "--target", WASM_TARGET])
        .env("CARGO_TARGET_DIR", &target_dir)
        // Host-only flags (e.g. target-cpu) must not reach the wasm build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // The workspace's release profile keeps line tables; the component needs none.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    if !features.is_empty() {
        cargo.args(["--features", &features.join(",")]);
    }
    eprintln!("$ {cargo:?}");
    let output = cargo.output().with_context(|| format!("starting {cargo:?}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("target may not be installed")
            || stderr.contains("can't find crate for `core`")
        {
            format!("\nthe {WASM_TARGET} target is missing: run `rustup target add {WASM_TARGET}`")
        } else {
            String::new()
        };
        bail!(
            "building specrej-component for {WASM_TARGET} failed ({}):\n{stderr}{hint}",
            output.status
        );
    }
    let module_path = target_dir.join(WASM_TARGET).join("release").join("specrej_component.wasm");
    let module = std::fs::read(&module_path)
        .with_context(|| format!("reading {}", module_path.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .with_context(|| {
            format!("reading the component-type section of {}", module_path.display())
        })?
        .validate(true)
        .encode()
        .with_context(|| format!("encoding {} as a component", module_path.display()))?;
    check_imports(&component)?;
    let out = root.join(out);
    // Write then rename, so a reader never sees half a file.
    let partial = out.with_extension("wasm.partial");
    std::fs::write(&partial, &component)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &out).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("component ready: {} ({} KiB)", out.display(), component.len() / 1024);
    Ok(out)
}

/// Fails unless every import of `component` is one of ours (no WASI: the browser hosts it).
fn check_imports(component: &[u8]) -> Result<()> {
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(component) {
        match payload.context("parsing the encoded component")? {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(imports) if depth == 0 => {
                for import in imports {
                    let name = import.context("reading a component import")?.name.name;
                    if !ALLOWED_IMPORTS.iter().any(|prefix| name.starts_with(prefix)) {
                        bail!(
                            "the component imports {name:?}; only specrej:decoder/* is allowed (no WASI)"
                        );
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
