//! Aggregates results.json into the paper's tables: per reward, every method's improvement
//! score and compute against the Best-of-N ladder, with bootstrap confidence intervals over
//! prompts, the share of the oracle's gain each policy reaches, and partial/final reward
//! correlations; a markdown report and SVG plots.

use super::cost::Calibration;
use super::math::{self, Reach, Summary};
use super::replay::RewardName;
use super::{LiveCheck, PolicyName, PromptResult, RewardResult, RunResult, Settings};
use std::fmt::Write as _;

/// One method's aggregate over the counted prompts.
#[derive(Clone, Debug)]
pub struct Point {
    pub label: String,
    pub policy: Option<PolicyName>,
    pub alpha: Option<f32>,
    /// Mean improvement score, and its 95% bootstrap interval.
    pub score: f64,
    pub score_ci: Option<(f64, f64)>,
    /// Σ (generated + reward-model tokens) / the reference's Σ.
    pub rel_tokens: f64,
    /// Σ modelled wall seconds / the reference's Σ.
    pub rel_wall: f64,
    /// Mean initial rows (Speculative Rejection) or rows (Best-of-N).
    pub rows: f64,
    /// Speedup at matched score: the Best-of-N compute reaching this score / this compute.
    pub speedup_tokens: Option<(Reach, f64)>,
    pub speedup_tokens_ci: Option<(f64, f64)>,
    pub speedup_wall: Option<(Reach, f64)>,
    pub speedup_wall_ci: Option<(f64, f64)>,
    /// (score − random's) / (oracle's − random's) at the same α.
    pub oracle_share: Option<f64>,
}

/// Partial against final reward at one position, over prompts.
#[derive(Clone, Debug)]
pub struct CorrelationRow {
    pub position: usize,
    pub prompts: usize,
    pub rows: Summary,
    pub pearson: Option<Summary>,
    pub kendall: Option<Summary>,
    /// The judge asked with the question for unfinished answers instead.
    pub kendall_partial_prompt: Option<Summary>,
}

/// One reward's analysis.
#[derive(Clone, Debug)]
pub struct Analysis {
    pub reward: RewardName,
    pub prompts: usize,
    /// Prompts whose reference rewards were all equal (no improvement score).
    pub skipped: usize,
    pub bon: Vec<Point>,
    pub sr: Vec<Point>,
    pub correlation: Vec<CorrelationRow>,
    pub live: Vec<LiveCheck>,
    /// The recordings' measured wall over their modelled wall (the cost model's check).
    pub recording_wall_ratio: Option<f64>,
    /// Reward-model tokens the evaluation itself ran (memo), over the prompts.
    pub memo_tokens: u64,
}

/// The per-prompt figures one statistic needs.
struct Table<'a> {
    /// Per counted prompt: its reward result and the reference's (min, max) reward.
    prompts: Vec<(&'a RewardResult, f64, f64)>,
    labels: Vec<String>,
    reference: String,
}

impl Table<'_> {
    fn run<'b>(r: &'b RewardResult, label: &str) -> Option<&'b RunResult> {
        r.runs.iter().find(|run| run.label == label)
    }

    /// Mean improvement score, Σ tokens and Σ wall of `label` over the prompts `pick`.
    fn aggregate(&self, label: &str, pick: &[usize]) -> Option<(f64, f64, f64)> {
        let (mut score, mut tokens, mut wall, mut n) = (0.0, 0.0, 0.0, 0usize);
        for &i in pick {
            let (r, min, max) = self.prompts[i];
            let run = Self::run(r, label)?;
            score += math::improvement_score(f64::from(run.best), min, max)?;
            tokens += run.tokens();
            wall += run.wall();
            n += 1;
        }
        (n > 0).then(|| (score / n as f64, tokens, wall))
    }

    /// Per label: (score, rel tokens, rel wall) over `pick`.
    fn points(&self, pick: &[usize]) -> Option<Vec<(f64, f64, f64)>> {
        let (_, ref_tokens, ref_wall) = self.aggregate(&self.reference, pick)?;
        self.labels
            .iter()
            .map(|l| self.aggregate(l, pick).map(|(s, t, w)| (s, t / ref_tokens, w / ref_wall)))
            .collect()
    }
}

/// A statistic of one ladder point, read from the (score, relative tokens, relative wall) points.
type PointStat<'a> = dyn Fn(&[(f64, f64, f64)], usize) -> Option<f64> + 'a;

fn bon_label(n: usize) -> String {
    format!("bon-{n}")
}

/// Speedup at matched score on the ladder `curve`: (where the ladder reaches `score`, ratio).
fn speedup(curve: &[(f64, f64)], score: f64, own: f64) -> Option<(Reach, f64)> {
    let reach = math::compute_for_score(curve, score)?;
    (own > 0.0).then(|| (reach, reach.compute() / own))
}

pub fn analyze(
    settings: &Settings,
    results: &[&PromptResult],
    reward: RewardName,
    bootstrap: usize,
) -> Analysis {
    let reference = bon_label(settings.bon[0]);
    let mut prompts = Vec::new();
    let mut skipped = 0;
    for p in results {
        let Some(r) = p.rewards.iter().find(|r| r.reward == reward) else { continue };
        let n = settings.bon[0].min(r.finals.len());
        let slice = &r.finals[..n];
        let min = slice.iter().map(|&x| f64::from(x)).fold(f64::INFINITY, f64::min);
        let max = slice.iter().map(|&x| f64::from(x)).fold(f64::NEG_INFINITY, f64::max);
        if math::improvement_score(max, min, max).is_some() {
            prompts.push((r, min, max));
        } else {
            skipped += 1;
        }
    }
    let mut labels: Vec<String> = settings.bon.iter().map(|&n| bon_label(n)).collect();
    let mut sr_meta = Vec::new();
    for &policy in &settings.policies {
        for &alpha in &settings.alphas {
            labels.push(format!("{} α={alpha}", policy_label(policy)));
            sr_meta.push((policy, alpha));
        }
    }
    let table = Table { prompts, labels, reference };
    let all: Vec<usize> = (0..table.prompts.len()).collect();
    let points = table.points(&all);
    let ladder = settings.bon.len();
    let curves = |pts: &[(f64, f64, f64)]| {
        let tokens: Vec<(f64, f64)> = pts[..ladder].iter().map(|&(s, t, _)| (t, s)).collect();
        let wall: Vec<(f64, f64)> = pts[..ladder].iter().map(|&(s, _, w)| (w, s)).collect();
        (tokens, wall)
    };
    let rows_of = |label: &str| {
        let v: Vec<f64> = table
            .prompts
            .iter()
            .filter_map(|(r, ..)| Table::run(r, label))
            .map(|run| run.initial_rows as f64)
            .collect();
        if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
    };
    let ci_of = |index: usize, what: &PointStat<'_>| {
        math::bootstrap_ci(table.prompts.len(), bootstrap, |pick| {
            table.points(pick).and_then(|pts| what(&pts, index))
        })
    };
    let mut bon = Vec::new();
    let mut sr = Vec::new();
    if let Some(pts) = &points {
        let (tokens_curve, wall_curve) = curves(pts);
        for (i, label) in table.labels.iter().enumerate() {
            let (score, rel_tokens, rel_wall) = pts[i];
            let score_ci = ci_of(i, &|pts, i| Some(pts[i].0));
            let mut point = Point {
                label: label.clone(),
                policy: None,
                alpha: None,
                score,
                score_ci,
                rel_tokens,
                rel_wall,
                rows: rows_of(label),
                speedup_tokens: None,
                speedup_tokens_ci: None,
                speedup_wall: None,
                speedup_wall_ci: None,
                oracle_share: None,
            };
            if i < ladder {
                bon.push(point);
                continue;
            }
            let (policy, alpha) = sr_meta[i - ladder];
            point.policy = Some(policy);
            point.alpha = Some(alpha);
            point.speedup_tokens = speedup(&tokens_curve, score, rel_tokens);
            point.speedup_wall = speedup(&wall_curve, score, rel_wall);
            point.speedup_tokens_ci = ci_of(i, &|pts, i| {
                let (t, _) = curves(pts);
                speedup(&t, pts[i].0, pts[i].1).map(|(_, x)| x)
            });
            point.speedup_wall_ci = ci_of(i, &|pts, i| {
                let (_, w) = curves(pts);
                speedup(&w, pts[i].0, pts[i].2).map(|(_, x)| x)
            });
            let score_at = |p: PolicyName| {
                let l = format!("{} α={alpha}", policy_label(p));
                table.labels.iter().position(|x| *x == l).map(|j| pts[j].0)
            };
            if let (Some(floor), Some(ceiling)) =
                (score_at(PolicyName::Random), score_at(PolicyName::Oracle))
                && ceiling > floor
            {
                point.oracle_share = Some((score - floor) / (ceiling - floor));
            }
            sr.push(point);
        }
    }
    // Correlation by position, over prompts.
    let mut correlation = Vec::new();
    let positions: Vec<usize> = {
        let mut p: Vec<usize> = results
            .iter()
            .flat_map(|p| {
                p.rewards
                    .iter()
                    .filter(|r| r.reward == reward)
                    .flat_map(|r| r.correlation.iter().map(|c| c.position))
            })
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    for position in positions {
        let at: Vec<&super::Correlation> = results
            .iter()
            .flat_map(|p| p.rewards.iter().filter(|r| r.reward == reward))
            .filter_map(|r| r.correlation.iter().find(|c| c.position == position))
            .collect();
        let rows: Vec<f64> = at.iter().map(|c| c.rows as f64).collect();
        let pearson: Vec<f64> = at.iter().filter_map(|c| c.pearson).collect();
        let kendall: Vec<f64> = at.iter().filter_map(|c| c.kendall).collect();
        let kendall_partial: Vec<f64> =
            at.iter().filter_map(|c| c.kendall_partial_prompt).collect();
        if let Some(rows) = math::summarize(&rows) {
            correlation.push(CorrelationRow {
                position,
                prompts: kendall.len(),
                rows,
                pearson: math::summarize(&pearson),
                kendall: math::summarize(&kendall),
                kendall_partial_prompt: math::summarize(&kendall_partial),
            });
        }
    }
    let live: Vec<LiveCheck> = results
        .iter()
        .flat_map(|p| {
            p.rewards.iter().filter(|r| r.reward == reward).filter_map(|r| r.live_check.clone())
        })
        .collect();
    let (measured, modelled): (f64, f64) = results
        .iter()
        .map(|p| (p.recording.wall_seconds, p.recording.modelled_seconds))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let memo_tokens = results
        .iter()
        .flat_map(|p| p.rewards.iter().filter(|r| r.reward == reward))
        .map(|r| r.memo_tokens)
        .sum();
    Analysis {
        reward,
        prompts: results.len(),
        skipped,
        bon,
        sr,
        correlation,
        live,
        recording_wall_ratio: (modelled > 0.0).then(|| measured / modelled),
        memo_tokens,
    }
}

fn policy_label(p: PolicyName) -> &'static str {
    match p {
        PolicyName::Paper => "paper",
        PolicyName::PaperExact => "paper-exact",
        PolicyName::Random => "random",
        PolicyName::Oracle => "oracle",
        PolicyName::Gate => "gate",
        PolicyName::Adaptive => "adaptive",
    }
}

fn fmt_ci(ci: Option<(f64, f64)>, digits: usize) -> String {
    ci.map_or_else(|| "–".to_string(), |(lo, hi)| format!("[{lo:.digits$}, {hi:.digits$}]"))
}

fn fmt_speedup(s: Option<(Reach, f64)>, largest: &str) -> String {
    match s {
        None => "–".to_string(),
        Some((Reach::At(_), x)) => format!("{x:.2}×"),
        Some((Reach::AtMost(_), x)) => format!("≤ {x:.2}× (below the reference)"),
        Some((Reach::Beyond(_), x)) => format!("> {x:.2}× (beyond {largest})"),
    }
}

fn fmt_summary(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.3} | {:.3} | {:.3} – {:.3}", s.mean, s.median, s.q1, s.q3),
        None => "– | – | –".to_string(),
    }
}

pub fn markdown(
    settings: &Settings,
    calibration: Option<&Calibration>,
    results: &[&PromptResult],
    analyses: &[Analysis],
) -> String {
    let mut md = String::new();
    let largest = bon_label(*settings.bon.last().unwrap_or(&0));
    let _ = writeln!(md, "# specrej bench paper\n");
    let _ = writeln!(
        md,
        "Policy `{}` (on {}, weights {}, K/V {}); {}; at most {} new tokens; every method gets the same KV budget of {:.0} MB; \
         Speculative Rejection starts with as many rows as fit it with room for {} new tokens each (at most {}), and \
         Best-of-N runs in as many sequential batches as the budget needs; seed {} + prompt index. {} prompts.\n",
        settings.model,
        settings.backend,
        settings.weights,
        settings.kv_format,
        settings.sampling,
        settings.max_new_tokens,
        settings.kv_budget_bytes as f64 / 1e6,
        settings.min_new_tokens,
        settings.sr_n,
        settings.seed,
        results.len()
    );
    let _ = writeln!(
        md,
        "Every run is replayed over one recorded {largest} per prompt, through the real scheduler ({}). Tokens = generated + \
         reward-model tokens as the live incremental scorer runs them. Wall = modelled from this machine's measured \
         step, prefill and reward costs{}. Improvement score per prompt = 100·(winner's reward − min of {ref}) / (max − \
         min of {ref}), averaged over the prompts; relative compute = Σ over prompts / {ref}'s Σ; speedup = the \
         Best-of-N compute that reaches the same mean score (log-linear between ladder points) / the method's; \
         intervals: 95% bootstrap over prompts. Oracle share = (score − random's) / (oracle's − random's) at the same α.\n",
        if settings.backend == "cpu" {
            "exact: row-keyed noise and batch-invariant rewards; `--check-live` runs one live to confirm"
        } else {
            "batch invariance, which makes a CPU replay exact, is not established on this backend: a replay is the policy \
             over the recorded tokens, which a live run could differ from by rounding; `--check-live` measures it"
        },
        calibration.map_or_else(String::new, |c| format!(" ({})", c.machine)),
        ref = bon_label(settings.bon[0]),
    );
    for a in analyses {
        let _ = writeln!(md, "## Reward: {}\n", a.reward.label());
        let _ = writeln!(
            md,
            "{} prompts, {} counted ({} with all reference rewards equal).\n",
            a.prompts,
            a.prompts - a.skipped,
            a.skipped
        );
        let _ = writeln!(
            md,
            "| method | rows | improvement score [95% CI] | rel. compute (tokens) | rel. compute (wall) | speedup (tokens) [CI] | speedup (wall) [CI] | oracle share |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for p in a.bon.iter().chain(&a.sr) {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.1} {} | {:.2} | {:.2} | {} {} | {} {} | {} |",
                p.label,
                p.rows,
                p.score,
                fmt_ci(p.score_ci, 1),
                p.rel_tokens,
                p.rel_wall,
                fmt_speedup(p.speedup_tokens, &largest),
                if p.policy.is_some() { fmt_ci(p.speedup_tokens_ci, 2) } else { String::new() },
                fmt_speedup(p.speedup_wall, &largest),
                if p.policy.is_some() { fmt_ci(p.speedup_wall_ci, 2) } else { String::new() },
                p.oracle_share.map_or_else(|| "–".to_string(), |s| format!("{:.0}%", 100.0 * s))
            );
        }
        let _ = writeln!(
            md,
            "\nPartial reward (at the position) against the final reward, over the rows alive there; distribution over prompts:\n"
        );
        let partial = a.correlation.iter().any(|c| c.kendall_partial_prompt.is_some());
        let _ = writeln!(
            md,
            "| position | prompts | rows (median) | Pearson mean | median | IQR | Kendall τ mean | median | IQR |{}",
            if partial { " τ, partial-answer question: mean | median | IQR |" } else { "" }
        );
        let _ = writeln!(
            md,
            "|---:|---:|---:|---:|---:|---|---:|---:|---|{}",
            if partial { "---:|---:|---|" } else { "" }
        );
        for c in &a.correlation {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} |{}",
                c.position,
                c.prompts,
                c.rows.median,
                fmt_summary(&c.pearson),
                fmt_summary(&c.kendall),
                if partial {
                    format!(" {} |", fmt_summary(&c.kendall_partial_prompt))
                } else {
                    String::new()
                }
            );
        }
        if !a.live.is_empty() {
            let _ = writeln!(md, "\nLive runs beside their replays:\n");
            let _ =
                writeln!(md, "| run | outcome equal | difference | live wall (s) | modelled (s) |");
            let _ = writeln!(md, "|---|---|---|---:|---:|");
            for l in &a.live {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.1} | {:.1} |",
                    l.label,
                    if l.equal { "yes" } else { "**no**" },
                    l.difference.as_deref().unwrap_or("–"),
                    l.live_wall_seconds,
                    l.modelled_seconds
                );
            }
        }
        let _ = writeln!(
            md,
            "\nThe recordings' measured wall time is {} their modelled time; the evaluation ran {} reward-model tokens.\n",
            a.recording_wall_ratio.map_or_else(|| "–".to_string(), |r| format!("{r:.2}×")),
            a.memo_tokens
        );
    }
    md
}

/// A plot area with data → pixel mapping.
struct Frame {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x: (f64, f64),
    y: (f64, f64),
    log_x: bool,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        let (v, a, b) = if self.log_x {
            (x.ln(), self.x.0.ln(), self.x.1.ln())
        } else {
            (x, self.x.0, self.x.1)
        };
        self.left + (v - a) / (b - a) * self.width
    }

    fn py(&self, y: f64) -> f64 {
        self.top + self.height - (y - self.y.0) / (self.y.1 - self.y.0) * self.height
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn svg_open(w: u32, h: u32, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2,
        escape(title)
    )
}

fn nice_step(span: f64) -> f64 {
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

fn axes(svg: &mut String, f: &Frame, x_label: &str, y_label: &str) {
    let _ = writeln!(
        svg,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>",
        f.left, f.top, f.width, f.height
    );
    // y ticks
    let step = nice_step(f.y.1 - f.y.0);
    let mut y = (f.y.0 / step).ceil() * step;
    while y <= f.y.1 + 1e-9 {
        let py = f.py(y);
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            f.left,
            f.left + f.width,
            f.left - 5.0,
            py + 4.0,
            trim_number(y)
        );
        y += step;
    }
    // x ticks
    let ticks: Vec<f64> = if f.log_x {
        let mut t = Vec::new();
        let mut decade = 10f64.powf(f.x.0.log10().floor());
        while decade <= f.x.1 {
            for m in [1.0, 2.0, 5.0] {
                let v = m * decade;
                if v >= f.x.0 && v <= f.x.1 {
                    t.push(v);
                }
            }
            decade *= 10.0;
        }
        t
    } else {
        let step = nice_step(f.x.1 - f.x.0);
        let mut t = Vec::new();
        let mut x = (f.x.0 / step).ceil() * step;
        while x <= f.x.1 + 1e-9 {
            t.push(x);
            x += step;
        }
        t
    };
    for x in ticks {
        let px = f.px(x);
        let _ = writeln!(
            svg,
            "<line x1=\"{px:.1}\" y1=\"{}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            f.top,
            f.top + f.height,
            f.top + f.height + 16.0,
            trim_number(x)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        f.left + f.width / 2.0,
        f.top + f.height + 36.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        "<text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        f.left - 45.0,
        f.top + f.height / 2.0,
        escape(y_label)
    );
}

fn trim_number(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo.is_finite() && hi.is_finite()).then_some((lo, hi))
}

/// Improvement score against relative compute (modelled wall), log x: the Best-of-N
/// curve and every policy's points.
pub fn improvement_svg(a: &Analysis) -> String {
    let mut svg = svg_open(
        760,
        500,
        &format!(
            "Improvement score vs relative compute (modelled wall) · reward {}",
            a.reward.label()
        ),
    );
    let points = a.bon.iter().chain(&a.sr);
    let xs = range(points.clone().map(|p| p.rel_wall).filter(|x| *x > 0.0));
    let ys = range(points.map(|p| p.score));
    let (Some((x0, x1)), Some((y0, y1))) = (xs, ys) else {
        svg.push_str("<text x=\"380\" y=\"250\" text-anchor=\"middle\">no data</text>\n</svg>\n");
        return svg;
    };
    let pad_y = ((y1 - y0) * 0.1).max(1.0);
    let f = Frame {
        left: 80.0,
        top: 40.0,
        width: 560.0,
        height: 380.0,
        x: (x0 / 1.3, x1 * 1.3),
        y: (y0 - pad_y, y1 + pad_y),
        log_x: true,
    };
    axes(
        &mut svg,
        &f,
        "relative compute (× reference Best-of-N wall, log scale)",
        "improvement score",
    );
    let path: Vec<String> = a
        .bon
        .iter()
        .filter(|p| p.rel_wall > 0.0 && p.score.is_finite())
        .map(|p| format!("{:.1},{:.1}", f.px(p.rel_wall), f.py(p.score)))
        .collect();
    let _ = writeln!(
        svg,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>",
        path.join(" ")
    );
    for p in a.bon.iter().filter(|p| p.rel_wall > 0.0 && p.score.is_finite()) {
        let (x, y) = (f.px(p.rel_wall), f.py(p.score));
        let _ = writeln!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"#1f77b4\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#1f77b4\">{}</text>",
            x + 6.0,
            y + 14.0,
            escape(&p.label)
        );
    }
    let colors = ["#d62728", "#9467bd", "#7f7f7f", "#2ca02c", "#ff7f0e", "#8c564b"];
    let policies: Vec<PolicyName> = {
        let mut v: Vec<PolicyName> = a.sr.iter().filter_map(|p| p.policy).collect();
        v.dedup();
        v
    };
    for (k, policy) in policies.iter().enumerate() {
        let color = colors[k % colors.len()];
        let pts: Vec<&Point> =
            a.sr.iter()
                .filter(|p| p.policy == Some(*policy) && p.rel_wall > 0.0 && p.score.is_finite())
                .collect();
        let line: Vec<String> =
            pts.iter().map(|p| format!("{:.1},{:.1}", f.px(p.rel_wall), f.py(p.score))).collect();
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>",
            line.join(" ")
        );
        for p in pts {
            let (x, y) = (f.px(p.rel_wall), f.py(p.score));
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"7\" height=\"7\" fill=\"{color}\" transform=\"rotate(45 {x:.1} {y:.1})\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\" font-size=\"10\">{}</text>",
                x - 3.5,
                y - 3.5,
                x + 5.0,
                y - 5.0,
                p.alpha.unwrap_or(0.0)
            );
        }
        let ly = 60.0 + 16.0 * k as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"656\" y=\"{:.1}\" width=\"8\" height=\"8\" fill=\"{color}\"/><text x=\"670\" y=\"{:.1}\">{}</text>",
            ly - 8.0,
            ly,
            policy_label(*policy)
        );
    }
    let _ = writeln!(
        svg,
        "<circle cx=\"660\" cy=\"{:.1}\" r=\"4\" fill=\"#1f77b4\"/><text x=\"670\" y=\"{:.1}\">Best-of-N</text>",
        60.0 + 16.0 * policies.len() as f64 - 4.0,
        60.0 + 16.0 * policies.len() as f64
    );
    svg.push_str("</svg>\n");
    svg
}

/// Box plots (whiskers min–max, box IQR, bar median, ○ mean) of Pearson and Kendall τ by
/// position.
pub fn correlation_svg(a: &Analysis) -> String {
    let mut svg = svg_open(
        720,
        480,
        &format!("Partial vs final reward by position · reward {}", a.reward.label()),
    );
    let groups = a.correlation.len().max(1) as f64;
    let f = Frame {
        left: 80.0,
        top: 40.0,
        width: 600.0,
        height: 370.0,
        x: (0.0, groups),
        y: (-1.0, 1.0),
        log_x: false,
    };
    let _ = writeln!(
        svg,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>",
        f.left, f.top, f.width, f.height
    );
    for i in 0..=8 {
        let y = -1.0 + 0.25 * f64::from(i);
        let py = f.py(y);
        let stroke = if i == 4 { "#999" } else { "#eee" };
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"{stroke}\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            f.left,
            f.left + f.width,
            f.left - 5.0,
            py + 4.0,
            trim_number(y)
        );
    }
    let _ = writeln!(
        svg,
        "<text transform=\"translate(35,{}) rotate(-90)\" text-anchor=\"middle\">correlation with the final reward</text>",
        f.top + f.height / 2.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">tokens generated (position)</text>",
        f.left + f.width / 2.0,
        f.top + f.height + 36.0
    );
    let slot = f.width / groups;
    for (k, c) in a.correlation.iter().enumerate() {
        let center = f.left + slot * (k as f64 + 0.5);
        let _ = writeln!(
            svg,
            "<text x=\"{center:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            f.top + f.height + 16.0,
            c.position
        );
        for (s, dx, color) in [(&c.pearson, -0.2, "#1f77b4"), (&c.kendall, 0.2, "#ff7f0e")] {
            let Some(s) = s else { continue };
            let x = center + dx * slot;
            let w = (slot * 0.3).min(40.0);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{color}\"/>\
                 <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{color}\" fill-opacity=\"0.35\" stroke=\"{color}\"/>\
                 <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>\
                 <circle cx=\"{x:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"white\" stroke=\"black\"/>",
                f.py(s.max),
                f.py(s.min),
                x - w / 2.0,
                f.py(s.q3),
                (f.py(s.q1) - f.py(s.q3)).max(1.0),
                x - w / 2.0,
                f.py(s.median),
                x + w / 2.0,
                f.py(s.median),
                f.py(s.mean)
            );
        }
    }
    let _ = writeln!(
        svg,
        "<rect x=\"96\" y=\"52\" width=\"10\" height=\"10\" fill=\"#1f77b4\" fill-opacity=\"0.35\" stroke=\"#1f77b4\"/><text x=\"112\" y=\"61\">Pearson</text>\
         <rect x=\"96\" y=\"68\" width=\"10\" height=\"10\" fill=\"#ff7f0e\" fill-opacity=\"0.35\" stroke=\"#ff7f0e\"/><text x=\"112\" y=\"77\">Kendall τ-b</text>"
    );
    svg.push_str("</svg>\n");
    svg
}
