//! `cargo xtask gpu-check [--release] [--dry-run]`: builds, here and without a GPU, everything
//! the GPU machine's check needs, and stages it for `scripts/gpu-check.sh`.
//!
//! The GPU machine has the CUDA 13 driver and toolkit but no Rust and no network, and each
//! call receives the working tree plus carried ignored paths, 64 MiB in all: so the binaries
//! are built here, stripped and compressed together, and the 98 MB default model travels in
//! two parts over two calls (the machine keeps what a call left while it stays warm).
//!
//! Staged:
//! - `target/gpu-check/bundle.tar.xz`: `bin/specrej` (the CLI with CUDA; dev profile unless
//!   `--release`: see [`gpu_check`]), `bin/gpu_bench` (specrej-candle's example),
//!   `bin/specrej-candle-tests` (specrej-candle's unit tests with CUDA; the CUDA conformance
//!   cases are its `tests::cuda::` tests), `bin/specrej-tests` (the tests package's `all`,
//!   whose `conformance::` suite runs wgpu against candle-cpu), `tokenizer.gguf` (the model's
//!   `tokenizer.*` metadata alone, for random-weight models of its shape);
//! - `target/gpu-check/gl/`: the Vulkan loader (`libvulkan1`'s .deb) for wgpu there;
//! - `target/gpu-check/model.part-b` and `model.sha256`: the model's tail and its checksum;
//! - `target/gpu-model-a/model.part-a`: the model's head, carried by the first call.
//!
//! `--dry-run` then runs `scripts/gpu-check.sh --dry-run` here: the same staged files, the
//! CUDA steps skipped, the rest on the CPU and lavapipe at tiny sizes.

use crate::run;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cuda::cuda_env;

/// What one device call may carry: the working tree and the carried paths together.
const CALL_LIMIT_BYTES: u64 = 64 << 20;
/// Room left in each call for what the size count cannot see (directory entries, a file
/// written between staging and the call).
const CALL_MARGIN_BYTES: u64 = 1 << 20;
/// The staged binaries, as named in the bundle.
const BINARIES: [&str; 4] = ["specrej", "gpu_bench", "specrej-candle-tests", "specrej-tests"];

fn cargo(root: &Path, env: &[(String, String)]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root).envs(env.iter().map(|(k, v)| (k, v)));
    command
}

/// The `"executable"` path cargo reports (JSON messages on stdout) for the test target
/// named `target_name` (a lib's crate name, or an integration test's name).
fn test_executable(json: &str, target_name: &str) -> Option<PathBuf> {
    json.lines()
        .filter(|l| {
            l.contains("\"reason\":\"compiler-artifact\"")
                && l.contains(&format!("\"name\":\"{target_name}\""))
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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// `cargo test --no-run` with `args`; the test executable cargo reports for `target_name`.
fn build_test(
    root: &Path,
    env: &[(String, String)],
    profile: &[&str],
    args: &[&str],
    target_name: &str,
) -> Result<PathBuf> {
    let mut tests = cargo(root, env);
    tests
        .arg("test")
        .args(profile)
        .args(args)
        .args(["--no-run", "--message-format=json-render-diagnostics"]);
    eprintln!("$ {tests:?}");
    let output = tests.stderr(Stdio::inherit()).output().context("starting cargo test --no-run")?;
    if !output.status.success() {
        bail!("cargo test --no-run failed: {}", output.status);
    }
    test_executable(&String::from_utf8_lossy(&output.stdout), target_name)
        .with_context(|| format!("cargo reported no test executable {target_name}"))
}

/// Bytes of what travels with every call: the files git tracks or would track (the working
/// tree the device tool sends), counted as they are now.
fn tree_bytes(root: &Path) -> Result<u64> {
    let output = Command::new("git")
        .current_dir(root)
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .output()
        .context("running git ls-files")?;
    if !output.status.success() {
        bail!("git ls-files failed: {}", output.status);
    }
    Ok(output
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| size(&root.join(String::from_utf8_lossy(p).as_ref())))
        .sum())
}

/// The Vulkan loader's package (`libvulkan1`) in `dir`, for wgpu on the GPU machine (its
/// NVIDIA driver brings the ICD; the loader may be missing). Downloaded with apt once; a
/// warning, not an error, where apt cannot: the script then skips the wgpu steps there
/// unless the machine has a loader.
fn stage_vulkan_loader(dir: &Path) -> Result<()> {
    let present = std::fs::read_dir(dir).is_ok_and(|d| {
        d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with("libvulkan1_"))
    });
    if present {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    // The device is x86-64: download the amd64 package whatever this machine is (the device
    // README's options; on an amd64 machine they are the defaults).
    let lists = std::env::temp_dir().join("specrej-apt-amd64");
    std::fs::create_dir_all(lists.join("partial"))?;
    let options = [
        "-oAPT::Architecture=amd64".to_string(),
        "-oAPT::Architectures=amd64".to_string(),
        format!("-oDir::State::Lists={}", lists.display()),
    ];
    let fetched = Command::new("apt-get")
        .args(&options)
        .arg("update")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .current_dir(dir)
            .args(&options)
            .args(["download", "libvulkan1"])
            .status()
            .is_ok_and(|s| s.success());
    if !fetched {
        eprintln!(
            "warning: could not download libvulkan1 with apt: the device script will skip wgpu unless that machine has a Vulkan loader"
        );
    }
    Ok(())
}

/// Copies `len` bytes of `from` starting at `offset` to `to`.
fn copy_range(from: &Path, offset: u64, len: u64, to: &Path) -> Result<()> {
    let mut file =
        std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut out =
        std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let copied = std::io::copy(&mut file.take(len), &mut out)?;
    if copied != len {
        bail!("{}: {copied} bytes copied of {len}", to.display());
    }
    out.flush()?;
    Ok(())
}

/// Builds the CLI, the `gpu_bench` example, specrej-candle's test binary and the tests
/// package's `all` with CUDA, stages them (see the module docs) with the Vulkan loader and
/// the model in two parts, prints what each device call carries and the calls, and with
/// `dry_run` runs the device script here (`--dry-run`).
///
/// `release: false` builds the dev profile, which this workspace already optimises where
/// it matters (every dependency and specrej-candle/-core at opt-level 3) and which shares
/// the compiled CUDA kernels with `cargo xtask cuda-check`; `release: true` compiles all
/// of them again (about ten minutes of nvcc on two cores).
pub fn gpu_check(root: &Path, model: &Path, release: bool, dry_run: bool) -> Result<()> {
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
    let candle_tests = build_test(
        root,
        &env,
        profile,
        &["-p", "specrej-candle", "--features", "cuda", "--lib"],
        "specrej_candle",
    )?;
    // With candle's CUDA feature too: the binary is larger, but it shares every compiled
    // dependency with the builds above, and its kernels compress away beside theirs.
    let package_tests = build_test(
        root,
        &env,
        profile,
        &["-p", "specrej-tests", "--features", "specrej-candle/cuda", "--test", "all"],
        "all",
    )?;

    let target = env
        .iter()
        .find(|(k, _)| k == "CARGO_TARGET_DIR")
        .map(|(_, v)| PathBuf::from(v))
        .context("cuda_env sets CARGO_TARGET_DIR")?;
    let built = target.join(if release { "release" } else { "debug" });
    let sources = [
        built.join("specrej"),
        built.join("examples").join("gpu_bench"),
        candle_tests,
        package_tests,
    ];

    let stage = root.join("target").join("gpu-check");
    std::fs::create_dir_all(&stage)?;
    // The bundle: the binaries stripped, in one xz stream whose dictionary spans two of them,
    // so the CUDA kernels every one embeds are stored about once. Remade only when a binary
    // or the model is newer than it.
    let bundle = stage.join("bundle.tar.xz");
    let newest_input =
        sources.iter().map(PathBuf::as_path).chain([model]).filter_map(modified).max();
    let fresh = matches!((modified(&bundle), newest_input), (Some(b), Some(i)) if b > i);
    if fresh {
        eprintln!("{} is newer than the binaries and the model: kept", bundle.display());
    } else {
        let bin = stage.join("bin");
        if bin.exists() {
            std::fs::remove_dir_all(&bin)?;
        }
        std::fs::create_dir_all(&bin)?;
        for (source, name) in sources.iter().zip(BINARIES) {
            strip_copy(source, &bin.join(name))?;
        }
        tokenizer_gguf(model, &stage.join("tokenizer.gguf"))?;
        let mut files: Vec<String> = BINARIES.iter().map(|b| format!("bin/{b}")).collect();
        files.push("tokenizer.gguf".into());
        for f in &files {
            eprintln!("{:>8.1} MiB  {f} (stripped)", mib(size(&stage.join(f))));
        }
        let partial = stage.join("bundle.tar.xz.partial");
        run(Command::new("tar")
            .current_dir(&stage)
            .env("XZ_OPT", "--lzma2=preset=9,dict=192MiB")
            .args(["-cJf", "bundle.tar.xz.partial"])
            .args(&files))?;
        std::fs::rename(&partial, &bundle)?;
        std::fs::remove_dir_all(&bin)?;
        std::fs::remove_file(stage.join("tokenizer.gguf"))?;
    }
    stage_vulkan_loader(&stage.join("gl"))?;

    let stale = stage.join("out");
    if stale.exists() {
        std::fs::remove_dir_all(&stale)?; // results of an older script, which must not travel
    }
    // The model in two parts, sized so both calls carry about as much: the first the head,
    // the second the tail beside the bundle (each call also carries the working tree).
    let tree = tree_bytes(root)?;
    let model_len = size(model);
    let sha = stage.join("model.sha256");
    std::fs::write(
        &sha,
        format!(
            "{}  {}\n",
            crate::sha256(model)?,
            model.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ),
    )?;
    let part_b = stage.join("model.part-b");
    if part_b.exists() {
        std::fs::remove_file(&part_b)?;
    }
    let beside_b = walk_size(&stage)?;
    let part_a_len = ((beside_b + model_len) / 2).min(model_len);
    let part_a_dir = root.join("target").join("gpu-model-a");
    std::fs::create_dir_all(&part_a_dir)?;
    copy_range(model, 0, part_a_len, &part_a_dir.join("model.part-a"))?;
    copy_range(model, part_a_len, model_len - part_a_len, &part_b)?;
    let call1 = tree + size(&part_a_dir.join("model.part-a"));
    let staged: u64 = walk_size(&stage)?;
    let call2 = tree + staged;
    eprintln!("per device call (the working tree, {:.1} MiB, travels with each):", mib(tree));
    eprintln!(
        "  call 1: {:>5.1} MiB  target/gpu-model-a ({:.1} MiB: the model's first {part_a_len} bytes)",
        mib(call1),
        mib(part_a_len)
    );
    eprintln!(
        "  call 2: {:>5.1} MiB  target/gpu-check (bundle {:.1} MiB, Vulkan loader {:.1} MiB, model part b {:.1} MiB)",
        mib(call2),
        mib(size(&bundle)),
        mib(walk_size(&stage.join("gl"))?),
        mib(model_len - part_a_len)
    );
    let limit = CALL_LIMIT_BYTES - CALL_MARGIN_BYTES;
    if call1 > limit || call2 > limit {
        bail!(
            "a call would carry more than {:.0} MiB: call 1 {:.1} MiB, call 2 {:.1} MiB",
            mib(limit),
            mib(call1),
            mib(call2)
        );
    }
    eprintln!(
        "the device calls, back to back (the second within the machine's 30 s warm period):\n  \
         run(command=\"bash scripts/gpu-check.sh --receive\", carry=[\"target/gpu-model-a\"], timeout_s=60)\n  \
         run(command=\"bash scripts/gpu-check.sh\", carry=[\"target/gpu-check\"], timeout_s=600)"
    );
    if dry_run {
        run(Command::new("bash")
            .current_dir(root)
            .args(["scripts/gpu-check.sh", "--dry-run"])
            .env_remove("OUT"))?;
        eprintln!(
            "dry run passed: its results are in {}",
            root.join("target").join("gpu-check-out").display()
        );
    }
    Ok(())
}

/// Bytes of the files under `dir` (0 if it does not exist).
fn walk_size(dir: &Path) -> Result<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut total = 0;
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        total += if kind.is_dir() { walk_size(&entry.path())? } else { entry.metadata()?.len() };
    }
    Ok(total)
}
