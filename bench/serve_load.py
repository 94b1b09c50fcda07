"""Load test for `tunelab serve` on loopback: N chat completions, C in flight at a time; prints one JSON line.

    python bench/serve_load.py --model smollm2-135m-instruct --requests 50 --concurrency 8 --max-batch 1 8
    python bench/serve_load.py --url http://127.0.0.1:8000 --requests 50 --concurrency 8

With --model it starts `python -m tunelab serve MODEL` on a free 127.0.0.1 port and stops it afterwards; with
--url it loads a server that is already running. Answers are greedy, so every run asks the same work.
`run_load` is also what the test suite calls, with small numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import httpx

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Give me a synonym for happy.", "Who wrote Romeo and Juliet?", "What is the boiling point of water?",
             "Translate 'thank you' into Spanish.", "What planet is closest to the sun?"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def run_load(base_url: str, requests: int = 50, concurrency: int = 8, max_tokens: int = 32,
             timeout: float = 600.0) -> dict:
    """Send `requests` chat completions with `concurrency` in flight; latency and failure counts."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    latencies: list[float] = []
    failures: list[str] = []
    tokens = 0

    def one(i: int) -> tuple[float, int, str | None]:
        body = {"model": "tunelab", "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
        t0 = time.perf_counter()
        try:
            r = client.post(url, json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                return dt, 0, f"HTTP {r.status_code}: {r.text[:200]}"
            data = r.json()
            if not data["choices"][0]["message"]["content"].strip():
                return dt, 0, "empty answer"
            return dt, int(data["usage"]["completion_tokens"]), None
        except Exception as e:  # counted, not raised: a load test reports failures
            return time.perf_counter() - t0, 0, f"{type(e).__name__}: {e}"[:200]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: loopback only, whatever proxy the environment names
    with httpx.Client(timeout=timeout, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for dt, n, err in pool.map(one, range(requests)):
                latencies.append(dt)
                tokens += n
                if err:
                    failures.append(err)
        wall = time.perf_counter() - start
    return {"bench": "serve_load", "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
            "failures": len(failures), "seconds": round(wall, 2),
            "requests_per_s": round(requests / wall, 3), "p50_s": round(percentile(latencies, 50), 3),
            "p95_s": round(percentile(latencies, 95), 3), "max_s": round(max(latencies), 3),
            "completion_tokens": tokens, "completion_tokens_per_s": round(tokens / wall, 1),
            "first_failures": failures[:3]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tunelab_server(model: str, port: int, extra: list[str], ready_timeout: float = 300.0) -> Iterator[str]:
    """`tunelab serve MODEL` as a subprocess on 127.0.0.1:port; yields its base URL, stops it afterwards."""
    cmd = [sys.executable, "-m", "tunelab", "serve", model, "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tunelab serve exited with code {proc.returncode} before it was ready")
            try:
                if httpx.get(base + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tunelab serve was not ready after {ready_timeout:.0f}s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start `tunelab serve MODEL` for the run")
    where.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2, help="requests sent before timing")
    p.add_argument("--max-batch", type=int, nargs="+", default=[8],
                   help="with --model: run once per value of `tunelab serve --max-batch` (1 = no batching)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be at least 1")

    def measure(base: str) -> dict:
        if args.warmup:
            run_load(base, args.warmup, 1, args.max_tokens)
        return run_load(base, args.requests, args.concurrency, args.max_tokens)

    if args.url:
        result = {"url": args.url, **measure(args.url)}
        results = [result]
    else:
        results = []
        for mb in args.max_batch:
            with tunelab_server(args.model, free_port(), ["--max-batch", str(mb)]) as base:
                results.append({"model": args.model, "max_batch": mb, **measure(base)})
    import platform

    for result in results:
        # The 1-minute load average says how busy the machine was with other work during the run.
        result.update(python=platform.python_version(), cpus=os.cpu_count(),
                      load_avg_1m=round(os.getloadavg()[0], 2))
        print(json.dumps(result), flush=True)
    return 0 if all(r["failures"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
