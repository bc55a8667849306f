//! One prompt's Best-of-N run, recorded to every row's end: the tokens (what replay plays
//! back), each token's NLL under the policy (the likelihood reward of every prefix, for
//! free; on the CPU only: see [`Recording::missing_nll`]), and what the live run cost.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use specrej_candle::{CandleDecoder, Model};
use specrej_core::{Finish, Method, Options, Response, Scored, Scorer, Stats, block_on_ready};

/// A recorded Best-of-N run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recording {
    /// Row id → every token it sampled (an EOS token, if any, last).
    pub rows: Vec<Vec<u32>>,
    /// Row id → why it stopped.
    pub finish: Vec<Finish>,
    /// Row id → the NLL of each of its tokens given the prompt and the tokens before.
    pub nll: Vec<Vec<f32>>,
    /// The live run's costs (its reward was free: none).
    pub stats: Stats,
    /// Rows per batch the recording ran with.
    pub batch_rows: usize,
}

/// A reward that costs nothing: the recording scores later, by replay.
struct NoReward;

impl Scorer for NoReward {
    async fn score(
        &mut self,
        _prompt: &[u32],
        responses: &[Response<'_>],
    ) -> Result<Scored, specrej_core::BackendError> {
        Ok(Scored { rewards: vec![0.0; responses.len()], tokens_processed: 0 })
    }
}

/// Runs Best-of-`options.n` of `prompt` (in batches of `batch_rows`) and records it.
pub fn record(
    model: &Arc<Model>,
    prompt: &[u32],
    options: &Options,
    batch_rows: usize,
) -> Result<Recording> {
    let n = options.n;
    let bytes =
        CandleDecoder::budget_for(model, prompt.len(), batch_rows.min(n), options.max_new_tokens);
    let mut decoder = CandleDecoder::new(Arc::clone(model), bytes);
    let sink = Arc::new(Mutex::new(Vec::new()));
    decoder.record_nll(Arc::clone(&sink));
    let bon = Options { method: Method::BestOfN, ..options.clone() };
    let outcome = block_on_ready(specrej_core::generate(
        &mut decoder,
        &mut NoReward,
        prompt,
        &bon,
        &mut |_| {},
    ))?;
    let mut rows = vec![Vec::new(); n];
    let mut finish = vec![Finish::Length; n];
    for c in outcome.candidates {
        rows[c.row as usize] = c.tokens;
        finish[c.row as usize] = c.finish;
    }
    let mut nll: Vec<Vec<f32>> = rows.iter().map(|r| vec![f32::NAN; r.len()]).collect();
    let entries = std::mem::take(
        &mut *sink.lock().map_err(|_| anyhow::anyhow!("the NLL sink was poisoned"))?,
    );
    for (row, position, value) in entries {
        if let Some(slot) = nll.get_mut(row as usize).and_then(|r| r.get_mut(position as usize)) {
            *slot = value;
        }
    }
    Ok(Recording { rows, finish, nll, stats: outcome.stats, batch_rows: batch_rows.min(n) })
}

impl Recording {
    /// The first row missing a token's NLL, if any: on a GPU the decoder sends only the first
    /// step's NLLs (its dense step does not compute them), so a GPU recording has no
    /// likelihood rewards.
    pub fn missing_nll(&self) -> Option<usize> {
        self.nll.iter().position(|r| r.iter().any(|x| x.is_nan()))
    }
}
