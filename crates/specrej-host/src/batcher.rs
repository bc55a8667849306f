//! The shared batcher: continuous batching across requests.
//!
//! One thread, `specrej-engine`, owns the decoder: the weights and every batch's K/V come
//! from it (on the CPU, from its one block pool). Each request keeps its own scheduler (the
//! component in its own `Store`); its `engine` imports become [`Job`]s sent here, each
//! awaited by the request's task on a oneshot channel. The thread runs the jobs that are not
//! steps in arrival order, then the **step round**: the `batch.step` calls of every request
//! waiting for one, merged into one forward pass ([`SharedDecoder::step`]). A round starts
//! once every live batch has its step call in, or [`GATHER`] after the first one came, so a
//! request busy with a decision does not hold the others up.
//!
//! Rows of different requests sit at different positions; a row's tokens do not depend on
//! the other rows in the pass (the batch-invariance rule), so an answer does not depend on
//! what else is being served.
//!
//! A request whose task is dropped (its client left) drops its oneshot receivers: the
//! batch it had sent comes back to nobody and is dropped here, its blocks returned to the
//! pool within the step. Admission is by KV memory: [`Admission`] hands out the decoder's
//! token capacity in grants, one per request, each request's scheduler planning within its
//! own; a request waits until its grant is free. Once a request's rows can only become
//! fewer, each `retain` (a Speculative Rejection decision) gives back the part of its grant
//! they can no longer use, at once, to the requests waiting ([`GrantPlan`]); the rest comes
//! back when it ends.

use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use specrej_candle::{CandleBatch, CandleDecoder};
use specrej_core::{BackendError, Decoder, KvLayout, Response, Sampling, Scored};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::runtime::{AnyBatch, HostReward};

/// How long the first step call of a round waits for the other live batches' calls.
pub const GATHER: Duration = Duration::from_millis(2);

/// The decoder the batcher owns: a [`Decoder`] that can step several batches at once.
pub trait SharedDecoder: Send {
    /// Cached tokens (in [`SharedDecoder::kv_layout`]) the whole K/V budget holds.
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
    /// One [`Decoder::step`] of each batch, in one pass where the backend can merge them.
    fn step(&mut self, batches: &mut [&mut AnyBatch]) -> Vec<Result<Vec<u32>, BackendError>>;
    /// [`Decoder::retain`].
    fn retain(&mut self, batch: &mut AnyBatch, keep: &[usize]) -> Result<(), BackendError>;
    /// [`Decoder::fork`].
    fn fork(&mut self, batch: &mut AnyBatch, children: &[(usize, u32)])
    -> Result<(), BackendError>;
    /// Bytes of K/V held right now, where the backend counts them.
    fn kv_bytes_held(&self) -> Option<u64>;
    /// Whether [`SharedDecoder::step`] merges batches into one pass.
    fn merges(&self) -> bool;
}

fn downcast<B: 'static>(batch: &mut AnyBatch) -> Result<&mut B, BackendError> {
    batch.downcast_mut::<B>().ok_or_else(|| BackendError::device("a batch of another engine"))
}

/// candle: on the CPU every batch's rows run in one pass ([`CandleDecoder::step_batches`]).
impl SharedDecoder for CandleDecoder {
    fn token_capacity(&self) -> usize {
        Decoder::token_capacity(self)
    }

    fn kv_bytes_per_token(&self) -> usize {
        Decoder::kv_bytes_per_token(self)
    }

    fn kv_layout(&self) -> KvLayout {
        Decoder::kv_layout(self)
    }

    fn max_sequence_len(&self) -> usize {
        Decoder::max_sequence_len(self)
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<AnyBatch, BackendError> {
        Ok(Box::new(Decoder::prefill(self, prompt, rows, sampling)?))
    }

    fn step(&mut self, batches: &mut [&mut AnyBatch]) -> Vec<Result<Vec<u32>, BackendError>> {
        let mut typed: Vec<&mut CandleBatch> = Vec::with_capacity(batches.len());
        for batch in batches.iter_mut() {
            match downcast::<CandleBatch>(batch) {
                Ok(batch) => typed.push(batch),
                Err(error) => return batches.iter().map(|_| Err(error.clone())).collect(),
            }
        }
        self.step_batches(&mut typed)
    }

    fn retain(&mut self, batch: &mut AnyBatch, keep: &[usize]) -> Result<(), BackendError> {
        Decoder::retain(self, downcast::<CandleBatch>(batch)?, keep)
    }

    fn fork(
        &mut self,
        batch: &mut AnyBatch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        Decoder::fork(self, downcast::<CandleBatch>(batch)?, children)
    }

    fn kv_bytes_held(&self) -> Option<u64> {
        self.model().device().is_cpu().then(|| self.kv_bytes_held().0)
    }

    fn merges(&self) -> bool {
        self.model().device().is_cpu()
    }
}

/// Any other [`Decoder`] (a dense-cache GPU backend, the fake): a round steps its batches
/// one after another, each future driven to completion on the engine thread.
#[derive(Debug)]
pub struct EachAlone<D>(pub D);

impl<D> SharedDecoder for EachAlone<D>
where
    D: Decoder + Send,
    D::Batch: Send + 'static,
{
    fn token_capacity(&self) -> usize {
        self.0.token_capacity()
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.0.kv_bytes_per_token()
    }

    fn kv_layout(&self) -> KvLayout {
        self.0.kv_layout()
    }

    fn max_sequence_len(&self) -> usize {
        self.0.max_sequence_len()
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        sampling: &Sampling,
    ) -> Result<AnyBatch, BackendError> {
        Ok(Box::new(self.0.prefill(prompt, rows, sampling)?))
    }

    fn step(&mut self, batches: &mut [&mut AnyBatch]) -> Vec<Result<Vec<u32>, BackendError>> {
        batches
            .iter_mut()
            .map(|batch| {
                let batch = downcast::<D::Batch>(batch)?;
                pollster::block_on(self.0.step(batch))
            })
            .collect()
    }

    fn retain(&mut self, batch: &mut AnyBatch, keep: &[usize]) -> Result<(), BackendError> {
        self.0.retain(downcast::<D::Batch>(batch)?, keep)
    }

    fn fork(
        &mut self,
        batch: &mut AnyBatch,
        children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        self.0.fork(downcast::<D::Batch>(batch)?, children)
    }

    fn kv_bytes_held(&self) -> Option<u64> {
        None
    }

    fn merges(&self) -> bool {
        false
    }
}

/// Counters the batcher keeps (read by `/metrics`).
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Batches alive (held by some request).
    pub batches: AtomicUsize,
    /// Rows alive over all batches.
    pub rows: AtomicUsize,
    /// Step rounds run.
    pub rounds: AtomicU64,
    /// Batch steps run (a round of k requests counts k).
    pub batch_steps: AtomicU64,
    /// Tokens sampled.
    pub tokens: AtomicU64,
    /// The most batches one round has merged.
    pub widest_round: AtomicUsize,
    /// Bytes of K/V held now (0 where the backend does not count them).
    pub kv_bytes_held: AtomicU64,
    /// Nanoseconds the engine thread has spent on each kind of job, by [`JOB_KINDS`].
    pub busy_nanos: [AtomicU64; 4],
}

/// The kinds of engine work [`EngineCounters::busy_nanos`] counts, in its order.
pub const JOB_KINDS: [&str; 4] = ["prefill", "step", "score", "retain_fork"];

impl EngineCounters {
    fn add_busy(&self, kind: usize, since: Instant) {
        self.busy_nanos[kind].fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// A batch on its way between a request and the engine thread, counted as alive (with its
/// rows) until it is dropped, wherever that happens.
pub struct Batch {
    inner: AnyBatch,
    alive: Alive,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("rows", &self.alive.rows).finish_non_exhaustive()
    }
}

impl Batch {
    /// Live rows.
    pub fn rows(&self) -> usize {
        self.alive.rows
    }
}

/// Counts a batch and its rows as alive in [`EngineCounters`] while it exists; its drop
/// wakes the engine thread, whose round may have been waiting for it.
struct Alive {
    counters: Arc<EngineCounters>,
    rows: usize,
    wake: mpsc::Sender<Job>,
}

impl Alive {
    fn set_rows(&mut self, rows: usize) {
        self.counters.rows.fetch_add(rows, Ordering::SeqCst);
        self.counters.rows.fetch_sub(self.rows, Ordering::SeqCst);
        self.rows = rows;
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.counters.rows.fetch_sub(self.rows, Ordering::SeqCst);
        self.counters.batches.fetch_sub(1, Ordering::SeqCst);
        let _ = self.wake.send(Job::Wake);
    }
}

/// What a request's engine import becomes on the engine thread.
enum Job {
    /// `wake`: how the batch, once dropped, wakes the engine thread.
    Prefill {
        prompt: Vec<u32>,
        rows: Range<u32>,
        sampling: Sampling,
        wake: mpsc::Sender<Job>,
        reply: oneshot::Sender<Result<Batch, BackendError>>,
    },
    /// A batch was dropped: a round waiting for it may start.
    Wake,
    Step {
        batch: Batch,
        reply: oneshot::Sender<(Batch, Result<Vec<u32>, BackendError>)>,
    },
    Retain {
        batch: Batch,
        keep: Vec<usize>,
        reply: oneshot::Sender<(Batch, Result<(), BackendError>)>,
    },
    Fork {
        batch: Batch,
        children: Vec<(usize, u32)>,
        reply: oneshot::Sender<(Batch, Result<(), BackendError>)>,
    },
    Score {
        scorer: Scorer,
        prompt: Vec<u32>,
        responses: Vec<(u32, Vec<u32>)>,
        reply: oneshot::Sender<(Scorer, Result<Scored, BackendError>)>,
    },
}

/// A request's reward model, sent to the engine thread to score.
pub type Scorer = Box<dyn HostReward + Send>;

/// The engine thread's handle: clone it per request ([`EngineHandle::lease`]).
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    info: EngineInfo,
    counters: Arc<EngineCounters>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("info", &self.info).finish_non_exhaustive()
    }
}

/// What the decoder says about itself, fixed for its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    /// The whole budget, in cached tokens.
    pub token_capacity: usize,
    /// Bytes of K/V per cached token.
    pub kv_bytes_per_token: usize,
    /// How batches hold their K/V.
    pub kv_layout: KvLayout,
    /// The model's context length.
    pub max_sequence_len: usize,
    /// Whether a round is one merged pass.
    pub merges: bool,
}

/// Starts the engine thread over `decoder`; it ends when the last handle (and every
/// [`Lease`] made from it) is dropped.
pub fn spawn(
    decoder: Box<dyn SharedDecoder>,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    spawn_gathering(decoder, GATHER)
}

/// [`spawn`] with rounds that wait up to `gather` for the live batches' step calls.
fn spawn_gathering(
    decoder: Box<dyn SharedDecoder>,
    gather: Duration,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let info = EngineInfo {
        token_capacity: decoder.token_capacity(),
        kv_bytes_per_token: decoder.kv_bytes_per_token(),
        kv_layout: decoder.kv_layout(),
        max_sequence_len: decoder.max_sequence_len(),
        merges: decoder.merges(),
    };
    let counters = Arc::new(EngineCounters::default());
    let (jobs, queue) = mpsc::channel();
    let thread_counters = Arc::clone(&counters);
    let thread = std::thread::Builder::new().name("specrej-engine".into()).spawn(move || {
        Worker {
            decoder,
            counters: thread_counters,
            others: VecDeque::new(),
            steps: Vec::new(),
            first_wait: None,
            gather,
        }
        .run(&queue);
    })?;
    Ok((EngineHandle { jobs, info, counters }, thread))
}

impl EngineHandle {
    /// The decoder's description.
    pub fn info(&self) -> EngineInfo {
        self.info
    }

    /// The batcher's counters.
    pub fn counters(&self) -> &Arc<EngineCounters> {
        &self.counters
    }

    /// A request's view of the engine: `capacity` cached tokens (its grant) and its reward
    /// model `scorer`, scored on the engine thread (`on_engine`) or on a blocking thread of
    /// its own (a remote scorer, which waits on the network, not on the device).
    pub fn lease(
        &self,
        capacity: usize,
        scorer: Scorer,
        on_engine: bool,
        grant: Option<OwnedSemaphorePermit>,
    ) -> Lease {
        Lease {
            handle: self.clone(),
            capacity,
            scorer: Some(scorer),
            on_engine,
            grant,
            plan: None,
            prefilled: 0,
        }
    }

    fn send(&self, job: Job) -> Result<(), BackendError> {
        self.jobs.send(job).map_err(|_| BackendError::device("the engine thread has stopped"))
    }
}

/// One request's share of the engine: its K/V grant and its reward model.
pub struct Lease {
    handle: EngineHandle,
    capacity: usize,
    /// `None` only while it is away being scored.
    scorer: Option<Scorer>,
    on_engine: bool,
    /// The part of the KV budget this request still holds (see [`GrantPlan`]).
    grant: Option<OwnedSemaphorePermit>,
    plan: Option<GrantPlan>,
    /// Rows prefilled so far, over all batches.
    prefilled: usize,
}

/// What a request can still need, so that its grant can shrink to it.
///
/// Once every one of a request's `rows` has been prefilled, and it cannot fork (no refill),
/// its live rows can only become fewer: the most K/V it can ever hold again is its live rows
/// at `max_new_tokens` each. After each `retain` (a Speculative Rejection decision, or
/// finished rows dropped) the grant gives back whatever is above that, at once, to the
/// requests waiting for theirs. The capacity the request's scheduler sees does not change,
/// so its decisions, and its answer, do not depend on the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantPlan {
    /// The request's rows in all (Best-of-N's n; Speculative Rejection's initial cap).
    pub rows: usize,
    /// Its prompt's length.
    pub prompt_len: usize,
    /// The most tokens a row generates.
    pub max_new_tokens: usize,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

fn gone() -> BackendError {
    BackendError::device("the engine thread dropped the call")
}

impl Lease {
    /// The request's grant, in cached tokens.
    pub fn token_capacity(&self) -> usize {
        self.capacity
    }

    /// The decoder's description.
    pub fn info(&self) -> EngineInfo {
        self.handle.info
    }

    /// Lets the grant shrink as the request's rows do ([`GrantPlan`]); without a plan it is
    /// held whole to the end (a request that may fork).
    pub fn with_plan(mut self, plan: GrantPlan) -> Self {
        self.plan = Some(plan);
        self
    }

    /// Tokens of the KV budget the request holds right now.
    pub fn granted(&self) -> usize {
        self.grant.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// After a retain left `rows` live rows: gives back the grant above what they can need.
    fn shrink_grant(&mut self, rows: usize) {
        let (Some(plan), Some(grant)) = (self.plan, self.grant.as_mut()) else { return };
        if self.prefilled < plan.rows {
            return; // a later batch still needs room
        }
        let need = self.handle.info.kv_layout.tokens(plan.prompt_len, rows, plan.max_new_tokens);
        if let Some(surplus) = grant.num_permits().checked_sub(need).filter(|&s| s > 0) {
            drop(grant.split(surplus)); // back to the queue, at once
        }
    }

    /// [`SharedDecoder::prefill`] on the engine thread.
    pub async fn prefill(
        &mut self,
        prompt: Vec<u32>,
        rows: Range<u32>,
        sampling: Sampling,
    ) -> Result<Batch, BackendError> {
        let count = rows.len();
        let (reply, answer) = oneshot::channel();
        let wake = self.handle.jobs.clone();
        self.handle.send(Job::Prefill { prompt, rows, sampling, wake, reply })?;
        let batch = answer.await.map_err(|_| gone())??;
        self.prefilled += count;
        Ok(batch)
    }

    /// Sends `slot`'s batch to the engine thread in the job `job` makes, and puts it back
    /// with the answer.
    async fn round_trip<T>(
        &mut self,
        slot: &mut Option<Batch>,
        job: impl FnOnce(Batch, oneshot::Sender<(Batch, Result<T, BackendError>)>) -> Job,
    ) -> Result<T, BackendError> {
        let batch = slot.take().ok_or_else(|| BackendError::device("the batch is away"))?;
        let (reply, answer) = oneshot::channel();
        self.handle.send(job(batch, reply))?;
        let (batch, result) = answer.await.map_err(|_| gone())?;
        *slot = Some(batch);
        result
    }

    /// This batch's share of the next step round.
    pub async fn step(&mut self, slot: &mut Option<Batch>) -> Result<Vec<u32>, BackendError> {
        self.round_trip(slot, |batch, reply| Job::Step { batch, reply }).await
    }

    /// [`SharedDecoder::retain`] on the engine thread.
    pub async fn retain(
        &mut self,
        slot: &mut Option<Batch>,
        keep: Vec<usize>,
    ) -> Result<(), BackendError> {
        self.round_trip(slot, |batch, reply| Job::Retain { batch, keep, reply }).await?;
        if let Some(batch) = slot {
            self.shrink_grant(batch.rows());
        }
        Ok(())
    }

    /// [`SharedDecoder::fork`] on the engine thread.
    pub async fn fork(
        &mut self,
        slot: &mut Option<Batch>,
        children: Vec<(usize, u32)>,
    ) -> Result<(), BackendError> {
        self.round_trip(slot, |batch, reply| Job::Fork { batch, children, reply }).await
    }

    /// The request's reward model on `responses`.
    pub async fn score(
        &mut self,
        prompt: Vec<u32>,
        responses: Vec<(u32, Vec<u32>)>,
    ) -> Result<Scored, BackendError> {
        let mut scorer =
            self.scorer.take().ok_or_else(|| BackendError::device("the reward model is away"))?;
        if !self.on_engine {
            let job = tokio::task::spawn_blocking(move || {
                let result = score_with(&mut *scorer, &prompt, &responses);
                (scorer, result)
            });
            let (scorer, result) = job
                .await
                .map_err(|e| BackendError::device(format!("the scoring task failed: {e}")))?;
            self.scorer = Some(scorer);
            return result;
        }
        let (reply, answer) = oneshot::channel();
        self.handle.send(Job::Score { scorer, prompt, responses, reply })?;
        let (scorer, result) = answer.await.map_err(|_| gone())?;
        self.scorer = Some(scorer);
        result
    }

    /// The reward model back, once the request is over.
    pub fn into_scorer(self) -> Option<Scorer> {
        self.scorer
    }

    /// [`HostReward::release`] (cheap: on the request's own thread).
    pub fn release(&mut self, rows: &[u32]) {
        if let Some(scorer) = self.scorer.as_mut() {
            scorer.release(rows);
        }
    }

    /// [`HostReward::forked`].
    pub fn forked(&mut self, children: &[(u32, u32)]) {
        if let Some(scorer) = self.scorer.as_mut() {
            scorer.forked(children);
        }
    }
}

fn score_with(
    scorer: &mut dyn HostReward,
    prompt: &[u32],
    responses: &[(u32, Vec<u32>)],
) -> Result<Scored, BackendError> {
    let responses: Vec<Response<'_>> =
        responses.iter().map(|(row, tokens)| Response { row: *row, tokens }).collect();
    scorer.score(prompt, &responses)
}

/// A waiting step call.
struct WaitingStep {
    batch: Batch,
    reply: oneshot::Sender<(Batch, Result<Vec<u32>, BackendError>)>,
}

/// The engine thread's state.
struct Worker {
    decoder: Box<dyn SharedDecoder>,
    counters: Arc<EngineCounters>,
    /// Jobs that are not steps, in arrival order.
    others: VecDeque<Job>,
    /// Step calls waiting for the round.
    steps: Vec<WaitingStep>,
    /// When the first of `steps` arrived.
    first_wait: Option<Instant>,
    /// How long a round waits for the live batches' calls ([`GATHER`]).
    gather: Duration,
}

impl Worker {
    fn run(mut self, queue: &mpsc::Receiver<Job>) {
        loop {
            let job = match self.first_wait {
                None if self.others.is_empty() => match queue.recv() {
                    Ok(job) => Some(job),
                    Err(_) => return,
                },
                Some(first)
                    if self.others.is_empty()
                        && self.steps.len() < self.counters.batches.load(Ordering::SeqCst) =>
                {
                    match queue.recv_timeout(self.gather.saturating_sub(first.elapsed())) {
                        Ok(job) => Some(job),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                _ => None,
            };
            if let Some(job) = job {
                self.accept(job);
            }
            while let Ok(job) = queue.try_recv() {
                self.accept(job);
            }
            while let Some(job) = self.others.pop_front() {
                // A backend that panics fails the calls in hand (their answers are dropped:
                // "the engine thread dropped the call") and the thread serves on.
                let _ = catch_unwind(AssertUnwindSafe(|| self.run_job(job)));
            }
            let all_in = self.steps.len() >= self.counters.batches.load(Ordering::SeqCst);
            if let Some(first) = self.first_wait
                && (all_in || first.elapsed() >= self.gather)
            {
                let _ = catch_unwind(AssertUnwindSafe(|| self.round()));
            }
            if let Some(held) = self.decoder.kv_bytes_held() {
                self.counters.kv_bytes_held.store(held, Ordering::Relaxed);
            }
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Step { batch, reply } => {
                self.first_wait.get_or_insert_with(Instant::now);
                self.steps.push(WaitingStep { batch, reply });
            }
            Job::Wake => {} // the loop looks again at who is in
            other => self.others.push_back(other),
        }
    }

    fn run_job(&mut self, job: Job) {
        let start = Instant::now();
        let kind = match &job {
            Job::Prefill { .. } | Job::Wake => 0,
            Job::Step { .. } => 1,
            Job::Score { .. } => 2,
            Job::Retain { .. } | Job::Fork { .. } => 3,
        };
        match job {
            Job::Wake => {}
            Job::Prefill { prompt, rows, sampling, wake, reply } => {
                let count = rows.len();
                let result = self.decoder.prefill(&prompt, rows, &sampling).map(|inner| {
                    self.counters.batches.fetch_add(1, Ordering::SeqCst);
                    let mut alive = Alive { counters: Arc::clone(&self.counters), rows: 0, wake };
                    alive.set_rows(count);
                    Batch { inner, alive }
                });
                // A request that left drops the batch here: its K/V goes back at once.
                let _ = reply.send(result);
            }
            Job::Retain { mut batch, keep, reply } => {
                let result = self.decoder.retain(&mut batch.inner, &keep);
                if result.is_ok() {
                    batch.alive.set_rows(keep.len());
                }
                let _ = reply.send((batch, result));
            }
            Job::Fork { mut batch, children, reply } => {
                let result = self.decoder.fork(&mut batch.inner, &children);
                if result.is_ok() {
                    batch.alive.set_rows(batch.rows() + children.len());
                }
                let _ = reply.send((batch, result));
            }
            Job::Score { mut scorer, prompt, responses, reply } => {
                let result = score_with(&mut *scorer, &prompt, &responses);
                let _ = reply.send((scorer, result));
            }
            step @ Job::Step { .. } => self.accept(step),
        }
        self.counters.add_busy(kind, start);
    }

    /// One step of every waiting batch, merged.
    fn round(&mut self) {
        self.first_wait = None;
        let mut waiting = std::mem::take(&mut self.steps);
        // A request that already left needs no step: its batch is dropped here.
        waiting.retain(|w| !w.reply.is_closed());
        if waiting.is_empty() {
            return;
        }
        let start = Instant::now();
        let results = {
            let mut batches: Vec<&mut AnyBatch> =
                waiting.iter_mut().map(|w| &mut w.batch.inner).collect();
            self.decoder.step(&mut batches)
        };
        self.counters.add_busy(1, start);
        let c = &self.counters;
        c.rounds.fetch_add(1, Ordering::Relaxed);
        c.batch_steps.fetch_add(waiting.len() as u64, Ordering::Relaxed);
        c.widest_round.fetch_max(waiting.len(), Ordering::Relaxed);
        for (w, result) in waiting.into_iter().zip(results) {
            if let Ok(tokens) = &result {
                c.tokens.fetch_add(tokens.len() as u64, Ordering::Relaxed);
            }
            let _ = w.reply.send((w.batch, result));
        }
    }
}

/// Admission by KV memory: the decoder's token capacity, handed out in grants (first come,
/// first served), and a bounded queue of requests waiting for theirs.
#[derive(Debug)]
pub struct Admission {
    tokens: Arc<Semaphore>,
    total: usize,
    max_queued: usize,
    queued: AtomicUsize,
}

/// Why a request was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full (429).
    QueueFull,
    /// The grant is larger than the whole budget (413).
    TooLarge,
}

impl Admission {
    /// `total` cached tokens to hand out; at most `max_queued` requests wait.
    pub fn new(total: usize, max_queued: usize) -> Self {
        let permits = total.min(Semaphore::MAX_PERMITS).min(u32::MAX as usize);
        Self {
            tokens: Arc::new(Semaphore::new(permits)),
            total: permits,
            max_queued,
            queued: AtomicUsize::new(0),
        }
    }

    /// Waits for `tokens` of the budget (in arrival order).
    pub async fn admit(&self, tokens: usize) -> Result<OwnedSemaphorePermit, Refusal> {
        if tokens > self.total {
            return Err(Refusal::TooLarge);
        }
        // Immediate when free and nobody waits ahead: no queue slot needed.
        if self.queued() == 0
            && let Ok(permit) = Arc::clone(&self.tokens).try_acquire_many_owned(tokens as u32)
        {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Refusal::QueueFull);
        }
        let _slot = QueueSlot(&self.queued);
        Arc::clone(&self.tokens)
            .acquire_many_owned(tokens as u32)
            .await
            .map_err(|_| Refusal::TooLarge)
    }

    /// Requests waiting for their grant.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Tokens of the budget granted right now.
    pub fn granted(&self) -> usize {
        self.total - self.tokens.available_permits()
    }

    /// The whole budget, in cached tokens.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Leaves the queue when dropped (admitted, or the client left while waiting).
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use specrej_core::testing::{FakeDecoder, FakeScorer};

    use super::*;

    /// The fake, which panics on a step of a batch whose first row id is 99.
    struct Panicky(FakeDecoder);

    impl Decoder for Panicky {
        type Batch = (bool, <FakeDecoder as Decoder>::Batch);

        fn token_capacity(&self) -> usize {
            self.0.token_capacity()
        }

        fn kv_bytes_per_token(&self) -> usize {
            self.0.kv_bytes_per_token()
        }

        fn max_sequence_len(&self) -> usize {
            self.0.max_sequence_len()
        }

        fn prefill(
            &mut self,
            prompt: &[u32],
            rows: Range<u32>,
            sampling: &Sampling,
        ) -> Result<Self::Batch, BackendError> {
            Ok((rows.start == 99, self.0.prefill(prompt, rows, sampling)?))
        }

        async fn step(&mut self, batch: &mut Self::Batch) -> Result<Vec<u32>, BackendError> {
            assert!(!batch.0, "a backend bug");
            self.0.step(&mut batch.1).await
        }

        fn retain(&mut self, batch: &mut Self::Batch, keep: &[usize]) -> Result<(), BackendError> {
            self.0.retain(&mut batch.1, keep)
        }
    }

    fn engine() -> EngineHandle {
        spawn(Box::new(EachAlone(Panicky(FakeDecoder::new(10_000))))).expect("engine thread").0
    }

    fn lease(engine: &EngineHandle) -> Lease {
        engine.lease(1000, Box::new(FakeScorer::default()), true, None)
    }

    #[test]
    fn a_round_steps_every_waiting_request_and_tokens_do_not_depend_on_the_others() {
        // Rounds wait (up to 10 s) for every live batch: once all three are prefilled, each
        // round holds all that are still running.
        let (engine, _) = spawn_gathering(
            Box::new(EachAlone(Panicky(FakeDecoder::new(10_000)))),
            Duration::from_secs(10),
        )
        .expect("engine");
        let run = |rows: Range<u32>, steps: usize, ready: Arc<std::sync::Barrier>| {
            let mut lease = lease(&engine);
            std::thread::spawn(move || {
                pollster::block_on(async {
                    let mut slot = Some(
                        lease
                            .prefill(vec![1, 2, 3], rows, Sampling::default())
                            .await
                            .expect("prefill"),
                    );
                    ready.wait();
                    let mut tokens = Vec::new();
                    for _ in 0..steps {
                        tokens.push(lease.step(&mut slot).await.expect("step"));
                    }
                    tokens
                })
            })
        };
        let alone = run(0..3, 20, Arc::new(std::sync::Barrier::new(1))).join().expect("alone");
        assert_eq!(engine.counters().widest_round.load(Ordering::SeqCst), 1);
        let ready = Arc::new(std::sync::Barrier::new(3));
        let together: Vec<_> = [
            run(0..3, 20, Arc::clone(&ready)),
            run(10..12, 30, Arc::clone(&ready)),
            run(20..24, 25, ready),
        ]
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
        assert_eq!(together[0], alone, "a request's tokens do not depend on the others");
        let c = engine.counters();
        assert_eq!(
            c.widest_round.load(Ordering::SeqCst),
            3,
            "the steps of all three ran in one round"
        );
        // 20 rounds of three, 5 of two, 5 of one.
        assert_eq!(
            (c.rounds.load(Ordering::SeqCst), c.batch_steps.load(Ordering::SeqCst)),
            (20 + 30, 20 + 20 * 3 + 5 * 2 + 5),
            "{c:?}"
        );
        assert_eq!(
            (c.batches.load(Ordering::SeqCst), c.rows.load(Ordering::SeqCst)),
            (0, 0),
            "every batch is gone"
        );
        assert_eq!(c.tokens.load(Ordering::SeqCst), 3 * 20 + 3 * 20 + 2 * 30 + 4 * 25);
    }

    #[test]
    fn a_backend_panic_fails_its_calls_and_the_engine_serves_on() {
        let engine = engine();
        let mut lease = lease(&engine);
        pollster::block_on(async {
            let mut slot = Some(
                lease.prefill(vec![1, 2], 99..100, Sampling::default()).await.expect("prefill"),
            );
            let error = lease.step(&mut slot).await.expect_err("the step panics");
            assert!(error.to_string().contains("dropped the call"), "{error}");
            let mut slot =
                Some(lease.prefill(vec![1, 2], 0..2, Sampling::default()).await.expect("prefill"));
            assert_eq!(lease.step(&mut slot).await.expect("a step").len(), 2);
            assert_eq!(
                engine.counters().batches.load(Ordering::SeqCst),
                1,
                "the panicked batch was dropped"
            );
        });
    }

    #[test]
    fn a_retain_gives_back_the_grant_the_rows_left_can_never_use() {
        let engine = engine();
        let admission = Admission::new(1000, 4);
        pollster::block_on(async {
            // 4 rows of at most 32 new tokens after a 3-token prompt.
            let grant = admission.admit(144).await.expect("free");
            let plan = GrantPlan { rows: 4, prompt_len: 3, max_new_tokens: 32 };
            let mut lease = engine
                .lease(144, Box::new(FakeScorer::default()), true, Some(grant))
                .with_plan(plan);
            let mut slot = Some(
                lease.prefill(vec![1, 2, 3], 0..4, Sampling::default()).await.expect("prefill"),
            );
            lease.step(&mut slot).await.expect("step");
            // The fake's layout is dense and exact: 3 rows can use 3 × (3 + 32) = 105 at most,
            // so 39 go back to the admission queue at once.
            lease.retain(&mut slot, vec![0, 1, 3]).await.expect("retain");
            assert_eq!((lease.granted(), admission.granted()), (105, 105));
            // All rows kept: nothing changes.
            lease.retain(&mut slot, vec![0, 1, 2]).await.expect("retain");
            assert_eq!(lease.granted(), 105);
            // One row left: 35.
            lease.retain(&mut slot, vec![1]).await.expect("retain");
            assert_eq!((lease.granted(), admission.granted()), (35, 35));
            assert_eq!(lease.token_capacity(), 144, "the scheduler's capacity does not change");
            drop(lease);
            assert_eq!(admission.granted(), 0);
        });
    }

    #[test]
    fn admission_grants_in_order_and_bounds_its_queue() {
        let admission = Admission::new(100, 1);
        pollster::block_on(async {
            let first = admission.admit(60).await.expect("free");
            assert_eq!(admission.admit(101).await.err(), Some(Refusal::TooLarge));
            let waiting = admission.admit(50);
            let mut waiting = std::pin::pin!(waiting);
            // It waits (polled once, it is not ready), and fills the queue of one.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(Future::poll(waiting.as_mut(), &mut cx).is_pending());
            assert_eq!(admission.queued(), 1);
            assert_eq!(admission.admit(10).await.err(), Some(Refusal::QueueFull));
            drop(first);
            let second = waiting.await.expect("admitted once the first ends");
            assert_eq!((admission.queued(), admission.granted()), (0, 50));
            drop(second);
        });
        assert_eq!(admission.granted(), 0);
    }
}
