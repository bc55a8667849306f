//! `specrej`: Best-of-N and Speculative Rejection from the terminal.

mod backend;
mod bench;
mod budget;
mod eval;
mod generate;
mod model;
mod reward;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "specrej",
    version,
    about = "Best-of-N alignment, made cheap by Speculative Rejection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate many answers to one prompt and print the one the reward model likes best.
    Generate(generate::Args),
    /// Measure the engine (see `specrej bench --help`).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Print what a model file holds (architecture, sizes, tokenizer, chat template).
    Info(model::InfoArgs),
    /// List the WebGPU adapters `--backend wgpu --adapter` can pick.
    Adapters,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(bench) => bench::run(bench),
        Command::Info(args) => model::info(args),
        Command::Adapters => backend::list_adapters(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
