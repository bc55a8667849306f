//! The browser demo: `cargo xtask serve` and its end-to-end test.
//!
//! [`build_web`] assembles `target/web-dist/`:
//! - `pkg/`: `specrej-web` (the engine: WebGPU or CPU, plus the text layer) built for
//!   `wasm32-unknown-unknown` and bound with `wasm-bindgen --target web`; the
//!   `wasm-bindgen-cli` of the exact version in Cargo.lock is installed into
//!   `target/wasm-bindgen-cli/` on first use (`cargo install`, minutes);
//! - `component/` and `component-sync/`: the decoder component (the file the wasmtime server
//!   runs, from [`crate::component::build_component`]) transpiled by jco, once with
//!   `--async-mode jspi` (the engine's `batch.step` and `score` are async imports: WebGPU
//!   reads back asynchronously) and once synchronous (browsers without JSPI, CPU engine);
//! - the page itself, copied from `web/` (`index.html`, `style.css`, `src/`), and
//!   `build.json` (the default model's URL).
//!
//! jco and playwright-core come from npm, pinned by `web/package.json` and
//! `web/package-lock.json`, installed with `npm ci` into `target/web-node/` (not into `web/`).
//!
//! [`serve`] serves `target/web-dist/` plus `/models/*.gguf` from `models/` (with
//! Content-Length, so the page's download bar is real) with `specrej-http`, the same request
//! reader and static files as `specrej-server --static`.
//!
//! [`e2e`] builds, serves on an ephemeral port and runs `web/e2e/run.mjs` (headless
//! Chromium through playwright-core; needs Debian's `chromium`).

use crate::run;
use anyhow::{Context, Result, bail};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where [`build_web`] assembles the site, relative to the workspace root.
pub const DIST_DIR: &str = "target/web-dist";
/// Cargo's target directory for the wasm build of `specrej-web`.
const WEB_TARGET_DIR: &str = "target/web";
/// npm installs (jco, playwright-core) from `web/package-lock.json`.
const NODE_DIR: &str = "target/web-node";
/// `cargo install --root` for the pinned `wasm-bindgen-cli`.
const WASM_BINDGEN_DIR: &str = "target/wasm-bindgen-cli";
const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// What the e2e test writes (screenshot, log).
pub const E2E_OUT_DIR: &str = "target/web-e2e";
/// The default model's file in `models/` (served as `/models/<file>`).
const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The async imports of the JSPI build (`wit/decoder.wit`): the two that read a GPU back.
const ASYNC_IMPORTS: &[&str] =
    &["specrej:decoder/engine#[method]batch.step", "specrej:decoder/engine#score"];
const ASYNC_EXPORTS: &[&str] = &["specrej:decoder/decode#generate"];

fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Host-only flags (target-cpu) must not reach the wasm build.
    command.current_dir(root).env_remove("RUSTFLAGS").env_remove("CARGO_ENCODED_RUSTFLAGS");
    command
}

/// Builds everything the page needs into [`DIST_DIR`] and returns its path.
pub fn build_web(root: &Path) -> Result<PathBuf> {
    let dist = root.join(DIST_DIR);
    let node_modules = npm_install(root)?;

    // 1. The engine (wasm-bindgen). The pinned wasm-bindgen-cli, when it must be installed,
    // compiles at the same time: each build leaves a core idle for much of its serial tail.
    let target_dir = root.join(WEB_TARGET_DIR);
    let (engine, bindgen) = std::thread::scope(|scope| {
        let bindgen = scope.spawn(|| ensure_wasm_bindgen(root));
        let engine = run(cargo(root)
            .args(["build", "--release", "-p", "specrej-web", "--target", WASM_TARGET])
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false"))
        .with_context(|| format!("building specrej-web (needs `rustup target add {WASM_TARGET}`)"));
        let bindgen = bindgen
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("installing wasm-bindgen-cli panicked")));
        (engine, bindgen)
    });
    engine?;
    let bindgen = bindgen?;
    let wasm = target_dir.join(WASM_TARGET).join("release").join("specrej_web.wasm");
    let fresh = dist.with_extension("partial");
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh).with_context(|| format!("removing {}", fresh.display()))?;
    }
    std::fs::create_dir_all(&fresh)?;
    run(Command::new(&bindgen)
        .args(["--target", "web", "--no-typescript", "--out-name", "specrej_web", "--out-dir"])
        .arg(fresh.join("pkg"))
        .arg(&wasm))?;

    // 2. The decoder component, transpiled by jco (JSPI and sync).
    let component = crate::component::build_component(root)?;
    let jco = node_modules.join(".bin").join("jco");
    let mut jspi = Command::new(&jco);
    jspi.arg("transpile").arg(&component).arg("-o").arg(fresh.join("component"));
    jspi.args([
        "--name",
        "specrej-decoder",
        "--instantiation",
        "async",
        "--no-typescript",
        "--quiet",
        "--async-mode",
        "jspi",
    ]);
    for import in ASYNC_IMPORTS {
        jspi.args(["--async-imports", import]);
    }
    for export in ASYNC_EXPORTS {
        jspi.args(["--async-exports", export]);
    }
    run(&mut jspi)?;
    run(Command::new(&jco)
        .arg("transpile")
        .arg(&component)
        .arg("-o")
        .arg(fresh.join("component-sync"))
        .args([
            "--name",
            "specrej-decoder",
            "--instantiation",
            "async",
            "--no-typescript",
            "--quiet",
        ]))?;

    // 3. The page.
    let web = root.join("web");
    for file in ["index.html", "style.css"] {
        std::fs::copy(web.join(file), fresh.join(file))
            .with_context(|| format!("copying web/{file}"))?;
    }
    copy_dir(&web.join("src"), &fresh.join("src"))?;
    let build = format!(
        "{{\n  \"model\": \"models/{DEFAULT_MODEL_FILE}\",\n  \"component\": \"{}\"\n}}\n",
        component.file_name().and_then(|n| n.to_str()).unwrap_or("")
    );
    std::fs::write(fresh.join("build.json"), build)?;

    if dist.exists() {
        std::fs::remove_dir_all(&dist).with_context(|| format!("removing {}", dist.display()))?;
    }
    std::fs::rename(&fresh, &dist)
        .with_context(|| format!("moving {} to {}", fresh.display(), dist.display()))?;
    eprintln!("web demo built: {}", dist.display());
    Ok(dist)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()))?;
        } else {
            std::fs::copy(&path, to.join(entry.file_name()))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// `npm ci` of `web/package-lock.json` into [`NODE_DIR`] (skipped when the lock is unchanged);
/// returns its `node_modules`.
fn npm_install(root: &Path) -> Result<PathBuf> {
    let dir = root.join(NODE_DIR);
    let node_modules = dir.join("node_modules");
    let lock = std::fs::read(root.join("web/package-lock.json"))
        .context("reading web/package-lock.json")?;
    let stamp = dir.join("installed-package-lock.json");
    if node_modules.join(".bin").join("jco").exists()
        && std::fs::read(&stamp).ok().as_deref() == Some(&lock[..])
    {
        return Ok(node_modules);
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(root.join("web/package.json"), dir.join("package.json"))?;
    std::fs::write(dir.join("package-lock.json"), &lock)?;
    run(Command::new("npm").current_dir(&dir).args([
        "ci",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ]))
    .context("installing jco and playwright-core with npm (needs Node.js 20+ and npm)")?;
    std::fs::write(&stamp, &lock)?;
    Ok(node_modules)
}

/// The `wasm-bindgen` crate version in Cargo.lock: the CLI must match it exactly.
fn locked_wasm_bindgen_version(root: &Path) -> Result<String> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"wasm-bindgen\""
            && let Some(version) = lines.next().and_then(|l| l.trim().strip_prefix("version = \""))
        {
            return Ok(version.trim_end_matches('"').to_string());
        }
    }
    bail!("Cargo.lock has no wasm-bindgen package (specrej-web depends on it)")
}

/// The path of a `wasm-bindgen` CLI of the locked version, installed into
/// [`WASM_BINDGEN_DIR`] with `cargo install` if it is not there yet.
fn ensure_wasm_bindgen(root: &Path) -> Result<PathBuf> {
    let version = locked_wasm_bindgen_version(root)?;
    let dir = root.join(WASM_BINDGEN_DIR);
    let bin = dir.join("bin").join("wasm-bindgen");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if installed.as_deref().is_some_and(|v| v.split_whitespace().nth(1) == Some(version.as_str())) {
        return Ok(bin);
    }
    eprintln!("installing wasm-bindgen-cli {version} into {} (a few minutes, once)", dir.display());
    // A tool run once per build on one file: compiled for build speed, not run speed (about
    // 2 minutes instead of 4 on 2 cores; the same output, in under a second either way).
    run(cargo(root)
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1")
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .args(["install", "--quiet", "--force", "wasm-bindgen-cli", "--version"])
        .arg(format!("={version}"))
        .arg("--root")
        .arg(&dir)
        .arg("--target-dir")
        .arg(dir.join("build")))?;
    // The binaries are in `bin/`; the build's ~400 MB of artifacts are not needed again.
    let _ = std::fs::remove_dir_all(dir.join("build"));
    Ok(bin)
}

/// Serves [`DIST_DIR`] and `/models/*.gguf` on `addr` (e.g. `127.0.0.1:8080`) until killed.
pub fn serve(root: &Path, addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let dist = root.join(DIST_DIR);
    if !dist.join("index.html").exists() {
        bail!("{} is not built: run build_web first", dist.display());
    }
    eprintln!("serving the demo on http://{}/ (Ctrl-C to stop)", listener.local_addr()?);
    serve_on(listener, dist, root.join("models"))
}

/// Accepts connections on `listener` forever, one thread each.
pub fn serve_on(listener: TcpListener, dist: PathBuf, models: PathBuf) -> Result<()> {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (dist, models) = (dist.clone(), models.clone());
        std::thread::spawn(move || {
            if let Err(e) = handle(stream, &dist, &models) {
                eprintln!("serve: {e:#}");
            }
        });
    }
    Ok(())
}

/// What a request to the demo's file server may be: a request line and headers, no body.
const LIMITS: specrej_http::Limits =
    specrej_http::Limits { max_header_bytes: 16 * 1024, max_body_bytes: 0, require_length: false };

/// One connection: [`specrej_http::files::serve_site`] (the server's own static files).
fn handle(mut stream: TcpStream, dist: &Path, models: &Path) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let request = match specrej_http::read_request(&stream, &LIMITS, |_| false) {
        Ok(request) => request,
        Err(e) => {
            let body = format!("{e}\n");
            specrej_http::write_response(
                &mut stream,
                e.status,
                "text/plain; charset=utf-8",
                body.as_bytes(),
                true,
            )?;
            return Ok(());
        }
    };
    // A client that goes away mid-download is not an error worth reporting.
    let _ = specrej_http::files::serve_site(
        &mut stream,
        dist,
        Some(models),
        &request.method,
        &request.path,
    );
    Ok(())
}

/// The e2e request, shared by the page and the native CLI run it is compared with:
/// (environment variable, CLI flag, default).
const E2E_REQUEST: &[(&str, &str, &str)] = &[
    ("SPECREJ_E2E_MAX_TOKENS", "--max-new-tokens", "6"),
    ("SPECREJ_E2E_N", "-n", "4"),
    ("SPECREJ_E2E_MIN_TOKENS", "--min-new-tokens", "3"),
    ("SPECREJ_E2E_TEMPERATURE", "--temperature", "0"),
    ("SPECREJ_E2E_SEED", "--seed", "1"),
];
/// The page's default prompt (`web/index.html`), unless `SPECREJ_E2E_PROMPT`.
const E2E_PROMPT: &str = "Give three tips for staying healthy.";

/// The end-to-end test: builds the site (installing the pinned `wasm-bindgen-cli` into
/// `target/wasm-bindgen-cli/` and jco/playwright-core into `target/web-node/` on first use),
/// runs the native CLI on the CPU for the e2e request (`specrej generate --json`, dev profile:
/// the test build's binary), serves the site on an ephemeral port of 127.0.0.1 and runs
/// `web/e2e/run.mjs` (headless Chromium, `/usr/bin/chromium` or `$CHROMIUM`): the WGSL
/// kernel self-check on the browser's WebGPU adapter, then Speculative Rejection (n 4,
/// first decision after 3 tokens, temperature 0; 6 tokens on WebGPU, 20 on the CPU engine,
/// whose 16-token K/V blocks put its first decision at token 17) on both engines, each
/// checked for decisions, cut rows and a winner whose text starts with the CLI's 6-token
/// answer with f16 or f32 K/V. It writes `target/web-e2e/screenshot.png` (and one per
/// engine), `result.json` and `cli/cli-{f16,f32}.json`. The
/// `SPECREJ_E2E_*` variables documented in `web/e2e/run.mjs` pass through
/// (`SPECREJ_E2E_ENGINES=fake`: the test double, no model, no CLI run).
pub fn e2e(root: &Path) -> Result<()> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        bail!(
            "{chromium} is missing: install Debian's `chromium` (apt-get install chromium), or set CHROMIUM"
        );
    }
    let engines = std::env::var("SPECREJ_E2E_ENGINES")
        .or_else(|_| std::env::var("SPECREJ_E2E_ENGINE"))
        .unwrap_or_default();
    let fake = engines == "fake";
    let model = root.join("models").join(DEFAULT_MODEL_FILE);
    if !fake && !model.exists() {
        bail!("models/{DEFAULT_MODEL_FILE} is missing: run `cargo xtask fetch-model`");
    }
    let started = std::time::Instant::now();
    let dist = build_web(root)?;
    let built = started.elapsed();
    let out = root.join(E2E_OUT_DIR);
    std::fs::create_dir_all(&out)?;

    // The native CPU CLI's answer to the same request, for the page to compare with, with the
    // K/V in f16 and in f32 (the page's engines round K/V either way).
    let cli_dir = out.join("cli");
    let _ = std::fs::remove_dir_all(&cli_dir);
    if !fake {
        std::fs::create_dir_all(&cli_dir)?;
        let prompt = std::env::var("SPECREJ_E2E_PROMPT").unwrap_or_else(|_| E2E_PROMPT.into());
        let cli = crate::test_build_binary("specrej")?;
        for kv in ["f16", "f32"] {
            let mut command = Command::new(&cli);
            command
                .current_dir(root)
                .arg("generate")
                .arg(&prompt)
                .args([
                    "--json",
                    "--backend",
                    "cpu",
                    "--kv",
                    kv,
                    "--method",
                    "sr",
                    "--alpha",
                    "0.5",
                    "--model",
                ])
                .arg(&model);
            for (var, flag, default) in E2E_REQUEST {
                command.arg(flag).arg(std::env::var(var).unwrap_or_else(|_| (*default).into()));
            }
            let output = command.stderr(std::process::Stdio::inherit()).output().context(
                "running the CLI (specrej generate) for the e2e test's reference answer",
            )?;
            if !output.status.success() {
                bail!("specrej generate --kv {kv} failed ({})", output.status);
            }
            std::fs::write(cli_dir.join(format!("cli-{kv}.json")), &output.stdout)?;
        }
    }

    let node_modules = root.join(NODE_DIR).join("node_modules");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/", listener.local_addr()?);
    let models = root.join("models");
    std::thread::spawn(move || serve_on(listener, dist, models));
    let mut node = Command::new("node");
    node.arg(root.join("web/e2e/run.mjs"))
        .env("SPECREJ_WEB_URL", &url)
        .env("SPECREJ_NODE_MODULES", &node_modules)
        .env("SPECREJ_E2E_OUT", &out)
        .env("CHROMIUM", &chromium);
    if cli_dir.exists() {
        node.env("SPECREJ_E2E_CLI_DIR", &cli_dir);
    }
    for (var, _, default) in E2E_REQUEST {
        if std::env::var_os(var).is_none() {
            node.env(var, default);
        }
    }
    let result = run(&mut node).context("the browser end-to-end test failed (see target/web-e2e/)");
    eprintln!(
        "web-e2e: {:.0} s in all ({:.0} s building the site)",
        started.elapsed().as_secs_f64(),
        built.as_secs_f64()
    );
    result
}
