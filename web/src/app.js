// The page (main thread): controls, the live view, the chart and the statistics. All work
// happens in src/worker.js; this file only renders what the worker reports.
//
// State for tests and people alike is on <body data-state="…">: idle, loading, ready,
// running, done, error.

import { drawChart } from './chart.js';
import { cachedModel, clearModelCache } from './model-cache.js';

const $ = (id) => document.getElementById(id);
const DEFAULT_MODEL = 'models/SmolLM2-135M-Instruct.Q4_1.gguf';
const params = new URLSearchParams(location.search);

let worker = null;
let runId = 0;
let view = null; // the current run's view state
let loadedBackend = null;

function setState(state) {
  document.body.dataset.state = state;
  $('run').disabled = !(state === 'ready' || state === 'done' || state === 'error') || !loadedBackend;
  $('stop').disabled = state !== 'running';
  $('load').disabled = state === 'loading' || state === 'running';
}

function banner(html, error = false) {
  const b = $('gpu-banner');
  b.hidden = false;
  b.className = error ? 'banner error' : 'banner';
  b.innerHTML = html;
}

const fmtBytes = (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(0)} kB`);

async function checkPlatform() {
  const problems = [];
  let adapterInfo = null;
  if (!('gpu' in navigator)) {
    problems.push('This browser has no WebGPU (<code>navigator.gpu</code> is missing).');
  } else {
    try {
      const adapter = await navigator.gpu.requestAdapter();
      if (!adapter) problems.push('WebGPU is present but no GPU adapter is available (blocklisted GPU or disabled).');
      else adapterInfo = adapter.info ? `${adapter.info.vendor} ${adapter.info.architecture} ${adapter.info.description}`.trim() : 'available';
    } catch (e) {
      problems.push(`WebGPU adapter request failed: ${e.message}`);
    }
  }
  const jspi = typeof WebAssembly.Suspending === 'function';
  if (problems.length) {
    banner(`<strong>WebGPU is unavailable.</strong> ${problems.join(' ')} The model runs on the
      <em>CPU</em> instead (candle compiled to WebAssembly, one thread: slower).
      ${jspi ? '' : 'This browser also lacks JSPI, so the scheduler runs in its synchronous build.'}`);
    if ($('backend').value === 'auto' || $('backend').value === 'webgpu') $('backend').value = 'cpu';
  } else if (!jspi) {
    banner('<strong>This browser lacks JSPI</strong> (WebAssembly JavaScript Promise Integration), which the WebGPU path needs to wait for GPU results under the synchronous component interface (Chromium 137 or later has it). The model runs on the <em>CPU</em> instead (WebAssembly, synchronous).');
    if ($('backend').value === 'auto' || $('backend').value === 'webgpu') $('backend').value = 'cpu';
  }
  $('model-info').dataset.adapter = adapterInfo ?? '';
  return { adapterInfo, jspi };
}

async function showCacheState() {
  const url = $('model-url').value;
  try {
    const hit = await cachedModel(new URL(url, location.href).href);
    $('progress-text').textContent = hit ? `cached in this browser (${fmtBytes(hit.size)}): loads without downloading` : 'not loaded (not cached yet)';
  } catch {
    /* no Cache API */
  }
}

function newWorker() {
  if (worker) worker.terminate();
  worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
  worker.onmessage = ({ data }) => onMessage(data);
  worker.onerror = (e) => {
    failed(`worker error: ${e.message || 'failed to start (module load error)'}`);
    e.preventDefault();
  };
}

function failed(message) {
  if (view) clearInterval(view.timer);
  $('run-status').textContent = '';
  banner(`<strong>Error.</strong> ${escapeHtml(message)}`, true);
  document.body.dataset.error = message;
  setState('error');
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);
}

function load() {
  newWorker();
  loadedBackend = null;
  setState('loading');
  delete document.body.dataset.error;
  $('gpu-banner').hidden = true;
  const url = new URL($('model-url').value, location.href).href;
  worker.postMessage({ type: 'load', url, backend: $('backend').value, forceSync: params.has('sync'), traceCalls: params.has('trace'), subgroups: params.get('subgroups') !== '0' });
}

function onMessage(m) {
  switch (m.type) {
    case 'status':
      $('model-info').textContent = m.text;
      break;
    case 'download': {
      const pct = m.total ? (100 * m.loaded) / m.total : 0;
      $('progress-bar').style.width = `${pct.toFixed(1)}%`;
      $('progress-text').textContent = `${m.fromCache ? 'reading from cache' : 'downloading'} ${fmtBytes(m.loaded)}${m.total ? ` of ${fmtBytes(m.total)} (${pct.toFixed(0)}%)` : ''}`;
      break;
    }
    case 'downloaded':
      $('progress-bar').style.width = '100%';
      $('progress-text').textContent = `${fmtBytes(m.bytes)} ${m.fromCache ? 'from the browser cache' : 'downloaded and cached for next time'}`;
      break;
    case 'ready': {
      loadedBackend = m.info.backend;
      const i = m.info;
      $('model-info').textContent = `${i.model} · backend ${i.backend}${i.adapter ? ` (${i.adapter})` : ''} · ${m.jspi ? 'JSPI' : 'sync'} component · ready in ${m.loadSeconds.toFixed(1)} s${i.fallbackReason ? ` · WebGPU unavailable (${i.fallbackReason})` : ''}${i.autoReason ? ` · auto: ${i.autoReason}` : ''}`;
      $('model-info').dataset.backend = i.backend;
      if (i.backend === 'fake') $('progress-text').textContent = 'test double: no model file';
      setState('ready');
      if (params.has('autorun')) generate();
      break;
    }
    case 'error':
      if (m.where === 'generate' && m.message === 'stopped') {
        clearInterval(view.timer);
        $('run-status').textContent = 'stopped';
        setState('ready');
        break;
      }
      failed(m.where === 'load' ? `loading failed: ${m.message}` : m.message);
      break;
    default:
      if (view && m.id === view.id) onRunMessage(m);
  }
}

function generate() {
  const options = {
    method: $('method').value,
    n: Number($('n').value),
    alpha: Number($('alpha').value),
    maxNewTokens: Number($('max-tokens').value),
    minNewTokens: Number($('min-tokens').value),
    temperature: Number($('temperature').value),
    seed: Number($('seed').value),
  };
  runId += 1;
  view = { id: runId, options, rows: new Map(), decisions: [], finals: null, live: 0, position: 0, started: performance.now(), timer: null };
  $('rows').replaceChildren();
  $('winner-panel').hidden = true;
  $('gpu-banner').hidden = true;
  delete document.body.dataset.error;
  drawChart($('chart'), [], null, options.maxNewTokens);
  renderStats(null);
  setState('running');
  view.timer = setInterval(() => renderStats(null), 250);
  worker.postMessage({ type: 'generate', id: runId, prompt: $('prompt').value, options });
}

function rowEl(row) {
  let r = view.rows.get(row);
  if (!r) {
    const div = document.createElement('div');
    div.className = 'r live';
    div.dataset.row = row;
    div.innerHTML = `<span class="id">row ${row}</span><span class="text"></span><span class="meta"></span>`;
    $('rows').appendChild(div);
    r = { div, text: div.children[1], meta: div.children[2], tokens: 0, state: 'live' };
    view.rows.set(row, r);
  }
  return r;
}

function onRunMessage(m) {
  switch (m.type) {
    case 'run-start':
      view.promptTokens = m.promptTokens;
      view.capacity = m.capacity;
      $('run-status').textContent = `prompt ${m.promptTokens} tokens · KV budget ${m.capacity} tokens`;
      break;
    case 'prefilled':
      for (let r = m.first; r < m.first + m.count; r++) rowEl(r);
      view.initial = (view.initial ?? 0) + m.count;
      break;
    case 'step':
      view.position = m.position + 1;
      view.live = m.live;
      view.tokens = (view.tokens ?? 0) + m.live;
      view.steps = (view.steps ?? 0) + 1;
      break;
    case 'rows':
      for (const [row, t] of Object.entries(m.texts)) {
        const r = rowEl(Number(row));
        r.text.textContent = t.text;
        r.tokens = t.tokens;
        if (r.state !== 'rejected') r.meta.textContent = `${t.tokens} tok`;
      }
      break;
    case 'decision': {
      view.decisions.push({ position: m.decision.position, threshold: m.decision.threshold, rows: m.rows, scores: m.scores, kept: m.kept });
      const kept = new Set(m.kept);
      m.rows.forEach((row, i) => {
        const r = rowEl(row);
        if (!kept.has(row)) {
          r.state = 'rejected';
          r.div.className = 'r rejected';
          r.meta.textContent = `cut ${m.scores[i].toFixed(2)}`;
        } else {
          r.meta.textContent = `${r.tokens} tok · ${m.scores[i].toFixed(2)}`;
        }
      });
      drawChart($('chart'), view.decisions, null, view.options.maxNewTokens);
      $('run-status').textContent = `decision ${view.decisions.length} at ${m.decision.position} tokens: kept ${m.decision.keptRows} of ${m.decision.liveRows}`;
      break;
    }
    case 'finished': {
      const r = rowEl(m.row);
      r.state = 'finished';
      r.div.className = 'r finished';
      r.meta.textContent = `${r.tokens} tok · ${m.finish}`;
      break;
    }
    case 'scored':
      view.finals = m.candidates;
      drawChart($('chart'), view.decisions, view.finals, view.options.maxNewTokens);
      break;
    case 'done':
      clearInterval(view.timer);
      view.finals = m.candidates;
      drawChart($('chart'), view.decisions, view.finals, view.options.maxNewTokens);
      showWinner(m);
      renderStats(m);
      const plural = (k, word) => `${k} ${word}${k === 1 ? '' : 's'}`;
      $('run-status').textContent = `done: ${plural(m.candidates.length, 'candidate')}, ${plural(m.trace.length, 'decision')}`;
      setState('done');
      break;
  }
}

function showWinner(m) {
  const w = m.candidates[0];
  for (const c of m.candidates) {
    const r = rowEl(c.row);
    r.meta.textContent = `${c.tokens} tok · ${c.score.toFixed(2)}`;
  }
  const r = rowEl(w.row);
  r.div.className = 'r winner';
  r.text.textContent = w.text;
  r.div.scrollIntoView({ block: 'nearest' });
  const panel = $('winner-panel');
  panel.hidden = false;
  const box = $('winner');
  box.dataset.row = w.row;
  box.dataset.score = w.score;
  box.innerHTML = `<div class="head">row ${w.row} · reward ${w.score.toFixed(3)} · ${w.tokens} tokens · ended by ${w.finish}
    · best of ${m.candidates.length} finished (${m.rejected.length} cut early)</div><div class="body"></div>`;
  box.querySelector('.body').textContent = w.text;
}

function renderStats(done) {
  if (!view) return;
  const s = done?.stats;
  const seconds = done ? done.wallSeconds : (performance.now() - view.started) / 1000;
  const tokens = s ? s.tokensGenerated : view.tokens ?? 0;
  const rows = [
    ['method', view.options.method === 'sr' ? `Speculative Rejection (α ${view.options.alpha})` : 'Best-of-N'],
    ['rows at start', s ? s.initialRows : view.initial ?? '–'],
    ['live rows', done ? 0 : view.live],
    ['tokens generated', tokens],
    ['steps', s ? s.steps : view.steps ?? 0],
    ['decisions', view.decisions.length],
    ['reward-model calls / tokens', s ? `${s.rewardCalls} / ${s.rewardTokens}` : '–'],
    ['peak KV', s ? fmtBytes(s.peakKvBytes) : '–'],
    ['time', `${seconds.toFixed(1)} s`],
    ['tokens/s', seconds > 0 ? (tokens / seconds).toFixed(1) : '–'],
  ];
  const table = $('stats');
  table.dataset.decisions = view.decisions.length;
  table.innerHTML = rows.map(([k, v]) => `<tr><td>${k}</td><td>${escapeHtml(v)}</td></tr>`).join('');
}

function stop() {
  if (view) clearInterval(view.timer);
  worker.postMessage({ type: 'stop' });
}

async function main() {
  let build = {};
  try {
    const r = await fetch('build.json');
    if (r.ok) build = await r.json();
  } catch {
    /* served without build.json */
  }
  $('model-url').value = params.get('model') || build.model || DEFAULT_MODEL;
  if (params.get('engine')) $('backend').value = params.get('engine');
  for (const k of ['n', 'alpha', 'seed', 'temperature']) if (params.has(k)) $(k).value = params.get(k);
  if (params.has('max')) $('max-tokens').value = params.get('max');
  if (params.has('min')) $('min-tokens').value = params.get('min');
  if (params.has('method')) $('method').value = params.get('method');
  if (params.has('prompt')) $('prompt').value = params.get('prompt');
  setState('idle');
  $('load').onclick = load;
  $('run').onclick = generate;
  $('stop').onclick = stop;
  $('clear-cache').onclick = async () => {
    await clearModelCache();
    await showCacheState();
  };
  $('model-url').onchange = showCacheState;
  $('method').onchange = () => ($('alpha').disabled = $('method').value !== 'sr');
  await checkPlatform();
  await showCacheState();
  if (params.has('autoload')) load();
}

main();
