//! Serves a reward model directory over HTTP (schema: the `specrej-reward` crate docs).
//!
//! ```text
//! specrej-reward-server RM_DIR [ADDR] [--weights f32|q8_0|native]
//! ```
//! ADDR defaults to `127.0.0.1:8080`. Weights default to f32 (see `WeightFormat`).

use std::process::ExitCode;

use specrej_candle::{LoadOptions, WeightFormat};
use specrej_reward::{RewardModel, serve};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut weights = WeightFormat::F32;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--weights" => {
                weights = match args.next().as_deref() {
                    Some("f32") => WeightFormat::F32,
                    Some("q8_0") => WeightFormat::Q8_0,
                    Some("native") => WeightFormat::Native,
                    other => {
                        eprintln!("error: --weights takes f32, q8_0 or native, not {other:?}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            "-h" | "--help" => {
                println!("usage: specrej-reward-server RM_DIR [ADDR] [--weights f32|q8_0|native]");
                return ExitCode::SUCCESS;
            }
            _ => positional.push(a),
        }
    }
    let Some(dir) = positional.first() else {
        eprintln!("usage: specrej-reward-server RM_DIR [ADDR] [--weights f32|q8_0|native]");
        return ExitCode::FAILURE;
    };
    let addr = positional.get(1).cloned().unwrap_or_else(|| "127.0.0.1:8080".into());
    let rm = match RewardModel::load(dir, &LoadOptions { weights, ..Default::default() }) {
        Ok(rm) => rm,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match std::net::TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(a) => eprintln!("serving {dir} on http://{a}/"),
        Err(_) => eprintln!("serving {dir} on {addr}"),
    }
    if let Err(e) = serve(listener, rm) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
