//! The component in wasmtime: the host side of `wit/decoder.wit`.
//!
//! [`Runtime`] compiles the component once; every request instantiates it in a fresh
//! [`Store`] (so a trap poisons nothing), with a fuel budget and an epoch deadline, and calls
//! `decode.generate`. wasmtime runs it asynchronously: the guest runs on a fiber, and each
//! `engine` import is an `async` host function that sends its work to the engine thread of
//! [`crate::batcher`] and awaits its answer ([`Runtime::run`], what the server calls on its
//! tokio tasks). [`Runtime::generate`] is the same run for one request with an [`Engine`] of
//! its own (an engine thread just for it), driven to completion on the caller's thread.
//!
//! Both worlds run: the bindings are those of `decoder-with-reward` (a superset of
//! `decoder`'s imports), and [`Runtime::world`] says which one the component targets (read
//! from its imports). A request has one reward model ([`crate::batcher::Lease`]'s scorer):
//! it answers `engine.score` and the `reward` import alike.

use std::any::Any;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use specrej_core::backend::{check_fork, check_retain};
use specrej_core::{
    BackendError, Candidate, Decision, Decoder, Event, Finish, KvLayout, Method, Options, Outcome,
    Rejected, Response, Sampling, Scored, Scorer, Stats, block_on_ready,
};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Config, Store, StoreLimits, StoreLimitsBuilder, Trap};

use crate::batcher::{self, Batch, Lease, SharedDecoder};

/// The generated bindings (private; [`EventKinds`] is re-exported).
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        // A superset of world `decoder`: one linker instantiates components of either world.
        world: "decoder-with-reward",
        with: { "specrej:decoder/engine.batch": crate::runtime::HostBatch },
        // Every import may await the engine thread; resource-table lookups can fail, so
        // every import traps instead of panicking.
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use bindings::exports::specrej::decoder::decode;
use bindings::specrej::decoder::{engine as wit_engine, progress, reward as wit_reward, types};

pub use bindings::specrej::decoder::progress::EventKinds;

/// A decoder and a reward model behind one object-safe trait: what [`Runtime::generate`]
/// runs one request on. Futures are driven with [`block_on_ready`]: every backend here is
/// synchronous.
pub trait Engine: Send {
    /// [`Decoder::token_capacity`].
    fn token_capacity(&self) -> usize;
    /// [`Decoder::kv_bytes_per_token`].
    fn kv_bytes_per_token(&self) -> usize;
    /// [`Decoder::kv_layout`].
    fn kv_layout(&self) -> KvLayout;
    /// [`Decoder::max_sequence_len`].
    fn max_sequence_len(&self) -> usize;
    /// [`Decoder::prefill`], the batch type-erased.
    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<AnyBatch, BackendError>;
    /// [`Decoder::step`].
    fn step(&mut self, batch: &mut AnyBatch) -> Result<Vec<u32>, BackendError>;
    /// [`Decoder::retain`].
    fn retain(&mut self, batch: &mut AnyBatch, keep: &[usize]) -> Result<(), BackendError>;
    /// [`Decoder::fork`].
    fn fork(&mut self, batch: &mut AnyBatch, children: &[(usize, u32)])
    -> Result<(), BackendError>;
    /// [`Scorer::score`].
    fn score(&mut self, prompt: &[u32], responses: &[Response<'_>])
    -> Result<Scored, BackendError>;
    /// [`Scorer::release`].
    fn release(&mut self, rows: &[u32]);
    /// [`Scorer::fork`].
    fn forked(&mut self, children: &[(u32, u32)]);
}

/// A reward function the host supplies through the `reward` import of world
/// `decoder-with-reward`. Every [`Scorer`] is one (its futures driven with
/// [`block_on_ready`]).
pub trait HostReward: Send {
    /// [`Scorer::score`].
    fn score(&mut self, prompt: &[u32], responses: &[Response<'_>])
    -> Result<Scored, BackendError>;
    /// [`Scorer::release`].
    fn release(&mut self, rows: &[u32]);
    /// [`Scorer::fork`].
    fn forked(&mut self, children: &[(u32, u32)]);
}

impl<S: Scorer + Send> HostReward for S {
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        block_on_ready(Scorer::score(self, prompt, responses))
    }

    fn release(&mut self, rows: &[u32]) {
        Scorer::release(self, rows);
    }

    fn forked(&mut self, children: &[(u32, u32)]) {
        Scorer::fork(self, children);
    }
}

/// The WIT world a component targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum World {
    /// `decoder`: rewards through `engine.score`.
    Decoder,
    /// `decoder-with-reward`: rewards through the separate `reward` import.
    DecoderWithReward,
}

impl World {
    /// The world's name in `wit/decoder.wit`.
    pub fn name(self) -> &'static str {
        match self {
            World::Decoder => "decoder",
            World::DecoderWithReward => "decoder-with-reward",
        }
    }
}

/// A decoder's batch, type-erased.
pub type AnyBatch = Box<dyn Any + Send>;

/// A [`Decoder`] and a [`Scorer`] as one [`Engine`].
#[derive(Debug)]
pub struct Pair<D, S> {
    /// The language model.
    pub decoder: D,
    /// The reward model.
    pub scorer: S,
}

impl<D, S> Pair<D, S> {
    /// Both halves.
    pub fn new(decoder: D, scorer: S) -> Self {
        Self { decoder, scorer }
    }
}

fn downcast<B: 'static>(batch: &mut AnyBatch) -> Result<&mut B, BackendError> {
    batch.downcast_mut::<B>().ok_or_else(|| BackendError::device("a batch of another engine"))
}

impl<D, S> Engine for Pair<D, S>
where
    D: Decoder + Send,
    D::Batch: Send + 'static,
    S: Scorer + Send,
{
    fn token_capacity(&self) -> usize {
        self.decoder.token_capacity()
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.decoder.kv_bytes_per_token()
    }

    fn kv_layout(&self) -> KvLayout {
        self.decoder.kv_layout()
    }

    fn max_sequence_len(&self) -> usize {
        self.decoder.max_sequence_len()
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<AnyBatch, BackendError> {
        Ok(Box::new(self.decoder.prefill(prompt, rows, sampling)?))
    }

    fn step(&mut self, batch: &mut AnyBatch) -> Result<Vec<u32>, BackendError> {
        let batch = downcast::<D::Batch>(batch)?;
        block_on_ready(self.decoder.step(batch))
    }

    fn retain(&mut self, batch: &mut AnyBatch, keep: &[usize]) -> Result<(), BackendError> {
        let batch = downcast::<D::Batch>(batch)?;
        self.decoder.retain(batch, keep)
    }

    fn fork(
        &mut self,
        batch: &mut AnyBatch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        let batch = downcast::<D::Batch>(batch)?;
        self.decoder.fork(batch, children)
    }

    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        block_on_ready(self.scorer.score(prompt, responses))
    }

    fn release(&mut self, rows: &[u32]) {
        self.scorer.release(rows);
    }

    fn forked(&mut self, children: &[(u32, u32)]) {
        self.scorer.fork(children);
    }
}

/// The host value behind the component's `batch` resource.
#[derive(Debug)]
pub struct HostBatch {
    /// `None` only while it is away on the engine thread.
    batch: Option<Batch>,
}

impl HostBatch {
    /// Its live rows (to check the guest's `retain` and `fork` indices before the backend
    /// sees them); 0 while it is away, when no call can reach it anyway.
    fn rows(&self) -> usize {
        self.batch.as_ref().map_or(0, Batch::rows)
    }
}

/// Limits on one `decode.generate` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) the guest may spend.
    pub fuel: u64,
    /// Wall-clock limit of the whole call, host calls included (checked whenever the
    /// guest runs, at [`EPOCH_TICK`] granularity).
    pub timeout: Duration,
    /// Largest linear memory the guest may grow to, in bytes.
    pub memory_bytes: usize,
}

impl Limits {
    /// Fuel for a request of `n` rows and `max_new_tokens`: a base plus a generous
    /// allowance per generated token (measured: 800-1,400 fuel per generated token with
    /// every event reported, on the fake backend; `tests/trajectory.rs` prints it).
    pub fn for_request(n: usize, max_new_tokens: usize, timeout: Duration) -> Self {
        let tokens = (n as u64).saturating_mul(max_new_tokens as u64 + 1);
        Self {
            fuel: FUEL_BASE.saturating_add(tokens.saturating_mul(FUEL_PER_TOKEN)),
            timeout,
            memory_bytes: 256 << 20,
        }
    }
}

/// Fuel every call gets, whatever its size.
pub const FUEL_BASE: u64 = 50_000_000;
/// Fuel per row and generated token (over 100x what the scheduler spends).
pub const FUEL_PER_TOKEN: u64 = 200_000;
/// How often the epoch advances (the granularity of [`Limits::timeout`]).
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Why a run failed.
#[derive(Debug)]
pub enum RunError {
    /// The request is wrong (the component's `invalid-request`); the message names what.
    InvalidRequest(String),
    /// The engine or the reward model failed.
    Engine(BackendError),
    /// The component used up its fuel.
    OutOfFuel,
    /// The call ran past [`Limits::timeout`].
    Timeout,
    /// The observer cancelled the run.
    Cancelled,
    /// A host reward was given to a component of world `decoder` (no `reward` import).
    NoRewardImport,
    /// Any other trap or host error, with wasmtime's message.
    Trap(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::InvalidRequest(message) => write!(f, "invalid request: {message}"),
            RunError::Engine(error) => write!(f, "engine error: {error}"),
            RunError::OutOfFuel => f.write_str("the decoder component used up its fuel"),
            RunError::Timeout => f.write_str("the request ran past its time limit"),
            RunError::Cancelled => f.write_str("the request was cancelled"),
            RunError::NoRewardImport => f.write_str(
                "the component targets world decoder, which has no reward import: build world \
                 decoder-with-reward (cargo xtask component-with-reward) to supply a host reward",
            ),
            RunError::Trap(message) => write!(f, "the decoder component failed: {message}"),
        }
    }
}

impl std::error::Error for RunError {}

/// What [`Runtime::generate`] gives back.
#[derive(Debug)]
pub struct Run {
    /// The outcome, or why there is none.
    pub result: Result<Outcome, RunError>,
    /// Fuel the guest spent.
    pub fuel_used: u64,
}

/// What the observer of a run sees: the core's events, rebuilt on the host side. Returning
/// `false` cancels the run (the `on-event` import traps; e.g. a streaming client left).
pub type Observer = Box<dyn FnMut(&Event<'_>) -> bool + Send>;

/// The store's data: the request's lease on the engine, the batches the guest holds, the
/// observer, and the time spent in each kind of import (the guest has no clock).
struct State {
    engine: Lease,
    table: ResourceTable,
    observer: Observer,
    limits: StoreLimits,
    times: Times,
}

/// Seconds spent in the imports, by kind (`Stats`' time breakdown), waiting for the engine
/// thread included.
#[derive(Clone, Copy, Debug, Default)]
struct Times {
    prefill: f64,
    step: f64,
    retain: f64,
    reward: f64,
}

/// Adds the time since `start` to `slot`.
fn add_time(slot: &mut f64, start: Instant) {
    *slot += start.elapsed().as_secs_f64();
}

/// What [`Runtime::run`] gives back.
#[derive(Debug)]
pub struct LeaseRun {
    /// The outcome, or why there is none.
    pub result: Result<Outcome, RunError>,
    /// The lease, for its reward model.
    pub lease: Lease,
    /// Fuel the guest spent.
    pub fuel_used: u64,
}

/// A compiled component, ready to run requests.
pub struct Runtime {
    engine: wasmtime::Engine,
    pre: bindings::DecoderWithRewardPre<State>,
    world: World,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("world", &self.world).finish_non_exhaustive()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// An [`Engine`] shared by the engine thread (as the decoder) and the request's lease (as its
/// reward model) of one [`Runtime::generate`] call: both run on the engine thread, so the
/// lock is never contended.
type SharedEngine = Arc<Mutex<Box<dyn Engine>>>;

fn lock(engine: &SharedEngine) -> std::sync::MutexGuard<'_, Box<dyn Engine>> {
    engine.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The decoder half of a [`SharedEngine`].
struct EngineDecoder(SharedEngine);

impl SharedDecoder for EngineDecoder {
    fn token_capacity(&self) -> usize {
        lock(&self.0).token_capacity()
    }

    fn kv_bytes_per_token(&self) -> usize {
        lock(&self.0).kv_bytes_per_token()
    }

    fn kv_layout(&self) -> KvLayout {
        lock(&self.0).kv_layout()
    }

    fn max_sequence_len(&self) -> usize {
        lock(&self.0).max_sequence_len()
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<AnyBatch, BackendError> {
        lock(&self.0).prefill(prompt, rows, sampling)
    }

    fn step(&mut self, batches: &mut [&mut AnyBatch]) -> Vec<Result<Vec<u32>, BackendError>> {
        let mut engine = lock(&self.0);
        batches.iter_mut().map(|batch| engine.step(batch)).collect()
    }

    fn retain(&mut self, batch: &mut AnyBatch, keep: &[usize]) -> Result<(), BackendError> {
        lock(&self.0).retain(batch, keep)
    }

    fn fork(
        &mut self,
        batch: &mut AnyBatch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        lock(&self.0).fork(batch, children)
    }

    fn kv_bytes_held(&self) -> Option<u64> {
        None
    }

    fn merges(&self) -> bool {
        false
    }
}

/// The reward half of a [`SharedEngine`].
struct EngineScorer(SharedEngine);

impl HostReward for EngineScorer {
    fn score(
        &mut self,
        prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, BackendError> {
        lock(&self.0).score(prompt, responses)
    }

    fn release(&mut self, rows: &[u32]) {
        lock(&self.0).release(rows);
    }

    fn forked(&mut self, children: &[(u32, u32)]) {
        lock(&self.0).forked(children);
    }
}

impl Runtime {
    /// Compiles the component file at `path`.
    pub fn from_file(path: &Path) -> wasmtime::Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| wasmtime::format_err!("reading the component {}: {e}", path.display()))?;
        Self::from_bytes(&bytes)
    }

    /// Compiles a component from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> wasmtime::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true).consume_fuel(true).epoch_interruption(true);
        let engine = wasmtime::Engine::new(&config)?;
        let component = Component::from_binary(&engine, bytes)?;
        let imports_reward = component
            .component_type()
            .imports(&engine)
            .any(|(name, _)| name.starts_with("specrej:decoder/reward"));
        let world = if imports_reward { World::DecoderWithReward } else { World::Decoder };
        let mut linker = Linker::<State>::new(&engine);
        bindings::DecoderWithReward::add_to_linker::<State, HasSelf<State>>(
            &mut linker,
            |state| state,
        )?;
        let pre = bindings::DecoderWithRewardPre::new(linker.instantiate_pre(&component)?)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&ticker_stop);
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("specrej-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| wasmtime::format_err!("starting the epoch thread: {e}"))?;
        Ok(Self { engine, pre, world, ticker_stop })
    }

    /// The world the component targets (from its imports).
    pub fn world(&self) -> World {
        self.world
    }

    /// Runs `decode.generate` once: `specrej_core::generate` inside the component over
    /// `engine`, reporting the event kinds in `events` to `observer`.
    /// `stats.wall_seconds` is the host's measure (the guest has no clock).
    pub fn generate(
        &self,
        engine: Box<dyn Engine>,
        prompt: &[u32],
        options: &Options,
        events: EventKinds,
        observer: Observer,
        limits: Limits,
    ) -> Run {
        self.generate_with_reward(engine, None, prompt, options, events, observer, limits)
    }

    /// [`Runtime::generate`] with the host's own reward function behind the `reward` import
    /// (world `decoder-with-reward`; `engine`'s scorer is then not called). With `None`, the
    /// component is scored by `engine`'s scorer; with `Some`, a `decoder` component fails
    /// with [`RunError::NoRewardImport`].
    ///
    /// The request gets an engine thread of its own over `engine` (the same batcher the
    /// server uses, with one request in it), and the call is driven on this thread.
    #[allow(
        clippy::too_many_arguments,
        reason = "generate's arguments plus the reward; a struct would only rename them"
    )]
    pub fn generate_with_reward(
        &self,
        engine: Box<dyn Engine>,
        reward: Option<Box<dyn HostReward>>,
        prompt: &[u32],
        options: &Options,
        events: EventKinds,
        observer: Observer,
        limits: Limits,
    ) -> Run {
        if reward.is_some() && self.world == World::Decoder {
            return Run { result: Err(RunError::NoRewardImport), fuel_used: 0 };
        }
        let capacity = engine.token_capacity();
        let shared: SharedEngine = Arc::new(Mutex::new(engine));
        let scorer: Box<dyn HostReward> = match reward {
            Some(reward) => reward,
            None => Box::new(EngineScorer(Arc::clone(&shared))),
        };
        let (handle, thread) = match batcher::spawn(Box::new(EngineDecoder(shared))) {
            Ok(started) => started,
            Err(e) => {
                return Run {
                    result: Err(RunError::Trap(format!("starting the engine thread: {e}"))),
                    fuel_used: 0,
                };
            }
        };
        let lease = handle.lease(capacity, scorer, true, None);
        drop(handle);
        let run = pollster::block_on(self.run(lease, prompt, options, events, observer, limits));
        // The last lease gone, the engine thread ends.
        drop(run.lease);
        let _ = thread.join();
        Run { result: run.result, fuel_used: run.fuel_used }
    }

    /// Runs `decode.generate` once on `lease` (a request's share of an engine thread),
    /// reporting the event kinds in `events` to `observer`. The future is `Send`: the server
    /// runs it on its tokio tasks, and dropping it (a client gone) drops the request's
    /// batches, whose K/V goes back to the engine's pool. `stats.wall_seconds` is the host's
    /// measure (the guest has no clock).
    pub async fn run(
        &self,
        lease: Lease,
        prompt: &[u32],
        options: &Options,
        events: EventKinds,
        observer: Observer,
        limits: Limits,
    ) -> LeaseRun {
        let start = Instant::now();
        let state = State {
            engine: lease,
            table: ResourceTable::new(),
            observer,
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .instances(16)
                .build(),
            times: Times::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        let result = self.call(&mut store, prompt, options, events, limits).await;
        let fuel_used = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let State { engine: lease, times, .. } = store.into_data();
        let result = result.map(|mut outcome| {
            let stats = &mut outcome.stats;
            stats.wall_seconds = start.elapsed().as_secs_f64();
            stats.prefill_seconds = times.prefill;
            stats.step_seconds = times.step;
            stats.retain_seconds = times.retain;
            stats.reward_seconds = times.reward;
            outcome
        });
        LeaseRun { result, lease, fuel_used }
    }

    async fn call(
        &self,
        store: &mut Store<State>,
        prompt: &[u32],
        options: &Options,
        events: EventKinds,
        limits: Limits,
    ) -> Result<Outcome, RunError> {
        let trap = |error: wasmtime::Error| match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => RunError::OutOfFuel,
            Some(Trap::Interrupt) => RunError::Timeout,
            _ if error.downcast_ref::<Cancelled>().is_some() => RunError::Cancelled,
            _ => RunError::Trap(format!("{error:?}")),
        };
        store.set_fuel(limits.fuel).map_err(trap)?;
        let ticks = (limits.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        let instance = self.pre.instantiate_async(&mut *store).await.map_err(trap)?;
        let options = to_wit_options(options, events);
        let answer = instance
            .specrej_decoder_decode()
            .call_generate(&mut *store, prompt, &options)
            .await
            .map_err(trap)?;
        match answer {
            Ok(outcome) => Ok(from_wit_outcome(outcome)),
            Err(decode::DecodeError::InvalidRequest(message)) => {
                Err(RunError::InvalidRequest(message))
            }
            Err(decode::DecodeError::Engine(error)) => Err(RunError::Engine(from_wit_error(error))),
        }
    }
}

// ---- the imports ----

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

impl types::Host for State {}

fn responses(responses: Vec<types::Response>) -> Vec<(u32, Vec<u32>)> {
    responses.into_iter().map(|r| (r.row, r.tokens)).collect()
}

fn scored(result: Result<Scored, BackendError>) -> Result<types::Scored, types::EngineError> {
    result
        .map(|s| types::Scored { rewards: s.rewards, tokens_processed: s.tokens_processed })
        .map_err(to_wit_error)
}

impl State {
    async fn score(
        &mut self,
        prompt: Vec<u32>,
        responses: Vec<types::Response>,
    ) -> Result<types::Scored, types::EngineError> {
        let start = Instant::now();
        let result = self.engine.score(prompt, self::responses(responses)).await;
        add_time(&mut self.times.reward, start);
        scored(result)
    }
}

impl wit_engine::HostBatch for State {
    async fn step(
        &mut self,
        batch: Resource<HostBatch>,
    ) -> wasmtime::Result<Result<Vec<u32>, types::EngineError>> {
        let start = Instant::now();
        let batch = self.table.get_mut(&batch)?;
        let result = self.engine.step(&mut batch.batch).await;
        add_time(&mut self.times.step, start);
        Ok(result.map_err(to_wit_error))
    }

    async fn retain(
        &mut self,
        batch: Resource<HostBatch>,
        keep: Vec<u32>,
    ) -> wasmtime::Result<Result<(), types::EngineError>> {
        let batch = self.table.get_mut(&batch)?;
        let keep: Vec<usize> = keep.into_iter().map(|i| i as usize).collect();
        // The backend's contract is checked here too, whatever the backend does.
        if let Err(error) = check_retain(&keep, batch.rows()) {
            return Ok(Err(to_wit_error(error)));
        }
        let start = Instant::now();
        let result = self.engine.retain(&mut batch.batch, keep).await;
        add_time(&mut self.times.retain, start);
        Ok(result.map_err(to_wit_error))
    }

    async fn fork(
        &mut self,
        batch: Resource<HostBatch>,
        children: Vec<(u32, u32)>,
    ) -> wasmtime::Result<Result<(), types::EngineError>> {
        let batch = self.table.get_mut(&batch)?;
        let children: Vec<(usize, u32)> =
            children.into_iter().map(|(parent, id)| (parent as usize, id)).collect();
        if let Err(error) = check_fork(&children, batch.rows()) {
            return Ok(Err(to_wit_error(error)));
        }
        let start = Instant::now();
        let result = self.engine.fork(&mut batch.batch, children).await;
        add_time(&mut self.times.retain, start);
        Ok(result.map_err(to_wit_error))
    }

    async fn drop(&mut self, batch: Resource<HostBatch>) -> wasmtime::Result<()> {
        // Its K/V goes back to the engine's pool (blocks are counted, not owned, by it).
        self.table.delete(batch)?;
        Ok(())
    }
}

impl wit_engine::Host for State {
    async fn token_capacity(&mut self) -> wasmtime::Result<u64> {
        Ok(self.engine.token_capacity() as u64)
    }

    async fn kv_bytes_per_token(&mut self) -> wasmtime::Result<u64> {
        Ok(self.engine.info().kv_bytes_per_token as u64)
    }

    async fn layout(&mut self) -> wasmtime::Result<types::KvLayout> {
        let layout = self.engine.info().kv_layout;
        Ok(types::KvLayout {
            shared_prompt: layout.shared_prompt,
            block: u32::try_from(layout.block).unwrap_or(u32::MAX),
        })
    }

    async fn max_sequence_len(&mut self) -> wasmtime::Result<u64> {
        Ok(self.engine.info().max_sequence_len as u64)
    }

    async fn prefill(
        &mut self,
        prompt: Vec<u32>,
        rows: types::RowRange,
        sampling: types::Sampling,
    ) -> wasmtime::Result<Result<Resource<HostBatch>, types::EngineError>> {
        // The backend's contract (non-empty prompt and rows) is checked here, not panicked on.
        if prompt.is_empty() || rows.start >= rows.end {
            return Ok(Err(types::EngineError::Device(
                "prefill: empty prompt or row range".into(),
            )));
        }
        let sampling = Sampling {
            seed: sampling.seed,
            temperature: sampling.temperature,
            top_k: sampling.top_k as usize,
            top_p: sampling.top_p,
        };
        let start = Instant::now();
        let result = self.engine.prefill(prompt, rows.start..rows.end, sampling).await;
        add_time(&mut self.times.prefill, start);
        match result {
            Ok(batch) => Ok(Ok(self.table.push(HostBatch { batch: Some(batch) })?)),
            Err(error) => Ok(Err(to_wit_error(error))),
        }
    }

    async fn score(
        &mut self,
        prompt: Vec<u32>,
        responses: Vec<types::Response>,
    ) -> wasmtime::Result<Result<types::Scored, types::EngineError>> {
        Ok(State::score(self, prompt, responses).await)
    }

    async fn release(&mut self, rows: Vec<u32>) -> wasmtime::Result<()> {
        self.engine.release(&rows);
        Ok(())
    }

    async fn forked(&mut self, children: Vec<(u32, u32)>) -> wasmtime::Result<()> {
        self.engine.forked(&children);
        Ok(())
    }
}

/// The request's one reward model answers the `reward` import as it answers `engine.score`.
impl wit_reward::Host for State {
    async fn score(
        &mut self,
        prompt: Vec<u32>,
        responses: Vec<types::Response>,
    ) -> wasmtime::Result<Result<types::Scored, types::EngineError>> {
        Ok(State::score(self, prompt, responses).await)
    }

    async fn release(&mut self, rows: Vec<u32>) -> wasmtime::Result<()> {
        self.engine.release(&rows);
        Ok(())
    }

    async fn forked(&mut self, children: Vec<(u32, u32)>) -> wasmtime::Result<()> {
        self.engine.forked(&children);
        Ok(())
    }
}

/// The trap `on-event` raises when the observer cancels the run.
#[derive(Debug)]
struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled by the host")
    }
}

impl std::error::Error for Cancelled {}

impl progress::Host for State {
    async fn on_event(&mut self, event: progress::Event) -> wasmtime::Result<()> {
        let observer = &mut self.observer;
        let go_on = match event {
            progress::Event::Prefilled((first_row, rows)) => {
                observer(&Event::Prefilled { first_row, rows: rows as usize })
            }
            progress::Event::Step(step) => observer(&Event::Step {
                position: step.position as usize,
                rows: &step.rows,
                tokens: &step.tokens,
            }),
            progress::Event::Decision(d) => {
                let decision = from_wit_decision(&d.decision);
                observer(&Event::Decision {
                    decision: &decision,
                    rows: &d.rows,
                    scores: &d.scores,
                    kept: &d.kept,
                })
            }
            progress::Event::Finished((row, finish)) => {
                observer(&Event::Finished { row, finish: from_wit_finish(finish) })
            }
            progress::Event::Forked(children) => observer(&Event::Forked { children: &children }),
            progress::Event::Scored(candidates) => {
                let candidates: Vec<Candidate> =
                    candidates.into_iter().map(from_wit_candidate).collect();
                observer(&Event::Scored { candidates: &candidates })
            }
        };
        if go_on { Ok(()) } else { Err(wasmtime::Error::new(Cancelled)) }
    }
}

// ---- conversions ----

fn to_wit_options(options: &Options, events: EventKinds) -> decode::Options {
    let clamp = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
    let s = &options.sampling;
    decode::Options {
        method: match options.method {
            Method::BestOfN => decode::Method::BestOfN,
            Method::SpeculativeRejection { alpha } => decode::Method::SpeculativeRejection(alpha),
        },
        n: clamp(options.n),
        max_new_tokens: clamp(options.max_new_tokens),
        min_new_tokens: clamp(options.min_new_tokens),
        eos: options.eos.clone(),
        sampling: types::Sampling {
            seed: s.seed,
            temperature: s.temperature,
            top_k: clamp(s.top_k),
            top_p: s.top_p,
        },
        rules: decode::Rules {
            paper_exact: options.rules.paper_exact,
            probe_lag: clamp(options.rules.probe_lag),
            gate_tau: options.rules.gate_tau,
            adaptive_snr: options.rules.adaptive_snr,
            refill: options.rules.refill,
        },
        events,
    }
}

fn from_wit_finish(finish: types::Finish) -> Finish {
    match finish {
        types::Finish::Eos => Finish::Eos,
        types::Finish::Length => Finish::Length,
        types::Finish::Capacity => Finish::Capacity,
    }
}

fn from_wit_candidate(c: types::Candidate) -> Candidate {
    Candidate { row: c.row, tokens: c.tokens, score: c.score, finish: from_wit_finish(c.finish) }
}

fn from_wit_decision(d: &types::Decision) -> Decision {
    Decision {
        position: d.position as usize,
        live_rows: d.live_rows as usize,
        kept_rows: d.kept_rows as usize,
        min: d.min,
        median: d.median,
        max: d.max,
        threshold: d.threshold,
        early: d.early,
        tau: d.tau,
        alpha: d.alpha,
        forked: d.forked as usize,
    }
}

fn from_wit_outcome(o: decode::Outcome) -> Outcome {
    let s = o.stats;
    Outcome {
        candidates: o.candidates.into_iter().map(from_wit_candidate).collect(),
        rejected: o
            .rejected
            .into_iter()
            .map(|r| Rejected { row: r.row, tokens: r.tokens, score: r.score })
            .collect(),
        trace: o.trace.iter().map(from_wit_decision).collect(),
        stats: Stats {
            prompt_tokens: s.prompt_tokens as usize,
            prefill_tokens: s.prefill_tokens as usize,
            tokens_generated: s.tokens_generated as usize,
            steps: s.steps as usize,
            initial_rows: s.initial_rows as usize,
            batches: s.batches as usize,
            reward_calls: s.reward_calls as usize,
            reward_tokens: s.reward_tokens,
            token_capacity: s.token_capacity as usize,
            peak_kv_bytes: s.peak_kv_bytes,
            wall_seconds: s.wall_seconds,
            // The host's measures (see `Runtime::generate_with_reward`).
            ..Stats::default()
        },
    }
}
