//! The component in wasmtime computes exactly what `specrej_core::generate` computes
//! natively: same candidates (tokens, scores, finish), rejected rows, decision trace,
//! stats and event stream, for the same engine and seed. Plus the sandbox's limits.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use specrej_core::testing::{FAKE_EOS, FakeDecoder, FakeScorer};
use specrej_core::{
    BackendError, Decoder, Method, Options, Outcome, Response, Sampling, Scored, Scorer,
    block_on_ready, generate,
};
use specrej_host::runtime::{
    AnyBatch, Engine, EventKinds, HostReward, Limits, Pair, RunError, Runtime, World,
};

fn runtime() -> Runtime {
    Runtime::from_bytes(&common::component_bytes()).expect("the component compiles")
}

fn limits(options: &Options) -> Limits {
    Limits::for_request(options.n, options.max_new_tokens, Duration::from_secs(600))
}

/// Runs natively; returns the outcome (wall time zeroed) and the events as text.
fn native<D: Decoder, S: Scorer>(
    decoder: &mut D,
    scorer: &mut S,
    prompt: &[u32],
    options: &Options,
) -> (Result<Outcome, specrej_core::Error>, Vec<String>) {
    let mut events = Vec::new();
    let result = block_on_ready(generate(decoder, scorer, prompt, options, &mut |e| {
        events.push(format!("{e:?}"))
    }));
    (result.map(zero_wall), events)
}

/// Runs through the component; returns the outcome (wall time zeroed), the events as text
/// and the fuel spent.
fn component(
    runtime: &Runtime,
    engine: Box<dyn Engine>,
    prompt: &[u32],
    options: &Options,
) -> (Result<Outcome, RunError>, Vec<String>, u64) {
    component_with_reward(runtime, engine, None, prompt, options)
}

/// [`component`] with a host reward behind the `reward` import.
fn component_with_reward(
    runtime: &Runtime,
    engine: Box<dyn Engine>,
    reward: Option<Box<dyn HostReward>>,
    prompt: &[u32],
    options: &Options,
) -> (Result<Outcome, RunError>, Vec<String>, u64) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let observer = Box::new(move |e: &specrej_core::Event<'_>| {
        sink.lock().expect("events").push(format!("{e:?}"));
        true
    });
    let run = runtime.generate_with_reward(
        engine,
        reward,
        prompt,
        options,
        EventKinds::all(),
        observer,
        limits(options),
    );
    let events = events.lock().expect("events").clone();
    (run.result.map(zero_wall), events, run.fuel_used)
}

fn zero_wall(mut outcome: Outcome) -> Outcome {
    outcome.stats.wall_seconds = 0.0;
    outcome
}

fn options(
    method: Method,
    n: usize,
    max_new_tokens: usize,
    min_new_tokens: usize,
    seed: u64,
) -> Options {
    Options {
        method,
        n,
        max_new_tokens,
        min_new_tokens,
        eos: vec![FAKE_EOS],
        sampling: Sampling { seed, ..Sampling::default() },
        rules: Default::default(),
    }
}

fn fake(capacity: usize, real_capacity: Option<usize>) -> FakeDecoder {
    let mut decoder = FakeDecoder::new(capacity);
    decoder.real_capacity = real_capacity;
    decoder
}

/// `outcome` without its times: two runs agree in everything but how long they took.
fn untimed(mut outcome: Outcome) -> Outcome {
    let s = &mut outcome.stats;
    (s.wall_seconds, s.prefill_seconds, s.step_seconds, s.reward_seconds, s.retain_seconds) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    outcome
}

/// Native and component runs of `options` on two identical fakes agree in everything.
fn assert_same(
    runtime: &Runtime,
    capacity: usize,
    real_capacity: Option<usize>,
    options: &Options,
) -> Outcome {
    let prompt: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let (expected, expected_events) =
        native(&mut fake(capacity, real_capacity), &mut FakeScorer::default(), &prompt, options);
    let engine = Box::new(Pair::new(fake(capacity, real_capacity), FakeScorer::default()));
    let (got, got_events, fuel) = component(runtime, engine, &prompt, options);
    let expected = expected.expect("the native run succeeds");
    let got = got.expect("the component run succeeds");
    assert_eq!(
        untimed(got.clone()),
        untimed(expected),
        "component and native outcomes differ for {options:?}"
    );
    // The host measures the time spent in each kind of import.
    assert!(got.stats.step_seconds > 0.0 && got.stats.prefill_seconds > 0.0, "{:?}", got.stats);
    assert_eq!(got_events, expected_events, "component and native events differ for {options:?}");
    eprintln!(
        "{:?} n={} max_new={}: {} candidates, {} decisions, {} tokens, fuel {fuel} ({} per token)",
        options.method,
        options.n,
        options.max_new_tokens,
        got.candidates.len(),
        got.trace.len(),
        got.stats.tokens_generated,
        fuel / got.stats.tokens_generated.max(1) as u64
    );
    got
}

#[test]
fn component_matches_native_on_the_fake_backend() {
    let runtime = runtime();
    // Speculative Rejection with decisions from the budget.
    let sr = options(Method::SpeculativeRejection { alpha: 0.5 }, 16, 40, 6, 7);
    let outcome = assert_same(&runtime, 16 * (8 + 6), None, &sr);
    assert!(
        !outcome.trace.is_empty() && !outcome.rejected.is_empty(),
        "the budget forces decisions"
    );
    // Early decisions: the fake runs out of memory before its claimed capacity.
    let early = options(Method::SpeculativeRejection { alpha: 0.25 }, 12, 30, 10, 3);
    let outcome = assert_same(&runtime, 12 * 18, Some(12 * 14), &early);
    assert!(outcome.trace.iter().any(|d| d.early), "out-of-memory decisions happen");
    // Best-of-N beyond the budget: sequential batches.
    let bon = options(Method::BestOfN, 7, 24, 0, 11);
    let outcome = assert_same(&runtime, 3 * (8 + 24), None, &bon);
    assert_eq!((outcome.candidates.len(), outcome.stats.batches), (7, 3));
    // Greedy, top-k and top-p paths of the sampler.
    let mut greedy = options(Method::BestOfN, 3, 12, 0, 5);
    greedy.sampling = Sampling { seed: 5, temperature: 0.0, top_k: 0, top_p: 1.0 };
    assert_same(&runtime, 1000, None, &greedy);
    let mut nucleus = options(Method::SpeculativeRejection { alpha: 0.5 }, 8, 20, 4, 9);
    nucleus.sampling = Sampling { seed: 9, temperature: 0.7, top_k: 5, top_p: 0.9 };
    assert_same(&runtime, 8 * 12, None, &nucleus);
}

/// A scorer that must not be called: the engine's, when the host reward is in charge.
struct Unreachable;

impl Scorer for Unreachable {
    async fn score(
        &mut self,
        _prompt: &[u32],
        _responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        Err(BackendError::device("engine.score was called; the reward import should have been"))
    }
}

#[test]
fn decoder_with_reward_scores_through_the_host_reward() {
    let plain = runtime();
    let with_reward = Runtime::from_bytes(&common::component_with_reward_bytes())
        .expect("the component compiles");
    assert_eq!((plain.world(), with_reward.world()), (World::Decoder, World::DecoderWithReward));
    let prompt: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    for options in [
        options(Method::SpeculativeRejection { alpha: 0.5 }, 16, 40, 6, 7),
        options(Method::BestOfN, 5, 16, 0, 2),
    ] {
        let capacity = 16 * (8 + 6);
        let expected = component(
            &plain,
            Box::new(Pair::new(fake(capacity, None), FakeScorer::default())),
            &prompt,
            &options,
        );
        let expected_outcome = expected.0.expect("world decoder runs");
        // The host's reward through the `reward` import; the engine's scorer is never asked.
        let engine = Box::new(Pair::new(fake(capacity, None), Unreachable));
        let reward: Box<dyn HostReward> = Box::new(FakeScorer::default());
        let got = component_with_reward(&with_reward, engine, Some(reward), &prompt, &options);
        assert_eq!(
            untimed(got.0.expect("world decoder-with-reward runs")),
            untimed(expected_outcome.clone()),
            "{options:?}"
        );
        assert_eq!(got.1, expected.1, "the same events for {options:?}");
        // Without a host reward, the engine's scorer serves the `reward` import.
        let engine = Box::new(Pair::new(fake(capacity, None), FakeScorer::default()));
        let fallback = component(&with_reward, engine, &prompt, &options);
        assert_eq!(untimed(fallback.0.expect("fallback runs")), untimed(expected_outcome.clone()));
        if matches!(options.method, Method::SpeculativeRejection { .. }) {
            assert!(!expected_outcome.trace.is_empty(), "decisions were scored");
        }
    }
    // A host reward for a component that has no reward import is refused, not ignored.
    let engine = Box::new(Pair::new(fake(1000, None), FakeScorer::default()));
    let reward: Box<dyn HostReward> = Box::new(FakeScorer::default());
    let refused = component_with_reward(
        &plain,
        engine,
        Some(reward),
        &prompt,
        &options(Method::BestOfN, 2, 4, 0, 0),
    );
    assert!(matches!(refused.0, Err(RunError::NoRewardImport)), "{:?}", refused.0);
}

#[test]
fn invalid_requests_fail_the_same_way() {
    let runtime = runtime();
    let prompt = [1u32, 2, 3];
    for (what, options) in [
        ("n = 0", options(Method::BestOfN, 0, 8, 0, 0)),
        ("alpha = 1", options(Method::SpeculativeRejection { alpha: 1.0 }, 4, 8, 4, 0)),
        ("max_new_tokens = 0", options(Method::BestOfN, 2, 0, 0, 0)),
        ("a row larger than the budget", options(Method::BestOfN, 2, 100, 0, 0)),
    ] {
        let (native, _) =
            native(&mut fake(50, None), &mut FakeScorer::default(), &prompt, &options);
        let Err(specrej_core::Error::InvalidRequest(expected)) = native else {
            panic!("{what}: native should reject it, got {native:?}");
        };
        let engine = Box::new(Pair::new(fake(50, None), FakeScorer::default()));
        match component(&runtime, engine, &prompt, &options).0 {
            Err(RunError::InvalidRequest(message)) => assert_eq!(message, expected, "{what}"),
            other => panic!("{what}: expected InvalidRequest({expected:?}), got {other:?}"),
        }
    }
    // An empty prompt too.
    let engine = Box::new(Pair::new(fake(50, None), FakeScorer::default()));
    let result = component(&runtime, engine, &[], &options(Method::BestOfN, 1, 4, 0, 0)).0;
    assert!(
        matches!(result, Err(RunError::InvalidRequest(ref m)) if m.contains("empty")),
        "{result:?}"
    );
}

/// An engine that sleeps in every step and fails scoring on demand.
struct Slow {
    inner: Pair<FakeDecoder, FakeScorer>,
    step_delay: Duration,
    fail_scoring: bool,
}

impl Engine for Slow {
    fn token_capacity(&self) -> usize {
        self.inner.token_capacity()
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }
    fn kv_layout(&self) -> specrej_core::KvLayout {
        self.inner.kv_layout()
    }
    fn max_sequence_len(&self) -> usize {
        self.inner.max_sequence_len()
    }
    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: std::ops::Range<u32>,
        sampling: &Sampling,
    ) -> Result<AnyBatch, BackendError> {
        self.inner.prefill(prompt, rows, sampling)
    }
    fn step(&mut self, batch: &mut AnyBatch) -> Result<Vec<u32>, BackendError> {
        std::thread::sleep(self.step_delay);
        self.inner.step(batch)
    }
    fn retain(&mut self, batch: &mut AnyBatch, keep: &[usize]) -> Result<(), BackendError> {
        self.inner.retain(batch, keep)
    }
    fn fork(
        &mut self,
        batch: &mut AnyBatch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        self.inner.fork(batch, children)
    }
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        if self.fail_scoring {
            return Err(BackendError::device("the reward model is down"));
        }
        self.inner.score(prompt, responses)
    }
    fn release(&mut self, rows: &[u32]) {
        self.inner.release(rows);
    }
    fn forked(&mut self, children: &[(u32, u32)]) {
        self.inner.forked(children);
    }
}

fn slow(step_delay: Duration, fail_scoring: bool) -> Box<dyn Engine> {
    Box::new(Slow {
        inner: Pair::new(fake(10_000, None), FakeScorer::default()),
        step_delay,
        fail_scoring,
    })
}

#[test]
fn limits_stop_runaway_calls_and_errors_come_back() {
    let runtime = runtime();
    let prompt = [1u32, 2, 3];
    let opts = options(Method::BestOfN, 4, 64, 0, 1);
    let quiet = || -> specrej_host::runtime::Observer { Box::new(|_| true) };

    // Too little fuel: a trap, not a hang or a crash.
    let tiny = Limits { fuel: 20_000, ..limits(&opts) };
    let run = runtime.generate(
        slow(Duration::ZERO, false),
        &prompt,
        &opts,
        EventKinds::empty(),
        quiet(),
        tiny,
    );
    assert!(matches!(run.result, Err(RunError::OutOfFuel)), "{:?}", run.result);

    // A wall-clock limit shorter than the steps take.
    let short = Limits { timeout: Duration::from_millis(50), ..limits(&opts) };
    let started = std::time::Instant::now();
    let run = runtime.generate(
        slow(Duration::from_millis(20), false),
        &prompt,
        &opts,
        EventKinds::empty(),
        quiet(),
        short,
    );
    assert!(matches!(run.result, Err(RunError::Timeout)), "{:?}", run.result);
    assert!(started.elapsed() < Duration::from_secs(5), "the timeout stops the run early");

    // The observer cancels (a streaming client left).
    let mut seen = 0;
    let cancel: specrej_host::runtime::Observer = Box::new(move |_| {
        seen += 1;
        seen < 3
    });
    let run = runtime.generate(
        slow(Duration::ZERO, false),
        &prompt,
        &opts,
        EventKinds::STEP,
        cancel,
        limits(&opts),
    );
    assert!(matches!(run.result, Err(RunError::Cancelled)), "{:?}", run.result);

    // An engine error is passed up as such.
    let run = runtime.generate(
        slow(Duration::ZERO, true),
        &prompt,
        &opts,
        EventKinds::empty(),
        quiet(),
        limits(&opts),
    );
    assert!(
        matches!(run.result, Err(RunError::Engine(BackendError::Device(ref m))) if m.contains("reward model is down")),
        "{:?}",
        run.result
    );

    // The same runtime still serves a normal request after all that.
    let run = runtime.generate(
        slow(Duration::ZERO, false),
        &prompt,
        &opts,
        EventKinds::empty(),
        quiet(),
        limits(&opts),
    );
    assert_eq!(run.result.expect("a normal run").candidates.len(), 4);
}

#[test]
#[ignore = "needs the default model: cargo xtask test sets SPECREJ_MODEL"]
fn component_matches_native_on_the_default_model() {
    use specrej_candle::{CandleDecoder, JudgeScorer, LikelihoodScorer, LoadOptions};
    use specrej_text::{ChatTemplate, GgufMetadata, Message, Tokenizer, judge_segments};

    const QUESTION: &str = "Name two colours of the rainbow.";
    let path = common::default_model();
    let meta = GgufMetadata::from_path(&path).expect("metadata");
    let tokenizer = Tokenizer::from_gguf(&meta).expect("tokenizer");
    let template = ChatTemplate::from_gguf(&meta).expect("template");
    let text = template.render(&[Message::user(QUESTION)], true).expect("render");
    let prompt = tokenizer.encode(&text, false).expect("encode");
    let model = specrej_candle::load(&path, &LoadOptions::default()).expect("model");
    let seg = judge_segments(&tokenizer, &template, QUESTION).expect("judge prompt");
    let judge = || {
        JudgeScorer::new(Arc::clone(&model), seg.before.clone(), seg.after.clone(), seg.yes, seg.no)
    };
    let runtime = runtime();

    // Speculative Rejection with the judge: 4 rows, a decision after one 16-token block each.
    let mut sr = options(Method::SpeculativeRejection { alpha: 0.5 }, 4, 24, 6, 3);
    sr.eos = tokenizer.eos_ids().to_vec();
    let bytes = CandleDecoder::budget_for(&model, prompt.len(), 4, 6);
    let decoder = || CandleDecoder::new(Arc::clone(&model), bytes);
    let (expected, expected_events) = native(&mut decoder(), &mut judge(), &prompt, &sr);
    let (got, got_events, _) =
        component(&runtime, Box::new(Pair::new(decoder(), judge())), &prompt, &sr);
    let expected = expected.expect("native run");
    assert!(!expected.trace.is_empty(), "the budget forces a decision");
    assert_eq!(untimed(got.expect("component run")), untimed(expected.clone()));
    assert_eq!(got_events, expected_events);
    // World decoder-with-reward, the judge supplied by the host through the `reward` import.
    let with_reward = Runtime::from_bytes(&common::component_with_reward_bytes())
        .expect("the component compiles");
    let engine = Box::new(Pair::new(decoder(), LikelihoodScorer::new(Arc::clone(&model))));
    let (got, got_events, _) =
        component_with_reward(&with_reward, engine, Some(Box::new(judge())), &prompt, &sr);
    assert_eq!(
        untimed(got.expect("decoder-with-reward run")),
        untimed(expected.clone()),
        "the host's judge gives the same trajectory"
    );
    assert_eq!(got_events, expected_events);

    // Best-of-N with the likelihood reward.
    let mut bon = options(Method::BestOfN, 3, 10, 0, 8);
    bon.eos = tokenizer.eos_ids().to_vec();
    let decoder = || {
        CandleDecoder::new(
            Arc::clone(&model),
            CandleDecoder::budget_for(&model, prompt.len(), 3, 10),
        )
    };
    let likelihood = || LikelihoodScorer::new(Arc::clone(&model));
    let (expected, _) = native(&mut decoder(), &mut likelihood(), &prompt, &bon);
    let (got, _, _) =
        component(&runtime, Box::new(Pair::new(decoder(), likelihood())), &prompt, &bon);
    assert_eq!(untimed(got.expect("component run")), untimed(expected.expect("native run")));
}
