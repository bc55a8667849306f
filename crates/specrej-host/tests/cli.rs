//! `specrej-server`'s flags: bad ones are named, with exit status 1 (2 for usage errors),
//! before any model or component loads.

use std::process::Command;

fn server(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_specrej-server"))
        .args(args)
        .output()
        .expect("specrej-server runs");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn bad_reward_flags_are_named() {
    // The component must exist for the server to get as far as the reward flags.
    let component =
        std::env::temp_dir().join(format!("specrej-host-cli-{}.wasm", std::process::id()));
    std::fs::write(&component, b"\0asm").expect("write");
    let c = component.to_str().expect("utf-8");
    for (args, expected) in [
        (vec!["--reward-model", "rm"], "--reward-model \"rm\": expected NAME=VALUE"),
        (vec!["--reward-model", "=dir"], "expected NAME=VALUE"),
        (
            vec!["--reward-model", "rm=/nonexistent/rm"],
            "/nonexistent/rm is not a reward-model directory",
        ),
        (
            vec!["--reward-url", "rm=ftp://host/score"],
            "--reward-url rm=ftp://host/score: reward server URL \"ftp://host/score\": scheme \"ftp\" is not supported, only http",
        ),
        (
            vec!["--fake", "--reward-url", "rm=http://127.0.0.1:1/score"],
            "need a real model, not --fake",
        ),
    ] {
        let mut all = vec!["--component", c, "--listen", "127.0.0.1:0"];
        all.extend(args);
        let (code, stderr) = server(&all);
        assert_eq!(code, Some(1), "{all:?}: {stderr}");
        assert!(stderr.contains(expected), "{all:?}: {stderr}");
    }
    let (code, stderr) = server(&["--bogus"]);
    assert_eq!(code, Some(2), "{stderr}");
    let _ = std::fs::remove_file(&component);
}
