//! `specrej bench paper`: bad flags fail fast; on the real model a tiny run writes every output.

use std::path::PathBuf;
use std::process::Command;

fn out_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("specrej-bench-paper-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn bad_flags_fail_before_the_model_loads() {
    for (args, needle) in [
        (&["--bon", "4"][..], "at least two sizes"),
        (&["--bon", "0,4"][..], "at least 1"),
        (&["--alphas", "1.0"][..], "[0, 1)"),
        (&["--limit", "0"][..], "at least 1"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_specrej"))
            .args(["bench", "paper", "--model", "/nonexistent.gguf"])
            .args(args)
            .output()
            .expect("the binary runs");
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
    }
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn tiny_run_writes_json_markdown_and_svgs() {
    let model = std::env::var("SPECREJ_MODEL").expect("SPECREJ_MODEL names the model file");
    let out = out_dir("tiny");
    std::fs::create_dir_all(&out).expect("out dir");
    // A calibration given, so the test does not spend minutes measuring the machine.
    let calibration = out.join("calibration.json");
    std::fs::write(
        &calibration,
        r#"{"machine":"test","step":[[1,0.01],[64,0.1]],"per_row_token":1e-6,"prefill":[0.0,0.002,0.0],
            "reward":{"judge":[0.0,0.002,0.0,0.0],"likelihood":[0.0,0.003,0.0,0.0]}}"#,
    )
    .expect("calibration");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_specrej"))
            .args([
                "bench",
                "paper",
                "--limit",
                "1",
                "--bon",
                "2,4",
                "--alphas",
                "0.5",
                "--max-new-tokens",
                "24",
            ])
            .args([
                "--kv-budget",
                "8MB",
                "--policies",
                "paper,random,oracle",
                "--model",
                &model,
                "--calibration",
            ])
            .arg(&calibration)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("the binary runs")
    };
    let output = run();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("| bon-2 |")
            && stdout.contains("| paper α=0.5 |")
            && stdout.contains("## Reward: likelihood"),
        "{stdout}"
    );

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("JSON");
    let prompts = json["prompts"].as_array().expect("prompts");
    assert_eq!(prompts.len(), 1);
    let rewards = prompts[0]["rewards"].as_array().expect("rewards");
    assert_eq!(rewards.len(), 2, "judge and likelihood");
    for r in rewards {
        assert_eq!(
            r["finals"].as_array().map(Vec::len),
            Some(4),
            "one final reward per recorded row"
        );
        // Two Best-of-N sizes, three policies at one α.
        assert_eq!(r["runs"].as_array().map(Vec::len), Some(5));
    }
    assert!(
        std::fs::read_to_string(out.join("report.md")).expect("report.md").contains("| bon-4 |")
    );
    for svg in [
        "improvement_vs_compute-judge.svg",
        "correlation-judge.svg",
        "improvement_vs_compute-likelihood.svg",
    ] {
        let text = std::fs::read_to_string(out.join(svg)).expect(svg);
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "{svg}");
    }
    assert!(out.join("recordings").join("prompt-0.json").exists());

    // A rerun with the same settings reuses the prompt instead of generating again.
    let again = run();
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already in"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The self-judge replayed over a recording equals the self-judge run live on lent K/V: the
/// same candidates, rewards, decisions, reward calls and reward tokens.
#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn self_judge_replay_equals_the_live_run() {
    let model = std::env::var("SPECREJ_MODEL").expect("SPECREJ_MODEL names the model file");
    let out = out_dir("self-judge");
    std::fs::create_dir_all(&out).expect("out dir");
    let calibration = out.join("calibration.json");
    std::fs::write(
        &calibration,
        r#"{"machine":"test","step":[[1,0.01],[64,0.1]],"per_row_token":1e-6,"prefill":[0.0,0.002,0.0],
            "reward":{"judge":[0.0,0.002,0.0,0.0]}}"#,
    )
    .expect("calibration");
    let output = Command::new(env!("CARGO_BIN_EXE_specrej"))
        .args([
            "bench",
            "paper",
            "--limit",
            "1",
            "--bon",
            "2,8",
            "--alphas",
            "0.5",
            "--max-new-tokens",
            "48",
        ])
        .args([
            "--kv-budget",
            "8MB",
            "--policies",
            "paper",
            "--rewards",
            "self-judge",
            "--check-live",
            "--model",
            &model,
        ])
        .arg("--calibration")
        .arg(&calibration)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("JSON");
    let reward = &json["prompts"][0]["rewards"][0];
    assert_eq!(reward["reward"], "self-judge");
    assert!(
        !reward["runs"][2]["decisions"].as_array().expect("decisions").is_empty(),
        "the budget forces a decision: {reward}"
    );
    assert_eq!(reward["live_check"]["equal"], true, "{}", reward["live_check"]);
    let _ = std::fs::remove_dir_all(&out);
}
