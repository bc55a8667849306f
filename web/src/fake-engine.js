// A test double with the same interface as specrej-web's `WebEngine` (see bridge.js): a hash
// "language model" over a small word list and a toy reward. No model file, no GPU; used with
// `?engine=fake` to exercise the page, the worker, JSPI and the component on any browser.

const WORDS = (
  'the a model answer rows reward decision keeps best fraction tokens grow parallel cut ' +
  'weak strong light fast GPU browser rust wasm speculative rejection sample step prefix ' +
  'score winner memory budget alpha batch cache drop keep helpful correct clear short long'
).split(' ');
const EOS = 0;
const OFFSET = 2; // ids 0 (eos) and 1 (bos) are special

function hash32(...xs) {
  // A small PCG-ish mix, enough for a toy.
  let h = 0x9e3779b9;
  for (const x of xs) {
    h = Math.imul(h ^ (Number(BigInt.asUintN(32, BigInt(x))) >>> 0), 0x85ebca6b) >>> 0;
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35) >>> 0;
    h ^= h >>> 16;
  }
  return h >>> 0;
}

export class FakeEngine {
  constructor({ delayMs = 2, capacity = 4096 } = {}) {
    this.delayMs = delayMs;
    this.capacity = capacity;
    this.batches = new Map();
    this.nextId = 1;
  }
  static async load() {
    return new FakeEngine();
  }
  info() {
    return { backend: 'fake', adapter: 'none (test double)', model: 'hash LM (test double)', vocab: WORDS.length + OFFSET, layers: 0, sync: true };
  }
  setTokenCapacity(tokens) {
    this.capacity = tokens;
  }
  tokenCapacity() {
    return this.capacity;
  }
  kvBytesPerToken() {
    return 1024;
  }
  maxSequenceLen() {
    return 8192;
  }
  chatPrompt(text) {
    const ids = [1];
    for (const w of text.toLowerCase().split(/\s+/).filter(Boolean)) ids.push(OFFSET + (hash32(w.length, w.charCodeAt(0)) % WORDS.length));
    return Uint32Array.from(ids);
  }
  eosTokens() {
    return Uint32Array.of(EOS);
  }
  decode(tokens) {
    return Array.from(tokens, (t) => (t === EOS ? '' : t === 1 ? '' : WORDS[(t - OFFSET) % WORDS.length])).join(' ').trim();
  }
  prefill(prompt, start, end, seed, temperature, topK, topP) {
    if (!prompt.length || end <= start) throw new Error('prefill: empty prompt or rows');
    const rows = [];
    for (let r = start; r < end; r++) rows.push(r);
    const id = this.nextId++;
    this.batches.set(id, { rows, made: 0, seed, promptLen: prompt.length });
    return id;
  }
  stepNow(id) {
    const b = this.batches.get(id);
    if (!b) throw new Error(`no batch ${id}`);
    if (b.rows.length * (b.promptLen + b.made + 1) > this.capacity) throw { outOfMemory: true };
    const out = Uint32Array.from(b.rows, (row) => {
      const h = hash32(b.seed, row, b.made);
      if (b.made > 6 && h % 61 === 0) return EOS;
      return OFFSET + (h % WORDS.length);
    });
    b.made += 1;
    return out;
  }
  async step(id) {
    if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
    return this.stepNow(id);
  }
  retain(id, keep) {
    const b = this.batches.get(id);
    b.rows = Array.from(keep, (i) => b.rows[i]);
  }
  dropBatch(id) {
    this.batches.delete(id);
  }
  scoreNow(prompt, rows, lengths, tokens) {
    const rewards = new Float32Array(rows.length);
    let at = 0;
    let processed = 0;
    for (let i = 0; i < rows.length; i++) {
      let sum = 0;
      for (let k = 0; k < lengths[i]; k++) sum += (hash32(tokens[at + k], 7) % 1000) / 1000 - 0.5;
      rewards[i] = lengths[i] ? (4 * sum) / Math.sqrt(lengths[i]) : 0;
      at += lengths[i];
      processed += lengths[i];
    }
    return { rewards, tokensProcessed: processed };
  }
  async score(...args) {
    if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
    return this.scoreNow(...args);
  }
  release() {}
}
