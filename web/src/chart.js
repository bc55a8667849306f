// The decision chart: partial reward of every row at every decision (x: tokens generated,
// y: reward), kept rows in green, cut rows in red, the cut line dashed; the final scores of
// the candidates on the right, the winner in gold. Plain SVG, redrawn on each event.

const NS = 'http://www.w3.org/2000/svg';
const W = 420;
const H = 260;
const M = { left: 40, right: 12, top: 12, bottom: 28 };

function el(name, attrs, parent) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  parent.appendChild(e);
  return e;
}

/**
 * `decisions`: [{ position, threshold, rows: [..], scores: [..], kept: [..] }]
 * `finals`: [{ row, score, tokens }] (candidates, best first) or null.
 * `maxTokens`: the x range.
 */
export function drawChart(svg, decisions, finals, maxTokens) {
  svg.replaceChildren();
  const values = [];
  for (const d of decisions) values.push(...d.scores.filter(Number.isFinite));
  if (finals) values.push(...finals.map((c) => c.score).filter(Number.isFinite));
  const xMax = Math.max(1, maxTokens);
  let lo = values.length ? Math.min(...values) : -1;
  let hi = values.length ? Math.max(...values) : 1;
  if (hi - lo < 1e-6) {
    lo -= 1;
    hi += 1;
  }
  const pad = (hi - lo) * 0.08;
  lo -= pad;
  hi += pad;
  const x = (t) => M.left + (t / xMax) * (W - M.left - M.right);
  const y = (v) => M.top + (1 - (v - lo) / (hi - lo)) * (H - M.top - M.bottom);

  el('line', { class: 'axis', x1: M.left, y1: H - M.bottom, x2: W - M.right, y2: H - M.bottom }, svg);
  el('line', { class: 'axis', x1: M.left, y1: M.top, x2: M.left, y2: H - M.bottom }, svg);
  // Enough decimals that the three labels differ (a narrow range needs more than one).
  const digits = Math.min(4, Math.max(1, Math.ceil(-Math.log10((hi - lo - 2 * pad) / 2)) + 1));
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    el('text', { x: 4, y: y(v) + 3 }, svg).textContent = v.toFixed(digits);
  }
  for (const t of [0, Math.round(xMax / 2), xMax]) {
    el('text', { x: x(t) - 6, y: H - M.bottom + 14 }, svg).textContent = String(t);
  }
  el('text', { x: W / 2 - 40, y: H - 3 }, svg).textContent = 'tokens generated';
  if (!decisions.length && !finals) {
    el('text', { x: W / 2 - 80, y: H / 2 }, svg).textContent = 'decisions appear here as they happen';
    return;
  }

  // Trails: each row's scores across decisions (and its final score).
  const byRow = new Map();
  for (const d of decisions) {
    d.rows.forEach((row, i) => {
      if (!byRow.has(row)) byRow.set(row, []);
      byRow.get(row).push([d.position, d.scores[i]]);
    });
  }
  if (finals) {
    for (const c of finals) {
      if (!byRow.has(c.row)) byRow.set(c.row, []);
      byRow.get(c.row).push([c.tokens, c.score]);
    }
  }
  for (const points of byRow.values()) {
    if (points.length < 2) continue;
    el('polyline', { class: 'trail', points: points.map(([t, v]) => `${x(t)},${y(v)}`).join(' ') }, svg);
  }

  decisions.forEach((d, k) => {
    const kept = new Set(d.kept);
    const cx = x(d.position);
    el('line', { class: 'cutline', x1: cx - 16, x2: cx + 16, y1: y(d.threshold), y2: y(d.threshold) }, svg);
    el('text', { x: cx - 8, y: M.top + 8 }, svg).textContent = `D${k + 1}`;
    d.rows.forEach((row, i) => {
      const c = el('circle', { class: kept.has(row) ? 'kept' : 'cut', cx, cy: y(d.scores[i]), r: 3.2 }, svg);
      el('title', {}, c).textContent = `row ${row}: ${d.scores[i].toFixed(3)} ${kept.has(row) ? 'kept' : 'cut'}`;
    });
  });
  if (finals) {
    finals.forEach((f, i) => {
      const c = el('circle', { class: i === 0 ? 'final' : 'kept', cx: x(f.tokens), cy: y(f.score), r: i === 0 ? 5 : 3 }, svg);
      el('title', {}, c).textContent = `row ${f.row}: final reward ${f.score.toFixed(3)}${i === 0 ? ' (winner)' : ''}`;
    });
  }
}
