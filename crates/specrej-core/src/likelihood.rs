//! The likelihood reward, defined once for every backend's scorer.
//!
//! The reward of a response is minus its perplexity given the prompt, `−exp(mean NLL)` over
//! its tokens, with the mean NLL capped at [`MAX_MEAN_NLL`] so rewards stay finite; an empty
//! response gets [`EMPTY_RESPONSE_REWARD`], below every non-empty one. Backends compute the
//! NLLs (on their device, batched as they like) and leave the rest to this module.

use std::borrow::Cow;

use crate::{BackendError, Response};

/// Reward of an empty response: finite, and below the reward of any non-empty response
/// (whose perplexity is capped at `e^60`).
pub const EMPTY_RESPONSE_REWARD: f32 = -1.0e30;

/// Mean NLL above which perplexity is capped (keeps rewards finite).
pub const MAX_MEAN_NLL: f64 = 60.0;

/// The reward of a response of `tokens` tokens whose NLLs sum to `sum_nll` (nats).
pub fn reward(sum_nll: f64, tokens: usize) -> f32 {
    if tokens == 0 {
        return EMPTY_RESPONSE_REWARD;
    }
    -((sum_nll / tokens as f64).min(MAX_MEAN_NLL).exp() as f32)
}

/// What responses are scored after: `prompt`, or the model's BOS token alone when the prompt
/// is empty (the first token needs something to be predicted from).
pub fn context(prompt: &[u32], bos: Option<u32>) -> Result<Cow<'_, [u32]>, BackendError> {
    if !prompt.is_empty() {
        return Ok(Cow::Borrowed(prompt));
    }
    bos.map(|bos| Cow::Owned(vec![bos])).ok_or_else(|| {
        BackendError::device("likelihood scorer: empty prompt and the model has no BOS token")
    })
}

/// `log Σ exp(x)`, computed stably, the sum in f64 (`-inf` for an empty slice).
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = x.iter().map(|&v| f64::from(v - max).exp()).sum();
    max + sum.ln() as f32
}

/// The positions a batched pass over `group` must read. Each response runs right-padded to
/// `width` inputs (all its tokens but the last; the first token is predicted by the context's
/// last position, outside this pass), so token `j ≥ 1` of response `i` is predicted at flat
/// position `i * width + j − 1`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// Flat positions to read, `[n]`.
    pub at: Vec<u32>,
    /// The token each position predicts, `[n]`.
    pub tokens: Vec<u32>,
    /// The index in `group` of the response each position belongs to, `[n]`.
    pub response: Vec<usize>,
}

impl Targets {
    /// The targets of `group`, padded to `width` inputs each (`width` at least every
    /// response's length minus one).
    pub fn of(group: &[Response<'_>], width: usize) -> Self {
        let mut targets = Self::default();
        for (i, r) in group.iter().enumerate() {
            debug_assert!(
                r.tokens.len() <= width + 1,
                "width {width} too small for {} tokens",
                r.tokens.len()
            );
            for (j, &token) in r.tokens.iter().enumerate().skip(1) {
                targets.at.push(u32::try_from(i * width + j - 1).unwrap_or(u32::MAX));
                targets.tokens.push(token);
                targets.response.push(i);
            }
        }
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_is_minus_perplexity_capped_and_empty_is_lowest() {
        assert_eq!(reward(0.0, 3), -1.0);
        assert!((reward(2.0 * 3.0, 3) - -(2.0f64.exp() as f32)).abs() < 1e-5);
        let capped = reward(1e9, 1);
        assert!(capped.is_finite() && capped == -(MAX_MEAN_NLL.exp() as f32));
        assert_eq!(reward(0.0, 0), EMPTY_RESPONSE_REWARD);
        assert!(EMPTY_RESPONSE_REWARD < capped);
    }

    #[test]
    fn context_falls_back_to_bos() {
        assert_eq!(&*context(&[5, 6], None).expect("prompt"), &[5, 6]);
        assert_eq!(&*context(&[], Some(1)).expect("bos"), &[1]);
        assert!(context(&[], None).expect_err("no bos").to_string().contains("no BOS"));
    }

    #[test]
    fn log_sum_exp_is_stable() {
        assert!((log_sum_exp(&[0.0, 0.0]) - 2.0f32.ln()).abs() < 1e-6);
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2.0f32.ln())).abs() < 1e-3);
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn targets_index_the_padded_positions() {
        let (a, b, c) = ([7u32, 8, 9], [4u32], [1u32, 2]);
        let group = [
            Response { row: 0, tokens: &a },
            Response { row: 3, tokens: &b },
            Response { row: 5, tokens: &c },
        ];
        let t = Targets::of(&group, 2);
        assert_eq!(t.at, [0, 1, 4]);
        assert_eq!(t.tokens, [8, 9, 2]);
        assert_eq!(t.response, [0, 0, 2]);
    }
}
