//! `specrej-server`: the specrej component in wasmtime behind an OpenAI-compatible HTTP API.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use specrej_candle::WeightFormat;
use specrej_host::api::RequestLimits;
use specrej_host::{BackendKind, ExtraReward, RealModel, Served, ServerConfig, WgpuServed, model};

/// The component `cargo xtask component` writes.
const DEFAULT_COMPONENT: &str = "target/specrej-decoder.component.wasm";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BackendArg {
    /// candle on the CPU.
    Cpu,
    /// candle on an NVIDIA GPU (needs a build with `--features cuda`).
    Cuda,
    /// WebGPU through wgpu (Vulkan, Metal, DX12); GGUF models; the judge and likelihood
    /// rewards run on it too.
    Wgpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum WeightsArg {
    /// As stored in the file.
    Native,
    /// Requantized to Q8_0 at load.
    Q8_0,
    /// Dequantized to f32 at load.
    F32,
}

/// Serves Best-of-N and Speculative Rejection over HTTP (OpenAI-compatible), the scheduler
/// running as a WebAssembly component in wasmtime and the model on candle.
#[derive(Debug, Parser)]
#[command(name = "specrej-server", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The decoder component (default: target/specrej-decoder.component.wasm here or in this
    /// checkout). World `decoder` or `decoder-with-reward` (detected from its imports; the
    /// latter's `reward` import is served by the request's reward model).
    #[arg(long)]
    component: Option<PathBuf>,
    /// GGUF model file, or a HF directory (default: $SPECREJ_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the model runs.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// With `--backend wgpu`: the adapter, by index or a fragment of its name (`specrej
    /// adapters` lists them); default: wgpu's high-performance choice.
    #[arg(long)]
    adapter: Option<String>,
    /// How weights are held in memory (candle).
    #[arg(long, value_enum, default_value = "q8-0")]
    weights: WeightsArg,
    /// KV budget of all requests together, in cached tokens (rows × positions); each
    /// running request holds a grant of it. Default: 2 GiB worth.
    #[arg(long)]
    kv_budget_tokens: Option<usize>,
    /// Requests that may wait for their share of the KV budget (one more gets 429).
    #[arg(long, default_value_t = 64)]
    max_queued: usize,
    /// Largest n a request may ask for.
    #[arg(long, default_value_t = 64)]
    max_n: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// max_tokens when a request gives none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Wall-clock limit of one request, in seconds.
    #[arg(long, default_value_t = 600)]
    request_timeout_secs: u64,
    /// Connections served at once (more wait in the listen backlog).
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Serve the fake backend (a hash "language model"; no model file): for smoke tests.
    #[arg(long)]
    fake: bool,
    /// Also serve the files under DIR (GET/HEAD; `/` is DIR/index.html) and
    /// `/models/<file>.gguf` from the model's folder: the browser demo (`cargo xtask serve`
    /// passes target/web-dist). The API routes come first.
    #[arg(long = "static", value_name = "DIR")]
    static_dir: Option<PathBuf>,
    /// A reward model requests may pick with `"specrej": {"reward": "NAME"}`: a Hugging Face
    /// `*ForSequenceClassification` directory (config.json, *.safetensors, tokenizer.json),
    /// loaded at start on the model's device. Repeatable.
    #[arg(long, value_name = "NAME=DIR")]
    reward_model: Vec<String>,
    /// The same for a `specrej-reward-server` (`http://host:port/path`). Repeatable.
    #[arg(long, value_name = "NAME=URL")]
    reward_url: Vec<String>,
}

/// `NAME=VALUE` of `--flag`.
fn named<'a>(flag: &str, spec: &'a str) -> Result<(&'a str, &'a str)> {
    spec.split_once('=')
        .filter(|(name, value)| !name.is_empty() && !value.is_empty())
        .with_context(|| format!("--{flag} {spec:?}: expected NAME=VALUE"))
}

fn component_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    let here = PathBuf::from(DEFAULT_COMPONENT);
    if here.exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(DEFAULT_COMPONENT)
}

fn main() {
    if let Err(error) = run(Args::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let component_path = component_path(args.component.as_deref());
    let component = std::fs::read(&component_path).with_context(|| {
        format!(
            "reading the component {} (build it with `cargo xtask component`)",
            component_path.display()
        )
    })?;
    if let Some(dir) = &args.static_dir
        && !dir.is_dir()
    {
        anyhow::bail!("--static {}: not a folder", dir.display());
    }
    // Bad reward flags fail before anything loads.
    let mut reward_dirs = Vec::new();
    for spec in &args.reward_model {
        let (name, dir) = named("reward-model", spec)?;
        if !Path::new(dir).is_dir() {
            anyhow::bail!("--reward-model {spec}: {dir} is not a reward-model directory");
        }
        reward_dirs.push((name, Path::new(dir)));
    }
    let mut reward_urls = Vec::new();
    for spec in &args.reward_url {
        let (name, url) = named("reward-url", spec)?;
        if let Err(e) = specrej_reward::check_url(url) {
            anyhow::bail!("--reward-url {spec}: {e}");
        }
        reward_urls.push((name, url));
    }
    if args.fake && !(reward_dirs.is_empty() && reward_urls.is_empty()) {
        anyhow::bail!("--reward-model and --reward-url need a real model, not --fake");
    }
    if args.backend == BackendArg::Wgpu && !(reward_dirs.is_empty() && reward_urls.is_empty()) {
        anyhow::bail!("--reward-model and --reward-url run with --backend cpu or cuda, not wgpu");
    }
    if args.adapter.is_some() && args.backend != BackendArg::Wgpu {
        anyhow::bail!("--adapter picks a WebGPU adapter: it needs --backend wgpu");
    }
    let mut models_dir = None;
    let (served, model_id) = if args.fake {
        fake_backend()?
    } else {
        let path = model::locate(args.model.as_deref())?;
        let id = path.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned());
        if path.is_file() {
            models_dir = Some(path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf));
        }
        let backend = match args.backend {
            BackendArg::Cpu => BackendKind::Cpu,
            BackendArg::Cuda => BackendKind::Cuda,
            BackendArg::Wgpu => {
                let model = WgpuServed::load(&path, args.adapter.as_deref())?;
                return serve(
                    &args,
                    Served::Wgpu(Box::new(model)),
                    id,
                    models_dir,
                    component,
                    &component_path,
                );
            }
        };
        let weights = match args.weights {
            WeightsArg::Native => WeightFormat::Native,
            WeightsArg::Q8_0 => WeightFormat::Q8_0,
            WeightsArg::F32 => WeightFormat::F32,
        };
        let mut model = RealModel::load(&path, backend, weights)?;
        for (name, dir) in reward_dirs {
            model
                .load_reward(name, dir)
                .with_context(|| format!("--reward-model {name}={}", dir.display()))?;
        }
        for (name, url) in reward_urls {
            model
                .add_reward(name, ExtraReward::Remote(url.to_owned()))
                .with_context(|| format!("--reward-url {name}={url}"))?;
        }
        (Served::Real(Box::new(model)), id)
    };
    serve(&args, served, model_id, models_dir, component, &component_path)
}

/// Serves `served` until SIGINT or SIGTERM.
fn serve(
    args: &Args,
    served: Served,
    model_id: String,
    models_dir: Option<PathBuf>,
    component: Vec<u8>,
    component_path: &Path,
) -> Result<()> {
    let kv_budget_tokens = args
        .kv_budget_tokens
        .unwrap_or(specrej_candle::DEFAULT_KV_BUDGET_BYTES / served.kv_bytes_per_token().max(1));
    let config = ServerConfig {
        limits: RequestLimits {
            max_n: args.max_n,
            max_tokens: args.max_tokens,
            default_max_tokens: args.default_max_tokens,
        },
        kv_budget_tokens,
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        max_connections: args.max_connections,
        max_queued: args.max_queued,
        stop_on_signal: true,
        model_id,
        static_dir: args.static_dir.clone(),
        models_dir: models_dir.filter(|_| args.static_dir.is_some()),
        ..ServerConfig::default()
    };
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let served = Arc::new(served);
    let handle = specrej_host::spawn(listener, Arc::clone(&served), component, config)?;
    eprintln!(
        "specrej-server: listening on http://{} (component {}, world {}, KV budget {kv_budget_tokens} tokens)",
        handle.addr,
        component_path.display(),
        handle.world.name()
    );
    eprintln!("specrej-server: rewards {}", served.reward_names().join(", "));
    if let Some(dir) = &args.static_dir {
        eprintln!("specrej-server: the demo from {} at http://{}/", dir.display(), handle.addr);
    }
    handle.join()
}

/// `--fake`: the test double, in builds with the `fake` feature (the tests' builds) only.
#[cfg(feature = "fake")]
fn fake_backend() -> Result<(Served, String)> {
    Ok((Served::Fake, "specrej-fake".to_string()))
}

#[cfg(not(feature = "fake"))]
fn fake_backend() -> Result<(Served, String)> {
    anyhow::bail!(
        "--fake: this specrej-server was built without the fake backend (cargo feature `fake`, which the tests enable)"
    )
}
