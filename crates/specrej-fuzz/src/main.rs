//! `specrej-fuzz`: a structured mutation fuzzer on stable Rust for every parser that reads
//! outside input (see `targets.rs`). Deterministic for a seed: mutations of the corpus in
//! `fuzz/corpus/<target>/`, inputs that reach a new outcome (a new error) kept as corpus.
//! A panic, an input that takes over 1 s, or an allocation over 1 GiB is a failure; its input
//! is written to `target/fuzz/<target>/` and the run exits 1.
//!
//! `specrej-fuzz run <target|all> [--seconds N] [--seed S] [--jobs J]`, `specrej-fuzz seeds` (rewrites the
//! seed corpora), `specrej-fuzz replay <target> FILE…` (runs files once each).

mod alloc;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use specrej_fuzz::mutate::{Rng, mutate};
use specrej_fuzz::targets::{self, TARGETS, Target};
use specrej_fuzz::{corpus_files, root, seeds};

#[derive(Debug, Parser)]
#[command(name = "specrej-fuzz", about = "Fuzz specrej's parsers of outside input")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fuzz one target (gguf, safetensors, template, http, openai) or all.
    Run {
        target: String,
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// The mutation seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// With `all`: how many targets run at once, each in a process of its own (the
        /// allocation cap and the panic hook are per process). 1: one after another.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
    /// Rewrite the seed corpora under fuzz/corpus/.
    Seeds,
    /// Run the given files through a target once each.
    Replay { target: String, files: Vec<PathBuf> },
}

/// An input slower than this is a hang.
const SLOW: Duration = Duration::from_secs(1);

fn work_dir(target: &str) -> Result<PathBuf> {
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let dir = target_dir.join("fuzz").join(target);
    std::fs::create_dir_all(dir.join("work"))
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn select(name: &str) -> Result<Vec<Target>> {
    if name == "all" {
        return Ok(TARGETS.to_vec());
    }
    match targets::target(name) {
        Some(t) => Ok(vec![t]),
        None => {
            bail!("unknown target {name:?}; known: all, {}", TARGETS.map(|t| t.name).join(", "))
        }
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Seeds => {
            let work = work_dir("seeds")?;
            for (target, name, bytes) in seeds::seeds(&work)? {
                let dir = root().join("fuzz/corpus").join(target);
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join(&name), bytes)?;
                eprintln!("wrote fuzz/corpus/{target}/{name}");
            }
            Ok(true)
        }
        Command::Replay { target, files } => {
            let [target] = select(&target)?[..] else { bail!("replay takes one target") };
            let work = work_dir(target.name)?;
            std::panic::set_hook(Box::new(|_| {}));
            let mut ok = true;
            for file in files {
                let bytes =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                match once(target, &bytes, &work.join("work")) {
                    Ok((outcome, took)) => {
                        eprintln!("{}: {outcome} ({:.3} s)", file.display(), took.as_secs_f64())
                    }
                    Err(panic) => {
                        ok = false;
                        eprintln!("{}: PANIC {panic}", file.display());
                    }
                }
            }
            Ok(ok)
        }
        Command::Run { target, seconds, seed, jobs } if jobs > 1 => {
            let names: Vec<&str> = select(&target)?.iter().map(|t| t.name).collect();
            in_processes(&names, seconds, seed, jobs)
        }
        Command::Run { target, seconds, seed, .. } => {
            let mut ok = true;
            for target in select(&target)? {
                ok &= fuzz(target, Duration::from_secs(seconds), seed)?;
            }
            Ok(ok)
        }
    }
}

/// Fuzzes each of `targets` in a child process of this program, `jobs` at a time; false if
/// any of them failed.
fn in_processes(targets: &[&str], seconds: u64, seed: u64, jobs: usize) -> Result<bool> {
    let me = std::env::current_exe().context("finding this program's path")?;
    let mut ok = true;
    for group in targets.chunks(jobs) {
        let mut children = Vec::with_capacity(group.len());
        for name in group {
            let child = std::process::Command::new(&me)
                .args(["run", name, "--seconds", &seconds.to_string(), "--seed", &seed.to_string()])
                .spawn()
                .with_context(|| format!("starting {} run {name}", me.display()))?;
            children.push((name, child));
        }
        for (name, mut child) in children {
            let status = child.wait().with_context(|| format!("waiting for target {name}"))?;
            if !status.success() {
                eprintln!("{name}: the fuzzer failed ({status})");
                ok = false;
            }
        }
    }
    Ok(ok)
}

/// Runs one input, catching a panic (its message is the error).
fn once(target: Target, bytes: &[u8], work: &Path) -> Result<(String, Duration), String> {
    let started = Instant::now();
    let result = std::panic::catch_unwind(|| (target.run)(bytes, work));
    let took = started.elapsed();
    match result {
        Ok(outcome) => Ok((outcome, took)),
        Err(payload) => Err(payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())),
    }
}

/// Fuzzes `target` for `duration`; false if anything failed (inputs saved).
fn fuzz(target: Target, duration: Duration, seed: u64) -> Result<bool> {
    let dir = work_dir(target.name)?;
    let work = dir.join("work");
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    for file in corpus_files(target.name)? {
        corpus.push(std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?);
    }
    if corpus.is_empty() {
        bail!("no seeds in fuzz/corpus/{} (specrej-fuzz seeds writes them)", target.name);
    }
    // Panics are results here, not messages on stderr.
    std::panic::set_hook(Box::new(|_| {}));
    // A watchdog: an input running for 10 s will not finish; save it and stop.
    let current = dir.join("current");
    let started_at = Arc::new(AtomicU64::new(0));
    let clock = Instant::now();
    {
        let started_at = Arc::clone(&started_at);
        let current = current.clone();
        let name = target.name;
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let t = started_at.load(Ordering::SeqCst);
                if t != 0 && clock.elapsed().as_millis() as u64 > t + 10_000 {
                    eprintln!(
                        "{name}: HANG: an input has run for 10 s; it is in {}",
                        current.display()
                    );
                    std::process::exit(1);
                }
            }
        });
    }
    alloc::reset_peak();
    let mut outcomes = BTreeSet::new();
    let mut failures = 0usize;
    let mut rng = Rng::new(seed);
    let mut execs = 0u64;
    let mut slowest = Duration::ZERO;
    let began = Instant::now();
    let mut index = 0usize;
    while began.elapsed() < duration {
        // The seeds once as they are, then mutants of the corpus.
        let input = if index < corpus.len() {
            corpus[index].clone()
        } else {
            let a = rng.below(corpus.len());
            let b = rng.below(corpus.len());
            mutate(&mut rng, &corpus[a], &corpus[b], target.dictionary)
        };
        index += 1;
        // The input is on disk while it runs: an abort (an allocation over the cap) or a hang
        // leaves it there.
        std::fs::write(&current, &input)
            .with_context(|| format!("writing {}", current.display()))?;
        started_at.store(clock.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        alloc::arm();
        let result = once(target, &input, &work);
        alloc::disarm();
        started_at.store(0, Ordering::SeqCst);
        execs += 1;
        match result {
            Ok((outcome, took)) => {
                slowest = slowest.max(took);
                if took > SLOW {
                    failures += 1;
                    let path = save(&dir, "slow", &input)?;
                    eprintln!(
                        "{}: SLOW ({:.2} s): {} → {outcome}",
                        target.name,
                        took.as_secs_f64(),
                        path.display()
                    );
                }
                if outcomes.insert(outcome) && corpus.len() < 4096 && index > corpus.len() {
                    corpus.push(input);
                }
            }
            Err(panic) => {
                failures += 1;
                let path = save(&dir, "crash", &input)?;
                eprintln!("{}: PANIC {panic}: {}", target.name, path.display());
            }
        }
    }
    let _ = std::panic::take_hook();
    eprintln!(
        "{}: {execs} inputs in {:.0} s ({:.0}/s), {} outcomes, corpus {}, slowest {:.3} s, peak allocation {} KiB, {failures} failures",
        target.name,
        began.elapsed().as_secs_f64(),
        execs as f64 / began.elapsed().as_secs_f64(),
        outcomes.len(),
        corpus.len(),
        slowest.as_secs_f64(),
        alloc::peak() >> 10,
    );
    Ok(failures == 0)
}

fn save(dir: &Path, kind: &str, input: &[u8]) -> Result<PathBuf> {
    let hash = input
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let path = dir.join(format!("{kind}-{hash:016x}"));
    std::fs::write(&path, input).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
