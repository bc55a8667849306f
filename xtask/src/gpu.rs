//! `cargo xtask gpu-check`: builds, here and without a GPU, everything the GPU machine's
//! check needs, and stages it under `target/gpu-check/` for `scripts/gpu-check.sh`.
//!
//! The GPU machine has the CUDA 13 driver and toolkit but no Rust and no network, and
//! receives the working tree plus at most 64 MiB of carried ignored paths: so the binaries
//! are built here (release, stripped) and the 98 MB default model stays behind. Only its
//! tokenizer travels (`tokenizer.gguf`, the GGUF's `tokenizer.*` entries alone, ~2 MB): the
//! device script writes random-weight models of real shapes there (`gpu_bench
//! write-model`), one of them with this tokenizer so the CLI runs end to end.
//!
//! Staged (`target/gpu-check/`):
//! - `bin/specrej`: the CLI with CUDA (dev profile unless `--release`: see [`gpu_check`]);
//! - `bin/gpu_bench`: specrej-candle's example (random models, decode and SR-vs-BoN timings);
//! - `bin/specrej-candle-tests`: specrej-candle's unit tests with CUDA (the CUDA
//!   conformance cases are its `tests::cuda::` tests, run with `--include-ignored`);
//! - `tokenizer.gguf`.

use crate::run;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cuda::cuda_env;

/// What may be carried to the GPU machine, less room for the working tree itself.
const CARRY_LIMIT_BYTES: u64 = 60 << 20;

fn cargo(root: &Path, env: &[(String, String)]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(root)
        .envs(env.iter().map(|(k, v)| (k, v)));
    command
}


/// The `"executable"` paths cargo reports (JSON messages on stdout) for package `name`'s
/// lib test.
fn test_executable(json: &str, crate_name: &str) -> Option<PathBuf> {
    json.lines()
        .filter(|l| {
            l.contains("\"reason\":\"compiler-artifact\"")
                && l.contains(&format!("\"name\":\"{crate_name}\""))
        })
        .filter(|l| l.contains("\"test\":true"))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = l[start..].find('"')?;
            Some(PathBuf::from(&l[start..start + end]))
        })
}

/// Copies `from` to `to` without its symbols and debug info.
fn strip_copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    run(Command::new("strip").arg(to))
}

/// Reads `n` bytes, appending them to `kept`.
fn take(reader: &mut impl Read, n: u64, kept: &mut Vec<u8>) -> Result<()> {
    let got = reader.take(n).read_to_end(kept)?;
    if got as u64 != n {
        bail!("truncated GGUF header");
    }
    Ok(())
}

fn take_u32(reader: &mut impl Read, kept: &mut Vec<u8>) -> Result<u32> {
    take(reader, 4, kept)?;
    Ok(u32::from_le_bytes(kept[kept.len() - 4..].try_into()?))
}

fn take_u64(reader: &mut impl Read, kept: &mut Vec<u8>) -> Result<u64> {
    take(reader, 8, kept)?;
    Ok(u64::from_le_bytes(kept[kept.len() - 8..].try_into()?))
}

/// Reads one GGUF metadata value of type `ty` (appending its bytes to `kept`).
fn take_value(reader: &mut impl Read, ty: u32, kept: &mut Vec<u8>) -> Result<()> {
    match ty {
        0 | 1 | 7 => take(reader, 1, kept), // u8, i8, bool
        2 | 3 => take(reader, 2, kept),     // u16, i16
        4..=6 => take(reader, 4, kept),     // u32, i32, f32
        10..=12 => take(reader, 8, kept),   // u64, i64, f64
        8 => {
            let len = take_u64(reader, kept)?;
            take(reader, len, kept)
        }
        9 => {
            let elem = take_u32(reader, kept)?;
            let count = take_u64(reader, kept)?;
            for _ in 0..count {
                take_value(reader, elem, kept)?;
            }
            Ok(())
        }
        other => bail!("unknown GGUF value type {other}"),
    }
}

/// Writes a GGUF holding only `model`'s `tokenizer.*` metadata (no tensors): what the
/// CLI's tokenizer and chat template need.
pub fn tokenizer_gguf(model: &Path, out: &Path) -> Result<()> {
    let file =
        std::fs::File::open(model).with_context(|| format!("opening {}", model.display()))?;
    let mut reader = BufReader::new(file);
    let mut header = Vec::new();
    take(&mut reader, 4, &mut header)?;
    if header != b"GGUF" {
        bail!("{} is not a GGUF file", model.display());
    }
    let version = take_u32(&mut reader, &mut header)?;
    if version < 2 {
        bail!(
            "{}: GGUF version {version} (64-bit counts need version 2 or later)",
            model.display()
        );
    }
    let _tensors = take_u64(&mut reader, &mut header)?;
    let entries = take_u64(&mut reader, &mut header)?;
    let mut kept = Vec::new();
    let mut kept_count = 0u64;
    for _ in 0..entries {
        let mut entry = Vec::new();
        let key_len = take_u64(&mut reader, &mut entry)?;
        take(&mut reader, key_len, &mut entry)?;
        let key = String::from_utf8_lossy(&entry[8..]).into_owned();
        let ty = take_u32(&mut reader, &mut entry)?;
        take_value(&mut reader, ty, &mut entry)?;
        if key.starts_with("tokenizer.") {
            kept.extend_from_slice(&entry);
            kept_count += 1;
        }
    }
    if kept_count == 0 {
        bail!("{} has no tokenizer.* metadata", model.display());
    }
    let mut bytes = Vec::with_capacity(24 + kept.len());
    bytes.extend_from_slice(b"GGUF");
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes()); // tensors
    bytes.extend_from_slice(&kept_count.to_le_bytes());
    bytes.extend_from_slice(&kept);
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Builds the CLI, the `gpu_bench` example and specrej-candle's test binary with CUDA,
/// stages them stripped with the tokenizer of `model` under `target/gpu-check/`, and
/// prints what to carry and the device command.
///
/// `release: false` builds the dev profile, which this workspace already optimises where
/// it matters (every dependency and specrej-candle/-core at opt-level 3) and which shares
/// the compiled CUDA kernels with `cargo xtask cuda-check`; `release: true` compiles all
/// of them again (about ten minutes of nvcc on two cores).
pub fn gpu_check(root: &Path, model: &Path, release: bool) -> Result<()> {
    let env = cuda_env(root)?;
    let profile: &[&str] = if release { &["--release"] } else { &[] };
    run(cargo(root, &env).arg("build").args(profile).args([
        "-p",
        "specrej-cli",
        "--features",
        "specrej-candle/cuda",
    ]))?;
    run(cargo(root, &env).arg("build").args(profile).args([
        "-p",
        "specrej-candle",
        "--features",
        "cuda",
        "--example",
        "gpu_bench",
    ]))?;
    let mut tests = cargo(root, &env);
    tests.arg("test").args(profile);
    tests.args([
        "-p",
        "specrej-candle",
        "--features",
        "cuda",
        "--lib",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    eprintln!("$ {tests:?}");
    let output = tests
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo test --no-run")?;
    if !output.status.success() {
        bail!("cargo test --no-run failed: {}", output.status);
    }
    let test_bin = test_executable(&String::from_utf8_lossy(&output.stdout), "specrej_candle")
        .context("cargo reported no test executable for specrej_candle")?;

    let target = env
        .iter()
        .find(|(k, _)| k == "CARGO_TARGET_DIR")
        .map(|(_, v)| PathBuf::from(v))
        .context("cuda_env sets CARGO_TARGET_DIR")?;
    let built = target.join(if release { "release" } else { "debug" });
    let stage = root.join("target").join("gpu-check");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let bin = stage.join("bin");
    std::fs::create_dir_all(&bin)?;
    strip_copy(&built.join("specrej"), &bin.join("specrej"))?;
    strip_copy(
        &built.join("examples").join("gpu_bench"),
        &bin.join("gpu_bench"),
    )?;
    strip_copy(&test_bin, &bin.join("specrej-candle-tests"))?;
    tokenizer_gguf(model, &stage.join("tokenizer.gguf"))?;

    let files = [
        "bin/specrej",
        "bin/gpu_bench",
        "bin/specrej-candle-tests",
        "tokenizer.gguf",
    ];
    let mut total = 0;
    for f in files {
        let n = size(&stage.join(f));
        total += n;
        eprintln!(
            "{:>8.1} MiB  target/gpu-check/{f}",
            n as f64 / (1 << 20) as f64
        );
    }
    eprintln!("{:>8.1} MiB  in all", total as f64 / (1 << 20) as f64);
    if total > CARRY_LIMIT_BYTES {
        // Compressed, the kernels' PTX and SASS shrink 4x (gzip) to 8x (xz): measured on
        // the CLI, 60 MiB stripped, 15.6 MiB gzip, 7.7 MiB xz. The script unpacks either
        // (xz with python3's tarfile where the machine has no xz).
        let xz = Command::new("xz")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let (bundle, flag) = if xz {
            ("bundle.tar.xz", "-cJf")
        } else {
            ("bundle.tar.gz", "-czf")
        };
        run(Command::new("tar")
            .current_dir(&stage)
            .args([flag, bundle])
            .args(files))?;
        for f in files {
            std::fs::remove_file(stage.join(f))?;
        }
        std::fs::remove_dir(&bin)?;
        let n = size(&stage.join(bundle));
        eprintln!(
            "{:>8.1} MiB  target/gpu-check/{bundle} (the script unpacks it)",
            n as f64 / (1 << 20) as f64
        );
        if n > CARRY_LIMIT_BYTES {
            bail!(
                "the staged files take {n} bytes compressed: more than the {CARRY_LIMIT_BYTES} that can be carried"
            );
        }
    }
    eprintln!(
        "staged in {}; on the GPU machine, carrying target/gpu-check:\n  bash scripts/gpu-check.sh",
        stage.display()
    );
    Ok(())
}
