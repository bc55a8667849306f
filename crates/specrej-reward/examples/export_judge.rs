//! Writes a policy GGUF's judge (reward = logit(Yes) − logit(No) after the judge prompt) as a
//! Hugging Face `*ForSequenceClassification` directory, to try `--reward DIR` and
//! `specrej-reward-server` without downloading a reward model.
//!
//! ```text
//! cargo run -p specrej-reward --example export_judge -- GGUF OUT_DIR [f32|f16]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use specrej_reward::{ExportDtype, export_judge_rm};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(gguf), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("usage: export_judge GGUF OUT_DIR [f32|f16]");
        return ExitCode::from(2);
    };
    let dtype = match args.get(2).map(String::as_str) {
        None | Some("f32") => ExportDtype::F32,
        Some("f16") => ExportDtype::F16,
        Some(other) => {
            eprintln!("error: the dtype is f32 or f16, not {other:?}");
            return ExitCode::from(2);
        }
    };
    match export_judge_rm(&PathBuf::from(gguf), &PathBuf::from(out), dtype) {
        Ok(report) => {
            println!(
                "wrote {} ({}, {} tensors; score head = lm_head[{}] − lm_head[{}])",
                report.dir.display(),
                report.architecture,
                report.tensors,
                report.yes,
                report.no
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
