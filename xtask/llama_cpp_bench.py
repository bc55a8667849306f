#!/usr/bin/env python3
"""llama.cpp on the same model and cores, for `cargo xtask bench-llama-cpp`.

Mirrors `specrej bench throughput` through llama-cpp-python's low-level API (the llama.cpp
C API), with per-sequence K/V (`kv_unified = False`, llama.cpp's fastest setting here):

* prefill tokens/s of one sequence per `--prefill-tokens` length (after a warm-up decode);
* decode, per `--context` length and `--rows` count: a 16-token prompt decoded once and
  copied to every sequence, untimed steps until each holds the context, 2 warm-up steps, then `--steps` timed steps of one token
  per sequence; total tokens/s over all sequences;
* Best-of-N: `--bon-prompt` (token ids) decoded once and copied to n sequences, then up to
  `--bon-tokens` steps, a sequence leaving the batch (its K/V removed) when it samples an EOS
  id; decode tokens/s = tokens sampled / seconds after the prompt.

Sampling everywhere is T = 1 with top-k 50, as in specrej's measurements. `--quantize OUT`
first writes a Q8_0 requantization of the model to OUT (`llama_model_quantize`) and
measures that file. `--json` prints one JSON document on stdout; progress goes to stderr.
"""
import argparse
import ctypes
import json
import os
import sys
import time

import llama_cpp as L

TOP_K = 50


def log(text):
    print(f"llama.cpp: {text}", file=sys.stderr, flush=True)


def quantize(src, dst):
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = os.cpu_count()
    tmp = dst + ".partial"
    if L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama_model_quantize failed on {src}")
    os.replace(tmp, dst)


def tokenize(vocab, text: bytes):
    buf = (L.llama_token * 256)()
    n = L.llama_tokenize(vocab, text, len(text), buf, 256, False, True)
    return [buf[i] for i in range(n)]


def context(model, rows, tokens, threads):
    """A context of `rows` sequences, each with room for `tokens` positions of its own."""
    p = L.llama_context_default_params()
    p.n_ctx = rows * tokens
    p.n_batch = p.n_ubatch = max(512, rows)
    p.n_seq_max = rows
    p.n_threads = p.n_threads_batch = threads
    p.kv_unified = False
    p.no_perf = True
    ctx = L.llama_init_from_model(model, p)
    if not ctx:
        sys.exit(f"llama_init_from_model failed ({rows} sequences of {tokens} positions)")
    return ctx


def sampler(seed):
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(TOP_K))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(1.0))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
    return chain


def fill(batch, entries):
    for i, (token, pos, seq, logits) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
    batch.n_tokens = len(entries)


def decode(ctx, batch):
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        sys.exit(f"llama_decode returned {rc}")


def fan_out(ctx, batch, prompt, rows):
    """Decodes `prompt` in sequence 0 and copies it to sequences 1..rows."""
    fill(batch, [(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    decode(ctx, batch)
    memory = L.llama_get_memory(ctx)
    for seq in range(1, rows):
        L.llama_memory_seq_cp(memory, 0, seq, -1, -1)


def prefill(model, sentence, lengths, threads):
    results = []
    for n in lengths:
        long = [sentence[i % len(sentence)] for i in range(n)]
        ctx = context(model, 1, n + 16, threads)
        batch = L.llama_batch_init(n, 0, 1)
        fill(batch, [(t, i, 0, False) for i, t in enumerate(long[:16])])
        decode(ctx, batch)  # warm-up
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        fill(batch, [(t, i, 0, i == n - 1) for i, t in enumerate(long)])
        start = time.perf_counter()
        decode(ctx, batch)
        tps = n / (time.perf_counter() - start)
        log(f"prefill {tps:.1f} tokens/s ({n} tokens)")
        results.append({"tokens": n, "tokens_per_second": tps})
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    return results


def decode_rows(model, short, rows, steps, cached, threads):
    warm = 2 + (cached - len(short))
    ctx = context(model, rows, len(short) + warm + steps + 8, threads)
    batch = L.llama_batch_init(max(len(short), rows), 0, rows)
    fan_out(ctx, batch, short, rows)
    chain = sampler(1)
    tokens = [L.llama_sampler_sample(chain, ctx, -1)] * rows
    pos = len(short)

    def step(pos):
        fill(batch, [(tokens[s], pos, s, True) for s in range(rows)])
        decode(ctx, batch)
        for s in range(rows):
            tokens[s] = L.llama_sampler_sample(chain, ctx, s)

    for _ in range(warm):
        step(pos)
        pos += 1
    start = time.perf_counter()
    for _ in range(steps):
        step(pos)
        pos += 1
    elapsed = time.perf_counter() - start
    L.llama_sampler_free(chain)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return rows * steps / elapsed, elapsed / steps


def best_of_n(model, prompt, eos, n, max_new, threads):
    ctx = context(model, n, len(prompt) + max_new + 8, threads)
    batch = L.llama_batch_init(max(len(prompt), n), 0, n)
    fan_out(ctx, batch, prompt, n)
    memory = L.llama_get_memory(ctx)
    chain = sampler(1)
    start = time.perf_counter()
    # (sequence, last token, tokens generated): each sequence's first token is sampled from
    # the shared prompt's logits, as specrej samples each row's own.
    live = [(s, L.llama_sampler_sample(chain, ctx, -1), 1) for s in range(n)]
    generated = 0
    finished = []
    while live:
        keep = []
        for seq, token, count in live:
            if token in eos or count >= max_new:
                finished.append(count)
                generated += count
                L.llama_memory_seq_rm(memory, seq, -1, -1)
            else:
                keep.append((seq, token, count))
        live = keep
        if not live:
            break
        fill(batch, [(token, len(prompt) + count - 1, seq, True) for seq, token, count in live])
        decode(ctx, batch)
        live = [(seq, L.llama_sampler_sample(chain, ctx, i), count + 1) for i, (seq, _, count) in enumerate(live)]
    elapsed = time.perf_counter() - start
    L.llama_sampler_free(chain)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return {"n": n, "tokens": generated, "seconds": elapsed, "decode_tokens_per_second": generated / elapsed}


def ids(text):
    return [int(t) for t in text.split(",") if t.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--quantize", metavar="OUT", help="measure a Q8_0 requantization of MODEL written to OUT")
    ap.add_argument("--rows", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--context", default="16")
    ap.add_argument("--prefill-tokens", default="128,512")
    ap.add_argument("--bon", default="")
    ap.add_argument("--bon-tokens", type=int, default=256)
    ap.add_argument("--bon-prompt", default="", help="comma-separated token ids")
    ap.add_argument("--bon-eos", default="", help="comma-separated token ids")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    contexts = [int(c) for c in args.context.split(",")]
    if not contexts or min(contexts) < 16:
        sys.exit("--context must list lengths of at least 16 (the decode prompt's length)")
    quiet = L.llama_log_callback(lambda *a: None)  # kept alive: llama.cpp calls it later
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    path = args.model
    if args.quantize:
        if not os.path.exists(args.quantize):
            log(f"writing a Q8_0 requantization to {args.quantize}")
            quantize(args.model, args.quantize)
        path = args.quantize
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        sys.exit(f"llama.cpp could not load {path}")
    vocab = L.llama_model_get_vocab(model)
    sentence = tokenize(vocab, b"The quick brown fox jumps over the lazy dog while the band plays on. ")
    short = [sentence[i % len(sentence)] for i in range(16)]
    report = {"model": path, "threads": args.threads, "steps": args.steps}
    report["prefill"] = prefill(model, sentence, [int(n) for n in args.prefill_tokens.split(",")], args.threads)
    report["decode"] = []
    for cached in contexts:
        for rows in [int(r) for r in args.rows.split(",")]:
            tps, step = decode_rows(model, short, rows, args.steps, cached, args.threads)
            log(f"{rows:>3} rows at {cached} tokens: {tps:>7.1f} tokens/s")
            report["decode"].append({"context": cached, "rows": rows, "decode_tokens_per_second": tps, "step_seconds": step})
    report["bon"] = []
    prompt, eos = ids(args.bon_prompt), set(ids(args.bon_eos))
    for n in [int(n) for n in args.bon.split(",") if n.strip() and int(n) > 0]:
        if not prompt:
            sys.exit("--bon needs --bon-prompt")
        run = best_of_n(model, prompt, eos, n, args.bon_tokens, args.threads)
        log(f"Best-of-{n}: {run['tokens']} tokens, decode {run['decode_tokens_per_second']:.1f} tokens/s")
        report["bon"].append(run)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lengths = " | ".join(f"prefill {p['tokens']}" for p in report["prefill"])
        rows = " | ".join(f"{d['rows']} rows at {d['context']}" for d in report["decode"])
        print(f"| engine | {lengths} | {rows} |")
        cells = [f"{p['tokens_per_second']:.1f}" for p in report["prefill"]]
        cells += [f"{d['decode_tokens_per_second']:.1f}" for d in report["decode"]]
        print("| llama.cpp | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
