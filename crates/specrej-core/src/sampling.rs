//! Row-keyed sampling on the host: temperature, top-k, top-p, then Gumbel-max with noise
//! from a counter-based hash of (seed, row id, position, token).
//!
//! The hash uses only 32-bit integer operations so a WGSL kernel can compute the same
//! noise bit for bit. Because the noise of a row depends only on its own key, dropping
//! other rows never changes a surviving row's text.

use crate::backend::Sampling;

/// PCG-style 32-bit permutation (the "pcg_hash" of Jarzynski & Olano, 2020).
#[inline]
pub fn pcg_hash(input: u32) -> u32 {
    let state = input.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// The noise key of one (row, position): everything but the token.
#[inline]
pub fn row_key(seed: u64, row: u32, position: u32) -> u32 {
    let mut h = pcg_hash(seed as u32);
    h = pcg_hash(h ^ (seed >> 32) as u32);
    h = pcg_hash(h ^ row);
    pcg_hash(h ^ position)
}

/// A uniform in the open interval (0, 1) for one token under a row key.
#[inline]
pub fn uniform(key: u32, token: u32) -> f32 {
    let bits = pcg_hash(key ^ pcg_hash(token)) >> 8; // 24 random bits
    (bits as f32 + 0.5) / 16_777_216.0
}

/// Standard Gumbel noise for one token under a row key.
#[inline]
pub fn gumbel(key: u32, token: u32) -> f32 {
    -(-uniform(key, token).ln()).ln()
}

/// Index of the largest value; the lowest index wins ties. `NaN`s never win.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// Samples one token from `logits` for row `row` at generation index `position`.
///
/// Greedy when `temperature <= 0`. Otherwise: scale by `1/T`, keep the `top_k` best
/// (ties broken by lower token id), keep the smallest prefix whose probability mass
/// reaches `top_p`, then pick the kept token with the largest `logit/T + gumbel`, which
/// samples exactly from the renormalised kept distribution.
pub fn sample(logits: &[f32], sampling: &Sampling, row: u32, position: u32) -> u32 {
    if sampling.temperature <= 0.0 || logits.len() <= 1 {
        return argmax(logits);
    }
    let inv_t = 1.0 / sampling.temperature;
    let vocab = logits.len();
    let k = if sampling.top_k == 0 { vocab } else { sampling.top_k.min(vocab) };
    let key = row_key(sampling.seed, row, position);

    // Fast path: no truncation at all.
    if k == vocab && sampling.top_p >= 1.0 {
        let mut best = 0u32;
        let mut best_value = f32::NEG_INFINITY;
        for (i, &l) in logits.iter().enumerate() {
            let v = l * inv_t + gumbel(key, i as u32);
            if v > best_value {
                best = i as u32;
                best_value = v;
            }
        }
        return best;
    }

    // Candidates ordered by logit (descending), token id ascending on ties.
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize].total_cmp(&logits[*a as usize]).then_with(|| a.cmp(b))
    };
    if k < vocab {
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit);

    let mut kept = order.len();
    if sampling.top_p < 1.0 {
        let max = logits[order[0] as usize] * inv_t;
        let weights: Vec<f32> =
            order.iter().map(|&t| (logits[t as usize] * inv_t - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut mass = 0.0f32;
        kept = 0;
        for w in &weights {
            mass += w / total;
            kept += 1;
            if mass >= sampling.top_p {
                break;
            }
        }
    }

    let mut best = order[0];
    let mut best_value = f32::NEG_INFINITY;
    for &t in &order[..kept.max(1)] {
        let v = logits[t as usize] * inv_t + gumbel(key, t);
        if v > best_value {
            best = t;
            best_value = v;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_k: usize, top_p: f32) -> Sampling {
        Sampling { seed: 7, temperature, top_k, top_p }
    }

    #[test]
    fn hash_is_stable() {
        // Pinned values: a WGSL port must reproduce these exactly.
        assert_eq!(pcg_hash(0), 129_708_002);
        assert_eq!(pcg_hash(1), 2_831_084_092);
        assert_eq!(row_key(42, 3, 17), row_key(42, 3, 17));
        assert_ne!(row_key(42, 3, 17), row_key(42, 4, 17));
        assert_ne!(row_key(42, 3, 17), row_key(43, 3, 17));
        assert_ne!(row_key(42, 3, 17), row_key(42, 3, 18));
        assert_ne!(row_key(1, 0, 0), row_key(1 << 32, 0, 0));
    }

    #[test]
    fn uniform_is_open_interval_and_roughly_flat() {
        let key = row_key(1, 2, 3);
        let mut buckets = [0u32; 10];
        for t in 0..100_000 {
            let u = uniform(key, t);
            assert!(u > 0.0 && u < 1.0);
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let logits = [0.1, 3.0, 3.0, -1.0];
        assert_eq!(sample(&logits, &sampling(0.0, 50, 1.0), 0, 0), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 2.0, 3.0, -1.0];
        for pos in 0..100 {
            assert_eq!(sample(&logits, &sampling(1.0, 1, 1.0), 5, pos), 2);
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // p(2) ≈ 0.97: with top_p = 0.9 only token 2 survives.
        let logits = [0.0, 0.0, 5.0, 0.0];
        for pos in 0..100 {
            assert_eq!(sample(&logits, &sampling(1.0, 0, 0.9), 1, pos), 2);
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let mut counts = [0u32; 3];
        let n = 30_000;
        for pos in 0..n {
            counts[sample(&logits, &sampling(1.0, 50, 1.0), 9, pos) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let expected = logits[i].exp() / z;
            let got = c as f32 / n as f32;
            assert!((got - expected).abs() < 0.015, "token {i}: {got} vs {expected}");
        }
        // Top-k paths and the fast path agree on the distribution they sample.
        let mut counts_k = [0u32; 3];
        for pos in 0..n {
            counts_k[sample(&logits, &sampling(1.0, 2, 1.0), 9, pos) as usize] += 1;
        }
        assert_eq!(counts_k[0], 0);
        let p2 = logits[2].exp() / (logits[1].exp() + logits[2].exp());
        assert!((counts_k[2] as f32 / n as f32 - p2).abs() < 0.015);
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [0.0f32, 1.0];
        let hot =
            (0..10_000).filter(|&p| sample(&logits, &sampling(2.0, 0, 1.0), 0, p) == 1).count();
        let cold =
            (0..10_000).filter(|&p| sample(&logits, &sampling(0.25, 0, 1.0), 0, p) == 1).count();
        assert!(cold > hot + 2_000, "cold {cold} hot {hot}");
    }
}
