//! The `specrej` binary: bad input gets one clear line and a non-zero exit, never a panic.

use std::path::PathBuf;

mod common;

use common::{fails_with, specrej, stderr};

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = common::temp_dir(&format!("file-{name}")).join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

/// A GGUF header with `general.architecture = arch` and no tensors.
fn gguf_with_architecture(arch: &str) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes()); // version
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    let key = b"general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    b.extend_from_slice(&(arch.len() as u64).to_le_bytes());
    b.extend_from_slice(arch.as_bytes());
    b
}

/// The bad-input table: one row per class of bad input, each one `error:` line naming what is
/// wrong, exit 1, no panic and no backtrace (`RUST_BACKTRACE=1` is set). Printed as
/// `input → message` (`--nocapture` shows it).
#[test]
fn bad_input_table() {
    let junk = temp_file("junk.gguf", b"this is not a model file at all");
    let mut truncated = b"GGUF".to_vec();
    truncated.extend_from_slice(&3u32.to_le_bytes());
    truncated.extend_from_slice(&[1, 0, 0]);
    let truncated = temp_file("truncated.gguf", &truncated);
    let gpt2 = temp_file("gpt2.gguf", &gguf_with_architecture("gpt2"));
    let path = |p: &PathBuf| p.to_str().expect("utf-8").to_string();
    let (junk, truncated, gpt2) = (path(&junk), path(&truncated), path(&gpt2));
    let rows: Vec<(Vec<&str>, &str)> = vec![
        (vec!["generate", "hi", "--model", "/nonexistent/model.gguf"], "does not exist"),
        (vec!["generate", "hi", "--model", &junk], "not a GGUF file"),
        (vec!["generate", "hi", "--model", &truncated], "truncated or corrupt"),
        (vec!["generate", "hi", "--model", &gpt2], "unsupported architecture \"gpt2\""),
        (vec!["info", "--model", &junk], "GGUF"),
        (vec!["generate", "hi", "--alpha", "1"], "--alpha must be in [0, 1)"),
        (vec!["generate", "hi", "--alpha=-0.5"], "--alpha must be in [0, 1)"),
        // Below 1 as a decimal, 1.0 as the f32 the scheduler takes.
        (vec!["generate", "hi", "--alpha", "0.99999999995"], "--alpha must be in [0, 1)"),
        (vec!["generate", "hi", "--n", "0"], "--n must be at least 1"),
        (vec!["generate", "hi", "--n", "100000000000"], "more rows than one request may have"),
        (vec!["generate", "   "], "the prompt is empty"),
        (vec!["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (vec!["generate", "hi", "--gate-tau", "2"], "--gate-tau must be in [-1, 1]"),
        (vec!["generate", "hi", "--refill=-1"], "--refill must be 0 or a positive temperature"),
        (vec!["generate", "hi", "--paper-exact", "--refill", "0"], "does not combine"),
    ];
    for (args, needle) in &rows {
        fails_with(args, needle);
        let err = stderr(&specrej(args));
        eprintln!("{} → {}", args.join(" "), err.trim_end());
    }
}

#[test]
fn malformed_flags_are_usage_errors() {
    let output = specrej(&["generate", "hi", "--kv-budget", "12 parsecs"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("unknown unit"));
    let output = specrej(&["generate", "hi", "--method", "beam"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn generate_json_on_the_default_model() {
    let model = std::env::var("SPECREJ_MODEL").expect("SPECREJ_MODEL");
    // The prompt's blocks and one 16-token block per row: a decision after 16 tokens.
    let args = [
        "generate",
        "Give three tips for staying healthy.",
        "--model",
        &model,
        "--n",
        "4",
        "--max-new-tokens",
        "32",
        "--min-new-tokens",
        "8",
        "--seed",
        "5",
        "--kv-budget",
        "128tok",
        "--json",
    ];
    let output = specrej(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let winner = &report["winner"];
    assert!(!winner["text"].as_str().expect("text").trim().is_empty());
    let best = report["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| c["score"].as_f64().expect("score"))
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(winner["score"].as_f64(), Some(best));
    assert!(!report["trace"].as_array().expect("trace").is_empty(), "the budget forces decisions");
    assert!(report["stats"]["reward_tokens"].as_u64().expect("reward tokens") > 0);
    assert_eq!(report["kv_budget"]["tokens"], 128);
    // The time breakdown: every part measured, and the parts within the whole.
    let stats = &report["stats"];
    let part = |k: &str| stats[k].as_f64().unwrap_or_else(|| panic!("stats.{k}"));
    let parts = part("prefill_seconds")
        + part("step_seconds")
        + part("reward_seconds")
        + part("retain_seconds");
    assert!(
        part("step_seconds") > 0.0 && part("reward_seconds") > 0.0 && part("prefill_seconds") > 0.0,
        "{stats}"
    );
    assert!(parts <= part("wall_seconds"), "{stats}");

    // The same seed gives the same answer.
    let again = specrej(&args);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(again["winner"]["tokens"], winner["tokens"]);
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn a_judge_question_over_the_context_is_named() {
    let model = std::env::var("SPECREJ_MODEL").expect("SPECREJ_MODEL");
    // Answers run to the end of the 8,192-token context after a ~7,000-token prompt; the judge's
    // question quotes the prompt and adds its own words, so the judge could not read them.
    let long = "word ".repeat(7000);
    fails_with(
        &["generate", &long, "--model", &model, "--max-new-tokens", "2000"],
        "--max-new-tokens 2000: the judge reads",
    );
}

#[test]
fn bad_bench_flags_are_named() {
    fails_with(
        &["bench", "throughput", "--rows", "0"],
        "--rows must list row counts of at least 1",
    );
    fails_with(
        &["bench", "throughput", "--steps", "0"],
        "--steps and --prefill-tokens must be at least 1",
    );
    let output = specrej(&["bench", "throughput", "--backends", "tpu"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn bench_throughput_puts_wgpu_beside_the_cpu() {
    let model = std::env::var("SPECREJ_MODEL").expect("SPECREJ_MODEL");
    let output = specrej(&[
        "bench",
        "throughput",
        "--model",
        &model,
        "--backends",
        "cpu,wgpu",
        "--weights",
        "native",
        "--rows",
        "1,2",
        "--steps",
        "2",
        "--prefill-tokens",
        "8,12",
        "--bon",
        "6",
        "--bon-tokens",
        "4",
        "--json",
    ]);
    let err = stderr(&output);
    if !output.status.success() && err.contains("no WebGPU adapter") {
        specrej_core::gpu_missing("wgpu", &format!("the wgpu half: {err}"));
        return;
    }
    assert!(output.status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let engines: Vec<&str> = report["engines"]
        .as_array()
        .expect("engines")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    assert_eq!(engines, ["cpu/native", "wgpu/native"]);
    let decode = report["decode"].as_array().expect("decode");
    assert_eq!(decode.len(), 4, "two engines × two row counts: {decode:?}");
    for row in decode {
        assert!(row["decode_tokens_per_second"].as_f64().expect("tokens/s") > 0.0, "{row}");
        // Retains are timed only where rows are left after dropping 4.
        assert!(row["retain_seconds"].is_null(), "1 and 2 rows: no retain timed: {row}");
    }
    for engine in report["engines"].as_array().expect("engines") {
        let prefill: Vec<u64> = engine["prefill"]
            .as_array()
            .expect("prefill")
            .iter()
            .map(|p| p["tokens"].as_u64().expect("tokens"))
            .collect();
        assert_eq!(prefill, [8, 12], "{engine}");
    }
    // The Best-of-N workload, on each engine: 6 rows of at most 4 tokens, then the judge.
    let bon = report["bon"].as_array().expect("bon");
    assert_eq!(bon.len(), 2, "{bon:?}");
    for run in bon {
        let stats = &run["stats"];
        let tokens = stats["tokens_generated"].as_u64().expect("tokens");
        assert!((6..=24).contains(&tokens), "{run}");
        assert_eq!(stats["reward_calls"].as_u64(), Some(1), "Best-of-N scores once: {run}");
        assert!(stats["reward_seconds"].as_f64().expect("reward s") > 0.0, "{run}");
        assert!(run["kv_bytes_per_row"].as_f64().expect("bytes") > 0.0, "{run}");
    }
    assert!(!report["bon_prompt"].as_array().expect("bon_prompt").is_empty());
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn bench_throughput_times_a_retain_beside_a_step() {
    let model = std::env::var("SPECREJ_MODEL").expect("SPECREJ_MODEL");
    let output = specrej(&[
        "bench",
        "throughput",
        "--model",
        &model,
        "--weights",
        "native",
        "--rows",
        "8",
        "--steps",
        "2",
        "--prefill-tokens",
        "8",
        "--context",
        "24",
        "--bon",
        "0",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let row = &report["decode"][0];
    assert_eq!(row["rows"].as_u64(), Some(8), "{row}");
    let retain = row["retain_seconds"].as_f64().expect("a retain timed at 8 rows");
    assert!(retain > 0.0 && row["step_seconds"].as_f64().expect("step s") > 0.0, "{row}");
    assert!(report["bon"].as_array().expect("bon").is_empty(), "--bon 0 skips the workload");
}
