//! Pure selection math: how many rows to start with, how many to keep, which ones.

/// Rows kept at a decision for rejection rate `alpha`: `max(1, round((1 − α)·live))`.
pub fn keep_count(live: usize, alpha: f32) -> usize {
    let kept = ((1.0 - f64::from(alpha)) * live as f64).round() as usize;
    kept.clamp(1, live.max(1))
}

/// Indices (ascending) of the `keep` best scores; ties go to the lower index.
/// `NaN` ranks below every number.
pub fn top_indices(scores: &[f32], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| rank_key(scores[b]).total_cmp(&rank_key(scores[a])).then(a.cmp(&b)));
    order.truncate(keep);
    order.sort_unstable();
    order
}

/// Scores as the ranking sees them: `NaN` becomes `-∞`.
pub fn rank_key(score: f32) -> f32 {
    if score.is_nan() { f32::NEG_INFINITY } else { score }
}

/// Minimum, median (lower middle for even counts averaged with upper) and maximum.
pub fn summary(scores: &[f32]) -> (f32, f32, f32) {
    if scores.is_empty() {
        return (f32::NAN, f32::NAN, f32::NAN);
    }
    let mut sorted: Vec<f32> = scores.iter().copied().map(rank_key).collect();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) };
    (sorted[0], median, sorted[n - 1])
}

/// Kendall's τ-b (ties in either variable handled); `None` for fewer than 2 pairs or when
/// either variable is constant. O(n²), fine for the rows of one prompt.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let (mut concordant, mut discordant, mut tie_x, mut tie_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let dx = x[i] - x[j];
            let dy = y[i] - y[j];
            match (dx == 0.0, dy == 0.0) {
                (true, true) => {}
                (true, false) => tie_x += 1,
                (false, true) => tie_y += 1,
                (false, false) => {
                    if (dx > 0.0) == (dy > 0.0) {
                        concordant += 1;
                    } else {
                        discordant += 1;
                    }
                }
            }
        }
    }
    let n0 = (n * (n - 1) / 2) as i64;
    let both = n0 - concordant - discordant - tie_x - tie_y; // pairs tied in both
    let n1 = tie_x + both; // pairs tied in x
    let n2 = tie_y + both; // pairs tied in y
    let denominator = (((n0 - n1) as f64) * ((n0 - n2) as f64)).sqrt();
    if denominator <= 0.0 {
        return None;
    }
    Some((concordant - discordant) as f64 / denominator)
}

/// The spread of the scores `now` (their standard deviation) over their drift since
/// `before` (the median |now − before|, same rows in the same order): how much better the
/// rows can be told apart than their scores move. `∞` when they do not move at all.
pub fn spread_over_drift(before: &[f32], now: &[f32]) -> f32 {
    let n = before.len().min(now.len());
    if n == 0 {
        return 0.0;
    }
    let mean = now[..n].iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
    let var = now[..n].iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n as f64;
    let mut drift: Vec<f64> = before[..n]
        .iter()
        .zip(&now[..n])
        .map(|(&a, &b)| (f64::from(b) - f64::from(a)).abs())
        .collect();
    drift.sort_by(f64::total_cmp);
    let median = if n % 2 == 1 { drift[n / 2] } else { 0.5 * (drift[n / 2 - 1] + drift[n / 2]) };
    if median <= 0.0 {
        return f32::INFINITY;
    }
    (var.sqrt() / median) as f32
}

/// Parents for `slots` new rows among rows with `scores` (indices into `scores`): with
/// `temperature` 0 the best first, round robin; above 0 drawn with probability
/// ∝ exp(score / temperature), by noise keyed by `key` (deterministic).
pub fn parents(scores: &[f32], slots: usize, temperature: f32, key: u32) -> Vec<usize> {
    if scores.is_empty() || slots == 0 {
        return Vec::new();
    }
    let best_first = top_indices_ordered(scores);
    if temperature <= 0.0 || !temperature.is_finite() {
        return (0..slots).map(|k| best_first[k % best_first.len()]).collect();
    }
    let max = scores.iter().copied().map(rank_key).fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = scores
        .iter()
        .map(|&s| if s.is_finite() { f64::from((s - max) / temperature).exp() } else { 0.0 })
        .collect();
    let total: f64 = weights.iter().sum();
    // Not `total <= 0.0`: a NaN total must take this branch too.
    #[allow(clippy::neg_cmp_op_on_partial_ord, reason = "the negation is what catches NaN")]
    if !(total > 0.0) {
        return (0..slots).map(|k| best_first[k % best_first.len()]).collect();
    }
    (0..slots)
        .map(|k| {
            let u = f64::from(crate::sampling::uniform(key, k as u32)) * total;
            let mut acc = 0.0;
            weights
                .iter()
                .position(|&w| {
                    acc += w;
                    acc >= u
                })
                .unwrap_or(best_first[0])
        })
        .collect()
}

/// Every index, best score first (ties: lower index first; `NaN` last).
fn top_indices_ordered(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| rank_key(scores[b]).total_cmp(&rank_key(scores[a])).then(a.cmp(&b)));
    order
}

/// Kendall's τ-b of two f32 score lists (see [`kendall_tau_b`]).
pub fn kendall_tau(x: &[f32], y: &[f32]) -> Option<f32> {
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let y: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    kendall_tau_b(&x, &y).map(|t| t as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_count_matches_the_paper() {
        assert_eq!(keep_count(10, 0.5), 5);
        assert_eq!(keep_count(10, 0.0), 10);
        assert_eq!(keep_count(10, 0.9), 1);
        assert_eq!(keep_count(3, 0.99), 1);
        assert_eq!(keep_count(7, 0.5), 4); // round half away from zero: 3.5 -> 4
        assert_eq!(keep_count(1, 0.5), 1);
    }

    #[test]
    fn top_indices_break_ties_by_index_and_sink_nan() {
        assert_eq!(top_indices(&[1.0, 3.0, 3.0, 2.0], 2), vec![1, 2]);
        assert_eq!(top_indices(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_indices(&[f32::NAN, 0.0, -1.0], 2), vec![1, 2]);
    }

    /// Values checked against scipy.stats.kendalltau (τ-b).
    #[test]
    fn kendall_tau_b_handles_ties() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(kendall_tau_b(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).unwrap_or(0.0), 1.0));
        assert!(close(kendall_tau_b(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap_or(0.0), -1.0));
        assert!(close(
            kendall_tau_b(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]).unwrap_or(0.0),
            0.6
        ));
        // One tie in each: (4 concordant − 0) / sqrt(5 · 5).
        let t = kendall_tau_b(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 3.0]).unwrap_or(0.0);
        assert!(close(t, 0.8), "{t}");
        assert!(close(
            kendall_tau_b(&[1.0, 1.0, 2.0, 2.0], &[1.0, 2.0, 1.0, 2.0]).unwrap_or(1.0),
            0.0
        ));
        assert_eq!(kendall_tau_b(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(kendall_tau(&[1.0], &[2.0]), None);
    }

    #[test]
    fn spread_over_drift_separates_stable_from_noisy_rankings() {
        // Spread 1 (scores 0, 1, 2 → std 0.816), drift 0.1: well separated.
        assert!(spread_over_drift(&[0.1, 1.1, 2.1], &[0.0, 1.0, 2.0]) > 8.0);
        // The same spread, drift 2: noise.
        assert!(spread_over_drift(&[2.0, -1.0, 4.0], &[0.0, 1.0, 2.0]) < 0.5);
        assert_eq!(spread_over_drift(&[1.0, 2.0], &[1.0, 2.0]), f32::INFINITY);
    }

    #[test]
    fn parents_are_the_best_round_robin_or_drawn_by_score() {
        assert_eq!(parents(&[0.1, 0.9, 0.5], 5, 0.0, 1), vec![1, 2, 0, 1, 2]);
        assert!(parents(&[0.1], 0, 0.0, 1).is_empty());
        // A cold draw picks the best; a hot one spreads; both repeat for the same key.
        let cold = parents(&[0.0, 10.0, 0.0], 50, 0.1, 7);
        assert!(cold.iter().all(|&p| p == 1));
        let hot = parents(&[0.0, 0.1, 0.0], 300, 100.0, 7);
        assert!((0..3).all(|i| hot.iter().filter(|&&p| p == i).count() > 60), "{hot:?}");
        assert_eq!(hot, parents(&[0.0, 0.1, 0.0], 300, 100.0, 7));
    }

    #[test]
    fn summary_of_scores() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
    }
}
