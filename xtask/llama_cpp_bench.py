#!/usr/bin/env python3
"""Batched decode throughput of llama.cpp on the same GGUF, for `cargo xtask bench-llama-cpp`.

Mirrors `specrej bench throughput`: a 16-token prompt prefilled once and copied to every
sequence, 2 warm-up steps, then `--steps` timed steps of one token per sequence; prints total
tokens/s over all rows, and prefill tokens/s for a `--prefill-tokens` prompt.
Uses llama-cpp-python's low-level API (the llama.cpp C API).
"""
import argparse
import os
import time

import llama_cpp as L


def tokenize(vocab, text: bytes):
    buf = (L.llama_token * 256)()
    n = L.llama_tokenize(vocab, text, len(text), buf, 256, False, True)
    return [buf[i] for i in range(n)]


def context(model, rows, tokens, threads):
    p = L.llama_context_default_params()
    p.n_ctx = rows * tokens + 256
    p.n_batch = p.n_ubatch = max(512, rows)
    p.n_seq_max = rows
    p.n_threads = p.n_threads_batch = threads
    p.kv_unified = True
    p.no_perf = True
    return L.llama_init_from_model(model, p)


def fill(batch, entries):
    for i, (token, pos, seq, logits) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
    batch.n_tokens = len(entries)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rows", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    quiet = L.llama_log_callback(lambda *a: None)  # kept alive: llama.cpp calls it later
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(args.model.encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    sentence = tokenize(vocab, b"The quick brown fox jumps over the lazy dog while the band plays on. ")
    short = [sentence[i % len(sentence)] for i in range(16)]
    long = [sentence[i % len(sentence)] for i in range(args.prefill_tokens)]
    greedy = L.llama_sampler_init_greedy()

    ctx = context(model, 1, len(long) + 8, args.threads)
    batch = L.llama_batch_init(len(long), 0, 1)
    fill(batch, [(t, i, 0, i == len(long) - 1) for i, t in enumerate(long)])
    start = time.perf_counter()
    assert L.llama_decode(ctx, batch) == 0
    prefill = len(long) / (time.perf_counter() - start)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    print(f"llama.cpp: prefill {prefill:.1f} tokens/s ({len(long)} tokens)")

    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        ctx = context(model, rows, len(short) + args.steps + 8, args.threads)
        batch = L.llama_batch_init(max(len(short), rows), 0, rows)
        fill(batch, [(t, i, 0, i == len(short) - 1) for i, t in enumerate(short)])
        assert L.llama_decode(ctx, batch) == 0
        memory = L.llama_get_memory(ctx)
        for seq in range(1, rows):
            L.llama_memory_seq_cp(memory, 0, seq, -1, -1)
        tokens = [L.llama_sampler_sample(greedy, ctx, -1)] * rows
        pos = len(short)

        def step(pos):
            fill(batch, [(tokens[s], pos, s, True) for s in range(rows)])
            assert L.llama_decode(ctx, batch) == 0
            for s in range(rows):
                tokens[s] = L.llama_sampler_sample(greedy, ctx, s)

        for _ in range(2):
            step(pos)
            pos += 1
        start = time.perf_counter()
        for _ in range(args.steps):
            step(pos)
            pos += 1
        tps = rows * args.steps / (time.perf_counter() - start)
        results.append((rows, tps))
        print(f"llama.cpp: {rows:>3} rows: {tps:>7.1f} tokens/s")
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    print("| engine | prefill tok/s | " + " | ".join(f"{r} rows" for r, _ in results) + " |")
    print(f"| llama.cpp | {prefill:.1f} | " + " | ".join(f"{t:.1f}" for _, t in results) + " |")


if __name__ == "__main__":
    main()
