// End-to-end test of the browser demo: headless Chromium (Debian's, no browser download)
// driven by playwright-core against the page served on 127.0.0.1.
//
// It loads the model (the real download path: bytes with Content-Length, then the cache),
// runs Speculative Rejection with n 4 and 16 new tokens (first decision after 8), waits for
// the run to finish, and checks that at least one decision happened, rows were cut and a
// winner with a finite reward is shown. It writes screenshot.png and result.json into
// $SPECREJ_E2E_OUT (default target/web-e2e).
//
// Environment:
//   SPECREJ_WEB_URL        the served page (required), e.g. http://127.0.0.1:8080/
//   SPECREJ_NODE_MODULES   where playwright-core is installed (default target/web-node/node_modules)
//   SPECREJ_E2E_OUT        output folder (default target/web-e2e)
//   SPECREJ_E2E_ENGINE     auto (default) | webgpu | cpu | fake (the JS test double, no model)
//   SPECREJ_E2E_TIMEOUT_S  how long loading, and then the run, may each take (default 1800:
//                          a software adapter such as SwiftShader is slow)
//   SPECREJ_E2E_MAX_TOKENS / SPECREJ_E2E_MIN_TOKENS   the run's max new tokens (16) and
//                          first decision (8): smaller on slow software adapters
//   CHROMIUM               the browser (default /usr/bin/chromium)
//
// `cargo xtask` runs it through `xtask/src/web.rs` `e2e(root)`, which builds and serves.

import { createRequire } from 'node:module';
import { mkdirSync, writeFileSync, rmSync } from 'node:fs';
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
const nodeModules = process.env.SPECREJ_NODE_MODULES || join(root, 'target', 'web-node', 'node_modules');
const out = process.env.SPECREJ_E2E_OUT || join(root, 'target', 'web-e2e');
const engine = process.env.SPECREJ_E2E_ENGINE || 'auto';
const timeoutMs = Number(process.env.SPECREJ_E2E_TIMEOUT_S || 1800) * 1000;
const maxTokens = Number(process.env.SPECREJ_E2E_MAX_TOKENS || 16);
const minTokens = Number(process.env.SPECREJ_E2E_MIN_TOKENS || 8);
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
const result = { url, engine, ok: false, checks: {} };
const log = [];
let failure = null;
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
      features: [...a.features].sort(),
      maxStorageBufferBindingSize: a.limits.maxStorageBufferBindingSize,
      maxBufferSize: a.limits.maxBufferSize,
    };
  });
  result.jspi = await page.evaluate(() => typeof WebAssembly.Suspending === 'function');
  console.log(`WebGPU adapter: ${JSON.stringify({ ...result.adapter, features: result.adapter.features?.join(',') })}`);
  console.log(`JSPI: ${result.jspi}`);

  // 1. Load the model.
  await page.selectOption('#backend', engine);
  const t0 = Date.now();
  await page.click('#load');
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: timeoutMs });
  if ((await page.getAttribute('body', 'data-state')) === 'error') throw new Error(`loading failed: ${await page.getAttribute('body', 'data-error')}`);
  result.loadSeconds = (Date.now() - t0) / 1000;
  result.modelInfo = await page.textContent('#model-info');
  result.backend = await page.getAttribute('#model-info', 'data-backend');
  result.download = await page.textContent('#progress-text');
  console.log(`loaded in ${result.loadSeconds.toFixed(1)} s: ${result.modelInfo} (${result.download})`);

  // 2. A small Speculative Rejection run.
  await page.selectOption('#method', 'sr');
  await page.fill('#n', '4');
  await page.fill('#alpha', '0.5');
  await page.fill('#max-tokens', String(maxTokens));
  await page.fill('#min-tokens', String(minTokens));
  await page.fill('#temperature', '1');
  await page.fill('#seed', '1');
  const t1 = Date.now();
  await page.click('#run');
  await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state), null, { timeout: timeoutMs });
  result.runSeconds = (Date.now() - t1) / 1000;
  await page.screenshot({ path: join(out, 'screenshot.png'), fullPage: true });
  if ((await page.getAttribute('body', 'data-state')) === 'error') throw new Error(`the run failed: ${await page.getAttribute('body', 'data-error')}`);

  // 3. Checks.
  const decisions = Number(await page.getAttribute('#stats', 'data-decisions'));
  const winnerRow = await page.getAttribute('#winner', 'data-row');
  const winnerScore = Number(await page.getAttribute('#winner', 'data-score'));
  const rows = await page.locator('.rows .r').count();
  const rejected = await page.locator('.rows .r.rejected').count();
  const winnerText = await page.textContent('#winner .body');
  const cutLines = await page.locator('#chart .cutline').count();
  result.checks = { decisions, winnerRow, winnerScore, rows, rejected, cutLines, winnerText };
  result.stats = await page.$$eval('#stats tr', (trs) => Object.fromEntries(trs.map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent])));
  const problems = [];
  if (!(decisions >= 1)) problems.push(`expected at least one decision, saw ${decisions}`);
  if (cutLines !== decisions) problems.push(`expected ${decisions} cut lines in the chart, saw ${cutLines}`);
  if (rows !== 4) problems.push(`expected 4 rows, saw ${rows}`);
  if (!(rejected >= 1)) problems.push(`expected rejected rows, saw ${rejected}`);
  if (winnerRow === null) problems.push('no winner shown');
  if (!Number.isFinite(winnerScore)) problems.push(`winner reward is not finite: ${winnerScore}`);
  if (problems.length) throw new Error(problems.join('; '));
  // 4. The model is now in the browser's cache: a new visit reads it from there.
  if (result.backend !== 'fake') {
    await page.reload({ waitUntil: 'load' });
    await page.waitForFunction(() => document.body.dataset.state === 'idle' && /cached|not loaded/.test(document.getElementById('progress-text').textContent));
    result.checks.cachedOnReload = await page.textContent('#progress-text');
    if (!/cached in this browser/.test(result.checks.cachedOnReload)) throw new Error(`the model is not cached after a run: ${result.checks.cachedOnReload}`);
    console.log(`after reload: ${result.checks.cachedOnReload}`);
  }
  result.ok = true;
  console.log(`run: ${result.runSeconds.toFixed(1)} s, ${decisions} decision(s), ${rejected} of ${rows} rows cut, winner row ${winnerRow} reward ${winnerScore.toFixed(3)}`);
  console.log(`winner text: ${JSON.stringify(winnerText)}`);
  console.log(`stats: ${JSON.stringify(result.stats)}`);
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
  result.log = log;
  writeFileSync(join(out, 'result.json'), JSON.stringify(result, null, 2));
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
console.log(`screenshot: ${join(out, 'screenshot.png')}`);
if (failure) {
  console.error(`e2e failed: ${result.error}`);
  for (const line of log.slice(-30)) console.error(`  ${line}`);
  console.log('e2e: 0 passed, 1 failed');
  process.exit(1);
}
console.log('e2e: 1 passed, 0 failed');
