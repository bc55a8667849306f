//! The guest: `decode.generate` over the imported `engine`.

use std::future::{Future, ready};
use std::ops::Range;

use specrej_core::{
    BackendError, Decoder, Event, Method, Options, Response, Sampling, Scored, Scorer,
};

/// The generated bindings (private; the items this file uses are imported below).
#[allow(
    unsafe_code,
    reason = "wit-bindgen's canonical-ABI glue (exports, imports, cabi_realloc) is `unsafe` by nature"
)]
#[allow(missing_debug_implementations, reason = "generated types; not ours to derive on")]
#[allow(unused_qualifications, reason = "generated paths")]
mod bindings {
    #[cfg(not(feature = "separate-reward"))]
    wit_bindgen::generate!({ path: "../../wit", world: "decoder" });
    #[cfg(feature = "separate-reward")]
    wit_bindgen::generate!({ path: "../../wit", world: "decoder-with-reward" });

    // The export glue (`unsafe extern "C"` functions) expands here, under the allow above.
    use super::Component;
    export!(Component with_types_in self);
}

use bindings::exports::specrej::decoder::decode::{self, DecodeError, Guest};
use bindings::specrej::decoder::progress::{self, EventKinds};
use bindings::specrej::decoder::{engine, types};

/// The exported component.
struct Component;

impl Guest for Component {
    fn generate(
        prompt: Vec<u32>,
        options: decode::Options,
    ) -> Result<decode::Outcome, DecodeError> {
        let events = options.events;
        let options = core_options(options);
        let mut decoder = Engine;
        let mut scorer = Reward;
        let outcome = specrej_core::block_on_ready(specrej_core::generate(
            &mut decoder,
            &mut scorer,
            &prompt,
            &options,
            &mut |event| report(events, event),
        ))
        .map_err(|error| match error {
            specrej_core::Error::InvalidRequest(message) => DecodeError::InvalidRequest(message),
            specrej_core::Error::Backend(error) => DecodeError::Engine(to_wit_error(error)),
        })?;
        Ok(decode::Outcome {
            candidates: outcome.candidates.iter().map(to_wit_candidate).collect(),
            rejected: outcome
                .rejected
                .into_iter()
                .map(|r| types::Rejected { row: r.row, tokens: r.tokens, score: r.score })
                .collect(),
            trace: outcome.trace.iter().map(to_wit_decision).collect(),
            stats: to_wit_stats(&outcome.stats),
        })
    }
}

fn core_options(options: decode::Options) -> Options {
    let s = options.sampling;
    Options {
        method: match options.method {
            decode::Method::BestOfN => Method::BestOfN,
            decode::Method::SpeculativeRejection(alpha) => Method::SpeculativeRejection { alpha },
        },
        n: options.n as usize,
        max_new_tokens: options.max_new_tokens as usize,
        min_new_tokens: options.min_new_tokens as usize,
        eos: options.eos,
        sampling: Sampling {
            seed: s.seed,
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: s.top_p,
        },
        rules: specrej_core::Rules {
            paper_exact: options.rules.paper_exact,
            probe_lag: options.rules.probe_lag as usize,
            gate_tau: options.rules.gate_tau,
            adaptive_snr: options.rules.adaptive_snr,
            refill: options.rules.refill,
        },
    }
}

/// Sends `event` to the host if it asked for its kind.
fn report(events: EventKinds, event: &Event<'_>) {
    let wit = match *event {
        Event::Prefilled { first_row, rows } if events.contains(EventKinds::PREFILLED) => {
            progress::Event::Prefilled((first_row, rows as u32))
        }
        Event::Step { position, rows, tokens } if events.contains(EventKinds::STEP) => {
            progress::Event::Step(progress::StepEvent {
                position: position as u32,
                rows: rows.to_vec(),
                tokens: tokens.to_vec(),
            })
        }
        Event::Decision { decision, rows, scores, kept }
            if events.contains(EventKinds::DECISION) =>
        {
            progress::Event::Decision(progress::DecisionEvent {
                decision: to_wit_decision(decision),
                rows: rows.to_vec(),
                scores: scores.to_vec(),
                kept: kept.to_vec(),
            })
        }
        Event::Finished { row, finish } if events.contains(EventKinds::FINISHED) => {
            progress::Event::Finished((row, to_wit_finish(finish)))
        }
        Event::Forked { children } if events.contains(EventKinds::FORKED) => {
            progress::Event::Forked(children.to_vec())
        }
        Event::Scored { candidates } if events.contains(EventKinds::SCORED) => {
            progress::Event::Scored(candidates.iter().map(to_wit_candidate).collect())
        }
        _ => return,
    };
    progress::on_event(&wit);
}

fn to_wit_error(error: BackendError) -> types::EngineError {
    match error {
        BackendError::OutOfMemory => types::EngineError::OutOfMemory,
        BackendError::Device(message) => types::EngineError::Device(message),
    }
}

fn from_wit_error(error: types::EngineError) -> BackendError {
    match error {
        types::EngineError::OutOfMemory => BackendError::OutOfMemory,
        types::EngineError::Device(message) => BackendError::Device(message),
    }
}

fn to_wit_finish(finish: specrej_core::Finish) -> types::Finish {
    match finish {
        specrej_core::Finish::Eos => types::Finish::Eos,
        specrej_core::Finish::Length => types::Finish::Length,
        specrej_core::Finish::Capacity => types::Finish::Capacity,
    }
}

fn to_wit_candidate(c: &specrej_core::Candidate) -> types::Candidate {
    types::Candidate {
        row: c.row,
        tokens: c.tokens.clone(),
        score: c.score,
        finish: to_wit_finish(c.finish),
    }
}

fn to_wit_decision(d: &specrej_core::Decision) -> types::Decision {
    types::Decision {
        position: d.position as u32,
        live_rows: d.live_rows as u32,
        kept_rows: d.kept_rows as u32,
        min: d.min,
        median: d.median,
        max: d.max,
        threshold: d.threshold,
        early: d.early,
        tau: d.tau,
        alpha: d.alpha,
        forked: d.forked as u32,
    }
}

fn to_wit_stats(s: &specrej_core::Stats) -> types::Stats {
    types::Stats {
        prompt_tokens: s.prompt_tokens as u64,
        prefill_tokens: s.prefill_tokens as u64,
        tokens_generated: s.tokens_generated as u64,
        steps: s.steps as u64,
        initial_rows: s.initial_rows as u64,
        batches: s.batches as u64,
        reward_calls: s.reward_calls as u64,
        reward_tokens: s.reward_tokens,
        token_capacity: s.token_capacity as u64,
        peak_kv_bytes: s.peak_kv_bytes,
        wall_seconds: s.wall_seconds,
    }
}

/// A `u64` from the host as a `usize` (saturating on wasm32).
fn size(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// The imported engine as a [`Decoder`].
struct Engine;

impl Decoder for Engine {
    type Batch = engine::Batch;

    fn token_capacity(&self) -> usize {
        size(engine::token_capacity())
    }

    fn kv_bytes_per_token(&self) -> usize {
        size(engine::kv_bytes_per_token())
    }

    fn kv_layout(&self) -> specrej_core::KvLayout {
        let layout = engine::layout();
        specrej_core::KvLayout { shared_prompt: layout.shared_prompt, block: layout.block as usize }
    }

    fn max_sequence_len(&self) -> usize {
        size(engine::max_sequence_len())
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<engine::Batch, BackendError> {
        let sampling = types::Sampling {
            seed: sampling.seed,
            temperature: sampling.temperature,
            top_k: u32::try_from(sampling.top_k).unwrap_or(u32::MAX),
            top_p: sampling.top_p,
        };
        engine::prefill(prompt, types::RowRange { start: rows.start, end: rows.end }, sampling)
            .map_err(from_wit_error)
    }

    fn step(
        &mut self,
        batch: &mut engine::Batch,
    ) -> impl Future<Output = Result<Vec<u32>, BackendError>> {
        ready(batch.step().map_err(from_wit_error))
    }

    fn retain(&mut self, batch: &mut engine::Batch, keep: &[usize]) -> Result<(), BackendError> {
        let keep: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
        batch.retain(&keep).map_err(from_wit_error)
    }

    fn fork(
        &mut self,
        batch: &mut engine::Batch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        let children: Vec<(u32, u32)> =
            children.iter().map(|&(parent, id)| (parent as u32, id)).collect();
        batch.fork(&children).map_err(from_wit_error)
    }
}

/// The reward: `engine.score`, or the separate `reward` import.
struct Reward;

#[cfg(feature = "separate-reward")]
use bindings::specrej::decoder::reward as reward_import;
#[cfg(not(feature = "separate-reward"))]
use engine as reward_import;

impl Scorer for Reward {
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> impl Future<Output = Result<Scored, BackendError>> {
        let responses: Vec<types::Response> = responses
            .iter()
            .map(|r| types::Response { row: r.row, tokens: r.tokens.to_vec() })
            .collect();
        ready(
            reward_import::score(prompt, &responses)
                .map(|s| Scored { rewards: s.rewards, tokens_processed: s.tokens_processed })
                .map_err(from_wit_error),
        )
    }

    fn release(&mut self, rows: &[u32]) {
        if !rows.is_empty() {
            reward_import::release(rows);
        }
    }

    fn fork(&mut self, children: &[(u32, u32)]) {
        if !children.is_empty() {
            reward_import::forked(children);
        }
    }
}
