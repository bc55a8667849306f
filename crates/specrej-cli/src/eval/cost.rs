//! What compute costs on this machine: measured once per results file (the calibration),
//! then used to price every replayed run as the live run would have cost.
//!
//! * a decoding step of `r` rows that each cached `g` tokens of their own:
//!   `step(r) + per_row_token · r · g` (`step` measured at a short context for a ladder of
//!   row counts and interpolated linearly; `per_row_token` is attention over the rows' own
//!   tokens, fitted on a run whose context grows);
//! * a prefill of `p` tokens: `a + b·p + c·p²`;
//! * a reward call: `a + b·tokens + c·rows + d·pairs`: `tokens` run in one pass over `rows`
//!   rows (the judge reads one position's logits per row, the likelihood every token's),
//!   `pairs` = Σ over the tokens run of the positions they attend to (fitted by least squares
//!   per reward kind on incremental calls of several sizes).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use specrej_candle::{CandleDecoder, Model};
use specrej_core::{Decoder, Response, Sampling, Scorer, block_on_ready};

use super::math::{least_squares, least_squares_nonnegative};

/// The measured costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// What was measured on (thread count, CPU model).
    pub machine: String,
    /// `(rows, seconds)` of one step at a short context, ascending rows.
    pub step: Vec<(usize, f64)>,
    /// Seconds per row and cached own token, per step.
    pub per_row_token: f64,
    /// Prefill seconds = `a + b·p + c·p²`.
    pub prefill: [f64; 3],
    /// Per reward kind: call seconds = `a + b·tokens + c·rows + d·pairs`.
    pub reward: BTreeMap<String, [f64; 4]>,
}

impl Calibration {
    /// One step of `rows` rows holding `generated` own tokens each.
    pub fn step_seconds(&self, rows: usize, generated: usize) -> f64 {
        interpolate(&self.step, rows) + self.per_row_token * rows as f64 * generated as f64
    }

    /// One prefill of `tokens` tokens.
    pub fn prefill_seconds(&self, tokens: usize) -> f64 {
        let p = tokens as f64;
        (self.prefill[0] + self.prefill[1] * p + self.prefill[2] * p * p).max(0.0)
    }

    /// One reward call that ran `tokens` tokens of `rows` rows, attending to `pairs`
    /// positions in all.
    pub fn reward_seconds(&self, kind: &str, cost: Cost) -> f64 {
        let Some(c) = self.reward.get(kind) else { return f64::NAN };
        if cost.tokens == 0 {
            return 0.0;
        }
        (c[0] + c[1] * cost.tokens as f64 + c[2] * cost.rows as f64 + c[3] * cost.pairs as f64)
            .max(0.0)
    }
}

/// What one reward call ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Tokens run.
    pub tokens: u64,
    /// Rows that ran at least one token.
    pub rows: u64,
    /// Σ over the tokens run of the positions each attends to.
    pub pairs: u64,
}

/// Linear interpolation in `points` (ascending x), extrapolated by the last segment's slope.
fn interpolate(points: &[(usize, f64)], x: usize) -> f64 {
    match points {
        [] => f64::NAN,
        [(_, y)] => *y,
        _ => {
            let x = x as f64;
            let i = points.windows(2).position(|w| x <= w[1].0 as f64).unwrap_or(points.len() - 2);
            let ((x0, y0), (x1, y1)) =
                ((points[i].0 as f64, points[i].1), (points[i + 1].0 as f64, points[i + 1].1));
            if x1 == x0 { y0 } else { (y0 + (x - x0) * (y1 - y0) / (x1 - x0)).max(0.0) }
        }
    }
}

fn machine() -> String {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("{threads} threads, {cpu}")
}

/// Seconds of `f`, the best of `repeats` runs (the least disturbed by the rest of the machine).
fn best_of(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The decoder costs: steps for `rows` (ascending), attention from a run that grows to
/// `context` own tokens with 64 rows, prefill at three lengths.
pub fn decoder(
    model: &Arc<Model>,
    prompt: &[u32],
    rows: &[usize],
    context: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Calibration> {
    let sampling = Sampling { seed: 99, ..Sampling::default() };
    let budget = |r: usize, own: usize| CandleDecoder::budget_for(model, prompt.len(), r, own);
    let mut step = Vec::new();
    for &r in rows {
        let mut decoder = CandleDecoder::new(Arc::clone(model), budget(r, 16));
        let mut batch = decoder.prefill(prompt, 0..r as u32, &sampling)?;
        for _ in 0..3 {
            block_on_ready(decoder.step(&mut batch))?;
        }
        // Four more steps, timed one by one: own tokens 3..7, the attention term negligible.
        let t = best_of(4, || Ok(block_on_ready(decoder.step(&mut batch)).map(drop)?))?;
        progress(&format!("calibration: a step of {r} rows takes {:.1} ms", t * 1e3));
        step.push((r, t));
    }
    // Attention: 64 rows to `context` own tokens; step time against own tokens.
    let rows_attn = 64;
    let mut decoder = CandleDecoder::new(Arc::clone(model), budget(rows_attn, context + 2));
    let mut batch = decoder.prefill(prompt, 0..rows_attn as u32, &sampling)?;
    let mut samples = Vec::new();
    for g in 0..context {
        let start = Instant::now();
        block_on_ready(decoder.step(&mut batch))?;
        if g >= 4 {
            samples.push((vec![1.0, g as f64], start.elapsed().as_secs_f64()));
        }
    }
    let fit = least_squares(&samples).unwrap_or_else(|| vec![0.0, 0.0]);
    let per_row_token = (fit[1] / rows_attn as f64).max(0.0);
    progress(&format!(
        "calibration: attention costs {:.2} µs per row and cached token",
        per_row_token * 1e6
    ));
    // Prefill at three lengths (a quadratic through them).
    let mut samples = Vec::new();
    for len in [64usize, 256, 768] {
        let ids: Vec<u32> = prompt.iter().copied().cycle().take(len).collect();
        let mut decoder =
            CandleDecoder::new(Arc::clone(model), CandleDecoder::budget_for(model, len, 1, 1));
        let t = best_of(2, || Ok(decoder.prefill(&ids, 0..1, &sampling).map(drop)?))?;
        samples.push((vec![1.0, len as f64, (len * len) as f64], t));
    }
    let prefill = least_squares_nonnegative(&samples).map_or([0.0; 3], |c| [c[0], c[1], c[2]]);
    Ok(Calibration { machine: machine(), step, per_row_token, prefill, reward: BTreeMap::new() })
}

/// One reward kind's cost: incremental calls growing rows of `text` by a few tokens each,
/// timed (the best of two), fitted to `a + b·tokens + c·rows + d·pairs`. `cost` counts a
/// call as the live scorer runs it (and must see every call, untimed ones too).
pub fn reward<S: Scorer>(
    mut scorer: S,
    prompt: &[u32],
    text: &[u32],
    cost: &mut dyn FnMut(&[Response<'_>]) -> Cost,
) -> Result<[f64; 4]> {
    let mut samples = Vec::new();
    let mut next_row = 0u32;
    for rows in [1usize, 4, 16, 48, 128] {
        for (start, grow) in [(8usize, 1usize), (8, 16), (8, 64), (96, 1), (96, 32)] {
            let mut best = (f64::INFINITY, Cost::default());
            for _ in 0..2 {
                let ids: Vec<u32> = (next_row..next_row + rows as u32).collect();
                next_row += rows as u32;
                let cut = |len: usize| -> Vec<Response<'_>> {
                    ids.iter()
                        .map(|&row| Response { row, tokens: &text[..len.min(text.len())] })
                        .collect()
                };
                // Build fresh rows' caches first, then time the growing call.
                block_on_ready(scorer.score_partial(prompt, &cut(start)))?;
                cost(&cut(start));
                let grown = cut(start + grow);
                let c = cost(&grown);
                let t = Instant::now();
                block_on_ready(scorer.score_partial(prompt, &grown))?;
                best = best.min_by_time(t.elapsed().as_secs_f64(), c);
                scorer.release(&ids);
            }
            let (t, c) = best;
            samples.push((vec![1.0, c.tokens as f64, c.rows as f64, c.pairs as f64], t));
        }
    }
    Ok(least_squares_nonnegative(&samples).map_or([0.0; 4], |c| [c[0], c[1], c[2], c[3]]))
}

trait MinByTime {
    fn min_by_time(self, t: f64, c: Cost) -> Self;
}

impl MinByTime for (f64, Cost) {
    fn min_by_time(self, t: f64, c: Cost) -> Self {
        if t < self.0 { (t, c) } else { self }
    }
}
