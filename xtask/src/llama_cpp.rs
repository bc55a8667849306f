//! `cargo xtask bench-llama-cpp`: specrej and llama.cpp on the same model and cores, one after
//! the other in one run, and the ratios.
//!
//! llama.cpp is llama-cpp-python (pinned below) built from source in `target/llama-cpp-venv`,
//! without AMX: with the default native build `llama_decode` segfaults on these machines'
//! CPUs. It measures a Q8_0 requantization of the model (`llama_model_quantize`, written once
//! to `target/llama-cpp/`) with per-sequence K/V (`kv_unified = False`, its fastest setting
//! here); specrej measures `--weights q8-0`, its own Q8_0 requantization of the same file.
//! Both run the same workloads (`xtask/llama_cpp_bench.py` mirrors `specrej bench
//! throughput`), and the Best-of-N workload the same prompt token ids.

use crate::{cargo, root, run};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

const PACKAGE: &str = "llama-cpp-python==0.3.36";
/// No `-march=native` and no AMX (see the module docs); AVX2/AVX-512/VNNI as the CPUs have.
const CMAKE_ARGS: &str = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
                          -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF";
/// The flags both engines take, with this command's defaults.
const FLAGS: [(&str, &str); 6] = [
    ("--rows", "1,8,32,64"),
    ("--steps", "32"),
    ("--context", "16,512"),
    ("--prefill-tokens", "128,512"),
    ("--bon", "8,64"),
    ("--bon-tokens", "256"),
];
/// Flags only specrej takes (llama.cpp scores nothing), with this command's defaults.
const OURS_ONLY: [(&str, &str); 1] = [("--reward", "judge")];

pub fn bench(model: &Path, extra: &[&str]) -> Result<()> {
    let mut flags: Vec<(String, String)> =
        FLAGS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut ours_only: Vec<(String, String)> =
        OURS_ONLY.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut rest = extra.iter();
    while let Some(&flag) = rest.next() {
        let Some(slot) = flags.iter_mut().chain(ours_only.iter_mut()).find(|(k, _)| k == flag)
        else {
            let known: Vec<&str> = FLAGS.iter().chain(&OURS_ONLY).map(|(k, _)| *k).collect();
            bail!("bench-llama-cpp: unknown flag {flag} (takes {})", known.join(", "));
        };
        slot.1 = rest
            .next()
            .with_context(|| format!("bench-llama-cpp: {flag} needs a value"))?
            .to_string();
    }
    let python = venv()?;

    eprintln!("specrej (--weights q8-0):");
    let mut ours = cargo();
    ours.args([
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
    .arg(model);
    ours.args(["--weights", "q8-0", "--json"]);
    for (k, v) in flags.iter().chain(&ours_only) {
        ours.args([k, v]);
    }
    let ours = json(&mut ours)?;

    eprintln!("llama.cpp (Q8_0, kv_unified = False):");
    let quantized = root().join("target").join("llama-cpp");
    std::fs::create_dir_all(&quantized)?;
    let stem = model.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let quantized = quantized.join(format!("{stem}.Q8_0-requant.gguf"));
    let ids = |key: &str| -> String {
        ours[key].as_array().map_or(String::new(), |a| {
            a.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
        })
    };
    let mut theirs = Command::new(&python);
    theirs
        .arg(root().join("xtask").join("llama_cpp_bench.py"))
        .arg(model)
        .arg("--quantize")
        .arg(&quantized);
    theirs.args(["--json", "--bon-prompt", &ids("bon_prompt"), "--bon-eos", &ids("bon_eos")]);
    for (k, v) in &flags {
        theirs.args([k, v]);
    }
    let theirs = json(&mut theirs)?;
    print(&ours, &theirs);
    Ok(())
}

/// The venv with llama-cpp-python in it, built from source on first use.
fn venv() -> Result<std::path::PathBuf> {
    let venv = root().join("target").join("llama-cpp-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let installed =
        Command::new(&python).args(["-c", "import llama_cpp"]).output()?.status.success();
    if !installed {
        eprintln!(
            "building {PACKAGE} from source (several minutes on 2 cores), CMAKE_ARGS={CMAKE_ARGS}"
        );
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-cache-dir",
                PACKAGE,
            ])
            .env("CMAKE_ARGS", CMAKE_ARGS))?;
    }
    Ok(python)
}

/// Runs `command` (progress on stderr) and parses its stdout as JSON.
fn json(command: &mut Command) -> Result<Value> {
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("{command:?} printed no JSON report"))
}

fn f(v: &Value, key: &str) -> Option<f64> {
    v[key].as_f64()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

fn cell(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.1}"))
}

/// One table: every workload, specrej's tokens/s, llama.cpp's, and their ratio.
fn print(ours: &Value, theirs: &Value) {
    let list = |v: &Value, key: &str| v[key].as_array().cloned().unwrap_or_default();
    let engine = &ours["engines"][0];
    println!(
        "specrej {} ({}) vs llama.cpp {PACKAGE} Q8_0 requantization, kv_unified = False ({} threads); tokens/s",
        engine["name"].as_str().unwrap_or("?"),
        engine["device"].as_str().unwrap_or("?"),
        theirs["threads"]
    );
    println!("| workload | specrej | llama.cpp | specrej ÷ llama.cpp |");
    println!("|---|---:|---:|---:|");
    for p in list(engine, "prefill") {
        let tokens = p["tokens"].as_u64().unwrap_or(0);
        let other =
            list(theirs, "prefill").into_iter().find(|q| q["tokens"].as_u64() == Some(tokens));
        let (a, b) =
            (f(&p, "tokens_per_second"), other.as_ref().and_then(|q| f(q, "tokens_per_second")));
        println!(
            "| prefill, {tokens}-token prompt | {} | {} | {} |",
            cell(a),
            cell(b),
            ratio(a, b)
        );
    }
    for d in list(ours, "decode") {
        let (rows, context) = (d["rows"].as_u64(), d["context"].as_u64());
        let other = list(theirs, "decode")
            .into_iter()
            .find(|q| q["rows"].as_u64() == rows && q["context"].as_u64() == context);
        let (a, b) = (
            f(&d, "decode_tokens_per_second"),
            other.as_ref().and_then(|q| f(q, "decode_tokens_per_second")),
        );
        let retain = match (f(&d, "retain_seconds"), f(&d, "step_seconds")) {
            (Some(r), Some(s)) => {
                format!(" (retain {:.1} µs, {:.2}% of a step)", r * 1e6, 100.0 * r / s)
            }
            _ => String::new(),
        };
        println!(
            "| decode, {} rows at {} cached tokens{retain} | {} | {} | {} |",
            rows.unwrap_or(0),
            context.unwrap_or(0),
            cell(a),
            cell(b),
            ratio(a, b)
        );
    }
    for run in list(ours, "bon") {
        let n = run["n"].as_u64();
        let other = list(theirs, "bon").into_iter().find(|q| q["n"].as_u64() == n);
        let (a, b) = (
            f(&run, "decode_tokens_per_second"),
            other.as_ref().and_then(|q| f(q, "decode_tokens_per_second")),
        );
        let s = &run["stats"];
        let wall = f(s, "wall_seconds").unwrap_or(0.0).max(f64::MIN_POSITIVE);
        let share = |key: &str| 100.0 * f(s, key).unwrap_or(0.0) / wall;
        println!(
            "| Best-of-{}, ≤ {} new tokens, decode only (specrej: {} tokens, reward {} {:.1}% and retain {:.2}% of {:.1} s; K/V {:.2} MB per row) | {} | {} | {} |",
            n.unwrap_or(0),
            ours["bon_tokens"],
            s["tokens_generated"],
            ours["bon_reward"].as_str().unwrap_or("?"),
            share("reward_seconds"),
            share("retain_seconds"),
            wall,
            f(&run, "kv_bytes_per_row").unwrap_or(0.0) / 1e6,
            cell(a),
            cell(b),
            ratio(a, b)
        );
    }
}
