//! The dependency rules of ARCHITECTURE.md's "Invariants", checked on the resolved graph
//! (`cargo metadata`): a crate that gains a forbidden dependency fails here.

use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// `cargo metadata` of the workspace.
fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path", manifest])
        .output()
        .expect("cargo metadata runs");
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// Package name → the names of its normal and build dependencies (not dev), direct.
fn graph() -> HashMap<String, Vec<String>> {
    let doc = metadata();
    let names: HashMap<&str, &str> = doc["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().expect("id"), p["name"].as_str().expect("name")))
        .collect();
    doc["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|node| {
            let name = names[node["id"].as_str().expect("id")].to_string();
            let deps = node["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .expect("dep_kinds")
                        .iter()
                        .any(|k| k["kind"].as_str() != Some("dev"))
                })
                .map(|d| names[d["pkg"].as_str().expect("pkg")].to_string())
                .collect();
            (name, deps)
        })
        .collect()
}

/// Every package `root` depends on, directly or not (normal and build dependencies).
fn closure(graph: &HashMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(name) = todo.pop() {
        for dep in graph.get(&name).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    seen
}

#[test]
fn crates_depend_only_on_what_the_architecture_allows() {
    let graph = graph();
    assert!(
        graph.contains_key("specrej-core") && graph.contains_key("specrej-wgpu"),
        "the workspace's crates are in the graph"
    );
    let core = closure(&graph, "specrej-core");
    for backend in ["candle-core", "wgpu", "wasmtime", "wit-bindgen", "wasm-bindgen", "tokenizers"]
    {
        assert!(!core.contains(backend), "specrej-core depends on {backend}");
    }
    assert!(
        !core.iter().any(|d| d.starts_with("specrej-")),
        "specrej-core depends on a workspace crate: {core:?}"
    );
    let wgpu = closure(&graph, "specrej-wgpu");
    assert!(
        !wgpu.contains("candle-core") && !wgpu.contains("specrej-candle"),
        "specrej-wgpu depends on candle"
    );
    assert!(
        !wgpu.contains("specrej-text") && !wgpu.contains("tokenizers"),
        "specrej-wgpu depends on the text layer"
    );
    let gguf = closure(&graph, "specrej-gguf");
    assert!(
        !gguf.iter().any(|d| d.starts_with("specrej-")),
        "specrej-gguf depends on a workspace crate: {gguf:?}"
    );
    for user in ["specrej-text", "specrej-wgpu", "specrej-candle"] {
        assert!(
            graph[user].contains(&"specrej-gguf".to_string()),
            "{user} reads GGUF through specrej-gguf"
        );
    }
    // Only one workspace crate uses each host technology directly.
    for (dependency, only) in [
        ("wasmtime", "specrej-host"),
        ("wit-bindgen", "specrej-component"),
        ("wasm-bindgen", "specrej-web"),
    ] {
        let users: Vec<&String> = graph
            .iter()
            .filter(|(name, deps)| {
                name.starts_with("specrej-") && deps.contains(&dependency.to_string())
            })
            .map(|(n, _)| n)
            .collect();
        assert_eq!(users, [only], "the workspace crates depending on {dependency} directly");
    }
}

/// `cargo xtask cuda-check` compiles only specrej-candle with CUDA. That covers every CUDA
/// path because every `#[cfg(feature = "cuda")]` is inside specrej-candle, and the other
/// crates' `cuda` features only turn on specrej-candle's: their code is the same with and
/// without CUDA, and the CPU build compiles and tests it.
#[test]
fn cuda_code_lives_only_in_specrej_candle() {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut outside = Vec::new();
    let mut todo = vec![root.join("crates"), root.join("tests"), root.join("xtask")];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.ends_with("specrej-candle") {
                continue;
            }
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && !path.ends_with(file!())
                && std::fs::read_to_string(&path).expect("read").contains("feature = \"cuda\"")
            {
                outside.push(path);
            }
        }
    }
    assert!(outside.is_empty(), "CUDA code outside specrej-candle: {outside:?}");
    let doc = metadata();
    let packages = doc["packages"].as_array().expect("packages");
    let mut with_cuda = BTreeSet::new();
    for package in packages.iter().filter(|p| p["source"].is_null()) {
        let name = package["name"].as_str().expect("name");
        if let Some(cuda) = package["features"].get("cuda") {
            with_cuda.insert(name);
            if name != "specrej-candle" {
                assert_eq!(
                    cuda,
                    &serde_json::json!(["specrej-candle/cuda"]),
                    "{name}'s cuda feature"
                );
            }
        }
    }
    assert!(
        with_cuda.contains("specrej-candle"),
        "specrej-candle has a cuda feature: {with_cuda:?}"
    );
}
