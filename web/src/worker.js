// The worker: everything heavy runs here, never on the page's main thread.
//
// It downloads (or reads from the cache) the model, loads the engine (specrej-web over
// WebGPU, or its CPU path, or the FakeEngine test double), instantiates the decoder
// *component* (the same file the wasmtime server runs, transpiled by jco) with that engine as
// its `engine` import, runs `decode.generate` and streams progress to the page.
//
// Async readback (WebGPU `mapAsync`) under a synchronous WIT `batch.step`: JSPI. The
// component in `component/` was transpiled with `--async-mode jspi` and `step`/`score`
// listed as async imports: the component's stack is suspended while the promise is pending
// and the worker's event loop keeps running. Without JSPI (`WebAssembly.Suspending` missing)
// the worker uses `component-sync/` and the engine's synchronous `stepNow`, which only the
// CPU path and the test double provide.

import { componentImports, plain } from './bridge.js';
import { fetchModel } from './model-cache.js';
import { installShaderCompat, rewrites } from './shader-compat.js';

const HAS_JSPI = typeof WebAssembly.Suspending === 'function' && typeof WebAssembly.promising === 'function';
let JSPI = HAS_JSPI; // `?sync` on the page forces the synchronous component (to test it)

let engine = null;
let decoder = null; // the component's `decode` export
let run = null; // the run in progress: { id, onEvent, stop, … }

const post = (msg) => postMessage(msg);

self.onmessage = async ({ data }) => {
  try {
    if (data.type === 'load') await load(data);
    else if (data.type === 'generate') await generateAndReport(data);
    else if (data.type === 'stop') {
      if (run) run.stop = true;
    }
  } catch (e) {
    post({ type: 'error', where: data.type, message: describe(e) });
  }
};

function describe(e) {
  const payload = e && e.payload;
  if (payload) {
    if (payload.tag === 'invalid-request') return `invalid request: ${payload.val}`;
    if (payload.tag === 'engine') return payload.val.tag === 'out-of-memory' ? 'the engine ran out of memory' : payload.val.val;
  }
  return e instanceof Error ? e.message : String(e);
}

let trace = false; // `?trace` on the page: log every engine call's duration to the console

async function load({ url, backend: requested, forceSync, traceCalls, subgroups = true }) {
  let backend = requested;
  JSPI = HAS_JSPI && !forceSync;
  trace = Boolean(traceCalls);
  engine = null;
  decoder = null;
  let bytes = null;
  if (backend !== 'fake') {
    post({ type: 'status', text: 'Fetching the model…' });
    const got = await fetchModel(url, (p) => post({ type: 'download', ...p }));
    bytes = got.bytes;
    post({ type: 'downloaded', bytes: bytes.byteLength, fromCache: got.fromCache });
  }
  post({ type: 'status', text: 'Loading the engine…' });
  const t0 = performance.now();
  if (backend === 'fake') {
    const { FakeEngine } = await import('./fake-engine.js');
    engine = await FakeEngine.load();
  } else {
    let web;
    try {
      web = await import('../pkg/specrej_web.js');
    } catch (e) {
      throw new Error(`the engine module (pkg/specrej_web.js) is missing from this build: ${e.message}. Try ?engine=fake.`);
    }
    installShaderCompat();
    await web.default();
    // "auto" on a software WebGPU adapter (SwiftShader: `isFallbackAdapter`) picks the CPU
    // engine: candle in WebAssembly decodes about 25x faster there (measured on SwiftShader
    // in headless Chromium, 2 cores: ~0.1 s vs ~2.4 s per step of one row).
    let why = null;
    if (backend === 'auto' && navigator.gpu) {
      const adapter = await navigator.gpu.requestAdapter().catch(() => null);
      if (adapter?.info?.isFallbackAdapter) {
        backend = 'cpu';
        why = `the WebGPU adapter (${[adapter.info.vendor, adapter.info.architecture].filter(Boolean).join(' ') || 'software'}) is a software fallback; the CPU engine is faster`;
      }
    }
    engine = await web.WebEngine.load(bytes, backend, subgroups);
    if (why) {
      const inner = engine;
      const info = () => ({ ...inner.info(), autoReason: why });
      engine = new Proxy(inner, { get: (t, k) => (k === 'info' ? info : typeof t[k] === 'function' ? t[k].bind(t) : t[k]) });
    }
  }
  if (trace) engine = traced(engine);
  bytes = null;
  const info = engine.info();
  if (info.backend === 'webgpu' && navigator.gpu) {
    // wgpu's adapter name is empty on the web; the browser's adapter info says more.
    const adapter = await navigator.gpu.requestAdapter();
    const i = adapter && adapter.info;
    if (i) info.adapter = [i.vendor, i.architecture, i.description].filter(Boolean).join(' ') || info.adapter;
  }
  if (!JSPI && !info.sync) {
    throw new Error(`this browser lacks JSPI (WebAssembly.Suspending), which the ${info.backend} engine needs; use Chromium 137+ or the CPU backend`);
  }
  post({ type: 'status', text: 'Instantiating the decoder component…' });
  decoder = await instantiateComponent();
  post({ type: 'ready', info, jspi: JSPI, loadSeconds: (performance.now() - t0) / 1000 });
}

async function generateAndReport(data) {
  await generate(data);
  const fired = rewrites();
  if (fired.length) console.warn(`specrej: WGSL compatibility rewrites applied: ${fired.join('; ')}`);
}

/** `engine` with every call's duration logged (`?trace`). */
function traced(inner) {
  return new Proxy(inner, {
    get(target, key) {
      const value = target[key];
      if (typeof value !== 'function' || !['prefill', 'step', 'retain', 'score', 'chatPrompt'].includes(key)) return typeof value === 'function' ? value.bind(target) : value;
      return (...args) => {
        const t0 = performance.now();
        const out = value.apply(target, args);
        const done = () => console.log(`engine.${String(key)}: ${(performance.now() - t0).toFixed(1)} ms`);
        if (out && typeof out.then === 'function') return out.finally(done);
        done();
        return out;
      };
    },
  });
}

async function instantiateComponent() {
  const dir = JSPI ? '../component/' : '../component-sync/';
  const { instantiate } = await import(`${dir}specrej-decoder.js`);
  const getCoreModule = (path) => WebAssembly.compileStreaming(fetch(new URL(dir + path, import.meta.url)));
  // Yield to the event loop now and then, so a Stop message gets in during a run.
  let lastYield = performance.now();
  const yieldNow = () => new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = resolve;
    ch.port2.postMessage(null);
  });
  const hooks = {
    beforeStep() {
      if (run && run.stop) throw new Error('stopped');
      if (JSPI && performance.now() - lastYield > 30) {
        lastYield = performance.now();
        return yieldNow().then(() => {
          if (run && run.stop) throw new Error('stopped');
        });
      }
      return undefined;
    },
  };
  const imports = componentImports(engine, (event) => run && run.onEvent(event), { async: JSPI, hooks });
  const root = await instantiate(getCoreModule, imports);
  return root.decode ?? root['specrej:decoder/decode@0.1.0'];
}

async function generate({ id, prompt, options }) {
  if (!engine || !decoder) throw new Error('load a model first');
  if (run) throw new Error('a run is already in progress');
  const promptTokens = engine.chatPrompt(prompt);
  const eos = engine.eosTokens();
  const sr = options.method === 'sr';
  const minNew = Math.min(options.minNewTokens ?? 16, options.maxNewTokens);
  // The KV budget: Best-of-N gets room for all rows; Speculative Rejection for n rows of
  // min-new-tokens each, so decisions come early. Counted in the engine's K/V layout (the CPU
  // engine holds the prompt once and rows in 16-token blocks), as the scheduler counts.
  const layout = engine.kvLayout?.() ?? { sharedPrompt: false, block: 1 };
  const round = (t) => Math.ceil(t / Math.max(1, layout.block)) * Math.max(1, layout.block);
  const own = sr ? minNew : options.maxNewTokens;
  const capacity = layout.sharedPrompt
    ? round(promptTokens.length) + options.n * round(own)
    : options.n * round(promptTokens.length + own);
  engine.setTokenCapacity(capacity);

  const rows = new Map(); // row id -> { tokens: number[], dirty }
  let lastFlush = 0;
  const flush = (position, force) => {
    const now = performance.now();
    if (!force && now - lastFlush < 60) return;
    lastFlush = now;
    const texts = {};
    for (const [row, r] of rows) {
      if (!r.dirty) continue;
      r.dirty = false;
      texts[row] = { text: engine.decode(Uint32Array.from(r.tokens)), tokens: r.tokens.length };
    }
    post({ type: 'rows', id, position, texts });
  };
  const started = performance.now();
  run = {
    id,
    stop: false,
    onEvent(event) {
      const v = event.val;
      switch (event.tag) {
        case 'prefilled': {
          const [first, count] = v;
          for (let r = first; r < first + count; r++) rows.set(r, { tokens: [], dirty: true });
          post({ type: 'prefilled', id, first, count, t: performance.now() - started });
          break;
        }
        case 'step': {
          v.rows.forEach((row, i) => {
            const r = rows.get(row);
            r.tokens.push(v.tokens[i]);
            r.dirty = true;
          });
          post({ type: 'step', id, position: v.position, live: v.rows.length, t: performance.now() - started });
          flush(v.position, false);
          break;
        }
        case 'decision':
          flush(v.decision.position, true);
          post({ type: 'decision', id, ...plain(v), t: performance.now() - started });
          break;
        case 'finished':
          post({ type: 'finished', id, row: v[0], finish: v[1] });
          break;
        case 'scored':
          flush(0, true);
          post({ type: 'scored', id, candidates: v.map((c) => ({ row: c.row, score: c.score, finish: c.finish, tokens: c.tokens.length })) });
          break;
      }
    },
  };
  post({ type: 'run-start', id, promptTokens: promptTokens.length, capacity, jspi: JSPI });
  try {
    const request = {
      method: sr ? { tag: 'speculative-rejection', val: options.alpha } : { tag: 'best-of-n' },
      n: options.n,
      maxNewTokens: options.maxNewTokens,
      minNewTokens: minNew,
      eos,
      sampling: { seed: BigInt(options.seed), temperature: options.temperature, topK: options.topK ?? 50, topP: options.topP ?? 1 },
      // The paper's rules; the extensions (probes, gate, adaptive alpha, refill) stay off here.
      rules: { paperExact: false, probeLag: 0, gateTau: undefined, adaptiveSnr: undefined, refill: undefined },
      events: { prefilled: true, step: true, decision: true, finished: true, scored: true },
    };
    const outcome = await decoder.generate(promptTokens, request);
    const wallSeconds = (performance.now() - started) / 1000;
    flush(0, true);
    const text = (tokens) => engine.decode(tokens);
    post({
      type: 'done',
      id,
      wallSeconds,
      candidates: outcome.candidates.map((c) => ({ row: c.row, score: c.score, finish: c.finish, tokens: c.tokens.length, text: text(c.tokens) })),
      rejected: outcome.rejected.map((r) => ({ row: r.row, score: r.score, tokens: r.tokens.length })),
      trace: plain(outcome.trace),
      stats: { ...plain(outcome.stats), wallSeconds },
    });
  } finally {
    run = null;
  }
}
