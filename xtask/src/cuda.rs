//! A CUDA toolkit from PyPI wheels, so that `--features cuda` builds on machines without a
//! system CUDA and without a GPU (developers, CI).
//!
//! The wheels (pinned below, CUDA 13.0: its PTX loads on drivers >= 580) hold nvcc, cicc
//! (nvvm), the C runtime headers, CCCL and `libcudart.so.13`; `nvidia/cu13` inside them is
//! laid out like a CUDA home. What no wheel of these holds is what candle links against
//! at build time: cudarc's `dynamic-linking` feature (the one candle 0.11 turns on) emits
//! `-lcuda -lnvrtc -lcurand -lcublas -lcublasLt`. The driver library is never in a wheel,
//! so, as the toolkit's own `lib64/stubs` does, we link against *stubs*: shared libraries
//! that export every function name cudarc's bindings declare, with the real libraries'
//! sonames. At run time the dynamic loader finds the real `libcuda.so.1`, `libcublas.so.13`,
//! … (driver and toolkit of the GPU machine) under those sonames; the stubs never travel.
//!
//! Everything lives under `target/cuda-toolkit/` and is made once (idempotent: a marker
//! file holds the pinned set; a changed pin reinstalls).

use crate::run;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The wheels and their pinned versions (CUDA 13.0 toolchain).
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
];

/// `CUDARC_CUDA_VERSION` for the pinned toolkit (cudarc's `MAJOR0MINOR0` spelling).
const CUDARC_CUDA_VERSION: &str = "13000";

/// Compute capability the kernels are built for unless `CUDA_COMPUTE_CAP` is set:
/// 90 = Hopper (H100, H200), the GPU machines this project is lent.
const DEFAULT_COMPUTE_CAP: &str = "90";

/// Libraries candle links dynamically, their run-time sonames (CUDA 13), and the cudarc
/// binding module that declares their functions.
const STUBS: &[(&str, &str, &str)] = &[
    ("libcuda.so", "libcuda.so.1", "driver"),
    ("libnvrtc.so", "libnvrtc.so.13", "nvrtc"),
    ("libcurand.so", "libcurand.so.10", "curand"),
    ("libcublas.so", "libcublas.so.13", "cublas"),
    ("libcublasLt.so", "libcublasLt.so.13", "cublaslt"),
];

/// `target/cuda-toolkit` under the workspace root.
fn toolkit_dir(root: &Path) -> PathBuf {
    root.join("target").join("cuda-toolkit")
}

/// The CUDA home inside the installed wheels.
fn cuda_home(root: &Path) -> PathBuf {
    toolkit_dir(root).join("wheels").join("nvidia").join("cu13")
}

/// Installs the pinned wheels into `target/cuda-toolkit/wheels` unless the marker says
/// they are there.
fn install_wheels(root: &Path) -> Result<()> {
    let dir = toolkit_dir(root);
    let marker = dir.join("installed.txt");
    let wanted = WHEELS.join("\n");
    let nvcc = cuda_home(root).join("bin").join("nvcc");
    if nvcc.exists() && std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        return Ok(());
    }
    let wheels = dir.join("wheels");
    if wheels.exists() {
        std::fs::remove_dir_all(&wheels)
            .with_context(|| format!("removing {}", wheels.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
        ])
        .arg(&wheels)
        .args(WHEELS))?;
    if !nvcc.exists() {
        bail!(
            "the CUDA wheels installed, but {} is missing (has the wheels' layout changed?)",
            nvcc.display()
        );
    }
    std::fs::write(&marker, wanted)?;
    Ok(())
}

/// The version of `name` in the workspace's Cargo.lock.
fn locked_version(root: &Path, name: &str) -> Result<String> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let needle = format!("name = \"{name}\"\nversion = \"");
    let start =
        lock.find(&needle).with_context(|| format!("{name} is not in Cargo.lock"))? + needle.len();
    let end = lock[start..].find('"').context("Cargo.lock: unterminated version")?;
    Ok(lock[start..start + end].to_string())
}

/// The unpacked source of crates.io package `name-version` in cargo's registry cache.
fn registry_source(name: &str, version: &str) -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let dirs = std::fs::read_dir(cargo_home.join("registry").join("src")).ok()?;
    dirs.filter_map(|d| d.ok())
        .map(|d| d.path().join(format!("{name}-{version}")))
        .find(|p| p.join("Cargo.toml").exists())
}

/// Function names declared by one of cudarc's `sys` binding modules.
fn declared_functions(cudarc: &Path, module: &str) -> Result<BTreeSet<String>> {
    let path = cudarc.join("src").join(module).join("sys").join("mod.rs");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("pub unsafe fn "))
        .filter_map(|rest| rest.split(['(', '<']).next())
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        bail!("{} declares no functions (has cudarc's layout changed?)", path.display());
    }
    Ok(names)
}

/// Writes the link-time stubs into `$CUDA_HOME/lib64/stubs` and `libcudart.so` next to the
/// wheel's `libcudart.so.13`.
fn make_stubs(root: &Path) -> Result<()> {
    let home = cuda_home(root);
    let cudart = home.join("lib").join("libcudart.so");
    if !cudart.exists() {
        std::os::unix::fs::symlink("libcudart.so.13", &cudart)
            .with_context(|| format!("linking {}", cudart.display()))?;
    }
    let version = locked_version(root, "cudarc")?;
    let stubs = home.join("lib64").join("stubs");
    let marker = stubs.join(format!("cudarc-{version}"));
    if marker.exists() {
        return Ok(());
    }
    let cudarc = match registry_source("cudarc", &version) {
        Some(p) => p,
        None => {
            run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(root)
                .args(["fetch", "--quiet"]))?;
            registry_source("cudarc", &version).with_context(|| {
                format!("cudarc {version} is not in cargo's registry cache after `cargo fetch`")
            })?
        }
    };
    std::fs::create_dir_all(&stubs)?;
    for &(file, soname, module) in STUBS {
        let names = declared_functions(&cudarc, module)?;
        let source = stubs.join(format!("{file}.c"));
        let mut c = format!("/* Link-time stub for {soname}: names only, never run. */\n");
        for name in &names {
            c.push_str(&format!("void {name}(void) {{}}\n"));
        }
        std::fs::write(&source, c)?;
        run(Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-shared", "-fPIC", "-O0", "-w", "-o"])
            .arg(stubs.join(file))
            .arg(format!("-Wl,-soname,{soname}"))
            .arg(&source))?;
    }
    std::fs::write(&marker, "")?;
    Ok(())
}

/// Installs the toolkit if needed and returns the environment a cuda build needs:
/// `PATH` (nvcc first), `CUDA_HOME`, `CUDA_ROOT`, `CUDARC_CUDA_VERSION`, `CUDA_COMPUTE_CAP`
/// (kept if already set, else 90) and `CARGO_TARGET_DIR` (kept if set, else `target/cuda`,
/// so a cuda build never invalidates the CPU build's artifacts).
pub fn cuda_env(root: &Path) -> Result<Vec<(String, String)>> {
    install_wheels(root)?;
    make_stubs(root)?;
    let home = cuda_home(root);
    let bin = home.join("bin");
    let path = match std::env::var_os("PATH") {
        Some(p) => {
            std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(&p)))?
        }
        None => bin.clone().into_os_string(),
    };
    let text = |p: &Path| p.to_string_lossy().into_owned();
    let keep = |name: &str, default: String| {
        std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or(default)
    };
    Ok(vec![
        ("PATH".into(), path.to_string_lossy().into_owned()),
        ("CUDA_HOME".into(), text(&home)),
        ("CUDA_ROOT".into(), text(&home)),
        ("CUDARC_CUDA_VERSION".into(), CUDARC_CUDA_VERSION.into()),
        ("CUDA_COMPUTE_CAP".into(), keep("CUDA_COMPUTE_CAP", DEFAULT_COMPUTE_CAP.into())),
        (
            "CARGO_TARGET_DIR".into(),
            keep("CARGO_TARGET_DIR", text(&root.join("target").join("cuda"))),
        ),
    ])
}

/// `cargo build` of the `specrej` CLI with specrej-candle's `cuda` feature (`--release` if
/// `release`), with [`cuda_env`]'s environment. Needs no GPU. (`specrej-candle/cuda` is
/// named through the CLI's dependency so this works whether or not the CLI forwards a
/// `cuda` feature of its own.)
pub fn build_cuda(root: &Path, release: bool) -> Result<()> {
    let env = cuda_env(root)?;
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root).envs(env).args([
        "build",
        "-p",
        "specrej-cli",
        "--features",
        "specrej-candle/cuda",
    ]);
    if release {
        command.arg("--release");
    }
    run(&mut command)
}

/// The CUDA build checked without a GPU, with [`cuda_env`]'s environment, in the cheap
/// `cuda-ci` profile (no optimisation, no debug info): `cargo build` of every target of
/// specrej-candle (lib, its CUDA conformance tests, the `gpu_bench` example), which compiles
/// every CUDA kernel and links binaries against the stubs. That is all the CUDA code there is:
/// the other crates' `cuda` features only turn on specrej-candle's, so their code is the CPU
/// build's (the `cuda_code_lives_only_in_specrej_candle` test holds both facts).
///
/// candle's kernels are compiled with `-Xcicc -O0` (nvcc's `NVCC_APPEND_FLAGS`): the same
/// sources through the same front end and ptxas, unoptimised, 2.4x faster (36 s to 15 s for its
/// largest file on 2 cores). What this builds is never run; `cuda-build` builds what runs.
pub fn check_cuda(root: &Path) -> Result<()> {
    let env = cuda_env(root)?;
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root).envs(env).env("NVCC_APPEND_FLAGS", "-Xcicc -O0").args([
        "build",
        "--profile",
        "cuda-ci",
        "-p",
        "specrej-candle",
        "--lib",
        "--tests",
        "--examples",
        "--features",
        "cuda",
    ]);
    run(&mut command)
}
