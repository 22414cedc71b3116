"""Server throughput and latency at several concurrency levels, with and without a drafter.

    python benchmarks/server_load.py --model gemma3-270m --drafters none,mtp --clients 1,4,16 \\
        --prompts ../shared/prompts/spec_bench_dev.jsonl --requests 16 --max-tokens 128 --json out.json

For each drafter a server process starts on loopback; for each concurrency level C, C client
threads send streaming greedy chat requests (Spec-Bench prompts, round robin) until `--requests`
have completed. Reported: total generated tokens per second over the wall time, and p50/p95 of
request latency (submit to last token) and time to first token.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, drafter: str, slots: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "aheadlm.cli",
        "serve",
        "-m",
        model,
        "--drafter",
        drafter,
        "--port",
        str(port),
        "--slots",
        str(slots),
        *extra,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "AHEADLM_QUIET": "1"}, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def one(base: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=3600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": first or 0.0, "tokens": tokens}


def level(base: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    results, lock, counter = [], threading.Lock(), iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            r = one(base, model, prompts[i % len(prompts)], max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)

    def pct(xs, p):
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 3)

    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
        "latency_p50_s": pct(lat, 0.5),
        "latency_p95_s": pct(lat, 0.95),
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "wall_s": round(wall, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--drafters", default="none,ngram")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--prompts", default="../shared/prompts/spec_bench_dev.jsonl")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    with open(a.prompts) as f:
        prompts = [json.loads(line)["turns"][0] for line in f if line.strip()]
    out = {"model": a.model, "max_tokens": a.max_tokens, "requests": a.requests, "runs": {}}
    for drafter in a.drafters.split(","):
        proc, base = start(a.model, drafter, a.slots, [])
        try:
            one(base, a.model, "Hello", 8)  # warm-up
            out["runs"][drafter] = [
                level(base, a.model, prompts, int(c), a.requests, a.max_tokens) for c in a.clients.split(",")
            ]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        for row in out["runs"][drafter]:
            print(drafter, json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
