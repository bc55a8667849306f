//! Replay: a recorded Best-of-N run played back as a [`Decoder`], so any pruning policy can
//! be evaluated offline, exactly.
//!
//! A row's tokens depend only on (prompt, seed, row id) (see [`crate::sampling`]), so every
//! Speculative Rejection run is a pruned subset of the Best-of-N run with the same seed: row
//! `r`'s text in SR is a prefix of row `r`'s text in Best-of-N. One Best-of-N run of `n` rows,
//! recorded to each row's end, therefore determines what any policy that starts from rows
//! `0..n` and only drops rows would sample. [`ReplayDecoder`] plays it back under any budget
//! and layout, and logs every call, so the caller can charge the compute a live run would
//! have spent.

use std::ops::Range;

use crate::backend::{BackendError, Decoder, KvLayout, Sampling, check_retain};

/// What a replayed run asked of the decoder, in order: enough to price it like a live run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// A batch of `rows` rows was prefilled with a `prompt`-token prompt.
    Prefill { prompt: usize, rows: usize },
    /// A step of `rows` rows, each of which had cached `generated` tokens of its own.
    Step { rows: usize, generated: usize },
    /// A retain kept `kept` of `rows` rows.
    Retain { rows: usize, kept: usize },
}

/// A recorded Best-of-N run as a decoder: row `id` samples `rows[id]`, token by token.
#[derive(Clone, Debug)]
pub struct ReplayDecoder<'a> {
    /// Row id → every token it sampled, to its end (an EOS token, if any, last).
    rows: &'a [Vec<u32>],
    capacity: usize,
    layout: KvLayout,
    kv_bytes_per_token: usize,
    max_sequence_len: usize,
    /// Every call, in order.
    pub calls: Vec<Call>,
}

/// A replayed batch: the live rows' ids and how many tokens each has sampled.
#[derive(Clone, Debug)]
pub struct ReplayBatch {
    ids: Vec<u32>,
    prompt: usize,
    generated: usize,
}

impl<'a> ReplayDecoder<'a> {
    /// Plays `rows` back as a backend of `capacity` cached tokens in `layout`.
    pub fn new(
        rows: &'a [Vec<u32>],
        capacity: usize,
        layout: KvLayout,
        kv_bytes_per_token: usize,
        max_sequence_len: usize,
    ) -> Self {
        Self { rows, capacity, layout, kv_bytes_per_token, max_sequence_len, calls: Vec::new() }
    }
}

impl Decoder for ReplayDecoder<'_> {
    type Batch = ReplayBatch;

    fn token_capacity(&self) -> usize {
        self.capacity
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn max_sequence_len(&self) -> usize {
        self.max_sequence_len
    }

    fn prefill(
        &mut self,
        prompt: &[u32],
        rows: Range<u32>,
        _sampling: &Sampling,
    ) -> Result<ReplayBatch, BackendError> {
        if rows.end as usize > self.rows.len() || rows.is_empty() {
            return Err(BackendError::device(format!(
                "replay: rows {rows:?} asked for, but the recording holds rows 0..{}",
                self.rows.len()
            )));
        }
        if self.layout.tokens(prompt.len(), rows.len(), 0) > self.capacity {
            return Err(BackendError::OutOfMemory);
        }
        self.calls.push(Call::Prefill { prompt: prompt.len(), rows: rows.len() });
        Ok(ReplayBatch { ids: rows.collect(), prompt: prompt.len(), generated: 0 })
    }

    fn step(
        &mut self,
        batch: &mut ReplayBatch,
    ) -> impl Future<Output = Result<Vec<u32>, BackendError>> {
        let result =
            if self.layout.tokens(batch.prompt, batch.ids.len(), batch.generated) > self.capacity {
                Err(BackendError::OutOfMemory)
            } else {
                let g = batch.generated;
                batch
                    .ids
                    .iter()
                    .map(|&id| {
                        self.rows[id as usize].get(g).copied().ok_or_else(|| {
                        BackendError::device(format!(
                            "replay: row {id} asked for token {g}, but the recording ends after {}",
                            self.rows[id as usize].len()
                        ))
                    })
                    })
                    .collect::<Result<Vec<u32>, BackendError>>()
            };
        if result.is_ok() {
            self.calls.push(Call::Step { rows: batch.ids.len(), generated: batch.generated });
            batch.generated += 1;
        }
        std::future::ready(result)
    }

    fn retain(&mut self, batch: &mut ReplayBatch, keep: &[usize]) -> Result<(), BackendError> {
        check_retain(keep, batch.ids.len())?;
        self.calls.push(Call::Retain { rows: batch.ids.len(), kept: keep.len() });
        batch.ids = keep.iter().map(|&i| batch.ids[i]).collect();
        Ok(())
    }

    fn fork(
        &mut self,
        _batch: &mut ReplayBatch,
        _children: &[(usize, u32)],
    ) -> Result<(), BackendError> {
        Err(BackendError::device(
            "replay: a forked row samples tokens no recording holds (run refill live)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FAKE_EOS, FakeDecoder, FakeScorer};
    use crate::{Method, Options, Rules, block_on_ready, generate};

    const PROMPT: &[u32] = &[3, 1, 4, 1, 5, 9, 2, 6];

    fn options(method: Method, n: usize) -> Options {
        Options {
            method,
            n,
            max_new_tokens: 60,
            min_new_tokens: 8,
            eos: vec![FAKE_EOS],
            sampling: Sampling { seed: 4, temperature: 1.0, top_k: 0, top_p: 1.0 },
            rules: Rules::default(),
        }
    }

    /// Replaying Best-of-N-32 reproduces live Speculative Rejection runs exactly, and the
    /// live ones' calls.
    #[test]
    fn replay_equals_live_runs() {
        let mut live = FakeDecoder::new(1 << 20);
        let bon = block_on_ready(generate(
            &mut live,
            &mut FakeScorer::default(),
            PROMPT,
            &options(Method::BestOfN, 32),
            &mut |_| {},
        ))
        .expect("bon");
        let mut rows = vec![Vec::new(); 32];
        for c in &bon.candidates {
            rows[c.row as usize] = c.tokens.clone();
        }
        for (alpha, capacity) in [(0.3, 32 * 20), (0.5, 32 * 18), (0.8, 20 * 24)] {
            let opts = options(Method::SpeculativeRejection { alpha }, 32);
            let mut fake = FakeDecoder::new(capacity);
            let want = block_on_ready(generate(
                &mut fake,
                &mut FakeScorer::default(),
                PROMPT,
                &opts,
                &mut |_| {},
            ))
            .expect("live");
            let mut replay = ReplayDecoder::new(
                &rows,
                capacity,
                KvLayout::DENSE,
                fake.kv_bytes_per_token(),
                fake.max_sequence_len,
            );
            let mut got = block_on_ready(generate(
                &mut replay,
                &mut FakeScorer::default(),
                PROMPT,
                &opts,
                &mut |_| {},
            ))
            .expect("replay");
            assert!(!want.trace.is_empty(), "alpha {alpha}: decisions happen");
            let steps = replay.calls.iter().filter(|c| matches!(c, Call::Step { .. })).count();
            assert_eq!(steps, want.stats.steps);
            assert_eq!(
                fake.calls.retains.len(),
                replay.calls.iter().filter(|c| matches!(c, Call::Retain { .. })).count()
            );
            got.stats.wall_seconds = want.stats.wall_seconds;
            (
                got.stats.prefill_seconds,
                got.stats.step_seconds,
                got.stats.reward_seconds,
                got.stats.retain_seconds,
            ) = (
                want.stats.prefill_seconds,
                want.stats.step_seconds,
                want.stats.reward_seconds,
                want.stats.retain_seconds,
            );
            assert_eq!(got, want, "alpha {alpha}");
        }
    }

    #[test]
    fn replay_refuses_what_it_cannot_know() {
        let rows = vec![vec![5, 6], vec![7]];
        let mut replay = ReplayDecoder::new(&rows, 1000, KvLayout::DENSE, 4, 100);
        assert!(
            replay.prefill(PROMPT, 0..3, &Sampling::default()).is_err(),
            "row 2 was not recorded"
        );
        let mut batch = replay.prefill(PROMPT, 0..2, &Sampling::default()).expect("prefill");
        assert_eq!(block_on_ready(replay.step(&mut batch)), Ok(vec![5, 7]));
        let err = block_on_ready(replay.step(&mut batch)).expect_err("row 1 ended");
        assert!(err.to_string().contains("row 1"), "{err}");
        assert!(replay.fork(&mut batch, &[(0, 9)]).is_err());
    }
}
