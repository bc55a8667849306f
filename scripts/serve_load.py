#!/usr/bin/env python3
"""Load benchmark of specrej-server: one server binary against another, side by side.

Starts each server in turn on the same model and component (never two at once: they would
share the cores), sends it the same requests from concurrent clients, checks every answer,
and prints requests/s, tokens/s and latency percentiles, then the ratios. Rounds alternate
(A, B, A, B, ...) so a drift of the machine does not favour one side.

    python3 scripts/serve_load.py --a OLD_BINARY --b NEW_BINARY --model MODEL.gguf \
        --component target/specrej-decoder.component.wasm [--requests 64 --clients 16 --rounds 2]

The request mix is the one of the server's load test (tests/server.rs, load_request):
Best-of-N and Speculative Rejection alternate, n runs 4-16, every fourth request streams.
Standard library only.
"""

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPT = "Name a fruit."


def load_request(i, max_tokens):
    """Request i: (key, body, stream)."""
    seed = i % 5
    stream = (i + 1) % 4 == 0
    n = 4 + 4 * (i // 2 % 4)
    if i % 2 == 0:
        key, specrej = f"bon n={n} seed={seed}", {"method": "best_of_n", "n": n}
    else:
        key = f"sr n={n} seed={seed}"
        specrej = {"method": "speculative_rejection", "n": n, "alpha": 0.5, "min_new_tokens": 4}
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "seed": seed,
        "stream": stream,
        "specrej": specrej,
    }
    return key, json.dumps(body), stream


def post(port, body, timeout):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.getheader("content-type", ""), answer.read().decode()
    finally:
        conn.close()


def winner_document(status, kind, text, stream):
    """The response document of an answer, checked; raises on anything malformed."""
    if status != 200:
        raise ValueError(f"status {status}: {text[:300]}")
    if not stream:
        return json.loads(text)
    if "text/event-stream" not in kind:
        raise ValueError(f"a stream answered as {kind}")
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        events.append((name, data))
    if not events or events[-1][1] != "[DONE]":
        raise ValueError("the stream does not end with [DONE]")
    winners = [d for n, d in events if n == "winner"]
    if len(winners) != 1:
        raise ValueError(f"{len(winners)} winner events")
    return json.loads(winners[0])


def run_load(port, requests, clients, max_tokens, timeout):
    """Sends the requests from `clients` threads; returns the measures."""
    jobs = list(range(requests))
    lock = threading.Lock()
    answers, failures = [], []

    def client():
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop(0)
            key, body, stream = load_request(i, max_tokens)
            sent = time.monotonic()
            try:
                doc = winner_document(*post(port, body, timeout), stream)
                text = doc["choices"][0]["message"]["content"]
                tokens = doc["usage"]["completion_tokens"]
                with lock:
                    answers.append((key, text, tokens, time.monotonic() - sent))
            except Exception as e:  # every failure is reported, none is fatal to the run
                with lock:
                    failures.append(f"request {i} ({key}): {e}")

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    winners, mismatched = {}, []
    for key, text, _, _ in answers:
        if winners.setdefault(key, text) != text:
            mismatched.append(key)
    latencies = sorted(a[3] for a in answers)

    def q(p):
        return latencies[min(len(latencies) - 1, round((len(latencies) - 1) * p))] if latencies else float("nan")

    return {
        "answered": len(answers),
        "failures": failures,
        "mismatched": sorted(set(mismatched)),
        "wall_s": wall,
        "requests_per_s": len(answers) / wall,
        "tokens_per_s": sum(a[2] for a in answers) / wall,
        "p50_s": q(0.5),
        "p95_s": q(0.95),
    }


def engine_seconds(port):
    """specrej_engine_seconds_total by job from /metrics ({} for a server without it)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        answer = conn.getresponse()
        text = answer.read().decode() if answer.status == 200 else ""
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("specrej_engine_seconds_total{job=\""):
            job = line.split('"')[1]
            out[job] = float(line.split()[-1])
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, model, component, port):
    args = [binary, "--listen", f"127.0.0.1:{port}", "--model", model, "--component", component]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{binary} exited with {server.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"{binary} did not answer /health within 120 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="the baseline specrej-server binary")
    parser.add_argument("--b", required=True, help="the specrej-server binary compared with it")
    parser.add_argument("--model", required=True)
    parser.add_argument("--component", required=True)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.requests < 1 or args.clients < 1 or args.rounds < 1:
        sys.exit("error: --requests, --clients and --rounds must be at least 1")
    results = {"a": [], "b": []}
    for round_ in range(args.rounds):
        for side in ("a", "b"):
            port = free_port()
            server = start_server(getattr(args, side), args.model, args.component, port)
            try:
                r = run_load(port, args.requests, args.clients, args.max_tokens, args.timeout)
                r["engine_seconds"] = engine_seconds(port)
            finally:
                server.terminate()
                server.wait(timeout=60)
            results[side].append(r)
            print(
                f"round {round_ + 1} {side}: {r['answered']}/{args.requests} answered, {r['requests_per_s']:.3f} req/s, "
                f"{r['tokens_per_s']:.1f} tok/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, "
                f"{len(r['failures'])} failures, {len(r['mismatched'])} mismatched keys",
                flush=True,
            )
            if r["engine_seconds"]:
                split = ", ".join(f"{k} {v:.1f} s" for k, v in r["engine_seconds"].items())
                print(f"  engine thread: {split}", flush=True)
            for f in r["failures"][:5]:
                print(f"  {f}", flush=True)
    mean = {s: {k: statistics.mean(r[k] for r in results[s]) for k in ("requests_per_s", "tokens_per_s", "p50_s", "p95_s")} for s in results}
    print(f"\n{'':14} {'A':>10} {'B':>10} {'B/A':>7}")
    for k in ("requests_per_s", "tokens_per_s", "p50_s", "p95_s"):
        print(f"{k:14} {mean['a'][k]:10.3f} {mean['b'][k]:10.3f} {mean['b'][k] / mean['a'][k]:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": results, "mean": mean}, f, indent=2)
    bad = any(r["failures"] or r["mismatched"] or r["answered"] != args.requests for s in results for r in results[s])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
