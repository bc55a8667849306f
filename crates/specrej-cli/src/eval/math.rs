//! The pure math of `bench paper`: improvement score, speedup by log-linear interpolation,
//! Pearson and Kendall τ-b, and summaries.

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
    let points: Vec<(f64, f64)> =
        points.iter().copied().filter(|(c, s)| *c > 0.0 && c.is_finite() && s.is_finite()).collect();
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
        assert!(close(pearson(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]).unwrap_or(0.0), 0.8));
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0], &[1.0]), None);
    }

    #[test]
    fn kendall_tau_b_with_ties() {
        assert!(close(kendall_tau_b(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).unwrap_or(0.0), 1.0));
        assert!(close(kendall_tau_b(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap_or(0.0), -1.0));
        // scipy.stats.kendalltau([1,2,3,4,5],[2,1,4,3,5]) = 0.6
        assert!(close(kendall_tau_b(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]).unwrap_or(0.0), 0.6));
        // scipy.stats.kendalltau([1,2,2,3],[1,2,3,3]) (tau-b) = 0.8
        let t = kendall_tau_b(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 3.0]).unwrap_or(0.0);
        assert!(close(t, 0.8), "{t}");
        // scipy.stats.kendalltau([1,1,2,2],[1,2,1,2]) = 0
        assert!(close(kendall_tau_b(&[1.0, 1.0, 2.0, 2.0], &[1.0, 2.0, 1.0, 2.0]).unwrap_or(1.0), 0.0));
        assert_eq!(kendall_tau_b(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
    }

    #[test]
    fn summaries() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0, f64::NAN]).expect("values");
        assert_eq!(s.count, 4);
        assert!(close(s.mean, 2.5) && close(s.median, 2.5) && close(s.q1, 1.75) && close(s.q3, 3.25));
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert_eq!(summarize(&[]), None);
    }
}
