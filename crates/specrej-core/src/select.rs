//! Pure selection math: how many rows to start with, how many to keep, which ones.

/// Rows kept at a decision for rejection rate `alpha`: `max(1, round((1 − α)·live))`.
pub fn keep_count(live: usize, alpha: f32) -> usize {
    let kept = ((1.0 - f64::from(alpha)) * live as f64).round() as usize;
    kept.clamp(1, live.max(1))
}

/// Initial row count for Speculative Rejection: the most rows that fit `capacity` cached
/// tokens while leaving each room for `min_new_tokens` new ones, capped by `max_rows`.
/// `None` when not even one row fits.
pub fn initial_rows(
    capacity: usize,
    prompt_len: usize,
    min_new_tokens: usize,
    max_rows: usize,
) -> Option<usize> {
    let per_row = prompt_len + min_new_tokens.max(1);
    let fit = capacity / per_row;
    (fit >= 1).then(|| fit.min(max_rows))
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
    fn initial_rows_fill_the_budget() {
        assert_eq!(initial_rows(1000, 10, 10, 1000), Some(50));
        assert_eq!(initial_rows(1000, 10, 10, 16), Some(16));
        assert_eq!(initial_rows(15, 10, 10, 16), None);
        assert_eq!(initial_rows(20, 10, 0, 16), Some(1)); // min_new_tokens is at least 1
    }

    #[test]
    fn top_indices_break_ties_by_index_and_sink_nan() {
        assert_eq!(top_indices(&[1.0, 3.0, 3.0, 2.0], 2), vec![1, 2]);
        assert_eq!(top_indices(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_indices(&[f32::NAN, 0.0, -1.0], 2), vec![1, 2]);
    }

    #[test]
    fn summary_of_scores() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
    }
}
