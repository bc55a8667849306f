// End-to-end test of the browser demo: headless Chromium (Debian's, no browser download)
// driven by playwright-core against the page served on 127.0.0.1.
//
// 1. On a WebGPU adapter, the kernel self-check (`WebEngine.selfTest`: every WGSL kernel
//    against a host reference, compiled by the browser's WGSL compiler, not naga).
// 2. For each engine (default: WebGPU when the browser has an adapter, then the CPU engine),
//    loads the model (the real download path: bytes with Content-Length, then the cache) and
//    runs a small Speculative Rejection request (n 4, 6 new tokens, first decision after 3,
//    temperature 0), then checks that a decision happened, rows were cut, the chart shows the
//    cut, and a winner with a finite reward is shown; with temperature 0 its text must equal
//    the native CPU CLI's winner for the same request (`SPECREJ_E2E_CLI_JSON`, written by
//    `specrej generate --json`: xtask runs it).
// 3. Reloads the page and checks the model is read from the browser's cache.
// It writes screenshot.png (the first engine's run), screenshot-<engine>.png and result.json
// into $SPECREJ_E2E_OUT (default target/web-e2e).
//
// Environment:
//   SPECREJ_WEB_URL        the served page (required), e.g. http://127.0.0.1:8080/
//   SPECREJ_NODE_MODULES   where playwright-core is installed (default target/web-node/node_modules)
//   SPECREJ_E2E_OUT        output folder (default target/web-e2e)
//   SPECREJ_E2E_ENGINES    comma-separated engines to run: webgpu, cpu, auto, fake (the JS test
//                          double, no model) (default "webgpu,cpu"; webgpu is skipped, with a
//                          note, when the browser has no adapter). SPECREJ_E2E_ENGINE: one engine.
//   SPECREJ_E2E_N, SPECREJ_E2E_MAX_TOKENS, SPECREJ_E2E_MIN_TOKENS, SPECREJ_E2E_TEMPERATURE,
//   SPECREJ_E2E_SEED, SPECREJ_E2E_PROMPT   the request (4, 6, 3, 0, 1, the page's default prompt)
//   SPECREJ_E2E_CPU_MAX_TOKENS   the CPU engine's max new tokens (default 20: its K/V blocks
//                          hold 16 tokens, so its first decision comes at token 17)
//   SPECREJ_E2E_CLI_DIR    where the native CLI's `--json` results for the request are
//                          (optional): cli-<f16|f32>.json, its K/V in f16 and in f32
//   SPECREJ_E2E_TIMEOUT_S  how long loading, and then each run, may take (default 900)
//   CHROMIUM               the browser (default /usr/bin/chromium)
//
// `cargo xtask web-e2e` runs it through `xtask/src/web.rs` `e2e(root)`, which builds, runs
// the CLI and serves.

import { createRequire } from 'node:module';
import { mkdirSync, writeFileSync, rmSync, readFileSync, copyFileSync } from 'node:fs';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tmpdir } from 'node:os';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..', '..');
const url = process.env.SPECREJ_WEB_URL;
if (!url) {
  console.error('set SPECREJ_WEB_URL to the served page (cargo xtask runs this through xtask/src/web.rs e2e)');
  process.exit(2);
}
const env = process.env;
const nodeModules = env.SPECREJ_NODE_MODULES || join(root, 'target', 'web-node', 'node_modules');
const out = env.SPECREJ_E2E_OUT || join(root, 'target', 'web-e2e');
const engines = (env.SPECREJ_E2E_ENGINES || env.SPECREJ_E2E_ENGINE || 'webgpu,cpu').split(',').map((e) => e.trim()).filter(Boolean);
const timeoutMs = Number(env.SPECREJ_E2E_TIMEOUT_S || 900) * 1000;
const request = {
  n: Number(env.SPECREJ_E2E_N || 4),
  maxTokens: Number(env.SPECREJ_E2E_MAX_TOKENS || 6),
  // The CPU engine keeps K/V in 16-token blocks: its first decision comes at token 17.
  cpuMaxTokens: Number(env.SPECREJ_E2E_CPU_MAX_TOKENS || 20),
  minTokens: Number(env.SPECREJ_E2E_MIN_TOKENS || 3),
  temperature: Number(env.SPECREJ_E2E_TEMPERATURE ?? 0),
  seed: Number(env.SPECREJ_E2E_SEED || 1),
  prompt: env.SPECREJ_E2E_PROMPT || null,
};
// The native CLI's winners for the WebGPU engine's request: cli-<f16|f32>.json in this folder.
const cliDir = env.SPECREJ_E2E_CLI_DIR || null;
const cliWinners = () =>
  cliDir ? ['f16', 'f32'].map((kv) => ({ kv, text: JSON.parse(readFileSync(join(cliDir, `cli-${kv}.json`), 'utf8')).winner.text })) : [];
const require = createRequire(join(nodeModules, 'noop.js'));
const { chromium } = require('playwright-core');

mkdirSync(out, { recursive: true });
const userDataDir = join(tmpdir(), `specrej-e2e-${process.pid}`);
rmSync(userDataDir, { recursive: true, force: true });

const args = [
  '--no-sandbox',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
  '--headless=new',
  '--enable-unsafe-webgpu',
];
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args,
  viewport: { width: 1280, height: 1100 },
});
const result = { url, engines, request, ok: false, runs: {}, cli: cliDir ? cliWinners() : null };
const log = [];
let failure = null;
const t00 = Date.now();
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (m) => log.push(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => log.push(`worker.${m.type()}: ${m.text()}`)));
  await page.goto(url, { waitUntil: 'load' });
  await page.waitForFunction(() => document.body.dataset.state === 'idle');

  result.adapter = await page.evaluate(async () => {
    if (!navigator.gpu) return { available: false, why: 'navigator.gpu missing' };
    const a = await navigator.gpu.requestAdapter();
    if (!a) return { available: false, why: 'requestAdapter() returned null' };
    return {
      available: true,
      vendor: a.info?.vendor,
      architecture: a.info?.architecture,
      description: a.info?.description,
      isFallbackAdapter: a.info?.isFallbackAdapter,
      features: [...a.features].sort(),
      maxStorageBufferBindingSize: a.limits.maxStorageBufferBindingSize,
      maxBufferSize: a.limits.maxBufferSize,
    };
  });
  result.jspi = await page.evaluate(() => typeof WebAssembly.Suspending === 'function');
  console.log(`WebGPU adapter: ${JSON.stringify({ ...result.adapter, features: result.adapter.features?.join(',') })}`);
  console.log(`JSPI: ${result.jspi}`);

  // 1. The kernels, as the browser's WGSL compiler builds them.
  if (result.adapter.available && engines.some((e) => e === 'webgpu' || e === 'auto')) {
    const t = Date.now();
    result.selfTest = await page.evaluate(async () => {
      const m = await import(new URL('pkg/specrej_web.js', location.href).href);
      await m.default();
      const r = await m.WebEngine.selfTest(true);
      return { ok: r.ok, report: r.report };
    });
    result.selfTest.seconds = (Date.now() - t) / 1000;
    console.log(`kernel self-check (${result.selfTest.seconds.toFixed(1)} s):\n${result.selfTest.report}`);
    if (!result.selfTest.ok) throw new Error('the WGSL kernel self-check failed on this adapter (see above)');
  }

  // 2. A small Speculative Rejection run per engine.
  let first = true;
  for (const engine of engines) {
    if (engine === 'webgpu' && !result.adapter.available) {
      console.log(`skipping the webgpu engine: no WebGPU adapter (${result.adapter.why})`);
      result.runs.webgpu = { skipped: result.adapter.why };
      continue;
    }
    const run = await runOnce(page, engine);
    result.runs[engine] = run;
    const name = `screenshot-${engine}.png`;
    if (first) copyFileSync(join(out, name), join(out, 'screenshot.png'));
    first = false;
    // 3. The model is now in the browser's cache: a new visit reads it from there.
    if (run.backend !== 'fake' && !result.cachedOnReload) {
      await page.reload({ waitUntil: 'load' });
      await page.waitForFunction(() => document.body.dataset.state === 'idle' && /cached|not loaded/.test(document.getElementById('progress-text').textContent));
      result.cachedOnReload = await page.textContent('#progress-text');
      if (!/cached in this browser/.test(result.cachedOnReload)) throw new Error(`the model is not cached after a run: ${result.cachedOnReload}`);
      console.log(`after reload: ${result.cachedOnReload}`);
    }
  }
  if (!Object.values(result.runs).some((r) => !r.skipped)) throw new Error('no engine ran');
  result.ok = true;
} catch (e) {
  failure = e;
  result.error = String(e && e.message ? e.message : e);
  try {
    const page = context.pages()[0];
    await page.screenshot({ path: join(out, 'screenshot.png'), fullPage: true });
  } catch {
    /* no page */
  }
} finally {
  result.seconds = (Date.now() - t00) / 1000;
  result.log = log;
  writeFileSync(join(out, 'result.json'), JSON.stringify(result, null, 2));
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
console.log(`screenshot: ${join(out, 'screenshot.png')} (browser part: ${result.seconds.toFixed(1)} s)`);
if (failure) {
  console.error(`e2e failed: ${result.error}`);
  for (const line of log.slice(-30)) console.error(`  ${line}`);
  console.log('e2e: 0 passed, 1 failed');
  process.exit(1);
}
console.log('e2e: 1 passed, 0 failed');

/** Loads the model on `engine`, runs the request, checks the page; returns what it saw. */
async function runOnce(page, engine) {
  const run = { engine };
  await page.selectOption('#backend', engine);
  const t0 = Date.now();
  await page.click('#load');
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: timeoutMs });
  if ((await page.getAttribute('body', 'data-state')) === 'error') throw new Error(`${engine}: loading failed: ${await page.getAttribute('body', 'data-error')}`);
  run.loadSeconds = (Date.now() - t0) / 1000;
  run.modelInfo = await page.textContent('#model-info');
  run.backend = await page.getAttribute('#model-info', 'data-backend');
  run.download = await page.textContent('#progress-text');
  console.log(`[${engine}] loaded in ${run.loadSeconds.toFixed(1)} s: ${run.modelInfo} (${run.download})`);

  await page.selectOption('#method', 'sr');
  await page.fill('#n', String(request.n));
  await page.fill('#alpha', '0.5');
  const maxTokens = engine === 'cpu' ? request.cpuMaxTokens : request.maxTokens;
  await page.fill('#max-tokens', String(maxTokens));
  await page.fill('#min-tokens', String(request.minTokens));
  await page.fill('#temperature', String(request.temperature));
  await page.fill('#seed', String(request.seed));
  if (request.prompt) await page.fill('#prompt', request.prompt);
  const t1 = Date.now();
  await page.click('#run');
  await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state), null, { timeout: timeoutMs });
  run.runSeconds = (Date.now() - t1) / 1000;
  await page.screenshot({ path: join(out, `screenshot-${engine}.png`), fullPage: true });
  if ((await page.getAttribute('body', 'data-state')) === 'error') throw new Error(`${engine}: the run failed: ${await page.getAttribute('body', 'data-error')}`);

  const decisions = Number(await page.getAttribute('#stats', 'data-decisions'));
  const winnerRow = await page.getAttribute('#winner', 'data-row');
  const winnerScore = Number(await page.getAttribute('#winner', 'data-score'));
  const rows = await page.locator('.rows .r').count();
  const rejected = await page.locator('.rows .r.rejected').count();
  const winnerText = await page.textContent('#winner .body');
  const cutLines = await page.locator('#chart .cutline').count();
  run.checks = { decisions, winnerRow, winnerScore, rows, rejected, cutLines, winnerText };
  run.stats = await page.$$eval('#stats tr', (trs) => Object.fromEntries(trs.map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent])));
  const problems = [];
  if (!(decisions >= 1)) problems.push(`expected at least one decision, saw ${decisions}`);
  if (cutLines !== decisions) problems.push(`expected ${decisions} cut lines in the chart, saw ${cutLines}`);
  if (rows !== request.n) problems.push(`expected ${request.n} rows, saw ${rows}`);
  if (!(rejected >= 1)) problems.push(`expected rejected rows, saw ${rejected}`);
  if (winnerRow === null) problems.push('no winner shown');
  if (!Number.isFinite(winnerScore)) problems.push(`winner reward is not finite: ${winnerScore}`);
  // Greedy decoding: every row is the same text, whichever wins, and its first
  // SPECREJ_E2E_MAX_TOKENS tokens must be the native CPU CLI's answer with its K/V in f16 or
  // in f32. (This model sits on near ties: a different rounding of K/V, or wasm32's kernels,
  // can flip a later token; a broken forward matches neither.)
  const references = run.backend !== 'fake' && request.temperature === 0 ? cliWinners() : [];
  if (references.length) {
    run.checks.cliWinnerTexts = references;
    if (!references.some((r) => winnerText.trim().startsWith(r.text.trim()))) {
      problems.push(`winner text ${JSON.stringify(winnerText)} starts with neither of the CLI's: ${references.map((r) => `${r.kv} K/V ${JSON.stringify(r.text)}`).join(', ')}`);
    }
  }
  console.log(`[${engine}] run: ${run.runSeconds.toFixed(1)} s, ${decisions} decision(s), ${rejected} of ${rows} rows cut, winner row ${winnerRow} reward ${winnerScore.toFixed(3)}`);
  console.log(`[${engine}] winner text: ${JSON.stringify(winnerText)}${references.map((r) => ` (CLI, ${r.kv} K/V: ${JSON.stringify(r.text)})`).join('')}`);
  console.log(`[${engine}] stats: ${JSON.stringify(run.stats)}`);
  if (problems.length) throw new Error(`${engine}: ${problems.join('; ')}`);
  return run;
}
