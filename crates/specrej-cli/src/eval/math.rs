//! The pure math of `bench paper`: improvement score, speedup by log-linear interpolation,
//! Pearson's correlation (Kendall's τ-b is `specrej_core::select`'s), and summaries.

/// The paper's improvement score for one prompt: `100 · (best − min_ref) / (max_ref − min_ref)`,
/// where `best` is the best candidate reward of a method and `min_ref`/`max_ref` the lowest and
/// highest candidate rewards of the reference Best-of-N. `None` when the reference's rewards
/// are all equal (or not finite): such prompts are skipped and counted.
pub fn improvement_score(best: f64, min_ref: f64, max_ref: f64) -> Option<f64> {
    let span = max_ref - min_ref;
    if !(span.is_finite() && best.is_finite()) || span <= 0.0 {
        return None;
    }
    Some(100.0 * (best - min_ref) / span)
}

/// Where a method's score lands on the Best-of-N curve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reach {
    /// Best-of-N reaches the score at this compute (interpolated log-linearly).
    At(f64),
    /// The score is below the curve's first point: Best-of-N needs at most this compute.
    AtMost(f64),
    /// The score is above every point of the ladder: Best-of-N needs more than this compute.
    Beyond(f64),
}

impl Reach {
    /// The compute figure (a bound for `AtMost`/`Beyond`).
    pub fn compute(self) -> f64 {
        match self {
            Reach::At(c) | Reach::AtMost(c) | Reach::Beyond(c) => c,
        }
    }
}

/// The Best-of-N compute that reaches `score`, given the curve `points` = (compute, score)
/// sorted by compute: the first segment whose scores bracket `score`, interpolated linearly
/// in log(compute). Points with non-positive compute or non-finite values are ignored.
pub fn compute_for_score(points: &[(f64, f64)], score: f64) -> Option<Reach> {
    let points: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(c, s)| *c > 0.0 && c.is_finite() && s.is_finite())
        .collect();
    let first = *points.first()?;
    if !score.is_finite() {
        return None;
    }
    if score <= first.1 {
        return Some(if score == first.1 { Reach::At(first.0) } else { Reach::AtMost(first.0) });
    }
    for pair in points.windows(2) {
        let ((c0, s0), (c1, s1)) = (pair[0], pair[1]);
        if s1 >= score && s0 < score {
            let t = (score - s0) / (s1 - s0);
            return Some(Reach::At((c0.ln() + t * (c1.ln() - c0.ln())).exp()));
        }
    }
    let last = points.last().map_or(first.0, |p| p.0);
    Some(Reach::Beyond(last))
}

/// Pearson's correlation; `None` for fewer than 2 pairs or zero variance.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (x[i] - mx, y[i] - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx <= 0.0 || syy <= 0.0 {
        return None;
    }
    Some(sxy / (sxx * syy).sqrt())
}

/// Mean, median and quartiles (linear interpolation between order statistics), min and max.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
    pub max: f64,
}

/// `None` for no finite values.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        let pos = q * (v.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = pos.ceil() as usize;
        v[lo] + (pos - lo as f64) * (v[hi] - v[lo])
    };
    Some(Summary {
        count: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        min: v[0],
        q1: quantile(0.25),
        median: quantile(0.5),
        q3: quantile(0.75),
        max: v[v.len() - 1],
    })
}

/// Least squares: the coefficients `c` minimising Σ (y − c·x)² over `samples` of `(x, y)`
/// (all `x` of the same length), by the normal equations; `None` when they are singular.
pub fn least_squares(samples: &[(Vec<f64>, f64)]) -> Option<Vec<f64>> {
    let k = samples.first()?.0.len();
    let mut a = vec![vec![0.0; k + 1]; k]; // [XᵀX | Xᵀy]
    for (x, y) in samples {
        for i in 0..k {
            for j in 0..k {
                a[i][j] += x[i] * x[j];
            }
            a[i][k] += x[i] * y;
        }
    }
    // Gauss-Jordan with partial pivoting.
    for col in 0..k {
        let pivot = (col..k).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        let div = a[col][col];
        for v in &mut a[col] {
            *v /= div;
        }
        let pivot_row = a[col].clone();
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col];
                if f != 0.0 {
                    for (x, p) in r[col..=k].iter_mut().zip(&pivot_row[col..=k]) {
                        *x -= f * p;
                    }
                }
            }
        }
    }
    Some(a.iter().map(|r| r[k]).collect())
}

/// Least squares with every coefficient at least 0 (costs cannot be negative): the
/// unconstrained fit, then, while a coefficient is negative, the same with that feature left
/// out. `None` when no subset is solvable.
pub fn least_squares_nonnegative(samples: &[(Vec<f64>, f64)]) -> Option<Vec<f64>> {
    let k = samples.first()?.0.len();
    let mut active: Vec<usize> = (0..k).collect();
    loop {
        let reduced: Vec<(Vec<f64>, f64)> =
            samples.iter().map(|(x, y)| (active.iter().map(|&i| x[i]).collect(), *y)).collect();
        let fit = least_squares(&reduced)?;
        match fit.iter().enumerate().filter(|(_, c)| **c < 0.0).min_by(|a, b| a.1.total_cmp(b.1)) {
            Some((worst, _)) => {
                active.remove(worst);
                if active.is_empty() {
                    return Some(vec![0.0; k]);
                }
            }
            None => {
                let mut out = vec![0.0; k];
                for (&i, c) in active.iter().zip(fit) {
                    out[i] = c;
                }
                return Some(out);
            }
        }
    }
}

/// The `(2.5%, 97.5%)` percentiles of `stat` over `resamples` bootstrap resamples of
/// `0..n` (indices drawn with replacement by a fixed-seed generator, so reports repeat).
/// `None` where `stat` gives no finite value in most resamples.
pub fn bootstrap_ci(
    n: usize,
    resamples: usize,
    mut stat: impl FnMut(&[usize]) -> Option<f64>,
) -> Option<(f64, f64)> {
    if n == 0 || resamples == 0 {
        return None;
    }
    let mut state = 0x5eed_u64;
    let mut next = || {
        // SplitMix64.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut values = Vec::with_capacity(resamples);
    let mut pick = vec![0usize; n];
    for _ in 0..resamples {
        for p in &mut pick {
            *p = (next() % n as u64) as usize;
        }
        if let Some(v) = stat(&pick).filter(|v| v.is_finite()) {
            values.push(v);
        }
    }
    if values.len() * 2 < resamples {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((q * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)];
    Some((at(0.025), at(0.975)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn improvement_score_matches_the_paper() {
        assert_eq!(improvement_score(3.0, 1.0, 3.0), Some(100.0));
        assert_eq!(improvement_score(1.0, 1.0, 3.0), Some(0.0));
        assert_eq!(improvement_score(4.0, 1.0, 3.0), Some(150.0));
        assert_eq!(improvement_score(2.0, 2.0, 2.0), None);
        assert_eq!(improvement_score(f64::NAN, 0.0, 1.0), None);
    }

    #[test]
    fn interpolates_in_log_compute() {
        let curve = [(1.0, 100.0), (2.0, 120.0), (4.0, 140.0), (8.0, 150.0)];
        assert_eq!(compute_for_score(&curve, 100.0), Some(Reach::At(1.0)));
        assert_eq!(compute_for_score(&curve, 90.0), Some(Reach::AtMost(1.0)));
        assert_eq!(compute_for_score(&curve, 160.0), Some(Reach::Beyond(8.0)));
        let Some(Reach::At(c)) = compute_for_score(&curve, 130.0) else { panic!("expected At") };
        assert!(close(c, 8f64.sqrt()), "{c}");
        let Some(Reach::At(c)) = compute_for_score(&curve, 145.0) else { panic!("expected At") };
        assert!(close(c, 32f64.sqrt()), "{c}");
        assert_eq!(compute_for_score(&[], 1.0), None);
        // A dip: the first bracketing segment wins.
        let dip = [(1.0, 100.0), (2.0, 130.0), (4.0, 110.0), (8.0, 140.0)];
        let Some(Reach::At(c)) = compute_for_score(&dip, 115.0) else { panic!("expected At") };
        assert!(close(c, 2f64.sqrt()), "{c}");
    }

    #[test]
    fn pearson_known_values() {
        assert!(close(pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap_or(0.0), 1.0));
        assert!(close(pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap_or(0.0), -1.0));
        // numpy.corrcoef([1,2,3,4,5],[2,1,4,3,5])[0,1] = 0.8
        assert!(close(
            pearson(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]).unwrap_or(0.0),
            0.8
        ));
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0], &[1.0]), None);
    }

    #[test]
    fn least_squares_recovers_a_plane() {
        let samples: Vec<(Vec<f64>, f64)> = (0..20)
            .map(|i| {
                (
                    vec![1.0, f64::from(i), f64::from(i * i % 7)],
                    3.0 + 2.0 * f64::from(i) - 0.5 * f64::from(i * i % 7),
                )
            })
            .collect();
        let c = least_squares(&samples).expect("solvable");
        assert!(close(c[0], 3.0) && close(c[1], 2.0) && close(c[2], -0.5), "{c:?}");
        assert_eq!(
            least_squares(&[(vec![1.0, 1.0], 2.0), (vec![2.0, 2.0], 4.0)]),
            None,
            "collinear"
        );
    }

    #[test]
    fn nonnegative_least_squares_drops_features_that_would_go_negative() {
        // y = 2 + 3x, plus a feature that would fit a negative weight on noise.
        let samples: Vec<(Vec<f64>, f64)> = (0..10)
            .map(|i| {
                let x = f64::from(i);
                (
                    vec![1.0, x, x + if i % 2 == 0 { 0.1 } else { -0.1 }],
                    2.0 + 3.0 * x - if i % 2 == 0 { 0.05 } else { -0.05 },
                )
            })
            .collect();
        let c = least_squares_nonnegative(&samples).expect("solvable");
        assert!(c.iter().all(|&v| v >= 0.0), "{c:?}");
        let predicted = |x: &[f64]| x.iter().zip(&c).map(|(a, b)| a * b).sum::<f64>();
        assert!((predicted(&samples[5].0) - samples[5].1).abs() < 0.2, "{c:?}");
    }

    #[test]
    fn bootstrap_brackets_the_mean_and_repeats() {
        let values: Vec<f64> = (0..50).map(|i| f64::from(i % 10)).collect();
        let mean =
            |pick: &[usize]| Some(pick.iter().map(|&i| values[i]).sum::<f64>() / pick.len() as f64);
        let (lo, hi) = bootstrap_ci(values.len(), 2000, mean).expect("interval");
        assert!(lo < 4.5 && 4.5 < hi && hi - lo < 2.0, "{lo} {hi}");
        assert_eq!(bootstrap_ci(values.len(), 2000, mean), Some((lo, hi)));
        assert_eq!(bootstrap_ci(3, 100, |_| None), None);
    }

    #[test]
    fn summaries() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0, f64::NAN]).expect("values");
        assert_eq!(s.count, 4);
        assert!(
            close(s.mean, 2.5) && close(s.median, 2.5) && close(s.q1, 1.75) && close(s.q3, 3.25)
        );
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert_eq!(summarize(&[]), None);
    }
}
