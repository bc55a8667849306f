// The decoder component's imports, built from a JS engine.
//
// The component (`wit/decoder.wit`, world `decoder`, transpiled by jco) imports
// `specrej:decoder/engine` and `specrej:decoder/progress`. This file turns an *engine* — the
// small JS interface below, implemented by specrej-web's `WebEngine` (wasm-bindgen, WebGPU or
// CPU) or by `FakeEngine` (a test double) — into the objects jco expects.
//
// The engine interface (all token lists are Uint32Array, `seed` is a BigInt):
//   tokenCapacity(): number          kvBytesPerToken(): number      maxSequenceLen(): number
//   prefill(prompt, start, end, seed, temperature, topK, topP): number   (a batch id)
//   step(batch): Promise<Uint32Array> | Uint32Array   (sampled tokens, in row order)
//   stepNow?(batch): Uint32Array      (synchronous step; only for the non-JSPI component)
//   kvLayout?(): { sharedPrompt: boolean, block: number }   (default: dense, exact)
//   retain(batch, keep: Uint32Array): void
//   fork?(batch, parents: Uint32Array, ids: Uint32Array): void   (refill)
//   forked?(parents: Uint32Array, children: Uint32Array): void   (row ids; a scorer hint)
//   dropBatch(batch): void
//   score(prompt, rows: Uint32Array, lengths: Uint32Array, tokens: Uint32Array):
//       Promise<{rewards: Float32Array, tokensProcessed: number}> | {…}
//   scoreNow?(…same…): {…}            (synchronous score; only for the non-JSPI component)
//   release(rows: Uint32Array): void
// The worker also uses: info() → { backend, adapter, model, sync, … }, setTokenCapacity(tokens),
// chatPrompt(text) → Uint32Array (also prepares the judge for that question),
// eosTokens() → Uint32Array, decode(tokens) → string.
// Errors: an engine throws an object `{ outOfMemory: true }` for out-of-memory, anything else
// for a device error; both become the WIT `engine-error` here.
//
// `async` (JSPI) mode: `step` and `score` may return promises; the component suspends on them
// (jco `--async-mode jspi`). Sync mode (browsers without JSPI): `stepNow`/`scoreNow` are used
// and must not need the event loop (the CPU backend; not WebGPU, whose readback is async).

/** The WIT `engine-error` for anything an engine threw (jco lowers a thrown `{payload}`). */
export function engineError(e) {
  if (e && (e.outOfMemory || e.tag === 'out-of-memory')) return { payload: { tag: 'out-of-memory' } };
  if (e && e.tag === 'device') return { payload: e };
  const message = e instanceof Error ? e.message : String(e);
  return { payload: { tag: 'device', val: message } };
}

/**
 * The `specrej:decoder/engine` import over `engine`.
 * `hooks.beforeStep()` may throw to stop a run (the user pressed Stop) and may return a
 * promise (to yield to the worker's event loop in JSPI mode).
 */
export function engineImport(engine, { async = true, hooks = {} } = {}) {
  class Batch {
    constructor(id) {
      this.id = id;
    }
    step() {
      if (!async) {
        try {
          hooks.beforeStep?.();
          return (engine.stepNow ?? engine.step).call(engine, this.id);
        } catch (e) {
          throw engineError(e);
        }
      }
      return (async () => {
        try {
          await hooks.beforeStep?.();
          return await engine.step(this.id);
        } catch (e) {
          throw engineError(e);
        }
      })();
    }
    retain(keep) {
      try {
        engine.retain(this.id, keep);
      } catch (e) {
        throw engineError(e);
      }
    }
    fork(children) {
      if (!engine.fork) throw engineError('this engine cannot fork rows');
      try {
        engine.fork(this.id, Uint32Array.from(children, (c) => c[0]), Uint32Array.from(children, (c) => c[1]));
      } catch (e) {
        throw engineError(e);
      }
    }
    [Symbol.dispose ?? Symbol.for('dispose')]() {
      engine.dropBatch(this.id);
    }
  }
  const flatten = (responses) => {
    const rows = new Uint32Array(responses.length);
    const lengths = new Uint32Array(responses.length);
    let total = 0;
    responses.forEach((r, i) => {
      rows[i] = r.row;
      lengths[i] = r.tokens.length;
      total += r.tokens.length;
    });
    const tokens = new Uint32Array(total);
    let at = 0;
    for (const r of responses) {
      tokens.set(r.tokens, at);
      at += r.tokens.length;
    }
    return [rows, lengths, tokens];
  };
  const scored = (s) => ({ rewards: Float32Array.from(s.rewards), tokensProcessed: BigInt(s.tokensProcessed) });
  return {
    Batch,
    tokenCapacity: () => BigInt(engine.tokenCapacity()),
    kvBytesPerToken: () => BigInt(engine.kvBytesPerToken()),
    layout: () => engine.kvLayout?.() ?? { sharedPrompt: false, block: 1 },
    maxSequenceLen: () => BigInt(engine.maxSequenceLen()),
    prefill(prompt, rows, sampling) {
      try {
        const id = engine.prefill(prompt, rows.start, rows.end, sampling.seed, sampling.temperature, sampling.topK, sampling.topP);
        return new Batch(id);
      } catch (e) {
        throw engineError(e);
      }
    },
    score(prompt, responses) {
      const args = [prompt, ...flatten(responses)];
      if (!async) {
        try {
          return scored((engine.scoreNow ?? engine.score).apply(engine, args));
        } catch (e) {
          throw engineError(e);
        }
      }
      return (async () => {
        try {
          return scored(await engine.score(...args));
        } catch (e) {
          throw engineError(e);
        }
      })();
    },
    release(rows) {
      engine.release(rows);
    },
    forked(children) {
      engine.forked?.(Uint32Array.from(children, (c) => c[0]), Uint32Array.from(children, (c) => c[1]));
    },
  };
}

/** jco reads imports by unversioned name; the .d.ts names them with the version: give both. */
export function componentImports(engine, onEvent, options) {
  const engineObj = engineImport(engine, options);
  const progress = { onEvent };
  const imports = {};
  for (const v of ['', '@0.1.0']) {
    imports[`specrej:decoder/engine${v}`] = engineObj;
    imports[`specrej:decoder/progress${v}`] = progress;
    imports[`specrej:decoder/types${v}`] = {};
  }
  return imports;
}

/** Plain, structured-clone-friendly copies of the component's results (BigInt → Number). */
export function plain(value) {
  if (typeof value === 'bigint') return Number(value);
  if (ArrayBuffer.isView(value)) return Array.from(value);
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}
