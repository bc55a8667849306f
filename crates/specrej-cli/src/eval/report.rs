//! Aggregates results.json into the paper's figures: a markdown table and two SVG plots.

use super::math::{self, Reach, Summary};
use super::{PromptResult, Run, Settings};
use std::fmt::Write as _;

/// One method's aggregate over the prompts that count.
#[derive(Clone, Debug)]
pub struct Point {
    pub label: String,
    pub alpha: Option<f32>,
    /// Mean improvement score.
    pub score: f64,
    /// Σ (generated + reward-model tokens) / the reference's Σ.
    pub rel_tokens: f64,
    /// Σ wall seconds / the reference's Σ.
    pub rel_wall: f64,
}

/// The correlation at one decision (by order: first decision, second, …) over prompts.
#[derive(Clone, Debug)]
pub struct CorrelationRow {
    /// "decision k" (the k-th decision of the SR run the positions came from) or "fixed p".
    pub label: String,
    /// The plot's axis label.
    pub short: String,
    pub positions: Summary,
    pub pearson: Option<Summary>,
    pub kendall: Option<Summary>,
}

#[derive(Clone, Debug)]
pub struct Analysis {
    pub prompts: usize,
    /// Prompts whose reference rewards were all equal (no improvement score).
    pub skipped: usize,
    pub bon: Vec<Point>,
    /// With the speedup in tokens and in wall time.
    pub sr: Vec<(Point, Option<Reach>, Option<Reach>)>,
    pub correlation: Vec<CorrelationRow>,
    pub correlation_source: String,
    pub total_wall: f64,
}

/// A method's figures on one prompt.
#[derive(Clone, Copy, Debug)]
struct Cost {
    best: f64,
    tokens: f64,
    wall: f64,
}

/// Best-of-`n` as the first `n` rows of the largest run: its tokens, plus the run's reward
/// tokens and wall time scaled by those rows' share of the generated tokens.
fn bon_cost(run: &Run, n: usize) -> (Cost, f64, f64) {
    let rows: Vec<_> = run.candidates.iter().filter(|c| (c.row as usize) < n).collect();
    let generated: usize = rows.iter().map(|c| c.tokens).sum();
    let all: usize = run.candidates.iter().map(|c| c.tokens).sum::<usize>().max(1);
    let share = if n >= run.n { 1.0 } else { generated as f64 / all as f64 };
    let best = rows.iter().map(|c| f64::from(c.reward)).fold(f64::NEG_INFINITY, f64::max);
    let min = rows.iter().map(|c| f64::from(c.reward)).fold(f64::INFINITY, f64::min);
    let cost = Cost {
        best,
        tokens: generated as f64 + run.stats.reward_tokens as f64 * share,
        wall: run.stats.wall_seconds * share,
    };
    (cost, min, best)
}

fn run_cost(run: &Run) -> Cost {
    Cost {
        best: run.candidates.iter().map(|c| f64::from(c.reward)).fold(f64::NEG_INFINITY, f64::max),
        tokens: (run.stats.tokens_generated as u64 + run.stats.reward_tokens) as f64,
        wall: run.stats.wall_seconds,
    }
}

pub fn analyze(settings: &Settings, results: &[&PromptResult]) -> Analysis {
    let reference = settings.bon[0];
    let mut counted: Vec<(&PromptResult, f64, f64)> = Vec::new(); // prompt, min_ref, max_ref
    let mut skipped = 0;
    for p in results {
        let (_, min, max) = bon_cost(&p.bon, reference);
        if math::improvement_score(max, min, max).is_some() {
            counted.push((p, min, max));
        } else {
            skipped += 1;
        }
    }
    let ref_tokens: f64 = counted.iter().map(|(p, ..)| bon_cost(&p.bon, reference).0.tokens).sum();
    let ref_wall: f64 = counted.iter().map(|(p, ..)| bon_cost(&p.bon, reference).0.wall).sum();
    let point = |label: String, alpha: Option<f32>, cost: &dyn Fn(&PromptResult) -> Cost| {
        let costs: Vec<(Cost, f64, f64)> = counted.iter().map(|(p, min, max)| (cost(p), *min, *max)).collect();
        let scores: Vec<f64> =
            costs.iter().filter_map(|(c, min, max)| math::improvement_score(c.best, *min, *max)).collect();
        let tokens: f64 = costs.iter().map(|(c, ..)| c.tokens).sum();
        let wall: f64 = costs.iter().map(|(c, ..)| c.wall).sum();
        Point {
            label,
            alpha,
            score: if scores.is_empty() { f64::NAN } else { scores.iter().sum::<f64>() / scores.len() as f64 },
            rel_tokens: tokens / ref_tokens,
            rel_wall: wall / ref_wall,
        }
    };
    let bon: Vec<Point> = settings
        .bon
        .iter()
        .map(|&n| {
            let label = if n == reference { format!("BoN-{n} (reference)") } else { format!("BoN-{n}") };
            point(label, None, &|p: &PromptResult| bon_cost(&p.bon, n).0)
        })
        .collect();
    let tokens_curve: Vec<(f64, f64)> = bon.iter().map(|b| (b.rel_tokens, b.score)).collect();
    let wall_curve: Vec<(f64, f64)> = bon.iter().map(|b| (b.rel_wall, b.score)).collect();
    let sr = settings
        .alphas
        .iter()
        .enumerate()
        .map(|(i, &alpha)| {
            let p = point(format!("SR α={alpha}"), Some(alpha), &|p: &PromptResult| {
                p.sr.get(i).map_or(Cost { best: f64::NAN, tokens: 0.0, wall: 0.0 }, run_cost)
            });
            let by_tokens = math::compute_for_score(&tokens_curve, p.score);
            let by_wall = math::compute_for_score(&wall_curve, p.score);
            (p, by_tokens, by_wall)
        })
        .collect();

    // Correlation, grouped by decision order (positions from an SR trace) or by position
    // (fixed positions, for prompts where SR made no decision).
    let mut groups: std::collections::BTreeMap<(bool, usize), Vec<&super::Correlation>> = Default::default();
    for p in results {
        for (k, c) in p.correlation.iter().enumerate() {
            let key = if c.source == "fixed" { (true, c.position) } else { (false, k + 1) };
            groups.entry(key).or_default().push(c);
        }
    }
    let correlation = groups
        .into_iter()
        .filter_map(|((fixed, k), at)| {
            let positions: Vec<f64> = at.iter().map(|c| c.position as f64).collect();
            let pearson: Vec<f64> = at.iter().filter_map(|c| c.pearson).collect();
            let kendall: Vec<f64> = at.iter().filter_map(|c| c.kendall).collect();
            let positions = math::summarize(&positions)?;
            let (label, short) = if fixed {
                (format!("fixed {k}"), format!("@{k}"))
            } else {
                (format!("decision {k}"), format!("#{k} ({:.0})", positions.median))
            };
            Some(CorrelationRow {
                label,
                short,
                positions,
                pearson: math::summarize(&pearson),
                kendall: math::summarize(&kendall),
            })
        })
        .collect();
    let mut sources: Vec<String> =
        results.iter().filter_map(|p| p.correlation.first().map(|c| c.source.clone())).collect();
    sources.sort();
    sources.dedup();
    let total_wall =
        results.iter().map(|p| p.bon.stats.wall_seconds + p.sr.iter().map(|r| r.stats.wall_seconds).sum::<f64>()).sum();
    Analysis {
        prompts: results.len(),
        skipped,
        bon,
        sr,
        correlation,
        correlation_source: sources.join(", "),
        total_wall,
    }
}

fn speedup(reach: Option<Reach>, own: f64, largest: &str) -> String {
    let Some(reach) = reach else { return "–".to_string() };
    let ratio = reach.compute() / own;
    match reach {
        Reach::At(_) => format!("{ratio:.2}×"),
        Reach::AtMost(_) => format!("≤ {ratio:.2}× (below the reference)"),
        Reach::Beyond(_) => format!("> {ratio:.2}× (beyond {largest})"),
    }
}

fn fmt_summary(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{:.3} | {:.3} | {:.3} – {:.3}", s.mean, s.median, s.q1, s.q3),
        None => "– | – | –".to_string(),
    }
}

pub fn markdown(settings: &Settings, a: &Analysis) -> String {
    let mut md = String::new();
    let largest = format!("BoN-{}", settings.bon.last().copied().unwrap_or(0));
    let _ = writeln!(md, "# specrej bench paper\n");
    let _ = writeln!(
        md,
        "Model `{}` (weights {}) as policy, reward `{}`; {}; max {} new tokens; SR starts with {} rows, \
         KV budget {}, min {} new tokens before the first decision; seed {} + prompt index.\n",
        settings.model,
        settings.weights,
        settings.reward,
        settings.sampling,
        settings.max_new_tokens,
        settings.sr_n,
        settings.kv_budget_tokens.map_or_else(
            || format!(
                "{} × (prompt + {}) tokens",
                settings.sr_n,
                settings.min_new_tokens.min(settings.max_new_tokens)
            ),
            |t| format!("{t} tokens")
        ),
        settings.min_new_tokens,
        settings.seed,
    );
    let _ = writeln!(
        md,
        "{} prompts; {} counted, {} skipped (all reference rewards equal). Generation wall time {:.1} s.\n",
        a.prompts,
        a.prompts - a.skipped,
        a.skipped,
        a.total_wall
    );
    let _ = writeln!(md, "| method | improvement score | rel. compute (tokens) | rel. compute (wall) | speedup (tokens) | speedup (wall) |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for b in &a.bon {
        let _ = writeln!(md, "| {} | {:.1} | {:.2} | {:.2} | | |", b.label, b.score, b.rel_tokens, b.rel_wall);
    }
    for (p, t, w) in &a.sr {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.2} | {:.2} | {} | {} |",
            p.label,
            p.score,
            p.rel_tokens,
            p.rel_wall,
            speedup(*t, p.rel_tokens, &largest),
            speedup(*w, p.rel_wall, &largest)
        );
    }
    let _ = writeln!(
        md,
        "\nImprovement score per prompt = 100·(best reward of the method − min reward of {ref}) / (max − min \
         reward of {ref}), averaged over the counted prompts. Relative compute = Σ over prompts of the method's \
         cost / Σ of {ref}'s; tokens = generated tokens + reward-model tokens (prefill excluded). Only {largest} \
         is run: BoN-N for smaller N is its rows 0..N (identical text: sampling noise is keyed by seed, row id and \
         position); its tokens are those rows' tokens, and its reward-model tokens and wall time are {largest}'s \
         scaled by those rows' share of the generated tokens (an approximation: a smaller batch has a different \
         per-token cost). Speedup = the BoN compute reaching the same improvement score (log-linear \
         interpolation between ladder points) / SR's compute; \"> x (beyond …)\" when SR scores above the whole \
         ladder. Wall times include the reward model and are noisy on a shared machine; on a CPU the cost of a \
         decoding step of a small model depends little on the number of rows, so rejecting rows saves less wall \
         time than tokens, and the token-share scaling of the derived BoN-N understates \
         the wall time a separate small-N run would take.\n",
        ref = a.bon.first().map_or("the reference", |b| b.label.trim_end_matches(" (reference)")),
    );
    let _ = writeln!(md, "## Partial vs final reward ({largest}'s rows, positions from {})\n", a.correlation_source);
    let _ = writeln!(
        md,
        "Per prompt: rows still generating at the position, their prefix scored by the reward model, \
         against their final reward. Distribution over prompts.\n"
    );
    let _ = writeln!(md, "| where | position (median, range) | prompts | Pearson mean | median | IQR | Kendall τ mean | median | IQR |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---|---:|---:|---|");
    for c in &a.correlation {
        let _ = writeln!(
            md,
            "| {} | {:.0} ({:.0}–{:.0}) | {} | {} | {} |",
            c.label,
            c.positions.median,
            c.positions.min,
            c.positions.max,
            c.pearson.map_or(0, |s| s.count),
            fmt_summary(&c.pearson),
            fmt_summary(&c.kendall)
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
        let (v, a, b) = if self.log_x { (x.ln(), self.x.0.ln(), self.x.1.ln()) } else { (x, self.x.0, self.x.1) };
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

/// Improvement score against relative compute (tokens), log x: BoN curve and SR points.
pub fn improvement_svg(a: &Analysis) -> String {
    let mut svg = svg_open(720, 480, "Improvement score vs relative compute (generated + reward-model tokens)");
    let points = a.bon.iter().chain(a.sr.iter().map(|(p, ..)| p));
    let xs = range(points.clone().map(|p| p.rel_tokens).filter(|x| *x > 0.0));
    let ys = range(points.map(|p| p.score));
    let (Some((x0, x1)), Some((y0, y1))) = (xs, ys) else {
        svg.push_str("<text x=\"360\" y=\"240\" text-anchor=\"middle\">no data</text>\n</svg>\n");
        return svg;
    };
    let pad_y = ((y1 - y0) * 0.1).max(1.0);
    let f = Frame {
        left: 80.0,
        top: 40.0,
        width: 600.0,
        height: 370.0,
        x: (x0 / 1.3, x1 * 1.3),
        y: (y0 - pad_y, y1 + pad_y),
        log_x: true,
    };
    axes(&mut svg, &f, "relative compute (× reference Best-of-N, log scale)", "improvement score");
    let path: Vec<String> = a
        .bon
        .iter()
        .filter(|p| p.rel_tokens > 0.0 && p.score.is_finite())
        .map(|p| format!("{:.1},{:.1}", f.px(p.rel_tokens), f.py(p.score)))
        .collect();
    let _ =
        writeln!(svg, "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>", path.join(" "));
    for p in a.bon.iter().filter(|p| p.rel_tokens > 0.0 && p.score.is_finite()) {
        let (x, y) = (f.px(p.rel_tokens), f.py(p.score));
        let label = p.label.trim_end_matches(" (reference)");
        let _ = writeln!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"#1f77b4\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#1f77b4\">{}</text>",
            x + 6.0,
            y + 14.0,
            escape(label)
        );
    }
    for (p, ..) in a.sr.iter().filter(|(p, ..)| p.rel_tokens > 0.0 && p.score.is_finite()) {
        let (x, y) = (f.px(p.rel_tokens), f.py(p.score));
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"8\" height=\"8\" fill=\"#d62728\" transform=\"rotate(45 {x:.1} {y:.1})\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#d62728\">α={}</text>",
            x - 4.0,
            y - 4.0,
            x + 6.0,
            y - 6.0,
            p.alpha.unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        svg,
        "<circle cx=\"100\" cy=\"58\" r=\"4\" fill=\"#1f77b4\"/><text x=\"110\" y=\"62\">Best-of-N</text>\
         <rect x=\"96\" y=\"70\" width=\"8\" height=\"8\" fill=\"#d62728\" transform=\"rotate(45 100 74)\"/>\
         <text x=\"110\" y=\"78\">Speculative Rejection</text>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"680\" y=\"{}\" text-anchor=\"end\" font-size=\"10\">{} prompts ({} skipped)</text>",
        f.top + 14.0,
        a.prompts,
        a.skipped
    );
    svg.push_str("</svg>\n");
    svg
}

/// Box plots (whiskers min–max, box IQR, line median) of Pearson and Kendall τ per decision.
pub fn correlation_svg(a: &Analysis) -> String {
    let mut svg = svg_open(720, 480, "Partial vs final reward: correlation over prompts, per decision");
    let groups = a.correlation.len().max(1) as f64;
    let f =
        Frame { left: 80.0, top: 40.0, width: 600.0, height: 370.0, x: (0.0, groups), y: (-1.0, 1.0), log_x: false };
    // y axis only; categorical x.
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
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">#k: k-th SR decision (median position) · @p: fixed position p · from {}</text>",
        f.left + f.width / 2.0,
        f.top + f.height + 36.0,
        escape(&a.correlation_source)
    );
    let slot = f.width / groups;
    for (k, c) in a.correlation.iter().enumerate() {
        let center = f.left + slot * (k as f64 + 0.5);
        let _ = writeln!(
            svg,
            "<text x=\"{center:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            f.top + f.height + 16.0,
            escape(&c.short)
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
         <rect x=\"96\" y=\"68\" width=\"10\" height=\"10\" fill=\"#ff7f0e\" fill-opacity=\"0.35\" stroke=\"#ff7f0e\"/><text x=\"112\" y=\"77\">Kendall τ-b</text>\
         <text x=\"112\" y=\"93\" font-size=\"10\">box: quartiles · bar: median · ○: mean · whiskers: min–max</text>"
    );
    svg.push_str("</svg>\n");
    svg
}
